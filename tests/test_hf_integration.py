"""``transformers.AutoModelForCausalLM.from_pretrained(ARTIFACT)`` once llmq is imported: the same
model as ``llmq.load``, through generate, pipelines and device maps; refused when tampered, and
refused (by transformers itself) when llmq is not there to take it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmq
from llmq.errors import ArtifactError
from llmq.runtime.format import artifact as A
from llmq.runtime.qlinear import QuantLinear

FP32 = llmq.LoadOptions(device="cpu", dtype="fp32", backend="torch")
LOAD = "m = AutoModelForCausalLM.from_pretrained({!r})"


def ids(vocab: int, length: int = 19) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def from_pretrained(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "warning"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_from_pretrained_is_the_model_llmq_load_gives(tiny_artifact):
    model = from_pretrained(tiny_artifact, dtype=torch.float32)
    reference = llmq.load(tiny_artifact, FP32)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == set(A.read_manifest(tiny_artifact).linears)
    assert model.is_quantized and model.config.quantization_config.quant_method == "llmq" and not model.training
    x = ids(model.config.vocab_size)
    torch.testing.assert_close(logits(model, x), logits(reference, x), rtol=0, atol=0)


def test_generate_and_a_text_generation_pipeline(tiny_artifact):
    from transformers import AutoTokenizer, pipeline

    model = from_pretrained(tiny_artifact, dtype=torch.float32)
    reference = llmq.load(tiny_artifact, FP32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_artifact)
    prompt = tokenizer("It is a truth", return_tensors="pt").input_ids
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > prompt.shape[1]
    assert torch.equal(generated, reference.generate(prompt, max_new_tokens=6, do_sample=False))

    writer = pipeline("text-generation", model=str(tiny_artifact), tokenizer=str(tiny_artifact), dtype=torch.float32)
    assert isinstance(writer.model.model.layers[0].self_attn.q_proj, QuantLinear)
    text = writer("It is a truth", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    expected = pipeline("text-generation", model=reference, tokenizer=tokenizer)
    assert text == expected("It is a truth", max_new_tokens=6, do_sample=False)[0]["generated_text"]


@pytest.mark.parametrize(
    ("kwargs", "options"),
    [
        ({"device_map": "cpu", "dtype": torch.float32}, FP32),
        ({"device_map": "auto", "dtype": torch.float32}, FP32),
        ({"dtype": torch.bfloat16}, llmq.LoadOptions(device="cpu", dtype="bf16", backend="torch")),
    ],
    ids=["device_map-cpu", "device_map-auto", "bf16"],
)
def test_device_map_and_dtype(tiny_artifact, kwargs, options):
    model = from_pretrained(tiny_artifact, **kwargs)
    reference = llmq.load(tiny_artifact, options)
    assert model.dtype == kwargs["dtype"] and model.device.type == "cpu"
    x = ids(model.config.vocab_size)
    torch.testing.assert_close(logits(model, x), logits(reference, x), rtol=0, atol=0)


def test_offloading_device_maps_are_refused(tiny_artifact):
    from llmq.errors import DeviceError

    with pytest.raises(DeviceError, match="offloads part of the model to the CPU or disk"):
        from_pretrained(tiny_artifact, device_map={"model": "cpu", "lm_head": "disk"})


@pytest.mark.gpu  # scripts/gpu_check.sh runs the files that carry this mark
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_device_map_cuda(tiny_artifact):
    model = from_pretrained(tiny_artifact, device_map="cuda", dtype=torch.float16)
    reference = llmq.load(tiny_artifact, llmq.LoadOptions(device="cuda", dtype="fp16"))
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "cuda"
    x = ids(model.config.vocab_size).cuda()
    torch.testing.assert_close(logits(model, x), logits(reference, x), rtol=0, atol=0)


def test_without_llmq_transformers_finds_no_weights(tiny_artifact):
    """Plain transformers skips the unknown method with a warning and then finds no weights it
    knows (the index has an llmq-only name): an error, not a model with random Linears."""
    run = python(f"from transformers import AutoModelForCausalLM\n{LOAD.format(str(tiny_artifact))}")
    assert run.returncode != 0
    assert "Unknown quantization type, got llmq" in run.stderr
    assert "OSError: Error no file named model.safetensors" in run.stderr


def test_registration_in_either_import_order_and_import_llmq_stays_light(tiny_artifact):
    load = LOAD.format(str(tiny_artifact)) + "\nprint(type(m.model.layers[0].mlp.up_proj).__name__)"
    first = python(f"import llmq\nfrom transformers import AutoModelForCausalLM\n{load}")
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["QuantLinear"]
    # transformers' quantizer registry already imported (modeling_utils imports it): llmq registers at once
    after = python(f"import transformers.modeling_utils, llmq\nfrom transformers import AutoModelForCausalLM\n{load}")
    assert after.returncode == 0, after.stderr
    assert after.stdout.split() == ["QuantLinear"]
    light = python("import sys, llmq\nprint('torch' in sys.modules, 'transformers' in sys.modules)")
    assert light.stdout.split() == ["False", "False"], light.stderr
    llmq.register_with_transformers()  # explicit, and a second registration in this process is fine
    llmq.register_with_transformers()


def test_a_failed_registration_warns_at_import_and_raises_when_asked(monkeypatch):
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.base import HfQuantizer

    from llmq import hf

    class Other(HfQuantizer):
        def is_serializable(self):
            return False

        @property
        def is_trainable(self):
            return False

    monkeypatch.setitem(AUTO_QUANTIZER_MAPPING, "llmq", Other)
    with pytest.warns(RuntimeWarning, match="could not register .* llmq.load can"):
        hf.install()  # what `import llmq` runs: llmq stays importable
    with pytest.raises(RuntimeError, match="already has .*Other registered as quantization method 'llmq'"):
        llmq.register_with_transformers()


def test_a_tampered_artifact_is_refused(tiny_artifact, tmp_path):
    artifact = Path(shutil.copytree(tiny_artifact, tmp_path / "tampered.llmq"))
    shard = artifact / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="shard-00000.safetensors: checksum mismatch"):
        from_pretrained(artifact)


def test_an_index_that_leaves_out_a_shard_is_refused(tiny_artifact, tmp_path):
    from artifact_fuzz import resign

    artifact = Path(shutil.copytree(tiny_artifact, tmp_path / "index.llmq"))
    index = json.loads((artifact / A.WEIGHTS_INDEX).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != "shard-00001.safetensors"}
    (artifact / A.WEIGHTS_INDEX).write_text(json.dumps(index))
    resign(artifact)  # consistent checksums: only the content is wrong
    with pytest.raises(ArtifactError, match="names other shards than the manifest"):
        from_pretrained(artifact)


def test_quantizing_on_the_fly_and_saving_are_refused(tiny_model, tiny_artifact, tmp_path):
    from llmq.runtime.hf_quantizer import LlmqConfig

    with pytest.raises(ValueError, match="does require the model to be pre-quantized"):
        from_pretrained(tiny_model, quantization_config=LlmqConfig())
    model = from_pretrained(tiny_artifact)
    with pytest.raises(ValueError, match="quantized with llmq and is not serializable"):
        model.save_pretrained(tmp_path / "saved")


def test_an_artifact_from_before_quantization_config_needs_llmq_load(tiny_artifact, tmp_path):
    """Artifacts written before llmq wrote ``quantization_config`` and the index load and verify
    with llmq as before; transformers sees a folder without weights."""
    from artifact_fuzz import resign

    artifact = Path(shutil.copytree(tiny_artifact, tmp_path / "old.llmq"))
    config = json.loads((artifact / "config.json").read_text())
    del config["quantization_config"]
    (artifact / "config.json").write_text(json.dumps(config))
    resign(artifact)
    assert llmq.verify(artifact).ok
    x = ids(config["vocab_size"])
    assert logits(llmq.load(artifact, FP32), x).shape[-1] == config["vocab_size"]
    with pytest.raises(OSError, match="no file named model.safetensors"):
        from_pretrained(artifact)


def test_a_newer_format_version_is_refused(tiny_artifact, tmp_path):
    from artifact_fuzz import resign

    artifact = Path(shutil.copytree(tiny_artifact, tmp_path / "newer.llmq"))
    config = json.loads((artifact / "config.json").read_text())
    config["quantization_config"]["format_version"] = 2
    (artifact / "config.json").write_text(json.dumps(config))
    resign(artifact)
    with pytest.raises(ArtifactError, match="format_version 2; this llmq reads version 1"):
        from_pretrained(artifact)


@pytest.mark.parametrize("label", ["GPT-2", "Mixtral"])
def test_other_families_load_the_same(label, tmp_path):
    """Conv1D weights stored [in, out] (GPT-2) and experts in 3-D tensors, routed per expert (Mixtral)."""
    from family_models import build

    from llmq.runtime.sources.text import Dataset, Split, load_text

    from conftest import _train_tokenizer

    tokenizer = _train_tokenizer([load_text(Dataset.austen, None, Split.calib).text[:50_000]])
    folder = build(label, tmp_path / "model", tokenizer)
    out = tmp_path / "model.llmq"
    llmq.quantize(folder, out, llmq.QuantConfig(g4=16, rounding="minmax"), calib_data=None)
    model = from_pretrained(out, dtype=torch.float32)
    x = ids(model.config.vocab_size)
    torch.testing.assert_close(logits(model, x), logits(llmq.load(out, FP32), x), rtol=0, atol=0)


@pytest.mark.slow
def test_the_demo_model_quantized_loads_the_same_through_transformers(demo_cache, monkeypatch, tmp_path):
    """The real demo model (tied embeddings, 30 layers), its first and last layers quantized
    round-to-nearest in the test (all of them take minutes on a small CPU)."""
    monkeypatch.setenv("LLMQ_CACHE_DIR", str(demo_cache))
    out = tmp_path / "demo.llmq"
    config = llmq.QuantConfig(rounding="minmax", include=("*.layers.0.*", "*.layers.29.*"))
    llmq.quantize("demo", out, config, calib_data=None)
    model = from_pretrained(out, dtype=torch.float32, device_map="cpu")
    reference = llmq.load(out, FP32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    x = ids(model.config.vocab_size, 32)
    torch.testing.assert_close(logits(model, x), logits(reference, x), rtol=0, atol=0)
