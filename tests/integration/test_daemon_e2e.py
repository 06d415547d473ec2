"""The daemon end to end: YAML in, admin commands in, HDF5 files out (checked value by value
against what the simulator published), SIGTERM, bad YAML, bad commands, gateway unreachable.

The daemon runs as ``python -m recorder.cli run`` (a child process killed by PID in
teardown); the gateway simulator runs in this process; files are read back in a third one.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon_support import (
    REPO,
    DaemonEnv,
    DaemonProcess,
    environ_without_recorder,
    h5_files,
    partial_files,
    read_files,
    read_published,
    request,
    run_state,
    simulator,
    status,
    wait_for,
)

from recorder.broker import EmbeddedBroker, free_loopback_port
from recorder.sim.pvs import numeric_value, parse_pv

pytestmark = [pytest.mark.integration, pytest.mark.slow]


TAGGED = "SIM:AI:DOUBLE:2:U1000"  # timeStamp.userTag = 1000 + update number (a pulse id)
_TAG_READER = ("import h5py, json, sys; h = h5py.File(sys.argv[1], 'r'); "
               "info = {r['pv_name'].decode(): int(r['metadata_entries']) "
               "for r in h['pv_info'][()]}; "
               "print(json.dumps([h['pvs/' + sys.argv[2]]['user_tag'][()].tolist(), "
               "info[sys.argv[2]]]))")


def _yaml(data: Path, snap: Callable[[str], str]) -> str:
    return f"""
