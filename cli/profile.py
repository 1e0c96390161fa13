"""``llmq profile MODEL``: prefill and decode latency, the decode step's breakdown, and GB/s.

The protocol is in :mod:`llmq.runtime.decode.profile`. ``--baseline`` runs the same artifact a
second time with dense weights (the torch backend: every quantized Linear decoded once into the
run's dtype, fp16 on a GPU) in the same process, and reports the speedups.
"""

from __future__ import annotations

from typing import Annotated

import typer

from llmq.cli import markdown
from llmq.cli.common import DecodeOpt, Json, Markdown, ModelArg, Quiet, Reporter, with_load_options
from llmq.runtime.decode.modes import DecodeMode
from llmq.runtime.options import LoadOptions


@with_load_options
def profile(
    model: ModelArg,
    batch: Annotated[str, typer.Option("--batch", help="Comma-separated batch sizes, e.g. 1,16.")] = "1",
    prompt_len: Annotated[int, typer.Option("--prompt-len", min=1, help="Prompt tokens per sequence.")] = 128,
    gen_len: Annotated[int, typer.Option("--gen-len", min=1, help="Decode steps timed after the prefill.")] = 32,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed rounds first.")] = 1,
    reps: Annotated[int, typer.Option("--reps", min=1, help="Timed rounds (mean ± sd over them).")] = 3,
    breakdown_steps: Annotated[
        int, typer.Option("--breakdown-steps", min=0, help="Decode steps profiled for the breakdown (0: none).")
    ] = 4,
    baseline: Annotated[
        bool, typer.Option("--baseline", help="Also run the same artifact with dense weights (torch backend).")
    ] = False,
    min_speedup: Annotated[
        float | None,
        typer.Option("--min-speedup", help="Gate: exit 3 when a batch's decode speedup over --baseline is below this."),
    ] = None,
    decode: DecodeOpt = DecodeMode.dynamic,
    *,
    options: LoadOptions,
    json: Json = False,
    md: Markdown = False,
    quiet: Quiet = False,
) -> None:
    """Time prefill and decode of MODEL per batch size, and show where a decode step's time goes."""
    from llmq.runtime import api

    out = Reporter(json, quiet, md)
    report = api.profile(
        model, batches=batch, prompt_len=prompt_len, gen_len=gen_len, warmup=warmup, reps=reps,
        breakdown_steps=breakdown_steps, baseline=baseline, min_speedup=min_speedup, decode=decode, options=options,
        feedback=out.feedback(),
    )  # fmt: skip
    document = report.to_json()
    if json:
        out.emit_json(document)
    else:  # the plain output is Markdown already; --md adds the gates table
        out.result(render_markdown(document) + (markdown.gates(document) if md else ""))
    out.gates(report.gates)


def render_markdown(document: dict) -> str:
    """The profile as a markdown table (stdout), one row per run and batch size."""
    head = (
        f"{document['model']['label']}\n{document['device_name']}, {document['dtype']}, prompt "
        f"{document['protocol']['prompt_len']}, {document['protocol']['gen_len']} decode steps "
        f"({document['protocol']['decode_mode']}), "
        f"{document['protocol']['reps']} reps; copy bandwidth {document['copy_bandwidth_gbps']:.1f} GB/s\n\n"
        "| run | batch | prefill ms | prefill tok/s | decode ms/step | decode tok/s "
        "| quant. matmul ms | dense matmul ms | other ms | quant. GB/s |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for run in document["runs"]:
        name = f"{run['label']} ({run['backend'] or 'dense'})"
        for b in run["batches"]:
            pre, dec, brk = b["prefill_seconds"], b["decode_step_seconds"], b["breakdown_seconds_per_step"]
            parts = ("quantized_matmul", "dense_matmul", "other")
            split = (
                " | ".join(f"{brk[k] * 1e3:.3f} ({brk[k] / brk['total']:.0%})" for k in parts)
                if brk and brk["total"] > 0
                else "— | — | —"
            )
            gbps = b["quantized_matmul_gbps"]
            share = b["quantized_matmul_fraction_of_copy_bandwidth"]
            bw = f"{gbps:.1f} ({share:.0%})" if gbps else "—"
            rows.append(
                f"| {name} | {b['batch']} | {pre['mean'] * 1e3:.2f} ± {pre['sd'] * 1e3:.2f} | "
                f"{b['prefill_tokens_per_s']:.1f} | {dec['mean'] * 1e3:.2f} ± {dec['sd'] * 1e3:.2f} | "
                f"{b['decode_tokens_per_s']:.1f} | {split} | {bw} |"
            )
    methods = {b["breakdown_seconds_per_step"]["method"] for r in document["runs"] for b in r["batches"]
               if b["breakdown_seconds_per_step"]}  # fmt: skip
    if methods:
        rows.append(
            f"\nbreakdown per decode step ({', '.join(sorted(methods))}); shares are of the profiled step, "
            "which the profiler itself slows on a CPU"
        )
    if document["speedup"]:
        rows.append("")
        rows += [
            f"batch {s['batch']}: prefill {s['prefill']:.2f}×, decode {s['decode']:.2f}× the dense baseline"
            for s in document["speedup"]
        ]
    return "\n".join(rows)
