"""What a pulse id in ``timeStamp.userTag`` costs the HDF5 sink, against the same PVs with
``userTag: 0`` in the same run.

Run: ``.venv/bin/python benchmarks/bench_user_tag.py [--pvs 1000] [--scale 0.5] [--repeat 2]``
(~30 s).

EPICS 7 records have a UTAG field that IOCs copy into ``timeStamp.userTag`` (facilities put a
pulse or cycle id there), so it changes with every sample. The workload is
``bench_sink.py``'s scalar one (gateway NTScalar doubles as lazy samples over real msgpack
bytes, through :class:`recorder.sinks.hdf5.HDF5Recording`: handle, flushes, close with
finalize), once with ``userTag: 0`` (the baseline) and once with a tag that differs per PV
and per iteration (the EPICS time in ms, modulo 2**31: a uint32 on the wire). Printed for
each: PV values/s, finalize time, final file size and metadata entries (``/pv_info``), and
the ratios tagged/baseline. Best of ``--repeat``, interleaved.

Measured on 2026-11-23, 1,000 PVs x 100 iterations (defaults), tagged/baseline: before
format 4.0 (commit a408b8a, where the tag stayed in each sample's metadata; this script run
in a checkout of it) speed 0.09x (8,569 vs 98,765 values/s), finalize 10.7x (6.21 vs
0.58 s), file 17x (77.3 vs 4.6 MB), metadata entries 100x (one per sample); format 4.0 (the
tag is a ``user_tag`` column), two runs: speed 0.92-1.03x, finalize 0.97-1.13x, file 1.13x
(5.1 vs 4.6 MB: the column), metadata entries 1.00x.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sink

from recorder.gctune import tune_gc

_UNTAGGED = bench_sink.time_stamp


def _tagged(ns: int) -> dict[str, Any]:
    ts = _UNTAGGED(ns)
    ts["userTag"] = (ns // 1_000_000) % 2**31
    return ts


@dataclass
class Result:
    values_per_s: float
    finalize_s: float
    file_mb: float
    entries: int


def measure(tagged: bool, n_pvs: int, scale: float, directory: Path) -> Result:
    bench_sink.time_stamp = _tagged if tagged else _UNTAGGED
    try:
        w = bench_sink.workload("scalar", n_pvs, scale)
        r = bench_sink.run_sink(w, directory, {"flush_interval_s": 1.0})
    finally:
        bench_sink.time_stamp = _UNTAGGED
    with h5py.File(r.path, "r") as f:
        entries = int(f["pv_info"]["metadata_entries"].sum())
    return Result(w.n_values / r.seconds, r.finalize_seconds, r.file_bytes / 1e6, entries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--pvs", type=int, default=1000)
    parser.add_argument("--scale", type=float, default=0.5,
                        help="of bench_sink's 200,000 values")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    tune_gc()
    best: dict[bool, Result] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeat):
            for tagged in (False, True):
                got = measure(tagged, args.pvs, args.scale, Path(tmp) / f"{rep}-{tagged}")
                if tagged not in best or got.values_per_s > best[tagged].values_per_s:
                    best[tagged] = got
    base, tag = best[False], best[True]
    print(f"{args.pvs} scalar PVs, {args.scale} x bench_sink's values, best of {args.repeat}")
    print("| userTag | values/s | finalize s | file MB | metadata entries |")
    print("|---|---:|---:|---:|---:|")
    for name, r in (("0 (baseline)", base), ("pulse id", tag)):
        print(f"| {name} | {r.values_per_s:,.0f} | {r.finalize_s:.2f} | {r.file_mb:.1f} | "
              f"{r.entries:,} |")
    print(f"tagged/baseline: speed {tag.values_per_s / base.values_per_s:.2f}x, finalize "
          f"{tag.finalize_s / base.finalize_s:.2f}x, file {tag.file_mb / base.file_mb:.2f}x, "
          f"metadata entries {tag.entries / base.entries:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
