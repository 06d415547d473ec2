"""The ``output:`` block of a run definition: where and how a run's HDF5 files are written.

Pure code (pydantic only, no h5py). :class:`OutputOptions` is embedded by the run-definition
model; :func:`render_file_name` turns its ``file_template`` into a file name that always stays
inside ``directory`` whatever the run name contains.

Example (YAML)::

    output:
      directory: /data/k2eg
      file_template: "{run}_{start:%Y%m%dT%H%M%SZ}_{seq:04d}.h5"
      segment: {max_iterations: 100000, max_bytes: 2000000000, max_seconds: 3600}
      compression: gzip
      compression_level: 4
      flush_interval_s: 1.0
"""

from __future__ import annotations

import calendar
import datetime as dt
import enum
import hashlib
import itertools
import re
import string
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from recorder.sinks.bridge.options import BridgeOptions
from recorder.validation import invalid

DEFAULT_FILE_TEMPLATE = "{run}_{start:%Y%m%dT%H%M%SZ}_{seq:04d}.h5"
TEMPLATE_PLACEHOLDERS = frozenset({"run", "snapshot", "start", "seq", "segment"})
PARTIAL_SUFFIX = ".partial"
"""Suffix of a file that is being written; removed (by rename) when the file is finalized."""

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+\-=@,]")
MAX_FILE_NAME_BYTES = 200  # leaves room for ".partial" and a collision counter under 255


class Compression(enum.StrEnum):
    """Dataset compression. ``gzip`` and ``none`` are readable by every HDF5 reader; ``lzf``
    is built into h5py but not into the HDF5 library, so h5dump and C/Fortran/MATLAB readers
    need h5py's LZF plugin; ``zstd`` and ``blosc2`` need ``hdf5plugin`` (or
    HDF5_PLUGIN_PATH) in the reader. Datasets that need more than the HDF5 library say so
    in a ``required_filter`` attribute."""

    GZIP = "gzip"
    LZF = "lzf"
    NONE = "none"
    ZSTD = "zstd"
    BLOSC2 = "blosc2"


