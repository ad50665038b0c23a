"""The C heap of a process that allocates and frees the same large buffers again and again.

A fan-out of 1,000 followers builds about 0.5 MB of batches, then the NATS client copies them
into its commands, and all of it is freed once the acks are in. With glibc's defaults the
freed top of the heap is handed back to the kernel (``M_TRIM_THRESHOLD``, 128 KiB) and buffers
of 128 KiB or more are separate mappings (``M_MMAP_THRESHOLD``), so the next event faults the
same pages in again: page faults, zeroed by the kernel, on every event. ``keep_heap`` lets the
process keep what it freed for the next event instead. The cost is memory the process holds
on to: at most its largest fan-out's worth plus ``pad_mb`` (measured in
``benchmarks/README.md``).
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def keep_heap(trim_mb: int = 256, pad_mb: int = 16, mmap_mb: int = 32) -> bool:
    """Keep up to ``trim_mb`` of freed heap, grow it ``pad_mb`` at a time, and serve buffers
    up to ``mmap_mb`` from the heap. True where glibc took the settings; False elsewhere
    (another libc or platform, or ``TRADECOPY_KEEP_HEAP=0``), where nothing changes."""
    if not sys.platform.startswith("linux") or os.environ.get("TRADECOPY_KEEP_HEAP") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    mib = 1 << 20
    settings = (
        (_M_MMAP_THRESHOLD, mmap_mb * mib),
        (_M_TRIM_THRESHOLD, trim_mb * mib),
        (_M_TOP_PAD, pad_mb * mib),
    )
    return all(mallopt(param, value) == 1 for param, value in settings)
