"""KaraboBridgeSink with the real karabo_bridge.Client (REQ and SUB) over loopback, fed the
same hand-built event stream as an HDF5Recording: every iteration a client receives equals
what the reader returns from the HDF5 file for the same iter_index."""

from __future__ import annotations

import concurrent.futures
import math
import time
from pathlib import Path
from typing import Any

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

from recorder.client.events import (
    IncompleteReason,
    IterationClosed,
    IterationEvent,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.properties import SnapshotProperties, SnapshotType
from recorder.client.values import PVSample
from recorder.reader import open_file
from recorder.sinks.bridge import (
    RECORDER_SOURCE,
    BridgeOptions,
    IterationInfo,
    build_train,
    create_bridge_sink,
)
from recorder.sinks.bridge.mapping import Train
from recorder.sinks.bridge.sink import KaraboBridgeSink
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions

SEC = 1_700_000_000


def _ts(i: int) -> dict[str, Any]:
    return {"secondsPastEpoch": SEC + i, "nanoseconds": 123_456_789 + i, "userTag": 0}


def make_samples(i: int, n: int) -> list[PVSample]:
    """``n`` values of every PV (n > 1: timedbuffered), every kind the gateway sends."""
    out: list[PVSample] = []
    for k in range(n):
        j = i * 10 + k
        alarm = {"severity": j % 3, "status": j % 2, "message": "HIHI" if j % 3 else ""}
        disp = {"units": "mm", "precision": 3, "limitLow": -1.0, "limitHigh": 1.0 + j}
        out += [
            PVSample("F32", {"value": float(np.float32(0.1 * j)), "alarm": alarm,
                             "timeStamp": _ts(j), "display": disp}, frozenset({"value"})),
            PVSample("F64", {"value": math.pi * j if j % 4 else float("nan"),
                             "alarm": alarm, "timeStamp": _ts(j)}),
            PVSample("I", {"value": -(2**40) * j, "timeStamp": _ts(j)}),
            PVSample("U", {"value": 2**64 - 1 - j, "timeStamp": _ts(j)}),
            PVSample("B", {"value": bool(j % 2), "timeStamp": _ts(j)}),
            PVSample("S", {"value": "é" * (j % 5), "timeStamp": _ts(j)}),
            PVSample("E", {"value": {"index": j % 2, "choices": ["Off", "On"]},
                           "timeStamp": _ts(j)}),
            PVSample("W", {"value": [float(x) for x in range(6)], "timeStamp": _ts(j)},
                     frozenset({"value"})),
            PVSample("WV", {"value": list(range(1 + j % 3)), "timeStamp": _ts(j)}),  # ragged
            PVSample("SA", {"value": ["a", "bc"][: j % 3], "timeStamp": _ts(j)}),
            PVSample("T", {"labels": ["x", "name"],
                           "value": {"x": [1.5, 2.5 * j], "name": ["p", "q"]},
                           "timeStamp": _ts(j)}, frozenset({"value.x"})),
            PVSample("IMG", {"value": {"ushortValue": list(range(j, j + 6))},
                             "dimension": [{"size": 3}, {"size": 2}], "uniqueId": j,
                             "timeStamp": _ts(j)}),
            PVSample("ST", {"value": {"a": j, "b": [1, 2]}, "timeStamp": _ts(j)}),
            PVSample("N", {"value": None}),
        ]
    return out


def scenario(n: int) -> tuple[list[IterationEvent], dict[int, list[PVSample]]]:
    """Events with sub-push batches, overlapping iterations closing out of order, an iteration
    opened by its data, late values, a tail without header and one still open at the end.
    Returns the events and, per iter_index, the samples the file keeps for it."""
    ev: list[IterationEvent] = []
    kept: dict[int, list[PVSample]] = {}

    def values(it: int, batch: int, samples: list[PVSample], keep: bool = True) -> None:
        ev.append(ValuesReceived("t", it, batch, batch, tuple(samples)))
        if keep:
            kept.setdefault(it, []).extend(samples)

    s10 = make_samples(10, n)
    ev.append(IterationOpened("t", "s", 10, 10_000))
    values(10, 1, s10[:5])
    values(10, 2, s10[5:])
    ev.append(IterationClosed("t", "s", 10, IterationStatus.COMPLETE, None, 10_000, 10_500,
                              n_values=len(s10), n_pvs=14, n_batches=2))
    ev.append(IterationOpened("t", "s", 11, 11_000))
    ev.append(IterationOpened("t", "s", 12, 12_000))
    values(12, 1, make_samples(12, n))
    values(11, 1, make_samples(11, n))
    ev.append(IterationClosed("t", "s", 12, IterationStatus.COMPLETE, None, 12_000, 12_500))
    values(12, 2, make_samples(120, 1))  # after its close, while 11 is still open: kept
    ev.append(IterationClosed("t", "s", 11, IterationStatus.INCOMPLETE,
                              IncompleteReason.NO_TAIL, 11_000, None))
    values(13, 1, make_samples(13, n))  # opened by its data (header lost)
    ev.append(IterationClosed("t", "s", 13, IterationStatus.INCOMPLETE,
                              IncompleteReason.GATEWAY_ERROR, None, 13_500, error_code=7,
                              error_message="boom"))
    values(13, 2, make_samples(130, 1), keep=False)  # late: after the close, dropped by both
    ev.append(IterationOpened("t", "s", 14, 14_000))
    values(14, 1, make_samples(14, n))
    ev.append(IterationClosed("t", "s", 15, IterationStatus.INCOMPLETE,
                              IncompleteReason.NO_HEADER, None, 15_500))
    kept.setdefault(15, [])
    return ev, kept


def expected_infos(n: int) -> dict[int, IterationInfo]:
    ev, _ = scenario(n)
    headers = {e.iter_index: e.header_timestamp_ns for e in ev if isinstance(e, IterationOpened)}
    out = {e.iter_index: IterationInfo.from_closed(e, headers.get(e.iter_index))
           for e in ev if isinstance(e, IterationClosed)}
    out[14] = IterationInfo.stopped(14, 14_000)
    return out


def read_trains(path: Path) -> dict[int, Train]:
    with open_file(path) as f:
        return {tid(t): t for t in f.trains()}


@pytest.mark.parametrize("version", ["2.2", "1.0"])
@pytest.mark.parametrize("snap_type", [SnapshotType.NORMAL, SnapshotType.TIMEDBUFFERED])
def test_req_and_sub_clients_receive_what_the_file_holds(
    tmp_path: Path, version: str, snap_type: SnapshotType
) -> None:
    n = 3 if snap_type is SnapshotType.TIMEDBUFFERED else 1
    props = SnapshotProperties("hand_built", ["pva://F32", "pva://I"], type=snap_type)
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="live", snapshot=props)
    sink = KaraboBridgeSink(BridgeOptions(rep=0, pub=0, protocol_version=version, pub_hwm=8),  # type: ignore[arg-type]
                            run_name="live", snapshot=props)
    assert sink.status == "serving", sink.reason
    assert sink.endpoints["rep"].startswith("tcp://127.0.0.1:")
    sub = Collector(sink.endpoints["pub"], "SUB").start()
    req = Client(sink.endpoints["rep"], sock="REQ", timeout=10)
    from_req: list[Train] = []
    try:
        wait_subscribed(sink)
        events, kept = scenario(n)
        for event in events:
            before = sink.counters["iterations"]
            rec.handle(event)
            sink.handle(event)
            if sink.counters["iterations"] > before:
                # one REQ `next` per publication: the newest iteration, never one twice
                from_req.append(req.next())
                wait_for(lambda: len(sub.trains) == sink.counters["iterations"],
                         what="the SUB client to receive every iteration")
        (path,) = rec.close()
        sink.close()
        wait_for(lambda: len(sub.trains) == sink.counters["iterations"], what="final iterations")
    finally:
        from_sub = sub.stop()
        req.__exit__(None, None, None)
        sink.close()
    assert sink.counters["values_after_close"] == len(make_samples(130, 1))
    assert sink.counters.get("dropped_iterations", 0) == 0
    from_file = read_trains(path)
    # served in the file's row order, every iteration, nothing twice
    assert [tid(t) for t in from_sub] == list(from_file) == [10, 11, 12, 13, 14, 15]
    assert [tid(t) for t in from_req] == [10, 12, 13]  # 11 and 12 were published together
    # the reader builds the same container as the sink, before the wire ...
    infos = expected_infos(n)
    for it, train in from_file.items():
        expected = build_train(infos[it], kept[it], stacked=n > 1, run_name="live",
                               snapshot_name="hand_built")
        assert_same(train, expected, f"file/{it}")
    # ... and what the clients received is exactly that container after the wire
    for received in [*from_sub, *from_req]:
        if version == "1.0":  # 1.0 also carries each source's metadata inside data
            assert all(received[0][s]["metadata"] == received[1][s] for s in received[0])
        got = strip_v1(*received, version)
        assert_same(got, over_the_wire(from_file[tid(got)], version), f"wire/{tid(got)}")
    # spot checks on what a client sees
    data, meta = from_sub[0]
    if version == "2.2" and n == 1:
        assert type(data["F32"]["value"]) is float  # numpy scalars travel as Python numbers
        assert data["F32"]["value"] == pytest.approx(0.1 * 100)
    assert meta["F32"]["timestamp.tid"] == 10
    assert meta["F32"]["timestamp.sec"] == str(SEC + 100 + n - 1)
    assert data[RECORDER_SOURCE]["header_timestamp"] == 10_000
    assert data[RECORDER_SOURCE]["complete"] is True
    img = data["IMG"]["value"]
    assert img.dtype == np.uint16 and img.shape == ((n, 2, 3) if n > 1 else (2, 3))
    if n > 1:
        assert data["WV"]["value"] == [[0, 1], [0, 1, 2], [0]]  # ragged: a list per value
        assert data["F32"]["value"].dtype == np.float32 and data["F32"]["value"].shape == (3,)
    stopped = from_sub[4][0][RECORDER_SOURCE]
    assert stopped["status"] == "incomplete" and stopped["reason"] == "recording_stopped"
    assert from_sub[3][0][RECORDER_SOURCE]["error_message"] == "boom"


