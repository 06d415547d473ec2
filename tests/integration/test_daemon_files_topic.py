"""The files topic: a running daemon publishes one event per finalized file, each saying what
the file says about itself, so a data catalog or an archive job needs no directory watching.

A periodic run records into segments of 5 iterations and is stopped; every segment file (the
rotated ones and the last one, finalized at the stop) must have exactly one event whose
fields match the file read back with h5py.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from confluent_kafka import Consumer, TopicPartition
from daemon_support import (
    DaemonEnv,
    DaemonProcess,
    complete_iterations,
    h5_files,
    request,
    run_state,
    simulator,
    wait_for,
)

from recorder.admin.files import FileEvent
from recorder.sinks.describe import iso_ns

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def file_events(bootstrap: str, topic: str, want: int, timeout: float = 20.0
                ) -> list[tuple[str | None, FileEvent]]:
    """(key, event) of the topic's messages from its start, until ``want`` of them."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{topic}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, 0)])
    out: list[tuple[str | None, FileEvent]] = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < want and time.monotonic() < deadline:
            for msg in consumer.consume(100, 0.2):
                if msg.error() is None:
                    key = msg.key()
                    out.append((None if key is None else key.decode(),
                                FileEvent.decode(msg.value())))
    finally:
        consumer.close()
    return out


def f_iterations(path: Path, column: str) -> Any:
    with h5py.File(path, "r") as f:
        return f["iterations"][column][:]


def test_every_finalized_file_gets_one_event_that_matches_it(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess],
) -> None:
    token = unique_name("fe").replace("-", "_")
    data = tmp_path / "data"
    config = tmp_path / "runs.yaml"
    config.write_text(f"""
runs:
  - name: seg
    snapshot:
      snapshot_name: seg_{token}
      pv_uri_list: [pva://SIM:AI:DOUBLE:1, pva://SIM:WF:DOUBLE:2:N64]
      time_window: 100
    output:
      directory: {data}/seg
      flush_interval_s: 0.3
      segment: {{max_iterations: 5}}
""")
    files_topic = unique_name("files")
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config,
                            {"RECORDER_FILES_TOPIC": files_topic})
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemon = DaemonProcess(denv)
        daemons.append(daemon)
        wait_for(lambda: (run_state(admin, "seg") or {}).get("state") == "recording", 40,
                 "the run to record")
        wait_for(lambda: complete_iterations(admin, "seg") >= 12, 30, "12 iterations")
        assert request(admin, "stop", "seg").ok
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, daemon.log_text()[-3000:]

    files = h5_files(data / "seg")
    assert len(files) >= 3, files  # 5 + 5 + the rest
    events = file_events(kafka_bootstrap, files_topic, len(files))
    time.sleep(0.5)
    assert len(file_events(kafka_bootstrap, files_topic, len(files) + 1, timeout=2)) == \
        len(files)  # one each, no more
    by_path = {e.path: (key, e) for key, e in events}
    assert sorted(by_path) == sorted(str(p.resolve()) for p in files), (by_path, files)
    uids = set()
    for path in files:
        key, e = by_path[str(path.resolve())]
        with h5py.File(path, "r") as f:
            a: dict[str, Any] = {k: (v.decode() if isinstance(v, bytes) else v)
                                 for k, v in f.attrs.items()}
        assert key == "seg" and (e.run, e.snapshot) == ("seg", f"seg_{token}")
        assert e.instance == denv.app and e.error is None
        assert e.status == a["status"] == "complete"
        assert e.iterations == int(a["n_iterations"]) and e.values == int(a["n_values"])
        assert e.segment == int(a["segment"]) and e.recording_uid == a["recording_uid"]
        assert (e.start_time, e.end_time) == (a["start_time"], a["end_time"])
        assert e.segment_start_time == a["segment_start_time"]
        stamps = np.concatenate([f_iterations(path, "header_timestamp"),
                                 f_iterations(path, "tail_timestamp")])
        assert (e.data_start_time, e.data_end_time) == (iso_ns(int(stamps[stamps > 0].min())),
                                                        iso_ns(int(stamps.max())))
        assert e.data_start_time <= e.data_end_time  # type: ignore[operator]
        assert e.bytes == path.stat().st_size and e.format_version == a["format_version"]
        uids.add(e.recording_uid)
    assert len(uids) == 1  # the segments of one recording
    assert sorted(e.segment for _k, e in events) == list(range(len(files)))  # type: ignore[type-var]
    assert sum(e.iterations for _k, e in events[:-1]) == 5 * (len(files) - 1)  # type: ignore[misc]
    log = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    told = [entry for entry in log if entry.get("event") == "file event"]
    assert len(told) == len(files) and all(entry["published"] for entry in told)


def test_the_event_of_a_file_compressed_with_a_plugin_says_what_it_holds(
        tmp_path: Path) -> None:
    """The file event is read in the daemon's process, which never imports hdf5plugin: with
    ``compression: zstd`` (or blosc2) a file of more than 1,024 iterations has its
    /iterations timestamps zstd-compressed (compact only up to 8 KiB), the read failed, and
    the event said only its size and an error (no status, iterations, times)."""
    import subprocess
    import sys

    pytest.importorskip("hdf5plugin")
    from recorder.client.events import (
        IterationClosed,
        IterationOpened,
        IterationStatus,
        ValuesReceived,
    )
    from recorder.client.values import PVSample
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions

    rec = HDF5Recording(OutputOptions(directory=tmp_path, compression="zstd"), run_name="z",
                        pv_uris=["pva://A"])
    for i in range(1, 1201):
        rec.handle(IterationOpened("t", "s", i, i * 1_000_000))
        rec.handle(ValuesReceived("t", i, 1, i, (PVSample("A", {"value": float(i)}),)))
        rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None,
                                   i * 1_000_000, i * 1_000_000))
    (final,) = rec.close()
    with h5py.File(final, "r") as f:
        assert f["iterations/header_timestamp"].chunks is not None
    got = subprocess.run(  # as the daemon does it: describe imported on its own
        [sys.executable, "-c", "import json, sys; from pathlib import Path; "
         "from recorder.sinks.describe import file_event_fields; "
         "print(json.dumps(file_event_fields(Path(sys.argv[1]))))", str(final)],
        capture_output=True, text=True, timeout=120, check=False)
    assert got.returncode == 0, got.stderr[-2000:]
    info = json.loads(got.stdout.splitlines()[-1])
    assert (info["status"], info["iterations"]) == ("complete", 1200)
    assert info["data_start_time"] == iso_ns(1_000_000)
