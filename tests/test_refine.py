"""Block-wise reconstruction: the trainable numbers decode exactly as the format does, pack back to
what was trained, and a block is only ever kept when its held-aside error went down."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import CASES, packed_layer

from llmq.quant.config import RefineSettings
from llmq.quant.refine import TrainableLinear, refine_block
from llmq.runtime.format import layout as L


@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_trainable_linear_decodes_exactly_as_the_format(case):
    layout, tensors, weight = packed_layer(case)
    trainable = TrainableLinear(layout, tensors, None)
    assert torch.equal(trainable.weight(), L.dequantize(tensors, layout))
    packed = trainable.pack()
    assert all(torch.equal(packed[k], tensors[k]) for k in layout.tensor_specs())  # untouched: the same bytes


@pytest.mark.parametrize("case", CASES, ids=str)
def test_what_is_packed_decodes_to_what_was_trained(case):
    layout, tensors, _ = packed_layer(case)
    trainable = TrainableLinear(layout, tensors, None)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a few hundred signed steps' worth of drift, past the code ranges too
        for p in trainable.integer_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1.5)
        for p in trainable.scale_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    packed = trainable.pack()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in packed.items()} == layout.tensor_specs()
    assert torch.equal(L.dequantize(packed, layout), trainable.weight().detach())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_step_keeps_nothing_of_the_decoded_weight_and_gives_autograds_gradients(case):
    layout, tensors, _ = packed_layer(case)
    trainable = TrainableLinear(layout, tensors, torch.randn(layout.out_features))
    x = torch.randn(2, 3, layout.in_features, requires_grad=True)
    tuned = trainable.integer_parameters() + trainable.scale_parameters()
    for p in tuned:
        p.requires_grad_(True)
    reference = torch.nn.functional.linear(x, trainable.weight(), trainable.bias)  # autograd through the decode
    expected = torch.autograd.grad(reference.square().sum(), [x, *tuned], allow_unused=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.data_ptr()) or t, lambda t: t):
        out = trainable(x)
    assert saved == [x.data_ptr()]  # x only: no [N, K] tensor waits for the backward
    assert torch.equal(out, reference)
    got = torch.autograd.grad(out.square().sum(), [x, *tuned], allow_unused=True)
    for g, e in zip(got, expected, strict=True):
        assert (g is None and e is None) or torch.allclose(g, e, rtol=1e-5, atol=1e-6)


def _toy(seed: int = 0):
    """A block that is one Linear quantized by llmq (round to nearest), inputs confined to a few
    directions (as a layer's activations mostly are), and the outputs of the full-precision weight
    it should reproduce."""
    from llmq.quant.config import QuantConfig
    from llmq.quant.linear import quantize_weight

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(70, 200, generator=gen) * 0.05
    layout, tensors = quantize_weight("toy", weight, QuantConfig(g4=16))
    inputs = (torch.randn(24, 16, 8, generator=gen) @ torch.randn(8, 200, generator=gen)) * 0.3
    return TrainableLinear(layout, tensors, None), inputs, inputs @ weight.T


def _call(block, x):
    return block(x)


def test_tuning_lowers_the_held_aside_error_of_a_block():
    trainable, inputs, targets = _toy()
    result = refine_block(trainable, {"x": trainable}, inputs, targets, _call, RefineSettings(steps=60, codes="gptq"))
    assert result.kept and result.after < 0.9 * result.before


def test_a_block_that_got_worse_goes_back_to_its_gptq_numbers():
    trainable, inputs, targets = _toy()
    original = trainable.pack()
    ruinous = RefineSettings(steps=20, codes="gptq", lr=2.0, scale_lr=1.0)  # steps far too large: every code jumps
    result = refine_block(trainable, {"x": trainable}, inputs, targets, _call, ruinous)
    assert not result.kept and result.after > result.before
    assert all(torch.equal(trainable.pack()[k], original[k]) for k in original)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_leaning_start_of_the_decoded_weight_is_its_own_codes(case):
    """Every code's position under the stored scales, zeros, permutation and outliers: decoding then
    leaning must give back the codes, so the start sits where rounding to nearest would be."""
    layout, tensors, decoded = packed_layer(case)
    trainable = TrainableLinear(layout, tensors, None)
    real = {"codes2": layout.k2, "codes4": layout.k4}  # columns that hold weights, not padding
    codes = {name: getattr(trainable, name)[:, :k].clone() for name, k in real.items() if k}
    with torch.no_grad():  # move every code so the start has to put it back
        for name in codes:
            getattr(trainable, name).add_(0.3)
    trainable.lean_start(decoded)
    for name, before in codes.items():
        torch.testing.assert_close(getattr(trainable, name)[:, : real[name]], before, atol=1e-3, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_leaning_start_of_the_fp32_weight_stays_in_range_and_packs_exactly(case):
    layout, tensors, _ = packed_layer(case)
    fp32 = torch.randn(case.out_features, case.in_features, generator=torch.Generator().manual_seed(0)) * 0.05
    trainable = TrainableLinear(layout, tensors, None)
    padding = trainable.codes2[:, layout.k2 :].clone() if layout.k2 else None
    trainable.lean_start(fp32 * 3)  # past the groups' ranges, so the clamp matters
    if layout.k2:
        assert -0.49 <= trainable.codes2.min() and trainable.codes2.max() <= L.INT2_MAX + 0.49
        assert torch.equal(trainable.codes2[:, layout.k2 :], padding)
        assert (trainable.codes2[:, : layout.k2] != trainable.codes2[:, : layout.k2].round()).any()  # unrounded
    if layout.k4:
        assert -0.49 <= trainable.codes4.min() and trainable.codes4.max() <= L.INT4_MAX + 0.49
    assert torch.equal(L.dequantize(trainable.pack(), layout), trainable.weight().detach())


def test_lean_codes_are_kept_where_they_beat_gptqs_numbers():
    trainable, inputs, targets = _toy()
    fp32 = torch.randn(70, 200, generator=torch.Generator().manual_seed(0)) * 0.05  # _toy's weight
    with torch.no_grad():  # GPTQ's codes made poor: the fp32 weights know better
        trainable.codes2.copy_(torch.randint(0, L.INT2_MAX + 1, trainable.codes2.shape).float())
    settings = RefineSettings(steps=30, codes="lean")
    weights = {"x": fp32}
    result = refine_block(trainable, {"x": trainable}, inputs, targets, _call, settings, fp_weight=weights.get)
    assert result.kept and result.lean and result.after < 0.5 * result.before


def test_lean_codes_that_lose_fall_back_to_tuning_gptqs_scales():
    trainable, inputs, targets = _toy()
    mirrored = -torch.randn(70, 200, generator=torch.Generator().manual_seed(0)) * 0.05  # _toy's weight, negated
    gptq_codes = {k: trainable.pack()[k] for k in ("qweight2", "qweight4", "zero4")}
    settings = RefineSettings(steps=20, codes="lean")  # 20 steps of 0.02 cannot walk a code back across its range
    weights = {"x": mirrored}
    result = refine_block(trainable, {"x": trainable}, inputs, targets, _call, settings, fp_weight=weights.get)
    assert not result.lean and result.kept and result.after < result.before  # the scales alone still help
    assert all(torch.equal(trainable.pack()[k], v) for k, v in gptq_codes.items())


def test_lean_codes_need_every_fp32_weight():
    trainable, inputs, targets = _toy()
    with pytest.raises(ValueError, match="fp32 weight of every trainable"):
        refine_block(trainable, {"x": trainable}, inputs, targets, _call, RefineSettings(codes="lean"))


def test_the_held_aside_evaluation_checks_for_a_stop_before_each_batch():
    trainable, inputs, targets = _toy()
    forwards = []

    def call(block, x):
        forwards.append(len(x))
        return _call(block, x)

    def stop():
        if forwards:  # the first batch of the held-aside windows has run: stop now
            raise KeyboardInterrupt

    settings = RefineSettings(steps=5, batch=1, codes="gptq")
    assert settings.held_out(len(inputs)) > 1  # more than one batch to evaluate
    with pytest.raises(KeyboardInterrupt):
        refine_block(trainable, {"x": trainable}, inputs, targets, call, settings, stop)
    assert forwards == [1]  # one held-aside batch, then the stop: not the rest, not a training step
