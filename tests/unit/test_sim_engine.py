"""The simulator's gateway logic with injected time: cadence, sequencing, triggers, stop, acks."""

from __future__ import annotations

import itertools
import json
from typing import Any

import msgpack
import pytest

from recorder.sim.engine import (
    CreateTopic,
    Flush,
    Produce,
    Protocol,
    SimConfig,
    SimEngine,
    fast_expire_s,
)
from recorder.sim.faults import FaultConfig, FaultRule

T0 = 1000.0
WALL = 1_700_000_000.0 - T0  # wall clock = monotonic + WALL
REPLY = "app-reply"
PVS = ["pva://SIM:AI:DOUBLE:1", "pva://SIM:AI:FLOAT:1", "pva://SIM:NEVER:1"]


def engine(**kwargs: Any) -> SimEngine:
    return SimEngine(SimConfig(default_period_ms=50, **kwargs), now=T0, wall_offset=WALL)


def send(e: SimEngine, now: float, **cmd: Any) -> None:
    cmd.setdefault("reply_topic", REPLY)
    e.handle_command(json.dumps(cmd).encode(), now)


def start(e: SimEngine, now: float = T0, **fields: Any) -> None:
    cmd = {"command": "repeating_snapshot", "reply_id": "start", "snapshot_name": "snap",
           "pv_name_list": PVS, "time_window_msec": 200, **fields}
    send(e, now, **cmd)


def run(e: SimEngine, until: float, step: float = 0.005, now: float = T0) -> float:
    """Tick every ``step`` s from ``now`` to ``until`` (times computed, not accumulated)."""
    begin, i = now, 0
    while now < until - 1e-9:
        i += 1
        now = min(begin + i * step, until)
        e.tick(now)
    return now


def decode(actions: list[Any]) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for a in actions:
        if isinstance(a, Produce):
            assert a.headers == (("k2eg-ser-type", "Msgpack"),)
            out.append((a.topic, a.key, msgpack.unpackb(a.value)))
    return out


def stream(actions: list[Any], topic: str = "snap") -> list[dict[str, Any]]:
    return [m for t, _k, m in decode(actions) if t == topic]


def replies(actions: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(k, m) for t, k, m in decode(actions) if t == REPLY]


