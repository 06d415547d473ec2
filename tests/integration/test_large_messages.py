"""Messages near and over Kafka's size limits in a run's snapshot topic (big images)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
from confluent_kafka import Producer
from daemon_support import DaemonEnv, DaemonProcess, run_state, simulator, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECEIVE_MAX = 2_000_000  # the daemon's receive.message.max.bytes in these tests


def test_a_message_too_large_to_receive_is_reported_not_silent(
        tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
        daemons: list[DaemonProcess]) -> None:
    """A message over what the consumer may receive (librdkafka's
    receive.message.max.bytes) stops reading at it for good: librdkafka fails the fetch,
    reconnects and fetches it again. The run said "recording", no error, nothing silent,
    its lag growing, and the log had only a generic "Kafka error" warning (and a misleading
    "Kafka does not answer"): now the run's status carries the error, naming the setting
    to raise, and the log says so at error level."""
    snap = unique_name("big").replace("-", "_")
    config = tmp_path / "runs.yaml"
    config.write_text(f"""
runs:
  - name: periodic
    snapshot:
      snapshot_name: {snap}
      pv_uri_list: [pva://SIM:AI:DOUBLE:1]
      time_window: 200
    output: {{directory: {tmp_path / "data"}, flush_interval_s: 0.3}}
""")
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config, {
        "RECORDER_KAFKA__FETCH__MAX__BYTES": "1000000",
        "RECORDER_KAFKA__RECEIVE__MESSAGE__MAX__BYTES": str(RECEIVE_MAX),
    })
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemon = DaemonProcess(denv)
        daemons.append(daemon)
        wait_for(lambda: ((run_state(admin, "periodic") or {}).get("iterations", {})
                          .get("complete", 0) >= 3), 40, "3 iterations")
        big = msgpack.packb({"message_type": 1, "timestamp": int(time.time() * 1000),
                             "iter_index": 10**6, "X": {"value": b"x" * (RECEIVE_MAX + 10)}})
        producer = Producer({"bootstrap.servers": kafka_bootstrap,
                             "message.max.bytes": 10_000_000})
        producer.produce(snap.lower(), big, headers=[("k2eg-ser-type", b"Msgpack")])
        assert producer.flush(10) == 0
        state: dict[str, object] = {}

        def reported() -> bool:
            state.clear()
            state.update(run_state(admin, "periodic") or {})
            return "RECORDER_KAFKA__RECEIVE__MESSAGE__MAX__BYTES" in str(state.get("last_error"))

        wait_for(reported, 30, "the run's status to report the message too large to receive")
        assert state["state"] == "recording" and int(state["errors"]) >= 1  # type: ignore[call-overload]
        assert state["silent_since"] is None  # the gateway is not silent: its data waits
    log = daemon.log_text()
    assert '"level": "error"' in log and "too large for the consumer to receive" in log
