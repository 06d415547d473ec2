"""The k2eg gateway's behaviour as a pure state machine (sans-I/O).

:class:`SimEngine` takes raw command bytes and the current time, and returns the actions the
gateway would perform (:class:`CreateTopic`, :class:`Produce`, :class:`Flush`), in order. The
Kafka adapter (:mod:`recorder.sim.gateway`) only executes them. Time is passed in: ``now`` is
monotonic seconds; wall-clock times are ``now + wall_offset``.

Behaviour follows gateway main (research notes ``k2eg-protocol.md`` §2-§4) plus the sequenced
stream the official client 0.3.2 needs (``k2eg-protocol-sequenced.md``):

* commands: JSON objects; ``get``, ``snapshot``, ``repeating_snapshot``,
  ``repeating_snapshot_trigger``, ``repeating_snapshot_stop``. Malformed JSON or a non-object is
  dropped silently; a missing/mistyped required field or an unknown command gets
  ``{error:-1, reply_id}`` (key ``comand-parse-error-reply``) when ``reply_id`` and
  ``reply_topic`` are non-empty, else nothing. ``info`` is parsed and never answered, like the
  gateway. ``put``/``monitor``/``multi-monitor`` are not simulated (logged, no reply).
* acks, error codes and messages as the gateway; the snapshot topic (1 partition) is created
  before the ``started`` ack; "already running" (normalized-name collision) is ``error 0`` with
  no ``publishing_topic``.
* snapshot stream: key = the snapshot name as given, header ``k2eg-ser-type: Msgpack``,
  ``iter_index`` from 1 (reset by stop), ``timestamp`` = wall-clock ms per submission;
  ``normal`` (latest value of every PV that ever had one, one submission per period) and
  ``timedbuffered`` (every sample; sub-push cadence per §3.5 incl. the implicit 1 s ticks; the
  header goes with the first tick of a window; forced values for silent PVs in a later batch);
  triggered mode (one iteration per trigger, triggers coalesce until the next tick); stop
  publishes a final iteration, then its ack.
* ``Protocol.SEQUENCED`` adds ``msg_seq`` (1..N per iteration), ``submission_seq`` (1.. per
  iteration), ``last_submission_data`` and ``total_messages``; ``Protocol.LEGACY`` does not.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from recorder.sim.encoding import SER_HEADER, serialize
from recorder.sim.faults import FaultConfig, FaultInjector
from recorder.sim.messages import data_message, header_message, tail_message
from recorder.sim.pvs import PVSpec, parse_pv, pv_structure

log = structlog.get_logger("recorder.sim")

# the gateway's PV URI grammar (EpicsServiceManager.cpp)
PV_URI_RE = re.compile(
    r"^(pva?|ca)://([a-zA-Z0-9\-_]+(?::[a-zA-Z0-9\-_]+)*)(\.([a-zA-Z0-9\-_]+(?:\.[a-zA-Z0-9_]+)*))?$"
)
_NON_TOPIC = re.compile(r"[^A-Za-z0-9\-]")

KEY_PARSE_ERROR = "comand-parse-error-reply"  # sic, as the gateway
KEY_REPEATING = "repeating-snapshot-events"
KEY_ONE_SHOT = "snapshot-dist-key"
FAST_EXPIRE_S = 1.0  # gateway FAST_EXPIRE_TIME_MSEC
INT32 = (-(2**31), 2**31 - 1)


class Protocol(enum.StrEnum):
    """Which generation of the snapshot stream to publish."""

    SEQUENCED = "sequenced"  # msg_seq / submission_seq / total_messages (k2eg 0.3.2)
    LEGACY = "legacy"  # gateway main@8c8f28b: no sequence keys


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Simulator settings."""

    protocol: Protocol = Protocol.SEQUENCED
    default_period_ms: int = 100  # PV update period unless the name says P<ms>
    get_timeout_s: float = 10.0  # `get` of a PV that never connects -> -3 after this
    faults: FaultConfig = field(default_factory=FaultConfig)


# --- actions ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CreateTopic:
    name: str
    partitions: int = 1


@dataclass(frozen=True, slots=True)
class Produce:
    topic: str
    key: str
    value: bytes
    headers: tuple[tuple[str, str], ...]
    timestamp_ms: int | None = None  # the Kafka timestamp; None: the producer's clock


