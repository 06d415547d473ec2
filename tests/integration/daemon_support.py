"""Helpers for the daemon end-to-end tests: a daemon subprocess, the admin client, what the
simulator published (read raw from Kafka with plain msgpack), and files read back in a
separate process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from confluent_kafka import Consumer, TopicPartition
from procs import child_pids
from prometheus_client.parser import text_string_to_metric_families

from recorder.admin.protocol import AdminReply
from recorder.daemon.adminclient import AdminClient
from recorder.settings import KafkaSettings
from recorder.sim import GatewaySimulator
from recorder.sinks.writelock import writer_active

REPO = Path(__file__).resolve().parents[2]


def environ_without_recorder() -> dict[str, str]:
    """This process's environment without any ``RECORDER_*`` setting (a child sees only
    what a test gives it)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RECORDER_")}


@dataclass
class DaemonEnv:
    bootstrap: str
    cmd_topic: str
    app: str
    admin_topic: str
    reply_topic: str
    status_topic: str
    state_dir: Path
    config: Path
    log_dir: Path
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def in_dir(cls, tmp_path: Path, bootstrap: str, unique_name: Callable[[str], str],
               config: Path, extra: dict[str, str] | None = None) -> DaemonEnv:
        """A daemon with topics of its own, its state and logs under ``tmp_path``."""
        logs = tmp_path / "logs"
        logs.mkdir(exist_ok=True)
        return cls(
            bootstrap=bootstrap, cmd_topic=unique_name("cmd"), app=unique_name("rec"),
            admin_topic=unique_name("admin"), reply_topic=unique_name("reply"),
            status_topic=unique_name("status"), state_dir=tmp_path / "state", config=config,
            log_dir=logs, extra=dict(extra or {}),
        )

    def environ(self) -> dict[str, str]:
        env = environ_without_recorder()
        env.update({
            "RECORDER_BOOTSTRAP_SERVERS": self.bootstrap,
            "RECORDER_CMD_TOPIC": self.cmd_topic,
            "RECORDER_APP_NAME": self.app,
            "RECORDER_ADMIN_TOPIC": self.admin_topic,
            "RECORDER_ADMIN_REPLY_TOPIC": self.reply_topic,
            "RECORDER_STATUS_TOPIC": self.status_topic,
            "RECORDER_STATE_DIR": str(self.state_dir),
            "RECORDER_INSTANCE": self.app,
            "RECORDER_HEARTBEAT_INTERVAL_S": "0.5",
            "RECORDER_COMMAND_TIMEOUT_S": "3",
            "RECORDER_SHUTDOWN_TIMEOUT_S": "30",
            "RECORDER_LOG_FORMAT": "json",
            # the disks are checked, but this machine's free space never fails a test
            # (test_daemon_disks.py sets its own minimum)
            "RECORDER_DISK_MIN_FREE": "0",
            "RECORDER_DISK_FULL_WARNING_S": "0",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra)
        return env

    def kafka(self) -> KafkaSettings:
        return KafkaSettings.from_env({}, bootstrap_servers=self.bootstrap,
                                      cmd_topic=self.cmd_topic, app_name=f"{self.app}-test")

    def admin(self) -> AdminClient:
        return AdminClient(self.kafka(), self.admin_topic, self.reply_topic)


class DaemonProcess:
    """``python -m recorder.cli run`` as a child process, killed by PID in teardown (``wrap``:
    the command line to run it under, given its own)."""

    def __init__(self, env: DaemonEnv, name: str = "daemon",
                 wrap: Callable[[list[str]], list[str]] | None = None, umask: int = -1) -> None:
        self.env = env
        self.log_path = env.log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        argv = [sys.executable, "-m", "recorder.cli", "run", "--config", str(env.config)]
        self.proc = subprocess.Popen(
            argv if wrap is None else wrap(argv),
            stdout=self._log, stderr=subprocess.STDOUT, env=env.environ(), cwd=REPO,
            start_new_session=True, umask=umask,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signum)

    def wait(self, timeout: float) -> int:
        """The exit code; when the daemon has not exited in ``timeout``, every thread's
        stack of it and its writers (SIGUSR1) is in :meth:`log_text` before this raises."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGUSR1)
            time.sleep(1.0)
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def status(admin: AdminClient, timeout: float = 5.0) -> dict[str, Any] | None:
    """The daemon's status document, or None when it does not answer (yet)."""
    try:
        reply = admin.request("status", timeout_s=timeout)
    except Exception:
        return None
    return dict(reply.data or {}) if reply.ok else None


def run_state(admin: AdminClient, run: str) -> dict[str, Any] | None:
    doc = status(admin)
    if doc is None:
        return None
    result: dict[str, Any] | None = doc.get("runs", {}).get(run)
    return result


def cli(env: DaemonEnv, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``k2eg-recorder ARGS`` in a child process, configured as the daemon of ``env`` is."""
    return subprocess.run([sys.executable, "-m", "recorder.cli", *args], capture_output=True,
                          text=True, env=env.environ(), cwd=REPO, timeout=timeout, check=False)


def complete_iterations(admin: AdminClient, run: str) -> int:
    """The run's count of complete iterations from the daemon's status (0 without one)."""
    state = run_state(admin, run) or {}
    return int(state.get("iterations", {}).get("complete", 0))


def request(admin: AdminClient, command: str, run: str | None = None,
            tags: dict[str, str] | None = None, timeout: float = 60.0) -> AdminReply:
    return admin.request(command, run, tags, timeout_s=timeout)


# ---------------------------------------------------------------- the metrics endpoint
METRIC_PREFIX = "k2eg_recorder_"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of the daemon's /metrics (plain HTTP: it answers while Kafka is down)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((METRIC_PREFIX + name, frozenset(labels.items())))


# ---------------------------------------------------------------- what was published
@dataclass
class Published:
    """The snapshot topic decoded with plain msgpack (independent of the daemon's decoder).

    A data message whose bytes repeat an earlier one of its iteration is a producer retry (the
    simulator's producer, as the gateway's, is not idempotent: a request whose reply a cut
    connection lost is sent again), which the daemon drops too: counted in ``duplicates``,
    not in ``data``."""

    data: dict[int, dict[str, list[Any]]] = field(default_factory=dict)  # iter -> pv -> values
    tails: set[int] = field(default_factory=set)
    headers: set[int] = field(default_factory=set)
    offsets: dict[int, int] = field(default_factory=dict)  # iter -> offset of its tail
    duplicates: int = 0


def topic_messages(bootstrap: str, topic: str, group: str, timeout: float = 10.0
                   ) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(message, its plain-msgpack decoding) of everything ``topic`` holds now, every
    partition from offset 0 up to its high watermark, in each partition's order."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        meta = consumer.list_topics(topic, timeout=5)
        parts = list(meta.topics[topic].partitions)
        highs = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
                 for p in parts}
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        positions = dict.fromkeys(parts, 0)
        deadline = time.monotonic() + timeout
        while any(positions[p] < highs[p] for p in parts) and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.2):
                if msg.error():
                    continue
                positions[msg.partition()] = msg.offset() + 1
                yield msg, msgpack.unpackb(msg.value(), raw=False, strict_map_key=False)
    finally:
        consumer.close()


def read_published(bootstrap: str, topic: str, timeout: float = 10.0) -> Published:
    out = Published()
    seen: set[tuple[int, bytes]] = set()
    for msg, obj in topic_messages(bootstrap, topic, f"check-{topic}", timeout):
        kind, it = obj.get("message_type"), obj.get("iter_index")
        if kind == 0:
            out.headers.add(it)
        elif kind == 2:
            out.tails.add(it)
            out.offsets[it] = msg.offset()
        elif kind == 1:
            if (it, msg.value()) in seen:
                out.duplicates += 1
                continue
            seen.add((it, msg.value()))
            for key, value in obj.items():
                if isinstance(value, dict):
                    out.data.setdefault(it, {}).setdefault(key, []).append(value.get("value"))
    return out


# ---------------------------------------------------------------- files, read elsewhere
_READER = textwrap.dedent("""
    import json, os, stat, sys
    from recorder.reader import open_file
    out = []
    for path in sys.argv[1:]:
        with open_file(path) as f:
            its = f.iterations()
            pvs = {}
            for pv in f.pv_names:
                vals = f.values(pv)
                pvs[pv] = {"iters": [int(i) for i in f.iterations_of(pv)],
                           "values": [v.tolist() if hasattr(v, "tolist") else v for v in vals]
                                     if vals.dtype != object else
                                     [v.tolist() if hasattr(v, "tolist") else repr(v)
                                      for v in vals]}
            out.append({
                "path": path,
                "status": f.status,
                "attrs": {k: (v if isinstance(v, (str, int, float, bool)) else str(v))
                          for k, v in f.attrs.items()},
                "writable": bool(os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP
                                                          | stat.S_IWOTH)),
                "iterations": [int(i) for i in its["iter_index"]],
                "iteration_status": [str(s) for s in its["status"]],
                "pvs": pvs,
            })
    json.dump(out, sys.stdout, default=str)
""")


def read_files(paths: list[Path]) -> list[dict[str, Any]]:
    """Read recorded files in a separate Python process (what an analyst would do)."""
    if not paths:
        return []
    result = subprocess.run(
        [sys.executable, "-c", _READER, *map(str, paths)], capture_output=True, text=True,
        cwd=REPO, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    files: list[dict[str, Any]] = json.loads(result.stdout)
    return files


def h5_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.h5"))


def partial_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.partial"))


@contextlib.contextmanager
def simulator(bootstrap: str, cmd_topic: str) -> Iterator[GatewaySimulator]:
    sim = GatewaySimulator(bootstrap, cmd_topic).start()
    try:
        yield sim
    finally:
        sim.stop()


@contextlib.contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[bool]:
    """Mount a tmpfs of ``size`` (``2m``) on ``directory`` (a real ENOSPC when it fills);
    yields whether it could be mounted (needs root), unmounts afterwards. Running as root in
    CI without being able to mount is an error, not a skip."""
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        check=False, capture_output=True,
    ).returncode == 0
    if not mounted and os.geteuid() == 0 and os.environ.get("CI"):
        raise AssertionError("running as root in CI but cannot mount a tmpfs")
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(directory)], check=False, capture_output=True)


def writer_pids(daemon_pid: int) -> list[int]:
    """The daemon's writer processes: its children started by multiprocessing's spawn (not
    multiprocessing's resource tracker, whose command line names multiprocessing too)."""
    return child_pids(daemon_pid, b"spawn_main")


def crash_with_leftover(denv: DaemonEnv, admin: AdminClient, run: str, data: Path,
                        daemons: list[DaemonProcess], *, iterations: int = 8) -> Path:
    """A daemon that records ``run`` for ``iterations``, then is killed (SIGKILL): the
    ``.partial`` it leaves in ``data``, once its writer process has ended."""
    first = DaemonProcess(denv, "first")
    daemons.append(first)
    wait_for(lambda: complete_iterations(admin, run) >= iterations, 40,
             f"{iterations} iterations")
    first.signal(signal.SIGKILL)
    first.wait(10)
    (leftover,) = partial_files(data)
    # its writer process outlives the daemon a moment, to flush what it had received
    wait_for(lambda: writer_active(leftover) is False, 20, "the writer process to end")
    return leftover
