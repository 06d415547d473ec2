"""What a reload changes: old run definitions vs new ones, by run name (pure code).

The daemon applies a :class:`RunDiff` in this order, so a snapshot name moving from one run to
another (or a run renamed) never has two runs on one k2eg snapshot at once:

1. stop every ``removed`` run and every ``changed`` run whose ``restart_required`` is true and
   that is recording (each closes its files cleanly: final flush, file finalized);
2. swap in the new definitions (``unchanged`` runs keep recording untouched, in the same file);
3. start the ``changed`` runs stopped in step 1 again (a new recording, new file) and every
   ``added`` run whose ``autostart`` is true; other added runs wait for an admin ``start``.

A change to ``autostart`` alone needs no restart: it only matters when the daemon starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from recorder.config.models import RunDefinition

__all__ = ["NO_RESTART_FIELDS", "RunChange", "RunDiff", "changed_fields", "diff_runs"]

NO_RESTART_FIELDS = frozenset({"autostart"})
"""Fields that can change under a recording run without restarting it."""


@dataclass(frozen=True, slots=True)
class RunChange:
    """A run present before and after the reload, with different definitions."""

    old: RunDefinition
    new: RunDefinition
    fields: tuple[str, ...]  # dotted paths that differ, e.g. "snapshot.time_window"

    @property
    def name(self) -> str:
        return self.new.name

    @property
    def restart_required(self) -> bool:
        """True when a recording run must be stopped and started into a new recording."""
        return any(f.split(".", 1)[0] not in NO_RESTART_FIELDS for f in self.fields)


@dataclass(frozen=True, slots=True)
class RunDiff:
    """Runs added, removed, changed and unchanged by a reload (each in definition order)."""

    added: tuple[RunDefinition, ...] = ()
    removed: tuple[RunDefinition, ...] = ()
    changed: tuple[RunChange, ...] = ()
    unchanged: tuple[RunDefinition, ...] = ()

    @property
    def empty(self) -> bool:
        """Nothing to do: every run is unchanged."""
        return not (self.added or self.removed or self.changed)

    def summary(self) -> str:
        """One line for logs, STATUS= and the reload reply."""
        parts: list[str] = []
        if self.added:
            parts.append(f"{len(self.added)} added ({', '.join(d.name for d in self.added)})")
        if self.removed:
            parts.append(f"{len(self.removed)} removed ({', '.join(d.name for d in self.removed)})")
        if self.changed:
            described = ", ".join(f"{c.name}: {' '.join(c.fields)}" for c in self.changed)
            parts.append(f"{len(self.changed)} changed ({described})")
        parts.append(f"{len(self.unchanged)} unchanged")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the admin reply of a reload)."""
        return {
            "added": [d.name for d in self.added],
            "removed": [d.name for d in self.removed],
            "changed": {
                c.name: {"fields": list(c.fields), "restart": c.restart_required}
                for c in self.changed
            },
            "unchanged": [d.name for d in self.unchanged],
        }


def diff_runs(
    old: Mapping[str, RunDefinition] | Iterable[RunDefinition],
    new: Mapping[str, RunDefinition] | Iterable[RunDefinition],
) -> RunDiff:
    """Compare two sets of definitions by run name. Where a run was defined (file, line) is
    not part of a definition: moving a run to another file changes nothing."""
    before = _by_name(old)
    after = _by_name(new)
    added = tuple(d for name, d in after.items() if name not in before)
    removed = tuple(d for name, d in before.items() if name not in after)
    changed: list[RunChange] = []
    unchanged: list[RunDefinition] = []
    for name, definition in after.items():
        previous = before.get(name)
        if previous is None:
            continue
        fields = changed_fields(previous, definition)
        if fields:
            changed.append(RunChange(previous, definition, fields))
        else:
            unchanged.append(definition)
    return RunDiff(added, removed, tuple(changed), tuple(unchanged))


def changed_fields(old: BaseModel, new: BaseModel) -> tuple[str, ...]:
    """Dotted paths of the leaf fields that differ between two models of one type."""
    out: list[str] = []
    _compare(old.model_dump(mode="json"), new.model_dump(mode="json"), "", out)
    return tuple(out)


def _compare(old: Any, new: Any, path: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):  # nested models and dict fields
        for key in [*old, *(k for k in new if k not in old)]:
            _compare(old.get(key), new.get(key), f"{path}.{key}" if path else str(key), out)
    elif json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
        # typed: `1` -> `true` or `1.0` in metadata is written differently (1 == True == 1.0)
        out.append(path)


def _by_name(
    runs: Mapping[str, RunDefinition] | Iterable[RunDefinition],
) -> dict[str, RunDefinition]:
    if isinstance(runs, Mapping):
        return dict(runs)
    out: dict[str, RunDefinition] = {}
    for definition in runs:
        if definition.name in out:
            raise ValueError(f"run name {definition.name!r} appears twice")
        out[definition.name] = definition
    return out
