"""output.max_buffer_bytes: a recording flushes early once it buffers this much."""

from __future__ import annotations

from pathlib import Path

from recorder.client.events import IterationClosed, IterationOpened, IterationStatus, ValuesReceived
from recorder.client.values import PVSample
from recorder.reader import open_file
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions

LIMIT = 64 * 1024


def _iteration(rec: HDF5Recording, i: int, *, close: bool = True) -> None:
    rec.handle(IterationOpened("t", "s", i, i, offset=3 * i))
    wave = [float(i * 1000 + x) for x in range(128)]
    rec.handle(ValuesReceived("t", i, 1, i, (PVSample("W", {"value": wave}),), offset=3 * i + 1))
    if close:
        rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i,
                                   offset=3 * i + 2))


def test_the_buffer_limit_flushes_early(tmp_path: Path) -> None:
    rec = HDF5Recording(OutputOptions(directory=tmp_path, max_buffer_bytes=LIMIT,
                                      flush_interval_s=3600), run_name="b", clock=lambda: 0.0)
    for i in range(1, 200):
        _iteration(rec, i)
    # ~1 KiB a value: a flush every ~64 iterations, not one per event, not none
    assert 2 <= rec.counters["flushes"] <= 6
    assert rec.last_durable_offset[("t", 0)] > 3 * 100
    rec.close()


def test_iterations_held_behind_an_open_one_do_not_flush_at_every_event(
        tmp_path: Path) -> None:
    """Iterations after one still open wait in memory (they are stored in order): past the
    limit, every event used to flush (nothing it could write: an empty commit, ~2 ms each,
    so the writer fell behind exactly while data piled up)."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path, max_buffer_bytes=LIMIT,
                                      flush_interval_s=3600), run_name="b", clock=lambda: 0.0)
    _iteration(rec, 1, close=False)  # its tail is late
    for i in range(2, 400):
        _iteration(rec, i)
    assert rec.counters["flushes"] <= 6
    rec.handle(IterationClosed("t", "s", 1, IterationStatus.COMPLETE, None, 1, 1, offset=5))
    for i in range(400, 500):
        _iteration(rec, i)
    assert rec.counters["flushes"] <= 12  # once released, written in flushes of the limit
    (path,) = rec.close()
    f = open_file(path)
    try:
        assert f.iterations()["iter_index"].tolist() == list(range(1, 500))
        assert f.values("W")[:, 0].tolist() == [i * 1000.0 for i in range(1, 500)]
    finally:
        f.close()
