"""Reader: what an analyst pays to read a recording with :mod:`recorder.reader`.

Run: ``.venv/bin/python benchmarks/bench_reader.py [--quick]``

Files are written first (not timed) with :class:`recorder.sinks.hdf5.HDF5Recording`:

* a finalized file of 100 NTScalar PVs (the simulator's full gateway structure: display
  with its form choices, control, valueAlarm) x 3,000 iterations (``--quick``: 1,000);
* a live file (``.h5.partial``, left open as after a crash) of 100 waveform PVs of 1,000
  float64 x 400 iterations, ~320 MB (``--quick``: 100 iterations).

Each measurement runs in a fresh process (peak RSS = that process's ``ru_maxrss``), the
reader as shipped against a baseline in the same run:

* ``values``: ``RecordingFile.values(pv)`` of one scalar PV of the final file (read from the
  ``value`` dataset) vs the per-sample path (``values_of(samples(pv))``), the call only;
* ``trains``: iterating ``trains()`` over the final file: a window of iterations at a time,
  the rows of one metadata entry and flags flattened once (later rows copy the fields and
  replace the per-row leaves), vs every PV's samples held (read first) and every sample
  flattened in full into its train (``build_train``, as the reader did before);
* ``live``: open the live file, list PVs and iterations, read one PV's samples: sample
  columns and pools on demand vs read whole (windows and caches larger than the file).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WRITE = textwrap.dedent("""
    import os, sys, json
    from pathlib import Path
    import structlog, logging
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    from recorder.client.events import (IterationClosed, IterationOpened, IterationStatus,
                                        ValuesReceived)
    from recorder.client.values import PVSample
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions
    from recorder.sim.pvs import parse_pv, pv_structure
    kind, directory, n_iter = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    directory.mkdir(parents=True, exist_ok=True)
    rec = HDF5Recording(OutputOptions(directory=directory), run_name=kind)
    # the gateway's full NTScalar (display with form choices, control, valueAlarm)
    full = [pv_structure(parse_pv(f"SIM:AI:DOUBLE:{p}"), 0, 0) for p in range(100)]
    wave = [float(x) for x in range(1000)]
    for i in range(n_iter):
        ts = {"secondsPastEpoch": 1_700_000_000 + i // 10, "nanoseconds": 1000 * i}
        if kind == "scalars":
            samples = tuple(PVSample(f"S{p}", {
                **full[p], "value": float(i + p), "timeStamp": ts,
                "alarm": {"severity": 0, "status": 0, "message": "NO_ALARM"}})
                for p in range(100))
        else:
            samples = tuple(PVSample(f"W{p}", {"value": wave, "timeStamp": ts})
                            for p in range(100))
        rec.handle(IterationOpened("t", "s", i, i))
        rec.handle(ValuesReceived("t", i, 1, 1, samples))
        rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i))
        rec.maybe_flush()
    if kind == "scalars":
        print(json.dumps(str(rec.close()[0])))
    else:
        rec.flush()
        print(json.dumps(str(rec.current_path)), flush=True)
        os._exit(0)  # left live, as after a crash
""")

MEASURE = textwrap.dedent("""
    import json, resource, sys, time
    from recorder import reader
    from recorder.sinks import livefile
    what, mode, path = sys.argv[1], sys.argv[2], sys.argv[3]
    t = time.perf_counter()
    if what == "values":
        with reader.open_file(path) as f:
            pv = f.pv_names[7]
            t = time.perf_counter()  # the call only, not opening the file
            v = f.values(pv) if mode == "ours" else reader.values_of(f.samples(pv))
            n = len(v)
    elif what == "trains":
        with reader.open_file(path) as f:
            if mode == "ours":
                n = sum(1 for _ in f.trains())
            else:  # every PV's samples held, each flattened in full into its train
                from recorder.sinks.bridge.mapping import IterationInfo, build_train
                its = f.iterations()
                held = {pv: (*f.first_count(pv), f.samples(pv)) for pv in f.pv_names}
                n = 0
                for row in range(len(its["iter_index"])):
                    samples = []
                    for first, count, pv_samples in held.values():
                        a, c = int(first[row]), int(count[row])
                        samples.extend(pv_samples[a : a + c])
                    build_train(IterationInfo.from_columns(its, row), samples, stacked=False)
                    n += 1
    else:
        if mode == "base":
            livefile.WINDOW_BYTES = livefile.SAMPLE_CACHE_BYTES = 1 << 40
        with reader.open_file(path) as f:
            f.pv_names, f.iterations()
            n = len(f.samples(f.pv_names[7]))
            if mode == "base":  # the whole file, as the reader used to
                view = f._live
                for name in view.samples:
                    view.samples[name]
                for pool in view.pools.values():
                    pool[0 : pool.n]
                view.byte_pool[0 : view.byte_pool.n]
    seconds = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": n, "s": seconds, "rss_mb": rss}))
""")


def run(code: str, *args: str) -> Any:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved, best kept")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-reader-"))
    try:
        final = run(WRITE, "scalars", str(work / "final"), "1000" if args.quick else "3000")
        live = run(WRITE, "waves", str(work / "live"), "100" if args.quick else "400")
        size = {k: Path(p).stat().st_size / 1e6 for k, p in (("final", final), ("live", live))}
        print(f"files: final {size['final']:.1f} MB (100 scalar PVs), live {size['live']:.0f} "
              "MB (100 waveform PVs)", file=sys.stderr)
        rows = []
        for what, path in (("values", final), ("trains", final), ("live", live)):
            best: dict[str, dict[str, float]] = {}
            for _ in range(args.repeat):
                for mode in ("ours", "base"):
                    got = run(MEASURE, what, mode, path)
                    if mode not in best or got["s"] < best[mode]["s"]:
                        best[mode] = got
            if best["ours"]["n"] != best["base"]["n"]:
                raise SystemExit(f"{what}: {best['ours']['n']} != {best['base']['n']} items")
            rows.append((what, best))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| read | items | ours s | baseline s | speed-up | ours peak RSS MB | baseline peak "
          "RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for what, b in rows:
        o, a = b["ours"], b["base"]
        print(f"| {what} | {o['n']:,} | {o['s']:.3f} | {a['s']:.3f} | {a['s'] / o['s']:.1f}x "
              f"| {o['rss_mb']:.0f} | {a['rss_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
