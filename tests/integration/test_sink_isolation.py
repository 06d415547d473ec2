"""One writer process per recording (recorder.sinks.process.IsolatedRecording).

A real full disk (a 2 MiB tmpfs; RLIMIT_FSIZE where mounting is not permitted), a writer
killed with SIGKILL, a stopped (hung) writer, back-pressure, and bit-exact values through the
process boundary compared with the in-process HDF5Recording.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from daemon_support import tmpfs
from test_hdf5_roundtrip import make_samples, same

from recorder.cli import main as cli_main
from recorder.client.events import (
    IncompleteReason,
    IterationClosed,
    IterationEvent,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.values import PVSample
from recorder.reader import RecordingFile, open_file
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import Compression, OutputOptions, final_path
from recorder.sinks.packed import PackedSamples
from recorder.sinks.process import IsolatedRecording, open_recording
from recorder.sinks.process_codec import _decode_event, _Encoder

WIDTH = 2000  # float64 waveform: 16 kB per iteration


def w_value(i: int) -> list[float]:
    return [float(i * 10_000 + x) for x in range(WIDTH)]


def iteration_events(i: int, width: int = WIDTH) -> list[IterationEvent]:
    samples = (
        PVSample("W", {"value": w_value(i)[:width], "timeStamp": {"secondsPastEpoch": i,
                                                                  "nanoseconds": 1}}),
        PVSample("P", {"value": float(np.float32(i / 3))}, frozenset({"value"})),
    )
    return [
        IterationOpened("t", "s", i, i, offset=i),
        ValuesReceived("t", i, 1, i, samples, offset=i),
        IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i, n_values=2,
                        offset=i),
    ]


def status_of(rec: IsolatedRecording) -> str:
    """``rec.status`` without mypy narrowing it across calls that change it."""
    return rec.status


def congested(rec: IsolatedRecording) -> bool:
    return rec.congested


def check_iterations(f: RecordingFile, n_min: int) -> int:
    """The file holds iterations 0..n-1 (n >= n_min), every value as sent; returns n."""
    n = len(f.iterations()["iter_index"])
    assert n >= n_min
    assert f.iterations()["iter_index"].tolist() == list(range(n))
    w = f.values("W")[:n]
    assert w.shape == (n, WIDTH) and w.dtype == np.float64
    assert np.array_equal(w, np.array([w_value(i) for i in range(n)]))
    p = f.values("P")[:n]
    assert p.dtype == np.float32
    assert p.tolist() == [float(np.float32(i / 3)) for i in range(n)]
    return n


@pytest.fixture
def recordings() -> Iterator[Callable[..., IsolatedRecording]]:
    """Make IsolatedRecordings; at teardown none is left running (SIGKILL, then close)."""
    made: list[IsolatedRecording] = []

    def make(options: OutputOptions, **kwargs: Any) -> IsolatedRecording:
        rec = IsolatedRecording(options, **kwargs)
        made.append(rec)
        return rec

    yield make
    for rec in made:
        if rec.alive and rec.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.pid, signal.SIGKILL)
        rec.close("aborted")
        assert not rec.alive


@contextlib.contextmanager
def file_size_limit(limit: int | None) -> Iterator[None]:
    """RLIMIT_FSIZE for processes started inside (they inherit it); ours restored after."""
    if limit is None:
        yield
        return
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[tuple[Path, int | None]]:
    """A 2 MiB tmpfs (a real ENOSPC) when we may mount; else a directory plus a 2 MiB
    RLIMIT_FSIZE for the writer (EFBIG). Yields (directory, file size limit or None)."""
    full = tmp_path / "full"
    full.mkdir()
    with tmpfs(full, "2m") as mounted:
        yield full, None if mounted else 2 * 1024 * 1024


def test_disk_full_fails_one_recording_only(
    tmp_path: Path, tiny_disk: tuple[Path, int | None],
    recordings: Callable[..., IsolatedRecording],
) -> None:
    full, limit = tiny_disk
    with file_size_limit(limit):
        a = recordings(OutputOptions(directory=full, compression=Compression.NONE), run_name="full")
    b = recordings(OutputOptions(directory=tmp_path / "ok"), run_name="ok")
    assert a.pid != b.pid and os.getpid() not in (a.pid, b.pid)
    n = 400
    failed_at = None
    durable_before = -1
    for i in range(n):
        for event in iteration_events(i):
            a.handle(event)
            b.handle(event)
        a.flush()
        b.flush()
        if a.status == "recording":
            durable_before = a.last_durable_offset[("t", 0)]
            assert durable_before == i
        elif failed_at is None:
            failed_at = i
        assert b.status == "recording", b.reason
    # the tiny disk filled up part way (about 120 iterations of 16 kB)
    assert failed_at is not None and 20 < failed_at < n - 100, failed_at
    assert a.status == "failed"
    if limit is None:
        assert "No space left on device" in a.reason or "errno = 28" in a.reason, a.reason
    else:
        assert "too large" in a.reason or "errno = 27" in a.reason, a.reason
    # later events were refused, not queued forever; none vanished uncounted
    assert a.counters["dropped_events"] > 0
    assert a.counters["events"] + a.counters["dropped_events"] == 3 * n
    assert a.last_durable_offset[("t", 0)] == durable_before  # failed flushes moved nothing
    partial = a.current_path
    assert partial is not None and partial.name.endswith(".h5.partial") and partial.exists()

    # the other recording goes on and completes with every iteration
    (ok_file,) = b.close()
    assert b.status == "complete" and b.reason == ""
    with open_file(ok_file) as f:
        assert f.status == "complete"
        assert check_iterations(f, n) == n

    assert a.close() == [] and a.status == "failed"  # a failed recording finalizes nothing
    assert partial.exists()
    if limit is None:  # the operator makes room, then recovers the file
        subprocess.run(["mount", "-o", "remount,size=64m", str(full)], check=True)
    assert cli_main(["recover", str(full)]) == 0
    assert not partial.exists()
    (final,) = full.glob("*.h5")
    with open_file(final) as f:
        assert f.layout == "final" and f.status == "aborted"
        assert "recovered" in f.attrs["status_reason"]
        check_iterations(f, durable_before + 1)  # everything flushed before the disk filled


def test_writer_killed_mid_recording(
    tmp_path: Path, recordings: Callable[..., IsolatedRecording]
) -> None:
    a = recordings(OutputOptions(directory=tmp_path / "a"), run_name="victim")
    b = recordings(OutputOptions(directory=tmp_path / "b"), run_name="survivor")
    n = 60
    for i in range(n):
        for event in iteration_events(i, width=50):
            a.handle(event)
            b.handle(event)
        if i == 30:
            a.flush()
            assert a.status == "recording" and a.last_durable_offset == {("t", 0): 30}
            assert a.pid is not None
            os.kill(a.pid, signal.SIGKILL)
        a.maybe_flush()
        b.maybe_flush()
    a.flush()  # notices the death at the latest here
    b.flush()
    assert a.status == "failed" and not a.alive
    assert "SIGKILL" in a.reason and str(a.pid) in a.reason, a.reason
    partial = a.current_path
    assert partial is not None and partial.exists() and str(partial) in a.reason
    assert a.last_durable_offset == {("t", 0): 30}
    # every event was either taken by the writer before it died or counted as dropped
    assert a.counters["events"] + a.counters["dropped_events"] == 3 * n
    assert a.counters["events"] >= 3 * 31 and a.counters["dropped_events"] > 0
    before = a.counters["dropped_events"]
    a.handle(iteration_events(n)[0])  # never raises into the daemon
    assert a.counters["dropped_events"] == before + 1
    assert a.close() == [] and a.status == "failed"

    (ok_file,) = b.close()
    assert b.status == "complete"
    with open_file(ok_file) as f:
        assert len(f.iterations()["iter_index"]) == n
        assert f.values("W")[n - 1].tolist() == w_value(n - 1)[:50]

    assert cli_main(["recover", str(partial)]) == 0
    (final,) = (tmp_path / "a").glob("*.h5")
    with open_file(final) as f:
        its = f.iterations()["iter_index"].tolist()
        assert its[:31] == list(range(31))
        assert f.values("W")[30].tolist() == w_value(30)[:50]


def test_hung_writer_back_pressure_then_timeout(
    tmp_path: Path, recordings: Callable[..., IsolatedRecording]
) -> None:
    rec = recordings(
        OutputOptions(directory=tmp_path, max_buffer_bytes=64 * 1024),
        run_name="hung", reply_timeout_s=1.5, max_block_s=0.1, batch_bytes=16 * 1024,
    )
    rec.flush()
    assert rec.pid is not None
    os.kill(rec.pid, signal.SIGSTOP)  # a writer stuck in I/O
    try:
        blocked = []
        for i in range(12):  # ~16 kB each: well over the 64 kB back-pressure limit
            t0 = time.monotonic()
            for event in iteration_events(i):
                rec.handle(event)
            blocked.append(time.monotonic() - t0)
            assert rec.maybe_flush() in (True, False)  # never waits
        assert congested(rec) and rec.backlog_bytes > 64 * 1024
        assert rec.status == "recording"  # slow is not failed
        # blocks, but boundedly: about max_block_s per event once congested
        assert 0.5 < rec.blocked_seconds < 12 * 3 * 0.1 + 2
        assert max(blocked) < 3 * 0.1 + 0.5

        os.kill(rec.pid, signal.SIGCONT)  # the writer catches up
        rec.flush()
        assert status_of(rec) == "recording" and rec.backlog_bytes == 0 and not congested(rec)
        assert rec.last_durable_offset == {("t", 0): 11}

        os.kill(rec.pid, signal.SIGSTOP)  # and now hangs for good
        for event in iteration_events(12):
            rec.handle(event)
        t0 = time.monotonic()
        rec.flush()
        assert 1.4 < time.monotonic() - t0 < 10
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGCONT)
    assert status_of(rec) == "failed" and not rec.alive
    assert "did not complete a flush within 1.5 s" in rec.reason and "SIGKILL" in rec.reason
    assert rec.close() == []
    assert cli_main(["recover", str(tmp_path)]) == 0
    (final,) = tmp_path.glob("*.h5")
    with open_file(final) as f:
        assert check_iterations(f, 12) == 12


def test_a_writer_behind_has_no_room_for_large_values_until_it_catches_up(
    tmp_path: Path, recordings: Callable[..., IsolatedRecording]
) -> None:
    """``wait_for_room``: a caller that waits for it keeps the writer's backlog within its
    bound plus one event, whatever the events' size (``handle`` alone takes one event per
    ``max_block_s`` anyway: 4 MB images made the backlog grow by 4 MB every 0.1 s here)."""
    bound = 8 << 20
    rec = recordings(OutputOptions(directory=tmp_path, max_buffer_bytes=bound),
                     run_name="big", max_block_s=0.1)
    rec.flush()
    assert rec.pid is not None
    image = PVSample.from_raw("IMG", msgpack.packb({"value": list(range(1_000_000))}), 0)
    os.kill(rec.pid, signal.SIGSTOP)  # a writer busy finalizing a large segment
    handed = 0
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:
            if not rec.wait_for_room(0.05):
                continue
            i = handed
            rec.handle(IterationOpened("t", "s", i, i, offset=3 * i))
            rec.handle(ValuesReceived("t", i, 1, i, (image,), offset=3 * i + 1))
            rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i,
                                       offset=3 * i + 2))
            handed += 1
        assert rec.backlog_bytes <= bound + 2 * len(image._msg)  # type: ignore[arg-type]
        assert not rec.wait_for_room(0.1) and rec.status == "recording"
    finally:
        os.kill(rec.pid, signal.SIGCONT)
    assert rec.wait_for_room(30)
    (path,) = rec.close()
    with open_file(path) as f:
        assert len(f.iterations()["iter_index"]) == handed


def _raw(pv: str, data: dict[str, Any]) -> PVSample:
    """A lazily-decoded sample as the wire decoder builds it (floats packed as float32)."""
    return PVSample.from_raw(pv, msgpack.packb(data, use_single_float=True), 0)


def samples_for(i: int) -> list[PVSample]:
    ts = {"secondsPastEpoch": 1_700_000_000 + i, "nanoseconds": 5}
    raw = [
        _raw("R32", {"value": 0.1 * i, "timeStamp": ts, "alarm": {"severity": 1}}),
        _raw("RW32", {"value": [0.5 * x + i for x in range(7)], "timeStamp": ts}),
        _raw("RIMG", {"value": {"floatValue": [x / 7 for x in range(12)]},
                      "dimension": [{"size": 4}, {"size": 3}], "uniqueId": i}),
        _raw("RSTR", {"value": f"ünï {i}", "timeStamp": ts}),
    ]
    return make_samples(i) + raw


def record_stream(rec: HDF5Recording | IsolatedRecording) -> dict[str, list[PVSample]]:
    sent: dict[str, list[PVSample]] = {}
    for i in range(5):
        samples = samples_for(i)
        half = len(samples) // 2
        rec.handle(IterationOpened("t", "s", 100 + i, 10 + i, offset=3 * i))
        rec.handle(ValuesReceived("t", 100 + i, 1, 1, tuple(samples[:half]), offset=3 * i + 1))
        rec.flush()
        rec.handle(ValuesReceived("t", 100 + i, 2, 2, tuple(samples[half:]), submission_seq=7,
                                  late=i == 3, offset=3 * i + 1))
        if i == 2:
            rec.handle(IterationClosed("t", "s", 100 + i, IterationStatus.INCOMPLETE,
                                       IncompleteReason.GATEWAY_ERROR, 10 + i, 20 + i,
                                       error_code=7, error_message="boom é", offset=3 * i + 2))
        else:
            rec.handle(IterationClosed("t", "s", 100 + i, IterationStatus.COMPLETE, None,
                                       10 + i, None, n_values=len(samples), n_batches=2,
                                       expected_messages=3, missing_messages=0,
                                       offset=3 * i + 2))
        for s in samples:
            sent.setdefault(s.pv, []).append(s)
    return sent


def assert_bit_exact(x: Any, y: Any) -> None:
    assert type(x) is type(y), (x, y)
    if isinstance(x, (np.ndarray, np.generic)):
        assert x.dtype == y.dtype and x.shape == y.shape, (x, y)
        if x.dtype == object:
            for u, v in zip(x.ravel(), y.ravel(), strict=True):
                assert_bit_exact(u, v)
        else:
            assert x.tobytes() == y.tobytes(), (x, y)
    elif dataclasses.is_dataclass(x):
        for f in dataclasses.fields(x):
            assert_bit_exact(getattr(x, f.name), getattr(y, f.name))
    elif isinstance(x, dict):
        assert list(x) == list(y)
        for k in x:
            assert_bit_exact(x[k], y[k])
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y)
        for u, v in zip(x, y, strict=True):
            assert_bit_exact(u, v)
    else:
        assert repr(x) == repr(y)


def compare_files(isolated: Path, inproc: Path, sent: dict[str, list[PVSample]]) -> None:
    with open_file(isolated) as f, open_file(inproc) as g:
        assert f.layout == g.layout
        assert sorted(f.pv_names) == sorted(g.pv_names) == sorted(sent)
        for key, col in g.iterations().items():
            assert_bit_exact(f.iterations()[key], col)
        for pv, samples in sent.items():
            same(f.samples(pv), samples)
            assert_bit_exact(f.values(pv), g.values(pv))
            assert_bit_exact(f.times(pv), g.times(pv))
            assert_bit_exact(f.severity(pv), g.severity(pv))
            assert_bit_exact([s.value for s in f.samples(pv)], [s.value for s in g.samples(pv)])
        assert f.values("F32").dtype == np.float32 and f.values("R32").dtype == np.float32
        assert f.values("RW32").dtype == np.float32 and f.values("RIMG").dtype == np.float32
        assert f.values("RIMG")[0].shape == (3, 4)
        assert f.values("RSTR").tolist() == [f"ünï {i}" for i in range(5)]


def test_roundtrip_bit_exact_through_the_process_boundary(
    tmp_path: Path, recordings: Callable[..., IsolatedRecording]
) -> None:
    wall = 1_750_000_000.0
    iso = recordings(OutputOptions(directory=tmp_path / "iso"), run_name="rt",
                     pv_uris=["pva://F32"], metadata={"who": "me", "n": 3}, seq=7,
                     recording_uid="uid-1", wall_clock=lambda: wall)
    ref = HDF5Recording(OutputOptions(directory=tmp_path / "ref"), run_name="rt",
                        pv_uris=["pva://F32"], metadata={"who": "me", "n": 3}, seq=7,
                        recording_uid="uid-1", wall_clock=lambda: wall)
    sent = record_stream(iso)
    assert record_stream(ref).keys() == sent.keys()
    iso.flush()
    ref.flush()
    assert iso.current_path is not None and ref.current_path is not None
    # same (wall clock) start time: the writer runs the parent's wall clock from the moment
    # the recording was created, so its file name may be a second or so later on a busy host
    stamp = re.compile(r"_(\d{8}T\d{6})Z_")
    t_iso, t_ref = (datetime.strptime(stamp.search(p.name).group(1), "%Y%m%dT%H%M%S")  # type: ignore[union-attr]
                    for p in (iso.current_path, ref.current_path))
    assert stamp.sub("_", iso.current_path.name) == stamp.sub("_", ref.current_path.name)
    assert 0 <= (t_iso - t_ref).total_seconds() <= 10
    assert iso.last_durable_offset == ref.last_durable_offset == {("t", 0): 14}
    for key in ("events", "values", "iterations", "dropped_events"):
        assert iso.counters[key] == ref.counters[key], key
    compare_files(iso.current_path, ref.current_path, sent)  # live layout
    (iso_final,) = iso.close()
    (ref_final,) = ref.close()
    assert iso.status == ref.status == "complete"
    compare_files(iso_final, ref_final, sent)  # final layout
    with open_file(iso_final) as f:
        assert f.attrs["recording_uid"] == "uid-1" and f.attrs["recording_seq"] == 7
        assert f.attrs["metadata"] == '{"n": 3, "who": "me"}'
        # the writer runs the system clock shifted to the parent's wall_clock at start
        assert 0 <= f.attrs["start_time_ns"] - int(wall * 1e9) < 30e9


def test_event_encoding_round_trip() -> None:
    enc = _Encoder()
    events: list[IterationEvent] = [
        IterationOpened("t", None, 5, None, partition=2, offset=9),
        ValuesReceived("t", 5, 3, 77, tuple(samples_for(1)), submission_seq=4, late=True,
                       partition=2, offset=10),
        IterationClosed("t", "s", 5, IterationStatus.INCOMPLETE,
                        IncompleteReason.MISSING_MESSAGES, None, 8, error_code=3,
                        error_message="x", n_values=1, n_pvs=1, n_batches=3,
                        expected_messages=5, missing_messages=2, duplicates=1, partition=2,
                        offset=11),
        IterationClosed("t", "s", 6, IterationStatus.COMPLETE, None, 1, 2),
    ]
    for event in events:
        row, size = enc.event(event)
        assert size > 0
        back = _decode_event(msgpack.unpackb(msgpack.packb(row), strict_map_key=False))
        assert type(back) is type(event)
        if isinstance(event, ValuesReceived):
            assert isinstance(back, ValuesReceived)
            assert dataclasses.replace(back, samples=()) == dataclasses.replace(event, samples=())
            same(list(back.samples), list(event.samples))
        else:
            assert back == event
    # hand-built data msgpack cannot carry is dropped and counted, never raised
    bad = ValuesReceived("t", 1, 1, 1, (PVSample("X", {"value": object()}),
                                        PVSample("Y", {"value": np.float32(2.5)})))
    row, _ = enc.event(bad)
    assert enc.unserializable == 1 and row[5][0] == ["Y"]


def test_unwritable_directory_fails_cleanly(
    tmp_path: Path, recordings: Callable[..., IsolatedRecording]
) -> None:
    target = Path("/proc/k2eg-recorder-test") if os.geteuid() == 0 else tmp_path / "ro"
    if os.geteuid() != 0:
        target.mkdir(mode=0o500)
    rec = recordings(OutputOptions(directory=target), run_name="x")
    assert rec.status == "failed" and rec.reason and rec.current_path is None
    if os.geteuid() == 0:  # the directory cannot be made: said so, with what to do
        assert rec.reason.startswith(f"output directory {target} cannot be created: "), rec.reason
        assert "ReadWritePaths=" in rec.reason
    rec.handle(iteration_events(0)[0])
    rec.maybe_flush()
    rec.flush()
    assert rec.close() == [] and rec.status == "failed"


@contextlib.contextmanager
def unwritable_directory(tmp_path: Path) -> Iterator[Path]:
    """A directory that exists but cannot be written: a read-only mount as root (what
    ProtectSystem=strict makes of a directory not in ReadWritePaths=), else mode 0500."""
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o500)
        yield target
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)],
                             check=False, capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a read-only tmpfs")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


@pytest.mark.parametrize("isolate", [True, False])
def test_a_directory_that_exists_but_cannot_be_written_says_what_to_do(
    tmp_path: Path, recordings: Callable[..., IsolatedRecording], isolate: bool
) -> None:
    """The usual mistake under systemd (the directory exists, but is not in the unit's
    ReadWritePaths=, so it is read-only) fails the recording with a reason that names the
    directory and what to do, as a directory that cannot be created does; before, the reason
    was HDF5's "OSError: [Errno 30] Unable to synchronously create file (...)"."""
    with unwritable_directory(tmp_path) as target:
        options = OutputOptions(directory=target, isolate=isolate)
        rec: IsolatedRecording | HDF5Recording = (
            recordings(options, run_name="x") if isolate
            else HDF5Recording(options, run_name="x"))
        assert rec.status == "failed" and rec.reason and rec.current_path is None
        assert rec.reason.startswith(f"output directory {target} is not writable: "), rec.reason
        assert "ReadWritePaths=" in rec.reason
        assert rec.close() == [] and rec.status == "failed"
        assert list(target.iterdir()) == []


