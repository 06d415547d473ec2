"""Analysts' view across PVs: each PV's value per iteration (``by_iteration``), and PVs side by
side in one table (``table``), from real files: finalized, still being written, and a
recording split into segments whose PV list changed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from test_hdf5_roundtrip import write_iteration

from recorder.client.values import PVSample
from recorder.reader import RecordingFile, open_file, open_recording
from recorder.sinks.codec import F_VALUE
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions, SegmentOptions

N = 6


def _ts(i: int, k: int = 0) -> dict[str, Any]:
    return {"secondsPastEpoch": 1_700_000_000 + i, "nanoseconds": 1000 * k, "userTag": 0}


def samples_of(i: int) -> list[PVSample]:
    """Iteration i: A every time; B (int) not in iteration 2; S (string) not in 1; W a
    waveform; E an enum; T twice per iteration (timedbuffered-like), not at all in 4;
    iteration 5 holds A only."""
    out = [PVSample("A", {"value": 0.5 * i, "timeStamp": _ts(i)})]
    if i == 5:
        return out
    if i != 2:
        out.append(PVSample("B", {"value": 10 * i, "timeStamp": _ts(i)}))
    if i != 1:
        out.append(PVSample("S", {"value": f"s{i}", "timeStamp": _ts(i)}))
    out.append(PVSample("W", {"value": [float(i + k) for k in range(4)], "timeStamp": _ts(i)}))
    out.append(PVSample("E", {"value": {"index": i % 2, "choices": ["Off", "On"]},
                              "timeStamp": _ts(i)}))
    if i != 4:
        out += [PVSample("T", {"value": 100.0 * i + k, "timeStamp": _ts(i, k)}) for k in (1, 2)]
    return out


def recording(tmp_path: Path, **opts: Any) -> HDF5Recording:
    rec = HDF5Recording(OutputOptions(directory=tmp_path, **opts), run_name="aligned")
    for i in range(N):
        write_iteration(rec, i, samples_of(i))
    return rec


def check(f: Any) -> None:
    its = f.iterations()["iter_index"]
    assert its.tolist() == list(range(N))

    a = f.by_iteration("A")
    assert a.dtype == np.float64 and not a.mask.any()
    assert a.data.tolist() == [0.5 * i for i in range(N)]

    b = f.by_iteration("B")
    assert b.dtype == np.int64 and b.mask.tolist() == [i in (2, 5) for i in range(N)]
    assert b.data.tolist() == [0, 10, 0, 30, 40, 0]  # masked: 0, never a neighbour's value

    t_last, t_first = f.by_iteration("T"), f.by_iteration("T", pick="first")
    assert t_last.mask.tolist() == t_first.mask.tolist() == [i in (4, 5) for i in range(N)]
    assert t_last.compressed().tolist() == [100.0 * i + 2 for i in (0, 1, 2, 3)]
    assert t_first.compressed().tolist() == [100.0 * i + 1 for i in (0, 1, 2, 3)]
    assert math.isnan(t_last.data[4])

    w = f.by_iteration("W")
    assert w.shape == (N, 4) and w.mask[5].all() and not w.mask[:5].any()
    assert w[3].tolist() == [3.0, 4.0, 5.0, 6.0]

    table = f.table()
    assert list(table) == ["iter_index", "status", "header_timestamp", "A", "B", "E", "T"]
    assert table["A"].dtype == np.float64 and table["A"].tolist() == a.data.tolist()
    assert table["E"].dtype == np.float64  # not in iteration 5
    assert table["E"].tolist()[:5] == [0, 1, 0, 1, 0] and math.isnan(table["E"][5])
    assert table["B"].dtype == np.float64  # gaps: NaN, as pandas does
    assert [None if math.isnan(x) else x for x in table["B"].tolist()] == [
        0, 10, None, 30, 40, None]
    assert table["status"].tolist() == ["complete"] * N

    some = f.table(["S", "W"])
    assert some["S"].tolist() == ["s0", None, "s2", "s3", "s4", None]
    assert some["W"][5] is None and some["W"][0].tolist() == [0.0, 1.0, 2.0, 3.0]

    with pytest.raises(ValueError, match="pick"):
        f.by_iteration("A", pick="middle")


def test_aligned_values_of_a_live_and_a_finalized_file(tmp_path: Path) -> None:
    rec = recording(tmp_path)
    rec.flush()
    assert rec.current_path is not None
    with open_file(rec.current_path) as live:
        assert live.layout == "live"
        check(live)
        unknown(live)
    (path,) = rec.close()
    with open_file(path) as final:
        check(final)
        unknown(final)


def unknown(f: RecordingFile) -> None:
    """A PV the file does not have: the same KeyError, with hints, in both layouts."""
    for read in (f.values, f.times, f.by_iteration, f.samples, f.pv_info):
        with pytest.raises(KeyError, match=r"no PV 'AA' in .*; did you mean 'A'"):
            read("AA")


def test_aligned_values_across_segments_whose_pv_list_changed(tmp_path: Path) -> None:
    rec = HDF5Recording(OutputOptions(directory=tmp_path,
                                      segment=SegmentOptions(max_iterations=4)),
                        run_name="segments")
    for i in range(N):  # C only from iteration 4 on: the first segment has no C at all
        extra = [PVSample("C", {"value": i, "timeStamp": _ts(i)})] if i >= 4 else []
        write_iteration(rec, i, [PVSample("A", {"value": 0.5 * i, "timeStamp": _ts(i)}),
                                 *extra])
    paths = rec.close()
    assert len(paths) == 2
    with open_recording(paths) as r:
        c = r.by_iteration("C")
        assert c.mask.tolist() == [True] * 4 + [False] * 2
        assert c.compressed().tolist() == [4, 5] and c.dtype == np.int64
        assert c.data.tolist()[:4] == [0] * 4
        table = r.table()
        assert table["segment"].tolist() == [0, 0, 0, 0, 1, 1]
        assert table["A"].tolist() == [0.5 * i for i in range(N)]
        assert [None if math.isnan(x) else x for x in table["C"].tolist()] == [
            None, None, None, None, 4, 5]


def test_a_recording_keeps_dtypes_and_shapes_across_segments(tmp_path: Path) -> None:
    """PVs listed in every segment but with values in only some: int64 stays int64 (exact
    near 2**60), float32 stays float32, also per iteration; a waveform whose length differs
    between segments comes back as one row per value (an object array), not an error; a
    PV name that is in no segment is an error naming it, not an empty array."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path,
                                      segment=SegmentOptions(max_iterations=3)),
                        run_name="dtypes", pv_uris=["pva://I", "pva://F", "pva://W", "pva://A"])
    for i in range(6):
        late = [PVSample("I", {"value": np.int64(2**60 + i), "timeStamp": _ts(i)}),
                PVSample("F", {"value": float(np.float32(0.1 * i)), "timeStamp": _ts(i)},
                         frozenset({"value"}))] if i >= 3 \
            else []
        width = 4 if i < 3 else 6
        write_iteration(rec, i, [
            PVSample("A", {"value": 0.5 * i, "timeStamp": _ts(i)}),
            PVSample("W", {"value": [float(i)] * width, "timeStamp": _ts(i)}),
            *late,
        ])
    paths = rec.close()
    assert len(paths) == 2
    with open_recording(paths) as r:
        assert all("I" in f.pv_names for f in r.files)  # listed, without values in segment 0
        ints = r.values("I")
        assert ints.dtype == np.int64 and ints.tolist() == [2**60 + i for i in (3, 4, 5)]
        assert r.values("F").dtype == np.float32
        assert r.times("I").dtype == np.int64 and len(r.times("I")) == 3
        per_it = r.by_iteration("I")
        assert per_it.dtype == np.int64
        assert per_it.mask.tolist() == [True] * 3 + [False] * 3
        assert per_it.compressed().tolist() == [2**60 + i for i in (3, 4, 5)]
        assert r.by_iteration("F").dtype == np.float32
        # side by side, with gaps: integers beyond 2**53 stay exact (object column, None in
        # the gaps) instead of float64 NaN-filled; float32 keeps NaN in its own dtype
        table = r.table(["I", "F"])
        assert table["I"].dtype == object
        assert table["I"].tolist() == [None] * 3 + [2**60 + i for i in (3, 4, 5)]
        assert table["F"].dtype == np.float32 and np.isnan(table["F"][:3]).all()
        w = r.values("W")
        assert w.dtype == object and [len(x) for x in w] == [4, 4, 4, 6, 6, 6]
        assert w[5].tolist() == [5.0] * 6
        with pytest.raises(KeyError, match=r"no PV 'NOPE' in this recording \(2 file\(s\)\)"):
            r.values("NOPE")
        with pytest.raises(KeyError, match=r"PVs are named without their protocol: 'I'"):
            r.samples("pva://I")
        # a misspelt PV is an error in the aligned views too, not a column of gaps
        with pytest.raises(KeyError, match=r"no PV 'NOPE' in this recording"):
            r.by_iteration("NOPE")
        # the recording's summary: counts summed, times from the first and last segment
        # with values, the kind of the segment with values, no shape where they differ
        summary = {row["pv"]: row for row in r.summary()}
        ns = [(1_700_000_000 + i) * 10**9 for i in range(6)]
        assert (summary["I"]["count"], summary["I"]["first_ns"], summary["I"]["last_ns"]) == (
            3, ns[3], ns[5])
        in_second = {row["pv"]: row for row in r.files[1].summary()}
        assert summary["I"] == {**in_second["I"], "count": 3}
        assert (summary["A"]["count"], summary["A"]["first_ns"]) == (6, ns[0])
        assert summary["A"]["shape"] == () and summary["W"]["shape"] is None
        assert r.pv_info("F") == r.files[0].pv_info("F")
        with pytest.raises(KeyError, match=r"no PV 'NOPE' in this recording"):
            r.pv_info("NOPE")
        with pytest.raises(KeyError, match=r"no PV 'i' in this recording"):
            r.table(["I", "i"])
    with open_file(paths[0]) as f, pytest.raises(KeyError, match=r"did you mean 'A'"):
        f.values("AA")


