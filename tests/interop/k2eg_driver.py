"""Drive the OFFICIAL k2eg client (PyPI k2eg 0.3.2) against a gateway; print JSON results.

Runs under the client's own interpreter (``RECORDER_K2EG_PYTHON``: a virtualenv with
``k2eg==0.3.2`` and ``confluent-kafka==2.15.1``), never under the recorder's. Usage::

    python k2eg_driver.py '<json plan>'

The plan names the broker, command topic and app, and lists steps; every step's outcome is
recorded, and the last stdout line is ``RESULT <json>``. Harness adjustments, all outside the
client's logic (research notes, k2eg-protocol-sequenced-details.md §5): an ini file in a temp
folder (``K2EG_PYTHON_CONFIGURATION_PATH_FOLDER``), and a consumer ``session.timeout.ms`` of
6000 instead of 30000 so group joins on the test broker take seconds, not tens of seconds.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import traceback
from typing import Any

from k2eg_official import configure_official_client  # beside this script


def main() -> int:
    plan = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    configure_official_client(plan["bootstrap"], plan["cmd_topic"], "sim")

    from k2eg.broker import SnapshotProperties, SnapshotType
    from k2eg.dml import OperationTimeout
    from k2eg.dml import dml as k2eg_dml

    lock = threading.Lock()
    iterations: dict[str, list[dict[str, Any]]] = {}
    one_shot: dict[str, Any] = {}
    steps: list[dict[str, Any]] = []

    def recurring_handler(topic: str, data: dict[str, Any]) -> None:
        with lock:
            iterations.setdefault(topic, []).append(data)

    def one_shot_handler(reply_id: str, data: dict[str, Any]) -> None:
        with lock:
            one_shot[reply_id] = data

    started = time.monotonic()
    client = k2eg_dml("sim", plan["app"])
    result: dict[str, Any] = {"startup_s": round(time.monotonic() - started, 2)}
    try:
        for step in plan["steps"]:
            op = step["op"]
            record: dict[str, Any] = {"op": op, "name": step.get("name")}
            t0 = time.monotonic()
            try:
                if op == "sleep":
                    time.sleep(step["seconds"])
                elif op == "get":
                    # "attempts" > 1 only for the session's first command: the client's reply
                    # consumer starts at the reply topic's end, resolved only after the
                    # assignment it waited for, so on a loaded machine the first reply can be
                    # published before that position and is never read (OperationTimeout).
                    attempts = step.get("attempts", 1)
                    for attempt in range(1, attempts + 1):
                        record["attempts"] = attempt
                        try:
                            record["value"] = client.get(
                                step["pv"], timeout=step.get("timeout", 10))
                            break
                        except OperationTimeout:
                            if attempt == attempts:
                                raise
                elif op == "snapshot_async":
                    rid = client.snapshot(step["pvs"], one_shot_handler)
                    deadline = time.monotonic() + step.get("timeout", 10)
                    while time.monotonic() < deadline:
                        with lock:
                            if rid in one_shot:
                                break
                        time.sleep(0.05)
                    with lock:
                        record["value"] = one_shot.get(rid)
                elif op == "snapshot_sync":
                    record["value"] = client.snapshot_sync(step["pvs"], timeout=10)
                elif op == "recurring":
                    props = SnapshotProperties(
                        snapshot_name=step["name"],
                        pv_uri_list=step["pvs"],
                        time_window=step.get("time_window", 1000),
                        sub_push_delay_msec=step.get("sub_push_delay_msec", 0),
                        triggered=step.get("triggered", False),
                        type=SnapshotType(step.get("type", "normal")),
                    )
                    record["value"] = client.snapshot_recurring(
                        props, recurring_handler, timeout=step.get("timeout", 20)
                    )
                elif op == "trigger":
                    record["value"] = client.snapshost_trigger(
                        step["name"], timeout=step.get("timeout", 20)
                    )
                elif op == "stop":
                    record["value"] = client.snapshot_stop(
                        step["name"], timeout=step.get("timeout", 30)
                    )
                elif op == "wait_iterations":
                    deadline = time.monotonic() + step["timeout"]
                    while time.monotonic() < deadline:
                        with lock:
                            counts = {t: len(its) for t, its in iterations.items()}
                        if all(counts.get(t, 0) >= n for t, n in step["at_least"].items()):
                            break
                        time.sleep(0.1)
                    with lock:
                        record["value"] = {t: len(its) for t, its in iterations.items()}
                else:
                    raise ValueError(f"unknown op {op}")
                record["ok"] = True
            except Exception as exc:  # recorded, the test asserts on it
                record["ok"] = False
                record["error"] = f"{type(exc).__name__}: {exc}"
                record["traceback"] = traceback.format_exc(limit=5)
            record["seconds"] = round(time.monotonic() - t0, 3)
            steps.append(record)
    finally:
        time.sleep(plan.get("drain_s", 0.5))
        with lock:
            result["steps"] = steps
            result["iterations"] = iterations
        client.close()
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
