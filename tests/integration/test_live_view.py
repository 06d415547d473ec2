"""Reading reads what is asked for: live sample columns when used, pools in windows, trains
a window of iterations at a time.

A live file of waveforms can be far larger than memory; opening it, listing PVs and
iterations must not read its element pools, and one PV's samples read its rows, not the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from bridge_support import assert_same
from test_hdf5_roundtrip import record, same

from recorder import reader
from recorder.client.values import PVSample
from recorder.reader import RecordingFile, open_file
from recorder.sinks import livefile


@contextmanager
def _live(tmp_path: Path, n_iter: int) -> Iterator[
        tuple[RecordingFile, livefile.LiveView, dict[str, list[PVSample]]]]:
    """The round-trip fixture's recording, flushed and opened while still live."""
    rec, sent = record(tmp_path, n_iter=n_iter)
    rec.flush()
    assert rec.current_path is not None
    with open_file(rec.current_path) as f:
        assert f._live is not None
        yield f, f._live, sent
    rec.close()


def test_open_reads_no_samples_and_pools_in_windows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(livefile, "WINDOW_BYTES", 1024)
    with _live(tmp_path, 30) as (f, view, sent):
        assert set(f.pv_names) == set(sent)
        assert len(f.iterations()["iter_index"]) == 30
        assert view.samples.loaded == {}  # nothing of /live/samples read yet
        assert all(not p.windows for p in view.pools.values())
        assert len(f.times("W")) == 30
        assert set(view.samples.loaded) == {"pv", "time"}
        for pv in ("W", "WI", "IMG", "S"):
            same(f.samples(pv), sent[pv])
        pools = [p for p in view.pools.values() if p.n]
        assert pools and all(len(p.windows) <= livefile.WINDOWS_KEPT for p in pools)
        # the float32 pool of W (up to 87 elements a row) spans many 1 KiB windows
        assert max(p.n * p.dtype.itemsize for p in pools) > 4 * 1024


def test_rows_read_in_blocks_beyond_the_cache_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(livefile, "SAMPLE_CACHE_BYTES", 0)
    monkeypatch.setattr(livefile, "BLOCK_ROWS", 7)
    with _live(tmp_path, 12) as (f, view, sent):
        for pv, samples in sent.items():
            same(f.samples(pv), samples)
            assert len(f.times(pv)) == len(samples)
        assert set(view.samples.loaded) == {"pv"}  # only the PV index column, kept
        assert f.first_count("F32")[1].tolist() == [1] * 12


@pytest.mark.parametrize("window_values", [1, 40, 65_536])
def test_trains_read_a_window_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        window_values: int) -> None:
    """trains() over windows of iterations (1, a few, all) gives what it gives from every
    PV's samples held in memory, on the live and the finalized file, and keeps none."""
    rec, _ = record(tmp_path, n_iter=12)
    rec.flush()
    live = rec.current_path
    assert live is not None

    def both(path: Path) -> None:
        with open_file(path) as whole:
            for pv in whole.pv_names:
                whole.samples(pv)  # cached: trains() slices them
            expected = list(whole.trains())
        monkeypatch.setattr(reader, "TRAIN_WINDOW_VALUES", window_values)
        with open_file(path) as f:
            got = list(f.trains())
            assert f._cache == {}  # nothing kept beyond a window
        monkeypatch.undo()
        assert len(got) == len(expected) == 12
        for a, b in zip(got, expected, strict=True):
            assert_same(a, b)

    both(live)
    (final,) = rec.close()
    both(final)
