"""The C heap under a long-running worker: what it holds, and giving its free pages back.

CPU inference allocates activations of a different shape every step. glibc keeps what those
tensors free inside its arenas and returns only the top of a heap to the OS, so a worker's RSS
wanders tens of MB above what it really uses and creeps upwards as the arenas fragment. The
soak (BENCHMARKS.md) measured this: the heap in use flat, RSS still rising. `malloc_trim(0)`
hands every free page inside the arenas back (madvise), which keeps RSS at what the process
uses. Done from the engine thread between steps, every `interval_s` at most, it costs a few ms
where a step costs tens to hundreds.

Setting MALLOC_TRIM_THRESHOLD_ instead (as Dask's nanny does) also flattens RSS, but it turns
off glibc's dynamic mmap threshold, so every large activation is mmapped and page-faulted anew:
the same 96 requests on the default model took 124 s that way, 89 s untouched and 85 s with a
trim after every 16. On a non-glibc libc the functions here do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable
from functools import cache

TRIM_INTERVAL_S = 10.0  # what the engine loops use


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@cache
def _libc() -> ctypes.CDLL | None:
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    libc = ctypes.CDLL(path)
    if not (hasattr(libc, "malloc_trim") and hasattr(libc, "mallinfo2")):  # glibc >= 2.33
        return None
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def heap_in_use_bytes() -> int | None:
    """Bytes the C heap has allocated and not freed (every arena, plus chunks glibc mmapped
    on their own), or None without glibc."""
    libc = _libc()
    if libc is None:
        return None
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


def trim() -> bool:
    """Give the heap's free pages back to the OS. True if glibc released any."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


class HeapTrimmer:
    """Calls `trim()` at most every `interval_s`, and only after work has been done since the
    last call (an idle worker's heap does not fragment). 0 turns it off."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self._clock = clock
        self._last = clock()
        self._dirty = False
        self.trims = 0

    def worked(self) -> None:
        self._dirty = True

    def maybe_trim(self) -> bool:
        """Trim if due; True if it trimmed."""
        if not self._dirty or self.interval_s <= 0:
            return False
        now = self._clock()
        if now - self._last < self.interval_s:
            return False
        trim()
        self._last, self._dirty = now, False
        self.trims += 1
        return True
