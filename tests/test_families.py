"""The coverage matrix: every decoder family, dense and MoE, through quantize (round-to-nearest and
calibrated), verify, eval ppl, generate and a logits check (tests/family_models.py has the steps).

Also what the architecture table refuses: no decoder layers to be found, an expert tensor of the
wrong rank, a fused projection whose split is not the config's. Each is exit 1, one line, nothing written.
"""

from __future__ import annotations

import ast
import json
import math
import re
import shutil
from pathlib import Path

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
    # calibration spreads the uniform plan's bits by predicted KL: at most those bits (on these tiny
    # models one step of the budget is a large share of the total, so it can land well under)
    assert row["bpw_gptq"] <= row["bpw_rtn"] < row["bpw_4bit"]
    assert row["linears"] == row["expected_linears"] and math.isfinite(row["ppl_gptq"]) and row["ppl_gptq"] > 1


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
    result = run_cli("quantize", str(folder), "-o", str(tmp_path / "out.llmq"), "--no-calib", "--g4", "16", "-q")
    _refused(result, tmp_path, "model.layers.0.mlp.experts.gate_up_proj", "[96, 80]", "[4, 96, 80]")


def test_a_fused_projection_split_unlike_the_config_is_refused(tmp_path, tokenizer):
    folder = build("Phi-3/4", tmp_path / "phi", tokenizer)
    config = json.loads((folder / "config.json").read_text())
    config["num_key_value_heads"] = 4  # the checkpoint's qkv_proj was split for 2 kv heads
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("quantize", str(folder), "-o", str(tmp_path / "out.llmq"), "--no-calib", "--g4", "16", "-q")
    _refused(result, tmp_path, "model.layers.0.self_attn.qkv_proj.weight", "has shape [160, 80]", "[240, 80]")


def test_an_architecture_without_decoder_layers_is_refused():
    from types import SimpleNamespace

    from llmq.runtime.sources.families import family_of

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ModuleList([torch.nn.Linear(4, 4)] * 3))
    with pytest.raises(ModelSourceError, match="model type 'mystery' is not in llmq's architecture table.*none"):
        family_of(model, SimpleNamespace(model_type="mystery", num_hidden_layers=2))
    found = family_of(model, SimpleNamespace(model_type="mystery", num_hidden_layers=3))
    assert found.layers == "1"  # the generic rule: the one ModuleList of num_hidden_layers modules


def _calibration(folder: Path, samples: int, seq_len: int, config=None, log=lambda m: None):
    from llmq.quant.calibrate import collect, sample_windows
    from llmq.quant.config import QuantConfig
    from llmq.runtime.sources import models, text, tokenize

    source = models.resolve_model(str(folder))
    model_config = models.load_config(source)
    austen = text.load_text(text.Dataset.austen, None, text.Split.calib).text[:50_000]
    ids = tokenize.tokenize_stream(models.load_tokenizer(source), austen)
    windows = sample_windows(ids, samples, seq_len, seed=1)
    return collect(source, model_config, config or QuantConfig(), windows, log=log), windows


