"""Memory soak: the real daemon (``k2eg-recorder run``) recording for an hour or more.

Run::

    .venv/bin/python benchmarks/bench_soak.py                    # 60 min
    .venv/bin/python benchmarks/bench_soak.py --minutes 3        # a smoke run
    nice -n 10 .venv/bin/python benchmarks/bench_soak.py --minutes 120 --csv soak.csv

Evidence for "the daemon's memory is flat in the run length": does the RSS of the daemon and
of its writer processes level off over hours of recording with files rotating every minute?
Progress goes to stderr; the result table (markdown) to stdout. Memory does not decide the
exit code (this is a benchmark): it is non-zero only when the daemon did not exit 0 after
SIGTERM, a finalized file fails ``verify --data``, or a ``.partial`` file is left.

Setup: an embedded broker (Tansu, in memory) and the gateway simulator (a thread of this
process), as ``k2eg-recorder demo``. The run definitions are the three packaged examples
(``recorder/examples/*.yaml``, as ``k2eg-recorder demo`` writes them) with every run's
``output.segment`` replaced by ``max_seconds: --segment-seconds`` (default 60), plus a heavier
recurring run ``soak-heavy``: ``--heavy-pvs`` (200) NTScalar doubles ``SIM:AI:DOUBLE:<i>`` at
``time_window`` ``--heavy-window-ms`` (100 ms). The daemon is a separate process, ``python -m
recorder.cli run`` (settings through its ``RECORDER_*`` environment, log as JSON lines into
``daemon.log`` of the work directory); its writer processes (one per recording, the default
``output.isolate: true``; idle pre-started ones too) are its children.

Measured every ``--sample-s`` (default 10 s), from ``/proc``:

* the daemon: VmRSS, VmHWM, open file descriptors, threads, CPU (user + system) and the
  CPU share over the interval;
* its writer processes (children started by ``multiprocessing`` spawn, found by their
  parent PID): how many, the sum and max of their VmRSS, and the VmRSS of each run's writer
  (the run whose output directory the writer has a file open in; ``idle`` when none);
* the broker's VmRSS and the machine's MemAvailable, and the number of finalized ``.h5``
  and of ``.partial`` files under the data directory.

The broker (Tansu, memory storage) keeps every message: neither ``retention.ms`` nor
DeleteRecords frees anything, so it grows by the bytes produced, ~6 GB/hour at the default
load (the heavier run's full NTScalar structures; ``pv_field_filter_list`` is for
timedbuffered snapshots only). ``--min-available-mb`` (default 3000) ends the soak early,
as after ``--minutes`` and saying so in the report, before the machine runs out of memory.

Meanwhile this process fires a ``trigger`` at ``sim-triggered-images`` every
``--trigger-s`` (default 5 s) and asks for ``status`` every ``--status-s`` (default 60 s)
through :class:`recorder.daemon.adminclient.AdminClient`, counting replies that are not ``ok``.
After ``--minutes`` it sends SIGTERM, waits for exit 0, runs
``recorder.verify.verify_file(path, data=True)`` on every finalized file and checks that no
``.partial`` is left.

Report: each series at 10 %, 50 % and 100 % of the run, its least-squares slope over the
second half (MB/hour), the number of segments per run, the verify result, the CPU time of
the daemon (its own, and with its writers incl. the shutdown), and the WARNING/ERROR lines of
the daemon's log.

This module imports only the standard library at its top; the recorder (Kafka, the admin
client, h5py for verify) is imported where it is used.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from procfs import cpu_seconds, stat_fields, status_kb  # noqa: E402

T0 = time.monotonic()
MB = 1024.0  # /proc reports kB
TRIGGERED_RUN = "sim-triggered-images"
HEAVY_RUN = "soak-heavy"
HEAVY_DIR = "soak-heavy"
IDLE = "idle"


def progress(msg: str) -> None:
    print(f"[soak {time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# ------------------------------------------------------------------ /proc


def mem_available_kb() -> int:
    """MemAvailable of ``/proc/meminfo`` (kB)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` (by the parent PID in their ``stat``)."""
    kids: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = stat_fields(int(entry.name))
        if fields is not None and int(fields[1]) == pid:
            kids.append(int(entry.name))
    return kids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def open_paths(pid: int) -> Iterator[str]:
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                yield os.readlink(entry.path)


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


# ------------------------------------------------------------------ samples


@dataclass
class Writer:
    pid: int
    label: str  # the run directory it writes in, or IDLE
    rss_kb: int
    hwm_kb: int
    cpu_s: float


@dataclass
class Sample:
    t_s: float
    daemon_rss_kb: int
    daemon_hwm_kb: int
    daemon_fds: int
    daemon_threads: int
    daemon_cpu_s: float
    daemon_cpu_pct: float
    writers: list[Writer]
    others: int  # children that are not writers (resource tracker, recovery, ...)
    broker_rss_kb: int
    mem_available_kb: int
    files_h5: int
    files_partial: int
    triggers_ok: int
    triggers_bad: int

    @property
    def writers_rss_sum_kb(self) -> int:
        return sum(w.rss_kb for w in self.writers)

    @property
    def writers_rss_max_kb(self) -> int:
        return max((w.rss_kb for w in self.writers), default=0)

    def writer_rss_kb(self, label: str) -> int:
        return max((w.rss_kb for w in self.writers if w.label == label), default=0)


@dataclass
class Soak:
    args: argparse.Namespace
    work: Path
    data_dir: Path
    run_dirs: list[str]
    daemon: subprocess.Popen[bytes] | None = None
    broker_pid: int = 0
    samples: list[Sample] = field(default_factory=list)
    triggers_ok: int = 0
    triggers_bad: int = 0
    trigger_errors: list[str] = field(default_factory=list)
    statuses_ok: int = 0
    statuses_bad: list[str] = field(default_factory=list)
    last_status: dict[str, Any] = field(default_factory=dict)
    stopped_early: str = ""  # why the soak ended before --minutes

    def count_files(self) -> tuple[int, int]:
        h5 = partial = 0
        for _root, _dirs, files in os.walk(self.data_dir):
            for name in files:
                if name.endswith(".partial"):
                    partial += 1
                elif name.endswith((".h5", ".hdf5", ".nxs")):
                    h5 += 1
        return h5, partial

    def label_of(self, pid: int) -> str:
        root = str(self.data_dir) + os.sep
        for target in open_paths(pid):
            if target.startswith(root):
                return target[len(root):].split(os.sep, 1)[0]
        return IDLE

    def sample(self) -> Sample:
        assert self.daemon is not None
        pid = self.daemon.pid
        now = time.monotonic()
        st = status_kb(pid)
        fields = stat_fields(pid)
        own_cpu = cpu_seconds(fields) if fields else float("nan")
        writers: list[Writer] = []
        others = 0
        for kid in children_of(pid):
            if "multiprocessing.spawn" not in cmdline(kid) or "resource_tracker" in cmdline(kid):
                others += 1
                continue
            kst = status_kb(kid)
            kfields = stat_fields(kid)
            kcpu = cpu_seconds(kfields) if kfields else 0.0
            writers.append(Writer(kid, self.label_of(kid), kst.get("VmRSS", 0),
                                  kst.get("VmHWM", 0), kcpu))
        prev = self.samples[-1] if self.samples else None
        pct = float("nan")
        if prev is not None and now - T0 > prev.t_s:
            pct = 100.0 * (own_cpu - prev.daemon_cpu_s) / (now - T0 - prev.t_s)
        h5, partial = self.count_files()
        s = Sample(
            t_s=now - T0, daemon_rss_kb=st.get("VmRSS", 0), daemon_hwm_kb=st.get("VmHWM", 0),
            daemon_fds=fd_count(pid), daemon_threads=st.get("Threads", 0),
            daemon_cpu_s=own_cpu, daemon_cpu_pct=pct, writers=writers, others=others,
            broker_rss_kb=status_kb(self.broker_pid).get("VmRSS", 0),
            mem_available_kb=mem_available_kb(),
            files_h5=h5, files_partial=partial, triggers_ok=self.triggers_ok,
            triggers_bad=self.triggers_bad,
        )
        self.samples.append(s)
        return s


# ------------------------------------------------------------------ run definitions


def write_runs(config_dir: Path, data_dir: Path, args: argparse.Namespace) -> list[str]:
    """The packaged examples with short segments, plus the heavier recurring run.
    Returns the output directories (relative to ``data_dir``) of the runs."""
    from ruamel.yaml import YAML

    from recorder.cli.demo import write_examples

    yaml = YAML()
    dirs: list[str] = []
    segment = {"max_seconds": args.segment_seconds}
    for path in write_examples(config_dir, data_dir):
        doc = yaml.load(path.read_text(encoding="utf-8"))
        runs = doc.get("runs", [doc])
        for run in runs:
            run["output"]["segment"] = dict(segment)
            rel = str(Path(run["output"]["directory"]).relative_to(data_dir))
            if rel not in dirs:
                dirs.append(rel)
        with path.open("w", encoding="utf-8") as f:
            yaml.dump(doc, f)
    snapshot: dict[str, Any] = {
        "snapshot_name": "soak_heavy",
        "pv_uri_list": [f"pva://SIM:AI:DOUBLE:{i}" for i in range(1, args.heavy_pvs + 1)],
        "time_window": args.heavy_window_ms,
        "type": "normal",
    }
    heavy: dict[str, Any] = {
        "name": HEAVY_RUN,
        "autostart": True,
        "snapshot": snapshot,
        "output": {
            "directory": str(data_dir / HEAVY_DIR),
            "segment": dict(segment),
            "compression": "gzip",
            "flush_interval_s": 1.0,
        },
        "metadata": {"description": "bench_soak.py: the heavier recurring run",
                     "tags": ["soak"]},
    }
    with (config_dir / f"{HEAVY_RUN}.yaml").open("w", encoding="utf-8") as f:
        yaml.dump(heavy, f)
    dirs.append(HEAVY_DIR)
    from recorder.config.loader import check_runs

    _loaded, problems = check_runs(config_dir)
    if problems:
        raise BenchError("invalid run definitions: " + "; ".join(map(str, problems)))
    return dirs


# ------------------------------------------------------------------ statistics


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return float("nan")
    sxy = sum((t - mx) * (v - my) for t, v in points)
    return sxy / sxx * 3600.0


def at_fraction(samples: Sequence[Sample], start: float, end: float, frac: float) -> Sample:
    """The sample nearest to ``start + frac * (end - start)``."""
    target = start + frac * (end - start)
    return min(samples, key=lambda s: abs(s.t_s - target))


# ------------------------------------------------------------------ the run


def daemon_env(args: argparse.Namespace, bootstrap: str, cmd_topic: str, config_dir: Path,
               suffix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECORDER_")}
    env.update({
        "RECORDER_CONFIG_PATH": str(config_dir),
        "RECORDER_BOOTSTRAP_SERVERS": bootstrap,
        "RECORDER_CMD_TOPIC": cmd_topic,
        "RECORDER_APP_NAME": f"k2eg-recorder-soak-{suffix}",
        "RECORDER_INSTANCE": "soak",
        "RECORDER_ADMIN_TOPIC": f"soak-admin-{suffix}",
        "RECORDER_ADMIN_REPLY_TOPIC": f"soak-admin-reply-{suffix}",
        "RECORDER_STATUS_TOPIC": f"soak-status-{suffix}",
        "RECORDER_FILES_TOPIC": f"soak-files-{suffix}",
        "RECORDER_HEARTBEAT_INTERVAL_S": "5",
        "RECORDER_SHUTDOWN_TIMEOUT_S": str(args.shutdown_timeout),
        "RECORDER_LOG_FORMAT": "json",
        "RECORDER_LOG_LEVEL": "INFO",
    })
    return env


def wait_ready(client: Any, timeout_s: float, daemon: subprocess.Popen[bytes],
               expect: Sequence[str]) -> dict[str, Any]:
    """Status replies until every run in ``expect`` is recording."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise BenchError(f"the daemon exited with {daemon.returncode} while starting")
        try:
            reply = client.request("status", timeout_s=5.0)
        except Exception as exc:  # no reply yet: the daemon is still connecting
            last = f"{type(exc).__name__}: {exc}"
            continue
        runs = (reply.data or {}).get("runs", {})
        states = {name: runs.get(name, {}).get("state") for name in expect}
        last = f"{reply.code.value}: {states}"
        if reply.code.value == "ok" and all(s == "recording" for s in states.values()):
            return dict(reply.data or {})
        time.sleep(1.0)
    raise BenchError(f"the daemon's runs did not start within {timeout_s:g} s ({last})")


def status_summary(data: dict[str, Any]) -> str:
    runs = data.get("runs", {})
    parts = []
    for name, st in sorted(runs.items()):
        its = st.get("iterations", {})
        parts.append(f"{name} {st.get('state')} {its.get('complete', 0)}c/"
                     f"{its.get('incomplete', 0)}i err {st.get('errors', 0)} lag "
                     f"{st.get('lag')}")
    return "; ".join(parts)


def drive(soak: Soak, client: Any) -> None:
    """Sample, trigger and ask for status until ``--minutes`` have passed."""
    args = soak.args
    start = time.monotonic()
    end = start + args.minutes * 60.0
    next_sample = start
    next_trigger = start + args.trigger_s
    next_status = start + args.status_s
    shot = 0
    while True:
        now = time.monotonic()
        if now >= end:
            return
        assert soak.daemon is not None
        if soak.daemon.poll() is not None:
            raise BenchError(f"the daemon exited with {soak.daemon.returncode} while recording")
        if now >= next_sample:
            s = soak.sample()
            next_sample += args.sample_s
            if s.mem_available_kb < args.min_available_mb * MB:
                soak.stopped_early = (
                    f"MemAvailable {s.mem_available_kb / MB:.0f} MB < --min-available-mb "
                    f"{args.min_available_mb:g} after {(now - start) / 60:.1f} min (broker "
                    f"VmRSS {s.broker_rss_kb / MB:.0f} MB)")
                progress(f"ending the soak early: {soak.stopped_early}")
                return
            if len(soak.samples) % max(1, round(60 / args.sample_s)) == 1:
                if args.csv:  # each minute: what a killed soak (OOM) measured survives
                    write_csv(args.csv, soak)
                progress(f"daemon RSS {s.daemon_rss_kb / MB:.1f} MB (HWM "
                         f"{s.daemon_hwm_kb / MB:.1f}), fds {s.daemon_fds}, threads "
                         f"{s.daemon_threads}, CPU {s.daemon_cpu_s:.0f} s; writers "
                         f"{len(s.writers)}: " + ", ".join(
                             f"{w.label} {w.rss_kb / MB:.1f}" for w in s.writers)
                         + f" MB; broker {s.broker_rss_kb / MB:.0f} MB, available "
                         f"{s.mem_available_kb / MB:.0f} MB; files "
                         f"{s.files_h5} (+{s.files_partial} partial); triggers "
                         f"{soak.triggers_ok} ok / {soak.triggers_bad} not")
        elif now >= next_trigger:
            shot += 1
            next_trigger += args.trigger_s
            try:
                reply = client.request("trigger", TRIGGERED_RUN,
                                       tags={"shot": str(shot), "source": "bench_soak"},
                                       timeout_s=30.0)
                if reply.code.value == "ok":
                    soak.triggers_ok += 1
                else:
                    soak.triggers_bad += 1
                    soak.trigger_errors.append(f"shot {shot}: {reply.code.value} "
                                               f"{reply.message}")
            except Exception as exc:
                soak.triggers_bad += 1
                soak.trigger_errors.append(f"shot {shot}: {type(exc).__name__}: {exc}")
            if soak.trigger_errors and soak.triggers_bad <= 5:
                progress(f"trigger not ok: {soak.trigger_errors[-1]}")
        elif now >= next_status:
            next_status += args.status_s
            try:
                reply = client.request("status", timeout_s=30.0)
                if reply.code.value == "ok":
                    soak.statuses_ok += 1
                    soak.last_status = dict(reply.data or {})
                    progress(f"status ok: {status_summary(soak.last_status)}")
                else:
                    soak.statuses_bad.append(f"{reply.code.value}: {reply.message}")
                    progress(f"status NOT ok: {soak.statuses_bad[-1]}")
            except Exception as exc:
                soak.statuses_bad.append(f"{type(exc).__name__}: {exc}")
                progress(f"status failed: {soak.statuses_bad[-1]}")
        else:
            time.sleep(max(0.0, min(next_sample, next_trigger, next_status, end)
                           - time.monotonic()))


def stop_daemon(soak: Soak) -> tuple[int | None, float]:
    """SIGTERM, then wait: (exit code or None if killed after the timeout, seconds)."""
    assert soak.daemon is not None
    t = time.monotonic()
    soak.daemon.send_signal(signal.SIGTERM)
    try:
        code = soak.daemon.wait(soak.args.shutdown_timeout + 60.0)
    except subprocess.TimeoutExpired:
        progress("the daemon did not exit after SIGTERM: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(soak.daemon.pid, signal.SIGKILL)
        soak.daemon.wait(10)
        return None, time.monotonic() - t
    return code, time.monotonic() - t


def log_findings(log_path: Path, limit: int = 12) -> tuple[dict[str, int], list[str]]:
    """Counts of the daemon log's lines per level, and the first WARNING+ events."""
    levels: dict[str, int] = {}
    notable: list[str] = []
    seen: dict[str, int] = {}
    with contextlib.suppress(OSError), log_path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                obj = json.loads(line)
                level = str(obj.get("level", "?")).lower()
                event = str(obj.get("event", ""))
            except (ValueError, AttributeError):
                level, event = "unparsed", line.strip()[:160]
            levels[level] = levels.get(level, 0) + 1
            if level not in ("debug", "info"):
                seen[event] = seen.get(event, 0) + 1
                if seen[event] == 1 and len(notable) < limit:
                    notable.append(f"{level}: {line.strip()[:300]}")
    return levels, notable


def verify_all(data_dir: Path) -> tuple[int, list[str]]:
    from recorder.verify import verify_file

    paths = sorted(p for p in data_dir.rglob("*") if p.is_file()
                   and p.name.endswith((".h5", ".hdf5", ".nxs")))
    bad: list[str] = []
    for p in paths:
        report = verify_file(p, data=True)
        if not report.ok:
            bad.extend(f"{p}: {e}" for e in report.errors)
    return len(paths), bad


def write_csv(path: Path, soak: Soak) -> None:
    labels = soak.run_dirs
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "daemon_rss_mb", "daemon_hwm_mb", "daemon_fds", "daemon_threads",
                    "daemon_cpu_s", "daemon_cpu_pct", "writers", "writers_rss_sum_mb",
                    "writers_rss_max_mb", "writers_hwm_max_mb",
                    *(f"writer_rss_mb_{x}" for x in labels), "writer_rss_mb_idle",
                    "other_children", "broker_rss_mb", "mem_available_mb", "files_h5",
                    "files_partial",
                    "triggers_ok", "triggers_bad"])
        for s in soak.samples:
            w.writerow([f"{s.t_s:.1f}", f"{s.daemon_rss_kb / MB:.2f}",
                        f"{s.daemon_hwm_kb / MB:.2f}", s.daemon_fds, s.daemon_threads,
                        f"{s.daemon_cpu_s:.2f}", f"{s.daemon_cpu_pct:.1f}", len(s.writers),
                        f"{s.writers_rss_sum_kb / MB:.2f}", f"{s.writers_rss_max_kb / MB:.2f}",
                        f"{max((x.hwm_kb for x in s.writers), default=0) / MB:.2f}",
                        *(f"{s.writer_rss_kb(x) / MB:.2f}" for x in labels),
                        f"{s.writer_rss_kb(IDLE) / MB:.2f}", s.others,
                        f"{s.broker_rss_kb / MB:.1f}", f"{s.mem_available_kb / MB:.0f}",
                        s.files_h5, s.files_partial,
                        s.triggers_ok, s.triggers_bad])


def report(soak: Soak, *, segments: dict[str, int], verified: int, bad: list[str],
           partials: list[str], exit_code: int | None, stop_s: float, cpu_total_s: float,
           levels: dict[str, int], notable: list[str]) -> None:
    samples = soak.samples
    args = soak.args
    start, end = samples[0].t_s, samples[-1].t_s
    half = [s for s in samples if s.t_s >= start + (end - start) / 2]
    series: list[tuple[str, Any]] = [
        ("daemon VmRSS MB", lambda s: s.daemon_rss_kb / MB),
        ("daemon VmHWM MB", lambda s: s.daemon_hwm_kb / MB),
        ("writers VmRSS max MB", lambda s: s.writers_rss_max_kb / MB),
        ("writers VmRSS sum MB", lambda s: s.writers_rss_sum_kb / MB),
    ]
    series += [(f"writer `{x}` VmRSS MB", lambda s, x=x: s.writer_rss_kb(x) / MB)
               for x in soak.run_dirs]
    series += [
        ("writer processes", lambda s: float(len(s.writers))),
        ("daemon open fds", lambda s: float(s.daemon_fds)),
        ("daemon threads", lambda s: float(s.daemon_threads)),
        ("broker VmRSS MB (in-memory topics)", lambda s: s.broker_rss_kb / MB),
    ]
    if soak.stopped_early:
        print(f"**Ended early**: {soak.stopped_early}")
        print()
    print(f"## bench_soak: {(end - start) / 60:.1f} of {args.minutes:g} min, segments every "
          f"{args.segment_seconds:g} s, "
          f"{HEAVY_RUN} {args.heavy_pvs} PVs at {args.heavy_window_ms} ms, trigger every "
          f"{args.trigger_s:g} s, samples every {args.sample_s:g} s ({len(samples)})")
    print()
    print("| series | 10 % | 50 % | 100 % | slope, 2nd half (per hour) |")
    print("|---|---|---|---|---|")
    for name, get in series:
        vals = [at_fraction(samples, start, end, f) for f in (0.1, 0.5, 1.0)]
        slope = slope_per_hour([(s.t_s, get(s)) for s in half])
        print(f"| {name} | {get(vals[0]):.1f} | {get(vals[1]):.1f} | {get(vals[2]):.1f} | "
              f"{slope:+.2f} |")
    print()
    last = samples[-1]
    first_half = [s for s in samples if s.t_s < start + (end - start) / 2]

    def cpu_pct(part: Sequence[Sample]) -> float:
        if len(part) < 2 or part[-1].t_s == part[0].t_s:
            return float("nan")
        return 100 * (part[-1].daemon_cpu_s - part[0].daemon_cpu_s) / (
            part[-1].t_s - part[0].t_s)

    print("Segments (finalized files) per run directory: "
          + ", ".join(f"{k} {v}" for k, v in segments.items())
          + f"; total {sum(segments.values())}")
    print(f"verify --data: {verified - len({b.split(': ', 1)[0] for b in bad})} of {verified} "
          f"file(s) pass; .partial left: {len(partials)}")
    print(f"Daemon exit after SIGTERM: {exit_code} in {stop_s:.1f} s")
    print(f"CPU: daemon own {last.daemon_cpu_s:.0f} s at the last sample "
          f"({cpu_pct(first_half):.1f} % of a core in the 1st half, {cpu_pct(half):.1f} % in "
          f"the 2nd); daemon + writers "
          f"incl. shutdown {cpu_total_s:.0f} s")
    print(f"Admin: triggers {soak.triggers_ok} ok / {soak.triggers_bad} not; status "
          f"{soak.statuses_ok} ok / {len(soak.statuses_bad)} not")
    if soak.last_status:
        print(f"Last status: {status_summary(soak.last_status)}")
    print(f"Daemon log lines by level: {dict(sorted(levels.items()))}")
    for line in notable:
        print(f"  {line}")
    for line in (soak.trigger_errors[:5] + soak.statuses_bad[:5]):
        print(f"  admin: {line}")
    for line in bad[:20]:
        print(f"  verify: {line}")
    for p in partials[:20]:
        print(f"  partial: {p}")


def compile_recorder() -> None:
    """Byte-compile the recorder package, as ``pip install`` does (see bench_e2e.py)."""
    import compileall

    compileall.compile_dir(str(ROOT / "recorder"), quiet=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="recording time (60)")
    parser.add_argument("--sample-s", type=float, default=10.0, help="sample period (10 s)")
    parser.add_argument("--segment-seconds", type=float, default=60.0,
                        help="output.segment.max_seconds of every run (60)")
    parser.add_argument("--heavy-pvs", type=int, default=200,
                        help="NTScalar PVs of the heavier recurring run (200)")
    parser.add_argument("--heavy-window-ms", type=int, default=100,
                        help="its time_window (100 ms)")
    parser.add_argument("--min-available-mb", type=float, default=3000.0,
                        help="end the soak early (and say so) when the machine's MemAvailable "
                             "falls below this: the in-memory broker grows by ~6 GB/hour at "
                             "the default load (3000)")
    parser.add_argument("--trigger-s", type=float, default=5.0,
                        help=f"a trigger at {TRIGGERED_RUN} every ... seconds (5)")
    parser.add_argument("--status-s", type=float, default=60.0,
                        help="a status request every ... seconds (60)")
    parser.add_argument("--shutdown-timeout", type=float, default=120.0,
                        help="the daemon's RECORDER_SHUTDOWN_TIMEOUT_S (120)")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="write the samples here")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="run definitions, files and logs here (kept); default: a "
                             "temporary directory, removed after a successful run")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.sample_s <= 0 or args.trigger_s <= 0 or args.status_s <= 0:
        parser.error("--minutes, --sample-s, --trigger-s and --status-s must be > 0")

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    compile_recorder()

    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    from recorder.broker import EmbeddedBroker
    from recorder.daemon.adminclient import AdminClient
    from recorder.settings import KafkaSettings
    from recorder.sim import GatewaySimulator

    keep = args.workdir is not None
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-soak-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        parser.error(f"--workdir {work} is not empty")
    data_dir, config_dir = work / "data", work / "runs.d"
    log_path = work / "daemon.log"
    soak = Soak(args, work, data_dir, run_dirs=[])
    broker = EmbeddedBroker(log_path=work / "broker.log")
    sim: GatewaySimulator | None = None
    client: AdminClient | None = None
    ok = False
    try:
        soak.run_dirs = write_runs(config_dir, data_dir, args)
        progress(f"work directory {work}; runs in {soak.run_dirs}")
        broker.start()
        soak.broker_pid = broker.pid or 0
        suffix = uuid.uuid4().hex[:6]
        cmd_topic = f"soak-cmd-{suffix}"
        sim = GatewaySimulator(broker.bootstrap_servers, cmd_topic).start()
        progress(f"broker pid {broker.pid} on {broker.bootstrap_servers}; simulator on "
                 f"{cmd_topic}")
        env = daemon_env(args, broker.bootstrap_servers, cmd_topic, config_dir, suffix)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with log_path.open("ab") as log:
            soak.daemon = subprocess.Popen(
                [sys.executable, "-m", "recorder.cli", "run", "--state-dir",
                 str(work / "state")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=work, start_new_session=True,
            )
        progress(f"daemon pid {soak.daemon.pid}, log {log_path}")
        kafka = KafkaSettings.from_env({}, bootstrap_servers=broker.bootstrap_servers,
                                       cmd_topic=cmd_topic, app_name=f"soak-bench-{suffix}")
        client = AdminClient(kafka, env["RECORDER_ADMIN_TOPIC"],
                             env["RECORDER_ADMIN_REPLY_TOPIC"])
        data = wait_ready(client, 90.0, soak.daemon,
                          ["sim-normal-10hz", "sim-timedbuffered", TRIGGERED_RUN, HEAVY_RUN])
        progress(f"daemon ready: {status_summary(data)}")
        drive(soak, client)
        soak.sample()
        progress("SIGTERM to the daemon")
        code, stop_s = stop_daemon(soak)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_total = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        progress(f"daemon exit {code} after {stop_s:.1f} s; verifying files")
        client.close()
        client = None
        segments: dict[str, int] = {}
        for rel in soak.run_dirs:
            d = data_dir / rel
            segments[rel] = sum(1 for p in d.glob("*") if p.name.endswith(".h5")) if (
                d.is_dir()) else 0
        partials = sorted(str(p) for p in data_dir.rglob("*.partial"))
        verified, bad = verify_all(data_dir)
        levels, notable = log_findings(log_path)
        if args.csv:
            write_csv(args.csv, soak)
            progress(f"samples written to {args.csv}")
        report(soak, segments=segments, verified=verified, bad=bad, partials=partials,
               exit_code=code, stop_s=stop_s, cpu_total_s=cpu_total, levels=levels,
               notable=notable)
        ok = code == 0 and not bad and not partials and verified > 0
        if not ok:
            progress(f"FAILED: exit {code}, {len(bad)} verify error(s), {len(partials)} "
                     f".partial file(s), {verified} file(s); files kept in {work}")
        return 0 if ok else 1
    except (BenchError, KeyboardInterrupt) as exc:
        progress(f"FAILED: {exc}; files kept in {work}")
        if args.csv and soak.samples:
            write_csv(args.csv, soak)
        return 1
    finally:
        if soak.daemon is not None and soak.daemon.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(soak.daemon.pid, signal.SIGKILL)
            soak.daemon.wait(10)
        if client is not None:
            client.close()
        if sim is not None:
            sim.stop(5)
        broker.stop()
        if ok and not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
