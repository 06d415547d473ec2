"""``RecordingFile.values`` reads a finalized PV's ``value`` dataset directly when every row
is in it, and gives exactly what the per-sample path gives (dtype, shape, values)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_hdf5_roundtrip import record, record_closed, write_iteration

from recorder.client.values import PVSample
from recorder.errors import FileFormatError
from recorder.reader import RecordingFile, open_file, open_recording, values_of
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions

# PVs of the round-trip fixture whose rows are all in `value` (constant flags with 8)
DIRECT = {"F32", "F64", "I", "U", "B", "S", "E", "W", "WI", "NAN", "IMG"}


def _equal(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == object:
        assert len(a) == len(b)
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            if isinstance(x, np.ndarray):
                assert x.dtype == y.dtype
                np.testing.assert_array_equal(x, y)
            else:
                assert type(x) is type(y) and (x == y or (x != x and y != y)), (x, y)  # noqa: PLR0124
    else:
        np.testing.assert_array_equal(a, b)


def _check_values(f: RecordingFile, sent: dict[str, list[PVSample]], direct: set[str]) -> None:
    """values() of every PV: read directly (no samples built) exactly for ``direct``, and
    equal to the per-sample path and to what was sent."""
    for pv, samples in sent.items():
        got = f.values(pv)
        assert (pv not in f._cache) == (pv in direct), pv
        if pv in direct:  # (the others are values_of(samples) already)
            _equal(got, values_of(f.samples(pv)))
            _equal(got, values_of(samples))


def test_values_direct_equal_the_samples_path(tmp_path: Path) -> None:
    rec, sent = record(tmp_path, n_iter=6)
    (path,) = rec.close()
    with open_file(path) as f:
        _check_values(f, sent, DIRECT)


def _one_pv(tmp_path: Path, n: int, data_of: Callable[[int], dict[str, Any]]
            ) -> tuple[Path, dict[str, list[PVSample]]]:
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="one")
    return record_closed(rec, n, lambda i: [PVSample("P", {
        **data_of(i), "timeStamp": {"secondsPastEpoch": 1, "nanoseconds": i}})])


def test_equal_length_waveforms_are_one_array(tmp_path: Path) -> None:
    path, sent = _one_pv(tmp_path, 50, lambda i: {"value": [float(i + k) for k in range(8)]})
    with open_file(path) as f:
        _check_values(f, sent, {"P"})
        got = f.values("P")
        assert got.shape == (50, 8) and got.dtype == np.float64
        assert got[7].tolist() == [7.0 + k for k in range(8)]


# PVs of the fixture read from a live file's inline columns (scalars, bools, enums)
LIVE_DIRECT = {"F32", "F64", "I", "U", "B", "E", "NAN"}


def test_live_values_from_the_inline_columns(tmp_path: Path) -> None:
    rec, sent = record(tmp_path, n_iter=6)
    rec.flush()
    assert rec.current_path is not None
    with open_file(rec.current_path) as f:
        _check_values(f, sent, LIVE_DIRECT)
    rec.close()


def test_equal_shape_images_are_one_array(tmp_path: Path) -> None:
    path, sent = _one_pv(tmp_path, 20, lambda i: {
        "value": {"ushortValue": [i + k for k in range(12)]},
        "dimension": [{"size": 4}, {"size": 3}]})
    with open_file(path) as f:
        _check_values(f, sent, {"P"})
        got = f.values("P")
        assert got.shape == (20, 3, 4) and got.dtype == np.uint16
        assert got[5].tolist() == (5 + np.arange(12)).reshape(3, 4).tolist()


def test_pv_names_are_read_once_per_file_not_per_pv(tmp_path: Path, monkeypatch: Any) -> None:
    """A loop over every PV (values, summary, table, replay) checked each name against the
    whole decoded name attribute: PVs x PVs work, 102 s instead of 2.9 s for values() of
    10,000 PVs. The names are read once (per refresh of a live file)."""
    rec, _sent = record(tmp_path)
    (path,) = rec.close()
    reads: list[str] = []
    original = RecordingFile.attrs_of

    def counting(self: RecordingFile, where: str) -> dict[str, Any]:
        reads.append(where)
        return original(self, where)

    monkeypatch.setattr(RecordingFile, "attrs_of", counting)
    with open_file(path) as f:
        for pv in f.pv_names:
            f.values(pv)
            f.times(pv)
            f.first_count(pv)
        f.summary()
        assert reads.count("pvs") == 1
        try:
            f.values("not-a-pv")
        except KeyError as exc:
            assert "not-a-pv" in str(exc)
        else:
            raise AssertionError("an unknown PV must raise KeyError")


def _same_samples(got: list[PVSample], want: list[PVSample]) -> None:
    assert [s.pv for s in got] == [s.pv for s in want]
    assert [s.data for s in got] == [s.data for s in want]
    assert [s.float32_paths for s in got] == [s.float32_paths for s in want]


@pytest.mark.parametrize("cache_bytes", [64 << 20, 0])
def test_metadata_entries_are_read_once_per_pv_not_per_window(
        tmp_path: Path, monkeypatch: Any, cache_bytes: int) -> None:
    """Reading a window of rows (replay, trains) needs the PV's metadata entries; each
    window read all of them again (work windows x entries, for a PV whose units or limits
    change often). They are read once per PV while the cached ones fit META_CACHE_BYTES
    (0: never kept, read per window as before; the same samples either way)."""
    import recorder.reader as reader_module

    monkeypatch.setattr(reader_module, "META_CACHE_BYTES", cache_bytes)
    path, sent = _one_pv(tmp_path, 60, lambda i: {
        "value": float(i), "display": {"units": f"u{i // 3}", "precision": i % 4}})
    reads: list[str] = []
    original = RecordingFile._side

    def counting(self: RecordingFile, pv: str, tree: str, old: str) -> Any:
        reads.append(tree)
        return original(self, pv, tree, old)

    monkeypatch.setattr(RecordingFile, "_side", counting)
    with open_file(path) as f:
        windows = [f.samples_range("P", lo, lo + 7) for lo in range(0, 60, 7)]
        assert reads.count("metadata") == (1 if cache_bytes else len(windows))
        assert len(f._meta) == (1 if cache_bytes else 0)
        if cache_bytes:
            assert len(f._meta["P"][1]) == 60  # an entry per value: precision changes each
        _same_samples([s for w in windows for s in w], sent["P"])
        _same_samples(f.samples_range("P", 13, 41), sent["P"][13:41])


def test_row_ranges_count_from_the_end_in_both_layouts(tmp_path: Path) -> None:
    """samples_range / flat_range take rows as a Python slice does (``-2, None``: the last
    two values, the tail of a file being watched), with the metadata in effect at those
    rows, in a live file as in the finalized one; a live file raised "damaged" instead."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="tail")
    sent: list[PVSample] = []
    for i in range(5):
        sample = PVSample("P", {"value": float(i), "display": {"units": f"u{i // 2}"},
                                "timeStamp": {"secondsPastEpoch": 1_700_000_000 + i,
                                              "nanoseconds": 0, "userTag": 0}})
        sent.append(sample)
        write_iteration(rec, i, [sample])
    rec.flush()
    assert rec.current_path is not None
    with open_file(rec.current_path) as live:
        assert live.layout == "live"
        for lo, hi in ((-2, None), (-4, -1), (1, -1), (-9, 2), (3, 1)):
            _same_samples(live.samples_range("P", lo, hi), sent[lo:hi])
            assert [t for _, t in live.flat_range("P", lo, hi)] == [
                s.timestamp_ns for s in sent[lo:hi]]
    (path,) = rec.close()
    with open_file(path) as final:
        for lo, hi in ((-2, None), (-4, -1), (1, -1), (-9, 2), (3, 1)):
            _same_samples(final.samples_range("P", lo, hi), sent[lo:hi])


