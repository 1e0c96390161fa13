"""quantize -> artifact -> inspect / eval / generate on a tiny model, and every way an artifact can be bad."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmq.errors import ArtifactError
from llmq.runtime.format import artifact as A
from llmq.runtime.format import layout as L
from llmq.runtime.format.manifest import FORMAT_VERSION

MIXED = ("--g1", "16", "--g4", "16", "--stripe-fraction", "0.25")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_model) -> Path:
    from conftest import run_cli

    out = tmp_path_factory.mktemp("art") / "tiny.llmq"
    result = run_cli("quantize", str(tiny_model), "-o", str(out), "--no-calib", *MIXED, "--json")
    assert result.code == 0, result.stderr
    return out


@pytest.fixture
def copy(quantized, tmp_path) -> Path:
    target = tmp_path / "copy.llmq"
    shutil.copytree(quantized, target)
    return target


def test_artifact_layout_on_disk(quantized):
    names = {p.name for p in quantized.iterdir()}
    assert {"manifest.json", "config.json", "tokenizer.json", "shard-00000.safetensors"} <= names
    assert not any(n.endswith((".bin", ".pt", ".py", ".pkl")) for n in names)
    manifest = json.loads((quantized / "manifest.json").read_text())
    assert manifest["format"] == "llmq" and manifest["format_version"] == FORMAT_VERSION
    assert manifest["source"]["files"]["model.safetensors"]["sha256"]
    assert len(manifest["linears"]) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(e["layout"]["k4"] > 0 for e in manifest["linears"].values())
    assert "lm_head.weight" in manifest["dense"] and "model.embed_tokens.weight" in manifest["dense"]
    assert set(manifest["files"]) == names - {"manifest.json"}


def test_dry_run_and_inspect_agree(cli, quantized, tiny_model, tmp_path):
    dry = cli("quantize", str(tiny_model), "-o", str(tmp_path / "never"), "--no-calib", *MIXED, "--dry-run", "--json")
    assert dry.code == 0, dry.stderr and not (tmp_path / "never").exists()
    inspected = cli("inspect", str(quantized), "--json")
    assert inspected.code == 0, inspected.stderr
    assert json.loads(dry.stdout)["accounting"] == json.loads(inspected.stdout)["accounting"]
    assert json.loads(inspected.stdout)["verified"] is True
    text = cli("inspect", str(quantized))
    assert "bits/weight" in text.stdout and "model.layers.1.mlp.down_proj" in text.stdout


def test_bits_per_weight_equals_the_bytes_on_disk(quantized):
    manifest = A.open_artifact(quantized)
    tensors = A.load_tensors(manifest)
    for name, entry in manifest.linears.items():
        stored = sum(
            tensors[f"{name}.{s}"].numel() * tensors[f"{name}.{s}"].element_size() for s in entry.layout.tensor_specs()
        )
        assert stored * 8 == entry.layout.stored_bits()


def test_runtime_decodes_exactly(quantized):
    from llmq.runtime.loader import load_model
    from llmq.runtime.qlinear import QuantLinear
    from llmq.runtime.sources import models

    source = models.resolve_model(str(quantized))
    model = load_model(source, models.load_config(source), torch.device("cpu"), torch.float32)
    manifest = A.open_artifact(quantized)
    tensors = A.load_tensors(manifest)
    for name, entry in manifest.linears.items():
        module = model.get_submodule(name)
        assert isinstance(module, QuantLinear)
        expected = L.dequantize({s: tensors[f"{name}.{s}"] for s in entry.layout.tensor_specs()}, entry.layout)
        assert torch.equal(module.weight, expected)
    assert torch.equal(model.model.embed_tokens.weight, tensors["model.embed_tokens.weight"].float())


def test_eval_and_generate_run_from_the_artifact_alone(cli, tiny_model, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(tiny_model, source)
    out = tmp_path / "self-contained.llmq"
    assert cli("quantize", str(source), "-o", str(out), "--no-calib", *MIXED, "-q").code == 0
    shutil.rmtree(source)  # the artifact must not need its source
    ppl = cli("eval", "ppl", str(out), "--dataset", "austen", "--seq-len", "64", "--max-tokens", "256", "--json")
    assert ppl.code == 0, ppl.stderr
    doc = json.loads(ppl.stdout)
    assert doc["model"]["kind"] == "artifact" and doc["result"]["windows"] == 4
    gen = cli("generate", str(out), "-p", "It was", "-n", "4", "--json")
    assert gen.code == 0, gen.stderr


def test_more_bits_give_lower_perplexity_than_fewer(cli, tiny_model, tmp_path):
    """A sanity check that can fail: 4-bit must track the fp32 model more closely than 2-bit."""
    results = {}
    for preset in ("2bit", "4bit"):
        out = tmp_path / f"{preset}.llmq"
        assert (
            cli("quantize", str(tiny_model), "-o", str(out), "--no-calib", "--preset", preset, "--g4", "16", "-q").code
            == 0
        )
        doc = json.loads(
            cli(
                "eval", "ppl", str(out), "--dataset", "austen", "--seq-len", "128", "--max-tokens", "1024", "--json"
            ).stdout
        )
        results[preset] = doc["result"]["mean_nll"]
    base = json.loads(
        cli(
            "eval", "ppl", str(tiny_model), "--dataset", "austen", "--seq-len", "128", "--max-tokens", "1024", "--json"
        ).stdout
    )
    fp32 = base["result"]["mean_nll"]
    assert abs(results["4bit"] - fp32) < abs(results["2bit"] - fp32)


def test_odd_shapes_quantize_and_run(cli, tmp_path):
    """Widths that divide by neither g1 nor g4 (40, 20, 100) are padded, counted and still decode exactly."""
    from conftest import build_tiny_model

    folder = build_tiny_model(tmp_path / "odd", hidden=40, intermediate=100, heads=2)
    out = tmp_path / "odd.llmq"
    options = ("--g1", "16", "--g4", "8", "--stripe-fraction", "0.25", "--json")
    result = cli("quantize", str(folder), "-o", str(out), "--no-calib", *options)
    assert result.code == 0, result.stderr
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)["accounting"]["layers"]}
    down = layers["model.layers.0.mlp.down_proj"]
    assert down["shape"] == [40, 100] and down["k4"] == 24  # round(0.25 * 100 / 8) = 3 groups of 8
    manifest = A.open_artifact(out)
    assert manifest.linears["model.layers.0.mlp.down_proj"].layout.k2_padded == 80  # 76 real + 4 padding
    ppl = cli("eval", "ppl", str(out), "--dataset", "austen", "--seq-len", "64", "--max-tokens", "128", "--json")
    assert ppl.code == 0, ppl.stderr
    assert cli("generate", str(out), "-p", "It was", "-n", "3", "-q").code == 0


# --- bad input: a clear error, exit 1 (2 for usage), nothing written -------------------------------


def test_existing_output_needs_force(cli, quantized, tiny_model):
    before = {p.name: p.stat().st_mtime_ns for p in quantized.iterdir()}
    result = cli("quantize", str(tiny_model), "-o", str(quantized), "--no-calib")
    assert result.code == 1 and "already exists" in result.stderr and "--force" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in quantized.iterdir()} == before


def test_force_replaces_an_artifact_but_never_a_foreign_folder(cli, tiny_model, tmp_path, copy):
    assert cli("quantize", str(tiny_model), "-o", str(copy), "--no-calib", "--force", "-q", *MIXED).code == 0
    A.open_artifact(copy)
    foreign = tmp_path / "my-data"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    result = cli("quantize", str(tiny_model), "-o", str(foreign), "--no-calib", "--force")
    assert result.code == 1 and "not an llmq artifact" in result.stderr
    assert (foreign / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--preset", "3bit"], "unknown preset '3bit'"),
        (["--g1", "20"], "--g1 20"),
        (["--g4", "12"], "--g4 12"),
        (["--stripe-fraction", "1.5"], "--stripe-fraction 1.5"),
        (["--outliers", "0.5"], "--outliers 0.5"),
        (["--scale-bits", "7"], "--scale-bits 7"),
        (["--dense-dtype", "int8"], "--dense-dtype 'int8'"),
    ],
)
def test_invalid_config_is_a_usage_error(cli, tiny_model, tmp_path, args, fragment):
    result = cli("quantize", str(tiny_model), "-o", str(tmp_path / "x.llmq"), "--no-calib", *args)
    assert result.code == 2 and fragment in result.stderr and result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_model_without_quantizable_linears(cli, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(folder)
    result = cli("quantize", str(folder), "-o", str(tmp_path / "g.llmq"), "--no-calib", "--include", "transformer.wte*")
    assert result.code == 1 and "no quantizable Linear layers" in result.stderr  # an embedding is no matrix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_nan_weight_names_the_tensor_and_writes_nothing(cli, tiny_model, tmp_path):
    source = tmp_path / "nan"
    shutil.copytree(tiny_model, source)
    weights = load_file(source / "model.safetensors")
    weights["model.layers.1.self_attn.k_proj.weight"][0, 0] = float("inf")
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    result = cli("quantize", str(source), "-o", str(tmp_path / "nan.llmq"), "--no-calib")
    assert result.code == 1 and "model.layers.1.self_attn.k_proj.weight" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]  # no artifact, no staging folder


def _rehash(path: Path) -> None:
    """Make the checksums agree again, so a test reaches the checks behind them."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["files"]:
        file = path / name
        manifest["files"][name] = {"sha256": A.sha256_file(file), "bytes": file.stat().st_size}
    (path / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _expect_artifact_error(cli, path: Path, fragment: str) -> None:
    with pytest.raises(ArtifactError, match=fragment):
        A.load_tensors(A.open_artifact(path))
    result = cli("eval", "ppl", str(path), "--dataset", "austen", "--seq-len", "64")
    assert result.code == 1 and "Traceback" not in result.stderr and result.stdout == ""


def test_missing_file(cli, copy):
    (copy / "shard-00001.safetensors").unlink()
    _expect_artifact_error(cli, copy, "missing")


def test_missing_manifest(cli, copy):
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError):
        A.open_artifact(copy)


