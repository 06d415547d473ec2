"""Our PV groups are NXlogs to a real NeXus loader: ``scippnexus`` (the ESS stack's) reads
each one as a time series, in another process (format 5.0, decision 0011).

Before 5.0 the groups also held the per-iteration index and the metadata subgroup, and a
frame time named ``data_time``: scippnexus fell back to an untyped ``DataGroup`` for every
waveform and for any PV missing from an iteration or sending several values in one, and
raised ``KeyError: 'data'`` for every NTNDArray PV (``*_time`` declares a sub-log to it).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from recorder.client.events import (
    IterationClosed,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.values import PVSample
from recorder.reader import open_file
from recorder.sim.pvs import parse_pv, pv_structure
from recorder.sinks import hdf5 as hdf5_module
from recorder.sinks.finalize import finalize
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions

FIXED = ["SIM:AI:DOUBLE:1", "SIM:AI:FLOAT:2", "SIM:AI:LONG:3", "SIM:BI:BOOL:1",
         "SIM:MBBI:ENUM:1", "SIM:SI:STRING:1", "SIM:WF:FLOAT:1", "SIM:IMG:UBYTE:1:S8x6"]
"""PVs with one value of one shape per iteration: each must load as a DataArray."""
BUFFERED = "SIM:AI:DOUBLE:10:P20"  # several values per iteration (timedbuffered)
GAPPY = "SIM:AI:DOUBLE:20"  # missing from one iteration
VARYING = "SIM:WFVAR:DOUBLE:10:N32"  # waveforms whose length changes
TABLE = "SIM:TABLE:1"
N_ITER = 6
T0_NS = 1_700_000_000 * 10**9

LOADER = r"""
import json, sys, warnings
import numpy as np
import scipp as sc
import scippnexus as snx

out = {}
with snx.File(sys.argv[1]) as f:
    for name, group in f["pvs"].items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = group[()]
        row = {"type": type(got).__name__, "warnings": [str(w.message) for w in caught]}
        if isinstance(got, sc.DataArray):
            row["dims"] = list(got.dims)
            values = got.values
            row["values"] = values.tolist() if hasattr(values, "tolist") else list(values)
            coords = got.coords
            row["time"] = coords["time"].values.astype("datetime64[ns]").astype(np.int64).tolist()
            for c in ("iteration", "severity", "status", "shape"):
                if c in coords:
                    row[c] = coords[c].values.tolist()
        out[name] = row
print(json.dumps(out))
"""


def _record(directory: Path) -> Path:
    rec = HDF5Recording(OutputOptions(directory=directory), run_name="nexus")
    specs = {name: parse_pv(name) for name in [*FIXED, BUFFERED, GAPPY, VARYING, TABLE]}
    for i in range(1, N_ITER + 1):
        wall = T0_NS + i * 100_000_000
        rec.handle(IterationOpened("t", "nexus", i, wall))
        samples = []
        for name, spec in specs.items():
            if name == GAPPY and i == 3:
                continue
            for k in range(3 if name == BUFFERED else 1):
                samples.append(PVSample(name, pv_structure(spec, 3 * i + k, wall + k * 1000)))
        rec.handle(ValuesReceived("t", i, 1, 1, tuple(samples)))
        rec.handle(IterationClosed("t", "nexus", i, IterationStatus.COMPLETE, None, wall,
                                   wall + 1))
    (path,) = rec.close()
    return path


def test_scippnexus_reads_every_pv_group_as_an_nxlog(tmp_path: Path) -> None:
    path = _record(tmp_path)
    with h5py.File(path, "r") as h:  # the shapes this test is about
        assert "shape" not in h["pvs/SIM:WF:FLOAT:1"] and "shape" in h[
            "pvs/SIM:WFVAR:DOUBLE:10:N32"]
        assert "data_timestamp" in h["pvs/SIM:IMG:UBYTE:1:S8x6"]
    got = subprocess.run([sys.executable, "-c", LOADER, str(path)], capture_output=True,
                         text=True, timeout=300, check=False)
    assert got.returncode == 0, got.stderr
    loaded = json.loads(got.stdout)
    with open_file(path) as f:
        assert set(loaded) == set(f.pv_names)
        for pv in [*FIXED, BUFFERED, GAPPY]:
            row = loaded[pv]
            assert row["type"] == "DataArray", (pv, row["warnings"])
            assert row["warnings"] == [], pv
            assert row["dims"][0] == "time", pv
            expected = f.values(pv)
            assert np.array_equal(np.asarray(row["values"]), expected), pv
            assert row["time"] == f.times(pv).tolist(), pv
            assert row["iteration"] == f.iterations_of(pv).tolist(), pv
            assert row["severity"] == f.severity(pv).tolist(), pv
            assert row["status"] == f.alarm_status(pv).tolist(), pv
        assert len(loaded[BUFFERED]["values"]) == 3 * N_ITER
        assert loaded[GAPPY]["iteration"] == [1, 2, 4, 5, 6]
        assert np.asarray(loaded["SIM:IMG:UBYTE:1:S8x6"]["values"]).shape == (N_ITER, 6, 8)
        # waveforms of changing length: zero-padded, with each row's length as a coordinate
        row = loaded[VARYING]
        assert row["type"] == "DataArray", row["warnings"]
        lengths = [len(v) for v in f.values(VARYING)]
        assert row["shape"] == lengths and len(set(lengths)) > 1
        assert [r[:n] for r, n in zip(row["values"], lengths, strict=True)] == [
            v.tolist() for v in f.values(VARYING)]
        # a table is a group of columns, not one array: NeXus's fallback, a DataGroup
        assert loaded[TABLE]["type"] == "DataGroup"


def test_a_waveform_whose_alarm_message_column_was_written_in_pieces_is_still_an_nxlog(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large file is finalized in pieces (columns spilled to chunked datasets): the
    ``alarm_message`` column of a waveform PV must still be declared as running along
    ``time`` (``alarm_message_indices``), else 40 rows of 40-element waveforms are
    ambiguous and scippnexus gives up on the group (a DataGroup instead of a DataArray)."""
    monkeypatch.setattr(hdf5_module, "finalize", functools.partial(finalize, block_bytes=256))
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="nexus")
    n = 40
    for i in range(n):
        wall = T0_NS + i * 100_000_000
        ts = {"secondsPastEpoch": wall // 10**9, "nanoseconds": wall % 10**9, "userTag": 0}
        sample = PVSample("WF", {"value": [float(i)] * n, "timeStamp": ts,
                                 "alarm": {"severity": 1, "status": 2,
                                           "message": f"HIGH {i % 3}"}})
        rec.handle(IterationOpened("t", "nexus", i, wall))
        rec.handle(ValuesReceived("t", i, 1, 1, (sample,)))
        rec.handle(IterationClosed("t", "nexus", i, IterationStatus.COMPLETE, None, wall,
                                   wall + 1))
    (path,) = rec.close()
    with h5py.File(path, "r") as h:
        g = h["pvs/WF"]
        assert g["alarm_message"].chunks is not None  # written in pieces
        assert g.attrs["alarm_message_indices"] == 0
    got = subprocess.run([sys.executable, "-c", LOADER, str(path)], capture_output=True,
                         text=True, timeout=300, check=False)
    assert got.returncode == 0, got.stderr
    row = json.loads(got.stdout)["WF"]
    assert row["type"] == "DataArray", row["warnings"]
    assert row["dims"] == ["time", "dim_1"]
