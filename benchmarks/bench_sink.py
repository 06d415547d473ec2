"""HDF5 sink throughput: HDF5Recording vs plain h5py (block writes and naive per-value appends).

Run: ``.venv/bin/python benchmarks/bench_sink.py [--quick] [--repeat R] [--only scalar|waveform]
[--pvs N ...] [--compression gzip|lzf|none|zstd|blosc2] [--check]``

What is measured
----------------
For 10, 1,000 and 10,000 PVs, of two kinds:

* ``scalar``: NTScalar double PVs with the gateway's full structure (value, alarm, timeStamp,
  display, control, valueAlarm), from the gateway simulator's PV model
  (:func:`recorder.sim.pvs.pv_structure`);
* ``waveform``: NTScalarArray double PVs of 1,000 elements (value, alarm, timeStamp, display),
  float64 on the wire as the gateway sends ``double[]``,

iterations of deterministic noisy values (quantized to 1e-4, so compression has real work)
are generated. Each PV of each iteration becomes the gateway's *data message*
(``{message_type: 1, timestamp, iter_index, msg_seq, submission_seq[, last_submission_data],
"<pv>": {...}}``), encoded by the simulator's gateway-faithful msgpack encoder
(:func:`recorder.sim.encoding.pack`; the big ``value`` part is spliced in with numpy, and
checked byte for byte against ``pack`` of the whole message for every workload). The sink gets
what the client hands it: :meth:`PVSample.from_raw` samples over those message bytes (the
client's wire decoder builds the same lazy samples; that is checked too, with
:func:`recorder.client.wire.decode_snapshot_message`), nothing decoded yet. Per-PV
``timeStamp`` s differ (each PV updated a little before the snapshot), and scalars above
|4.9| carry a MINOR alarm. Generating the messages is not timed; everything the sink does with
them is, including decoding them (the sink's real work):

* ``sink``: :class:`recorder.sinks.hdf5.HDF5Recording`: ``handle`` every event,
  ``maybe_flush`` after every iteration (``flush_interval_s`` = 1 s of sink time: the sink's
  clock only runs while it works, as when saturated), a last ``flush``, then ``close()``,
  which finalizes the file (the finalize time is also reported alone). The daemon runs the
  sink in its writer process; here it is called directly, with that process's garbage-collector
  settings (:func:`recorder.gctune.tune_gc`);
* (a) ``block``: plain h5py, ordinary high-level API, writing the same data in large blocks:
  per PV what the sink stores in its NXlog group, i.e. a group with ``value``, ``time``
  (int64 ns, the PV's EPICS timeStamp), ``iteration`` (int64), ``severity`` and ``status``
  (int32, the alarm), each dataset created from its whole array in one call with the sink's
  compression rule (:func:`recorder.sinks.filters.filter_kwargs`) and chunks of about
  512 KiB (:func:`~recorder.sinks.filters.rows_per_chunk`). These are the columns any
  faithful record of the values needs (a value without its time and alarm is not the PV's
  value), so this is the physical limit of writing the sink's data to disk with h5py;
* (a0) ``value-only``: the same with only the value column, one dataset per PV (the old
  baseline, shown so both can be read; it understates the work of any real recorder);
* (b) ``naive``: plain h5py, per PV the group and its five datasets created up front, then for
  every iteration and every PV ``resize`` + write of that one row in each of the five
  datasets (what a careful user script does).

Printed per row: PV values/s of each, the ratios sink/(a), sink/(a0), sink/(b), the verdict
against the target (sink/(a) >= 0.5), the finalize time, and the flush time (ms per flush, and
µs per value, over the flushes that wrote data). Per kind, the flush-growth check compares the
flush time per value at the smallest and largest PV count (10 and 10,000): the target (flush
time grows no faster than the number of PVs) is met when the µs per value grows by less than
the PV count does; whether it is flat (ratio <= 1) is printed too. Each measurement is
repeated (interleaved) and the best is kept.

``--check`` (first repeat): reads the sink's final file back with :mod:`recorder.reader` and
compares value (and dtype), time, iteration, severity and status of the first, a middle and
the last PV with the (a), (a0) and (b) files and with the generated data; any difference
exits non-zero.
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
from recorder.client.wire import Data, decode_snapshot_message
from recorder.gctune import tune_gc
from recorder.reader import open_file
from recorder.sim.encoding import SER_HEADER, SER_MSGPACK, pack
from recorder.sim.pvs import MINOR, RECORD_STATUS, parse_pv, pv_structure
from recorder.sinks.filters import filter_kwargs, rows_per_chunk
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions

WAVEFORM_LEN = 1000
PV_COUNTS = (10, 1_000, 10_000)
# total PV values per configuration (full run); --quick divides by 5
TOTAL_VALUES = {"scalar": 200_000, "waveform": 20_000}
MIN_ITERATIONS = 2
PERIOD_NS = 100_000_000  # one iteration every 100 ms
ALARM_LIMIT = 4.9  # scalars beyond +-this carry a MINOR alarm
TOPIC, SNAPSHOT = "bench", "snap"
HEADERS = [(SER_HEADER, SER_MSGPACK.encode())]
CHUNK_BYTES = 512 * 1024
COLUMNS = ("value", "time", "iteration", "severity", "status")
TARGET = 0.5  # sink/(a)

Array = npt.NDArray[Any]


# ------------------------------------------------------------------------------ the data
def pv_names(kind: str, n: int) -> list[str]:
    if kind == "scalar":
        return [f"BENCH:AI:DOUBLE:{i}" for i in range(n)]
    return [f"BENCH:WF:DOUBLE:{i}:N{WAVEFORM_LEN}" for i in range(n)]


def template(name: str, wall_ns: int) -> dict[str, Any]:
    """The simulator's full PV structure for ``name`` (value, alarm, timeStamp replaced later)."""
    return pv_structure(parse_pv("SIM:" + name.removeprefix("BENCH:")), 0, wall_ns)


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


