"""Round trips through the HDF5 sink: live file, finalized file, h5dump 1.10 as old reader."""

from __future__ import annotations

import math
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from recorder.client.events import (
    IncompleteReason,
    IterationClosed,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.values import PVSample
from recorder.reader import open_file
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import Compression, OutputOptions, SegmentOptions


def _ts(i: int) -> dict[str, Any]:
    return {"secondsPastEpoch": 1_700_000_000 + i, "nanoseconds": 123_456_789, "userTag": 0}


def _alarm(i: int) -> dict[str, Any]:
    return {"severity": i % 3, "status": i % 2, "message": "HIHI" if i % 3 else ""}


def make_samples(i: int) -> list[PVSample]:
    disp = {"units": "mm", "precision": 3, "limitLow": -1.0, "limitHigh": 1.0 + (i >= 3)}
    return [
        PVSample("F32", {"value": float(np.float32(0.1 * i)), "timeStamp": _ts(i),
                         "alarm": _alarm(i),
                         "display": disp}, frozenset({"value"})),
        PVSample("F64", {"value": math.pi * i, "timeStamp": _ts(i), "alarm": _alarm(i)}),
        PVSample("I", {"value": -(2**40) * i, "timeStamp": _ts(i)}),
        PVSample("U", {"value": 2**64 - 1 - i, "timeStamp": _ts(i)}),
        PVSample("B", {"value": bool(i % 2), "timeStamp": _ts(i)}),
        PVSample("S", {"value": "é" * (i * 50), "timeStamp": _ts(i)}),
        PVSample("E", {"value": {"index": i % 2, "choices": ["Off", "On"]}, "timeStamp": _ts(i)}),
        PVSample("W", {"value": [float(x) for x in range(i * 3)], "timeStamp": _ts(i)},
                 frozenset({"value"})),
        PVSample("WI", {"value": list(range(i + 1)), "timeStamp": _ts(i)}),
        PVSample("SA", {"value": ["a", "bc"][: i % 3], "timeStamp": _ts(i)}),
        PVSample("T", {"labels": ["x", "name"], "value": {"x": [1.5, 2.5 * i],
                                                           "name": ["p", "q"]},
                       "timeStamp": _ts(i)}, frozenset({"value.x"})),
        PVSample("IMG", {"value": {"ushortValue": list(range(6 * (i + 1)))},
                         "dimension": [{"size": 3 * (i + 1)}, {"size": 2}],
                         "uniqueId": i, "timeStamp": _ts(i)}),
        PVSample("ST", {"value": {"a": 1, "b": [1, 2]}, "timeStamp": _ts(i)}),
        PVSample("N", {"value": None, "timeStamp": {"secondsPastEpoch": -5, "nanoseconds": 2e9}}),
        PVSample("NAN", {"value": float("nan") if i % 2 else float("inf"), "timeStamp": _ts(i),
                         "display": {"limitLow": float("nan")}}),
        PVSample("X", {"value": 1 if i < 3 else 1.5, "timeStamp": _ts(i),
                       "alarm": {"severity": "bad"}}),  # type change + odd alarm
        PVSample("Z", {"value": "a\x00b" if i == 2 else "ok", "timeStamp": _ts(i)}),
    ]


def write_iteration(rec: HDF5Recording, i: int, samples: Iterable[PVSample], *,
                    offset: int = -1) -> None:
    """Iteration ``i`` (iter_index and timestamps ``i``) with ``samples`` in one batch; with
    ``offset``, its header, data and tail at Kafka offsets ``offset`` to ``offset + 2``."""
    o = (offset, offset + 1, offset + 2) if offset >= 0 else (-1, -1, -1)
    rec.handle(IterationOpened("t", "s", i, i, offset=o[0]))
    rec.handle(ValuesReceived("t", i, 1, 1, tuple(samples), offset=o[1]))
    rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i, offset=o[2]))


def record_closed(rec: HDF5Recording, n_iter: int,
                  samples_of: Callable[[int], list[PVSample]]
                  ) -> tuple[Path, dict[str, list[PVSample]]]:
    """Iterations 0..n_iter-1 of ``samples_of(i)``, then close: (the one file, sent by PV)."""
    sent: dict[str, list[PVSample]] = {}
    for i in range(n_iter):
        samples = samples_of(i)
        write_iteration(rec, i, samples)
        for s in samples:
            sent.setdefault(s.pv, []).append(s)
    (path,) = rec.close()
    return path, sent