@pytest.mark.slow
@pytest.mark.parametrize("label", list(FAMILIES))
def test_streamed_statistics_equal_hooks_on_the_whole_model(label, tmp_path, tokenizer):
    """Layer by layer, with each layer's own masks and rotary tables (Gemma's local and global layers
    differ), calibration sees what the whole model's forward feeds every Linear."""
    import transformers

    folder = build(label, tmp_path / "model", tokenizer)
    calibration, windows = _calibration(folder, 3, 32)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sums: dict[str, list] = {}

    def record(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            entry = sums.setdefault(name, [0, 0])
            entry[0], entry[1] = entry[0] + x.T @ x, entry[1] + x.shape[0]

        return hook

    for name, module in model.named_modules():
        if name in calibration.aliases:  # experts are fused in transformers' model: no module to hook
            module.register_forward_pre_hook(record(name))
    with torch.inference_mode():
        for window in windows:
            model(window[None])
    assert sums and set(sums) <= set(calibration.aliases)
    for name, (xtx, rows) in sums.items():
        got = calibration.stats[calibration.aliases[name]].hessian()
        torch.testing.assert_close(got, (xtx / rows).float(), rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for shared, first in (("self_attn.k_proj", "self_attn.q_proj"), ("mlp.up_proj", "mlp.gate_proj")):
        name = f"model.layers.0.{shared}"
        assert calibration.aliases.get(name, f"model.layers.0.{first}") == f"model.layers.0.{first}"  # one input


def test_starved_experts_share_their_layers_mean_and_say_so(tmp_path, tokenizer):
    folder = build("Mixtral", tmp_path / "mix", tokenizer)
    logged = []
    calibration, _ = _calibration(folder, 4, 64, log=logged.append)  # ~128 routed tokens per expert
    for layer in range(2):
        for param, width in (("gate_up_proj", 80), ("down_proj", 144)):
            names = [f"model.layers.{layer}.mlp.experts.{param}.{e}" for e in range(4)]
            pooled = f"model.layers.{layer}.mlp.experts.{param}.pooled"
            own = [n for n in names if calibration.aliases[n] == n]
            assert all(calibration.aliases[n] in (n, pooled) for n in names)
            assert all(calibration.stats[n].rows >= width for n in own)  # enough tokens: its own Hessian
            if len(own) < len(names):  # the rest share the pooled sums of all the layer's experts
                assert sum(calibration.stats[n].rows for n in own) <= calibration.stats[pooled].rows <= 4 * 64 * 2
    starved = sum(1 for n, c in calibration.aliases.items() if c.endswith(".pooled"))
    assert 0 < starved < 16 and f"{starved} of 16 expert matrices" in logged[0]  # both cases occur


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


def test_a_checkpoint_with_fused_expert_tensors_gives_the_same_artifact(tmp_path, tokenizer):
    """transformers 5 saves experts one tensor each; a checkpoint that keeps the model's fused
    [experts, out, in] tensors is read by slicing one expert at a time, to the same bytes."""
    per_expert = build("Qwen 3 MoE", tmp_path / "per-expert", tokenizer)
    fused = tmp_path / "fused"
    shutil.copytree(per_expert, fused)
    tensors = load_file(per_expert / "model.safetensors")
    for layer in range(2):
        base = f"model.layers.{layer}.mlp.experts"
        parts = {
            p: [tensors.pop(f"{base}.{e}.{p}.weight") for e in range(4)] for p in ("gate_proj", "up_proj", "down_proj")
        }
        tensors[f"{base}.gate_up_proj"] = torch.stack(
            [torch.cat([g, u]) for g, u in zip(parts["gate_proj"], parts["up_proj"], strict=True)]
        )
        tensors[f"{base}.down_proj"] = torch.stack(parts["down_proj"])
    save_file(tensors, str(fused / "model.safetensors"), metadata={"format": "pt"})
    for folder in (per_expert, fused):
        assert (
            run_cli(
                "quantize", str(folder), "-o", str(tmp_path / f"{folder.name}.llmq"), "--no-calib", "--g4", "16", "-q"
            ).code
            == 0
        )
    shards = sorted(p.name for p in (tmp_path / "fused.llmq").glob("shard-*"))
    assert shards and all((tmp_path / "fused.llmq" / s).read_bytes() == (tmp_path / "per-expert.llmq" / s).read_bytes()
                          for s in shards)  # fmt: skip


def test_a_checkpoint_without_the_base_model_prefix_is_read(tmp_path, tokenizer):
    """openai-community/gpt2 stores h.0.attn…, not transformer.h.0.attn…, as transformers also reads."""
    folder = build("GPT-2", tmp_path / "gpt2", tokenizer)
    tensors = load_file(folder / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    out = tmp_path / "out.llmq"
    result = run_cli("quantize", str(folder), "-o", str(out), "--no-calib", "--g4", "16", "--include", "*.layers.*",
                     "--include", "lm_head", "-q")  # fmt: skip
    assert result.code == 0, result.stderr
    linears = json.loads((out / "manifest.json").read_text())["linears"]
    assert len(linears) == 8  # the decoder layers' Conv1Ds; the tied head stays with the embeddings, and says so
    assert "lm_head is tied to the input embeddings and stays 16-bit" in result.stderr


def test_a_model_mixing_dense_and_moe_layers_runs_as_the_reference_decode(tmp_path, tokenizer):
    from family_models import ORDER_ROUNDING, reference_logits

    import llmq

    name, args, note = FAMILIES["Qwen 2 MoE"]
    FAMILIES["Qwen 2 MoE, sparse every 2nd layer"] = (name, {**args, "decoder_sparse_step": 2}, note)
    try:
        folder = build("Qwen 2 MoE, sparse every 2nd layer", tmp_path / "mixed", tokenizer)
    finally:
        del FAMILIES["Qwen 2 MoE, sparse every 2nd layer"]
    out = tmp_path / "mixed.llmq"
    calib = ("--calib-data", "austen", "--samples", "2", "--calib-seq-len", "32")
    assert run_cli("quantize", str(folder), "-o", str(out), "--g4", "16", *calib, "-q").code == 0
    linears = json.loads((out / "manifest.json").read_text())["linears"]
    assert any(".experts." in n for n in linears) and "model.layers.0.mlp.down_proj" in linears
    ids = tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.no_grad():
        difference = (llmq.load(out)(ids).logits - reference_logits(folder, out, ids)).abs().max()
    assert float(difference) <= ORDER_ROUNDING


def test_experts_are_quantized_all_or_none(tmp_path, tokenizer):
    folder = build("Mixtral", tmp_path / "mix", tokenizer)
    result = run_cli(
        "quantize", str(folder), "-o", str(tmp_path / "out.llmq"), "--no-calib", "--exclude", "*.experts.down_proj.*"
    )
    assert result.code == 2 and "select all of an experts module's matrices or none" in result.stderr
    dense = run_cli("quantize", str(folder), "-o", str(tmp_path / "dense-experts.llmq"), "--no-calib",
                    "--exclude", "*.experts.*", "--g4", "16", "-q")  # fmt: skip
    assert dense.code == 0, dense.stderr
    import llmq

    manifest = llmq.inspect(tmp_path / "dense-experts.llmq")
    assert manifest.dense["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 288, 80)
    assert llmq.load(tmp_path / "dense-experts.llmq") is not None


def test_no_decoder_layers_found_is_one_clear_line(tmp_path, cli, monkeypatch):
    """A causal LM transformers knows but whose layers the generic rule cannot find (no ModuleList of
    num_hidden_layers): exit 1, one line naming the model type, nothing written."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

    class NoListConfig(PretrainedConfig):
        model_type = "llmq-test-nolist"

        def __init__(self, hidden_size=8, num_hidden_layers=2, vocab_size=16, **kwargs):
            super().__init__(**kwargs)
            self.hidden_size, self.num_hidden_layers, self.vocab_size = hidden_size, num_hidden_layers, vocab_size

    class NoListModel(PreTrainedModel):
        config_class = NoListConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
            self.blocks = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(config.num_hidden_layers)))
            self.head = torch.nn.Linear(8, config.vocab_size)
            self.post_init()

    AutoConfig.register("llmq-test-nolist", NoListConfig, exist_ok=True)
    AutoModelForCausalLM.register(NoListConfig, NoListModel, exist_ok=True)
    folder = tmp_path / "nolist"
    NoListModel(NoListConfig()).save_pretrained(folder)
    result = cli("quantize", str(folder), "-o", str(tmp_path / "out.llmq"), "--no-calib", "-q")
    _refused(result, tmp_path, "model type 'llmq-test-nolist' is not in llmq's architecture table")
