"""Placing an artifact across devices with accelerate: planned on the meta device, run on the CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llmq.errors import DeviceError, UsageError
from llmq.quant.config import QuantConfig
from llmq.quant.linear import plan_layout
from llmq.runtime.placement import device_of, parse_max_memory, plan_device_map
from llmq.runtime.sources import models


def llama_7b_like(layers: int = 32):
    """A Llama-2-7B-shaped config and a manifest-like view of its quantized Linears (nothing allocated)."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)  # fmt: skip
    shapes = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
              "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
              "mlp.down_proj": (4096, 11008)}  # fmt: skip
    linears = {
        f"model.layers.{i}.{name}": SimpleNamespace(layout=plan_layout(n, k, QuantConfig()), bias=None)
        for i in range(layers)
        for name, (n, k) in shapes.items()
    }
    return config, SimpleNamespace(linears=linears)


def test_max_memory_parsing():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=60GB") == {0: "20GiB", 1: "20GiB", "cpu": "60GB"}
    for bad in ("0:20GiB", "gpu0=1GiB", "0=lots"):
        with pytest.raises(UsageError, match="--max-memory"):
            parse_max_memory(bad)


def test_a_7b_artifact_is_split_over_two_gpus_and_the_cpu_on_the_meta_device():
    """Two 1 GiB GPUs hold whole decoder layers at their packed size, the CPU takes the rest."""
    config, manifest = llama_7b_like()
    device_map = plan_device_map(manifest, config, torch.float16, {0: "1GiB", 1: "1GiB", "cpu": "64GiB"})
    layers = {int(k.split(".")[2]): v for k, v in device_map.items() if k.startswith("model.layers.")}
    assert set(layers.values()) == {0, 1, "cpu"}
    order = [layers[i] for i in sorted(layers)]
    assert order == sorted(order, key=lambda d: (d == "cpu", d if isinstance(d, int) else 99))  # filled in order
    per_layer = sum(e.layout.stored_bits() // 8 for n, e in manifest.linears.items() if n.startswith("model.layers.0."))
    assert 60e6 < per_layer < 80e6  # ~2.83 bits per weight: a 7B decoder layer packs into ~70 MB, not 400
    assert sum(1 for d in order if d == 0) * per_layer <= 2**30


def test_a_plan_that_would_need_the_disk_is_refused():
    config, manifest = llama_7b_like(layers=4)
    with pytest.raises(DeviceError, match="would go to disk"):
        plan_device_map(manifest, config, torch.float16, {"cpu": "100MB"})


def test_device_lookup_takes_the_longest_prefix():
    device_map = {"model.layers.0": 0, "model.layers.1": "cpu", "": "cpu"}
    assert device_of(device_map, "model.layers.0.mlp.up_proj") == torch.device("cuda:0")
    assert device_of(device_map, "model.layers.10.mlp.up_proj") == torch.device("cpu")
    assert device_of({"model.layers.0": 0}, "model.layers.0") == torch.device("cuda:0")
    with pytest.raises(DeviceError, match="does not place"):
        device_of({"model.layers.0": 0}, "lm_head")


def test_a_planned_artifact_runs_on_the_cpu_like_a_plain_load(tiny_model, tmp_path):
    from conftest import run_cli

    out = tmp_path / "tiny.llmq"
    assert run_cli("quantize", str(tiny_model), "-o", str(out), "--no-calib", "--g4", "16", "-q").code == 0
    source = models.resolve_model(str(out), progress=False)
    config = models.load_config(source)
    from llmq.runtime.format import artifact as A
    from llmq.runtime.loader import load_quantized_model

    manifest = A.read_manifest(out)
    device_map = plan_device_map(manifest, config, torch.float32, {"cpu": "1GiB"})
    placed = load_quantized_model(manifest, config, torch.device("cpu"), torch.float32, device_map=device_map)
    plain = load_quantized_model(manifest, config, torch.device("cpu"), torch.float32)
    ids = torch.tensor([[5, 9, 13, 21]])
    with torch.inference_mode():
        assert torch.equal(placed(ids).logits, plain(ids).logits)


@pytest.mark.parametrize("which", ["artifact", "folder"])
def test_cli_device_map_gives_the_same_text(cli, tiny_artifact, tiny_model, which):
    import json

    model = str(tiny_artifact if which == "artifact" else tiny_model)
    args = ("generate", model, "-p", "hello there", "-n", "8", "--json")
    plain = json.loads(cli(*args).stdout)["text"]
    placed = cli(*args, "--device-map", "auto", "--max-memory", "cpu=2GiB")
    assert placed.code == 0, placed.stderr
    assert json.loads(placed.stdout)["text"] == plain


@pytest.mark.parametrize(
    "extra,code,message",
    [
        (("--max-memory", "cpu=1GiB"), 2, "add --device-map auto"),
        (("--device-map", "balanced"), 2, "the one value is auto"),
        (("--device-map", "auto", "--device", "cpu"), 2, "not both"),
        (("--device-map", "auto", "--max-memory", "cpu=10KB"), 1, "would go to disk"),
    ],
)
def test_cli_device_map_errors(cli, tiny_artifact, extra, code, message):
    result = cli("eval", "ppl", str(tiny_artifact), "--dataset", "austen", "--max-tokens", "64", "--seq-len", "32",
                 *extra)  # fmt: skip
    assert result.code == code and message in result.stderr
