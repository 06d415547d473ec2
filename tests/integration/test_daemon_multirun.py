"""One daemon, many runs at once: runs sharing PVs and an output directory, admin commands
sent in bursts to many runs, a reload changing half of them while commands arrive, SIGTERM
with every run recording."""

from __future__ import annotations

import os
import queue
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon_support import (
    DaemonEnv,
    DaemonProcess,
    h5_files,
    partial_files,
    read_files,
    simulator,
    status,
    wait_for,
    writer_pids,
)

from recorder.admin.protocol import AdminReply, decode_reply, encode_command
from recorder.daemon.adminclient import AdminClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUNS = 24
PVS = ["pva://SIM:AI:DOUBLE:1", "pva://SIM:AI:LONG:3", "pva://SIM:AI:DOUBLE:2"]


def _yaml(data: Path, token: str, *, window: int = 100, runs: int = RUNS) -> str:
    out = ["runs:"]
    for i in range(runs):
        triggered = i % 4 == 3
        snap = f"m{i}_{token}"
        out.append(f"""  - name: run{i}
    snapshot:
      snapshot_name: {snap}
      pv_uri_list: [{', '.join(PVS[: 1 + i % 3])}]
      {'triggered: true' if triggered else f'time_window: {window}'}
    output: {{directory: {data}, flush_interval_s: 0.3, isolate: {str(i % 6 == 0).lower()}}}
""")
    return "\n".join(out)


def _burst(admin: AdminClient, commands: list[tuple[str, str | None]],
           timeout: float = 60.0) -> list[AdminReply]:
    """Send every command at once, then collect one reply each (in the order sent)."""
    sent = [admin.build(kind, run) for kind, run in commands]
    for cmd in sent:
        admin._adapter.produce(admin.admin_topic, encode_command(cmd))
    admin._adapter.flush(5.0)
    wanted = {c.request_id for c in sent}
    got: dict[str, list[AdminReply]] = {}
    deadline = time.monotonic() + timeout
    while wanted - set(got) and time.monotonic() < deadline:
        try:
            record = admin._records.get(timeout=0.2)
        except queue.Empty:
            continue
        reply = decode_reply(record.value or b"")
        if reply.request_id in wanted:
            got.setdefault(reply.request_id, []).append(reply)
    missing = [(c.command.value, c.run) for c in sent if c.request_id not in got]
    assert not missing, f"no reply to {missing}"
    twice = {r: v for r, v in got.items() if len(v) > 1}
    assert not twice, twice
    return [got[c.request_id][0] for c in sent]


def _restart_refused(admin: AdminClient, burst: list[tuple[str, str | None]],
                     replies: list[AdminReply]) -> None:
    """A start refused while its run was stopping: sent again once it has stopped."""
    for (kind, run), reply in zip(burst, replies, strict=True):
        if kind == "start" and not reply.ok:
            assert "stopping" in reply.message, reply
            wait_for(lambda n=run: (status(admin) or {})["runs"][n]["state"] == "idle",
                     30, f"{run} to stop")
            assert admin.request("start", run).ok


@pytest.fixture
def many(tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str]
         ) -> tuple[DaemonEnv, Path, str]:
    config = tmp_path / "runs.yaml"
    data = tmp_path / "data"
    token = unique_name("t").replace("-", "_")
    config.write_text(_yaml(data, token))
    env = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config,
                           extra={"RECORDER_SHUTDOWN_TIMEOUT_S": "40"})
    return env, data, token


