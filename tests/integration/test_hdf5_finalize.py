"""Finalization: streamed in blocks (bounded memory), typed NTTable / string-array layout."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from test_hdf5_roundtrip import _ts, record, record_closed, same, write_iteration

from recorder.client.values import PVSample
from recorder.reader import open_file
from recorder.sinks import final_blocks, final_datasets
from recorder.sinks import finalize as finalize_module
from recorder.sinks import hdf5 as hdf5_module
from recorder.sinks.finalize import finalize
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions


def _walk(h: h5py.File) -> dict[str, Any]:
    """Every dataset by every path (hard links to shared columns included)."""
    out: dict[str, Any] = {}

    def visit(prefix: str, g: h5py.Group) -> None:
        for name, obj in g.items():
            if isinstance(obj, h5py.Dataset):
                out[prefix + name] = obj[()]
            else:
                visit(prefix + name + "/", obj)

    visit("", h)
    return out


@pytest.mark.parametrize("block_bytes", [2048, 64 * 1024])
def test_streamed_finalize_equals_one_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int
) -> None:
    """Tiny blocks (many blocks, spills to chunked datasets) give the same file content."""
    one = tmp_path / "one"
    many = tmp_path / "many"
    one.mkdir()
    many.mkdir()
    rec1, sent = record(one, n_iter=12)
    (path1,) = rec1.close()
    monkeypatch.setattr(hdf5_module, "finalize", functools.partial(finalize,
                                                                   block_bytes=block_bytes))
    rec2, _ = record(many, n_iter=12)
    (path2,) = rec2.close()
    with h5py.File(path1, "r") as a, h5py.File(path2, "r") as b:
        da, db = _walk(a), _walk(b)
        assert sorted(da) == sorted(db)
        for name, va in da.items():
            vb = db[name]
            if name.startswith("kafka/time"):
                continue
            assert va.dtype == vb.dtype, name
            assert va.shape == vb.shape, name
            if va.dtype.names:  # /pv_info: field by field (NaN == NaN)
                for field in va.dtype.names:
                    np.testing.assert_array_equal(va[field], vb[field], err_msg=name)
            elif va.dtype.kind == "f":
                np.testing.assert_array_equal(va, vb, err_msg=name)
            else:
                assert va.tolist() == vb.tolist(), name
    with open_file(path2) as f:
        for pv, samples in sent.items():
            same(f.samples(pv), samples)


def _one_block_and_in_pieces(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        make_samples: Callable[[], Callable[[int], list[PVSample]]], n_iter: int, *,
        block_bytes: int, spy: Callable[..., None], **patch: Any,
) -> tuple[Path, Path, dict[str, list[PVSample]]]:
    """The same recording (``make_samples()`` gives its samples, afresh for each) finalized
    in one block, then with a ``block_bytes`` budget, so in pieces, with
    ``final_datasets._Col.spill`` replaced by ``spy`` and ``patch`` set on final_datasets:
    (one-block file, file finalized in pieces, the samples sent)."""
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir()
    many.mkdir()
    path1, sent = record_closed(HDF5Recording(OutputOptions(directory=one), run_name="p"),
                                n_iter, make_samples())
    monkeypatch.setattr(final_datasets._Col, "spill", spy)
    for name, value in patch.items():
        monkeypatch.setattr(final_datasets, name, value, raising=False)
    monkeypatch.setattr(hdf5_module, "finalize", functools.partial(finalize,
                                                                   block_bytes=block_bytes))
    path2, _ = record_closed(HDF5Recording(OutputOptions(directory=many), run_name="p"),
                             n_iter, make_samples())
    return path1, path2, sent


def _assert_as_one_block(path1: Path, path2: Path, sent: dict[str, list[PVSample]]) -> None:
    """The file finalized in pieces holds the one-block file's datasets (also /pv_info, field
    by field: a constant `flags` is there, not a dataset, either way) and the samples sent."""
    with h5py.File(path1, "r") as a, h5py.File(path2, "r") as b:
        da, db = _walk(a), _walk(b)
        assert sorted(da) == sorted(db)
        for key, va in da.items():
            if key.startswith("kafka/time"):
                continue
            if va.dtype.names is None:
                assert va.tolist() == db[key].tolist(), key
            else:
                for field in va.dtype.names:  # NaN == NaN (unset limits)
                    np.testing.assert_array_equal(va[field], db[key][field],
                                                  err_msg=f"{key}: {field}")
    with open_file(path2) as f:
        for pv, samples in sent.items():
            same(f.samples(pv), samples)


def test_columns_written_in_pieces_do_not_keep_their_datasets_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finalizing in pieces (many PVs, a small budget) holds at most the dataset it writes
    open: each open dataset costs ~12-17 kB in HDF5 and h5py, and the columns of thousands
    of PVs held open from their first write to the end took memory beyond the budget that
    grew with the number of PVs (1,000 PVs: ~85 MB). The file is the one-block one."""
    open_counts: list[int] = []
    spill = final_datasets._Col.spill

    def spy(self: Any, **kwargs: Any) -> None:
        spill(self, **kwargs)
        open_counts.append(h5py.h5f.get_obj_count(self.w.out.id, h5py.h5f.OBJ_DATASET))

    def samples_of(i: int) -> list[PVSample]:
        return [PVSample(f"P{k}", {"value": float(i * 100 + k), "alarm": {"severity": k % 2},
                                   "timeStamp": {"secondsPastEpoch": 1_700_000_000 + i,
                                                 "nanoseconds": k}})
                for k in range(60)]

    path1, path2, sent = _one_block_and_in_pieces(
        tmp_path, monkeypatch, lambda: samples_of, 400, block_bytes=128 * 1024, spy=spy)
    assert len(open_counts) > 200, "too few writes in pieces to tell"
    assert max(open_counts) <= 2, max(open_counts)
    _assert_as_one_block(path1, path2, sent)


