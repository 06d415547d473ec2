"""The file event: JSON layout, round trip, refusal of bad documents."""

from __future__ import annotations

import json

import pytest

from recorder.admin.files import FILE_SCHEMA, FileEvent
from recorder.errors import AdminCommandError

EVENT = FileEvent(
    time=1_795_291_545_012, instance="daq-3", run="bpm-10hz", snapshot="bpm_10hz",
    path="/data/bpm/bpm-10hz_20261122T130002Z_0000.h5", bytes=12_345_678,
    recording_uid="5c1f", segment=0, status="complete", reason="",
    start_time="2026-11-22T13:00:02Z", end_time="2026-11-22T14:00:02Z",
    segment_start_time="2026-11-22T13:00:02Z", data_start_time="2026-11-22T13:00:01.900Z",
    data_end_time="2026-11-22T14:00:01.950Z", iterations=36_000, values=108_000,
    format_version="3.0",
)


def test_layout_and_round_trip() -> None:
    obj = json.loads(EVENT.encode())
    assert obj["schema"] == FILE_SCHEMA
    assert obj["bytes"] == 12_345_678 and obj["iterations"] == 36_000 and obj["error"] is None
    assert FileEvent.decode(EVENT.encode()) == EVENT
    unreadable = FileEvent(time=1, instance="i", run="r", snapshot="s", path="/p.h5",
                           error="OSError: unable to open file")
    assert FileEvent.decode(unreadable.encode()) == unreadable
    assert json.loads(unreadable.encode())["status"] is None
    newer = {**obj, "checksum": "abc"}  # a field a later daemon adds: ignored
    assert FileEvent.decode(json.dumps(newer).encode()) == EVENT
    older = {k: v for k, v in obj.items()  # a daemon before the data span was added
             if k not in ("segment_start_time", "data_start_time", "data_end_time")}
    assert FileEvent.decode(json.dumps(older).encode()).data_start_time is None


@pytest.mark.parametrize("payload", [
    b"not json",
    b"[]",
    json.dumps({**json.loads(EVENT.encode()), "schema": "k2eg-recorder/status/1"}).encode(),
    json.dumps({**json.loads(EVENT.encode()), "iterations": "many"}).encode(),
    json.dumps({**json.loads(EVENT.encode()), "bytes": True}).encode(),
    json.dumps({**json.loads(EVENT.encode()), "path": None}).encode(),
    json.dumps({**json.loads(EVENT.encode()), "status": 1}).encode(),
    json.dumps({**json.loads(EVENT.encode()), "data_start_time": 1795291545}).encode(),
])
def test_bad_events(payload: bytes) -> None:
    with pytest.raises(AdminCommandError) as info:
        FileEvent.decode(payload)
    assert info.value.code == "malformed"
