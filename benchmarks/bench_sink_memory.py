"""Writer memory over a long recording: does it stay flat however long a run lasts?

Run: ``.venv/bin/python benchmarks/bench_sink_memory.py [--quick] [--pvs N] [--iterations K]``
(full: 1,000 scalar PVs x 100,000 iterations = 100 M values, ~3 min; ``--quick``: 20,000
iterations, ~40 s).

One :class:`recorder.sinks.hdf5.HDF5Recording`, as the daemon's writer process runs it, records
a single segment (no size or time limit) of gateway NTScalar PVs (the sink benchmark's
workload: real gateway msgpack bytes as lazy samples). To keep the run about the sink, 50
iterations are generated once and handed over again and again under new ``iter_index``
values; flushes every 50 iterations. At ten checkpoints it prints the process's RSS
(``/proc/self/statm``), the Python heap (``sys.getallocatedblocks()``) and the HDF5 metadata
cache of the live file. The ratio that answers the question is RSS at the end against RSS at
the first checkpoint (10% of the run), measured in the same run: 1.0 is flat.
Measured here, 1,000 PVs x 100,000 iterations: 158 MB at 10 M values, 179-180 MB from 70 M to
100 M values (x1.14, flat over the last 30%). Before the live file got its own 1 MiB chunk cache
per dataset (HDF5 2.0 defaults to 8 MiB), the same run went from 260 MB to 304-309 MB.
At the end the segment is finalized (``close()``), timed: 118.6 s for the 100 M values
(1.19 us/value), peak RSS 0.68 GB; ``--quick``: 22.5 s (51.6 s before partly filled chunks
stopped being rewritten at every spill).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="20,000 iterations")
    parser.add_argument("--pvs", type=int, default=1000)
    parser.add_argument("--iterations", type=int, default=None)
    args = parser.parse_args(argv)
    n_iter = args.iterations or (20_000 if args.quick else 100_000)

    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    import bench_sink as bs

    from recorder.gctune import tune_gc
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions

    names = bs.pv_names("scalar", args.pvs)
    w = bs.Workload("scalar", args.pvs, 50, names, 1_700_000_000 * 1_000_000_000)
    cached = [w.events(k) for k in range(50)]
    with tempfile.TemporaryDirectory(prefix="bench-sink-memory-") as tmp:
        rec = HDF5Recording(OutputOptions(directory=Path(tmp), flush_interval_s=1.0),
                            run_name="memory", pv_uris=[f"pva://{n}" for n in names])
        tune_gc()  # as in the writer process
        step = max(50, n_iter // 10)
        rows: list[tuple[int, float, int, float, float]] = []
        t0 = time.perf_counter()
        print("| iterations | values | RSS MB | Python blocks | HDF5 metadata cache MB | s |")
        print("|---:|---:|---:|---:|---:|---:|")
        for k in range(n_iter):
            for ev in cached[k % 50]:
                rec.handle(replace(ev, iter_index=k + 1))
            if k % 50 == 49:
                rec.flush()
            if (k + 1) % step == 0:
                gc.collect()
                f = rec._file  # the live file's HDF5 cache, for the report
                mdc = f.id.get_mdc_size()[2] / 2**20 if f is not None else float("nan")
                row = (k + 1, rss_mb(), sys.getallocatedblocks(), mdc,
                       time.perf_counter() - t0)
                rows.append(row)
                print(f"| {row[0]:,} | {row[0] * args.pvs:,} | {row[1]:.0f} | {row[2]:,} | "
                      f"{row[3]:.1f} | {row[4]:.0f} |", flush=True)
        assert rec.status == "recording", rec.reason
        t_close = time.perf_counter()
        files = rec.close()
        close_s = time.perf_counter() - t_close
        size_mb = sum(p.stat().st_size for p in files) / 2**20
        peak_mb = hwm_mb()
    first, last = rows[0], rows[-1]
    tail = rows[len(rows) * 7 // 10 :]
    print(f"\nRSS at the end / at {first[0]:,} iterations: {last[1] / first[1]:.2f}x "
          f"({first[1]:.0f} -> {last[1]:.0f} MB); over the last 30% of the run: "
          f"{min(r[1] for r in tail):.0f}-{max(r[1] for r in tail):.0f} MB; Python blocks "
          f"{last[2] / first[2]:.2f}x")
    values = last[0] * args.pvs
    print(f"Finalize (close: last flush + rewrite into the final layout, {values:,} values): "
          f"{close_s:.1f} s = {close_s / values * 1e6:.2f} µs/value, final file {size_mb:.0f} MB; "
          f"peak RSS of the process {peak_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
