"""``llmq eval ppl MODEL``: perplexity with its uncertainty, to the protocol in docs/eval.md."""

from __future__ import annotations

from typing import Annotated

import typer

from llmq.cli.common import DatasetOpt, Json, ModelArg, Quiet, Reporter, TextFile, with_load_options
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
    *,
    options: LoadOptions,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Perplexity of MODEL on a text: wikitext2 test by default, or the embedded Austen eval novel."""
    from llmq.runtime import api

    out = Reporter(json, quiet)
    report = api.perplexity(
        model, TextRequest(dataset, text_file), seq_len=seq_len, stride=stride, max_tokens=max_tokens,
        options=options, feedback=out.feedback(),
    )  # fmt: skip
    if json:
        out.emit_json(report.to_json())
        return
    r, protocol = report.result, report.protocol
    out.result(
        f"ppl {r.ppl:.4f} ± {r.ppl_stderr:.4f}  ({report.text_source}, {r.windows} windows × {protocol['seq_len']}, "
        f"stride {protocol['stride']}, {r.tokens_scored} tokens scored, {r.seconds:.1f} s)"
    )
