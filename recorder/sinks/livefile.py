"""The live (log-structured, SWMR) layout: creation, appends, and a committed-state view.

A file being written (``*.h5.partial``) holds a few append-only datasets whatever the number
of PVs (see docs/file-format.md, "Live layout"), so a flush costs the same for 10 or 10,000
PVs and SWMR never needs a new dataset. Every flush appends the data first, flushes, then
appends one row to ``/live/state`` and flushes again: a state row is a commit record, and
readers (and ``recover``) use the last one whose lengths are all present.
"""

from __future__ import annotations

import itertools
import json
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from recorder.durability import sync_fd
from recorder.errors import SinkError
from recorder.sinks.buffer import (
    ITERATION_COLUMNS,
    META_COLUMNS,
    SAMPLE_COLUMNS,
    TAG_COLUMNS,
    FlushBatch,
)
from recorder.sinks.codec import DTYPE_BY_CODE, POOL_NAMES
from recorder.sinks.filters import filter_kwargs, register_plugins
from recorder.sinks.options import OutputOptions

STATE_COLUMNS: dict[str, np.dtype[Any]] = {
    "time": np.dtype(np.int64),  # wall clock of the commit, ns since epoch
    "status": np.dtype(np.uint8),  # RECORDING_STATUS
    "n_samples": np.dtype(np.int64),
    "n_iterations": np.dtype(np.int64),
    "n_meta": np.dtype(np.int64),
    "n_pvs": np.dtype(np.int64),
    "n_kafka": np.dtype(np.int64),
    "n_bytes": np.dtype(np.int64),
    "n_tags": np.dtype(np.int64),
    **{f"n_pool_{name}": np.dtype(np.int64) for name in POOL_NAMES.values()},
}
RECORDING_STATUS = {"recording": 0, "complete": 1, "aborted": 2, "failed": 3}
KAFKA_COLUMNS: dict[str, np.dtype[Any]] = {
    "topic": np.dtype("S255"),
    "partition": np.dtype(np.int32),
    "offset": np.dtype(np.int64),
    "time": np.dtype(np.int64),
}
PV_COLUMNS: dict[str, np.dtype[Any]] = {"offset": np.dtype(np.int64), "size": np.dtype(np.int64)}
CHUNK_ROWS = 8192
POOL_CHUNK = 65536


def create_live_layout(f: h5py.File, options: OutputOptions) -> list[str]:
    """Create every live dataset (before SWMR starts); returns required plugins."""
    plugins: set[str] = set()

    def make(group: h5py.Group, name: str, dtype: np.dtype[Any], chunk: int) -> None:
        kwargs, plugin = filter_kwargs(options, dtype, live=True)
        if dtype.kind == "S":
            kwargs = {}
            plugin = None
        ds = group.create_dataset(
            name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(chunk,), **kwargs
        )
        if plugin:
            plugins.add(plugin)
            ds.attrs["required_filter"] = plugin

    live = f.create_group("live")
    live.attrs["description"] = (
        "log-structured layout of a file being written; k2eg-recorder rewrites it into one "
        "group per PV when the file is finalized (see docs/file-format.md)"
    )
    for gname, columns in (
        ("samples", SAMPLE_COLUMNS),
        ("meta", META_COLUMNS),
        ("state", STATE_COLUMNS),
        ("kafka", KAFKA_COLUMNS),
        ("pvs", PV_COLUMNS),
        ("tags", TAG_COLUMNS),
    ):
        group = live.create_group(gname)
        for name, dtype in columns.items():
            make(group, name, dtype, CHUNK_ROWS if gname == "samples" else 1024)
    make(live, "bytes", np.dtype(np.uint8), POOL_CHUNK)
    for code, name in POOL_NAMES.items():
        make(live, f"pool_{name}", DTYPE_BY_CODE[code], POOL_CHUNK)
    iterations = f.create_group("iterations")
    for name, dtype in ITERATION_COLUMNS.items():
        make(iterations, name, dtype, 1024)
    return sorted(plugins)


