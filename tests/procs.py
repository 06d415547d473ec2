"""Processes seen from ``/proc``, for tests that watch a daemon's children."""

from __future__ import annotations

from pathlib import Path


def child_pids(pid: int, marker: bytes) -> list[int]:
    """Child processes of ``pid`` whose command line holds ``marker`` (from ``/proc``)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and marker in cmd:
            out.append(int(entry.name))
    return out
