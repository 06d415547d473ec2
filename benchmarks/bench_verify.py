"""``k2eg-recorder verify`` speed: recorder.verify vs plain h5py reading what it must read.

Run: ``.venv/bin/python benchmarks/bench_verify.py [--quick] [--repeat R]`` (~1 min; ``--quick``:
100 and 1,000 PVs only)

Finalized files of 1,000,000 gateway-like scalar values (value, alarm, timeStamp) are written
with :class:`recorder.sinks.hdf5.HDF5Recording` (not timed): 100 PVs x 10,000 iterations,
1,000 x 1,000 and 10,000 x 100. Then, each in the same process, best of ``--repeat``:

* ``verify``: :func:`recorder.verify.verify_file` (structure and index: no value data);
* (a) ``index``: plain h5py opening every PV group and reading its four per-value columns
  (``time``, ``iteration``, ``severity``, ``status``), its index (``/index/<PV>``:
  ``first``, ``count``; format 5.0) and ``/iterations``: the least any per-PV consistency
  check has to touch;
* ``verify --data``: :func:`~recorder.verify.verify_file` with ``data=True``;
* (b) ``read all``: plain h5py reading every dataset of the file whole (what ``--data``
  adds: every chunk decompressed).

Printed: seconds of each and the ratios verify/(a), verify --data/(b) (how much the checks
cost on top of the reads they need), and ms per PV.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import structlog

from recorder.client.events import (
    IterationClosed,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.values import PVSample
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions
from recorder.verify import verify_file

VALUES = 1_000_000
PV_COLUMNS = ("time", "iteration", "severity", "status")  # in /pvs/<PV>
INDEX_COLUMNS = ("first", "count")  # in /index/<PV> (format 5.0)


def write_file(directory: Path, n_pvs: int) -> Path:
    names = [f"BPM:{k:05d}:X" for k in range(n_pvs)]
    rec = HDF5Recording(OutputOptions(directory=directory), run_name=f"bench{n_pvs}")
    for i in range(1, VALUES // n_pvs + 1):
        rec.handle(IterationOpened("t", "s", i, i))
        rec.handle(ValuesReceived("t", i, 1, 1, tuple(
            PVSample(n, {"value": i * 0.5 + k,
                         "alarm": {"severity": int(k % 7 == 0), "status": 0, "message": ""},
                         "timeStamp": {"secondsPastEpoch": 1_700_000_000 + i,
                                       "nanoseconds": k}})
            for k, n in enumerate(names))))
        rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i))
        rec.maybe_flush()
    (path,) = rec.close()
    return path


def read_index(path: Path) -> None:
    with h5py.File(path, "r") as f:
        for ds in f["iterations"].values():
            ds[()]
        pvs, index = f["pvs"], f["index"]
        for name in pvs:
            g, i = pvs[name], index[name]
            for column in PV_COLUMNS:
                g[column][()]
            for column in INDEX_COLUMNS:
                i[column][()]


def read_all(path: Path) -> None:
    with h5py.File(path, "r") as f:
        found: list[h5py.Dataset] = []
        f.visititems(lambda _n, o: found.append(o) if isinstance(o, h5py.Dataset) else None)
        for ds in found:
            ds[()]


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 PVs only")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    sizes = (100, 1_000) if args.quick else (100, 1_000, 10_000)
    work = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    rows = []
    try:
        for n_pvs in sizes:
            path = write_file(work / str(n_pvs), n_pvs)
            report = verify_file(path, data=True)
            if not report.ok:
                raise SystemExit(f"{path}: {report.errors}")
            v = best(lambda p=path: verify_file(p), args.repeat)
            a = best(lambda p=path: read_index(p), args.repeat)
            vd = best(lambda p=path: verify_file(p, data=True), args.repeat)
            b = best(lambda p=path: read_all(p), args.repeat)
            rows.append((n_pvs, VALUES // n_pvs, path.stat().st_size / 1e6, v, a, vd, b))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"h5py {h5py.version.version}, HDF5 {h5py.version.hdf5_version}, "
          f"{VALUES:,} values per file, best of {args.repeat}\n")
    print("| PVs | iterations | file MB | verify s | (a) index s | verify/(a) | verify ms/PV "
          "| verify --data s | (b) read all s | --data/(b) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n_pvs, n_it, mb, v, a, vd, b in rows:
        print(f"| {n_pvs:,} | {n_it:,} | {mb:.1f} | {v:.2f} | {a:.2f} | {v / a:.2f}x "
              f"| {v / n_pvs * 1e3:.2f} | {vd:.2f} | {b:.2f} | {vd / b:.2f}x |")


if __name__ == "__main__":
    main()
