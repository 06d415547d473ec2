"""Fault injection for the gateway simulator (pure code).

Faults exercise a client's tolerance of what a real gateway under load does (producer drops on a
full queue, several publishing threads, back-pressure). Each fault is a :class:`FaultRule`
that fires on every N-th candidate message (``every``) or with a probability
(``probability``, from a seeded RNG so runs are repeatable).

Text form (the CLI's ``--faults``), comma-separated ``name=rule`` items::

    drop-header=every:5,drop-tail=p:0.1,duplicate-data=every:7,reorder-data=every:3,
    delay-data=every:4,delay-ms=300,stall=every:5000/800,seed=42

=================  ======================================================================
``drop-header``    a header is not published (its ``msg_seq`` is still consumed)
``drop-tail``      a tail is not published
``drop-data``      a data message is not published
``duplicate-data`` a data message is published twice
``reorder-data``   a data message is held back and published after the next message of
                   its topic (so it may follow its iteration's tail)
``delay-data``     a data message is published ``delay-ms`` later (default 200 ms)
``delay-stop-ms``  ``<ms>``: a stop command is acted on this much later (a busy gateway),
                   so the snapshot's iterations go on meanwhile
``delay-final-ms`` ``<ms>``: a stop's final iteration is published this much *after* the
                   stop's ack, with the Kafka timestamps of when it was built (before the
                   ack): the gateway queues it before acking, but it can be read later
``stall``          ``every:<period_ms>/<duration_ms>``: snapshot publishing pauses for
                   ``duration_ms`` at the end of every ``period_ms``; the messages held meanwhile
                   are then published in order
``seed``           RNG seed for probabilistic rules (default 0)
=================  ======================================================================

A rule is ``every:N`` or ``p:X`` (a bare integer means ``every``, a bare decimal ``p``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from typing import Any

from recorder.errors import ConfigError


@dataclass(frozen=True, slots=True)
class FaultRule:
    """Fires on every ``every``-th candidate, or with probability ``probability``."""

    every: int = 0
    probability: float = 0.0

    @property
    def active(self) -> bool:
        return self.every > 0 or self.probability > 0

    @classmethod
    def parse(cls, text: str) -> FaultRule:
        text = text.strip()
        by_count = text.startswith("every:") or not (text.startswith("p:") or "." in text)
        try:
            if by_count:
                rule = cls(every=int(text.removeprefix("every:")))
            else:
                rule = cls(probability=float(text.removeprefix("p:")))
        except ValueError as exc:
            raise ConfigError(f"fault rule {text!r}: expected every:N or p:X") from exc
        if (by_count and rule.every < 1) or not 0.0 <= rule.probability <= 1.0:
            raise ConfigError(f"fault rule {text!r}: N must be >= 1 and 0 <= X <= 1")
        return rule


_RULES = ("drop_header", "drop_tail", "drop_data", "duplicate_data", "reorder_data", "delay_data")


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Which faults the simulator injects (all off by default)."""

    drop_header: FaultRule = field(default_factory=FaultRule)
    drop_tail: FaultRule = field(default_factory=FaultRule)
    drop_data: FaultRule = field(default_factory=FaultRule)
    duplicate_data: FaultRule = field(default_factory=FaultRule)
    reorder_data: FaultRule = field(default_factory=FaultRule)
    delay_data: FaultRule = field(default_factory=FaultRule)
    delay_ms: int = 200
    delay_stop_ms: int = 0
    delay_final_ms: int = 0
    stall_every_ms: int = 0
    stall_ms: int = 0
    seed: int = 0

    @property
    def any_active(self) -> bool:
        rules = (getattr(self, name) for name in _RULES)
        return any(rule.active for rule in rules) or max(
            self.stall_ms, self.delay_stop_ms, self.delay_final_ms) > 0

    @classmethod
    def parse(cls, spec: str) -> FaultConfig:
        """Parse the ``--faults`` text form (see the module docstring)."""
        values: dict[str, Any] = {}
        known = {f.name for f in fields(cls)} - {"stall_every_ms", "stall_ms"}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, text = item.partition("=")
            key = name.strip().replace("-", "_")
            if key == "stall" and sep:
                period, slash, duration = text.strip().removeprefix("every:").partition("/")
                try:
                    values["stall_every_ms"], values["stall_ms"] = int(period), int(duration)
                except ValueError as exc:
                    raise ConfigError(f"fault {item!r}: expected stall=every:<ms>/<ms>") from exc
                if not slash or not 0 < values["stall_ms"] < values["stall_every_ms"]:
                    raise ConfigError(f"fault {item!r}: the stall must be shorter than its period")
                continue
            if not sep or key not in known:
                raise ConfigError(
                    f"unknown fault {item!r}; known: stall, "
                    + ", ".join(sorted(k.replace("_", "-") for k in known))
                )
            if key in _RULES:
                values[key] = FaultRule.parse(text)
            else:
                try:
                    values[key] = int(text)
                except ValueError as exc:
                    raise ConfigError(f"fault {item!r}: expected an integer") from exc
        return cls(**values)


class FaultInjector:
    """Decides, message by message, whether a fault fires (deterministic for a given seed)."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._counters: dict[str, int] = {}
        self.fired: dict[str, int] = {}

    def fires(self, name: str) -> bool:
        rule: FaultRule = getattr(self.config, name)
        if not rule.active:
            return False
        count = self._counters.get(name, 0) + 1
        self._counters[name] = count
        hit = (rule.every > 0 and count % rule.every == 0) or (
            rule.probability > 0 and self._rng.random() < rule.probability
        )
        if hit:
            self.fired[name] = self.fired.get(name, 0) + 1
        return hit

    def stalled(self, elapsed_s: float) -> bool:
        """True while publishing is paused ``elapsed_s`` after the simulator started."""
        every, duration = self.config.stall_every_ms, self.config.stall_ms
        if every <= 0 or duration <= 0:
            return False
        phase_ms = (elapsed_s * 1000.0) % every
        return phase_ms >= every - duration

    def stall_end(self, elapsed_s: float) -> float:
        """Elapsed seconds at which the current stall ends."""
        every = self.config.stall_every_ms
        return (int(elapsed_s * 1000.0 // every) + 1) * every / 1000.0
