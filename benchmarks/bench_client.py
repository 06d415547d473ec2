"""Client throughput: our Kafka adapter + iteration assembler vs a bare confluent-kafka loop.

Run: ``.venv/bin/python benchmarks/bench_client.py [--iterations-scalar N] [--repeat R]``

An embedded broker (Tansu) is started, and one topic per payload kind is pre-filled with a
sequenced k2eg snapshot stream (header, 1,000 data messages, tail per iteration) encoded by the
gateway simulator's own encoder (:mod:`recorder.sim.encoding`, float32 packing included):

* ``scalars``: NTScalar double/float PVs (value, alarm, timeStamp, display, control,
  valueAlarm: the gateway's full structure, ~420 bytes a message);
* ``waveforms``: NTScalarArray double/float PVs of 128 elements (~1.3 kB a message).

Then, in the same run, each measurement is repeated and the best is kept:

* (a) baseline: ``Consumer.assign`` + ``consume(1000)`` + ``msgpack.unpackb`` of every value,
  the consumer configured as ours fetches (:data:`recorder.client.kafka.FETCH_TUNING`; before
  2026-11-24 it had librdkafka's default ``fetch.queue.backoff.ms`` of 1 s, which idled it);
* (b0) our adapter alone: ``KafkaAdapter`` + ``msgpack.unpackb`` of every record (the adapter's
  own cost, for comparison only);
* (b) ours, as :class:`recorder.client.K2egClient` runs it: the
  :class:`recorder.client.kafka.KafkaAdapter` in raw mode (consumer thread, the consumed
  messages handed over as they are) feeding
  :meth:`recorder.client.assembler.IterationAssembler.feed_many` (validation, PVSample,
  assembly) until every iteration's ``IterationClosed`` came out.

Printed: messages/s for both, events/s for (b), and the ratio (b)/(a) (target >= 0.8).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgpack
import structlog
from confluent_kafka import Consumer, Message, Producer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recorder.broker import EmbeddedBroker
from recorder.client.assembler import IterationAssembler
from recorder.client.events import IterationClosed, IterationEvent
from recorder.client.kafka import FETCH_TUNING, KafkaAdapter, StartAt
from recorder.client.wire import Record
from recorder.settings import KafkaSettings
from recorder.sim.encoding import SER_HEADER, SER_MSGPACK, pack
from recorder.sim.pvs import parse_pv, pv_structure

PVS_PER_ITERATION = 1000
SNAPSHOT = "bench_snap"


# ------------------------------------------------------------------------------ the stream
def pv_names(kind: str, n: int) -> list[str]:
    if kind == "scalars":
        return [f"BENCH:SIM:AI:{'FLOAT' if i % 4 == 0 else 'DOUBLE'}:{i}" for i in range(n)]
    return [f"BENCH:SIM:WF:{'FLOAT' if i % 4 == 0 else 'DOUBLE'}:{i}:N128" for i in range(n)]


def packed_pvs(kind: str, n: int) -> list[tuple[str, bytes]]:
    """(name, msgpack bytes of its PV structure), built by the simulator's PV model/encoder."""
    wall_ns = time.time_ns()
    out = []
    for name in pv_names(kind, n):
        spec = parse_pv(name.removeprefix("BENCH:"))
        out.append((name, pack(pv_structure(spec, 7, wall_ns))))
    return out


def _with_pv(meta: dict[str, object], pv: str, pv_bytes: bytes) -> bytes:
    """``pack({**meta, pv: <structure>})`` without re-packing the structure every time."""
    head = pack(meta)  # fixmap: 0x80 | len(meta), then the pairs
    assert head[0] & 0xF0 == 0x80 and len(meta) < 15
    return bytes((head[0] + 1,)) + head[1:] + pack(pv) + pv_bytes


