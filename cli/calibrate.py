"""``llmq calibrate MODEL -o STATS``: collect per-Linear input statistics for GPTQ and Hessian-aware stripes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from llmq import __version__
from llmq.cli.common import (
    DatasetOpt,
    Device,
    Json,
    ModelArg,
    Quiet,
    Reporter,
    Revision,
    TextFile,
    TrustRemoteCode,
    quiet_libraries,
    source_json,
)

Samples = Annotated[int, typer.Option("--samples", min=1, help="Calibration windows, sampled at random offsets.")]
CalibSeqLen = Annotated[int, typer.Option("--seq-len", min=2, help="Tokens per calibration window.")]
CalibSeed = Annotated[int, typer.Option("--seed", min=0, help="Seed for the window offsets.")]
DEFAULT_SAMPLES, DEFAULT_SEQ_LEN = 64, 512


def calibrate(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="The stats file to write (safetensors).")],
    dataset: DatasetOpt = None,
    text_file: TextFile = None,
    samples: Samples = DEFAULT_SAMPLES,
    seq_len: CalibSeqLen = DEFAULT_SEQ_LEN,
    seed: CalibSeed = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing stats file.")] = False,
    device: Device = "auto",
    revision: Revision = None,
    trust_remote_code: TrustRemoteCode = False,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Run MODEL over calibration text and store each Linear's input statistics (Hessian, E[x^2]).

    The calibration split is used: Pride and Prejudice for austen, the train split for wikitext2.
    """
    from llmq.errors import OutputExistsError
    from llmq.quant.statsfile import write_stats

    start = time.perf_counter()
    out = Reporter(json, quiet)
    if output.exists() and not force:
        raise OutputExistsError(f"{output} already exists; pass --force to replace it")
    source, model_config, calibration, meta = run_calibration(
        out, model, dataset, text_file, samples, seq_len, seed, revision, trust_remote_code, device=device
    )
    write_stats(output, calibration, meta)
    seconds = round(time.perf_counter() - start, 2)
    if json:
        out.emit_json(
            {
                "command": "calibrate",
                "llmq_version": __version__,
                "model": source_json(source),
                "output": str(output),
                "calibration": meta | {"aliases": len(calibration.aliases)},
                "seconds": seconds,
            }
        )
        return
    out.result(
        f"wrote {output}: {len(calibration.stats)} input statistics for {len(calibration.aliases)} Linears, "
        f"{meta['tokens']} tokens from {meta['dataset']}, {seconds:.1f} s"
    )


def run_calibration(
    out: Reporter,
    model,
    dataset,
    text_file,
    samples,
    seq_len,
    seed,
    revision,
    trust_remote_code,
    device="auto",
    show_model: bool = True,
):
    """Shared by `calibrate` and `quantize --calib-data`: resolve, load text, collect stats on ``device``."""
    from llmq.quant.calibrate import calibrate_model
    from llmq.quant.config import QuantConfig
    from llmq.runtime.sources import models, text
    from llmq.runtime.sources.device import resolve_device

    torch_device = resolve_device(device)
    models.check_model_spec(model, revision)
    loaded = text.load_text(dataset, text_file, text.Split.calib, default=text.Dataset.wikitext2)
    quiet_libraries(out.show_progress)
    source = models.resolve_model(model, revision=revision, progress=out.show_progress, log=out.info)
    if show_model:  # `quantize --calib-data` has said it already
        out.info(f"model: {source.label}")
    out.info(f"calibration: {loaded.source}, {samples} samples x {seq_len} tokens, seed {seed}, on {torch_device}")
    model_config = models.load_config(source, trust_remote_code)
    with out.progress("calibrating layers") as update:
        calibration, meta = calibrate_model(
            source, model_config, QuantConfig(), loaded.source, loaded.text, samples, seq_len, seed,
            on_layer=update, device=torch_device,
        )  # fmt: skip
    return source, model_config, calibration, meta
