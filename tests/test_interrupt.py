"""Killing `quantize` or `calibrate` mid-run leaves no partial artifact (slow: uses the demo model).

Ctrl-C and SIGTERM keep the finished layers in a hidden checkpoint directory for `--resume`;
SIGKILL leaves the hidden staging directory, which the next run removes or resumes.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from llmq.runtime.sources import demo

pytestmark = pytest.mark.slow


def _wait_for_shards(out: Path, proc: subprocess.Popen, count: int = 2) -> Path:
    """Poll for the sign that quantize is under way: ``count`` shards in its staging directory. No
    deadline of its own: a loaded machine only makes it slower, and the child is killed if it dies."""
    while True:
        staging = list(out.parent.glob(f".{out.name}.partial-*"))
        if staging and len(list(staging[0].glob("shard-*.safetensors"))) >= count:
            return staging[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)  # a polling interval, not a guess at how long the work takes


@pytest.fixture
def demo_ready(demo_cache, monkeypatch) -> Path:
    monkeypatch.setenv("LLMQ_CACHE_DIR", str(demo_cache))
    demo.ensure_demo_model(progress=False)
    return demo_cache


@pytest.fixture
def quantize(children, demo_ready):
    """``start(out, *extra)``: quantize the demo model without calibration, as a killed-at-the-end child."""

    def start(out: Path, *extra: str) -> subprocess.Popen:
        return children("quantize", "demo", "-o", str(out), "--no-calib", *extra)

    return start


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_no_artifact_only_a_hidden_checkpoint(tmp_path, quantize, sig):
    out = tmp_path / "demo.llmq"
    proc = quantize(out)
    _wait_for_shards(out, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in stderr, stderr
    [kept] = list(tmp_path.iterdir())
    assert kept.name.startswith(".demo.llmq.partial-stopped-") and (kept / "checkpoint.json").is_file()


def test_sigint_then_resume_gives_the_same_bytes_as_one_run(tmp_path, quantize):
    """The brief's resume test on the demo model: interrupted with Ctrl-C, continued, compared."""
    whole, resumed = tmp_path / "whole" / "demo.llmq", tmp_path / "resumed" / "demo.llmq"
    whole.parent.mkdir()
    resumed.parent.mkdir()
    assert quantize(whole).wait() == 0
    proc = quantize(resumed)
    _wait_for_shards(resumed, proc, count=3)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130 and not resumed.exists()
    again = quantize(resumed, "--resume")
    _, stderr = again.communicate()
    assert again.returncode == 0 and "resuming from" in stderr, stderr
    files = sorted(p.name for p in whole.iterdir())
    assert files == sorted(p.name for p in resumed.iterdir())
    assert all((whole / n).read_bytes() == (resumed / n).read_bytes() for n in files)


def test_sigkill_leaves_only_a_hidden_staging_dir_that_the_next_run_removes(cli, tmp_path, quantize, tiny_model):
    out = tmp_path / "demo.llmq"
    proc = quantize(out)
    staging = _wait_for_shards(out, proc)
    proc.kill()
    proc.wait(timeout=30)
    assert not out.exists() and staging.exists() and staging.name.startswith(".")
    result = cli("quantize", str(tiny_model), "-o", str(out), "--no-calib", "--g4", "16", "-q")
    assert result.code == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["demo.llmq"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killing_calibrate_keeps_the_earlier_stats_file(tmp_path, children, demo_ready, sig):
    """Statistics are written to a temporary file and renamed, so a kill at any point leaves the old file."""
    out = tmp_path / "demo.stats"
    out.write_bytes(b"an earlier statistics file")
    proc = children("calibrate", "demo", "-o", str(out), "--dataset", "austen", "--samples", "64", "--seq-len", "512",
                    "--force")  # fmt: skip
    for line in proc.stderr:  # the sign that the layers are being run: calibration's first log line
        if line.startswith("calibration:"):
            break
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    proc.communicate()
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "demo.stats")
    # A stop removes calibration's per-layer folder; a kill may leave it, and the next run removes it
    # (test_calibrate.py::test_a_killed_calibrations_files_are_removed_by_the_next_run).
    assert left == [] if sig == signal.SIGINT else all(n.startswith(".demo.stats.partial-") for n in left), left
    assert out.read_bytes() == b"an earlier statistics file"
