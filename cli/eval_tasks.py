"""``llmq eval tasks MODEL --tasks ...``: lm-evaluation-harness tasks on the model llmq loads."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated

import typer

from llmq.cli.common import Json, ModelArg, Quiet, Reporter, with_load_options
from llmq.runtime.options import LoadOptions


@with_load_options
def tasks(
    model: ModelArg,
    task_names: Annotated[
        str,
        typer.Option(
            "--tasks",
            help="Comma-separated lm-eval task, group or tag names (e.g. arc_easy,piqa), or task YAML paths.",
            show_default=False,
        ),
    ],
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="Score only the first N documents of each task (default: all)."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Requests per forward pass.")] = 1,
    include_path: Annotated[
        Path | None,
        typer.Option(
            "--include-path",
            help="A folder of extra task YAMLs; their !function entries import Python from it, so trust it.",
            file_okay=False,
            show_default=False,
        ),
    ] = None,
    *,
    options: LoadOptions,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """lm-evaluation-harness tasks on MODEL, loaded as `llmq generate` loads it (needs llmq's `tasks` extra)."""
    from llmq.runtime.eval.tasks import evaluate_tasks

    out = Reporter(json, quiet)
    report = evaluate_tasks(
        model, task_names, limit=limit, batch_size=batch_size, include_path=include_path, options=options,
        feedback=out.feedback(),
    )  # fmt: skip
    if json:
        out.emit_json(report.to_json())
        return
    out.result(render_table(report))


def render_table(report) -> str:
    """Task, metric, value ± stderr and documents scored, as a plain-text table for stdout."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name, justify in (("task", "left"), ("metric", "left"), ("value", "right"), ("± stderr", "right"),
                          ("docs", "right")):  # fmt: skip
        table.add_column(name, justify=justify)
    for result in report.results:
        docs = "" if result.samples is None else f"{result.samples}/{result.samples_total}"
        for metric in result.metrics:
            label = metric.name if metric.filter == "none" else f"{metric.name} ({metric.filter})"
            stderr = "" if metric.stderr is None else f"{metric.stderr:.4f}"
            table.add_row(escape(result.alias), escape(label), f"{metric.value:.4f}", stderr, docs)
    buffer = io.StringIO()
    Console(file=buffer, width=200, color_system=None).print(table)
    r = report.protocol
    limit = f", first {r['limit']} documents per task" if r["limit"] else ""
    lines = [line.rstrip() for line in buffer.getvalue().splitlines() if line.strip()]
    lines.append(f"({report.run.source.spec}, lm-eval {r['lm_eval_version']}{limit}, {report.eval_seconds:.1f} s)")
    return "\n".join(lines)
