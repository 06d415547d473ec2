"""Micro-measure (not a test): IterationAssembler.feed() cost per message vs msgpack.unpackb.

Run: .venv/bin/python benchmarks/bench_feed.py
Prints, per shape, µs/message for plain ``msgpack.unpackb`` of the same bytes and for
``feed`` (decode + PVSample + assembly + events), and the ratio unpackb/feed, i.e. feed's
throughput relative to unpackb's (1.0 = as fast as unpackb; the requirement is >= 0.8).

``feed`` leaves each PV map undecoded (``PVSample.from_raw``); the ``feed+data`` column also
reads ``.data`` and ``.float32_paths`` of every sample, which is what a sink pays later, for
an end-to-end comparison. ``many`` is ``feed_many`` of all the records at once (the batched hot
path), ``raw`` the same over ``confluent_kafka.Message`` objects, which is what the client's
consumer thread runs (the Kafka adapter's raw mode: no Record built). The measurements are
interleaved round by round and the best of each is kept (the machine is shared; a sequential
best-of is skewed by load changes).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "unit"))
from k2eg_sequences import F32, MSGPACK_HEADERS, T0, iteration, ntscalar

from recorder.client.assembler import IterationAssembler
from recorder.client.events import ValuesReceived
from recorder.client.wire import Record, decode_snapshot_message

try:
    from confluent_kafka import Message
except ImportError:  # pragma: no cover - the raw column is then skipped
    Message = None


def build(n_iter: int, make_values: object, *, sequenced: bool) -> list[Record]:
    recs: list[Record] = []
    for idx in range(1, n_iter + 1):
        values = make_values(idx)  # type: ignore[operator]
        for m in iteration("bench", idx, [(T0 + idx * 1000, values)], sequenced=sequenced):
            recs.append(Record("bench", 0, len(recs), m.raw, list(MSGPACK_HEADERS)))
    return recs


def interleaved_best(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


RATIOS: dict[str, list[float]] = {"scalar": [], "waveform": []}


def measure(name: str, recs: list[Record], shape: str, rounds: int) -> None:
    raws = [r.value for r in recs]
    unpackb = msgpack.unpackb

    def base() -> None:
        for raw in raws:
            unpackb(raw)

    def decode() -> None:
        for r in recs:
            decode_snapshot_message(r.value, r.headers)

    def ours() -> None:
        asm = IterationAssembler()
        feed = asm.feed
        n_events = 0
        for rec in recs:
            n_events += len(feed(rec, 0.0))
        assert asm.counters["iterations.complete"] > 0, asm.counters

    def ours_many() -> None:
        asm = IterationAssembler()
        asm.feed_many(recs, 0.0)
        assert asm.counters["iterations.complete"] > 0, asm.counters

    messages = [
        Message(topic=r.topic, partition=r.partition, offset=r.offset, value=r.value,
                headers=r.headers)
        for r in recs
    ] if Message is not None else []

    def ours_raw() -> None:
        asm = IterationAssembler()
        asm.feed_many(messages, 0.0)
        assert asm.counters["iterations.complete"] > 0, asm.counters

    def ours_data() -> None:
        asm = IterationAssembler()
        feed = asm.feed
        for rec in recs:
            for event in feed(rec, 0.0):
                if isinstance(event, ValuesReceived):
                    for sample in event.samples:
                        _ = sample.data, sample.float32_paths

    fns = {"unpackb": base, "decode": decode, "feed": ours, "many": ours_many,
           "feed+data": ours_data}
    if messages:
        fns["raw"] = ours_raw
    best = interleaved_best(fns, rounds)
    best.setdefault("raw", float("nan"))
    n = len(recs)
    us = 1e6 / n
    ratio = best["unpackb"] / best["feed"]
    RATIOS[shape].append(ratio)
    print(
        f"{name:34s} n={n:5d} | unpackb {best['unpackb'] * us:6.2f} |"
        f" decode {best['decode'] * us:6.2f} | feed {best['feed'] * us:6.2f} |"
        f" many {best['many'] * us:6.2f} | raw {best['raw'] * us:6.2f} |"
        f" feed+data {best['feed+data'] * us:6.2f} us/msg |"
        f" unpackb/feed {ratio:4.2f} | unpackb/raw {best['unpackb'] / best['raw']:4.2f} |"
        f" unpackb/(feed+data) {best['unpackb'] / best['feed+data']:4.2f}"
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
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    for sequenced in (False, True):
        gen = "sequenced" if sequenced else "legacy"
        for label, make, shape, n_iter in (
            ("1000-PV f64 scalars", scalars, "scalar", 5),
            ("1000-PV f32 scalars", scalars32, "scalar", 5),
            ("50 x 1000 f64 waveforms", wave64, "waveform", 5),
            ("50 x 1000 f32 waveforms", wave32, "waveform", 5),
        ):
            recs = build(n_iter, make, sequenced=sequenced)
            measure(f"{label}, {gen}", recs, shape, rounds)
    for shape, ratios in RATIOS.items():
        print(f"{shape:8s} throughput feed/unpackb: min {min(ratios):4.2f}  max {max(ratios):4.2f}")


if __name__ == "__main__":
    main()
