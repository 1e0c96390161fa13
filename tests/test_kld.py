"""eval kld: zero against itself, ordered by bits, equal to a hand computation, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmq.runtime import models, perplexity, text
from llmq.runtime.kld import kl_divergence

EVAL = ("--dataset", "austen", "--seq-len", "64", "--max-tokens", "256")


def _load(folder):
    source = models.resolve_model(str(folder))
    config = models.load_config(source)
    return models.load_tokenizer(source), models.load_model(source, config, torch.device("cpu"), torch.float32)


def test_a_model_against_itself_has_zero_kl(tiny_model):
    tokenizer, model = _load(tiny_model)
    ids = perplexity.tokenize_stream(tokenizer, text.load_text(text.Dataset.austen, None, text.Split.eval).text[:5000])
    result = kl_divergence(model, model, ids, 64, 64, 256)
    assert result.mean == 0 and result.p999 == 0 and result.top1_agreement == 1.0
    assert result.ppl_base == result.ppl_quant and result.tokens_scored == 4 * 63


def test_kl_matches_a_hand_computation(tiny_model):
    tokenizer, base = _load(tiny_model)
    _, other = _load(tiny_model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    ids = perplexity.tokenize_stream(tokenizer, text.load_text(text.Dataset.austen, None, text.Split.eval).text[:3000])[
        :64
    ]
    result = kl_divergence(base, other, ids, 64, 64)
    with torch.inference_mode():
        p = torch.log_softmax(base(ids[None]).logits[0, :-1].double(), -1)
        q = torch.log_softmax(other(ids[None]).logits[0, :-1].double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert result.mean == pytest.approx(float(kl.mean()), rel=1e-4)
    assert result.median == pytest.approx(float(kl.median()), rel=1e-3)


def test_more_bits_give_lower_kl(cli, tiny_model, tmp_path):
    means = {}
    for preset in ("2bit", "4bit"):
        out = tmp_path / f"{preset}.llmq"
        assert cli("quantize", str(tiny_model), "-o", str(out), "--preset", preset, "--g4", "16", "-q").code == 0
        result = cli("eval", "kld", str(out), "--base", str(tiny_model), *EVAL, "--json")
        assert result.code == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["result"]["tokens_scored"] == 4 * 63 and doc["base"]["kind"] == "folder"
        assert 0 <= doc["result"]["kl_median"] <= doc["result"]["kl_p99"] <= doc["result"]["kl_p999"]
        means[preset] = doc["result"]["kl_mean"]
    assert 0 < means["4bit"] < means["2bit"]


def test_different_tokenizers_are_refused(cli, tiny_model, tmp_path):
    from conftest import _train_tokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    _train_tokenizer(["a completely different little corpus " * 50], vocab_size=300).save_pretrained(other)
    result = cli("eval", "kld", str(other), "--base", str(tiny_model), *EVAL)
    assert result.code == 1 and "tokenize the text differently" in result.stderr
