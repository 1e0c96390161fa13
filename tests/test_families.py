"""The coverage matrix: every decoder family, dense and MoE, through quantize (round-to-nearest and
calibrated), verify, eval ppl, generate and a logits check (tests/family_models.py has the steps).

Also what the architecture table refuses: no decoder layers to be found, an expert tensor of the
wrong rank, a fused projection whose split is not the config's. Each is exit 1, one line, nothing written.
"""

from __future__ import annotations

import ast
import json
import re

import pytest
import torch
from family_models import FAMILIES, build, check_family
from safetensors.torch import load_file, save_file

from llmq.errors import ModelSourceError

from conftest import run_cli


@pytest.fixture(scope="module")
def tokenizer():
    from llmq.runtime.sources.text import Dataset, Split, load_text

    from conftest import _train_tokenizer

    return _train_tokenizer([load_text(Dataset.austen, None, Split.calib).text[:200_000]])


def _cli(*args):
    result = run_cli(*args)
    return result.code, result.stdout, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("label", list(FAMILIES))
def test_the_family_quantizes_verifies_evaluates_and_generates(label, tmp_path, tokenizer):
    row = check_family(label, tmp_path, tokenizer, _cli)
    assert row["bpw_rtn"] == row["bpw_gptq"] < row["bpw_4bit"]  # calibration changes codes, not sizes
    assert row["linears"] >= 4 and 1 < row["ppl_gptq"] < 10 * len(tokenizer)


def _refused(result, tmp_path, *fragments):
    assert result.code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(f in result.stderr for f in fragments), result.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]


def test_an_expert_tensor_of_the_wrong_rank_is_refused(tmp_path, tokenizer):
    folder = build("Qwen 3 MoE", tmp_path / "moe", tokenizer)
    tensors = load_file(folder / "model.safetensors")
    experts = [k for k in tensors if ".mlp.experts.0." in k and "layers.0." in k]
    tensors = {k: v for k, v in tensors.items() if not (".mlp.experts." in k and "layers.0." in k)}
    tensors["model.layers.0.mlp.experts.gate_up_proj"] = torch.zeros(96, 80)  # one expert's worth, rank 2
    tensors["model.layers.0.mlp.experts.down_proj"] = torch.zeros(4, 80, 48)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert experts  # the checkpoint stored experts one tensor each before
    result = run_cli("quantize", str(folder), "-o", str(tmp_path / "out.llmq"), "--g4", "16", "-q")
    _refused(result, tmp_path, "model.layers.0.mlp.experts.gate_up_proj", "[96, 80]", "[4, 96, 80]")


def test_a_fused_projection_split_unlike_the_config_is_refused(tmp_path, tokenizer):
    folder = build("Phi-3/4", tmp_path / "phi", tokenizer)
    config = json.loads((folder / "config.json").read_text())
    config["num_key_value_heads"] = 4  # the checkpoint's qkv_proj was split for 2 kv heads
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("quantize", str(folder), "-o", str(tmp_path / "out.llmq"), "--g4", "16", "-q")
    _refused(result, tmp_path, "model.layers.0.self_attn.qkv_proj.weight", "has shape [160, 80]", "[240, 80]")


def test_an_architecture_without_decoder_layers_is_refused():
    from types import SimpleNamespace

    from llmq.runtime.sources.families import family_of

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ModuleList([torch.nn.Linear(4, 4)] * 3))
    with pytest.raises(ModelSourceError, match="model type 'mystery' is not in llmq's architecture table.*none"):
        family_of(model, SimpleNamespace(model_type="mystery", num_hidden_layers=2))
    found = family_of(model, SimpleNamespace(model_type="mystery", num_hidden_layers=3))
    assert found.layers == "1"  # the generic rule: the one ModuleList of num_hidden_layers modules


def test_starved_experts_take_their_layers_mean_and_say_so(tmp_path, tokenizer):
    folder = build("Mixtral", tmp_path / "mix", tokenizer)
    result = run_cli("calibrate", str(folder), "-o", str(tmp_path / "s.stats"), "--dataset", "austen",
                     "--samples", "1", "--seq-len", "16")  # fmt: skip
    assert result.code == 0, result.stderr
    assert "expert matrices saw fewer routed tokens than their input width" in result.stderr
    stats = load_file(tmp_path / "s.stats")
    hessians = [stats[f"model.layers.0.mlp.experts.gate_up_proj.{e}.hessian"] for e in range(4)]
    assert all(torch.isfinite(h).all() and h.shape == (80, 80) for h in hessians)


_COMPONENTS = "embed_tokens|embed_out|lm_head|self_attn|mlp|q_proj|layers|experts|decoder"
# A dotted module path (a dot, no spaces) with a component that model families use.
_MODULE_PATH = re.compile(rf"(?:^|[.*])({_COMPONENTS})(?:[.*]|$)|transformer\.h\b")


def _module_names(sources: dict[str, str]) -> list[str]:
    """String literals (docstrings aside) outside the architecture table that name a model's modules."""
    found = []
    for module, source in sources.items():
        if module == "llmq.runtime.sources.families":
            continue
        tree = ast.parse(source)
        documented = (ast.Module, ast.ClassDef, ast.FunctionDef)
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, documented) and n.body and isinstance(n.body[0], ast.Expr)}  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = node.value
                found += (
                    [f"{module}: {text!r}"] if "." in text and " " not in text and _MODULE_PATH.search(text) else []
                )
    return found


def test_no_module_of_any_model_is_named_outside_the_architecture_table():
    from test_layers import package_sources

    sources = package_sources()
    assert _module_names(sources) == ["llmq.quant.config: '*.layers.*'"]  # the default --include: the layers
    sources["llmq.quant.calibrate"] += "\nFIRST = 'model.layers.0.self_attn'\n"
    assert "llmq.quant.calibrate: 'model.layers.0.self_attn'" in _module_names(sources)


def test_the_lm_head_can_be_calibrated_too(cli, tiny_model, tmp_path):
    """Matrices after the decoder layers get statistics from the last layer's outputs, so asking
    for the head with calibration works, inline or from a stats file made with the same patterns."""
    patterns = ("--include", "*.layers.*", "--include", "lm_head")
    small = ("--dataset", "austen", "--samples", "2", "--seq-len", "32")
    assert cli("calibrate", str(tiny_model), "-o", str(tmp_path / "s.stats"), *small, *patterns, "-q").code == 0
    assert "lm_head.hessian" in load_file(tmp_path / "s.stats")
    for calib in (("--calib", str(tmp_path / "s.stats")), ("--calib-data", "austen", "--samples", "2",
                                                          "--calib-seq-len", "32")):  # fmt: skip
        out = tmp_path / f"head-{calib[0].strip('-')}.llmq"
        result = cli("quantize", str(tiny_model), "-o", str(out), "--g4", "16", *patterns, *calib, "-q")
        assert result.code == 0, result.stderr
        assert "lm_head" in json.loads((out / "manifest.json").read_text())["linears"]
