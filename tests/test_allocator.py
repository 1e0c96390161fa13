"""The CLI's fixed glibc mmap threshold gives freed blocks of a few MiB back to the system."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmq.cli import allocator

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator, /proc")

# In a fresh interpreter: free one 16 MiB block (a mapping of its own, which by default raises the
# threshold to 16 MiB), then make forty 5 MiB blocks and free all but the last; print how much
# anonymous memory that left resident, in MiB.
_PROBE = """
import sys
from llmq.cli.allocator import return_large_blocks

def anon_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) / 1024

fixed = return_large_blocks() if sys.argv[1] == "fixed" else False
big = bytearray(16 * 2**20)
del big
before = anon_mib()
blocks = [bytearray(5 * 2**20) for _ in range(40)]
del blocks[:-1]
print(fixed, anon_mib() - before)
"""


def _left_resident(mode: str, env: dict | None = None) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, env=env)
    fixed, mib = out.stdout.split()
    return fixed == "True", float(mib)


@linux
def test_a_fixed_threshold_returns_freed_blocks_that_the_default_keeps():
    fixed, kept = _left_resident("fixed")
    default, kept_by_default = _left_resident("default")
    assert fixed and not default
    assert kept < 20  # the last block (5 MiB) and small change
    assert kept_by_default > 150  # the control: glibc's raised threshold keeps the 39 freed blocks


@linux
def test_the_users_own_setting_stands(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert allocator.return_large_blocks() is False


def test_the_command_line_fixes_it_before_any_command(monkeypatch):
    from llmq.cli import app

    calls = []
    monkeypatch.setattr(app, "return_large_blocks", lambda: calls.append("set"))
    monkeypatch.setattr(sys, "argv", ["llmq", "--version"])
    with pytest.raises(SystemExit) as stopped:
        app.main()
    assert stopped.value.code in (0, None) and calls == ["set"]
