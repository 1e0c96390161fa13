"""One signal policy for every long command (cli/common.py, StopRequest).

SIGTERM always stops; SIGINT stops unless the command inherited it ignored (a background job of a
non-interactive shell), and then it stays ignored. Inside a stoppable region the first signal
stops at the next bounded step (exit 130 with a message), a second one at once.

The in-process tests signal the test process itself at the first step of the work, so nothing
races a clock; the subprocess tests set the child's SIGINT disposition explicitly, wait for a
sign that the work started (a line the command prints), and kill the child whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

from llmq.cli import common

TEXT = ("--dataset", "austen", "--seq-len", "64", "--max-tokens", "1024")
# Rounds that would take hours: the command is surely still in its loop when the signal comes.
PROFILE_FOREVER = ("--prompt-len", "8", "--gen-len", "2", "--reps", "10000000", "--breakdown-steps", "0")


@pytest.fixture
def signal_at_first_step(monkeypatch):
    """Every progress bar's first update sends ``sig`` to this process: the signal arrives while
    the command is inside its stoppable loop, before the check that follows the update. SIGINT is
    set to Python's default first: a test run from a background job inherits it ignored, and the
    command rightly keeps it so."""
    sent = []
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)

    def arm(sig: int):
        @contextlib.contextmanager
        def progress(self, description):
            def update(done, total):
                if not sent:
                    sent.append(description)
                    os.kill(os.getpid(), sig)

            yield update

        monkeypatch.setattr(common.Reporter, "progress", progress)
        return sent

    yield arm
    signal.signal(signal.SIGINT, saved)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize(
    "command",
    [
        pytest.param(lambda m, a, t: ("eval", "ppl", a, *TEXT), id="eval-ppl"),
        pytest.param(lambda m, a, t: ("eval", "kld", a, "--base", m, *TEXT), id="eval-kld"),
        pytest.param(lambda m, a, t: ("verify", a), id="verify"),
        pytest.param(
            lambda m, a, t: (
                "calibrate",
                m,
                "-o",
                str(t / "s.stats"),
                "--dataset",
                "austen",
                "--samples",
                "4",
                "--seq-len",
                "64",
            ),
            id="calibrate",
        ),  # fmt: skip
    ],
)
def test_a_signal_inside_the_loop_stops_at_the_next_step_with_130(
    cli, signal_at_first_step, tiny_model, tiny_artifact, tmp_path, command, sig
):
    previous = signal.getsignal(sig)
    sent = signal_at_first_step(sig)
    result = cli(*command(str(tiny_model), str(tiny_artifact), tmp_path))
    assert sent, "the command never reached its loop"
    assert result.code == 130, result.stderr
    assert f"interrupted ({signal.Signals(sig).name})" in result.stderr
    assert list(tmp_path.iterdir()) == []  # calibrate left no stats file, not even a partial one
    assert signal.getsignal(sig) == previous  # the command's handlers are gone after it


def test_the_handlers_stop_at_the_check_not_inside_the_step():
    stop = common.StopRequest()
    with stop.region() as check:
        stop(signal.SIGTERM, None)  # the first signal inside a region only asks
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            check()
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            stop(signal.SIGTERM, None)  # a second one stops at once
        stop.requested = None  # (as if the run had ended here; the region's own end is tested below)
    fresh = common.StopRequest()
    with pytest.raises(KeyboardInterrupt, match="SIGINT"):
        fresh(signal.SIGINT, None)  # outside any region: at once


def test_a_stop_asked_after_the_last_check_is_honoured_as_the_region_ends():
    late = common.StopRequest()
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with late.region():
            late(signal.SIGTERM, None)  # no check follows inside the region
    assert late.regions == 0


def test_an_inherited_ignored_sigint_stays_ignored_and_sigterm_is_still_handled():
    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with common.handled_signals() as stop:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is stop
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, saved)


# -- real processes -------------------------------------------------------------------------


def _wait_for_line(stream, marker: str) -> None:
    """Read ``stream`` until a line containing ``marker``: the sign that the work is under way."""
    for line in stream:
        if marker in line:
            return
    raise AssertionError(f"the command ended without printing {marker!r}")


@pytest.mark.slow
def test_generate_stops_between_tokens(children, demo_cache, monkeypatch):
    from llmq.runtime.sources import demo

    monkeypatch.setenv("LLMQ_CACHE_DIR", str(demo_cache))
    demo.ensure_demo_model(progress=False)  # the tiny model's context (128) is too short to still be running
    proc = children("generate", "demo", "-p", "Once upon a time", "--max-new-tokens", "8000", "--temperature", "1.0")
    assert proc.stdout.read(1), "no text came before the end"  # the first token streamed: decoding is under way
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted (SIGTERM)" in stderr, stderr


def test_profile_stops_between_rounds(children, tiny_model):
    proc = children("profile", str(tiny_model), *PROFILE_FOREVER)
    _wait_for_line(proc.stderr, "timing model")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted (SIGTERM)" in stderr, stderr


def _signal_mask(pid: int, field: str) -> int:
    """A mask from ``/proc/PID/status`` (``SigIgn``: ignored, ``SigCgt``: caught by a handler)."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1], 16)


def _has(mask: int, sig: int) -> bool:
    return bool(mask >> (sig - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads signal masks from Linux's /proc")
@pytest.mark.parametrize("inherited", [signal.SIG_IGN, signal.SIG_DFL], ids=["SIGINT-ignored", "SIGINT-default"])
def test_a_background_job_keeps_sigint_ignored_and_still_stops_on_sigterm(children, tiny_model, inherited):
    """As `bash -c 'llmq ... &'` starts a command: SIGINT ignored, which it keeps; SIGTERM caught."""
    proc = children("profile", str(tiny_model), *PROFILE_FOREVER, sigint=inherited)
    _wait_for_line(proc.stderr, "timing model")  # after main installed its handlers
    ignored, caught = _signal_mask(proc.pid, "SigIgn"), _signal_mask(proc.pid, "SigCgt")
    assert _has(ignored, signal.SIGINT) == (inherited == signal.SIG_IGN)
    assert _has(caught, signal.SIGINT) == (inherited == signal.SIG_DFL)
    assert _has(caught, signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted (SIGTERM)" in stderr, stderr