def test_serve_incomplete_false_serves_only_complete_iterations(tmp_path: Path) -> None:
    sink = create_bridge_sink(BridgeOptions(pub=0, serve_incomplete=False),  # type: ignore[arg-type]
                              run_name="c")
    sub = Collector(sink.endpoints["pub"], "SUB").start()
    try:
        wait_subscribed(sink)
        events, _ = scenario(1)
        for event in events:
            sink.handle(event)
        sink.close("aborted", "test")
        wait_for(lambda: len(sub.trains) == 2, what="the two complete iterations")
    finally:
        got = sub.stop()
        sink.close()
    assert [tid(t) for t in got] == [10, 12]
    assert sink.counters["skipped_incomplete"] == 4
    assert sink.status == "aborted" and sink.reason == "test"


def test_bind_failure_marks_the_sink_failed_and_recording_goes_on(tmp_path: Path) -> None:
    first = KaraboBridgeSink(BridgeOptions(rep=0), run_name="a")  # type: ignore[arg-type]
    try:
        taken = first.endpoints["rep"]
        second = KaraboBridgeSink(BridgeOptions(rep=taken), run_name="b")
        assert second.status == "failed" and "bind" in second.reason
        events, _ = scenario(1)
        for event in events:
            second.handle(event)  # never raises
        assert second.counters["dropped_events"] == len(events)
        second.close()
    finally:
        first.close()


