"""Keep the CPU networks' activations on glibc's heap.

glibc's ``malloc`` serves a request above its mmap threshold with a fresh ``mmap`` and unmaps it
on ``free``; the threshold adapts upwards only to 32 MB. The encoder's full-resolution activations
of a batch of 16 crops are 33.5 MB each (16 x 32 channels x 128 x 128 floats), so every one of
them came from new pages: about 1,000 page faults per face, 3 ms of kernel time per face, and
then the first pass over each tensor (a batch norm, a PReLU) ran at page-fault speed. Served from
the heap, and the heap not trimmed between batches, the same memory is reused batch after batch:
no faults, and the encoder took 0.7x the CPU time (16 against 22-24 ms per face, one thread).

The setting is process-wide and raises a process's resident memory by at most
``KEEP_FREED_BYTES`` of freed heap; it applies where the C library is glibc and is a no-op
elsewhere (musl, macOS and Windows have their own allocators).
"""
from __future__ import annotations

import ctypes
import functools
import logging

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# requests up to this size come from the heap: a batch of 32 full-resolution activations fits
HEAP_SERVED_BYTES = 96 << 20
# freed memory at the heap's top up to this size stays mapped for the next batch
KEEP_FREED_BYTES = 256 << 20


@functools.cache
def keep_activations_on_heap() -> bool:
    """Apply the setting once per process; True where it took effect."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, HEAP_SERVED_BYTES) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES) == 1
    log.debug("glibc malloc: heap serves up to %d MB, keeps %d MB freed: %s", HEAP_SERVED_BYTES >> 20, KEEP_FREED_BYTES >> 20, ok)
    return ok
