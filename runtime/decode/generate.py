"""Text generation with streaming output, greedy by default.

Thin over ``transformers.generate``: this module fixes the options llmq exposes, streams
decoded text as tokens arrive, and measures prefill and decode speed separately.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmq.errors import UsageError


@dataclass(frozen=True)
class SamplingOptions:
    """``temperature == 0`` means greedy; ``top_p``/``top_k`` are only valid when sampling."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise UsageError(f"--temperature {self.temperature} must be >= 0 (0 is greedy)")
        if self.temperature == 0 and (self.top_p is not None or self.top_k is not None):
            raise UsageError("--top-p and --top-k only apply when sampling; add --temperature > 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p {self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"--top-k {self.top_k} must be at least 1")


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    stop_reason: str  # "eos" or "max_new_tokens"
    prefill_seconds: float  # prompt processing up to the first new token
    decode_seconds: float  # the remaining new tokens
    seconds: float

    @property
    def decode_tokens_per_s(self) -> float | None:
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None


def eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


class _Streamer:
    """Receives token ids from ``generate``; emits newly decoded text and times the first token."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None, stop: Callable[[], None] | None = None):
        self.tokenizer, self.on_text, self.stop = tokenizer, on_text, stop
        self.ids: list[int] = []
        self.emitted = ""
        self.prompt_seen = False
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.stop is not None:  # one check per token: a stop lands between two decode steps
            self.stop()
        self.ids.extend(int(t) for t in value.reshape(-1))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # A token can end inside a multi-byte character; wait until it decodes cleanly.
        if not text.endswith("\ufffd") and text.startswith(self.emitted):
            if self.on_text is not None and len(text) > len(self.emitted):
                self.on_text(text[len(self.emitted) :])
            self.emitted = text

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.on_text is not None and text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted) :])
        self.emitted = text


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    options: SamplingOptions,
    on_text: Callable[[str], None] | None = None,
    stop: Callable[[], None] | None = None,
) -> GenerationResult:
    """Generate from ``input_ids`` ([1, T] int64), calling ``on_text`` with each new piece of text and
    ``stop`` (raises ``KeyboardInterrupt`` to end the run) with each new token."""
    options.check()
    eos = eos_ids(model, tokenizer)
    config = copy.deepcopy(model.generation_config)
    sampling = options.temperature > 0
    config.update(
        max_new_tokens=options.max_new_tokens,
        do_sample=sampling,
        temperature=options.temperature if sampling else None,
        top_p=options.top_p if sampling else None,
        top_k=options.top_k if sampling else None,
        eos_token_id=eos or None,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None),
    )
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    streamer = _Streamer(tokenizer, on_text, stop)
    torch.manual_seed(options.seed)
    start = time.perf_counter()
    output = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config, streamer=streamer
    )
    end = time.perf_counter()
    new = output[0, input_ids.shape[1] :].tolist()
    first = streamer.first_token_at or end
    return GenerationResult(
        text=streamer.emitted,
        prompt_tokens=input_ids.shape[1],
        new_tokens=len(new),
        stop_reason="eos" if new and new[-1] in eos else "max_new_tokens",
        prefill_seconds=first - start,
        decode_seconds=end - first,
        seconds=end - start,
    )


@torch.inference_mode()
def generate_static(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    options: SamplingOptions,
    on_text: Callable[[str], None] | None = None,
    graph: bool = False,
    stop: Callable[[], None] | None = None,
) -> GenerationResult:
    """:func:`generate` through :class:`~llmq.runtime.decode.static.StaticDecoder`: a preallocated KV cache,
    sampling on the device, and with ``graph`` the decode step replayed as a CUDA graph (captured
    after the prefill; the capture counts in the decode time). Greedy output equals :func:`generate`'s;
    sampled output uses llmq's device sampler, so it differs from transformers' for the same seed."""
    from llmq.runtime.decode.static import StaticDecoder, greedy, sampler

    options.check()
    eos = set(eos_ids(model, tokenizer))
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    decoder = StaticDecoder(model, batch=1, max_len=ids.shape[1] + options.max_new_tokens)
    if options.temperature > 0:
        sample = sampler(options.temperature, options.top_k, options.top_p, options.seed, device)
    else:
        sample = greedy
    streamer = _Streamer(tokenizer, on_text, stop)
    streamer.put(ids)  # the prompt, which the streamer skips
    start = time.perf_counter()
    token = sample(decoder.prefill(ids))
    if graph:
        decoder.capture()
    new: list[int] = []
    while True:
        value = int(token)  # one host sync per token: the text streams as it comes
        new.append(value)
        streamer.put(token)
        if value in eos or len(new) == options.max_new_tokens:
            break
        token = sample(decoder.step(token))
    streamer.end()
    end = time.perf_counter()
    first = streamer.first_token_at or end
    return GenerationResult(
        text=streamer.emitted,
        prompt_tokens=ids.shape[1],
        new_tokens=len(new),
        stop_reason="eos" if new[-1] in eos else "max_new_tokens",
        prefill_seconds=first - start,
        decode_seconds=end - first,
        seconds=end - start,
    )