def same(a: list[PVSample], b: list[PVSample]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert repr_exact(x.data) == repr_exact(y.data), (x.pv, x.data, y.data)
        assert x.float32_paths == y.float32_paths
        assert x.kind == y.kind


def repr_exact(obj: Any) -> Any:
    """Comparable form that tells int from float and NaN from NaN."""
    if isinstance(obj, dict):
        return [(k, repr_exact(v)) for k, v in obj.items()]
    if isinstance(obj, list):
        return [repr_exact(v) for v in obj]
    return (type(obj).__name__, repr(obj))


def record(
    tmp_path: Path, n_iter: int = 5, **opts: Any
) -> tuple[HDF5Recording, dict[str, list[PVSample]]]:
    options = OutputOptions(directory=tmp_path, **opts)
    rec = HDF5Recording(options, run_name="rt/../x", pv_uris=["pva://F32", "ca://I"])
    sent: dict[str, list[PVSample]] = {}
    for i in range(n_iter):
        rec.handle(IterationOpened("t", "s", 100 + i, 10 + i, offset=3 * i))
        samples = make_samples(i)
        half = len(samples) // 2
        # sub-push: two batches, the first one flushed before the tail
        rec.handle(ValuesReceived("t", 100 + i, 1, 1, tuple(samples[:half]), offset=3 * i + 1))
        rec.flush()
        rec.handle(ValuesReceived("t", 100 + i, 2, 2, tuple(samples[half:]), offset=3 * i + 1))
        for s in samples:
            sent.setdefault(s.pv, []).append(s)
        if i == 2:
            rec.handle(IterationClosed("t", "s", 100 + i, IterationStatus.INCOMPLETE,
                                       IncompleteReason.GATEWAY_ERROR, 10 + i, 20 + i,
                                       error_code=7, error_message="boom " * 100,
                                       offset=3 * i + 2))
        else:
            rec.handle(IterationClosed("t", "s", 100 + i, IterationStatus.COMPLETE, None,
                                       10 + i, 20 + i, n_values=len(samples), n_batches=2,
                                       offset=3 * i + 2))
    return rec, sent


def test_roundtrip_every_type_live_and_final(tmp_path: Path) -> None:
    rec, sent = record(tmp_path)
    rec.flush()
    live = rec.current_path
    assert live is not None and live.name.endswith(".h5.partial")
    assert live.parent == tmp_path.resolve()
    with open_file(live) as f:
        assert f.layout == "live" and f.status == "recording"
        for pv, samples in sent.items():
            same(f.samples(pv), samples)
    paths = rec.close()
    assert rec.status == "complete" and len(paths) == 1 and not live.exists()
    final = paths[0]
    assert not (final.stat().st_mode & 0o222)  # read-only
    with open_file(final) as f:
        assert f.layout == "final" and f.status == "complete"
        assert set(f.pv_names) == set(sent)
        for pv, samples in sent.items():
            same(f.samples(pv), samples)
        its = f.iterations()
        assert its["iter_index"].tolist() == [100, 101, 102, 103, 104]
        assert its["status"].tolist()[2] == "incomplete"
        assert its["reason"].tolist()[2] == "gateway_error"
        assert its["error_message"][2] == "boom " * 100
        assert f.values("F32").dtype == np.float32
        assert f.values("U").dtype == np.uint64 and f.values("U")[0] == 2**64 - 1
        assert f.values("E").tolist() == [0, 1, 0, 1, 0]
        img = f.values("IMG")
        assert img[1].shape == (2, 6)
        first, count = f.first_count("W")
        assert count.tolist() == [1] * 5 and first.tolist() == [0, 1, 2, 3, 4]
    # plain h5py: NXlog-style groups with exact types
    with h5py.File(final, "r") as h:
        g = h["pvs/F32"]
        assert g.attrs["NX_class"] == "NXlog"
        assert g["value"].dtype == np.float32 and g["time"].attrs["units"] == "ns"
        assert g["value"].attrs["units"] == "mm"
        info = {r["pv_name"].decode(): r for r in h["pv_info"][()]}
        assert [r["pv_name"].decode() for r in h["pv_info"][()]] == list(h["pvs"].attrs[
            "pv_names"])
        f32 = info["F32"]
        assert f32["units"] == b"mm" and f32["precision"] == 3
        assert f32["display_limit_low"] == -1.0 and f32["display_limit_high"] == 1.0
        assert math.isnan(f32["control_limit_low"]) and f32["description"] == b""
        assert f32["source"] == b"pva://F32" and f32["protocol"] == b"pva"
        assert f32["kind"] == b"scalar" and f32["storage_dtype"] == b"float32"
        assert f32["count"] == 5 and info["I"]["source"] == b"ca://I"
        # stored again only on change: display at row 3 (format 3: the alarm message,
        # "" / "HIHI", is a column, flag 16, not a metadata change)
        assert h["metadata/F32/row"][()].tolist() == [0, 3]  # format 5: beside the NXlog
        assert "F64" not in h["metadata"] and info["F64"]["metadata_entries"] == 1
        # format 5: the PV groups hold per-value columns only (plain NXlogs, decision 0011)
        for name, pv in h["pvs"].items():
            assert not {"first", "count", "metadata", "data_time"} & set(pv), name
            assert h[f"index/{name}/first"].shape == (5,), name
        assert f32["metadata_entries"] == 2
        msg = h["pvs/F32/alarm_message"]
        texts = list(msg.attrs["texts"])  # str, as for enum choices
        assert [texts[c] for c in msg[()]] == [_alarm(i)["message"] for i in range(5)]
        assert f32["flags"] & 16 and b'"message":null' in f32["metadata"]
        # never changes: no metadata group, row 0's structure only in /pv_info
        assert "I" not in h["metadata"] and info["I"]["metadata_entries"] == 1
        assert b'"value":null' in info["I"]["metadata"]
        assert list(h["pvs/E/value"].attrs["choices"]) == ["Off", "On"]
        assert info["E"]["choices"] == b'["Off", "On"]'
        assert h.attrs["status"] == "complete" and h.attrs["format_version"] == "5.1"


def test_timedbuffered_many_values_per_iteration_and_overlap(tmp_path: Path) -> None:
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="tb")
    sent = []
    # iteration 2 opens before 1 closes; its values must wait so rows stay grouped
    rec.handle(IterationOpened("t", "s", 1, 1))
    rec.handle(IterationOpened("t", "s", 2, 2))
    for it, n in ((2, 3), (1, 4), (2, 2)):
        batch = tuple(PVSample("P", {"value": float(it * 100 + k), "timeStamp": _ts(k)})
                      for k in range(n))
        rec.handle(ValuesReceived("t", it, 1, 1, batch))
        sent.append((it, batch))
    rec.handle(IterationClosed("t", "s", 2, IterationStatus.COMPLETE, None, 2, 3))
    rec.handle(IterationClosed("t", "s", 1, IterationStatus.INCOMPLETE,
                               IncompleteReason.TIMEOUT, 1, None))
    rec.handle(IterationOpened("t", "s", 3, 3))  # never closed: recording stops
    rec.handle(ValuesReceived("t", 3, 1, 1, (PVSample("P", {"value": 9.0}),)))
    (path,) = rec.close()
    with open_file(path) as f:
        its = f.iterations()
        assert its["iter_index"].tolist() == [1, 2, 3]
        assert its["reason"].tolist() == ["timeout", "", "recording_stopped"]
        first, count = f.first_count("P")
        assert count.tolist() == [4, 5, 1] and first.tolist() == [0, 4, 9]
        assert f.iterations_of("P").tolist() == [1] * 4 + [2] * 5 + [3]
        trains = list(f.trains())
        assert trains[1][0]["P"]["value"].tolist() == [200.0, 201, 202, 200, 201]
        assert trains[1][1]["P"]["timestamp.tid"] == 2


