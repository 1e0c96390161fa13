"""Quantize one Linear weight into the packed tensors of :mod:`llmq.runtime.layout`."""

from __future__ import annotations

import torch

from llmq.errors import LlmqError
from llmq.quant.config import QuantConfig
from llmq.quant.groups import quantize_2bit, quantize_4bit
from llmq.quant.select import ChannelScorer, range_score, select_channels, stripe_width
from llmq.runtime import layout as L


class NonFiniteWeightError(LlmqError):
    """A weight to be quantized holds NaN or Inf."""


def plan_layout(out_features: int, in_features: int, config: QuantConfig) -> L.LinearLayout:
    """The layout a weight of this shape gets under ``config``: data-independent, so dry runs are exact."""
    k4 = stripe_width(in_features, config.stripe_fraction, config.g4)
    k2 = in_features - k4
    n_outliers = round(config.outlier_fraction * out_features * k2)
    return L.LinearLayout(out_features, in_features, k4, config.g1, config.g2, config.g4, config.scale_bits, n_outliers)


def quantize_weight(
    name: str, weight: torch.Tensor, config: QuantConfig, scorer: ChannelScorer = range_score
) -> tuple[L.LinearLayout, dict[str, torch.Tensor]]:
    """``weight`` ``[N, K]`` (any float dtype) -> its layout and packed tensors (name suffix -> tensor)."""
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise NonFiniteWeightError(f"tensor {name} has {bad} NaN/Inf value(s); fix the checkpoint before quantizing")
    layout = plan_layout(*w.shape, config)
    perm = select_channels(scorer(w, config.g1), layout.k4)
    packed = w[:, perm.long()]
    tensors: dict[str, torch.Tensor] = {"perm": perm}
    if layout.k2 > 0:
        tensors.update(_pack_2bit(packed[:, : layout.k2], layout, config))
    if layout.k4 > 0:
        four = quantize_4bit(packed[:, layout.k2 :], layout.g4, config.rounding)
        tensors["qweight4"] = L.pack_codes(four.codes, 4)
        tensors["scale4"] = four.scale
        tensors["zero4"] = four.zero.to(torch.uint8)
    return layout, tensors


def _pack_2bit(w2: torch.Tensor, layout: L.LinearLayout, config: QuantConfig) -> dict[str, torch.Tensor]:
    n, k2 = w2.shape
    pad = layout.k2_padded - k2
    mask = torch.ones(n, layout.k2_padded)
    mask[:, k2:] = 0
    # Padding takes the row's last real value, so it never widens a group's range; its error is masked out.
    padded = torch.cat([w2, w2[:, -1:].expand(n, pad)], dim=1) if pad else w2
    two = quantize_2bit(padded, mask, layout.g1, layout.g2, layout.scale_bits, config.rounding)
    codes = torch.where(mask > 0, two.codes, two.zero.repeat_interleave(layout.g1, dim=1))  # pads decode to 0
    tensors = {
        "qweight2": L.pack_codes(codes, 2),
        "meta2": L.pack_meta2(two.zero, two.scale_code),
        "scale2": two.block_scale,
        "szero2": two.block_zero.to(torch.uint8),
    }
    if layout.n_outliers:
        tensors.update(_outliers(w2, tensors, layout))
    return tensors


def _outliers(w2: torch.Tensor, tensors: dict[str, torch.Tensor], layout: L.LinearLayout) -> dict[str, torch.Tensor]:
    """The 2-bit weights with the largest remaining error, stored as fp16 corrections in CSR order."""
    no_outliers = L.LinearLayout(**{**layout.to_json(), "k4": 0, "in_features": layout.k2, "n_outliers": 0})
    decoded = L._decode_2bit(tensors, no_outliers)[:, : layout.k2]
    residual = w2 - decoded
    flat = torch.topk(residual.abs().flatten(), layout.n_outliers).indices.sort().values  # row-major = CSR order
    rows, cols = flat // layout.k2, flat % layout.k2
    counts = torch.bincount(rows, minlength=layout.out_features)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return {
        "outlier_rowptr": rowptr.to(torch.int32),
        "outlier_col": cols.to(torch.int32),
        "outlier_val": residual[rows, cols].half(),
    }