def iterations(msgs: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for m in msgs:
        out.setdefault(m["iter_index"], []).append(m)
    return out


def check_sequencing(its: dict[int, list[dict[str, Any]]]) -> None:
    """msg_seq 1..N, total_messages N, submission_seq per iteration, last_submission_data."""
    for msgs in its.values():
        assert [m["msg_seq"] for m in msgs] == list(range(1, len(msgs) + 1))
        assert msgs[0]["message_type"] == 0 and msgs[-1]["message_type"] == 2
        assert msgs[-1]["total_messages"] == len(msgs)
        subs = [m["submission_seq"] for m in msgs]
        assert subs[0] == 1 and subs == sorted(subs)
        for i, m in enumerate(msgs):
            if m["message_type"] != 1:
                assert "last_submission_data" not in m
                continue
            nxt = msgs[i + 1]
            last_of_batch = nxt["message_type"] != 1 or nxt["submission_seq"] != m["submission_seq"]
            assert m.get("last_submission_data", False) is last_of_batch


def test_start_creates_topic_before_ack_and_normal_cadence() -> None:
    e = engine()
    start(e, snapshot_name="My Snap")
    actions = e.drain()
    assert isinstance(actions[0], CreateTopic) and actions[0] == CreateTopic("my_snap", 1)
    (key, ack), = replies(actions)
    assert key == "repeating-snapshot-events"
    assert list(ack) == ["error", "reply_id", "message", "publishing_topic"]
    assert ack == {"error": 0, "reply_id": "start", "publishing_topic": "my_snap",
                   "message": "The snapshot 'My Snap' has been started"}
    run(e, T0 + 1.0)
    out = e.drain()
    assert {k for t, k, _ in decode(out)} == {"My Snap"}
    its = iterations(stream(out, "my_snap"))
    # period W=200 ms, fires when now - begin > W: 4 iterations in 1 s
    assert sorted(its) == [1, 2, 3, 4]
    check_sequencing(its)
    for msgs in its.values():
        assert len({m["timestamp"] for m in msgs}) == 1  # one submission
        data = [m for m in msgs if m["message_type"] == 1]
        assert [list(m)[-1] for m in data] == ["SIM:AI:DOUBLE:1", "SIM:AI:FLOAT:1"]  # NEVER absent
        assert all(next(iter(m)) == "message_type" for m in msgs)
    stamps = [its[i][0]["timestamp"] for i in sorted(its)]
    assert all(200 <= b - a <= 215 for a, b in itertools.pairwise(stamps))
    assert 0 <= stamps[0] - round((T0 + 0.2 + WALL) * 1000) <= 6  # wall-clock ms, W after start


def test_legacy_key_order_exactly_as_gateway_main() -> None:
    e = engine(protocol=Protocol.LEGACY)
    start(e)
    e.drain()
    run(e, T0 + 0.25)
    msgs = stream(e.drain())
    assert [list(m) for m in msgs] == [
        ["message_type", "snapshot_name", "timestamp", "iter_index"],
        ["message_type", "timestamp", "iter_index", "SIM:AI:DOUBLE:1"],
        ["message_type", "timestamp", "iter_index", "SIM:AI:FLOAT:1"],
        ["message_type", "error", "iter_index", "timestamp", "snapshot_name"],
    ]
    assert msgs[0]["iter_index"] == 1 and msgs[-1]["error"] == 0


def test_sequenced_key_order() -> None:
    e = engine()
    start(e)
    e.drain()
    run(e, T0 + 0.25)
    msgs = stream(e.drain())
    assert [list(m) for m in msgs] == [
        ["message_type", "snapshot_name", "timestamp", "iter_index", "msg_seq", "submission_seq"],
        ["message_type", "timestamp", "iter_index", "msg_seq", "submission_seq",
         "SIM:AI:DOUBLE:1"],
        ["message_type", "timestamp", "iter_index", "msg_seq", "submission_seq",
         "last_submission_data", "SIM:AI:FLOAT:1"],
        ["message_type", "error", "iter_index", "timestamp", "snapshot_name", "msg_seq",
         "total_messages", "submission_seq"],
    ]


@pytest.mark.parametrize(
    ("window", "sub_push", "expected"),
    [(3000, 1000, 1.0), (500, 100, 0.1), (500, 500, 0.5), (500, 900, 0.5), (2500, 0, 1.0),
     (1000, 0, 1.0), (800, 0, 0.8)],
)
def test_sub_push_cadence_table(window: int, sub_push: int, expected: float) -> None:
    assert fast_expire_s(window, sub_push) == expected


def test_timedbuffered_sub_push_batches_one_header_one_tail_per_window() -> None:
    e = engine()
    start(e, type="timedbuffered", time_window_msec=300, sub_push_delay_msec=100)
    e.drain()
    run(e, T0 + 1.0)
    its = iterations(stream(e.drain()))
    assert sorted(its)[:3] == [1, 2, 3]
    check_sequencing(its)
    for index in sorted(its)[:3]:
        msgs = its[index]
        assert sum(m["message_type"] == 0 for m in msgs) == 1
        assert sum(m["message_type"] == 2 for m in msgs) == 1
        # header with the first tick (S into the window), tail at the window end
        batches = sorted({m["timestamp"] for m in msgs})
        assert len(batches) == 3
        assert batches[1] - batches[0] == pytest.approx(100, abs=6)
        assert msgs[-1]["timestamp"] == batches[-1]
        assert msgs[0]["timestamp"] == batches[0]
        # all samples of the 50 ms PVs: ~6 per PV per 300 ms window
        per_pv = [m for m in msgs if "SIM:AI:DOUBLE:1" in m]
        assert 5 <= len(per_pv) <= 7


def test_implicit_one_second_sub_push_when_window_over_one_second() -> None:
    e = engine()
    start(e, type="timedbuffered", time_window_msec=2500, sub_push_delay_msec=0)
    e.drain()
    run(e, T0 + 2.6, step=0.01)
    msgs = stream(e.drain())
    its = iterations(msgs)
    assert list(its) == [1]
    check_sequencing(its)
    stamps = sorted({m["timestamp"] for m in msgs})
    rel = [s - round((T0 + WALL) * 1000) for s in stamps]
    assert len(rel) == 3
    assert rel[0] == pytest.approx(1000, abs=11) and rel[1] == pytest.approx(2000, abs=11)
    assert rel[2] == pytest.approx(2510, abs=11)
    assert msgs[0]["message_type"] == 0 and msgs[0]["timestamp"] == stamps[0]


def test_timedbuffered_without_sub_push_is_one_batch() -> None:
    e = engine()
    start(e, type="timedbuffered", time_window_msec=200)
    e.drain()
    run(e, T0 + 0.45)
    its = iterations(stream(e.drain()))
    assert sorted(its) == [1, 2]
    for msgs in its.values():
        assert len({m["timestamp"] for m in msgs}) == 1
        assert {m["submission_seq"] for m in msgs} == {1}


def test_triggered_one_iteration_per_trigger_and_coalescing() -> None:
    e = engine()
    start(e, triggered=True, time_window_msec=1000)
    e.drain()
    now = run(e, T0 + 2.0, step=0.05)
    assert stream(e.drain()) == []  # nothing before a trigger
    for rid in ("t1", "t2"):  # two triggers before the next loop pass -> one iteration
        send(e, now, command="repeating_snapshot_trigger", reply_id=rid, snapshot_name="snap")
    e.tick(now)
    out = e.drain()
    assert [m["message"] for _k, m in replies(out)] == ["Snapshot 'snap' has been armed"] * 2
    its = iterations(stream(out))
    assert list(its) == [1]
    check_sequencing(its)
    assert len({m["timestamp"] for m in its[1]}) == 1
    now = run(e, now + 0.5, now=now)
    send(e, now, command="repeating_snapshot_trigger", reply_id="t3", snapshot_name="SNAP")
    e.tick(now)
    assert list(iterations(stream(e.drain()))) == [2]


def test_triggered_timedbuffered_looks_back_one_window() -> None:
    e = engine()
    start(e, triggered=True, type="timedbuffered", time_window_msec=200)
    e.drain()
    now = run(e, T0 + 1.0)
    send(e, now, command="repeating_snapshot_trigger", reply_id="t", snapshot_name="snap")
    e.tick(now)
    msgs = stream(e.drain())
    doubles = [m["SIM:AI:DOUBLE:1"] for m in msgs if "SIM:AI:DOUBLE:1" in m]
    assert 4 <= len(doubles) <= 5  # 50 ms updates within the last 200 ms
    stamps = [d["timeStamp"]["secondsPastEpoch"] * 10**9 + d["timeStamp"]["nanoseconds"]
              for d in doubles]
    assert stamps == sorted(stamps)


def test_stop_publishes_final_iteration_before_ack_and_resets_index() -> None:
    e = engine()
    start(e)
    e.drain()
    now = run(e, T0 + 0.5)
    e.drain()
    send(e, now, command="repeating_snapshot_stop", reply_id="s", snapshot_name="snap")
    assert replies(e.drain()) == []  # no ack before the final iteration
    e.tick(now)
    out = e.drain()
    kinds = ["flush" if isinstance(a, Flush) else a.topic for a in out if not
             isinstance(a, CreateTopic)]
    assert kinds == ["snap"] * 4 + ["flush", REPLY]
    final = stream(out)
    assert [m["message_type"] for m in final] == [0, 1, 1, 2]
    assert final[0]["iter_index"] == 3
    assert replies(out)[0][1]["message"] == "Snapshot 'snap' has been stopped"
    send(e, now, command="repeating_snapshot_stop", reply_id="s2", snapshot_name="snap")
    assert replies(e.drain())[0][1] == {"error": 0, "reply_id": "s2",
                                         "message": "Snapshot 'snap' is already stopped"}
    start(e, now)
    e.drain()
    run(e, now + 0.25, now=now)
    assert stream(e.drain())[0]["iter_index"] == 1


def test_already_running_on_normalized_name_collision() -> None:
    e = engine()
    start(e, snapshot_name="My Snap")
    e.drain()
    start(e, snapshot_name="my_snap", time_window_msec=5)
    out = e.drain()
    assert not any(isinstance(a, CreateTopic) for a in out)
    assert replies(out) == [("repeating-snapshot-events", {
        "error": 0, "reply_id": "start", "message": "Snapshot my_snap is already running"})]


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ({"type": "weird"}, -1, "The snapshot type Unknown is not supported"),
        ({"repeat_delay_msec": -1}, -3, "The repeat delay is not valid snap"),
        ({"time_window_msec": -5}, -4, "The time window is not valid snap"),
        ({"snapshot_name": ""}, -5, "The snapshot name is not valid "),
        ({"pv_name_list": ["pva://OK:1", "bad uri"]}, -6, "The pv uri bad uri is not parsable"),
    ],
)
def test_repeating_snapshot_errors(fields: dict[str, Any], code: int, message: str) -> None:
    e = engine()
    start(e, **fields)
    out = e.drain()
    assert not any(isinstance(a, CreateTopic) for a in out)
    assert replies(out) == [("repeating-snapshot-events",
                             {"error": code, "reply_id": "start", "message": message})]


