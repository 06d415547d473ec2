"""Micro-measure (not a test): IterationAssembler.feed() cost per message vs msgpack.unpackb.

Run: .venv/bin/python tests/unit/bench_feed.py
Prints, per shape, µs/message for plain ``msgpack.unpackb`` of the same bytes and for
``feed`` (decode + float32 detection + PVSample + assembly + events), and the ratio
unpackb/feed (1.0 = feed costs nothing on top of unpackb).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).parent))
from k2eg_sequences import F32, MSGPACK_HEADERS, T0, iteration, ntscalar

from recorder.client.assembler import IterationAssembler
from recorder.client.wire import Record, decode_snapshot_message


def build(n_iter: int, make_values: object, *, sequenced: bool) -> list[Record]:
    recs: list[Record] = []
    for idx in range(1, n_iter + 1):
        values = make_values(idx)  # type: ignore[operator]
        for m in iteration("bench", idx, [(T0 + idx * 1000, values)], sequenced=sequenced):
            recs.append(Record("bench", 0, len(recs), m.raw, list(MSGPACK_HEADERS)))
    return recs


def best_of(fn: object, repeat: int = 9) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t)
    return best


def measure(name: str, recs: list[Record]) -> None:
    raws = [r.value for r in recs]
    unpackb = msgpack.unpackb

    def base() -> None:
        for raw in raws:
            unpackb(raw)

    def base_keep() -> None:
        kept = [unpackb(raw) for raw in raws]
        del kept

    def decode_keep() -> None:
        kept = [decode_snapshot_message(r.value, r.headers) for r in recs]
        del kept

    def ours() -> None:
        asm = IterationAssembler()
        feed = asm.feed
        n_events = 0
        for rec in recs:
            n_events += len(feed(rec, 0.0))
        assert asm.counters["iterations.complete"] > 0, asm.counters

    t_base = best_of(base)
    t_keep = best_of(base_keep)
    t_decode = best_of(decode_keep)
    t_ours = best_of(ours)
    n = len(recs)
    us = 1e6 / n
    print(
        f"{name:40s} n={n:5d} | unpackb {t_base * us:6.2f} | unpackb+keep {t_keep * us:6.2f} |"
        f" decode+keep {t_decode * us:6.2f} | feed {t_ours * us:6.2f} us/msg |"
        f" unpackb/feed {t_base / t_ours:4.2f} | unpackb+keep/feed {t_keep / t_ours:4.2f}"
    )


def scalars(idx: int) -> list[tuple[str, Any]]:
    return [(f"PV:{i}", ntscalar(float(i) + idx, nanos=idx)) for i in range(1000)]


def scalars32(idx: int) -> list[tuple[str, Any]]:
    return [(f"PV:{i}", ntscalar(F32(float(i)), nanos=idx)) for i in range(1000)]


def wave64(idx: int) -> list[tuple[str, Any]]:
    return [(f"W:{i}", ntscalar([float(j) for j in range(1000)], nanos=idx)) for i in range(50)]


def wave32(idx: int) -> list[tuple[str, Any]]:
    wave = [F32(float(j)) for j in range(1000)]
    return [(f"W:{i}", ntscalar(wave, nanos=idx)) for i in range(50)]


def main() -> None:
    for sequenced in (False, True):
        gen = "sequenced" if sequenced else "legacy"
        measure(f"1000-PV f64 scalars, {gen}", build(5, scalars, sequenced=sequenced))
        measure(f"1000-PV f32 scalars, {gen}", build(5, scalars32, sequenced=sequenced))
        measure(f"50 x 1000 f64 waveforms, {gen}", build(5, wave64, sequenced=sequenced))
        measure(f"50 x 1000 f32 waveforms, {gen}", build(5, wave32, sequenced=sequenced))


if __name__ == "__main__":
    main()
