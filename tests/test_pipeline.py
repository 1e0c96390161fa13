"""quant/pipeline.py called directly: the plan, the fingerprint, and a run whose manifest is what it wrote."""

from __future__ import annotations

import json

import pytest
import torch

from llmq.errors import ModelSourceError
from llmq.quant import pipeline, plan
from llmq.quant.config import QuantConfig
from llmq.quant.statsfile import CalibStats
from llmq.runtime.format import artifact as A
from llmq.runtime.format.verify import verify_artifact
from llmq.runtime.sources import models

CONFIG = QuantConfig(g4=16)


@pytest.fixture(scope="module")
def opened(tiny_model):
    source = models.resolve_model(str(tiny_model), progress=False)
    return source, models.load_config(source)


def test_units_are_decoder_layers_then_the_rest():
    from llmq.runtime.sources.families import FAMILIES

    llama, gpt2 = (next(f for f in FAMILIES if f.name == name) for name in ("llama", "gpt2"))
    assert plan.unit_of("model.layers.12.mlp.up_proj.weight", llama) == "12"
    assert plan.unit_of("model.embed_tokens.weight", llama) == plan.REST == plan.unit_of("lm_head.weight", llama)
    assert plan.unit_of("transformer.h.3.attn.c_attn.weight", gpt2) == "3"


def test_the_plan_covers_every_parameter_once(opened):
    source, config = opened
    made = plan.make_plan(source, config, CONFIG, None)
    assert len(made.linears) == 14 and made.units == ["0", "1", plan.REST]
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(made.dense)
    assert not {f"{name}.weight" for name in made.linears} & set(made.dense)
    assert all(lay.k4 % 16 == 0 and lay.k4 > 0 for lay in made.linears.values())
    assert all(dtype == torch.float16 for dtype, _ in made.dense.values())  # fp32 source -> 16-bit dense
    weights = sum(lay.out_features * lay.in_features for lay in made.linears.values())
    assert made.accounting().quantized_weights == weights


def test_a_bit_budget_lands_just_under_its_target(opened):
    source, config = opened
    made = plan.make_plan(source, config, QuantConfig(g4=16, target_bits=3.6), None)
    assert 3.5 < made.accounting().bits_per_weight <= 3.6 and made.scores is not None  # coarse steps: a tiny model


def test_patterns_that_match_nothing_are_refused(opened):
    source, config = opened
    with pytest.raises(ModelSourceError, match="no quantizable Linear layers"):
        plan.make_plan(source, config, QuantConfig(include=("*.nothing.*",)), None)


def test_the_fingerprint_follows_settings_and_not_the_working_directory(opened, tmp_path, monkeypatch):
    source, config = opened
    made = plan.make_plan(source, config, CONFIG, None)
    stats = CalibStats({"samples": 4, "aliases": {}}, {})  # collected in this process
    first = pipeline.run_fingerprint(source, CONFIG, made, stats)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inline").write_bytes(b"a file that happens to be called inline")
    assert pipeline.run_fingerprint(source, CONFIG, made, stats) == first
    assert pipeline.run_fingerprint(source, QuantConfig(g4=16, g2=8), made, stats) != first
    assert pipeline.run_fingerprint(source, CONFIG, made, None) != first


def test_a_run_returns_the_manifest_it_wrote(opened, tmp_path):
    source, config = opened
    made = plan.make_plan(source, config, CONFIG, None)
    out = tmp_path / "direct.llmq"
    manifest = pipeline.quantize_model(source, out, CONFIG, made)
    assert manifest.path == out and manifest.to_json() == json.loads((out / "manifest.json").read_text())
    assert A.open_artifact(out) == manifest and verify_artifact(out).ok
    assert manifest.source.spec == str(source.spec) and "config.json" in manifest.source.files
    assert manifest.calibration is None and manifest.quantization == CONFIG.to_json()


def test_copied_files_are_data_and_must_parse(tiny_model, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    (folder / "model.safetensors.index.json").write_text("{}")
    names = [p.name for p in pipeline.hf_files(folder)]
    assert "config.json" in names and "tokenizer.json" in names and "model.safetensors.index.json" not in names
    (folder / "generation_config.json").write_text("{broken")
    with pytest.raises(ModelSourceError, match="generation_config.json is not valid JSON"):
        pipeline.hf_files(folder)
