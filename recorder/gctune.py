"""Garbage-collector tuning shared by the daemon and its writer processes."""

from __future__ import annotations

import ctypes
import functools
import gc
import time
from collections.abc import Callable
from typing import cast

GC_THRESHOLDS = (50_000, 10, 10)  # default (700, 10, 10): see tune_gc


def tune_gc() -> None:
    """Garbage-collector settings for the long-running daemon, applied once it has connected
    and before any run consumes.

    Objects alive after start-up (modules, settings, the client) are frozen out of the
    collector's view, and young-generation collections run every 50,000 net container
    allocations instead of 700: at high rates the default thresholds made the collector
    re-scan the whole heap over and over (~25 % of the CPU draining a pre-filled topic, see
    benchmarks/bench_e2e.py). Memory is still bounded: objects are freed by reference
    counting, cycles at the next (rarer) collection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


UPKEEP_GC_S = 60.0
"""How often :class:`MemoryUpkeep` runs a full collection: with the thresholds above, up to
~50,000 young objects of cyclic garbage (closures of the pure-Python JSON encoder, futures,
tracebacks) waited for a collection, and each such peak left pymalloc arenas behind."""
UPKEEP_TRIM_S = 300.0
"""How often :class:`MemoryUpkeep` hands free heap memory back to the system
(glibc's ``malloc_trim(0)``, 1-100 ms): free chunks kept inside glibc's heaps were most of a
soaked daemon's RSS growth (17.7 MB of 121 MB given back after 24 minutes)."""


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast("Callable[[int], int]", trim)


class MemoryUpkeep:
    """Periodic memory upkeep of a long-running process, from its main loop: a full garbage
    collection every :data:`UPKEEP_GC_S` (cheap: what :func:`tune_gc` froze is not scanned)
    and ``malloc_trim(0)`` every :data:`UPKEEP_TRIM_S`. ``maybe_run`` is a comparison when
    nothing is due."""

    def __init__(self, gc_every_s: float = UPKEEP_GC_S, trim_every_s: float = UPKEEP_TRIM_S,
                 *, now: float | None = None) -> None:
        start = time.monotonic() if now is None else now
        self._gc_every, self._trim_every = gc_every_s, trim_every_s
        self._next_gc, self._next_trim = start + gc_every_s, start + trim_every_s
        self.collections = self.trims = 0

    def maybe_run(self, now: float) -> None:
        if now < self._next_gc:
            return
        self._next_gc = now + self._gc_every
        gc.collect()
        self.collections += 1
        if now >= self._next_trim:
            self._next_trim = now + self._trim_every
            trim = _malloc_trim()
            if trim is not None:
                trim(0)
                self.trims += 1
