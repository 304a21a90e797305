"""``host_memory``: freed tensor blocks are reused from the heap, whatever the allocation history.

Each case runs in a fresh interpreter (the thresholds are process-wide) and counts the page
faults of allocating, writing and freeing a 4 MiB block (what a 4 MiB CPU tensor asks of
``malloc``) 200 times: counted faults, not time, so the test does not depend on the load.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from modus_mega.host_memory import keep_freed_blocks_in_heap

_FAULTS = """
import ctypes, resource, sys
from modus_mega.host_memory import M_MMAP_THRESHOLD, keep_freed_blocks_in_heap
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "unlucky":  # glibc's starting threshold, fixed: every 4 MiB block is mapped afresh
    assert libc.mallopt(M_MMAP_THRESHOLD, 128 << 10) == 1
else:
    print(keep_freed_blocks_in_heap())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    block = libc.malloc(4 << 20)  # what a 4 MiB CPU tensor asks of malloc
    ctypes.memset(block, 1, 4 << 20)  # written, as a tensor's data is
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")


def _run(case: str, **env: str) -> list[str]:
    """The lines the snippet prints for ``case`` in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", _FAULTS, case], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return done.stdout.split()


def test_kept_blocks_are_reused_where_an_unlucky_history_maps_each_again() -> None:
    *_, unlucky = _run("unlucky")
    applied, kept = _run("kept")
    assert applied == "True"
    pages = (4 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert int(unlucky) >= 160 * pages  # each block faults its pages in again
    assert int(kept) <= 2 * pages  # the first block's pages (measured: 1002 of 1024), then reuse


def test_a_users_own_malloc_setting_wins() -> None:
    applied, _ = _run("kept", MALLOC_MMAP_THRESHOLD_="1048576")
    assert applied == "False"


def test_idempotent() -> None:
    assert keep_freed_blocks_in_heap() == keep_freed_blocks_in_heap()
