"""The live writer's memory does not grow with the length of a recording.

Measured in a fresh process (RSS from /proc), writing a real live file. The writer appends 1.2 M
scalar values; RSS at 0.2 M and at 1.2 M values is compared. With HDF5 2.0's default chunk
cache (8 MiB per dataset) the caches of the growing sample columns filled up over that
stretch: +64 MB. With the writer's 1 MiB cache (recorder.sinks.hdf5.LIVE_CHUNK_CACHE) it
grew by +4 MB. benchmarks/bench_sink_memory.py follows a writer over 100 M values.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

WRITE = textwrap.dedent("""
    import sys
    from pathlib import Path
    import logging, structlog
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    from recorder.client.events import (IterationClosed, IterationOpened, IterationStatus,
                                        ValuesReceived)
    from recorder.client.values import PVSample
    from recorder.sinks import hdf5 as hdf5_module
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions

    directory, cache = Path(sys.argv[1]), sys.argv[2]
    if cache != "default":
        hdf5_module.LIVE_CHUNK_CACHE = int(cache)
    n_pvs = 400
    rec = HDF5Recording(OutputOptions(directory=directory), run_name="mem",
                        pv_uris=[f"pva://P{p}" for p in range(n_pvs)])

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    samples = tuple(PVSample(f"P{p}", {"value": 1.5 + p, "timeStamp": {
        "secondsPastEpoch": 1_700_000_000, "nanoseconds": p}}) for p in range(n_pvs))
    marks = []
    for i in range(1, 3001):
        rec.handle(IterationOpened("t", "s", i, i))
        rec.handle(ValuesReceived("t", i, 1, 1, samples))
        rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i))
        if i % 100 == 0:
            rec.flush()
        if i in (500, 3000):
            marks.append(rss())
    assert rec.status == "recording", rec.reason
    print(marks[0], marks[1])
    sys.stdout.flush()
    import os
    os._exit(0)  # left live: the finalize is not what is measured
""")


def _growth(tmp_path: Path, cache: str) -> int:
    d = tmp_path / cache
    d.mkdir()
    out = subprocess.run([sys.executable, "-c", WRITE, str(d), cache], check=True,
                         capture_output=True, text=True, timeout=300)
    first, last = (int(x) for x in out.stdout.split()[-2:])
    return last - first


@pytest.mark.slow
def test_live_writer_memory_does_not_grow_with_recording_length(tmp_path: Path) -> None:
    grown = _growth(tmp_path, "default")  # the writer as shipped
    assert grown < 24 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MB over 1 M values"
    # the same with HDF5's own default shows what the check guards against
    unbounded = _growth(tmp_path, str(8 * 1024 * 1024))
    assert unbounded > grown + 24 * 1024 * 1024, (grown, unbounded)
