"""eval kld: zero against itself, ordered by bits, equal to a hand computation, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmq.runtime import loader
from llmq.runtime.eval import logit_cache
from llmq.runtime.eval.kld import kl_divergence, model_log_probs
from llmq.runtime.sources import models, text, tokenize

EVAL = ("--dataset", "austen", "--seq-len", "64", "--max-tokens", "256")


def _load(folder):
    source = models.resolve_model(str(folder))
    config = models.load_config(source)
    return models.load_tokenizer(source), loader.load_model(source, config, torch.device("cpu"), torch.float32)


def test_a_model_against_itself_has_zero_kl(tiny_model):
    tokenizer, model = _load(tiny_model)
    ids = tokenize.tokenize_stream(tokenizer, text.load_text(text.Dataset.austen, None, text.Split.eval).text[:5000])
    result = kl_divergence(model_log_probs(model), model, ids, 64, 64, 256)
    assert result.mean == 0 and result.p999 == 0 and result.top1_agreement == 1.0
    assert result.ppl_base == result.ppl_quant and result.tokens_scored == 4 * 63


def test_kl_matches_a_hand_computation(tiny_model):
    tokenizer, base = _load(tiny_model)
    _, other = _load(tiny_model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    ids = tokenize.tokenize_stream(tokenizer, text.load_text(text.Dataset.austen, None, text.Split.eval).text[:3000])[
        :64
    ]
    result = kl_divergence(model_log_probs(base), other, ids, 64, 64)
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
        assert (
            cli("quantize", str(tiny_model), "-o", str(out), "--no-calib", "--preset", preset, "--g4", "16", "-q").code
            == 0
        )
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


def _kld_json(cli, model, base, *extra):
    result = cli("eval", "kld", str(model), "--base", str(base), *EVAL, "--json", *extra)
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)["result"], result.stderr


@pytest.fixture
def two_bit(cli, tiny_model, tmp_path):
    out = tmp_path / "2bit.llmq"
    assert cli("quantize", str(tiny_model), "-o", str(out), "--no-calib", "--preset", "2bit", "-q").code == 0
    return out


def test_cached_base_log_probs_give_the_same_kl_without_loading_the_base(cli, tiny_model, two_bit, monkeypatch):
    computed, _ = _kld_json(cli, two_bit, tiny_model)
    first, err = _kld_json(cli, two_bit, tiny_model, "--cache-base")
    assert "cached in" in err
    (cached,) = (logit_cache.cache_dir() / "kld-base").glob("*.npy")
    assert cached.stat().st_size > 4 * 63 * 2  # [252, vocab] float16, plus the .npy header
    loads, real_load = [], loader.load_model

    def counting_load(source, *args, **kwargs):
        loads.append(source.spec)
        return real_load(source, *args, **kwargs)

    monkeypatch.setattr(loader, "load_model", counting_load)
    second, err = _kld_json(cli, two_bit, tiny_model, "--cache-base")
    assert "reusing" in err and loads == [str(two_bit)]  # only the quantized model was loaded
    assert second == first  # a hit reads exactly what the recording run used
    # float16 log-probs move the KL by well under a thousandth of a nat
    assert first["kl_mean"] == pytest.approx(computed["kl_mean"], abs=1e-3)
    assert first["ppl_base"] == pytest.approx(computed["ppl_base"], rel=1e-3)


def test_a_changed_protocol_does_not_reuse_the_cache(cli, tiny_model, two_bit):
    _kld_json(cli, two_bit, tiny_model, "--cache-base")
    _, err = _kld_json(cli, two_bit, tiny_model, "--cache-base", "--stride", "32")
    assert "cached in" in err and "reusing" not in err
    assert len(list((logit_cache.cache_dir() / "kld-base").glob("*.npy"))) == 2


def test_a_large_cache_is_warned_about_even_when_quiet(cli, tiny_model, two_bit, monkeypatch):
    monkeypatch.setattr(logit_cache, "LARGE_BYTES", 1000)
    _, err = _kld_json(cli, two_bit, tiny_model, "--cache-base", "-q")
    assert "warning: caching the base log-probs writes" in err


def test_a_full_disk_is_refused_before_running(cli, tiny_model, two_bit, monkeypatch):
    import shutil as shutil_module

    monkeypatch.setattr(shutil_module, "disk_usage", lambda _p: shutil_module._ntuple_diskusage(1, 1, 10))
    result = cli("eval", "kld", str(two_bit), "--base", str(tiny_model), *EVAL, "--cache-base")
    assert result.code == 1 and "free" in result.stderr and "--cache-base" in result.stderr
    assert not list((logit_cache.cache_dir() / "kld-base").glob("*.npy"))


def test_an_interrupted_recording_leaves_no_cache(cli, tiny_model, two_bit, monkeypatch):
    from llmq.runtime.eval import kld

    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(kld, "_log_probs", boom)
    result = cli("eval", "kld", str(two_bit), "--base", str(tiny_model), *EVAL, "--cache-base")
    assert result.code != 0
    assert not list((logit_cache.cache_dir() / "kld-base").glob("*"))  # no partial file, no manifest


def test_a_corrupt_cache_manifest_is_a_clear_error(cli, tiny_model, two_bit):
    _kld_json(cli, two_bit, tiny_model, "--cache-base")
    (manifest,) = (logit_cache.cache_dir() / "kld-base").glob("*.json")
    manifest.write_text("{not json")
    result = cli("eval", "kld", str(two_bit), "--base", str(tiny_model), *EVAL, "--cache-base")
    assert result.code == 1 and "corrupt" in result.stderr and "delete" in result.stderr


def test_a_truncated_cache_file_is_a_clear_error(cli, tiny_model, two_bit):
    _kld_json(cli, two_bit, tiny_model, "--cache-base")
    (cached,) = (logit_cache.cache_dir() / "kld-base").glob("*.npy")
    cached.write_bytes(cached.read_bytes()[:100])
    result = cli("eval", "kld", str(two_bit), "--base", str(tiny_model), *EVAL, "--cache-base")
    assert result.code == 1 and "corrupt" in result.stderr and "delete" in result.stderr
