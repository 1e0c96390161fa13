"""How much memory this process holds and the machine has free; read, never guessed.

Quantize's estimate and the runtime's choice between dense and packed weights both ask here.
``resource`` is imported only where it is asked for (it does not exist on Windows).
"""

from __future__ import annotations

import os
import sys


def current_rss_bytes() -> int:
    """This process's resident set now: /proc on Linux, the working set on Windows, else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    if sys.platform == "win32":
        return _windows_counters().WorkingSetSize
    peak = peak_rss_bytes()
    if peak is None:
        raise RuntimeError("this platform reports no memory use (no /proc, no resource module, not Windows)")
    return peak


def peak_rss_bytes() -> int | None:
    """The most this process has held resident so far: ``ru_maxrss`` (POSIX; bytes on every
    platform), the peak working set on Windows, None where neither exists."""
    if sys.platform == "win32":
        return _windows_counters().PeakWorkingSetSize
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def available_memory_bytes() -> int | None:
    """What the machine can still give: MemAvailable (Linux), the available physical memory
    (Windows), None where that is not known (the memory check is then skipped, and says so)."""
    if sys.platform == "win32":
        return _windows_status().ullAvailPhys
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _windows_counters():
    """psapi's PROCESS_MEMORY_COUNTERS of this process."""
    import ctypes
    from ctypes import wintypes

    class Counters(ctypes.Structure):
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
            (name, ctypes.c_size_t) for name in ("PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage",
                                                 "QuotaPagedPoolUsage", "QuotaPeakNonPagedPoolUsage",
                                                 "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")
        ]  # fmt: skip

    counters = Counters(cb=ctypes.sizeof(Counters))
    process = ctypes.windll.kernel32.GetCurrentProcess()
    if not ctypes.windll.psapi.GetProcessMemoryInfo(process, ctypes.byref(counters), counters.cb):
        raise ctypes.WinError()
    return counters


def _windows_status():
    """kernel32's MEMORYSTATUSEX of the machine."""
    import ctypes
    from ctypes import wintypes

    class Status(ctypes.Structure):
        _fields_ = [("dwLength", wintypes.DWORD), ("dwMemoryLoad", wintypes.DWORD)] + [
            (name, ctypes.c_ulonglong) for name in ("ullTotalPhys", "ullAvailPhys", "ullTotalPageFile",
                                                    "ullAvailPageFile", "ullTotalVirtual", "ullAvailVirtual",
                                                    "ullAvailExtendedVirtual")
        ]  # fmt: skip

    status = Status(dwLength=ctypes.sizeof(Status))
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        raise ctypes.WinError()
    return status