def test_trigger_errors_and_periodic_trigger_is_a_noop() -> None:
    e = engine()
    send(e, T0, command="repeating_snapshot_trigger", reply_id="a", snapshot_name="")
    send(e, T0, command="repeating_snapshot_trigger", reply_id="b", snapshot_name="nope")
    assert [m for _k, m in replies(e.drain())] == [
        {"error": -1, "reply_id": "a", "message": "The snapshot name is empty"},
        {"error": -2, "reply_id": "b", "message": "Snapshot 'nope' has not been found"},
    ]
    start(e, time_window_msec=10_000)
    e.drain()
    send(e, T0, command="repeating_snapshot_trigger", reply_id="c", snapshot_name="snap")
    e.tick(T0 + 0.1)
    out = e.drain()
    assert replies(out)[0][1]["message"] == "Snapshot 'snap' has been armed"
    assert stream(out) == []


def test_parse_failures() -> None:
    e = engine()
    e.handle_command(b"{not json", T0)
    e.handle_command(b"[1, 2]", T0)
    send(e, T0, command="repeating_snapshot", snapshot_name="x")  # no reply_id: no reply
    send(e, T0, command="repeating_snapshot", reply_id="r1", snapshot_name="x")
    send(e, T0, command="snapshot", reply_id="r2", pv_name_list=[1, 2])
    send(e, T0, command="frobnicate", reply_id="r3")
    send(e, T0, command="info", reply_id="r4")  # parsed by the gateway, never answered
    assert replies(e.drain()) == [("comand-parse-error-reply", {"error": -1, "reply_id": r})
                                  for r in ("r1", "r2", "r3")]


