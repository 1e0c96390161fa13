"""Calibration: exact streamed statistics, the stats file and its refusals, quantize --calib / --calib-data."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmq
from llmq.errors import UsageError

CALIB = ("--dataset", "austen", "--samples", "4", "--seq-len", "64")


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory, tiny_model):
    from conftest import run_cli

    path = tmp_path_factory.mktemp("stats") / "tiny.stats.safetensors"
    result = run_cli("calibrate", str(tiny_model), "-o", str(path), *CALIB, "--json")
    assert result.code == 0, result.stderr
    return path


def test_stats_file_manifest(stats_file):
    from safetensors import safe_open

    with safe_open(str(stats_file), framework="pt") as f:
        meta = json.loads(f.metadata()["llmq_calib"])
    assert (meta["samples"], meta["seq_len"], meta["seed"], meta["tokens"]) == (4, 64, 0, 256)
    assert meta["dataset"] == "austen:pride-and-prejudice" and len(meta["model_fingerprint"]) == 64


def test_quantize_with_stats_records_provenance(cli, tiny_model, stats_file, tmp_path):
    out = tmp_path / "gptq.llmq"
    result = cli("quantize", str(tiny_model), "-o", str(out), "--g4", "16", "--calib", str(stats_file), "--json")
    assert result.code == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"]["samples"] == 4 and manifest["calibration"]["file"] == stats_file.name
    assert manifest["calibration"]["gptq_device"] == "cpu"  # no GPU here: auto resolves to the CPU
    assert cli("eval", "ppl", str(out), "--dataset", "austen", "--seq-len", "64", "--max-tokens", "128", "-q").code == 0


def test_inline_calibration_gives_the_same_artifact(cli, tiny_model, stats_file, tmp_path):
    a, b = tmp_path / "a.llmq", tmp_path / "b.llmq"
    assert cli("quantize", str(tiny_model), "-o", str(a), "--g4", "16", "--calib", str(stats_file), "-q").code == 0
    inline = ("--calib-data", "austen", "--samples", "4", "--calib-seq-len", "64")
    assert cli("quantize", str(tiny_model), "-o", str(b), "--g4", "16", *inline, "-q").code == 0
    shards = sorted(p.name for p in a.glob("shard-*"))
    assert all(load_file(a / s).keys() == load_file(b / s).keys() for s in shards)
    for s in shards:
        ta, tb = load_file(a / s), load_file(b / s)
        assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_calibration_text_too_short(cli, tiny_model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here, far too few for calibration.")
    result = cli(
        "calibrate",
        str(tiny_model),
        "-o",
        str(tmp_path / "s.safetensors"),
        "--text-file",
        str(short),
        "--samples",
        "8",
        "--seq-len",
        "64",
    )
    assert result.code == 1 and "need at least 512" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


def test_stats_for_another_model_are_refused(cli, tiny_model, stats_file, tmp_path):
    from conftest import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=5)
    result = cli("quantize", str(other), "-o", str(tmp_path / "o.llmq"), "--calib", str(stats_file))
    assert result.code == 1 and "made for another model" in result.stderr
    assert not (tmp_path / "o.llmq").exists()


def test_corrupted_stats_file_is_refused(cli, tiny_model, stats_file, tmp_path):
    broken = tmp_path / "broken.safetensors"
    shutil.copyfile(stats_file, broken)
    data = bytearray(broken.read_bytes())
    broken.write_bytes(bytes(data[: len(data) // 2]))
    result = cli("quantize", str(tiny_model), "-o", str(tmp_path / "b.llmq"), "--calib", str(broken))
    assert result.code == 1 and "not a readable safetensors stats file" in result.stderr

    nan = tmp_path / "nan.safetensors"
    from safetensors import safe_open

    with safe_open(str(stats_file), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(stats_file)
    first = next(k for k in tensors if k.endswith(".hessian"))
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(nan), metadata=meta)
    result = cli("quantize", str(tiny_model), "-o", str(tmp_path / "n.llmq"), "--calib", str(nan))
    assert result.code == 1 and "missing or corrupt" in result.stderr


def test_calib_and_calib_data_together_is_a_usage_error(cli, tiny_model, stats_file, tmp_path):
    result = cli(
        "quantize",
        str(tiny_model),
        "-o",
        str(tmp_path / "x.llmq"),
        "--calib",
        str(stats_file),
        "--calib-data",
        "austen",
    )
    assert result.code == 2 and "not both" in result.stderr


def _perms(artifact) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in artifact.glob("shard-*.safetensors"):
        tensors.update({k: v for k, v in load_file(shard).items() if k.endswith(".perm")})
    return tensors


def test_selection_range_with_calibration_keeps_the_data_free_stripes(cli, tiny_model, stats_file, tmp_path):
    rtn, by_range, by_hessian = tmp_path / "rtn.llmq", tmp_path / "range.llmq", tmp_path / "hessian.llmq"
    base = ("quantize", str(tiny_model), "--g4", "16", "-q")
    # uniform stripes and the original channel order within each part, as the rtn artifact has them
    calib = ("--calib", str(stats_file), "--no-act-order", "--allocation", "uniform")
    assert cli(*base, "-o", str(rtn), "--no-calib").code == 0
    assert cli(*base, "-o", str(by_range), *calib, "--selection", "range").code == 0
    assert cli(*base, "-o", str(by_hessian), *calib, "--selection", "hessian").code == 0
    rtn_perms, range_perms, hessian_perms = _perms(rtn), _perms(by_range), _perms(by_hessian)
    assert rtn_perms.keys() == range_perms.keys() and rtn_perms
    assert all(torch.equal(rtn_perms[k], range_perms[k]) for k in rtn_perms)
    assert any(not torch.equal(rtn_perms[k], hessian_perms[k]) for k in rtn_perms)
    assert json.loads((by_range / "manifest.json").read_text())["quantization"]["selection"] == "range"


def test_selection_hessian_needs_calibration(cli, tiny_model, tmp_path):
    result = cli("quantize", str(tiny_model), "-o", str(tmp_path / "x.llmq"), "--no-calib", "--selection", "hessian")
    assert result.code == 2 and "--calib" in result.stderr
    assert not (tmp_path / "x.llmq").exists()


def test_quantize_frees_the_hessians_it_owns_and_keeps_a_callers(tiny_model, stats_file, tmp_path, monkeypatch):
    import inspect

    import llmq
    from llmq.quant import pipeline, statsfile
    from llmq.runtime.sources.checkpoint import model_fingerprint

    handed = []
    real = pipeline.quantize_model

    def spy(*args, **kwargs):
        handed.append(inspect.signature(real).bind(*args, **kwargs).arguments["stats"])
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize_model", spy)
    config = llmq.QuantConfig(g4=16, refine="none")
    llmq.quantize(tiny_model, tmp_path / "owned.llmq", config, calib=stats_file)  # read here: quantize owns them
    assert not [name for name in handed[0].tensors if name.endswith(".hessian")]

    callers = statsfile.read_stats(stats_file, model_fingerprint(tiny_model))
    hessians = sorted(name for name in callers.tensors if name.endswith(".hessian"))
    llmq.quantize(tiny_model, tmp_path / "kept.llmq", config, calib=callers)
    assert hessians and sorted(name for name in callers.tensors if name.endswith(".hessian")) == hessians
    for shard in sorted(p.name for p in (tmp_path / "owned.llmq").glob("shard-*")):  # freeing changes nothing
        a, b = load_file(tmp_path / "owned.llmq" / shard), load_file(tmp_path / "kept.llmq" / shard)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_hessian_is_freed_only_after_the_last_unit_that_reads_it():
    from llmq.quant.pipeline import _last_readers

    aliases = {"l0.q": "l0.q", "l0.k": "l0.q", "l1.up": "l1.up", "shared.a": "x", "shared.b": "x"}
    units = [["l0.q", "shared.a"], ["l0.k", "l1.up"], ["shared.b"]]
    assert _last_readers(units, aliases) == [[], ["l0.k", "l1.up"], ["shared.b"]]


def test_spilled_calibration_equals_the_in_memory_one_and_holds_no_layer(tiny_model, tmp_path):
    """With a spill folder each layer's statistics and Fisher inputs go to files as it finishes (memory
    independent of the depth); the numbers are the very same as kept in memory."""
    from llmq.quant import statsfile
    from llmq.quant.calibrate import calibration_windows, collect
    from llmq.quant.config import QuantConfig
    from llmq.runtime.sources import models, text

    source = models.resolve_model(str(tiny_model), progress=False)
    windows = calibration_windows(source, text.load_text(text.Dataset.austen, None, text.Split.calib).text[:40_000],
                                  10, 48, seed=0)  # fmt: skip
    config = QuantConfig(include=(*QuantConfig().include, "lm_head"))
    held = collect(source, models.load_config(source), config, windows, seed=0)
    spilled = collect(source, models.load_config(source), config, windows, seed=0, spill=tmp_path)
    layer_files = sorted(p.name for p in tmp_path.iterdir())
    assert layer_files == ["inputs-0.safetensors", "inputs-1.safetensors", "inputs-rest.safetensors"]  # Fisher's gone
    assert not spilled.stats  # nothing of the layers' statistics is left in memory
    a, b = statsfile.collected(held, {}), statsfile.collected(spilled, {})
    assert sorted(a.tensors) == sorted(b.tensors) and any(n.startswith("lm_head") for n in a.tensors)
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name


def test_calibration_files_are_removed_after_calibrate_and_quantize(cli, tiny_model, tmp_path):
    assert cli("calibrate", str(tiny_model), "-o", str(tmp_path / "s.stats"), *CALIB, "-q").code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.stats"]
    inline = ("--calib-data", "austen", "--samples", "4", "--calib-seq-len", "64", "--refine", "none")
    assert cli("quantize", str(tiny_model), "-o", str(tmp_path / "q.llmq"), *inline, "-q").code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.llmq", "s.stats"]


def test_a_killed_calibrations_files_are_removed_by_the_next_run(cli, tiny_model, tmp_path):
    left = tmp_path / ".s.stats.partial-999999999-calib-abc"  # a process id no process has
    left.mkdir()
    (left / "inputs-0.safetensors").write_bytes(b"x")
    result = cli("calibrate", str(tiny_model), "-o", str(tmp_path / "s.stats"), *CALIB)
    assert result.code == 0 and "removed .s.stats.partial-999999999-calib-abc" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.stats"]


def test_windows_that_cannot_be_drawn_are_refused_before_the_model_is_opened(tmp_path, monkeypatch):
    def opened(*args, **kwargs):
        raise AssertionError("the model was opened before the windows were checked")

    monkeypatch.setattr("llmq.quant.api.open_model", opened)
    with pytest.raises(UsageError, match="--samples must be at least 1"):
        llmq.calibrate("demo", "austen", samples=0, out=tmp_path / "s.stats")
    with pytest.raises(UsageError, match="--seq-len at least 2"):
        llmq.quantize("demo", tmp_path / "q.llmq", calib_data=llmq.CalibData("austen", seq_len=1))
    assert list(tmp_path.iterdir()) == []


def test_windows_longer_than_the_models_context_are_refused_before_calibrating(cli, tiny_model, tmp_path, monkeypatch):
    from conftest import TINY_CONTEXT

    def calibrated(*args, **kwargs):
        raise AssertionError("calibration ran before the window length was checked")

    monkeypatch.setattr("llmq.quant.api.calibrate_model", calibrated)
    with pytest.raises(UsageError, match=f"exceed the model's context of {TINY_CONTEXT}; use --seq-len"):
        llmq.calibrate(tiny_model, "austen", samples=2, seq_len=TINY_CONTEXT + 1)
    result = cli("quantize", str(tiny_model), "-o", str(tmp_path / "q.llmq"), "--calib-seq-len", str(2 * TINY_CONTEXT))
    assert result.code == 2 and f"--calib-seq-len) {TINY_CONTEXT} or less" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_default_window_is_shortened_to_a_shorter_context_and_says_so(tiny_model):
    from llmq.runtime.sources.feedback import Feedback

    from conftest import TINY_CONTEXT

    said = []
    stats = llmq.calibrate(tiny_model, "austen", samples=2, feedback=Feedback(info=said.append))
    try:
        assert stats.meta["seq_len"] == TINY_CONTEXT
    finally:
        stats.close()
    assert any(f"windows of {TINY_CONTEXT} tokens: the model's context is shorter than 512" in line for line in said)


def test_a_wide_input_is_summed_a_block_of_rows_at_a_time(monkeypatch):
    """The product of a wide input is made and added in blocks of rows (an fp64 copy of a whole one
    would be 6.6 GB at a 70B's K = 28672): the sums are those of the whole product."""
    from llmq.quant import calibrate as C

    x = torch.randn(3, 20, 40, generator=torch.Generator().manual_seed(0))
    whole = C.InputStats(torch.zeros(40, 40, dtype=torch.float64), torch.zeros(40, dtype=torch.float64))
    with torch.inference_mode():
        whole.add(x)
    monkeypatch.setattr(C, "PRODUCT_BLOCK", 7 * 40)  # blocks of 7 rows and a last one of 5
    blocked = C.InputStats(torch.zeros(40, 40, dtype=torch.float64), torch.zeros(40, dtype=torch.float64))
    with torch.inference_mode():
        blocked.add(x)
    assert torch.allclose(blocked.xtx, whole.xtx, rtol=1e-6, atol=1e-4) and blocked.rows == whole.rows == 60
    expected = (x.reshape(-1, 40).double().T @ x.reshape(-1, 40).double()) / 60
    blocked.finish()
    assert torch.allclose(blocked.finished[0].double(), expected, rtol=1e-5, atol=1e-6) and blocked.xtx is None