def test_triggered_sparse_and_segments(tmp_path: Path) -> None:
    rec = HDF5Recording(
        OutputOptions(directory=tmp_path, segment=SegmentOptions(max_iterations=2),
                      compression=Compression.ZSTD),
        run_name="trig", pv_uris=["pva://A", "pva://B"], seq=4,
    )
    for i in range(5):  # only A answers on most triggers
        rec.handle(IterationOpened("t", "s", i, i))
        samples = [PVSample("A", {"value": i, "timeStamp": _ts(i)})]
        if i == 3:
            samples.append(PVSample("B", {"value": "late pv", "timeStamp": _ts(i)}))
        rec.handle(ValuesReceived("t", i, 1, 1, tuple(samples)))
        rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i))
    paths = rec.close()
    assert len(paths) == 3
    assert [p.name.endswith(s) for p, s in zip(paths, ("0004.h5", "_s0001.h5", "_s0002.h5"),
                                               strict=True)] == [True] * 3
    from recorder.reader import open_recording

    with open_recording(paths[0]) as r:
        assert r.values("A").tolist() == [0, 1, 2, 3, 4]
        assert r.values("B").tolist() == ["late pv"]
        assert [int(x.value) for x in r.samples("A")] == [0, 1, 2, 3, 4]
        assert r.severity("A").tolist() == r.alarm_status("A").tolist() == [-1] * 5
        assert r.times("A").tolist() == [(1_700_000_000 + i) * 10**9 + 123_456_789
                                         for i in range(5)]
    with h5py.File(paths[0], "r") as h:
        # small datasets are compact (uncompressed, readable without the plugin); chunked
        # ones are zstd-compressed and say so
        for name in ("pvs/A/value", "iterations/iter_index"):
            ds = h[name]
            if ds.chunks is None:
                assert "required_filter" not in ds.attrs
            else:
                assert "zstd" in ds.attrs["required_filter"]


