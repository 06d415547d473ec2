"""HDF5 sink throughput: HDF5Recording vs plain h5py (block writes and naive per-value appends).

Run: ``.venv/bin/python benchmarks/bench_sink.py [--quick] [--repeat R] [--only scalar|waveform]``

For 10, 1,000 and 10,000 PVs, of two kinds:

* ``scalar``: NTScalar double PVs with the gateway's full structure (value, alarm, timeStamp,
  display, control, valueAlarm), built from the gateway simulator's PV model;
* ``waveform``: NTScalarArray double PVs of 1,000 elements (value, alarm, timeStamp, display),

iterations are generated (values are deterministic noisy signals, so compression has real
work), handed to the sink as decoded, typed :class:`PVSample` s (what the client emits; the
client's decoding is not timed here) and timed through:

* ``sink``: :class:`recorder.sinks.hdf5.HDF5Recording`: ``handle`` every event,
  ``maybe_flush`` after every iteration (``flush_interval_s`` = 1 s of sink time), then
  ``close()``, which finalizes the file (the finalize time is also reported on its own);
* (a) ``block``: plain h5py writing the same values, one dataset per PV, whole array at once,
  same compression/chunking as the sink's final layout — the physical limit;
* (b) ``naive``: plain h5py, one dataset per PV created up front, and for every iteration
  and every PV ``resize`` + write of that one value (what a user script does).

Printed: PV values/s for each, the ratios sink/(a) and sink/(b) (target sink/(a) >= 0.5),
the finalize time, and the flush time per flush (ms, and µs per value) so that the growth of
flush time with the number of PVs can be read off. Each measurement is repeated (interleaved)
and the best is kept.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recorder.client.events import (
    IterationClosed,
    IterationEvent,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.values import PVSample
from recorder.sim.pvs import parse_pv, pv_structure
from recorder.sinks.filters import filter_kwargs, rows_per_chunk
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions

WAVEFORM_LEN = 1000
PV_COUNTS = (10, 1_000, 10_000)
# total PV values per configuration (full run); --quick divides by 5
TOTAL_VALUES = {"scalar": 200_000, "waveform": 20_000}
MIN_ITERATIONS = 2


# ------------------------------------------------------------------------------ the data
def pv_names(kind: str, n: int) -> list[str]:
    if kind == "scalar":
        return [f"BENCH:AI:DOUBLE:{i}" for i in range(n)]
    return [f"BENCH:WF:DOUBLE:{i}:N{WAVEFORM_LEN}" for i in range(n)]


def templates(kind: str, names: list[str], wall_ns: int) -> list[dict[str, Any]]:
    """One full PV structure per PV from the simulator's model (value etc. replaced later)."""
    return [pv_structure(parse_pv("SIM:" + name.removeprefix("BENCH:")), 0, wall_ns)
            for name in names]


def values_at(kind: str, n_pvs: int, k: int) -> npt.NDArray[np.float64]:
    """The values of iteration ``k``: (n_pvs,) for scalars, (n_pvs, WAVEFORM_LEN) for waveforms.

    Noisy signals quantized to 1e-4 (like a 16-bit ADC scaled to engineering units), so gzip
    has real work to do but also something to gain."""
    rng = np.random.default_rng(k)
    if kind == "scalar":
        base = np.sin(np.arange(n_pvs) * 0.1 + k * 0.01) * 5.0
        out: npt.NDArray[np.float64] = np.round(base + rng.normal(0, 0.05, n_pvs), 4)
        return out
    x = np.linspace(0, 2 * np.pi, WAVEFORM_LEN)
    phase = np.arange(n_pvs)[:, None] * 0.1 + k * 0.01
    signal = np.sin(x[None, :] + phase) * 3.0
    return np.round(signal + rng.normal(0, 0.01, (n_pvs, WAVEFORM_LEN)), 4)