def _append(ds: h5py.Dataset, data: npt.NDArray[Any]) -> None:
    n = len(data)
    if not n:
        return
    start = ds.shape[0]
    ds.resize((start + n,))
    ds[start:] = data


class LiveWriter:
    """Appends :class:`FlushBatch` es to an open SWMR file and commits them."""

    def __init__(self, f: h5py.File, *, sync: bool = True) -> None:
        self.f = f
        # fsync after the data and again after its commit record: a power cut must not leave
        # a commit whose data never reached the disk (the kernel writes pages back in any
        # order), and a batch's Kafka offsets count as written only once both are on disk
        self._fd: int | None = f.id.get_vfd_handle() if sync else None
        live = f["live"]
        self.samples = {k: live["samples"][k] for k in SAMPLE_COLUMNS}
        self.meta = {k: live["meta"][k] for k in META_COLUMNS}
        self.state = {k: live["state"][k] for k in STATE_COLUMNS}
        self.kafka = {k: live["kafka"][k] for k in KAFKA_COLUMNS}
        self.pvs = {k: live["pvs"][k] for k in PV_COLUMNS}
        self.tags = {k: live["tags"][k] for k in TAG_COLUMNS}
        self.bytes = live["bytes"]
        self.pools = {code: live[f"pool_{name}"] for code, name in POOL_NAMES.items()}
        self.iterations = {k: f["iterations"][k] for k in ITERATION_COLUMNS}
        self.n = {"samples": 0, "iterations": 0, "meta": 0, "pvs": 0, "kafka": 0, "bytes": 0,
                  "tags": 0}
        self.pool_n = dict.fromkeys(POOL_NAMES, 0)

    def write(self, batch: FlushBatch, status: int, now_ns: int) -> None:
        _append(self.bytes, batch.byte_pool)
        self.n["bytes"] += len(batch.byte_pool)
        for code, arr in batch.pools.items():
            _append(self.pools[code], arr)
            self.pool_n[code] += len(arr)
        for k, arr in batch.meta.items():
            _append(self.meta[k], arr)
        self.n["meta"] += len(batch.meta["pv"])
        for k, ds in self.samples.items():  # the file's columns
            _append(ds, batch.samples[k])
        self.n["samples"] += len(batch.samples["pv"])
        for k, arr in batch.pvs.items():
            _append(self.pvs[k], arr)
        self.n["pvs"] += len(batch.pvs["offset"])
        for k, arr in batch.iterations.items():
            _append(self.iterations[k], arr)
        self.n["iterations"] += len(batch.iterations["iter_index"])
        for k, arr in batch.tags.items():
            _append(self.tags[k], arr)
        self.n["tags"] += len(batch.tags["iter_index"])
        if batch.offsets:
            keys = sorted(batch.offsets)
            _append(
                self.kafka["topic"],
                np.array([t.encode("utf-8")[:255] for t, _ in keys], dtype="S255"),
            )
            _append(self.kafka["partition"], np.array([p for _, p in keys], dtype=np.int32))
            _append(self.kafka["offset"], np.array([batch.offsets[k] for k in keys], np.int64))
            _append(self.kafka["time"], np.full(len(keys), now_ns, dtype=np.int64))
            self.n["kafka"] += len(keys)
        self._flush()
        self.commit(status, now_ns)

    def commit(self, status: int, now_ns: int) -> None:
        row: dict[str, int] = {
            "time": now_ns,
            "status": status,
            "n_samples": self.n["samples"],
            "n_iterations": self.n["iterations"],
            "n_meta": self.n["meta"],
            "n_pvs": self.n["pvs"],
            "n_kafka": self.n["kafka"],
            "n_bytes": self.n["bytes"],
            "n_tags": self.n["tags"],
        }
        for code, name in POOL_NAMES.items():
            row[f"n_pool_{name}"] = self.pool_n[code]
        for k, value in row.items():
            _append(self.state[k], np.array([value], dtype=STATE_COLUMNS[k]))
        self._flush()

    def _flush(self) -> None:
        self.f.flush()
        if self._fd is not None:
            try:
                sync_fd(self._fd)
            except OSError as exc:  # EIO, ENOSPC, EDQUOT: what the write-back could not do
                raise SinkError(
                    f"{self.f.filename}: flushed data did not reach the disk (fsync failed: "
                    f"{exc.strerror or exc}); what earlier flushes wrote is kept") from exc