def test_flags_written_in_pieces_are_a_column_only_when_they_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In pieces as in one block: a PV whose rows all have the same flags has no `flags`
    dataset (the one value is /pv_info's), and one whose flags change only after many rows
    were written gets the whole column, those rows included."""
    spilled: set[str] = set()
    spill = final_datasets._Col.spill

    def spy(self: Any, **kwargs: Any) -> None:
        spill(self, **kwargs)
        if self.spilled:
            spilled.add(self.dataset().name)

    def samples_of(i: int) -> list[PVSample]:
        # P1's value in row 350 is no number: that row keeps it in its metadata (flag 8 off)
        return [PVSample(f"P{k}", {"value": "text" if (k, i) == (1, 350) else float(i + k),
                                   "timeStamp": {"secondsPastEpoch": 1_700_000_000 + i,
                                                 "nanoseconds": k}})
                for k in range(30)]

    path1, path2, sent = _one_block_and_in_pieces(
        tmp_path, monkeypatch, lambda: samples_of, 400, block_bytes=64 * 1024, spy=spy)
    assert "/pvs/P0/time" in spilled, "not written in pieces"
    with h5py.File(path2, "r") as h:
        info = {r["pv_name"].decode(): r for r in h["pv_info"][()]}
        assert "flags" not in h["pvs/P0"] and info["P0"]["flags"] & 8
        flags = h["pvs/P1/flags"][()]
        assert info["P1"]["flags"] == -1 and len(flags) == 400
        assert np.flatnonzero((flags & 8) == 0).tolist() == [350]
    _assert_as_one_block(path1, path2, sent)


def test_spilled_columns_write_each_chunk_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               ) -> None:
    """Many PVs and a small memory budget: the columns written in pieces get chunks sized
    to the budget and are written a whole chunk at a time (a compressed chunk written
    partly filled is read, decompressed and compressed again at every later write: that
    made finalizing 1,000 PVs x 12,000 iterations take 28 s instead of 15), and the file
    holds what one block gives."""
    writes: dict[str, list[tuple[int, int]]] = {}
    spill = final_datasets._Col.spill

    def spy(self: Any, **kwargs: Any) -> None:
        before = self.written
        spill(self, **kwargs)
        if self.written != before:
            writes.setdefault(self.dataset().name, []).append((before, self.written))

    def make_samples() -> Callable[[int], list[PVSample]]:
        rng = np.random.default_rng(5)

        def samples_of(i: int) -> list[PVSample]:
            return [PVSample(f"P{k}", {"value": float(rng.normal()),
                                       "alarm": {"severity": 0, "status": 0, "message": ""},
                                       "timeStamp": {"secondsPastEpoch": 1_700_000_000 + i,
                                                     "nanoseconds": k}})
                    for k in range(40)]

        return samples_of

    path1, path2, sent = _one_block_and_in_pieces(
        tmp_path, monkeypatch, make_samples, 600, block_bytes=256 * 1024, spy=spy,
        PIECE_CHUNK_MIN_BYTES=1)  # a small file
    with h5py.File(path2, "r") as h:
        value = h["pvs/P0/value"]
        assert value.chunks is not None and value.chunks[0] < 600  # sized to the budget
        assert writes, "nothing was written in pieces"
        for name, regions in writes.items():
            rows = h[name].chunks[0]
            total = h[name].shape[0]
            for lo, hi in regions:
                assert lo % rows == 0, (name, lo, hi, rows)
                assert hi % rows == 0 or hi == total, (name, lo, hi, rows)
    _assert_as_one_block(path1, path2, sent)


@pytest.mark.parametrize("gather_elements", [1, 7, 1 << 20])
def test_block_gather_equals_row_by_row(monkeypatch: pytest.MonkeyPatch,
                                        gather_elements: int) -> None:
    """Arrays copied out of a block's pool: side by side (one slice), scattered (gathered,
    in index-bounded chunks), mixed lengths and empty arrays, as one row at a time does."""
    monkeypatch.setattr(final_blocks, "GATHER_ELEMENTS", gather_elements)
    rng = np.random.default_rng(3)
    for case in range(300):
        n = int(rng.integers(1, 30))
        width = int(rng.integers(1, 9))
        fixed = case % 3 == 0
        sizes = np.full(n, width) if fixed else rng.integers(0, width + 1, n)
        lo = int(rng.integers(0, 50))
        if case % 2:  # side by side, as a decoded piece is stored
            offsets = lo + np.concatenate(([0], np.cumsum(sizes)[:-1]))
        else:
            offsets = lo + rng.permutation(np.concatenate(([0], np.cumsum(sizes + 2)[:-1])))
        pool = rng.normal(size=int((offsets + sizes).max()) - lo + 3).astype(np.float32)
        block = final_blocks._Block({}, 0, b"", {5: (lo, pool)})
        m = n + 4
        rows = np.sort(rng.choice(m, n, replace=False))
        got = np.zeros((m, width), np.float32)
        want = got.copy()
        block.gather(5, offsets.astype(np.int64), sizes.astype(np.int64), got, rows)
        for k in range(n):
            want[rows[k], : sizes[k]] = block.elements(5, int(offsets[k]), int(sizes[k]))
        assert got.tobytes() == want.tobytes(), case


def test_typed_table_and_string_array_layout(tmp_path: Path) -> None:
    rec, sent = record(tmp_path, n_iter=5)
    (path,) = rec.close()
    with h5py.File(path, "r") as h:
        info = {r["pv_name"].decode(): r for r in h["pv_info"][()]}
        t = h["pvs/T"]
        assert info["T"]["kind"] == b"table" and info["T"]["storage_dtype"] == b"table"
        assert isinstance(t["value"], h5py.Group)
        assert list(t["value"].attrs["columns"]) == ["x", "name"]
        assert list(t["value"].attrs["labels"]) == ["x", "name"]
        assert t["value/x"].dtype == np.float32  # float32 column stays float32
        assert t["value/x"][()].tolist() == [[1.5, 2.5 * i] for i in range(5)]
        names = t["value/name"][()]
        assert [x.decode() for x in names[0]] == ["p", "q"]
        # every table has 2 rows: no `shape` (format 5), the columns' width says it
        assert "shape" not in t and t["value/name"].shape == (5, 2)
        # the same flags in every row: no `flags` dataset, the value is in /pv_info
        assert "flags" not in t and info["T"]["flags"] & 8
        # value out of the JSON: the metadata never changes, stored once in /pv_info
        assert "T" not in h.get("metadata", {}) and info["T"]["metadata_entries"] == 1
        sa = h["pvs/SA"]
        assert info["SA"]["kind"] == b"string_array"
        assert h5py.check_string_dtype(sa["value"].dtype) is not None
        # rows 0 and 3 were [] (typed as an empty float64 waveform): kept in the JSON
        assert sa["shape"][()].ravel().tolist() == [0, 1, 2, 0, 1]
        assert (sa["flags"][()] & 8).tolist() == [0, 8, 8, 0, 8]
        assert [x.decode() for x in sa["value"][2]] == ["a", "bc"]
    with open_file(path) as f:
        for pv in ("T", "SA"):
            same(f.samples(pv), sent[pv])


def test_table_schema_change_stays_lossless(tmp_path: Path) -> None:
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions

    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="tbl")
    tables = [
        {"labels": ["a"], "value": {"a": [1, 2, 3]}},
        {"labels": ["a"], "value": {"a": [4]}},
        {"labels": ["a"], "value": {"a": [1.5]}},  # column type changes: JSON
        {"labels": ["a", "b"], "value": {"a": [1], "b": ["x\x00y"]}},  # new column: JSON
        {"labels": ["a"], "value": {"a": [2**64 - 1]}},  # uint64: JSON
        {"labels": ["a"], "value": {"a": []}},
        {"labels": ["a"], "value": {"a": [7, 8]}},
    ]
    sent = []
    for i, tbl in enumerate(tables):
        s = PVSample("T", {**tbl, "timeStamp": _ts(i)})
        sent.append(s)
        write_iteration(rec, i, (s,))
    (path,) = rec.close()
    with open_file(path) as f:
        same(f.samples("T"), sent)
    with h5py.File(path, "r") as h:
        assert h["pvs/T/value/a"].dtype == np.int64
        assert (h["pvs/T/flags"][()] & 8).tolist() == [8, 8, 0, 0, 0, 8, 8]


def test_table_columns_hdf5_cannot_name_stay_in_the_metadata(tmp_path: Path) -> None:
    """Column names with NUL or bytes that are not UTF-8 cannot be HDF5 names or attribute
    text: such tables stay in the metadata JSON (flag 8 clear) instead of failing the
    finalization of the whole file."""
    names = ["b\x00", "\udcb0"]
    sent = [PVSample(f"T{j}", {"labels": ["a", "b"], "value": {"a": [9], name: [i]},
                               "timeStamp": _ts(i)})
            for i in range(2) for j, name in enumerate(names)]
    path, by_pv = record_closed(HDF5Recording(OutputOptions(directory=tmp_path),
                                              run_name="tbl"), 1, lambda i: sent)
    with open_file(path) as f:
        for pv, samples in by_pv.items():
            same(f.samples(pv), samples)
            assert f.pv_info(pv)["flags"] & 8 == 0


def test_a_table_untyped_for_a_whole_block_keeps_its_later_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An NTTable PV whose tables fill a finalization block without one that fits typed
    columns (columns of different lengths, a string with NUL; they stay in the metadata
    JSON): its typed tables in later blocks were written from the column's row 0, so each
    was read from another row (zeros here) and its own rows were lost."""
    monkeypatch.setattr(hdf5_module, "finalize", functools.partial(finalize, block_bytes=512))

    def samples_of(i: int) -> list[PVSample]:
        table = ({"labels": ["a", "b"], "value": {"a": [1.5, 2.5], "b": ["p\x00"]}} if i < 4
                 else {"labels": ["a", "b"], "value": {"a": [1.5 * i, 2.5], "b": ["x", "y"]}})
        return [PVSample("T", {**table, "timeStamp": _ts(i)}),
                PVSample("W", {"value": [float(i)] * 40, "timeStamp": _ts(i)})]

    path, sent = record_closed(HDF5Recording(OutputOptions(directory=tmp_path),
                                             run_name="tbl"), 8, samples_of)
    with open_file(path) as f:
        same(f.samples("T"), sent["T"])
    with h5py.File(path, "r") as h:
        assert h["pvs/T/value/a"][4:, 0].tolist() == [6.0, 7.5, 9.0, 10.5]


