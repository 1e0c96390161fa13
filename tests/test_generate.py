"""Generation: greedy determinism, EOS, sampling options, chat template, streaming, CLI JSON."""

from __future__ import annotations

import json

import pytest
import torch

from llmq.errors import LlmqError, UsageError
from llmq.runtime.decode.generate import SamplingOptions, generate
from llmq.runtime.loader import load_model
from llmq.runtime.sources import models
from llmq.runtime.sources.tokenize import encode_prompt


def _load(folder):
    source = models.resolve_model(str(folder))
    config = models.load_config(source)
    return models.load_tokenizer(source), load_model(source, config, torch.device("cpu"), torch.float32)


def test_greedy_is_deterministic_and_respects_max_new_tokens(tiny_model):
    tokenizer, model = _load(tiny_model)
    model.generation_config.eos_token_id = None  # a random model could hit EOS early
    ids = encode_prompt(tokenizer, "It was a truth", chat=False)
    pieces: list[str] = []
    first = generate(model, tokenizer, ids, SamplingOptions(max_new_tokens=12), on_text=pieces.append)
    second = generate(model, tokenizer, ids, SamplingOptions(max_new_tokens=12))
    assert first.new_tokens == 12 and first.stop_reason == "max_new_tokens"
    assert first.text == second.text and "".join(pieces) == first.text
    assert first.prefill_seconds > 0 and first.decode_tokens_per_s > 0


def test_stops_at_eos(tiny_model):
    tokenizer, model = _load(tiny_model)
    ids = encode_prompt(tokenizer, "It was a truth", chat=False)
    with torch.inference_mode():
        first_token = int(model(ids).logits[0, -1].argmax())
    model.generation_config.eos_token_id = first_token
    result = generate(model, tokenizer, ids, SamplingOptions(max_new_tokens=20))
    assert result.new_tokens == 1 and result.stop_reason == "eos"


def test_sampling_is_reproducible_with_a_seed(tiny_model):
    tokenizer, model = _load(tiny_model)
    model.generation_config.eos_token_id = None
    ids = encode_prompt(tokenizer, "She said", chat=False)
    opts = SamplingOptions(max_new_tokens=16, temperature=1.0, top_k=50, seed=7)
    assert generate(model, tokenizer, ids, opts).text == generate(model, tokenizer, ids, opts).text


@pytest.mark.parametrize(
    "options, fragment",
    [
        (SamplingOptions(max_new_tokens=0), "--max-new-tokens"),
        (SamplingOptions(temperature=-1), "--temperature"),
        (SamplingOptions(top_k=5), "only apply when sampling"),
        (SamplingOptions(temperature=1, top_p=0), "--top-p"),
    ],
)
def test_bad_sampling_options(options, fragment):
    with pytest.raises(UsageError, match=fragment):
        options.check()


def test_chat_uses_the_template(tiny_chat_model, tiny_model):
    tokenizer, _ = _load(tiny_chat_model)
    ids = encode_prompt(tokenizer, "Hello there", chat=True, system="Be brief")
    text = tokenizer.decode(ids[0])
    assert text.startswith("<s>system: Be brief</s><s>user: Hello there</s>") and text.endswith("<s>assistant: ")
    plain_tokenizer, _ = _load(tiny_model)
    with pytest.raises(LlmqError, match="no chat template"):
        encode_prompt(plain_tokenizer, "Hello", chat=True)


def test_cli_streams_text_to_stdout_and_stats_to_stderr(cli, tiny_model):
    result = cli("generate", str(tiny_model), "-p", "It was", "-n", "5")
    assert result.code == 0, result.stderr
    assert result.stdout.endswith("\n") and "new tokens, stop:" in result.stderr and "tok/s" not in result.stdout


def test_cli_json(cli, tiny_chat_model):
    result = cli(
        "generate",
        str(tiny_chat_model),
        "-p",
        "Hi",
        "--chat",
        "-n",
        "6",
        "--temperature",
        "0.8",
        "--seed",
        "3",
        "--json",
    )
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["command"] == "generate" and doc["chat"] is True and doc["sampling"]["greedy"] is False
    assert 1 <= doc["new_tokens"] <= 6 and doc["stop_reason"] in ("eos", "max_new_tokens")
    assert doc["timing"]["prefill_seconds"] > 0


def test_prompt_plus_new_tokens_over_context_is_a_usage_error(cli, tiny_model):
    result = cli("generate", str(tiny_model), "-p", "word " * 60, "-n", "100")
    assert result.code == 2 and "exceeds the model's context of 128" in result.stderr