def test_a_pv_without_a_value_in_the_first_segment_is_typed_by_its_values(
        tmp_path: Path) -> None:
    """A PV whose samples had no value during the first segment (not connected yet) and
    numbers later: the recording's summary gives the kind, dtype and units of its values, as
    the summary of one file holding them all does, not ``none`` from the first segment
    (export left such a PV out)."""
    for name, segment in (("one", SegmentOptions()), ("split", SegmentOptions(max_iterations=2))):
        rec = HDF5Recording(OutputOptions(directory=tmp_path / name, segment=segment),
                            run_name=name)
        for i in range(4):
            write_iteration(rec, i, [
                PVSample("A", {"value": float(i), "timeStamp": _ts(i)}),
                PVSample("X", {"value": None if i < 2 else 10 * i, "timeStamp": _ts(i),
                               "display": {"units": "mm"}})])
        assert len(rec.close()) == (1 if name == "one" else 2)
    with open_recording(tmp_path / "one") as one, open_recording(tmp_path / "split") as split:
        assert [r["kind"] for r in split.files[0].summary() if r["pv"] == "X"] == ["none"]
        want = {r["pv"]: r for r in one.summary()}
        got = {r["pv"]: r for r in split.summary()}
        assert got == want
        assert (got["X"]["kind"], got["X"]["dtype"], got["X"]["count"]) == ("scalar", "int64", 4)


