"""``llmq quantize MODEL -o OUT``: range-aware mixed 2/4-bit quantization into a ``.llmq`` artifact."""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from llmq import __version__
from llmq.cli.common import (
    Json,
    ModelArg,
    Quiet,
    Reporter,
    Revision,
    TrustRemoteCode,
    quiet_libraries,
    render_accounting,
    source_json,
)
from llmq.quant.config import DEFAULT_PRESET, PRESETS, Rounding, Selection

_PRESET_HELP = "Starting point: " + "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values()) + "."
_DENSE_DTYPES = {"auto": None, "fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def quantize(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="The artifact directory to write (e.g. model.llmq).")],
    preset: Annotated[str, typer.Option("--preset", help=_PRESET_HELP)] = DEFAULT_PRESET,
    g1: Annotated[int | None, typer.Option("--g1", help="2-bit group size (multiple of 16).")] = None,
    g2: Annotated[int | None, typer.Option("--g2", help="First-order scales per FP16 second-order scale.")] = None,
    g4: Annotated[int | None, typer.Option("--g4", help="4-bit group size and stripe unit (multiple of 8).")] = None,
    stripe_fraction: Annotated[
        float | None, typer.Option("--stripe-fraction", help="Share of input channels in 4-bit stripes, 0 to 1.")
    ] = None,
    scale_bits: Annotated[
        int | None, typer.Option("--scale-bits", help="Bits of a first-order scale code (1-6).")
    ] = None,
    outliers: Annotated[
        float | None, typer.Option("--outliers", help="Share of 2-bit weights kept as fp16 corrections (0-0.05).")
    ] = None,
    rounding: Annotated[Rounding | None, typer.Option("--rounding", help="Group scale/zero choice.")] = None,
    selection: Annotated[
        Selection | None,
        typer.Option("--selection", help="Stripe channel ranking; auto = hessian with calibration, else range."),
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option("--include", help="fnmatch pattern of Linear names to quantize (repeatable).")
    ] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Pattern of Linears to keep 16-bit.")] = None,
    dense_dtype: Annotated[
        str,
        typer.Option(
            "--dense-dtype", help="dtype of unquantized tensors: auto (16-bit, source's if 16-bit), fp16, bf16, fp32."
        ),
    ] = "auto",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the per-layer bits and size; write nothing.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing artifact at OUT.")] = False,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue an interrupted run of the same command from its finished layers."),
    ] = False,
    calib: Annotated[
        Path | None, typer.Option("--calib", help="Stats file from `llmq calibrate`: Hessian-ranked stripes + GPTQ.")
    ] = None,
    calib_data: Annotated[
        str | None, typer.Option("--calib-data", help="Calibrate inline on austen, wikitext2 or a text file path.")
    ] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Calibration windows for --calib-data.")] = 64,
    calib_seq_len: Annotated[int, typer.Option("--calib-seq-len", min=2, help="Tokens per calibration window.")] = 512,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed for the calibration windows.")] = 0,
    target_bits: Annotated[
        float | None,
        typer.Option("--target-bits", help="Model-wide bits per weight: stripes spread over Linears by sensitivity."),
    ] = None,
    damp: Annotated[
        float | None, typer.Option("--damp", help="GPTQ dampening, share of the mean Hessian diagonal.")
    ] = None,
    act_order: Annotated[
        bool | None,
        typer.Option(
            "--act-order/--no-act-order", help="GPTQ in descending activation energy within each part (default on)."
        ),
    ] = None,
    gptq_block: Annotated[
        int | None, typer.Option("--gptq-block", help="GPTQ columns per lazy-update block (speed only).")
    ] = None,
    device: Annotated[
        str,
        typer.Option("--device", help="Where calibration, rounding, GPTQ run: auto (cuda if present), cpu, cuda[:N]."),
    ] = "auto",
    revision: Revision = None,
    trust_remote_code: TrustRemoteCode = False,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Quantize MODEL to range-aware mixed 2/4-bit weights and write a self-contained artifact."""
    import torch

    from llmq.errors import ArtifactWriteError, UsageError
    from llmq.quant import pipeline, resources, writer
    from llmq.quant.config import preset_config
    from llmq.runtime.sources import models
    from llmq.runtime.sources.device import resolve_device

    start = time.perf_counter()
    out = Reporter(json, quiet)
    torch_device = resolve_device(device)
    if dense_dtype not in _DENSE_DTYPES:
        raise UsageError(f"--dense-dtype {dense_dtype!r} must be one of {', '.join(_DENSE_DTYPES)}")
    config = preset_config(
        preset, g1=g1, g2=g2, g4=g4, stripe_fraction=stripe_fraction, scale_bits=scale_bits,
        outlier_fraction=outliers, rounding=rounding, selection=selection,
        gptq_damp=damp, gptq_block=gptq_block, act_order=act_order,
        include=tuple(include) if include else None, exclude=tuple(exclude) if exclude else None,
    )  # fmt: skip
    if calib is not None and calib_data is not None:
        raise UsageError("give --calib (a stats file) or --calib-data (calibrate now), not both")
    if config.selection == Selection.hessian and calib is None and calib_data is None:
        raise UsageError("--selection hessian ranks channels with calibration statistics; add --calib or --calib-data")
    if calib is None and calib_data is None:
        if act_order:
            raise UsageError("--act-order orders GPTQ by calibration statistics; add --calib or --calib-data")
        config = replace(config, act_order=False)  # round-to-nearest has no column order to choose
    if target_bits is not None and stripe_fraction is not None:
        raise UsageError("--target-bits chooses the stripes per Linear; drop --stripe-fraction")
    if not dry_run:
        writer.check_output(output, force)
    models.check_model_spec(model, revision)
    quiet_libraries(out.show_progress)
    source = models.resolve_model(model, revision=revision, progress=out.show_progress, log=out.info)
    if source.kind == models.SourceKind.artifact:
        raise UsageError(f"{model} is already a quantized llmq artifact; quantize the original model instead")
    out.info(f"model: {source.label}")
    model_config = models.load_config(source, trust_remote_code)
    dense = getattr(torch, _DENSE_DTYPES[dense_dtype]) if _DENSE_DTYPES[dense_dtype] else None
    stats = None
    if not dry_run or calib is not None:
        stats = _calibration(
            out, source, model, calib, calib_data, samples, calib_seq_len, seed, revision, trust_remote_code, device
        )
    if stats is None and not dry_run:
        out.info(
            "no calibration data: rounding to nearest, which loses far more accuracy at 2-3 bits than GPTQ "
            "(docs/benchmarks.md); add --calib-data or --calib"
        )
    if dry_run and calib_data is not None and target_bits is not None:
        out.info("dry run: stripes allocated without calibration data; the real run ranks them with its Hessians")
    plan = pipeline.make_plan(source, model_config, config, dense, target_bits, stats)
    accounting = plan.accounting()
    needs = _estimate(plan, source, stats, output)
    document = {
        "command": "quantize",
        "llmq_version": __version__,
        "model": source_json(source),
        "output": str(output),
        "dry_run": dry_run,
        "preset": preset,
        "config": config.to_json(),
        "accounting": accounting.to_json(),
    }
    if stats is not None:
        document["calibration"] = {k: v for k, v in stats.meta.items() if k != "aliases"}
    if target_bits is not None:
        document["target_bits"] = target_bits
    document["estimate"] = needs.to_json()
    if not dry_run:
        problem = resources.disk_problem(needs, output)
        if problem:
            raise ArtifactWriteError(problem)
        if warning := resources.memory_warning(needs):
            out.warn(warning)
        with _StopRequest.installed() as stop, out.progress("quantizing layers") as update:
            on_unit = lambda d, t, _: update(d, t)  # noqa: E731
            pipeline.quantize_model(
                source, output, config, plan, force, on_unit, stats, torch_device, resume=resume, log=out.info,
                stop=stop.check,
            )  # fmt: skip
    document["seconds"] = round(time.perf_counter() - start, 2)
    if json:
        out.emit_json(document)
        return
    if dry_run:
        out.result(render_accounting(accounting))
        out.result(
            f"dry run: nothing written; {output} would hold about {accounting.tensor_bytes / 1e6:.1f} MB of tensors"
        )
        free = f", {needs.free_disk_bytes / 1e6:.0f} MB free there" if needs.free_disk_bytes is not None else ""
        out.result(
            f"estimated peak memory while quantizing: {needs.peak_rss_bytes / 1e9:.2f} GB "
            f"(this process now {needs.base_rss_bytes / 1e9:.2f} GB){free}"
        )
    else:
        out.result(
            f"wrote {output}: {len(plan.linears)} Linears at {accounting.bits_per_weight:.3f} bits/weight, "
            f"{accounting.model_bits_per_param:.3f} bits/param overall, {accounting.tensor_bytes / 1e6:.1f} MB, "
            f"{document['seconds']:.1f} s"
        )


def _estimate(plan, source, stats, output: Path):
    from llmq.quant import pipeline, resources

    dense_bytes = {k: (math.prod(shape) * dtype.itemsize, math.prod(shape)) for k, (dtype, shape) in plan.dense.items()}
    hf_bytes = sum(f.stat().st_size for f in pipeline.hf_files(source.path))
    stats_bytes = sum(t.numel() * t.element_size() for t in stats.tensors.values()) if stats is not None else 0
    return resources.estimate(plan.linears, dense_bytes, hf_bytes, stats_bytes, output.expanduser().resolve().parent)


class _StopRequest:
    """Ctrl-C and SIGTERM (a scheduler's kill) during a quantize run.

    The first asks the run to stop at the next tensor boundary: raised anywhere, the interrupt can
    land inside a library call that turns it into another error (safetensors reported a
    ``ValueError`` that way), and the finished layers would not be kept. A second signal stops at
    once. Either way the pipeline keeps the finished layers for ``--resume``.
    """

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"signal {signum}")
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt("stop requested")

    @classmethod
    @contextmanager
    def installed(cls):
        stop = cls()
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield stop
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _calibration(out, source, model, calib, calib_data, samples, seq_len, seed, revision, trust_remote_code, device):
    """The stats to quantize with: read from --calib, collected now for --calib-data, or none (RTN)."""
    from llmq.quant import statsfile
    from llmq.runtime.sources.checkpoint import model_fingerprint

    if calib is not None:
        return statsfile.read_stats(calib, model_fingerprint(source.path))
    if calib_data is None:
        return None
    from llmq.cli.calibrate import run_calibration
    from llmq.runtime.sources.text import Dataset

    names = {d.value: d for d in Dataset}
    dataset, text_file = (names[calib_data], None) if calib_data in names else (None, Path(calib_data))
    _, _, calibration, meta = run_calibration(
        out, model, dataset, text_file, samples, seq_len, seed, revision, trust_remote_code, device=device,
        show_model=False,
    )  # fmt: skip
    return statsfile.in_memory(calibration, meta)