@pytest.mark.timeout(240)
def test_many_runs_bursts_reload_and_sigterm(many: tuple[DaemonEnv, Path, str],
                                             daemons: list[DaemonProcess]) -> None:
    env, data, token = many
    names = [f"run{i}" for i in range(RUNS)]
    with simulator(env.bootstrap, env.cmd_topic), env.admin() as admin:
        daemon = DaemonProcess(env)
        daemons.append(daemon)

        def all_recording() -> bool:
            doc = status(admin) or {}
            runs = doc.get("runs", {})
            return len(runs) == RUNS and all(r["state"] == "recording" for r in runs.values())

        wait_for(all_recording, 90, "every run to record")
        # a burst: stop a third, trigger the triggered ones, status, start again
        stop = names[::3]
        burst = ([("stop", n) for n in stop] + [("status", None)]
                 + [("trigger", n) for i, n in enumerate(names) if i % 4 == 3]
                 + [("start", n) for n in stop])
        replies = _burst(admin, burst)
        bad = [(c, r.code.value, r.message) for c, r in zip(burst, replies, strict=True)
               if not r.ok and r.code.value not in ("already_running", "not_running")]
        assert not bad, bad
        _restart_refused(admin, burst, replies)
        # a reload changing half the runs (restart needed) while commands arrive
        env.config.write_text(_yaml(data, token, window=200))
        daemon.signal(signal.SIGHUP)
        burst = ([("status", None)] + [("trigger", n) for n in names[3::4]]
                 + [("stop", n) for n in names[1::5]] + [("reload", None)]
                 + [("start", n) for n in names[1::5]])
        replies = _burst(admin, burst)
        bad = [r.message for r in replies
               if not r.ok and r.code.value not in ("already_running", "not_running")]
        assert not bad, bad
        _restart_refused(admin, burst, replies)
        try:
            wait_for(all_recording, 60, "every run to record after the reload")
        except AssertionError:
            doc = status(admin) or {}
            raise AssertionError({n: (r["state"], r["last_error"])
                                  for n, r in doc.get("runs", {}).items()
                                  if r["state"] != "recording"}) from None
        time.sleep(1.0)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
    assert partial_files(data) == []
    files = read_files(h5_files(data))
    assert files and all(f["status"] == "complete" for f in files), [
        (f["path"], f["status"]) for f in files if f["status"] != "complete"]
    assert {f["attrs"]["run_name"] for f in files} == set(names)
    log = daemon.log_text()
    assert '"level": "error"' not in log and "Traceback" not in log, [
        line for line in log.splitlines() if "error" in line][:10]


@pytest.mark.timeout(180)
def test_one_runs_bad_output_directory_never_affects_the_others(
        tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
        daemons: list[DaemonProcess]) -> None:
    data = tmp_path / "data"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    token = unique_name("t").replace("-", "_")
    text = _yaml(data, token, runs=6).replace(
        f"directory: {data}, flush_interval_s: 0.3, isolate: true",
        f"directory: {blocker}/sub, flush_interval_s: 0.3, isolate: true", 1)
    config = tmp_path / "runs.yaml"
    config.write_text(text)
    env = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config)
    with simulator(env.bootstrap, env.cmd_topic), env.admin() as admin:
        daemon = DaemonProcess(env)
        daemons.append(daemon)

        def settled() -> dict[str, tuple[str, str | None]] | None:
            runs = (status(admin) or {}).get("runs", {})
            states = {n: (r["state"], r["last_error"]) for n, r in runs.items()}
            others = [s for n, (s, _) in states.items() if n != "run0"]
            ok = (len(states) == 6 and all(s == "recording" for s in others)
                  and states["run0"][0] in ("failed", "retrying") and states["run0"][1])
            return states if ok else None

        states = wait_for(settled, 60, "the good runs to record, run0 to fail")
        assert "a-file" in str(states["run0"][1]), states
        time.sleep(1.0)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
    assert partial_files(data) == []
    files = read_files(h5_files(data))
    assert {f["attrs"]["run_name"] for f in files} == {f"run{i}" for i in range(1, 6)}