def test_wrong_optional_field_type_uses_default() -> None:
    e = engine()
    start(e, time_window_msec=1000.0, triggered="yes")
    e.drain()
    snap = e.snapshots["snap"]
    assert snap.window_s == 1.0 and snap.triggered is False


def test_get_replies() -> None:
    e = engine(get_timeout_s=2.0)
    now = T0 + 0.12
    send(e, now, command="get", reply_id="g1", pv_name="pva://SIM:AI:DOUBLE:1")
    send(e, now, command="get", reply_id="g2", pv_name="pva://bad name")
    send(e, now, command="get", reply_id="g3", pv_name="ca://SIM:NEVER:1")
    out = replies(e.drain())
    assert out[0][0] == "pva://SIM:AI:DOUBLE:1"
    assert list(out[0][1])[:2] == ["error", "reply_id"]
    value = out[0][1]["SIM:AI:DOUBLE:1"]
    assert value == msgpack.unpackb(msgpack.packb(e.structure("SIM:AI:DOUBLE:1", 2)))
    assert out[1] == ("pva://bad name", {"error": -1, "reply_id": "g2",
                                          "message": "PV name malformed"})
    assert len(out) == 2
    e.tick(now + 1.9)
    assert e.drain() == []
    e.tick(now + 2.0)
    assert replies(e.drain()) == [("ca://SIM:NEVER:1", {"error": -3, "reply_id": "g3",
                                                        "message": "Timeout operation"})]


