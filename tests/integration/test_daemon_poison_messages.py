"""End to end: messages on a run's snapshot topic that decode as msgpack but hold what a file
cannot keep (a PV name with NUL, an iter_index beyond int64, a tail error message with NUL,
a tail error message that is not UTF-8) neither fail the run nor leave a file that is not
finalized; the daemon stops cleanly and its files pass ``verify``."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
from confluent_kafka import Producer
from daemon_support import (
    DaemonEnv,
    DaemonProcess,
    cli,
    h5_files,
    partial_files,
    run_state,
    simulator,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HEADERS = [("k2eg-ser-type", b"Msgpack")]


def _poison(snapshot: str) -> list[bytes]:
    now_ms = int(time.time() * 1000)
    value = {"value": 1.0, "timeStamp": {"secondsPastEpoch": now_ms // 1000, "nanoseconds": 0,
                                         "userTag": 0}}
    idx = 10**12  # an iteration of its own, far from the simulator's
    tail = msgpack.packb({"message_type": 2, "error": 4, "error_message": "XbadX",
                          "iter_index": idx, "timestamp": now_ms, "snapshot_name": snapshot})
    return [
        msgpack.packb({"message_type": 0, "snapshot_name": snapshot, "timestamp": now_ms,
                       "iter_index": idx}),
        msgpack.packb({"message_type": 1, "timestamp": now_ms, "iter_index": idx,
                       "BAD\x00PV": value}),
        msgpack.packb({"message_type": 1, "timestamp": now_ms, "iter_index": 2**64 - 1,
                       "SIM:AI:DOUBLE:1": value}),
        tail.replace(b"XbadX", b"b\x00a\xffd"),
    ]


def test_poison_messages_neither_fail_the_run_nor_its_files(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess],
) -> None:
    token = unique_name("p").replace("-", "_")
    data = tmp_path / "data"
    config = tmp_path / "runs.yaml"
    config.write_text(f"""
runs:
  - name: alpha
    snapshot:
      snapshot_name: alpha_{token}
      pv_uri_list: [pva://SIM:AI:DOUBLE:1]
      time_window: 100
    output: {{directory: {data}/alpha, flush_interval_s: 0.3}}
""")
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config)
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemon = DaemonProcess(denv)
        daemons.append(daemon)
        wait_for(lambda: (run_state(admin, "alpha") or {}).get("state") == "recording", 40,
                 "alpha to record")
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        for raw in _poison(f"alpha_{token}"):
            producer.produce(f"alpha_{token}".lower(), raw, headers=HEADERS)
        assert producer.flush(10) == 0
        time.sleep(3)  # flushed several times with them
        state = run_state(admin, "alpha") or {}
        assert state.get("state") == "recording", state
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
    assert "recording failed" not in daemon.log_text(), daemon.log_text()[-3000:]
    assert partial_files(data) == []
    files = h5_files(data)
    assert files
    out = cli(denv, "verify", "--data", *map(str, files))
    assert out.returncode == 0, out.stdout + out.stderr