H5DUMP = shutil.which("h5dump")


def test_a_segment_begins_with_the_iteration_that_needs_it(tmp_path: Path) -> None:
    """Segment limits (iterations, seconds) rotate when the next iteration opens: a recording
    stopped right at a limit, as a triggered run often is, leaves no empty last file."""
    now = [0.0]
    rec = HDF5Recording(
        OutputOptions(directory=tmp_path / "n", segment=SegmentOptions(max_iterations=2)),
        run_name="shots", clock=lambda: now[0],
    )
    for i in range(4):
        write_iteration(rec, i, [PVSample("A", {"value": i, "timeStamp": _ts(i)})])
    assert rec.counters["segments"] == 2  # the limit is reached, nothing opened for it yet
    paths = rec.close()
    assert [_indexes(p) for p in paths] == [[0, 1], [2, 3]]

    rec = HDF5Recording(
        OutputOptions(directory=tmp_path / "t", segment=SegmentOptions(max_seconds=60)),
        run_name="hourly", clock=lambda: now[0],
    )
    for i, t in enumerate((0.0, 30.0, 61.0, 200.0, 230.0)):
        now[0] = t
        write_iteration(rec, i, [PVSample("A", {"value": i, "timeStamp": _ts(i)})])
    now[0] = 400.0  # the last segment is past its limit when the run stops
    paths = rec.close()
    assert [_indexes(p) for p in paths] == [[0, 1], [2], [3, 4]]


def _indexes(path: Path) -> list[int]:
    with open_file(path) as f:
        assert f.status == "complete"
        return list(f.iterations()["iter_index"].tolist())


