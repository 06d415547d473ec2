"""A bridge client that connects but never reads must not slow recording down: handle() never
blocks, the sink drops (latest wins) instead of queueing, and the HDF5 file gets everything."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import zmq
from bridge_support import tid, wait_subscribed
from karabo_bridge import Client

from recorder.client.events import (
    IterationClosed,
    IterationEvent,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.values import PVSample
from recorder.reader import open_file
from recorder.sinks.bridge import BridgeOptions
from recorder.sinks.bridge.sink import KaraboBridgeSink
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions

N_ITER = 60
WAVEFORM = 200_000  # float64 elements: 1.6 MB per iteration on the wire


def make_events() -> list[IterationEvent]:
    events: list[IterationEvent] = []
    wave = np.arange(WAVEFORM, dtype=np.float64).tolist()
    for i in range(N_ITER):
        ts = {"secondsPastEpoch": 1_700_000_000 + i, "nanoseconds": 0}
        events.append(IterationOpened("t", "s", i, 1000 * i))
        events.append(ValuesReceived("t", i, 1, 1, (
            PVSample("WF", {"value": wave, "timeStamp": ts}),
        )))
        events.append(ValuesReceived("t", i, 2, 2, (
            PVSample("X", {"value": float(i), "timeStamp": ts}),
        )))
        events.append(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, 1000 * i,
                                      1000 * i + 1, n_values=2, n_pvs=2, n_batches=2))
    return events


def record(tmp_path: Path, sink: KaraboBridgeSink,
           events: list[IterationEvent]) -> tuple[float, float, float, Path]:
    """Drive an HDF5Recording and the sink like the daemon does; returns (total seconds,
    seconds spent in the sink's handle(), the slowest single handle(), the file)."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path, compression="none"), run_name="bp")
    in_sink = 0.0
    slowest = 0.0
    start = time.perf_counter()
    for event in events:
        rec.handle(event)
        t0 = time.perf_counter()
        sink.handle(event)
        dt = time.perf_counter() - t0
        in_sink += dt
        slowest = max(slowest, dt)
        rec.maybe_flush()
    total = time.perf_counter() - start
    (path,) = rec.close()
    return total, in_sink, slowest, path


def test_clients_that_never_read_do_not_slow_recording(tmp_path: Path) -> None:
    options = BridgeOptions(rep=0, pub=0, queue_size=2, pub_hwm=1)  # type: ignore[arg-type]

    # baseline: nobody connected
    base = KaraboBridgeSink(options, run_name="base")
    try:
        # fresh samples for each run (samples cache their decoded/typed values)
        base_total, base_sink, _, _ = record(tmp_path / "base", base, make_events())
    finally:
        base.close()

    sink = KaraboBridgeSink(options, run_name="stalled")
    ctx = zmq.Context()
    stuck = ctx.socket(zmq.REQ)  # asks once, never receives the reply
    stuck.setsockopt(zmq.LINGER, 0)
    idle_req = Client(sink.endpoints["rep"], sock="REQ")  # connected, never asks
    idle_sub = Client(sink.endpoints["pub"], sock="SUB")  # subscribed, never reads (HWM 1)
    try:
        stuck.connect(sink.endpoints["rep"])
        stuck.send(b"next")
        wait_subscribed(sink)
        events = make_events()
        total, in_sink, slowest, path = record(tmp_path / "stalled", sink, events)

        # a client that finally reads gets a handful of iterations, not a backlog
        idle_sub._socket.setsockopt(zmq.RCVTIMEO, 500)
        backlog = []
        while True:
            try:
                backlog.append(idle_sub.next())
            except TimeoutError:
                break
        # and a new REQ client gets the newest iteration at once (latest wins)
        with Client(sink.endpoints["rep"], sock="REQ", timeout=10) as fresh:
            newest = fresh.next()
    finally:
        stuck.close()
        ctx.term()
        idle_req.__exit__(None, None, None)
        idle_sub.__exit__(None, None, None)
        sink.close()

    print(f"baseline {len(events) / base_total:.0f} events/s (sink {base_sink * 1e3:.1f} ms), "
          f"stalled clients {len(events) / total:.0f} events/s (sink {in_sink * 1e3:.1f} ms, "
          f"slowest handle {slowest * 1e3:.1f} ms); backlog {len(backlog)}; {dict(sink.counters)}")
    # handle() never waited for a client (a blocking one would hang here until the timeout)
    assert slowest < 0.5
    assert in_sink < base_sink + 3.0
    # the whole recording loop ran at (about) the same rate; generous for a loaded machine
    assert total < 2 * base_total + 3.0
    # the sink served or dropped every iteration, and really built/sent for the subscriber
    assert sink.counters["iterations"] == N_ITER
    assert sink.counters["served"] + sink.counters.get("dropped_iterations", 0) == N_ITER
    assert sink.counters["built"] >= 1 and sink.counters["published"] >= 1
    # ZeroMQ dropped for the stalled subscriber instead of queueing everything
    assert len(backlog) < N_ITER // 2
    assert tid(newest) == N_ITER - 1
    # recording itself lost nothing
    with open_file(path) as f:
        its = f.iterations()
        assert its["iter_index"].tolist() == list(range(N_ITER))
        assert set(its["status"].tolist()) == {"complete"}
        assert f.values("WF").shape == (N_ITER, WAVEFORM)
