"""KL divergence of a quantized model from its base, token by token, on the perplexity protocol's windows.

For every scored token, ``KL(P_base || P_quant) = Σ_v p_base(v) (log p_base(v) - log p_quant(v))``
over the vocabulary, computed in fp32 from both models' logits on the same window. Also the
share of tokens whose most likely next token agrees, and both perplexities on the same tokens.
The base side is any :data:`BaseLogProbs`: the base model itself, or its log-probs read back
from :mod:`llmq.runtime.eval.logit_cache`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmq.runtime.eval.perplexity import TokenSeries, plan_windows, require_one_window

# (window index, window token ids [T], tokens scored S) -> base log-probs [S, vocab], fp32
BaseLogProbs = Callable[[int, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class KldResult:
    mean: float
    median: float
    p99: float
    p999: float
    top1_agreement: float
    ppl_base: float
    ppl_quant: float
    tokens_scored: int
    windows: int
    seconds: float


@torch.inference_mode()
def kl_divergence(
    base: BaseLogProbs,
    quant,
    ids: torch.Tensor,
    seq_len: int,
    stride: int,
    max_tokens: int | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> KldResult:
    """Score ``ids`` (1-D int64) with the base log-probs and the ``quant`` model; ``on_window(done,
    total)`` reports progress."""
    used = ids[:max_tokens] if max_tokens is not None else ids
    require_one_window(len(used), seq_len)
    windows = plan_windows(len(used), seq_len, stride)
    total = sum(w.scored for w in windows)
    kls, agree, nll_base, nll_quant = (TokenSeries(total) for _ in range(4))
    start = time.perf_counter()
    for i, w in enumerate(windows):
        chunk = used[w.begin : w.end]
        targets = chunk[-w.scored :]
        log_q = _log_probs(quant, chunk, w.scored)
        log_p = base(i, chunk, w.scored).to(log_q.device)
        kls.add((log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0))
        agree.add(log_p.argmax(-1) == log_q.argmax(-1))
        nll_base.add(-log_p.gather(-1, targets[:, None].to(log_p.device)).squeeze(-1))
        nll_quant.add(-log_q.gather(-1, targets[:, None].to(log_q.device)).squeeze(-1))
        if on_window is not None:
            on_window(i + 1, len(windows))
    kl = kls.values
    return KldResult(
        mean=float(kl.mean()),
        median=float(kl.median()),
        p99=float(torch.quantile(kl, 0.99)),
        p999=float(torch.quantile(kl, 0.999)),
        top1_agreement=float(agree.values.mean()),
        ppl_base=math.exp(float(nll_base.values.mean())),
        ppl_quant=math.exp(float(nll_quant.values.mean())),
        tokens_scored=kl.numel(),
        windows=len(windows),
        seconds=time.perf_counter() - start,
    )


def scored_tokens(n_tokens: int, seq_len: int, stride: int, max_tokens: int | None) -> list[int]:
    """Tokens scored in each window of the protocol, in order."""
    used = n_tokens if max_tokens is None else min(n_tokens, max_tokens)
    return [w.scored for w in plan_windows(used, seq_len, stride)]


def model_log_probs(model) -> BaseLogProbs:
    return lambda _i, chunk, scored: _log_probs(model, chunk, scored)


def _log_probs(model, chunk: torch.Tensor, scored: int) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(chunk[None].to(device), use_cache=False).logits[0, -scored - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)
