"""``pv_field_filter_list`` end to end: the simulator's timedbuffered snapshot (the gateway's
filter), the client's assembler and the HDF5 sink; the file holds every value the gateway
sent, as it sent it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from test_hdf5_roundtrip import repr_exact

from recorder.client.assembler import IterationAssembler
from recorder.client.wire import Record
from recorder.reader import open_file
from recorder.sim.engine import Produce, Protocol, SimConfig, SimEngine
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions

T0 = 1000.0
WALL = 1_700_000_000.0 - T0  # wall clock = monotonic + WALL


def record_sim(tmp_path: Path, protocol: Protocol, until_s: float, **command: Any
               ) -> tuple[dict[str, list[dict[str, Any]]], Path]:
    """Run a repeating snapshot of the simulator for ``until_s`` s (``command``: its fields),
    feed its stream to an assembler and the sink: (the structures sent, by PV; the file)."""
    sim = SimEngine(SimConfig(default_period_ms=50, protocol=protocol), now=T0,
                    wall_offset=WALL)
    cmd = {"command": "repeating_snapshot", "reply_topic": "app-reply", "reply_id": "r1",
           "snapshot_name": "snap", **command}
    sim.handle_command(json.dumps(cmd).encode(), T0)
    sim.drain()
    for i in range(1, round(until_s / 0.005) + 1):
        sim.tick(T0 + i * 0.005)
    stream = [a for a in sim.drain() if isinstance(a, Produce) and a.topic == "snap"]
    sent: dict[str, list[dict[str, Any]]] = {}
    for action in stream:
        msg = msgpack.unpackb(action.value)
        if msg["message_type"] == 1:
            pv = list(msg)[-1]
            sent.setdefault(pv, []).append(msg[pv])
    asm = IterationAssembler()
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="filter")
    for offset, action in enumerate(stream):
        headers = [(k, v.encode()) for k, v in action.headers]
        for event in asm.feed(Record("snap", 0, offset, action.value, headers), T0 + until_s):
            rec.handle(event)
    for event in asm.close():
        rec.handle(event)
    (path,) = rec.close()
    return sent, path


@pytest.mark.parametrize("protocol", list(Protocol))
def test_value_only_filter_keeps_every_value_of_a_window(tmp_path: Path,
                                                         protocol: Protocol) -> None:
    """Without ``timeStamp`` a PV that takes a value again (a toggling bit, an enum) sends
    byte-identical data messages in one window; the legacy stream (gateway main) lost all but
    the first of them as "duplicates"."""
    pvs = ["pva://SIM:BI:BOOL:1", "pva://SIM:MBBI:ENUM:2:P25", "pva://SIM:AI:DOUBLE:3"]
    sent, path = record_sim(tmp_path, protocol, 1.3, pv_name_list=pvs,
                            type="timedbuffered", time_window_msec=400,
                            pv_field_filter_list=["value"])
    assert set(sent) == {"SIM:BI:BOOL:1", "SIM:MBBI:ENUM:2:P25", "SIM:AI:DOUBLE:3"}
    with open_file(path) as f:
        for pv, structures in sent.items():
            assert all(list(s) == ["value"] for s in structures)
            got = [s.data for s in f.samples(pv)]
            assert [repr_exact(s) for s in got] == [repr_exact(s) for s in structures], pv
        assert f.iterations()["duplicates"].tolist() == [0] * len(f.iterations()["iter_index"])
