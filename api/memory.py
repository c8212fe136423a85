"""Keep the service's resident memory bounded under concurrent streams (glibc only).

Each thread that allocates gets its own malloc arena by default (up to 8 per core), and
freed memory stays in the arenas: after a burst of parallel streams RSS stays near its
peak. The service caps the arenas at startup and hands free pages back to the system when
a stream ends. Elsewhere (musl, macOS) both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["limit_malloc_arenas", "release_free_memory"]

logger = logging.getLogger("wsi_sampler.api.memory")
_M_ARENA_MAX = -8  # glibc's mallopt parameter number for M_ARENA_MAX


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        return None
    return libc


_LIBC = _libc()


def limit_malloc_arenas(arenas: int) -> None:
    """Cap glibc's malloc arenas (as ``MALLOC_ARENA_MAX`` would at process start)."""
    if _LIBC is not None and arenas > 0 and _LIBC.mallopt(_M_ARENA_MAX, arenas) != 1:
        logger.debug("mallopt(M_ARENA_MAX, %d) was refused", arenas)


def release_free_memory() -> None:
    """Return free heap pages to the system (glibc ``malloc_trim``)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