@dataclass(frozen=True, slots=True)
class Flush:
    """Make everything produced so far visible before what follows (stop: stream, then ack)."""


Action = CreateTopic | Produce | Flush


def normalize_snapshot_name(name: str) -> str:
    """The gateway's GET_QUEUE_FROM_SNAPSHOT_NAME: ``[^A-Za-z0-9-]`` -> ``_``, lower-case."""
    return _NON_TOPIC.sub("_", name).lower()


def pv_base(uri: str) -> str | None:
    """Base PV name of a URI (the data key), or None if the gateway cannot parse it."""
    match = PV_URI_RE.match(uri)
    return match.group(2) if match else None


# --- snapshots ------------------------------------------------------------------------------
@dataclass(slots=True)
class Sample:
    """One monitor event: update ``k`` of PV ``pv`` that arrived at ``arrival`` (monotonic).

    Its pvData structure is built only when the sample is published
    (:meth:`SimEngine.structure`): a normal snapshot keeps the last update of each PV in its
    window, so the updates it overwrites are never built (a loaded machine would otherwise
    build every update of every array PV, fall behind and build ever more per tick)."""

    pv: str
    k: int
    arrival: float
    forced: bool = False


@dataclass(slots=True)
class Iteration:
    index: int
    msg_seq: int = 0
    submission: int = 0


@dataclass(slots=True)
class ReplyTo:
    topic: str
    reply_id: str
    serialization: str


@dataclass(slots=True)
class RepeatingSnapshot:
    name: str
    topic: str
    pvs: list[str]
    serialization: str
    timedbuffered: bool
    triggered: bool
    window_s: float
    fast_expire_s: float
    field_filter: tuple[str, ...]
    begin: float
    last_tick: float
    cursors: dict[str, int]
    subscribed_at: float
    header_sent: bool = False
    buffer: list[Sample] = field(default_factory=list)
    slots: dict[str, Sample] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    iteration: Iteration | None = None
    trigger_requested: bool = False
    stop_acks: list[tuple[ReplyTo, str]] = field(default_factory=list)

    @property
    def stopping(self) -> bool:
        return bool(self.stop_acks)

    @property
    def fast_ticks(self) -> bool:
        return not self.triggered and self.fast_expire_s < self.window_s

    def deadline(self, now: float) -> float:
        if self.stopping or self.trigger_requested:
            return now
        if self.triggered:
            return math.inf
        full = self.begin + self.window_s + 0.001  # fires when now - begin > W
        if self.timedbuffered and self.fast_ticks:
            return min(full, self.last_tick + self.fast_expire_s)
        return full


def fast_expire_s(window_ms: int, sub_push_ms: int) -> float:
    """The gateway's sub-push cadence (BackTimedBufferedSnapshotOpInfo, table in §3.5)."""
    if 0 < sub_push_ms < window_ms:
        return sub_push_ms / 1000.0
    if sub_push_ms <= 0 and window_ms > FAST_EXPIRE_S * 1000:
        return FAST_EXPIRE_S
    return window_ms / 1000.0


class _ParseError(Exception):
    pass


@dataclass(slots=True)
class _PendingGet:
    deadline: float
    reply: ReplyTo
    key: str


@dataclass(slots=True)
class _PendingOneShot:
    deadline: float
    reply: ReplyTo