def test_old_reader_h5dump_110(tmp_path: Path) -> None:
    # scripts/test installs it (Debian hdf5-tools): a missing reader fails, never skips
    assert H5DUMP is not None, "h5dump not found: install Debian's hdf5-tools (scripts/test)"
    version = subprocess.run(
        [H5DUMP or "", "--version"], check=False, capture_output=True, text=True
    )
    assert "1.10" in version.stdout or "1.12" in version.stdout, version.stdout
    rec, _sent = record(tmp_path, n_iter=3)
    rec.flush()
    live = rec.current_path
    assert live is not None
    # the live file is SWMR-flagged while open: h5dump refuses it only because of that flag
    (final,) = rec.close()
    out = subprocess.run([H5DUMP or "", "-d", "/pvs/F32/value", str(final)],
                         check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "0, 0.1, 0.2" in out.stdout.replace("\n", " ") or "0.1" in out.stdout
    out = subprocess.run([H5DUMP or "", "-d", "/pvs/S/value", str(final)],
                         check=False, capture_output=True, text=True)
    assert out.returncode == 0 and "\\37777777703\\37777777651" in out.stdout  # é, UTF-8
    out = subprocess.run(
        [H5DUMP or "", "-H", str(final)], check=False, capture_output=True, text=True
    )
    assert out.returncode == 0 and "iterations" in out.stdout
    # format 2: the /pv_info compound table, and a column shared by hard link
    out = subprocess.run([H5DUMP or "", "-d", "/pv_info", str(final)],
                         check=False, capture_output=True, text=True)
    assert out.returncode == 0 and '"pva://F32"' in out.stdout, out.stderr
    out = subprocess.run([H5DUMP or "", "-d", "/index/I/first", str(final)],
                         check=False, capture_output=True, text=True)
    assert out.returncode == 0 and "0, 1, 2" in out.stdout, out.stdout


def _as_format_4(path: Path) -> None:
    """Rewrite a 5.0 file in place into the 4.1 layout (what k2eg-recorder wrote before
    decision 0011): first/count and the metadata subgroup inside the PV group, the frame time
    named data_time, a shape dataset for every PV of a shaped kind, no NeXus axes."""
    path.chmod(0o644)
    with h5py.File(path, "r+") as h:
        info = {r["pv_name"].decode(): r for r in h["pv_info"][()]}
        for name, g in h["pvs"].items():
            for k in ("first", "count"):
                h.move(f"index/{name}/{k}", f"pvs/{name}/{k}")
            if name in h.get("metadata", {}):
                h.move(f"metadata/{name}", f"pvs/{name}/metadata")
            if "data_timestamp" in g:
                g.move("data_timestamp", "data_time")
            for attr in [a for a in g.attrs if a == "axes" or a.endswith("_indices")]:
                del g.attrs[attr]
            kind = info[name]["kind"].decode()
            if kind in ("array", "ndarray", "string_array", "table") and "shape" not in g:
                value = g["value"]
                trailing = (next(iter(value.values())).shape[1:2]
                            if isinstance(value, h5py.Group) else value.shape[1:])
                g["shape"] = np.tile(np.asarray(trailing, np.int64), (len(g["time"]), 1))
        del h["index"]
        if "metadata" in h:
            del h["metadata"]
        h.attrs["format_version"] = "4.1"


def test_format_4_files_read_the_same(tmp_path: Path) -> None:
    """Files written before format 5.0 (index, metadata and frame time inside the PV group,
    shape always written) read exactly as before, and verify accepts them."""
    from recorder.verify import verify_file

    rec, sent = record(tmp_path)
    (final,) = rec.close()
    old = tmp_path / "old.h5"
    shutil.copyfile(final, old)
    _as_format_4(old)
    with h5py.File(old, "r") as h:
        assert "first" in h["pvs/F32"] and "index" not in h and "shape" in h["pvs/W"]
    with open_file(final) as new_f, open_file(old) as old_f:
        assert old_f.attrs["format_version"] == "4.1"
        for pv, samples in sent.items():
            same(old_f.samples(pv), samples)
            assert [repr(v) for v in old_f.values(pv).tolist()] == [
                repr(v) for v in new_f.values(pv).tolist()], pv
            assert [a.tolist() for a in old_f.first_count(pv)] == [
                a.tolist() for a in new_f.first_count(pv)], pv
        assert old_f.summary() == new_f.summary()
    report = verify_file(old, data=True)
    assert report.ok, [str(p) for p in report.errors]


def test_an_iteration_open_at_a_rotation_is_not_reported_as_a_writer_crash(
        tmp_path: Path) -> None:
    """Iteration 3 is open, with values already in segment 0, when 4 opens and rotates: its
    row in segment 0 keeps the header it had (0 would be "not received") and says the
    segment stopped before it closed, not ``writer_crashed`` (the writer did not die)."""
    rec = HDF5Recording(
        OutputOptions(directory=tmp_path, segment=SegmentOptions(max_iterations=2)),
        run_name="rot")
    write_iteration(rec, 1, [PVSample("A", {"value": 1.0, "timeStamp": _ts(1)})])
    rec.handle(IterationOpened("t", "s", 2, 2))
    rec.handle(ValuesReceived("t", 2, 1, 1, (PVSample("A", {"value": 2.0}),)))
    rec.handle(IterationOpened("t", "s", 3, 3_000))  # while 2 is open: no rotation yet
    rec.handle(ValuesReceived("t", 3, 1, 1, (PVSample("A", {"value": 3.0}),)))
    rec.handle(IterationClosed("t", "s", 2, IterationStatus.COMPLETE, None, 2, 2))
    rec.handle(IterationOpened("t", "s", 4, 4_000))  # rotation: 3 is still open
    rec.handle(ValuesReceived("t", 3, 2, 1, (PVSample("A", {"value": 3.5}),)))
    rec.handle(IterationClosed("t", "s", 3, IterationStatus.COMPLETE, None, 3_000, 3_001))
    rec.handle(IterationClosed("t", "s", 4, IterationStatus.COMPLETE, None, 4_000, 4_001))
    paths = rec.close()
    assert len(paths) == 2
    with open_file(paths[0]) as f:
        its = f.iterations()
        assert its["iter_index"].tolist() == [1, 2, 3]
        assert its["header_timestamp"].tolist() == [1, 2, 3_000]
        assert its["status"].tolist()[2] == "incomplete"
        assert its["reason"].tolist()[2] != "writer_crashed"
        assert its["n_written"].tolist() == [1, 1, 1]
        assert f.values("A").tolist() == [1.0, 2.0, 3.0]
    with open_file(paths[1]) as f:
        its = f.iterations()
        assert its["iter_index"].tolist() == [3, 4]
        assert its["status"].tolist() == ["complete", "complete"]
        assert its["n_written"].tolist() == [1, 0]
        assert f.values("A").tolist() == [3.5]


def test_metadata_text_hdf5_cannot_hold_is_finalized(tmp_path: Path) -> None:
    """EPICS text is often Latin-1 (``°C`` as the byte 0xB0 in an EGU field) or may hold NUL:
    such units, descriptions, enum choices and table labels (kept exactly in the metadata
    JSON) used to make finalization fail (``VLEN strings do not support embedded NULLs``,
    ``UnicodeEncodeError``), leaving every PV of the segment in the ``.partial``."""
    from recorder.sim.encoding import pack

    def lazy(pv: str, data: dict[str, Any]) -> PVSample:
        raw = pack(data)  # "\udcb0": the byte 0xB0 on the wire, as the client decodes it
        return PVSample.from_raw(pv, raw, 0)

    def samples_of(i: int) -> list[PVSample]:
        return [
            lazy("T", {"value": 20.5 + i, "timeStamp": _ts(i), "display": {
                "units": "\udcb0C", "description": "temp\x00erature", "format": "\udcff"}}),
            lazy("E", {"value": {"index": i % 2, "choices": ["Off", "50 \udcb0C", "a\x00b"]},
                       "timeStamp": _ts(i)}),
            lazy("TB", {"labels": ["x \udcb5m", "y\x00"], "value": {"x": [1.0], "y": [2]},
                        "timeStamp": _ts(i)}),
        ]

    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="latin1")
    path, sent = record_closed(rec, 3, samples_of)
    assert rec.status == "complete" and path.suffix == ".h5"
    with open_file(path) as f:
        for pv, samples in sent.items():
            same(f.samples(pv), samples)
        assert f.values("E").tolist() == [0, 1, 0]
        assert f.pv_info("T")["units"] == "\ufffdC"
    with h5py.File(path, "r") as h:
        assert h["pvs/T/value"].attrs["units"] == "\ufffdC"
        assert list(h["pvs/E/value"].attrs["choices"]) == ["Off", "50 \ufffdC", "a\ufffdb"]
        assert list(h["pvs/TB/value"].attrs["labels"]) == ["x \ufffdm", "y\ufffd"]
    from recorder.verify import verify_file

    report = verify_file(path, data=True)
    assert report.ok, [str(p) for p in report.errors]