def enum_without_index(i: int) -> list[PVSample]:
    """Iteration i of an enum PV "E" that has no index in iteration 0 (no value at all: the
    first sample) and 2 (an index that is not an integer), none in 3; and "A" every time."""
    choices = ["Off", "On", "Fault"]
    value: Any = {0: None, 2: {"index": None, "choices": choices}}.get(
        i, {"index": 2 if i == 1 else 0, "choices": choices})
    out = [PVSample("A", {"value": 0.5 * i, "timeStamp": _ts(i)})]
    if i != 3:
        out.append(PVSample("E", {"value": value, "timeStamp": _ts(i)}))
    return out


def test_an_enum_sample_without_an_index_reads_as_minus_one(tmp_path: Path) -> None:
    """Where an enum PV's sample has no index, values() and by_iteration() say -1 (not a
    valid index), whichever sample it is and in both layouts; the file's `value` holds its
    fill 0 there with flag 8 clear (docs/file-format.md), which the reader must not return
    (0 is the first choice). table() keeps the -1 and has NaN where the iteration has no
    sample."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="enum")
    for i in range(5):
        write_iteration(rec, i, enum_without_index(i))
    rec.flush()
    assert rec.current_path is not None
    with open_file(rec.current_path) as live:
        check_enum_without_index(live)
    (path,) = rec.close()
    with open_file(path) as final:
        check_enum_without_index(final)
    with h5py.File(path) as h:
        assert h["pvs/E/value"][()].tolist() == [0, 2, 0, 0]  # the format's fill: 0
        assert (h["pvs/E/flags"][()] & F_VALUE).astype(bool).tolist() == [
            False, True, False, True]


def check_enum_without_index(f: Any) -> None:
    values = f.values("E")
    assert values.dtype == np.int64 and values.tolist() == [-1, 2, -1, 0]
    per_it = f.by_iteration("E")
    assert per_it.dtype == np.int64 and per_it.mask.tolist() == [i == 3 for i in range(5)]
    assert per_it.compressed().tolist() == [-1, 2, -1, 0]
    assert {r["pv"]: r["kind"] for r in f.summary()}["E"] == "enum"
    table = f.table()
    assert list(table)[3:] == ["A", "E"]
    assert table["E"].dtype == np.float64
    assert [None if math.isnan(x) else x for x in table["E"].tolist()] == [-1, 2, -1, None, 0]


def test_boolean_and_enum_columns_with_gaps(tmp_path: Path) -> None:
    """table(): a boolean PV without gaps stays bool; with gaps it is float64 0.0/1.0 with
    NaN (numbers, as aligned_table documents), exactly its values; a boolean PV with a
    sample without a value is an object column (None there and in the gaps); an enum with
    gaps is float64 with NaN."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="bools")
    for i in range(4):
        write_iteration(rec, i, [
            PVSample("ALL", {"value": i % 2 == 0, "timeStamp": _ts(i)}),
            *([PVSample("GAP", {"value": i == 0, "timeStamp": _ts(i)})] if i != 2 else []),
            *([PVSample("NOV", {"value": None if i == 1 else True, "timeStamp": _ts(i)})]
              if i != 3 else []),
            *([PVSample("E", {"value": {"index": i, "choices": list("abcd")},
                              "timeStamp": _ts(i)})] if i != 1 else []),
        ])
    (path,) = rec.close()
    with open_file(path) as f:
        table = f.table()
    assert table["ALL"].dtype == np.bool_
    assert table["ALL"].tolist() == [True, False, True, False]
    assert table["GAP"].dtype == np.float64
    assert [None if math.isnan(x) else bool(x) for x in table["GAP"].tolist()] == [
        True, False, None, False]
    assert table["NOV"].dtype == object and table["NOV"].tolist() == [True, None, True, None]
    assert table["E"].dtype == np.float64
    assert [None if math.isnan(x) else int(x) for x in table["E"].tolist()] == [0, None, 2, 3]


