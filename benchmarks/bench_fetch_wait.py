"""What a consumer's ``fetch.wait.max.ms`` costs the broker while idle, and buys in latency.

Run: ``.venv/bin/python benchmarks/bench_fetch_wait.py [--waits 10,100,500] [--seconds 5]
[--samples 40]``

Our consumers use ``fetch.wait.max.ms`` = 10 (:mod:`recorder.client.kafka`; the official k2eg
client uses 5): an idle consumer then sends a fetch every ~10 ms. This measures, against an
embedded broker (Tansu) in the same run, for each value:

* ``broker CPU``: CPU seconds the broker process spends per second serving one consumer
  assigned to an empty partition (``/proc/PID/stat``), and that as a ratio to the first
  value (the baseline, 10 ms by default);
* ``latency``: a message produced (and flushed) at a random moment until the consumer has it,
  median / p90 / max over ``--samples`` messages. A real Kafka broker answers a waiting
  fetch as soon as data arrives; Tansu's own wake-up is coarser, which the larger values show.

Operators can change it for every consumer of the daemon:
``RECORDER_KAFKA__FETCH__WAIT__MAX__MS=100`` (librdkafka options set that way win).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recorder.broker import EmbeddedBroker


def broker_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def consumer(bootstrap: str, topic: str, wait_ms: int, offset: int) -> Consumer:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": wait_ms})
    c.assign([TopicPartition(topic, 0, offset)])
    c.consume(10, 1.0)  # connected, fetching
    return c


def idle_cost(bootstrap: str, pid: int, topic: str, wait_ms: int, seconds: float) -> float:
    c = consumer(bootstrap, topic, wait_ms, 1)
    try:
        before, t0 = broker_cpu_s(pid), time.monotonic()
        while time.monotonic() - t0 < seconds:
            c.consume(100, 0.1)
        return (broker_cpu_s(pid) - before) / (time.monotonic() - t0)
    finally:
        c.close()


def latencies(bootstrap: str, producer: Producer, topic: str, wait_ms: int, *, samples: int,
              offset: int) -> list[float]:
    c = consumer(bootstrap, topic, wait_ms, offset)
    out: list[float] = []
    try:
        for _ in range(samples):
            time.sleep(0.05 + random.random() * 0.2)
            t0 = time.perf_counter()
            producer.produce(topic, b"y", partition=0)
            producer.flush(5)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if any(m.error() is None for m in c.consume(10, 0.01)):
                    out.append((time.perf_counter() - t0) * 1000)
                    break
            else:
                raise RuntimeError(f"fetch.wait.max.ms={wait_ms}: a message did not arrive")
        return out
    finally:
        c.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waits", default="10,100,500", help="values to compare (ms)")
    parser.add_argument("--seconds", type=float, default=5.0, help="idle measurement each")
    parser.add_argument("--samples", type=int, default=40, help="latency samples each")
    args = parser.parse_args(argv)
    waits = [int(w) for w in args.waits.split(",")]
    random.seed(1)
    with EmbeddedBroker() as broker:
        pid = broker.pid
        assert pid is not None
        bootstrap = broker.bootstrap_servers
        topic = f"bench-fetch-wait-{uuid.uuid4().hex[:8]}"
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
        producer.produce(topic, b"x", partition=0)
        producer.flush(10)
        time.sleep(1.0)
        rows = []
        offset = 1
        for wait in waits:
            cost = idle_cost(bootstrap, pid, topic, wait, args.seconds)
            lat = sorted(latencies(bootstrap, producer, topic, wait, samples=args.samples,
                                   offset=offset))
            offset += args.samples
            rows.append((wait, cost, lat))
            print(f"[fetch-wait] {wait} ms: broker {cost:.3f} CPU-s/s, latency median "
                  f"{statistics.median(lat):.1f} ms", file=sys.stderr)
    base = rows[0][1]
    print(f"Tansu, one consumer on an empty partition; baseline fetch.wait.max.ms={rows[0][0]}\n")
    print("| fetch.wait.max.ms | broker CPU-s per s idle | vs baseline | latency median ms "
          "| p90 ms | max ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for wait, cost, lat in rows:
        ratio = cost / base if base else float("nan")
        print(f"| {wait} | {cost:.3f} | {ratio:.2f}x | {statistics.median(lat):.1f} | "
              f"{lat[int(len(lat) * 0.9)]:.1f} | {max(lat):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
