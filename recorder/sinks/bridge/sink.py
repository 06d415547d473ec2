"""``KaraboBridgeSink``: serve each closed iteration live over the Karabo bridge protocol.

The daemon drives it like :class:`recorder.sinks.hdf5.HDF5Recording`::

    bridge = KaraboBridgeSink(options.bridge, run_name="linac", snapshot=props)
    bridge.handle(event)        # every IterationOpened / ValuesReceived / IterationClosed
    bridge.maybe_flush(now)     # no-op (nothing is buffered for disk); returns False
    bridge.flush()              # no-op
    bridge.close("complete")    # serves the iterations still open as incomplete, then stops
    bridge.status, bridge.reason, bridge.endpoints, bridge.counters

Recording is never slowed down by a bridge client:

* :meth:`handle` only keeps references to the samples of open iterations and, when an
  iteration closes, appends it to a bounded queue (``queue_size``; when full the oldest
  entry is dropped: latest wins) and writes one byte to a non-blocking wake-up pipe. It never
  blocks, never builds a container, never touches a socket.
* One thread per sink owns the ZeroMQ sockets. It builds and serializes a container only when
  someone wants it (a subscriber is connected, or a REQ client is waiting), once per iteration
  whatever the number of clients, with ``karabo_bridge.serializer.serialize``.
* ``rep``: a ROUTER socket speaking the REP side of the protocol, so any number of
  ``karabo_bridge.Client(endpoint, "REQ")`` can wait at once. ``next`` is answered with the
  latest closed iteration that client has not had yet; when it already has the latest, the
  request waits for the next iteration (so a client loop gets every iteration it keeps up with
  and never the same one twice). Replies never block: ZeroMQ drops what cannot be routed.
* ``pub``: an XPUB socket (PUB plus subscription notices, so nothing is built while nobody
  listens) with a small send high-water mark: a subscriber that does not read loses
  iterations, the others are not affected.

Iterations are served in the order the HDF5 sink writes them (a younger iteration that closes
first waits for the older one, as in :class:`recorder.sinks.buffer.RecordingBuffer`), with the
same values, so ``sink`` and ``recorder.reader`` produce the same container per iteration
(:mod:`recorder.sinks.bridge.mapping`).

This is the only module importing ``zmq`` and ``karabo_bridge`` (optional extra
``k2eg-recorder[bridge]``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
import zmq
from karabo_bridge.serializer import serialize

from recorder.client.events import (
    IterationClosed,
    IterationEvent,
    IterationOpened,
    ValuesReceived,
)
from recorder.client.properties import SnapshotProperties
from recorder.client.values import PVSample, replace_surrogates
from recorder.sinks.bridge.mapping import IterationInfo, build_train, stacked_for
from recorder.sinks.bridge.options import BridgeOptions

log = structlog.get_logger("recorder.sinks.bridge")

RECENTLY_CLOSED = 256  # as RecordingBuffer: values for these iterations are late, not new
MAX_CLIENTS = 4096  # REQ clients whose last-served iteration is remembered
PUB_LINGER_MS = 200  # let the last iterations reach subscribers at close
JOIN_TIMEOUT_S = 10.0
POLL_MS = 1000  # the serving thread also wakes up this often (belt and braces)
REQUEST = b"next"


@dataclass(slots=True)
class _Open:
    iter_index: int
    header_timestamp_ns: int | None
    samples: list[PVSample] = field(default_factory=list)
    closed: IterationClosed | None = None


@dataclass(slots=True)
class _Item:
    info: IterationInfo
    samples: tuple[PVSample, ...]


@dataclass(slots=True)
class _Served:
    seq: int
    item: _Item
    frames: list[Any] | None = None
    failed: bool = False


def wire_safe(value: Any) -> Any:
    """What ``karabo_bridge.serialize`` (protocol 2.2, plain msgpack) can pack: numpy scalars
    that are not numbers (``bool_``) become Python values; object arrays become lists."""
    if isinstance(value, dict):
        return {k: wire_safe(v) for k, v in value.items()}
    if isinstance(value, np.generic) and not isinstance(value, np.number):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype == object:
        return value.tolist()
    if isinstance(value, list):
        return [wire_safe(v) for v in value]
    return value


def wire_text(value: Any) -> Any:
    """``value`` with the lone surrogates of its texts (keys included) replaced by U+FFFD:
    the client keeps bytes that were not UTF-8 (a Latin-1 ``°C``) as lone surrogates, which
    msgpack cannot pack."""
    if isinstance(value, str):
        return replace_surrogates(value)
    if isinstance(value, dict):
        return {wire_text(k): wire_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [wire_text(v) for v in value]
    return value


def _allow_ipv6(sock: zmq.Socket[Any], endpoint: str) -> None:
    """ZeroMQ binds an IPv6 address (``tcp://[::1]:<port>``) only on a socket with IPV6 set."""
    if endpoint.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)


