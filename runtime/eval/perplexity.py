"""Perplexity over a token stream, to the protocol written down in ``docs/eval.md``.

The text is tokenized once, cut into windows of ``seq_len`` tokens that start every ``stride``
tokens, and each token is scored at most once:

* ``stride == seq_len`` (the default): non-overlapping windows, each scoring its last
  ``seq_len - 1`` tokens, the first token of a window being context only. With wikitext2 this
  is the protocol behind published GPTQ/AWQ numbers.
* ``stride < seq_len``: sliding windows; the first window scores ``seq_len - 1`` tokens and each
  later one only its last ``stride`` tokens, which then all see at least ``seq_len - stride``
  tokens of context.

Tokens after the last whole window are not scored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmq.errors import NumericsError, TextSourceError, UsageError

# How the protocol is stated in every result, so a number carries its own definition.
TOKENIZATION_RULE = "whole text tokenized once, add_special_tokens=True"
SCORING_RULE = (
    "each window scores its last seq_len-1 tokens (first window) or stride tokens (later windows); "
    "the tail after the last whole window is dropped"
)
UNCERTAINTY_RULE = (
    "ppl_stderr = ppl * std(token nll) / sqrt(tokens), tokens treated as independent; "
    "ppl_stderr_windows uses the spread of per-window means"
)


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` go through the model; the last ``scored`` targets count."""

    begin: int
    end: int
    scored: int


@dataclass(frozen=True)
class PplResult:
    ppl: float
    ppl_stderr: float  # token-level, delta method: ppl * std(nll) / sqrt(n); assumes independent tokens
    ppl_ci95: tuple[float, float]
    ppl_stderr_windows: float | None  # from the spread of per-window mean NLLs (None for one window)
    mean_nll: float
    tokens_scored: int
    windows: int
    tokens_in_text: int
    tokens_used: int
    seconds: float


def plan_windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """The windows of the protocol above for a stream of ``n_tokens`` tokens."""
    assert seq_len >= 2 and 1 <= stride <= seq_len
    windows = []
    for begin in range(0, n_tokens - seq_len + 1, stride):
        scored = seq_len - 1 if begin == 0 or stride == seq_len else stride
        windows.append(Window(begin, begin + seq_len, scored))
    return windows


def check_protocol(seq_len: int, stride: int, max_tokens: int | None, context: int | None) -> None:
    """Range checks that need the model's context length; all are usage errors (exit 2)."""
    if seq_len < 2:
        raise UsageError(f"--seq-len {seq_len} is too small; a window needs at least 2 tokens")
    if context is not None and seq_len > context:
        raise UsageError(f"--seq-len {seq_len} is longer than the model's context of {context} tokens")
    if not 1 <= stride <= seq_len:
        raise UsageError(f"--stride {stride} must be between 1 and --seq-len ({seq_len})")
    if max_tokens is not None and max_tokens < seq_len:
        raise UsageError(f"--max-tokens {max_tokens} is less than one window of --seq-len {seq_len}")


def require_one_window(n_tokens: int, seq_len: int, what: str = "the text") -> None:
    if n_tokens < seq_len:
        raise TextSourceError(
            f"{what} has {n_tokens} tokens but one window needs {seq_len}; use a longer text or a smaller --seq-len"
        )


