"""Fixed-shape decoding: a preallocated KV cache and a step whose inputs live in static buffers.

Every tensor a decode step reads (the current token, its position, the cache) is allocated once,
before the first step, and updated in place, so the step can be captured once as a CUDA graph
and replayed per token: Python, transformers and kernel-launch overhead then cost nothing per
token. The CuPy kernels launch on torch's current stream, which during capture is the capturing
stream, so they are recorded with the rest (``tests/test_cuda_kernels.py`` checks that on its
own). On a CPU the same step runs eagerly; ``capture`` needs a CUDA device.

Sampling happens on the model's device (greedy argmax, or temperature/top-k/top-p with a
seeded generator on that device), so no token travels to the host between steps.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from llmq.errors import UsageError


def cache_keyword(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); GPU images carry older 5.x."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> next tokens [B, 1], on the logits' device."""
    return logits.argmax(-1, keepdim=True)


def sampler(temperature: float, top_k: int | None, top_p: float | None, seed: int, device) -> Callable:
    """A sampling function on ``device``: temperature, then top-k, then nucleus (top-p) filtering."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p is not None:
            ordered, order = scores.sort(dim=-1, descending=True)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative - ordered.softmax(-1) >= top_p  # keep the smallest set reaching top_p
            scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        return torch.multinomial(scores.softmax(-1), 1, generator=generator)

    return sample


class StaticDecoder:
    """Decode ``batch`` sequences of at most ``max_len`` tokens with a preallocated KV cache.

    model    a transformers causal LM (dense or with QuantLinear layers), in eval mode
    batch    sequences decoded together; every prompt has the same length
    max_len  prompt plus new tokens, the cache's capacity
    """

    def __init__(self, model, batch: int, max_len: int):
        from transformers import StaticCache

        self.model, self.batch, self.max_len = model, batch, max_len
        self.device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.keyword = cache_keyword(model)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # the step's input
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)  # its cache position
        self.logits: torch.Tensor | None = None  # the step's output, [batch, vocab]
        self.length = 0  # tokens in the cache (host-side bookkeeping only; the step never reads it)
        self.graph = None

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor):
        return self.model(
            input_ids=ids, use_cache=True, logits_to_keep=1, cache_position=positions,
            position_ids=positions[None].expand(ids.shape[0], -1), **{self.keyword: self.cache},
        )  # fmt: skip

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Start a new sequence: empty the cache, run the prompts ``ids`` [batch, L] into it; returns the
        logits of the last position [batch, V]."""
        if ids.shape[0] != self.batch:
            raise UsageError(f"the decoder was built for batch {self.batch}, got {ids.shape[0]} prompts")
        if ids.shape[1] >= self.max_len:
            raise UsageError(f"a prompt of {ids.shape[1]} tokens leaves no room in a cache of {self.max_len}")
        if self.length:
            self.reset()
        positions = torch.arange(ids.shape[1], device=self.device)
        logits = self._forward(ids.to(self.device), positions).logits[:, -1]
        self.position.fill_(ids.shape[1])
        self.length = ids.shape[1]
        return logits

    def _step(self) -> None:
        self.logits = self._forward(self.token, self.position).logits[:, -1]

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` [batch, 1] at the next position; returns the next logits [batch, V]."""
        if self.length >= self.max_len:
            raise UsageError(f"the cache holds {self.max_len} tokens and is full")
        self.token.copy_(token)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        self.position += 1
        self.length += 1
        return self.logits

    def capture(self) -> None:
        """Record one decode step as a CUDA graph (after :meth:`prefill`); :meth:`step` replays it."""
        if self.device.type != "cuda":
            raise UsageError("CUDA-graph capture needs the model on a CUDA device")
        if self.length == 0:
            raise UsageError("prefill before capturing: the cache is allocated by the first forward")
        with torch.inference_mode():
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            saved = self.position.clone()
            with torch.cuda.stream(side):
                self._step()  # warm-up on the side stream: kernels compiled, workspaces allocated
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step()
            self.position.copy_(saved)  # the warm-up and capture wrote the slot the next step overwrites

    def reset(self) -> None:
        """Empty the cache in place (a captured graph stays valid: the buffers do not move)."""
        self.cache.reset()
        self.position.zero_()
        self.length = 0

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, new_tokens: int, sample: Callable = greedy) -> torch.Tensor:
        """Prefill ``ids`` then ``new_tokens`` steps; returns the new tokens [batch, new_tokens]."""
        if ids.shape[1] + new_tokens > self.max_len:
            raise UsageError(f"{ids.shape[1]} prompt + {new_tokens} new tokens exceed the cache of {self.max_len}")
        out = torch.empty(self.batch, new_tokens, dtype=torch.long, device=self.device)
        token = sample(self.prefill(ids))
        for i in range(new_tokens):
            out[:, i : i + 1] = token
            if i + 1 < new_tokens:
                token = sample(self.step(token))
        return out
