"""K2egClient + gateway simulator, end to end over a real Kafka-protocol broker."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np
import pytest

from recorder.client import (
    GatewayError,
    GatewayTimeoutError,
    IncompleteReason,
    InvalidSnapshotPropertiesError,
    Iteration,
    IterationClosed,
    IterationCollector,
    IterationEvent,
    IterationOpened,
    K2egClient,
    PVSample,
    SnapshotProperties,
    SnapshotType,
    ValueKind,
    ValuesReceived,
)
from recorder.errors import ClientClosedError, ClientError, TransportError
from recorder.settings import KafkaSettings
from recorder.sim import FaultConfig, GatewaySimulator, Protocol, SimConfig

pytestmark = pytest.mark.integration

GENERATIONS = [Protocol.LEGACY, Protocol.SEQUENCED]
PVS = ["pva://SIM:AI:DOUBLE:1", "pva://SIM:AI:FLOAT:2", "ca://SIM:WF:DOUBLE:3:N8"]
BASES = ["SIM:AI:DOUBLE:1", "SIM:AI:FLOAT:2", "SIM:WF:DOUBLE:3:N8"]

SimFactory = Callable[..., GatewaySimulator]
ClientFactory = Callable[..., K2egClient]


@pytest.fixture
def cmd_topic(unique_name: Callable[[str], str]) -> str:
    return unique_name("cmd")


@pytest.fixture
def start_sim(kafka_bootstrap: str, cmd_topic: str) -> Iterator[SimFactory]:
    sims: list[GatewaySimulator] = []

    def start(protocol: Protocol = Protocol.SEQUENCED, **config: Any) -> GatewaySimulator:
        sim = GatewaySimulator(kafka_bootstrap, cmd_topic, SimConfig(protocol=protocol, **config))
        sims.append(sim.start())
        return sim

    yield start
    for sim in sims:
        sim.stop()


@pytest.fixture
def make_client(
    kafka_bootstrap: str, cmd_topic: str, unique_name: Callable[[str], str]
) -> Iterator[ClientFactory]:
    clients: list[K2egClient] = []

    def make(**kwargs: Any) -> K2egClient:
        settings = KafkaSettings(
            bootstrap_servers=kafka_bootstrap, cmd_topic=kwargs.pop("cmd_topic", cmd_topic),
            app_name=unique_name("app"), command_timeout_s=kwargs.pop("command_timeout_s", 10),
        )
        kwargs.setdefault("iteration_slack_s", 1.0)
        client = K2egClient(settings, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("k2eg-") and t.is_alive()
              and t.name != "k2eg-sim"]
    assert not leaked, f"threads left running: {leaked}"


class Recorder:
    """A recurring-snapshot handler that keeps every event and the thread it came from."""

    def __init__(self) -> None:
        self.events: list[IterationEvent] = []
        self.threads: set[str] = set()
        self._cond = threading.Condition()

    def __call__(self, event: IterationEvent) -> None:
        with self._cond:
            self.events.append(event)
            self.threads.add(threading.current_thread().name)
            self._cond.notify_all()

    def closed(self) -> list[IterationClosed]:
        with self._cond:
            return [e for e in self.events if isinstance(e, IterationClosed)]

    def wait_closed(self, n: int, timeout: float = 15.0) -> list[IterationClosed]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len([e for e in self.events if isinstance(e, IterationClosed)]) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"only {len(self.closed())} iterations closed")
                self._cond.wait(remaining)
        return self.closed()


def check_event_order(events: list[IterationEvent]) -> dict[int, list[IterationEvent]]:
    """Per iteration: Opened, Values*, Closed with growing offsets; iterations opened in
    increasing order. (Two iterations can be open at once when a tail is lost, so a close
    event may follow a newer iteration's events.)"""
    by_iter: dict[int, list[IterationEvent]] = {}
    order: list[int] = []
    for event in events:
        if event.iter_index not in by_iter:
            order.append(event.iter_index)
        by_iter.setdefault(event.iter_index, []).append(event)
    assert order == sorted(order)
    for evs in by_iter.values():
        assert isinstance(evs[0], IterationOpened)
        assert all(isinstance(e, ValuesReceived) for e in evs[1:-1])
        if isinstance(evs[-1], IterationClosed):
            assert evs[-1].n_batches == len(evs) - 2
        offsets = [e.offset for e in evs]
        assert offsets == sorted(offsets)
    opened = [e.offset for e in events if isinstance(e, IterationOpened)]
    assert opened == sorted(opened)
    return by_iter


def values_of(events: list[IterationEvent], iter_index: int) -> list[PVSample]:
    return [
        s for e in events if isinstance(e, ValuesReceived) and e.iter_index == iter_index
        for s in e.samples
    ]


# ------------------------------------------------------------------------------ recurring
@pytest.mark.parametrize("protocol", GENERATIONS)
def test_recurring_normal_delivers_complete_iterations_in_order_and_the_final_one(
    protocol: Protocol, start_sim: SimFactory, make_client: ClientFactory,
    unique_name: Callable[[str], str],
) -> None:
    start_sim(protocol)
    client = make_client()
    props = SnapshotProperties("Snap_" + unique_name("a").replace("-", "_"), PVS, time_window=100)
    rec = Recorder()
    sub = client.snapshot_recurring(props, rec)
    assert sub.topic == props.snapshot_name.lower()
    assert not sub.already_running
    assert sub.ack.publishing_topic == sub.topic
    rec.wait_closed(4)
    result = client.snapshot_stop(props.snapshot_name)
    events = list(rec.events)
    # the handler saw everything, including the final iteration, before stop returned
    assert result.final_seen
    assert result.final is not None and events[-1] == result.final
    assert result.message.endswith("has been stopped")
    assert sub.ended and sub.wait_finished(0)
    by_iter = check_event_order(events)
    assert list(by_iter) == list(range(1, len(by_iter) + 1))
    closed = rec.closed()
    assert all(c.complete for c in closed)
    assert all(c.n_pvs == 3 and c.n_values == 3 for c in closed)
    if protocol is Protocol.SEQUENCED:
        assert all(c.expected_messages == 5 and c.missing_messages == 0 for c in closed)
    samples = {s.pv: s for s in values_of(events, 1)}
    assert sorted(samples) == sorted(BASES)
    assert samples["SIM:AI:FLOAT:2"].value.dtype == np.float32
    assert samples["SIM:AI:DOUBLE:1"].value.dtype == np.float64
    assert samples["SIM:WF:DOUBLE:3:N8"].kind is ValueKind.ARRAY
    assert samples["SIM:WF:DOUBLE:3:N8"].value.shape == (8,)
    assert all(s.timestamp_ns for s in samples.values())
    # one dispatcher thread delivered every event
    assert len(rec.threads) == 1 and next(iter(rec.threads)).startswith("k2eg-dispatch-")
    time.sleep(0.3)
    assert len(rec.events) == len(events)  # nothing after the end
    counters = client.counters()
    assert counters["assembler.iterations.complete"] == len(closed)
    assert counters.get("handler_errors", 0) == 0
    assert client.subscriptions == {}


@pytest.mark.parametrize("protocol", GENERATIONS)
def test_timedbuffered_sub_push_batches_flow_before_the_tail(
    protocol: Protocol, start_sim: SimFactory, make_client: ClientFactory,
    unique_name: Callable[[str], str],
) -> None:
    start_sim(protocol)
    client = make_client()
    props = SnapshotProperties(
        unique_name("tb"), ["pva://SIM:AI:DOUBLE:1:P20", "pva://SIM:AI:LONG:2:P50"],
        time_window=400, sub_push_delay_msec=100, type=SnapshotType.TIMEDBUFFERED,
    )
    sub = client.snapshot_recurring(props)  # iterator mode
    events: list[IterationEvent] = []
    closed = 0
    for event in sub.events(idle_timeout=5):
        events.append(event)
        if isinstance(event, IterationClosed):
            closed += 1
            if closed == 3:
                break
    client.snapshot_stop(props.snapshot_name)
    events.extend(sub.events(idle_timeout=5))
    assert sub.get(0) is None  # ended
    by_iter = check_event_order(events)
    full = [c for c in events if isinstance(c, IterationClosed) and c.iter_index in (2, 3)]
    for c in full:
        assert c.complete
        assert c.n_batches >= 3  # ~4 sub-push ticks of 100 ms per 400 ms window
        values = values_of(events, c.iter_index)
        fast = [s for s in values if s.pv == "SIM:AI:DOUBLE:1:P20"]
        assert len(fast) >= 12  # every sample of a 20 ms PV in a 400 ms window, not one
        stamps = [e.timestamp_ns for e in by_iter[c.iter_index] if isinstance(e, ValuesReceived)]
        assert stamps == sorted(stamps) and len(set(stamps)) >= 3  # one timestamp per batch
        if protocol is Protocol.SEQUENCED:
            seqs = [e.submission_seq for e in by_iter[c.iter_index]
                    if isinstance(e, ValuesReceived)]
            assert seqs == sorted(seqs) and None not in seqs


def test_triggered_snapshot_publishes_one_iteration_per_trigger(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    start_sim(Protocol.SEQUENCED)
    client = make_client()
    props = SnapshotProperties(unique_name("trig"), PVS[:2], time_window=100, triggered=True)
    sub = client.snapshot_recurring(props)
    with pytest.raises(TimeoutError):
        sub.get(0.5)  # nothing until the first trigger
    for expected in (1, 2, 3):
        ack = sub.trigger()
        assert "armed" in ack.message
        got = [sub.get(5) for _ in range(3)]
        assert [type(e) for e in got] == [IterationOpened, ValuesReceived, IterationClosed]
        assert {e.iter_index for e in got if e is not None} == {expected}
        assert isinstance(got[2], IterationClosed) and got[2].complete
    result = sub.stop()
    assert result.final_seen and result.final is not None
    assert result.final.iter_index == 4 and result.final.complete  # stop: a final iteration


def test_stop_keeps_reading_until_the_final_tail_under_backpressure(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    """The official client unsubscribes before stopping and never sees the final iteration.
    Here the iterator is not even being read (the topic is paused by back-pressure) and the
    final iteration still arrives."""
    start_sim(Protocol.SEQUENCED)
    client = make_client(max_pending=8)
    props = SnapshotProperties(unique_name("bp"), PVS, time_window=50)
    sub = client.snapshot_recurring(props)
    deadline = time.monotonic() + 10
    while not sub.paused and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sub.paused
    time.sleep(0.3)
    assert sub.pending < 8 + 200  # bounded: one consume batch at most beyond the limit
    result = client.snapshot_stop(props.snapshot_name)
    assert result.final_seen
    events = list(sub.events(idle_timeout=2))
    by_iter = check_event_order(events)
    assert list(by_iter) == list(range(1, len(by_iter) + 1))  # no gap despite the pauses
    assert events[-1] == result.final
    assert all(isinstance(e, IterationClosed) and e.complete for e in events[2::3])


def test_backpressure_pauses_and_resumes_without_losing_iterations(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    start_sim(Protocol.LEGACY)
    client = make_client(max_pending=12)
    props = SnapshotProperties(unique_name("bp2"), PVS[:1], time_window=20)
    gate = threading.Event()
    rec = Recorder()

    def slow(event: IterationEvent) -> None:
        gate.wait(10)  # the handler is stuck until the gate opens
        rec(event)

    sub = client.snapshot_recurring(props, slow)
    deadline = time.monotonic() + 10
    while not sub.paused and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sub.paused
    assert client.counters()["kafka.paused"] >= 1
    gate.set()
    rec.wait_closed(20)
    client.snapshot_stop(props.snapshot_name)
    assert sub.stats["backpressure_pauses"] >= 1
    by_iter = check_event_order(rec.events)
    assert list(by_iter) == list(range(1, len(by_iter) + 1))
    assert all(c.complete for c in rec.closed())


def test_backpressure_counts_the_bytes_of_large_arrays(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    """Images of ~100 kB: the topic pauses on the bytes queued (here ~4 images), long
    before the event bound would (10,000 events), and nothing is lost once it resumes."""
    start_sim(Protocol.SEQUENCED)
    client = make_client(max_pending=10_000, max_pending_bytes=400_000)
    props = SnapshotProperties(unique_name("bpb"), ["pva://SIM:IMG:UBYTE:1:S256x256"],
                               time_window=50)
    gate = threading.Event()
    rec = Recorder()

    def slow(event: IterationEvent) -> None:
        gate.wait(20)
        rec(event)

    sub = client.snapshot_recurring(props, slow)
    try:
        deadline = time.monotonic() + 10
        while not sub.paused and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sub.paused and sub.stats["backpressure_pauses"] >= 1
        time.sleep(0.5)  # paused: nothing more is fetched for it
        assert sub.pending < 100  # events: far below their bound of 10,000
        queued = sub.pending_bytes
        assert 400_000 <= queued < 400_000 + 20 * 140_000, queued  # one fetch's overshoot
        time.sleep(0.5)
        assert sub.pending_bytes == queued  # still paused, not growing
    finally:
        gate.set()
    rec.wait_closed(20)
    client.snapshot_stop(props.snapshot_name)
    by_iter = check_event_order(rec.events)
    assert list(by_iter) == list(range(1, len(by_iter) + 1))
    assert all(c.complete for c in rec.closed())
    values = [e for e in rec.events if isinstance(e, ValuesReceived)]
    assert values and all(e.nbytes > 65_536 for e in values)  # the pixels alone are 64 KiB


def test_lag_counts_what_the_client_has_not_read(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    sim = start_sim(Protocol.SEQUENCED)
    client = make_client()
    props = SnapshotProperties(unique_name("lag").replace("-", "_"), PVS, time_window=50)
    assert client.lag(props.topic) is None  # not read by this client
    sub = client.snapshot_recurring(props)  # iterator mode
    try:
        assert next(sub.events(idle_timeout=10)) is not None
        assert client.lag("no-such-topic-" + unique_name("x")) is None
        deadline = time.monotonic() + 10
        while (sub.lag() or 0) > 10 and time.monotonic() < deadline:
            sub.get(timeout=1)  # keep taking events: the client keeps up
        caught_up = sub.lag()
        assert caught_up is not None and caught_up <= 10
        # paused: nothing is read, so the lag grows with what the gateway publishes
        sub.pause()
        time.sleep(0.3)  # let the consumer thread apply the pause
        paused_at = sub.lag()
        assert sim.engine is not None
        published = sim.engine.stats["messages"]
        time.sleep(1.5)
        grown = sub.lag()
        new_messages = sim.engine.stats["messages"] - published
        assert paused_at is not None and grown is not None
        assert new_messages >= 20
        assert grown - paused_at >= new_messages - 10, (paused_at, grown, new_messages)
        # resumed and drained: back near zero
        sub.resume()
        deadline = time.monotonic() + 15
        while (sub.lag() or 0) > 10 and time.monotonic() < deadline:
            for _ in range(200):
                try:
                    sub.get(timeout=0.05)
                except TimeoutError:
                    break
        final = sub.lag()
        assert final is not None and final <= 10, final
    finally:
        client.snapshot_stop(props.snapshot_name)
    assert sub.lag() is None  # ended


def test_skipped_messages_are_charged_to_their_topic(
    kafka_bootstrap: str, start_sim: SimFactory, make_client: ClientFactory,
    unique_name: Callable[[str], str],
) -> None:
    from confluent_kafka import Producer

    start_sim(Protocol.SEQUENCED)
    client = make_client()
    dirty = SnapshotProperties(unique_name("dirty").replace("-", "_"), PVS[:1], time_window=100)
    clean = SnapshotProperties(unique_name("clean").replace("-", "_"), PVS[:1], time_window=100)
    subs = [client.snapshot_recurring(dirty), client.snapshot_recurring(clean)]
    try:
        for sub in subs:
            assert next(sub.events(idle_timeout=10)) is not None
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        for i in range(7):
            producer.produce(dirty.topic, b"\xc1 not msgpack %d" % i)
        assert producer.flush(10) == 0
        deadline = time.monotonic() + 15
        while sum(client.skipped(dirty.topic).values()) < 7 and time.monotonic() < deadline:
            for sub in subs:  # keep both queues moving
                with contextlib.suppress(TimeoutError):
                    sub.get(timeout=0.05)
        skipped = subs[0].skipped()
        assert sum(v for k, v in skipped.items() if k.startswith("malformed.")) == 7, skipped
        assert subs[1].skipped() == {}
        total = sum(v for k, v in client.counters().items()
                    if k.startswith("assembler.malformed."))
        assert total == 7
    finally:
        for props in (dirty, clean):
            client.snapshot_stop(props.snapshot_name)


def test_a_stop_answered_already_stopped_does_not_wait_for_a_final_iteration(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    """A gateway that no longer runs the snapshot (restarted: it forgot it; or stopped by
    someone else) answers "already stopped" and publishes nothing more, so the stop returns
    once what the topic holds is read, not after the iteration timeout (2 W + slack: for a
    slow snapshot longer than a daemon's shutdown budget)."""
    sim = start_sim(Protocol.SEQUENCED)
    client = make_client()
    props = SnapshotProperties(unique_name("gone").replace("-", "_"), PVS[:1], time_window=4000)
    rec = Recorder()
    client.snapshot_recurring(props, rec)
    sim.stop()  # the gateway restarts (before its first iteration) and forgets its snapshots
    start_sim(Protocol.SEQUENCED)
    t0 = time.monotonic()
    result = client.snapshot_stop(props.snapshot_name)
    assert "already stopped" in result.message
    assert time.monotonic() - t0 < 3.0  # the iteration timeout is 9 s
    assert not result.final_seen and client.subscriptions == {}
    assert rec.events == []


def test_a_final_iteration_read_after_the_stop_ack_is_waited_for(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    """The gateway acts on the stop late (iteration 2 is published after the stop was sent)
    and its final iteration, queued before the ack, is read 0.6 s after it. When the ack is
    read the newest tail is iteration 2's, produced ~0.4 s before the ack by the Kafka
    timestamps: it is not taken for the final one (the old rule, 0.2 s of quiet, did), the
    final iteration is waited for and delivered."""
    sim = start_sim(Protocol.SEQUENCED,
                    faults=FaultConfig.parse("delay-stop-ms=1400,delay-final-ms=600"))
    client = make_client()
    props = SnapshotProperties(unique_name("late").replace("-", "_"), PVS[:1], time_window=1000)
    rec = Recorder()
    client.snapshot_recurring(props, rec)
    rec.wait_closed(1)
    result = client.snapshot_stop(props.snapshot_name)
    assert result.final_seen and result.final is not None
    closed = rec.closed()
    assert sim.engine is not None
    built = sim.engine.stats["iterations"]  # the final one included
    assert built >= 3
    assert result.final.iter_index == built
    assert result.final == closed[-1] and all(c.complete for c in closed)
    assert [c.iter_index for c in closed] == list(range(1, built + 1))
    assert result.final.tail_kafka_time_ms is not None


def test_a_final_iteration_that_never_comes_after_the_ack_ends_the_stop_at_its_timeout(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    """As above, but the final iteration is not read within the final timeout: the stop
    returns then, with the newest tail (produced ~0.4 s before the ack) as the final one."""
    start_sim(Protocol.SEQUENCED,
              faults=FaultConfig.parse("delay-stop-ms=1400,delay-final-ms=60000"))
    client = make_client()
    props = SnapshotProperties(unique_name("never").replace("-", "_"), PVS[:1],
                               time_window=1000)
    rec = Recorder()
    client.snapshot_recurring(props, rec)
    rec.wait_closed(1)
    t0 = time.monotonic()
    result = client.snapshot_stop(props.snapshot_name, final_timeout_s=2.0)
    assert time.monotonic() - t0 < 1.6 + 2.0 + 1.0  # the late stop, the timeout, a margin
    assert result.final_seen and result.final is not None
    assert result.final.iter_index == 2 and rec.closed()[-1] == result.final


def test_unsubscribe_ends_the_handle_but_the_gateway_keeps_publishing(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    sim = start_sim(Protocol.SEQUENCED)
    client = make_client()
    props = SnapshotProperties(unique_name("unsub").replace("-", "_"), PVS, time_window=100)
    sub = client.snapshot_recurring(props)
    try:
        events = []
        for event in sub.events(idle_timeout=10):
            events.append(event)
            if isinstance(event, IterationClosed) and len(events) > 6:
                break
        client.unsubscribe(sub)
        assert sub.ended and client.subscriptions == {}
        rest = list(sub.events(idle_timeout=5))  # what was queued, then the end
        assert sub.get(timeout=0) is None
        opened = {e.iter_index for e in [*events, *rest] if isinstance(e, IterationOpened)}
        closed = {e.iter_index for e in [*events, *rest] if isinstance(e, IterationClosed)}
        assert opened <= closed  # an iteration still open was closed (CLOSED), none left
        assert sub.lag() is None and client.lag(props.topic) is None
        client.unsubscribe(sub)  # idempotent
        sub.unsubscribe()
        assert sim.engine is not None
        before = sim.engine.stats["iterations"]
        time.sleep(0.6)
        assert sim.engine.stats["iterations"] > before  # the snapshot was not stopped
        # the topic is free again: a new subscription reads it
        again = client.snapshot_recurring(props)
        assert again.already_running
        assert any(isinstance(e, IterationClosed) for e in again.events(idle_timeout=3))
    finally:
        result = client.snapshot_stop(props.snapshot_name)
    assert result.message


# ------------------------------------------------------------------------------ one-shot, get
def test_one_shot_snapshot_sync_and_async(
    start_sim: SimFactory, make_client: ClientFactory
) -> None:
    start_sim(Protocol.SEQUENCED)
    client = make_client()
    uris = ["pva://SIM:AI:DOUBLE:1", "pva://SIM:WF:FLOAT:1", "pva://SIM:NEVER:1"]
    t0 = time.monotonic()
    values = client.snapshot_sync(uris, time_window_msec=200)
    assert time.monotonic() - t0 >= 0.2  # completion comes after the window
    assert sorted(values) == ["SIM:AI:DOUBLE:1", "SIM:WF:FLOAT:1"]  # NEVER: absent
    assert values["SIM:WF:FLOAT:1"][0].value.dtype == np.float32
    assert len(values["SIM:AI:DOUBLE:1"]) == 1

    got: dict[str, Any] = {}
    done = threading.Event()

    def handler(reply_id: str, result: dict[str, list[PVSample]]) -> None:
        got.update(reply_id=reply_id, result=result, thread=threading.current_thread().name)
        done.set()

    reply_id = client.snapshot(uris[:2], handler, time_window_msec=100)
    assert done.wait(10)
    assert got["reply_id"] == reply_id
    assert sorted(got["result"]) == ["SIM:AI:DOUBLE:1", "SIM:WF:FLOAT:1"]
    assert got["thread"].startswith("k2eg-dispatch-")


def test_close_fails_a_pending_async_one_shot_through_its_on_error(
    make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    """An asynchronous one-shot snapshot still waiting when the client closes gets its
    ``on_error`` (the promised outcome), not silence: a caller waiting for it would hang."""
    client = make_client(cmd_topic=unique_name("nobody"))
    errors: list[tuple[str, ClientError]] = []
    done = threading.Event()

    def on_error(reply_id: str, error: ClientError) -> None:
        errors.append((reply_id, error))
        done.set()

    reply_id = client.snapshot(["pva://SIM:AI:DOUBLE:1"], lambda *_: done.set(),
                               timeout=60, on_error=on_error)
    client.close()
    assert done.wait(5), "neither handler nor on_error was called"
    assert errors and errors[0][0] == reply_id
    assert isinstance(errors[0][1], ClientClosedError)


def test_a_reply_id_already_pending_is_refused_and_the_first_command_keeps_its_reply(
    make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    """``command()`` with a reply_id that a command still waits on: refused with a
    ClientError, and the reply still reaches the command that owns the id (it waited in vain
    for its timeout, and the reply went to the refused one)."""
    client = make_client(cmd_topic=unique_name("nobody"))
    got: dict[str, Any] = {}

    def first() -> None:
        t0 = time.monotonic()
        try:
            got["outcome"] = client.command({"command": "info", "pv_name": "pva://A",
                                             "reply_id": "dup"}, timeout=3)
        except ClientError as exc:
            got["error"] = exc
        got["took"] = time.monotonic() - t0

    thread = threading.Thread(target=first)
    thread.start()
    time.sleep(0.3)
    with pytest.raises(ClientError, match="dup"):
        client.command({"command": "info", "pv_name": "pva://B", "reply_id": "dup"}, timeout=3)
    client._adapter.produce(client.reply_topic,
                            msgpack.packb({"error": 0, "reply_id": "dup", "message": "ok"}),
                            headers={"k2eg-ser-type": "Msgpack"})
    thread.join(15)
    assert "error" not in got, got
    assert got["outcome"].reply.message == "ok" and got["took"] < 2.5


def test_kafka_answering_too_slowly_is_a_transport_error_not_a_bare_timeout(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    """The consumer thread busy (a slow broker's metadata answers ahead in its queue) past a
    snapshot start's or stop's own Kafka requests: a TransportError (a RecorderError, which
    the daemon retries), not concurrent.futures' TimeoutError (its run worker crashed into
    "internal error", the run failed); the start's topic is not left assigned."""
    start_sim(Protocol.SEQUENCED)
    client = make_client()
    name = unique_name("busy").replace("-", "_")
    props = SnapshotProperties(name, PVS[:1], time_window=100)
    client._adapter.call_soon(lambda: time.sleep(3.5))
    with pytest.raises(TransportError):
        client.snapshot_recurring(props, timeout=1)
    time.sleep(3)
    sub = client.snapshot_recurring(props, Recorder())
    # the stop's own offset query no longer waits for the consumer thread (asked through
    # the admin handle): the stop goes through while the consumer thread is busy
    client._adapter.call_soon(lambda: time.sleep(3.5))
    assert sub.stop(timeout=5).message.endswith("has been stopped")
    assert name not in client._adapter.topics


def test_get_returns_a_typed_value_and_gateway_errors_are_typed(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    start_sim(Protocol.SEQUENCED, get_timeout_s=0.3)
    client = make_client()
    sample = client.get("pva://SIM:AI:FLOAT:7")
    assert sample.pv == "SIM:AI:FLOAT:7"
    assert sample.kind is ValueKind.SCALAR and sample.value.dtype == np.float32
    assert client.get("ca://SIM:MBBI:ENUM:1").kind is ValueKind.ENUM
    with pytest.raises(GatewayError) as never:
        client.get("pva://SIM:NEVER:1")
    assert never.value.code == -3 and never.value.command == "get"
    with pytest.raises(GatewayError) as unknown:
        client.snapshot_trigger(unique_name("nosuch"))
    assert unknown.value.code == -2 and "not been found" in unknown.value.message
    # a URI the client would reject locally, sent raw: the gateway's own code comes back
    with pytest.raises(InvalidSnapshotPropertiesError):
        client.snapshot_sync(["pva://bad uri"])
    with pytest.raises(GatewayError) as bad:
        client.command({"command": "repeating_snapshot", "snapshot_name": unique_name("x"),
                        "pv_name_list": ["pva://bad uri"]})
    assert bad.value.code == -6 and "not parsable" in bad.value.message
    assert client.counters().get("replies.unmatched", 0) == 0


def test_get_of_a_pv_that_never_connects_gives_the_gateways_timeout_error(
    start_sim: SimFactory, make_client: ClientFactory,
) -> None:
    """The gateway answers a ``get`` of a PV that never connects with -3 "Timeout operation"
    after its own get timeout, which is as long as the client's command timeout (both 10 s
    by default; 1 s here): the caller gets that answer, not a GatewayTimeoutError saying the
    gateway did not reply."""
    start_sim(Protocol.SEQUENCED, get_timeout_s=1.0)
    client = make_client(command_timeout_s=1.0)
    with pytest.raises(GatewayError) as never:
        client.get("pva://SIM:NEVER:1")
    assert never.value.code == -3 and "Timeout operation" in never.value.message


def test_no_gateway_gives_a_gateway_timeout(
    make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    client = make_client(cmd_topic=unique_name("nobody"))
    t0 = time.monotonic()
    with pytest.raises(GatewayTimeoutError) as err:
        client.get("pva://SIM:AI:DOUBLE:1", timeout=0.5)
    assert 0.4 < time.monotonic() - t0 < 5
    assert err.value.command == "get"
    assert client.counters()["replies.timeout"] == 1


def test_a_command_topic_that_does_not_exist_is_named_in_the_error(
    kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    """RECORDER_CMD_TOPIC naming no topic (a typo, the gateway's topics not deployed yet): no
    command reaches any gateway, and the error says so instead of blaming the gateway for not
    answering. (Topics are not created on demand here, as on a production cluster; Tansu
    creates one a producer asks metadata for unless told not to.)"""
    cmd_topic = unique_name("nocmd")
    settings = KafkaSettings(bootstrap_servers=kafka_bootstrap, cmd_topic=cmd_topic,
                             app_name=unique_name("app"), command_timeout_s=2,
                             kafka={"allow.auto.create.topics": "false"})
    with K2egClient(settings) as client:
        for call in (lambda: client.snapshot_trigger("snap"),
                     lambda: client.get("pva://SIM:AI:DOUBLE:1", timeout=1.0)):
            with pytest.raises(TransportError, match=f"command topic '{cmd_topic}' does not "
                                                     "exist"):
                call()


# ------------------------------------------------------------------------------ sharing
def test_a_snapshot_the_gateway_publishes_to_another_topic_stops_with_its_final_iteration(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gateway whose ``publishing_topic`` is not the name's normalized form (another
    generation's naming): the client reads the acked topic, and a stop by the snapshot's
    name still finds that subscription, delivers the final iteration and ends the handle."""
    from recorder.sim import engine

    plain = engine.normalize_snapshot_name
    monkeypatch.setattr(engine, "normalize_snapshot_name", lambda name: "gw_" + plain(name))
    start_sim(Protocol.SEQUENCED)
    client = make_client()
    props = SnapshotProperties(unique_name("moved").replace("-", "_"), PVS[:1], time_window=100)
    rec = Recorder()
    sub = client.snapshot_recurring(props, rec)
    assert sub.topic == "gw_" + props.topic != props.topic
    rec.wait_closed(2)
    result = sub.stop()
    assert result.message.endswith("has been stopped")
    assert result.final_seen and result.final is not None
    assert result.final == rec.closed()[-1]
    assert sub.ended and client.subscriptions == {}


def test_a_new_snapshot_on_another_publishing_topic_reads_none_of_its_older_messages(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Started again on a gateway that publishes to another topic than the normalized name,
    the new subscription begins at that topic's end, as on the normalized topic: not at its
    beginning, which holds the earlier snapshot's iterations."""
    from recorder.sim import engine

    plain = engine.normalize_snapshot_name
    monkeypatch.setattr(engine, "normalize_snapshot_name", lambda name: "gw_" + plain(name))
    start_sim(Protocol.SEQUENCED)
    client = make_client()
    props = SnapshotProperties(unique_name("again").replace("-", "_"), PVS[:1], time_window=100)
    first = Recorder()
    client.snapshot_recurring(props, first)
    first.wait_closed(3)
    assert client.snapshot_stop(props.snapshot_name).final_seen
    began_ns = time.time_ns()
    second = Recorder()
    client.snapshot_recurring(props, second)
    closed = second.wait_closed(2)
    assert all((c.header_timestamp_ns or 0) >= began_ns - 1_000_000 for c in closed), [
        (c.iter_index, c.header_timestamp_ns) for c in closed]
    client.snapshot_stop(props.snapshot_name)


def test_already_running_snapshot_is_still_read_from_its_normalized_topic(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    start_sim(Protocol.SEQUENCED)
    first, second = make_client(), make_client()
    name = unique_name("shared").replace("-", "_")
    props = SnapshotProperties(name, PVS[:1], time_window=100)
    rec1, rec2 = Recorder(), Recorder()
    sub1 = first.snapshot_recurring(props, rec1)
    # the same normalized name (upper case) with other parameters: "already running"
    other = SnapshotProperties(name.upper(), PVS, time_window=5000)
    sub2 = second.snapshot_recurring(other, rec2)
    assert sub2.already_running and sub2.ack.publishing_topic is None
    assert "already running" in sub2.ack.message
    assert sub2.topic == sub1.topic == name
    closed = rec2.wait_closed(3)
    assert all(c.n_pvs == 1 for c in closed[1:])  # the running snapshot's parameters
    with pytest.raises(ClientError, match="already reads"):
        first.snapshot_recurring(props)
    # stopping through the second client stops the gateway snapshot; both see the final
    result = second.snapshot_stop(other.snapshot_name)
    assert result.final_seen
    final = result.final
    assert final is not None
    rec1.wait_closed(final.iter_index)  # the first client keeps reading until it gets it
    assert any(c.iter_index == final.iter_index for c in rec1.closed())
    first.snapshot_stop(props.snapshot_name)  # "already stopped": fine, ends the handle
    assert sub1.ended


@pytest.mark.parametrize("protocol", GENERATIONS)
def test_resend_start_gets_a_restarted_gateway_to_publish_again_on_the_same_topic(
    protocol: Protocol, start_sim: SimFactory, make_client: ClientFactory,
    unique_name: Callable[[str], str],
) -> None:
    gateway = start_sim(protocol)
    client = make_client(command_timeout_s=5)
    props = SnapshotProperties(unique_name("again").replace("-", "_"), PVS[:2], time_window=100)
    rec = Recorder()
    sub = client.snapshot_recurring(props, rec)
    rec.wait_closed(3)
    ack = sub.resend_start()  # the gateway still runs it: nothing changes
    assert ack.publishing_topic is None and "already running" in ack.message
    gateway.stop()  # a restart: the new gateway knows no snapshot
    start_sim(protocol)
    seen = len(rec.closed())
    ack = sub.resend_start()
    assert ack.publishing_topic == sub.topic and not sub.ended
    closed = rec.wait_closed(seen + 3)
    indexes = [c.iter_index for c in closed]
    restart = indexes.index(1, 1)  # iter_index began again, on the same subscription
    assert indexes[:restart] == sorted(indexes[:restart]) and max(indexes[:restart]) >= 3
    assert indexes[restart:] == list(range(1, len(indexes) - restart + 1))
    assert all(c.complete for c in closed[restart:])
    assert client.counters()["assembler.restart"] == 1
    client.snapshot_stop(props.snapshot_name)


# ------------------------------------------------------------------------------ faults
@pytest.mark.parametrize("protocol", GENERATIONS)
def test_dropped_tails_and_headers_close_incomplete_and_never_stall(
    protocol: Protocol, start_sim: SimFactory, make_client: ClientFactory,
    unique_name: Callable[[str], str],
) -> None:
    start_sim(protocol, faults=FaultConfig.parse("drop-tail=every:3,drop-header=every:4"))
    client = make_client()
    props = SnapshotProperties(unique_name("drop"), PVS, time_window=60)
    rec = Recorder()
    client.snapshot_recurring(props, rec)
    rec.wait_closed(14)
    client.snapshot_stop(props.snapshot_name)
    closed = rec.closed()
    reasons = {c.iter_index: c.reason for c in closed}
    assert IncompleteReason.NO_TAIL in reasons.values()
    assert IncompleteReason.NO_HEADER in reasons.values()
    # no stall: after every faulty iteration a complete one follows within 3 iterations
    last = max(reasons)
    complete = {i for i, r in reasons.items() if r is None}
    for index, reason in reasons.items():
        if reason is not None and index <= last - 3:
            assert complete & {index + 1, index + 2, index + 3}, (index, reasons)
    assert sum(c.complete for c in closed) >= len(closed) // 3
    no_header = [c for c in closed if c.reason is IncompleteReason.NO_HEADER]
    assert all(c.header_timestamp_ns is None and c.n_values == 3 for c in no_header)
    counters = client.counters()
    assert counters["assembler.iterations.incomplete.no_tail"] >= 1
    assert counters["assembler.iterations.incomplete.no_header"] >= 1
    check_event_order(rec.events)


@pytest.mark.parametrize("protocol", GENERATIONS)
def test_duplicated_data_is_dropped_and_counted(
    protocol: Protocol, start_sim: SimFactory, make_client: ClientFactory,
    unique_name: Callable[[str], str],
) -> None:
    start_sim(protocol, faults=FaultConfig.parse("duplicate-data=every:2"))
    client = make_client()
    props = SnapshotProperties(unique_name("dup"), PVS, time_window=80)
    rec = Recorder()
    client.snapshot_recurring(props, rec)
    rec.wait_closed(5)
    client.snapshot_stop(props.snapshot_name)
    closed = rec.closed()
    assert all(c.complete and c.n_values == 3 for c in closed)
    assert sum(c.duplicates for c in closed) >= len(closed)
    assert client.counters()["assembler.duplicate"] >= len(closed)
    for c in closed:
        assert sorted(s.pv for s in values_of(rec.events, c.iter_index)) == sorted(BASES)


def test_sequenced_missing_data_is_reported_with_its_count(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    start_sim(Protocol.SEQUENCED, faults=FaultConfig.parse("drop-data=every:5"))
    client = make_client(missing_grace_s=0.2)
    props = SnapshotProperties(unique_name("miss"), PVS, time_window=60)
    rec = Recorder()
    client.snapshot_recurring(props, rec)
    rec.wait_closed(8)
    client.snapshot_stop(props.snapshot_name)
    missing = [c for c in rec.closed() if c.reason is IncompleteReason.MISSING_MESSAGES]
    assert missing
    assert all(c.missing_messages == 1 and c.n_values == 2 for c in missing)
    assert any(c.complete for c in rec.closed())


# ------------------------------------------------------------------------------ helpers, close
def test_iteration_collector_gives_whole_iterations_like_the_official_client(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    start_sim(Protocol.SEQUENCED)
    client = make_client()
    iterations: list[Iteration] = []
    props = SnapshotProperties(unique_name("coll"), [*PVS, "pva://SIM:NEVER:9"], time_window=80)
    client.snapshot_recurring(props, IterationCollector(iterations.append, props.pv_names))
    deadline = time.monotonic() + 10
    while len(iterations) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    client.snapshot_stop(props.snapshot_name)
    first = iterations[0]
    assert first.complete and first.iter_index == 1
    assert sorted(first.values) == sorted([*BASES, "SIM:NEVER:9"])
    assert first.values["SIM:NEVER:9"] == []
    assert all(len(first.values[b]) == 1 for b in BASES)


def test_close_ends_subscriptions_and_stops_every_thread(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    start_sim(Protocol.SEQUENCED)
    client = make_client()
    props = SnapshotProperties(
        unique_name("open"), PVS[:1], time_window=2000, type=SnapshotType.TIMEDBUFFERED,
        sub_push_delay_msec=100,
    )
    sub = client.snapshot_recurring(props)
    first = sub.get(5)
    assert isinstance(first, IterationOpened)  # the window (2 s) is still open
    t0 = time.monotonic()
    client.close()
    assert time.monotonic() - t0 < 5
    rest = list(sub.events(idle_timeout=2))
    assert isinstance(rest[-1], IterationClosed)
    assert rest[-1].reason is IncompleteReason.CLOSED
    assert sub.ended
    with pytest.raises(ClientError):
        client.get("pva://SIM:AI:DOUBLE:1")
    client.close()  # idempotent


def test_a_long_backpressure_pause_does_not_time_out_open_iterations(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str]
) -> None:
    """A topic paused by back-pressure (the sink slow, e.g. finalizing a large segment)
    for longer than the iteration timeout while another topic of the client is read (the
    daemon's other runs): the iterations open when it paused have their messages in Kafka,
    unread. Their time must not run meanwhile: each comes out complete and nothing is
    skipped as late."""
    start_sim(Protocol.SEQUENCED)
    client = make_client(max_pending=2, iteration_slack_s=0.3)
    # timedbuffered with sub-pushes: an iteration's messages span its window (10 sub-pushes
    # of 100 ms), and a pause at the second event falls inside the first iteration
    props = SnapshotProperties(unique_name("bp3"), PVS, time_window=1000,
                               sub_push_delay_msec=100, type="timedbuffered")
    gate = threading.Event()
    rec = Recorder()

    def slow(event: IterationEvent) -> None:
        gate.wait(30)
        rec(event)

    # another run of the daemon, read on its own (iterator mode, as the daemon's pumps
    # read): its topic keeps the consumer reading while the first one is paused
    other_props = SnapshotProperties(unique_name("busy"), PVS[:1], time_window=20)
    other_sub = client.snapshot_recurring(other_props)
    other_closed: list[IterationClosed] = []

    def drain() -> None:
        for event in other_sub.events(idle_timeout=3):
            if isinstance(event, IterationClosed):
                other_closed.append(event)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    sub = client.snapshot_recurring(props, slow)
    deadline = time.monotonic() + 10
    while not sub.paused and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sub.paused
    time.sleep(6.0)  # 2.6 iteration timeouts (2 x 1 s + 0.3 s) while paused
    assert len(other_closed) > 20  # the other topic was read meanwhile
    gate.set()
    rec.wait_closed(3)  # the one open at the pause and a few after
    client.snapshot_stop(props.snapshot_name)
    client.snapshot_stop(other_props.snapshot_name)
    reader.join(10)
    time.sleep(0.5)
    by_iter = check_event_order(rec.events)
    assert list(by_iter) == list(range(1, len(by_iter) + 1))
    incomplete = [(c.iter_index, c.reason) for c in rec.closed() if not c.complete]
    assert incomplete == [], incomplete
    skipped = client.skipped(props.topic)
    assert not any(v for k, v in skipped.items() if k.startswith("late")), skipped



@pytest.mark.parametrize("keep_backpressure", [False, True])
def test_a_stop_reads_the_whole_backlog_of_a_subscription_that_fell_behind(
    start_sim: SimFactory, make_client: ClientFactory, unique_name: Callable[[str], str],
    kafka_bootstrap: str, keep_backpressure: bool,
) -> None:
    """A subscription paused by back-pressure falls behind the topic. Its stop waited for the
    final iteration ``final_timeout_s`` in all, counted from the ack: a backlog that took
    longer to read was cut there, and the iterations after the cut, the final one among them,
    were never delivered (a recorder whose disk was slow lost them at its stop). The wait now
    goes on while reading progresses towards where the topic ended at the ack. With
    ``keep_backpressure`` (the daemon's stop: its worker takes events meanwhile) the backlog
    is read as fast as events are taken, not all into memory."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from recorder.client.kafka import StartAt
    from recorder.sim.messages import data_message, header_message, tail_message

    sim = start_sim(Protocol.LEGACY)
    name = unique_name("backlog").replace("-", "_")
    topic = name.lower()
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(10)
    pvs = [f"SIM:AI:DOUBLE:{i}" for i in range(100)]
    n_iterations = 1500  # 153,000 messages: far more than 0.5 s of reading
    ts = int(time.time() * 1000) - 600_000
    structure = {"value": 1.5, "alarm": {"severity": 0, "status": 0, "message": "NO_ALARM"},
                 "timeStamp": {"secondsPastEpoch": ts // 1000, "nanoseconds": 0, "userTag": 0}}
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 20,
                         "queue.buffering.max.messages": 500_000})
    headers = {"k2eg-ser-type": "Msgpack"}
    for idx in range(1, n_iterations + 1):
        t = ts + idx
        batch = [header_message(name, t, idx)]
        batch += [data_message(pv, structure, t, idx) for pv in pvs]
        batch.append(tail_message(name, t, idx))
        for m in batch:
            producer.produce(topic, value=msgpack.packb(m), headers=headers)
        producer.poll(0)
    assert producer.flush(60) == 0
    sim.continue_iterations(name, n_iterations)  # its final iteration follows them

    client = make_client(max_pending=64)
    props = SnapshotProperties(name, [f"pva://{pv}" for pv in pvs], time_window=60_000)
    gate = threading.Event()
    rec = Recorder()

    def slow(event: IterationEvent) -> None:
        gate.wait(30)  # the handler is stuck until the stop: the topic is paused
        time.sleep(0.0002)  # then slower than reading
        rec(event)

    sub = client.snapshot_recurring(props, slow, start=StartAt.beginning())
    deadline = time.monotonic() + 10
    while not sub.paused and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sub.paused
    most = [0]
    stopping = threading.Event()

    def watch() -> None:
        while not stopping.is_set():
            most[0] = max(most[0], sub.pending)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()

    gate.set()
    started = time.monotonic()
    try:
        result = client.snapshot_stop(name, final_timeout_s=0.5,
                                      keep_backpressure=keep_backpressure)
    finally:
        stopping.set()
        watcher.join()
    took = time.monotonic() - started
    if keep_backpressure:  # the limit and the events of one consumed batch at most
        assert most[0] < 64 + 300, most  # (without it: ~4,000 of the 4,500 events here)
    assert result.final_seen, f"no final iteration after {took:.1f} s"
    sub.wait_finished(10)
    by_iter = check_event_order(rec.events)
    assert list(by_iter) == list(range(1, n_iterations + 2))
    assert rec.events[-1] == result.final
    assert all(isinstance(e, IterationClosed) and e.complete for e in rec.closed())
