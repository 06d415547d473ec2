"""Garbage-collector tuning shared by the daemon and its writer processes."""

from __future__ import annotations

import gc

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
