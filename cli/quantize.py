"""``llmq quantize MODEL -o OUT``: range-aware mixed 2/4-bit quantization into a ``.llmq`` artifact."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from llmq import __version__
from llmq.cli.common import (
    CALIB_SEQ_LEN_HELP,
    Json,
    ModelArg,
    Quiet,
    Reporter,
    Revision,
    TrustRemoteCode,
    render_accounting,
)
from llmq.errors import UsageError
from llmq.quant.config import (
    DEFAULT_PRESET,
    DEFAULT_SAMPLES,
    PRESETS,
    Allocation,
    Refine,
    RefineCodes,
    RefineInputs,
    Rounding,
    Selection,
    preset_config,
    refine_settings,
)

_PRESET_HELP = "Starting point: " + "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values()) + "."


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
        bool,
        typer.Option(
            "--dry-run", help="Print the per-layer bits, size, and each phase's memory and time; write nothing."
        ),
    ] = False,
    memory_check: Annotated[
        bool,
        typer.Option(
            "--memory-check/--no-memory-check",
            help="Refuse, before calibrating, a run whose estimated peak exceeds the available memory.",
        ),
    ] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing artifact at OUT.")] = False,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue an interrupted run of the same command from its finished layers."),
    ] = False,
    calib: Annotated[
        Path | None, typer.Option("--calib", help="Stats file from `llmq calibrate`: Hessian-ranked stripes + GPTQ.")
    ] = None,
    calib_data: Annotated[
        str | None,
        typer.Option("--calib-data", help="Calibrate inline on mix (the default), austen, wikitext2 or a text file."),
    ] = None,
    no_calib: Annotated[
        bool, typer.Option("--no-calib", help="No calibration: round to nearest (fast, much less accurate).")
    ] = False,
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="Calibration windows for --calib-data.")
    ] = DEFAULT_SAMPLES,
    calib_seq_len: Annotated[
        int | None,
        typer.Option("--calib-seq-len", min=2, help=CALIB_SEQ_LEN_HELP),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed for the calibration windows.")] = 0,
    target_bits: Annotated[
        float | None,
        typer.Option("--target-bits", help="Model-wide bits per weight: stripes spread over Linears by sensitivity."),
    ] = None,
    allocation: Annotated[
        Allocation | None,
        typer.Option(
            "--allocation",
            help="How the 4-bit stripes are shared: budget (the preset's bits spread over the Linears by predicted "
            "KL; the default when calibrated) or uniform (every Linear the same stripe fraction).",
        ),
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
    refine: Annotated[
        Refine | None,
        typer.Option(
            "--refine",
            help="After GPTQ: block (tune each block to its fp32 outputs), e2e (block, then the whole model's "
            "scales and norms to its fp32 outputs) or none. Default: block when calibrated.",
        ),
    ] = None,
    refine_steps: Annotated[int | None, typer.Option("--refine-steps", help="Optimiser steps per block.")] = None,
    refine_batch: Annotated[int | None, typer.Option("--refine-batch", help="Calibration windows per step.")] = None,
    refine_codes: Annotated[
        RefineCodes | None,
        typer.Option(
            "--refine-codes",
            help="Where refinement starts the codes: GPTQ's, or lean (the fp32 weights' unrounded positions, "
            "kept only where they beat GPTQ's).",
        ),
    ] = None,
    refine_lr: Annotated[
        float | None,
        typer.Option("--refine-lr", help="Codes' signed step per step, in code units (default: by --refine-codes)."),
    ] = None,
    refine_scale_lr: Annotated[
        float | None, typer.Option("--refine-scale-lr", help="Adam's rate on the fp16 scales.")
    ] = None,
    refine_inputs: Annotated[
        RefineInputs | None,
        typer.Option("--refine-inputs", help="A block's inputs while tuned: the refined blocks' outputs, or fp32's."),
    ] = None,
    e2e_steps: Annotated[int | None, typer.Option("--e2e-steps", help="--refine e2e: optimiser steps.")] = None,
    e2e_batch: Annotated[int | None, typer.Option("--e2e-batch", help="--refine e2e: windows per step.")] = None,
    e2e_lr: Annotated[float | None, typer.Option("--e2e-lr", help="--refine e2e: Adam's rate.")] = None,
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
    from llmq.quant import api
    from llmq.runtime.sources.memory import peak_rss_bytes
    from llmq.runtime.sources.text import request

    start = time.perf_counter()
    out = Reporter(json, quiet)
    config = preset_config(
        preset, g1=g1, g2=g2, g4=g4, stripe_fraction=stripe_fraction, scale_bits=scale_bits,
        outlier_fraction=outliers, rounding=rounding, selection=selection, gptq_damp=damp, gptq_block=gptq_block,
        act_order=act_order, include=tuple(include) if include else None, exclude=tuple(exclude) if exclude else None,
        target_bits=target_bits, allocation=allocation, refine=refine, refine_settings=refine_settings(
            steps=refine_steps, batch=refine_batch, codes=refine_codes, lr=refine_lr, scale_lr=refine_scale_lr,
            inputs=refine_inputs, e2e_steps=e2e_steps, e2e_batch=e2e_batch, e2e_lr=e2e_lr),
    )  # fmt: skip
    if no_calib and (calib is not None or calib_data is not None):
        raise UsageError("--no-calib turns calibration off; drop --calib/--calib-data, or drop --no-calib")
    inline = None  # --no-calib, or statistics from --calib
    if calib_data is not None or (calib is None and not no_calib):
        text = request(calib_data) if calib_data is not None else api.DEFAULT_CALIBRATION.text
        inline = api.CalibData(text, samples, calib_seq_len, seed)
    run = {"calib": calib, "calib_data": inline, "dense_dtype": dense_dtype, "revision": revision,
           "trust_remote_code": trust_remote_code}  # fmt: skip
    document = {"command": "quantize", "llmq_version": __version__, "output": str(output), "preset": preset}
    document |= {"target_bits": target_bits} if target_bits is not None else {}
    if dry_run:
        plan = api.estimate(model, output, config, **run, device=device, feedback=out.feedback())
        document |= plan.to_json()
    else:
        manifest = api.quantize(
            model,
            output,
            config,
            **run,
            device=device,
            force=force,
            resume=resume,
            memory_check=memory_check,
            feedback=out.feedback(),
        )
        document |= {"model": manifest.source.to_json(), "dry_run": False, "config": manifest.quantization,
                     "accounting": manifest.accounting_record}  # fmt: skip
        document |= {"calibration": manifest.calibration} if manifest.calibration else {}
    document["seconds"] = round(time.perf_counter() - start, 2)
    if not dry_run:
        document |= {"stages": out.stages, "peak_rss_bytes": peak_rss_bytes()}
    if json:
        out.emit_json(document)
    elif dry_run:
        _print_estimate(out, plan, output)
    else:
        accounting = manifest.accounting()
        out.result(
            f"wrote {output}: {len(manifest.linears)} Linears at {accounting.bits_per_weight:.3f} bits/weight, "
            f"{accounting.model_bits_per_param:.3f} bits/param overall, {accounting.tensor_bytes / 1e6:.1f} MB, "
            f"{document['seconds']:.1f} s"
        )


def _print_estimate(out: Reporter, plan, output: Path) -> None:
    needs = plan.resources
    out.result(render_accounting(plan.accounting))
    out.result(
        f"dry run: nothing written; {output} would hold about {plan.accounting.tensor_bytes / 1e6:.1f} MB of tensors"
    )
    free = f", {needs.free_disk_bytes / 1e6:.0f} MB free there" if needs.free_disk_bytes is not None else ""
    out.result(
        f"estimated peak memory while quantizing: {needs.peak_rss_bytes / 1e9:.2f} GB during {needs.peak_phase} "
        f"(this process now {needs.base_rss_bytes / 1e9:.2f} GB){free}"
    )
    phases = ", ".join(f"{name} {_duration(needs.phase_seconds[name])} ({peak / 1e9:.2f} GB)"
                       for name, peak in needs.phase_rss_bytes.items())  # fmt: skip
    out.result(f"estimated time on {needs.speed.device}: {_duration(needs.seconds)}: {phases}")
    if problem := needs.memory_problem():
        out.result(f"the run would be refused: {problem}")


def _duration(seconds: float) -> str:
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 6000:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
