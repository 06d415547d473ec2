"""Several daemons on one Kafka cluster that share the admin topic (the default one).

Each daemon reads every command: a ``start a`` for a run only daemon A has is answered ``ok``
by A and ``unknown_run`` by B. The CLI must not take whichever reply comes first: it reads the
others for a moment, exits as the ``ok`` had been the only reply, and says on stderr which
daemon answered what, and that each daemon wants its own admin topic.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon_support import DaemonEnv, DaemonProcess, cli, run_state, simulator, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _yaml(run: str, snapshot: str, data: Path) -> str:
    return f"""
runs:
  - name: {run}
    autostart: false
    snapshot:
      snapshot_name: {snapshot}
      pv_uri_list: [pva://SIM:AI:DOUBLE:1]
      time_window: 100
    output: {{directory: {data}/{run}, flush_interval_s: 0.3}}
"""


def _shared_default_admin(env: DaemonEnv) -> DaemonEnv:
    """``env`` with the default admin and reply topics (RECORDER_ADMIN_TOPIC and
    RECORDER_ADMIN_REPLY_TOPIC unset), as two daemons installed side by side have them."""
    env.admin_topic, env.reply_topic = "k2eg-recorder-admin", "k2eg-recorder-admin-reply"
    return env


def test_two_daemons_on_the_default_admin_topic_each_start_exits_0_with_a_warning(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess],
) -> None:
    token = unique_name("m").replace("-", "_")
    envs: list[DaemonEnv] = []
    for name in ("alpha", "beta"):
        home = tmp_path / name
        home.mkdir()
        config = home / "runs.yaml"
        config.write_text(_yaml(name, f"{name}_{token}", tmp_path / "data"))
        env = _shared_default_admin(DaemonEnv.in_dir(home, kafka_bootstrap, unique_name, config))
        env.app = unique_name(f"rec-{name}")  # its RECORDER_INSTANCE too
        envs.append(env)
    alpha, beta = envs
    beta.cmd_topic = alpha.cmd_topic  # one gateway
    with simulator(alpha.bootstrap, alpha.cmd_topic), alpha.admin() as admin:
        for env, name in ((alpha, "alpha"), (beta, "beta")):
            daemons.append(DaemonProcess(env, name))
        # both daemons answer (each status names its own instance)
        for name in ("alpha", "beta"):
            wait_for(lambda n=name: (s := run_state(admin, n)) is not None and s, 60,
                     f"the daemon of run {name} to answer")
        for env, name in ((alpha, "alpha"), (beta, "beta")):
            out = cli(env, "start", name)
            assert out.returncode == 0, out
            assert f"ok: run '{name}'" in out.stdout, out
            other = beta if env is alpha else alpha
            assert f"{env.app}: ok " in out.stderr, out
            assert f"{other.app}: unknown_run no run named '{name}'" in out.stderr, out
            assert "RECORDER_ADMIN_TOPIC" in out.stderr, out
        for name in ("alpha", "beta"):
            wait_for(lambda n=name: (s := run_state(admin, n)) and s["state"] == "recording",
                     30, f"run {name} to record")
    for daemon in daemons:
        daemon.signal(signal.SIGTERM)
    for daemon in daemons:
        assert daemon.wait(60) == 0, daemon.log_text()[-3000:]


def test_a_second_daemon_on_the_same_state_directory_refuses_to_start(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess],
) -> None:
    """Two daemons on one host given the same state directory (a copied unit keeps
    ``StateDirectory=k2eg-recorder``): each saved its admin position over the other's (so
    a restarted daemon read its admin topic from the end: commands sent while it was down
    were lost), took the other's runs for orphaned leftovers, and a run of the same name
    resumed the other's recording. The second now refuses to start (exit 2) and says why."""
    token = unique_name("s").replace("-", "_")
    envs = []
    for name in ("alpha", "beta"):
        home = tmp_path / name
        home.mkdir()
        config = home / "runs.yaml"
        config.write_text(_yaml(name, f"{name}_{token}", tmp_path / "data"))
        env = DaemonEnv.in_dir(home, kafka_bootstrap, unique_name, config)
        env.app = unique_name(f"rec-{name}")
        env.state_dir = tmp_path / "state"  # shared
        envs.append(env)
    alpha, beta = envs
    with alpha.admin() as admin:
        first = DaemonProcess(alpha, "alpha")
        daemons.append(first)
        wait_for(lambda: run_state(admin, "alpha") is not None, 60, "the first daemon")
        second = DaemonProcess(beta, "beta")
        daemons.append(second)
        assert second.wait(60) == 2, second.log_text()[-3000:]
        log = second.log_text()
        assert f"state directory {alpha.state_dir} is used by another daemon" in log, log
        assert "RECORDER_STATE_DIR" in log, log
        assert run_state(admin, "alpha") is not None  # the first goes on
    first.signal(signal.SIGTERM)
    assert first.wait(60) == 0, first.log_text()[-3000:]
