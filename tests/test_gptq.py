"""GPTQ: lower output error than round-to-nearest on the same grids, and safe Cholesky handling."""

from __future__ import annotations

import logging

import pytest
import torch

from llmq.quant.config import QuantConfig
from llmq.quant.gptq import gptq_round, inverse_hessian_factor
from llmq.quant.linear import quantize_weight
from llmq.runtime import layout as L


def _correlated_inputs(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    scale = torch.rand(k, generator=gen) * 3 + 0.1  # uneven channel energy, as in real activations
    return (torch.randn(rows, k, generator=gen) @ mix) * scale


@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_gptq_lowers_output_error(fraction):
    x = _correlated_inputs(2048, 128)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    hessian = x.T @ x / x.shape[0]
    config = QuantConfig(g1=16, g4=16, stripe_fraction=fraction)
    errors = {}
    for label, h in (("rtn", None), ("gptq", hessian)):
        layout, tensors = quantize_weight("w", w, config, hessian=h)
        errors[label] = float(((x @ (L.dequantize(tensors, layout) - w).T) ** 2).mean())
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_gptq_codes_stay_on_the_grid():
    w = torch.randn(8, 32)
    h = torch.eye(32)
    scale, zero = torch.full((8, 32), 0.5), torch.full((8, 32), 2.0)
    codes = gptq_round(w, h, scale, zero, torch.full((32,), 3.0))
    assert codes.dtype == torch.long and int(codes.min()) >= 0 and int(codes.max()) <= 3
    # With an identity Hessian there is nothing to compensate: GPTQ equals round-to-nearest.
    assert torch.equal(codes, torch.clamp(torch.round(w / 0.5 + 2.0), 0, 3).long())


def test_singular_hessian_is_retried_with_more_damping(caplog):
    v = torch.randn(16, 1)
    singular = -(v @ v.T)  # negative semi-definite: fails at the first damping levels
    with caplog.at_level(logging.WARNING, logger="llmq.gptq"):
        factor = inverse_hessian_factor(singular, damp=0.01)
    assert torch.isfinite(factor).all() and "retrying" in caplog.text


def test_dead_channels_do_not_break_gptq():
    x = _correlated_inputs(512, 32)
    x[:, 5] = 0
    w = torch.randn(4, 32)
    layout, tensors = quantize_weight("w", w, QuantConfig(g1=16, g4=16, stripe_fraction=0.0), hessian=x.T @ x / 512)
    assert torch.isfinite(L.dequantize(tensors, layout)).all()


def test_outliers_after_gptq_follow_the_input_energy():
    x = _correlated_inputs(1024, 64)
    x[:, :32] *= 0.01  # the first half of the channels barely matters to the output
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    config = QuantConfig(g1=16, g4=16, stripe_fraction=0.0, outlier_fraction=0.05)
    layout, tensors = quantize_weight("w", w, config, hessian=x.T @ x / 1024)
    channels = tensors["perm"][tensors["outlier_col"].long()]
    assert layout.n_outliers == len(channels) > 0
    assert float((channels >= 32).float().mean()) > 0.9
