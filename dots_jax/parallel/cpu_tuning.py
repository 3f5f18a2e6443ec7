"""Process settings that make XLA:CPU fast; applied by generate() and the command-line tools.

XLA:CPU allocates each execution's temporary buffers afresh. Above glibc's mmap threshold (at most 32 MiB by
default) every such allocation is a fresh mmap whose pages fault in on first touch and are unmapped again on
free: a decode step of an 87M-parameter model spent ~3/4 of its time in page faults (measured: 21.8 ms -> 5.6 ms
for one stacked MoE layer). Raising the mmap and trim thresholds keeps that memory in the heap for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # 1 GiB: larger than any per-step temporary of a model that runs on a CPU


@functools.cache
def tune_allocator() -> bool:
    """Raise glibc's mmap/trim thresholds (once per process). Returns whether it applied (Linux glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
