"""The OFFICIAL k2eg client (PyPI k2eg 0.3.2) against our gateway simulator.

The simulator runs in-process on the test broker; the client runs in its own interpreter
(``RECORDER_K2EG_PYTHON``, a virtualenv with k2eg 0.3.2 and confluent-kafka 2.15.1, which
``scripts/test`` creates) driven by ``k2eg_driver.py``, which prints JSON results. Everything
the client delivers is compared with what the simulator actually published, read back raw from
the broker. One client session runs every operation (its start-up and each subscription change
cost a consumer-group rebalance of a few seconds).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from recorder.sim import GatewaySimulator, SimConfig
from recorder.sim.encoding import pack

pytestmark = [pytest.mark.interop, pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("k2eg_driver.py")
PERIOD_MS = 50
ONE_SHOT_PVS = [
    "pva://SIM:AI:DOUBLE:1", "pva://SIM:AI:FLOAT:1", "pva://SIM:AI:ULONG:1",
    "pva://SIM:SI:STRING:1", "pva://SIM:MBBI:ENUM:1", "pva://SIM:WF:FLOAT:1:N6",
    "pva://SIM:TABLE:1", "pva://SIM:IMG:UBYTE:1:S4x3", "ca://SIM:NEVER:1",
]
RECURRING_PVS = [
    "pva://SIM:AI:DOUBLE:2", "pva://SIM:AI:FLOAT:2", "pva://SIM:AI:LONG:2",
    "pva://SIM:WFVAR:FLOAT:2:N5", "pva://SIM:QUIET:INT:2:Q300", "pva://SIM:NEVER:2",
]


def k2eg_python() -> str:
    configured = os.environ.get("RECORDER_K2EG_PYTHON")
    if configured:
        return configured
    fallback = ROOT / ".venv-k2eg" / "bin" / "python"
    if fallback.exists():
        return str(fallback)
    pytest.fail(
        "the official k2eg client is not installed: set RECORDER_K2EG_PYTHON to a Python with "
        "k2eg==0.3.2 and confluent-kafka==2.15.1 (scripts/test creates .venv-k2eg), or run "
        "`python3 -m venv .venv-k2eg && .venv-k2eg/bin/pip install k2eg==0.3.2 "
        "confluent-kafka==2.15.1`"
    )


def base(uri: str) -> str:
    return uri.split("://", 1)[1].split(".", maxsplit=1)[0]


def read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every message of the topic: read from offset 0 until 1 s passes without one."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "interop-raw",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 20})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        out: list[Any] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                break
            if msg.error() is None:
                out.append(msg)
        assert out, f"could not read back {topic}"
        return out
    finally:
        consumer.close()


def published(bootstrap: str, topic: str) -> dict[int, dict[str, Any]]:
    """What the simulator published on a snapshot topic, per iteration (raw bytes decoded)."""
    its: dict[int, dict[str, Any]] = {}
    for msg in read_all(bootstrap, topic):
        m = msgpack.unpackb(msg.value())
        it = its.setdefault(m["iter_index"], {"values": {}, "header_ts": None, "tail_ts": None})
        if m["message_type"] == 0:
            it["header_ts"] = m["timestamp"]
        elif m["message_type"] == 2:
            it["tail_ts"] = m["timestamp"]
        else:
            pv = list(m)[-1]
            it["values"].setdefault(pv, []).append(m[pv])
    return its


def normalized(value: Any) -> Any:
    """A structure as a msgpack/JSON consumer sees it (float32 widened, tuples as lists)."""
    return json.loads(json.dumps(msgpack.unpackb(pack(value))))


@pytest.fixture(scope="module")
def session(kafka_bootstrap: str) -> Iterator[dict[str, Any]]:
    python = k2eg_python()
    token = uuid.uuid4().hex[:8]
    app, cmd = f"interop-{token}", f"interop-cmd-{token}"
    names = {kind: f"interop-{kind}-{token}" for kind in ("normal", "tb", "trig")}
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(f"{app}-reply", num_partitions=1, replication_factor=1)])[
        f"{app}-reply"].result(10)
    plan = {
        "bootstrap": kafka_bootstrap, "cmd_topic": cmd, "app": app, "drain_s": 0.5,
        "steps": [
            {"op": "get", "pv": "pva://SIM:AI:DOUBLE:1", "attempts": 3},
            {"op": "snapshot_async", "pvs": ONE_SHOT_PVS},
            {"op": "snapshot_sync", "pvs": ONE_SHOT_PVS},
            # "normal" is subscribed last. Every subscription change re-joins k2eg 0.3.2's
            # consumer group, and on each assignment the client seeks EVERY snapshot topic to
            # its end (broker.py __on_assign). A re-join that lands inside a normal iteration
            # (header consumed, tail skipped) stalls that snapshot for good: the client has no
            # timeout and drops every later iteration (research notes, sequenced details
            # §1.5; seen in CI as one "normal" iteration delivered in 60 s). Timedbuffered
            # snapshots discard the broken iteration and go on, so they can take re-joins.
            {"op": "recurring", "name": names["tb"], "pvs": RECURRING_PVS,
             "type": "timedbuffered", "time_window": 900, "sub_push_delay_msec": 300},
            {"op": "recurring", "name": names["trig"], "pvs": RECURRING_PVS,
             "type": "timedbuffered", "time_window": 400, "triggered": True},
            {"op": "recurring", "name": names["normal"], "pvs": RECURRING_PVS,
             "time_window": 250},
            {"op": "sleep", "seconds": 5},  # the client seeks new topics to their end
            {"op": "trigger", "name": names["trig"]},
            {"op": "sleep", "seconds": 1},
            {"op": "trigger", "name": names["trig"]},
            {"op": "sleep", "seconds": 1},
            {"op": "trigger", "name": names["trig"]},
            # returns as soon as every count is reached; 20 s was too short once in CI
            # (0 of "normal" delivered: the client's group re-join after a new subscription)
            {"op": "wait_iterations", "timeout": 60,
             "at_least": {names["normal"]: 5, names["tb"]: 3, names["trig"]: 2}},
            {"op": "stop", "name": names["trig"]},
            {"op": "stop", "name": names["tb"]},
            {"op": "stop", "name": names["normal"]},
        ],
    }
    sim = GatewaySimulator(kafka_bootstrap, cmd, SimConfig(default_period_ms=PERIOD_MS)).start()
    try:
        proc = subprocess.Popen([python, str(DRIVER), json.dumps(plan)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate(timeout=10)
            pytest.fail(f"the k2eg driver hung; stderr tail:\n{stderr[-3000:]}")
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            pytest.fail(f"k2eg driver failed ({proc.returncode}); stderr:\n{stderr[-3000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        result["steps_by_op"] = {}
        for step in result["steps"]:
            result["steps_by_op"].setdefault(step["op"], []).append(step)
        result["names"] = names
        result["engine"] = sim.engine
        result["bootstrap"] = kafka_bootstrap
        yield result
    finally:
        sim.stop()
    print(json.dumps({"startup_s": result.get("startup_s"),
                      "steps": [(s["op"], s["ok"], s["seconds"]) for s in result["steps"]]}),
          file=sys.stderr)


def expected_structure(session: dict[str, Any], pv: str, data: dict[str, Any]) -> Any:
    """Recompute the simulator's value of ``pv`` from the update stamped in ``data``."""
    engine = session["engine"]
    ts = data["timeStamp"]
    wall_s = ts["secondsPastEpoch"] + ts["nanoseconds"] / 1e9
    k = round((wall_s - engine.wall_offset - engine.start) / (PERIOD_MS / 1000))
    return normalized(engine.structure(pv, k))


