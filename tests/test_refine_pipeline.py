"""``quantize --refine block`` end to end on the tiny model: what it rewrites, what it records, that an
interrupted run resumes to the same bytes, and which option combinations it refuses."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

import llmq
from llmq.errors import UsageError
from llmq.quant.config import RefineSettings

from conftest import interrupt_shard_writes

# minmax groups leave the tiny random model's GPTQ solution something to tune; search leaves it almost none
CALIB = ("--calib-data", "austen", "--samples", "8", "--calib-seq-len", "32", "--rounding", "minmax")
REFINE = ("--refine", "block", "--refine-steps", "4", "--refine-batch", "2")


def _tree(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _quantize(model, out, *extra):
    from conftest import run_cli

    result = run_cli("quantize", str(model), "-o", str(out), "--g4", "16", *CALIB, *extra, "-q")
    assert result.code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def refined(tiny_model, tmp_path_factory):
    return _quantize(tiny_model, tmp_path_factory.mktemp("refined") / "r.llmq", *REFINE)


@pytest.fixture(scope="module")
def gptq(tiny_model, tmp_path_factory):
    return _quantize(tiny_model, tmp_path_factory.mktemp("gptq") / "g.llmq", "--refine", "none")


def test_refinement_rewrites_the_blocks_and_records_its_settings(refined, gptq):
    manifest = llmq.verify(refined)
    assert manifest.ok, manifest.problems
    recorded = json.loads((refined / "manifest.json").read_text())["quantization"]
    assert recorded["refine"] == "block" and recorded["refine_settings"]["steps"] == 4
    assert "refine" not in json.loads((gptq / "manifest.json").read_text())["quantization"]
    layers = [load_file(str(path / "shard-00000.safetensors")) for path in (refined, gptq)]
    changed = [key for key in layers[0] if not layers[0][key].equal(layers[1][key])]
    stored = {"qweight2", "meta2", "scale2", "qweight4", "zero4", "scale4"}
    assert any("norm" in key for key in changed) and any(key.rsplit(".", 1)[1] in stored for key in changed)
    assert all(key.rsplit(".", 1)[1] in stored or "norm" in key for key in changed)
    assert _tree(refined)["shard-00002.safetensors"] == _tree(gptq)["shard-00002.safetensors"]  # outside the blocks


def test_an_interrupted_refinement_resumes_to_the_same_bytes(cli, tiny_model, refined, tmp_path, monkeypatch):
    out = tmp_path / "x.llmq"
    interrupt_shard_writes(monkeypatch, 4)  # the 3 GPTQ shards, then the first refined block
    args = ("quantize", str(tiny_model), "-o", str(out), "--g4", "16", *CALIB, *REFINE)
    result = cli(*args)
    assert result.code == 130 and "interrupted after 3 of 3 units and refining 1 of 2 blocks" in result.stderr
    monkeypatch.undo()
    result = cli(*args, "--resume")
    assert result.code == 0, result.stderr
    assert _tree(out) == _tree(refined)


def test_a_stats_file_refines_on_the_text_it_was_collected_from(tiny_model, refined, tmp_path):
    stats = llmq.calibrate(tiny_model, "austen", samples=8, seq_len=32, out=tmp_path / "s.calib")
    settings = RefineSettings(steps=4, batch=2)
    config = llmq.QuantConfig(g4=16, rounding="minmax", refine="block", refine_settings=settings)
    out = tmp_path / "from-file.llmq"
    llmq.quantize(tiny_model, out, config, calib=stats.path)
    assert all(_tree(out)[name] == data for name, data in _tree(refined).items() if name.startswith("shard-"))


def test_refinement_needs_calibration_and_its_settings_need_refinement(cli, tiny_model, tmp_path):
    result = cli("quantize", str(tiny_model), "-o", str(tmp_path / "a.llmq"), "--no-calib", "--refine", "block")
    assert result.code == 2 and "--refine block tunes the blocks on calibration text" in result.stderr
    result = cli("quantize", str(tiny_model), "-o", str(tmp_path / "a.llmq"), "--no-calib", "--calib-data", "austen")
    assert result.code == 2 and "--no-calib turns calibration off" in result.stderr
    result = cli("quantize", str(tiny_model), "-o", str(tmp_path / "b.llmq"), *CALIB, "--refine", "none",
                 "--refine-steps", "3")  # fmt: skip
    assert result.code == 2 and "--refine-* settings tune --refine block" in result.stderr
    with pytest.raises(UsageError, match="--refine-batch 0 must be at least 1"):
        llmq.QuantConfig(refine_settings=RefineSettings(batch=0)).check()
    with pytest.raises(UsageError, match="--refine-inputs 'mixed' must be one of quantized, fp"):
        RefineSettings(inputs="mixed")
    assert not any(tmp_path.iterdir())


def test_a_plain_quantize_calibrates_on_the_builtin_mix_and_refines(cli, tiny_model, tmp_path):
    out = tmp_path / "default.llmq"
    result = cli("quantize", str(tiny_model), "-o", str(out), "--g4", "16", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["calibration"]["dataset"] == "mix:prose+technical+code" and report["calibration"]["samples"] == 64
    assert report["config"]["refine"] == "block" and report["config"]["refine_settings"] == {
        **RefineSettings().__dict__, "inputs": "quantized"}  # fmt: skip
    assert set(report["stages"]) == {"calibrate", "quantize", "refine"} and report["peak_rss_bytes"] > 0
    rounded = tmp_path / "rtn.llmq"
    report = json.loads(
        cli("quantize", str(tiny_model), "-o", str(rounded), "--g4", "16", "--no-calib", "--json").stdout
    )
    assert "calibration" not in report and "refine" not in report["config"] and set(report["stages"]) == {"quantize"}
