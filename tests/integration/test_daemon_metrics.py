"""The daemon's Prometheus endpoint: ``k2eg-recorder run`` with ``RECORDER_METRICS_PORT`` set,
scraped over loopback while two runs record; per-run series are present and grow, and
messages skipped on one run's topic are charged to that run only."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer
from daemon_support import (
    METRIC_PREFIX,
    DaemonEnv,
    DaemonProcess,
    Samples,
    get,
    run_state,
    scrape,
    simulator,
    wait_for,
)

from recorder.broker import free_loopback_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_metrics_endpoint_per_run_series_grow(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess],
) -> None:
    token = unique_name("m").replace("-", "_")
    data = tmp_path / "data"
    config = tmp_path / "runs.yaml"
    config.write_text(f"""
runs:
  - name: alpha
    snapshot:
      snapshot_name: alpha_{token}
      pv_uri_list: [pva://SIM:AI:DOUBLE:1, pva://SIM:WF:DOUBLE:2:N64]
      time_window: 100
    output: {{directory: {data}/alpha, flush_interval_s: 0.3}}
  - name: beta
    snapshot:
      snapshot_name: beta_{token}
      pv_uri_list: [pva://SIM:AI:DOUBLE:3]
      time_window: 100
    output: {{directory: {data}/beta, flush_interval_s: 0.3, isolate: false}}
""")
    port = free_loopback_port()
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config,
                            {"RECORDER_METRICS_PORT": str(port)})
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemon = DaemonProcess(denv)
        daemons.append(daemon)
        for run in ("alpha", "beta"):
            wait_for(lambda r=run: (run_state(admin, r) or {}).get("state") == "recording",  # type: ignore[misc]
                     40, f"{run} to record")
        # garbage on alpha's topic: skipped, charged to alpha only
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        for i in range(5):
            producer.produce(f"alpha_{token}".lower(), b"\xc1 garbage %d" % i)
        assert producer.flush(10) == 0

        def flushed(samples: Samples) -> bool:
            return all((get(samples, "flush_duration_seconds_count", run=r) or 0) >= 3
                       and get(samples, "consumer_lag_messages", run=r) is not None
                       for r in ("alpha", "beta"))

        def ready() -> Samples | None:
            samples = scrape(port)
            return samples if flushed(samples) else None

        def skipped_of(samples: Samples, run: str) -> dict[str, float]:
            return {dict(labels)["reason"]: v for (name, labels), v in samples.items()
                    if name == METRIC_PREFIX + "messages_skipped_total" and ("run", run) in labels}

        first = wait_for(ready, 30, "flushes and lag of both runs")
        time.sleep(2.5)
        second = wait_for(ready, 10, "a scrape")
        def alpha_skipped() -> dict[str, float] | None:
            found = skipped_of(scrape(port), "alpha")
            return found if sum(found.values()) >= 5 else None

        skipped = wait_for(alpha_skipped, 20, "alpha's skipped messages")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log_text()[-3000:]

    for run in ("alpha", "beta"):
        for name, labels in (("iterations_total", {"status": "complete"}),
                             ("values_written_total", {}),
                             ("bytes_written_total", {}),
                             ("flush_duration_seconds_count", {}),
                             ("flush_duration_seconds_sum", {}),
                             ("last_write_timestamp_seconds", {})):
            a = get(first, name, run=run, **labels)
            b = get(second, name, run=run, **labels)
            assert a is not None and b is not None, (run, name)
            if name == "bytes_written_total":
                # bytes on disk: the (uncompressed) live file grows a whole chunk at a time,
                # so a few seconds at the simulator's rate may add no byte
                assert b >= a > 0, (run, name, a, b)
            else:
                assert b > a > 0, (run, name, a, b)
        assert get(second, "run_recording", run=run) == 1
        lag = get(second, "consumer_lag_messages", run=run)
        assert lag is not None and 0 <= lag < 50, (run, lag)
        assert (get(second, "flush_duration_seconds_bucket", run=run, le="+Inf")
                == get(second, "flush_duration_seconds_count", run=run))
    assert sum(skipped.values()) == 5 and all(r.startswith("malformed.") for r in skipped)
    assert skipped_of(second, "beta") == {}
    # a non-empty HDF5 file per run: bytes_written counted real file growth
    assert (get(second, "bytes_written_total", run="alpha") or 0) > 10_000
