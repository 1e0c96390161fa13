"""The real demo model (slow): conversion into the cache, reuse, honest labelling, ppl and generate."""

from __future__ import annotations

import json

import pytest

from llmq.runtime.sources import demo

pytestmark = pytest.mark.slow


@pytest.fixture
def demo_env(demo_cache, monkeypatch):
    monkeypatch.setenv("LLMQ_CACHE_DIR", str(demo_cache))
    return demo_cache


def test_demo_is_converted_once_and_reused(demo_env):
    messages: list[str] = []
    folder = demo.ensure_demo_model(progress=False, log=messages.append)
    assert folder.is_relative_to(demo_env)
    provenance = json.loads((folder / demo.PROVENANCE_FILE).read_text())
    assert "Q4_1" in provenance["label"] and len(provenance["gguf_sha256"]) == 64
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again: list[str] = []
    assert demo.ensure_demo_model(progress=False, log=again.append) == folder
    assert again == [] and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".demo-staging-")]


def test_demo_ppl_on_the_austen_eval_text(cli, demo_env):
    result = cli("eval", "ppl", "demo", "--dataset", "austen", "--seq-len", "512", "--max-tokens", "2048", "--json")
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["model"]["kind"] == "demo" and "dequantized from the Q4_1 GGUF" in doc["model"]["label"]
    assert doc["result"]["windows"] == 4 and doc["result"]["tokens_scored"] == 4 * 511
    # A 135M instruct model on Austen: tens, not single digits and not hundreds.
    assert 10 < doc["result"]["ppl"] < 80


def test_demo_greedy_generation_knows_paris(cli, demo_env):
    result = cli("generate", "demo", "-p", "The capital of France is", "-n", "8")
    assert result.code == 0, result.stderr
    assert "Paris" in result.stdout
    assert "dequantized from the Q4_1 GGUF" in result.stderr