def test_a_request_waits_for_the_next_iteration_and_bad_requests_get_an_error() -> None:

    sink = KaraboBridgeSink(BridgeOptions(rep=0), run_name="w")  # type: ignore[arg-type]
    ctx = zmq.Context()
    bad = ctx.socket(zmq.REQ)
    bad.setsockopt(zmq.LINGER, 0)
    bad.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        bad.connect(sink.endpoints["rep"])
        bad.send(b"give")
        assert bad.recv().startswith(b"Error: bad request")
        with Client(sink.endpoints["rep"], sock="REQ", timeout=0.3) as client:
            with pytest.raises(TimeoutError):
                client.next()  # nothing recorded yet: the request waits
            sink.handle(IterationOpened("t", "s", 1, 5))
            sink.handle(IterationClosed("t", "s", 1, IterationStatus.COMPLETE, None, 5, 6))
            data, meta = client.next()  # the waiting request is answered
            assert data[RECORDER_SOURCE]["iter_index"] == 1 and meta[RECORDER_SOURCE][
                "timestamp.tid"] == 1
            with pytest.raises(TimeoutError):
                client.next()  # already has the latest: waits, never the same one twice
            sink.handle(IterationClosed("t", "s", 2, IterationStatus.COMPLETE, None, 7, 8))
            assert client.next()[0][RECORDER_SOURCE]["iter_index"] == 2
    finally:
        bad.close()
        ctx.term()
        sink.close()
    assert sink.counters["bad_requests"] == 1 and sink.counters["replies"] == 2


