"""Recorder metrics in a private registry, and the HTTP exposition on loopback."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry

from recorder.metrics import RecorderMetrics, start_metrics_server

P = "k2eg_recorder_"


def value(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(P + name, labels)


def test_per_run_metrics() -> None:
    reg = CollectorRegistry()
    m = RecorderMetrics(reg)
    m.iteration_closed("bpm", "complete")
    m.iteration_closed("bpm", "complete")
    m.iteration_closed("bpm", "incomplete")
    m.iteration_closed("wf", "complete")
    m.values("bpm", 30, nbytes=240)
    m.values("bpm", 3)
    m.skipped("bpm", "late")
    m.skipped("bpm", "not_msgpack", 4)
    m.flushed("bpm", 0.02, at_unix_s=1_700_000_000.0)
    m.flushed("bpm", 3.0, at_unix_s=1_700_000_001.0)
    m.lag("bpm", 17)
    m.set_recording("bpm", True)
    m.write_failed("bpm")
    m.admin_command("start", "ok")
    m.admin_command("start", "unknown_run")
    m.reload(ok=False)

    assert value(reg, "iterations_total", run="bpm", status="complete") == 2
    assert value(reg, "iterations_total", run="bpm", status="incomplete") == 1
    assert value(reg, "iterations_total", run="wf", status="complete") == 1
    assert value(reg, "values_written_total", run="bpm") == 33
    assert value(reg, "bytes_written_total", run="bpm") == 240
    assert value(reg, "messages_skipped_total", run="bpm", reason="not_msgpack") == 4
    assert value(reg, "messages_skipped_total", run="bpm", reason="late") == 1
    assert value(reg, "flush_duration_seconds_count", run="bpm") == 2
    assert value(reg, "flush_duration_seconds_sum", run="bpm") == 3.02
    assert value(reg, "flush_duration_seconds_bucket", run="bpm", le="0.025") == 1
    assert value(reg, "last_write_timestamp_seconds", run="bpm") == 1_700_000_001.0
    assert value(reg, "consumer_lag_messages", run="bpm") == 17
    assert value(reg, "run_recording", run="bpm") == 1
    assert value(reg, "write_errors_total", run="bpm") == 1
    assert value(reg, "admin_commands_total", command="start", code="unknown_run") == 1
    assert value(reg, "reloads_total", result="failed") == 1


def test_remove_run_drops_its_series_only() -> None:
    reg = CollectorRegistry()
    m = RecorderMetrics(reg)
    for run in ("a", "b"):
        m.iteration_closed(run, "complete")
        m.values(run, 1, 8)
        m.skipped(run, "late")
        m.lag(run, 1)
        m.snapshot_resent(run, "restarted")
    m.remove_run("a")
    m.remove_run("never-seen")
    assert value(reg, "iterations_total", run="a", status="complete") is None
    assert value(reg, "values_written_total", run="a") is None
    assert value(reg, "messages_skipped_total", run="a", reason="late") is None
    assert value(reg, "consumer_lag_messages", run="a") is None
    assert value(reg, "iterations_total", run="b", status="complete") == 1
    assert value(reg, "messages_skipped_total", run="b", reason="late") == 1
    assert value(reg, "snapshot_resends_total", run="a", outcome="restarted") is None
    assert value(reg, "snapshot_resends_total", run="b", outcome="restarted") == 1


def test_two_instances_do_not_collide() -> None:
    # module-level metrics in the global registry would raise "Duplicated timeseries" here
    RecorderMetrics(CollectorRegistry()).values("x", 1)
    RecorderMetrics(CollectorRegistry()).values("x", 1)


def test_http_exposition_on_loopback() -> None:
    reg = CollectorRegistry()
    m = RecorderMetrics(reg)
    m.iteration_closed("bpm", "complete")
    server, thread = start_metrics_server(0, reg)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert 'k2eg_recorder_iterations_total{run="bpm",status="complete"} 1.0' in body
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_disk_gauges_follow_the_filesystems_in_use() -> None:
    from recorder.admin.status import DiskStatus

    reg = CollectorRegistry()
    m = RecorderMetrics(reg)
    m.disks([DiskStatus("/data", free_bytes=800, total_bytes=1000),
             DiskStatus("/scratch", free_bytes=10, total_bytes=1000, warning="low")])
    assert value(reg, "disk_free_bytes", path="/data") == 800
    assert value(reg, "disk_total_bytes", path="/data") == 1000
    assert value(reg, "disk_warning", path="/data") == 0
    assert value(reg, "disk_warning", path="/scratch") == 1
    # /scratch no longer used; /data's check hangs (nothing known but the warning)
    m.disks([DiskStatus("/data", warning="storage not answering")])
    assert value(reg, "disk_free_bytes", path="/data") is None
    assert value(reg, "disk_warning", path="/data") == 1
    assert value(reg, "disk_free_bytes", path="/scratch") is None
    assert value(reg, "disk_warning", path="/scratch") is None
