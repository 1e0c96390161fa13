"""``llmq calibrate MODEL -o STATS``: collect per-Linear input statistics for GPTQ and Hessian-aware stripes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from llmq import __version__
from llmq.cli.common import (
    CALIB_SEQ_LEN_HELP,
    DatasetOpt,
    Device,
    Json,
    ModelArg,
    Quiet,
    Reporter,
    Revision,
    TextFile,
    TrustRemoteCode,
)
from llmq.quant.config import DEFAULT_INCLUDE, DEFAULT_SAMPLES, QuantConfig
from llmq.runtime.sources.text import TextRequest

Samples = Annotated[int, typer.Option("--samples", min=1, help="Calibration windows, sampled at random offsets.")]
CalibSeqLen = Annotated[int | None, typer.Option("--seq-len", min=2, help=CALIB_SEQ_LEN_HELP)]
CalibSeed = Annotated[int, typer.Option("--seed", min=0, help="Seed for the window offsets.")]


def calibrate(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="The stats file to write (safetensors).")],
    dataset: DatasetOpt = None,
    text_file: TextFile = None,
    samples: Samples = DEFAULT_SAMPLES,
    seq_len: CalibSeqLen = None,
    seed: CalibSeed = 0,
    include: Annotated[
        list[str] | None,
        typer.Option("--include", help="Matrices to collect statistics for, as quantize --include (repeatable)."),
    ] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Matrices to leave out.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing stats file.")] = False,
    device: Device = "auto",
    revision: Revision = None,
    trust_remote_code: TrustRemoteCode = False,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Run MODEL over calibration text and store each Linear's input statistics (Hessian, E\\[x²]).

    Default text: the built-in mix (prose, technical text, code). The calibration split is used:
    Pride and Prejudice for austen, the train split for wikitext2.
    """
    from llmq.quant import api

    start = time.perf_counter()
    out = Reporter(json, quiet)
    stats = api.calibrate(
        model, TextRequest(dataset, text_file), out=output, force=force, samples=samples, seq_len=seq_len, seed=seed,
        config=QuantConfig(include=tuple(include or DEFAULT_INCLUDE), exclude=tuple(exclude or ())), device=device,
        revision=revision, trust_remote_code=trust_remote_code, feedback=out.feedback(),
    )  # fmt: skip
    seconds = round(time.perf_counter() - start, 2)
    meta = stats.provenance
    if json:
        out.emit_json(
            {
                "command": "calibrate",
                "llmq_version": __version__,
                "model": stats.model.to_json(),
                "output": str(output),
                "calibration": meta | {"aliases": stats.linears},
                "seconds": seconds,
            }
        )
        return
    out.result(
        f"wrote {output}: {stats.inputs} input statistics for {stats.linears} Linears, "
        f"{meta['tokens']} tokens from {meta['dataset']}, {seconds:.1f} s"
    )
