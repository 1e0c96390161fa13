"""``llmq generate MODEL -p PROMPT``: stream a continuation, greedy unless a temperature is given."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from llmq import __version__
from llmq.cli.common import (
    BackendOpt,
    DecodeOpt,
    Device,
    DeviceMapOpt,
    DTypeOpt,
    Json,
    MaxMemory,
    ModelArg,
    Quiet,
    Reporter,
    Revision,
    Seed,
    TrustRemoteCode,
    pick_backend,
    quiet_libraries,
    resolve_placement,
    source_json,
)
from llmq.errors import UsageError
from llmq.runtime.backend import Backend
from llmq.runtime.decode.modes import DecodeMode, check_decode_device
from llmq.runtime.sources.device import DType


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
    device: Device = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemory = None,
    dtype: DTypeOpt = DType.auto,
    backend: BackendOpt = Backend.auto,
    seed: Seed = 0,
    revision: Revision = None,
    trust_remote_code: TrustRemoteCode = False,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Generate text from MODEL, streaming tokens as they come and stopping at EOS."""
    from llmq.runtime.decode.generate import SamplingOptions, generate_static
    from llmq.runtime.decode.generate import generate as run_generate
    from llmq.runtime.format.dtypes import short as dtype_name
    from llmq.runtime.loader import load_model
    from llmq.runtime.sources import models
    from llmq.runtime.sources.device import resolve_dtype
    from llmq.runtime.sources.tokenize import check_prompt, encode_prompt

    wall_start = time.perf_counter()
    out = Reporter(json, quiet)
    if prompt is None:
        raise UsageError("give a prompt with --prompt TEXT (or --prompt - to read it from stdin)")
    if prompt == "-":
        prompt = sys.stdin.read()
    options = SamplingOptions(max_new_tokens, temperature, top_p, top_k, seed)
    options.check()
    check_prompt(prompt, chat, system)
    models.check_model_spec(model, revision)
    quiet_libraries(out.show_progress)
    torch_device, limits = resolve_placement(device, device_map, max_memory)
    torch_dtype = resolve_dtype(dtype, torch_device)
    check_decode_device(decode, torch_device)

    source = models.resolve_model(model, revision=revision, progress=out.show_progress, log=out.info)
    out.info(f"model: {source.label}")
    config = models.load_config(source, trust_remote_code)
    tokenizer = models.load_tokenizer(source, trust_remote_code)
    input_ids = encode_prompt(tokenizer, prompt, chat, system)
    context = models.context_length(config)
    if context is not None and input_ids.shape[1] + max_new_tokens > context:
        raise UsageError(
            f"the prompt ({input_ids.shape[1]} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's "
            f"context of {context} tokens"
        )
    chosen = pick_backend(source, backend, torch_device, torch_dtype, out)
    lm = load_model(source, config, torch_device, torch_dtype, trust_remote_code, chosen or Backend.torch, limits)

    stream = None if json else _stdout_writer
    if decode == DecodeMode.dynamic:
        result = run_generate(lm, tokenizer, input_ids, options, on_text=stream)
    else:
        result = generate_static(lm, tokenizer, input_ids, options, on_text=stream, graph=decode == DecodeMode.graph)
    speed = result.decode_tokens_per_s
    if json:
        out.emit_json(
            {
                "command": "generate",
                "llmq_version": __version__,
                "model": source_json(source),
                "device": str(torch_device),
                "dtype": dtype_name(torch_dtype),
                "backend": chosen.value if chosen else None,
                "decode": decode.value,
                "prompt": prompt,
                "chat": chat,
                "sampling": {
                    "temperature": temperature,
                    "top_p": top_p,
                    "top_k": top_k,
                    "seed": seed,
                    "greedy": temperature == 0,
                },
                "text": result.text,
                "prompt_tokens": result.prompt_tokens,
                "new_tokens": result.new_tokens,
                "stop_reason": result.stop_reason,
                "timing": {
                    "prefill_seconds": round(result.prefill_seconds, 4),
                    "decode_seconds": round(result.decode_seconds, 4),
                    "decode_tokens_per_s": round(speed, 2) if speed else None,
                    "wall_seconds": round(time.perf_counter() - wall_start, 3),
                },
            }
        )
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    rate = f"{speed:.1f} tok/s decode" if speed else "decode rate n/a (one token)"
    out.info(
        f"{result.new_tokens} new tokens, stop: {result.stop_reason}; prefill {result.prompt_tokens} tokens "
        f"in {result.prefill_seconds:.3f} s, {rate}"
    )


def _stdout_writer(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
