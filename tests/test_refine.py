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


def test_tuning_lowers_the_held_aside_error_of_a_block():
    trainable, inputs, targets = _toy()
    result = refine_block(trainable, {"x": trainable}, inputs, targets, lambda b, x: b(x), RefineSettings(steps=60))
    assert result.kept and result.after < 0.9 * result.before


def test_a_block_that_got_worse_goes_back_to_its_gptq_numbers():
    trainable, inputs, targets = _toy()
    original = trainable.pack()
    ruinous = RefineSettings(steps=20, lr=2.0, scale_lr=1.0)  # steps far too large: every code jumps
    result = refine_block(trainable, {"x": trainable}, inputs, targets, lambda b, x: b(x), ruinous)
    assert not result.kept and result.after > result.before
    assert all(torch.equal(trainable.pack()[k], original[k]) for k in original)
