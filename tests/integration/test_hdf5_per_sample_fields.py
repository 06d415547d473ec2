"""Per-sample fields of format 4.0 through the HDF5 sink: ``timeStamp.userTag`` (EPICS 7's
UTAG, e.g. a pulse id) and an NTNDArray's ``uniqueId`` and ``dataTimeStamp`` change with
every sample; they are columns (``user_tag``; ``unique_id``, ``data_timestamp``), not a metadata
entry per sample, and every sample comes back exactly as sent, from the live file, the final
file (in another process too) and a live file of format 3.0, which has no ``user_tag``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from test_hdf5_roundtrip import _as_format_4, same, write_iteration

from recorder.client.values import PVSample
from recorder.reader import open_file
from recorder.sim.pvs import parse_pv, pv_structure
from recorder.sinks import livefile
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions

N = 40
ODD_TAGS = [0, None, 2**31, True, 1.5]  # stay in the metadata, as before format 4.0


def pulse(i: int) -> int:
    return 3_000_000_000 // 2 + 7 * i  # uint32 on the wire, within int32


def _ts(i: int, tag: Any) -> dict[str, Any]:
    return {"secondsPastEpoch": 1_700_000_000 + i, "nanoseconds": 1000 * i, "userTag": tag}


def samples_of(i: int) -> list[PVSample]:
    disp = {"units": "mm", "precision": 3, "limitLow": -1.0, "limitHigh": 1.0}
    mixed = ODD_TAGS[i % 5] if i % 2 else pulse(i)
    return [
        PVSample("P", {"value": 0.5 * i, "alarm": {"severity": 0, "status": 0,
                                                   "message": "NO_ALARM"},
                       "timeStamp": _ts(i, pulse(i)), "display": disp}),
        PVSample("Z", {"value": i, "timeStamp": _ts(i, 0)}),
        PVSample("M", {"value": float(i), "timeStamp": _ts(i, mixed)}),
        PVSample("W", {"value": [float(x + i) for x in range(8)],
                       "timeStamp": _ts(i, -pulse(i))}, frozenset({"value"})),
        PVSample("IMG", {"value": {"ubyteValue": [i % 256] * 6},
                         "dimension": [{"size": 3}, {"size": 2}], "uniqueId": i + 1,
                         "dataTimeStamp": _ts(i, 0), "timeStamp": _ts(i, pulse(i))}),
    ]


def record(tmp_path: Path, *, flush_at: int = N // 2) -> tuple[HDF5Recording,
                                                               dict[str, list[PVSample]]]:
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="tags")
    sent: dict[str, list[PVSample]] = {}
    for i in range(N):
        samples = samples_of(i)
        write_iteration(rec, i, samples)
        for s in samples:
            sent.setdefault(s.pv, []).append(s)
        if i == flush_at:
            rec.flush()
    rec.flush()
    return rec, sent


def test_a_pulse_id_tag_is_a_column_and_round_trips(tmp_path: Path) -> None:
    rec, sent = record(tmp_path)
    live = rec.current_path
    assert live is not None
    with open_file(live) as f:  # the live layout: user_tag column of /live/samples
        for pv, samples in sent.items():
            same(f.samples(pv), samples)
        assert f.user_tags("P").tolist() == [pulse(i) for i in range(N)]
    (final,) = rec.close()
    with open_file(final) as f:
        assert f.attrs["format_version"] == "5.1"
        for pv, samples in sent.items():
            same(f.samples(pv), samples)
        assert f.user_tags("P").tolist() == [pulse(i) for i in range(N)]  # the column
        assert f.user_tags("Z").dtype == np.int64 and not f.user_tags("Z").any()
        assert f.user_tags("M").tolist() == [
            pulse(i) if i % 2 == 0 else ODD_TAGS[i % 5] for i in range(N)]  # objects
        # trains() flattens rows from one template per metadata entry: the tag is per row
        seen = [t[0]["P"]["timeStamp.userTag"] for t in f.trains()]
        assert [int(x) for x in seen] == [pulse(i) for i in range(N)]
    with h5py.File(final, "r") as h:
        info = {r["pv_name"].decode(): r for r in h["pv_info"][()]}
        p = h["pvs/P"]
        assert p["user_tag"].dtype == np.int32
        assert p["user_tag"][()].tolist() == [pulse(i) for i in range(N)]
        # one metadata entry for the whole file, as for a PV without tags
        assert "P" not in h.get("metadata", {}) and info["P"]["metadata_entries"] == 1
        assert b'"userTag":null' in info["P"]["metadata"] and info["P"]["flags"] & 32
        assert h["pvs/W/user_tag"][()].tolist() == [-pulse(i) for i in range(N)]
        assert info["IMG"]["flags"] & 32 and len(h["pvs/IMG/user_tag"]) == N
        # never tagged: no column, the zero stays in the metadata (as in format 3.0)
        assert "user_tag" not in h["pvs/Z"] and info["Z"]["metadata_entries"] == 1
        assert b'"userTag":0' in info["Z"]["metadata"] and not info["Z"]["flags"] & 32
        # mixed: the column holds 0 where the row keeps its own tag in its metadata
        m = h["pvs/M"]
        tagged = (m["flags"][()] & 32) != 0
        assert tagged.tolist() == [i % 2 == 0 for i in range(N)]
        assert m["user_tag"][()].tolist() == [0 if i % 2 else pulse(i) for i in range(N)]
    # plain h5py in another process
    code = ("import h5py, sys; h = h5py.File(sys.argv[1], 'r'); "
            "print(h['pvs/P/user_tag'][()].tolist())")
    out = subprocess.run([sys.executable, "-c", code, str(final)], check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out) == [pulse(i) for i in range(N)]


def test_a_live_file_without_the_column_still_reads_and_finalizes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .partial written before format 4.0 has no /live/samples/user_tag: it reads, and
    finalizes (the daemon's restart, ``recover``), with every tag that was in its rests."""
    old_columns = {k: v for k, v in livefile.SAMPLE_COLUMNS.items() if k != "user_tag"}
    with monkeypatch.context() as m:
        m.setattr(livefile, "SAMPLE_COLUMNS", old_columns)
        rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="old")
        sent: dict[str, list[PVSample]] = {}
        for i in range(6):  # tags 0 and odd ones only: what a 3.0 writer could store
            samples = [PVSample("Z", {"value": i, "timeStamp": _ts(i, 0)}),
                       PVSample("M", {"value": i, "timeStamp": _ts(i, ODD_TAGS[i % 5])})]
            write_iteration(rec, i, samples)
            for s in samples:
                sent.setdefault(s.pv, []).append(s)
        rec.flush()
    live = rec.current_path
    assert live is not None
    with h5py.File(live, "r", swmr=True) as h:
        assert "user_tag" not in h["live/samples"]
    with open_file(live) as f:
        for pv, samples in sent.items():
            same(f.samples(pv), samples)
    (final,) = rec.close()
    with open_file(final) as f:
        for pv, samples in sent.items():
            same(f.samples(pv), samples)


