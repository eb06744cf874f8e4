"""Keep freed memory in glibc's heap on CPU runs.

glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh ``mmap`` regions and
gives them back on ``free``, so every large tensor of every step faults in (and zeroes) new pages:
a 100 MB copy takes 26 ms into a fresh tensor and 2.6 ms into a reused one on this project's CPU
machine. ``M_MMAP_MAX = 0`` makes glibc serve large blocks from its heap too, and a large
``M_TRIM_THRESHOLD`` keeps freed blocks there for the next step (the same as starting the process
with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``). The process then keeps its peak memory
mapped until it exits, as a training run does anyway. Measured on 2 cores: one MoE layer's
forward + backward (``tools/benchmarks/moe.py`` shapes) 1.97 s → 1.66 s; the tiny default run
(whose tensors mostly stay under the mmap threshold) within noise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: 2 GiB of free heap top before trimming


def keep_freed_memory_in_heap() -> bool:
    """Ask glibc (``mallopt``) to keep large freed blocks for reuse; False where that is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    if ok:
        logger.info("glibc keeps freed memory in its heap (training.cpu_heap_reuse)")
    return ok
