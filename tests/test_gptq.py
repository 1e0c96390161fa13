"""GPTQ: lower output error than round-to-nearest on the same grids, and safe Cholesky handling."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from llmq.quant.config import QuantConfig
from llmq.quant.gptq import gptq_round, inverse_hessian_factor
from llmq.quant.linear import quantize_weight
from llmq.runtime.format import layout as L


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
    codes, _ = gptq_round(w, h, scale, zero, torch.full((32,), 3.0))
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


def test_act_order_sorts_each_part_by_input_energy_and_decodes_correctly():
    x = _correlated_inputs(2048, 128)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    hessian = x.T @ x / x.shape[0]
    plain = QuantConfig(g1=16, g4=16, stripe_fraction=0.25)
    ordered = QuantConfig(g1=16, g4=16, stripe_fraction=0.25, act_order=True)
    lay, t_plain = quantize_weight("w", w, plain, hessian=hessian)
    lay_o, t_ordered = quantize_weight("w", w, ordered, hessian=hessian)
    assert lay == lay_o
    energy = torch.diag(hessian)
    two, four = t_ordered["perm"][: lay.k2].long(), t_ordered["perm"][lay.k2 :].long()
    assert torch.all(energy[two][:-1] >= energy[two][1:]) and torch.all(energy[four][:-1] >= energy[four][1:])
    # The same channels form the stripe, only their order (and the 2-bit groups) change.
    assert torch.equal(four.sort().values, t_plain["perm"][lay.k2 :].long().sort().values)
    errors = [float(((x @ (L.dequantize(t, lay) - w).T) ** 2).mean()) for t in (t_plain, t_ordered)]
    assert errors[1] < 1.25 * errors[0], errors  # decoded through the stored permutation: still a good fit


def test_act_order_needs_calibration(cli, tiny_model, tmp_path):
    result = cli("quantize", str(tiny_model), "-o", str(tmp_path / "x.llmq"), "--no-calib", "--act-order")
    assert result.code == 2 and "--calib" in result.stderr


@pytest.mark.gpu
def test_gptq_on_the_gpu_matches_the_cpu():
    x = _correlated_inputs(2048, 128)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    hessian = x.T @ x / x.shape[0]
    config = QuantConfig(g1=16, g4=16, stripe_fraction=0.25, act_order=True)
    lay, on_cpu = quantize_weight("w", w, config, hessian=hessian)
    _, on_gpu = quantize_weight("w", w, config, hessian=hessian, device=torch.device("cuda"))
    assert all(t.device.type == "cpu" for t in on_gpu.values())
    cpu_err, gpu_err = (float(((x @ (L.dequantize(t, lay) - w).T) ** 2).mean()) for t in (on_cpu, on_gpu))
    assert gpu_err == pytest.approx(cpu_err, rel=0.02)  # float rounding may flip a few codes, no more


@pytest.mark.gpu
def test_round_to_nearest_on_the_gpu_matches_the_cpu():
    """Without calibration the scale search and rounding run on the GPU too, with the same result."""
    w = torch.randn(96, 200, generator=torch.Generator().manual_seed(5)) * 0.05
    config = QuantConfig(g4=16)
    lay, on_cpu = quantize_weight("w", w, config)
    _, on_gpu = quantize_weight("w", w, config, device=torch.device("cuda"))
    assert all(t.device.type == "cpu" for t in on_gpu.values())
    cpu_err, gpu_err = (float(((L.dequantize(t, lay) - w) ** 2).mean()) for t in (on_cpu, on_gpu))
    assert gpu_err == pytest.approx(cpu_err, rel=0.02)  # float rounding may flip a few codes, no more


@pytest.mark.gpu
def test_calibrate_and_quantize_on_the_gpu(cli, tiny_model, tmp_path):
    stats = tmp_path / "gpu.stats"
    calib = ("--dataset", "austen", "--samples", "4", "--seq-len", "64")
    assert cli("calibrate", str(tiny_model), "-o", str(stats), *calib, "--device", "cuda", "-q").code == 0
    out = tmp_path / "gpu.llmq"
    result = cli("quantize", str(tiny_model), "-o", str(out), "--g4", "16", "--calib", str(stats), "--device", "cuda")
    assert result.code == 0, result.stderr
    assert json.loads((out / "manifest.json").read_text())["calibration"]["gptq_device"] == "cuda"


def test_outliers_after_gptq_lower_the_output_error():
    """Outliers are fixed before the final GPTQ pass, so their corrections and GPTQ's compensation agree."""
    x = _correlated_inputs(2048, 128)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    hessian = x.T @ x / x.shape[0]
    errors = []
    for fraction in (0.0, 0.005, 0.02):
        config = QuantConfig(g1=16, g4=16, stripe_fraction=0.25, outlier_fraction=fraction)
        layout, tensors = quantize_weight("w", w, config, hessian=hessian)
        errors.append(float(((x @ (L.dequantize(tensors, layout) - w).T) ** 2).mean()))
    assert errors[2] < errors[1] < 0.97 * errors[0], errors


def test_a_stop_lands_inside_the_factorisation_and_between_column_blocks():
    """``stop`` is called between the three fp64 steps and before each block of GPTQ's columns,
    so a stop during one large matrix ends the run within a block, not after the matrix."""
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1024, 512, generator=torch.Generator().manual_seed(1))
    calls = []

    def stop():
        calls.append(len(calls))
        if len(calls) == 6:  # 3 before the factorisation's steps, 1 before the rows, then the 2nd column block
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_weight("w", w, QuantConfig(gptq_block=128), hessian=x.T @ x / 1024, stop=stop)
    assert len(calls) == 6
    calls.clear()
    quantize_weight("w", w, QuantConfig(gptq_block=128), hessian=x.T @ x / 1024, stop=lambda: calls.append(0))
    assert len(calls) == 3 + 1 + 512 // 128  # the three steps, the block of rows, the column blocks
