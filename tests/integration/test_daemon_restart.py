"""A daemon killed (SIGKILL) while the gateway keeps publishing loses nothing: the restarted
daemon recovers the leftover file and resumes the recording from the last durably written
offset into a new segment, without duplicates."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon_support import (
    DaemonEnv,
    DaemonProcess,
    h5_files,
    partial_files,
    read_files,
    read_published,
    run_state,
    simulator,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.kill()


def _complete(admin: object, run: str) -> int:
    st = run_state(admin, run)  # type: ignore[arg-type]
    return int((st or {}).get("iterations", {}).get("complete", 0)) if st else 0


def test_restart_after_kill_resumes_without_loss_or_duplicates(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess],
) -> None:
    snap = unique_name("resume").replace("-", "_")
    data = tmp_path / "data"
    config = tmp_path / "runs.yaml"
    config.write_text(f"""
name: resume
snapshot:
  snapshot_name: {snap}
  pv_uri_list: [pva://SIM:AI:DOUBLE:1, pva://SIM:WF:DOUBLE:2:N4]
  time_window: 100
output: {{directory: {data}, flush_interval_s: 0.3}}
""")
    (tmp_path / "logs").mkdir()
    denv = DaemonEnv(
        bootstrap=kafka_bootstrap, cmd_topic=unique_name("cmd"), app=unique_name("rec"),
        admin_topic=unique_name("admin"), reply_topic=unique_name("reply"),
        status_topic=unique_name("status"), state_dir=tmp_path / "state", config=config,
        log_dir=tmp_path / "logs",
    )
    with simulator(denv.bootstrap, denv.cmd_topic) as sim, denv.admin() as admin:
        first = DaemonProcess(denv, "first")
        daemons.append(first)
        wait_for(lambda: _complete(admin, "resume") >= 12, 40, "12 iterations")
        first.signal(signal.SIGKILL)
        first.wait(10)
        state = json.loads((denv.state_dir / "resume.json").read_text())
        assert state["active"]["offsets"], state
        assert sim.engine is not None
        published_before = sim.engine.stats["iterations"]
        time.sleep(1.5)  # the gateway keeps publishing while no recorder runs
        assert sim.engine.stats["iterations"] > published_before + 5

        second = DaemonProcess(denv, "second")
        daemons.append(second)
        wait_for(lambda: _complete(admin, "resume") >= 20, 40, "the resumed recording")
        second.signal(signal.SIGTERM)
        assert second.wait(60) == 0, second.log_text()[-3000:]
    assert partial_files(data) == []
    files = read_files(h5_files(data))
    assert len(files) == 2, [f["path"] for f in files]
    files.sort(key=lambda f: f["attrs"]["segment_start_time"])
    crashed, resumed = files
    assert crashed["status"] == "aborted" and resumed["status"] == "complete"
    assert crashed["attrs"]["recording_uid"] == resumed["attrs"]["recording_uid"]

    published = read_published(denv.bootstrap, snap.lower())
    first_it = crashed["iterations"][0]
    last_it = resumed["iterations"][-1]
    assert last_it == max(published.tails)
    # value by value: the two files together hold each published value exactly once
    for pv in ("SIM:AI:DOUBLE:1", "SIM:WF:DOUBLE:2:N4"):
        got: dict[int, list[object]] = {}
        for f in files:
            col = f["pvs"][pv]
            for it, value in zip(col["iters"], col["values"], strict=True):
                got.setdefault(it, []).append(value)
        for it in range(first_it, last_it + 1):
            assert got.get(it) == published.data[it][pv], (pv, it)
    # every iteration is complete in exactly one file, except at most the one the kill cut
    complete = [i for f in files
                for i, s in zip(f["iterations"], f["iteration_status"], strict=True)
                if s == "complete"]
    assert len(complete) == len(set(complete))
    missing = set(range(first_it, last_it + 1)) - set(complete)
    assert len(missing) <= 1, sorted(missing)