def alarm(severity: int, value: float) -> dict[str, Any]:
    if not severity:
        return {"severity": 0, "status": 0, "message": "NO_ALARM"}
    return {"severity": severity, "status": RECORD_STATUS,
            "message": "HIGH" if value > 0 else "LOW"}


def time_stamp(ns: int) -> dict[str, Any]:
    return {"secondsPastEpoch": ns // 1_000_000_000, "nanoseconds": ns % 1_000_000_000,
            "userTag": 0}


def items(mapping: dict[str, Any]) -> bytes:
    """The encoded key/value pairs of a (small) map, without the map header."""
    assert len(mapping) < 16
    return pack(mapping)[1:]


def fixmap(n: int) -> bytes:
    assert n < 16
    return bytes((0x80 | n,))


_F64 = np.dtype([("marker", "u1"), ("value", ">f8")])  # msgpack float64: 0xcb + big endian


def float64_elements(values: Array) -> bytes:
    """``values`` as consecutive msgpack float64 objects (what ``pack`` gives for floats)."""
    packed = np.empty(values.shape, _F64)
    packed["marker"] = 0xCB
    packed["value"] = values
    return packed.tobytes()


@dataclass
class Columns:
    """What the sink must store, per iteration (row) and PV (column)."""

    value: Array  # (n_iter, n_pvs[, WAVEFORM_LEN]) float64
    time: Array  # (n_iter, n_pvs) int64 ns
    iteration: Array  # (n_iter,) int64
    severity: Array  # (n_iter, n_pvs) int32
    status: Array  # (n_iter, n_pvs) int32

    def of(self, col: int) -> dict[str, Array]:
        """The five columns of PV ``col`` (contiguous copies)."""
        return {
            "value": np.ascontiguousarray(self.value[:, col]),
            "time": np.ascontiguousarray(self.time[:, col]),
            "iteration": self.iteration,
            "severity": np.ascontiguousarray(self.severity[:, col]),
            "status": np.ascontiguousarray(self.status[:, col]),
        }


