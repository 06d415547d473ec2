"""End to end: pre-filled snapshot topics drained by the daemon into finalized HDF5 files.

Run::

    .venv/bin/python benchmarks/bench_e2e.py            # full: ~4.5 min on 2 shared cores
    .venv/bin/python benchmarks/bench_e2e.py --quick    # ~2 min
    .venv/bin/python benchmarks/bench_e2e.py --sink hdf5 --no-official   # in-process writer

Baseline (b) needs the official client's virtualenv: ``.venv-k2eg`` with k2eg 0.3.2,
confluent-kafka 2.15.1 and h5py (``.venv-k2eg/bin/pip install h5py``); ``--no-official`` skips
it. Progress goes to stderr; the result table (markdown) to stdout. ``--profile DIR`` records
every daemon worker with py-spy (raw, per thread, GIL holders only).

Setup: an embedded broker (Tansu) and the gateway simulator (this process, command topic
only: it acks ``repeating_snapshot``; the benchmark PVs never connect, so it publishes nothing
itself). Topics are pre-filled with sequenced k2eg iterations (header, one data message per PV,
tail) encoded by the simulator's own PV model and encoder (``bench_client.py``):

* ``scalars-1k``: 1,000 NTScalar PVs per iteration, N and 2N iterations (memory);
* ``scalars-10k``: 10,000 NTScalar PVs per iteration (40 iterations);
* ``waveforms``: 500 NTScalarArray PVs of 128 elements per iteration (300 iterations).

The rate is a throughput, so every topic holds 150k values or more: with fewer, the one-time
costs of a recording (its writer process and file, ~0.2-0.5 s, and a payload template learned
per PV, ~0.1 ms x 10,000 PVs) are most of a drain that (a) finishes in ~1 s, which says little
about a run that records for hours. Those costs are reported on their own: ``start-up s`` =
topic assigned -> first event handed to the recording (median). ``CPU µs/value``: CPU time
per value of (a) (its process and the broker, over the drain) and of ours (the daemon, its
writer process and the broker, topic assigned -> last value durable): on these 2 shared
cores all of them compete, so the rates follow the CPU each approach needs per value. The
recorder package is byte-compiled first, as an installed daemon's is (:func:`compile_recorder`).

Measured per case, in the same run, repeated and interleaved ((a), ours, (a), ours, ...):

* (a) plain consume + decode: ``Consumer.assign`` + ``consume(1000)`` + ``msgpack.unpackb``
  of every message of the topic, the consumer configured as ours fetches
  (:data:`recorder.client.kafka.FETCH_TUNING`; before 2026-11-24 it had librdkafka's default
  ``fetch.queue.backoff.ms`` of 1 s, which idled it half of the waveform drain); values /
  (assign -> last message decoded).
* ours: the daemon (``recorder.service.Service``: admin link, K2egClient, RunController and
  the daemon's recording factory, i.e. the code of ``k2eg-recorder run``) in a fresh process,
  with the run's real PV list. ``--sink`` sets the run's ``output.isolate``: ``isolated``
  (default, as the daemon: IsolatedRecording, one writer process per recording) or ``hdf5``
  (HDF5Recording in the daemon's process). The recording resumes at offset 0 (a restart's
  resume-state path) so it drains the pre-filled topic. Rate = values / (topic assigned ->
  last value durable, i.e. flushed to the SWMR file and readable by another process).
  ``ours steady`` = values / (first event handed to the recording -> last value durable): the
  same drain without the one-time start-up (writer process and file, consumer start), which
  is how (b) is measured (after its warm-ups: group join ~10 s, datasets); ours/(b) is
  printed both ways, and the target verdict for each.
  ``finalize`` = the recording's ``close()`` (flush + rewrite into the final NXlog layout) and
  ``incl. finalize`` = values / (assigned -> close() returned): measured on the last repeat
  only (earlier repeats leave once the data is durable; ``--quick``: not for 10k PVs), because
  a stop makes the gateway publish a final iteration into the topic. The finalized files are
  read back (values counted) with ``recorder.reader``. Memory: VmHWM of the daemon process
  plus its writer process when the last value was durable (drain) and over the whole run.
* (b) official client: ``e2e_official.py`` in ``.venv-k2eg`` (k2eg 0.3.2 ``snapshot_recurring``
  + a handler appending every value to its own h5py dataset, resize + write per PV per
  iteration). Its client only reads a snapshot topic from its end, so the iterations are
  published live: tiny warm-up iterations until the handler saw one (group join done), one
  full warm-up (datasets created), then the measured iterations as fast as the producer goes
  (pre-encoded). Rate = values / (first measured message produced -> handler done with the
  last iteration and file closed). Run in each repeat (``--official-repeat``: in the first
  N only), interleaved with (a) and ours: one run of it varies by +-20 % here, so the ratio
  is taken against its median.
* latency (1,000 scalar PVs, live): the daemon records a topic while this process publishes
  iterations at ``--live-rate`` Hz (each flushed to the broker: the tail's delivery is "tail
  produced"); a separate reader process (``recorder.reader.open_file`` + SWMR refresh of the
  commit table, every 20 ms) notes when each iteration's row is committed (its values are
  committed in the same flush). Latency = readable - tail produced; median and p95 at
  ``--flush-interval``.

Nothing waits unbounded: every wait has a timeout and an error naming what did not happen;
the broker and every child process are killed by PID (their own process group) on exit, also
on SIGTERM/SIGINT; on failure the work directory is kept and named.

This module imports only the standard library at its top (``bench_client`` inside the
functions that use it): the daemon's writer processes are spawned, and a spawned process
re-imports its parent's main module, which under ``k2eg-recorder run`` is the light
``recorder.cli``. Importing ``bench_client`` (confluent_kafka, the client, the simulator) here
added ~0.17 s to the writer's start, and so to the start-up measured, that operators do not
pay.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from procfs import cpu_seconds, stat_fields, status_kb  # noqa: E402

K2EG_PYTHON = ROOT / ".venv-k2eg" / "bin" / "python"
T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[e2e {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


def vm_kb(field_name: str, pid: int | str = "self") -> int:
    return status_kb(pid).get(field_name, 0)


# ------------------------------------------------------------------------------ children
class Children:
    """Every child process this run started; all killed by PID (process group) at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def popen(self, cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(cmd, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    @staticmethod
    def kill(proc: subprocess.Popen[Any]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own group: pgid == its PID
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def kill_all(self) -> None:
        for proc in self.procs:
            self.kill(proc)
        self.procs.clear()


CHILDREN = Children()


def read_lines(stream: IO[str], sink: list[str], cond: threading.Condition) -> None:
    for line in stream:
        with cond:
            sink.append(line.rstrip("\n"))
            cond.notify_all()
    with cond:
        sink.append("\x00EOF")
        cond.notify_all()


class LineReader:
    """Reads a child's stdout in a thread; ``expect`` waits (bounded) for a line prefix."""

    def __init__(self, proc: subprocess.Popen[str], what: str) -> None:
        assert proc.stdout is not None
        self.proc, self.what = proc, what
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self._next = 0
        threading.Thread(target=read_lines, args=(proc.stdout, self.lines, self.cond),
                         daemon=True).start()

    def expect(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                while self._next < len(self.lines):
                    line = self.lines[self._next]
                    self._next += 1
                    if line == "\x00EOF":
                        raise BenchError(f"{self.what} exited (rc={self.proc.poll()}) before "
                                         f"printing {prefix!r}")
                    if line.startswith(prefix):
                        return line[len(prefix):].strip()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchError(f"{self.what}: no {prefix!r} line within {timeout_s:g} s")
                self.cond.wait(remaining)


# ------------------------------------------------------------------------------ cases
@dataclass
class Case:
    name: str
    kind: str
    pvs: int
    iterations: int
    official_iterations: int
    topic: str = ""
    messages: int = 0
    values: int = 0
    a_rates: list[float] = field(default_factory=list)
    a_cpu: list[float] = field(default_factory=list)  # CPU µs per value: (a) + the broker
    ours: list[dict[str, Any]] = field(default_factory=list)
    official: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pv_names(self) -> list[str]:
        import bench_client as bc  # not at the top: see the module docstring
        return bc.pv_names(self.kind, self.pvs)


def cases_for(quick: bool) -> list[Case]:
    if quick:
        return [
            Case("scalars-1k", "scalars", 1000, 50, 10),
            Case("scalars-1k-2N", "scalars", 1000, 100, 0),
            Case("scalars-10k", "scalars", 10_000, 6, 2),
            Case("waveforms", "waveforms", 500, 50, 10),
        ]
    return [
        Case("scalars-1k", "scalars", 1000, 150, 20),
        Case("scalars-1k-2N", "scalars", 1000, 300, 0),
        Case("scalars-10k", "scalars", 10_000, 40, 3),
        Case("waveforms", "waveforms", 500, 300, 20),
    ]


# ------------------------------------------------------------------------------ producing
PRODUCERS: list[Any] = []  # closed before the broker stops (else librdkafka logs reconnects)


def producer(bootstrap: str) -> Any:
    from confluent_kafka import Producer

    prod = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5,
                     "batch.num.messages": 10000, "queue.buffering.max.messages": 500_000,
                     "compression.type": "none"})
    PRODUCERS.append(prod)
    return prod


def close_producers() -> None:
    from recorder.client.kafka import close_producer

    while PRODUCERS:
        close_producer(PRODUCERS.pop())


def produce_all(prod: Any, topic: str, messages: list[bytes], flush_every: int = 20_000) -> None:
    """Produce and flush in batches: Tansu's high watermark is the last batch's base offset
    + 1, so flushing per batch keeps watermarks close to the real end."""
    import bench_client as bc  # not at the top: see the module docstring

    from recorder.sim.encoding import SER_HEADER, SER_MSGPACK

    headers = [(SER_HEADER, SER_MSGPACK.encode())]
    for i, value in enumerate(messages, 1):
        for _attempt in range(2000):
            try:
                prod.produce(topic, value=value, key=bc.SNAPSHOT, partition=0, headers=headers)
                break
            except BufferError:
                prod.poll(0.01)
        else:
            raise BenchError(f"could not queue messages for {topic} (producer stuck)")
        if i % flush_every == 0 and prod.flush(60) != 0:
            raise BenchError(f"producing to {topic}: not delivered within 60 s")
    if prod.flush(60) != 0:
        raise BenchError(f"producing to {topic}: not delivered within 60 s")


def encode(case: Case, first: int, count: int, *, past: bool = False) -> list[bytes]:
    """Iterations ``first..first+count-1``, 100 ms apart from now on, or with ``past`` ending
    2 s ago (a topic the gateway filled before: the final iteration a stop makes it publish
    is then newer than all of them, as it is on a real gateway)."""
    import bench_client as bc  # not at the top: see the module docstring
    pvs = bc.packed_pvs(case.kind, case.pvs)
    ts = int(time.time() * 1000)
    if past:
        ts -= 100 * (first + count) + 2000
    out: list[bytes] = []
    for index in range(first, first + count):
        out.extend(bc.iteration_messages(index, pvs, ts + 100 * index))
    return out


def create_topic(bootstrap: str, topic: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    fut = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic]
    try:
        fut.result(15)
    except Exception as exc:
        if "TOPIC_ALREADY_EXISTS" not in str(exc):
            raise BenchError(f"cannot create topic {topic}: {exc}") from exc


# ------------------------------------------------------------------------------ (a)
def run_a(bootstrap: str, topic: str, total: int, broker_pid: int,
          timeout_s: float = 120.0) -> tuple[float, float]:
    """Seconds to consume + decode ``total`` messages (bench_client's baseline, bounded), and
    the CPU seconds this process and the broker spent meanwhile."""
    import msgpack
    from confluent_kafka import Consumer, TopicPartition

    from recorder.client.kafka import FETCH_TUNING

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}",
                         "enable.auto.commit": False, **FETCH_TUNING})
    unpack = msgpack.unpackb
    try:
        cpu0 = proc_cpu() + proc_cpu(broker_pid)
        t0 = time.perf_counter()
        consumer.assign([TopicPartition(topic, 0, 0)])
        n = 0
        deadline = time.monotonic() + timeout_s
        while n < total:
            if time.monotonic() > deadline:
                raise BenchError(f"(a) read only {n} of {total} messages of {topic}")
            for msg in consumer.consume(1000, 0.05):
                if msg.error() is None:
                    unpack(msg.value())
                    n += 1
        return time.perf_counter() - t0, proc_cpu() + proc_cpu(broker_pid) - cpu0
    finally:
        consumer.close()