def test_an_image_pv_without_a_frame_for_a_whole_block_is_finalized(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An NTNDArray PV without a frame yet (nil value: a camera not acquiring) for a whole
    finalization block: its rows there were written as 1-D, the frames after them as 2-D,
    and finalization failed (``zip() argument 2 is longer than argument 1``)."""
    monkeypatch.setattr(hdf5_module, "finalize", functools.partial(finalize, block_bytes=512))

    def samples_of(i: int) -> list[PVSample]:
        image = ({"value": None} if i < 4 else
                 {"value": {"ushortValue": list(range(i, i + 6))}, "uniqueId": i})
        return [PVSample("IMG", {**image, "dimension": [{"size": 3}, {"size": 2}],
                                 "timeStamp": _ts(i)}),
                PVSample("W", {"value": [float(i)] * 40, "timeStamp": _ts(i)})]

    path, sent = record_closed(HDF5Recording(OutputOptions(directory=tmp_path),
                                             run_name="img"), 8, samples_of)
    with open_file(path) as f:
        same(f.samples("IMG"), sent["IMG"])
        assert f.samples("IMG")[4].value.image().tolist() == [[4, 5, 6], [7, 8, 9]]


def test_a_block_reads_the_text_it_needs_not_the_byte_pool_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PV returning to a structure it had before (an alarm message flapping between two
    texts) points its /live/meta rows at the JSON stored the first time, at the start of
    /live/bytes: every block read the byte pool from there on (here ~40 MB a block with a
    1 MiB budget, the whole pool near the end), so finalization memory grew with the
    segment."""
    reads: list[int] = []
    real = final_blocks._read_block

    def spy(f: Any, lo: int, hi: int, meta: Any) -> Any:
        block = real(f, lo, hi, meta)
        reads.append(len(block.raw) + sum(len(r) for _, r in getattr(block, "texts", ())))
        return block

    monkeypatch.setattr(finalize_module, "_read_block", spy)
    monkeypatch.setattr(hdf5_module, "finalize", functools.partial(finalize,
                                                                   block_bytes=1 << 20))

    def samples_of(i: int) -> list[PVSample]:
        return [PVSample("S", {"value": f"{i:06d}" + "x" * 100_000, "timeStamp": _ts(i)}),
                PVSample("F", {"value": 1.0, "alarm": {"severity": 0, "status": 0,
                                                        "message": "A" if i % 2 else "B"}})]

    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="flap")
    sent: dict[str, list[PVSample]] = {}
    for i in range(200):
        samples = samples_of(i)
        write_iteration(rec, i, samples)
        for x in samples:
            sent.setdefault(x.pv, []).append(x)
        if i % 10 == 0:
            rec.flush()
    (path,) = rec.close()
    assert len(reads) > 10 and max(reads) < 4 << 20, max(reads)
    with open_file(path) as f:
        for pv, samples in sent.items():
            same(f.samples(pv), samples)