def test_images_after_a_sample_without_a_value_are_arrays(tmp_path: Path) -> None:
    """An NTNDArray PV whose first sample had no value (a camera not connected yet): its
    images are numpy arrays in their image shape, as for any other image PV, in values(),
    by_iteration() and table(), not the client's NDArrayValue objects (flat data and
    dimensions) because the first sample was not an image."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="camera")
    for i in range(3):
        data: dict[str, Any] = {"value": None} if i == 0 else {
            "value": {"ushortValue": list(range(6 * i, 6 * i + 6))},
            "dimension": [{"size": 3}, {"size": 2}]}
        write_iteration(rec, i, [PVSample("IMG", {
            **data, "timeStamp": {"secondsPastEpoch": 1_700_000_000 + i, "nanoseconds": 0}})])
    rec.flush()
    assert rec.current_path is not None
    want = [None, np.arange(6, 12, dtype=np.uint16).reshape(2, 3),
            np.arange(12, 18, dtype=np.uint16).reshape(2, 3)]

    def check(f: RecordingFile) -> None:
        for got in (f.values("IMG"), f.by_iteration("IMG").data, f.table(["IMG"])["IMG"]):
            assert got.dtype == object and got[0] is None
            for x, y in zip(got[1:], want[1:], strict=True):
                assert isinstance(x, np.ndarray), type(x)
                assert x.dtype == y.dtype
                np.testing.assert_array_equal(x, y)

    with open_file(rec.current_path) as live:
        check(live)
    (path,) = rec.close()
    with open_file(path) as final:
        check(final)


def test_open_recording_of_no_files_says_so() -> None:
    """open_recording([]) (a glob that matched nothing) is an error saying that no file was
    given, not a recording whose values("X") are an empty array, though it has no PV X, and
    whose table() raises KeyError: 'iter_index'."""
    with pytest.raises(FileFormatError, match="no files"):
        open_recording([])


def test_refresh_follows_a_live_file_to_its_finalized_file(tmp_path: Path) -> None:
    """A reader watching a .partial (refresh() in a loop) learns when the recording ends:
    finalization writes NAME.h5 and removes NAME.h5.partial, whose last commit still says
    ``recording``; refresh() then goes on with the finalized file (same recording_uid and
    segment), with its status and every iteration, instead of the deleted one."""
    from test_hdf5_roundtrip import write_iteration

    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="watch")
    for i in range(2):
        write_iteration(rec, i, [PVSample("P", {"value": float(i)})])
    rec.flush()
    partial = rec.current_path
    assert partial is not None
    with open_file(partial) as f:
        assert (f.layout, f.status, f.values("P").tolist()) == ("live", "recording", [0, 1])
        write_iteration(rec, 2, [PVSample("P", {"value": 2.0})])
        (final,) = rec.close()
        f.refresh()
        assert (f.layout, f.status, f.path) == ("final", "complete", final)
        assert f.values("P").tolist() == [0.0, 1.0, 2.0]
        assert f.iterations()["iter_index"].tolist() == [0, 1, 2]
        f.refresh()  # finalized: nothing more to follow
        assert f.path == final
        assert f.writer_active is False


def test_writer_active_tells_a_live_file_from_a_crashed_one(tmp_path: Path) -> None:
    """A .partial whose writer died still says ``recording`` (its last commit):
    writer_active tells the two apart, so a watch loop can end."""
    from test_hdf5_roundtrip import write_iteration

    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="watch")
    write_iteration(rec, 0, [PVSample("P", {"value": 0.0})])
    rec.flush()
    partial = rec.current_path
    assert partial is not None
    with open_file(partial) as f:
        assert (f.status, f.writer_active) == ("recording", True)
        rec._release_lock()  # as the kernel does when the writer process dies
        assert (f.status, f.writer_active) == ("recording", False)
        loops = 0
        while f.status == "recording" and f.writer_active is not False:
            loops += 1  # must not run: the writer is gone
            f.refresh()
        assert loops == 0


def test_a_watch_loop_ending_at_finalization_sees_the_finalized_status(
    tmp_path: Path,
) -> None:
    """The README's watch loop (``while f.status == "recording" and f.writer_active is not
    False: f.refresh()``, with a pause after each refresh) ends when the file is finalized
    between a refresh and the next check, and ``f.status`` then says ``complete``: not
    ``recording`` with no writer, which is how a crashed recording looks."""
    from test_hdf5_roundtrip import write_iteration

    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="watch")
    write_iteration(rec, 0, [PVSample("P", {"value": 0.0})])
    rec.flush()
    partial = rec.current_path
    assert partial is not None
    with open_file(partial) as f:
        finalized: list[Path] = []
        while f.status == "recording" and f.writer_active is not False:
            f.refresh()
            if not finalized:  # the writer finalizes while the watcher pauses
                write_iteration(rec, 1, [PVSample("P", {"value": 1.0})])
                finalized.extend(rec.close())
        assert (f.status, f.layout, f.path) == ("complete", "final", finalized[0])
        assert f.values("P").tolist() == [0.0, 1.0]


def test_an_unsigned_pv_crossing_int64s_range_keeps_every_value_exact(tmp_path: Path) -> None:
    """Integers are int64, uint64 only above int64's range: a ulong PV going from 5 to
    2**64 - 1 changes type (the later rows in the metadata). values() gives each integer
    exactly, not a float64 rounding of them (2**64 - 1 is not a float64)."""
    sent = [5, 2**64 - 1, 2**63, 7]
    path, _ = _one_pv(tmp_path, len(sent), lambda i: {"value": sent[i]})
    with open_file(path) as f:
        got = f.values("P")
        assert [int(v) for v in got] == sent
        assert [int(v) for v in f.by_iteration("P")] == sent
        assert [int(v) for v in f.table(["P"])["P"]] == sent


def test_a_partial_beside_its_finalized_file_is_not_chained_twice(tmp_path: Path) -> None:
    """Finalization writes NAME.h5, then removes NAME.h5.partial (a writer killed in
    between leaves both until `recover`): open_recording of the directory, of one of its
    files or of a list with both reads the segment once, from the finalized file."""
    import shutil

    from test_hdf5_roundtrip import write_iteration

    from recorder.reader import open_recording
    from recorder.sinks.options import SegmentOptions

    rec = HDF5Recording(OutputOptions(directory=tmp_path,
                                      segment=SegmentOptions(max_iterations=3)), run_name="d")
    for i in range(1, 6):
        write_iteration(rec, i, [PVSample("P", {"value": float(i)})])
    rec.flush()
    live = rec.current_path
    assert live is not None
    shutil.copy(live, tmp_path / "kept")
    first, second = rec.close()
    shutil.move(tmp_path / "kept", live)  # the .partial beside its final file
    for given in (tmp_path, first, live, [first, second, live]):
        with open_recording(given) as r:  # type: ignore[arg-type]
            assert [f.path for f in r.files] == [first, second], given
            assert r.iterations()["iter_index"].tolist() == [1, 2, 3, 4, 5]
            assert r.values("P").tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_open_recording_follows_a_segment_finalized_while_it_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open_recording of a directory being written: a .partial listed, then finalized (a
    segment rotation, the run's end) before it is opened, is read from its final file,
    not left out of the recording (nor an error)."""
    from test_hdf5_roundtrip import write_iteration

    from recorder import catalog
    from recorder.reader import open_recording
    from recorder.sinks.options import SegmentOptions

    rec = HDF5Recording(OutputOptions(directory=tmp_path,
                                      segment=SegmentOptions(max_iterations=3)), run_name="d")
    for i in range(1, 6):
        write_iteration(rec, i, [PVSample("P", {"value": float(i)})])
    rec.flush()
    listed = catalog.candidates([tmp_path])
    assert [p.name.endswith(".partial") for p in listed[0]] == [False, True]
    first, second = rec.close()
    monkeypatch.setattr(catalog, "candidates", lambda *_a, **_k: listed)  # the listing
    with open_recording(tmp_path) as r:  # taken just before the close
        assert [f.path for f in r.files] == [first, second]
        assert r.values("P").tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    with open_recording([first, listed[0][1]]) as r:
        assert [f.path for f in r.files] == [first, second]
    both = [listed[0][0], second, listed[0][1]]  # listed between the rename and the removal
    monkeypatch.setattr(catalog, "candidates", lambda *_a, **_k: (both, []))
    with open_recording(tmp_path) as r:
        assert [f.path for f in r.files] == [first, second]
    with open_recording(both) as r:
        assert [f.path for f in r.files] == [first, second]
    with open_recording(listed[0][1]) as r:  # one file, a .partial finalized since
        assert [f.path for f in r.files] == [first, second]


