"""``quantize --resume``: an interrupted run continues from its finished layers, and the result is
byte for byte the artifact an uninterrupted run writes."""

from __future__ import annotations

import json

import pytest

from llmq.quant import writer as W

from conftest import interrupt_shard_writes

ARGS = ("--g4", "16", "--no-calib", "-q")


def _tree(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    from conftest import run_cli

    out = tmp_path_factory.mktemp("resume-ref") / "ref.llmq"
    assert run_cli("quantize", str(tiny_model), "-o", str(out), *ARGS).code == 0
    return out


def _checkpoints(folder):
    return [p for p in folder.iterdir() if p.name.startswith(".") and (p / W.CHECKPOINT).is_file()]


def test_an_interrupted_run_resumes_to_the_same_bytes(cli, tiny_model, reference, tmp_path, monkeypatch):
    out = tmp_path / "x.llmq"
    interrupt_shard_writes(monkeypatch, 2)
    result = cli("quantize", str(tiny_model), "-o", str(out), *ARGS)
    assert result.code == 130 and "interrupted after 2 of 3 units" in result.stderr and "--resume" in result.stderr
    assert not out.exists()
    [kept] = _checkpoints(tmp_path)
    assert json.loads((kept / W.CHECKPOINT).read_text())["units_done"] == ["0", "1"]
    monkeypatch.undo()
    result = cli("quantize", str(tiny_model), "-o", str(out), "--g4", "16", "--no-calib", "--resume")
    assert result.code == 0, result.stderr
    assert "resuming from" in result.stderr and "2 unit(s) already done" in result.stderr
    assert _tree(out) == _tree(reference)  # bit-identical, manifest included
    assert [p.name for p in tmp_path.iterdir()] == ["x.llmq"]


def test_without_resume_the_checkpoint_is_discarded_and_said_so(cli, tiny_model, reference, tmp_path, monkeypatch):
    out = tmp_path / "x.llmq"
    interrupt_shard_writes(monkeypatch, 1)
    assert cli("quantize", str(tiny_model), "-o", str(out), *ARGS).code == 130
    monkeypatch.undo()
    result = cli("quantize", str(tiny_model), "-o", str(out), "--g4", "16", "--no-calib")
    assert result.code == 0 and "are discarded (--resume would continue from them)" in result.stderr
    assert _tree(out) == _tree(reference) and _checkpoints(tmp_path) == []


def test_resume_with_other_settings_is_refused(cli, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "x.llmq"
    interrupt_shard_writes(monkeypatch, 1)
    assert cli("quantize", str(tiny_model), "-o", str(out), *ARGS).code == 130
    monkeypatch.undo()
    result = cli("quantize", str(tiny_model), "-o", str(out), "--g4", "32", "--no-calib", "--resume")
    assert result.code == 1 and "used a different model, settings or calibration" in result.stderr
    assert len(_checkpoints(tmp_path)) == 1  # still there for the right command


def test_a_damaged_checkpoint_is_refused(cli, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "x.llmq"
    interrupt_shard_writes(monkeypatch, 2)
    assert cli("quantize", str(tiny_model), "-o", str(out), *ARGS).code == 130
    monkeypatch.undo()
    [kept] = _checkpoints(tmp_path)
    shard = kept / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    result = cli("quantize", str(tiny_model), "-o", str(out), *ARGS, "--resume")
    assert result.code == 1 and "is damaged (shard-00001.safetensors)" in result.stderr


def test_resume_with_nothing_to_resume_says_so_and_runs(cli, tiny_model, reference, tmp_path):
    out = tmp_path / "x.llmq"
    result = cli("quantize", str(tiny_model), "-o", str(out), "--g4", "16", "--no-calib", "--resume")
    assert result.code == 0 and "no interrupted run of this output to continue" in result.stderr
    assert _tree(out) == _tree(reference)
