"""What the benchmarks read from ``/proc`` about a process: its ``status`` sizes (VmRSS,
VmHWM, ...) and its CPU time from ``stat``. Linux only; a process that is gone reads as empty."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def status_kb(pid: int | str = "self") -> dict[str, int]:
    """The ``kB`` fields of ``/proc/PID/status`` (VmRSS, VmHWM, ...) and ``Threads``; empty
    if it is gone."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if (len(parts) == 2 and parts[1] == "kB") or (key == "Threads" and parts):
            out[key] = int(parts[0])
    return out


def stat_fields(stat: int | str | Path) -> list[str] | None:
    """The fields of a ``stat`` file (``/proc/PID/stat`` for a PID, or the path of a
    process's or a thread's) after the command name (field 3 = index 0); None if it is
    gone."""
    path = stat if isinstance(stat, Path) else Path(f"/proc/{stat}/stat")
    try:
        text = path.read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def cpu_seconds(fields: Sequence[str]) -> float:
    """utime + stime of :func:`stat_fields`, in seconds."""
    return (int(fields[11]) + int(fields[12])) / CLK_TCK
