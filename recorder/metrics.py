"""Prometheus metrics of the recorder, in an injected registry (never the global one).

The daemon builds one :class:`RecorderMetrics` and hands it to its components; tests build
their own with a private ``CollectorRegistry`` and read values with
``registry.get_sample_value(...)``. :func:`start_metrics_server` exposes the registry over HTTP
on loopback unless told otherwise (``RECORDER_METRICS_PORT``, ``RECORDER_METRICS_ADDR``).

Metrics (prefix ``k2eg_recorder_``; every per-run metric has a ``run`` label):

=======================================  =========  ===================================
``iterations_total{run,status}``         counter    status: complete | incomplete;
                                                    counted once durable in a file
``values_written_total{run}``            counter    PV values appended to HDF5
``bytes_written_total{run}``             counter    bytes added to the files being written
``messages_skipped_total{run,reason}``   counter    malformed.<why>, late.<what>, duplicate...
``flush_duration_seconds{run}``          histogram  one HDF5 flush
``consumer_lag_messages{run}``           gauge      messages behind the snapshot topic's end
                                                    (none while not read, or Kafka is down)
``backpressure_pauses_total{run}``       counter    times the run's topic was paused because
                                                    writing fell behind (its queue was full)
``run_recording{run}``                   gauge      1 while recording, else 0
``last_write_timestamp_seconds{run}``    gauge      Unix time of the last flush
``write_errors_total{run}``              counter    failed writes/flushes
``snapshot_resends_total{run,outcome}``  counter    snapshot starts re-sent to a gateway
                                                    that forgot them, by outcome
``kafka_up``                             gauge      1 while Kafka answers, else 0
``kafka_offsets_reset_total``            counter    partitions of snapshot topics read from
                                                    their beginning: the topic was deleted
                                                    and created again (the log names them)
``admin_commands_total{command,code}``   counter    admin replies by command and code
``reloads_total{result}``                counter    ok | failed
``files_total{run,status}``              counter    files finalized: complete | aborted | failed
``disk_free_bytes{path}``                gauge      free space of a filesystem runs write to
``disk_total_bytes{path}``               gauge      its size (path: its mount point)
``disk_warning{path}``                   gauge      1 while it needs a look (low, filling,
                                                    not answering), else 0
=======================================  =========  ===================================

``messages_skipped_total`` reasons are the k2eg client's assembler counters charged to the
run's snapshot topic (:meth:`recorder.client.K2egClient.skipped`): ``malformed.<why>`` (not
decodable), ``late.<what>`` (for an iteration already closed), ``duplicate`` /
``duplicate.header`` / ``duplicate.tail``, ``before_start.<what>`` (the rest of an iteration
already under way when a new recording began reading), ``lost.retention`` (never read: a
resume found them deleted by the topic's retention).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from recorder.admin.status import DiskStatus

__all__ = ["FLUSH_BUCKETS", "RecorderMetrics", "start_metrics_server"]

NAMESPACE = "k2eg_recorder"
FLUSH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RecorderMetrics:
    """All recorder metrics, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        r = self.registry
        ns = NAMESPACE
        self.iterations = Counter(
            "iterations",
            "Iterations closed, by status",
            ["run", "status"],
            namespace=ns,
            registry=r,
        )
        self.values_written = Counter(
            "values_written", "PV values written to HDF5", ["run"], namespace=ns, registry=r
        )
        self.bytes_written = Counter(
            "bytes_written",
            "Bytes added to the HDF5 files being written (the recording's byte counter, else "
            "the growth of the file at each flush: compressed data plus metadata)",
            ["run"],
            namespace=ns,
            registry=r,
        )
        self.messages_skipped = Counter(
            "messages_skipped",
            "Snapshot messages not written, by reason",
            ["run", "reason"],
            namespace=ns,
            registry=r,
        )
        self.flush_duration = Histogram(
            "flush_duration_seconds",
            "Duration of one HDF5 flush",
            ["run"],
            namespace=ns,
            registry=r,
            buckets=FLUSH_BUCKETS,
        )
        self.consumer_lag = Gauge(
            "consumer_lag_messages",
            "Messages between the consumer position and the end of the snapshot topic",
            ["run"],
            namespace=ns,
            registry=r,
        )
        self.backpressure_pauses = Counter(
            "backpressure_pauses",
            "Times the run's snapshot topic was paused because writing fell behind (its queue "
            "of events reached its bound)",
            ["run"],
            namespace=ns,
            registry=r,
        )
        self.recording = Gauge(
            "run_recording", "1 while the run is recording", ["run"], namespace=ns, registry=r
        )
        self.last_write = Gauge(
            "last_write_timestamp_seconds",
            "Unix time of the run's last successful flush",
            ["run"],
            namespace=ns,
            registry=r,
        )
        self.write_errors = Counter(
            "write_errors", "Failed HDF5 writes or flushes", ["run"], namespace=ns, registry=r
        )
        self.admin_commands = Counter(
            "admin_commands",
            "Admin commands answered, by command and reply code",
            ["command", "code"],
            namespace=ns,
            registry=r,
        )
        self.snapshot_resends = Counter(
            "snapshot_resends",
            "Snapshot starts re-sent because a periodic run's topic went silent (or a trigger "
            "found the snapshot unknown), by the gateway's answer: restarted (it had lost the "
            "snapshot), already_running, failed (no answer)",
            ["run", "outcome"],
            namespace=ns,
            registry=r,
        )
        self.kafka_up = Gauge(
            "kafka_up",
            "0 while the daemon's k2eg client cannot reach Kafka (for 2 s or more), else 1",
            namespace=ns,
            registry=r,
        )
        self.kafka_offsets_reset = Counter(
            "kafka_offsets_reset",
            "Partitions of snapshot topics the daemon's k2eg client read from their beginning "
            "instead of a resume's offset because the topic was deleted and created again "
            "(logged with the topic and partition)",
            namespace=ns,
            registry=r,
        )
        self.reloads = Counter(
            "reloads", "Run-definition reloads, by result", ["result"], namespace=ns, registry=r
        )
        self.files = Counter(
            "files",
            "Files finalized, by the status the file records",
            ["run", "status"],
            namespace=ns,
            registry=r,
        )
        self.disk_free = Gauge(
            "disk_free_bytes",
            "Free space (for unprivileged users) of a filesystem the runs write to, by mount "
            "point",
            ["path"],
            namespace=ns,
            registry=r,
        )
        self.disk_total = Gauge(
            "disk_total_bytes",
            "Size of a filesystem the runs write to, by mount point",
            ["path"],
            namespace=ns,
            registry=r,
        )
        self.disk_warning = Gauge(
            "disk_warning",
            "1 while a filesystem the runs write to needs a look: below the free-space "
            "minimum, filling up within the warning horizon, or not answering",
            ["path"],
            namespace=ns,
            registry=r,
        )
        self._disk_paths: set[str] = set()
        self._per_run = (
            self.values_written,
            self.bytes_written,
            self.flush_duration,
            self.consumer_lag,
            self.recording,
            self.last_write,
            self.write_errors,
            self.backpressure_pauses,
        )
        self._runs: set[str] = set()
        self._skip_reasons: dict[str, set[str]] = {}
        self._statuses: dict[str, set[str]] = {}
        self._resend_outcomes: dict[str, set[str]] = {}
        self._file_statuses: dict[str, set[str]] = {}

    # --- recording side --------------------------------------------------------------------
    def iteration_closed(self, run: str, status: str, count: int = 1) -> None:
        self._runs.add(run)
        self._statuses.setdefault(run, set()).add(status)
        self.iterations.labels(run=run, status=status).inc(count)

    def values(self, run: str, count: int, nbytes: int = 0) -> None:
        self._runs.add(run)
        self.values_written.labels(run=run).inc(count)
        if nbytes:
            self.bytes_written.labels(run=run).inc(nbytes)

    def skipped(self, run: str, reason: str, count: int = 1) -> None:
        self._runs.add(run)
        self._skip_reasons.setdefault(run, set()).add(reason)
        self.messages_skipped.labels(run=run, reason=reason).inc(count)

    def flushed(self, run: str, duration_s: float, at_unix_s: float) -> None:
        self._runs.add(run)
        self.flush_duration.labels(run=run).observe(duration_s)
        self.last_write.labels(run=run).set(at_unix_s)

    def write_failed(self, run: str) -> None:
        self._runs.add(run)
        self.write_errors.labels(run=run).inc()

    def lag(self, run: str, messages: int) -> None:
        self._runs.add(run)
        self.consumer_lag.labels(run=run).set(messages)

    def backpressure_paused(self, run: str, count: int = 1) -> None:
        self._runs.add(run)
        self.backpressure_pauses.labels(run=run).inc(count)

    def clear_lag(self, run: str) -> None:
        """A run that stopped reading has no lag: its series goes (it kept its last value,
        and an alert on it kept firing for a stopped run)."""
        with contextlib.suppress(KeyError):
            self.consumer_lag.remove(run)

    def set_recording(self, run: str, recording: bool) -> None:
        self._runs.add(run)
        self.recording.labels(run=run).set(1 if recording else 0)

    def snapshot_resent(self, run: str, outcome: str) -> None:
        self._runs.add(run)
        self._resend_outcomes.setdefault(run, set()).add(outcome)
        self.snapshot_resends.labels(run=run, outcome=outcome).inc()

    def file_finalized(self, run: str, status: str) -> None:
        self._runs.add(run)
        self._file_statuses.setdefault(run, set()).add(status)
        self.files.labels(run=run, status=status).inc()

    def set_kafka_up(self, up: bool) -> None:
        self.kafka_up.set(1 if up else 0)

    def offsets_reset(self, count: int) -> None:
        self.kafka_offsets_reset.inc(count)

    def disks(self, disks: Iterable[DiskStatus]) -> None:
        """Set the disk gauges to these filesystems (series of others are removed)."""
        paths: set[str] = set()
        for d in disks:
            paths.add(d.path)
            self.disk_warning.labels(path=d.path).set(1 if d.warning else 0)
            for gauge, value in ((self.disk_free, d.free_bytes), (self.disk_total, d.total_bytes)):
                if value is None:
                    with contextlib.suppress(KeyError):
                        gauge.remove(d.path)
                else:
                    gauge.labels(path=d.path).set(value)
        for gone in self._disk_paths - paths:
            for gauge in (self.disk_free, self.disk_total, self.disk_warning):
                with contextlib.suppress(KeyError):
                    gauge.remove(gone)
        self._disk_paths = paths

    def admin_command(self, command: str, code: str) -> None:
        self.admin_commands.labels(command=command, code=code).inc()

    def reload(self, ok: bool) -> None:
        self.reloads.labels(result="ok" if ok else "failed").inc()

    def remove_run(self, run: str) -> None:
        """Forget a run removed by a reload (its series disappear from the exposition)."""
        if run not in self._runs:
            return
        self._runs.discard(run)
        for metric in self._per_run:
            with contextlib.suppress(KeyError):  # a run may never have had this series
                metric.remove(run)
        for status in self._statuses.pop(run, set()):
            self.iterations.remove(run, status)
        for reason in self._skip_reasons.pop(run, set()):
            self.messages_skipped.remove(run, reason)
        for outcome in self._resend_outcomes.pop(run, set()):
            self.snapshot_resends.remove(run, outcome)
        for status in self._file_statuses.pop(run, set()):
            self.files.remove(run, status)


def start_metrics_server(
    port: int, registry: CollectorRegistry, *, addr: str = "127.0.0.1"
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``registry`` on http://addr:port/metrics from a daemon thread. Port 0 picks a free
    port (read it from ``server.server_port``). Stop with ``server.shutdown()``."""
    return start_http_server(port, addr=addr, registry=registry)
