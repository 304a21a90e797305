"""Host (CPU) memory: keep freed tensor blocks in the process's heap instead of returning them to the OS.

glibc's ``malloc`` serves a block above its mmap threshold (128 KiB at start) with a fresh
``mmap`` and unmaps it when freed. The threshold then adapts to the blocks freed so far,
so where a step's multi-megabyte tensors (attention scores, activations, gradients) land
depends on the allocation history of the whole process (which libraries were imported,
what was built first). In the unlucky histories every step maps and unmaps its large
tensors again, and each new page costs a page fault: the same tiny CPU training step was
measured 1.2 M page faults and ~40% slower in one history than in another
(``bench/training/bench_step.py``, ``docs/ARCHITECTURE.md``).

``keep_freed_blocks_in_heap`` fixes the thresholds once per process (which also stops the
adaptation): blocks below 32 MiB (glibc's largest allowed mmap threshold) come from the
heap and are reused, and up to 256 MiB of free memory may stay at the heap's top before it
is trimmed. A user's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` wins,
and on a C library other than glibc nothing changes. GPU tensors are not concerned (the
CUDA caching allocator keeps its blocks); host-side data and CPU runs are.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD_BYTES = 256 << 20
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

def keep_freed_blocks_in_heap() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (module docstring); True if they are set.

    Setting them again is harmless (the same values). Returns False, changing nothing, off
    glibc or where the user set either threshold in the environment.
    """
    if platform.libc_ver()[0] != "glibc" or any(name in os.environ for name in USER_SETTINGS):
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    return mmap_ok and trim_ok
