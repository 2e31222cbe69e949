"""How a codec worker's process allocates host memory.

A batch of 768x512 images makes activations of tens to hundreds of megabytes per layer. glibc's
malloc serves blocks that large with ``mmap`` and gives them back to the kernel on ``free``, so
every layer of every batch page-faults its output in again, zero-filled by the kernel: on the
2-core machine of docs/performance.md, about 30 % of CompressAI's own encode loop. Keeping freed memory in
the process (no ``mmap`` for large blocks, no trimming of the heap) removes the faults; the price is
that a worker's resident memory stays at its peak instead of shrinking between batches, which a
worker that codes batch after batch reaches again at once anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # the largest value the parameter takes: the heap is never given back


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse in this process; False where that does not apply (not
    Linux/glibc). Affects later allocations only, so call it before a worker builds its model."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        return False
    applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    if not applied:
        log.debug("mallopt refused; large blocks stay mmap'ed")
    return applied