def test_factory_and_no_h5py_in_the_parent(tmp_path: Path) -> None:
    rec = open_recording(OutputOptions(directory=tmp_path, isolate=False), run_name="x")
    assert isinstance(rec, HDF5Recording)
    rec.close()
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from recorder.client.events import IterationOpened
        from recorder.sinks.options import Compression, OutputOptions
        from recorder.sinks.process import IsolatedRecording, open_recording
        rec = open_recording(OutputOptions(directory=Path(sys.argv[1])), run_name="y")
        assert isinstance(rec, IsolatedRecording), rec
        rec.handle(IterationOpened("t", "s", 1, 1))
        rec.flush()
        print(len(rec.close()), rec.status, "h5py" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1].split() == ["1", "complete", "False"]


def test_values_travel_as_one_blob_with_offsets() -> None:
    """Lazily-built samples (every sample the client produces) cross the boundary as one
    blob of their messages plus (start, end) positions; the writer keeps them so
    (PackedSamples: the recording buffer decodes them in the blob), and each still reads as
    the sample it was."""
    enc = _Encoder()
    ts = {"secondsPastEpoch": 1_700_000_000, "nanoseconds": 5}
    inner = msgpack.packb({"value": 1.5, "timeStamp": ts}, use_single_float=True)
    # a map in the middle of a larger buffer (explicit end), maps running to the end, empty
    buf = b"\x01\x02" + inner + b"\xc0\xc0"
    samples = (
        PVSample.from_raw("MID", buf, 2, 2 + len(inner)),
        _raw("A", {"value": [0.25, 0.5], "timeStamp": ts}),
        _raw("B", {"value": 7, "alarm": {"severity": 2}}),
    )
    event = ValuesReceived("t", 1, 1, 5, samples, offset=3)
    row, _ = enc.event(event)
    pvs, blob, offsets, f32s = row[5]
    assert pvs == ["MID", "A", "B"] and f32s is None and isinstance(blob, bytes)
    assert len(offsets) == 2 * 8 * 3
    back = _decode_event(msgpack.unpackb(msgpack.packb(row), strict_map_key=False))
    assert isinstance(back, ValuesReceived)
    assert type(back.samples) is PackedSamples and back.samples.blob == blob
    for got, want in zip(back.samples, samples, strict=True):
        assert got.pv == want.pv and got.raw == want.raw
        assert got.float32_paths == want.float32_paths
        assert_bit_exact(got.value, want.value)
    assert back.samples[0].float32_paths == frozenset({"value"})
    assert back.samples[0].value.dtype == np.float32
    empty = ValuesReceived("t", 1, 2, 5, ())
    row, _ = enc.event(empty)
    assert _decode_event(msgpack.unpackb(msgpack.packb(row), strict_map_key=False)) == empty


