"""Kernels room (memory): arrays laid out for the kernels (transparent huge pages, cache-line alignment)."""

from __future__ import annotations

import functools
import mmap
from pathlib import Path

import numpy as np

HUGE_PAGE = 2 << 20
HUGE_PAGE_MIN_BYTES = 4 << 20  # arrays from this size go on transparent huge pages where the kernel offers them


def huge_page_array(a: np.ndarray) -> np.ndarray:
    """``a`` itself, or for a large array on Linux a copy in private memory advised for transparent huge pages.

    The kernels stream the index and value arrays once per call; from memory (a large layer after others evicted
    the cache) 4 KiB pages cost a TLB miss every 1024 values and stop the hardware prefetcher at each boundary.
    The mapping must be private: Python's ``mmap(-1, n)`` maps shared memory, which transparent huge pages skip
    unless ``shmem_enabled`` allows it ("never" on this project's hosts; until 2026-12-07 these arrays stayed on
    4 KiB pages). On huge pages the batch-1 product of a 9216x4096 layer at 9%, read from memory (256 MB copied
    before each call), took 0.67 / 0.70 ms (min / median of 30) against 0.69 / 0.73 ms on 4 KiB pages, on this
    project's Intel Xeon (``benchmarks/batch1_cold.py``). Costs at most one huge page of rounding per array."""
    if a.nbytes < HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return a
    try:
        region = mmap.mmap(-1, a.nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return a
    raw = np.frombuffer(region, dtype=np.uint8)  # holds the mapping alive
    skip = -raw.ctypes.data % HUGE_PAGE
    out = raw[skip:skip + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def aligned_zeros(n: int) -> np.ndarray:
    """n int64 zeros starting on a 64-byte boundary (one cache line per hot word)."""
    raw = np.zeros(n + 8, dtype=np.int64)
    skip = (-raw.ctypes.data % 64) // 8
    return raw[skip:skip + n]




@functools.cache
def l2_cache_bytes() -> int:
    """Size of one core's L2 cache as Linux reports it (sysfs), else 512 KiB (this project's AMD EPYC)."""
    try:
        for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return 512 << 10