def test_one_shot_snapshot() -> None:
    e = engine()
    send(e, T0, command="snapshot", reply_id="s1", time_window_msec=300,
         pv_name_list=["pva://SIM:AI:INT:1", "pva://SIM:NEVER:1", "pva://SIM:AI:INT:1.VAL",
                       "pva://SIM:BI:BOOL:1"])
    out = replies(e.drain())
    assert [(k, list(m)) for k, m in out] == [
        ("snapshot-dist-key", ["error", "reply_id", "SIM:AI:INT:1"]),
        ("snapshot-dist-key", ["error", "reply_id", "SIM:BI:BOOL:1"]),
    ]
    e.tick(T0 + 0.29)
    assert e.drain() == []
    e.tick(T0 + 0.3)
    assert replies(e.drain()) == [("snapshot-dist-key", {"error": 1, "reply_id": "s1"})]
    send(e, T0, command="snapshot", reply_id="s2",
         pv_name_list=["pva://SIM:AI:INT:1", "nope://x", "pva://SIM:BI:BOOL:1"])
    out = replies(e.drain())
    assert len(out) == 2
    assert out[1][1] == {"error": -1, "reply_id": "s2", "message": "PV 'nope://x'name malformed"}


def test_quiet_pv_repeats_last_value_in_normal_mode() -> None:
    e = engine()
    start(e, pv_name_list=["pva://SIM:QUIET:DOUBLE:1:Q100"])
    e.drain()
    run(e, T0 + 1.0)
    values = [m["SIM:QUIET:DOUBLE:1:Q100"] for m in stream(e.drain()) if m["message_type"] == 1]
    assert len(values) == 4
    assert all(v == values[0] for v in values)  # stale: same value and timeStamp


def test_timedbuffered_forces_a_value_for_silent_pvs() -> None:
    e = engine()
    start(e, type="timedbuffered", pv_name_list=["pva://SIM:QUIET:DOUBLE:1:Q0", PVS[0]])
    e.drain()
    run(e, T0 + 1.05)
    its = iterations(stream(e.drain()))
    quiet = [sum("SIM:QUIET:DOUBLE:1:Q0" in m for m in its[i]) for i in sorted(its)]
    assert quiet[0] == 1  # the initial value
    assert all(n <= 1 for n in quiet) and sum(quiet) >= 2  # forced gets land later


def test_fault_drop_tail_and_duplicate_data() -> None:
    faults = FaultConfig(drop_tail=FaultRule(every=2), duplicate_data=FaultRule(every=3))
    e = engine(faults=faults)
    start(e)
    e.drain()
    run(e, T0 + 0.9)
    its = iterations(stream(e.drain()))
    assert sorted(its) == [1, 2, 3, 4]
    assert [its[i][-1]["message_type"] == 2 for i in sorted(its)] == [True, False, True, False]
    seqs = [m["msg_seq"] for i in sorted(its) for m in its[i]]
    assert len(seqs) - len(set(zip(seqs, [m["iter_index"] for i in sorted(its)
                                          for m in its[i]], strict=True))) >= 2
    assert e.faults.fired == {"drop_tail": 2, "duplicate_data": e.faults.fired["duplicate_data"]}


def test_fault_reorder_moves_data_after_next_message() -> None:
    e = engine(faults=FaultConfig(reorder_data=FaultRule(every=2)))
    start(e)
    e.drain()
    run(e, T0 + 0.25)
    msgs = stream(e.drain())
    assert [m["msg_seq"] for m in msgs] == [1, 2, 4, 3]  # data 3 held back past the tail


