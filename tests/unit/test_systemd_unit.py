"""The systemd unit: `systemd-analyze verify` clean, security score gate, project rules; the
example environment file documents every RECORDER_* setting."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from systemd_sandbox import directives

from recorder.config.daemon import DaemonSettings
from recorder.settings import KafkaSettings

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "k2eg-recorder.service"
VERIFY_UNIT = ROOT / "systemd" / "k2eg-recorder-verify.service"
VERIFY_TIMER = ROOT / "systemd" / "k2eg-recorder-verify.timer"
ENV_EXAMPLE = ROOT / "systemd" / "recorder.env.example"
SECURITY_THRESHOLD = 20  # x10 scale: exposure must stay <= 2.0 ("OK"); it is 1.4 today

needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def get(text: str, section: str, key: str) -> list[str]:
    return [v for s, k, v in directives(text) if s == section and k == key]


def unit_copy(tmp_path: Path, text: str | None = None, unit: Path = UNIT) -> Path:
    """The unit with ExecStart pointing at a binary that exists here (verify checks it)."""
    text = unit.read_text() if text is None else text
    script = Path(sys.executable).parent / "k2eg-recorder"  # the venv's console script
    binary = script if script.exists() else Path(sys.executable)
    text = re.sub(
        r"^ExecStart=/usr/bin/k2eg-recorder",
        f"ExecStart={binary}",
        text,
        flags=re.MULTILINE,
    )
    path = tmp_path / unit.name
    path.write_text(text)
    return path


def verify(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@needs_systemd
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    result = verify(unit_copy(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@needs_systemd
def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    # verify exits 0 on unknown keys and only warns: the stderr check above is what matters
    broken = UNIT.read_text().replace("WatchdogSec=", "WatchdogSecs=")
    result = verify(unit_copy(tmp_path, broken))
    assert "WatchdogSecs" in result.stderr


@needs_systemd
@pytest.mark.parametrize("unit", [UNIT, VERIFY_UNIT], ids=lambda u: u.name)
def test_security_exposure_gate(tmp_path: Path, unit: Path) -> None:
    result = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            f"--threshold={SECURITY_THRESHOLD}",
            str(unit_copy(tmp_path, unit=unit)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


@needs_systemd
def test_the_nightly_verify_units_are_clean(tmp_path: Path) -> None:
    service = unit_copy(tmp_path, unit=VERIFY_UNIT)
    timer = tmp_path / VERIFY_TIMER.name
    timer.write_text(VERIFY_TIMER.read_text())
    result = verify(service, timer)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_the_nightly_verify_reads_only() -> None:
    text = VERIFY_UNIT.read_text()
    s = "Service"
    assert get(text, s, "Type") == ["oneshot"]
    (exec_start,) = get(text, s, "ExecStart")
    assert exec_start.startswith("/usr/bin/k2eg-recorder verify ") and "--data" in exec_start
    assert get(text, s, "User") == get(text, s, "Group") == ["k2eg-recorder"]
    assert get(text, s, "ProtectSystem") == ["strict"] and not get(text, s, "ReadWritePaths")
    assert get(text, s, "PrivateNetwork") == ["yes"]
    assert get(text, s, "IOSchedulingClass") == ["idle"]
    # the same run definitions as the daemon: the directories it checks are the ones written
    # (the daemon's default path, and RECORDER_CONFIG_PATH from the same environment file)
    from recorder.config.daemon import DaemonSettings

    (config,) = [v for v in get(text, s, "Environment") if v.startswith("RECORDER_CONFIG_PATH=")]
    default = DaemonSettings.model_fields["config_path"].default
    assert config.split("=", 1)[1] == str(default)
    assert "--config" not in get(UNIT.read_text(), s, "ExecStart")[0]
    assert get(text, s, "EnvironmentFile") == get(UNIT.read_text(), s, "EnvironmentFile")
    timer = VERIFY_TIMER.read_text()
    assert get(timer, "Timer", "Unit") == [VERIFY_UNIT.name]
    assert get(timer, "Timer", "Persistent") == ["true"]
    assert get(timer, "Install", "WantedBy") == ["timers.target"]


def test_project_rules() -> None:
    text = UNIT.read_text()
    s = "Service"
    assert get(text, s, "Type") == ["notify"]
    assert get(text, s, "NotifyAccess") == ["main"]
    assert get(text, s, "Restart") == ["on-failure"]
    # invalid run definitions or Kafka settings: no restart loop (the daemon's exit code)
    from recorder.service import EXIT_CONFIG
    assert get(text, s, "RestartPreventExitStatus") == [str(EXIT_CONFIG)]
    assert get(text, s, "User") == ["k2eg-recorder"]
    assert get(text, s, "Group") == ["k2eg-recorder"]
    assert get(text, s, "DynamicUser") == []  # data must stay readable by analysts
    assert get(text, s, "UMask") == ["0027"]
    assert get(text, s, "ProtectSystem") == ["strict"]
    assert get(text, s, "ReadWritePaths") == ["/data/k2eg-recorder"]
    assert get(text, s, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert get(text, s, "ExecStart") == [
        "/usr/bin/k2eg-recorder run"  # the run definitions: RECORDER_CONFIG_PATH, as validate
    ]
    assert get(text, s, "EnvironmentFile") == ["-/etc/k2eg-recorder/recorder.env"]
    assert "PYTHONUNBUFFERED=1" in get(text, s, "Environment")
    assert "MALLOC_ARENA_MAX=2" in get(text, s, "Environment")
    assert get(text, s, "SyslogIdentifier") == ["k2eg-recorder"]
    assert get(text, s, "CapabilityBoundingSet") == [""]
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "LockPersonality",
    ):
        assert get(text, s, key) == ["yes"], key
    watchdog = _seconds(get(text, s, "WatchdogSec")[0])
    assert 10 <= watchdog <= 120
    # stopping must outlast the daemon's own shutdown budget (final flushes)
    stop = _seconds(get(text, s, "TimeoutStopSec")[0])
    assert stop > DaemonSettings.model_fields["shutdown_timeout_s"].default
    assert get(text, "Install", "WantedBy") == ["multi-user.target"]
    # ~4 descriptors per run's writer: the default soft limit (1024) ends at ~240 runs
    assert int(get(text, s, "LimitNOFILE")[0]) >= 8192


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


def test_env_example_documents_every_setting() -> None:
    text = ENV_EXAMPLE.read_text()
    names = set(re.findall(r"^#?(RECORDER_[A-Z0-9_]+)=", text, flags=re.MULTILINE))
    fields = {f"RECORDER_{n.upper()}" for n in KafkaSettings.model_fields if n != "kafka"}
    fields |= {f"RECORDER_{n.upper()}" for n in DaemonSettings.model_fields}
    fields |= {"RECORDER_STATE_DIR"}  # read by recorder.service.default_state_dir
    assert fields - names == set(), "settings missing from recorder.env.example"
    unknown = {n for n in names - fields if not n.startswith("RECORDER_KAFKA__")}
    assert unknown == set(), "recorder.env.example names settings that do not exist"
    for option in (
        "RECORDER_KAFKA__SASL__MECHANISM",
        "RECORDER_KAFKA__SECURITY__PROTOCOL",
        "RECORDER_KAFKA__SASL__PASSWORD",
        "RECORDER_KAFKA__SSL__CA__LOCATION",
    ):
        assert option in names
    for line in text.splitlines():  # systemd EnvironmentFile syntax: KEY=value, no 'export'
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*=\S*", line), line


def test_env_example_values_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("RECORDER_"):
            monkeypatch.delenv(key)
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?(RECORDER_[A-Z0-9_]+)=(\S*)", line)
        if match and not match[1].startswith("RECORDER_KAFKA__") and match[2]:
            monkeypatch.setenv(match[1], match[2])
    DaemonSettings()
    KafkaSettings.from_env()


def test_every_daemon_setting_the_env_example_documents_is_read() -> None:
    """RECORDER_ADMIN_GROUP_ID was documented ("consumer group for the admin topic") but
    read by nothing: the admin topic is read without a consumer group (decision 0003), so an
    operator who set it (for an ACL, or to find the daemon in the group listing) got no
    effect and no word about it. A DaemonSettings field must be read outside its module,
    directly or through a DaemonSettings method or property that is."""
    import ast

    module = ROOT / "recorder" / "config" / "daemon.py"
    sources = "\n".join(p.read_text() for p in (ROOT / "recorder").rglob("*.py") if p != module)
    read = {name for name in DaemonSettings.model_fields if re.search(rf"\.{name}\b", sources)}
    (cls,) = [n for n in ast.walk(ast.parse(module.read_text()))
              if isinstance(n, ast.ClassDef) and n.name == "DaemonSettings"]
    helpers = {f.name: {a.attr for a in ast.walk(f) if isinstance(a, ast.Attribute)
                        and isinstance(a.value, ast.Name) and a.value.id == "self"}
               for f in cls.body if isinstance(f, ast.FunctionDef)}
    used = {name for name in helpers if re.search(rf"\.{name}\b", sources)}
    while used:  # a helper used outside reads its fields, and the helpers it calls
        name = used.pop()
        for attr in helpers.pop(name, set()):
            read.add(attr)
            if attr in helpers:
                used.add(attr)
    unread = set(DaemonSettings.model_fields) - read
    assert unread == set(), "settings documented in recorder.env.example that nothing reads"


# ---------------------------------------------------------------- the system call filter
def run_under_unit_filter(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a Python child under the unit's system call filter, address families and
    MemoryDenyWriteExecute (tests/systemd_sandbox.py)."""
    from systemd_sandbox import confined, unavailable

    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    return subprocess.run(confined([sys.executable, "-c", code]), capture_output=True,
                          text=True, timeout=60, check=False)


