"""Load run definitions from YAML with every problem reported at once as ``file:line: field: msg``.

File layout (YAML 1.2, read with ruamel.yaml so ``on``/``yes`` stay strings and duplicate keys
are errors). A file holds either **one run** (a mapping with ``name:``, ``snapshot:``, ...)::

    name: bpm-10hz
    snapshot: {snapshot_name: bpm_10hz, pv_uri_list: [pva://SIM:AI:DOUBLE:1]}
    output: {directory: /data/k2eg-recorder}

or **several runs** under ``runs:`` (the only top-level key then; ``runs: []`` is an empty
file)::

    runs:
      - name: bpm-10hz
        ...
      - name: wf-triggered
        ...

A path is a file or a directory; a directory contributes its ``*.yaml``/``*.yml`` files (not
hidden ones, not sub-directories) in sorted name order. Run names are unique across all files;
so are k2eg topics, i.e. snapshot names after :func:`normalize_snapshot_name` (``My-Snap`` and
``my_snap`` would be one snapshot on the gateway).

:func:`load_runs` raises :class:`RunDefinitionError` (a :class:`~recorder.errors.ConfigError`)
carrying every :class:`Problem`; :func:`check_runs` returns the valid runs and the problems.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import json
import os
import re
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import CollectionEndEvent, CollectionStartEvent
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.reader import ReaderError

from recorder.admin.protocol import topic_collision_key
from recorder.client.properties import SNAPSHOT_NAME_RE, normalize_snapshot_name
from recorder.config.models import RUN_NAME_RE, RunDefinition, SnapshotSpec, directory_problem
from recorder.errors import ConfigError
from recorder.sinks.bridge.options import endpoints_clash
from recorder.sinks.filters import missing_plugin
from recorder.sinks.options import OutputOptions, render_file_name

__all__ = [
    "YAML_SUFFIXES",
    "LoadedRuns",
    "Problem",
    "RunDefinitionError",
    "RunSource",
    "check_runs",
    "definition_files",
    "load_runs",
    "parse_runs",
]

YAML_SUFFIXES = (".yaml", ".yml")
Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    """One error: where (file, 1-based line, dotted field path) and what."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class RunDefinitionError(ConfigError):
    """Run definitions are invalid; ``problems`` lists every error found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        count = len(self.problems)
        lines = "\n".join(str(p) for p in self.problems)
        super().__init__(f"{count} error{'s' if count != 1 else ''} in run definitions:\n{lines}")


@dataclass(frozen=True, slots=True)
class RunSource:
    """Where a run was defined (for messages; not part of the definition)."""

    file: str
    line: int
    field: str  # "" for a one-run file, "runs.N" in a list

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class _Parsed:
    """One run as written: its definition when it is valid (None when it has errors of its
    own), and its name and snapshot name when those are valid, so that a run with other
    errors is still checked for collisions with the rest (every error in one pass)."""

    definition: RunDefinition | None
    name: str | None
    snapshot_name: str | None
    source: RunSource
    node: CommentedMap


@dataclass(frozen=True)
class LoadedRuns:
    """Valid run definitions in load order, with where each was defined."""

    runs: Mapping[str, RunDefinition] = field(default_factory=dict)
    sources: Mapping[str, RunSource] = field(default_factory=dict)
    files: tuple[Path, ...] = ()

    def __iter__(self) -> Iterator[RunDefinition]:
        return iter(self.runs.values())

    def __len__(self) -> int:
        return len(self.runs)


# --- public entry points -------------------------------------------------------------------
def load_runs(path: str | Path) -> LoadedRuns:
    """All run definitions under ``path``; raises :class:`RunDefinitionError` on any problem."""
    loaded, problems = check_runs(path)
    if problems:
        raise RunDefinitionError(problems)
    return loaded


def check_runs(
    path: str | Path, *, reserved_topics: Mapping[str, str] | None = None
) -> tuple[LoadedRuns, tuple[Problem, ...]]:
    """Load what is valid and collect every problem (never raises for bad input).
    ``reserved_topics``: topics no snapshot may be published on, each with what it is (the
    daemon's own topics: :func:`recorder.config.daemon.own_topics`)."""
    path = Path(path)
    problems: list[Problem] = []
    files = definition_files(path, problems)
    texts: list[tuple[str, str]] = []
    for file in files:
        try:
            raw = file.read_bytes()
        except OSError as exc:
            problems.append(Problem(str(file), None, "", f"cannot read file: {exc}"))
            continue
        try:
            texts.append((str(file), raw.decode("utf-8")))
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            problems.append(Problem(
                str(file), line, "",
                f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at column {column} "
                "(run definitions are UTF-8; re-save the file as UTF-8)",
            ))
    loaded, more = parse_runs(texts, reserved_topics=reserved_topics)
    problems.extend(more)
    order = {str(file): i for i, file in enumerate(files)}  # unreadable files in their place
    problems.sort(key=lambda p: (order.get(p.file, -1), p.line or 0))
    return dataclasses.replace(loaded, files=tuple(files)), tuple(problems)


def definition_files(path: Path, problems: list[Problem] | None = None) -> list[Path]:
    """``path`` itself, or the ``*.yaml``/``*.yml`` files directly in it, sorted by name."""
    sink: list[Problem] = [] if problems is None else problems
    try:
        return _definition_files(path, sink)
    except OSError as exc:  # e.g. a directory the daemon's user may not list
        sink.append(Problem(str(path), None, "", f"cannot read: {exc}"))
        return []


def _definition_files(path: Path, sink: list[Problem]) -> list[Path]:
    if path.is_dir():
        found: list[Path] = []
        for p in sorted(path.iterdir(), key=lambda p: p.name):
            if p.suffix.lower() not in YAML_SUFFIXES or p.name.startswith("."):
                continue
            if p.is_file():
                found.append(p)
            elif p.is_symlink() and not p.exists():
                # its runs would be missing without a word (and stopped by a reload)
                sink.append(Problem(str(p), None, "", f"broken symbolic link (to "
                                    f"'{os.readlink(p)}'): its run definitions cannot be read; "
                                    "fix or remove the link"))
        return found
    if path.is_file():
        return [path]
    sink.append(Problem(str(path), None, "", "no such file or directory"))
    return []


def parse_runs(
    texts: Iterable[tuple[str, str]], *, reserved_topics: Mapping[str, str] | None = None
) -> tuple[LoadedRuns, tuple[Problem, ...]]:
    """Validate ``(file name, YAML text)`` pairs together (cross-file checks included);
    ``reserved_topics`` as for :func:`check_runs`."""
    texts = list(texts)
    problems: list[Problem] = []
    parsed: list[_Parsed] = []
    for filename, text in texts:
        parsed.extend(_parse_file(filename, text, problems))
    runs = _cross_checks(parsed, problems, reserved_topics or {})
    order = {name: i for i, (name, _) in enumerate(texts)}
    problems.sort(key=lambda p: (order.get(p.file, -1), p.line or 0))
    return (
        LoadedRuns(runs={d.name: d for d, _, _ in runs}, sources={d.name: s for d, s, _ in runs}),
        tuple(problems),
    )


# --- one file --------------------------------------------------------------------------------
MAX_DEPTH = 32
"""Deepest nesting of mappings and lists a file may have (a run needs 6: runs, its item,
metadata, attributes, ...); ruamel and the checks here recurse per level."""
MAX_NODES = 2_000_000
"""Most values a file may hold once its aliases are expanded (an alias of an alias of ...
grows exponentially): far more than any real file (10 runs of 10,000 PVs are 100,000)."""


@dataclass(frozen=True, slots=True)
class _Unreadable:
    """Stands in for a value ruamel resolved to a type but could not build (a date that
    does not exist, ``!!int abc``, an integer of more digits than Python converts): reported
    where :func:`_plain` finds it, so the rest of the file is still checked."""

    message: str


class _Constructor(RoundTripConstructor):
    """ruamel's round-trip constructor, whose values that cannot be built become
    :class:`_Unreadable` (ruamel lets the ValueError of e.g. ``2026-02-30`` escape unmarked)."""

    def construct_non_recursive_object(self, node: Any, tag: str | None = None) -> Any:
        try:
            return super().construct_non_recursive_object(node, tag)
        except YAMLError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
            kind = str(tag or node.tag).rpartition(":")[2]
            shown = repr(node.value) if isinstance(node, ScalarNode) else "this value"
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            why = str(exc)[:200] or type(exc).__name__
            return _Unreadable(f"{shown} cannot be read as {kind}: {why}; quote it if it is "
                               "meant as text")


def _yaml() -> YAML:
    yaml = YAML(typ="rt", pure=True)
    yaml.Constructor = _Constructor
    yaml.allow_duplicate_keys = True  # duplicates are found on the node tree, all of them
    return yaml


def _too_deep(text: str) -> int | None:
    """0-based line of the first mapping or list nested deeper than :data:`MAX_DEPTH`, or
    None (read from the parser's events, which do not recurse: where composing a text
    exhausted the stack)."""
    depth = 0
    for event in _yaml().parse(text):
        if isinstance(event, CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                return int(event.start_mark.line)
        elif isinstance(event, CollectionEndEvent):
            depth -= 1
    return None


def _shape_problem(root: Node) -> tuple[int, str] | None:
    """(0-based line, message) when ``root`` with its aliases expanded contains itself, is
    nested deeper than :data:`MAX_DEPTH` or holds more than :data:`MAX_NODES` values."""
    count = 0
    stack: list[tuple[Node, int, frozenset[int]]] = [(root, 1, frozenset())]
    while stack:
        node, depth, above = stack.pop()
        count += 1
        line = int(node.start_mark.line)
        if count > MAX_NODES:
            return line, (f"more than {MAX_NODES} values once its aliases (*name) are "
                          "expanded: write the runs out")
        if not isinstance(node, MappingNode | SequenceNode):
            continue
        if id(node) in above:
            return line, ("an alias (*name) refers to a mapping or list that contains it: "
                          "the value would be infinite")
        if depth > MAX_DEPTH:
            return line, f"nested more than {MAX_DEPTH} levels deep (aliases expanded)"
        inside = above | {id(node)}
        children = ([n for pair in node.value for n in pair] if isinstance(node, MappingNode)
                    else list(node.value))
        stack.extend((child, depth + 1, inside) for child in reversed(children))
    return None


_YAML_DIRECTIVE = re.compile(r"^%YAML[ \t]+(\S+)", re.MULTILINE)


def _parse_file(filename: str, text: str, problems: list[Problem]) -> list[_Parsed]:
    directive = _YAML_DIRECTIVE.search(text)
    if directive is not None and directive.group(1) != "1.2":
        # ruamel would follow it: under YAML 1.1, `yes`/`no`/`on`/`off` become booleans
        problems.append(Problem(
            filename, text.count("\n", 0, directive.start()) + 1, "",
            f"'%YAML {directive.group(1)}': run definitions are read as YAML 1.2 (yes/no/on/"
            "off are strings, not booleans); remove the directive",
        ))
        return []
    yaml = _yaml()
    deep: int | None = None
    try:
        documents = list(yaml.compose_all(text))
    except RecursionError:  # nested so deep that composing exhausted the stack: where?
        deep = _too_deep(text) or 0
        documents = []
    except MarkedYAMLError as exc:
        problems.append(_syntax_problem(filename, exc))
        return []
    except ReaderError as exc:  # a character YAML does not allow (a NUL, an escape, ...)
        problems.append(_character_problem(filename, text, exc))
        return []
    except YAMLError as exc:  # pragma: no cover - ruamel marks every parse error it raises
        problems.append(Problem(filename, None, "", f"YAML error: {exc}"))
        return []
    if deep is not None:
        problems.append(Problem(filename, deep + 1, "", f"nested more than {MAX_DEPTH} levels "
                                "deep: a run definition is a few levels of mappings and lists"))
        return []
    documents = [d for d in documents if d is not None]
    if len(documents) > 1:
        problems.append(
            Problem(
                filename,
                documents[1].start_mark.line + 1,
                "",
                "a file holds one YAML document; put several runs under `runs:` instead of '---'",
            )
        )
        return []
    if not documents:
        problems.append(
            Problem(filename, 1, "", "empty file: write one run, or `runs: []` for none")
        )
        return []
    shape = _shape_problem(documents[0])
    if shape is not None:
        problems.append(Problem(filename, shape[0] + 1, "", shape[1]))
        return []
    before = len(problems)
    _duplicate_keys(filename, documents[0], (), problems)
    if any(p.message.startswith("mapping keys must be plain") for p in problems[before:]):
        return []  # ruamel cannot even build such a document (unhashable keys)
    # a run with a duplicate key is not valid (YAML kept one of the values, silently)
    duplicated = [p.field for p in problems[before:] if p.message.startswith("duplicate key")]
    try:
        data = yaml.load(text)
    except MarkedYAMLError as exc:  # e.g. an undefined alias is only found while constructing
        problems.append(_syntax_problem(filename, exc))
        return []
    if not isinstance(data, CommentedMap):
        problems.append(
            Problem(
                filename,
                1,
                "",
                _unreadable_or(data, "expected a run (a mapping with name:, snapshot:, ...) "
                               "or `runs:` with a list of runs"),
            )
        )
        return []
    if "runs" not in data:
        run = _parse_run(filename, data, (), problems)
        return [] if run is None else [_invalid_if(run, bool(duplicated))]
    out: list[_Parsed] = []
    for key in data:
        if isinstance(key, _Unreadable):
            problems.append(Problem(filename, _key_line(data, key, 1), "",
                                    f"key {key.message}"))
        elif key != "runs":
            problems.append(
                Problem(
                    filename,
                    _line(data, (key,)),
                    str(key),
                    "unknown key: a file with `runs:` holds nothing else",
                )
            )
    items = data["runs"]
    if not isinstance(items, CommentedSeq):
        problems.append(
            Problem(filename, _line(data, ("runs",)), "runs",
                    _unreadable_or(items, "expected a list of runs"))
        )
        return []
    for index, item in enumerate(items):
        loc: Loc = ("runs", index)
        if not isinstance(item, CommentedMap):
            problems.append(
                Problem(filename, _line(data, loc), _dotted(loc),
                        _unreadable_or(item, "expected a run (a mapping)"))
            )
            continue
        run = _parse_run(filename, item, loc, problems, root=data)
        if run is not None:
            inside = f"{_dotted(loc)}."
            out.append(_invalid_if(run, any(f.startswith(inside) for f in duplicated)))
    return out


def _unreadable_or(value: Any, message: str) -> str:
    """``message`` about ``value``, unless ruamel could not build it: then why not."""
    return value.message if isinstance(value, _Unreadable) else message


def _invalid_if(run: _Parsed, invalid: bool) -> _Parsed:
    """``run``, not valid (no definition) when a problem found outside its model (a
    duplicate key) makes it ``invalid``."""
    return dataclasses.replace(run, definition=None) if invalid else run


def _parse_run(
    filename: str,
    node: CommentedMap,
    prefix: Loc,
    problems: list[Problem],
    *,
    root: CommentedMap | None = None,
) -> _Parsed | None:
    root = node if root is None else root
    before = len(problems)
    unusable: list[Loc] = []  # values _plain could not take: reported, not validated again
    plain = _plain(node, filename, root, prefix, problems, unusable=unusable)
    line = _line(root, prefix) if prefix else _line(root, ("name",))
    source = RunSource(filename, line, _dotted(prefix))
    found: dict[Problem, None] = {}  # each once, in order (`in` on a list: quadratic time)
    # checked on the raw data too, so it is reported even when other output fields are wrong
    output = plain.get("output")
    directory = output.get("directory") if isinstance(output, dict) else None
    if isinstance(directory, str):
        message = directory_problem(directory)
        if message is not None:
            full = (*prefix, "output", "directory")
            found[Problem(filename, _line(root, full), _dotted(full), message)] = None
    try:
        definition = RunDefinition.model_validate_json(json.dumps(plain), strict=True)
    except ValidationError as exc:
        errors = list(exc.errors(include_url=False))
        errors += _second_pass(plain, [tuple(e["loc"]) for e in errors])
        for error in _each_problem(errors):
            loc = tuple(error["loc"])
            ctx = error.get("ctx") or {}
            loc = loc + tuple(ctx.get("subloc", ()))
            full = prefix + loc
            if any(full[: len(bad)] == bad for bad in unusable):
                continue  # already reported by _plain (the value is a stand-in)
            problem = Problem(filename, _line(root, full), _dotted(full), _message(error, loc))
            found.setdefault(problem)
    if found or len(problems) > before:
        problems.extend(found)
        name, snapshot = plain.get("name"), plain.get("snapshot")
        snapshot_name = snapshot.get("snapshot_name") if isinstance(snapshot, dict) else None
        return _Parsed(
            None,
            name if isinstance(name, str) and RUN_NAME_RE.match(name) else None,
            snapshot_name
            if isinstance(snapshot_name, str) and SNAPSHOT_NAME_RE.match(snapshot_name)
            else None,
            source,
            node,
        )
    return _Parsed(definition, definition.name, definition.snapshot.snapshot_name, source, node)


# The fields each block's cross-field checks (model validators) read: a second pass that
# dropped one of them (or an unknown key that may be a misspelling of one) would judge the
# block by a default the author did not write, so it is not made.
_CROSS_FIELDS: dict[str, tuple[type[BaseModel], frozenset[str]]] = {
    "snapshot": (SnapshotSpec, frozenset({"type", "triggered", "sub_push_delay_msec",
                                          "pv_field_filter_list", "time_window"})),
    "output": (OutputOptions, frozenset({"compression", "compression_level"})),
}


def _second_pass(plain: dict[str, Any], error_locs: list[Loc]) -> list[Any]:
    """Every problem at once: a block with a wrong field skips its model validators (the
    checks that relate two of its fields). Validate the block again without the wrong
    fields and return the errors only those checks find (``recorder_invalid``)."""
    extra: list[Any] = []
    for block, (model, cross) in _CROSS_FIELDS.items():
        raw = plain.get(block)
        locs = [loc[1:] for loc in error_locs if loc[:1] == (block,) and len(loc) > 1]
        if not isinstance(raw, dict) or not locs:
            continue
        tops = {str(loc[0]) for loc in locs}
        if tops & cross or any(
            key not in model.model_fields and difflib.get_close_matches(key, cross, cutoff=0.6)
            for key in tops
        ):
            continue
        copy = json.loads(json.dumps(raw))
        for loc in sorted(locs, key=_loc_key, reverse=True):  # list items: highest first
            _delete(copy, loc)
        try:
            model.model_validate_json(json.dumps(copy), strict=True)
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                if error["type"] == "recorder_invalid" and not error["loc"]:  # the block's own
                    extra.append({**error, "loc": (block,)})
    return extra


def _each_problem(errors: list[Any]) -> list[Any]:
    """``errors`` with the further problems of a model validator's one error
    (:func:`recorder.validation.invalid_all`) as errors of their own; without a list's "too
    short" that counts only its valid items when an item's own error is reported."""
    locs = [tuple(e["loc"]) for e in errors]
    out: list[Any] = []
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] == "too_short" and any(
                len(other) > len(loc) and other[: len(loc)] == loc for other in locs):
            continue
        out.append(error)
        ctx = error.get("ctx") or {}
        out.extend({**error, "ctx": {"message": message, "subloc": subloc}}
                   for message, subloc in ctx.get("more", ()))
    return out


def _loc_key(loc: Loc) -> list[tuple[int, int, str]]:
    return [(0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in loc]


def _delete(obj: Any, loc: Loc) -> None:
    """Remove the value at ``loc`` from nested dicts/lists (nothing if it is not there)."""
    for part in loc[:-1]:
        found = (part in obj) if isinstance(obj, dict) else (
            isinstance(obj, list) and isinstance(part, int) and 0 <= part < len(obj))
        if not found:
            return
        obj = obj[part]
    last = loc[-1]
    if isinstance(obj, dict):
        obj.pop(last, None)
    elif isinstance(obj, list) and isinstance(last, int) and 0 <= last < len(obj):
        obj.pop(last)


# --- cross-run checks ----------------------------------------------------------------------
def _cross_checks(
    parsed: list[_Parsed], problems: list[Problem], reserved_topics: Mapping[str, str]
) -> list[tuple[RunDefinition, RunSource, CommentedMap]]:
    """Names, k2eg topics and file names that collide between runs, and k2eg topics that are
    ``reserved_topics``. A run with errors of its own takes part with its name and snapshot
    name (when those are valid), so a collision is reported in the same pass as its other
    errors; only valid runs are kept."""
    kept: list[tuple[RunDefinition, RunSource, CommentedMap]] = []
    by_name: dict[str, RunSource] = {}
    by_topic: dict[str, _Parsed] = {}
    by_file: dict[Path, tuple[RunDefinition, RunSource]] = {}
    bound: list[tuple[str, RunDefinition, RunSource]] = []  # live bridge endpoints
    sample_start = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    # a snapshot topic (never a '.') collides in Kafka with a reserved "k2eg.recorder.status"
    # as it would with "k2eg_recorder_status"
    reserved = {topic_collision_key(t): (t, what) for t, what in reserved_topics.items()}
    for run in parsed:
        definition, source, node = run.definition, run.source, run.node
        ok = True
        if run.name is not None and run.name in by_name:
            problems.append(
                Problem(
                    source.file,
                    _line(node, ("name",)),
                    _field(source, "name"),
                    f"run name {run.name!r} is already defined at {by_name[run.name]}",
                )
            )
            ok = False
        topic = None if run.snapshot_name is None else normalize_snapshot_name(run.snapshot_name)
        if topic is not None and topic in by_topic:
            other = by_topic[topic]
            whose = f"run {other.name!r}" if other.name is not None else "the run"
            problems.append(
                Problem(
                    source.file,
                    _line(node, ("snapshot", "snapshot_name")),
                    _field(source, "snapshot.snapshot_name"),
                    f"snapshot_name {run.snapshot_name!r} is the same k2eg "
                    f"snapshot (topic {topic!r}) as {other.snapshot_name!r} of {whose} at "
                    f"{other.source}: k2eg normalizes names "
                    "([^A-Za-z0-9-] -> '_', lower case)",
                )
            )
            ok = False
        if topic is not None and topic in reserved:
            taken, what = reserved[topic]
            which = "which is" if taken == topic else \
                f"which Kafka takes for the same topic ('.' and '_' collide) as {taken!r},"
            problems.append(
                Problem(
                    source.file,
                    _line(node, ("snapshot", "snapshot_name")),
                    _field(source, "snapshot.snapshot_name"),
                    f"snapshot_name {run.snapshot_name!r} is published on topic {topic!r} "
                    f"(k2eg normalizes names: [^A-Za-z0-9-] -> '_', lower case), {which} "
                    f"{what} of this daemon: rename the snapshot",
                )
            )
            definition = None  # not kept; its names still count for the others
        if not ok:  # a repeated run name also repeats {run} in file names: say it once
            continue
        if definition is None:  # errors of its own: its names still count for the others
            if run.name is not None:
                by_name[run.name] = source
            if topic is not None:
                by_topic[topic] = run
            continue
        try:
            sample = render_file_name(
                definition.output,
                run=definition.name,
                snapshot=definition.snapshot.snapshot_name,
                start=sample_start,
                seq=0,
            )
        except (OSError, RuntimeError, ValueError) as exc:  # e.g. a symlink loop in the path
            problems.append(
                Problem(
                    source.file,
                    _line(node, ("output", "directory")),
                    _field(source, "output.directory"),
                    f"output directory {str(definition.output.directory)!r} cannot be "
                    f"resolved on this host: {exc}",
                )
            )
            continue
        for name in ("compression", "live_compression"):
            why = missing_plugin(getattr(definition.output, name))
            if why is not None:
                problems.append(Problem(
                    source.file,
                    _line(node, ("output", name)),
                    _field(source, f"output.{name}"),
                    why,
                ))
                ok = False
        if sample in by_file:
            other_definition, other_source = by_file[sample]
            problems.append(
                Problem(
                    source.file,
                    _line(node, ("output", "file_template"))
                    if "file_template" in node.get("output", {})
                    else _line(node, ("output",)),
                    _field(source, "output.file_template"),
                    f"files would have the same names as those of run {other_definition.name!r}"
                    f" at {other_source} (e.g. {sample.name}); put {{run}} in file_template or "
                    "use another directory",
                )
            )
            ok = False
        bridge = definition.output.bridge
        endpoints = [] if bridge is None else [
            (key, e) for key in ("rep", "pub") if (e := getattr(bridge, key)) is not None]
        for key, endpoint in endpoints:
            holder = next((b for b in bound if endpoints_clash(b[0], endpoint)), None)
            if holder is None:
                continue
            problems.append(
                Problem(
                    source.file,
                    _line(node, ("output", "bridge", key)),
                    _field(source, f"output.bridge.{key}"),
                    f"bridge {key} {endpoint} is bound by run {holder[1].name!r} at "
                    f"{holder[2]} ({holder[0]}): the second to bind it fails (address in "
                    "use) and serves nothing; use another port, or 0 for any free one",
                )
            )
            ok = False
        if ok:
            bound.extend((endpoint, definition, source) for _key, endpoint in endpoints)
            by_name[definition.name] = source
            by_topic[topic or definition.snapshot.topic] = run
            by_file[sample] = (definition, source)
            kept.append((definition, source, node))
    return kept


def _field(source: RunSource, name: str) -> str:
    return f"{source.field}.{name}" if source.field else name


# --- YAML helpers --------------------------------------------------------------------------
def _syntax_problem(filename: str, exc: MarkedYAMLError) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else None
    parts = [p for p in (exc.context, exc.problem) if p]
    message = "YAML syntax error: " + "; ".join(parts)
    if "'\\t'" in (exc.problem or ""):  # what to do about it, and where on the line
        where = f" (the tab at column {mark.column + 1})" if mark is not None else ""
        message += f"{where}: YAML takes spaces, not tabs, for indentation and after ':'"
    return Problem(filename, line, "", message)


def _character_problem(filename: str, text: str, exc: ReaderError) -> Problem:
    """Where the character ruamel's reader refuses is, as a line and column of ``text``
    (ruamel gives its index in the text, unmarked)."""
    position = int(exc.position)
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    code = int(exc.character)
    kind = "control character" if code < 0x20 or 0x7F <= code < 0xA0 else "character"
    return Problem(filename, line, "", f"{kind} U+{code:04X} at column {column} is not "
                   "allowed in YAML; remove it (or write it as an escape in a double-quoted "
                   "string)")


def _duplicate_keys(filename: str, node: Node, loc: Loc, problems: list[Problem]) -> None:
    if isinstance(node, MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode):
                key = str(key_node.value)
                line = key_node.start_mark.line + 1
                if key in first and key != "<<":
                    problems.append(
                        Problem(
                            filename,
                            line,
                            _dotted((*loc, key)),
                            f"duplicate key {key!r} (first defined at line {first[key]})",
                        )
                    )
                else:
                    first.setdefault(key, line)
                _duplicate_keys(filename, value_node, (*loc, key), problems)
            else:
                problems.append(
                    Problem(
                        filename,
                        key_node.start_mark.line + 1,
                        _dotted(loc),
                        "mapping keys must be plain names, not lists or mappings",
                    )
                )
                _duplicate_keys(filename, value_node, loc, problems)
    elif isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            _duplicate_keys(filename, item, (*loc, index), problems)


def _plain(
    value: Any,
    filename: str,
    root: CommentedMap,
    loc: Loc,
    problems: list[Problem],
    *,
    unusable: list[Loc] | None = None,
) -> Any:
    """ruamel's round-trip objects -> JSON-compatible Python values (errors for the rest:
    their ``loc`` goes to ``unusable``, and None stands in for the value)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(key, _Unreadable):
                problems.append(Problem(filename, _key_line(value, key, _line(root, loc)),
                                        _dotted(loc), f"key {key.message}"))
                continue
            if not isinstance(key, str):
                problems.append(
                    Problem(
                        filename,
                        _key_line(value, key, _line(root, loc)),
                        _dotted(loc),
                        f"keys must be strings, got {key!r}; quote it",
                    )
                )
                continue
            if (why := _not_text(key)) is not None:
                problems.append(
                    Problem(filename, _key_line(value, key, _line(root, loc)), _dotted(loc),
                            f"key {why}")
                )
                continue
            out[str(key)] = _plain(item, filename, root, (*loc, key), problems,
                                   unusable=unusable)
        return out
    if isinstance(value, list):
        return [
            _plain(v, filename, root, (*loc, i), problems, unusable=unusable)
            for i, v in enumerate(value)
        ]
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        why = _not_text(value)
        if why is None:
            return str(value)
        message = why
    elif isinstance(value, dt.date):  # YAML timestamps: keep what was written
        return value.isoformat()
    elif isinstance(value, _Unreadable):
        message = value.message
    else:
        message = f"unsupported YAML value {value!r} ({type(value).__name__}); use a plain value"
    problems.append(Problem(filename, _line(root, loc), _dotted(loc), message))
    if unusable is not None:
        unusable.append(loc)
    return None


def _not_text(text: str) -> str | None:
    """Why ``text`` is not Unicode text (a lone surrogate from a ``\\uD800`` escape), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"{text!r} holds \\u{ord(text[exc.start]):04x}, half of a UTF-16 surrogate pair, "
            "not a character: write the character itself (or its \\UXXXXXXXX escape)"
        )
    return None


def _key_line(mapping: Any, key: Any, default: int) -> int:
    """1-based line of ``key`` in a ruamel mapping (``default`` when it has none)."""
    try:
        return int(mapping.lc.key(key)[0]) + 1
    except (AttributeError, KeyError, TypeError, IndexError):
        return default


def _line(root: Any, loc: Loc) -> int:
    """1-based line of the deepest node of ``loc`` that exists in the YAML tree."""
    node = root
    line = (root.lc.line + 1) if hasattr(root, "lc") and root.lc.line is not None else 1
    for part in loc:
        try:
            if isinstance(node, CommentedMap) and part in node:
                position = node.lc.key(part) if part in node.lc.data else None
                node = node[part]
            elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
                position = node.lc.item(part)
                node = node[part]
            else:
                break
        except (KeyError, IndexError, TypeError):  # e.g. keys merged in with '<<: *anchor'
            break
        if position is None:  # merged from an anchor: no line of its own here
            break
        line = position[0] + 1
    return line


def _dotted(loc: Loc) -> str:
    return ".".join(str(p) for p in loc)


# --- pydantic error messages ---------------------------------------------------------------
def _message(error: Any, loc: Loc) -> str:
    kind = error["type"]
    if kind == "recorder_invalid":
        return str(error["ctx"]["message"])
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        key = str(loc[-1]) if loc else ""
        text = f"unknown key {key!r}"
        close = difflib.get_close_matches(key, allowed, n=1)
        if close:
            text += f" (did you mean {close[0]!r}?)"
        if allowed:
            text += f"; allowed: {', '.join(allowed)}"
        return text
    if kind == "missing":
        return "required field is missing"
    message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    value = error.get("input")
    shows_input = (
        kind.endswith("_type")
        or kind in ("enum", "literal_error", "too_short", "too_long")
        or kind.startswith(("greater_than", "less_than"))
    )
    if shows_input and (value is None or isinstance(value, bool | int | float | str)):
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        message += f" (got {shown})"
    return message


def _allowed_keys(loc: Loc) -> list[str]:
    """Field names of the model at ``loc`` inside a RunDefinition (for 'did you mean')."""
    model: type[BaseModel] = RunDefinition
    for part in loc:
        info = model.model_fields.get(str(part))
        if info is None:
            return []
        annotation = info.annotation
        candidates = [annotation, *typing.get_args(annotation)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return sorted(model.model_fields)