def test_prewarmed_writer_is_used_and_unused_ones_exit(tmp_path: Path) -> None:
    from recorder.sinks import process, process_spawn

    process.prewarm_writer()
    process.prewarm_writer()  # one is waiting already: no second process
    assert len(process_spawn._WARM) == 1
    warm_pid = process_spawn._WARM[0].proc.pid
    rec = IsolatedRecording(OutputOptions(directory=tmp_path), run_name="warm",
                            pv_uris=["pva://A"])
    try:
        assert rec.pid == warm_pid and not process_spawn._WARM
        rec.handle(IterationOpened("t", "s", 1, 1, offset=0))
        rec.handle(ValuesReceived("t", 1, 1, 1, tuple(make_samples(1)), offset=1))
        rec.handle(IterationClosed("t", "s", 1, IterationStatus.COMPLETE, None, 1, 2,
                                   offset=2))
        rec.flush()
        assert rec.status == "recording" and rec.counters["iterations"] == 1
    finally:
        (final,) = rec.close()
    with open_file(final) as f:
        for s in make_samples(1):
            assert len(f.times(s.pv)) == 1
    process.prewarm_writer()
    (unused,) = process_spawn._WARM
    process.release_warm_writers()  # EOF: it exits without writing anything
    assert not process_spawn._WARM and unused.proc.exitcode == 0