PEAK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    import structlog, logging
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    from recorder.client.events import (IterationOpened, ValuesReceived, IterationClosed,
        IterationStatus)
    from recorder.client.values import PVSample
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions, final_path
    from recorder.sinks.superblock import clear_consistency_flags

    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return 0

    mode, directory, n_iter = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    if mode == "write":
        rec = HDF5Recording(OutputOptions(directory=directory, compression="none"),
                            run_name="big")
        rng = np.random.default_rng(0)
        wave = rng.normal(size=4000)
        for i in range(n_iter):
            rec.handle(IterationOpened("t", "s", i, i))
            samples = tuple(
                PVSample(f"W{k}", {"value": (wave + i + k).tolist(),
                                   "timeStamp": {"secondsPastEpoch": i, "nanoseconds": k}})
                for k in range(10))
            samples += tuple(PVSample(f"S{k}", {"value": float(i)}) for k in range(50))
            rec.handle(ValuesReceived("t", i, 1, 0, samples))
            rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i))
            rec.maybe_flush()
        rec.flush()
        print(rec.current_path, flush=True)
        import os
        os._exit(0)  # leave the .partial as a crashed writer would
    partial = directory / sys.argv[4]
    clear_consistency_flags(partial)
    if mode == "old":  # the previous, read-everything implementation (for comparison)
        import importlib.util
        spec = importlib.util.spec_from_file_location("old_finalize", sys.argv[5])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fin = mod.finalize
        kwargs = {}
    else:
        from recorder.sinks.finalize import finalize as fin
        kwargs = {"block_bytes": int(sys.argv[5])}
    before = vm("VmRSS:")
    t = time.perf_counter()
    fin(partial, final_path(partial), status="complete", **kwargs)
    print(vm("VmHWM:") - before, time.perf_counter() - t)
    """
)


def _peak(tmp_path: Path, n_iter: int, block_bytes: int) -> int:
    d = tmp_path / f"n{n_iter}"
    d.mkdir()
    out = subprocess.run([sys.executable, "-c", PEAK, "write", str(d), str(n_iter)],
                         check=True, capture_output=True, text=True, timeout=300)
    partial = Path(out.stdout.split()[-1])
    out = subprocess.run(
        [sys.executable, "-c", PEAK, "new", str(d), str(n_iter), partial.name,
         str(block_bytes)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return int(out.stdout.split()[0])


@pytest.mark.slow
def test_finalize_peak_memory_does_not_grow_with_segment_size(tmp_path: Path) -> None:
    """A 4x larger segment (about 30 vs 120 MB of waveforms) finalizes in the same memory."""
    block = 8 * 1024 * 1024
    small = _peak(tmp_path, 100, block)
    large = _peak(tmp_path, 400, block)
    # the large segment holds ~96 MB more data; reading it whole would show up here
    assert large - small < 24 * 1024 * 1024, (small, large)
    assert large < 80 * 1024 * 1024, (small, large)


def test_the_same_live_file_finalizes_to_the_same_bytes(tmp_path: Path) -> None:
    """Finalization is deterministic, also when a small budget makes it write columns in
    pieces: which column is written first among equally large ones used to follow memory
    addresses (a set), so the same live file gave files with other bytes."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path / "live"), run_name="d")
    for i in range(300):
        write_iteration(rec, i, [
            PVSample(f"P{k}", {"value": float((i * 7 + k) % 11), "timeStamp": _ts(i)})
            for k in range(60)])
    rec.flush()
    live = rec.current_path
    assert live is not None
    copies = []
    for name in ("a", "b", "c"):
        copy = tmp_path / f"{name}.h5.partial"
        copy.write_bytes(live.read_bytes())  # what a crash leaves, three times
        copies.append(finalize(copy, tmp_path / f"{name}.h5", status="aborted",
                               end_time=1_800_000_000.0, block_bytes=64 * 1024))
    rec.close()
    first = copies[0].read_bytes()
    assert all(c.read_bytes() == first for c in copies[1:])
    with open_file(copies[0]) as f:
        assert f.values("P3").tolist() == [float((i * 7 + 3) % 11) for i in range(300)]