class KaraboBridgeSink:
    """See the module docstring."""

    def __init__(
        self,
        options: BridgeOptions,
        *,
        run_name: str,
        snapshot: SnapshotProperties | None = None,
    ) -> None:
        self.options = options
        self.run_name = run_name
        self.snapshot_name = snapshot.snapshot_name if snapshot is not None else ""
        self.stacked = stacked_for(snapshot.type) if snapshot is not None else False
        self.status = "serving"
        self.reason = ""
        self.endpoints: dict[str, str] = {}
        self.counters: dict[str, int] = collections.defaultdict(int)
        self._open: collections.OrderedDict[int, _Open] = collections.OrderedDict()
        self._recent: collections.deque[int] = collections.deque(maxlen=RECENTLY_CLOSED)
        self._tags: dict[int, dict[str, str]] = {}  # trigger tags of iterations not served yet
        self._queue: collections.deque[_Item] = collections.deque(maxlen=options.queue_size)
        # "full, so the append drops the oldest" must be decided atomically with the append:
        # the serving thread pops concurrently (else a drop is counted for an item it serves)
        self._queue_lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self._log = log.bind(run=run_name, snapshot=self.snapshot_name)
        # state of the serving thread
        self._latest: _Served | None = None
        self._seq = 0
        self._topics: set[bytes] = set()
        self._served: collections.OrderedDict[tuple[bytes, ...], int] = (
            collections.OrderedDict()
        )
        self._waiting: dict[tuple[bytes, ...], list[bytes]] = {}
        # sockets
        self._ctx = zmq.Context()
        self._rep: zmq.Socket[Any] | None = None
        self._pub: zmq.Socket[Any] | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread: threading.Thread | None = None
        try:
            self._bind()
        except zmq.ZMQError as exc:
            self._fail(f"cannot bind: {exc}")
            self._close_sockets()
            return
        self._thread = threading.Thread(
            target=self._serve, name=f"recorder-bridge-{run_name}", daemon=True
        )
        self._thread.start()
        self._log.info("karabo bridge serving", endpoints=self.endpoints,
                       protocol=options.protocol_version)

    # --- the daemon's API (recording thread) --------------------------------------------------
    def handle(self, event: IterationEvent) -> None:
        """Keep the event's samples; queue the iteration when it closes. Never blocks."""
        if self.status != "serving":
            self.counters["dropped_events"] += 1
            return
        self.counters["events"] += 1
        if isinstance(event, IterationOpened):
            it = self._open.get(event.iter_index)
            if it is None:
                if event.iter_index in self._recent:
                    # the client opens an iteration once: the snapshot was restarted (its
                    # iter_index began again), this is a new iteration, not a late one
                    self._recent.remove(event.iter_index)
                self._open[event.iter_index] = _Open(event.iter_index, event.header_timestamp_ns)
            elif it.header_timestamp_ns is None:
                it.header_timestamp_ns = event.header_timestamp_ns
        elif isinstance(event, ValuesReceived):
            it = self._open.get(event.iter_index)
            if it is None:
                if event.iter_index in self._recent:
                    self.counters["values_after_close"] += len(event.samples)
                    return
                it = self._open[event.iter_index] = _Open(event.iter_index, None)
            it.samples.extend(event.samples)
        else:
            it = self._open.get(event.iter_index)
            if it is None:
                it = self._open[event.iter_index] = _Open(
                    event.iter_index, event.header_timestamp_ns
                )
            it.closed = event
            # served from the oldest while the oldest is closed (the HDF5 row order)
            while self._open:
                oldest = next(iter(self._open.values()))
                if oldest.closed is None:
                    break
                self._open.popitem(last=False)
                self._recent.append(oldest.iter_index)
                self._enqueue(
                    IterationInfo.from_closed(oldest.closed, oldest.header_timestamp_ns),
                    oldest.samples,
                )

    def maybe_flush(self, now: float | None = None, *, idle: bool = False) -> bool:
        """Nothing to flush (interface parity with HDF5Recording)."""
        return False

    def flush(self) -> None:
        """Nothing to flush (interface parity with HDF5Recording)."""

    def end_recording(self) -> None:
        """The recording ended but the run goes on being served (a stop and a start, a
        disk-full pause, a daemon's resume): serve the iterations still open as incomplete
        and forget this recording's iterations; the endpoints stay bound, so a REQ client
        waiting now is answered with the next recording's first iteration (ZeroMQ does not
        send a request again to an endpoint bound anew)."""
        if self.status == "serving":
            self._serve_open()
        self._open.clear()
        self._recent.clear()
        self._tags.clear()

    def begin_recording(self, snapshot: SnapshotProperties | None) -> None:
        """A new recording of the run, served on the same endpoints."""
        self.snapshot_name = snapshot.snapshot_name if snapshot is not None else ""
        self.stacked = stacked_for(snapshot.type) if snapshot is not None else False
        self._log = log.bind(run=self.run_name, snapshot=self.snapshot_name)

    def _serve_open(self) -> None:
        while self._open:
            _, it = self._open.popitem(last=False)
            info = (
                IterationInfo.from_closed(it.closed, it.header_timestamp_ns)
                if it.closed is not None
                else IterationInfo.stopped(it.iter_index, it.header_timestamp_ns)
            )
            self._enqueue(info, it.samples)

    def close(self, status: str = "complete", reason: str = "") -> None:
        """Serve the iterations still open as incomplete, then stop serving and free the
        sockets (waits for the serving thread, at most ~10 s)."""
        if status not in ("complete", "aborted", "failed"):
            raise ValueError(f"bad close status {status!r}")
        if self._closed:
            return
        self._closed = True
        if self.status == "serving":
            self._serve_open()
            self.status = status
            self.reason = reason
        self._open.clear()
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
            if self._thread.is_alive():  # pragma: no cover - a wedged serializer
                self._log.error("karabo bridge thread did not stop")
                return
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log.info("karabo bridge closed", status=self.status, counters=dict(self.counters))

    @property
    def has_subscribers(self) -> bool:
        """Whether a SUB client is connected to ``pub`` (as ZeroMQ last reported it)."""
        return bool(self._topics)

    def __enter__(self) -> KaraboBridgeSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close("aborted" if exc[0] is not None else "complete")

    # --- recording thread helpers -------------------------------------------------------------
    def tag_iteration(self, iter_index: int, tags: Mapping[str, str]) -> None:
        """Trigger ``tags`` of iteration ``iter_index``, served with it (its
        ``k2eg-recorder/iteration`` source, as the file's ``trains()`` gives them): before it
        closes, as the daemon sends them. Tags of an iteration already served are dropped
        (counted ``late_tags``); at most :data:`RECENTLY_CLOSED` iterations' tags wait."""
        if self.status != "serving":
            return
        if iter_index in self._recent:
            self.counters["late_tags"] += 1
            return
        self._tags.setdefault(iter_index, {}).update({str(k): str(v) for k, v in tags.items()})
        while len(self._tags) > RECENTLY_CLOSED:
            self._tags.pop(next(iter(self._tags)))

    def _enqueue(self, info: IterationInfo, samples: list[PVSample]) -> None:
        tags = self._tags.pop(info.iter_index, None)
        if tags:
            info = dataclasses.replace(info, tags=tuple(tags.items()))
        if not info.complete and not self.options.serve_incomplete:
            self.counters["skipped_incomplete"] += 1
            return
        with self._queue_lock:
            if len(self._queue) == self._queue.maxlen:
                self.counters["dropped_iterations"] += 1  # the oldest goes: latest wins
            self._queue.append(_Item(info, tuple(samples)))
        self.counters["iterations"] += 1
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _fail(self, reason: str) -> None:
        self.status = "failed"
        self.reason = reason
        self._log.error("karabo bridge failed", reason=reason)

    # --- sockets ------------------------------------------------------------------------------
    def _bind(self) -> None:
        opts = self.options
        if opts.rep is not None:
            rep = self._rep = self._ctx.socket(zmq.ROUTER)
            rep.setsockopt(zmq.LINGER, 0)
            _allow_ipv6(rep, opts.rep)
            rep.bind(opts.rep)
            self.endpoints["rep"] = rep.getsockopt_string(zmq.LAST_ENDPOINT)
            self._share_ipc(self.endpoints["rep"])
        if opts.pub is not None:
            pub = self._pub = self._ctx.socket(zmq.XPUB)
            pub.setsockopt(zmq.LINGER, PUB_LINGER_MS)
            pub.setsockopt(zmq.SNDHWM, opts.pub_hwm)
            _allow_ipv6(pub, opts.pub)
            pub.bind(opts.pub)
            self.endpoints["pub"] = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            self._share_ipc(self.endpoints["pub"])

    def _share_ipc(self, endpoint: str) -> None:
        """Let whoever may read an ``ipc://`` endpoint's socket file connect to it: a Unix
        socket takes connections only from who may write it, and zmq creates it with the
        umask (the unit's UMask=0027: 0750, so the analysts of the service's group, who read
        its files, could not connect)."""
        path = endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else ""
        if not path or path.startswith("@"):  # tcp, or an abstract socket: no file
            return
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            os.chmod(path, mode | (mode & 0o444) >> 1)
        except OSError as exc:
            self._log.warning("ipc endpoint left as created", endpoint=endpoint,
                              error=str(exc))

    def _close_sockets(self) -> None:
        for sock in (self._rep, self._pub):
            if sock is not None:
                sock.close()
        self._rep = self._pub = None
        self._topics.clear()  # nobody is subscribed to a closed socket
        self._ctx.term()

    # --- the serving thread -------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            poller = zmq.Poller()
            poller.register(self._wake_r, zmq.POLLIN)
            for sock in (self._rep, self._pub):
                if sock is not None:
                    poller.register(sock, zmq.POLLIN)
            while True:
                ready = dict(poller.poll(POLL_MS))
                if self._wake_r in ready:
                    with contextlib.suppress(BlockingIOError, OSError):
                        while os.read(self._wake_r, 4096):
                            pass
                if self._pub is not None and self._pub in ready:
                    self._subscriptions(self._pub)
                if self._rep is not None and self._rep in ready:
                    self._requests(self._rep)
                # after reading requests: one sent after an iteration was queued gets it
                self._publish_queued()
                for key in list(self._waiting):
                    self._answer(key)
                if self._stop.is_set() and not self._queue:
                    break
        except Exception as exc:  # a bug or a dead context: stop serving, keep recording
            self._fail(f"{type(exc).__name__}: {exc}")
            self._log.exception("karabo bridge thread crashed")
        finally:
            self._close_sockets()

    def _subscriptions(self, pub: zmq.Socket[Any]) -> None:
        while True:
            try:
                msg = pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":
                self._topics.add(msg[1:])
                self.counters["subscribe"] += 1
            elif msg[:1] == b"\x00":
                self._topics.discard(msg[1:])
                self.counters["unsubscribe"] += 1

    def _requests(self, rep: zmq.Socket[Any]) -> None:
        while True:
            try:
                msg = rep.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # REQ envelope: routing id(s), an empty delimiter, the request
            if len(msg) < 3 or msg[-2] != b"":
                self.counters["bad_requests"] += 1
                continue
            route = msg[:-1]
            if msg[-1] != REQUEST:
                self.counters["bad_requests"] += 1
                self._send(rep, route, [b"Error: bad request " + msg[-1][:64]])
                continue
            self.counters["requests"] += 1
            self._waiting[tuple(route)] = route  # answered by the loop

    def _answer(self, key: tuple[bytes, ...]) -> None:
        latest = self._latest
        if latest is None or self._rep is None or self._served.get(key, 0) >= latest.seq:
            return  # waits for the next iteration
        frames = self._frames(latest)
        if frames is None:
            return
        route = self._waiting.pop(key)
        if self._send(self._rep, route, frames):
            self.counters["replies"] += 1
        self._served[key] = latest.seq
        self._served.move_to_end(key)
        while len(self._served) > MAX_CLIENTS:
            self._served.popitem(last=False)

    def _publish_queued(self) -> None:
        while self._queue:
            with self._queue_lock:
                if not self._queue:  # pragma: no cover - only this thread pops
                    return
                item = self._queue.popleft()
            self._seq += 1
            served = self._latest = _Served(self._seq, item)
            self.counters["served"] += 1
            if self._pub is not None and self._topics:
                frames = self._frames(served)
                if frames is not None and self._send(self._pub, [], frames):
                    self.counters["published"] += 1

    def _frames(self, served: _Served) -> list[Any] | None:
        """The serialized container of an iteration (built once, on first use)."""
        if served.frames is None and not served.failed:
            item = served.item
            try:
                data, meta = build_train(
                    item.info,
                    item.samples,
                    stacked=self.stacked,
                    run_name=self.run_name,
                    snapshot_name=self.snapshot_name,
                )
                if self.options.protocol_version == "2.2":
                    data = wire_safe(data)
                try:
                    served.frames = serialize(
                        data, meta, protocol_version=self.options.protocol_version
                    )
                except UnicodeEncodeError:  # text that was not UTF-8 (rare): U+FFFD
                    served.frames = serialize(
                        wire_text(data), wire_text(meta),
                        protocol_version=self.options.protocol_version,
                    )
                self.counters["built"] += 1
            except Exception as exc:  # an unexpected value: skip this iteration, keep serving
                served.failed = True
                self.counters["build_errors"] += 1
                self._log.warning(
                    "cannot serialize iteration", iter_index=item.info.iter_index, error=str(exc)
                )
        return served.frames

    def _send(self, sock: zmq.Socket[Any], route: list[bytes], frames: list[Any]) -> bool:
        try:
            sock.send_multipart([*route, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.counters["send_dropped"] += 1
            return False
        except zmq.ZMQError as exc:
            self.counters["send_errors"] += 1
            self._log.warning("karabo bridge send failed", error=str(exc))
            return False
        return True


__all__ = ["KaraboBridgeSink", "wire_safe", "wire_text"]