@dataclass
class Workload:
    kind: str
    n_pvs: int
    n_iter: int
    names: list[str]
    tmpl: list[dict[str, Any]]
    t0_ns: int

    @property
    def n_values(self) -> int:
        return self.n_pvs * self.n_iter

    def iteration(self, k: int) -> tuple[npt.NDArray[np.float64], list[IterationEvent]]:
        """Values and the events of iteration ``k`` (samples decoded and typed, as the client
        hands them over)."""
        vals = values_at(self.kind, self.n_pvs, k)
        wall = self.t0_ns + k * 100_000_000
        ts = {"secondsPastEpoch": wall // 1_000_000_000, "nanoseconds": wall % 1_000_000_000,
              "userTag": 0}
        rows = vals.tolist()
        samples = []
        for name, tmpl, v in zip(self.names, self.tmpl, rows, strict=True):
            data = dict(tmpl)
            data["value"] = v
            data["timeStamp"] = dict(ts)
            data["alarm"] = {"severity": 0, "status": 0, "message": "NO_ALARM"}
            s = PVSample(name, data, frozenset())
            s.kind  # noqa: B018 - type the value now: that is the client's work, not timed
            samples.append(s)
        events: list[IterationEvent] = [
            IterationOpened("bench", "snap", k, wall, offset=3 * k),
            ValuesReceived("bench", k, 1, wall, tuple(samples), offset=3 * k + 1),
            IterationClosed("bench", "snap", k, IterationStatus.COMPLETE, None, wall, wall,
                            n_values=self.n_pvs, n_pvs=self.n_pvs, n_batches=1,
                            offset=3 * k + 2),
        ]
        return vals, events

    def all_values(self) -> npt.NDArray[np.float64]:
        """(n_iter, n_pvs[, WAVEFORM_LEN]) — what the baselines write."""
        return np.stack([values_at(self.kind, self.n_pvs, k) for k in range(self.n_iter)])


def workload(kind: str, n_pvs: int, scale: float) -> Workload:
    n_iter = max(MIN_ITERATIONS, int(TOTAL_VALUES[kind] * scale) // n_pvs)
    names = pv_names(kind, n_pvs)
    t0 = 1_700_000_000 * 1_000_000_000
    return Workload(kind, n_pvs, n_iter, names, templates(kind, names, t0), t0)


# ------------------------------------------------------------------------------ measurements
@dataclass
class SinkResult:
    seconds: float  # handle + flushes + close (finalize included)
    live_seconds: float  # handle + flushes
    finalize_seconds: float
    flush_seconds: list[float] = field(default_factory=list)
    flush_values: list[int] = field(default_factory=list)
    file_bytes: int = 0


def run_sink(w: Workload, directory: Path, options: dict[str, Any]) -> SinkResult:
    opts = OutputOptions(directory=directory, **options)
    timed = 0.0
    flushes: list[float] = []
    flush_values: list[int] = []
    # the recording's clock only runs while the sink works (event generation is not timed),
    # so flush_interval_s=1 means one flush per second of sink time, as when saturated
    rec = HDF5Recording(opts, run_name="bench", pv_uris=[f"pva://{n}" for n in w.names],
                        clock=lambda: timed)
    flush = rec.flush

    def timed_flush() -> None:  # every flush: by time (maybe_flush) or by size (handle)
        before = rec.counters["values"]
        flush()
        flushes.append(rec.last_flush_seconds)
        flush_values.append(rec.counters["values"] - before)

    rec.flush = timed_flush  # type: ignore[method-assign]
    for k in range(w.n_iter):
        _vals, events = w.iteration(k)
        t = time.perf_counter()
        for ev in events:
            rec.handle(ev)
        rec.maybe_flush()
        timed += time.perf_counter() - t
        del events
    t = time.perf_counter()
    flush()  # the last data, before close (not counted as a periodic flush)
    live = timed + time.perf_counter() - t
    assert rec.status == "recording", rec.reason
    t = time.perf_counter()
    paths = rec.close()
    fin = time.perf_counter() - t
    assert rec.status == "complete" and len(paths) == 1, rec.reason
    size = paths[0].stat().st_size
    return SinkResult(live + fin, live, fin, flushes, flush_values, size)


def block_baseline(w: Workload, values: npt.NDArray[Any], directory: Path,
                   options: dict[str, Any]) -> tuple[float, int]:
    """(a): one dataset per PV, whole array at once, the final layout's compression/chunks."""
    opts = OutputOptions(directory=directory, **options)
    path = directory / "block.h5"
    t = time.perf_counter()
    with h5py.File(path, "w", libver=("v110", "v110")) as f:
        g = f.create_group("pvs")
        for col, name in enumerate(w.names):
            data = np.ascontiguousarray(values[:, col])
            kwargs, _plugin = filter_kwargs(opts, data.dtype)
            row_bytes = max(1, int(np.prod(data.shape[1:])) * data.dtype.itemsize)
            rows = min(len(data), rows_per_chunk(row_bytes, target=512 * 1024))
            g.create_dataset(name, data=data, chunks=(rows, *data.shape[1:]), **kwargs)
    seconds = time.perf_counter() - t
    size = path.stat().st_size
    path.unlink()
    return seconds, size


def naive_baseline(w: Workload, values: npt.NDArray[Any], directory: Path,
                   options: dict[str, Any]) -> float:
    """(b): per iteration, per PV: resize by one and write the value."""
    opts = OutputOptions(directory=directory, **options)
    path = directory / "naive.h5"
    t = time.perf_counter()
    with h5py.File(path, "w", libver=("v110", "v110")) as f:
        g = f.create_group("pvs")
        shape = values.shape[2:]
        datasets = []
        for name in w.names:
            kwargs, _plugin = filter_kwargs(opts, values.dtype)
            row_bytes = max(1, int(np.prod(shape)) * values.dtype.itemsize)
            rows = min(w.n_iter, rows_per_chunk(row_bytes, target=512 * 1024))
            datasets.append(g.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape),
                                             dtype=values.dtype, chunks=(rows, *shape),
                                             **kwargs))
        for k in range(w.n_iter):
            row = values[k]
            for col, ds in enumerate(datasets):
                ds.resize((k + 1, *shape))
                ds[k] = row[col]
    seconds = time.perf_counter() - t
    path.unlink()
    return seconds


