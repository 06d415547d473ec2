"""The daemon confined as systemd/k2eg-recorder.service confines it, as far as a test can
without systemd (tests/systemd_sandbox.py): its system call filter, address families and
MemoryDenyWriteExecute, UMask=0027, HOME=/nonexistent. It records a plain run (a writer
process) and one with a live Karabo bridge, serves an iteration over the bridge, stops cleanly
on SIGTERM, and leaves finalized files read-only and not world-readable."""

from __future__ import annotations

import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon_support import (
    DaemonEnv,
    DaemonProcess,
    complete_iterations,
    h5_files,
    partial_files,
    run_state,
    simulator,
    wait_for,
)
from systemd_sandbox import confined, unavailable

from recorder.reader import open_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

zmq = pytest.importorskip("zmq")


def _bridge_rep(admin: Any, run: str) -> str | None:
    st = run_state(admin, run) or {}
    endpoints = (st.get("bridge") or {}).get("endpoints") or {}
    rep = endpoints.get("rep")
    return rep if isinstance(rep, str) else None


def _one_train(endpoint: str) -> int:
    """Parts of one answer of the bridge's REQ endpoint to ``next``."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.RCVTIMEO, 20_000)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send(b"next")
        return len(sock.recv_multipart())
    finally:
        ctx.destroy(linger=0)


def test_the_daemon_records_under_the_units_confinement(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess],
) -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    data = tmp_path / "data"
    plain, live = unique_name("plain").replace("-", "_"), unique_name("live").replace("-", "_")
    config = tmp_path / "runs.yaml"
    config.write_text(f"""
runs:
  - name: plain
    snapshot: {{snapshot_name: {plain}, pv_uri_list: [pva://SIM:AI:DOUBLE:1,
                pva://SIM:WF:FLOAT:2], time_window: 100}}
    output: {{directory: {data}/plain, flush_interval_s: 0.3}}
  - name: live
    snapshot: {{snapshot_name: {live}, pv_uri_list: [pva://SIM:AI:DOUBLE:3], time_window: 100}}
    output: {{directory: {data}/live, flush_interval_s: 0.3, bridge: {{rep: 0}}}}
""")
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config,
                            extra={"HOME": "/nonexistent"})
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemon = DaemonProcess(denv, wrap=confined, umask=0o027)
        daemons.append(daemon)

        def endpoint() -> str | None:
            if daemon.proc.poll() is not None:  # killed by what the sandbox refused
                raise AssertionError(f"the daemon exited ({daemon.proc.returncode}):\n"
                                     + daemon.log_text()[-3000:])
            return _bridge_rep(admin, "live")

        rep = wait_for(endpoint, 60, "the bridge's endpoint in the status document")
        assert _one_train(rep) >= 2
        wait_for(lambda: min(complete_iterations(admin, r) for r in ("plain", "live")) >= 5,
                 60, "both runs recording")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(90) == 0, daemon.log_text()[-3000:]
    log = daemon.log_text()
    assert "Operation not permitted" not in log, log[-3000:]
    assert partial_files(data) == []
    files = h5_files(data)
    assert {p.parent.name for p in files} == {"plain", "live"}
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o440, (path, oct(mode))  # read-only, group-readable (UMask=0027)
        with open_file(path) as f:
            assert f.status == "complete"
