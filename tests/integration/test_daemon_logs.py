"""The daemon's log under systemd (JSON lines): what an operator reads in the journal.

A daemon with a periodic run (its writer in a process of its own, ``output.isolate``'s
default) records a few iterations and stops; its whole output (the daemon's and the writer's
lines, stdout and stderr as systemd collects them) is then read line by line.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon_support import DaemonEnv, DaemonProcess, run_state, simulator, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def denv(tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str]) -> DaemonEnv:
    config = tmp_path / "runs.yaml"
    snap = f"logs_{unique_name('t')}".replace("-", "_")
    config.write_text(f"""
name: logged
snapshot:
  snapshot_name: {snap}
  pv_uri_list: [pva://SIM:AI:DOUBLE:1, pva://SIM:WF:DOUBLE:1:N8]
  time_window: 100
output: {{directory: {tmp_path}/data, flush_interval_s: 0.3}}
""")
    return DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config)


def _recorded_log(denv: DaemonEnv, daemons: list[DaemonProcess]) -> list[dict[str, Any]]:
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemon = DaemonProcess(denv)
        daemons.append(daemon)
        wait_for(lambda: ((run_state(admin, "logged") or {}).get("iterations", {})
                          .get("complete", 0) >= 5), 40, "5 iterations")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
    lines = daemon.log_text().splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return out


def test_the_k2eg_client_lines_about_a_run_name_it(denv: DaemonEnv,
                                                  daemons: list[DaemonProcess]) -> None:
    """The README: every line carries ``run`` where relevant. The embedded client's lines
    about a run's snapshot (``recurring snapshot subscribed``, ``... stopped``, logged while
    the run starts and stops) named only the snapshot: ``jq 'select(.run == "logged")'``
    did not find them."""
    lines = _recorded_log(denv, daemons)
    about_run = [line for line in lines if "snapshot" in line or "writer_pid" in line]
    events = {line["event"] for line in about_run}
    assert {"recurring snapshot subscribed", "recurring snapshot stopped"} <= events
    assert [line for line in about_run if line.get("run") != "logged"] == []
