"""Freed memory kept for reuse: what spares the commands a page fault per fresh activation.

torch's CPU tensors come from the C library's `malloc`. glibc gives large blocks back to the
system when they are freed (it unmaps them, or trims the top of its heap), so the next tensor of
that size is fresh memory again, and the kernel faults in and zeroes every 4 KiB page of it on
first touch. A sweep frees and makes the same activations thousands of times: on the default job
the process took 1.0-1.9 million page faults. With blocks up to 32 MiB served from the heap and up
to 1 GiB of freed heap kept, it takes 0.28x as many, and 0.60x the system CPU time; the sweep
took 0.91x the time, the whole job the same within noise (`benchmarks/job_speed.py
--allocator-too`, docs/performance.md).

The commands (`probe.commands.runner.run_command`) do this for their own process, and so does a command's
`main()` called from Python; the library's functions never change the allocator. Where the user
has set glibc's malloc tunables (GLIBC_TUNABLES with `glibc.malloc`, or MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_), or the C library is not glibc, nothing is changed.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["keep_freed_memory"]

# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: blocks below this come from the heap, reused when freed
TRIM_THRESHOLD = 2**30  # freed heap at the top kept up to this much before it goes back to the system


def keep_freed_memory(environ: dict | None = None) -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse (see the module docstring). True when
    both settings took; False where the user set malloc's tunables, there is no glibc, or glibc
    refused one."""
    environ = os.environ if environ is None else environ
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", "") or any(
            environ.get(name) for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process already has
    except (OSError, AttributeError):  # another C library (macOS, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Both, whatever the first says (mallopt returns 0 for a value it refuses).
    results = [mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    return all(results)
