"""``RecordingFile.values`` reads a finalized PV's ``value`` dataset directly when every row
is in it, and gives exactly what the per-sample path gives (dtype, shape, values)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from test_hdf5_roundtrip import record, write_iteration

from recorder.client.values import PVSample
from recorder.reader import open_file, values_of
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


def test_values_direct_equal_the_samples_path(tmp_path: Path) -> None:
    rec, sent = record(tmp_path, n_iter=6)
    (path,) = rec.close()
    with open_file(path) as f:
        for pv in sent:
            got = f.values(pv)
            direct = pv not in f._cache  # no samples were built
            assert direct == (pv in DIRECT), pv
            if direct:  # (the others are values_of(samples) already)
                _equal(got, values_of(f.samples(pv)))
                _equal(got, values_of(sent[pv]))


def test_equal_length_waveforms_are_one_array(tmp_path: Path) -> None:
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="wf")
    sent = []
    for i in range(50):
        s = PVSample("WF", {"value": [float(i + k) for k in range(8)],
                            "timeStamp": {"secondsPastEpoch": 1, "nanoseconds": i}})
        sent.append(s)
        write_iteration(rec, i, (s,))
    (path,) = rec.close()
    with open_file(path) as f:
        got = f.values("WF")
        assert "WF" not in f._cache
        assert got.shape == (50, 8) and got.dtype == np.float64
        assert got[7].tolist() == [7.0 + k for k in range(8)]
        _equal(got, values_of(sent))


# PVs of the fixture read from a live file's inline columns (scalars, bools, enums)
LIVE_DIRECT = {"F32", "F64", "I", "U", "B", "E", "NAN"}


def test_live_values_from_the_inline_columns(tmp_path: Path) -> None:
    rec, sent = record(tmp_path, n_iter=6)
    rec.flush()
    assert rec.current_path is not None
    with open_file(rec.current_path) as f:
        for pv in sent:
            got = f.values(pv)
            direct = pv not in f._cache
            assert direct == (pv in LIVE_DIRECT), pv
            if direct:
                _equal(got, values_of(f.samples(pv)))
                _equal(got, values_of(sent[pv]))
    rec.close()


def test_equal_shape_images_are_one_array(tmp_path: Path) -> None:
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="img")
    sent = []
    for i in range(20):
        s = PVSample("CAM", {"value": {"ushortValue": [i + k for k in range(12)]},
                             "dimension": [{"size": 4}, {"size": 3}],
                             "timeStamp": {"secondsPastEpoch": 1, "nanoseconds": i}})
        sent.append(s)
        write_iteration(rec, i, (s,))
    (path,) = rec.close()
    with open_file(path) as f:
        got = f.values("CAM")
        assert "CAM" not in f._cache
        assert got.shape == (20, 3, 4) and got.dtype == np.uint16
        assert got[5].tolist() == (5 + np.arange(12)).reshape(3, 4).tolist()
        _equal(got, values_of(sent))