def test_trigger_tags_are_served_with_their_iteration_as_the_file_has_them(
        tmp_path: Path) -> None:
    """The daemon tags an iteration (a trigger's tags) before it closes: the live container
    has them in its recorder source, as the file's trains() does; tags for an iteration
    already served are counted, not attached to another one."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="shots")
    sink = KaraboBridgeSink(BridgeOptions(rep=0), run_name="shots")  # type: ignore[arg-type]
    tags = {"shot": "42", "note": "é µ"}
    try:
        with Client(sink.endpoints["rep"], sock="REQ", timeout=10) as client:
            for out in (rec, sink):
                out.handle(IterationOpened("t", "s", 7, 5))
                out.tag_iteration(7, tags)
                out.handle(ValuesReceived("t", 7, 1, 5, (PVSample("A", {"value": 1.5}),)))
                out.handle(IterationClosed("t", "s", 7, IterationStatus.COMPLETE, None, 5, 6))
            data, _meta = client.next()
            sink.tag_iteration(7, {"late": "1"})  # already served
    finally:
        sink.close()
    (path,) = rec.close()
    assert data[RECORDER_SOURCE]["iter_index"] == 7
    assert data[RECORDER_SOURCE]["tags"] == tags
    assert read_trains(path)[7][0][RECORDER_SOURCE]["tags"] == tags
    assert sink.counters["late_tags"] == 1


@pytest.mark.parametrize("version", ["2.2", "1.0"])
def test_text_that_was_not_utf8_is_served_not_the_whole_iteration_dropped(version: str) -> None:
    """The client keeps bytes that are not UTF-8 (a Latin-1 ``°C`` in a CA PV's units) as
    lone surrogates, which msgpack cannot pack: the iteration is still served, such text
    with U+FFFD in their place (as the file's descriptive copies have it)."""
    sink = KaraboBridgeSink(BridgeOptions(rep=0, protocol_version=version),  # type: ignore[arg-type]
                            run_name="latin1")
    try:
        with Client(sink.endpoints["rep"], sock="REQ", timeout=5) as client:
            sink.handle(IterationOpened("t", "s", 1, 5))
            sink.handle(ValuesReceived("t", 1, 1, 5, (
                PVSample("T", {"value": 21.5, "display": {"units": "\udcb0C"},
                               "alarm": {"severity": 0, "status": 0, "message": "x\udcff"}}),
                PVSample("OK", {"value": 1.5}),
            )))
            sink.handle(IterationClosed("t", "s", 1, IterationStatus.COMPLETE, None, 5, 6,
                                        error_message="bad \udce9"))
            data, _meta = strip_v1(*client.next(), version)
    finally:
        sink.close()
    assert data["OK"]["value"] == 1.5
    assert data["T"]["value"] == 21.5 and data["T"]["display.units"] == "\ufffdC"
    assert data["T"]["alarm.message"] == "x\ufffd"
    assert data[RECORDER_SOURCE]["error_message"] == "bad \ufffd"
    assert sink.counters.get("build_errors", 0) == 0


def test_an_ipv6_endpoint_the_options_accept_can_be_bound() -> None:
    """``tcp://[::1]:<port>`` passes validation (docs: tcp://<host>:<port>); ZeroMQ binds an
    IPv6 address only on a socket with IPV6 set, so the bridge failed "No such device"."""
    sink = KaraboBridgeSink(BridgeOptions(rep="tcp://[::1]:0"), run_name="v6")
    ctx = zmq.Context()
    ctx.setsockopt(zmq.IPV6, 1)
    try:
        assert sink.status == "serving", sink.reason
        with Client(sink.endpoints["rep"], sock="REQ", timeout=5, context=ctx) as client:
            sink.handle(IterationOpened("t", "s", 3, 5))
            sink.handle(IterationClosed("t", "s", 3, IterationStatus.COMPLETE, None, 5, 6))
            assert client.next()[0][RECORDER_SOURCE]["iter_index"] == 3
    finally:
        sink.close()


def test_tags_of_a_restarted_snapshots_iteration_are_served_with_it() -> None:
    """A restarted gateway starts the snapshot anew: its iter_index begins again at 1. The
    daemon tags the new iteration 1 once it is open (as the file gets them, in the new
    segment); the bridge took them for tags of the old iteration 1, already served, and
    served the new one with ``tags: {}``."""
    sink = KaraboBridgeSink(BridgeOptions(rep=0), run_name="restart")  # type: ignore[arg-type]
    try:
        with Client(sink.endpoints["rep"], sock="REQ", timeout=5) as client:
            for tags in ({"shot": "1"}, {"shot": "2"}):  # before and after the restart
                sink.handle(IterationOpened("t", "s", 1, 5))
                sink.tag_iteration(1, tags)
                sink.handle(ValuesReceived("t", 1, 1, 5, (PVSample("A", {"value": 1.5}),)))
                sink.handle(IterationClosed("t", "s", 1, IterationStatus.COMPLETE, None, 5, 6))
                data, _meta = client.next()
                assert data[RECORDER_SOURCE]["tags"] == tags
    finally:
        sink.close()
    assert sink.counters.get("late_tags", 0) == 0


def test_the_status_entry_has_the_counters_the_docs_list() -> None:
    """docs/bridge.md: the run's ``bridge`` status object has the counters ``iterations``,
    ``served``, ``published``, ``replies``, ``dropped_iterations``, ``skipped_incomplete``
    and ``late_tags``; ``replies`` (whether REQ clients get anything), ``skipped_incomplete``
    and ``late_tags`` were missing."""
    from recorder.daemon.bridge import bridge_status

    sink = KaraboBridgeSink(BridgeOptions(rep=0, serve_incomplete=False),  # type: ignore[arg-type]
                            run_name="st")
    try:
        with Client(sink.endpoints["rep"], sock="REQ", timeout=5) as client:
            sink.handle(IterationClosed("t", "s", 1, IterationStatus.INCOMPLETE,
                                        IncompleteReason.NO_TAIL, 5, None))
            sink.handle(IterationClosed("t", "s", 2, IterationStatus.COMPLETE, None, 7, 8))
            client.next()
            sink.tag_iteration(2, {"late": "1"})
    finally:
        sink.close()
    doc = bridge_status(sink)
    assert {k: doc.get(k) for k in ("iterations", "served", "replies", "dropped_iterations",
                                    "skipped_incomplete", "late_tags")} == {
        "iterations": 1, "served": 1, "replies": 1, "dropped_iterations": 0,
        "skipped_incomplete": 1, "late_tags": 1}
    assert doc["published"] == 0


def test_a_closed_bridge_reports_no_subscribers() -> None:
    """The status of a run whose bridge closed (the run stopped) said ``subscribers: true``
    when a SUB client was connected at the close: nobody is subscribed to a closed socket."""
    sink = KaraboBridgeSink(BridgeOptions(pub=0), run_name="p")  # type: ignore[arg-type]
    try:
        with Client(sink.endpoints["pub"], sock="SUB", timeout=0.3):
            wait_subscribed(sink)
            sink.close()
            assert not sink.has_subscribers
    finally:
        sink.close()


def test_a_request_waiting_when_a_recording_ends_is_answered_by_the_next_one() -> None:
    """The run's recording ends (a stop and a start, a disk-full pause): the endpoints stay
    bound, so a REQ client whose request was waiting is answered with the next recording's
    first iteration. (Bound anew, ZeroMQ's REQ socket would never send its request again:
    the client waited for ever.) The open iteration of the ended recording is served as
    incomplete first, to whoever asks."""
    props = SnapshotProperties("again", ["pva://A"])
    sink = KaraboBridgeSink(BridgeOptions(rep=0), run_name="again", snapshot=props)  # type: ignore[arg-type]
    try:
        endpoint = sink.endpoints["rep"]
        with Client(endpoint, sock="REQ", timeout=5) as client:
            sink.handle(IterationOpened("t", "again", 1, 5))
            sink.handle(IterationClosed("t", "again", 1, IterationStatus.COMPLETE, None, 5, 6))
            assert client.next()[0][RECORDER_SOURCE]["iter_index"] == 1
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(client.next)  # has the newest: its request waits
                wait_for(lambda: sink.counters.get("requests", 0) >= 2 or waiting.done(), 5,
                         "the request to wait")
                time.sleep(0.2)
                assert not waiting.done()
                sink.end_recording()
                sink.begin_recording(props)
                assert sink.endpoints["rep"] == endpoint
                # the gateway's iter_index began again at 1: a new iteration, not a late one
                sink.handle(IterationOpened("t", "again", 1, 9))
                sink.handle(IterationClosed("t", "again", 1, IterationStatus.COMPLETE, None,
                                            9, 10))
                data, _meta = waiting.result(5)
            assert data[RECORDER_SOURCE]["iter_index"] == 1
            assert data[RECORDER_SOURCE]["header_timestamp"] == 9
    finally:
        sink.close()
    assert sink.counters["replies"] == 2 and sink.counters.get("values_after_close", 0) == 0


def test_ipc_endpoints_are_open_to_whoever_may_read_the_files(tmp_path: Path) -> None:
    """A Unix socket takes a connection only from who may write it: under the unit's
    UMask=0027 zmq made ipc:// endpoints 0750, so the analysts of the service's group, who
    read its files, could not connect. The socket's write bits now follow its read bits."""
    import os
    import stat

    rep, pub = tmp_path / "rep.sock", tmp_path / "pub.sock"
    old = os.umask(0o027)
    try:
        sink = KaraboBridgeSink(BridgeOptions(rep=f"ipc://{rep}", pub=f"ipc://{pub}"),  # type: ignore[arg-type]
                                run_name="ipc")
    finally:
        os.umask(old)
    try:
        assert sink.status == "serving", sink.reason
        for path in (rep, pub):
            assert stat.S_IMODE(path.stat().st_mode) == 0o770, oct(path.stat().st_mode)
    finally:
        sink.close()
