"""Block-wise reconstruction: tune a decoder block's quantization so its outputs match the full-precision block's.

Every number the format stores is a parameter here, initialised from GPTQ's solution:

* the 2-bit and 4-bit codes and the first-order scale codes: integers, each held as a float that
  is rounded on the forward pass and passed straight through on the backward pass (clamped to
  its range), moved by signed gradient steps (AutoRound's estimator), so a code changes only when
  its evidence crosses half a step;
* the fp16 second-order scales and the 4-bit groups' fp16 scales: multipliers ``exp(s)`` of the
  GPTQ values, trained with Adam and rounded to fp16 on the forward pass (straight through);
* the 4-bit zeros: integers like the codes.

With ``--refine-codes lean`` the codes start instead where the fp32 weights fall under GPTQ's
scales, unrounded (:meth:`TrainableLinear.lean_start`, AutoRound's start), and move by signed steps
of ``--refine-lr``; the block keeps them only where they beat GPTQ's numbers.

The 2-bit zeros, the second-order zeros, the permutation and any outliers stay as GPTQ chose them.
:class:`TrainableLinear` decodes with exactly the formula of :func:`llmq.runtime.format.layout.dequantize`,
so :meth:`TrainableLinear.pack` writes the very weight the optimisation saw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from llmq.quant.config import RefineCodes, RefineSettings
from llmq.runtime.format import layout as L


def _round(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Round half up and clamp, with the gradient of the identity (straight-through)."""
    rounded = torch.floor(x + 0.5).clamp(low, high)
    return x + (rounded - x).detach()


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 as the artifact stores it, with the gradient of the identity."""
    return x + (x.half().float() - x).detach()


def _within(position: torch.Tensor, current: torch.Tensor, high: int) -> torch.Tensor:
    """``position`` clamped to where it rounds into [0, high]; ``current`` where it is not finite."""
    return torch.where(torch.isfinite(position), position.clamp(-0.49, high + 0.49), current)


class TrainableLinear(nn.Module):
    """A packed Linear whose stored numbers are trainable; its forward multiplies by the decoded weight.
    Every parameter starts frozen; :func:`refine_block` unfreezes those it tunes.

    layout  the Linear's :class:`~llmq.runtime.format.layout.LinearLayout`
    packed  its tensors as the artifact stores them (name suffix -> tensor, any device)
    bias    the dense bias [N] or None
    """

    def __init__(self, layout: L.LinearLayout, packed: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.layout = layout
        device = packed["perm"].device
        self.register_buffer("inverse", torch.argsort(packed["perm"].long()), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.fixed = {k: v for k, v in packed.items() if k in ("meta2", "szero2", "outlier_rowptr", "outlier_col",
                                                               "outlier_val", "perm")}  # fmt: skip
        if layout.k2:
            zero2, scale_code = L.unpack_meta2(packed["meta2"])
            self.register_buffer("zero2", zero2.float(), persistent=False)
            self.codes2 = nn.Parameter(L.unpack_codes(packed["qweight2"], 2).float(), requires_grad=False)
            self.scale_code = nn.Parameter(scale_code.float(), requires_grad=False)
            # the fp16 scales train as log-multipliers of GPTQ's values: scale = init * exp(param)
            self.scale2 = nn.Parameter(torch.zeros(packed["scale2"].shape, device=device), requires_grad=False)
            self.register_buffer("scale2_init", packed["scale2"].float(), persistent=False)
            self.register_buffer("szero2", packed["szero2"].float(), persistent=False)
        if layout.k4:
            self.codes4 = nn.Parameter(L.unpack_codes(packed["qweight4"], 4).float(), requires_grad=False)
            self.zero4 = nn.Parameter(packed["zero4"].float(), requires_grad=False)
            self.scale4 = nn.Parameter(torch.zeros(packed["scale4"].shape, device=device), requires_grad=False)
            self.register_buffer("scale4_init", packed["scale4"].float(), persistent=False)

    # -- the parameters by kind: integers move by signed steps, scales by Adam ------------------
    def integer_parameters(self) -> list[nn.Parameter]:
        names = (["codes2", "scale_code"] if self.layout.k2 else []) + (["codes4", "zero4"] if self.layout.k4 else [])
        return [getattr(self, n) for n in names]

    def scale_parameters(self) -> list[nn.Parameter]:
        names = (["scale2"] if self.layout.k2 else []) + (["scale4"] if self.layout.k4 else [])
        return [getattr(self, n) for n in names]

    # -- decoding, exactly as layout.dequantize -------------------------------------------------
    def _stored(self) -> dict[str, torch.Tensor]:
        """The stored numbers as the artifact would hold them, each still carrying its gradient."""
        lay, values = self.layout, {}
        if lay.k2:
            values["codes2"] = _round(self.codes2, 0, L.INT2_MAX)
            values["scale_code"] = _round(self.scale_code, 0, (1 << lay.scale_bits) - 1)
            values["scale2"] = _fp16((self.scale2_init * self.scale2.exp()).clamp(min=torch.finfo(torch.float16).tiny))
        if lay.k4:
            values["codes4"] = _round(self.codes4, 0, L.INT4_MAX)
            values["zero4"] = _round(self.zero4, 0, L.INT4_MAX)
            values["scale4"] = _fp16((self.scale4_init * self.scale4.exp()).clamp(min=torch.finfo(torch.float16).tiny))
        return values

    def group_scales2(self, v: dict[str, torch.Tensor]) -> torch.Tensor:
        """The 2-bit part's effective scale of each g1 group [N, groups2], from the stored numbers ``v``."""
        block = torch.arange(self.layout.groups2, device=self.codes2.device) // self.layout.g2
        return v["scale2"][:, block] * (v["scale_code"] + self.szero2[:, block])

    def _outliers(self) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The sparse fp16 corrections of the 2-bit part: ((rows, columns) in its permuted order, values)."""
        rowptr = self.fixed["outlier_rowptr"].long()
        rows = torch.repeat_interleave(torch.arange(self.layout.out_features, device=rowptr.device), rowptr.diff())
        return (rows, self.fixed["outlier_col"].long()), self.fixed["outlier_val"].float()

    @torch.no_grad()
    def lean_start(self, weight: torch.Tensor) -> None:
        """Set every 2-bit and 4-bit code to where ``weight`` [N, K] (the fp32 matrix, original column
        order) falls under the current scales and zeros, unrounded: the start of AutoRound's rounding,
        from which signed steps let the block's outputs decide each code instead of GPTQ's sequential
        error feedback. A start stays within 0.49 of the code range, so it rounds into it; padding
        columns and groups with a zero scale keep their codes."""
        lay, v = self.layout, self._stored()
        w = weight.to(self.inverse.device, torch.float32)[:, self.fixed["perm"].long()]
        if lay.k2:
            w2 = w.new_zeros(lay.out_features, lay.k2_padded)
            w2[:, : lay.k2] = w[:, : lay.k2]
            if lay.n_outliers:  # the codes carry what the corrections do not
                index, values = self._outliers()
                w2 = w2.index_put(index, -values, accumulate=True)
            position = w2.reshape(lay.out_features, lay.groups2, lay.g1) / self.group_scales2(v).unsqueeze(-1)
            position = (position + self.zero2.unsqueeze(-1)).reshape(lay.out_features, lay.k2_padded)
            position[:, lay.k2 :] = torch.nan
            self.codes2.copy_(_within(position, self.codes2, L.INT2_MAX))
        if lay.k4:
            position = w[:, lay.k2 :].reshape(lay.out_features, lay.groups4, lay.g4) / v["scale4"].unsqueeze(-1)
            position = (position + v["zero4"].unsqueeze(-1)).reshape(lay.out_features, lay.k4)
            self.codes4.copy_(_within(position, self.codes4, L.INT4_MAX))

    def weight(self) -> torch.Tensor:
        """The decoded weight [N, K] in the original column order, fp32, differentiable."""
        lay, v = self.layout, self._stored()
        parts = []
        if lay.k2:
            scale = self.group_scales2(v)
            codes = v["codes2"].reshape(lay.out_features, lay.groups2, lay.g1)
            w2 = (scale.unsqueeze(-1) * (codes - self.zero2.unsqueeze(-1))).reshape(lay.out_features, lay.k2_padded)
            if lay.n_outliers:
                w2 = w2.index_put(*self._outliers(), accumulate=True)
            parts.append(w2[:, : lay.k2])
        if lay.k4:
            codes = v["codes4"].reshape(lay.out_features, lay.groups4, lay.g4)
            w4 = v["scale4"].unsqueeze(-1) * (codes - v["zero4"].unsqueeze(-1))
            parts.append(w4.reshape(lay.out_features, lay.k4))
        return torch.cat(parts, dim=1)[:, self.inverse]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        tuned = [p for p in self.integer_parameters() + self.scale_parameters() if p.requires_grad]
        if torch.is_grad_enabled() and tuned:
            return _DecodedLinear.apply(x, bias, self, *tuned)
        return nn.functional.linear(x, self.weight().to(x.dtype), bias)

    def pack(self) -> dict[str, torch.Tensor]:
        """The packed tensors of the current values: what :meth:`weight` decodes, bit for bit."""
        lay, packed = self.layout, dict(self.fixed)
        with torch.no_grad():
            v = self._stored()
            if lay.k2:
                packed["qweight2"] = L.pack_codes(v["codes2"].long(), 2)
                packed["meta2"] = L.pack_meta2(self.zero2.long(), v["scale_code"].long())
                packed["scale2"] = v["scale2"].half()
            if lay.k4:
                packed["qweight4"] = L.pack_codes(v["codes4"].long(), 4)
                packed["zero4"] = v["zero4"].to(torch.uint8)
                packed["scale4"] = v["scale4"].half()
        return {suffix: packed[suffix].cpu() for suffix in lay.tensor_specs()}


class _DecodedLinear(torch.autograd.Function):
    """``x @ W.T + bias`` with ``W = trainable.weight()``, differentiable in ``x``, ``bias`` and the
    trainable's stored numbers, keeping nothing of ``W`` between the forward and the backward: the
    backward decodes ``W`` again. Autograd would hold two fp32 ``[N, K]`` tensors per matrix (``W``
    and the codes less their zeros) from every matrix's forward to its backward: 7 GB for a
    70B-class layer, where the recomputation costs one elementwise decode per matrix per step."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, trainable: TrainableLinear, *tuned: nn.Parameter):
        with torch.no_grad():
            weight = trainable.weight().to(x.dtype)
        ctx.trainable, ctx.tuned, ctx.has_bias = trainable, tuned, bias is not None
        ctx.save_for_backward(x)
        out = nn.functional.linear(x, weight, bias)
        # a view (linear flattens a batched input) may not be modified in place by the caller, as Falcon's
        # attention does, unless it is a tensor of its own
        return out.clone() if out._base is not None else out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            weight = ctx.trainable.weight()
        grad_x = grad_out @ weight.detach().to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.flatten(0, -2).sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        grad_weight = grad_out.flatten(0, -2).T @ x.flatten(0, -2)
        grads = torch.autograd.grad(weight, ctx.tuned, grad_weight.to(weight.dtype), allow_unused=True)
        return grad_x, grad_bias, None, *grads