def test_pv_info_describes_where_the_file_keeps_what_it_names(tmp_path: Path) -> None:
    """``/pv_info@description`` is what an analyst reading the file without the docs has: the
    metadata entries of a PV whose structure changes are in ``/metadata/<PV>/{row,json}``
    (format 5.0; it said "the group has metadata/row", where 5.x files have nothing), and the
    ``flags`` column is described too."""
    rec, _sent = record(tmp_path, n_iter=5)
    (final,) = rec.close()
    with h5py.File(final, "r") as h:
        text = h["pv_info"].attrs["description"]
        info = {r["pv_name"].decode(): r for r in h["pv_info"][()]}
        assert info["F32"]["metadata_entries"] > 1 and "metadata" not in h["pvs/F32"]
        assert "metadata/F32/row" in h and "metadata/F32/json" in h
        assert "the group has metadata" not in text, text
        assert "/metadata/<PV>/row" in text and "/metadata/<PV>/json" in text, text
        assert "flags" in text, text


def test_files_keep_the_umask_the_unit_sets(tmp_path: Path) -> None:
    """The unit's UMask=0027 makes files group-readable, not world-readable: the finalized
    file is read-only, and keeps that (0440, not 0444)."""
    old = os.umask(0o027)
    try:
        rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="perm")
        write_iteration(rec, 1, [PVSample("A", {"value": 1.0, "timeStamp": _ts(1)})])
        rec.flush()
        live = rec.current_path
        assert live is not None
        assert stat.S_IMODE(live.stat().st_mode) & 0o007 == 0
        (final,) = rec.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(final.stat().st_mode) == 0o440
