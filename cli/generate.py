"""``llmq generate MODEL -p PROMPT``: stream a continuation, greedy unless a temperature is given."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from llmq.cli.common import DecodeOpt, Json, ModelArg, Quiet, Reporter, with_load_options
from llmq.errors import UsageError
from llmq.runtime.decode.modes import DecodeMode
from llmq.runtime.options import LoadOptions


@with_load_options
def generate(
    model: ModelArg,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="Prompt text; '-' reads it from stdin.", show_default=False)
    ] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template as a user turn.")
    ] = False,
    system: Annotated[str | None, typer.Option("--system", help="System message for --chat.")] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", min=1, help="Stop after this many new tokens.")
    ] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy; above 0 samples.")] = 0.0,
    top_p: Annotated[
        float | None, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (needs --temperature).")
    ] = None,
    top_k: Annotated[
        int | None, typer.Option("--top-k", min=1, help="Sample among the k likeliest tokens (needs --temperature).")
    ] = None,
    decode: DecodeOpt = DecodeMode.dynamic,
    *,
    options: LoadOptions,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Generate text from MODEL, streaming tokens as they come and stopping at EOS."""
    from llmq.runtime import api

    out = Reporter(json, quiet)
    if prompt is None:
        raise UsageError("give a prompt with --prompt TEXT (or --prompt - to read it from stdin)")
    report = api.generate(
        model, sys.stdin.read() if prompt == "-" else prompt, chat=chat, system=system, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, decode=decode, on_text=None if json else _stdout_writer,
        options=options, feedback=out.feedback(),
    )  # fmt: skip
    if json:
        out.emit_json(report.to_json())
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    r, speed = report.result, report.result.decode_tokens_per_s
    rate = f"{speed:.1f} tok/s decode" if speed else "decode rate n/a (one token)"
    out.info(
        f"{r.new_tokens} new tokens, stop: {r.stop_reason}; prefill {r.prompt_tokens} tokens "
        f"in {r.prefill_seconds:.3f} s, {rate}"
    )


def _stdout_writer(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
