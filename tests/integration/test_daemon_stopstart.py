"""Admin commands in quick succession on one run of a real daemon: stop then start at once
while the gateway is still finishing the old snapshot, start then stop within milliseconds,
two stops at once. Every file passes ``verify --data`` and every iteration lands in the
recording it belongs to."""

from __future__ import annotations

import queue
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon_support import (
    DaemonEnv,
    DaemonProcess,
    cli,
    complete_iterations,
    h5_files,
    partial_files,
    request,
    run_state,
    topic_messages,
    wait_for,
)

from recorder.admin.protocol import AdminCommand, AdminReply, decode_reply, encode_command
from recorder.daemon.adminclient import AdminClient
from recorder.reader import open_file
from recorder.sim import FaultConfig, GatewaySimulator, SimConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def denv(tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str]) -> DaemonEnv:
    token = unique_name("s").replace("-", "_")
    data = tmp_path / "data"
    config = tmp_path / "runs.yaml"
    config.write_text(f"""
runs:
  - name: periodic
    autostart: false
    snapshot:
      snapshot_name: periodic_{token}
      pv_uri_list: [pva://SIM:AI:DOUBLE:1, pva://SIM:AI:LONG:3]
      time_window: 100
    output: {{directory: {data}/periodic, flush_interval_s: 0.3}}
  - name: shots
    autostart: false
    snapshot:
      snapshot_name: shots_{token}
      pv_uri_list: [pva://SIM:AI:DOUBLE:20]
      triggered: true
    output: {{directory: {data}/shots, flush_interval_s: 0.3}}
  - name: short
    autostart: false
    snapshot:
      snapshot_name: short_{token}
      pv_uri_list: [pva://SIM:AI:DOUBLE:1, pva://SIM:WF:DOUBLE:1:N8]
      time_window: 50
    output: {{directory: {data}/short, flush_interval_s: 0.2,
              segment: {{max_iterations: 4}}}}
  - name: bigseg
    autostart: false
    snapshot:
      snapshot_name: bigseg_{token}
      pv_uri_list: [pva://SIM:WF:DOUBLE:3:N20000, pva://SIM:AI:DOUBLE:4]
      time_window: 60
    output: {{directory: {data}/bigseg, flush_interval_s: 0.2,
              segment: {{max_iterations: 3}}}}
  - name: tbuf
    autostart: false
    snapshot:
      snapshot_name: tbuf_{token}
      pv_uri_list: [pva://SIM:AI:DOUBLE:10:P20, pva://SIM:WF:DOUBLE:10:N64:P50]
      type: timedbuffered
      time_window: 400
      sub_push_delay_msec: 100
    output: {{directory: {data}/tbuf, flush_interval_s: 0.2,
              segment: {{max_iterations: 2}}}}
  - name: big
    autostart: false
    snapshot:
      snapshot_name: big_{token}
      pv_uri_list: [pva://SIM:WF:DOUBLE:1:N20000, pva://SIM:WF:DOUBLE:2:N20000]
      time_window: 100
    output: {{directory: {data}/big, flush_interval_s: 0.3}}
""")
    return DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config)


@pytest.fixture
def sims() -> Iterator[list[GatewaySimulator]]:
    started: list[GatewaySimulator] = []
    yield started
    for sim in started:
        sim.stop()


def _iterations(path: Path) -> dict[str, list[object]]:
    with open_file(path) as f:
        its = f.iterations()
        return {k: its[k].tolist() for k in ("iter_index", "header_timestamp")}


