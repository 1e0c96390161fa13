"""Group quantization with an INT zero point: the 2-bit part (with second-order scales) and the 4-bit part.

Grids always contain zero: a group's values are ``s * (q - z)`` with ``0 <= q, z <= qmax``. So the
scale must be large enough that ``[-z * s, (qmax - z) * s]`` covers the kept range. For each
group, every zero ``z`` and a set of shrink factors (clipping the range) are tried, and the pair
with the lowest squared error wins (``Rounding.search``); ``Rounding.minmax`` tries no shrinking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmq.quant.config import Rounding
from llmq.runtime.format.layout import INT2_MAX, INT4_MAX, SZERO_MAX

SHRINK_SEARCH = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
# Second-order blocks clip far less: a clipped block scale shrinks every group scale in the block,
# and the group refit (``_refit_groups``) cannot undo it.
SECOND_ORDER_SHRINKS = (1.0, 0.97, 0.94, 0.9)
_TINY = 1e-12


def _shrinks(rounding: Rounding) -> tuple[float, ...]:
    return SHRINK_SEARCH if rounding == Rounding.search else (1.0,)


def _covering_scale(lo: torch.Tensor, hi: torch.Tensor, zero: int, qmax: int) -> torch.Tensor:
    """Smallest scale whose grid with this zero covers ``[lo, hi]`` (``lo <= 0 <= hi`` not assumed)."""
    up = hi.clamp(min=0) / (qmax - zero) if zero < qmax else torch.where(hi > 0, torch.inf, 0.0)
    down = (-lo).clamp(min=0) / zero if zero > 0 else torch.where(lo < 0, torch.inf, 0.0)
    return torch.maximum(up, down).clamp(min=_TINY)


def round_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """Nearest code ``q`` for ``w ~ scale * (q - zero)``; ``scale``/``zero`` broadcast over the last dim."""
    return torch.clamp(torch.round(w / scale + zero), 0, qmax)


def _group_error(w, mask, scale, zero, qmax) -> torch.Tensor:
    q = round_codes(w, scale.unsqueeze(-1), zero.unsqueeze(-1), qmax)
    return (((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1) - w) ** 2 * mask).sum(-1)


def fit_scale_zero(w: torch.Tensor, mask: torch.Tensor, qmax: int, rounding: Rounding):
    """Best ``(scale, zero)`` per row of ``w`` ``[G, g]``; ``mask`` marks real (non-padding) entries."""
    big = torch.finfo(w.dtype).max
    lo = torch.where(mask > 0, w, big).amin(-1)
    hi = torch.where(mask > 0, w, -big).amax(-1)
    lo, hi = torch.where(lo > hi, 0.0, lo), torch.where(lo > hi, 0.0, hi)  # all-padding groups
    best_err = torch.full_like(lo, torch.inf)
    best_scale, best_zero = torch.ones_like(lo), torch.zeros_like(lo)
    for shrink in _shrinks(rounding):
        for scale, zeros in _candidates(lo * shrink, hi * shrink, qmax):
            err = _group_error(w, mask, scale, zeros, qmax)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zeros, best_zero)
    return best_scale, best_zero


def _candidates(lo: torch.Tensor, hi: torch.Tensor, qmax: int):
    """(scale, zero) pairs worth trying for the range ``[lo, hi]``.

    With few zeros (2-bit) every zero with its covering scale. With many (4-bit) the min/max
    scale with the zero rounded down and up, plus the two one-signed covering grids: 4 instead
    of 16 candidates, which keeps 4-bit quantization as fast as 2-bit.
    """
    if qmax <= INT2_MAX:
        for zero in range(qmax + 1):
            yield _covering_scale(lo, hi, zero, qmax), torch.full_like(lo, float(zero))
        return
    scale = ((hi - lo) / qmax).clamp(min=_TINY)
    natural = -lo / scale
    yield scale, natural.floor().clamp(0, qmax)
    yield scale, natural.ceil().clamp(0, qmax)
    for zero in (0, qmax):
        yield _covering_scale(lo, hi, zero, qmax), torch.full_like(lo, float(zero))


@dataclass(frozen=True)
class FourBit:
    codes: torch.Tensor  # int64 [N, k4]
    scale: torch.Tensor  # fp16 [N, k4 / g4]
    zero: torch.Tensor  # int64 [N, k4 / g4]

    def column_grid(self, g4: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each column's (scale, zero), fp32 ``[N, k4]``."""
        return self.scale.float().repeat_interleave(g4, 1), self.zero.float().repeat_interleave(g4, 1)

    def decode(self, g4: int) -> torch.Tensor:
        scale, zero = self.column_grid(g4)
        return scale * (self.codes - zero)


def quantize_4bit(w: torch.Tensor, g4: int, rounding: Rounding) -> FourBit:
    """INT4 codes, INT4 zero and an fp16 scale per group of ``g4`` along the last dim of ``w`` ``[N, k4]``."""
    n, k4 = w.shape
    groups = w.reshape(-1, g4)
    scale, zero = fit_scale_zero(groups, torch.ones_like(groups), INT4_MAX, rounding)
    scale = scale.half().float().clamp(min=torch.finfo(torch.float16).tiny)  # the stored value is used below
    codes = round_codes(groups, scale.unsqueeze(-1), zero.unsqueeze(-1), INT4_MAX)
    return FourBit(codes.long().reshape(n, k4), scale.half().reshape(n, -1), zero.long().reshape(n, -1))


