"""This process's own resource use, read the way each OS allows (Linux /proc, else getrusage)."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """This process's peak resident memory.  On Linux from VmHWM: getrusage's ru_maxrss of a process started by
    a large parent starts at the parent's RSS (the kernel carries the high-water mark across fork and exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