def test_truncated_shard(cli, copy):
    shard = copy / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    _expect_artifact_error(cli, copy, "truncated")


def test_flipped_byte_fails_the_checksum(cli, copy):
    shard = copy / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    _expect_artifact_error(cli, copy, "checksum mismatch")


def test_unknown_format_version(cli, copy):
    _edit_manifest(copy, lambda m: m.update(format_version=99))
    _expect_artifact_error(cli, copy, "unknown format_version 99")


def test_manifest_disagreeing_with_tensors(cli, copy):
    def shrink(m):
        m["linears"]["model.layers.0.mlp.up_proj"]["layout"]["out_features"] = 64

    _edit_manifest(copy, shrink)
    _expect_artifact_error(cli, copy, "the manifest says")


def test_invalid_layout_in_manifest(cli, copy):
    _edit_manifest(copy, lambda m: m["linears"]["model.layers.0.mlp.up_proj"]["layout"].update(g1=24))
    _expect_artifact_error(cli, copy, "g1=24")


def test_shard_header_with_offsets_out_of_range(cli, copy):
    shard = copy / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 10_000_000
    encoded = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    assert len(encoded) == header_len
    shard.write_bytes(bytes(data[:8]) + encoded + bytes(data[8 + header_len :]))
    _rehash(copy)
    _expect_artifact_error(cli, copy, "unreadable safetensors")


