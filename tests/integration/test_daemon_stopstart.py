"""Admin commands in quick succession on one run of a real daemon: stop then start at once
while the gateway is still finishing the old snapshot, start then stop within milliseconds,
two stops at once. Every file passes ``verify --data`` and every iteration lands in the
recording it belongs to."""

from __future__ import annotations

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
    request,
    run_state,
    wait_for,
)

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
