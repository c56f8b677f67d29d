"""Freed host memory handed back to the operating system.

glibc's malloc keeps what a thread frees in that thread's arena for reuse. The export frees each unit's tensors
(most of them a few MB: heap memory, below malloc's mmap threshold) once the unit is written, and those free
chunks stayed resident: on a 6-layer DeepSeek-V2-Lite-shaped export the process's resident memory had grown to
about 1.5 GiB with no unit in memory, and peaked at 1.8-2.0 GiB. ``release_freed_memory`` after each unit
(``malloc_trim``) keeps the peak at the units actually held: 1.36 GiB there (bench/README.md, History).
"""

import ctypes
import functools
import sys


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    return libc


def release_freed_memory() -> bool:
    """Hand the free memory of malloc's heaps back to the operating system (glibc's ``malloc_trim(0)``).

    Returns:
        Whether it could be asked (False where the C library is not glibc).
    """
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
