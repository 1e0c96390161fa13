"""The output Fisher: streamed layer by layer it equals the whole model's, and the budget uses it."""

from __future__ import annotations

import json

import pytest
import torch

from llmq.quant.calibrate import FISHER_WINDOWS, calibration_windows, collect
from llmq.quant.config import QuantConfig
from llmq.quant.linear import hessian_score
from llmq.runtime.sources import models, text


def _whole_model_fisher(folder, windows: torch.Tensor, head: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """The same statistic from the whole model in memory, the way one would first write it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    wanted = ("model.layers", "lm_head") if head else ("model.layers",)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(wanted)}
    outputs: dict[str, torch.Tensor] = {}
    for name, module in linears.items():
        module.register_forward_hook(lambda mod, args, out, name=name: outputs.__setitem__(name, out))
    generator = torch.Generator().manual_seed(seed)
    totals = {name: torch.zeros(m.out_features, dtype=torch.float64) for name, m in linears.items()}
    for window in windows:
        embeds = model.get_input_embeddings()(window[None]).requires_grad_(True)
        log_p = torch.log_softmax(model(inputs_embeds=embeds, use_cache=False).logits[0].float(), -1)
        labels = torch.multinomial(log_p.detach().exp(), 1, generator=generator)
        grads = torch.autograd.grad(log_p.gather(-1, labels).sum(), list(outputs.values()))
        for (name, _), grad in zip(outputs.items(), grads, strict=True):
            totals[name] += grad.double().pow(2).reshape(-1, grad.shape[-1]).sum(0)
    return {name: (total / windows.numel()).float() for name, total in totals.items()}


@pytest.mark.parametrize("head", [False, True], ids=["layers", "with-lm-head"])
def test_streamed_fisher_equals_the_whole_models(tiny_model, head):
    source = models.resolve_model(str(tiny_model), progress=False)
    calib = text.load_text(text.Dataset.austen, None, text.Split.calib).text[:50_000]
    windows = calibration_windows(source, calib, FISHER_WINDOWS + 2, 48, seed=0)
    config = QuantConfig(include=(*QuantConfig().include, "lm_head")) if head else QuantConfig()
    streamed = collect(source, models.load_config(source), config, windows, seed=0).fisher
    expected = _whole_model_fisher(tiny_model, windows[:FISHER_WINDOWS], head)
    assert streamed.keys() == expected.keys() and len(streamed) == 14 + head  # 7 Linears x 2 layers (+ head)
    for name, value in expected.items():
        assert value.abs().sum() > 0, name
        torch.testing.assert_close(streamed[name], value, rtol=1e-3, atol=1e-9, msg=name)


def test_fisher_weights_the_budget_score_by_output_row():
    config = QuantConfig()
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    hessian = torch.eye(64)
    plain = hessian_score(w, hessian, config)
    only_row_2 = torch.zeros(8)
    only_row_2[2] = 4.0
    weighted = hessian_score(w, hessian, config, only_row_2)
    # ½ · 4 · (row 2's error difference): one row counts, twice over
    alone = hessian_score(w[2:3], hessian, config)
    torch.testing.assert_close(weighted, 2.0 * alone)
    assert not torch.allclose(weighted, plain)


@pytest.fixture(scope="module")
def stats_without_fisher(tmp_path_factory, tiny_model):
    """A stats file as llmq wrote them before the output Fisher: the same file less those tensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from conftest import run_cli

    folder = tmp_path_factory.mktemp("stats")
    full = folder / "full.stats"
    result = run_cli("calibrate", str(tiny_model), "-o", str(full), "--dataset", "austen", "--samples", "4",
                     "--seq-len", "64", "-q")  # fmt: skip
    assert result.code == 0, result.stderr
    with safe_open(str(full), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert sum(k.endswith(".fisher") for k in tensors) == 14
    old = folder / "old.stats"
    save_file({k: v for k, v in tensors.items() if not k.endswith(".fisher")}, str(old), metadata=metadata)
    return full, old


def _quantize_k4(cli, model, stats, out) -> dict[str, int]:
    options = ("--g1", "16", "--g4", "16", "--target-bits", "3.4", "--refine", "none", "--json")
    result = cli("quantize", str(model), "-o", str(out), "--calib", str(stats), *options)
    assert result.code == 0, result.stderr
    return {layer["name"]: layer["k4"] for layer in json.loads(result.stdout)["accounting"]["layers"]}, result.stderr


def test_the_budget_follows_the_fisher_and_old_stats_get_a_note(cli, tiny_model, stats_without_fisher, tmp_path):
    from llmq.quant import statsfile
    from llmq.runtime.sources.checkpoint import model_fingerprint

    full, old = stats_without_fisher
    k4, log = _quantize_k4(cli, tiny_model, full, tmp_path / "full.llmq")
    assert "carry no output Fisher" not in log
    _, log = _quantize_k4(cli, tiny_model, old, tmp_path / "old.llmq")
    assert "carry no output Fisher" in log
    # a Linear without stripes, made far more costly to the model than any other, gets the widest
    stats = statsfile.read_stats(full, model_fingerprint(tiny_model))
    loud = min(k4, key=k4.get)
    loudest = max(float(t.max()) for name, t in stats.tensors.items() if name.endswith(".fisher"))
    stats.tensors[f"{loud}.fisher"] = torch.full_like(stats.tensors[f"{loud}.fisher"], 1000 * loudest)
    statsfile.write_stats(tmp_path / "loud.stats", stats)
    k4_loud, _ = _quantize_k4(cli, tiny_model, tmp_path / "loud.stats", tmp_path / "loud.llmq")
    assert k4_loud[loud] > k4[loud] and k4_loud[loud] == max(k4_loud.values())


def test_a_stats_file_missing_one_fisher_is_refused(cli, tiny_model, stats_without_fisher, tmp_path):
    from llmq.quant import statsfile
    from llmq.runtime.sources.checkpoint import model_fingerprint

    stats = statsfile.read_stats(stats_without_fisher[0], model_fingerprint(tiny_model))
    del stats.tensors["model.layers.1.mlp.down_proj.fisher"]
    statsfile.write_stats(tmp_path / "partial.stats", stats)
    options = ("--target-bits", "3.4", "--g1", "16", "--g4", "16", "--refine", "none")
    partial = str(tmp_path / "partial.stats")
    result = cli("quantize", str(tiny_model), "-o", str(tmp_path / "x.llmq"), "--calib", partial, *options)
    assert result.code == 1 and "no output Fisher of size 64 for model.layers.1.mlp.down_proj" in result.stderr


def _default_run(cli, model, stats, out, *options) -> tuple[dict, str]:
    base = ("--g1", "16", "--g4", "16", "--stripe-fraction", "0.5", "--refine", "none", "--json")
    result = cli("quantize", str(model), "-o", str(out), "--calib", str(stats), *base, *options)
    assert result.code == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def _stripe_shares(document: dict) -> set[float]:
    return {layer["k4"] / layer["shape"][1] for layer in document["accounting"]["layers"]}


def test_a_calibrated_run_spreads_the_uniform_plans_bits_by_predicted_kl(
    cli, tiny_model, stats_without_fisher, tmp_path
):
    full, old = stats_without_fisher
    uniform, _ = _default_run(cli, tiny_model, full, tmp_path / "u.llmq", "--allocation", "uniform")
    spread, _ = _default_run(cli, tiny_model, full, tmp_path / "s.llmq")
    assert _stripe_shares(uniform) == {0.5}
    assert "target_bits" not in uniform["config"]
    assert len(_stripe_shares(spread)) > 1
    # the budget aims at the uniform plan's bits per quantized weight, and lands at or under them
    assert spread["config"]["target_bits"] == pytest.approx(uniform["accounting"]["bits_per_weight"], abs=1e-4)
    assert spread["accounting"]["bits_per_weight"] <= uniform["accounting"]["bits_per_weight"]
    # statistics from before the output Fisher keep the old uniform stripes, and say so
    old_run, log = _default_run(cli, tiny_model, old, tmp_path / "o.llmq")
    assert old_run["accounting"]["layers"] == uniform["accounting"]["layers"]
    assert "every Linear keeps the same stripe fraction" in log


def test_uniform_allocation_with_target_bits_is_a_usage_error(cli, tiny_model, tmp_path):
    options = ("--allocation", "uniform", "--target-bits", "3.0")
    result = cli("quantize", str(tiny_model), "-o", str(tmp_path / "x.llmq"), "--no-calib", *options)
    assert result.code == 2 and "drop --allocation uniform" in result.stderr


def test_the_head_taken_a_slice_of_positions_at_a_time_gives_the_same_fisher(tiny_model, monkeypatch):
    """Logits over a large vocabulary are computed a few positions at a time (memory); the labels are
    drawn alike and the Fisher agrees to float rounding. (At real shapes, a 49k or 152k vocabulary
    and slices of 110-341 positions, the products were bit-identical here; these tiny ones take
    another BLAS path for 5-row products.)"""
    from llmq.runtime.sources import head

    source = models.resolve_model(str(tiny_model), progress=False)
    calib = text.load_text(text.Dataset.austen, None, text.Split.calib).text[:50_000]
    windows = calibration_windows(source, calib, 3, 48, seed=0)
    config = QuantConfig(include=(*QuantConfig().include, "lm_head"))
    whole = collect(source, models.load_config(source), config, windows, seed=0).fisher
    monkeypatch.setattr(head, "HEAD_CHUNK_ELEMENTS", 5 * models.load_config(source).vocab_size)  # 5 positions
    sliced = collect(source, models.load_config(source), config, windows, seed=0).fisher
    assert whole.keys() == sliced.keys()
    for name in whole:
        torch.testing.assert_close(sliced[name], whole[name], rtol=1e-5, atol=0, msg=name)