def _snapshot(param: torch.Tensor) -> torch.Tensor:
    """A copy of ``param`` to restore it from: uint8 where every value is an integer in [0, 255]
    (GPTQ's codes, scale codes and zeros: a quarter of an fp32 copy, and exact), else fp32."""
    value = param.detach()
    if value.is_floating_point() and bool(((value >= 0) & (value <= 255) & (value == value.round())).all()):
        return value.to(torch.uint8)
    return value.clone()


@dataclass(frozen=True)
class TuneResult:
    before: float  # held-aside loss with the numbers tuning started from
    after: float  # with the tuned ones
    kept: bool  # whether the tuned numbers were kept (only when after < before)
    lean: bool = False  # whether the kept codes are tuned from the leaning start (--refine-codes lean)


def tune_if_better(
    params: list[nn.Parameter],
    dense: list[tuple[nn.Parameter, torch.dtype]],
    held_loss: Callable[[], float],
    train: Callable[[], None],
    before: float | None = None,
) -> TuneResult:
    """Run ``train`` on ``params`` (gradients on while it runs) and keep the result only if
    ``held_loss()`` went down; else every parameter goes back to where it started.

    dense   those of ``params`` the artifact stores as 16-bit dense tensors (the norms), with that
            dtype: rounded to it before the result is judged, so the judge sees what is stored
    before  ``held_loss()`` of the starting values, when the caller has measured it already
    """
    start = [_snapshot(p) for p in params]
    before = held_loss() if before is None else before
    for p in params:
        p.requires_grad_(True)
    train()
    with torch.no_grad():
        for p, dtype in dense:
            p.copy_(p.to(dtype).float())
    for p in params:
        p.requires_grad_(False)
    after = held_loss()
    kept = after < before
    if not kept:
        with torch.no_grad():
            for p, value in zip(params, start, strict=True):
                p.copy_(value)
    return TuneResult(before, after, kept)


