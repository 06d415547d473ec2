"""Replay and per-PV reading: what ``k2eg-recorder replay`` and a loop over every PV cost.

Run: ``.venv/bin/python benchmarks/bench_replay.py [--quick]`` (~4 min; ``--quick``: ~1 min)

Files are written first (not timed) with :class:`recorder.sinks.hdf5.HDF5Recording` from the
sink benchmark's gateway-faithful messages (``bench_sink.Workload``): 1,000 NTScalar PVs x 100
iterations (``--quick``: 30) and 100 waveform PVs of 1,000 float64 x 700 iterations (230 MB;
``--quick``: 100).

* ``replay``: ``k2eg-recorder replay FILE --speed 0`` (a fresh process, start-up included) to
  an embedded broker (Tansu), vs (a) a plain confluent-kafka producer, same settings, sending
  the same message bytes, encoded beforehand (untimed): the broker's and librdkafka's limit.
  Values per second, replay/(a), and the replay process's peak RSS (it reads the file a
  window of iterations at a time, ~64 MB of packed values).
* ``core``: reading and packing alone (``recorder.replay.iterations`` + ``encode_iteration``,
  no Kafka, a fresh process each) as shipped (rows packed by template, windows sized in
  bytes) vs (b) every row rebuilt as a sample and packed whole in windows of 65,536 values
  (the code before 2026-11-24): speed and peak RSS.
* ``names``: ``values(pv)`` of every PV of a 10,000-PV final file (``--quick``: 2,000), as
  shipped (PV names read once) vs the names read again for every PV (what the reader did
  before 2026-11-23), best of 2 each.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_sink  # noqa: E402
import structlog  # noqa: E402
from procfs import status_kb  # noqa: E402

from recorder import reader  # noqa: E402
from recorder.broker import EmbeddedBroker  # noqa: E402
from recorder.sinks.hdf5 import HDF5Recording  # noqa: E402
from recorder.sinks.options import OutputOptions  # noqa: E402

T0_NS = 1_700_000_000 * 1_000_000_000


def write_file(kind: str, n_pvs: int, n_iter: int, directory: Path) -> tuple[Path, int]:
    w = bench_sink.Workload(kind, n_pvs, n_iter, bench_sink.pv_names(kind, n_pvs), T0_NS)
    rec = HDF5Recording(OutputOptions(directory=directory), run_name=f"{kind}-{n_pvs}",
                        pv_uris=[f"pva://{x}" for x in w.names])
    for k in range(w.n_iter):
        for event in w.events(k):
            rec.handle(event)
    (path,) = rec.close()
    return path, w.n_values


def replay_seconds(path: Path, bootstrap: str, topic: str) -> tuple[float, float]:
    """The replay's wall time and its process's peak RSS (MB): its VmHWM, read every 50 ms
    (getrusage's ru_maxrss of a child counts this process's RSS at the fork too)."""
    t = time.perf_counter()
    hwm_kb = 0
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "recorder.cli", "replay", str(path),
                                 "--topic", topic, "--speed", "0", "--bootstrap", bootstrap],
                                stdout=subprocess.DEVNULL, stderr=err)
        while proc.poll() is None:
            hwm_kb = max(hwm_kb, status_kb(proc.pid).get("VmHWM", 0))
            time.sleep(0.05)
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"replay failed: {err.read().decode(errors='replace')}")
    return seconds, hwm_kb / 1024


def plain_seconds(path: Path, bootstrap: str, topic: str) -> float:
    """(a): the same bytes, encoded beforehand, through a plain producer."""
    from confluent_kafka import Producer

    from recorder.replay import encode_iteration, iterations, snapshot_name_of
    from recorder.sim.encoding import SER_HEADER, SER_MSGPACK

    with reader.open_file(path) as f:
        name = snapshot_name_of(f)
        messages = [m for it in iterations(f) for m in encode_iteration(it, name, sequenced=True)]
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5,
                         "compression.type": "snappy"})
    key = name.encode()
    headers: list[tuple[str, str | bytes | None]] = [(SER_HEADER, SER_MSGPACK)]
    t = time.perf_counter()
    for value in messages:
        while True:
            try:
                producer.produce(topic, value=value, key=key, headers=headers)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(60):
        raise SystemExit("(a): messages not delivered")
    return time.perf_counter() - t


def names_loop(path: Path, cached: bool) -> float:
    original = reader.RecordingFile._pv_names

    def uncached(self: Any) -> Any:
        self._names = None
        return original(self)

    if not cached:
        reader.RecordingFile._pv_names = uncached  # type: ignore[method-assign]
    try:
        best = float("inf")
        for _ in range(2):
            with reader.open_file(path) as f:
                t = time.perf_counter()
                for pv in f.pv_names:
                    f.values(pv)
                best = min(best, time.perf_counter() - t)
        return best
    finally:
        reader.RecordingFile._pv_names = original  # type: ignore[method-assign]


def core_child(path: str, mode: str) -> int:
    """``--core-child``: :func:`recorder.replay.iterations` + ``encode_iteration`` of every
    iteration of ``path`` in this (fresh) process; prints ``seconds VmHWM-kB``. ``mode``
    ``whole``: as replay read and packed before 2026-11-24 (every row rebuilt as a sample and
    packed whole, windows of 65,536 values)."""
    from recorder import replay

    if mode == "whole":
        reader.RecordingFile.stored_rows = lambda *_a: None  # type: ignore[method-assign]
        replay.WINDOW_VALUES = 65_536
        replay.WINDOW_BYTES = replay.FIRST_WINDOW = 1 << 62
    t = time.perf_counter()
    with reader.open_file(path) as f:
        for it in replay.iterations(f):
            replay.encode_iteration(it, "snap", sequenced=True)
    seconds = time.perf_counter() - t
    print(seconds, status_kb()["VmHWM"])
    return 0


def core(path: Path, mode: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, __file__, "--core-child", str(path), mode],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1]) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--core-child", nargs=2, metavar=("FILE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.core_child:
        return core_child(*args.core_child)
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp, EmbeddedBroker() as broker:
        cores: list[str] = []
        print("| file | values | replay values/s (s) | replay peak RSS | (a) plain producer "
              "values/s (s) | replay/(a) |\n|---|---|---|---|---|---|")
        # the waveforms: more values than one window held before 2026-11-24 (65,536 values,
        # as Python floats): 700 iterations held 2.6 GB then
        for kind, n_pvs, n_iter in (("scalar", 1000, 30 if args.quick else 100),
                                    ("waveform", 100, 100 if args.quick else 700)):
            path, n_values = write_file(kind, n_pvs, n_iter, Path(tmp) / kind)
            ours, rss_mb = replay_seconds(path, broker.bootstrap_servers, f"replay-{kind}")
            plain = plain_seconds(path, broker.bootstrap_servers, f"plain-{kind}")
            name = f"{n_pvs} {kind} PVs x {n_iter} ({path.stat().st_size / 1e6:.0f} MB)"
            print(f"| {name} | {n_values:,} | {n_values / ours:,.0f} ({ours:.2f}) | "
                  f"{rss_mb:.0f} MB | {n_values / plain:,.0f} ({plain:.2f}) | "
                  f"{plain / ours:.2f}x |", flush=True)
            (t_new, m_new), (t_old, m_old) = core(path, "templates"), core(path, "whole")
            cores.append(f"| {name} | {n_values / t_new:,.0f} ({t_new:.2f}) | {m_new:.0f} MB "
                         f"| {n_values / t_old:,.0f} ({t_old:.2f}) | {m_old:.0f} MB | "
                         f"{t_old / t_new:.2f}x |")
        print("\nReading and packing alone (iterations + encode_iteration, no Kafka; a fresh "
              "process each): as shipped vs (b) every row rebuilt as a sample and packed whole "
              "in windows of 65,536 values (before 2026-11-24)\n\n| file | values/s (s) | "
              "peak RSS | (b) values/s (s) | (b) peak RSS | speed-up |\n|---|---|---|---|---|---|")
        print("\n".join(cores), flush=True)
        n_pvs = 2000 if args.quick else 10_000
        path, _ = write_file("scalar", n_pvs, 20, Path(tmp) / "names")
        new, old = names_loop(path, True), names_loop(path, False)
        print(f"\nvalues() of every PV of a {n_pvs:,}-PV file: {new:.2f} s with the names "
              f"read once vs {old:.2f} s read again per PV ({old / new:.1f}x faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
