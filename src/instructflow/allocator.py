"""Keep glibc from handing the training step's large blocks back to the kernel between uses.

PyTorch allocates CPU tensors with malloc. glibc serves blocks above a threshold (dynamic, at most
32 MB) with a fresh mmap and unmaps them on free, and trims the heap's top as soon as 128 KB there are
free. A training step allocates and frees the same large blocks over and over (weight casts, the
embedding gradient, attention scratch), so every one of them came back as new pages the kernel had to
fault in and zero: a 113 MB zero-filled embedding gradient took 146 ms. Serving blocks up to 256 MB
from the heap and trimming only above 256 MB free lets the next micro-batch reuse those pages.
Measured on a 2-core EPYC, SmolLM2-135M, micro-batches of 8 Code Alpaca rows: 10-15% more tokens/s
for 0.1-0.35 GiB more peak RSS. glibc-only (Linux); elsewhere a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameter numbers from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 256 * 1024 * 1024


def keep_large_blocks(limit: int = KEEP_BYTES) -> bool:
    """Ask glibc to serve blocks up to ``limit`` bytes from the heap and trim it only above ``limit``
    free; returns whether glibc took both settings."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, limit))