def iteration_messages(index: int, pvs: list[tuple[str, bytes]], ts_ms: int) -> list[bytes]:
    """One sequenced iteration exactly as the simulator publishes it (one submission)."""
    seq = 1
    out = [pack({"message_type": 0, "snapshot_name": SNAPSHOT, "timestamp": ts_ms,
                 "iter_index": index, "msg_seq": seq, "submission_seq": 1})]
    for i, (name, pv_bytes) in enumerate(pvs):
        seq += 1
        meta: dict[str, object] = {"message_type": 1, "timestamp": ts_ms, "iter_index": index,
                                   "msg_seq": seq, "submission_seq": 1}
        if i == len(pvs) - 1:
            meta["last_submission_data"] = True
        out.append(_with_pv(meta, name, pv_bytes))
    seq += 1
    out.append(pack({"message_type": 2, "error": 0, "iter_index": index, "timestamp": ts_ms,
                     "snapshot_name": SNAPSHOT, "msg_seq": seq, "total_messages": seq,
                     "submission_seq": 1}))
    return out


def fill_topic(bootstrap: str, topic: str, kind: str, iterations: int) -> tuple[int, int]:
    """Produce ``iterations`` iterations; returns (messages, bytes)."""
    pvs = packed_pvs(kind, PVS_PER_ITERATION)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "batch.num.messages": 10000, "queue.buffering.max.messages": 200000,
                         "compression.type": "none"})
    headers = [(SER_HEADER, SER_MSGPACK.encode())]
    n = size = 0
    ts = int(time.time() * 1000)
    for index in range(1, iterations + 1):
        for value in iteration_messages(index, pvs, ts + 100 * index):
            while True:
                try:
                    producer.produce(topic, value=value, key=SNAPSHOT, partition=0,
                                     headers=headers)
                    break
                except BufferError:
                    producer.poll(0.05)
            n += 1
            size += len(value)
        producer.poll(0)
    if producer.flush(60) != 0:
        raise RuntimeError("could not produce the benchmark stream")
    return n, size


# ------------------------------------------------------------------------------ measurements
@dataclass
class Result:
    seconds: float
    messages: int
    events: int = 0
    iterations: int = 0
    values: int = 0

    @property
    def msg_rate(self) -> float:
        return self.messages / self.seconds

    @property
    def event_rate(self) -> float:
        return self.events / self.seconds

    @property
    def value_rate(self) -> float:
        return self.values / self.seconds


def run_baseline(bootstrap: str, topic: str, total: int) -> Result:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}",
                         "enable.auto.commit": False, **FETCH_TUNING})
    unpack = msgpack.unpackb
    try:
        t0 = time.perf_counter()
        consumer.assign([TopicPartition(topic, 0, 0)])
        n = 0
        while n < total:
            for msg in consumer.consume(1000, 0.05):
                if msg.error() is None:
                    unpack(msg.value())
                    n += 1
        return Result(time.perf_counter() - t0, n)
    finally:
        consumer.close()


def run_adapter_only(bootstrap: str, topic: str, total: int) -> Result:
    """(b0): our adapter + ``msgpack.unpackb`` of every record (no core): the adapter's cost."""
    done = threading.Event()
    count = [0]
    unpack = msgpack.unpackb

    def on_records(records: list[Record], drained: bool) -> None:
        for record in records:
            unpack(record.value)
        count[0] += len(records)
        if count[0] >= total:
            done.set()

    settings = KafkaSettings(bootstrap_servers=bootstrap, app_name="bench")
    adapter = KafkaAdapter(settings, on_records, batch_size=1000).start()
    try:
        t0 = time.perf_counter()
        adapter.add_topic(topic, StartAt.beginning()).result(10)
        if not done.wait(300):
            raise RuntimeError(f"drained only {count[0]} of {total} messages")
        return Result(time.perf_counter() - t0, count[0])
    finally:
        adapter.close()


