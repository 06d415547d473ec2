"""Gateway simulator: CPU to build and encode the PV values it publishes.

Run: ``.venv/bin/python benchmarks/bench_sim.py [--rounds N] [--seconds S]`` (~30 s)

Two measurements, each of the simulator as shipped against a baseline in the same run:

* ``values``: one update of each array PV (a 20,000-point double waveform, a 20,000-point
  float waveform, a 20,000-point int waveform, a 128x128 ushort image, a 128x128 double
  image) built by :func:`recorder.sim.pvs.pv_structure` and packed by
  :func:`recorder.sim.encoding.pack`, vs the same values built element by element
  (:func:`recorder.sim.pvs.numeric_value` per element, the image formula per pixel) and
  packed element by element (``struct.pack`` per float); the bytes are checked equal;
* ``engine``: :class:`recorder.sim.engine.SimEngine` running a 50 ms normal snapshot of a
  20,000-point waveform, a 128x128 image and a scalar (all updating every 50 ms), no Kafka:
  CPU per published iteration when ticked every 50 ms of simulated time (keeping up) and every
  250 ms (a simulator that fell behind: five updates per PV between ticks). Its baseline is
  the same engine building every update of every PV as it happens, published or not (what
  the simulator did before it built only published samples).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recorder.sim.encoding import pack
from recorder.sim.engine import Produce, SimConfig, SimEngine
from recorder.sim.pvs import INT_RANGES, PVSpec, numeric_value, parse_pv, pv_structure

ARRAY_PVS = ["SIM:WF:DOUBLE:1:N20000", "SIM:WF:FLOAT:2:N20000", "SIM:WF:INT:3:N20000",
             "SIM:IMG:USHORT:4:S128x128", "SIM:IMG:DOUBLE:5:S128x128"]
ENGINE_PVS = ["pva://SIM:WF:DOUBLE:2:N20000:P50", "pva://SIM:IMG:USHORT:1:S128x128:P50",
              "pva://SIM:AI:DOUBLE:3:P50"]
WALL_NS = 1_700_000_000_000_000_000


# ---------------------------------------------------------------- element-by-element baseline
def reference_values(spec: PVSpec, k: int) -> list[Any]:
    """The array of update ``k``, one element at a time."""
    if spec.family == "IMG":
        w, h, typ = spec.width, spec.height, spec.type
        if typ in ("FLOAT", "DOUBLE"):
            return [round(math.sin((x + y + k) / 5.0) * 100.0, 4)
                    for y in range(h) for x in range(w)]
        low, high = INT_RANGES[typ]
        return [low + (x * 3 + y * 5 + k) % min(high - low + 1, 251)
                for y in range(h) for x in range(w)]
    return [numeric_value(spec.type, k, spec.phase, i) for i in range(spec.length)]


def reference_pack(value: Any, float32: bool) -> bytes:
    """msgpack of a list, each float packed on its own (as the encoder did before)."""
    n = len(value)
    head = msgpack.packb([0] * n)[: -n or None]
    if value and isinstance(value[0], float):
        fmt, marker = (">f", b"\xca") if float32 else (">d", b"\xcb")
        return head + b"".join(marker + struct.pack(fmt, x) for x in value)
    return bytes(msgpack.packb(value))


def array_of(structure: dict[str, Any]) -> Any:
    value = structure["value"]
    return next(iter(value.values())) if isinstance(value, dict) else value


def bench_values(rounds: int) -> list[tuple[str, float, float]]:
    rows = []
    for name in ARRAY_PVS:
        spec = parse_pv(name)
        ours, base = [], []
        for k in range(rounds):
            t = time.process_time()
            got = pack(array_of(pv_structure(spec, k, WALL_NS)))
            ours.append(time.process_time() - t)
            t = time.process_time()
            want = reference_pack(reference_values(spec, k), spec.type == "FLOAT")
            base.append(time.process_time() - t)
            assert got == want, (name, k)
        rows.append((name, statistics.median(ours), statistics.median(base)))
    return rows


# ---------------------------------------------------------------------------------- engine
class EagerEngine(SimEngine):
    """The baseline: every update of every PV built when it happens (then published or not)."""

    def _pull(self, snap: Any, now: float) -> Any:
        for pv in snap.pvs:
            for k in range(snap.cursors[pv] + 1, self.pv_index(pv, now) + 1):
                self.structure(pv, k)
        return super()._pull(snap, now)


def bench_engine(cls: type[SimEngine], seconds: float, tick_s: float,
                 ) -> tuple[float, int, float]:
    """CPU seconds per published iteration, iterations, MB per iteration."""
    engine = cls(SimConfig(), now=0.0, wall_offset=1.7e9)
    cmd = {"command": "repeating_snapshot", "reply_topic": "r", "reply_id": "1",
           "snapshot_name": "bench", "pv_name_list": ENGINE_PVS, "time_window_msec": 50}
    engine.handle_command(json.dumps(cmd).encode(), 0.0)
    engine.drain()
    now, nbytes = 0.0, 0
    t = time.process_time()
    while now < seconds:
        now += tick_s
        engine.tick(now)
        for action in engine.drain():
            if isinstance(action, Produce):
                nbytes += len(action.value)
    cpu = time.process_time() - t
    n = engine.stats["iterations"]
    return cpu / n, n, nbytes / n / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="updates per array PV")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="simulated seconds of the engine run")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print("| array PV (one update) | ours ms | element by element ms | ratio |")
    print("|---|---:|---:|---:|")
    for name, ours, base in bench_values(args.rounds):
        print(f"| {name} | {ours * 1e3:.2f} | {base * 1e3:.2f} | {base / ours:.1f}x |")
    print(f"\nengine: {', '.join(ENGINE_PVS)}, a 50 ms window, {args.seconds:g} s simulated\n")
    print("| ticked every | iterations | MB per iteration | CPU ms per iteration | "
          "every update built, ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for tick_s in (0.05, 0.25):
        ours_it, n, mb = bench_engine(SimEngine, args.seconds, tick_s)
        base_it, n_base, _ = bench_engine(EagerEngine, args.seconds, tick_s)
        assert n == n_base, (n, n_base)
        print(f"| {tick_s * 1e3:.0f} ms | {n} | {mb:.2f} | {ours_it * 1e3:.1f} | "
              f"{base_it * 1e3:.1f} | {base_it / ours_it:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