class SegmentOptions(BaseModel):
    """When to close the current file and continue the recording in a new numbered segment.

    Any limit reached starts a new segment at the next iteration boundary; none set means
    one file per recording.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_iterations: int | None = Field(
        default=None, gt=0, description="Start a new segment after this many iterations."
    )
    max_bytes: int | None = Field(
        default=None,
        ge=1024 * 1024,
        description="Start a new segment once the file reaches this size (bytes, >= 1 MiB).",
    )
    max_seconds: float | None = Field(
        default=None, gt=0, description="Start a new segment after this many seconds."
    )

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.max_iterations, self.max_bytes, self.max_seconds))


class OutputOptions(BaseModel):
    """Where and how a run writes its HDF5 files (the run definition's ``output:`` block)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    directory: Path = Field(
        description="Output directory. Every file of the run is created inside it (created "
        "if missing); names rendered from the template can never escape it."
    )
    file_template: str = Field(
        default=DEFAULT_FILE_TEMPLATE,
        description="File name template (str.format syntax). Placeholders: {run} run name, "
        "{snapshot} snapshot name, {start} UTC start of the recording (datetime, format spec "
        "allowed, e.g. {start:%Y%m%dT%H%M%SZ}), {seq} recording number (int), {segment} "
        "segment number within the recording (int, starts at 0). Must end in .h5 / .hdf5 / "
        ".nxs. When segmenting and the template has no {segment}, '_sNNNN' is inserted "
        "before the extension for segments after the first. Characters outside "
        "[A-Za-z0-9._+-=@,] are replaced by '_'. Existing files are never overwritten.",
    )
    segment: SegmentOptions = Field(
        default_factory=SegmentOptions,
        description="Split a recording into numbered segment files (by iterations, bytes or "
        "time). Default: one file per recording.",
    )
    compression: Compression = Field(
        default=Compression.GZIP,
        description="Dataset compression: gzip (default, readable everywhere), none, lzf "
        "(h5py reads it; h5dump and non-Python readers need h5py's LZF plugin), or zstd / "
        "blosc2 (need hdf5plugin to read). What a dataset needs is recorded on it.",
    )
    compression_level: int | None = Field(
        default=None,
        ge=0,
        le=22,
        description="Compression level (gzip 0-9, default 4; zstd 1-22, default 3; blosc2 "
        "0-9, default 5). Not allowed with lzf/none.",
    )
    shuffle: bool = Field(
        default=True, description="Byte-shuffle integer columns of 2 bytes or wider before "
        "compression (blosc2: its own shuffle); floats and strings are not shuffled."
    )
    live_compression: Compression = Field(
        default=Compression.NONE,
        description="Compression of the file while it is written (*.h5.partial, rewritten "
        "with `compression` when finalized). none (default): the live file costs only the "
        "memcpy and the disk; gzip/lzf/zstd/blosc2 (fast level) trade writer CPU for a "
        "smaller partial file (measured: gzip level 1 writes ~20x slower than none).",
    )
    flush_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="Buffered values are appended to the file and flushed to disk at least "
        "this often (seconds). This is also the worst-case data loss on a crash. When the "
        "run's input is drained (it has caught up with the gateway), new data is flushed "
        "after 0.2 s already (at most 5 flushes a second).",
    )
    fsync: bool = Field(
        default=True,
        description="Each flush waits until its data is on disk (fsync) before the Kafka "
        "offsets it covers count as written, so a power cut or a kernel crash loses no more "
        "than a killed daemon: a restart resumes after the last data on disk. false: a flush "
        "ends in the page cache (cheaper on slow network file systems); a power cut can then "
        "lose data the run state says is written, which a restart does not record again.",
    )
    max_buffer_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=64 * 1024,
        description="Flush early when the in-memory buffers of a recording exceed this size "
        "(bounds memory whatever the message rate).",
    )
    swmr: bool = Field(
        default=True,
        description="Live files are always written in SWMR mode, so analysts can open them "
        "while they are written (h5py.File(path, 'r', swmr=True)); the live layout is built "
        "for it (docs/decisions/0002). Only true is accepted.",
    )
    isolate: bool = Field(
        default=True,
        description="Write each recording in its own writer process (recorder.sinks.process), "
        "so a crash of the HDF5 library after a full disk or an I/O error fails that "
        "recording only. false: write in the daemon's process (fewer processes, but one "
        "file's I/O failure can crash every recording).",
    )
    bridge: BridgeOptions | None = Field(
        default=None,
        description="Also serve each iteration live over the Karabo bridge protocol "
        "(ZeroMQ; needs k2eg-recorder[bridge]). See docs/bridge.md.",
    )

    @field_validator("swmr")
    @classmethod
    def _check_swmr(cls, swmr: bool) -> bool:
        if not swmr:
            raise ValueError(
                "swmr: false is not supported: live files are always written in SWMR mode, "
                "which keeps them readable while written and after a crash (remove the key)"
            )
        return swmr

    @field_validator("file_template")
    @classmethod
    def _check_template(cls, template: str) -> str:
        check_template(template)
        return template

    @model_validator(mode="after")
    def _check_level(self) -> OutputOptions:
        level = self.compression_level
        if level is None:
            return self
        comp = self.compression
        if comp in (Compression.NONE, Compression.LZF):
            raise invalid(f"compression_level is not allowed with compression {comp.value!r}",
                          "compression_level")
        if comp is Compression.GZIP and level > 9:
            raise invalid("gzip compression_level must be 0..9", "compression_level")
        if comp is Compression.BLOSC2 and level > 9:
            raise invalid("blosc2 compression_level must be 0..9", "compression_level")
        if comp is Compression.ZSTD and level < 1:
            raise invalid("zstd compression_level must be 1..22", "compression_level")
        return self


def check_template(template: str) -> None:
    """Raise ValueError if ``template`` is not a usable file-name template."""
    if not template or not template.strip():
        raise ValueError("file_template must not be empty")
    if "/" in template or "\\" in template or "\x00" in template:
        raise ValueError("file_template must be a file name, not a path (no '/' or '\\')")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"file_template {template!r}: {exc}") from None
    for _literal, field_name, _spec, conversion in parsed:
        if field_name is None:
            continue
        if field_name not in TEMPLATE_PLACEHOLDERS:
            raise ValueError(
                f"file_template: unknown placeholder {{{field_name}}}; "
                f"allowed: {', '.join('{' + p + '}' for p in sorted(TEMPLATE_PLACEHOLDERS))}"
            )
        if conversion is not None:
            raise ValueError("file_template: conversions (!r, !s) are not allowed")
    if not template.lower().endswith((".h5", ".hdf5", ".nxs")):
        raise ValueError("file_template must end in .h5, .hdf5 or .nxs")
    # try it once with sample values so bad format specs fail at validation time
    try:
        render_template(
            template, run="r", snapshot="s", start=dt.datetime.now(dt.UTC), seq=0, segment=0
        )
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(f"file_template {template!r} cannot be rendered: {exc}") from None


