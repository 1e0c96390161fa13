"""Quantize one Linear weight into the packed tensors of :mod:`llmq.runtime.format.layout`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from llmq.errors import NonFiniteWeightError
from llmq.quant.config import QuantConfig, Rounding, Selection
from llmq.quant.gptq import gptq_round, inverse_hessian_factor
from llmq.quant.groups import FourBit, TwoBit, quantize_2bit, quantize_4bit
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
    stop: Callable[[], None] = lambda: None,
) -> tuple[L.LinearLayout, dict[str, torch.Tensor]]:
    """``weight`` ``[N, K]`` (any float dtype) -> its layout and packed tensors (name suffix -> tensor).

    Without ``hessian`` (``[K, K]``, ``E[x xᵀ]`` of the layer's inputs) this is round-to-nearest
    with range-based stripes. With it, stripes are ranked by Hessian-weighted error (unless the
    config asks for range selection) and the codes come from GPTQ on the same grids. ``layout``
    and ``scores`` ([K]) come from a bit budget, which has already chosen this Linear's stripe
    width and scored its channels. All of it (the scale search, rounding and GPTQ) runs on
    ``device`` (default: the CPU); everything returned is on the CPU. ``stop`` is called before each
    block of rows, each step of GPTQ's factorisation and each block of its columns; it raises
    ``KeyboardInterrupt`` to end there (a 70B's largest matrix takes minutes on a CPU).
    """
    if device is None or device.type == "cpu":
        return _quantize_weight(name, weight, config, hessian, layout, scores, device, stop)
    # Factory calls without a device (torch.ones, torch.arange, ...) then allocate on `device` too.
    hessian = None if hessian is None else hessian.to(device)
    scores = None if scores is None else scores.to(device)
    with torch.device(device):
        layout, tensors = _quantize_weight(name, weight.to(device), config, hessian, layout, scores, device, stop)
    return layout, {suffix: tensor.cpu() for suffix, tensor in tensors.items()}


# A matrix of more weights than this is quantized a block of whole rows at a time: every step but
# the channel ranking (summed over the blocks) and the choice of outliers (the largest over all
# blocks) treats rows independently, and the scale search holds about WORK_COPIES fp32 copies of
# what it works on (llmq.quant.resources), 0.8 GB at this size instead of 50 GB for a 70B's head.
ROW_BLOCK_WEIGHTS = 1 << 24


def block_rows(n: int, k: int) -> int:
    """Rows in each block of an ``[n, k]`` matrix (all of them when it fits in one)."""
    return n if n * k <= ROW_BLOCK_WEIGHTS else max(1, ROW_BLOCK_WEIGHTS // k)


def row_blocks(n: int, k: int) -> list[slice]:
    """Slices of whole rows of an ``[n, k]`` matrix, each at most ``ROW_BLOCK_WEIGHTS`` weights (one
    row at least); a single slice for a matrix that fits, so its arithmetic is the unsplit one."""
    rows = block_rows(n, k)
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)] if n else [slice(0, 0)]


def _quantize_weight(name, weight, config, hessian, layout, scores, device, stop):
    weight = weight.detach()
    blocks = row_blocks(*weight.shape)
    bad = sum(int((~torch.isfinite(weight[rows])).sum()) for rows in blocks)  # no fp32 copy of the whole
    if bad:
        raise NonFiniteWeightError(f"tensor {name} has {bad} NaN/Inf value(s); fix the checkpoint before quantizing")
    layout = layout or plan_layout(*weight.shape, config)
    if scores is None:
        by_hessian = hessian is not None and config.selection != Selection.range
        scores = hessian_score(weight, hessian, config) if by_hessian else _range_score(weight, config.g1)
    order_key = torch.diag(hessian) if hessian is not None and config.act_order is not False else None
    perm = select_channels(scores, layout.k4, order_key)
    gptq = None
    if hessian is not None:
        packed_h = hessian[perm.long()][:, perm.long()]
        gptq = packed_h, inverse_hessian_factor(packed_h, config.gptq_damp, stop=stop)  # every GPTQ pass uses it
    rounding = _Rounding(weight, perm.long(), layout, config, gptq, device, stop)
    tensors: dict[str, torch.Tensor] = {"perm": perm}
    if layout.k2 and layout.n_outliers:
        parts, outliers = _round_with_outliers(rounding, blocks)
        tensors.update(outliers)
    else:
        parts = [_pack(*rounding.round(rounding.fit(rows))[:2], layout) for rows in blocks]
    tensors.update({suffix: torch.cat([part[suffix] for part in parts]) for suffix in parts[0]})
    return layout, tensors


class _Rounding:
    """Blocks of rows of one weight, permuted to packed order: their grids fitted, then their codes
    rounded on them (by GPTQ where there is a Hessian)."""

    def __init__(self, weight, perm, layout: L.LinearLayout, config: QuantConfig, gptq, device, stop):
        self.weight, self.perm, self.layout, self.config, self.gptq, self.device, self.stop = (
            weight, perm, layout, config, gptq, device, stop)  # fmt: skip

    def fit(self, rows: slice) -> tuple[torch.Tensor, TwoBit | None, FourBit | None]:
        """The block permuted to packed order (fp32), and its fitted 2-bit and 4-bit parts (None where none)."""
        lay = self.layout
        self.stop()
        packed = self.weight[rows].to(torch.float32)[:, self.perm]
        two = _fit_2bit(packed[:, : lay.k2], lay, self.config) if lay.k2 else None
        four = quantize_4bit(packed[:, lay.k2 :], lay.g4, self.config.rounding) if lay.k4 else None
        return packed, two, four

    def round(self, fitted, exact: torch.Tensor | None = None):
        """``fitted``'s parts with GPTQ's codes (unchanged without a Hessian), and with ``exact`` (bool
        ``[rows, K]``, weights stored exactly elsewhere) the values to store there."""
        if self.gptq is None:
            return fitted[1], fitted[2], None
        return _gptq(fitted[0], *self.gptq, fitted[1], fitted[2], self.layout, self.config, self.device, exact,
                     self.stop)  # fmt: skip

    def contribution(self, packed: torch.Tensor, two: TwoBit) -> torch.Tensor:
        """``[rows, k2]``: what correcting each 2-bit weight exactly would remove from the output error,
        its squared residual times its channel's input energy ``H[c, c]`` (1 without a Hessian)."""
        residual = _residual_2bit(packed, two, self.layout)
        if self.gptq is None:
            return residual**2
        return residual**2 * torch.diag(self.gptq[0])[: self.layout.k2].clamp(min=0)


def _round_with_outliers(rounding: _Rounding, blocks: list[slice]):
    """Every block's packed tensors with the matrix's ``n_outliers`` largest contributions (over all
    blocks) kept as sparse fp16 corrections; with a Hessian, a second GPTQ pass treats them as
    exact, so no compensation is spent on errors the corrections remove. A single block keeps its
    fit and first pass; several are fitted again, so only one block's codes are held at a time."""
    lay = rounding.layout
    values, index = [], []  # per block: its largest contributions and their flat [N, k2] positions
    for rows in blocks:
        fitted = rounding.fit(rows)
        two = rounding.round(fitted)[0]
        contribution = rounding.contribution(fitted[0], two).flatten()
        top = torch.topk(contribution, min(lay.n_outliers, contribution.numel()))
        values.append(top.values)
        index.append(top.indices + rows.start * lay.k2)
    kept = (fitted, two) if len(blocks) == 1 else None
    flat = torch.cat(index)[torch.topk(torch.cat(values), lay.n_outliers).indices].sort().values
    picked_rows, picked_cols = flat // lay.k2, flat % lay.k2
    parts, corrections = [], []
    for rows in blocks:
        mine = (picked_rows >= rows.start) & (picked_rows < rows.stop)
        r, c = picked_rows[mine] - rows.start, picked_cols[mine]
        fitted, two = kept or (rounding.fit(rows), None)
        if rounding.gptq is None:  # round-to-nearest: the codes stay, the corrections are the residuals
            two, four = fitted[1], fitted[2]
            corrections.append(_residual_2bit(fitted[0], two, lay)[r, c])
        else:
            exact = torch.zeros(fitted[0].shape, dtype=torch.bool)
            exact[r, c] = True
            two, four, targets = rounding.round(fitted, exact)
            corrections.append(targets[r, c] - two.decode(lay.g1, lay.g2)[r, c])
        parts.append(_pack(two, four, lay))
    return parts, _csr(picked_rows, picked_cols, torch.cat(corrections), lay.out_features)


def _pack(two: TwoBit | None, four, layout: L.LinearLayout) -> dict[str, torch.Tensor]:
    tensors = _pack_2bit(two, layout) if two is not None else {}
    if four is not None:
        tensors |= {"qweight4": L.pack_codes(four.codes, 4), "scale4": four.scale, "zero4": four.zero.to(torch.uint8)}
    return tensors


def _range_score(weight: torch.Tensor, g1: int) -> torch.Tensor:
    """:func:`~llmq.quant.select.range_score`, summed over blocks of rows in fp32."""
    return sum(range_score(weight[rows].to(torch.float32), g1) for rows in row_blocks(*weight.shape))


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
    energy = torch.ones(k) if hessian is None else torch.diag(hessian).clamp(min=0)
    total = 0
    for rows in row_blocks(n, k):  # in fp32, a block at a time: the temporaries are a dozen copies of it
        weights = torch.ones(rows.stop - rows.start) if fisher is None else 0.5 * fisher[rows].to(torch.float32)
        total = total + weights @ _excess_error(w[rows].to(torch.float32), config)
    return energy * total


def _excess_error(w: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """``[N, K]``: each weight's squared error under min/max 2-bit rounding less that under 4-bit."""
    k = w.shape[1]
    padded = torch.nn.functional.pad(w, (0, (-k) % config.g1))
    mask = torch.ones_like(padded)
    mask[:, k:] = 0
    two = quantize_2bit(padded, mask, config.g1, config.g2, config.scale_bits, Rounding.minmax)
    err2 = (two.decode(config.g1, config.g2)[:, :k] - w) ** 2
    four = quantize_4bit(torch.nn.functional.pad(w, (0, (-k) % config.g4)), config.g4, Rounding.minmax)
    return err2 - (four.decode(config.g4)[:, :k] - w) ** 2


def _gptq(packed, hessian, factor, two, four, layout: L.LinearLayout, config: QuantConfig, device=None, exact=None,
          stop=lambda: None):  # fmt: skip
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
    codes, targets = gptq_round(packed, hessian, *grid, config.gptq_damp, config.gptq_block, device, exact, factor,
                                stop)  # fmt: skip
    if two is not None:
        two_codes = two.codes.clone()
        two_codes[:, : layout.k2] = codes[:, : layout.k2]
        two = replace(two, codes=two_codes)
    if four is not None:
        four = replace(four, codes=codes[:, layout.k2 :])
    return two, four, targets


def _residual_2bit(packed: torch.Tensor, two: TwoBit, layout: L.LinearLayout) -> torch.Tensor:
    """``[N, k2]``: the 2-bit part's weights minus their decoded values (padding dropped)."""
    return packed[:, : layout.k2] - two.decode(layout.g1, layout.g2)[:, : layout.k2]


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