# ------------------------------------------------------------------------------ main
@dataclass
class Row:
    kind: str
    n_pvs: int
    n_iter: int
    sink: list[SinkResult] = field(default_factory=list)
    block: list[float] = field(default_factory=list)
    naive: list[float] = field(default_factory=list)
    block_bytes: int = 0


def run(kinds: list[str], counts: list[int], scale: float, repeat: int,
        options: dict[str, Any]) -> Iterator[Row]:
    for kind in kinds:
        for n_pvs in counts:
            w = workload(kind, n_pvs, scale)
            values = w.all_values()
            row = Row(kind, n_pvs, w.n_iter)
            for _ in range(repeat):
                for method in ("sink", "block", "naive"):  # interleaved
                    with tempfile.TemporaryDirectory(prefix="bench_sink_") as tmp:
                        gc.collect()
                        if method == "sink":
                            row.sink.append(run_sink(w, Path(tmp), options))
                        elif method == "block":
                            secs, row.block_bytes = block_baseline(w, values, Path(tmp), options)
                            row.block.append(secs)
                        else:
                            row.naive.append(naive_baseline(w, values, Path(tmp), options))
            del values
            yield row


def report(rows: list[Row]) -> None:
    print()
    print("| kind | PVs | iterations | sink values/s | finalize s | (a) block values/s | "
          "(b) naive values/s | sink/(a) | sink/(b) | live only/(a) | flush ms (mean) | "
          "values/flush | flush µs/value |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        n = r.n_pvs * r.n_iter
        best = min(r.sink, key=lambda s: s.seconds)
        sink = n / best.seconds
        live = n / best.live_seconds
        block = n / min(r.block)
        naive = n / min(r.naive)
        fl = [s for res in r.sink for s in res.flush_seconds]
        fv = [v for res in r.sink for v in res.flush_values]
        mean_ms = statistics.mean(fl) * 1e3 if fl else float("nan")
        per_flush = statistics.mean(fv) if fv else float("nan")
        per_value = sum(fl) / max(1, sum(fv)) * 1e6 if fl else float("nan")
        print(f"| {r.kind} | {r.n_pvs:,} | {r.n_iter:,} | {sink:,.0f} | "
              f"{best.finalize_seconds:.2f} | {block:,.0f} | {naive:,.0f} | "
              f"{sink / block:.2f} | {sink / naive:.1f} | {live / block:.2f} | "
              f"{mean_ms:.1f} | {per_flush:,.0f} | {per_value:.2f} |")
    print()
    print("file sizes (MB, last run): " + ", ".join(
        f"{r.kind}/{r.n_pvs}: sink {r.sink[-1].file_bytes / 1e6:.1f} "
        f"block {r.block_bytes / 1e6:.1f}" for r in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1/5 of the values")
    parser.add_argument("--repeat", type=int, default=None, help="repeats (default 1)")
    parser.add_argument("--only", choices=("scalar", "waveform"), default=None)
    parser.add_argument("--pvs", type=int, nargs="*", default=None, help="PV counts")
    parser.add_argument("--compression", default="gzip")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    scale = 0.2 if args.quick else 1.0
    repeat = args.repeat or 1  # the full run takes ~4 minutes with 1
    kinds = [args.only] if args.only else ["scalar", "waveform"]
    counts = args.pvs or list(PV_COUNTS)
    options = {"compression": args.compression, "flush_interval_s": 1.0}
    print(f"h5py {h5py.version.version}, HDF5 {h5py.version.hdf5_version}, "
          f"compression {args.compression}, repeat {repeat}, scale {scale}")
    start = time.perf_counter()
    rows = []
    for row in run(kinds, counts, scale, repeat, options):
        rows.append(row)
        best = min(s.seconds for s in row.sink)
        print(f"{row.kind:8} {row.n_pvs:6} PVs x {row.n_iter:6} its: sink {best:.2f} s "
              f"(finalize {min(s.finalize_seconds for s in row.sink):.2f} s), "
              f"block {min(row.block):.2f} s, naive {min(row.naive):.2f} s", flush=True)
    report(rows)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