WINDOW_BYTES = 4 << 20
"""A live pool is read in windows of this size (strings, JSON, waveform elements)."""
WINDOWS_KEPT = 4
SAMPLE_CACHE_BYTES = 256 << 20
"""Sample columns read whole and kept, at most this much; beyond it only the rows asked for."""
BLOCK_ROWS = 1 << 20  # rows per read when only some rows of a column are wanted


class LivePool:
    """The committed part of a live pool (``/live/pool_*``, ``/live/bytes``), read on demand.

    ``pool[a:b]`` is served from windows of :data:`WINDOW_BYTES` (the last
    :data:`WINDOWS_KEPT` kept, so rows of one PV, appended in order, read each window once);
    a slice wider than a window is read directly. The pool is never read whole: waveform
    and image data of a large live file stay on disk until a PV's samples are asked for."""

    def __init__(self, ds: h5py.Dataset, n: int) -> None:
        self.ds = ds
        self.n = n
        self.dtype = ds.dtype
        self.window = max(1, WINDOW_BYTES // ds.dtype.itemsize)
        self.windows: OrderedDict[int, npt.NDArray[Any]] = OrderedDict()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, sl: slice) -> npt.NDArray[Any]:
        start, stop, step = sl.indices(self.n)
        if step != 1:
            raise ValueError("LivePool slices are contiguous")
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        k, last = start // self.window, (stop - 1) // self.window
        if k != last:
            result: npt.NDArray[Any] = self.ds[start:stop]
            return result
        base = k * self.window
        return self._window(k)[start - base : stop - base]

    def _window(self, k: int) -> npt.NDArray[Any]:
        got = self.windows.get(k)
        if got is None:
            got = self.ds[k * self.window : min(self.n, (k + 1) * self.window)]
            self.windows[k] = got
            if len(self.windows) > WINDOWS_KEPT:
                self.windows.popitem(last=False)
        else:
            self.windows.move_to_end(k)
        return got


def sample_slice(samples: h5py.Group, name: str, lo: int, hi: int) -> npt.NDArray[Any]:
    """Rows ``lo:hi`` of the ``/live/samples`` column ``name``; zeros for a column the file
    predates (``user_tag``: 3.0 live files, where no row has its flag)."""
    if name not in samples:
        return np.zeros(hi - lo, SAMPLE_COLUMNS[name])
    got: npt.NDArray[Any] = samples[name][lo:hi]
    return got


def state_slice(state: h5py.Group, name: str, lo: int, hi: int) -> npt.NDArray[Any]:
    """Rows ``lo:hi`` of the ``/live/state`` column ``name``; zeros for a column the file
    predates (``n_tags``: 1.0 live files from before trigger tags, which have no
    ``/live/tags``)."""
    if name not in state:
        return np.zeros(hi - lo, STATE_COLUMNS[name])
    got: npt.NDArray[Any] = state[name][lo:hi]
    return got