@dataclass(frozen=True)
class TwoBit:
    codes: torch.Tensor  # int64 [N, k2p]
    zero: torch.Tensor  # int64 [N, G]
    scale_code: torch.Tensor  # int64 [N, G]
    block_scale: torch.Tensor  # fp16 [N, B]
    block_zero: torch.Tensor  # int64 [N, B]

    def column_grid(self, g1: int, g2: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each column's (scale, zero) after the second-order decode, fp32 ``[N, k2p]``."""
        scale = _group_scales(self.block_scale, self.block_zero, self.scale_code, g2)
        return scale.repeat_interleave(g1, 1), self.zero.float().repeat_interleave(g1, 1)

    def decode(self, g1: int, g2: int) -> torch.Tensor:
        scale, zero = self.column_grid(g1, g2)
        return scale * (self.codes - zero)


def quantize_2bit(w: torch.Tensor, mask: torch.Tensor, g1: int, g2: int, scale_bits: int, rounding: Rounding) -> TwoBit:
    """INT2 codes and zeros per group of ``g1``, with first-order scales quantized per block of ``g2``.

    ``w`` and ``mask`` are ``[N, k2p]``; ``mask`` is 0 on padding columns. Three passes: the best
    continuous scale per group, the best second-order (fp16 scale, INT4 zero) per block for those
    scales, then per group the best (scale code, zero) pair on the now fixed grid, judged by the
    error on the weights themselves rather than on the scales.
    """
    n, k2p = w.shape
    groups, gmask = w.reshape(n, -1, g1), mask.reshape(n, -1, g1)
    scale, _ = fit_scale_zero(groups.reshape(-1, g1), gmask.reshape(-1, g1), INT2_MAX, rounding)
    block_scale, block_zero = _fit_second_order(scale.reshape(n, -1), g2, scale_bits)
    scale_code, zero = _refit_groups(groups, gmask, scale.reshape(n, -1), block_scale, block_zero, g2, scale_bits)
    group_scale = _group_scales(block_scale, block_zero, scale_code, g2)
    codes = round_codes(groups, group_scale.unsqueeze(-1), zero.float().unsqueeze(-1), INT2_MAX)
    return TwoBit(codes.long().reshape(n, k2p), zero, scale_code, block_scale, block_zero)


def _blocks(x: torch.Tensor, g2: int, fill: float) -> torch.Tensor:
    """``[N, G]`` -> ``[N, B, g2]``, the last block padded with ``fill``."""
    n, g = x.shape
    pad = (-g) % g2
    return torch.nn.functional.pad(x, (0, pad), value=fill).reshape(n, -1, g2)


def _group_scales(block_scale, block_zero, scale_code, g2) -> torch.Tensor:
    block = torch.arange(scale_code.shape[1], device=scale_code.device) // g2
    return block_scale.float()[:, block] * (scale_code + block_zero[:, block]).float()


def _fit_second_order(scale: torch.Tensor, g2: int, scale_bits: int):
    """Per block: fp16 ``a`` and INT4 ``zs`` minimising ``sum (s - a * (qs + zs))^2``."""
    qmax = (1 << scale_bits) - 1
    blocks = _blocks(scale, g2, fill=float("nan"))
    real = ~torch.isnan(blocks)
    values = torch.nan_to_num(blocks, nan=0.0)
    top = values.amax(-1)
    best_err = torch.full_like(top, torch.inf)
    best_a, best_zs = torch.zeros_like(top), torch.zeros_like(top)
    for zs in range(SZERO_MAX + 1):
        for shrink in SECOND_ORDER_SHRINKS:
            a = (top * shrink / (zs + qmax)).clamp(min=torch.finfo(torch.float16).tiny).half().float()
            q = torch.clamp(torch.round(values / a.unsqueeze(-1) - zs), 0, qmax)
            err = (((q + zs) * a.unsqueeze(-1) - values) ** 2 * real).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_a = torch.where(better, a, best_a)
            best_zs = torch.where(better, torch.full_like(a, zs), best_zs)
    return best_a.half(), best_zs.long()


def _refit_groups(groups, gmask, wanted_scale, block_scale, block_zero, g2, scale_bits):
    """With the block grid fixed, pick each group's scale code (nearest and its neighbours) and zero."""
    qmax = (1 << scale_bits) - 1
    n, g, _ = groups.shape
    block = torch.arange(g, device=groups.device) // g2
    a = block_scale.float()[:, block]  # [N, G]
    zs = block_zero[:, block].float()
    best_err = torch.full((n, g), torch.inf, device=groups.device)
    best_code = torch.zeros(n, g, dtype=torch.long, device=groups.device)
    best_zero = torch.zeros(n, g, dtype=torch.long, device=groups.device)
    nearest = torch.round(wanted_scale / a - zs)
    for delta in (-1, 0, 1, 2):
        code = torch.clamp(nearest + delta, 0, qmax)
        scale = (a * (code + zs)).clamp(min=_TINY)
        for zero in range(INT2_MAX + 1):
            zeros = torch.full_like(scale, float(zero))
            err = _group_error(groups, gmask, scale, zeros, INT2_MAX)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_code = torch.where(better, code.long(), best_code)
            best_zero = torch.where(better, zeros.long(), best_zero)
    return best_code, best_zero
