"""End to end: pre-filled snapshot topics drained by the daemon into finalized HDF5 files.

Run: ``.venv/bin/python benchmarks/bench_e2e.py [--scale 1.0]``

An embedded broker (Tansu) is started and one topic per case is pre-filled with a sequenced
k2eg stream (header, one data message per PV, tail per iteration; the gateway simulator's own
PV model and encoder, see ``bench_client.py``):

* ``scalars-1k``: 1,000 NTScalar PVs per iteration (two run lengths: memory must stay flat);
* ``scalars-10k``: 10,000 NTScalar PVs per iteration;
* ``waveforms``: 500 NTScalarArray PVs of 128 elements per iteration.

Then, in the same run:

* (a) plain consume + decode: ``Consumer.assign`` + ``consume(1000)`` + ``msgpack.unpackb``;
* ours: the daemon (:class:`recorder.service.Service`, the code of ``k2eg-recorder run``) in a
  separate process, resuming a recording at offset 0 (the resume-state path of a restart) so it
  drains the pre-filled topic; a gateway simulator acks the snapshot start. Timed from READY to
  the files being finalized (stop included). Peak memory is the worker's VmHWM.

Printed: PV values/s for both and the ratio ours/(a) (target >= 0.6), peak RSS per case.
Not measured yet (see the report): (b) the official k2eg client + h5py baseline, and the
tail-to-readable latency.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_client as bc  # noqa: E402
from confluent_kafka import Producer  # noqa: E402

from recorder.broker import EmbeddedBroker  # noqa: E402
from recorder.sim.encoding import SER_HEADER, SER_MSGPACK  # noqa: E402


@dataclass
class Case:
    name: str
    kind: str
    pvs: int
    iterations: int


def fill(bootstrap: str, topic: str, case: Case) -> int:
    """Produce the case's iterations; returns the number of messages."""
    pvs = bc.packed_pvs(case.kind, case.pvs)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "batch.num.messages": 10000, "queue.buffering.max.messages": 200000})
    headers = [(SER_HEADER, SER_MSGPACK.encode())]
    n = 0
    ts = int(time.time() * 1000)
    for index in range(1, case.iterations + 1):
        for value in bc.iteration_messages(index, pvs, ts + 100 * index):
            while True:
                try:
                    producer.produce(topic, value=value, partition=0, headers=headers)
                    break
                except BufferError:
                    producer.poll(0.05)
            n += 1
        producer.poll(0)
    if producer.flush(120) != 0:
        raise RuntimeError("could not produce the benchmark stream")
    return n


def vm_kb(field: str, pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# ------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> int:
    """The daemon draining one topic (runs in its own process)."""
    from recorder.config.daemon import DaemonSettings
    from recorder.daemon.resume import ActiveRecording, ResumeStore
    from recorder.logging import configure_logging
    from recorder.service import Service
    from recorder.settings import KafkaSettings
    from recorder.sim import GatewaySimulator

    out = Path(args.out)
    configure_logging("json", "WARNING", stream=open(out / "daemon.log", "a"))  # noqa: SIM115
    logging.getLogger().setLevel(logging.WARNING)
    topic = args.topic
    (out / "runs.yaml").write_text(f"""
name: bench
snapshot:
  snapshot_name: {topic}
  pv_uri_list: [pva://SIM:NEVER:1]
  time_window: 600000
output: {{directory: {out / "data"}, flush_interval_s: 1.0, compression: none}}
""")
    store = ResumeStore(out / "state")
    store.begin("bench", ActiveRecording("bench-uid", 0, topic, topic, {0: -1}, None))
    cmd = f"{topic}-cmd"
    sim = GatewaySimulator(args.bootstrap, cmd).start()
    kafka = KafkaSettings.from_env({}, bootstrap_servers=args.bootstrap, cmd_topic=cmd,
                                   app_name=f"{topic}-rec")
    daemon = DaemonSettings(config_path=out / "runs.yaml", instance="bench",
                            admin_topic=f"{topic}-admin", admin_reply_topic=f"{topic}-reply",
                            status_topic=f"{topic}-status", heartbeat_interval_s=5.0,
                            metrics_port=None)
    service = Service(daemon, kafka, state_dir=out / "state")
    marks: dict[str, float] = {}
    peak_rss = [0]

    def watch() -> None:
        service.ready.wait(120)
        marks["ready"] = time.perf_counter()
        while True:
            c = service.controllers.get("bench")
            peak_rss[0] = max(peak_rss[0], vm_kb("VmRSS"))
            if c is not None and c.status().iterations_complete >= args.iterations:
                marks["drained"] = time.perf_counter()
                service.request_stop()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    service.run()
    marks["finalized"] = time.perf_counter()
    files = {name: c.files() for name, c in service.controllers.items()}
    sim.stop()
    values = 0
    from recorder.reader import open_file
    for path in files.get("bench", []):
        with open_file(path) as f:
            values += sum(len(f.times(pv)) for pv in f.pv_names)
    print(json.dumps({
        "seconds": marks["finalized"] - marks["ready"],
        "drain_seconds": marks["drained"] - marks["ready"],
        "values": values, "vmhwm_kb": vm_kb("VmHWM"), "peak_rss_kb": peak_rss[0],
        "files": files.get("bench", []),
    }))
    return 0


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply iteration counts")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    s = args.scale
    cases = [
        Case("scalars-1k", "scalars", 1000, int(100 * s)),
        Case("scalars-1k-x2", "scalars", 1000, int(200 * s)),
        Case("scalars-10k", "scalars", 10_000, int(20 * s)),
        Case("waveforms", "waveforms", 500, int(100 * s)),
    ]
    rows: list[dict[str, Any]] = []
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        for case in cases:
            topic = f"bench_e2e_{case.name.replace('-', '_')}_{os.getpid()}"
            messages = fill(broker.bootstrap_servers, topic, case)
            values = messages - 2 * case.iterations
            base = bc.run_baseline(broker.bootstrap_servers, topic, messages)
            out = Path(tmp) / case.name
            out.mkdir()
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", "--bootstrap", broker.bootstrap_servers,
                 "--topic", topic, "--iterations", str(case.iterations), "--out", str(out)],
                capture_output=True, text=True, timeout=900, check=False,
            )
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            ours = json.loads(proc.stdout.strip().splitlines()[-1])
            if ours["values"] != values:
                print(f"{case.name}: {ours['values']} values in the files, {values} published",
                      file=sys.stderr)
                return 1
            rows.append({
                "case": case.name, "iterations": case.iterations, "values": values,
                "a_rate": values / base.seconds, "ours_rate": values / ours["seconds"],
                "ours_drain_rate": values / ours["drain_seconds"],
                "hwm_mb": ours["vmhwm_kb"] / 1024,
            })
    print(f"{'case':15} {'iters':>6} {'values':>10} {'(a) val/s':>12} {'ours val/s':>12} "
          f"{'ours/(a)':>9} {'drain/(a)':>9} {'peak MB':>8}")
    for r in rows:
        print(f"{r['case']:15} {r['iterations']:>6} {r['values']:>10} {r['a_rate']:>12,.0f} "
              f"{r['ours_rate']:>12,.0f} {r['ours_rate'] / r['a_rate']:>9.2f} "
              f"{r['ours_drain_rate'] / r['a_rate']:>9.2f} {r['hwm_mb']:>8.0f}")
    print("ours: READY -> files finalized (stop + finalize included); drain: READY -> last "
          "iteration handed to the writer. Target ours/(a) >= 0.6; peak MB flat in run length "
          "(scalars-1k vs scalars-1k-x2).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
