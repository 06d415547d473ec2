"""Reading reads what is asked for: live sample columns when used, pools in windows, trains
a window of iterations at a time.

A live file of waveforms can be far larger than memory; opening it, listing PVs and
iterations must not read its element pools, and one PV's samples read its rows, not the file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from bridge_support import assert_same
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pv_mutations import FIELD_MUTATIONS, mutated_iterations
from test_hdf5_roundtrip import record, same

from recorder import reader
from recorder.client.values import PVSample
from recorder.reader import RecordingFile, open_file
from recorder.sim.encoding import Float32, pack
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


def test_trains_of_a_finalized_file_hold_a_block_of_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trains() of a finalized file held every PV's first/count index whole: 16 bytes per
    PV and iteration, more than the file for a sparse recording (2,000 PVs x 10,000
    iterations, each PV in one of ten: a 22 MB file, 442 MB peak). It reads a block of
    iterations of it at a time, and the trains are the same, across blocks too."""
    import tracemalloc

    from test_hdf5_roundtrip import record_closed

    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions

    n_pvs, n_iter = 100, 1000
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="sparse")
    path, _ = record_closed(rec, n_iter, lambda i: [
        PVSample(f"P{k}", {"value": float(i)}) for k in range(n_pvs) if (i + k) % 10 == 0])
    with open_file(path) as whole:
        expected = list(whole.trains())
    monkeypatch.setattr(reader, "TRAIN_WINDOW_VALUES", 50)  # 10 iterations a window
    monkeypatch.setattr(reader, "INDEX_BLOCK_ENTRIES", n_pvs * 25)  # 2 windows a block
    with open_file(path) as f:
        for pv in f.pv_names:  # the per-PV caches (descriptions, group members)
            f.samples_range(pv, 0, 1)
        tracemalloc.start()
        try:
            n = 0
            for got, want in zip(f.trains(), expected, strict=True):
                assert_same(got, want)
                n += 1
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert n == n_iter
    assert peak < n_pvs * n_iter * 16 // 2, peak  # the whole index: 1.6 MB