def test_the_pipe_to_the_writer_holds_a_whole_batch() -> None:
    """The pipe to a writer is widened to 1 MiB (Linux's default 64 KiB made each 256 KiB
    batch four writes, each waiting for the child to read)."""
    import fcntl

    from recorder.sinks import process, process_spawn

    limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    if limit < process_spawn.PIPE_BYTES:
        pytest.skip(f"pipe-max-size is {limit}")
    w = process_spawn._spawn_writer(None, "k2eg-writer-pipe-test")
    try:
        size = fcntl.fcntl(w.tx.fileno(), getattr(fcntl, "F_GETPIPE_SZ", 1032))
        assert size >= process_spawn.PIPE_BYTES >= 4 * process.DEFAULT_BATCH_BYTES
    finally:
        process_spawn._close_writer(w)
    assert w.proc.exitcode == 0


def test_rebuilt_samples_own_their_payload() -> None:
    """The writer's samples each hold just their PV map: the sink sizes and joins samples by
    their message, so a blob shared by the whole batch made buffering quadratic (a 1,000-PV
    batch counted as 1,000 x the batch's bytes and flushed on every event)."""
    from recorder.client.values import RAW_MESSAGE
    from recorder.sim.encoding import pack

    payloads = [pack({"value": float(i), "timeStamp": {"secondsPastEpoch": i,
                                                       "nanoseconds": 1, "userTag": 0}})
                for i in range(50)]
    msg = b"".join(payloads)
    starts = np.cumsum([0] + [len(p) for p in payloads])
    samples = tuple(PVSample.from_raw(f"P{i}", msg, int(starts[i]), int(starts[i + 1]))
                    for i in range(50))
    row, _ = _Encoder().event(ValuesReceived("t", 1, 1, 1, samples))
    back = _decode_event(msgpack.unpackb(msgpack.packb(row), strict_map_key=False))
    assert isinstance(back, ValuesReceived)
    for s, p in zip(back.samples, payloads, strict=True):
        assert s.raw == p
        message = RAW_MESSAGE(s)
        assert message is not None and len(message) == len(p)
    same(list(back.samples), list(samples))


