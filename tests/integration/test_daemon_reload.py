"""Reloading the run definitions of a running daemon: what happens to the runs it changes
while admin commands for them arrive."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon_support import (
    DaemonEnv,
    DaemonProcess,
    complete_iterations,
    run_state,
    simulator,
    wait_for,
)

from recorder.admin.protocol import AdminReply, decode_reply, encode_command
from recorder.daemon.adminclient import AdminClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _yaml(data: Path, snap: str, window: int, autostart: bool = True) -> str:
    return f"""
runs:
  - name: r
    autostart: {str(autostart).lower()}
    snapshot:
      snapshot_name: {snap}
      pv_uri_list: [pva://SIM:AI:DOUBLE:1]
      time_window: {window}
    output: {{directory: {data}, flush_interval_s: 0.3}}
"""


def _together(admin: AdminClient, commands: list[tuple[str, str | None]],
              timeout: float = 60.0) -> list[AdminReply]:
    """Send the commands at once (the daemon reads them in one batch); their replies."""
    sent = [admin.build(kind, run) for kind, run in commands]
    for cmd in sent:
        admin._adapter.produce(admin.admin_topic, encode_command(cmd))
    admin._adapter.flush(5.0)
    got: dict[str, AdminReply] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(sent) and time.monotonic() < deadline:
        try:
            record = admin._records.get(timeout=0.2)
        except queue.Empty:
            continue
        reply = decode_reply(record.value or b"")
        got.setdefault(reply.request_id, reply)
    return [got[c.request_id] for c in sent]


def test_a_run_stopped_just_before_a_reload_that_changes_it_stays_stopped(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess],
) -> None:
    """A stop handed to a run whose worker had not yet acted on it when a reload changed the
    run: the reload took the run for recording and restarted it into a new recording once
    the stop had finished, so the operator's stop was answered "stopped" while the run went
    on recording."""
    data = tmp_path / "data"
    snap = unique_name("s").replace("-", "_")
    config = tmp_path / "runs.yaml"
    config.write_text(_yaml(data, snap, 1000))
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config)
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemons.append(DaemonProcess(denv))
        wait_for(lambda: complete_iterations(admin, "r") >= 2, 40, "r to record")
        config.write_text(_yaml(data, snap, 500))
        stop, reload = _together(admin, [("stop", "r"), ("reload", None)])
        assert stop.ok and reload.ok, (stop, reload)
        assert reload.data is not None and reload.data["changed"]["r"]["restart"]
        wait_for(lambda: (run_state(admin, "r") or {}).get("state") in ("idle", "recording"),
                 30, "the stop and reload to be done")
        time.sleep(3.0)  # a restart the reload decided on would be recording by now
        state = run_state(admin, "r")
        assert state is not None and state["state"] == "idle", state


def test_a_run_started_just_before_a_reload_that_changes_it_starts(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess],
) -> None:
    """A start handed to an idle run whose worker had not yet acted on it when a reload
    changed the run: the start stands (answered ok, the run records with its new
    definition). Here the worker usually takes the start first; the unit test
    ``test_a_start_handed_to_an_idle_run_before_a_reload_changes_it_stands`` holds it back
    to make the race certain."""
    data = tmp_path / "data"
    snap = unique_name("s").replace("-", "_")
    config = tmp_path / "runs.yaml"
    config.write_text(_yaml(data, snap, 1000, autostart=False))
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config)
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemons.append(DaemonProcess(denv))
        wait_for(lambda: run_state(admin, "r") is not None, 40, "the daemon to answer")
        config.write_text(_yaml(data, snap, 200, autostart=False))
        start, reload = _together(admin, [("start", "r"), ("reload", None)])
        assert start.ok and reload.ok, (start, reload)
        assert reload.data is not None and reload.data["changed"]["r"]["restart"]
        wait_for(lambda: complete_iterations(admin, "r") >= 3, 30, "r to record")
        state = run_state(admin, "r")
        assert state is not None and state["state"] == "recording", state