def _field(obj: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    """An optional field: a wrong JSON type is logged and replaced by the default."""
    if key not in obj:
        return default
    value = obj[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if ok and kind is int and not INT32[0] <= value <= INT32[1]:
        ok = False
    if not ok:
        log.warning("sim.command.bad_field", field=key, value=repr(value)[:80])
        return default
    return value


def _required_str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _ParseError(f"{key} missing or not a string")
    return value


def _required_pv_list(obj: Mapping[str, Any]) -> list[str]:
    value = obj.get("pv_name_list")
    if not isinstance(value, list):
        raise _ParseError("pv_name_list missing or not an array")
    names = [v for v in value if isinstance(v, str)]
    if not names:
        raise _ParseError("pv_name_list holds no string")
    return names


class SimEngine:
    """The gateway simulator's logic: commands and time in, Kafka actions out."""

    def __init__(
        self, config: SimConfig | None = None, *, now: float, wall_offset: float = 0.0
    ) -> None:
        self.config = config or SimConfig()
        self.start = now
        self.wall_offset = wall_offset
        self.faults = FaultInjector(self.config.faults)
        self._out: list[Action] = []
        self._specs: dict[str, PVSpec] = {}
        self._structures: dict[str, tuple[int, dict[str, Any]]] = {}
        self.snapshots: dict[str, RepeatingSnapshot] = {}  # by topic (normalized name)
        self._iter_counters: dict[str, int] = {}  # by raw snapshot name
        self._gets: list[_PendingGet] = []
        self._one_shots: list[_PendingOneShot] = []
        self._stall_held: list[Action] = []
        self._delayed: list[tuple[float, Produce]] = []
        self._late_stops: list[tuple[float, str, ReplyTo, str]] = []  # fault delay-stop-ms
        self._reorder_held: dict[str, tuple[float, Produce]] = {}
        self.stats: dict[str, int] = {"commands": 0, "messages": 0, "iterations": 0}

    # --- time and PVs ------------------------------------------------------------------------
    def wall_ms(self, now: float) -> int:
        """The wall clock in whole ms, truncated as the gateway's clock read is (rounding
        could stamp a batch later than a Kafka record produced after it in the same ms)."""
        return math.floor((now + self.wall_offset) * 1000.0)

    def spec(self, name: str) -> PVSpec:
        spec = self._specs.get(name)
        if spec is None:
            spec = self._specs[name] = parse_pv(name, self.config.default_period_ms)
        return spec

    def pv_index(self, name: str, now: float) -> int:
        """Update counter of PV ``name`` at ``now`` (-1: not connected)."""
        return self.spec(name).update_index(now - self.start)

    def structure(self, name: str, k: int) -> dict[str, Any]:
        """The pvData structure of update ``k`` of PV ``name`` (cached per PV)."""
        cached = self._structures.get(name)
        if cached is not None and cached[0] == k:
            return cached[1]
        spec = self.spec(name)
        wall_ns = round((self.start + spec.update_time(k) + self.wall_offset) * 1e9)
        data = pv_structure(spec, k, wall_ns)
        self._structures[name] = (k, data)
        return data

    def _pull(self, snap: RepeatingSnapshot, now: float) -> list[Sample]:
        """Monitor events of the snapshot's PVs since the last pull, in arrival order."""
        events: list[tuple[float, int, Sample]] = []
        for order, pv in enumerate(snap.pvs):
            k_now = self.pv_index(pv, now)
            spec = self.spec(pv)
            for k in range(snap.cursors[pv] + 1, k_now + 1):
                arrival = max(self.start + spec.update_time(k), snap.subscribed_at)
                events.append((arrival, order, Sample(pv, k, arrival)))
            snap.cursors[pv] = max(snap.cursors[pv], k_now)
        events.sort(key=lambda e: (e[0], e[1]))
        return [e[2] for e in events]

    # --- public API --------------------------------------------------------------------------
    def drain(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def next_deadline(self, now: float) -> float:
        deadlines = [s.deadline(now) for s in self.snapshots.values()]
        deadlines += [g.deadline for g in self._gets]
        deadlines += [o.deadline for o in self._one_shots]
        deadlines += [t for t, _ in self._delayed]
        deadlines += [t for t, *_ in self._late_stops]
        deadlines += [t + 1.0 for t, _ in self._reorder_held.values()]
        if self._stall_held:
            deadlines.append(self.start + self.faults.stall_end(now - self.start))
        return min(deadlines, default=math.inf)

    def handle_command(self, raw: bytes, now: float) -> None:
        """One message of the command topic."""
        self.stats["commands"] += 1
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            log.warning("sim.command.not_json", size=len(raw))
            return
        if not isinstance(obj, dict):
            log.warning("sim.command.not_object")
            return
        command = obj.get("command")
        rid = obj.get("reply_id")
        rtopic = obj.get("reply_topic")
        ser = obj.get("serialization")
        reply = ReplyTo(
            rtopic if isinstance(rtopic, str) else "",
            rid if isinstance(rid, str) else "",
            "json" if isinstance(ser, str) and ser.lower() == "json" else "msgpack",
        )
        handlers = {
            "get": self._cmd_get,
            "snapshot": self._cmd_snapshot,
            "repeating_snapshot": self._cmd_repeating,
            "repeating_snapshot_trigger": self._cmd_trigger,
            "repeating_snapshot_stop": self._cmd_stop,
        }
        try:
            if command in ("put", "monitor", "multi-monitor", "info"):
                log.warning("sim.command.not_simulated", command=command)
                return
            handler = handlers.get(command) if isinstance(command, str) else None
            if handler is None:
                raise _ParseError(f"unknown command {command!r}")
            handler(obj, reply, now)
        except _ParseError as exc:
            log.warning("sim.command.parse_failed", command=command, reason=str(exc))
            if reply.topic and reply.reply_id:
                self._reply(reply, KEY_PARSE_ERROR, -1)

    def tick(self, now: float) -> None:
        """Advance every snapshot, timeout and held message to ``now``."""
        for late in [s for s in self._late_stops if s[0] <= now]:
            self._late_stops.remove(late)
            _due, topic, reply, name = late
            snap = self.snapshots.get(topic)
            if snap is None:
                self._reply(reply, KEY_REPEATING, 0, f"Snapshot '{name}' is already stopped")
            else:
                snap.stop_acks.append((reply, name))
        for snap in list(self.snapshots.values()):
            self._tick_snapshot(snap, now)
        for get in [g for g in self._gets if g.deadline <= now]:
            self._gets.remove(get)
            self._reply(get.reply, get.key, -3, "Timeout operation")
        for shot in [o for o in self._one_shots if o.deadline <= now]:
            self._one_shots.remove(shot)
            self._reply(shot.reply, KEY_ONE_SHOT, 1, with_message=False)
        self._release_held(now)

    # --- commands ----------------------------------------------------------------------------
    def _cmd_get(self, obj: Mapping[str, Any], reply: ReplyTo, now: float) -> None:
        pv_name = _required_str(obj, "pv_name")
        _required_str(obj, "reply_topic")
        base = pv_base(pv_name)
        if base is None:
            self._reply(reply, pv_name, -1, "PV name malformed")
            return
        k = self.pv_index(base, now)
        if k < 0:
            self._gets.append(_PendingGet(now + self.config.get_timeout_s, reply, pv_name))
            return
        self._reply(reply, pv_name, 0, extra={base: self.structure(base, k)})

    def _cmd_snapshot(self, obj: Mapping[str, Any], reply: ReplyTo, now: float) -> None:
        uris = _required_pv_list(obj)
        _required_str(obj, "reply_topic")
        _required_str(obj, "reply_id")
        window = _field(obj, "time_window_msec", int, 1000)
        seen: set[str] = set()
        for uri in dict.fromkeys(uris):
            base = pv_base(uri)
            if base is None:
                self._reply(reply, KEY_ONE_SHOT, -1, f"PV '{uri}'name malformed")
                break
            if base in seen:
                continue
            seen.add(base)
            k = self.pv_index(base, now)
            if k >= 0:
                self._reply(reply, KEY_ONE_SHOT, 0, extra={base: self.structure(base, k)},
                            with_message=False)
        self._one_shots.append(_PendingOneShot(now + max(window, 0) / 1000.0, reply))

    def _cmd_repeating(self, obj: Mapping[str, Any], reply: ReplyTo, now: float) -> None:
        uris = _required_pv_list(obj)
        _required_str(obj, "reply_topic")
        _required_str(obj, "reply_id")
        name = _field(obj, "snapshot_name", str, "")
        window = _field(obj, "time_window_msec", int, 1000)
        repeat_delay = _field(obj, "repeat_delay_msec", int, 0)
        sub_push = _field(obj, "sub_push_delay_msec", int, 0)
        triggered = _field(obj, "triggered", bool, False)
        snap_type = _field(obj, "type", str, "normal").lower()
        field_filter = _field(obj, "pv_field_filter_list", list, [])
        key = KEY_REPEATING
        if snap_type not in ("normal", "timedbuffered"):
            self._reply(reply, key, -1, "The snapshot type Unknown is not supported")
            return
        topic = normalize_snapshot_name(name)
        if topic in self.snapshots:
            self._reply(reply, key, 0, f"Snapshot {name} is already running")
            return
        if repeat_delay < 0:
            self._reply(reply, key, -3, f"The repeat delay is not valid {name}")
            return
        if window < 0:
            self._reply(reply, key, -4, f"The time window is not valid {name}")
            return
        if not name:
            self._reply(reply, key, -5, f"The snapshot name is not valid {name}")
            return
        bases: list[str] = []
        for uri in uris:
            base = pv_base(uri)
            if base is None:
                self._reply(reply, key, -6, f"The pv uri {uri} is not parsable")
                return
            if base not in bases:
                bases.append(base)
        timed = snap_type == "timedbuffered"
        snap = RepeatingSnapshot(
            name=name,
            topic=topic,
            pvs=bases,
            serialization=reply.serialization,
            timedbuffered=timed,
            triggered=triggered,
            window_s=window / 1000.0,
            fast_expire_s=fast_expire_s(window, sub_push) if timed else window / 1000.0,
            field_filter=tuple(f for f in field_filter if isinstance(f, str)) if timed else (),
            begin=now,
            last_tick=now,
            # the monitor's first event is the PV's current value
            cursors={pv: max(self.pv_index(pv, now) - 1, -1) for pv in bases},
            subscribed_at=now,
        )
        self.snapshots[topic] = snap
        self._out.append(CreateTopic(topic, 1))
        self._reply(reply, key, 0, f"The snapshot '{name}' has been started",
                    extra={"publishing_topic": topic})
        log.info("sim.snapshot.started", snapshot=name, topic=topic, type=snap_type,
                 triggered=triggered, window_ms=window, sub_push_ms=sub_push, pvs=len(bases))

    def _cmd_trigger(self, obj: Mapping[str, Any], reply: ReplyTo, now: float) -> None:
        _required_str(obj, "reply_topic")
        _required_str(obj, "reply_id")
        name = _field(obj, "snapshot_name", str, "")
        if not name:
            self._reply(reply, KEY_REPEATING, -1, "The snapshot name is empty")
            return
        snap = self.snapshots.get(normalize_snapshot_name(name))
        if snap is None:
            self._reply(reply, KEY_REPEATING, -2, f"Snapshot '{name}' has not been found")
            return
        if snap.triggered:  # a periodic snapshot ignores the flag
            snap.trigger_requested = True
        self._reply(reply, KEY_REPEATING, 0, f"Snapshot '{name}' has been armed")

    def _cmd_stop(self, obj: Mapping[str, Any], reply: ReplyTo, now: float) -> None:
        _required_str(obj, "reply_topic")
        _required_str(obj, "reply_id")
        name = _field(obj, "snapshot_name", str, "")
        if not name:
            self._reply(reply, KEY_REPEATING, -1, "The snapshot name is empty")
            return
        snap = self.snapshots.get(normalize_snapshot_name(name))
        if snap is None:
            self._reply(reply, KEY_REPEATING, 0, f"Snapshot '{name}' is already stopped")
            return
        delay_ms = self.faults.config.delay_stop_ms
        if delay_ms > 0:
            self._late_stops.append((now + delay_ms / 1000.0, snap.topic, reply, name))
            return
        # the ack goes out after the final iteration (next tick)
        snap.stop_acks.append((reply, name))

    # --- snapshot scheduling -----------------------------------------------------------------
    def _add_events(self, snap: RepeatingSnapshot, events: Iterable[Sample]) -> None:
        for sample in events:
            snap.seen.add(sample.pv)
            if snap.timedbuffered:
                snap.buffer.append(sample)
                # prune what is older than W relative to the newest push
                oldest = sample.arrival - snap.window_s
                if snap.buffer[0].arrival < oldest:
                    snap.buffer = [s for s in snap.buffer if s.arrival >= oldest]
            else:
                snap.slots[sample.pv] = sample

    def _force_silent(self, snap: RepeatingSnapshot, now: float) -> None:
        """Forced gets for PVs silent in the window: their value lands in a later batch."""
        forced = []
        for pv in snap.pvs:
            if pv in snap.seen:
                continue
            k = self.pv_index(pv, now)
            if k >= 0:
                forced.append(Sample(pv, k, now, forced=True))
        self._add_events(snap, forced)

    def _slot_values(self, snap: RepeatingSnapshot) -> list[Sample]:
        return [snap.slots[pv] for pv in snap.pvs if pv in snap.slots]

    def continue_iterations(self, snapshot_name: str, last_index: int) -> None:
        """The snapshot's next iteration is ``last_index + 1``: its topic was filled
        beforehand as if this gateway had published iterations up to ``last_index`` (a
        benchmark's pre-filled topic), so its next (or final) iteration follows them."""
        self._iter_counters[snapshot_name] = last_index

    def _tick_snapshot(self, snap: RepeatingSnapshot, now: float) -> None:
        self._add_events(snap, self._pull(snap, now))
        if snap.stopping:
            self._final_iteration(snap, now)
            return
        if snap.triggered:
            if snap.trigger_requested:
                snap.trigger_requested = False
                if snap.timedbuffered:
                    data, snap.buffer = snap.buffer, []
                    self._submit(snap, now, header=True, data=data, tail=True)
                    self._force_silent(snap, now)
                else:
                    self._submit(snap, now, header=True, data=self._slot_values(snap), tail=True)
            return
        expired = now - snap.begin > snap.window_s
        if not snap.timedbuffered:
            if expired:
                snap.begin = now
                self._submit(snap, now, header=True, data=self._slot_values(snap), tail=True)
            return
        fast = not expired and snap.fast_ticks and now - snap.last_tick >= snap.fast_expire_s
        if not (expired or fast):
            return
        data, snap.buffer = snap.buffer, []
        header = not snap.header_sent
        self._submit(snap, now, header=header, data=data, tail=expired)
        snap.last_tick = now
        if expired:
            snap.begin = now
            snap.header_sent = False
            self._force_silent(snap, now)  # silent during the window that just ended
            snap.seen = {s.pv for s in snap.buffer}
        else:
            snap.header_sent = True
            self._force_silent(snap, now)  # silent so far in this window

    def _final_iteration(self, snap: RepeatingSnapshot, now: float) -> None:
        if snap.timedbuffered:
            data, snap.buffer = snap.buffer, []
            header = not snap.header_sent or snap.triggered
        else:
            data, header = self._slot_values(snap), True
        queued = len(self._out)
        self._submit(snap, now, header=header, data=data, tail=True)
        delay_ms = self.faults.config.delay_final_ms
        if delay_ms > 0:  # built and timestamped now, read after the ack
            final = [a for a in self._out[queued:] if isinstance(a, Produce)]
            self._out[queued:] = [a for a in self._out[queued:] if not isinstance(a, Produce)]
            due, wall_ms = now + delay_ms / 1000.0, self.wall_ms(now)
            self._delayed += [(due, replace(a, timestamp_ms=wall_ms)) for a in final]
        del self.snapshots[snap.topic]
        self._iter_counters.pop(snap.name, None)
        for held_topic in [t for t in self._reorder_held if t == snap.topic]:
            self._emit_stream(self._reorder_held.pop(held_topic)[1], now)
        for ack, name in snap.stop_acks:
            self._emit_stream(Flush(), now)
            self._emit_stream(
                self._reply_record(ack, KEY_REPEATING, 0, f"Snapshot '{name}' has been stopped"),
                now,
            )
        log.info("sim.snapshot.stopped", snapshot=snap.name)

    # --- message building --------------------------------------------------------------------
    def _submit(
        self,
        snap: RepeatingSnapshot,
        now: float,
        *,
        header: bool,
        data: list[Sample],
        tail: bool,
    ) -> None:
        """One submission (batch) of an iteration: optional header, data, optional tail."""
        if not (header or data or tail):
            return
        sequenced = self.config.protocol is Protocol.SEQUENCED
        ts = self.wall_ms(now)
        if header or snap.iteration is None:
            index = self._iter_counters.get(snap.name, 0) + 1
            self._iter_counters[snap.name] = index
            snap.iteration = Iteration(index)
            header = True
        it = snap.iteration
        it.submission += 1
        bound = log.bind(snapshot=snap.name, iteration=it.index)
        if header:
            it.msg_seq += 1
            self._publish(snap, header_message(snap.name, ts, it.index,
                                               msg_seq=it.msg_seq if sequenced else None,
                                               submission_seq=it.submission), "header", now)
        for i, sample in enumerate(data):
            it.msg_seq += 1
            value = self.structure(sample.pv, sample.k)
            if snap.field_filter:
                value = {k: v for k, v in value.items() if k in snap.field_filter}
            msg = data_message(sample.pv, value, ts, it.index,
                               msg_seq=it.msg_seq if sequenced else None,
                               submission_seq=it.submission,
                               last_of_submission=i == len(data) - 1)
            self._publish(snap, msg, "data", now)
        if tail:
            it.msg_seq += 1
            msg = tail_message(snap.name, ts, it.index, json_form=snap.serialization == "json",
                               msg_seq=it.msg_seq if sequenced else None,
                               submission_seq=it.submission)
            self._publish(snap, msg, "tail", now)
            snap.iteration = None
            self.stats["iterations"] += 1
            bound.debug("sim.iteration.closed", messages=it.msg_seq, submissions=it.submission)
        else:
            bound.debug("sim.iteration.batch", data=len(data), header=header)

    def _publish(self, snap: RepeatingSnapshot, msg: dict[str, Any], kind: str, now: float) -> None:
        value, ser_type = serialize(msg, snap.serialization)
        record = Produce(snap.topic, snap.name, value, ((SER_HEADER, ser_type),))
        faults = self.faults
        if faults.config.any_active:
            if faults.fires(f"drop_{kind}"):
                log.info("sim.fault.drop", snapshot=snap.name, kind=kind,
                         iteration=msg["iter_index"])
                return
            if kind == "data":
                copies = 2 if faults.fires("duplicate_data") else 1
                for _ in range(copies):
                    if faults.fires("delay_data"):
                        self._delayed.append((now + faults.config.delay_ms / 1000.0, record))
                    elif snap.topic not in self._reorder_held and faults.fires("reorder_data"):
                        self._reorder_held[snap.topic] = (now, record)
                    else:
                        self._emit_stream(record, now)
                return
        self._emit_stream(record, now)

    def _emit_stream(self, action: Action, now: float) -> None:
        """Snapshot-stream output: held while a stall fault is active, else released."""
        if self._stall_held or self.faults.stalled(now - self.start):
            self._stall_held.append(action)
        else:
            self._out.append(action)
            if isinstance(action, Produce):
                self.stats["messages"] += 1
        if isinstance(action, Produce) and action.topic in self._reorder_held:
            held = self._reorder_held[action.topic][1]
            if held is not action:
                del self._reorder_held[action.topic]
                self._emit_stream(held, now)

    def _release_held(self, now: float) -> None:
        if self._stall_held and not self.faults.stalled(now - self.start):
            held, self._stall_held = self._stall_held, []
            for action in held:
                self._emit_stream(action, now)
        for item in [d for d in self._delayed if d[0] <= now]:
            self._delayed.remove(item)
            self._emit_stream(item[1], now)
        for topic, (since, record) in list(self._reorder_held.items()):
            if now - since >= 1.0:  # nothing followed it: let it out anyway
                del self._reorder_held[topic]
                self._emit_stream(record, now)

    def _reply_record(
        self,
        reply: ReplyTo,
        key: str,
        error: int,
        message: str = "",
        *,
        extra: Mapping[str, Any] | None = None,
        with_message: bool = True,
    ) -> Produce:
        body: dict[str, Any] = {"error": error, "reply_id": reply.reply_id}
        if message and with_message:
            body["message"] = message
        if extra:
            body.update(extra)
        value, ser_type = serialize(body, reply.serialization)
        return Produce(reply.topic, key, value, ((SER_HEADER, ser_type),))

    def _reply(
        self,
        reply: ReplyTo,
        key: str,
        error: int,
        message: str = "",
        *,
        extra: Mapping[str, Any] | None = None,
        with_message: bool = True,
    ) -> None:
        if not reply.topic:
            return
        record = self._reply_record(
            reply, key, error, message, extra=extra, with_message=with_message
        )
        self._out.append(record)