def _two_segments(where: Path) -> tuple[HDF5Recording, list[Path]]:
    """A recording being written: 5 iterations of PV "P" (values 1.0..5.0) in segments of 3,
    the first finalized, the second a .partial; (it, its two files in name order)."""
    from test_hdf5_roundtrip import write_iteration

    from recorder.sinks.options import SegmentOptions

    rec = HDF5Recording(OutputOptions(directory=where, segment=SegmentOptions(max_iterations=3)),
                        run_name="d")
    for i in range(1, 6):
        write_iteration(rec, i, [PVSample("P", {"value": float(i)})])
    rec.flush()
    listed = sorted(where.iterdir())
    assert [p.name.endswith(".partial") for p in listed] == [False, True]
    return rec, listed


def test_open_recording_follows_a_segment_finalized_after_its_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A .partial still there when open_recording looked, finalized while it opened the
    files before it (a segment rotation while a long recording opens: ``export`` of a
    recording being written failed with "No such file or directory: ...h5.partial"), is
    read from its final file."""
    from recorder import reader
    from recorder.reader import open_recording

    for given, when in (("directory", "before"), ("files", "before"), ("files", "after")):
        where = tmp_path / given / when
        rec, listed = _two_segments(where)
        opened = reader._open_h5
        closed: list[Path] = []

        def open_h5(path: Path, rec: HDF5Recording = rec, opened: Any = opened,
                    closed: list[Path] = closed, when: str = when) -> Any:
            if when == "after":  # the .partial opened, then finalized
                h5 = opened(path)
                if path.suffix == ".partial":
                    closed.extend(rec.close())
                return h5
            if not closed:  # the first file opens: the writer finalizes the second
                closed.extend(rec.close())
            return opened(path)

        monkeypatch.setattr(reader, "_open_h5", open_h5)
        with open_recording(where if given == "directory" else listed) as r:
            assert [f.path for f in r.files] == closed
            assert r.values("P").tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
        monkeypatch.setattr(reader, "_open_h5", opened)


def test_open_recording_takes_a_partial_finalized_once_it_is_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last .partial of a recording being written, opened, then finalized (renamed and
    removed) before open_recording checked that no file was given twice: the check's
    os.stat of the .partial raised FileNotFoundError (``export`` of a recording being
    written failed now and then). The file is read from the handle already open."""
    from recorder import reader
    from recorder.reader import open_recording

    rec, listed = _two_segments(tmp_path)
    opened = reader._open_h5
    gone: list[Path] = []

    def open_h5(path: Path) -> Any:
        h5 = opened(path)
        if path.suffix == ".partial":  # opened: now it is renamed away under the reader
            moved = path.with_name(path.name + ".moved")
            os.link(path, moved)
            path.unlink()
            gone.append(moved)
        return h5

    monkeypatch.setattr(reader, "_open_h5", open_h5)
    with open_recording(listed) as r:
        assert r.values("P").tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert gone
    os.replace(gone[0], listed[1])  # back, for the writer to finalize it
    rec.close()