def refine_block(
    block: nn.Module,
    trainables: dict[str, TrainableLinear],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    settings: RefineSettings,
    stop: Callable[[], None] = lambda: None,
    dense: list[tuple[nn.Parameter, torch.dtype]] = (),
    fp_weight: Callable[[str], torch.Tensor] | None = None,
) -> TuneResult:
    """Tune ``trainables`` (installed in ``block``) so ``call(block, inputs[i:j])`` matches ``targets[i:j]``.

    inputs, targets  [windows, tokens, hidden]: the block's inputs and the outputs it should give
    call             runs the block on a batch of windows' hidden states
    stop             called before each step; raises ``KeyboardInterrupt`` to end the run there
    dense            float32 parameters of ``block`` to tune as well (the norms), with the dtype the
                     artifact stores them in: trained like the scales, rounded to it before judging
    fp_weight        with ``settings.codes`` lean: a trainable's name -> its fp32 weight [N, K], called
                     once per matrix as its codes are started, so one matrix's weight is held at a time

    The last ``settings.held_out(windows)`` windows judge the result; if it is not better than GPTQ's, every
    parameter goes back to its GPTQ value. With lean codes, the codes tuned from the leaning start are
    kept only if they beat GPTQ's numbers; otherwise the block is tuned from GPTQ's codes, scales only.
    """
    integers = [p for t in trainables.values() for p in t.integer_parameters()]
    continuous = [p for t in trainables.values() for p in t.scale_parameters()] + [p for p, _ in dense]
    held = slice(len(inputs) - settings.held_out(len(inputs)), len(inputs))
    held_error = partial(_error, block, inputs[held], targets[held], call, settings.batch, stop)

    def tune(moving: list[nn.Parameter], before: float | None = None) -> TuneResult:
        train = partial(_steps, block, inputs, targets, call, settings, stop, moving, continuous)
        return tune_if_better(moving + continuous, list(dense), held_error, train, before)

    if settings.codes != RefineCodes.lean:
        return tune(integers if settings.code_lr > 0 else [])
    if fp_weight is None:
        raise ValueError("--refine-codes lean needs the fp32 weight of every trainable matrix")
    start = [_snapshot(p) for p in integers + continuous]
    gptq = held_error()
    for name, trainable in trainables.items():
        trainable.lean_start(fp_weight(name))
    lean = tune(integers)
    error = lean.after if lean.kept else lean.before
    if error < gptq:
        return TuneResult(gptq, error, True, lean=True)
    with torch.no_grad():
        for p, value in zip(integers + continuous, start, strict=True):
            p.copy_(value)
    return tune([], before=gptq)  # GPTQ's numbers are back: their held-aside error is known


