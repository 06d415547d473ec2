"""A status document of many runs on a real broker: the heartbeat and a ``status`` reply must
still go out (Kafka's producers and brokers refuse a message over ~1 MB by default)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from recorder.admin.protocol import CommandPolicy
from recorder.admin.status import DaemonState, RunState, RunStatus, StatusDocument
from recorder.daemon.admin import AdminHandler
from recorder.daemon.adminclient import AdminClient
from recorder.daemon.adminlink import AdminLink
from recorder.daemon.heartbeat import Heartbeat
from recorder.settings import KafkaSettings

RUNS = 2_000  # ~600 bytes each: a document of ~1.2 MB


def _run(i: int) -> RunStatus:
    name = f"bpm-linac-sector{i:04d}-10hz"
    return RunStatus(
        name=name, state=RunState.FAILED if i == 1_999 else RunState.RECORDING,
        snapshot=name.replace("-", "_"), topic=name.replace("-", "_"),
        mode="periodic timedbuffered", autostart=True,
        current_file=f"/data/k2eg-recorder/linac/{name}_20261122T130002Z_0012.h5.partial",
        recording_started_at=1_795_291_545_012, last_iteration=123_456_789,
        last_iteration_at=1_795_291_545_012, iterations_complete=123_456_789,
        iterations_incomplete=1_234, values_written=12_345_678_901, lag=12_345, errors=12,
        last_error="recording failed: disk full" if i == 1_999 else None)


class _ManyRuns:
    def status_document(self, kind: str = "status") -> StatusDocument:
        return StatusDocument("daq-3", DaemonState.RUNNING, int(time.time() * 1000), 0,
                              runs=tuple(_run(i) for i in range(RUNS)), kind=kind)

    def run_handle(self, name: str) -> None:
        return None

    def reload(self, origin: str) -> tuple[bool, str, dict[str, Any]]:
        return True, "", {}


@pytest.fixture
def daemon_side(kafka_bootstrap: str, unique_name: Callable[[str], str]
                ) -> Iterator[tuple[KafkaSettings, str, str, str]]:
    """An admin link, handler and heartbeat as the daemon's main loop runs them."""
    admin_topic, reply_topic = unique_name("admin"), unique_name("reply")
    status_topic = unique_name("status")
    kafka = KafkaSettings.from_env({}, bootstrap_servers=kafka_bootstrap,
                                   app_name=unique_name("rec"))
    link = AdminLink(kafka, admin_topic, ensure_topics=(reply_topic, status_topic))
    handler = AdminHandler(CommandPolicy(max_age_s=30), reply_topic, link.produce)
    target = _ManyRuns()
    heartbeat = Heartbeat(0.5, lambda payload: link.produce(status_topic, payload, key="daq-3"))
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for record in link.take():
                handler.handle(record, target)  # type: ignore[arg-type]
            heartbeat.maybe_beat(time.monotonic(), lambda seq: target.status_document(
                "heartbeat"))
            stop.wait(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield kafka, admin_topic, reply_topic, status_topic
    finally:
        stop.set()
        thread.join(5)
        link.close()


def test_a_status_of_too_many_runs_for_one_message_is_answered_and_heartbeats_go_out(
        daemon_side: tuple[KafkaSettings, str, str, str]) -> None:
    kafka, admin_topic, reply_topic, status_topic = daemon_side
    client_kafka = kafka.model_copy(update={"app_name": f"{kafka.app_name}-cli"})
    with AdminClient(client_kafka, admin_topic, reply_topic) as client:
        reply = client.request("status", timeout_s=15)
        one = client.request("status", "bpm-linac-sector0007-10hz", timeout_s=15)
    assert reply.ok and reply.data is not None
    assert len(reply.encode()) < 1_000_000
    runs = reply.data["runs"]
    left_out = reply.data["runs_left_out"]
    assert 0 < left_out["count"] < RUNS and len(runs) + left_out["count"] == RUNS
    assert "bpm-linac-sector1999-10hz" in runs  # the failed run is listed first
    assert left_out["needing_a_look"] == 0
    assert "k2eg-recorder status RUN" in left_out["why"]
    assert f"{left_out['count']} left out" in reply.message
    # the one run asked for, whatever the others
    assert one.ok and one.data is not None
    assert list(one.data["runs"]) == ["bpm-linac-sector0007-10hz"]
    assert one.data["runs_left_out"] is None

    consumer = Consumer({"bootstrap.servers": kafka.bootstrap_servers,
                         "group.id": f"{status_topic}-check", "auto.offset.reset": "earliest"})
    try:
        consumer.assign([TopicPartition(status_topic, 0, 0)])
        msg = None
        deadline = time.monotonic() + 10
        while msg is None and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error():
                msg = None
    finally:
        consumer.close()
    assert msg is not None, "no heartbeat on the status topic"
    beat = json.loads(msg.value())
    assert beat["kind"] == "heartbeat" and beat["runs_left_out"]["count"] > 0
