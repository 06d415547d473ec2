"""Run a command the way systemd/k2eg-recorder.service confines the daemon, as far as a test
can without systemd: its ``SystemCallFilter=`` (allow list, errors EPERM) and
``RestrictAddressFamilies=`` (EAFNOSUPPORT), applied with libseccomp, and
``MemoryDenyWriteExecute=`` (``PR_SET_MDWE`` where the kernel has it). The sets come from the
unit file and this machine's ``systemd-analyze syscall-filter``."""

from __future__ import annotations

import ctypes.util
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "k2eg-recorder.service"


def unavailable() -> str | None:
    """Why commands cannot be confined here, or None."""
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze is not installed"
    if ctypes.util.find_library("seccomp") is None:
        return "libseccomp is not installed"
    return None


def directives(text: str) -> list[tuple[str, str, str]]:
    """The unit's ``(section, key, value)`` lines, in order."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def service_values(text: str, key: str) -> list[str]:
    """The values of ``key=`` in the unit's [Service] section, in order."""
    return [v for s, k, v in directives(text) if s == "Service" and k == key]


def syscall_group(name: str) -> set[str]:
    """The system calls of ``@group`` (nested groups expanded), as this systemd knows it."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    calls: set[str] = set()
    for raw in out.splitlines()[1:]:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        calls |= syscall_group(line) if line.startswith("@") else {line}
    return calls


def syscall_allow_list(text: str) -> set[str]:
    """The system calls the unit's ``SystemCallFilter=`` lines allow (systemd's rules: the
    first line, an allow list, sets it; later lines add to it, ``~`` lines take away)."""
    allowed: set[str] = set()
    for value in service_values(text, "SystemCallFilter"):
        deny = value.startswith("~")
        calls: set[str] = set()
        for item in value.lstrip("~").split():
            calls |= syscall_group(item) if item.startswith("@") else {item}
        allowed = allowed - calls if deny else allowed | calls
    return allowed


_CONFINE = """
import ctypes, errno, json, os, sys
calls, families, mdwe = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
if mdwe and libc.prctl(65, 1, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
    sys.exit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))   # EINVAL: kernel < 6.3
lib = ctypes.CDLL("libseccomp.so.2")
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
class Cmp(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                       ctypes.c_uint, ctypes.POINTER(Cmp)]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ALLOW, EQ = 0x7FFF0000, 4
def errno_action(value):
    return 0x00050000 | value
ctx = lib.seccomp_init(errno_action(errno.EPERM))        # SystemCallErrorNumber=EPERM
def rule(action, name, family=None):
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        return
    cmp = Cmp(0, EQ, family or 0, 0)
    count = 0 if family is None else 1
    assert lib.seccomp_rule_add_array(ctx, action, nr, count, ctypes.byref(cmp)) == 0, name
for name in calls:
    if name != "socket":
        rule(ALLOW, name)
if "socket" in calls:                                     # RestrictAddressFamilies=
    for family in range(64):
        rule(ALLOW if family in families else errno_action(errno.EAFNOSUPPORT), "socket",
             family)
assert lib.seccomp_load(ctx) == 0
os.execv(sys.argv[2], sys.argv[2:])
"""


def confined(argv: list[str], unit: Path = UNIT) -> list[str]:
    """``argv`` (an absolute executable first) to run under the unit's confinement."""
    text = unit.read_text()
    calls = sorted(syscall_allow_list(text))
    (families,) = service_values(text, "RestrictAddressFamilies")
    numbers = [int(getattr(socket, name)) for name in families.split()]
    mdwe = service_values(text, "MemoryDenyWriteExecute") == ["yes"]
    return [sys.executable, "-c", _CONFINE, json.dumps([calls, numbers, mdwe]), *argv]
