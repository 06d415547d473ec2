"""Files written by older k2eg-recorder versions (tests/fixtures/format, made by each format's
own writer: see make_fixture.py there) read with today's reader and tools as their own reader
read them."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recorder.reader import open_file, open_recording
from recorder.verify import verify_file

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "format"
VERSIONS = ["1.0", "2.0", "3.0", "4.0", "4.1", "5.0"]
EXPECTED: dict[str, Any] = json.loads((FIXTURES / "expected.json").read_text("utf-8"))


def _plain(x: Any) -> Any:
    """As make_fixture's expected.json holds it (JSON types)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return _plain(x.tolist())
    if isinstance(x, np.generic):
        return _plain(x.item())
    if isinstance(x, bytes):
        return x.decode()
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    return x


def old_file(version: str, directory: Path) -> Path:
    path = directory / f"fx_{version}.h5"
    path.write_bytes(gzip.decompress((FIXTURES / f"format-{version}.h5.gz").read_bytes()))
    path.chmod(0o444)
    return path


@pytest.mark.parametrize("version", VERSIONS)
def test_an_old_file_reads_as_its_own_reader_read_it(version: str, tmp_path: Path) -> None:
    path = old_file(version, tmp_path)
    with open_file(path) as f:
        assert f.attrs["format_version"] == version
        its = f.iterations()
        assert {k: _plain(its[k]) for k in EXPECTED["iterations"]} == EXPECTED["iterations"]
        for pv, expected in EXPECTED["samples"].items():
            assert [_plain(s.data) for s in f.samples(pv)] == expected, pv
        assert f.values("W")[2].tolist() == [0.0, 1.0]
        assert f.user_tags("UT").tolist() == [7, 8, 9]
    rec = open_recording([path])
    assert [_plain(s.data) for s in rec.samples("F32")] == EXPECTED["samples"]["F32"]


@pytest.mark.parametrize("version", VERSIONS)
def test_verify_counts_the_values_of_an_old_file(version: str, tmp_path: Path) -> None:
    """``verify`` says how many values a file holds, older formats included (a 1.x file,
    whose PV groups it does not check, was reported with 0 values)."""
    report = verify_file(old_file(version, tmp_path), data=True)
    assert report.ok, [str(p) for p in report.errors]
    assert report.values == sum(len(v) for v in EXPECTED["samples"].values())


def old_partial(directory: Path) -> Path:
    path = directory / "fx_20261124T091116Z_0000.h5.partial"
    path.write_bytes(gzip.decompress(
        (FIXTURES / "live-1.0-untagged.h5.partial.gz").read_bytes()))
    return path


def test_a_partial_from_before_trigger_tags_is_read_verified_and_recovered(
        tmp_path: Path) -> None:
    """A .partial of the first 1.0 writer (no /live/tags, no n_tags commit column) left by a
    crash: read, verified and recovered as that version did (was: 'damaged: object 'tags'
    doesn't exist' from the reader, inspect and export; verify 'cannot check'; recover
    refused it)."""
    from recorder.sinks.recover import recover_file

    expected = json.loads((FIXTURES / "live-1.0-untagged.json").read_text("utf-8"))["samples"]
    partial = old_partial(tmp_path)
    with open_file(partial) as f:
        assert f.iterations()["iter_index"].tolist() == [0, 1]
        assert _plain(f.iterations()["tags"]) == [{}, {}]
        for pv, samples in expected.items():
            assert [_plain(s.data) for s in f.samples(pv)] == samples, pv
    report = verify_file(partial, data=True)
    assert report.ok, [str(p) for p in report.errors]
    assert report.iterations == 2
    final = recover_file(partial)
    assert not partial.exists()
    with open_file(final) as f:
        its = f.iterations()
        assert its["iter_index"].tolist() == [0, 1, 2]
        assert its["status"].tolist() == ["complete", "complete", "incomplete"]
        for pv, samples in expected.items():
            assert [_plain(s.data) for s in f.samples(pv)] == samples, pv
    report = verify_file(final, data=True)
    assert report.ok, [str(p) for p in report.errors]


def kafka_zstd_file(directory: Path) -> Path:
    path = directory / "kz_20261124T091417Z_0000.h5"
    path.write_bytes(gzip.decompress(
        (FIXTURES / "format-5.1-kafka-zstd.h5.gz").read_bytes()))
    path.chmod(0o444)
    return path


def test_verify_accepts_a_5_1_file_whose_kafka_topic_column_lacks_its_filter_name(
        tmp_path: Path) -> None:
    """5.1 writers before 2026-11-24 05:27 compressed a long /kafka/topic with zstd/blosc2
    without naming the filter (on it, in required_plugins): every reader that has
    hdf5plugin reads it, so verify warns instead of failing such a file (the nightly verify
    reported it broken)."""
    path = kafka_zstd_file(tmp_path)
    report = verify_file(path, data=True)
    assert report.ok, [str(p) for p in report.errors]
    assert any(p.where == "/kafka/topic" for p in report.warnings), report.warnings
    with open_file(path) as f:
        assert f.values("A").tolist() == [float(i) for i in range(40)]


def test_the_daemon_reads_the_kafka_offsets_of_a_5_1_file_without_the_filter_name(
        tmp_path: Path) -> None:
    """The daemon (no hdf5plugin imported) reads the offsets a finalized segment of an
    older writer holds when it resumes its recording (was: none, so the resume read again
    from the state file's older offsets and recorded those iterations twice)."""
    import subprocess
    import sys

    path = kafka_zstd_file(tmp_path)
    got = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from recorder.daemon.leftovers import offsets_in_file; "
         "print(offsets_in_file(Path(sys.argv[1]), sys.argv[2]))", str(path), "topic-x"],
        capture_output=True, text=True, timeout=120, check=False)
    assert got.stdout.strip().splitlines()[-1] == "{0: 119}", got.stdout + got.stderr


def test_the_daemon_reads_those_offsets_with_h5py_before_3_16(tmp_path: Path) -> None:
    """Before h5py 3.16 (pyproject allows h5py>=3.10) ``Dataset.compression`` is None for a
    plugin filter, not 'unknown': the daemon took the unnamed zstd column for an unfiltered
    one, did not load hdf5plugin, read no offsets, and a resumed run recorded again the
    iterations that file holds. Here ``compression`` answers as h5py 3.10 to 3.15 do."""
    import subprocess
    import sys

    path = kafka_zstd_file(tmp_path)
    code = (
        "import sys; from pathlib import Path; from h5py._hl.dataset import Dataset; "
        "Dataset.compression = property(lambda self: next(("
        "x for x in ('gzip', 'lzf', 'szip') if x in self._filters), None)); "
        "from recorder.daemon.leftovers import offsets_in_file; "
        "print(offsets_in_file(Path(sys.argv[1]), sys.argv[2]))"
    )
    got = subprocess.run([sys.executable, "-c", code, str(path), "topic-x"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert got.stdout.strip().splitlines()[-1] == "{0: 119}", got.stdout + got.stderr
