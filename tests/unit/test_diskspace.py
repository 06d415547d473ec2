"""Free space where the runs write: the minimum's syntax, the fill rate, the warnings and their
hysteresis (pure :class:`DiskWatch`), and the probe thread with injected and real ``statvfs``."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from recorder.daemon.diskprobe import DiskProbe
from recorder.daemon.diskspace import (
    DiskReading,
    DiskTrend,
    DiskWatch,
    MinFree,
    format_bytes,
    format_duration,
)

GIB = 1024**3
TOTAL = 1000 * GIB


@pytest.mark.parametrize(
    ("text", "total", "expected"),
    [
        ("5%", TOTAL, 50 * GIB),
        ("0.5 %", 1000, 5),
        ("200G", TOTAL, 200 * GIB),
        ("200GiB", 1, 200 * GIB),
        ("1.5 TB", 1, int(1.5 * 1024**4)),
        ("500m", 1, 500 * 1024**2),
        ("4096", 1, 4096),
        ("0", TOTAL, 0),
    ],
)
def test_min_free_syntax(text: str, total: int, expected: int) -> None:
    assert MinFree.parse(text).bytes_for(total) == expected


@pytest.mark.parametrize("text", ["", "lots", "-5%", "100%", "5 %%", "10X", "G"])
def test_min_free_refuses_what_it_cannot_mean(text: str) -> None:
    with pytest.raises(ValueError, match="free-space minimum"):
        MinFree.parse(text)


def test_formats() -> None:
    assert str(MinFree.parse("5%")) == "5%" and str(MinFree.parse("200G")) == "200.0 GiB"
    assert format_bytes(512) == "512 B" and format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**5) == "3072.0 TiB"
    assert [format_duration(s) for s in (40, 89, 1500, 7100, 7200, 11_400, 200_000)] == [
        "~40 s", "~89 s", "~25 min", "~118 min", "~2 h", "~3 h 10 min", "~2 d 7 h"]


def test_trend_is_the_least_squares_slope_once_the_samples_span_a_minute() -> None:
    trend = DiskTrend(window_s=300, min_span_s=60)
    for t in range(0, 60, 10):  # 1 MiB/s, with +-100 kB of noise
        trend.add(t, 10 * GIB - t * 1024**2 + (100_000 if t % 20 else -100_000))
    assert trend.fill_rate() is None  # 50 s: not yet
    trend.add(60, 10 * GIB - 60 * 1024**2)
    rate = trend.fill_rate()
    assert rate is not None and rate == pytest.approx(1024**2, rel=0.05)
    assert trend.full_in_s(GIB) == pytest.approx(1024, rel=0.05)
    trend.add(60, 0)  # the same check again: ignored
    assert trend.fill_rate() == pytest.approx(rate)
    for t in range(70, 500, 10):  # freed space, then flat: not filling
        trend.add(t, 20 * GIB)
    assert trend.samples[0][0] >= 490 - 300  # only the window is kept
    assert trend.full_in_s(20 * GIB) is None


def reading(free: int | None, at: float, *, device: int = 7, mount: str = "/data",
            error: str | None = None) -> DiskReading:
    return DiskReading(device, mount, (f"{mount}/run",), ("run",), free,
                       None if free is None else TOTAL, at, int(at * 1000), error)


def test_low_space_warns_once_and_clears_with_a_margin() -> None:
    watch = DiskWatch(MinFree.parse("5%"), full_warning_s=0)
    assert watch.update(0, [reading(100 * GIB, 0)]) == []
    d = watch.statuses[0]
    assert (d.path, d.free_bytes, d.min_free_bytes, d.warning) == ("/data", 100 * GIB,
                                                                   50 * GIB, None)
    changes = watch.update(10, [reading(49 * GIB, 10)])
    assert [c.kind for c in changes] == ["warning"]
    assert changes[0].status.warning == "49.0 GiB free (4.9%), below the minimum of 5%"
    assert watch.warnings() == ["/data: 49.0 GiB free (4.9%), below the minimum of 5%"]
    assert watch.update(20, [reading(48 * GIB, 20)]) == []  # still low: nothing new to log
    assert watch.update(30, [reading(52 * GIB, 30)]) == []  # above the minimum, within 10 %
    assert watch.statuses[0].warning is not None
    changes = watch.update(40, [reading(56 * GIB, 40)])
    assert [c.kind for c in changes] == ["ok"] and watch.warnings() == []


def test_filling_up_warns_before_the_minimum_is_reached() -> None:
    watch = DiskWatch(MinFree.parse("5%"), full_warning_s=3600)
    free = 500 * GIB
    changes = []
    for t in range(0, 121, 10):  # 100 MiB/s: 500 GiB last ~85 min
        changes += watch.update(t, [reading(free - t * 100 * 1024**2, t)])
    assert changes == []
    d = watch.statuses[0]
    assert d.full_in_s is not None and 4900 < d.full_in_s < 5100
    for t in range(130, 3000, 10):  # full within the hour from ~1,520 s on
        changes += watch.update(t, [reading(free - t * 100 * 1024**2, t)])
        if changes:
            break
    assert [c.kind for c in changes] == ["warning"]
    assert changes[0].status.warning.startswith("full in ~60 min")  # type: ignore[union-attr]
    assert watch.statuses[0].free_bytes > 50 * GIB  # type: ignore[operator]
    # writing stops: the rate falls out of the window and the warning clears
    end = t
    left = free - t * 100 * 1024**2
    changes = []
    for t in range(end + 10, end + 400, 10):
        changes += watch.update(t, [reading(left, t)])
    assert [c.kind for c in changes] == ["ok"]


def test_a_check_that_does_not_return_is_a_warning_and_a_failed_one_too() -> None:
    watch = DiskWatch(MinFree.parse("5%"), stuck_after_s=30)
    watch.update(0, [reading(100 * GIB, 0)])
    assert watch.update(20, [reading(100 * GIB, 0)], busy=[("/data/run", 0.5)]) == []
    changes = watch.update(31, [reading(100 * GIB, 0)], busy=[("/data/run", 0.5)])
    assert [c.kind for c in changes] == ["warning"]
    assert changes[0].status.warning == (
        "storage not answering: checking /data/run has not returned for 30 s")
    assert [c.kind for c in watch.update(40, [reading(100 * GIB, 35)])] == ["ok"]
    # a directory whose very first check hangs: known by its name only
    watch = DiskWatch(MinFree.parse("5%"), stuck_after_s=30)
    watch.update(45, [], busy=[("/nfs/run", 0)])
    (d,) = watch.statuses
    assert d.path == "/nfs/run" and d.free_bytes is None and d.warning is not None
    # stat failed (permissions): said as it is
    watch.update(50, [reading(None, 50, error="PermissionError: Permission denied")])
    assert watch.warnings() == ["/data: cannot check free space: PermissionError: Permission "
                                "denied"]


def test_filesystems_no_run_uses_any_more_are_dropped() -> None:
    watch = DiskWatch(MinFree.parse("5%"))
    watch.update(0, [reading(100 * GIB, 0), reading(GIB, 0, device=8, mount="/scratch")])
    assert [d.path for d in watch.statuses] == ["/data", "/scratch"]
    assert watch.warnings() == ["/scratch: 1.0 GiB free (0.1%), below the minimum of 5%"]
    assert watch.update(10, [reading(100 * GIB, 10)]) == []  # no "ok" for a dropped disk
    assert [d.path for d in watch.statuses] == ["/data"] and watch.warnings() == []


# ---------------------------------------------------------------------------------- the probe
def fake_stat(devices: dict[str, int]) -> Any:
    """``os.stat`` over a made-up tree: paths missing from ``devices`` do not exist."""
    def stat(path: Path) -> Any:
        if str(path) not in devices:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return SimpleNamespace(st_dev=devices[str(path)])
    return stat


def fake_statvfs(free: dict[str, int]) -> Any:
    def statvfs(path: Path) -> Any:
        return SimpleNamespace(f_bavail=free[str(path)] // 4096, f_frsize=4096,
                               f_blocks=TOTAL // 4096)
    return statvfs


def test_probe_groups_directories_by_filesystem_and_names_its_mount_point() -> None:
    devices = {"/": 1, "/data": 2, "/data/k2eg": 2, "/data/k2eg/bpm": 2, "/scratch": 3}
    probe = DiskProbe(10, stat=fake_stat(devices),
                      statvfs=fake_statvfs({"/data/k2eg/bpm": 9 * GIB, "/data/k2eg": 9 * GIB,
                                            "/scratch": GIB}))
    probe.set_directories({"/data/k2eg/bpm": ["bpm-b", "bpm-a"],
                           "/data/k2eg/wf/not-yet": ["wf"],  # created with its first file
                           "/scratch/x": ["x"]})
    readings = sorted(probe.check(), key=lambda r: r.mount)
    assert [(r.mount, r.directories, r.runs, r.free_bytes) for r in readings] == [
        ("/data", ("/data/k2eg/bpm", "/data/k2eg/wf/not-yet"), ("bpm-a", "bpm-b", "wf"),
         9 * GIB),
        ("/scratch", ("/scratch/x",), ("x",), GIB),
    ]
    assert readings[0].total_bytes == TOTAL and probe.latest() != ()
    assert probe.busy() == ()


def test_probe_reports_a_failed_check_and_a_hanging_one_without_hanging_itself() -> None:
    release = threading.Event()
    entered = threading.Event()

    def statvfs(path: Path) -> Any:
        if str(path) == "/nfs":
            entered.set()
            release.wait(10)
        return SimpleNamespace(f_bavail=1, f_frsize=4096, f_blocks=2)

    def stat(path: Path) -> Any:
        if str(path) == "/locked":
            raise PermissionError(13, "Permission denied", "/locked")
        return SimpleNamespace(st_dev=5 if str(path) == "/nfs" else 1)

    probe = DiskProbe(0.05, stat=stat, statvfs=statvfs).start()
    try:
        probe.set_directories({"/locked": ["a"], "/nfs": ["b"]})
        assert entered.wait(5)
        busy = probe.busy()
        assert [d for d, _ in busy] == ["/nfs"]
        watch = DiskWatch(MinFree.parse("0"), stuck_after_s=0.2)
        time.sleep(0.3)
        watch.update(time.monotonic(), probe.latest(), probe.busy())
        assert any("storage not answering: checking /nfs" in w for w in watch.warnings())
        release.set()
        deadline = time.monotonic() + 5
        while probe.busy() or len(probe.latest()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        watch.update(time.monotonic(), probe.latest(), probe.busy())
        assert watch.warnings() == ["/locked: cannot check free space: PermissionError: "
                                    "Permission denied"]
    finally:
        release.set()
        probe.close()


def test_probe_reads_the_real_filesystem(tmp_path: Path) -> None:
    probe = DiskProbe(10)
    probe.set_directories({str(tmp_path / "runs" / "a"): ["a"]})
    (r,) = probe.check()
    v = os.statvfs(tmp_path)
    assert r.error is None and r.device == os.stat(tmp_path).st_dev
    assert r.total_bytes == v.f_blocks * v.f_frsize
    assert abs(r.free_bytes - v.f_bavail * v.f_frsize) < 64 * 1024**2  # type: ignore[operator]
    assert Path(r.mount) in (tmp_path, *tmp_path.parents)
    assert os.path.ismount(r.mount) or r.mount == "/"


@pytest.mark.parametrize(("reason", "expected"), [
    ("OSError: [Errno 28] No space left on device", True),
    ("Can't write data (file write failed: ..., errno = 28, error message = 'No space left "
     "on device', ...)", True),
    ("OSError: [Errno 122] Disk quota exceeded", True),
    ("OSError: [Errno 27] File too large", True),
    ("writer process exited (signal 11)", False),
    ("PermissionError: [Errno 13] Permission denied: '/data/x.h5.partial'", False),
])
def test_out_of_space_reasons(reason: str, expected: bool) -> None:
    from recorder.daemon.diskspace import out_of_space

    assert out_of_space(reason) is expected


def test_room_to_resume_needs_the_minimum_with_its_margin_and_64_mib() -> None:
    from recorder.daemon.diskspace import RESUME_MIN_FREE

    watch = DiskWatch(MinFree.parse("5%"), full_warning_s=0, stuck_after_s=30)
    assert watch.has_room("/anywhere")  # not watched: nothing says otherwise
    watch.update(0, [reading(0, 0)])
    assert not watch.has_room("/data/run")
    watch.update(1, [reading(52 * GIB, 1)])  # above the minimum, not above its margin
    assert not watch.has_room("/data/run")
    watch.update(2, [reading(60 * GIB, 2)])
    assert watch.has_room("/data/run")
    watch.update(3, [reading(60 * GIB, 2)], busy=[("/data/run", -40)])  # its check hangs
    assert not watch.has_room("/data/run")
    small = DiskWatch(MinFree.parse("0"))
    small.update(0, [reading(RESUME_MIN_FREE - 1, 0)])
    assert not small.has_room("/data/run")
    small.update(1, [reading(RESUME_MIN_FREE, 1)])
    assert small.has_room("/data/run")


def test_a_hanging_check_does_not_freeze_the_other_filesystems() -> None:
    """One hung network filesystem: the local disks are still checked every round (their
    warnings, the metrics and a full disk's resume depend on fresh readings)."""
    release = threading.Event()
    free = {"/data": 10 * GIB}

    def statvfs(path: Path) -> Any:
        if str(path) == "/nfs":
            release.wait(10)
        return SimpleNamespace(f_bavail=free.get(str(path), GIB) // 4096, f_frsize=4096,
                               f_blocks=TOTAL // 4096)

    def stat(path: Path) -> Any:
        return SimpleNamespace(st_dev={"/": 1, "/data": 2, "/nfs": 3}[str(path)])

    probe = DiskProbe(0.05, stat=stat, statvfs=statvfs).start()
    try:
        probe.set_directories({"/data": ["a"], "/nfs": ["b"]})
        deadline = time.monotonic() + 5
        while not probe.busy():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        free["/data"] = GIB  # /data fills while /nfs hangs
        deadline = time.monotonic() + 5
        while not any(r.mount == "/data" and r.free_bytes == GIB for r in probe.latest()):
            assert time.monotonic() < deadline, "/data is not checked while /nfs hangs"
            time.sleep(0.01)
        watch = DiskWatch(MinFree.parse("5%"), stuck_after_s=0.2)
        time.sleep(0.3)
        watch.update(time.monotonic(), probe.latest(), probe.busy())
        assert sorted(w.split(":")[0] for w in watch.warnings()) == ["/data", "/nfs"]
    finally:
        release.set()
        probe.close()


def test_a_warning_under_a_directory_name_clears_under_its_mount_point() -> None:
    """A check that hung (or failed) before its filesystem was known is reported under the
    run's directory; once it answers, the filesystem is reported under its mount point, and
    the log must say the warning cleared (else "disk needs a look" stands for ever)."""
    watch = DiskWatch(MinFree.parse("5%"), stuck_after_s=30)
    assert [c.kind for c in watch.update(45, [], busy=[("/data/run", 0)])] == ["warning"]
    changes = watch.update(50, [reading(100 * GIB, 50)])
    assert [(c.kind, c.status.path) for c in changes] == [("ok", "/data")]
    watch = DiskWatch(MinFree.parse("5%"), stuck_after_s=30)
    failed = DiskReading(-5, "/data/run", ("/data/run",), ("r",), None, None, 0, 0,
                         error="PermissionError: Permission denied")
    assert [c.kind for c in watch.update(0, [failed])] == ["warning"]
    assert [c.kind for c in watch.update(10, [reading(100 * GIB, 10)])] == ["ok"]
    # ... also into a filesystem already reported (another run's directory, no warning)
    watch = DiskWatch(MinFree.parse("5%"), stuck_after_s=30)
    other = DiskReading(7, "/data", ("/data/other",), ("o",), 100 * GIB, TOTAL, 0, 0)
    assert [c.kind for c in watch.update(0, [other, failed])] == ["warning"]
    merged = DiskReading(7, "/data", ("/data/other", "/data/run"), ("o", "r"), 100 * GIB,
                         TOTAL, 10, 10_000)
    assert [(c.kind, c.status.path) for c in watch.update(10, [merged])] == [("ok", "/data")]
    assert watch.update(20, [merged]) == []


def test_room_to_resume_is_judged_on_a_reading_taken_after_the_disk_ran_out() -> None:
    """The probe reads every 10 s: a reading from before a run's disk ran out (another run
    just filled it, or a resumed backlog did) says nothing about room now; a run resumed on
    it fails again at once, over and over until the next reading (backoff reset each time)."""
    watch = DiskWatch(MinFree.parse("0"), full_warning_s=0)
    watch.update(100, [reading(GIB, 100)])
    assert watch.has_room("/data/run")
    assert not watch.has_room("/data/run", since=104)  # ran out at 104: not known yet
    watch.update(110, [reading(0, 110)])
    assert not watch.has_room("/data/run", since=104)
    watch.update(120, [reading(GIB, 120)])
    assert watch.has_room("/data/run", since=104)
    assert watch.has_room("/elsewhere", since=104)  # not watched: nothing says otherwise