def _mixed(i: int) -> list[PVSample]:
    """PVs whose flat fields come from templates, and rows that must not (flags and kinds
    changing, messages of every sort, uint64 values on both sides of int64's range)."""
    ts = {"secondsPastEpoch": 1_700_000_000 + i, "nanoseconds": 7 * i, "userTag": 0}
    flap = "HIGH" if (i // 3) % 2 else "NO_ALARM"
    alarm = {"severity": 2 if flap == "HIGH" else 0, "status": 3 if flap == "HIGH" else 0,
             "message": flap}
    display = {"units": "A", "limitLow": -1.0, "form": {"index": 0, "choices": ["a", "b"]}}
    odd = [None, 7, "a\x00b", "ok", "ok", "fine"][i % 6]
    return [
        PVSample("FLAP", {"value": float(i), "alarm": alarm, "timeStamp": ts,
                          "display": display}),
        PVSample("F32", {"value": float(i) / 4, "alarm": dict(alarm), "timeStamp": ts},
                 frozenset({"value"})),
        PVSample("U", {"value": 5 if i % 2 else 2**64 - 1 - i, "timeStamp": ts}),
        PVSample("E", {"value": {"index": i % 3, "choices": ["x", "y", "z"]}, "timeStamp": ts,
                       "alarm": {"severity": 0, "status": 0, "message": odd}}),
        PVSample("S", {"value": f"text {i}", "timeStamp": ts}),
        PVSample("W", {"value": [float(x) for x in range(i % 4)], "timeStamp": ts},
                 frozenset({"value"})),
        PVSample("X", {"value": 1 if i < 10 else 1.5 if i < 20 else "s", "timeStamp": ts}),
        PVSample("NT", {"value": 1.0} if i % 5 else {"value": 2.0, "timeStamp": ts}),
    ]


def test_trains_from_templates_equal_trains_from_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finalized file's trains(): rows sharing a metadata entry and flags reuse the first
    one's flat fields; the result equals trains from every sample flattened in full, key
    order included, and no two trains share a mutable field."""
    from test_hdf5_roundtrip import record_closed

    from recorder.sinks.bridge.mapping import FlatTemplate
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions

    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="tmpl")
    path, _ = record_closed(rec, 30, _mixed)
    with open_file(path) as whole:
        for pv in whole.pv_names:
            whole.samples(pv)  # cached: trains() flattens every sample
        expected = list(whole.trains())
    served = []
    real_row = FlatTemplate.row

    def spy(self: FlatTemplate, *args: object) -> object:
        got = real_row(self, *args)  # type: ignore[arg-type]
        served.append(got is not None)
        return got

    monkeypatch.setattr(FlatTemplate, "row", spy)
    monkeypatch.setattr(reader, "TRAIN_WINDOW_VALUES", 40)  # several windows
    with open_file(path) as f:
        got = list(f.trains())
    assert len(got) == len(expected) == 30
    for (data, meta), (data_x, meta_x) in zip(got, expected, strict=True):
        assert_same((data, meta), (data_x, meta_x))
        assert list(data) == list(data_x)
        for source in data:
            assert list(data[source]) == list(data_x[source]), source
    # not vacuous: most of the 240 rows came from templates (each window of 5 iterations
    # starts one per PV and flags; X's string rows and NT's rows without timeStamp: none)
    assert sum(served) > 120
    # lists are each train's own (trains 1 and 2: both from the template of window 0)
    got[1][0]["FLAP"]["display.form.choices"].append("c")
    assert got[2][0]["FLAP"]["display.form.choices"] == ["a", "b"]
    assert got[1][0]["E"]["value.choices"] is not got[2][0]["E"]["value.choices"]


@st.composite
def _mutated_streams(draw: st.DrawFn) -> list[list[PVSample]]:
    """Iterations of a few simulator PVs, each value randomly mutated: values of other types
    and sizes, alarms beyond int32, messages, timestamps outside the storable range."""
    iterations = mutated_iterations(
        draw, max_iterations=12, mutations=FIELD_MUTATIONS, max_mutations=3,
        values=st.one_of(st.floats(), st.integers(-(2**63), 2**64 - 1), st.booleans(),
                         st.text(max_size=3)),
        messages=["", "HIHI", "LOLO", "é", None], limits=[0, 0.0, -1.0, True])
    out = []
    for samples in iterations:
        built = []
        for pv, s, _muts in samples:
            value = s["value"]
            if "FLOAT" in pv and isinstance(value, float) and (
                    math.isnan(value) or abs(value) <= 3.4e38):  # float32's range
                s["value"] = Float32(value)
            built.append(PVSample.from_raw(pv, pack(s), 0))  # as the client builds them
        out.append(built)
    return out


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(stream=_mutated_streams(), window=st.sampled_from([1, 7, 65_536]))
def test_property_trains_from_templates(tmp_path_factory: pytest.TempPathFactory,
                                        stream: list[list[PVSample]], window: int) -> None:
    """Whatever the values and structures, a finalized file's samples are those sent, and
    its trains() equal trains from every sample flattened in full (key order included)."""
    from test_hdf5_roundtrip import record_closed

    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions

    directory = tmp_path_factory.mktemp("prop")
    rec = HDF5Recording(OutputOptions(directory=directory), run_name="prop")
    path, sent = record_closed(rec, len(stream), lambda i: stream[i])
    with open_file(path) as whole:
        for pv in whole.pv_names:
            same(whole.samples(pv), sent[pv])
        expected = list(whole.trains())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reader, "TRAIN_WINDOW_VALUES", window)
        with open_file(path) as f:
            got = list(f.trains())
    assert len(got) == len(expected) == len(stream)
    for (data, meta), (data_x, meta_x) in zip(got, expected, strict=True):
        assert_same((data, meta), (data_x, meta_x))
        for source in data:
            assert list(data[source]) == list(data_x[source]), source


def test_pv_info_of_a_live_file_reads_no_values(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``pv_info(pv)`` of a live file: the PV's count and the kind the finalized file gives
    it, from the sample columns. It rebuilt and kept every sample of the PV (a camera's
    frames as Python lists: the file's pools read whole, memory many times the file), and
    said the first sample's kind: ``array`` for a string-array PV whose first value was
    ``[]``, which finalization makes a ``string_array`` (docs/file-format.md)."""
    monkeypatch.setattr(livefile, "WINDOW_BYTES", 1024)
    rec, sent = record(tmp_path, n_iter=6)
    rec.flush()
    assert rec.current_path is not None
    with open_file(rec.current_path) as f:
        view = f._live
        assert view is not None
        live = {pv: f.pv_info(pv) for pv in sent}
        assert all(not p.windows for p in view.pools.values())  # no element read
        assert f._cache == {}
    (final,) = rec.close()
    with open_file(final) as f:
        for pv, samples in sent.items():
            assert live[pv] == {"pv_name": pv, "count": len(samples),
                                "kind": f.pv_info(pv)["kind"]}, pv