def step(session: dict[str, Any], op: str, index: int = 0) -> dict[str, Any]:
    record: dict[str, Any] = session["steps_by_op"][op][index]
    assert record["ok"], record.get("traceback") or record.get("error")
    return record


def test_get(session: dict[str, Any]) -> None:
    value = step(session, "get")["value"]
    assert value == expected_structure(session, "SIM:AI:DOUBLE:1", value)


@pytest.mark.parametrize("op", ["snapshot_async", "snapshot_sync"])
def test_one_shot_snapshot(session: dict[str, Any], op: str) -> None:
    result = step(session, op)["value"]
    assert result is not None, "the one-shot snapshot never completed"
    if op == "snapshot_sync":
        assert result.pop("error") == 0
    connected = [base(uri) for uri in ONE_SHOT_PVS if "NEVER" not in uri]
    assert sorted(result) == sorted(connected)  # the never-connecting PV is absent
    for pv in connected:
        (value,) = result[pv]
        assert value == expected_structure(session, pv, value)
    assert isinstance(result["SIM:IMG:UBYTE:1:S4x3"][0]["value"]["ubyteValue"], list)


@pytest.mark.parametrize("kind", ["normal", "tb", "trig"])
def test_recurring_iterations_match_what_was_published(
    session: dict[str, Any], kind: str
) -> None:
    name = session["names"][kind]
    recurring = next(s for s in session["steps_by_op"]["recurring"] if s["name"] == name)
    assert recurring["ok"], recurring.get("error")
    ack = recurring["value"]
    assert ack["error"] == 0 and ack["publishing_topic"] == name
    assert ack["message"] == f"The snapshot '{name}' has been started"
    delivered = sorted(session["iterations"].get(name, []), key=lambda d: d["iteration"])
    minimum = {"normal": 5, "tb": 3, "trig": 2}[kind]
    waits = [(s["value"], s["seconds"]) for s in session["steps_by_op"]["wait_iterations"]]
    assert len(delivered) >= minimum, (
        f"only {len(delivered)} iterations delivered: {[d['iteration'] for d in delivered]}; "
        f"wait_iterations (counts, seconds): {waits}")
    indexes = [d["iteration"] for d in delivered]
    # no duplicates, in order; gaps only where the official client re-subscribed (k2eg 0.3.2
    # re-joins its consumer group for every new subscription and reads from the end, so what
    # is published during that rebalance, ~6 s and longer under load, is never delivered; seen
    # in CI as 84..106 missing from "normal"). Every delivered iteration is checked against
    # what was published below; the longest consecutive run holds at least `minimum`.
    assert indexes == sorted(set(indexes))
    runs = [1]
    for a, b in itertools.pairwise(indexes):
        runs.append(runs[-1] + 1 if b == a + 1 else 1)
    assert max(runs) >= minimum, indexes
    pub = published(session["bootstrap"], name)
    pvs = [base(uri) for uri in RECURRING_PVS]
    for got in delivered:
        sent = pub[got["iteration"]]
        assert got["header_timestamp"] == sent["header_ts"]
        assert got["tail_timestamp"] == sent["tail_ts"] == got["timestamp"]
        assert sorted(k for k in got if k not in (
            "iteration", "header_timestamp", "tail_timestamp", "timestamp")) == sorted(pvs)
        for pv in pvs:
            assert got[pv] == sent["values"].get(pv, []), f"{pv} in iteration {got['iteration']}"
        assert got["SIM:NEVER:2"] == []
        assert len(got["SIM:AI:DOUBLE:2"]) >= 1
    if kind == "tb":  # several sub-push batches per window, many samples per PV
        assert all(d["tail_timestamp"] > d["header_timestamp"] for d in delivered)
        assert all(len(d["SIM:AI:DOUBLE:2"]) >= 10 for d in delivered)
    if kind == "normal":  # one value per PV; the quiet PV repeats its last value
        assert all(len(d["SIM:AI:DOUBLE:2"]) == 1 for d in delivered)
        quiet = [d["SIM:QUIET:INT:2:Q300"] for d in delivered]
        assert all(q == quiet[0] for q in quiet)


def test_trigger_and_stop_acks(session: dict[str, Any]) -> None:
    names = session["names"]
    triggers = session["steps_by_op"]["trigger"]
    assert len(triggers) == 3
    for record in triggers:
        assert record["ok"], record.get("error")
        assert record["value"]["message"] == f"Snapshot '{names['trig']}' has been armed"
    stops = session["steps_by_op"]["stop"]
    assert [s["ok"] for s in stops] == [True] * 3, [s.get("error") for s in stops]
    assert [s["value"]["message"] for s in stops] == [
        f"Snapshot '{names[k]}' has been stopped" for k in ("trig", "tb", "normal")]
    # the simulator published a final iteration for each stop (tail last on the topic)
    for kind in ("trig", "tb", "normal"):
        pub = published(session["bootstrap"], names[kind])
        last = pub[max(pub)]
        summary = {i: (p["header_ts"], p["tail_ts"]) for i, p in pub.items()}
        assert last["tail_ts"] is not None, (kind, summary)
        assert last["header_ts"] is not None, (kind, summary)
    assert not session["engine"].snapshots
    # triggered: one iteration per trigger, plus the final one at stop
    assert len(published(session["bootstrap"], names["trig"])) == 4
