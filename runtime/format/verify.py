"""``verify``: everything that can be checked about an artifact without running the model.

1. Every file: present, inside the artifact, with the recorded size and SHA-256.
2. Every tensor: named in the manifest for its shard, with the manifest's dtype and shape; the
   packed values in range (permutation, codes, zeros, CSR structure, finite scales).
3. Every quantized Linear decoded through the exact reference path (``layout.dequantize``),
   and every dense tensor, checked for NaN and Inf.
4. The copied HF files that are JSON parse as JSON (data, never code), and the manifest's
   bits-per-weight accounting equals what its layouts give.

Shards are read one at a time, so memory stays at about one decoder layer. Structural problems
(1, 2) stop at the first with an :class:`ArtifactError`; non-finite values (3) and bad JSON (4)
are collected so the report lists all of them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmq.runtime.format import artifact as A
from llmq.runtime.format.layout import dequantize
from llmq.runtime.format.manifest import Manifest


@dataclass
class LinearCheck:
    name: str
    shape: tuple[int, int]
    max_abs: float
    nonfinite: int


@dataclass
class VerifyReport:
    path: Path
    files: int = 0
    file_bytes: int = 0
    tensors: int = 0
    linears: list[LinearCheck] = field(default_factory=list)
    dense_checked: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {
            "artifact": str(self.path),
            "ok": self.ok,
            "checks": {
                "files_checksummed": self.files,
                "bytes_checksummed": self.file_bytes,
                "tensors_checked": self.tensors,
                "linears_decoded": len(self.linears),
                "dense_tensors_checked": self.dense_checked,
            },
            "linears": [
                {"name": c.name, "shape": list(c.shape), "max_abs": c.max_abs, "nonfinite": c.nonfinite}
                for c in self.linears
            ],
            "problems": self.problems,
            "seconds": round(self.seconds, 3),
        }


def verify_artifact(path: Path, on_shard: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Run every check on the artifact at ``path``; ``on_shard(done, total)`` reports progress."""
    start = time.perf_counter()
    manifest = A.open_artifact(path, verify=True)
    report = VerifyReport(path, len(manifest.files), sum(record.bytes for record in manifest.files.values()))
    linears_by_shard: dict[str, list[str]] = {}
    for name, entry in manifest.linears.items():
        linears_by_shard.setdefault(entry.shard, []).append(name)
    shards = manifest.shards
    for done, (shard, tensors) in enumerate(A.iter_shards(manifest), start=1):
        report.tensors += len(tensors)
        for name in linears_by_shard.get(shard, []):
            layout = manifest.linears[name].layout
            weight = dequantize({k: tensors[f"{name}.{k}"] for k in layout.tensor_specs()}, layout)
            finite = torch.isfinite(weight)
            bad = int((~finite).sum())
            max_abs = float(weight[finite].abs().max()) if bool(finite.any()) else float("nan")
            report.linears.append(LinearCheck(name, (layout.out_features, layout.in_features), max_abs, bad))
            if bad:
                report.problems.append(f"linear {name}: {bad} NaN/Inf weight(s) after decoding")
        for name, entry in manifest.dense.items():
            if entry.shard == shard and entry.dtype.is_floating_point:
                report.dense_checked += 1
                bad = int((~torch.isfinite(tensors[name])).sum())
                if bad:
                    report.problems.append(f"dense tensor {name}: {bad} NaN/Inf value(s)")
        if on_shard:
            on_shard(done, len(shards))
    report.problems += _json_problems(manifest) + _accounting_problems(manifest)
    report.seconds = time.perf_counter() - start
    return report


def _json_problems(manifest: Manifest) -> list[str]:
    problems = []
    for name in manifest.files:
        if name.endswith(".json"):
            try:
                json.loads((manifest.path / name).read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                problems.append(f"{name}: not valid JSON ({err})")
    return problems


def _accounting_problems(manifest: Manifest) -> list[str]:
    """The manifest's bits-per-weight accounting must be what its layouts and dense shapes give."""
    recorded = manifest.accounting_record
    if recorded is None:
        return []
    computed = manifest.accounting().to_json()
    if recorded != computed:
        differing = sorted(k for k in computed if recorded.get(k) != computed[k])
        return [f"manifest accounting disagrees with the layouts in {differing or sorted(recorded)}"]
    return []
