"""The ``llmq`` process asks glibc's allocator to give large freed blocks back to the system, and
torch to back large tensors with huge pages, so that giving them back costs little time.

glibc serves a block of at least its mmap threshold (128 KiB to start) with a mapping of its own,
unmapped when freed; blocks below it come from the heap, whose freed middle stays in the process.
By default each freed mapped block raises the threshold to its size, up to 32 MiB, so after the
first large temporary the many tensors of a few MiB that calibration, GPTQ and refinement make
come from the heap, and what they leave behind stays resident. A fixed threshold stops
the raising. Measured on the demo model's quantize run: peak RSS 2,037 MB against 2,395 MB, the
same artifact bytes, the same time (docs/benchmarks.md); 128 KiB saved more (1,792 MB) but made the
run 75% slower, as every mid-sized temporary then pays for a fresh mapping.
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 4 * 2**20  # bytes
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's <malloc.h>
# glibc's own settings of it: when the user gave one, it stands
_ENV = "MALLOC_MMAP_THRESHOLD_"
_TUNABLE = "glibc.malloc.mmap_threshold"


# torch's CPU allocator: blocks of 2 MiB and more aligned to 2 MiB and advised as huge pages
# (c10/core/alloc_cpu.cpp reads it once, at its first large block)
_THP = "THP_MEM_ALLOC_ENABLE"


def fault_in_huge_pages() -> bool:
    """Let torch back its large CPU tensors with transparent huge pages; whether it was set.

    With the fixed threshold every tensor of 4 MiB or more is a fresh mapping, which the kernel
    zeroes and maps 4 KiB page by page on first touch; with 2 MiB pages that costs far less. The
    demo's quantize (16 windows, 10 steps) took 496 s instead of 565 s, peaked at 1,040 MB instead
    of 1,148 MB, and wrote the same bytes (docs/benchmarks.md, "Huge pages"). The memory still goes
    back to the system when the tensor is freed. A value the user set stands; where the kernel's
    transparent huge pages are off, the advice does nothing.
    """
    if _THP in os.environ:
        return False
    os.environ[_THP] = "1"
    return True


def return_large_blocks() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` for this process; whether it was set.

    Only the ``llmq`` process does this (:func:`llmq.cli.main`): the Python API leaves the
    allocator of the program that imports llmq alone. Off Linux, under another C library, or with
    the user's own threshold in the environment (``MALLOC_MMAP_THRESHOLD_``, or
    ``glibc.malloc.mmap_threshold`` in ``GLIBC_TUNABLES``), nothing changes.
    """
    if not sys.platform.startswith("linux") or _ENV in os.environ or _TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter itself runs on
    except (OSError, AttributeError):  # no mallopt: not glibc, nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