# ------------------------------------------------------------------------------ ours
def run_ours(args: argparse.Namespace, case: Case, cmd_topic: str, tmp: Path, tag: str,
             *, live: Callable[[Path, LineReader], Any] | None = None,
             finalize: bool = True) -> dict[str, Any]:
    out = tmp / f"ours-{case.name}-{tag}"
    out.mkdir()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
           "--bootstrap", args.bootstrap, "--broker-pid", str(args.broker_pid),
           "--cmd-topic", cmd_topic, "--topic", case.topic,
           "--kind", case.kind, "--pvs", str(case.pvs), "--expect-values", str(case.values),
           "--out", str(out), "--flush-interval", str(args.flush_interval),
           "--sink", args.sink_mode, "--timeout", str(args.run_timeout),
           "--compression", args.compression, "--gc", args.gc,
           "--switch-interval", str(args.switch_interval),
           "--max-buffer-mb", str(args.max_buffer_mb)]
    if not finalize:
        cmd.append("--no-finalize")
    proc = CHILDREN.popen(cmd, stdout=subprocess.PIPE, stderr=open(out / "stderr.txt", "w"),  # noqa: SIM115
                          text=True)
    lines = LineReader(proc, f"daemon worker ({case.name})")
    spy = None
    if args.profile:
        spy_out = Path(args.profile) / f"{case.name}-{tag}.txt"
        spy_out.parent.mkdir(parents=True, exist_ok=True)
        spy = CHILDREN.popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                              str(proc.pid), "--format", "raw", "--rate", "200", "--threads",
                              "--subprocesses", "--gil", "-o", str(spy_out)],
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lines.expect("RECORDING", 90)
        extra = live(out, lines) if live is not None else None
        result = json.loads(lines.expect("RESULT", args.run_timeout + 60))
        proc.wait(30)
    except BenchError:
        tail = (out / "stderr.txt").read_text()[-4000:]
        log = out / "daemon.log"
        log_tail = log.read_text()[-3000:] if log.exists() else ""
        raise BenchError(f"daemon worker failed for {case.name}; its stderr:\n{tail}\n"
                         f"daemon.log:\n{log_tail}") from None
    finally:
        if spy is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(20)
        CHILDREN.kill(proc)
    if result.get("error"):
        raise BenchError(f"daemon worker ({case.name}): {result['error']}")
    if finalize and not result["files"]:
        raise BenchError(f"{case.name}: no finalized file (the stop did not finish within the "
                         f"shutdown budget?); worker stderr: {out / 'stderr.txt'}")
    if finalize and result["values_in_files"] != case.values:
        raise BenchError(f"{case.name}: {result['values_in_files']} values in the finalized "
                         f"files, {case.values} published")
    if extra is not None:
        result["live"] = extra
    return result