@dataclass
class Workload:
    kind: str
    n_pvs: int
    n_iter: int
    names: list[str]
    t0_ns: int
    keys: list[bytes] = field(default_factory=list)  # msgpack of each PV name
    n_fields: list[int] = field(default_factory=list)  # fields of each PV structure
    tails: list[bytes] = field(default_factory=list)  # encoded fields after timeStamp
    lag_ns: Array = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        self.keys = [pack(name) for name in self.names]
        for name in self.names:
            tmpl = template(name, self.t0_ns)
            fields = list(tmpl)
            assert fields[:3] == ["value", "alarm", "timeStamp"], fields
            self.n_fields.append(len(fields))
            self.tails.append(items({f: tmpl[f] for f in fields[3:]}))
        # each PV updated a little (0..99 ms, fixed per PV) before the snapshot
        self.lag_ns = (np.arange(self.n_pvs, dtype=np.int64) * 7_919_113) % PERIOD_NS

    @property
    def n_values(self) -> int:
        return self.n_pvs * self.n_iter

    def wall_ns(self, k: int) -> int:
        return self.t0_ns + (k + 1) * PERIOD_NS

    def columns_at(self, k: int) -> tuple[Array, Array, Array, Array]:
        """value, time, severity, status of iteration ``k`` (one entry per PV)."""
        value = values_at(self.kind, self.n_pvs, k)
        times = self.wall_ns(k) - self.lag_ns
        severity = np.zeros(self.n_pvs, np.int32)
        if self.kind == "scalar":
            severity[np.abs(value) >= ALARM_LIMIT] = MINOR
        status = np.where(severity != 0, RECORD_STATUS, 0).astype(np.int32)
        return value, times, severity, status

    def messages(self, k: int) -> list[tuple[bytes, int]]:
        """The gateway's data messages of iteration ``k`` (sequenced protocol, one submission),
        each with the position of its PV map."""
        value, times, severity, _status = self.columns_at(k)
        n = self.n_pvs
        iter_index = k + 1
        head = items({"message_type": 1, "timestamp": self.wall_ns(k) // 1_000_000,
                      "iter_index": iter_index})
        elements = memoryview(float64_elements(value))
        if self.kind == "scalar":
            size, array_head = 9, b""
        else:
            size = 9 * WAVEFORM_LEN
            array_head = b"\xdc" + WAVEFORM_LEN.to_bytes(2, "big")  # array16
        alarms = {(sev, sign): items({"alarm": alarm(sev, sign)})
                  for sev in (0, MINOR) for sign in (-1.0, 1.0)}
        out = []
        for i in range(n):
            seq: dict[str, Any] = {"msg_seq": i + 2, "submission_seq": 1}
            if i == n - 1:
                seq["last_submission_data"] = True
            prefix = b"".join((fixmap(4 + len(seq)), head, items(seq), self.keys[i]))
            sign = 1.0 if self.kind == "waveform" or value[i] > 0 else -1.0
            raw = b"".join((
                prefix,
                fixmap(self.n_fields[i]),
                b"\xa5value",
                array_head,
                elements[i * size : (i + 1) * size],
                alarms[int(severity[i]), sign],
                items({"timeStamp": time_stamp(int(times[i]))}),
                self.tails[i],
            ))
            out.append((raw, len(prefix)))
        return out

    def message_dict(self, k: int, i: int) -> dict[str, Any]:
        """Message ``i`` of iteration ``k`` as the simulator would build it (for the check)."""
        value, times, severity, _status = self.columns_at(k)
        pv = template(self.names[i], self.t0_ns)
        v = value[i]
        pv["value"] = v.tolist()
        pv["alarm"] = alarm(int(severity[i]), float(v) if self.kind == "scalar" else 0.0)
        pv["timeStamp"] = time_stamp(int(times[i]))
        msg: dict[str, Any] = {"message_type": 1, "timestamp": self.wall_ns(k) // 1_000_000,
                               "iter_index": k + 1, "msg_seq": i + 2, "submission_seq": 1}
        if i == self.n_pvs - 1:
            msg["last_submission_data"] = True
        msg[self.names[i]] = pv
        return msg

    def verify_messages(self) -> None:
        """The spliced messages equal the simulator encoder's, and the client's wire decoder
        builds the same lazy samples from them (untimed; every workload)."""
        for k in {0, self.n_iter - 1}:
            msgs = self.messages(k)
            value = self.columns_at(k)[0]
            for i in sorted({0, self.n_pvs // 2, self.n_pvs - 1}):
                raw, start = msgs[i]
                assert raw == pack(self.message_dict(k, i)), (self.kind, k, i)
                decoded = decode_snapshot_message(raw, HEADERS)
                assert isinstance(decoded, Data), decoded
                sample = decoded.sample
                assert sample.pv == self.names[i] and sample.raw == raw[start:], i
                mine = PVSample.from_raw(self.names[i], raw, start)
                assert mine.raw == sample.raw and mine.data == sample.data
                got = np.asarray(mine.value)
                assert got.dtype == np.float64 and np.array_equal(got, value[i]), i

    def events(self, k: int) -> list[IterationEvent]:
        """The events of iteration ``k`` as the client emits them: lazy samples over the
        message bytes (nothing decoded yet)."""
        samples = tuple(PVSample.from_raw(name, raw, start)
                        for name, (raw, start) in zip(self.names, self.messages(k), strict=True))
        wall = self.wall_ns(k)
        n = self.n_pvs
        base = k * (n + 2)  # Kafka offsets: header, n data messages, tail
        return [
            IterationOpened(TOPIC, SNAPSHOT, k + 1, wall, offset=base),
            ValuesReceived(TOPIC, k + 1, 1, wall, samples, submission_seq=1, offset=base + n),
            IterationClosed(TOPIC, SNAPSHOT, k + 1, IterationStatus.COMPLETE, None, wall, wall,
                            n_values=n, n_pvs=n, n_batches=1, offset=base + n + 1),
        ]

    def all_columns(self) -> Columns:
        """Everything, stacked by iteration: what the baselines write."""
        per = [self.columns_at(k) for k in range(self.n_iter)]
        return Columns(
            value=np.stack([p[0] for p in per]),
            time=np.stack([p[1] for p in per]),
            iteration=np.arange(1, self.n_iter + 1, dtype=np.int64),
            severity=np.stack([p[2] for p in per]),
            status=np.stack([p[3] for p in per]),
        )


def workload(kind: str, n_pvs: int, scale: float) -> Workload:
    n_iter = max(MIN_ITERATIONS, int(TOTAL_VALUES[kind] * scale) // n_pvs)
    w = Workload(kind, n_pvs, n_iter, pv_names(kind, n_pvs), 1_700_000_000 * 1_000_000_000)
    w.verify_messages()
    return w


# ------------------------------------------------------------------------------ measurements
@dataclass
class SinkResult:
    seconds: float  # handle + flushes + close (finalize included)
    live_seconds: float  # handle + flushes
    finalize_seconds: float
    flush_seconds: list[float] = field(default_factory=list)  # flushes that wrote values
    flush_values: list[int] = field(default_factory=list)
    file_bytes: int = 0
    path: Path | None = None


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

    def timed_flush() -> None:  # every flush: by time (maybe_flush), by size (handle), last
        before = rec.counters["values"]
        flush()
        written = rec.counters["values"] - before
        if written:  # not close()'s own flush of an already empty buffer
            flushes.append(rec.last_flush_seconds)
            flush_values.append(written)

    rec.flush = timed_flush  # type: ignore[method-assign]
    for k in range(w.n_iter):
        events = w.events(k)
        t = time.perf_counter()
        for ev in events:
            rec.handle(ev)
        rec.maybe_flush()
        timed += time.perf_counter() - t
        del events
    t = time.perf_counter()
    rec.flush()  # the last data, before close
    live = timed + time.perf_counter() - t
    assert rec.status == "recording", rec.reason
    t = time.perf_counter()
    paths = rec.close()
    fin = time.perf_counter() - t
    assert rec.status == "complete" and len(paths) == 1, rec.reason
    size = paths[0].stat().st_size
    return SinkResult(live + fin, live, fin, flushes, flush_values, size, paths[0])


def _chunked(group: h5py.Group, name: str, data: Array, opts: OutputOptions) -> None:
    """One dataset from its whole array, with the sink's compression rule, ~512 KiB chunks."""
    kwargs, _plugin = filter_kwargs(opts, data.dtype)
    row_bytes = max(1, int(np.prod(data.shape[1:])) * data.dtype.itemsize)
    rows = min(len(data), rows_per_chunk(row_bytes, target=CHUNK_BYTES))
    group.create_dataset(name, data=data, chunks=(rows, *data.shape[1:]), **kwargs)


def block_baseline(w: Workload, cols: Columns, path: Path, options: dict[str, Any],
                   *, value_only: bool = False) -> tuple[float, int]:
    """(a): per PV a group with the five columns, each written whole; (a0) ``value_only``:
    one value dataset per PV. Returns (seconds, file bytes)."""
    opts = OutputOptions(directory=path.parent, **options)
    t = time.perf_counter()
    with h5py.File(path, "w", libver=("v110", "v110")) as f:
        g = f.create_group("pvs")
        for col, name in enumerate(w.names):
            if value_only:
                _chunked(g, name, np.ascontiguousarray(cols.value[:, col]), opts)
                continue
            pg = g.create_group(name)
            for cname, data in cols.of(col).items():
                _chunked(pg, cname, data, opts)
    seconds = time.perf_counter() - t
    return seconds, path.stat().st_size


def naive_baseline(w: Workload, cols: Columns, path: Path, options: dict[str, Any]) -> float:
    """(b): the five datasets per PV created up front; per iteration, per PV, per dataset:
    resize by one row and write that row."""
    opts = OutputOptions(directory=path.parent, **options)
    t = time.perf_counter()
    with h5py.File(path, "w", libver=("v110", "v110")) as f:
        g = f.create_group("pvs")
        per_pv: list[list[h5py.Dataset]] = []
        shapes = [cols.value.shape[2:], (), (), (), ()]  # row shape of each column
        for col, name in enumerate(w.names):
            pg = g.create_group(name)
            datasets = []
            for (cname, data), shape in zip(cols.of(col).items(), shapes, strict=True):
                kwargs, _plugin = filter_kwargs(opts, data.dtype)
                row_bytes = max(1, int(np.prod(shape)) * data.dtype.itemsize)
                rows = min(w.n_iter, rows_per_chunk(row_bytes, target=CHUNK_BYTES))
                datasets.append(pg.create_dataset(cname, shape=(0, *shape),
                                                  maxshape=(None, *shape), dtype=data.dtype,
                                                  chunks=(rows, *shape), **kwargs))
            per_pv.append(datasets)
        for k in range(w.n_iter):
            row = (cols.value[k], cols.time[k], cols.iteration[k], cols.severity[k],
                   cols.status[k])
            for col, datasets in enumerate(per_pv):
                for c, ds in enumerate(datasets):
                    ds.resize((k + 1, *shapes[c]))
                    ds[k] = row[c] if c == 2 else row[c][col]
    return time.perf_counter() - t


# ------------------------------------------------------------------------------ check
def check_files(w: Workload, cols: Columns, *, sink: Path, block: Path, value_only: Path,
                naive: Path) -> list[str]:
    """Compare a few PVs across the sink's file (via recorder.reader), the baselines' files
    and the generated data; returns the differences (empty: all equal)."""
    problems: list[str] = []

    def same(what: str, got: Array, want: Array) -> None:
        if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want):
            problems.append(f"{what}: {got.dtype}{got.shape} != {want.dtype}{want.shape}"
                            f" (or values differ)")

    with (open_file(sink) as rf, h5py.File(block, "r") as fa, h5py.File(value_only, "r") as fa0,
          h5py.File(naive, "r") as fb):
        if len(rf.pv_names) != w.n_pvs:
            problems.append(f"sink file has {len(rf.pv_names)} PVs, not {w.n_pvs}")
        for col in sorted({0, w.n_pvs // 2, w.n_pvs - 1}):
            name = w.names[col]
            want = cols.of(col)
            sink_cols = {
                "value": rf.values(name),
                "time": rf.times(name),
                "iteration": rf.iterations_of(name),
                "severity": rf.severity(name),
                "status": rf.alarm_status(name),
            }
            for c in COLUMNS:
                same(f"{name} {c}: sink vs generated", np.asarray(sink_cols[c]), want[c])
                same(f"{name} {c}: (a) vs generated", fa["pvs"][name][c][()], want[c])
                same(f"{name} {c}: (b) vs generated", fb["pvs"][name][c][()], want[c])
            same(f"{name} value: (a0) vs generated", fa0["pvs"][name][()], want["value"])
    return problems


# ------------------------------------------------------------------------------ main
METHODS = ("sink", "block", "value_only", "naive")


@dataclass
class Row:
    kind: str
    n_pvs: int
    n_iter: int
    sink: list[SinkResult] = field(default_factory=list)
    block: list[float] = field(default_factory=list)
    value_only: list[float] = field(default_factory=list)
    naive: list[float] = field(default_factory=list)
    block_bytes: int = 0
    value_only_bytes: int = 0
    checked: str = ""

    def per_value_flush_us(self) -> float:
        fl = [s for res in self.sink for s in res.flush_seconds]
        fv = [v for res in self.sink for v in res.flush_values]
        return sum(fl) / max(1, sum(fv)) * 1e6 if fl else float("nan")


def run(kinds: list[str], counts: list[int], scale: float, *, repeat: int,
        options: dict[str, Any], check: bool) -> Iterator[Row]:
    for kind in kinds:
        for n_pvs in counts:
            w = workload(kind, n_pvs, scale)
            cols = w.all_columns()
            row = Row(kind, n_pvs, w.n_iter)
            for rep in range(repeat):
                with tempfile.TemporaryDirectory(prefix="bench_sink_") as tmp:
                    d = Path(tmp)
                    files = {m: d / f"{m}.h5" for m in METHODS[1:]}
                    for method in METHODS:  # interleaved
                        gc.collect()
                        if method == "sink":
                            (d / "sink").mkdir()
                            row.sink.append(run_sink(w, d / "sink", options))
                        elif method == "block":
                            secs, row.block_bytes = block_baseline(w, cols, files[method],
                                                                   options)
                            row.block.append(secs)
                        elif method == "value_only":
                            secs, row.value_only_bytes = block_baseline(
                                w, cols, files[method], options, value_only=True)
                            row.value_only.append(secs)
                        else:
                            row.naive.append(naive_baseline(w, cols, files[method], options))
                    if check and rep == 0:
                        sink_path = row.sink[-1].path
                        assert sink_path is not None
                        problems = check_files(w, cols, sink=sink_path, block=files["block"],
                                               value_only=files["value_only"],
                                               naive=files["naive"])
                        row.checked = "; ".join(problems) if problems else "ok"
            del cols
            yield row


def report(rows: list[Row]) -> bool:
    """Print the table and the verdicts; True if the checks (if any) passed."""
    print()
    print("| kind | PVs | iterations | sink values/s | finalize s | (a) block values/s | "
          "(a0) value-only values/s | (b) naive values/s | sink/(a) | sink/(a0) | sink/(b) | "
          "live only/(a) | sink/(a) >= 0.5 | flush ms (mean) | values/flush | "
          "flush µs/value |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        n = r.n_pvs * r.n_iter
        best = min(r.sink, key=lambda s: s.seconds)
        sink = n / best.seconds
        live = n / best.live_seconds
        block = n / min(r.block)
        value_only = n / min(r.value_only)
        naive = n / min(r.naive)
        fl = [s for res in r.sink for s in res.flush_seconds]
        fv = [v for res in r.sink for v in res.flush_values]
        mean_ms = statistics.mean(fl) * 1e3 if fl else float("nan")
        per_flush = statistics.mean(fv) if fv else float("nan")
        verdict = "met" if sink / block >= TARGET else "not met"
        print(f"| {r.kind} | {r.n_pvs:,} | {r.n_iter:,} | {sink:,.0f} | "
              f"{best.finalize_seconds:.2f} | {block:,.0f} | {value_only:,.0f} | {naive:,.0f} | "
              f"{sink / block:.2f} | {sink / value_only:.2f} | {sink / naive:.2f} | "
              f"{live / block:.2f} | {verdict} | {mean_ms:.1f} | {per_flush:,.0f} | "
              f"{r.per_value_flush_us():.2f} |")
    print()
    met = sum(1 for r in rows
              if min(r.block) / min(s.seconds for s in r.sink) >= TARGET)
    print(f"target sink/(a) >= {TARGET}: met in {met} of {len(rows)} rows")
    for kind in dict.fromkeys(r.kind for r in rows):
        of_kind = sorted((r for r in rows if r.kind == kind), key=lambda r: r.n_pvs)
        if len(of_kind) < 2:
            continue
        lo, hi = of_kind[0], of_kind[-1]
        a, b = lo.per_value_flush_us(), hi.per_value_flush_us()
        ratio = b / a
        pv_ratio = hi.n_pvs / lo.n_pvs
        verdict = "met" if ratio <= pv_ratio else "not met"
        print(f"flush growth {kind}: {a:.2f} µs/value at {lo.n_pvs:,} PVs, {b:.2f} µs/value at "
              f"{hi.n_pvs:,} PVs: x{ratio:.2f} for x{pv_ratio:,.0f} PVs (target: flush time "
              f"per value grows no faster than the number of PVs, i.e. x{ratio:.2f} <= "
              f"x{pv_ratio:,.0f}): {verdict}; flat (<= x1) "
              f"{'yes' if ratio <= 1.0 else 'no'} — a PV's first flush also learns its "
              f"payload template, a one-time cost per PV that dominates when a run has "
              f"few values per PV")
    print()
    print("file sizes (MB, last run): " + ", ".join(
        f"{r.kind}/{r.n_pvs}: sink {r.sink[-1].file_bytes / 1e6:.1f} "
        f"(a) {r.block_bytes / 1e6:.1f} (a0) {r.value_only_bytes / 1e6:.1f}" for r in rows))
    ok = True
    for r in rows:
        if r.checked:
            print(f"check {r.kind}/{r.n_pvs}: {r.checked}")
            ok = ok and r.checked == "ok"
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1/5 of the values")
    parser.add_argument("--repeat", type=int, default=None, help="repeats (default 1)")
    parser.add_argument("--only", choices=("scalar", "waveform"), default=None)
    parser.add_argument("--pvs", type=int, nargs="*", default=None, help="PV counts")
    parser.add_argument("--compression", default="gzip")
    parser.add_argument("--check", action="store_true",
                        help="compare the sink's file with the baselines' (first repeat)")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    tune_gc()  # as in the sink's writer process (recorder.sinks.process)
    scale = 0.2 if args.quick else 1.0
    repeat = args.repeat or 1
    kinds = [args.only] if args.only else ["scalar", "waveform"]
    counts = args.pvs or list(PV_COUNTS)
    options = {"compression": args.compression, "flush_interval_s": 1.0}
    print(f"h5py {h5py.version.version}, HDF5 {h5py.version.hdf5_version}, "
          f"compression {args.compression}, repeat {repeat}, scale {scale}")
    start = time.perf_counter()
    rows = []
    for row in run(kinds, counts, scale, repeat=repeat, options=options, check=args.check):
        rows.append(row)
        best = min(s.seconds for s in row.sink)
        print(f"{row.kind:8} {row.n_pvs:6} PVs x {row.n_iter:6} its: sink {best:.2f} s "
              f"(finalize {min(s.finalize_seconds for s in row.sink):.2f} s), "
              f"(a) {min(row.block):.2f} s, (a0) {min(row.value_only):.2f} s, "
              f"(b) {min(row.naive):.2f} s" + (f", check {row.checked}" if row.checked else ""),
              flush=True)
    ok = report(rows)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
