"""Gateway simulator -> real broker -> K2egClient -> HDF5Recording + KaraboBridgeSink, with
real karabo_bridge clients (REQ and SUB) reading live over loopback: what they receive is what
the reader returns from the file for the same iteration; clients that never read do not hold
recording back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from bridge_support import (
    Collector,
    assert_same,
    over_the_wire,
    strip_v1,
    tid,
    wait_for,
    wait_subscribed,
)
from karabo_bridge import Client

from recorder.client import (
    IterationClosed,
    IterationEvent,
    K2egClient,
    SnapshotProperties,
    SnapshotType,
)
from recorder.reader import open_file
from recorder.settings import KafkaSettings
from recorder.sim import GatewaySimulator, Protocol, SimConfig
from recorder.sinks.bridge import RECORDER_SOURCE, BridgeOptions
from recorder.sinks.bridge.mapping import Train
from recorder.sinks.bridge.sink import KaraboBridgeSink
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions

pytestmark = pytest.mark.integration


@pytest.fixture
def cmd_topic(unique_name: Callable[[str], str]) -> str:
    return unique_name("cmd")


@pytest.fixture
def sim(kafka_bootstrap: str, cmd_topic: str) -> Iterator[GatewaySimulator]:
    simulator = GatewaySimulator(kafka_bootstrap, cmd_topic, SimConfig(Protocol.SEQUENCED))
    simulator.start()
    yield simulator
    simulator.stop()


@pytest.fixture
def client(
    kafka_bootstrap: str, cmd_topic: str, unique_name: Callable[[str], str],
    sim: GatewaySimulator,
) -> Iterator[K2egClient]:
    settings = KafkaSettings(bootstrap_servers=kafka_bootstrap, cmd_topic=cmd_topic,
                             app_name=unique_name("app"), command_timeout_s=10)
    k2eg = K2egClient(settings, iteration_slack_s=1.0)
    yield k2eg
    k2eg.close()


class BothSinks:
    """The daemon's job in miniature: every event to the HDF5 recording and to the bridge."""

    def __init__(self, rec: HDF5Recording, sink: KaraboBridgeSink) -> None:
        self.rec = rec
        self.sink = sink
        self.closed: list[IterationClosed] = []
        self.lag_s: list[float] = []  # wall time at handling minus the gateway's tail time
        self.sink_s = 0.0
        self._cond = threading.Condition()

    def __call__(self, event: IterationEvent) -> None:
        self.rec.handle(event)
        t0 = time.perf_counter()
        self.sink.handle(event)
        self.sink_s += time.perf_counter() - t0
        self.rec.maybe_flush()
        if isinstance(event, IterationClosed):
            with self._cond:
                self.closed.append(event)
                if event.tail_timestamp_ns:
                    self.lag_s.append(time.time() - event.tail_timestamp_ns / 1e9)
                self._cond.notify_all()

    def wait_closed(self, n: int, timeout: float = 30.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.closed) >= n, timeout):
                raise AssertionError(f"only {len(self.closed)} iterations closed")


NORMAL_PVS = [
    "pva://SIM:AI:DOUBLE:1", "pva://SIM:AI:FLOAT:2", "pva://SIM:AI:ULONG:3",
    "pva://SIM:BI:BOOL:4", "pva://SIM:SI:STRING:5", "pva://SIM:MBBI:ENUM:6",
    "pva://SIM:WF:FLOAT:7:N32", "pva://SIM:TABLE:8", "pva://SIM:IMG:USHORT:9:S16x8",
]
TB_PVS = ["pva://SIM:AI:DOUBLE:1:P20", "pva://SIM:WFVAR:DOUBLE:2:N8:P50",
          "pva://SIM:IMG:UBYTE:3:S8x4:P50"]