@torch.inference_mode()
def perplexity(
    model,
    ids: torch.Tensor,
    seq_len: int,
    stride: int,
    max_tokens: int | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> PplResult:
    """Score ``ids`` (1-D int64) with ``model``; ``on_window(done, total)`` reports progress."""
    used = ids[:max_tokens] if max_tokens is not None else ids
    require_one_window(len(used), seq_len)
    windows = plan_windows(len(used), seq_len, stride)
    device = next(model.parameters()).device
    nlls = TokenSeries(sum(w.scored for w in windows))
    window_means = []
    layers = _sliceable_layers(model, seq_len)
    start = time.perf_counter()
    for i, w in enumerate(windows):
        chunk = used[w.begin : w.end].to(device)
        nll = window_nll(model, chunk, w.scored) if layers is None else _sliced_nll(model, layers, chunk, w.scored)
        window_means.append(float(nlls.add(nll).mean()))
        if on_window is not None:
            on_window(i + 1, len(windows))
    seconds = time.perf_counter() - start
    return _summarize(nlls.values, window_means, len(windows), len(ids), int(windows[-1].end), seconds)


def window_nll(model, ids: torch.Tensor, scored: int) -> torch.Tensor:
    """Negative log-likelihood [scored] of the last ``scored`` tokens of ``ids`` [L], all logits at once."""
    logits = model(ids[None], use_cache=False).logits[0, -scored - 1 : -1].float()
    return torch.nn.functional.cross_entropy(logits, ids[-scored:], reduction="none")


def _sliceable_layers(model, seq_len: int):
    """The decoder layers of ``model`` when one window's logits would be larger than the output head's
    slice (:data:`~llmq.runtime.sources.head.HEAD_CHUNK_ELEMENTS`) and the model is in one piece; else
    None: the window's logits are made at once."""
    from llmq.runtime.sources import head
    from llmq.runtime.sources.families import decoder_layers, family_of

    vocab = model.config.get_text_config().vocab_size
    if seq_len * vocab <= head.HEAD_CHUNK_ELEMENTS or getattr(model, "hf_device_map", None):
        return None
    return decoder_layers(model, family_of(model, model.config))


def _sliced_nll(model, layers, ids: torch.Tensor, scored: int) -> torch.Tensor:
    """:func:`window_nll` with the logits made a slice of positions at a time (the same numbers:
    each position's logits are its own): the window's memory is one slice's logits, not all of them."""
    from llmq.runtime.sources.head import OutputHead, last_layer_output

    final, returns_tuple = last_layer_output(model, layers, ids[None])
    head = OutputHead(model, layers, returns_tuple)
    parts = []
    for start, end in head.slices(len(ids) - scored - 1, len(ids) - 1):  # position p predicts ids[p + 1]
        logits = head.logits(final[:, start:end])[0].float()
        parts.append(torch.nn.functional.cross_entropy(logits, ids[start + 1 : end + 1], reduction="none"))
    return torch.cat(parts)


class TokenSeries:
    """Per-token values of a whole evaluation, in one buffer allocated before the first window.

    Keeping a small tensor per window instead pins freed logits memory in the C heap: measured on
    the demo model, a 200-window evaluation grew by 1.1 GB that way (docs/reliability.md).
    """

    def __init__(self, total: int, dtype: torch.dtype = torch.float64):
        self.values = torch.empty(total, dtype=dtype)
        self.filled = 0

    def add(self, values: torch.Tensor) -> torch.Tensor:
        """Append ``values`` (any device and float dtype); returns the stored slice."""
        n = values.numel()
        self.values[self.filled : self.filled + n] = values.reshape(-1).to("cpu", self.values.dtype)
        self.filled += n
        return self.values[self.filled - n : self.filled]


def _summarize(
    nll: torch.Tensor, window_means: list[float], n_windows: int, n_text: int, n_used: int, seconds: float
) -> PplResult:
    n = nll.numel()
    mean = float(nll.mean())
    if not math.isfinite(mean):
        raise NumericsError("the model produced non-finite log-likelihoods; the weights or dtype are broken")
    se = float(nll.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    ppl = math.exp(mean)
    se_windows = None
    if n_windows > 1:
        per_window = torch.tensor(window_means, dtype=torch.float64)
        se_windows = ppl * float(per_window.std(unbiased=True)) / math.sqrt(n_windows)
    return PplResult(
        ppl=ppl,
        ppl_stderr=ppl * se,
        ppl_ci95=(math.exp(mean - 1.96 * se), math.exp(mean + 1.96 * se)),
        ppl_stderr_windows=se_windows,
        mean_nll=mean,
        tokens_scored=n,
        windows=n_windows,
        tokens_in_text=n_text,
        tokens_used=n_used,
        seconds=seconds,
    )
