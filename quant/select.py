"""Which input channels become 4-bit stripes.

A stripe is a set of whole input channels (columns of ``W [N, K]``) shared by every output row,
so the 4-bit part is a dense ``[N, k4]`` matrix that the kernels load without straddling the
2-bit part. The number of 4-bit channels is a multiple of ``g4`` (whole 4-bit groups). Which
channels: the ones with the highest score, data-free :func:`range_score` here, or the
Hessian-weighted ``llmq.quant.linear.hessian_score`` when calibration statistics exist.
"""

from __future__ import annotations

import torch


def range_score(weight: torch.Tensor, g1: int) -> torch.Tensor:
    """Per-channel score: :func:`range_spread` summed over the output rows."""
    return range_spread(weight, g1).sum(0)


def range_spread(weight: torch.Tensor, g1: int) -> torch.Tensor:
    """Per weight ``[N, K]``: how far it stretches the range of the 2-bit group it sits in.

    A weight's distance from its group's median, relative to the row's typical group
    half-range, squared. Channels with outsized weights dominate the
    range of their groups, and the step size of every other weight in those groups with it. The
    median, unlike the midrange, stays with the bulk of the group, so only the outsized channel
    scores high, not its neighbours.
    """
    n, k = weight.shape
    pad = (-k) % g1
    w = torch.nn.functional.pad(weight, (0, pad)).reshape(n, -1, g1)
    center = w.median(dim=-1, keepdim=True).values
    half_range = (w.amax(-1) - w.amin(-1)).median(dim=-1, keepdim=True).values.clamp(min=1e-12) / 2
    spread = ((w - center) / half_range.unsqueeze(-1)) ** 2
    return spread.reshape(n, -1)[:, :k]


def stripe_width(in_features: int, fraction: float, g4: int) -> int:
    """4-bit channels for ``fraction`` of ``in_features``: the nearest whole number of ``g4`` groups."""
    groups = round(fraction * in_features / g4)
    return min(groups, in_features // g4) * g4


def select_channels(scores: torch.Tensor, k4: int, order_key: torch.Tensor | None = None) -> torch.Tensor:
    """The permutation: the 2-bit channels, then the ``k4`` top-scored channels.

    Within each part, channels keep their original order, or with ``order_key`` ([K], e.g. the
    Hessian diagonal for GPTQ's activation ordering) go in descending key order, so the groups
    are formed along that order too.
    """
    k = scores.numel()
    chosen = torch.topk(scores, k4).indices.sort().values if k4 else torch.empty(0, dtype=torch.long)
    keep = torch.ones(k, dtype=torch.bool)
    keep[chosen] = False
    parts = [torch.arange(k)[keep], chosen]
    if order_key is not None:
        parts = [p[torch.argsort(order_key[p], descending=True, stable=True)] for p in parts]
    return torch.cat(parts).to(torch.int32)
