"""The daemon's start after a crash of a daemon with many runs: each run recovers the
``.partial`` its recording left (:mod:`recorder.daemon.leftovers`), in a child process."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import structlog.testing
from procs import child_pids

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
        most = max(most, len(child_pids(os.getpid(), b"recorder.daemon.leftovers")))
        time.sleep(0.05)
    for thread in threads:
        thread.join(1)
    assert all(not t.is_alive() for t in threads)
    assert most <= leftovers.MAX_RECOVERING, f"{most} recoveries ran at once"
    assert sorted(results) == partials
    assert all(results[p] == p.with_name(p.name.removesuffix(".partial")) for p in partials)
    assert not any(p.exists() for p in partials)


def test_a_recovery_waiting_for_its_turn_says_so_and_its_deadline_allows_for_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a crash of many runs, a run whose leftover waits for a place among the
    MAX_RECOVERING recoveries said nothing: its recording resumed minutes later, looking hung
    meanwhile. And the deadline's allowance per byte (1 s per 50 MB) was above what recovery
    manages (~35 MB/s measured for gzip waveforms): now 1 s per 20 MB."""
    assert leftovers.LEFTOVER_BYTES_PER_S <= 20e6
    (partial,) = _leftovers(tmp_path, 1)
    size = partial.stat().st_size
    deadlines: list[float] = []
    real_popen = subprocess.Popen

    class Popen(real_popen):  # type: ignore[misc,valid-type]
        def communicate(self, *args: object, timeout: float | None = None) -> object:
            deadlines.append(timeout or 0.0)
            return super().communicate(*args, timeout=timeout)

    monkeypatch.setattr(leftovers.subprocess, "Popen", Popen)
    taken = 0
    while leftovers._TURNS.acquire(blocking=False):  # every place taken
        taken += 1
    assert taken == leftovers.MAX_RECOVERING
    result: list[Path | None] = []
    with structlog.testing.capture_logs() as logs:
        thread = threading.Thread(target=lambda: result.append(
            leftovers.finalize_leftover(partial, "r", timeout_s=100)), daemon=True)
        try:
            thread.start()
            deadline = time.monotonic() + 10
            while not logs and time.monotonic() < deadline:
                time.sleep(0.01)
            assert thread.is_alive() and not result  # waiting
        finally:
            for _ in range(taken):
                leftovers._TURNS.release()
        thread.join(120)
    assert [e["event"] for e in logs][:1] == ["leftover recovery waits its turn"]
    assert logs[0]["path"] == str(partial)
    assert result == [partial.with_name(partial.name.removesuffix(".partial"))]
    assert deadlines == [pytest.approx(100 + size / 20e6)]


DAEMON = r"""
import sys
from pathlib import Path
from recorder.daemon import leftovers
leftovers.superblock_bytes = lambda path: b""  # not of a FIFO
leftovers.finalize_leftover(Path(sys.argv[1]), "r", timeout_s=600)
"""


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_a_recovery_does_not_outlive_its_daemon_killed_while_it_ran(tmp_path: Path) -> None:
    """The daemon killed (kill -9) again while it recovered a leftover at its start: the
    recovery process (which ignores SIGTERM, SIGINT and SIGHUP) went on alone, holding the
    leftover's lock, for as long as a large file takes. The daemon started next found the
    file busy, gave up after 5 s ("could not recover a leftover file") and resumed from the
    state file, before what the file held (iterations recorded twice), and the file that
    recovery finalized later was never told of. The recovery now ends with its daemon;
    the next start recovers the file again."""
    import signal

    partial = tmp_path / "r_0000.h5.partial"
    os.mkfifo(partial)  # opening it blocks: a recovery that takes its time
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON, str(partial)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (child := child_pids(daemon.pid, b"recorder.daemon.leftovers")):
            assert daemon.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        daemon.kill()
        daemon.wait(10)
        deadline = time.monotonic() + 10
        while not _gone(child[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(child[0]), "the recovery outlived the daemon that started it"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        for pid in child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
