"""Host memory: freed memory handed back to the operating system, and large read buffers on huge pages.

glibc's malloc keeps what a thread frees in that thread's arena for reuse. The export frees each unit's tensors
(most of them a few MB: heap memory, below malloc's mmap threshold) once the unit is written, and those free
chunks stayed resident: on a 6-layer DeepSeek-V2-Lite-shaped export the process's resident memory had grown to
about 1.5 GiB with no unit in memory, and peaked at 1.8-2.0 GiB. ``release_freed_memory`` after each unit
(``malloc_trim``) keeps the peak at the units actually held: 1.36 GiB there (bench/README.md, History).

The price of handing memory back is that the next unit's tensors are fresh pages, zeroed and faulted in one 4 KiB
page at a time while a file is read into them: reading from the page cache into fresh 128 MiB tensors ran at about
1.55 GB/s on the CPU machine against 3.5 GB/s into a reused buffer (``bench/read_alloc.py``). ``advise_huge_pages``
asks the kernel to back a large buffer with 2 MiB transparent huge pages before it is filled (``madvise``, where the
kernel's THP mode is ``madvise`` or ``always``): 2.6 GB/s there, with nothing reused.
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
        libc.madvise.argtypes, libc.madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
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


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h
MIN_HUGE_BYTES = 4 << 20  # a smaller buffer holds at most one whole huge page


def advise_huge_pages(t):
    """Ask for transparent huge pages under the whole 2 MiB pages inside CPU tensor ``t``'s buffer, before it is
    written; returns ``t``. Nothing is asked for a buffer under ``MIN_HUGE_BYTES``, off Linux, or without glibc; a
    kernel without THP refuses quietly (the tensor is the same either way, only its page faults differ)."""
    libc = _libc()
    nbytes = t.numel() * t.element_size()
    if libc is None or t.device.type != "cpu" or nbytes < MIN_HUGE_BYTES:
        return t
    start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # the first 2 MiB boundary inside the buffer
    end = (t.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
    if end > start:
        libc.madvise(start, end - start, MADV_HUGEPAGE)
    return t