@pytest.mark.timeout(180)
def test_a_killed_writer_of_one_run_never_affects_the_others(
        tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
        daemons: list[DaemonProcess]) -> None:
    data = tmp_path / "data"
    token = unique_name("t").replace("-", "_")
    config = tmp_path / "runs.yaml"
    config.write_text(_yaml(data, token, runs=4).replace("isolate: false", "isolate: true"))
    env = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config)
    with simulator(env.bootstrap, env.cmd_topic), env.admin() as admin:
        daemon = DaemonProcess(env)
        daemons.append(daemon)

        def recording() -> dict[str, dict[str, object]] | None:
            runs = (status(admin) or {}).get("runs", {})
            ok = len(runs) == 4 and all(r["state"] == "recording"
                                        and r["iterations"]["complete"] > 2
                                        for n, r in runs.items() if n != "run3")
            return runs if ok else None

        wait_for(recording, 60, "every run to record")
        writers = writer_pids(daemon.proc.pid)
        assert len(writers) >= 4, writers
        victim = None
        # which writer is run0's: the one holding its .partial file open
        run0_file = (status(admin) or {})["runs"]["run0"]["current_file"]
        for p in writers:
            try:
                fds = [str(fd.readlink()) for fd in Path(f"/proc/{p}/fd").iterdir()]
            except OSError:
                continue
            if run0_file in fds:
                victim = p
        assert victim is not None, (run0_file, writers)
        before = {n: r["iterations"]["complete"] for n, r in recording().items()}  # type: ignore[union-attr]
        os.kill(victim, signal.SIGKILL)
        time.sleep(3.0)
        runs = (status(admin) or {})["runs"]
        assert runs["run0"]["state"] != "recording" or runs["run0"]["errors"], runs["run0"]
        for n in ("run1", "run2"):
            assert runs[n]["state"] == "recording" and runs[n]["errors"] == 0, runs[n]
            assert runs[n]["iterations"]["complete"] > before[n] + 5, (n, runs[n], before)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
    assert [p for p in partial_files(data) if "run0" not in p.name] == []
    files = read_files([p for p in h5_files(data) if "run0" not in p.name])
    assert {f["attrs"]["run_name"] for f in files} == {"run1", "run2", "run3"}
    assert all(f["status"] == "complete" for f in files)


@pytest.mark.timeout(300)
def test_sigterm_with_a_hundred_runs_recording_stops_each_the_k2eg_way(
        tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
        daemons: list[DaemonProcess]) -> None:
    """SIGTERM with 120 runs recording: every k2eg stop timed out unanswered ("no reply to
    'repeating_snapshot_stop' within 10 s") and every file ended aborted. Each stop asked the
    one consumer thread for its topic's watermarks, and the thread served queued requests
    until none was left before it read again: the gateway's replies were not read. Each
    stop is now answered and each file complete."""
    runs = 100
    data = tmp_path / "data"
    token = unique_name("t").replace("-", "_")
    lines = ["runs:"]
    for i in range(runs):
        lines.append(f"""  - name: run{i}
    snapshot: {{snapshot_name: h{i}_{token}, pv_uri_list: [{PVS[i % 3]}], time_window: 500}}
    output: {{directory: {data}, flush_interval_s: 1.0, isolate: false}}""")
    config = tmp_path / "runs.yaml"
    config.write_text("\n".join(lines) + "\n")
    env = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config,
                           extra={"RECORDER_SHUTDOWN_TIMEOUT_S": "120"})
    with simulator(env.bootstrap, env.cmd_topic), env.admin() as admin:
        daemon = DaemonProcess(env)
        daemons.append(daemon)

        def all_recording() -> bool:
            doc = status(admin) or {}
            states = [r["state"] for r in doc.get("runs", {}).values()]
            return len(states) == runs and all(s == "recording" for s in states)

        wait_for(all_recording, 150, "every run to record")
        time.sleep(1.5)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(150) == 0, daemon.log_text()[-3000:]
    log = daemon.log_text()
    failed = [line for line in log.splitlines() if "k2eg stop failed" in line]
    assert not failed, (len(failed), failed[:3])
    files = read_files(h5_files(data))
    assert len({f["attrs"]["run_name"] for f in files}) == runs
    assert all(f["status"] == "complete" for f in files), sorted(
        {f["status"] for f in files})