def _steps(block, inputs, targets, call, settings: RefineSettings, stop, integers, continuous) -> None:
    """``settings.steps`` steps on random batches of the training windows (all but the held-aside):
    signed steps on ``integers`` at a linearly decaying rate, Adam on ``continuous``."""
    train = len(inputs) - settings.held_out(len(inputs))
    adam = torch.optim.Adam(continuous, lr=settings.scale_lr)
    gen = torch.Generator().manual_seed(0)
    for step in range(settings.steps):
        stop()
        picks = torch.randperm(train, generator=gen)[: settings.batch]
        loss = torch.nn.functional.mse_loss(call(block, inputs[picks]), targets[picks])
        adam.zero_grad(set_to_none=True)
        for p in integers:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            rate = settings.code_lr * (1 - step / settings.steps)
            for p in integers:
                if p.grad is not None:
                    p.sub_(rate * p.grad.sign())
        adam.step()


@torch.no_grad()
def _error(block, inputs: torch.Tensor, targets: torch.Tensor, call, batch: int, stop) -> float:
    """Mean squared error of ``block`` on the windows, ``batch`` at a time, ``stop`` checked before each."""
    total = 0.0
    for i in range(0, len(inputs), batch):
        stop()
        out = call(block, inputs[i : i + batch])
        total += float(torch.nn.functional.mse_loss(out, targets[i : i + batch], reduction="sum"))
    return total / targets.numel()