class LiveColumns(Mapping[str, npt.NDArray[Any]]):
    """The committed ``/live/samples`` columns, each read when first used.

    ``cols[name]`` reads and keeps the whole column; :meth:`take` gives some rows of
    several columns, from whole columns while they fit :data:`SAMPLE_CACHE_BYTES`, else
    read in blocks keeping only those rows (memory: the rows, not the file)."""

    def __init__(self, group: h5py.Group, n: int) -> None:
        self.group = group
        self.n = n
        self.loaded: dict[str, npt.NDArray[Any]] = {}
        self.loaded_bytes = 0

    def __getitem__(self, name: str) -> npt.NDArray[Any]:
        got = self.loaded.get(name)
        if got is None:
            if name not in SAMPLE_COLUMNS:
                raise KeyError(name)
            got = sample_slice(self.group, name, 0, self.n)
            self.loaded[name] = got
            self.loaded_bytes += got.nbytes
        return got

    def __iter__(self) -> Iterator[str]:
        return iter(SAMPLE_COLUMNS)

    def __len__(self) -> int:
        return len(SAMPLE_COLUMNS)

    def take(self, names: Iterable[str],
             rows: npt.NDArray[np.int64]) -> dict[str, npt.NDArray[Any]]:
        """Columns ``names`` at ``rows`` (ascending)."""
        out: dict[str, npt.NDArray[Any]] = {}
        for name in names:
            size = self.n * SAMPLE_COLUMNS[name].itemsize
            if name in self.loaded or self.loaded_bytes + size <= SAMPLE_CACHE_BYTES:
                out[name] = self[name][rows]
            else:
                out[name] = self._rows(name, rows)
        return out

    def _rows(self, name: str, rows: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
        if name not in self.group:
            return np.zeros(len(rows), SAMPLE_COLUMNS[name])
        ds = self.group[name]
        result = np.empty(len(rows), dtype=SAMPLE_COLUMNS[name])
        cuts = np.searchsorted(rows, np.arange(0, self.n + BLOCK_ROWS, BLOCK_ROWS)).tolist()
        for a, b in itertools.pairwise(cuts):
            if b > a:
                lo, hi = int(rows[a]), int(rows[b - 1]) + 1
                result[a:b] = ds[lo:hi][rows[a:b] - lo]
        return result


@dataclass(slots=True)
class LiveView:
    """The committed content of a live file: small tables read, sample columns and pools
    read on demand (:class:`LiveColumns`, :class:`LivePool`)."""

    attrs: dict[str, Any]
    pv_names: list[str]
    samples: LiveColumns
    meta: dict[str, npt.NDArray[Any]]
    iterations: dict[str, npt.NDArray[Any]]
    kafka: dict[str, npt.NDArray[Any]]
    tags: dict[str, npt.NDArray[Any]]
    byte_pool: LivePool
    pools: dict[int, LivePool]
    status: str
    last_commit_ns: int
    n_commits: int

    def text(self, offset: int, size: int) -> bytes:
        return self.byte_pool[offset : offset + size].tobytes()


def _refresh(ds: h5py.Dataset) -> None:
    if ds.file.swmr_mode:
        ds.refresh()


@dataclass(slots=True)
class Commit:
    """The last complete commit of a live file: how much of each dataset is valid."""

    limits: dict[str, int]  # STATE_COLUMNS n_* -> length
    status: str
    time_ns: int
    n_commits: int  # commit rows up to this one
    n_rows: int  # rows in /live/state (later ones point past the data: a flush cut short)


def refresh_live(f: h5py.File) -> None:
    """Refresh every live dataset (a no-op unless the file is open in SWMR read mode)."""
    live = f["live"]
    # by name, not .values(): h5py's values() gives None for a member it cannot open
    # (damaged metadata), where indexing raises the KeyError that says so
    for group in (*(live[g] for g in ("samples", "meta", "state", "kafka", "pvs")),
                  *((live["tags"],) if "tags" in live else ()), f["iterations"]):
        for name in group:
            _refresh(group[name])
    _refresh(live["bytes"])
    for name in POOL_NAMES.values():
        _refresh(live[f"pool_{name}"])


def read_commit(f: h5py.File) -> Commit:
    """The last commit whose data is all there (a kill -9 can cut a flush anywhere); reads
    only the small /live/state table and dataset shapes."""
    register_plugins(f.attrs.get("required_plugins"))  # live_compression zstd / blosc2
    refresh_live(f)
    live = f["live"]
    state_len = min(ds.shape[0] for ds in live["state"].values())
    actual = {
        "n_samples": min(live["samples"][k].shape[0] for k in SAMPLE_COLUMNS
                         if k in live["samples"]),
        "n_iterations": min(f["iterations"][k].shape[0] for k in ITERATION_COLUMNS),
        "n_meta": min(live["meta"][k].shape[0] for k in META_COLUMNS),
        "n_pvs": min(live["pvs"][k].shape[0] for k in PV_COLUMNS),
        "n_kafka": min(live["kafka"][k].shape[0] for k in KAFKA_COLUMNS),
        "n_bytes": live["bytes"].shape[0],
        "n_tags": (min(live["tags"][k].shape[0] for k in TAG_COLUMNS)
                   if "tags" in live else 0),  # 1.0 files from before trigger tags: none
        **{f"n_pool_{n}": live[f"pool_{n}"].shape[0] for n in POOL_NAMES.values()},
    }

    def fits(row: dict[str, int]) -> bool:
        return all(0 <= row[k] <= actual[k] for k in actual)  # < 0: a row overwritten

    hi = state_len
    while hi > 0:  # newest first, in windows (only the last commits can be cut)
        lo = max(0, hi - 4096)
        first = max(0, lo - 1)  # with the row before the window's first
        state = {k: state_slice(live["state"], k, first, hi) for k in STATE_COLUMNS}
        for i in range(hi - 1 - first, lo - first - 1, -1):
            row = {k: int(state[k][i]) for k in STATE_COLUMNS}
            before = {k: int(state[k][i - 1]) for k in actual} if i > 0 else None
            # counts only grow from commit to commit: a row below the one before it was
            # never written whole (its extent reached the disk, not its values: zeros)
            if fits(row) and not (before is not None and fits(before)
                                  and any(row[k] < before[k] for k in actual)):
                status = {v: k for k, v in RECORDING_STATUS.items()}.get(row["status"])
                return Commit(
                    {k: row[k] for k in actual}, status or "recording", row["time"],
                    first + i + 1, state_len,
                )
        hi = lo
    return Commit(dict.fromkeys(actual, 0), "recording", 0, 0, state_len)


def read_pv_names(f: h5py.File, commit: Commit) -> list[str]:
    live = f["live"]
    n = commit.limits["n_pvs"]
    off = live["pvs"]["offset"][:n]
    size = live["pvs"]["size"][:n]
    if not n:
        return []
    lo, hi = int(off.min()), int((off + size).max())
    raw = live["bytes"][lo:hi].tobytes()
    return [
        raw[o - lo : o - lo + z].decode("utf-8", "surrogatepass")
        for o, z in zip(off.tolist(), size.tolist(), strict=True)
    ]


def read_live(f: h5py.File) -> LiveView:
    """Read the last commit of a live file (open with ``swmr=True`` while it is written)."""
    live = f["live"]
    commit = read_commit(f)
    limits = commit.limits
    status, commit_ns, n_commits = commit.status, commit.time_ns, commit.n_commits
    ns, ni, nm = limits["n_samples"], limits["n_iterations"], limits["n_meta"]
    byte_pool = LivePool(live["bytes"], limits["n_bytes"])
    names = read_pv_names(f, commit)
    return LiveView(
        attrs=dict(f.attrs),
        pv_names=names,
        samples=LiveColumns(live["samples"], ns),
        meta={k: live["meta"][k][:nm] for k in META_COLUMNS},
        iterations={k: f["iterations"][k][:ni] for k in ITERATION_COLUMNS},
        kafka={k: live["kafka"][k][: limits["n_kafka"]] for k in KAFKA_COLUMNS},
        tags={k: (live["tags"][k][: limits["n_tags"]] if "tags" in live
                  else np.zeros(0, dt)) for k, dt in TAG_COLUMNS.items()},
        byte_pool=byte_pool,
        pools={
            code: LivePool(live[f"pool_{name}"], limits[f"n_pool_{name}"])
            for code, name in POOL_NAMES.items()
        },
        status=status,
        last_commit_ns=commit_ns,
        n_commits=n_commits,
    )


def attrs_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
