"""Overhead of the writer process: IsolatedRecording vs HDF5Recording in-process.

Run: ``.venv/bin/python benchmarks/bench_isolation.py [--pvs 1000] [--iterations 200]
[--repeat 2] [--kinds lazy,eager,waveforms] [--pipe-bytes 65536]``

Each iteration is one IterationOpened, one ValuesReceived with ``--pvs`` PVs and one
IterationClosed. Samples are built before timing: *lazy*: scalar doubles (value, alarm,
timeStamp, display) as ``PVSample.from_raw`` over one message blob per iteration; *eager*:
the same as decoded dicts; *waveforms*: the simulator's NTScalarArray PVs of 128 elements,
one gateway message per PV (``bench_client``'s stream, what the client delivers). Timed:

* ``feed``: the caller's time to hand every event over (``handle`` + ``maybe_flush`` each
  iteration) — what the daemon's run thread spends; ``cpu`` is the caller's CPU time
  (``time.process_time``: the writer process is not counted);
* ``durable``: until ``flush()`` returned (everything written and flushed);
* ``total``: until ``close()`` returned (files finalized);
* ``writer cpu``: CPU time of the writer process until durable, µs per value (process only;
  its start-up is done before timing begins).

Printed: values/s for each, per variant; best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import structlog

from recorder.client.events import (
    IterationClosed,
    IterationEvent,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.values import PVSample
from recorder.sinks import process_spawn
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions
from recorder.sinks.process import IsolatedRecording

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_client as bc  # the gateway stream of the other benchmarks
from bench_e2e import proc_cpu


def pv_map(k: int, i: int) -> dict[str, object]:
    return {
        "value": k * 1.5 + i,
        "alarm": {"severity": 0, "status": 0, "message": ""},
        "timeStamp": {"secondsPastEpoch": 1_700_000_000 + i, "nanoseconds": k, "userTag": 0},
        "display": {"limitLow": 0.0, "limitHigh": 10.0, "description": "", "units": "mm",
                    "precision": 3},
    }


def build(n_pvs: int, n_iter: int, kind: str) -> list[list[IterationEvent]]:
    out: list[list[IterationEvent]] = []
    names = [f"BENCH:PV{k:05d}" for k in range(n_pvs)]
    pvs = bc.packed_pvs("waveforms", n_pvs) if kind == "waveforms" else []
    for i in range(n_iter):
        samples: list[PVSample] = []
        if kind == "waveforms":
            msgs = bc.iteration_messages(i + 1, pvs, 1_700_000_000_000 + i)[1:-1]
            samples = [PVSample.from_raw(name, m, len(m) - len(b))
                       for (name, b), m in zip(pvs, msgs, strict=True)]
        elif kind == "lazy":
            parts = [msgpack.packb(pv_map(k, i)) for k in range(n_pvs)]
            blob = b"".join(parts)
            pos = 0
            for name, part in zip(names, parts, strict=True):
                samples.append(PVSample.from_raw(name, blob, pos, pos + len(part)))
                pos += len(part)
        else:
            samples = [PVSample(name, pv_map(k, i)) for k, name in enumerate(names)]
        out.append([
            IterationOpened("t", "s", i, i, offset=i),
            ValuesReceived("t", i, 1, i, tuple(samples), offset=i),
            IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i, offset=i),
        ])
    return out


def run(kind: str, isolated: bool, n_pvs: int, n_iter: int, directory: Path) -> dict[str, float]:
    events = build(n_pvs, n_iter, kind)
    options = OutputOptions(directory=directory, flush_interval_s=0.5)
    rec: HDF5Recording | IsolatedRecording
    if isolated:
        rec = IsolatedRecording(options, run_name="bench")
    else:
        rec = HDF5Recording(options, run_name="bench")
    pid = getattr(rec, "pid", None)
    rec.flush()  # a round trip: the writer process is up (imports done) before timing
    wcpu0 = proc_cpu(pid) if pid else 0.0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for iteration in events:
        for event in iteration:
            rec.handle(event)
        rec.maybe_flush()
    t_feed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    rec.flush()
    t_durable = time.perf_counter() - t0
    wcpu = proc_cpu(pid) - wcpu0 if pid else float("nan")
    rec.close()
    t_total = time.perf_counter() - t0
    assert rec.status == "complete", rec.reason
    assert rec.counters["values"] == n_pvs * n_iter, rec.counters
    n = n_pvs * n_iter
    return {"feed": n / t_feed, "cpu": n / cpu, "durable": n / t_durable, "total": n / t_total,
            "writer_us": wcpu / n * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pvs", type=int, default=1000)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--kinds", default="lazy,eager,waveforms")
    parser.add_argument("--pipe-bytes", type=int, default=process_spawn.PIPE_BYTES,
                        help="size of the pipe to the writer (65536: Linux's default, to "
                        "compare)")
    args = parser.parse_args(argv)
    process_spawn.PIPE_BYTES = args.pipe_bytes  # read by _widen_pipe at each spawn
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(f"{args.pvs} PVs x {args.iterations} iterations "
          f"({args.pvs * args.iterations} values), best of {args.repeat}; values/s")
    print(f"{'samples':9} {'writer':10} {'feed':>10} {'caller cpu':>11} {'durable':>10} "
          f"{'total':>10} {'writer cpu µs/value':>20}")
    for kind in args.kinds.split(","):
        for isolated in (False, True):
            best: dict[str, float] = {}
            for _ in range(args.repeat):
                tmp = Path(tempfile.mkdtemp(prefix="bench-iso-"))
                try:
                    res = run(kind, isolated, args.pvs, args.iterations, tmp)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                best = {k: (min if k == "writer_us" else max)(v, best.get(k, v))
                        for k, v in res.items()}
            print(f"{kind:9} {'process' if isolated else 'in-proc':10} {best['feed']:>10,.0f} "
                  f"{best['cpu']:>11,.0f} {best['durable']:>10,.0f} {best['total']:>10,.0f} "
                  f"{best['writer_us']:>20.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
