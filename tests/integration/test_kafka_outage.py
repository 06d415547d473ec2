"""Kafka taken away from everyone for a while, mid-run, then given back.

A broker of its own behind a TCP relay (it advertises the relay's address, so every client
goes through it): ``cut()`` closes every connection and refuses new ones, as a broker host that
is down; ``restore()`` lets clients back to the same broker with all its data. The gateway
simulator's producer holds what it publishes meanwhile and delivers it afterwards, as the real
gateway's librdkafka does.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from daemon_support import (
    DaemonEnv,
    DaemonProcess,
    complete_iterations,
    get,
    h5_files,
    read_files,
    read_published,
    request,
    run_state,
    scrape,
    simulator,
    wait_for,
)
from tcp_relay import TcpRelay

from recorder.broker import EmbeddedBroker, free_loopback_port
from recorder.client import (
    IterationClosed,
    IterationEvent,
    IterationOpened,
    K2egClient,
    SnapshotProperties,
)
from recorder.errors import ClientError, GatewayError
from recorder.settings import KafkaSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_S = 8.0


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TcpRelay]:
    relay_port = free_loopback_port()
    broker = EmbeddedBroker(log_path=tmp_path_factory.mktemp("outage") / "tansu.log",
                            advertised_port=relay_port).start()
    relay = TcpRelay(broker.port, relay_port).start()
    try:
        yield relay
    finally:
        relay.stop()
        broker.stop()


def _bootstrap(relay: TcpRelay) -> str:
    return f"127.0.0.1:{relay.port}"


def _periodic_run(tmp_path: Path, token: str, pvs: str) -> Path:
    """runs.yaml with one periodic run ``periodic`` (200 ms) recording into tmp_path/data."""
    config = tmp_path / "runs.yaml"
    config.write_text(f"""
runs:
  - name: periodic
    snapshot:
      snapshot_name: periodic_{token}
      pv_uri_list: [{pvs}]
      time_window: 200
    output: {{directory: {tmp_path / "data"}, flush_interval_s: 0.3}}