def test_values_out_of_range_behind_valid_checksums(cli, copy):
    shard = copy / "shard-00000.safetensors"
    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith(".perm"))
    tensors[name][0] = tensors[name][1]  # no longer a permutation
    save_file(tensors, str(shard), metadata={"format": "llmq"})
    _rehash(copy)
    _expect_artifact_error(cli, copy, "not a permutation")


def test_unlisted_file_names_are_refused(copy):
    _edit_manifest(copy, lambda m: m["files"].update({"../escape": {"sha256": "0", "bytes": 1}}))
    with pytest.raises(ArtifactError, match="plain name"):
        A.open_artifact(copy)


def test_symlink_out_of_the_artifact_is_refused(copy, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.move(copy / "shard-00000.safetensors", outside)
    (copy / "shard-00000.safetensors").symlink_to(outside)
    with pytest.raises(ArtifactError, match="outside the artifact"):
        A.open_artifact(copy)


def test_not_json_manifest(copy):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        A.open_artifact(copy)


def test_a_concurrent_writer_that_finishes_first_wins(tiny_model, tmp_path):
    from llmq.errors import OutputExistsError
    from llmq.quant.writer import ArtifactWriter
    from llmq.runtime.format.manifest import DenseEntry, Manifest

    out = tmp_path / "race.llmq"
    slow = ArtifactWriter(out, force=False)
    slow.write_shard(0, {"x": torch.zeros(2)})
    fast = ArtifactWriter(out, force=False)
    fast.write_shard(0, {"x": torch.ones(2)})
    manifest = Manifest(linears={}, dense={"x": DenseEntry("shard-00000.safetensors", torch.float32, (2,))}, files={})
    fast.commit(manifest)
    with pytest.raises(OutputExistsError, match="already exists"):
        slow.commit(manifest)
    slow.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["race.llmq"]
    assert A.open_artifact(out).files["shard-00000.safetensors"].bytes > 0


def test_dense_overflow_in_fp16_is_an_error_not_an_inf(cli, tiny_model, tmp_path):
    source = tmp_path / "big"
    shutil.copytree(tiny_model, source)
    weights = load_file(source / "model.safetensors")
    weights["model.norm.weight"][0] = 1e6  # fine in fp32, inf in fp16
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    result = cli("quantize", str(source), "-o", str(tmp_path / "big.llmq"), "--no-calib")
    assert result.code == 1 and "model.norm.weight overflows torch.float16" in result.stderr
    assert (
        cli("quantize", str(source), "-o", str(tmp_path / "big.llmq"), "--no-calib", "--dense-dtype", "fp32", "-q").code
        == 0
    )


@pytest.mark.parametrize("section,key", [("linears", "shard"), ("dense", "shard"), ("dense", "dtype")])
def test_a_list_where_a_name_belongs_is_an_artifact_error(copy, section, key):
    """Found by the fuzzer: unhashable JSON values once reached a dict lookup (a TypeError)."""
    _edit_manifest(copy, lambda m: next(iter(m[section].values())).update({key: ["shard-00000.safetensors"]}))
    with pytest.raises(ArtifactError, match="unknown shard|dtype"):
        A.open_artifact(copy)


def test_a_nan_in_a_16_bit_dense_tensor_is_an_error(cli, tiny_model, tmp_path):
    source = tmp_path / "nan"
    shutil.copytree(tiny_model, source)
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(source / "model.safetensors").items()}
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    result = cli("quantize", str(source), "-o", str(tmp_path / "nan.llmq"), "--no-calib")
    assert result.code == 1 and "model.norm.weight holds NaN/Inf" in result.stderr, result.stderr