def test_the_writer_reports_each_finalized_segment_once(
    tmp_path: Path, recordings: Callable[..., IsolatedRecording],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every reply of the writer carried the paths of all the recording's segments (1,440 a
    day with 60 s segments, several replies a second, each rebuilt into Path objects);
    now only those finalized since the last reply."""
    from recorder.sinks.options import SegmentOptions

    carried: list[int] = []
    real = IsolatedRecording._apply

    def spy(self: IsolatedRecording, frame: bytes) -> None:
        carried.append(len(msgpack.unpackb(frame)[1]["paths"]))
        real(self, frame)

    monkeypatch.setattr(IsolatedRecording, "_apply", spy)
    rec = recordings(OutputOptions(directory=tmp_path, segment=SegmentOptions(
        max_iterations=1)), run_name="segs")
    for i in range(12):
        for event in iteration_events(i, width=4):
            rec.handle(event)
        rec.flush()
    paths = rec.close()
    assert rec.status == "complete", rec.reason
    assert paths == sorted(tmp_path.glob("segs_*.h5")) and len(paths) == 12
    assert sum(carried) == 12 and max(carried) <= 2, carried


def record_large_segment(rec: IsolatedRecording, k: int, npv: int = 3000) -> None:
    """``k`` iterations of ``npv`` scalars (a segment that takes a second or more to
    finalize), flushed: durable on return."""
    names = [f"P{j}" for j in range(npv)]
    raws = [msgpack.packb({"value": float(j), "timeStamp": {"secondsPastEpoch": 1,
                                                            "nanoseconds": j}})
            for j in range(npv)]
    for i in range(k):
        rec.handle(IterationOpened("t", "s", i, i, offset=3 * i))
        rec.handle(ValuesReceived("t", i, 1, i, tuple(map(PVSample.from_raw, names, raws,
                                                          [0] * npv)), offset=3 * i + 1))
        rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i,
                                   offset=3 * i + 2))
        if i % 25 == 0:
            rec.flush()  # small flushes (a synchronous flush waits without stall checks)
    rec.flush()


def test_a_writer_finalizing_a_large_segment_at_a_rotation_is_busy_not_hung(
    tmp_path: Path, recordings: Callable[..., IsolatedRecording]
) -> None:
    """At a segment rotation the writer rewrites the segment (finalizes it) before it answers
    again: ~1.2 us per value (README), so 5 min for a segment of ~250 M values. It was
    killed as hung once that outlasted ``stall_timeout_s`` (300 s), failing the recording;
    a writer that keeps reading and writing is busy. One that does nothing is still hung."""
    from recorder.sinks.options import SegmentOptions

    k, stall = 500, 0.5
    rec = recordings(OutputOptions(directory=tmp_path, segment=SegmentOptions(
        max_iterations=k)), run_name="big", stall_timeout_s=stall)
    record_large_segment(rec, k)
    assert rec.status == "recording" and not rec.paths
    rec.handle(IterationOpened("t", "s", k, k, offset=3 * k))  # rotates: finalizes 1.5 M values
    t0 = time.monotonic()
    while status_of(rec) == "recording" and not rec.paths and time.monotonic() - t0 < 120:
        rec.maybe_flush()
        time.sleep(0.01)
    took = time.monotonic() - t0
    assert status_of(rec) == "recording", rec.reason
    assert took > stall  # the rewrite outlasted stall_timeout_s (else this shows nothing)
    assert rec.paths.total == 1 and rec.alive

    assert rec.pid is not None
    os.kill(rec.pid, signal.SIGSTOP)  # now hung: no answer, no I/O
    try:
        rec.handle(IterationClosed("t", "s", k, IterationStatus.COMPLETE, None, k, k,
                                   offset=3 * k + 2))
        rec.maybe_flush()
        t0 = time.monotonic()
        while status_of(rec) == "recording" and time.monotonic() - t0 < 30:
            rec.maybe_flush()
            time.sleep(0.01)
        assert time.monotonic() - t0 < stall + 5
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGCONT)
    assert status_of(rec) == "failed" and not rec.alive
    assert f"did not answer for {stall:g} s" in rec.reason and "SIGKILL" in rec.reason


def test_sigusr1_while_a_writer_starts_does_not_kill_it(
    tmp_path: Path, recordings: Callable[..., IsolatedRecording]
) -> None:
    """``systemctl kill -s USR1`` (README: every process writes its stacks, and they go on
    recording) reaches the writers too; one still starting (an interpreter, its imports: up
    to a second) had no handler yet, and SIGUSR1's default action killed it: the recording
    then failed at its start ("killed by SIGUSR1"), a writer started ahead of time was lost."""
    import multiprocessing
    import threading

    from recorder.sinks import process_spawn

    made: list[IsolatedRecording] = []
    starting = threading.Thread(target=lambda: made.append(recordings(
        OutputOptions(directory=tmp_path / "cold"), run_name="usr1")))
    starting.start()
    deadline = time.monotonic() + 10
    while not multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.001)
    (child,) = multiprocessing.active_children()
    assert child.pid is not None
    os.kill(child.pid, signal.SIGUSR1)
    starting.join(120)
    (rec,) = made
    assert rec.pid == child.pid
    assert status_of(rec) == "recording", rec.reason
    for event in iteration_events(0, width=4):
        rec.handle(event)
    (path,) = rec.close()
    assert rec.status == "complete"
    with open_file(path) as f:
        assert f.iterations()["iter_index"].tolist() == [0]

    process_spawn.prewarm_writer()
    (warm,) = process_spawn._WARM
    assert warm.proc.pid is not None
    os.kill(warm.proc.pid, signal.SIGUSR1)
    time.sleep(0.5)
    rec = recordings(OutputOptions(directory=tmp_path / "warm"), run_name="usr1w")
    assert rec.pid == warm.proc.pid and status_of(rec) == "recording", rec.reason
    assert rec.close() and rec.status == "complete"


def test_writer_killed_right_after_a_rotation_finalized_a_segment(
    tmp_path: Path, recordings: Callable[..., IsolatedRecording]
) -> None:
    """A writer that dies after a rotation finalized a segment but before its next answer
    (it goes on with the rest of the batch and opens the next segment first): the reason sent
    the operator to ``recover`` a ``.partial`` that no longer existed, and the finalized
    segment was missing from the recording's files (``close()``, the stop reply)."""
    import threading

    from recorder.sinks.options import SegmentOptions

    for attempt in range(2):
        d = tmp_path / f"a{attempt}"
        rec = recordings(OutputOptions(directory=d, segment=SegmentOptions(max_iterations=5)),
                         run_name="rot", batch_bytes=1 << 30)
        for i in range(5):
            for event in iteration_events(i, width=4):
                rec.handle(event)
        rec.flush()
        assert rec.pid is not None and rec.current_path is not None
        first = rec.current_path
        pid = rec.pid
        stopped = threading.Event()

        def watch(first: Path = first, pid: int = pid, stopped: threading.Event = stopped
                  ) -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if not first.exists():  # finalized (renamed, then the .partial removed)
                    os.kill(pid, signal.SIGSTOP)
                    stopped.set()
                    return

        watcher = threading.Thread(target=watch)
        watcher.start()
        for i in range(5, 60):  # the rotation, then more work in the same frame
            for event in iteration_events(i):
                rec.handle(event)
        rec.maybe_flush()
        watcher.join()
        assert stopped.is_set()
        os.kill(pid, signal.SIGKILL)
        os.kill(pid, signal.SIGCONT)
        rec.flush()
        assert status_of(rec) == "failed" and "SIGKILL" in rec.reason
        finals = sorted(d.glob("*.h5"))
        assert finals == [final_path(first)]
        assert rec.close() == finals  # told, or found when the writer died
        for named in re.findall(r"(/\S+\.h5\.partial)\b", rec.reason):
            assert Path(named).exists(), rec.reason  # never a file that is gone
        assert str(first) not in rec.reason


