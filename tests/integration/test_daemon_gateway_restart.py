"""A gateway restarted under a recording daemon: the snapshots it forgot are started again,
and the files keep the two lives of each snapshot apart.

The gateway simulator runs in this process and is stopped (its snapshots are gone, as on a
restart of the real gateway, which keeps them in memory only), then a fresh one is started on
the same command topic. The daemon (a child process) must notice the silence of its periodic
run, report it, re-send the start until the new gateway takes it, and record on; a trigger for
the triggered run gets "has not been found" from the new gateway, so the daemon starts that
snapshot again and triggers it. iter_index begins again at 1 in both, so each recording goes on
in a new segment file, and trigger tags land on the iteration they were given for.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon_support import (
    DaemonEnv,
    DaemonProcess,
    cli,
    complete_iterations,
    h5_files,
    request,
    run_state,
    wait_for,
)

from recorder.reader import open_file
from recorder.sim import GatewaySimulator

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def denv(tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str]) -> DaemonEnv:
    token = unique_name("g").replace("-", "_")
    data = tmp_path / "data"
    config = tmp_path / "runs.yaml"
    config.write_text(f"""
runs:
  - name: periodic
    snapshot:
      snapshot_name: periodic_{token}
      pv_uri_list: [pva://SIM:AI:DOUBLE:1, pva://SIM:AI:LONG:3]
      time_window: 100
    output: {{directory: {data}/periodic, flush_interval_s: 0.3}}
  - name: shots
    snapshot:
      snapshot_name: shots_{token}
      pv_uri_list: [pva://SIM:AI:DOUBLE:20]
      triggered: true
    output: {{directory: {data}/shots, flush_interval_s: 0.3}}
""")
    return DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config,
                            {"RECORDER_SILENCE_AFTER_S": "2"})


@pytest.fixture
def sims() -> Iterator[list[GatewaySimulator]]:
    started: list[GatewaySimulator] = []
    yield started
    for sim in started:
        sim.stop()


def test_a_restarted_gateway_gets_its_snapshots_again_and_files_keep_them_apart(
    denv: DaemonEnv, sims: list[GatewaySimulator], daemons: list[DaemonProcess],
    notify_lines: tuple[str, list[str]],
) -> None:
    data = denv.config.parent / "data"
    denv.extra["NOTIFY_SOCKET"], notified = notify_lines
    sims.append(GatewaySimulator(denv.bootstrap, denv.cmd_topic).start())
    daemon = DaemonProcess(denv)
    daemons.append(daemon)
    with denv.admin() as admin:
        wait_for(lambda: (run_state(admin, "periodic") or {}).get("state") == "recording",
                 40, "the periodic run to record")
        wait_for(lambda: (run_state(admin, "shots") or {}).get("state") == "recording",
                 20, "the triggered run to be armed")
        assert request(admin, "trigger", "shots", {"shot": "before"}).ok
        wait_for(lambda: complete_iterations(admin, "shots") == 1, 20, "the first shot")
        wait_for(lambda: complete_iterations(admin, "periodic") >= 5, 30,
                 "5 periodic iterations")

        sims.pop().stop()  # the gateway goes away and forgets its snapshots
        silent = wait_for(
            lambda: (s := run_state(admin, "periodic")) and s.get("silent_since") and s,
            30, "the periodic run to report its silence")
        assert silent["state"] == "recording" and silent["snapshot_restarts"] == 0
        check = cli(denv, "status", "--check")  # what a monitoring script runs
        assert check.returncode == 4, check
        assert "attention: run periodic gets no data from the gateway since" in check.stderr
        before_restart = complete_iterations(admin, "periodic")

        sims.append(GatewaySimulator(denv.bootstrap, denv.cmd_topic).start())
        wait_for(lambda: (s := run_state(admin, "periodic")) and s["snapshot_restarts"] == 1
                 and s["silent_since"] is None, 60,
                 "the daemon to start the snapshot on the new gateway")
        wait_for(lambda: complete_iterations(admin, "periodic") >= before_restart + 5, 30,
                 "5 periodic iterations from the new gateway")
        reply = request(admin, "trigger", "shots", {"shot": "after"})
        assert reply.ok, reply  # -2 from the new gateway, start re-sent, triggered
        wait_for(lambda: complete_iterations(admin, "shots") == 2, 20, "the second shot")
        shots = run_state(admin, "shots")
        assert shots is not None and shots["snapshot_restarts"] == 1
        assert shots["silent_since"] is None  # triggered runs are never "silent"
        check = cli(denv, "status", "--check")
        assert check.returncode == 0 and "attention" not in check.stderr, check

        assert request(admin, "stop", "periodic").ok
        assert request(admin, "stop", "shots").ok
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
    log = daemon.log_text()
    assert "snapshot silent: re-sending its start" in log
    assert "gateway started the snapshot again" in log
    assert "the gateway does not know the snapshot" in log
    statuses = [line for m in notified for line in m.split("\n") if line.startswith("STATUS=")]
    assert any("READY=1" in m for m in notified) and any("STOPPING=1" in m for m in notified)
    assert any("; 1 silent (no data from the gateway)" in line for line in statuses), statuses
    assert "silent" not in statuses[-1]

    first, second = h5_files(data / "periodic")  # one recording, two segments
    with open_file(first) as f:
        old = f.iterations()["iter_index"].tolist()
        assert f.status == "complete" and "restarted" in f.attrs["status_reason"]
    with open_file(second) as f:
        new = f.iterations()["iter_index"].tolist()
        statuses = [str(s) for s in f.iterations()["status"]]
        assert f.status == "complete"
    assert len(set(old)) == len(old) and len(set(new)) == len(new)
    assert old[0] <= 2 and max(old) >= 5 and new[0] == 1 and len(new) >= 5
    assert statuses[1:-1] == ["complete"] * (len(new) - 2)

    before, after = h5_files(data / "shots")
    for path, shot in ((before, "before"), (after, "after")):
        with open_file(path) as f:
            its = f.iterations()
            assert its["iter_index"].tolist()[0] == 1
            assert its["tags"][0] == {"shot": shot}
            assert f.unmatched_tags() == {}
