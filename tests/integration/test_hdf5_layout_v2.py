"""Final layout 2.0: shared (hard-linked) columns, /pv_info, metadata stored only on change."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import h5py
import pytest
from test_hdf5_roundtrip import record_closed, same, write_iteration

from recorder.client.values import PVSample
from recorder.reader import open_file
from recorder.sinks import hdf5 as hdf5_module
from recorder.sinks.finalize import finalize
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions

N_ITER = 6


def _ts(sec: int, ns: int = 0) -> dict[str, Any]:
    return {"secondsPastEpoch": sec, "nanoseconds": ns, "userTag": 0}


def _samples(i: int) -> list[PVSample]:
    alarm0 = {"severity": 0, "status": 0, "message": "NO_ALARM"}
    disp = {"units": "mm", "precision": 2, "limitLow": -5.0, "limitHigh": 5.0}
    # M: units change at row 3, description appears at row 5 (metadata after row 0)
    m_disp = {"units": "mm" if i < 3 else "um", "precision": 2}
    if i >= 5:
        m_disp["description"] = "moved"
    return [
        # A1, A2: same time stamps, no alarms -> time/iteration/alarms/first/count shared
        PVSample("A1", {"value": 1.0 * i, "alarm": alarm0, "timeStamp": _ts(100 + i),
                        "display": disp}),
        PVSample("A2", {"value": -2.0 * i, "alarm": alarm0, "timeStamp": _ts(100 + i),
                        "display": {**disp, "units": "V"}}),
        # B: its own time stamps and alarms: those columns are its own datasets
        PVSample("B", {"value": 3 * i, "timeStamp": _ts(100 + i, 17 + i),
                       "alarm": {"severity": i % 3, "status": i % 2, "message": "x"}}),
        # N: no value in some rows -> per-row flags
        PVSample("N", {"value": None if i % 2 else 1.5, "timeStamp": _ts(100 + i)}),
        PVSample("M", {"value": float(i), "alarm": alarm0, "timeStamp": _ts(100 + i),
                       "display": m_disp}),
        PVSample("E", {"value": {"index": i % 2, "choices": ["Off", "On"]},
                       "timeStamp": _ts(100 + i)}),
    ]


def _record(directory: Path) -> tuple[Path, dict[str, list[PVSample]]]:
    rec = HDF5Recording(OutputOptions(directory=directory), run_name="v2",
                        pv_uris=["pva://A1", "ca://B"])
    return record_closed(rec, N_ITER, _samples)


def _info(h: h5py.File) -> dict[str, Any]:
    return {r["pv_name"].decode(): r for r in h["pv_info"][()]}


def test_shared_columns_are_ordinary_datasets(tmp_path: Path) -> None:
    path, sent = _record(tmp_path)
    with h5py.File(path, "r") as h:
        a1, a2, b = h["pvs/A1"], h["pvs/A2"], h["pvs/B"]
        for name in ("pvs/{}/time", "pvs/{}/iteration", "pvs/{}/severity", "pvs/{}/status",
                     "index/{}/first", "index/{}/count"):
            # one object, two names: h5py sees the same dataset under both PVs
            one, other = h[name.format("A1")], h[name.format("A2")]
            assert isinstance(other, h5py.Dataset)
            assert one == other, name
            assert h5py.h5o.get_info(one.id).rc >= 2, name
            assert one[()].tolist() == other[()].tolist()
        assert a2["time"].attrs["units"] == "ns"
        assert a2["time"].attrs["start"] == "1970-01-01T00:00:00Z"
        assert a1["iteration"][()].tolist() == list(range(N_ITER))
        assert h["index/A1/count"][()].tolist() == [1] * N_ITER
        # own columns: not shared, their own values
        assert b["time"] != a1["time"] and b["severity"] != a1["severity"]
        assert b["severity"][()].tolist() == [i % 3 for i in range(N_ITER)]
        assert b["iteration"] == a1["iteration"]  # but the iterations are the same
        # never shared: values (with their own units)
        assert a1["value"] != a2["value"]
        assert a1["value"].attrs["units"] == "mm" and a2["value"].attrs["units"] == "V"
        assert a1["value"][()].tolist() == [1.0 * i for i in range(N_ITER)]
        # flags: constant -> only in /pv_info; varying -> a dataset
        info = _info(h)
        assert "flags" not in a1 and info["A1"]["flags"] == 15
        assert info["N"]["flags"] == -1
        assert (h["pvs/N/flags"][()] & 8).tolist() == [8, 0] * (N_ITER // 2)
        assert a1.attrs["NX_class"] == "NXlog"
        assert list(a1.attrs) == ["NX_class"]  # the rest of the description is /pv_info
    with open_file(path) as f:
        for pv, samples in sent.items():
            same(f.samples(pv), samples)
        assert f.values("N")[1] is None


def test_metadata_change_after_row_0(tmp_path: Path) -> None:
    path, sent = _record(tmp_path)
    with h5py.File(path, "r") as h:
        info = _info(h)
        m = h["pvs/M"]
        assert h["metadata/M/row"][()].tolist() == [0, 3, 5]  # format 5: beside the NXlog
        jsons = [x.decode() for x in h["metadata/M/json"][()]]
        assert '"units":"mm"' in jsons[0] and '"units":"um"' in jsons[1]
        assert '"description":"moved"' in jsons[2]
        assert info["M"]["metadata_entries"] == 3
        assert info["M"]["metadata"].decode() == jsons[0]
        # units of the first metadata on value and in /pv_info; changes in the JSON
        assert m["value"].attrs["units"] == "mm" and info["M"]["units"] == b"mm"
        # no change: no metadata group
        assert "A1" not in h["metadata"] and info["A1"]["metadata_entries"] == 1
    with open_file(path) as f:
        same(f.samples("M"), sent["M"])
        assert [s.data["display"]["units"] for s in f.samples("M")] == ["mm"] * 3 + ["um"] * 3


def test_alarm_messages_row_by_row_live_and_final(tmp_path: Path) -> None:
    """A flapping alarm message comes back per row (it is kept in the metadata entries), from
    the file being written and from the finalized one; a live file stores each structure
    once per segment (its /live/meta rows share the JSON)."""
    texts = ["NO_ALARM", "HIGH", "NO_ALARM", "HIGH", "HIHI", "NO_ALARM", "HIGH", "HIGH"]
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="msg",
                        pv_uris=["pva://F", "pva://Q"])
    for i, text in enumerate(texts):
        sev = 0 if text == "NO_ALARM" else 2
        samples = (
            PVSample("F", {"value": float(i), "timeStamp": _ts(100 + i),
                           "alarm": {"severity": sev, "status": 3 * (sev > 0),
                                     "message": text}}),
            PVSample("Q", {"value": float(i), "timeStamp": _ts(100 + i)}),  # no alarm
        )
        write_iteration(rec, i, samples)
    rec.flush()
    live_path = rec.current_path
    assert live_path is not None
    with open_file(live_path) as f:
        assert f.alarm_messages("F").tolist() == texts
        assert f.alarm_messages("Q").tolist() == [None] * len(texts)
    with h5py.File(live_path, "r", swmr=True) as h:
        meta = h["live/meta"]
        offsets = meta["offset"][()].tolist()
        assert len(offsets) == 1 + 6 + 1  # Q's row 0, F's row 0 and every change of F
        assert len(set(offsets)) == 1 + 3  # Q's, and F's three structures stored once each
    (path,) = rec.close()
    with open_file(path) as f:
        assert f.alarm_messages("F").tolist() == texts
        assert f.severity("F").tolist() == [0 if t == "NO_ALARM" else 2 for t in texts]


def test_pv_table_of_a_live_file_says_why_there_is_none(tmp_path: Path) -> None:
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="live")
    write_iteration(rec, 0, _samples(0))
    rec.flush()
    assert rec.current_path is not None
    with open_file(rec.current_path) as f, pytest.raises(
            KeyError, match=r"no /pv_info table \(a live file gets it when it is finalized\)"):
        f.pv_table()
    rec.close()


def test_pv_info_table(tmp_path: Path) -> None:
    path, _sent = _record(tmp_path)
    with open_file(path) as f:
        table = f.pv_table()
        assert [n.decode() for n in table["pv_name"]] == f.pv_names
        a1 = f.pv_info("A1")
        assert a1["source"] == "pva://A1" and a1["protocol"] == "pva"
        assert a1["kind"] == "scalar" and a1["storage_dtype"] == "float64"
        assert a1["units"] == "mm" and a1["precision"] == 2
        assert a1["display_limit_low"] == -5.0 and a1["count"] == N_ITER
        assert math.isnan(a1["alarm_hysteresis"]) and a1["description"] == ""
        assert f.pv_info("B")["source"] == "ca://B" and f.pv_info("N")["source"] == ""
        assert f.pv_info("E")["choices"] == '["Off", "On"]'
    with h5py.File(path, "r") as h:
        assert list(h["pvs/E/value"].attrs["choices"]) == ["Off", "On"]
        assert h.attrs["format_version"] == "5.1"


def test_spilled_columns_are_not_shared_but_equal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Columns written in blocks (memory budget exceeded) are their own chunked datasets;
    the content is the same as with sharing."""
    monkeypatch.setattr(hdf5_module, "finalize", functools.partial(finalize, block_bytes=512))
    path, sent = _record(tmp_path)
    with h5py.File(path, "r") as h:
        assert h["pvs/A1/time"][()].tolist() == h["pvs/A2/time"][()].tolist()
    with open_file(path) as f:
        for pv, samples in sent.items():
            same(f.samples(pv), samples)
        first, count = f.first_count("B")
        assert first.tolist() == list(range(N_ITER)) and count.tolist() == [1] * N_ITER