def _verified(denv: DaemonEnv, directory: Path) -> list[Path]:
    files = h5_files(directory)
    assert files
    result = cli(denv, "verify", "--data", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr
    return files


def test_a_final_iteration_read_after_the_next_start_is_not_in_the_new_recording(
    denv: DaemonEnv, sims: list[GatewaySimulator], daemons: list[DaemonProcess],
) -> None:
    """The gateway's final iteration is read after the stop gave up waiting for it (its
    iteration timeout), and the run is started again at once: that iteration of the old
    snapshot is not recorded in the new recording (it would come first, or in between,
    with an iter_index of the old snapshot)."""
    data = denv.config.parent / "data" / "periodic"
    faults = FaultConfig(delay_final_ms=2500)
    sims.append(GatewaySimulator(denv.bootstrap, denv.cmd_topic, SimConfig(faults=faults))
                .start())
    daemons.append(DaemonProcess(denv))
    with denv.admin() as admin:
        wait_for(lambda: run_state(admin, "periodic") is not None, 40, "the daemon to answer")
        assert request(admin, "start", "periodic").ok
        wait_for(lambda: complete_iterations(admin, "periodic") >= 40, 40, "40 iterations")
        first = request(admin, "stop", "periodic")
        assert first.ok and first.data, first
        started = request(admin, "start", "periodic")
        assert started.ok, started
        wait_for(lambda: complete_iterations(admin, "periodic") >= 70, 40, "more iterations")
        second = request(admin, "stop", "periodic")
        assert second.ok and second.data, second
    old_files = [Path(p) for p in first.data["files"]]
    new_files = [Path(p) for p in second.data["files"]]
    _verified(denv, data)
    old = [i for p in old_files for i in _iterations(p)["iter_index"]]
    new = [_iterations(p) for p in new_files]
    # the new recording is one snapshot's life: iter_index 1, 2, 3 ... in one file
    assert len(new) == 1, [n["iter_index"] for n in new]
    indexes = new[0]["iter_index"]
    assert indexes == list(range(1, len(indexes) + 1)), (old[-3:], indexes[:5])


def _burst(admin: AdminClient, commands: list[tuple[str, str | None, dict[str, str] | None]],
           timeout: float = 60.0) -> list[AdminReply]:
    """Send every command at once, then collect one reply each (in the order sent)."""
    sent = [admin.build(kind, run, tags) for kind, run, tags in commands]
    for cmd in sent:
        admin._adapter.produce(admin.admin_topic, encode_command(cmd))
    admin._adapter.flush(5.0)
    return _collect(admin, sent, timeout)


def _collect(admin: AdminClient, sent: list[AdminCommand], timeout: float = 60.0
             ) -> list[AdminReply]:
    """One reply to each command sent (in the order sent)."""
    wanted = {c.request_id for c in sent}
    got: dict[str, AdminReply] = {}
    deadline = time.monotonic() + timeout
    while wanted - set(got) and time.monotonic() < deadline:
        try:
            record = admin._records.get(timeout=0.2)
        except queue.Empty:
            continue
        reply = decode_reply(record.value or b"")
        if reply.request_id in wanted:
            got.setdefault(reply.request_id, reply)
    missing = [(c.command.value, c.run) for c in sent if c.request_id not in got]
    assert not missing, f"no reply to {missing}"
    return [got[c.request_id] for c in sent]


def test_commands_in_quick_succession(
    denv: DaemonEnv, sims: list[GatewaySimulator], daemons: list[DaemonProcess],
) -> None:
    """Start and stop sent together; a trigger right after a start and right before a stop;
    two stops at once and a start behind them: each answered as the README says, the
    trigger's and the stop's iterations tagged, every file verified.

    A run's worker serves the commands as they reach it: when it has all of a burst, the
    start is answered ``start_failed`` ("stopped before it started"); when it took the start
    alone (the admin thread handed the rest a moment later, a busy host), the start goes
    ahead and the stop ends that short recording. Both are right; each is checked."""
    data = denv.config.parent / "data"
    sims.append(GatewaySimulator(denv.bootstrap, denv.cmd_topic).start())
    daemons.append(DaemonProcess(denv))
    with denv.admin() as admin:
        wait_for(lambda: run_state(admin, "periodic") is not None, 40, "the daemon to answer")
        replies = _burst(admin, [("start", "periodic", None), ("stop", "periodic", None),
                                 ("start", "shots", None), ("trigger", "shots", {"n": "0"}),
                                 ("stop", "shots", None)])
        codes = [r.code.value for r in replies]
        assert codes[:2] in (["start_failed", "ok"], ["ok", "ok"]), replies
        assert codes[2:] in (["start_failed", "not_running", "ok"],
                             ["ok", "not_running", "ok"], ["ok", "ok", "ok"]), replies
        if codes[0] == "start_failed":
            assert "stopped before it started" in replies[1].message
        for run in ("periodic", "shots"):
            assert (run_state(admin, run) or {}).get("state") == "idle"
        shots_before = set(h5_files(data / "shots"))  # a recording the burst's start made
        assert request(admin, "start", "shots").ok
        assert request(admin, "start", "periodic").ok
        wait_for(lambda: complete_iterations(admin, "periodic") >= 5, 30, "5 iterations")
        assert request(admin, "trigger", "shots", {"n": "1"}).ok
        replies = _burst(admin, [("trigger", "shots", {"n": "2"}), ("stop", "shots", None),
                                 ("stop", "shots", None), ("status", None, None),
                                 ("stop", "periodic", None), ("stop", "periodic", None),
                                 ("start", "periodic", None)])
        codes = [r.code.value for r in replies]
        assert codes == ["ok"] * 6 + ["already_running"], replies
        assert "is stopping" in replies[6].message
        assert replies[1].data == replies[2].data and replies[4].data == replies[5].data
        assert replies[3].data is not None
        assert replies[3].data["runs"]["periodic"]["state"] in ("recording", "stopping")
        for run in ("periodic", "shots"):
            assert (run_state(admin, run) or {}).get("state") == "idle"
    for run in ("periodic", "shots"):
        for path in _verified(denv, data / run):
            with open_file(path) as f:
                assert f.status == "complete", f.attrs.get("status_reason")
    [shots] = set(h5_files(data / "shots")) - shots_before
    with open_file(shots) as f:
        assert f.iterations()["tags"].tolist() == [
            {"n": "1"}, {"n": "2"}, {"k2eg-recorder.cause": "stop"}]


def test_sigterm_while_a_stop_waits_for_the_gateway(
    denv: DaemonEnv, sims: list[GatewaySimulator], daemons: list[DaemonProcess],
) -> None:
    data = denv.config.parent / "data"
    faults = FaultConfig(delay_stop_ms=2000)
    sims.append(GatewaySimulator(denv.bootstrap, denv.cmd_topic, SimConfig(faults=faults))
                .start())
    daemon = DaemonProcess(denv)
    daemons.append(daemon)
    with denv.admin() as admin:
        wait_for(lambda: run_state(admin, "periodic") is not None, 40, "the daemon to answer")
        assert request(admin, "start", "periodic").ok
        assert request(admin, "start", "shots").ok
        wait_for(lambda: complete_iterations(admin, "periodic") >= 5, 30, "5 iterations")
        assert request(admin, "trigger", "shots", {"n": "1"}).ok
        cmds = [admin.build("stop", "periodic"), admin.build("stop", "shots")]
        for cmd in cmds:
            admin.send(cmd)
        wait_for(lambda: (run_state(admin, "periodic") or {}).get("state") == "stopping", 10,
                 "the stop to begin")
        daemon.signal(signal.SIGTERM)
        replies = _collect(admin, cmds, 40)
        assert [r.code.value for r in replies] == ["ok", "ok"], replies
        assert all("stopped (complete)" in r.message for r in replies), replies
    assert daemon.wait(60) == 0
    for run in ("periodic", "shots"):
        for path in _verified(denv, data / run):
            with open_file(path) as f:
                assert f.status == "complete", f.attrs.get("status_reason")
        # the operator's stop stands: the next daemon does not resume the run
        assert '"active":null' in (denv.state_dir / f"{run}.json").read_text()


def _published_headers(bootstrap: str, topic: str) -> list[tuple[int, int]]:
    """(iter_index, timestamp ms) of every header on the snapshot topic, in order."""
    return [(obj["iter_index"], obj["timestamp"])
            for _msg, obj in topic_messages(bootstrap, topic, f"hdr-{topic}", 20.0)
            if obj.get("message_type") == 0]


@pytest.mark.parametrize("run", ["short", "bigseg", "tbuf"])
def test_quick_stops_and_starts_with_short_segments_lose_nothing(
    denv: DaemonEnv, sims: list[GatewaySimulator], daemons: list[DaemonProcess], run: str,
) -> None:
    data = denv.config.parent / "data" / run
    sims.append(GatewaySimulator(denv.bootstrap, denv.cmd_topic).start())
    daemons.append(DaemonProcess(denv))
    stops = []
    listed: list[str] = []
    with denv.admin() as admin:
        wait_for(lambda: run_state(admin, run) is not None, 40, "the daemon to answer")
        for pause in (0.0, 0.05, 0.3, 0.17, 0.52, 0.08, 0.9, 0.23, 0.0, 0.41):
            started = request(admin, "start", run)
            assert started.ok, started
            time.sleep(pause)
            stopped = request(admin, "stop", run)
            assert stopped.ok, stopped
            stops.append(stopped.message)
            assert stopped.data is not None
            listed += stopped.data["files"]
    files = _verified(denv, data)
    assert sorted(listed) == sorted(map(str, files))
    recorded: list[tuple[int, int]] = []
    for path in files:
        its = _iterations(path)
        recorded += [(int(i), int(t) // 1_000_000) for i, t in
                     zip(its["iter_index"], its["header_timestamp"], strict=True)]
    published = _published_headers(denv.bootstrap, f"{run}_" + denv.config.read_text()
                                   .split(f"snapshot_name: {run}_")[1].split()[0].lower())
    assert sorted(recorded) == sorted(published), (stops, sorted(set(published) - set(recorded)),
                                                   sorted(set(recorded) - set(published)))


def test_a_stop_while_the_start_goes_unanswered_leaves_no_snapshot_at_the_gateway(
    denv: DaemonEnv, sims: list[GatewaySimulator], daemons: list[DaemonProcess],
) -> None:
    """The gateway does not answer the run's start (it is down or busy: the command waits
    in its command topic) and the operator stops the run meanwhile. When the gateway reads
    its commands, the start is not left running there, publishing to a topic nobody reads
    (and answering the run's next start "already running", with the old parameters)."""
    GatewaySimulator(denv.bootstrap, denv.cmd_topic).start().stop()  # the command topic
    daemons.append(DaemonProcess(denv))
    with denv.admin() as admin:
        wait_for(lambda: run_state(admin, "periodic") is not None, 40, "the daemon to answer")
        reply = request(admin, "start", "periodic")
        assert reply.ok and "not recording yet" in reply.message, reply
        assert (run_state(admin, "periodic") or {}).get("state") == "retrying"
        stopped = request(admin, "stop", "periodic")
        assert stopped.ok, stopped
        assert (run_state(admin, "periodic") or {}).get("state") == "idle"
        # the gateway reads what was sent to it meanwhile (from its committed offset)
        sim = GatewaySimulator(denv.bootstrap, denv.cmd_topic, start_offset=0).start()
        sims.append(sim)
        assert sim.engine is not None
        wait_for(lambda: sim.engine is not None and sim.engine.stats["commands"] >= 1, 20,
                 "the gateway to read the commands")
        time.sleep(1.5)
        assert sim.engine.snapshots == {}, list(sim.engine.snapshots)
        # and the run starts as defined
        assert request(admin, "start", "periodic").ok
        wait_for(lambda: complete_iterations(admin, "periodic") >= 3, 30, "3 iterations")
        assert request(admin, "stop", "periodic").ok


def test_a_stop_cut_short_by_the_shutdown_budget_stays_a_stop(
    denv: DaemonEnv, sims: list[GatewaySimulator], daemons: list[DaemonProcess],
) -> None:
    """An admin stop is under way (the gateway is slow to act on it) when SIGTERM comes and
    the shutdown budget runs out before the stop ends: the operator's stop stands (README,
    RunController.abandon), so the next daemon does not start the run again; it finalizes
    the file left .partial."""
    data = denv.config.parent / "data" / "big"
    faults = FaultConfig(delay_stop_ms=6000)
    sims.append(GatewaySimulator(denv.bootstrap, denv.cmd_topic, SimConfig(faults=faults))
                .start())
    denv.extra["RECORDER_SHUTDOWN_TIMEOUT_S"] = "1"
    daemon = DaemonProcess(denv)
    daemons.append(daemon)
    with denv.admin() as admin:
        wait_for(lambda: run_state(admin, "big") is not None, 40, "the daemon to answer")
        # HDF5 loaded by the main thread before any file: imported first by the stop's
        # thread while the interpreter was exiting, h5py's atexit handler never ran and the
        # daemon died of SIGSEGV in HDF5's exit handler (service._load_hdf5)
        maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
        assert "libhdf5" in maps
        assert request(admin, "start", "big").ok
        wait_for(lambda: complete_iterations(admin, "big") >= 30, 30, "30 iterations")
        cmd = admin.build("stop", "big")
        admin.send(cmd)
        wait_for(lambda: (run_state(admin, "big") or {}).get("state") == "stopping", 10,
                 "the stop to begin")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
        again = DaemonProcess(denv, "daemon2")
        daemons.append(again)
        wait_for(lambda: run_state(admin, "big") is not None, 40, "the daemon to answer")
        time.sleep(2)
        state = run_state(admin, "big") or {}
        assert state.get("state") == "idle", state
    assert partial_files(data) == []
    _verified(denv, data)
