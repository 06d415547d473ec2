"""The daemon's recording factory: a writer process per recording by default, in-process with
``output.isolate: false``; both write the same readable file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from recorder.client import IterationClosed, IterationOpened, IterationStatus, ValuesReceived
from recorder.client.values import PVSample
from recorder.config.models import RunDefinition
from recorder.daemon.recording import hdf5_recording
from recorder.reader import open_file
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.process import IsolatedRecording

pytestmark = pytest.mark.integration


def _definition(directory: Path, **output: Any) -> RunDefinition:
    return RunDefinition.model_validate({
        "name": "iso",
        "snapshot": {"snapshot_name": "iso_snap", "pv_uri_list": ["pva://A:X"]},
        "output": {"directory": str(directory), **output},
    })


def _record(rec: Any) -> list[Path]:
    for i in range(3):
        rec.handle(IterationOpened("iso_snap", "iso_snap", i, 1_000 * i, offset=3 * i))
        ts = {"secondsPastEpoch": 1, "nanoseconds": i}
        rec.handle(ValuesReceived("iso_snap", i, 1, 1_000 * i, (
            PVSample("A:X", {"value": float(i), "timeStamp": ts}),
        ), offset=3 * i + 1))
        rec.handle(IterationClosed("iso_snap", "iso_snap", i, IterationStatus.COMPLETE, None,
                                   1_000 * i, 1_000 * i + 1, offset=3 * i + 2))
    paths: list[Path] = rec.close("complete")
    return paths


@pytest.mark.parametrize("isolate", [True, False])
def test_recording_factory_honours_output_isolate(tmp_path: Path, isolate: bool) -> None:
    options = {} if isolate else {"isolate": False}
    rec = hdf5_recording(_definition(tmp_path, **options), seq=2, recording_uid="uid-x")
    try:
        if isolate:
            assert isinstance(rec, IsolatedRecording)
            assert rec.pid is not None and rec.pid != os.getpid()
        else:
            assert isinstance(rec, HDF5Recording)
        assert rec.status == "recording" and rec.uid == "uid-x"
        (path,) = _record(rec)
    finally:
        if rec.status == "recording":
            rec.close("aborted", "test teardown")
    assert rec.status == "complete" and rec.last_durable_offset == {("iso_snap", 0): 8}
    with open_file(path) as f:
        assert f.status == "complete"
        assert [int(i) for i in f.iterations()["iter_index"]] == [0, 1, 2]
        assert f.values("A:X").tolist() == [0.0, 1.0, 2.0]
        assert f.attrs["recording_seq"] == 2 and f.attrs["run_name"] == "iso"
