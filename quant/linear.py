"""Quantize one Linear weight into the packed tensors of :mod:`llmq.runtime.format.layout`."""

from __future__ import annotations

from dataclasses import replace

import torch

from llmq.errors import NonFiniteWeightError
from llmq.quant.config import QuantConfig, Rounding, Selection
from llmq.quant.gptq import gptq_round, inverse_hessian_factor
from llmq.quant.groups import TwoBit, quantize_2bit, quantize_4bit
from llmq.quant.select import range_score, select_channels, stripe_width
from llmq.runtime.format import layout as L


def plan_layout(out_features: int, in_features: int, config: QuantConfig, k4: int | None = None) -> L.LinearLayout:
    """The layout a weight of this shape gets: ``k4`` stripe channels, by default the config's fraction."""
    k4 = stripe_width(in_features, config.stripe_fraction, config.g4) if k4 is None else k4
    k2 = in_features - k4
    n_outliers = round(config.outlier_fraction * out_features * k2)
    return L.LinearLayout(out_features, in_features, k4, config.g1, config.g2, config.g4, config.scale_bits, n_outliers)


def quantize_weight(
    name: str,
    weight: torch.Tensor,
    config: QuantConfig,
    hessian: torch.Tensor | None = None,
    layout: L.LinearLayout | None = None,
    scores: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> tuple[L.LinearLayout, dict[str, torch.Tensor]]:
    """``weight`` ``[N, K]`` (any float dtype) -> its layout and packed tensors (name suffix -> tensor).

    Without ``hessian`` (``[K, K]``, ``E[x xᵀ]`` of the layer's inputs) this is round-to-nearest
    with range-based stripes. With it, stripes are ranked by Hessian-weighted error (unless the
    config asks for range selection) and the codes come from GPTQ on the same grids. ``layout``
    and ``scores`` ([K]) come from a bit budget, which has already chosen this Linear's stripe
    width and scored its channels. All of it (the scale search, rounding and GPTQ) runs on
    ``device`` (default: the CPU); everything returned is on the CPU.
    """
    if device is None or device.type == "cpu":
        return _quantize_weight(name, weight, config, hessian, layout, scores, device)
    # Factory calls without a device (torch.ones, torch.arange, ...) then allocate on `device` too.
    hessian = None if hessian is None else hessian.to(device)
    scores = None if scores is None else scores.to(device)
    with torch.device(device):
        layout, tensors = _quantize_weight(name, weight.to(device), config, hessian, layout, scores, device)
    return layout, {suffix: tensor.cpu() for suffix, tensor in tensors.items()}


def _quantize_weight(name, weight, config, hessian, layout, scores, device):
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise NonFiniteWeightError(f"tensor {name} has {bad} NaN/Inf value(s); fix the checkpoint before quantizing")
    layout = layout or plan_layout(*w.shape, config)
    if scores is None:
        by_hessian = hessian is not None and config.selection != Selection.range
        scores = hessian_score(w, hessian, config) if by_hessian else range_score(w, config.g1)
    order_key = torch.diag(hessian) if hessian is not None and config.act_order is not False else None
    perm = select_channels(scores, layout.k4, order_key)
    packed = w[:, perm.long()]
    two = _fit_2bit(packed[:, : layout.k2], layout, config) if layout.k2 else None
    four = quantize_4bit(packed[:, layout.k2 :], layout.g4, config.rounding) if layout.k4 else None
    tensors: dict[str, torch.Tensor] = {"perm": perm}
    outliers = None
    if hessian is not None:
        packed_h = hessian[perm.long()][:, perm.long()]
        factor = inverse_hessian_factor(packed_h, config.gptq_damp)  # both GPTQ passes use it
        two, four, _ = _gptq(packed, packed_h, factor, two, four, layout, config, device)
        if two is not None and layout.n_outliers:
            two, four, outliers = _gptq_with_outliers(packed, packed_h, factor, two, four, layout, config, device)
    elif two is not None and layout.n_outliers:
        residual = _residual_2bit(packed, two, layout)
        rows, cols = _largest(residual**2, layout.n_outliers)
        outliers = _csr(rows, cols, residual[rows, cols], layout.out_features)
    if two is not None:
        tensors.update(_pack_2bit(two, layout))
    if outliers is not None:
        tensors.update(outliers)
    if four is not None:
        tensors["qweight4"] = L.pack_codes(four.codes, 4)
        tensors["scale4"] = four.scale
        tensors["zero4"] = four.zero.to(torch.uint8)
    return layout, tensors


def hessian_score(
    w: torch.Tensor, hessian: torch.Tensor | None, config: QuantConfig, fisher: torch.Tensor | None = None
) -> torch.Tensor:
    """Per channel: the extra squared error of 2-bit over 4-bit rounding, weighted by ``H[c, c]``.

    ``H[c, c] = E[x_c²]``, so this is the output error each channel would add if left in 2-bit.
    With ``fisher`` (``[N]``, the output Fisher diagonal of :mod:`llmq.quant.sensitivity`) each
    output row's error is weighted by what it costs the model, and the score is the KL it would
    add (``½ Σ_o fisher[o] err[o, c]² H[c, c]``): comparable across Linears, which a bit budget needs.
    Without a Hessian every channel gets unit energy: the weight error alone (used to compare
    Linears when spreading a bit budget without calibration data).
    The errors come from min/max rounding: the ranking only needs their size, and the clipping
    search would cost as much again as the quantization itself.
    """
    n, k = w.shape
    pad = (-k) % config.g1
    padded = torch.nn.functional.pad(w, (0, pad))
    mask = torch.ones_like(padded)
    mask[:, k:] = 0
    two = quantize_2bit(padded, mask, config.g1, config.g2, config.scale_bits, Rounding.minmax)
    err2 = (two.decode(config.g1, config.g2)[:, :k] - w) ** 2
    pad4 = (-k) % config.g4
    four = quantize_4bit(torch.nn.functional.pad(w, (0, pad4)), config.g4, Rounding.minmax)
    err4 = (four.decode(config.g4)[:, :k] - w) ** 2
    energy = torch.ones(k) if hessian is None else torch.diag(hessian).clamp(min=0)
    rows = torch.ones(n) if fisher is None else 0.5 * fisher.to(w.dtype)
    return energy * (rows @ (err2 - err4))


def _gptq(packed, hessian, factor, two, four, layout: L.LinearLayout, config: QuantConfig, device=None, exact=None):
    """Re-derive the codes of both parts with GPTQ on their fixed grids, in packed column order;
    ``factor`` is the inverse Hessian's (:func:`~llmq.quant.gptq.inverse_hessian_factor`).

    Returns the updated parts and, with ``exact`` (bool ``[N, K]``), the values to store there."""
    scales, zeros, qmax = [], [], []
    if two is not None:
        scale, zero = two.column_grid(layout.g1, layout.g2)
        scales.append(scale[:, : layout.k2])
        zeros.append(zero[:, : layout.k2])
        qmax.append(torch.full((layout.k2,), float(L.INT2_MAX)))
    if four is not None:
        scale, zero = four.column_grid(layout.g4)
        scales.append(scale)
        zeros.append(zero)
        qmax.append(torch.full((layout.k4,), float(L.INT4_MAX)))
    grid = torch.cat(scales, 1), torch.cat(zeros, 1), torch.cat(qmax)
    codes, targets = gptq_round(packed, hessian, *grid, config.gptq_damp, config.gptq_block, device, exact, factor)
    if two is not None:
        two_codes = two.codes.clone()
        two_codes[:, : layout.k2] = codes[:, : layout.k2]
        two = replace(two, codes=two_codes)
    if four is not None:
        four = replace(four, codes=codes[:, layout.k2 :])
    return two, four, targets


def _gptq_with_outliers(packed, hessian, factor, two, four, layout: L.LinearLayout, config: QuantConfig, device):
    """Outliers chosen by their error contribution after a first GPTQ pass, then a second pass
    that treats them as exact, so no compensation is spent on errors the corrections remove.

    Contribution is the squared residual times the channel's input energy ``H[c, c]``: the
    output error each correction removes. Returns the parts and the CSR outlier tensors.
    """
    residual = _residual_2bit(packed, two, layout)
    rows, cols = _largest(residual**2 * torch.diag(hessian)[: layout.k2].clamp(min=0), layout.n_outliers)
    exact = torch.zeros(packed.shape, dtype=torch.bool)
    exact[rows, cols] = True
    two, four, targets = _gptq(packed, hessian, factor, two, four, layout, config, device, exact)
    values = targets[rows, cols] - two.decode(layout.g1, layout.g2)[rows, cols]
    return two, four, _csr(rows, cols, values, layout.out_features)


def _residual_2bit(packed: torch.Tensor, two: TwoBit, layout: L.LinearLayout) -> torch.Tensor:
    """``[N, k2]``: the 2-bit part's weights minus their decoded values (padding dropped)."""
    return packed[:, : layout.k2] - two.decode(layout.g1, layout.g2)[:, : layout.k2]


def _largest(contribution: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of the ``count`` largest entries of ``[N, k2]``, in row-major (CSR) order."""
    k2 = contribution.shape[1]
    flat = torch.topk(contribution.flatten(), count).indices.sort().values
    return flat // k2, flat % k2


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_rows: int) -> dict[str, torch.Tensor]:
    counts = torch.bincount(rows, minlength=n_rows)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return {
        "outlier_rowptr": rowptr.to(torch.int32),
        "outlier_col": cols.to(torch.int32),
        "outlier_val": values.half(),
    }


def _fit_2bit(w2: torch.Tensor, layout: L.LinearLayout, config: QuantConfig) -> TwoBit:
    n, k2 = w2.shape
    pad = layout.k2_padded - k2
    mask = torch.ones(n, layout.k2_padded)
    mask[:, k2:] = 0
    # Padding takes the row's last real value, so it never widens a group's range; its error is masked out.
    padded = torch.cat([w2, w2[:, -1:].expand(n, pad)], dim=1) if pad else w2
    two = quantize_2bit(padded, mask, layout.g1, layout.g2, layout.scale_bits, config.rounding)
    codes = torch.where(mask > 0, two.codes, two.zero.repeat_interleave(layout.g1, dim=1))  # pads decode to 0
    return replace(two, codes=codes)


def _pack_2bit(two: TwoBit, layout: L.LinearLayout) -> dict[str, torch.Tensor]:
    return {
        "qweight2": L.pack_codes(two.codes, 2),
        "meta2": L.pack_meta2(two.zero, two.scale_code),
        "scale2": two.block_scale,
        "szero2": two.block_zero.to(torch.uint8),
    }
