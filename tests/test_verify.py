"""runtime/format/verify.py called directly: every check, problems collected rather than raised."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmq.errors import ArtifactError
from llmq.runtime.format.verify import verify_artifact


@pytest.fixture
def copy(tiny_artifact, tmp_path):
    target = tmp_path / "copy.llmq"
    shutil.copytree(tiny_artifact, target)
    return target


def _resign(root) -> None:
    """Make the manifest's size and checksum records match the files again (damage behind valid checksums)."""
    manifest = json.loads((root / "manifest.json").read_text())
    for name, record in manifest["files"].items():
        record["bytes"] = (root / name).stat().st_size
        record["sha256"] = hashlib.sha256((root / name).read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_a_good_artifact_passes_every_check(tiny_artifact):
    shards = []
    report = verify_artifact(tiny_artifact, on_shard=lambda done, total: shards.append((done, total)))
    assert report.ok and report.problems == [] and shards == [(1, 3), (2, 3), (3, 3)]
    doc = report.to_json()
    assert doc["checks"]["linears_decoded"] == 14 and doc["checks"]["files_checksummed"] == report.files > 3
    assert all(layer["nonfinite"] == 0 and layer["max_abs"] > 0 for layer in doc["linears"])


def test_nonfinite_values_and_bad_json_are_collected(copy):
    shard = copy / "shard-00002.safetensors"
    tensors = load_file(shard)
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("inf"))
    save_file(tensors, str(shard), metadata={"format": "llmq"})
    (copy / "generation_config.json").write_text("{broken")
    _resign(copy)
    report = verify_artifact(copy)
    assert not report.ok and len(report.problems) == 2
    assert "model.norm.weight" in report.problems[0] and "generation_config.json" in report.problems[1]


def test_structural_damage_stops_at_the_first_problem(copy):
    with (copy / "shard-00000.safetensors").open("r+b") as f:
        f.seek(200)
        f.write(b"\xff\xff")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        verify_artifact(copy)
