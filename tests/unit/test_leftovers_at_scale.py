"""The daemon's start after a crash of a daemon with many runs: each run recovers the
``.partial`` its recording left (:mod:`recorder.daemon.leftovers`), in a child process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from recorder.daemon import leftovers

WRITER = r"""
import os, sys
from pathlib import Path
from recorder.client.events import (IterationClosed, IterationOpened, IterationStatus,
    ValuesReceived)
from recorder.client.values import PVSample
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions

rec = HDF5Recording(OutputOptions(directory=Path(sys.argv[1]), flush_interval_s=3600),
                    run_name="r", pv_uris=[f"pva://P{k}" for k in range(5)], start_wall=1.7e9)
for i in range(20):
    rec.handle(IterationOpened("t", "s", i, i))
    rec.handle(ValuesReceived("t", i, 1, 0, tuple(
        PVSample(f"P{k}", {"value": float(i), "timeStamp": {"secondsPastEpoch": i,
                                                          "nanoseconds": k}})
        for k in range(5)), offset=i))
    rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i, offset=i))
rec.flush()
print(rec.current_path, flush=True)
os._exit(0)  # killed: the .partial stays
"""


def _leftovers(directory: Path, count: int) -> list[Path]:
    """``count`` ``.partial`` files a killed writer left (copies of one, named apart)."""
    got = subprocess.run([sys.executable, "-c", WRITER, str(directory)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert got.returncode == 0, got.stderr
    first = Path(got.stdout.split()[-1])
    out = []
    for k in range(count):
        path = directory / f"run{k:03d}_0000.h5.partial"
        shutil.copyfile(first, path)
        out.append(path)
    first.unlink()
    return out


def _recovery_children() -> int:
    """This process's children that recover a leftover."""
    me, count = str(os.getpid()), 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == me and b"recorder.daemon.leftovers" in cmd:
            count += 1
    return count


@pytest.mark.slow
def test_many_runs_recovering_their_leftovers_at_once_take_turns(tmp_path: Path) -> None:
    """A daemon of 200 runs killed: at the next start every run's worker recovered its
    leftover at once, each in a child process that imports h5py (~35 MB, ~0.4 s of CPU):
    200 processes and ~7 GB at once (50 measured: 1.8 GB), sharing 2 cores, every one
    of them done only at the end, and each one's deadline running while it waited for the
    CPU, so large leftovers all passed it and were all left .partial. They now take turns
    (:data:`~recorder.daemon.leftovers.MAX_RECOVERING` at once), each deadline counted
    from its own start."""
    count = leftovers.MAX_RECOVERING * 4
    partials = _leftovers(tmp_path, count)
    results: dict[Path, Path | None] = {}
    threads = [threading.Thread(target=lambda p=p: results.__setitem__(
        p, leftovers.finalize_leftover(p, p.name, timeout_s=120)), daemon=True)
        for p in partials]
    for thread in threads:
        thread.start()
    most = 0
    deadline = time.monotonic() + 240
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        most = max(most, _recovery_children())
        time.sleep(0.05)
    for thread in threads:
        thread.join(1)
    assert all(not t.is_alive() for t in threads)
    assert most <= leftovers.MAX_RECOVERING, f"{most} recoveries ran at once"
    assert sorted(results) == partials
    assert all(results[p] == p.with_name(p.name.removesuffix(".partial")) for p in partials)
    assert not any(p.exists() for p in partials)