def test_empty_waveforms_are_values_not_gaps(tmp_path: Path) -> None:
    """A waveform of length 0 is a value: by_iteration/table give it (an empty array) in its
    iteration, and mask only the iterations without a value, also across segments (one
    segment where every waveform of the PV is empty, another where they are not)."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path,
                                      segment=SegmentOptions(max_iterations=3)),
                        run_name="empty")
    sent: dict[int, list[float]] = {0: [], 2: [], 3: [1.0, 2.0], 5: []}
    for i in range(6):
        write_iteration(rec, i, [PVSample("A", {"value": float(i), "timeStamp": _ts(i)})] + (
            [PVSample("W", {"value": sent[i], "timeStamp": _ts(i)})] if i in sent else []))
    paths = rec.close()
    assert len(paths) == 2

    def expect(col: Any, its: list[int]) -> None:
        assert len(col) == len(its)
        for i, v in zip(its, col, strict=True):
            if i in sent:
                assert v is not None and v is not np.ma.masked, i
                assert np.asarray(v).tolist() == sent[i], i
            else:
                assert v is None or v is np.ma.masked, i

    with open_file(paths[0]) as f:  # only empty waveforms in this segment
        m = f.by_iteration("W")
        assert np.ma.getmaskarray(m).reshape(len(m), -1).all(axis=1).tolist() == [
            False, True, False]
        expect(f.table(["W"])["W"], [0, 1, 2])
    with open_recording(paths[0]) as r:
        m = r.by_iteration("W")
        assert np.ma.getmaskarray(m).reshape(len(m), -1).all(axis=1).tolist() == [
            i not in sent for i in range(6)]
        expect(r.table(["W"])["W"], list(range(6)))


def test_an_unsigned_pv_crossing_int64s_range_between_segments_stays_exact(
        tmp_path: Path) -> None:
    """int64 in one segment, uint64 (above int64's range) in the next: by_iteration and
    table over the recording give every integer exactly, as values() does."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path,
                                      segment=SegmentOptions(max_iterations=2)),
                        run_name="u64")
    sent = [5, 6, 2**64 - 1, 2**63]
    for i, v in enumerate(sent):
        write_iteration(rec, i, [PVSample("P", {"value": v, "timeStamp": _ts(i)})])
    paths = rec.close()
    assert len(paths) == 2
    with open_recording(paths[0]) as r:
        assert [int(v) for v in r.values("P")] == sent
        assert [int(v) for v in r.by_iteration("P")] == sent
        assert [int(v) for v in r.table(["P"])["P"]] == sent


