"""Baseline (b) of ``bench_e2e.py``: the OFFICIAL k2eg client + a naive h5py handler.

Runs under the official client's interpreter (``.venv-k2eg``: k2eg 0.3.2, confluent-kafka
2.15.1, h5py), never under the recorder's; ``bench_e2e.py`` starts it. Usage::

    .venv-k2eg/bin/python benchmarks/e2e_official.py PLAN.json

What a user would script: ``dml.snapshot_recurring(props, handler)`` with a handler that, for
every iteration, appends each PV's values to its own chunked, resizable h5py dataset
(``resize`` + one write per value; waveforms are 2-D datasets), plus the iteration index and
tail timestamp. The client runs handlers on a 10-thread pool, so the handler takes a lock (h5py
is not re-entrant). The file is flushed and closed at the end (counted in the time).

Protocol with the parent (one line each, stdout; progress and errors on stderr):

* ``SUBSCRIBED <topic>`` once ``snapshot_recurring`` returned (the gateway simulator acked
  it; up to 3 attempts, see below);
* ``WARM <iter_index>`` for every warm-up iteration handled (the parent publishes warm-ups
  until one arrives, so the client's group join and topic assignment are done);
* the parent sends ``GO <first_measured_index> <count>`` on stdin and publishes the measured
  iterations right away;
* ``RESULT <json>``: wall-clock time the last measured iteration was handled and the file
  closed, the values written, the handler's own busy time, peak memory.

The same harness adjustments as ``tests/interop/k2eg_driver.py``: an ini file in a temp folder
and a consumer ``session.timeout.ms`` of 6000 so the group join takes seconds.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "interop"))
from k2eg_official import configure_official_client


def vm_kb(field: str, pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> int:
    plan = json.loads(Path(sys.argv[1]).read_text())
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    configure_official_client(plan["bootstrap"], plan["cmd_topic"], "bench")

    import h5py
    import numpy as np
    from k2eg.broker import SnapshotProperties, SnapshotType
    from k2eg.dml import dml as k2eg_dml

    pvs: list[str] = plan["pvs"]
    waveform = plan["kind"] == "waveforms"
    h5 = h5py.File(plan["out"], "w")
    datasets: dict[str, Any] = {}
    iters = h5.create_dataset("iteration", (0,), maxshape=(None,), dtype="i8", chunks=True)
    tails = h5.create_dataset("tail_timestamp", (0,), maxshape=(None,), dtype="i8", chunks=True)
    lock = threading.Lock()
    done = threading.Event()
    state: dict[str, Any] = {"first": None, "count": 0, "handled": 0, "values": 0,
                             "busy_s": 0.0, "t_last": None, "errors": 0}

    def append(ds: Any, value: Any) -> None:
        n = ds.shape[0]
        ds.resize(n + 1, axis=0)
        ds[n] = value

    def handler(topic: str, data: dict[str, Any]) -> None:
        index = int(data["iteration"])
        values = 0
        try:
            with lock:
                t0 = time.perf_counter()
                append(iters, index)
                append(tails, data.get("tail_timestamp") or 0)
                for pv in pvs:
                    for sample in data.get(pv, ()):
                        ds = datasets.get(pv)
                        value = sample["value"]
                        if ds is None:
                            if waveform:
                                ds = h5.create_dataset(pv, (0, len(value)), dtype="f8",
                                                       maxshape=(None, len(value)), chunks=True)
                            else:
                                ds = h5.create_dataset(pv, (0,), maxshape=(None,), dtype="f8",
                                                       chunks=True)
                            datasets[pv] = ds
                        append(ds, np.asarray(value, dtype="f8") if waveform else value)
                        values += 1
                state["busy_s"] += time.perf_counter() - t0
                first = state["first"]
                if first is None or index < first:
                    say(f"WARM {index}")
                    return
                state["handled"] += 1
                state["values"] += values
                if state["handled"] >= state["count"]:
                    state["t_last"] = time.time()
                    done.set()
        except Exception as exc:  # reported, the parent fails the run
            state["errors"] += 1
            print(f"handler error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    client = k2eg_dml("bench", plan["app"])
    try:
        # The client reads its reply topic from "latest", resolved asynchronously after the
        # group join: an ack produced before that is never seen (OperationTimeout). A user
        # retries; a retry under the same name would be "already running", which this client
        # does not subscribe to, so each attempt uses a new name.
        time.sleep(1.0)
        result: Any = None
        for attempt in range(3):
            props = SnapshotProperties(
                snapshot_name=f"{plan['snapshot']}-a{attempt}",
                pv_uri_list=[f"pva://{pv}" for pv in pvs],
                time_window=plan.get("time_window", 600000), type=SnapshotType("normal"),
            )
            try:
                result = client.snapshot_recurring(props, handler, timeout=15)
                break
            except Exception as exc:
                print(f"snapshot_recurring attempt {attempt + 1}: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)
        if not isinstance(result, dict) or "publishing_topic" not in result:
            print(f"no subscription: {result!r}", file=sys.stderr, flush=True)
            return 2
        say(f"SUBSCRIBED {result['publishing_topic']}")
        line = sys.stdin.readline().split()
        if not line or line[0] != "GO":
            print(f"expected GO, got {line!r}", file=sys.stderr)
            return 2
        with lock:
            state["busy_s"] = 0.0
            state["count"] = int(line[2])
            state["first"] = int(line[1])
        if not done.wait(plan["timeout_s"]):
            print(f"only {state['handled']} of {state['count']} measured iterations handled "
                  f"within {plan['timeout_s']} s", file=sys.stderr, flush=True)
            say("RESULT " + json.dumps({**state, "ok": False}))
            return 3
        with lock:
            h5.close()
        t_done = time.time()
        say("RESULT " + json.dumps({**state, "ok": True, "t_done": t_done,
                                    "vmhwm_kb": vm_kb("VmHWM")}))
        return 0
    finally:
        # the client's close() joins its consumer thread: bounded, never hangs the benchmark
        closer = threading.Thread(target=client.close, daemon=True)
        closer.start()
        closer.join(5.0)


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # no interpreter teardown: the client's threads and __del__ may block