@needs_systemd
def test_the_live_bridge_runs_under_the_units_syscall_filter() -> None:
    # libzmq aborts the process when a call it needs is refused: its I/O threads set their
    # scheduling policy (sched_setscheduler, in ~@resources), and a bind to an address (the
    # bridge's `rep: PORT` is tcp://127.0.0.1:PORT) lists the interfaces (getifaddrs: an
    # AF_NETLINK socket); either killed a daemon with a run with a `bridge:`
    pytest.importorskip("zmq")
    result = run_under_unit_filter(
        "import zmq\n"
        "ctx = zmq.Context()\n"
        "sock = ctx.socket(zmq.REP)\n"
        "sock.bind('tcp://127.0.0.1:*')\n"
        "pub = ctx.socket(zmq.PUB)\n"
        "pub.bind('tcp://localhost:*')\n"
        "pub.close(linger=0)\n"
        "sock.close(linger=0)\n"
        "ctx.term()\n"
        "print('bridge sockets work')\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bridge sockets work" in result.stdout


@needs_systemd
def test_the_units_syscall_filter_still_refuses_what_it_should() -> None:
    # the filter is applied at all (so the test above proves something)
    result = run_under_unit_filter(
        "import os\n"
        "try:\n"
        "    os.setpriority(os.PRIO_PROCESS, 0, 5)\n"
        "except PermissionError:\n"
        "    print('refused')\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "refused"


@needs_systemd
def test_the_units_address_families_are_applied() -> None:
    result = run_under_unit_filter(
        "import socket\n"
        "try:\n"
        "    socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
        "except OSError as exc:\n"
        "    print(exc.errno == 97)\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "True"


@needs_systemd
def test_the_units_memory_deny_write_execute_is_applied() -> None:
    result = run_under_unit_filter(
        "import ctypes, mmap\n"
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "except OSError:\n"
        "    print('refused')\n"
        "else:\n"
        "    libc = ctypes.CDLL(None)\n"
        "    print('no MDWE' if libc.prctl(66, 0, 0, 0, 0) < 0 else 'allowed')\n")
    assert result.returncode == 0, result.stderr[-2000:]
    if result.stdout.strip() == "no MDWE":
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert result.stdout.strip() == "refused"
