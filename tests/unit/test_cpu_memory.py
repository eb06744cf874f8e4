"""`training.cpu_heap_reuse`: large CPU tensors come from glibc's heap, not fresh mmap regions."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import ctypes, ctypes.util, sys
    import torch
    from deepsuite.training.cpu_memory import keep_freed_memory_in_heap

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2
    applied = keep_freed_memory_in_heap() if sys.argv[1] == "on" else False
    t = torch.empty(100 * 2**20, dtype=torch.uint8).fill_(1)  # 100 MiB, alive
    print(applied, libc.mallinfo2().hblkhd)
    """
)


def _mmapped_bytes(mode: str) -> tuple[str, int]:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True
    )
    applied, hblkhd = proc.stdout.split()
    return applied, int(hblkhd)


def test_large_tensors_come_from_the_heap_once_applied() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2) to observe the allocator")
    applied, mmapped = _mmapped_bytes("on")
    assert applied == "True"
    assert mmapped < 100 * 2**20  # the 100 MiB tensor is not in an mmap region
    applied, mmapped = _mmapped_bytes("off")
    assert applied == "False" and mmapped >= 100 * 2**20  # glibc's default: a fresh mmap region
