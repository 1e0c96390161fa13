"""``quantize --refine block`` end to end on the tiny model: what it rewrites, what it records, that an
interrupted run resumes to the same bytes, and which option combinations it refuses."""

from __future__ import annotations

import json
import re

import pytest
from safetensors.torch import load_file

import llmq
from llmq.errors import UsageError
from llmq.quant.config import RefineSettings

from conftest import interrupt_shard_writes

# minmax groups leave the tiny random model's GPTQ solution something to tune; search leaves it almost none
CALIB = ("--calib-data", "austen", "--samples", "8", "--calib-seq-len", "32", "--rounding", "minmax")
REFINE = ("--refine", "block", "--refine-steps", "4", "--refine-batch", "2")
E2E = ("--refine", "e2e", "--refine-steps", "4", "--refine-batch", "2", "--e2e-steps", "4", "--e2e-lr", "0.01")
STORED = {"qweight2", "meta2", "scale2", "qweight4", "zero4", "scale4"}


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
def tuned(tiny_model, tmp_path_factory):
    return _quantize(tiny_model, tmp_path_factory.mktemp("e2e") / "e.llmq", *E2E)


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
    assert any("norm" in key for key in changed) and any(key.rsplit(".", 1)[1] in STORED for key in changed)
    assert all(key.rsplit(".", 1)[1] in STORED or "norm" in key for key in changed)
    assert _tree(refined)["shard-00002.safetensors"] == _tree(gptq)["shard-00002.safetensors"]  # outside the blocks


def _stop_then_resume(cli, model, out, monkeypatch, writes: int, options: tuple[str, ...]):
    """A run stopped after ``writes`` shard writes, then resumed; returns both runs' results."""
    interrupt_shard_writes(monkeypatch, writes)
    args = ("quantize", str(model), "-o", str(out), "--g4", "16", *CALIB, *options)
    stopped = cli(*args)
    monkeypatch.undo()
    resumed = cli(*args, "--resume")
    assert stopped.code == 130 and resumed.code == 0, resumed.stderr
    return stopped, resumed


def test_an_interrupted_refinement_resumes_to_the_same_bytes(cli, tiny_model, refined, tmp_path, monkeypatch):
    out = tmp_path / "x.llmq"
    stopped, _ = _stop_then_resume(cli, tiny_model, out, monkeypatch, 4, REFINE)  # 3 GPTQ shards, 1 block
    assert "interrupted after 3 of 3 units and refining 1 of 2 blocks" in stopped.stderr
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
    result = cli("quantize", str(tiny_model), "-o", str(tmp_path / "b.llmq"), *CALIB, "--e2e-steps", "3")
    assert result.code == 2 and "--e2e-* settings tune --refine e2e" in result.stderr
    result = cli("quantize", str(tiny_model), "-o", str(tmp_path / "c.llmq"), "--no-calib", "--refine", "e2e")
    assert result.code == 2 and "--refine e2e tunes the blocks on calibration text" in result.stderr
    with pytest.raises(UsageError, match="--refine-batch 0 must be at least 1"):
        llmq.QuantConfig(refine_settings=RefineSettings(batch=0)).check()
    with pytest.raises(UsageError, match="--refine-inputs 'mixed' must be one of quantized, fp"):
        RefineSettings(inputs="mixed")
    with pytest.raises(UsageError, match="--refine-codes 'nearest' must be one of gptq, lean"):
        RefineSettings(codes="nearest")
    with pytest.raises(UsageError, match="--refine-codes lean moves the codes .* give --refine-lr above 0"):
        llmq.QuantConfig(refine_settings=RefineSettings(codes="lean", lr=0.0)).check()
    assert not any(tmp_path.iterdir())


