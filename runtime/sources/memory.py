"""How much memory this process holds and the machine has free; read, never guessed.

Quantize's estimate and the runtime's choice between dense and packed weights both ask here.
``resource`` is imported only where it is asked for (it does not exist on Windows).
"""

from __future__ import annotations

import os
import sys


def current_rss_bytes() -> int:
    """This process's resident set now (Linux /proc), or its peak so far elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The most this process has held resident so far (ru_maxrss, in bytes on every platform)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None
