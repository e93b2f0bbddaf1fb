"""Keep freed memory in the process instead of handing it back to the OS after every step.

Each engine step allocates its activations afresh (torch's CPU allocator calls malloc). glibc returns a freed
block to the kernel when it was mmap'd (above M_MMAP_THRESHOLD, which starts at 128 KiB) or sits at the top of
a heap beyond M_TRIM_THRESHOLD; the next step then page-faults and zeroes the same memory again. The cost: the
process keeps its peak transient memory instead of returning it between steps. `LLM` calls this unless built with
keep_freed_memory=False.
"""
from __future__ import annotations

import ctypes

# mallopt(3) parameters
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
TRIM_THRESHOLD = 1 << 30  # free memory at a heap's top is kept up to this much
TOP_PAD = 64 << 20  # each heap extension asks for this much extra (untouched pages cost nothing)
MMAP_THRESHOLD = 32 << 20  # blocks up to this come from the heap (glibc's maximum on 64-bit)


def raise_malloc_thresholds() -> bool:
    """Raise glibc's trim and mmap thresholds for this process; False where malloc is not glibc's (musl,
    macOS, Windows), which changes nothing. Idempotent."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: libc is loaded already (no library search)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has both
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = [mallopt(param, value) for param, value in  # each one tried: a refused one leaves the others set
            ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))]
    return all(d == 1 for d in done)
