"""A recording of many segment files (one-minute segments for days): reading it keeps few
files open at once, so neither the file descriptors (ulimit -n: 1024 by default) nor the
memory (an open HDF5 file holds its caches) grow with the number of segments."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from test_catalog_ls import record

from recorder.reader import OPEN_FILES_KEPT, open_recording

SEGMENTS = 150


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return record(tmp_path_factory.mktemp("many"), "long", 1.7e9, SEGMENTS, segment_every=1)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_reading_a_recording_keeps_few_of_its_files_open(many: list[Path]) -> None:
    assert len(many) == SEGMENTS and OPEN_FILES_KEPT < SEGMENTS - 50
    before = _open_fds()
    with open_recording(many[0].parent) as rec:
        assert len(rec.files) == SEGMENTS
        assert rec.values("long:X").tolist() == [float(i) for i in range(1, SEGMENTS + 1)]
        table = rec.table()
        assert table["segment"].tolist() == list(range(SEGMENTS))
        assert len(list(rec.trains())) == SEGMENTS
        assert _open_fds() - before <= OPEN_FILES_KEPT + 5
    assert _open_fds() <= before


def _low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (SEGMENTS - 30, SEGMENTS - 30))


def test_export_of_more_segments_than_open_files_allowed(many: list[Path]) -> None:
    """With ``ulimit -n`` below the number of segments, export ended in 'cannot open:
    [Errno 24] Too many open files' (exit 1): it opened every segment at once."""
    proc = subprocess.run([sys.executable, "-m", "recorder.cli", "export", str(many[-1])],
                          capture_output=True, text=True, timeout=300, check=False,
                          preexec_fn=_low_limit)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == SEGMENTS + 1