def test_writers_left_at_exit_are_reaped_together(
    tmp_path: Path, recordings: Callable[..., IsolatedRecording],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At interpreter exit the writers of recordings not closed (runs still finalizing when
    the shutdown budget ran out) get EOF and a grace period, then SIGKILL. They were reaped
    one after the other, each busy writer waiting out its own grace (10 s): a dozen of them
    took the exit past the unit's TimeoutStopSec, and systemd killed the daemon."""
    from recorder.sinks import process_spawn

    monkeypatch.setattr(process_spawn, "REAP_GRACE_S", 1.0, raising=False)
    busy = [recordings(OutputOptions(directory=tmp_path / str(i)), run_name=f"busy{i}")
            for i in range(3)]
    for rec in busy:
        assert rec.pid is not None
        os.kill(rec.pid, signal.SIGSTOP)  # busy (finalizing): reads no EOF
    t0 = time.monotonic()
    try:
        process_spawn._reap_all()
    finally:
        for rec in busy:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.pid, signal.SIGCONT)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 1.0 + 1.5
    assert not any(rec.alive for rec in busy)


def test_a_stop_waits_for_a_writer_still_finalizing_a_large_segment(
    tmp_path: Path, recordings: Callable[..., IsolatedRecording]
) -> None:
    """``close`` finalizes the last segment; a writer still at it when ``close_timeout_s``
    (30 min: ~1.5 G values, two days of 1,000 PVs at 10 Hz without a segment limit) ran out
    was killed, the stop answered "recording failed", and the whole rewrite was left to
    ``recover``. A writer that keeps reading and writing is given more time."""
    timeout = 0.5
    rec = recordings(OutputOptions(directory=tmp_path), run_name="bigstop",
                     close_timeout_s=timeout)
    record_large_segment(rec, 500)
    t0 = time.monotonic()
    paths = rec.close()
    took = time.monotonic() - t0
    assert rec.status == "complete", rec.reason
    assert took > timeout  # the rewrite outlasted close_timeout_s (else this shows nothing)
    (final,) = paths
    with open_file(final) as f:
        assert f.status == "complete" and len(f.iterations()["iter_index"]) == 500

    hung = recordings(OutputOptions(directory=tmp_path / "hung"), run_name="hungstop",
                      close_timeout_s=timeout)
    for event in iteration_events(0, width=4):
        hung.handle(event)
    assert hung.pid is not None
    os.kill(hung.pid, signal.SIGSTOP)  # no I/O: hung, killed after close_timeout_s
    try:
        t0 = time.monotonic()
        assert hung.close() == []
        assert time.monotonic() - t0 < timeout + 5
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung.pid, signal.SIGCONT)
    assert status_of(hung) == "failed" and "did not complete close" in hung.reason