def test_fault_stall_holds_then_releases_in_order() -> None:
    e = engine(faults=FaultConfig(stall_every_ms=1000, stall_ms=500))
    start(e)
    e.drain()
    run(e, T0 + 0.5)
    first = stream(e.drain())
    assert sorted(iterations(first)) == [1, 2]
    run(e, T0 + 0.99, now=T0 + 0.5)
    assert stream(e.drain()) == []  # stalled
    run(e, T0 + 1.01, now=T0 + 0.99)
    released = stream(e.drain())
    indexes = sorted(iterations(released))
    assert indexes[:2] == [3, 4] and indexes == list(range(3, 3 + len(indexes)))
    assert [m["iter_index"] for m in released] == sorted(m["iter_index"] for m in released)
    check_sequencing(iterations(released))


def test_fault_delay_stop_lets_iterations_go_on_until_the_stop_is_acted_on() -> None:
    e = engine(faults=FaultConfig.parse("delay-stop-ms=500"))
    start(e)
    e.drain()
    now = run(e, T0 + 0.3)  # iteration 1
    e.drain()
    send(e, now, command="repeating_snapshot_stop", reply_id="s", snapshot_name="snap")
    assert e.next_deadline(now) <= now + 0.5
    now = run(e, now + 0.49, now=now)
    out = e.drain()
    assert replies(out) == [] and sorted(iterations(stream(out))) == [2, 3]  # still running
    now = run(e, now + 0.02, now=now)
    out = e.drain()
    assert [m["iter_index"] for m in stream(out)] == [4] * 4  # the final iteration
    assert replies(out)[0][1]["message"] == "Snapshot 'snap' has been stopped"


def test_fault_delay_final_publishes_it_after_the_ack_with_its_build_time() -> None:
    e = engine(faults=FaultConfig.parse("delay-final-ms=300"))
    start(e)
    e.drain()
    now = run(e, T0 + 0.3)
    e.drain()
    send(e, now, command="repeating_snapshot_stop", reply_id="s", snapshot_name="snap")
    e.tick(now)
    out = e.drain()
    assert stream(out) == [] and replies(out)[0][1]["message"].endswith("has been stopped")
    run(e, now + 0.29, now=now)
    assert e.drain() == []
    run(e, now + 0.31, now=now + 0.29)
    late = [a for a in e.drain() if isinstance(a, Produce)]
    assert [msgpack.unpackb(a.value)["message_type"] for a in late] == [0, 1, 1, 2]
    # Kafka timestamps of when the gateway built (and queued) it, before its ack
    assert {a.timestamp_ms for a in late} == {e.wall_ms(now)}


def test_iterations_continue_after_those_a_topic_was_filled_with() -> None:
    """A benchmark fills the snapshot's topic as if this gateway had published iterations
    1..41: the simulator's iterations, and the final one of a stop, go on from 42 (iter_index
    1 again, with newer time stamps, looked like a restarted snapshot)."""
    e = engine()
    e.continue_iterations("snap", 41)
    start(e)
    run(e, T0 + 0.5)
    send(e, T0 + 0.5, command="repeating_snapshot_stop", reply_id="stop", snapshot_name="snap")
    run(e, T0 + 0.6, now=T0 + 0.5)
    its = iterations(stream(e.drain()))
    assert sorted(its) == list(range(42, 42 + len(its)))
    assert len(its) >= 3  # two periodic ones and the stop's final one


def test_wall_clock_milliseconds_are_truncated_like_a_clock_read() -> None:
    """The gateway stamps batches with a wall clock read in whole ms (truncated), so a batch
    is never stamped later than a Kafka record (its ack) produced after it. Rounding stamped
    the final iteration of a stop at 1.6 ms as 2 ms, after its ack produced at 1.9 ms (1 ms):
    a client that drops what precedes the ack kept that iteration."""
    e = SimEngine(SimConfig(), now=0.0, wall_offset=1_700_000_000.0016)
    assert e.wall_ms(0.0) == 1_700_000_000_001
    assert e.wall_ms(0.0009) == 1_700_000_000_002  # 2.5 ms
