"""Will a quantize run fit? Disk and memory, estimated before it starts.

Disk: the artifact's tensor bytes are known exactly from the plan (the accounting), plus the
copied HF files. Memory: quantizing streams one unit (a decoder layer, or the remaining
tensors) at a time, so the peak is about

    this process before the run (torch, transformers, the plan)      measured, not guessed
  + COMPUTE_OVERHEAD (what the first computations add to the process)
  + calibration statistics in memory: the output Fisher, and one Hessian read from its file at a time
  + the largest unit's output (packed tensors and dense tensors, kept until its shard is written)
  + the working set of that unit's largest Linear: WORK_COPIES fp32 copies of its weight

WORK_COPIES is set from measured peaks (docs/reliability.md gives the comparison); the estimate
is a guide, so a run that looks too big for memory gets a warning, while one that cannot fit on
the disk is refused before any work is done.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from llmq.quant.pipeline import hf_files
from llmq.quant.plan import Plan
from llmq.quant.statsfile import CalibStats
from llmq.runtime.sources.memory import available_memory_bytes, current_rss_bytes

WORK_COPIES = 12  # fp32 copies of a weight alive while it is quantized (weight, permuted, scale search, decodes)
COMPUTE_OVERHEAD = 200 << 20  # torch's thread pools and kernel caches, set up by the first real computations
DENSE_WORK = 9  # bytes per dense parameter in flight: source read (up to fp32), a float copy, a finiteness mask
DISK_MARGIN = 16 << 20  # manifest, filesystem slack


@dataclass(frozen=True)
class Estimate:
    artifact_bytes: int
    peak_rss_bytes: int
    base_rss_bytes: int
    stats_bytes: int
    free_disk_bytes: int | None
    available_memory_bytes: int | None

    def to_json(self) -> dict:
        return dict(self.__dict__)


def free_disk_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def estimate_plan(plan: Plan, model_folder: Path, stats: CalibStats | None, out: Path) -> Estimate:
    """The disk and memory a run of ``plan`` (the model in ``model_folder``, written to ``out``)
    needs, with what this machine has."""
    output: dict[str, int] = {}
    work: dict[str, int] = {}
    for name, layout in plan.linears.items():
        unit = plan.unit(name)
        output[unit] = output.get(unit, 0) + layout.stored_bits() // 8
        working = WORK_COPIES * 4 * layout.out_features * layout.in_features
        work[unit] = max(work.get(unit, 0), working)
    for name, (dtype, shape) in plan.dense.items():
        unit = plan.unit(name)
        output[unit] = output.get(unit, 0) + math.prod(shape) * dtype.itemsize
        work[unit] = max(work.get(unit, 0), DENSE_WORK * math.prod(shape))
    per_unit = max((output[u] + work.get(u, 0) for u in output), default=0)
    base = current_rss_bytes()
    stats_bytes = stats.resident_bytes() if stats is not None else 0
    return Estimate(
        artifact_bytes=sum(output.values()) + sum(f.stat().st_size for f in hf_files(model_folder)),
        peak_rss_bytes=base + COMPUTE_OVERHEAD + stats_bytes + per_unit,
        base_rss_bytes=base,
        stats_bytes=stats_bytes,
        free_disk_bytes=free_disk_bytes(out.expanduser().resolve().parent),
        available_memory_bytes=available_memory_bytes(),
    )


def disk_problem(e: Estimate, out: Path) -> str | None:
    """A message if the artifact cannot fit on the output's disk."""
    if e.free_disk_bytes is not None and e.free_disk_bytes < e.artifact_bytes + DISK_MARGIN:
        return (
            f"{out} needs about {(e.artifact_bytes + DISK_MARGIN) / 1e6:.0f} MB and only "
            f"{e.free_disk_bytes / 1e6:.0f} MB are free in {out.parent}; free some space or write elsewhere with -o"
        )
    return None


def memory_warning(e: Estimate) -> str | None:
    if e.available_memory_bytes is not None and e.available_memory_bytes < e.peak_rss_bytes:
        return (
            f"this run may need about {e.peak_rss_bytes / 1e9:.1f} GB of memory at its peak and "
            f"{e.available_memory_bytes / 1e9:.1f} GB are available; it may be killed"
        )
    return None