def run_ours(bootstrap: str, topic: str, total: int, iterations: int) -> Result:
    assembler = IterationAssembler(iteration_timeout_s=60)
    done = threading.Event()
    state = {"records": 0, "events": 0, "closed": 0}

    def on_records(records: list[Message], drained: bool) -> None:
        now = time.monotonic()
        events: list[IterationEvent] = assembler.feed_many(records, now)
        if drained:
            events.extend(assembler.idle(now))
        state["records"] += len(records)
        state["events"] += len(events)
        state["closed"] += sum(1 for e in events if isinstance(e, IterationClosed))
        if state["records"] >= total and state["closed"] >= iterations:
            done.set()

    settings = KafkaSettings(bootstrap_servers=bootstrap, app_name="bench")
    adapter = KafkaAdapter(settings, on_records, batch_size=1000, raw_messages=True).start()
    try:
        t0 = time.perf_counter()
        adapter.add_topic(topic, StartAt.beginning()).result(10)
        if not done.wait(300):
            raise RuntimeError(f"drained only {state} of {total} messages")
        seconds = time.perf_counter() - t0
    finally:
        adapter.close()
    complete = assembler.counters["iterations.complete"]
    if complete != iterations:
        raise RuntimeError(f"{complete} complete iterations, expected {iterations}")
    return Result(seconds, state["records"], state["events"], state["closed"],
                  assembler.counters["values"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations-scalar", type=int, default=300)
    parser.add_argument("--iterations-waveform", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", metavar="FILE", help="cProfile (b) once, into FILE")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    rows = []
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        for kind, iterations in (("scalars", args.iterations_scalar),
                                 ("waveforms", args.iterations_waveform)):
            topic = f"bench-{kind}-{uuid.uuid4().hex[:6]}"
            t0 = time.perf_counter()
            total, size = fill_topic(bootstrap, topic, kind, iterations)
            print(f"{kind}: {iterations} iterations x {PVS_PER_ITERATION} PVs = {total} messages, "
                  f"{size / total:.0f} B/message avg, produced in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            base_runs: list[float] = []
            ours_runs: list[float] = []
            adapter_runs: list[float] = []
            base = ours = None
            # one discarded warm-up round: the first read of a freshly produced topic is
            # served faster by the broker (measured: 1.3-2x on Tansu) and would favour (a)
            run_baseline(bootstrap, topic, total)
            run_adapter_only(bootstrap, topic, total)
            run_ours(bootstrap, topic, total, iterations)
            for _ in range(args.repeat):  # interleaved, so all see the same machine load
                b = run_baseline(bootstrap, topic, total)
                a = run_adapter_only(bootstrap, topic, total)
                o = run_ours(bootstrap, topic, total, iterations)
                base_runs.append(b.msg_rate)
                adapter_runs.append(a.msg_rate)
                ours_runs.append(o.msg_rate)
                base = b if base is None or b.seconds < base.seconds else base
                ours = o if ours is None or o.seconds < ours.seconds else ours
            assert base is not None and ours is not None
            if args.profile:
                import cProfile
                import pstats
                prof = cProfile.Profile()
                prof.enable()
                run_ours(bootstrap, topic, total, iterations)
                prof.disable()
                path = f"{args.profile}.{kind}"
                prof.dump_stats(path)
                pstats.Stats(path).sort_stats("tottime").print_stats(15)
            rows.append((kind, base, ours, base_runs, ours_runs))
            print(f"  (a) baseline  best {base.msg_rate:>9,.0f} msg/s  "
                  f"runs {[f'{r:,.0f}' for r in base_runs]}", flush=True)
            print(f"  (b0) adapter + unpackb (no core) best {max(adapter_runs):>9,.0f} msg/s  "
                  f"runs {[f'{r:,.0f}' for r in adapter_runs]}", flush=True)
            print(f"  (b) ours      best {ours.msg_rate:>9,.0f} msg/s  "
                  f"{ours.event_rate:,.0f} events/s ({ours.value_rate:,.0f} PV values/s)  "
                  f"runs {[f'{r:,.0f}' for r in ours_runs]}", flush=True)
    print()
    print(f"{'payload':<10} {'(a) msg/s':>12} {'(b) msg/s':>12} {'(b) events/s':>13} "
          f"{'(b) values/s':>13} {'ratio best':>10} {'ratio paired':>12}")
    # The verdict uses the median of the per-round ratios: (a) and (b) run back to back in
    # each round, so a load change on the shared machine hits both sides of one ratio.
    ok = True
    for kind, base, ours, base_runs, ours_runs in rows:
        ratio = ours.msg_rate / base.msg_rate
        paired = statistics.median(o / b for o, b in zip(ours_runs, base_runs, strict=True))
        ok &= paired >= 0.8
        print(f"{kind:<10} {base.msg_rate:>12,.0f} {ours.msg_rate:>12,.0f} "
              f"{ours.event_rate:>13,.0f} {ours.value_rate:>13,.0f} {ratio:>9.2f}x "
              f"{paired:>11.2f}x")
    print("target (b)/(a) >= 0.8x (median of paired rounds):", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
