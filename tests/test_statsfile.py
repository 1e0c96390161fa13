"""quant/statsfile.py called directly: statistics in memory, written, read back, and refused when wrong."""

from __future__ import annotations

import json

import pytest
import torch

from llmq.errors import OutputExistsError, StatsFileError
from llmq.quant import statsfile
from llmq.quant.calibrate import Calibration, InputStats

FINGERPRINT = "f" * 64


def _calibration() -> Calibration:
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    stats = InputStats(torch.zeros(8, 8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64))
    stats.add(x)
    return Calibration({"layer.q": stats}, {"layer.q": "layer.q", "layer.k": "layer.q"}, tokens=32)


def _stats():
    meta = {"model": "tiny", "model_fingerprint": FINGERPRINT, "dataset": "austen:test", "tokens": 32}
    return statsfile.collected(_calibration(), meta)


def test_statistics_round_trip_through_a_file(tmp_path):
    stats = _stats()
    assert stats.path is None and stats.file_label == statsfile.INLINE and (stats.linears, stats.inputs) == (2, 1)
    assert torch.equal(stats.hessian("layer.k"), stats.hessian("layer.q")) and stats.hessian("other") is None
    written = statsfile.write_stats(tmp_path / "s.stats", stats)
    read = statsfile.read_stats(tmp_path / "s.stats", FINGERPRINT)
    assert written.path == read.path == tmp_path / "s.stats" and read.file_label == "s.stats"
    assert read.meta == {**stats.meta, "format": statsfile.STATS_FORMAT, "version": statsfile.STATS_VERSION}
    assert read.tensors.keys() == stats.tensors.keys()
    assert all(torch.equal(read.tensors[k], stats.tensors[k]) for k in stats.tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["s.stats"]  # no temporary file left


def test_another_models_statistics_are_refused(tmp_path):
    statsfile.write_stats(tmp_path / "s.stats", _stats())
    with pytest.raises(StatsFileError, match="made for another model"):
        statsfile.read_stats(tmp_path / "s.stats", "0" * 64)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda path: path.unlink(), "does not exist"),
        (lambda path: path.write_bytes(b"not safetensors"), "not a readable safetensors stats file"),
        (lambda path: _rewrite(path, meta=lambda m: m | {"version": 99}), "not an llmq calibration stats file"),
        (lambda path: _rewrite(path, meta=lambda m: {k: v for k, v in m.items() if k != "aliases"}), "alias table"),
        (lambda path: _rewrite(path, tensor=torch.ones(8, 7)), "missing or corrupt"),
        (lambda path: _rewrite(path, tensor=torch.ones(8, 8, dtype=torch.int32)), "statistics are float32"),
        (lambda path: _rewrite(path, fisher=torch.tensor([1.0, -2.0])), "output Fisher layer.q.fisher is corrupt"),
        (lambda path: _rewrite(path, fisher=torch.ones(2, 2)), "output Fisher layer.q.fisher is corrupt"),
    ],
)
def test_a_damaged_stats_file_is_a_clear_error(tmp_path, damage, message):
    path = tmp_path / "s.stats"
    statsfile.write_stats(path, _stats())
    damage(path)
    with pytest.raises(StatsFileError, match=message):
        statsfile.read_stats(path, FINGERPRINT)


def test_a_hessians_values_are_checked_when_it_is_read(tmp_path):
    """A file larger than memory is never read whole to open it: each Hessian is checked as it is read."""
    path = tmp_path / "s.stats"
    statsfile.write_stats(path, _stats())
    _rewrite(path, tensor=torch.full((8, 8), float("nan")))
    stats = statsfile.read_stats(path, FINGERPRINT)
    with pytest.raises(StatsFileError, match="the Hessian layer.q.hessian is missing or corrupt"):
        stats.hessian("layer.k")


def _rewrite(path, meta=lambda m: m, tensor=None, fisher=None) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        record = json.loads(f.metadata()["llmq_calib"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if tensor is not None:
        tensors["layer.q.hessian"] = tensor
    if fisher is not None:
        tensors["layer.q.fisher"] = fisher
    save_file(tensors, str(path), metadata={"llmq_calib": json.dumps(meta(record))})


def test_calibrate_keeps_an_existing_stats_file_unless_forced(tiny_model, tmp_path):
    from llmq.quant.api import calibrate

    path = tmp_path / "s.stats"
    path.write_bytes(b"earlier")
    with pytest.raises(OutputExistsError, match="--force"):
        calibrate(tiny_model, "austen", out=path, samples=2, seq_len=16)
    assert path.read_bytes() == b"earlier"
