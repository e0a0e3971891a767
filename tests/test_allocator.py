"""keep_large_blocks makes glibc serve large tensors from its heap instead of fresh mmaps."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys, torch
from instructflow.allocator import keep_large_blocks
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    assert keep_large_blocks()
before = libc.mallinfo2().hblkhd
block = torch.empty(64 * 2**20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


def _mmapped_bytes(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33")
def test_large_blocks_come_from_the_heap_after_keep_large_blocks():
    assert _mmapped_bytes("default") >= 64 * 2**20  # glibc's default: a fresh mmap for a 64 MB block
    assert _mmapped_bytes("keep") == 0
