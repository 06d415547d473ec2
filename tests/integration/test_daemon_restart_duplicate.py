"""A daemon killed (SIGKILL) right after it made a data message durable, whose copy (the
gateway producer's retry) lies right after that offset: the restarted daemon does not record
the value a second time (README: a resumed recording writes nothing twice).

The kill is made deterministic: the snapshot topic is written by hand (header, PV A, PV B,
PV B again, PV C, tail; then a whole iteration) and the run's state file is the one the
killed daemon left, durable up to PV B's first copy (offset 2), with the iteration's header
at offset 0 (``open_offsets``). A triggered run, so the simulator publishes nothing more
until the stop."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from daemon_support import DaemonEnv, DaemonProcess, h5_files, read_files, simulator, wait_for

from recorder.sim.messages import data_message, header_message, tail_message

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PVS = ["SIM:AI:DOUBLE:1", "SIM:AI:DOUBLE:2", "SIM:AI:DOUBLE:3"]
FIRST = 500  # iter_index of the hand-written iterations (the simulator's final one is 1)


def _structure(value: float, ts_ms: int) -> dict[str, Any]:
    return {"value": value, "alarm": {"severity": 0, "status": 0, "message": "NO_ALARM"},
            "timeStamp": {"secondsPastEpoch": ts_ms // 1000,
                          "nanoseconds": ts_ms % 1000 * 1_000_000, "userTag": 0}}


def _iteration(snap: str, idx: int, ts: int, values: list[float], *, sequenced: bool
               ) -> list[bytes]:
    def seq(n: int) -> int | None:
        return n if sequenced else None

    msgs = [header_message(snap, ts, idx, msg_seq=seq(1))]
    msgs += [data_message(pv, _structure(v, ts), ts, idx, msg_seq=seq(2 + i),
                          last_of_submission=i == len(values) - 1)
             for i, (pv, v) in enumerate(zip(PVS, values, strict=True))]
    msgs.append(tail_message(snap, ts, idx, msg_seq=seq(2 + len(values))))
    return [msgpack.packb(m) for m in msgs]


@pytest.mark.parametrize("sequenced", [False, True], ids=["legacy", "sequenced"])
def test_a_producer_copy_right_after_the_durable_offset_is_not_recorded_again(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess], sequenced: bool,
) -> None:
    snap = unique_name("resdup").replace("-", "_").lower()
    ts = int(time.time() * 1000) - 60_000
    first = _iteration(snap, FIRST, ts, [10.0, 20.0, 30.0], sequenced=sequenced)
    first.insert(3, first[2])  # PV B published twice: offsets 2 and 3
    second = _iteration(snap, FIRST + 1, ts + 1000, [11.0, 21.0, 31.0], sequenced=sequenced)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(snap, num_partitions=1, replication_factor=1)])[snap].result(10)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for value in first + second:
        producer.produce(snap, value=value, headers={"k2eg-ser-type": "Msgpack"})
    assert producer.flush(10) == 0

    data = tmp_path / "data"
    config = tmp_path / "runs.yaml"
    uris = ", ".join(f"pva://{pv}" for pv in PVS)
    config.write_text(f"""
name: dup
autostart: true
snapshot: {{snapshot_name: {snap}, pv_uri_list: [{uris}], triggered: true}}
output: {{directory: {data}, flush_interval_s: 0.3}}
""")
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config)
    denv.state_dir.mkdir(parents=True)
    state_file = denv.state_dir / "dup.json"
    # what the killed daemon left: PV A and PV B's first copy durable (in its segment 0)
    state_file.write_text(json.dumps({"run": "dup", "next_seq": 1, "active": {
        "recording_uid": str(uuid.uuid4()), "seq": 0, "topic": snap, "snapshot_name": snap,
        "offsets": {"0": 2}, "open_offsets": {"0": 0}, "current_file": None,
        "segments": 1, "started_at_ns": time.time_ns() - 60 * 10**9,
        "updated_at": int(time.time() * 1000)}}))
    last = len(first) + len(second) - 1
    with simulator(denv.bootstrap, denv.cmd_topic):
        daemon = DaemonProcess(denv, "resumed")
        daemons.append(daemon)

        def durable() -> int:
            active = json.loads(state_file.read_text())["active"] or {}
            return int((active.get("offsets") or {}).get("0", -1))

        wait_for(lambda: durable() >= last, 40, "the resumed recording to write it all")
        assert "resuming recording" in daemon.log_text()
        state = json.loads(state_file.read_text())["active"]
        assert state["open_offsets"] == {str(0): last + 1}  # nothing open at the durable offset
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log_text()[-3000:]

    [resumed] = read_files(h5_files(data))
    got: dict[str, dict[int, list[Any]]] = {}
    for pv in PVS:
        col = resumed["pvs"].get(pv, {"iters": [], "values": []})
        for it, value in zip(col["iters"], col["values"], strict=True):
            if it >= FIRST:
                got.setdefault(pv, {}).setdefault(it, []).append(value)
    # PV A and PV B of the first iteration are in the segment written before the kill
    assert got == {
        PVS[0]: {FIRST + 1: [11.0]},
        PVS[1]: {FIRST + 1: [21.0]},
        PVS[2]: {FIRST: [30.0], FIRST + 1: [31.0]},
    }