""")
    return config


def _messages_in(bootstrap: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "count"})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                   for p in meta.topics[topic].partitions)
    finally:
        consumer.close()


def test_a_command_kafka_did_not_take_in_time_is_dropped_not_delivered_later(
    relay: TcpRelay, unique_name: Callable[[str], str]
) -> None:
    """A trigger sent while Kafka is down fails for its caller after the command timeout, and
    is never handed to the gateway once Kafka is back (it would fire a trigger the operator
    was told had failed)."""
    bootstrap = _bootstrap(relay)
    cmd_topic = unique_name("cmd")
    with simulator(bootstrap, cmd_topic), K2egClient(KafkaSettings(
            bootstrap_servers=bootstrap, cmd_topic=cmd_topic, app_name=unique_name("app"),
            command_timeout_s=2)) as client:
        assert _messages_in(bootstrap, cmd_topic) == 0
        relay.cut()
        try:
            started = time.monotonic()
            with pytest.raises(ClientError):
                client.snapshot_trigger("snap_while_down")
            assert time.monotonic() - started < 6
            wait_for(lambda: client.kafka_unreachable_since is not None, 10,
                     "the client to report Kafka unreachable")
        finally:
            relay.restore()
        # idle (no record to read): its own metadata probe sees Kafka back
        wait_for(lambda: client.kafka_unreachable_since is None, 15, "Kafka reachable again")
        time.sleep(3.0)  # librdkafka reconnects (backoff) and would deliver what it still holds
        with pytest.raises(GatewayError, match="has not been found"):
            client.snapshot_trigger("snap_after")  # Kafka and the gateway work again
        assert _messages_in(bootstrap, cmd_topic) == 1  # only the second trigger


@pytest.mark.parametrize("silent", [False, True], ids=["refused", "silent"])
def test_an_iteration_split_by_an_outage_waits_for_the_rest_of_its_messages(
    relay: TcpRelay, unique_name: Callable[[str], str], silent: bool
) -> None:
    """Header and one value read, then Kafka is gone for longer than the iteration's timeout:
    the time Kafka was unreachable does not count, so the iteration is not closed as timed out
    (its late messages then dropped) but completes when the rest arrives. ``silent``: Kafka
    goes silent instead of refusing connections (its host powered off, a network partition):
    no transport error comes before librdkafka's own timeouts (60 s), and the silence is found
    by the consumer's probe."""
    bootstrap = _bootstrap(relay)
    cmd_topic = unique_name("cmd")
    name = unique_name("split").replace("-", "_")
    events: list[IterationEvent] = []
    # triggered: the simulator publishes nothing by itself; the iteration is produced here
    props = SnapshotProperties(name, ["pva://SPLIT:A", "pva://SPLIT:B"], triggered=True)
    ts = int(time.time() * 1000)

    def data(pv: str, value: float) -> bytes:
        return msgpack.packb({"message_type": 1, "timestamp": ts, "iter_index": 1, pv: {
            "value": value, "alarm": {"severity": 0, "status": 0, "message": "NO_ALARM"},
            "timeStamp": {"secondsPastEpoch": ts // 1000, "nanoseconds": 0}}})

    header = msgpack.packb({"message_type": 0, "snapshot_name": name, "timestamp": ts,
                            "iter_index": 1})
    tail = msgpack.packb({"message_type": 2, "error": 0, "iter_index": 1, "timestamp": ts,
                          "snapshot_name": name})
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "log_level": 0})

    def produce(*values: bytes) -> None:
        for value in values:
            producer.produce(name, value, headers=[("k2eg-ser-type", b"Msgpack")])
        assert producer.flush(30) == 0

    with simulator(bootstrap, cmd_topic), K2egClient(KafkaSettings(
            bootstrap_servers=bootstrap, cmd_topic=cmd_topic, app_name=unique_name("app"),
            command_timeout_s=5), iteration_slack_s=2.0) as client:
        client.snapshot_recurring(props, events.append)
        produce(header, data("SPLIT:A", 1.5))
        wait_for(lambda: any(isinstance(e, IterationOpened) for e in events), 20,
                 "the iteration to open")
        relay.freeze() if silent else relay.cut()
        try:
            time.sleep(6.0)  # 3 x the iteration's timeout (2 s for a triggered snapshot)
            assert not any(isinstance(e, IterationClosed) for e in events), events
            # and reported as an outage ("Kafka unreachable since", kafka_up 0)
            assert client.kafka_unreachable_since is not None
        finally:
            relay.thaw() if silent else relay.restore()
        produce(data("SPLIT:B", 2.5), tail)
        closed = wait_for(lambda: [e for e in events if isinstance(e, IterationClosed)], 30,
                          "the iteration to close")
        assert closed[0].complete and closed[0].n_values == 2, closed
        assert client.counters().get("assembler.late.data", 0) == 0
        wait_for(lambda: client.kafka_unreachable_since is None, 15, "Kafka reachable again")


def test_a_kafka_outage_mid_run_loses_nothing_and_the_daemon_records_on(
    relay: TcpRelay, tmp_path: Path, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess], notify_lines: tuple[str, list[str]],
) -> None:
    bootstrap = _bootstrap(relay)
    token = unique_name("o").replace("-", "_")
    data = tmp_path / "data"
    config = _periodic_run(tmp_path, token, "pva://SIM:AI:DOUBLE:1, pva://SIM:WF:DOUBLE:2:N16")
    metrics_port = free_loopback_port()
    notify_socket, notified = notify_lines
    denv = DaemonEnv.in_dir(tmp_path, bootstrap, unique_name, config, {
        "RECORDER_METRICS_PORT": str(metrics_port), "NOTIFY_SOCKET": notify_socket})
    with simulator(bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemon = DaemonProcess(denv)
        daemons.append(daemon)
        wait_for(lambda: complete_iterations(admin, "periodic") >= 10, 60, "10 iterations")
        assert get(scrape(metrics_port), "kafka_up") == 1
        relay.cut()
        time.sleep(OUTAGE_S)
        assert daemon.proc.poll() is None, daemon.log_text()[-3000:]
        assert get(scrape(metrics_port), "kafka_up") == 0  # what a facility's alerting watches
        relay.restore()
        before = wait_for(lambda: complete_iterations(admin, "periodic"), 60,
                          "the daemon to answer again")
        wait_for(lambda: complete_iterations(admin, "periodic") >= before + 10, 60,
                 "10 more iterations after the outage")
        state = run_state(admin, "periodic")
        assert state is not None and state["state"] == "recording"
        assert get(scrape(metrics_port), "kafka_up") == 1
        assert request(admin, "stop", "periodic").ok
        dropped = get(scrape(metrics_port), "messages_skipped_total", run="periodic",
                      reason="duplicate") or 0
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, daemon.log_text()[-3000:]

    published = read_published(bootstrap, f"periodic_{token}")
    # a produce request cut with the connection is sent again: the daemon drops the copy
    assert published.duplicates == dropped, (published.duplicates, dropped)
    (recorded,) = read_files(h5_files(data))
    its = recorded["iterations"]
    assert len(its) == len(set(its)), "an iteration was recorded twice"
    tails = sorted(published.tails)
    assert its == tails, (its, tails)  # every published iteration, in order
    assert set(recorded["iteration_status"]) == {"complete"}
    for pv, got in recorded["pvs"].items():
        want = [v for i in tails for v in published.data[i][pv]]
        assert got["values"] == want, pv
    log = daemon.log_text()
    assert "Kafka error" in log or "librdkafka" in log  # the outage was seen and reported
    assert log.count("Kafka unreachable: open iterations wait for it") == 1
    assert log.count("Kafka reachable again") == 1
    statuses = [m for m in notified if "STATUS=" in m]
    down = [m for m in statuses if "; Kafka unreachable since " in m]
    assert down and "Kafka unreachable" not in statuses[-1], statuses


def test_sigterm_while_kafka_is_down_finalizes_what_was_recorded_and_exits_0(
    relay: TcpRelay, tmp_path: Path, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess],
) -> None:
    """systemctl stop during an outage: the k2eg stop cannot reach the gateway, so each run
    ends after the command timeout; its file is finalized ("aborted", saying why) with every
    iteration read before the outage, and the daemon exits 0 within its shutdown budget."""
    bootstrap = _bootstrap(relay)
    token = unique_name("t").replace("-", "_")
    data = tmp_path / "data"
    config = _periodic_run(tmp_path, token, "pva://SIM:AI:DOUBLE:1")
    denv = DaemonEnv.in_dir(tmp_path, bootstrap, unique_name, config)
    with simulator(bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemon = DaemonProcess(denv)
        daemons.append(daemon)
        wait_for(lambda: complete_iterations(admin, "periodic") >= 5, 60, "5 iterations")
        recorded = complete_iterations(admin, "periodic")
        relay.cut()
        try:
            time.sleep(1.0)
            started = time.monotonic()
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
            took = time.monotonic() - started
        finally:
            relay.restore()
    # the test daemon's 3 s command timeout and 5 s for its last heartbeats, not the 30 s
    # budget nor librdkafka waiting for each queued heartbeat to time out (it did: 33 s)
    assert took < 20, took
    log = daemon.log_text()
    assert "producer closed with undelivered messages" in log and "Purged" not in log
    (final,) = h5_files(data)
    (info,) = read_files([final])
    assert info["status"] == "aborted" and not info["writable"]
    assert "k2eg stop failed" in info["attrs"]["status_reason"], info["attrs"]
    complete = [i for i, st in zip(info["iterations"], info["iteration_status"], strict=True)
                if st == "complete"]
    assert len(complete) >= recorded


def test_a_file_event_kafka_never_took_is_logged_as_not_delivered(
    relay: TcpRelay, tmp_path: Path, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess],
) -> None:
    """systemctl stop during an outage: the last file's event cannot reach Kafka and is
    dropped when the daemon exits. The log said only ``file event`` with ``published: true``
    (queued), so an operator could not tell which events to send again; the event that was
    not delivered is now logged as such, with its path."""
    import json

    bootstrap = _bootstrap(relay)
    token = unique_name("fe").replace("-", "_")
    data = tmp_path / "data"
    config = _periodic_run(tmp_path, token, "pva://SIM:AI:DOUBLE:1")
    files_topic = unique_name("files")
    denv = DaemonEnv.in_dir(tmp_path, bootstrap, unique_name, config,
                            {"RECORDER_FILES_TOPIC": files_topic})
    with simulator(bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemon = DaemonProcess(denv)
        daemons.append(daemon)
        wait_for(lambda: complete_iterations(admin, "periodic") >= 3, 60, "3 iterations")
        relay.cut()
        try:
            time.sleep(1.0)
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
        finally:
            relay.restore()
    (final,) = h5_files(data)
    assert _messages_in(bootstrap, files_topic) == 0  # the event never got out
    log = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    lost = [e for e in log if e.get("event") == "file event not delivered"]
    assert [e.get("path") for e in lost] == [str(final)], [
        e for e in log if "file event" in str(e.get("event"))]