def test_a_pv_whose_kind_changes_between_segments_keeps_its_values(tmp_path: Path) -> None:
    """A PV that is a number in one segment, a waveform in the next, a string in the last
    (still being written): by_iteration and table() give each iteration's value as values()
    gives it (a number, an array, a str), not a 0-d numpy array in its place."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path,
                                      segment=SegmentOptions(max_iterations=2)), run_name="k")
    kinds: list[Any] = [1.5, 2.5, [3.0, 3.0], [4.0, 4.0], "s4", "s5"]
    for i, value in enumerate(kinds):
        write_iteration(rec, i, [PVSample("P", {"value": value, "timeStamp": _ts(i)})])
    rec.flush()
    with open_recording(tmp_path) as r:
        assert r.files[-1].layout == "live"
        per_it = r.by_iteration("P")
        column = r.table(["P"])["P"]
        for i, want in enumerate(kinds):
            for got in (r.values("P")[i], per_it.data[i], column[i]):
                if isinstance(want, list):
                    assert isinstance(got, np.ndarray) and got.tolist() == want, (i, got)
                else:
                    assert not isinstance(got, np.ndarray) and got == want, (i, repr(got))
                    assert isinstance(got, type(want)), (i, repr(got))
    rec.close()


def _f32(v: float) -> tuple[float, frozenset[str]]:
    return float(np.float32(v)), frozenset({"value"})


ON, OFF = ({"index": k, "choices": ["Off", "On"]} for k in (1, 0))
TYPE_CHANGES: dict[str, list[Any]] = {
    "bool_then_int": [True, False, 3, 4],
    "bool_then_float": [True, False, 3.5, 4.5],
    "float32_then_float64": [_f32(0.5), _f32(1.5), 2.25, 3.25],
    "enum_then_int": [ON, OFF, 3, 4],
    "int_then_enum": [2, 3, ON, OFF],
    "int_then_enum_within_a_segment": [2, ON, OFF, ON],
}


def _plain(a: Any) -> list[str]:
    return [f"{type(x).__name__}:{x!r}" for x in np.asarray(a).tolist()]


@pytest.mark.parametrize("sent", TYPE_CHANGES.values(), ids=list(TYPE_CHANGES))
def test_a_pv_whose_type_changes_at_a_rotation_reads_as_from_one_file(
        tmp_path: Path, sent: list[Any]) -> None:
    """The same values recorded into one file and into segments of two iterations: the
    recording's values(), by_iteration() and table() are what the one file gives (dtype and
    each value), not objects in one and numbers in the other, nor an enum that is an
    EnumValue in one segment and an index in the next."""
    for name, segment in (("one", SegmentOptions()), ("split", SegmentOptions(max_iterations=2))):
        rec = HDF5Recording(OutputOptions(directory=tmp_path / name, segment=segment),
                            run_name=name)
        for i, v in enumerate(sent):
            value, f32 = v if isinstance(v, tuple) else (v, frozenset[str]())
            write_iteration(rec, i, [PVSample("P", {"value": value, "timeStamp": _ts(i)}, f32)])
        assert len(rec.close()) == (1 if name == "one" else 2)
    with open_recording(tmp_path / "one") as one, open_recording(tmp_path / "split") as split:
        for read in (lambda r: r.values("P"), lambda r: r.by_iteration("P").data,
                     lambda r: r.table(["P"])["P"]):
            want, got = read(one), read(split)
            assert (got.dtype, _plain(got)) == (want.dtype, _plain(want))
            assert read(one).dtype == one.values("P").dtype


def test_pvs_named_as_a_fixed_column_do_not_replace_it(tmp_path: Path) -> None:
    """PVs named ``status`` and ``iter_index`` (pva://status is a legal PV) get the columns
    ``pv:status`` and ``pv:iter_index``, or ``pv:pv:status`` when a PV is named
    ``pv:status`` (whatever the order of the PVs); the iterations' own columns stay, in a
    file and across a recording's segments."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="names")
    for i in range(3):
        write_iteration(rec, 10 + i, [
            PVSample("status", {"value": 7.0 + i, "timeStamp": _ts(i)}),
            PVSample("iter_index", {"value": 100 + i, "timeStamp": _ts(i)}),
            PVSample("pv:status", {"value": -1.0, "timeStamp": _ts(i)}),
        ])
    (path,) = rec.close()
    with open_file(path) as f:
        tables = [f.table()]
    with open_recording([path]) as r:
        tables.append(r.table())
    for table in tables:
        assert table["iter_index"].tolist() == [10, 11, 12]
        assert table["status"].tolist() == ["complete"] * 3
        assert table["pv:pv:status"].tolist() == [7.0, 8.0, 9.0]
        assert table["pv:iter_index"].tolist() == [100, 101, 102]
        assert table["pv:status"].tolist() == [-1.0] * 3
    with open_file(path) as f:
        assert list(f.table(["pv:status", "status"]))[-2:] == ["pv:status", "pv:pv:status"]
        assert list(f.table(["status"]))[-1:] == ["pv:status"]