def test_a_plain_quantize_calibrates_on_the_builtin_mix_and_refines(cli, tiny_model, tmp_path):
    out = tmp_path / "default.llmq"
    result = cli("quantize", str(tiny_model), "-o", str(out), "--g4", "16", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["calibration"]["dataset"] == "mix:prose-two-thirds+technical+code"
    assert report["calibration"]["samples"] == 64
    assert report["config"]["refine"] == "block"
    assert report["config"]["refine_settings"] == {"steps": 50, "batch": 4, "codes": "lean", "lr": 0.02,
                                                   "scale_lr": 0.01, "inputs": "quantized"}  # fmt: skip
    assert (
        set(report["stages"]) == {"calibrate", "fisher", "plan", "quantize", "refine"} and report["peak_rss_bytes"] > 0
    )
    kept = r"refine: \d of 2 blocks kept their tuned numbers \(\d with codes from the leaning start\); held-aside error"
    assert re.search(kept + r" \S+ -> \S+", result.stderr)
    rounded = tmp_path / "rtn.llmq"
    report = json.loads(
        cli("quantize", str(tiny_model), "-o", str(rounded), "--g4", "16", "--no-calib", "--json").stdout
    )
    assert (
        "calibration" not in report
        and "refine" not in report["config"]
        and set(report["stages"]) == {"plan", "quantize"}
    )


def test_lean_codes_start_from_the_fp32_weights_and_say_how_many_blocks_kept_them(cli, tiny_model, tmp_path):
    lean, gptq = tmp_path / "lean.llmq", tmp_path / "gptq.llmq"
    result = cli("quantize", str(tiny_model), "-o", str(lean), "--g4", "16", *CALIB, *REFINE)
    assert result.code == 0, result.stderr
    assert llmq.verify(lean).ok
    settings = json.loads((lean / "manifest.json").read_text())["quantization"]["refine_settings"]
    assert settings["codes"] == "lean" and settings["lr"] == 0.02  # the defaults, resolved into the manifest
    found = re.search(r"refine: \d of 2 blocks kept their tuned numbers \((\d) with codes from the leaning start\)",
                      result.stderr)  # fmt: skip
    assert found, result.stderr
    _quantize(tiny_model, gptq, *REFINE, "--refine-codes", "gptq")
    differing = 0  # blocks whose codes are not GPTQ's: those that kept lean ones
    for shard in ("shard-00000.safetensors", "shard-00001.safetensors"):
        a, b = load_file(str(lean / shard)), load_file(str(gptq / shard))
        differing += any(not a[k].equal(b[k]) for k in a if k.endswith((".qweight2", ".qweight4")))
    assert differing == int(found.group(1))


def test_manifests_from_before_the_leaning_start_read_as_gptq_codes():
    from llmq.quant.config import QuantConfig, RefineCodes

    old = QuantConfig(refine="block", refine_settings=RefineSettings(lr=0.0)).to_json()
    del old["refine_settings"]["codes"]
    assert QuantConfig.from_json(old).refine_settings.codes == RefineCodes.gptq


def test_end_to_end_tuning_moves_only_the_scales_and_norms_of_the_refined_blocks(tuned, refined):
    report = llmq.verify(tuned)
    assert report.ok, report.problems
    recorded = json.loads((tuned / "manifest.json").read_text())["quantization"]
    assert recorded["refine"] == "e2e" and recorded["refine_settings"]["e2e_steps"] == 4
    assert "e2e_steps" not in json.loads((refined / "manifest.json").read_text())["quantization"]["refine_settings"]
    assert sorted(_tree(tuned)) == sorted(_tree(refined))  # the side file is not part of the artifact
    changed = []
    for shard in ("shard-00000.safetensors", "shard-00001.safetensors"):
        a, b = load_file(str(tuned / shard)), load_file(str(refined / shard))
        changed += [key for key in a if not a[key].equal(b[key])]
    assert any(key.endswith((".scale2", ".scale4")) for key in changed) and any("norm" in key for key in changed)
    assert all(key.endswith((".scale2", ".scale4")) or "norm" in key for key in changed)  # codes and zeros frozen
    assert _tree(tuned)["shard-00002.safetensors"] == _tree(refined)["shard-00002.safetensors"]


def test_a_run_stopped_while_applying_the_end_to_end_result_resumes_to_the_same_bytes(
    cli, tiny_model, tuned, tmp_path, monkeypatch
):
    out = tmp_path / "x.llmq"
    # 3 GPTQ shards, 2 refined blocks, then 1 of the 2 shards the end-to-end result is merged into
    stopped, resumed = _stop_then_resume(cli, tiny_model, out, monkeypatch, 6, E2E)
    assert "refining 2 of 2 blocks" in stopped.stderr and "e2e:" in stopped.stderr
    assert "e2e:" not in resumed.stderr  # merged from the saved result, not tuned again
    assert _tree(out) == _tree(tuned)


def test_end_to_end_tuning_runs_the_tied_head_of_a_model_whose_checkpoint_has_none(tmp_path):
    from conftest import build_tiny_model

    model = build_tiny_model(tmp_path / "tied", tie_embeddings=True)
    out = _quantize(model, tmp_path / "tied.llmq", *E2E)
    assert llmq.verify(out).ok
