"""A resume checks that its snapshot topic is the one it recorded (the state file's anchor:
offset and Kafka timestamp of the last durable tail, read back): a real daemon on the real
broker, killed and restarted. Left as saved, the restart resumes exactly where it stopped;
made to disagree with the message at its offset (as a topic deleted and created again while
the daemon was down, already written past the saved offset, would: not done by deleting the
topic, which crashes librdkafka clients reading it on this broker), the restart says so and
records the topic from its first message."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, TopicPartition
from daemon_support import (
    DaemonEnv,
    DaemonProcess,
    complete_iterations,
    h5_files,
    partial_files,
    read_files,
    read_published,
    simulator,
    wait_for,
)

from recorder.sinks.writelock import writer_active

pytestmark = [pytest.mark.integration, pytest.mark.slow]
RECREATED = "the topic was deleted and created again"


def _message_at(bootstrap: str, topic: str, partition: int, offset: int) -> Any:
    """The message at ``offset``, read by a consumer assigned at exactly that offset (as
    KafkaAdapter.recreated_partitions reads an anchor back)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"anchor-{topic}",
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        msg = None
        for _ in range(50):
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                return msg
        raise AssertionError(f"no message at {topic}[{partition}]@{offset}: {msg}")
    finally:
        consumer.close()


def _killed(daemon: DaemonProcess, data: Path) -> None:
    daemon.signal(signal.SIGKILL)
    daemon.wait(10)
    for leftover in partial_files(data):  # its writer outlives it a moment, to flush
        wait_for(lambda f=leftover: writer_active(f) is False, 20, "the writer process to end")


def _complete(files: list[dict[str, Any]]) -> list[int]:
    return [i for f in files
            for i, s in zip(f["iterations"], f["iteration_status"], strict=True)
            if s == "complete"]


def test_a_resume_checks_its_anchor_and_reads_a_topic_created_again_from_its_beginning(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess],
) -> None:
    snap = unique_name("anchor").replace("-", "_")
    topic = snap.lower()
    data = tmp_path / "data"
    config = tmp_path / "runs.yaml"
    config.write_text(f"""
name: anchored
snapshot:
  snapshot_name: {snap}
  pv_uri_list: [pva://SIM:AI:DOUBLE:1, pva://SIM:WF:DOUBLE:2:N4]
  time_window: 100
output: {{directory: {data}, flush_interval_s: 0.3}}
""")
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config)
    state_path = denv.state_dir / "anchored.json"
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        first = DaemonProcess(denv, "first")
        daemons.append(first)
        wait_for(lambda: complete_iterations(admin, "anchored") >= 12, 40, "12 iterations")
        _killed(first, data)
        saved = json.loads(state_path.read_text())["active"]
        (part, (anchor_offset, anchor_ms)), = saved["anchors"].items()
        assert anchor_offset <= saved["offsets"][part]
        # the broker gives a consumer that asks for one offset the message's own Kafka
        # timestamp, the one the consumer thread saw streaming (else every resume would be
        # taken for a topic created again: the restart as saved below says it is not)
        msg = _message_at(denv.bootstrap, topic, int(part), anchor_offset)
        kind, stamp = msg.timestamp()
        assert kind != TIMESTAMP_NOT_AVAILABLE and stamp == anchor_ms, (kind, stamp, anchor_ms)
        assert msgpack.unpackb(msg.value(), raw=False)["message_type"] == 2  # a tail

        # as saved: resumed exactly where it stopped
        second = DaemonProcess(denv, "second")
        daemons.append(second)
        wait_for(lambda: complete_iterations(admin, "anchored") >= 12, 40, "the resume")
        _killed(second, data)
        assert RECREATED not in second.log_text()
        resumed_files = read_files(h5_files(data) + partial_files(data))

        # the anchor disagrees with the message at its offset: the topic is taken for one
        # created again, read from its first message
        state = json.loads(state_path.read_text())
        part, (anchor_offset, anchor_ms) = next(iter(state["active"]["anchors"].items()))
        state["active"]["anchors"][part] = [anchor_offset, anchor_ms - 7]
        state_path.write_text(json.dumps(state))
        third = DaemonProcess(denv, "third")
        daemons.append(third)
        wait_for(lambda: RECREATED in third.log_text(), 40, "the recreation to be logged")
        wait_for(lambda: complete_iterations(admin, "anchored") >= 10, 40, "the new recording")
        third.signal(signal.SIGTERM)
        assert third.wait(60) == 0, third.log_text()[-3000:]
    line = next(json.loads(t) for t in third.log_text().splitlines() if RECREATED in t)
    assert line["offset"] == anchor_offset and line["recorded_kafka_timestamp_ms"] == anchor_ms - 7
    assert line["read_kafka_timestamp_ms"] == anchor_ms and line["offset_read"] == anchor_offset

    published = read_published(denv.bootstrap, topic)
    files = read_files(h5_files(data))
    files.sort(key=lambda f: f["attrs"]["segment"])
    assert [f["attrs"]["segment"] for f in files] == [0, 1, 2], [f["path"] for f in files]
    assert len(resumed_files) == 2
    # the kill and the resume as saved: each iteration complete in exactly one of the first two
    # files (the one each kill cut may be in neither), with the values published
    before = _complete(files[:2])
    assert len(before) == len(set(before)), sorted(before)
    assert len(set(range(before[0], max(before) + 1)) - set(before)) <= 1
    assert before[0] == min(published.headers)
    # read from the topic's beginning: the last file again holds every iteration from the
    # topic's first message on, complete
    last = files[2]
    assert last["status"] == "complete"
    again = _complete([last])
    assert again[0] == min(published.headers), (again[:3], min(published.headers))
    assert again == list(range(again[0], again[-1] + 1))
    assert again[-1] > max(before)
    for pv in ("SIM:AI:DOUBLE:1", "SIM:WF:DOUBLE:2:N4"):
        col = last["pvs"][pv]
        got: dict[int, list[Any]] = {}
        for it, value in zip(col["iters"], col["values"], strict=True):
            got.setdefault(it, []).append(value)
        for it in again:
            assert got.get(it) == published.data[it][pv], (pv, it)
        for f in files[:2]:
            col = f["pvs"][pv]
            for it, value in zip(col["iters"], col["values"], strict=True):
                if it in before:
                    assert value in published.data[it][pv], (pv, it)
