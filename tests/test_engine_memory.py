"""engine/memory.py: after raise_malloc_thresholds(), memory freed by one step is reused by the next without page
faults. Measured with the kernel's own minor-fault counter in fresh processes; the same allocation pattern
without the call is the control that shows the pattern does fault (so this test fails if the call does nothing)."""
import platform
import subprocess
import sys
import textwrap

import pytest

# three 10 MiB blocks per "step", all freed at its end: glibc's default (dynamic) thresholds mmap them at first,
# then take them from the heap and trim the heap's 30 MiB top after the step, so every step faults them in again
PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from minimind.engine.memory import raise_malloc_thresholds
    if sys.argv[1] == "tuned":
        assert raise_malloc_thresholds()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, steps = 10 << 20, 8
    faults = []
    for step in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [libc.malloc(size) for _ in range(3)]
        for b in blocks:
            ctypes.memset(b, 1, size)
        for b in blocks:
            libc.free(b)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    pages = 3 * size // resource.getpagesize()
    print(sum(faults[2:]) / (pages * (steps - 2)))
""")


def _faults_per_page(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    return float(out.stdout)


def test_freed_memory_is_reused_without_page_faults():
    if platform.libc_ver()[0] != "glibc":  # asked without calling it: this process's malloc stays as it is
        pytest.skip("malloc is not glibc's here: raise_malloc_thresholds() changes nothing")
    control, tuned = _faults_per_page("default"), _faults_per_page("tuned")
    assert control > 0.5, f"the probe's pattern should fault with malloc's defaults ({control:.2f} faults/page)"
    assert tuned < 0.05, f"freed blocks were faulted in again: {tuned:.2f} faults per page and step"