def upgraded_package(root: Path, edits: dict[str, tuple[str, str]]) -> Path:
    """A copy of the ``recorder`` package in ``root`` with ``edits`` (module path ->
    (old text, new text); an empty old text appends): what ``pip install -U`` puts on disk
    while the daemon runs."""
    import shutil

    import recorder

    src = Path(recorder.__file__).parent
    dst = root / "recorder"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, (old, new) in edits.items():
        path = dst / rel
        text = path.read_text()
        assert old in text, (rel, old)
        path.write_text(text.replace(old, new, 1) if old else text + new)
    return root


@pytest.mark.parametrize("edits", [
    # a field added to an event (as tail_kafka_time_ms was): the new writer expects it
    {"client/events.py": ("    tail_kafka_time_ms: int | None = None\n",
                          "    tail_kafka_time_ms: int | None = None\n"
                          "    added_later: int = 0\n")},
    # a change of what crosses the pipe that the event fields do not show
    {"sinks/process_codec.py": ("", "\nWRITER_PROTOCOL = 1000\n")},
], ids=["event-field", "protocol"])
def test_a_writer_of_an_upgraded_package_refuses_the_running_daemon_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    recordings: Callable[..., IsolatedRecording], edits: dict[str, tuple[str, str]],
) -> None:
    """Between `pip install -U` and the restart the running daemon spawns writers that import
    the new code from disk: one that does not speak the daemon's pipe protocol fails the
    recording at once, saying so (no file, no traceback in the reason)."""
    from recorder.sinks.process_spawn import release_warm_writers

    release_warm_writers()  # started before the "upgrade": they run the daemon's code
    monkeypatch.syspath_prepend(str(upgraded_package(tmp_path / "site", edits)))
    out = tmp_path / "out"
    started = time.monotonic()
    rec = recordings(OutputOptions(directory=out), run_name="upgraded")
    assert time.monotonic() - started < 30
    assert status_of(rec) == "failed", rec.reason
    assert "restart" in rec.reason and "protocol" in rec.reason, rec.reason
    for event in iteration_events(0, width=10):
        rec.handle(event)  # never raises into the daemon
    assert rec.close() == [] and rec.status == "failed"
    assert not out.exists() or not any(out.iterdir())


