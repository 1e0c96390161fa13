"""Perplexity: window plan, exactness against transformers' own loss, and the CLI's JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llmq.errors import NumericsError, TextSourceError
from llmq.runtime.eval import perplexity
from llmq.runtime.loader import load_model
from llmq.runtime.sources import models, tokenize
from llmq.runtime.sources.text import Dataset, Split, load_text


@given(n=st.integers(0, 3000), seq_len=st.integers(2, 300), data=st.data())
def test_window_plan_scores_each_target_once_with_enough_context(n, seq_len, data):
    stride = data.draw(st.integers(1, seq_len))
    windows = perplexity.plan_windows(n, seq_len, stride)
    assert len(windows) == (0 if n < seq_len else (n - seq_len) // stride + 1)
    scored = []
    for w in windows:
        assert w.end - w.begin == seq_len and w.end <= n
        targets = range(w.end - w.scored, w.end)
        scored.extend(targets)
        if w.begin > 0 and stride < seq_len:
            assert min(targets) - w.begin >= seq_len - stride  # every scored token sees this much context
    assert len(scored) == len(set(scored))
    assert all(1 <= t < n for t in scored)
    if windows and stride < seq_len:
        assert scored == list(range(1, windows[-1].end))  # sliding windows leave no gaps


def _load(folder):
    source = models.resolve_model(str(folder))
    config = models.load_config(source)
    return models.load_tokenizer(source), load_model(source, config, torch.device("cpu"), torch.float32)


def _austen_ids(tokenizer, limit):
    return tokenize.tokenize_stream(tokenizer, load_text(Dataset.austen, None, Split.eval).text[:20_000])[:limit]


def test_non_overlapping_ppl_matches_transformers_loss(tiny_model):
    tokenizer, model = _load(tiny_model)
    ids = _austen_ids(tokenizer, 64 * 5 + 17)
    result = perplexity.perplexity(model, ids, seq_len=64, stride=64)
    with torch.inference_mode():
        losses = [float(model(ids[i : i + 64][None], labels=ids[i : i + 64][None]).loss) for i in range(0, 64 * 5, 64)]
    assert result.windows == 5 and result.tokens_scored == 5 * 63 and result.tokens_used == 320
    assert result.ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-6)
    lo, hi = result.ppl_ci95
    assert lo < result.ppl < hi and result.ppl_stderr > 0 and result.ppl_stderr_windows > 0


def test_sliding_windows_score_only_the_stride(tiny_model):
    tokenizer, model = _load(tiny_model)
    ids = _austen_ids(tokenizer, 200)
    result = perplexity.perplexity(model, ids, seq_len=64, stride=16)
    assert result.windows == (200 - 64) // 16 + 1
    assert result.tokens_scored == 63 + (result.windows - 1) * 16
    with torch.inference_mode():
        logits = model(ids[16:80][None]).logits[0]
    last_nll = torch.nn.functional.cross_entropy(logits[-17:-1], ids[64:80], reduction="none")
    # The second window's 16 scored tokens are positions 64..79, each with >= 48 tokens of context.
    first = perplexity.perplexity(model, ids[:80], seq_len=64, stride=16)
    assert first.tokens_scored == 63 + 16
    head = perplexity.perplexity(model, ids[:64], seq_len=64, stride=64)
    expected = (head.mean_nll * 63 + float(last_nll.sum())) / (63 + 16)
    assert first.mean_nll == pytest.approx(expected, rel=1e-6)


def test_uniform_model_has_perplexity_equal_to_vocab_size(tiny_model):
    tokenizer, model = _load(tiny_model)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ids = _austen_ids(tokenizer, 256)
    result = perplexity.perplexity(model, ids, seq_len=128, stride=128)
    assert result.ppl == pytest.approx(model.config.vocab_size, rel=1e-6)  # fp32 log-softmax


def test_max_tokens_limits_the_stream(tiny_model):
    tokenizer, model = _load(tiny_model)
    ids = _austen_ids(tokenizer, 1000)
    result = perplexity.perplexity(model, ids, seq_len=64, stride=64, max_tokens=200)
    assert result.tokens_in_text == 1000 and result.tokens_used == 192 and result.windows == 3


def test_too_short_stream_raises_with_counts(tiny_model):
    tokenizer, model = _load(tiny_model)
    with pytest.raises(TextSourceError, match="has 10 tokens but one window needs 64"):
        perplexity.perplexity(model, _austen_ids(tokenizer, 10), seq_len=64, stride=64)


def test_nan_weights_are_reported_not_returned(tiny_model):
    tokenizer, model = _load(tiny_model)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(NumericsError):
        perplexity.perplexity(model, _austen_ids(tokenizer, 128), seq_len=64, stride=64)


def test_cli_json_is_one_document_with_the_protocol(cli, tiny_model):
    result = cli(
        "eval", "ppl", str(tiny_model), "--dataset", "austen", "--seq-len", "64", "--max-tokens", "256", "--json"
    )
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert doc["command"] == "eval ppl" and doc["text"]["source"] == "austen:persuasion"
    assert doc["protocol"]["seq_len"] == 64 and doc["protocol"]["stride"] == 64 and doc["protocol"]["max_tokens"] == 256
    assert doc["result"]["windows"] == 4 and doc["result"]["tokens_scored"] == 4 * 63
    assert doc["result"]["ppl"] > 1 and doc["result"]["ppl_stderr"] > 0
    assert doc["dtype"] == "fp32" and doc["device"] == "cpu"
    assert doc["model"]["kind"] == "folder"


def test_cli_defaults_seq_len_to_the_model_context(cli, tiny_model):
    result = cli("eval", "ppl", str(tiny_model), "--dataset", "austen", "--max-tokens", "300", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["protocol"]["seq_len"] == 128
    assert "defaults to the model's context of 128" in result.stderr


def test_cli_text_line_goes_to_stdout(cli, tiny_model, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(load_text(Dataset.austen, None, Split.eval).text[:5000])
    result = cli("eval", "ppl", str(tiny_model), "--text-file", str(path), "--seq-len", "128", "--quiet")
    assert result.code == 0, result.stderr
    assert result.stdout.startswith("ppl ") and f"file:{path}" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("stride", [64, 16])
def test_logits_made_a_slice_at_a_time_give_the_same_nll_and_never_a_whole_window(tiny_model, monkeypatch, stride):
    """Over a large vocabulary a window's logits are made a slice of positions at a time (Qwen's
    152k vocabulary: 1.2 GB for one 2,048-token window otherwise)."""
    from llmq.runtime.sources import head

    tokenizer, model = _load(tiny_model)
    ids = _austen_ids(tokenizer, 64 * 3 + 5)
    whole = perplexity.perplexity(model, ids, seq_len=64, stride=stride)
    monkeypatch.setattr(head, "HEAD_CHUNK_ELEMENTS", 10 * model.config.vocab_size)  # 10 positions at a time
    made = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: made.append(out.shape[1]))
    sliced = perplexity.perplexity(model, ids, seq_len=64, stride=stride)
    hook.remove()
    assert max(made) <= 10 and sum(made) > 10
    assert sliced.tokens_scored == whole.tokens_scored  # tiny products may round apart (another BLAS path)
    assert sliced.mean_nll == pytest.approx(whole.mean_nll, rel=1e-6)
