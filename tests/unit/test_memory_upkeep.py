"""MemoryUpkeep: a full collection every minute and malloc_trim every five, from a loop."""

from __future__ import annotations

import gc

import pytest

from recorder import gctune
from recorder.gctune import MemoryUpkeep


def test_collections_and_trims_come_when_due(monkeypatch: pytest.MonkeyPatch) -> None:
    collected: list[int] = []
    trimmed: list[int] = []
    monkeypatch.setattr(gctune.gc, "collect", lambda *a: collected.append(1) or 0)
    monkeypatch.setattr(gctune, "_malloc_trim", lambda: lambda pad: trimmed.append(pad) or 1)
    up = MemoryUpkeep(60.0, 300.0, now=1000.0)
    for t in range(1000, 1000 + 601, 5):  # a loop pass every 5 s for 10 minutes
        up.maybe_run(float(t))
    assert len(collected) == up.collections == 10
    assert trimmed == [0, 0] and up.trims == 2


def test_garbage_cycles_are_collected_and_memory_trimmed_for_real() -> None:
    """Not vacuous: a real collection frees cycles the raised thresholds leave waiting, and
    glibc's malloc_trim is found (the daemon's hosts run glibc)."""
    assert gctune._malloc_trim() is not None

    class Node:
        def __init__(self) -> None:
            self.me = self

    old = gc.get_threshold()
    gc.set_threshold(1_000_000, 10, 10)  # as tune_gc: young collections far apart
    try:
        for _ in range(1000):
            Node()
        waiting = sum(isinstance(o, Node) for o in gc.get_objects())
        up = MemoryUpkeep(60.0, 60.0, now=0.0)
        up.maybe_run(60.0)
        assert waiting == 1000 and up.collections == up.trims == 1
        assert not any(isinstance(o, Node) for o in gc.get_objects())
    finally:
        gc.set_threshold(*old)