def test_a_writer_that_dies_before_it_is_ready_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    recordings: Callable[..., IsolatedRecording],
) -> None:
    """A writer that cannot even start (``pip install -U`` replacing the package while the
    daemon spawns it, a dependency the upgrade lacks): the reason says it died before it was
    ready, where its error went and what to do, not only its exit code."""
    from recorder.sinks.process_spawn import release_warm_writers

    release_warm_writers()
    half = {"sinks/livefile.py": ("", "\nraise ImportError('half-installed package')\n")}
    monkeypatch.syspath_prepend(str(upgraded_package(tmp_path / "site", half)))
    rec = recordings(OutputOptions(directory=tmp_path / "out"), run_name="half")
    assert status_of(rec) == "failed"
    assert "exited with code 1" in rec.reason, rec.reason
    assert "before it was ready" in rec.reason and "restart" in rec.reason, rec.reason


def test_writers_of_many_recordings_opened_at_once_start_a_few_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """200 runs starting together (a daemon start, a reload) each opened its recording at
    once: every writer process loaded its interpreter and h5py (~0.4 s of CPU) at the same
    time, none was ready within the 60 s start timeout on 2 cores, and all were killed (24
    at once with a 3 s timeout, ~8x one start: none started). Writers now start at most
    ``MAX_STARTING`` at a time, each timed from its own start."""
    import multiprocessing
    import threading

    from recorder.sinks import process_spawn

    process_spawn.release_warm_writers()
    limit, count = 2, 10
    monkeypatch.setattr(process_spawn, "STARTING", threading.BoundedSemaphore(limit),
                        raising=False)
    opened: list[IsolatedRecording] = []
    lock = threading.Lock()
    done = threading.Event()
    peak = 0

    def watch() -> None:  # writer processes alive whose recording is not open yet
        nonlocal peak
        while not done.is_set():
            with lock:
                starting = len(multiprocessing.active_children()) - len(opened)
            peak = max(peak, starting)
            time.sleep(0.005)

    def open_one(i: int) -> None:
        rec = open_recording(OutputOptions(directory=tmp_path), run_name=f"r{i}")
        with lock:
            opened.append(rec)  # type: ignore[arg-type]

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=open_one, args=(i,)) for i in range(count)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        done.set()
        assert len(opened) == count
        assert all(status_of(r) == "recording" for r in opened), [r.reason for r in opened]
    finally:
        done.set()
        watcher.join()
        for rec in opened:
            rec.close()
    # a recording opened and the next writer spawned before the count saw it: at most twice
    assert peak <= 2 * limit, f"{peak} writer processes starting at once"
