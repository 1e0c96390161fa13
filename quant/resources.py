"""Will a quantize run fit, and how long will it take? Disk, memory and time, before it starts.

Disk: the artifact's tensor bytes are known exactly from the plan (the accounting), plus the
copied HF files. Memory: every phase holds one decoder layer's worth at a time, so the peak is

    this process before the run (torch, transformers, the plan)      measured, not guessed
  + COMPUTE_OVERHEAD (what the first computations add to the process)
  + the most any phase holds at once (:func:`llmq.quant.forecast.phase_bytes`): for quantizing,
    the largest unit's output and its largest Linear's working set, WORK_COPIES fp32 copies

Time: each phase's counted work at the device's measured rates (:mod:`llmq.quant.forecast`), in
a dry run only, where the second the measurement takes is worth it. A run whose peak exceeds the
memory this machine has available is refused before any work, unless told to go ahead anyway.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from llmq.quant import forecast
from llmq.quant.linear import block_rows
from llmq.quant.pipeline import hf_files
from llmq.quant.plan import Plan
from llmq.runtime.sources.memory import available_memory_bytes, current_rss_bytes

WORK_COPIES = 12  # fp32 copies of a weight alive while it is quantized (weight, permuted, scale search, decodes)
COMPUTE_OVERHEAD = 200 << 20  # torch's thread pools and kernel caches, set up by the first real computations
DENSE_WORK = 9  # bytes per dense parameter in flight: source read (up to fp32), a float copy, a finiteness mask
GPTQ_COPIES = 4  # fp32 copies of a weight while GPTQ runs (the weight, its permuted copy, codes, the grid)
# bytes per Hessian entry while GPTQ factorises: one fp64 [K, K] and its fp32 result, the fp32 Hessian, its
# permuted copy
HESSIAN_BYTES = 20
DISK_MARGIN = 16 << 20  # manifest, filesystem slack


# What lowers each phase's peak, as the CLI spells it.
LEVERS = {
    "calibrate": "fewer --samples or a shorter --calib-seq-len (every window's activations are held)",
    "fisher": "a shorter --calib-seq-len (the output head's logits and gradients of one window are held)",
    "plan": "a machine with more memory (one matrix and its Hessian are held)",
    "quantize": "--device cuda, or a machine with more memory (the largest matrix's working set is held)",
    "refine": "fewer --samples, a smaller --refine-batch, or --refine none (four sets of activations are held)",
    "e2e": "--refine block (the end-to-end stage holds every refined layer)",
}


@dataclass(frozen=True)
class Estimate:
    artifact_bytes: int
    peak_rss_bytes: int  # the largest of the phases'
    base_rss_bytes: int
    free_disk_bytes: int | None
    available_memory_bytes: int | None
    phase_rss_bytes: dict[str, int]  # each phase's peak resident set, the process's whole
    phase_seconds: dict[str, float] | None = None  # each phase's wall time (dry runs)
    speed: forecast.Speed | None = None  # the device rates phase_seconds come from

    @property
    def peak_phase(self) -> str:
        return max(self.phase_rss_bytes, key=self.phase_rss_bytes.__getitem__)

    @property
    def seconds(self) -> float | None:
        return None if self.phase_seconds is None else sum(self.phase_seconds.values())

    def memory_problem(self) -> str | None:
        """A message if the run's peak needs more memory than this machine has available (beyond what
        this process holds already)."""
        if self.available_memory_bytes is None:
            return None
        needed = self.peak_rss_bytes - self.base_rss_bytes
        if needed <= self.available_memory_bytes:
            return None
        phase = self.peak_phase
        return (
            f"this run needs about {self.peak_rss_bytes / 1e9:.1f} GB at its peak (during {phase}), "
            f"{needed / 1e9:.1f} GB more than this process holds, and {self.available_memory_bytes / 1e9:.1f} GB are "
            f"available; lower it with {LEVERS[phase]}, or pass --no-memory-check to run it anyway"
        )

    def to_json(self) -> dict:
        document = {k: v for k, v in self.__dict__.items() if k not in ("phase_rss_bytes", "phase_seconds", "speed")}
        document["peak_phase"] = self.peak_phase
        document["phases"] = {
            name: {"peak_rss_bytes": peak} | ({} if self.phase_seconds is None else
                                              {"seconds": round(self.phase_seconds[name], 1)})
            for name, peak in self.phase_rss_bytes.items()
        }  # fmt: skip
        if self.phase_seconds is not None:
            document["seconds"] = round(self.seconds, 1)
            document["speed"] = self.speed.to_json()
        return document


def free_disk_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def matrix_work(n: int, k: int, gptq: bool) -> int:
    """The most quantizing one [n, k] matrix holds at once: the scale search's copies, or GPTQ's
    (the search's temporaries are gone by then; the weight's copies and the Hessian's are not), of
    one block of its rows (:func:`llmq.quant.linear.row_blocks`)."""
    block = block_rows(n, k) * k
    search = WORK_COPIES * 4 * block
    return max(search, GPTQ_COPIES * 4 * block + HESSIAN_BYTES * k * k) if gptq else search


def unit_bytes(plan: Plan, gptq: bool) -> tuple[dict[str, int], dict[str, int]]:
    """Per work unit: the bytes of its output tensors, and the most its computation holds at once
    (its largest matrix's scale search, or GPTQ with that matrix's inverse Hessian, or a dense
    tensor's conversion)."""
    output: dict[str, int] = {}
    work: dict[str, int] = {}
    for name, layout in plan.linears.items():
        unit = plan.unit(name)
        output[unit] = output.get(unit, 0) + layout.stored_bits() // 8
        work[unit] = max(work.get(unit, 0), matrix_work(layout.out_features, layout.in_features, gptq))
    for name, (dtype, dims) in plan.dense.items():
        unit = plan.unit(name)
        output[unit] = output.get(unit, 0) + math.prod(dims) * dtype.itemsize
        work[unit] = max(work.get(unit, 0), DENSE_WORK * math.prod(dims))
    return output, work


def estimate_plan(plan: Plan, model_folder: Path, out: Path, shape: forecast.Shape, settings: forecast.Settings,
                  speed: forecast.Speed | None = None) -> Estimate:  # fmt: skip
    """The disk and memory a run of ``plan`` (the model in ``model_folder``, written to ``out``, with
    ``settings``) needs, with what this machine has; with ``speed``, each phase's wall time too."""
    output, work = unit_bytes(plan, settings.gptq)
    per_unit = max((output[u] + work.get(u, 0) for u in output), default=0)
    base = current_rss_bytes()
    held = forecast.phase_bytes(shape, settings, per_unit)
    phases = {name: base + COMPUTE_OVERHEAD + bytes_ for name, bytes_ in held.items()}
    seconds = None if speed is None else forecast.phase_seconds(shape, settings, speed)
    return Estimate(
        artifact_bytes=sum(output.values()) + sum(f.stat().st_size for f in hf_files(model_folder)),
        peak_rss_bytes=max(phases.values()),
        base_rss_bytes=base,
        free_disk_bytes=free_disk_bytes(out.expanduser().resolve().parent),
        available_memory_bytes=available_memory_bytes(),
        phase_rss_bytes=phases,
        phase_seconds=seconds,
        speed=speed,
    )


def disk_problem(e: Estimate, out: Path) -> str | None:
    """A message if the artifact cannot fit on the output's disk."""
    if e.free_disk_bytes is not None and e.free_disk_bytes < e.artifact_bytes + DISK_MARGIN:
        return (
            f"{out} needs about {(e.artifact_bytes + DISK_MARGIN) / 1e6:.0f} MB and only "
            f"{e.free_disk_bytes / 1e6:.0f} MB are free in {out.parent}; free some space or write elsewhere with -o"
        )
    return None