def sanitize_component(text: str) -> str:
    """Make ``text`` safe as part of a file name: ASCII, no separators, no leading dots."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = _UNSAFE_NAME_CHARS.sub("_", text)
    return text.lstrip(".") or "_"


_EPOCH_DIRECTIVE = re.compile(r"%[%s]")


class _UTCStart(dt.datetime):
    """The start as the template formats it: ``%s`` is its Unix seconds (the C library's
    ``strftime`` reads the time as local time: off by the host's UTC offset)."""

    def __format__(self, spec: str) -> str:
        if "%s" in spec:
            seconds = str(calendar.timegm(self.utctimetuple()))
            spec = _EPOCH_DIRECTIVE.sub(lambda m: seconds if m[0] == "%s" else "%%", spec)
        return super().__format__(spec)


def render_template(
    template: str, *, run: str, snapshot: str, start: dt.datetime, seq: int, segment: int
) -> str:
    """Render the template with string values sanitized (no path is built here)."""
    if start.tzinfo is None:
        start = start.replace(tzinfo=dt.UTC)
    utc = start.astimezone(dt.UTC)
    values: dict[str, Any] = {
        "run": sanitize_component(run),
        "snapshot": sanitize_component(snapshot),
        "start": _UTCStart.combine(utc.date(), utc.timetz()),
        "seq": seq,
        "segment": segment,
    }
    return template.format(**values)


def render_file_name(
    options: OutputOptions,
    *,
    run: str,
    snapshot: str,
    start: dt.datetime,
    seq: int,
    segment: int = 0,
) -> Path:
    """The final path of a file: inside ``options.directory``, never an existing file's name
    (callers check for existence and pass a higher ``seq``/add a counter; see
    :func:`unique_path`). ``segment`` > 0 without ``{segment}`` in the template inserts
    ``_sNNNN`` before the extension."""
    name = render_template(
        options.file_template, run=run, snapshot=snapshot, start=start, seq=seq, segment=segment
    )
    if segment > 0 and "{segment" not in options.file_template:
        stem, dot, ext = name.rpartition(".")
        name = f"{stem}_s{segment:04d}{dot}{ext}"
    # the stem apart from the extension (the template ends in one): a stem left empty
    # (non-ASCII text only, dots only) becomes "_", not the bare extension as the name
    stem, dot, ext = name.rpartition(".")
    name = sanitize_component(stem) + dot + sanitize_component(ext)
    if len(name.encode()) > MAX_FILE_NAME_BYTES:
        # cut, with a digest of the whole name: the end cut off holds what tells files apart
        # ({seq}, {segment}, {start}), and one name for every segment would have the resume's
        # search for later segments (RunController) find the first one for ever
        stem, dot, ext = name.rpartition(".")
        digest = "_" + hashlib.sha256(name.encode()).hexdigest()[:12]
        name = stem[: MAX_FILE_NAME_BYTES - len(ext) - 1 - len(digest)] + digest + dot + ext
    directory = options.directory.resolve()
    path = (directory / name).resolve()
    if path.parent != directory:  # cannot happen after sanitizing; belt and braces
        raise ValueError(f"file name {name!r} escapes the output directory {directory}")
    return path


def unique_path(path: Path) -> Path:
    """``path`` if neither it nor its ``.partial`` twin exists, else ``stem-1.ext``, ..."""
    for candidate in _numbered(path):
        if not (candidate.exists() or partial_path(candidate).exists()):
            return candidate
    raise AssertionError("unreachable")  # pragma: no cover


def taken_paths(path: Path) -> Iterator[Path]:
    """The files (final or ``.partial``) :func:`unique_path` found taken for ``path``, in
    its order: ``path``, ``stem-1.ext``, ... up to the first free name (excluded)."""
    for candidate in _numbered(path):
        if not (candidate.exists() or partial_path(candidate).exists()):
            return
        yield candidate


def _numbered(path: Path) -> Iterator[Path]:
    yield path
    for counter in itertools.count(1):
        yield path.with_name(f"{path.stem}-{counter}{path.suffix}")


def partial_path(final: Path) -> Path:
    """Where a file lives while it is written: ``<final>.partial``."""
    return final.with_name(final.name + PARTIAL_SUFFIX)


def final_path(partial: Path) -> Path:
    """The final name of a ``.partial`` file."""
    if not partial.name.endswith(PARTIAL_SUFFIX):
        return partial
    return partial.with_name(partial.name[: -len(PARTIAL_SUFFIX)])


IDLE_FLUSH_S = 0.2
"""When the recording's input is drained (the run's event queue ran dry), buffered data is
flushed once it is this old instead of waiting for ``flush_interval_s``: live readers see an
iteration soon after its tail, and a drained backlog is durable at once. Bounded to 5
flushes per second however the data trickles in (a flush costs a few ms whatever its size)."""


# durations of a recording's latest flushes it keeps (``flush_seconds``): the daemon observes
# each flush in its histogram, also when several came between two of its looks
FLUSHES_KEPT = 256


def flush_due_after(flush_interval_s: float, idle: bool) -> float:
    """Seconds after the last flush that the next one is due."""
    return min(flush_interval_s, IDLE_FLUSH_S) if idle else flush_interval_s