@pytest.mark.parametrize("flushes", [3, 1100])
def test_the_kafka_log_is_compact_when_small_and_its_time_says_its_unit(
        tmp_path: Path, flushes: int) -> None:
    """/kafka has a row per flush (and partition): a few rows in the object header, the many
    rows of a long recording chunked and compressed; ``time`` is ns since the epoch and says
    so as every time column does; ``offset`` is the highest offset the file holds."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="k", pv_uris=["pva://X"])
    for i in range(flushes):
        ts = {"secondsPastEpoch": 1_700_000_000 + i, "nanoseconds": 0}
        write_iteration(rec, i, [PVSample("X", {"value": float(i), "timeStamp": ts})],
                        offset=3 * i)
        rec.flush()
    (path,) = rec.close()
    with h5py.File(path, "r") as h:
        kafka = h["kafka"]
        assert {k: kafka[k].dtype.str for k in kafka} == {
            "topic": "|S255", "partition": "<i4", "offset": "<i8", "time": "<i8"}
        assert len(kafka["offset"]) == flushes + 1  # and close()'s
        assert dict(kafka["time"].attrs) == {"units": "ns", "start": "1970-01-01T00:00:00Z"}
        assert kafka["time"][0] > 1_700_000_000 * 10**9
        for k in kafka:  # the documented rule: compact up to 8 KiB
            small = kafka[k].dtype.itemsize * len(kafka[k]) <= 8192
            layout = kafka[k].id.get_create_plist().get_layout()
            assert layout == (h5py.h5d.COMPACT if small else h5py.h5d.CHUNKED), k
            assert small or kafka[k].compression == "gzip", k
        assert (flushes > 1000) == (kafka["offset"].chunks is not None)
        assert kafka["offset"][()].tolist() == [3 * i + 2 for i in range(flushes)] + [
            3 * flushes - 1]


@pytest.mark.parametrize("compression", ["lzf", "zstd", "blosc2"])
def test_a_chunked_kafka_topic_names_its_filter(tmp_path: Path, compression: str) -> None:
    """/kafka/topic is chunked with the file's compression past 32 flushes (8 KiB of S255);
    with lzf, zstd or blosc2 it must name its filter (``required_filter``) and the file the
    plugin (``required_plugins``), as every other dataset does. It named neither: the file
    failed verify ("compressed with a plugin filter without a 'required_filter' attribute";
    "required_plugins is empty" when nothing else was chunked), so `recover`'s check
    refused to replace such a leftover, and readers had no way to know they needed the
    plugin (the daemon could not read the file's offsets)."""
    from recorder.verify import verify_file

    if compression != "lzf":
        pytest.importorskip("hdf5plugin")
    rec = HDF5Recording(OutputOptions(directory=tmp_path, compression=compression),
                        run_name="k", pv_uris=["pva://X"])
    for i in range(40):
        write_iteration(rec, i, [PVSample("X", {"value": float(i)})], offset=3 * i)
        rec.flush()
    (path,) = rec.close()
    with h5py.File(path, "r") as h:
        topic = h["kafka/topic"]
        assert topic.chunks is not None
        assert topic.attrs["required_filter"] in list(h.attrs["required_plugins"])
    report = verify_file(path)
    assert report.ok, report.problems
