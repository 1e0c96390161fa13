"""Fixed-shape decoding with a preallocated KV cache: the same tokens as transformers' own generate,
on a dense model and on an artifact; the step that a GPU captures as a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from llmq.errors import UsageError
from llmq.runtime.decode.static import StaticDecoder, greedy, sampler
from llmq.runtime.loader import load_model
from llmq.runtime.sources import models


def _load(path):
    source = models.resolve_model(str(path), progress=False)
    return load_model(source, models.load_config(source), torch.device("cpu"), torch.float32)


def _reference(lm, ids, new_tokens):
    with torch.inference_mode():
        out = lm.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("which", ["dense", "artifact"])
def test_greedy_tokens_match_transformers_generate(tiny_model, tiny_artifact, which):
    lm = _load(tiny_model if which == "dense" else tiny_artifact)
    ids = torch.randint(5, 300, (3, 7), generator=torch.Generator().manual_seed(1))
    decoder = StaticDecoder(lm, batch=3, max_len=40)
    got = decoder.generate(ids, 20)
    assert torch.equal(got, _reference(lm, ids, 20))
    assert torch.equal(decoder.generate(ids, 20), got)  # a second run resets the cache in place


def test_cache_positions_advance_and_unused_slots_stay_empty(tiny_model):
    lm = _load(tiny_model)
    decoder = StaticDecoder(lm, batch=1, max_len=16)
    logits = decoder.prefill(torch.tensor([[5, 6, 7, 8]]))
    assert int(decoder.position) == 4 and decoder.length == 4
    for _ in range(3):
        logits = decoder.step(greedy(logits))
    assert int(decoder.position) == 7 and decoder.length == 7
    keys = decoder.cache.layers[0].keys  # [batch, kv_heads, max_len, head_dim], allocated once
    assert keys.shape[2] == 16
    assert keys[:, :, :7].abs().sum() > 0 and keys[:, :, 7:].abs().sum() == 0


def test_the_cache_is_bounded(tiny_model):
    lm = _load(tiny_model)
    decoder = StaticDecoder(lm, batch=1, max_len=8)
    with pytest.raises(UsageError, match="exceed the cache of 8"):
        decoder.generate(torch.tensor([[5, 6, 7]]), 6)
    with pytest.raises(UsageError, match="built for batch 1"):
        decoder.prefill(torch.tensor([[5], [6]]))
    with pytest.raises(UsageError, match="needs the model on a CUDA device"):
        decoder.capture()


def test_sampling_stays_on_the_device_and_is_seeded():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0], [1.0, 1.0, 1.0, 1.0]])
    draw = sampler(1.0, top_k=2, top_p=None, seed=3, device="cpu")
    tokens = torch.cat([draw(logits) for _ in range(50)], dim=1)
    assert set(tokens[0].tolist()) <= {1, 2}  # top-k 2 keeps the two largest
    again = sampler(1.0, top_k=2, top_p=None, seed=3, device="cpu")
    assert torch.equal(torch.cat([again(logits) for _ in range(50)], dim=1), tokens)
    nucleus = sampler(1.0, top_k=None, top_p=0.5, seed=0, device="cpu")
    assert all(int(nucleus(logits)[0]) == 1 for _ in range(20))  # token 1 alone holds over half the mass


@pytest.mark.gpu
def test_a_captured_step_replays_the_same_tokens_on_the_gpu(tiny_artifact):
    from llmq.runtime.backend import Backend

    source = models.resolve_model(str(tiny_artifact), progress=False)
    config = models.load_config(source)
    lm = load_model(source, config, torch.device("cuda"), torch.float16, backend=Backend.cuda)
    ids = torch.randint(5, 300, (2, 6), generator=torch.Generator().manual_seed(2)).cuda()
    eager = StaticDecoder(lm, batch=2, max_len=32).generate(ids, 16)
    decoder = StaticDecoder(lm, batch=2, max_len=32)
    decoder.prefill(ids)
    decoder.capture()
    assert torch.equal(decoder.generate(ids, 16), eager)


@pytest.mark.parametrize("which", ["dense", "artifact"])
def test_generate_static_gives_the_same_text_as_generate(cli, tiny_model, tiny_artifact, which):
    import json

    model = str(tiny_model if which == "dense" else tiny_artifact)
    args = ("generate", model, "-p", "the first thing", "-n", "16", "--json")
    dynamic, static = (json.loads(cli(*args, "--decode", mode).stdout) for mode in ("dynamic", "static"))
    assert static["decode"] == "static" and static["text"] == dynamic["text"]
    assert static["new_tokens"] == dynamic["new_tokens"] and static["stop_reason"] == dynamic["stop_reason"]


def test_generate_static_stops_at_eos_and_samples_reproducibly(tiny_model):
    from llmq.runtime.decode.generate import SamplingOptions, generate_static

    lm = _load(tiny_model)
    tokenizer = models.load_tokenizer(models.resolve_model(str(tiny_model), progress=False))
    ids = torch.tensor([[5, 17, 42, 9]])
    first = int(StaticDecoder(lm, 1, 8).generate(ids, 1)[0, 0])
    lm.generation_config.eos_token_id = first
    stopped = generate_static(lm, tokenizer, ids, SamplingOptions(max_new_tokens=10))
    assert (stopped.new_tokens, stopped.stop_reason) == (1, "eos")
    lm.generation_config.eos_token_id = None
    sampled = [generate_static(lm, tokenizer, ids, SamplingOptions(12, temperature=0.8, seed=4)).text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_generate_graph_needs_a_gpu(cli, tiny_model):
    result = cli("generate", str(tiny_model), "-p", "hi", "--decode", "graph")
    assert result.code == 2 and "--decode graph captures CUDA graphs" in result.stderr


@pytest.mark.gpu
def test_generate_with_a_graph_on_the_gpu_gives_the_same_text(cli, tiny_artifact):
    import json

    args = ("generate", str(tiny_artifact), "-p", "the first thing", "-n", "16", "--device", "cuda")
    args = (*args, "--backend", "cuda", "--json")
    dynamic, graph = (json.loads(cli(*args, "--decode", mode).stdout) for mode in ("dynamic", "graph"))
    assert graph["backend"] == "cuda" and graph["text"] == dynamic["text"]