T0 = 1_763_700_000 * 1_000_000_000


def frame(i: int) -> PVSample:
    """A simulated areaDetector image (4x3 uint16): uniqueId i + 1, dataTimeStamp of the
    frame; frame 5 has a bool uniqueId, frame 7 is one-dimensional (not the PV's rank)."""
    s = pv_structure(parse_pv("SIM:IMG:USHORT:1:S4x3"), i, T0 + i * 100_000_003)
    if i == 5:
        s["uniqueId"] = True  # does not fit the column: stays in the metadata
    if i == 7:
        s["dimension"] = [dict(s["dimension"][0], size=12, fullSize=12)]
    return PVSample("CAM", s)


def test_an_image_frame_id_and_time_are_columns(tmp_path: Path) -> None:
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="cam")
    sent = []
    for i in range(12):
        write_iteration(rec, i, [frame(i)])
        sent.append(frame(i))
        if i == 6:
            rec.flush()
    rec.flush()
    live = rec.current_path
    assert live is not None
    with open_file(live) as f:
        same(f.samples("CAM"), sent)
    (final,) = rec.close()
    with open_file(final) as f:
        same(f.samples("CAM"), sent)
        assert [t[0]["CAM"]["uniqueId"] for t in f.trains()][:3] == [1, 2, 3]
    with h5py.File(final, "r") as h:
        g = h["pvs/CAM"]
        info = {r["pv_name"].decode(): r for r in h["pv_info"][()]}["CAM"]
        assert g["unique_id"].dtype == np.int32
        assert g["unique_id"][()].tolist() == [0 if i == 5 else i + 1 for i in range(12)]
        frame_ns = [s.data["dataTimeStamp"] for s in sent]
        assert g["data_timestamp"][()].tolist() == [  # format 5 (was data_time)
            0 if i == 5 else t["secondsPastEpoch"] * 10**9 + t["nanoseconds"]
            for i, t in enumerate(frame_ns)]
        assert g["data_timestamp"].attrs["units"] == "ns"
        # entries: row 0, the bool id (5) and back (6), the 1-D frame (7) and back (8);
        # one per frame before format 4.0
        assert info["metadata_entries"] == 5
        assert h["metadata/CAM/row"][()].tolist() == [0, 5, 6, 7, 8]
    # a 4.x file (frame time named data_time, metadata in the PV group) reads the same
    old = tmp_path / "old.h5"
    shutil.copyfile(final, old)
    _as_format_4(old)
    with open_file(old) as f:
        assert "data_time" in f.h5["pvs/CAM"]
        same(f.samples("CAM"), sent)
