"""glibc malloc settings for a process that runs for months and reloads often.

A reload frees and allocates megabytes at once: the loops' packet arenas (4 MiB each),
pyroute2's 256 KiB netlink receive buffers, Python objects. Left to itself, glibc raises
its mmap threshold the first time it frees a large mmap()ed block, so from then on those
buffers are carved from the heaps, where the small long-lived objects allocated around
them pin the pages: the resident size crept up by a few KiB per reload without anything
being live (heaptrack: the live heap stayed flat over 300 reloads while RSS grew 3 MB).

  - a fixed M_MMAP_THRESHOLD keeps every block of 128 KiB or more in its own mapping,
    returned to the kernel when freed;
  - malloc_trim(0) after a reload hands back the free pages inside the heaps.

Without glibc (musl, say) both are skipped: the forwarder works the same, its RSS may
creep."""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("fanpkt")

M_MMAP_THRESHOLD = -3       # <malloc.h>
MMAP_THRESHOLD = 128 << 10  # glibc's own starting value, made fixed

try:
    _libc = ctypes.CDLL(None)
    _mallopt, _malloc_trim = _libc.mallopt, _libc.malloc_trim
except (OSError, AttributeError):   # pragma: no cover - not glibc
    _mallopt = _malloc_trim = None


def settle() -> bool:
    """Fix the mmap threshold; call once, before the loops' threads start. False if this
    libc has no mallopt."""
    if _mallopt is None:            # pragma: no cover
        return False
    if _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:     # pragma: no cover
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")
        return False
    return True


def trim() -> None:
    """Return the heaps' free pages to the kernel (after a reload: a few ms)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
