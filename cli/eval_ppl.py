"""``llmq eval ppl MODEL``: perplexity with its uncertainty, to the protocol in docs/eval.md."""

from __future__ import annotations

from typing import Annotated

import typer

from llmq.cli import markdown
from llmq.cli.common import DatasetOpt, Json, Markdown, ModelArg, Quiet, Reporter, TextFile, with_load_options
from llmq.runtime.options import LoadOptions
from llmq.runtime.sources.text import TextRequest


@with_load_options
def ppl(
    model: ModelArg,
    dataset: DatasetOpt = None,
    text_file: TextFile = None,
    seq_len: Annotated[
        int | None,
        typer.Option(
            "--seq-len",
            min=2,
            help="Window length in tokens (default 2048, capped by the model's context).",
            show_default=False,
        ),
    ] = None,
    stride: Annotated[
        int | None,
        typer.Option(
            "--stride",
            min=1,
            help="Start a window every N tokens; less than --seq-len gives sliding windows (default: --seq-len).",
            show_default=False,
        ),
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", min=2, help="Use only the first N tokens of the text.")
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option("--baseline", help="Also score this model (the original) on the same text and windows."),
    ] = None,
    cache_baseline: Annotated[
        bool,
        typer.Option("--cache-baseline", help="Keep the baseline's result in the cache directory and reuse it."),
    ] = False,
    max_ratio: Annotated[
        float | None,
        typer.Option("--max-ratio", help="Gate: exit 3 when ppl(MODEL) / ppl(baseline) is above this."),
    ] = None,
    record: Annotated[
        bool, typer.Option("--record", help="Add the result to the artifact's model card (README.md, checksummed).")
    ] = False,
    *,
    options: LoadOptions,
    json: Json = False,
    md: Markdown = False,
    quiet: Quiet = False,
) -> None:
    """Perplexity of MODEL on a text: wikitext2 test by default, or the embedded Austen eval novel."""
    from llmq.runtime import api

    out = Reporter(json, quiet, md)
    report = api.perplexity(
        model, TextRequest(dataset, text_file), seq_len=seq_len, stride=stride, max_tokens=max_tokens,
        baseline=baseline, cache_baseline=cache_baseline, max_ratio=max_ratio, record=record, options=options,
        feedback=out.feedback(),
    )  # fmt: skip
    if json:
        out.emit_json(report.to_json())
    elif md:
        out.result(markdown.perplexity(report.to_json()))
    else:
        out.result(_line(report.result, report.text_source, report.protocol))
        if report.baseline is not None:
            out.result(f"baseline {report.baseline.source.label}: {_line(report.baseline.result)}")
            out.result(f"ratio {report.ratio:.4f} (ppl / baseline ppl)")
    out.gates(report.gates)


def _line(r, text_source: str | None = None, protocol: dict | None = None) -> str:
    where = (
        f"{text_source}, {r.windows} windows × {protocol['seq_len']}, stride {protocol['stride']}, " if protocol else ""
    )
    return f"ppl {r.ppl:.4f} ± {r.ppl_stderr:.4f}  ({where}{r.tokens_scored} tokens scored, {r.seconds:.1f} s)"