@pytest.mark.parametrize(("snap_type", "version"), [
    (SnapshotType.NORMAL, "2.2"), (SnapshotType.TIMEDBUFFERED, "2.2"),
    (SnapshotType.TIMEDBUFFERED, "1.0"),
])
def test_live_iterations_match_the_hdf5_file(
    tmp_path: Path, client: K2egClient, unique_name: Callable[[str], str],
    snap_type: SnapshotType, version: str,
) -> None:
    name = unique_name("br").replace("-", "_")
    if snap_type is SnapshotType.NORMAL:
        props = SnapshotProperties(name, NORMAL_PVS, time_window=100)
    else:
        props = SnapshotProperties(name, TB_PVS, time_window=300, sub_push_delay_msec=100,
                                   type=SnapshotType.TIMEDBUFFERED)
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="e2e", snapshot=props)
    sink = KaraboBridgeSink(
        BridgeOptions(rep=0, pub=0, pub_hwm=16, protocol_version=version),  # type: ignore[arg-type]
        run_name="e2e", snapshot=props,
    )
    sub = Collector(sink.endpoints["pub"], "SUB").start()
    req = Collector(sink.endpoints["rep"], "REQ").start()
    try:
        wait_subscribed(sink)
        both = BothSinks(rec, sink)
        client.snapshot_recurring(props, both)
        both.wait_closed(6)
        # the REQ client's three answers are waited for, not assumed from the run's length
        # (its thread shares this process with the simulator and the client on a busy machine)
        wait_for(lambda: len(req.trains) >= 3, 30, "three replies to the REQ client")
        client.snapshot_stop(props.snapshot_name)
        (path,) = rec.close()
        sink.close()
        wait_for(lambda: len(sub.trains) >= sink.counters["published"], 30, "SUB delivery")
    finally:
        from_sub = sub.stop()
        from_req = req.stop()
        sink.close()
    with open_file(path) as f:
        from_file: dict[int, Train] = {tid(t): t for t in f.trains()}
    assert len(from_file) >= 6
    # every iteration the file holds went out on PUB, in the same order, nothing else
    assert sink.counters["iterations"] == sink.counters["served"] == sink.counters["published"]
    assert [tid(t) for t in from_sub] == list(from_file)
    # the REQ client got the newest iteration at each `next`: increasing, never twice
    req_tids = [tid(t) for t in from_req]
    assert len(req_tids) >= 3 and req_tids == sorted(set(req_tids))
    for received in [*from_sub, *from_req]:
        got = strip_v1(*received, version)
        assert_same(got, over_the_wire(from_file[tid(got)], version), f"iteration {tid(got)}")
    # what a client sees, on a full iteration in the middle of the run
    data, meta = from_sub[2]
    pvs = [uri.split("://")[1] for uri in props.pv_uri_list]
    assert set(data) == {*pvs, RECORDER_SOURCE}
    assert data[RECORDER_SOURCE]["complete"] is True
    assert data[RECORDER_SOURCE]["expected_messages"] > 0
    for pv in pvs:
        assert meta[pv]["timestamp.tid"] == tid(from_sub[2])
        assert int(meta[pv]["timestamp.sec"]) == pytest.approx(time.time(), abs=120)
    if snap_type is SnapshotType.NORMAL:
        assert data["SIM:WF:FLOAT:7:N32"]["value"].dtype == np.float32
        assert data["SIM:WF:FLOAT:7:N32"]["value"].shape == (32,)
        assert data["SIM:IMG:USHORT:9:S16x8"]["value"].shape == (8, 16)
        assert data["SIM:IMG:USHORT:9:S16x8"]["value"].dtype == np.uint16
        assert isinstance(data["SIM:AI:ULONG:3"]["value"], int)
        assert data["SIM:MBBI:ENUM:6"]["value.choices"] == ["ZERO", "ONE", "TWO", "THREE"]
        assert "value.position" in data["SIM:TABLE:8"]
        assert "alarm.severity" in data["SIM:AI:DOUBLE:1"]
        assert "timeStamp.secondsPastEpoch" in data["SIM:AI:DOUBLE:1"]
    else:
        fast = data["SIM:AI:DOUBLE:1:P20"]["value"]
        assert fast.ndim == 1 and fast.shape[0] >= 10  # every 20 ms value of a 300 ms window
        n_img = data["SIM:IMG:UBYTE:3:S8x4:P50"]["value"].shape
        assert n_img[1:] == (4, 8) and n_img[0] >= 4
        times = data["SIM:AI:DOUBLE:1:P20"]["timeStamp.secondsPastEpoch"]
        assert len(times) == fast.shape[0]
        assert isinstance(data["SIM:WFVAR:DOUBLE:2:N8:P50"]["value"], list)  # ragged


def test_recording_keeps_up_with_clients_that_never_read(
    tmp_path: Path, client: K2egClient, unique_name: Callable[[str], str]
) -> None:
    """50 ms iterations of ~0.4 MB (a 128x128 ushort image and a 20000-point waveform) with a
    subscriber that never reads and REQ clients that never ask or never take the reply."""
    name = unique_name("stall").replace("-", "_")
    props = SnapshotProperties(
        name, ["pva://SIM:IMG:USHORT:1:S128x128:P50", "pva://SIM:WF:DOUBLE:2:N20000:P50",
               "pva://SIM:AI:DOUBLE:3:P50"], time_window=50,
    )
    rec = HDF5Recording(OutputOptions(directory=tmp_path, compression="none"),
                        run_name="stall", snapshot=props)
    sink = KaraboBridgeSink(BridgeOptions(rep=0, pub=0, pub_hwm=1),  # type: ignore[arg-type]
                            run_name="stall", snapshot=props)
    ctx = zmq.Context()
    stuck = ctx.socket(zmq.REQ)
    stuck.setsockopt(zmq.LINGER, 0)
    idle_sub = Client(sink.endpoints["pub"], sock="SUB")
    idle_req = Client(sink.endpoints["rep"], sock="REQ")
    try:
        stuck.connect(sink.endpoints["rep"])
        stuck.send(b"next")
        wait_subscribed(sink)
        both = BothSinks(rec, sink)
        started = time.monotonic()
        client.snapshot_recurring(props, both)
        both.wait_closed(60, timeout=60)
        elapsed = time.monotonic() - started
        client.snapshot_stop(props.snapshot_name)
        (path,) = rec.close()
    finally:
        stuck.close()
        ctx.term()
        idle_sub.__exit__(None, None, None)
        idle_req.__exit__(None, None, None)
        sink.close()
    closed = both.closed
    print(f"{len(closed)} iterations in {elapsed:.1f} s; handler lag max "
          f"{max(both.lag_s):.3f} s, last {both.lag_s[-1]:.3f} s; bridge handle() total "
          f"{both.sink_s * 1e3:.1f} ms; {dict(sink.counters)}")
    # recording kept up in real time: the lag behind the gateway does not grow
    assert all(c.complete for c in closed[1:-1])
    assert sorted(both.lag_s)[len(both.lag_s) // 2] < 0.5 and both.lag_s[-1] < 1.0
    assert sink.counters["published"] >= 1  # the serving thread really was sending
    with open_file(path) as f:
        indexes = f.iterations()["iter_index"].tolist()
        assert indexes == list(range(indexes[0], indexes[0] + len(indexes)))  # no gaps
        assert len(indexes) >= 60
        assert f.values("SIM:WF:DOUBLE:2:N20000:P50").shape[1:] == (20000,)
