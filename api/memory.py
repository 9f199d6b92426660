"""Giving freed memory back to the system after streams end.

glibc's malloc keeps what Python frees in its arenas, so after a burst of large
frames (a slow client's pending events, a replay's pages) the process's RSS
stays at its peak for good, which looks like a leak and counts against the
container's memory limit. `malloc_trim` returns the free pages. It costs a walk
of the heap, so it runs at most once a second, a second after a stream ends,
not once per stream.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging

logger = logging.getLogger("sandstream.api")

_TRIM_DELAY_SECONDS = 1.0


def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None)
    except OSError:
        return None


_trim = _malloc_trim()  # None off glibc (musl, macOS): nothing to do there
_scheduled = False


def trim_soon() -> None:
    """Ask for freed memory to be given back shortly (once for many callers)."""
    global _scheduled
    if _trim is None or _scheduled:
        return
    _scheduled = True
    asyncio.get_running_loop().call_later(_TRIM_DELAY_SECONDS, _run)


def _run() -> None:
    global _scheduled
    _scheduled = False
    assert _trim is not None
    _trim(0)
