"""Timedbuffered runs with sub-push (``sub_push_delay_msec`` > 0): an iteration arrives in
partial batches over its window and each batch is written as it comes. A kill -9 between
two batches of one iteration, the restart that resumes it, and the stop that ends the
recording in the middle of an iteration: the files together hold every value the gateway
published, once, per PV and iteration in order, and every file passes ``verify --data``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon_support import (
    DaemonEnv,
    DaemonProcess,
    h5_files,
    partial_files,
    read_files,
    request,
    run_state,
    topic_messages,
    wait_for,
    writer_pids,
)

from recorder.reader import open_file
from recorder.sim import GatewaySimulator
from recorder.sim.engine import Protocol, SimConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PVS = ["SIM:AI:DOUBLE:10:P20", "SIM:WF:DOUBLE:10:N8:P50"]


def _mid_iteration(partial: Path) -> bool:
    """Does the live file hold values of an iteration it has no /iterations row for yet?"""
    try:
        with open_file(partial) as f:
            closed = set(f.iterations()["iter_index"].tolist())
            held = {int(i) for pv in f.pv_names for i in f.iterations_of(pv)}
    except Exception:
        return False
    return bool(held - closed)


def _by_iteration(files: list[dict[str, Any]], pv: str) -> dict[int, list[Any]]:
    got: dict[int, list[Any]] = {}
    for f in files:
        col = f["pvs"].get(pv)
        if col is None:
            continue
        for it, value in zip(col["iters"], col["values"], strict=True):
            got.setdefault(it, []).append(value)
    return got


@pytest.mark.parametrize(("victim", "protocol"), [("daemon", Protocol.SEQUENCED),
                                                  ("writer", Protocol.SEQUENCED),
                                                  ("daemon", Protocol.LEGACY)])
def test_kill_between_two_batches_of_an_iteration_then_resume_and_stop(  # noqa: PLR0917
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess], victim: str, protocol: Protocol,
) -> None:
    snap = unique_name("subpush").replace("-", "_")
    data = tmp_path / "data"
    config = tmp_path / "runs.yaml"
    uris = ", ".join(f"pva://{pv}" for pv in PVS)
    config.write_text(f"""
name: tb
snapshot:
  snapshot_name: {snap}
  pv_uri_list: [{uris}]
  type: timedbuffered
  time_window: 2000
  sub_push_delay_msec: 250
output: {{directory: {data}, flush_interval_s: 0.1}}
""")
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config)
    sim = GatewaySimulator(denv.bootstrap, denv.cmd_topic, SimConfig(protocol=protocol)).start()
    with contextlib.ExitStack() as stack:
        stack.callback(sim.stop)
        admin = stack.enter_context(denv.admin())
        first = DaemonProcess(denv, "first")
        daemons.append(first)
        wait_for(lambda: (run_state(admin, "tb") or {}).get("iterations", {})
                 .get("complete", 0) >= 2, 60, "two iterations")
        wait_for(lambda: any(_mid_iteration(p) for p in partial_files(data)), 30,
                 "a live file holding part of an open iteration", interval=0.05)
        if victim == "writer":
            for pid in writer_pids(first.proc.pid):
                os.kill(pid, signal.SIGKILL)
            second = first
            wait_for(lambda: (run_state(admin, "tb") or {}).get("state") == "failed", 30,
                     "the run to fail")
            reply = request(admin, "start", "tb", timeout=40)
            assert reply.code.value == "ok", reply
        else:
            first.signal(signal.SIGKILL)
            first.wait(10)
            second = DaemonProcess(denv, "second")
            daemons.append(second)
        time.sleep(1.0)
        wait_for(lambda: (run_state(admin, "tb") or {}).get("state") == "recording", 60,
                 "the resumed recording")
        wait_for(lambda: any(_mid_iteration(p) for p in partial_files(data)), 30,
                 "a live file holding part of an open iteration", interval=0.05)
        second.signal(signal.SIGTERM)  # a stop in the middle of an iteration
        assert second.wait(60) == 0, second.log_text()[-3000:]
    assert partial_files(data) == []
    paths = h5_files(data)
    out = subprocess.run([sys.executable, "-m", "recorder.cli", "verify", "--data",
                          *map(str, paths)], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    files = read_files(paths)
    files.sort(key=lambda f: int(f["attrs"]["segment"]))
    published = _published(denv.bootstrap, snap.lower())
    detail = [(Path(f["path"]).name, f["status"], f["iterations"], f["iteration_status"])
              for f in files]
    for pv in PVS:
        # (iteration, value) in file order: every value the topic holds from the first one
        # recorded on, once, in order and with its iteration
        got = [(it, v) for f in files
               for it, v in zip(f["pvs"][pv]["iters"], f["pvs"][pv]["values"], strict=True)]
        want = published[pv]
        assert got, detail
        start = want.index(got[0])
        assert got == want[start:], (pv, detail, len(got), len(want) - start)
    # the final iteration of the stop is complete, unless the stop came while the iteration
    # cut by the crash was still open: its rest (the resumed segment's first row) lacks the
    # header and first values, which are in the crashed file, so it is incomplete by nature
    cut = files[1]["iterations"][0] if len(files) > 1 and files[1]["iterations"] else None
    final = files[-1]["iterations"][-1]
    assert files[-1]["iteration_status"][-1] == "complete" or final == cut, detail


def _published(bootstrap: str, topic: str) -> dict[str, list[tuple[int, Any]]]:
    """PV -> (iteration, value) of every data message the topic holds, in topic order
    (producer retries dropped): read until two reads agree (the embedded broker's high
    watermark can lag the last messages for a moment)."""
    last: dict[str, list[tuple[int, Any]]] | None = None
    for _ in range(5):
        out = _read_topic(bootstrap, topic)
        if out == last:
            break
        last = out
        time.sleep(1.0)
    return out


def _read_topic(bootstrap: str, topic: str) -> dict[str, list[tuple[int, Any]]]:
    out: dict[str, list[tuple[int, Any]]] = {}
    seen: set[bytes] = set()
    for msg, obj in topic_messages(bootstrap, topic, f"check-{topic}", 20.0):
        if obj.get("message_type") != 1 or msg.value() in seen:
            continue
        seen.add(msg.value())
        for key, value in obj.items():
            if isinstance(value, dict):
                out.setdefault(key, []).append((obj["iter_index"], value.get("value")))
    return out