runs:
  - name: periodic
    snapshot:
      snapshot_name: {snap("periodic")}
      pv_uri_list: [pva://SIM:AI:DOUBLE:1, pva://SIM:AI:LONG:3, pva://SIM:WF:DOUBLE:1:N8,
                    pva://{TAGGED}]
      time_window: 100
    output: {{directory: {data}/periodic, flush_interval_s: 0.3}}
  - name: shots
    snapshot:
      snapshot_name: {snap("shots")}
      pv_uri_list: [pva://SIM:AI:DOUBLE:20, pva://SIM:AI:LONG:21]
      triggered: true
    output: {{directory: {data}/shots, flush_interval_s: 0.3}}
  - name: idle
    autostart: false
    snapshot:
      snapshot_name: {snap("idle")}
      pv_uri_list: [pva://SIM:AI:DOUBLE:30]
    output: {{directory: {data}/idle}}
"""


@pytest.fixture
def denv(tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str]) -> DaemonEnv:
    config = tmp_path / "runs.yaml"
    data = tmp_path / "data"
    token = unique_name("t")
    config.write_text(_yaml(data, lambda s: f"{s}_{token}".replace("-", "_")))
    return DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config)



def _snap_topic(denv: DaemonEnv, run: str) -> str:
    for line in denv.config.read_text().splitlines():
        if "snapshot_name:" in line and line.split(":", 1)[1].strip().startswith(run):
            return line.split(":", 1)[1].strip().lower()
    raise AssertionError(run)


def test_records_triggers_and_sigterm_finalizes(denv: DaemonEnv,
                                                daemons: list[DaemonProcess]) -> None:
    data = denv.config.parent / "data"
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemon = DaemonProcess(denv)
        daemons.append(daemon)
        wait_for(lambda: (run_state(admin, "periodic") or {}).get("state") == "recording",
                 40, "the periodic run to record")
        wait_for(lambda: (run_state(admin, "shots") or {}).get("state") == "recording", 20,
                 "the triggered run to be armed")
        assert run_state(admin, "idle")["state"] == "idle"  # type: ignore[index]
        for shot in ("1", "2"):
            reply = request(admin, "trigger", "shots", {"shot": shot})
            assert reply.ok, reply
            time.sleep(0.3)
        wait_for(lambda: ((run_state(admin, "periodic") or {}).get("iterations", {})
                          .get("complete", 0) >= 15), 30, "15 periodic iterations")
        doc = status(admin)
        assert doc is not None and doc["daemon"]["state"] == "running"
        periodic = doc["runs"]["periodic"]
        assert periodic["current_file"].endswith(".h5.partial")
        assert periodic["values_written"] > 0 and periodic["errors"] == 0
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
    assert partial_files(data) == []
    files = read_files(h5_files(data))
    by_run = {f["attrs"]["run_name"]: f for f in files}
    assert set(by_run) == {"periodic", "shots"}  # the idle run wrote nothing
    for f in files:
        assert f["status"] == "complete", f["attrs"].get("status_reason")
        assert not f["writable"]

    # periodic: every iteration value by value, none missing inside the recorded range
    published = read_published(denv.bootstrap, _snap_topic(denv, "periodic"))
    f = by_run["periodic"]
    recorded = f["iterations"]
    assert len(recorded) >= 15 and recorded == sorted(set(recorded))
    expected = [i for i in sorted(published.tails) if recorded[0] <= i <= recorded[-1]]
    assert recorded == expected
    assert recorded[-1] == max(published.tails)  # the final iteration of the stop is there
    for pv, col in f["pvs"].items():
        got: dict[int, list[object]] = {}
        for it, value in zip(col["iters"], col["values"], strict=True):
            got.setdefault(it, []).append(value)
        for it in recorded:
            assert got.get(it) == published.data[it][pv], (pv, it)
    # the pulse id in timeStamp.userTag: a column (format 4.0), read by plain h5py in another
    # process; each tag belongs to the value of the same update, one metadata entry
    out = subprocess.run([sys.executable, "-c", _TAG_READER, f["path"], TAGGED],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    tags, entries = json.loads(out)
    spec = parse_pv(TAGGED)
    assert entries == 1
    assert tags == sorted(tags) and tags[0] >= 1000
    assert f["pvs"][TAGGED]["values"] == [numeric_value(spec.type, t - 1000, spec.phase)
                                          for t in tags]

    # triggered: one iteration per trigger (+ the final one the gateway sends at stop)
    shots = by_run["shots"]
    pub_shots = read_published(denv.bootstrap, _snap_topic(denv, "shots"))
    assert shots["iterations"] == sorted(pub_shots.tails)
    assert len(shots["iterations"]) >= 2
    for pv, col in shots["pvs"].items():
        for it, value in zip(col["iters"], col["values"], strict=True):
            assert [value] == pub_shots.data[it][pv]
    log = daemon.log_text()
    assert '"tags": {"shot": "1"}' in log and '"run": "shots"' in log


def test_bad_commands_get_error_replies_and_other_runs_continue(
    denv: DaemonEnv, daemons: list[DaemonProcess]
) -> None:
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemons.append(DaemonProcess(denv))
        wait_for(lambda: (run_state(admin, "periodic") or {}).get("state") == "recording",
                 40, "the periodic run to record")

        def code_of(command: str, run: str | None = None) -> str:
            return request(admin, command, run, timeout=30).code.value

        assert code_of("trigger", "nope") == "unknown_run"
        assert code_of("trigger", "periodic") == "wrong_mode"
        assert code_of("stop", "idle") == "not_running"
        assert code_of("start", "periodic") == "already_running"
        assert code_of("status", "nope") == "unknown_run"
        # not JSON at all: answered (no request id) on the default reply topic
        admin.send_raw(b"\xff not json")
        assert admin.wait_reply(None, 20).code.value == "malformed"
        # valid JSON, bad fields: answered to its reply topic with its request id
        admin.send_raw(json.dumps({"command": "explode", "request_id": "bad-1",
                                   "reply_topic": denv.reply_topic}).encode())
        assert admin.wait_reply("bad-1", 20).code.value == "malformed"
        # too old: answered, never acted on
        old = admin.build("stop", "periodic")
        stale = {**json.loads(json.dumps(old.to_json_obj())), "issued_at": 1_000}
        admin.send_raw(json.dumps(stale).encode())
        assert admin.wait_reply(old.request_id, 20).code.value == "expired"
        # the same request twice: acted on once
        again = admin.build("status")
        admin.send(again)
        assert admin.wait_reply(again.request_id, 20).ok
        admin.send(again)
        assert admin.wait_reply(again.request_id, 20).code.value == "duplicate"

        before = run_state(admin, "periodic")
        assert before is not None and before["state"] == "recording"
        count = before["iterations"]["complete"]
        wait_for(lambda: (run_state(admin, "periodic") or {}).get("iterations", {})
                 .get("complete", 0) > count + 3, 20, "the periodic run to keep recording")

        # a bad reload keeps the old definitions and says why
        good = denv.config.read_text()
        denv.config.write_text(good.replace("time_window: 100", 'time_window: "fast"'))
        reply = request(admin, "reload")
        assert reply.code.value == "invalid_config"
        assert "runs.yaml:" in reply.message and "time_window" in reply.message
        doc = status(admin)
        assert doc is not None and doc["daemon"]["config_errors"]
        assert doc["runs"]["periodic"]["state"] == "recording"

        # a good reload: one run removed (stopped cleanly), the idle one started by admin
        denv.config.write_text(good)
        reply = request(admin, "reload")
        assert reply.ok and reply.data == {"added": [], "removed": [], "changed": {},
                                           "unchanged": ["periodic", "shots", "idle"]}
        reply = request(admin, "start", "idle")
        assert reply.ok, reply
        reply = request(admin, "stop", "idle")
        assert reply.ok and reply.data and len(reply.data["files"]) == 1, reply
        assert not Path(reply.data["files"][0]).name.endswith(".partial")


def test_a_run_started_again_records_only_its_new_snapshot(
    denv: DaemonEnv, daemons: list[DaemonProcess]
) -> None:
    """Start, stop, start, stop one run: the second recording begins with the new snapshot's
    first whole iteration (none of the old snapshot's last one, which the first file holds:
    the broker's end offset may lag), and each stop lists only its own recording's file."""
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemons.append(DaemonProcess(denv))
        wait_for(lambda: run_state(admin, "idle") is not None, 40, "the daemon to answer")
        stops = []
        for _ in range(2):
            assert request(admin, "start", "idle").ok
            wait_for(lambda: (run_state(admin, "idle") or {}).get("iterations", {})
                     .get("complete", 0) >= 5, 40, "five iterations")
            reply = request(admin, "stop", "idle")
            assert reply.ok and reply.data, reply
            stops.append(reply.data["files"])
            assert (run_state(admin, "idle") or {}).get("iterations", {}).get("incomplete") == 0
    assert [len(f) for f in stops] == [1, 1] and stops[0] != stops[1], stops
    first, second = read_files([Path(stops[0][0]), Path(stops[1][0])])
    for f in (first, second):
        assert f["status"] == "complete"
        assert set(f["iteration_status"]) == {"complete"}, f["iteration_status"]
    assert second["iterations"][0] == 1, second["iterations"][:5]


def test_bad_yaml_is_a_clear_error_and_exit_code_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nsnapshot:\n  snapshot_name: x\n  pv_uri_list: [pva://SIM:AI:DOUBLE:1]\n"
        "  time_window: '100'\n  colour: blue\noutput: {directory: /tmp/x}\n"
    )
    env = environ_without_recorder()
    env["RECORDER_BOOTSTRAP_SERVERS"] = "127.0.0.1:1"  # never contacted
    result = subprocess.run(
        [sys.executable, "-m", "recorder.cli", "run", "--config", str(bad)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert f"{bad}:5: snapshot.time_window" in result.stderr, result.stderr
    assert "colour" in result.stderr


def test_gateway_unreachable_is_retried_and_reported(
    denv: DaemonEnv, daemons: list[DaemonProcess]
) -> None:
    denv.extra["RECORDER_COMMAND_TIMEOUT_S"] = "1"
    with denv.admin() as admin:
        daemon = DaemonProcess(denv)
        daemons.append(daemon)
        st = wait_for(lambda: (run_state(admin, "periodic") or {}).get("state") == "retrying"
                      and run_state(admin, "periodic"), 40, "the run to report retrying")
        assert st["errors"] >= 1 and "snapshot start failed" in st["last_error"]
        assert daemon.proc.poll() is None
        with simulator(denv.bootstrap, denv.cmd_topic):
            wait_for(lambda: (run_state(admin, "periodic") or {}).get("state") == "recording",
                     40, "the run to record once the gateway answers")
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(60) == 0
    assert '"run start failed; retrying"' in daemon.log_text()


def test_kafka_unreachable_at_start_is_retried_quietly_then_recording_begins(
    denv: DaemonEnv, daemons: list[DaemonProcess], notify_lines: tuple[str, list[str]],
) -> None:
    """Kafka down when the daemon starts: it retries with backoff and says so once in a
    while, without librdkafka's line per connection attempt (raw ``%3|`` lines on stderr
    before, ~20 a second); once a broker listens on that address it connects and records.
    systemd hears READY=1 meanwhile (else TimeoutStartSec= kills the unit and Restart=
    repeats that while Kafka is down) and the reason in STATUS=."""
    port = free_loopback_port()
    env = dataclasses.replace(denv, bootstrap=f"127.0.0.1:{port}")
    env.extra["NOTIFY_SOCKET"], notified = notify_lines
    daemon = DaemonProcess(env)
    daemons.append(daemon)
    wait_for(lambda: daemon.log_text().count('"cannot connect to Kafka; retrying"') >= 2, 60,
             "two failed connection attempts")
    assert daemon.proc.poll() is None
    assert any("READY=1" in m for m in notified), notified
    assert any("STATUS=waiting for Kafka" in m for m in notified), notified
    lines = daemon.log_text().splitlines()
    assert not [line for line in lines if line.startswith("%")], lines[:5]
    noisy = [line for line in lines if '"Kafka error"' in line or '"librdkafka"' in line]
    # the first of each distinct message (transport failure, all brokers down, librdkafka's
    # FAIL line, and their "N identical error(s) suppressed" variants), then nothing for a
    # minute, whichever adapter of the process saw it; unthrottled it was ~20 lines a second
    assert 1 <= len(noisy) <= 8, noisy
    with EmbeddedBroker(port=port) as broker, simulator(broker.bootstrap_servers,
                                                        env.cmd_topic):
        with env.admin() as admin:
            wait_for(lambda: (run_state(admin, "periodic") or {}).get("state") == "recording",
                     90, "the run to record once Kafka is up")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    assert '"daemon ready"' in daemon.log_text()


def test_a_kafka_setting_librdkafka_refuses_stops_the_daemon_with_exit_2(
    denv: DaemonEnv, daemons: list[DaemonProcess], notify_lines: tuple[str, list[str]],
) -> None:
    """A misspelt RECORDER_KAFKA__* property is a configuration error, like a bad run
    definition (exit 2, which the unit does not restart), not "cannot connect to Kafka"
    retried for ever. The daemon's last word on stderr said "invalid run definitions in
    PATH (... `k2eg-recorder validate` explains them)": it now names the Kafka setting."""
    denv.extra["RECORDER_KAFKA__FOO__BAR"] = "1"
    denv.extra["NOTIFY_SOCKET"], notified = notify_lines
    daemon = DaemonProcess(denv)
    daemons.append(daemon)
    assert daemon.wait(60) == 2
    log = daemon.log_text()
    assert "refusing to start: fix the Kafka settings" in log
    assert 'No such configuration property: \\"foo.bar\\"' in log, log[-2000:]
    assert "cannot connect to Kafka" not in log
    assert any("STATUS=refusing to start: Kafka settings" in m for m in notified), notified
    # the last line (stderr) blamed the run definitions, which are fine
    assert "invalid run definitions" not in log, log[-500:]
    assert "k2eg-recorder run: refusing to start: Kafka settings" in log, log[-500:]


def test_admin_cli_with_a_kafka_setting_the_client_refuses_exits_2() -> None:
    env = {**environ_without_recorder(), "RECORDER_KAFKA__FOO__BAR": "1"}
    cmd = [sys.executable, "-m", "recorder.cli", "status", "--bootstrap",
           f"127.0.0.1:{free_loopback_port()}", "--timeout", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=60, check=False)
    assert result.returncode == 2, result  # a setting to fix, not "no reply"
    assert result.stderr.startswith(
        'k2eg-recorder status: Kafka settings: No such configuration property: "foo.bar"'), result


def test_admin_cli_with_kafka_unreachable_prints_one_clear_line() -> None:
    port = free_loopback_port()
    env = environ_without_recorder()
    cmd = [sys.executable, "-m", "recorder.cli", "status", "--bootstrap", f"127.0.0.1:{port}",
           "--timeout", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=60, check=False)
    assert result.returncode == 3  # no reply
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines[:10]  # not a line per connection attempt
    assert lines[0].startswith("k2eg-recorder status: Kafka metadata request for "), lines
    assert "Broker transport failure (_TRANSPORT)" in lines[0]
    assert f"(Kafka at 127.0.0.1:{port}: --bootstrap or RECORDER_BOOTSTRAP_SERVERS)" in lines[0]
    # --verbose: the Kafka client's own reports too, structured and throttled
    verbose = subprocess.run([*cmd, "--verbose"], capture_output=True, text=True, env=env,
                             cwd=REPO, timeout=60, check=False)
    assert verbose.returncode == 3
    noisy = verbose.stderr.splitlines()
    assert not [line for line in noisy if line.startswith("%")], noisy[:5]
    assert any("librdkafka" in line or "Kafka error" in line for line in noisy), noisy
    assert len(noisy) <= 8, noisy
