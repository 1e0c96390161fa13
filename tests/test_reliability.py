"""Faults a user can meet: a full disk, a damaged artifact behind valid checksums, a run too big
for the disk, and several processes on one artifact. Each ends in a clear error (exit 1) and
leaves any earlier artifact intact, or works."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli

CALIB = ("--dataset", "austen", "--samples", "4", "--seq-len", "64")


@pytest.fixture(scope="module")
def good(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reliability") / "good.llmq"
    assert run_cli("quantize", str(tiny_model), "-o", str(out), "--no-calib", "--g4", "16", "-q").code == 0
    return out


@pytest.fixture
def copy(good, tmp_path) -> Path:
    target = tmp_path / "copy.llmq"
    shutil.copytree(good, target)
    return target


def _resign(root: Path) -> None:
    raw = json.loads((root / "manifest.json").read_text())
    for name, info in raw["files"].items():
        info["bytes"] = (root / name).stat().st_size
        info["sha256"] = hashlib.sha256((root / name).read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(raw))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


# -- llmq verify ---------------------------------------------------------------------------


def test_verify_passes_a_good_artifact(cli, good):
    result = cli("verify", str(good), "--json")
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["problems"] == [] and doc["checks"]["linears_decoded"] == 14
    assert doc["checks"]["files_checksummed"] == len(json.loads((good / "manifest.json").read_text())["files"])
    assert cli("verify", str(good)).stdout.strip().endswith("ok")


def test_verify_finds_nan_in_a_dense_tensor_behind_valid_checksums(cli, copy):
    raw = json.loads((copy / "manifest.json").read_text())
    name = "model.norm.weight"
    shard = copy / raw["dense"][name]["shard"]
    tensors = load_file(shard)
    tensors[name][3] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "llmq"})
    _resign(copy)
    result = cli("verify", str(copy), "--json")
    assert result.code == 1
    doc = json.loads(result.stdout)  # the report is still printed, and the exit code says it failed
    assert not doc["ok"] and doc["problems"] == [f"dense tensor {name}: 1 NaN/Inf value(s)"]
    assert "1 problem(s) found" in result.stderr


def test_verify_finds_tampered_accounting_and_bad_json(cli, copy):
    raw = json.loads((copy / "manifest.json").read_text())
    raw["accounting"]["bits_per_weight"] = 2.0
    (copy / "manifest.json").write_text(json.dumps(raw))
    (copy / "tokenizer_config.json").write_text("{not json")
    _resign(copy)
    doc = json.loads(cli("verify", str(copy), "--json").stdout)
    assert any("tokenizer_config.json: not valid JSON" in p for p in doc["problems"])
    assert any("accounting disagrees" in p and "bits_per_weight" in p for p in doc["problems"])


def test_verify_stops_at_a_checksum_mismatch(cli, copy):
    shard = sorted(copy.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = cli("verify", str(copy), "--json")
    assert result.code == 1 and result.stdout == "" and "checksum mismatch" in result.stderr


# -- full disk -----------------------------------------------------------------------------


def _full_disk_after(calls: int):
    count = {"n": 0}
    real = save_file

    def fake(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return fake


def test_a_full_disk_mid_write_is_a_clear_error_and_leaves_nothing(cli, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr("llmq.quant.writer.save_file", _full_disk_after(1))
    out = tmp_path / "x.llmq"
    result = cli("quantize", str(tiny_model), "-o", str(out), "--no-calib", "--g4", "16")
    assert result.code == 1
    assert "No space left on device; free some space or write elsewhere with -o" in result.stderr
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_full_disk_during_force_keeps_the_earlier_artifact(cli, tiny_model, copy, monkeypatch):
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    monkeypatch.setattr("llmq.quant.writer.save_file", _full_disk_after(2))
    result = cli("quantize", str(tiny_model), "-o", str(copy), "--no-calib", "--g4", "32", "--force")
    assert result.code == 1 and "No space left" in result.stderr
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    assert cli("verify", str(copy)).code == 0 and _leftovers(copy.parent) == []


def test_a_full_disk_while_saving_statistics(cli, tiny_model, tmp_path, monkeypatch):
    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("llmq.runtime.format.streamed.open", full_disk_open, raising=False)
    out = tmp_path / "s.stats"
    result = cli("calibrate", str(tiny_model), "-o", str(out), *CALIB)
    assert result.code == 1 and "No space left on device" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("files", [0, 2], ids=["first-layer", "fisher-inputs"])
def test_a_full_disk_while_calibration_spills_its_layers(cli, tiny_model, tmp_path, monkeypatch, files):
    monkeypatch.setattr("llmq.quant.calibrate.save_file", _full_disk_after(files))
    inline = ("--calib-data", "austen", "--samples", "4", "--calib-seq-len", "64")
    for command in (("calibrate", str(tiny_model), "-o", str(tmp_path / "s.stats"), *CALIB),
                    ("quantize", str(tiny_model), "-o", str(tmp_path / "x.llmq"), "--g4", "16", *inline)):  # fmt: skip
        result = cli(*command)
        assert result.code == 1, result.stderr
        assert "writing calibration's per-layer statistics of" in result.stderr and "No space left" in result.stderr
        assert list(tmp_path.iterdir()) == []  # the per-layer files are gone with their folder


def test_a_real_small_filesystem(cli, tiny_model, tmp_path, monkeypatch):
    """A 64 KiB tmpfs, where mounting is allowed (root in a container that permits it): refused
    before the run by the disk check, and, with the check fooled, failing cleanly mid-write."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the write-hook tests cover this")
    try:
        result = cli("quantize", str(tiny_model), "-o", str(mount / "x.llmq"), "--no-calib", "--g4", "16")
        assert result.code == 1 and "needs about" in result.stderr
        monkeypatch.setattr("llmq.quant.resources.free_disk_bytes", lambda folder: 1 << 40)
        result = cli("quantize", str(tiny_model), "-o", str(mount / "x.llmq"), "--no-calib", "--g4", "16")
        assert result.code == 1 and "No space left on device" in result.stderr
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_run_that_cannot_fit_on_the_disk_is_refused_before_it_starts(cli, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr("llmq.quant.resources.free_disk_bytes", lambda folder: 1000)
    result = cli("quantize", str(tiny_model), "-o", str(tmp_path / "x.llmq"), "--no-calib", "--g4", "16")
    assert result.code == 1 and "needs about" in result.stderr and "only 0 MB are free" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_dry_run_estimates_memory_and_disk(cli, tiny_model, tmp_path):
    doc = json.loads(
        cli("quantize", str(tiny_model), "-o", str(tmp_path / "x"), "--no-calib", "--dry-run", "--json").stdout
    )
    e = doc["estimate"]
    assert e["peak_rss_bytes"] > e["base_rss_bytes"] > 0
    assert e["artifact_bytes"] >= doc["accounting"]["tensor_bytes"]
    text = cli("quantize", str(tiny_model), "-o", str(tmp_path / "x"), "--no-calib", "--dry-run").stdout
    assert "estimated peak memory while quantizing" in text


# -- several processes ---------------------------------------------------------------------


def test_two_readers_of_one_artifact_at_once(good, children):
    commands = [
        ["verify", str(good), "-q"],
        ["eval", "ppl", str(good), "--dataset", "austen", "--max-tokens", "256", "--seq-len", "64", "--json"],
        ["generate", str(good), "-p", "hello", "-n", "4", "--json"],
    ]
    procs = [children(*c, env={"HF_HUB_OFFLINE": "1"}) for c in commands]  # all killed at the end, pass or fail
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    assert [code for _, _, code in results] == [0, 0, 0], [err[-500:] for _, err, _ in results]
    assert json.loads(results[1][0])["result"]["ppl"] > 1
    assert torch.isfinite(torch.tensor(json.loads(results[1][0])["result"]["ppl"]))


# -- untrusted sizes -----------------------------------------------------------------------


def _declare_huge_dense(root: Path) -> None:
    """Claim a 2^34-element (32 GiB in fp16) norm weight in the manifest and the safetensors header,
    leaving the file's bytes as they are, and re-sign: only the sizes are hostile."""
    import struct

    raw = json.loads((root / "manifest.json").read_text())
    name = "model.norm.weight"
    entry = raw["dense"][name]
    entry["shape"] = [2**20, 2**14]
    (root / "manifest.json").write_text(json.dumps(raw))
    shard = root / entry["shard"]
    data = shard.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header[name]["shape"] = [2**20, 2**14]
    text = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
    _resign(root)


def test_a_huge_declared_shape_is_refused_without_allocating_it(copy):
    """Run under a 4 GiB address-space limit: an allocation sized by the declared shape would fail
    with MemoryError (an internal error) instead of llmq's own refusal."""
    import resource

    _declare_huge_dense(copy)
    limit = 4 << 30

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    exe = str(Path(sys.executable).with_name("llmq"))
    for command in (["verify", str(copy)], ["inspect", str(copy)], ["generate", str(copy), "-p", "hi", "-n", "1"]):
        done = subprocess.run([exe, *command], capture_output=True, text=True, preexec_fn=cap, timeout=300)
        assert done.returncode == 1, (command, done.stderr[-600:])
        assert done.stderr.startswith("error: ") and "internal error" not in done.stderr, done.stderr[-600:]
