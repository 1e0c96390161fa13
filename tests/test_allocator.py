"""The CLI's fixed glibc mmap threshold gives freed blocks of a few MiB back to the system, and torch
is asked for huge pages."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from llmq.cli import allocator

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's allocator, /proc"
)

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


def _left_resident(mode: str) -> tuple[bool, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, env=env)
    fixed, mib = out.stdout.split()
    return fixed == "True", float(mib)


@glibc
def test_a_fixed_threshold_returns_freed_blocks_that_the_default_keeps():
    fixed, kept = _left_resident("fixed")
    default, kept_by_default = _left_resident("default")
    assert fixed and not default
    assert kept < 20  # the last block (5 MiB) and small change
    assert kept_by_default > 150  # the control: glibc's raised threshold keeps the 39 freed blocks


@pytest.mark.parametrize(
    "name, value", [("MALLOC_MMAP_THRESHOLD_", "65536"), ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")]
)
def test_the_users_own_setting_stands(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert allocator.return_large_blocks() is False


def test_the_llmq_process_sets_it_before_the_app_runs_and_the_app_alone_does_not(monkeypatch):
    import llmq.cli
    from llmq.cli import app

    calls = []
    monkeypatch.setattr(allocator, "return_large_blocks", lambda: calls.append("allocator"))
    monkeypatch.setattr(allocator, "fault_in_huge_pages", lambda: calls.append("huge pages"))
    monkeypatch.setattr(sys, "argv", ["llmq", "--version"])
    with pytest.raises(SystemExit):
        app.main()  # as tests and programs call it, inside their own process
    assert calls == []
    monkeypatch.setattr(app, "main", lambda: calls.append("app"))
    llmq.cli.main()
    assert calls == ["allocator", "huge pages", "app"]


def test_torch_is_asked_for_huge_pages_unless_the_user_said_otherwise(monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert allocator.fault_in_huge_pages() is True and os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert allocator.fault_in_huge_pages() is False and os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
