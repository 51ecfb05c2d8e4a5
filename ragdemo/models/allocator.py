"""The CPU allocator setting every CPU load applies once per process (see `keep_freed_memory`)."""
from __future__ import annotations

import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to this come from the heap, not a fresh mmap
TRIM_THRESHOLD = 1 << 30  # freed heap memory is kept up to this, not handed back to the system


@functools.cache
def keep_freed_memory() -> str:
    """Have glibc's malloc reuse freed memory instead of returning it to the system, once per process.

    Every forward allocates activations and caches of a few MB. By default glibc serves such blocks with a
    fresh mmap (or trims the heap after a free), so each answer page-faults its buffers back in: in a VM that
    cost up to 10 ms of a 2 ms cache assembly, and varied with whatever ran before (measured interleaving RAG,
    BTR and LLoCO). The same reason PyTorch's CPU tuning guides preload jemalloc or tcmalloc. The cost is that
    the process keeps its peak memory. Returns what was done, for bench-speed."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        done = False
    if not done:
        return "allocator: the system's default (no glibc mallopt here)"
    return (f"allocator: glibc keeps freed memory for reuse (mmap threshold {MMAP_THRESHOLD >> 20} MB, trim threshold "
            f"{TRIM_THRESHOLD >> 20} MB), so answers do not page-fault their buffers back in")


def release_freed_memory() -> bool:
    """Hand the heap's free memory back to the system now (after a model is unloaded: `keep_freed_memory` keeps
    up to a GB otherwise). False where glibc's malloc_trim does not exist."""
    try:
        import ctypes
        import ctypes.util

        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
