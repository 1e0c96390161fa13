"""``llmq eval kld MODEL --base BASE``: per-token KL divergence of MODEL from BASE, and top-1 agreement."""

from __future__ import annotations

from typing import Annotated

import typer

from llmq.cli import markdown
from llmq.cli.common import DatasetOpt, Json, Markdown, ModelArg, Quiet, Reporter, TextFile, with_load_options
from llmq.runtime.options import LoadOptions
from llmq.runtime.sources.text import TextRequest


@with_load_options
def kld(
    model: ModelArg,
    base: Annotated[str, typer.Option("--base", help="The reference model: folder, hub id or 'demo'.")],
    dataset: DatasetOpt = None,
    text_file: TextFile = None,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2, help="Window length in tokens.")] = 2048,
    stride: Annotated[
        int | None, typer.Option("--stride", min=1, help="Window start spacing (default: --seq-len).")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=2, help="Use only the first N tokens.")] = None,
    cache_base: Annotated[
        bool,
        typer.Option(
            "--cache-base",
            help="Keep BASE's log-probs in the cache directory and reuse them; a hit skips loading BASE.",
        ),
    ] = False,
    max_mean: Annotated[
        float | None, typer.Option("--max-mean", help="Gate: exit 3 when the mean KL (nats) is above this.")
    ] = None,
    min_top1: Annotated[
        float | None,
        typer.Option("--min-top1", help="Gate: exit 3 when the top-1 agreement (0 to 1) is below this."),
    ] = None,
    *,
    options: LoadOptions,
    json: Json = False,
    md: Markdown = False,
    quiet: Quiet = False,
) -> None:
    """KL divergence of MODEL's next-token distribution from BASE's, on the same windows as `eval ppl`."""
    from llmq.runtime import api

    out = Reporter(json, quiet, md)
    report = api.kld(
        model, base, TextRequest(dataset, text_file), seq_len=seq_len, stride=stride, max_tokens=max_tokens,
        cache_base=cache_base, max_mean=max_mean, min_top1=min_top1, options=options, feedback=out.feedback(),
    )  # fmt: skip
    if json:
        out.emit_json(report.to_json())
    elif md:
        out.result(markdown.kl_divergence(report.to_json()))
    else:
        _print(out, report.result, report.text_source)
    out.gates(report.gates)


def _print(out: Reporter, r, text_source: str) -> None:
    out.result(
        f"KL mean {r.mean:.4f}  median {r.median:.4f}  p99 {r.p99:.4f}  p99.9 {r.p999:.4f}  "
        f"top-1 agreement {100 * r.top1_agreement:.2f}%  (ppl {r.ppl_quant:.3f} vs base {r.ppl_base:.3f}; "
        f"{text_source}, {r.tokens_scored} tokens, {r.seconds:.1f} s)"
    )