# ------------------------------------------------------------------------------ (b)
def run_official(args: argparse.Namespace, case: Case, cmd_topic: str, tmp: Path,
                 tag: str) -> dict[str, Any]:
    import bench_client as bc  # not at the top: see the module docstring
    token = uuid.uuid4().hex[:6]
    snapshot = f"bench-off-{case.name}-{tag}-{token}"
    app = f"bench-off-{token}"
    create_topic(args.bootstrap, f"{app}-reply")
    out = tmp / f"official-{case.name}-{tag}.h5"
    plan = {"bootstrap": args.bootstrap, "cmd_topic": cmd_topic, "app": app,
            "snapshot": snapshot, "pvs": case.pv_names, "kind": case.kind, "out": str(out),
            "timeout_s": args.run_timeout}
    plan_file = tmp / f"plan-{token}.json"
    plan_file.write_text(json.dumps(plan))
    err = open(tmp / f"official-{token}.stderr", "w")  # noqa: SIM115
    proc = CHILDREN.popen([str(K2EG_PYTHON), str(HERE / "e2e_official.py"), str(plan_file)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    lines = LineReader(proc, f"official client ({case.name})")
    prod = producer(args.bootstrap)
    try:
        t_launch = time.monotonic()
        topic = lines.expect("SUBSCRIBED", 120)
        t_sub = time.monotonic()
        pvs = bc.packed_pvs(case.kind, case.pvs)
        warm = 0
        deadline = time.monotonic() + 60
        while True:  # tiny warm-ups (one PV) until the client's group join/assignment is done
            warm += 1
            produce_all(prod, topic, bc.iteration_messages(warm, pvs[:1], int(time.time() * 1000)))
            try:
                seen = int(lines.expect("WARM", 0.5))
                break
            except BenchError:
                if time.monotonic() > deadline:
                    raise BenchError("the official client saw no warm-up iteration in 60 s") \
                        from None
        t_warm = time.monotonic()
        # one full warm-up iteration (the handler creates its datasets), then measure
        warm += 1
        produce_all(prod, topic, bc.iteration_messages(warm, pvs, int(time.time() * 1000)))
        while seen < warm:
            seen = int(lines.expect("WARM", 60))
        first, count = warm + 1, case.official_iterations
        messages = encode(case, first, count)
        assert proc.stdin is not None
        proc.stdin.write(f"GO {first} {count}\n")
        proc.stdin.flush()
        t_start = time.time()
        produce_all(prod, topic, messages)
        produced_s = time.time() - t_start
        result = json.loads(lines.expect("RESULT", args.run_timeout + 30))
        proc.wait(15)
    except BenchError as exc:
        err.flush()
        raise BenchError(f"{exc}\nofficial client stderr:\n"
                         f"{Path(err.name).read_text()[-3000:]}") from None
    finally:
        CHILDREN.kill(proc)
        err.close()
    if not result.get("ok") or result.get("errors"):
        raise BenchError(f"official client ({case.name}): {result}")
    expected = count * case.pvs
    if result["values"] != expected:
        raise BenchError(f"official client ({case.name}): {result['values']} values handled, "
                         f"{expected} published")
    seconds = result["t_done"] - t_start
    progress(f"(b) {case.name}: subscribed after {t_sub - t_launch:.1f} s, first warm-up seen "
             f"{t_warm - t_sub:.1f} s later")
    return {"seconds": seconds, "values": expected, "rate": expected / seconds,
            "produce_s": produced_s, "handler_busy_s": result["busy_s"],
            "vmhwm_kb": result["vmhwm_kb"]}


# ------------------------------------------------------------------------------ latency
def run_latency(args: argparse.Namespace, cmd_topic: str, tmp: Path) -> dict[str, Any]:
    n = args.live_iterations
    case = Case("latency", "scalars", 1000, n, 0)
    case.topic = f"bench_e2e_live_{uuid.uuid4().hex[:6]}"
    case.values = n * case.pvs
    create_topic(args.bootstrap, case.topic)
    messages = encode(case, 1, n)
    per = case.pvs + 2

    def publish(out: Path, _lines: LineReader) -> dict[str, Any]:
        path = json.loads((out / "recording.json").read_text())["path"]
        reader = CHILDREN.popen(
            [sys.executable, str(Path(__file__).resolve()), "--reader", path,
             "--expect-iterations", str(n), "--timeout", str(args.run_timeout)],
            stdout=subprocess.PIPE, stderr=open(out / "reader.stderr", "w"), text=True,  # noqa: SIM115
        )
        rlines = LineReader(reader, "SWMR reader")
        try:
            rlines.expect("READY", 60)
            prod = producer(args.bootstrap)
            tails: dict[int, float] = {}
            period = 1.0 / args.live_rate
            next_at = time.monotonic()
            for i in range(n):
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at += period
                produce_all(prod, case.topic, messages[i * per:(i + 1) * per])
                tails[i + 1] = time.time()  # the tail is delivered (flush returned)
            seen = {int(k): v for k, v in json.loads(rlines.expect("SEEN", 60)).items()}
            reader.wait(15)
        finally:
            CHILDREN.kill(reader)
        lat = sorted(seen[i] - tails[i] for i in tails if i in seen)
        if len(lat) != n:
            raise BenchError(f"the reader saw {len(lat)} of {n} iterations")
        return {"median_s": statistics.median(lat),
                "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
                "max_s": lat[-1], "n": len(lat)}

    return run_ours(args, case, cmd_topic, tmp, "live", live=publish)["live"]


# ------------------------------------------------------------------------------ the worker
def worker(args: argparse.Namespace) -> int:
    """The daemon draining one topic (its own process); progress on stderr, RESULT on stdout."""
    import faulthandler

    import bench_client as bc  # not at the top: see the module docstring

    # last resort against a hang: dump every thread's stack and exit
    faulthandler.dump_traceback_later(args.timeout + 90, exit=True)
    from recorder.client.client import K2egClient
    from recorder.config.daemon import DaemonSettings
    from recorder.config.models import RunDefinition
    from recorder.daemon.recording import Recording, hdf5_recording
    from recorder.daemon.resume import ActiveRecording, ResumeStore
    from recorder.logging import configure_logging
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    out = Path(args.out)
    configure_logging("json", "WARNING", stream=open(out / "daemon.log", "a"))  # noqa: SIM115
    logging.getLogger().setLevel(logging.WARNING)
    pc = time.perf_counter
    sys.setswitchinterval(args.switch_interval)
    marks: dict[str, float] = {}
    info: dict[str, Any] = {}
    done = threading.Event()
    expected = args.expect_values

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def wlog(msg: str) -> None:
        print(f"[worker +{pc() - start:6.2f}s] {msg}", file=sys.stderr, flush=True)

    start = pc()
    gc_stats = {"s": 0.0, "gen2": 0, "n": 0}
    gc_t = [0.0]

    def on_gc(phase: str, gcinfo: dict[str, int]) -> None:
        if phase == "start":
            gc_t[0] = pc()
        elif "t0" in marks and "durable" not in marks:
            gc_stats["s"] += pc() - gc_t[0]
            gc_stats["n"] += 1
            gc_stats["gen2"] += gcinfo["generation"] == 2

    gc.callbacks.append(on_gc)

    def all_cpu() -> dict[str, float]:
        """CPU seconds so far: this process, its children (the writer), the broker."""
        return {"daemon": proc_cpu(), "writer": sum(map(proc_cpu, child_pids())),
                "broker": proc_cpu(args.broker_pid)}
    pv_uris = [f"pva://{name}" for name in bc.pv_names(args.kind, args.pvs)]
    isolate = "true" if args.sink == "isolated" else "false"
    (out / "runs.yaml").write_text(
        "name: bench\n"
        "snapshot:\n"
        f"  snapshot_name: {args.topic}\n"
        f"  pv_uri_list: {json.dumps(pv_uris)}\n"
        "  time_window: 600000\n"
        f"output: {{directory: {out / 'data'}, flush_interval_s: {args.flush_interval}, "
        f"compression: {args.compression}, isolate: {isolate}"
        + (f", max_buffer_bytes: {int(args.max_buffer_mb * 2**20)}" if args.max_buffer_mb else "")
        + "}\n"
    )
    store = ResumeStore(out / "state")
    store.begin("bench", ActiveRecording("bench-uid", 0, args.topic, args.topic, {0: -1}, None))

    # time origin: the snapshot topic assigned (the client returns right after the assign)
    original = K2egClient.snapshot_recurring

    def timed_subscribe(self: Any, *a: Any, **k: Any) -> Any:
        t_call = pc()
        sub = original(self, *a, **k)
        marks["t0"] = pc()
        info["subscribe_s"] = marks["t0"] - t_call
        wlog(f"subscribed (snapshot_recurring took {info['subscribe_s']:.2f} s)")
        info["rss_t0_kb"] = vm_kb("VmRSS")
        info["cpu_t0"] = thread_cpu()
        info["proc_cpu_t0"] = all_cpu()
        return sub

    K2egClient.snapshot_recurring = timed_subscribe  # type: ignore[method-assign]

    handed = [0]

    class Timed:
        """The daemon's recording, with time stamps (delegates everything else)."""

        def __init__(self, rec: Recording) -> None:
            self._rec = rec

        def __getattr__(self, name: str) -> Any:
            return getattr(self._rec, name)

        def _check(self) -> None:
            written = self._rec.counters.get("values", 0)
            if "hwm_half_kb" not in info and written >= expected // 2:
                info["hwm_half_kb"] = vm_kb("VmHWM")
            if "durable" not in marks and written >= expected:
                marks["durable"] = pc()
                info["hwm_durable_kb"] = vm_kb("VmHWM")
                children_hwm()
                info["child_hwm_durable_kb"] = child_hwm[0]
                info["cpu_durable"] = thread_cpu()
                info["proc_cpu_durable"] = all_cpu()
                client = getattr(service, "_client", None)
                info["paused"] = (client.counters().get("kafka.paused", 0)
                                  if client is not None else -1)
                info["blocked_s"] = getattr(self._rec, "blocked_seconds", 0.0)
                done.set()

        def handle(self, event: Any) -> None:
            if "first_event" not in marks:
                marks["first_event"] = pc()
            self._rec.handle(event)
            handed[0] += len(getattr(event, "samples", ()))
            if handed[0] >= expected and "handed" not in marks:
                marks["handed"] = pc()  # every value handed to the recording
            self._check()

        def maybe_flush(self, now: float | None = None, *, idle: bool = False) -> bool:
            flushed = self._rec.maybe_flush(now, idle=idle)
            if flushed:
                info["flushes"] = info.get("flushes", 0) + 1
                info["flush_s"] = info.get("flush_s", 0.0) + self._rec.last_flush_seconds
            self._check()
            return flushed

        def flush(self) -> None:
            self._rec.flush()
            self._check()

        def close(self, status: str = "complete", reason: str = "") -> list[Path]:
            t = pc()
            paths = self._rec.close(status, reason)
            marks["close_s"] = pc() - t
            marks["closed"] = pc()
            return paths

    class Factory:
        # the daemon's own factory: output.isolate (set from --sink above) picks
        # IsolatedRecording (writer process) or HDF5Recording (in the daemon's process)
        prewarm = staticmethod(hdf5_recording.prewarm)  # as the daemon: writer started early

        def __call__(self, definition: RunDefinition, **kwargs: Any) -> Recording:
            t = pc()
            rec = hdf5_recording(definition, **kwargs)
            info["create_s"] = pc() - t  # creating the recording (its writer, the live file)
            (out / "recording.json").write_text(json.dumps({"path": str(rec.current_path)}))
            say("RECORDING")
            return Timed(rec)  # type: ignore[return-value]

    factory = Factory()

    kafka = KafkaSettings.from_env({}, bootstrap_servers=args.bootstrap,
                                   cmd_topic=args.cmd_topic, app_name=f"{args.topic}-rec")
    daemon = DaemonSettings(config_path=out / "runs.yaml", instance="bench",
                            admin_topic=f"{args.topic}-admin",
                            admin_reply_topic=f"{args.topic}-reply",
                            status_topic=f"{args.topic}-status", heartbeat_interval_s=5.0,
                            metrics_port=None, shutdown_timeout_s=args.timeout)
    service = Service(daemon, kafka, state_dir=out / "state", recording_factory=factory,
                      gc_tuning=args.gc == "daemon")
    child_hwm = [0]

    def children_hwm() -> None:
        for child in child_pids():
            child_hwm[0] = max(child_hwm[0], vm_kb("VmHWM", child))

    def watch() -> None:
        if not service.ready.wait(60):
            info["error"] = "the daemon did not become ready within 60 s"
            service.request_stop()
            return
        wlog("daemon ready")
        deadline = time.monotonic() + args.timeout
        next_report = time.monotonic() + 2.0
        next_hwm = 0.0
        while not done.wait(0.05):
            c = service.controllers.get("bench")
            now = time.monotonic()
            if now >= next_hwm:  # /proc reads cost the daemon CPU: not on every pass
                next_hwm = now + 0.5
                children_hwm()
            if c is not None and c.state.value == "failed":
                info["error"] = f"the run failed: {c.status().last_error}"
                wlog(info["error"])
                service.request_stop()
                return
            if now >= next_report and c is not None:
                next_report = now + 2.0
                st = c.status()
                wlog(f"state={st.state.value} iterations={st.iterations_complete} "
                     f"values_written={st.values_written}/{expected} lag={st.lag} "
                     f"errors={st.errors} {st.last_error or ''}")
            if now > deadline:
                st = c.status() if c is not None else None
                info["error"] = (f"not drained within {args.timeout:g} s: {st}")
                wlog(info["error"])
                service.request_stop()
                return
        children_hwm()
        if args.no_finalize:  # measured: leave without stopping (the parent kills us)
            wlog(f"drained: {expected} values durable; exiting without finalizing")
            say("RESULT " + json.dumps(result({})))
            os._exit(0)
        wlog(f"drained: {expected} values durable; stopping")
        marks["stop"] = pc()
        service.request_stop()

    def result(extra: dict[str, Any]) -> dict[str, Any]:
        nan = float("nan")
        t0 = marks.get("t0", start)
        cpu0, cpu1 = info.get("cpu_t0", {}), info.get("cpu_durable", {})
        cpu = {name: round(cpu1[name] - cpu0.get(name, 0.0), 2) for name in cpu1
               if cpu1[name] - cpu0.get(name, 0.0) >= 0.01}
        return {
            "error": info.get("error"),
            "drain_s": marks.get("durable", nan) - t0,
            "close_s": marks.get("close_s", nan),
            "total_s": marks.get("closed", nan) - t0,
            "stop_to_closed_s": marks.get("closed", nan) - marks.get("stop", nan),
            "shutdown_s": marks.get("returned", nan) - marks.get("stop", nan),
            "values_in_files": -1, "files": [],
            "vmhwm_kb": vm_kb("VmHWM"), "rss_t0_kb": info.get("rss_t0_kb", 0),
            "hwm_half_kb": info.get("hwm_half_kb", 0),
            "hwm_durable_kb": info.get("hwm_durable_kb", 0),
            "child_hwm_durable_kb": info.get("child_hwm_durable_kb", 0),
            "child_hwm_kb": child_hwm[0], "first_event_s": marks.get("first_event", t0) - t0,
            "handed_s": marks.get("handed", nan) - t0,
            "create_s": info.get("create_s", nan),
            "paused": info.get("paused", -1), "blocked_s": info.get("blocked_s", nan),
            "subscribe_s": info.get("subscribe_s", nan),
            "flushes": info.get("flushes", 0), "flush_s": info.get("flush_s", 0.0),
            "drain_cpu_s": cpu, "gc": gc_stats,
            "cpu_s": {k: round(v - info.get("proc_cpu_t0", {}).get(k, 0.0), 3)
                      for k, v in info.get("proc_cpu_durable", {}).items()},
            **extra,
        }

    threading.Thread(target=watch, name="bench-watch", daemon=True).start()
    rc = service.run()
    marks["returned"] = pc()
    wlog(f"service.run returned {rc}")
    c = service.controllers.get("bench")
    files = list(c.files()) if c is not None else []  # the newest (FILES_KEPT): all here
    values = 0
    from recorder.reader import open_file

    for path in files:  # the values the finalized files hold (+ a spot check of 3 PVs)
        with open_file(path) as f:
            values += int(f.iterations()["n_written"].sum())
            names = f.pv_names
            for pv in (names[0], names[len(names) // 2], names[-1]):
                if len(f.times(pv)) != len(f.values(pv)):
                    info["error"] = f"{path}: {pv} has {len(f.times(pv))} times, " \
                                    f"{len(f.values(pv))} values"
    say("RESULT " + json.dumps(result({"values_in_files": values, "files": files})))
    return 0


def stat_cpu(stat: Path) -> float:
    """CPU seconds (user + system) in a /proc ``stat`` file (a process's or a thread's)."""
    fields = stat_fields(stat)
    if fields is None:
        raise OSError(f"{stat}: gone")
    return cpu_seconds(fields)


def proc_cpu(pid: int | str = "self") -> float:
    """CPU seconds (user + system) of process ``pid`` so far (0.0 when it is gone)."""
    try:
        return stat_cpu(Path(f"/proc/{pid}/stat"))
    except (OSError, IndexError):
        return 0.0


def child_pids() -> list[str]:
    """PIDs of this process's children (in the daemon worker: its writer processes)."""
    out: list[str] = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            out += (task / "children").read_text().split()
    return out


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) per thread of this process: Python threads by their
    ``threading`` name (numbered suffixes dropped), native threads by their ``comm`` (threads
    of one name summed)."""
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            name = names.get(int(task.name)) or (task / "comm").read_text().strip()
            name = name.split(" (")[0]
            out[name] = out.get(name, 0.0) + stat_cpu(task / "stat")
    return out


# ------------------------------------------------------------------------------ the reader
def reader(args: argparse.Namespace) -> int:
    """Poll a live file (SWMR) and note when each iteration's row is committed."""
    from recorder.reader import open_file
    from recorder.sinks.livefile import read_commit

    path = Path(args.reader)
    deadline = time.monotonic() + 60
    while not path.exists():
        if time.monotonic() > deadline:
            print(f"{path} did not appear", file=sys.stderr)
            return 2
        time.sleep(0.02)
    seen: dict[int, float] = {}
    with open_file(path) as rf:
        h5 = rf.h5
        print("READY", flush=True)
        deadline = time.monotonic() + args.timeout
        done = 0
        while len(seen) < args.expect_iterations and time.monotonic() < deadline:
            commit = read_commit(h5)
            ni = commit.limits["n_iterations"]
            if ni > done:
                now = time.time()
                for index in h5["iterations"]["iter_index"][done:ni].tolist():
                    seen.setdefault(int(index), now)
                done = ni
            time.sleep(0.02)
    print("SEEN " + json.dumps(seen), flush=True)
    return 0


# ------------------------------------------------------------------------------ main
def fmt_rate(r: float) -> str:
    return f"{r / 1000:,.0f}k" if r >= 10_000 else f"{r:,.0f}"


def report(args: argparse.Namespace, cases: list[Case], latency: dict[str, Any] | None) -> None:
    def best_med(xs: list[float]) -> tuple[float, float]:
        return max(xs), statistics.median(xs)

    print()
    print(f"Command: `.venv/bin/python benchmarks/bench_e2e.py{' --quick' if args.quick else ''}"
          f"{'' if args.official else ' --no-official'}` (sink: {args.sink_mode}, "
          f"flush_interval_s={args.flush_interval}, compression={args.compression}, "
          f"{args.repeat} interleaved repeats; best / median)")
    print()
    print("| case | iterations x PVs | (a) consume+decode values/s | ours values/s "
          "(durable) | ours/(a) | (b) official+h5py values/s | ours/(b) | ours steady "
          "values/s | ours steady/(b) | ours incl. finalize values/s | finalize s | "
          "start-up s | CPU µs/value (a) / ours | peak RSS MB drain / incl. finalize |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cases:
        a_best, a_med = best_med(c.a_rates)
        o_rates = [drain_rate(c, r) for r in c.ours]
        o_best, o_med = best_med(o_rates)
        finalized = [r for r in c.ours if r["close_s"] == r["close_s"]]  # not NaN
        ratios = [o / a for o, a in zip(o_rates, c.a_rates, strict=True)]
        s_best, s_med = best_med([steady_rate(c, r) for r in c.ours])
        if c.official:
            b_best, b_med = best_med([r["rate"] for r in c.official])
            b_col = f"{fmt_rate(b_best)} / {fmt_rate(b_med)}"
            ob = f"{o_best / b_best:.0f}x / {o_med / b_med:.0f}x"
            sb = f"{s_best / b_best:.0f}x / {s_med / b_med:.0f}x"
        else:
            b_col = ob = sb = "—"
        hwm = max(r["hwm_durable_kb"] + r["child_hwm_durable_kb"] for r in c.ours) / 1024
        hwm_fin = max((max(r["vmhwm_kb"] + r["child_hwm_kb"],
                            r["hwm_durable_kb"] + r["child_hwm_durable_kb"])
                        for r in finalized), default=0) / 1024
        fin = f"{min(r['close_s'] for r in finalized):.2f}" if finalized else "—"
        tot = fmt_rate(max(c.values / r["total_s"] for r in finalized)) if finalized else "—"
        startup = statistics.median(r["first_event_s"] for r in c.ours)
        cpu_o = statistics.median(sum(r.get("cpu_s", {}).values()) / c.values * 1e6
                                  for r in c.ours)
        cpu_col = f"{statistics.median(c.a_cpu):.1f} / {cpu_o:.1f}"
        print(f"| {c.name} | {c.iterations} x {c.pvs:,} | {fmt_rate(a_best)} / {fmt_rate(a_med)} "
              f"| {fmt_rate(o_best)} / {fmt_rate(o_med)} | {o_best / a_best:.2f}x / "
              f"{statistics.median(ratios):.2f}x | {b_col} | {ob} | {fmt_rate(s_best)} / "
              f"{fmt_rate(s_med)} | {sb} | {tot} | {fin} | "
              f"{startup:.2f} | {cpu_col} | {hwm:.0f} / "
              f"{f'{hwm_fin:.0f}' if finalized else '—'} |")
    print()
    mem = {c.name: c for c in cases if c.name.startswith("scalars-1k")}
    if len(mem) == 2:
        n1, n2 = mem["scalars-1k"], mem["scalars-1k-2N"]
        h1 = max(r["hwm_durable_kb"] + r["child_hwm_durable_kb"] for r in n1.ours) / 1024
        h2 = max(r["hwm_durable_kb"] + r["child_hwm_durable_kb"] for r in n2.ours) / 1024
        s1 = max(r["rss_t0_kb"] for r in n1.ours) / 1024
        s2 = max(r["rss_t0_kb"] for r in n2.ours) / 1024
        half = max(r["hwm_half_kb"] for r in n2.ours) / 1024  # the daemon process only
        end = max(r["hwm_durable_kb"] for r in n2.ours) / 1024
        procs = "es" if args.sink_mode == "isolated" else ""
        print(f"Memory (VmHWM of the recording process{procs} when the last value was durable, "
              f"scalars-1k): "
              f"{n1.iterations} iterations {h1:.0f} MB, {n2.iterations} "
              f"iterations {h2:.0f} MB (ratio {h2 / h1:.2f}); within the {n2.iterations}-"
              f"iteration run, the daemon process: {half:.0f} MB once half the values were "
              f"durable, {end:.0f} MB at the end of the drain; RSS once subscribed "
              f"{s1:.0f} / {s2:.0f} MB")
    if latency is not None:
        print(f"Tail-to-readable latency (1,000 scalar PVs at {args.live_rate:g} Hz, "
              f"{latency['n']} iterations, flush_interval_s={args.flush_interval}): median "
              f"{latency['median_s'] * 1000:.0f} ms, p95 {latency['p95_s'] * 1000:.0f} ms, "
              f"max {latency['max_s'] * 1000:.0f} ms (reader polls every 20 ms)")
    print()
    ok_a = all(statistics.median([drain_rate(c, r) / a for r, a in
                                  zip(c.ours, c.a_rates, strict=True)]) >= 0.6 for c in cases)
    print(f"Targets: ours/(a) >= 0.6x: {'met' if ok_a else 'NOT met'} (median ratio, every case)")
    if args.official:
        official = [c for c in cases if c.official]

        def verdict(rate: Callable[[Case, dict[str, Any]], float]) -> str:
            ok = [statistics.median([rate(c, r) for r in c.ours])
                  / statistics.median([r["rate"] for r in c.official]) >= 20 for c in official]
            return f"met in {sum(ok)} of {len(ok)} cases"

        print("ours/(b) >= 20x (medians): like for like, both without one-time start-up (ours "
              f"steady vs (b) after its warm-ups): {verdict(steady_rate)}; with our start-up "
              f"counted: {verdict(drain_rate)}")


def drain_rate(c: Case, r: dict[str, Any]) -> float:
    """Ours: values / (topic assigned -> last value durable), start-up included."""
    return float(c.values / r["drain_s"])


def steady_rate(c: Case, r: dict[str, Any]) -> float:
    """Ours without the one-time start-up: values / (first event handed to the recording ->
    last value durable), as (b) is measured after its warm-ups (group join, datasets)."""
    return float(c.values / (r["drain_s"] - r["first_event_s"]))


def compile_recorder() -> None:
    """Byte-compile the recorder package, as ``pip install`` does for a regular install.

    The benchmark runs from the editable development install. Where PYTHONDONTWRITEBYTECODE
    is set, as on this project's machines, no module of it would ever get a ``.pyc``. Every
    process the benchmark measures would then compile the modules it imports from source:
    the daemon, and each writer process it spawns, while the measured start-up runs. That
    cost ~0.1 s of CPU per process here (``import recorder.sinks.hdf5``: 0.55 s against
    0.45 s), and an installed daemon never pays it.
    """
    import compileall

    compileall.compile_dir(str(ROOT / "recorder"), quiet=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller runs, 1 repeat")
    parser.add_argument("--repeat", type=int, help="interleaved repeats (default 3, quick 2)")
    parser.add_argument("--no-official", dest="official", action="store_false",
                        help="skip baseline (b) (the official client)")
    parser.add_argument("--official-repeat", type=int, default=0, metavar="N",
                        help="run (b) in the first N repeats only (default: in each)")
    parser.add_argument("--no-latency", dest="latency", action="store_false")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--sink", dest="sink_mode", choices=("isolated", "hdf5"),
                        default="isolated",
                        help="the run's output.isolate: isolated (default, the daemon's "
                             "default: IsolatedRecording, a writer process per recording) or "
                             "hdf5 (isolate: false, HDF5Recording in the daemon's process)")
    parser.add_argument("--flush-interval", type=float, default=1.0)
    parser.add_argument("--max-buffer-mb", type=float, default=0.0,
                        help="the run's output.max_buffer_bytes in MiB (0: its default)")
    parser.add_argument("--compression", default="gzip", help="output compression (run "
                        "definition default: gzip)")
    parser.add_argument("--live-rate", type=float, default=10.0, help="latency run: Hz")
    parser.add_argument("--live-iterations", type=int, default=50)
    parser.add_argument("--profile", metavar="DIR", help="py-spy (raw, per thread) every daemon "
                        "worker into DIR (needs py-spy in the venv)")
    parser.add_argument("--switch-interval", type=float, default=sys.getswitchinterval(),
                        help="sys.setswitchinterval of the daemon worker (diagnostics; "
                        "default: Python's)")
    parser.add_argument("--gc", choices=("daemon", "untuned"), default="daemon",
                        help="daemon: the daemon's GC tuning (Service.tune_gc); untuned: "
                        "Python's defaults (to show the difference)")
    parser.add_argument("--run-timeout", type=float, default=180.0,
                        help="bound on each drain (seconds)")
    # internal
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reader", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--broker-pid", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cmd-topic", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--pvs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--expect-values", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--expect-iterations", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=180.0, help=argparse.SUPPRESS)
    parser.add_argument("--no-finalize", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.sink = args.sink_mode
        return worker(args)
    if args.reader:
        return reader(args)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    compile_recorder()
    if args.official and not K2EG_PYTHON.exists():
        print(f"{K2EG_PYTHON} missing: create .venv-k2eg (scripts/test) and "
              "`.venv-k2eg/bin/pip install h5py`, or pass --no-official", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    from recorder.broker import EmbeddedBroker
    from recorder.sim import GatewaySimulator

    cases = cases_for(args.quick)
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.name in wanted]
    broker = EmbeddedBroker()
    sim: GatewaySimulator | None = None
    latency = None
    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        broker.start()
        args.bootstrap = broker.bootstrap_servers
        args.broker_pid = broker.pid
        progress(f"broker pid {broker.pid} on {args.bootstrap}")
        cmd_topic = f"bench-e2e-cmd-{uuid.uuid4().hex[:6]}"
        sim = GatewaySimulator(args.bootstrap, cmd_topic).start()
        prod = producer(args.bootstrap)
        for c in cases:
            c.topic = f"bench_e2e_{c.name.replace('-', '_').lower()}_{uuid.uuid4().hex[:6]}"
            t = time.perf_counter()
            messages = encode(c, 1, c.iterations, past=True)
            produce_all(prod, c.topic, messages)
            c.messages, c.values = len(messages), c.iterations * c.pvs
            del messages
            progress(f"{c.name}: {c.iterations} iterations x {c.pvs} PVs = {c.messages:,} "
                     f"messages produced in {time.perf_counter() - t:.1f} s")
        for r in range(args.repeat):
            for c in cases:
                a, a_cpu = run_a(args.bootstrap, c.topic, c.messages, broker.pid)
                c.a_rates.append(c.values / a)
                c.a_cpu.append(a_cpu / c.values * 1e6)
                progress(f"{c.name} #{r + 1}: (a) {c.values / a:,.0f} values/s ({a:.2f} s, "
                         f"CPU incl. broker {a_cpu:.2f} s)")
                # finalizing costs seconds per 1,000 PVs and does not depend on the drain:
                # measured on the last repeat only (--quick: not for 10k PVs); earlier repeats
                # end the daemon once the data is durable. Last, because a stop makes the
                # gateway publish a final iteration into the topic: iteration N + 1 after
                # the N pre-filled ones (as the real gateway's counter goes on; iter_index 1
                # again with older timestamps was dropped as late, and a stop waits for its
                # final iteration, decision 0015)
                fin = r == args.repeat - 1 and not (args.quick and c.pvs > 1000)
                assert sim is not None
                sim.continue_iterations(c.topic, c.iterations)
                o = run_ours(args, c, cmd_topic, tmp, str(r), finalize=fin)
                c.ours.append(o)
                progress(f"{c.name} #{r + 1}: ours {c.values / o['drain_s']:,.0f} values/s "
                         f"durable ({o['drain_s']:.2f} s), finalize {o['close_s']:.2f} s, "
                         f"stop->closed {o['stop_to_closed_s']:.2f} s, shutdown "
                         f"{o['shutdown_s']:.2f} s, HWM "
                         f"{(o['vmhwm_kb'] + o['child_hwm_kb']) / 1024:.0f} MB (durable "
                         f"{o['hwm_durable_kb'] / 1024:.0f} + writer "
                         f"{o['child_hwm_durable_kb'] / 1024:.0f}, half "
                         f"{o['hwm_half_kb'] / 1024:.0f} MB); subscribe "
                         f"{o['subscribe_s']:.2f} s, create {o.get('create_s', 0):.2f} s, "
                         f"first event "
                         f"{o['first_event_s']:.2f} s, all handed {o.get('handed_s', 0):.2f} s, "
                         f"{o['flushes']} flushes "
                         f"{o['flush_s']:.2f} s, topic paused {o.get('paused')}x, handle blocked "
                         f"{o.get('blocked_s', 0):.2f} s, drain CPU {o['drain_cpu_s']}, "
                         f"GC {o['gc']}, CPU s (t0 -> durable) {o.get('cpu_s')}")
                if (args.official and c.official_iterations
                        and (not args.official_repeat or r < args.official_repeat)):
                    b = run_official(args, c, cmd_topic, tmp, str(r))
                    c.official.append(b)
                    progress(f"{c.name} #{r + 1}: (b) {b['rate']:,.0f} values/s "
                             f"({b['seconds']:.2f} s; produced in {b['produce_s']:.2f} s, "
                             f"handler busy {b['handler_busy_s']:.2f} s)")
        if args.latency:
            latency = run_latency(args, cmd_topic, tmp)
            progress(f"latency: median {latency['median_s']:.3f} s, p95 "
                     f"{latency['p95_s']:.3f} s")
    except (BenchError, KeyboardInterrupt) as exc:
        progress(f"FAILED: {exc}")
        progress(f"files kept for inspection in {tmp}")
        tmp = Path()
        return 1
    finally:
        CHILDREN.kill_all()
        if sim is not None:
            sim.stop(5)
        close_producers()
        broker.stop()
        if tmp != Path():
            shutil.rmtree(tmp, ignore_errors=True)
    report(args, cases, latency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
