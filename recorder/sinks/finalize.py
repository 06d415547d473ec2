"""Finalization: rewrite a live ``*.partial`` file into the final per-PV layout.

The final file is written next to the partial one as ``<final>.finalizing``, fsync'ed,
made read-only (0444 less the umask) and renamed to its final name; only once that rename is
on disk (an fsync of the directory) is the partial file removed (and that made durable too).
A crash at any point leaves the partial file intact, so ``recover`` can simply run this again.

Memory is bounded whatever the size of the segment: the live tables are read in blocks of
rows (``block_bytes`` of data each, default 128 MiB), each block split by PV and appended to
that PV's datasets, which are buffered and spilled within the same budget.

This module holds the entry point :func:`finalize` and the order of the work: root attributes,
/iterations (with their tags), /kafka, the PVs block by block, /pv_info. The parts:

* :mod:`recorder.sinks.final_layout` — format version, kind codes, dtypes, attribute sets.
* :mod:`recorder.sinks.final_h5` — low-level h5py helpers (groups, attributes, types).
* :mod:`recorder.sinks.final_metadata` — PV metadata -> ``value`` attributes, /pv_info columns.
* :mod:`recorder.sinks.final_blocks` — the live file read in blocks (first-pass plan, blocks).
* :mod:`recorder.sinks.final_datasets` — columns written with bounded memory, and the writer.
* :mod:`recorder.sinks.final_pv` — one PV's rows into its datasets.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from recorder.durability import sync_directory, sync_file
from recorder.errors import DamagedFileError
from recorder.sinks.buffer import (
    ITERATION_COLUMNS,
    ITERATION_REASONS,
    ITERATION_STATUS,
    TAG_COLUMNS,
    merge_tags,
    tags_json,
)
from recorder.sinks.filters import filter_kwargs
from recorder.sinks.final_blocks import (
    SCAN_ROWS,
    _Meta,
    _occurrence,
    _Plan,
    _pv_order,
    _read_block,
    _scan,
)
from recorder.sinks.final_datasets import COMPACT_MAX, _Col, _Writer, plan_piece_rows
from recorder.sinks.final_h5 import _DCPL_COMPACT, create_group, set_attrs
from recorder.sinks.final_layout import (
    FORMAT_VERSION,
    PV_INFO_FIELDS,
    REASON_ENUM,
    STATUS_ENUM,
    STR,
    TIME_ATTRS,
)
from recorder.sinks.final_pv import _PV
from recorder.sinks.h5open import open_live
from recorder.sinks.livefile import KAFKA_COLUMNS, Commit, read_commit, read_pv_names
from recorder.sinks.options import OutputOptions

FINAL_SUFFIX = ".finalizing"

DEFAULT_BLOCK_BYTES = 128 * 1024 * 1024
"""Memory budget of one block of the live file (and of the buffered PV data)."""
CHUNK_CACHE = 0  # no chunk cache: rows go out in large blocks (HDF5 2.0 caches 8 MiB a dataset)


def _write_iterations(f: h5py.File, out: h5py.File, w: _Writer, commit: Commit,
                      plan: _Plan) -> int:
    """Copy /iterations (in blocks), adding rows for iterations the writer never closed."""
    src = f["iterations"]
    n = commit.limits["n_iterations"]
    extra = plan.extra_iters
    missing = list(range(n, max(extra) + 1)) if extra else []
    total = n + len(missing)
    it = create_group(out.id, "iterations")
    cols: dict[str, _Col] = {}
    for name, dt in ITERATION_COLUMNS.items():
        if name == "error_message_size":
            continue
        if name == "error_message":
            cols[name] = _Col(w, it, name, total, dtype=np.dtype(object))
        elif name in ("status", "reason"):
            cols[name] = _Col(w, it, name, total, dtype=dt,
                              h5dtype=STATUS_ENUM if name == "status" else REASON_ENUM)
        else:
            attrs = TIME_ATTRS if name in ("header_timestamp", "tail_timestamp") else None
            cols[name] = _Col(w, it, name, total, dtype=dt, attrs=attrs)
    cols["tags"] = _Col(w, it, "tags", total, dtype=np.dtype(object))
    bytes_ds = f["live"]["bytes"]
    tags = _read_tags(f, commit)
    matched: set[int] = set()

    def tag_column(iter_index: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
        out = []
        for i in iter_index.tolist():
            t = tags.get(i)
            out.append(tags_json(t) if t else "")
            if t is not None:
                matched.add(i)
        return np.array(out, dtype=object)

    for lo in range(0, n, SCAN_ROWS):
        hi = min(n, lo + SCAN_ROWS)
        block = {k: src[k][lo:hi] for k in ITERATION_COLUMNS}
        off, size = block["error_message"], block["error_message_size"]
        messages = [  # NUL, where HDF5 strings end, and bytes not UTF-8 are U+FFFD
            bytes_ds[o : o + z].tobytes().decode("utf-8", "replace").replace("\x00", "\ufffd")
            if o >= 0 and z else ""
            for o, z in zip(off.tolist(), size.tolist(), strict=True)
        ]
        block["error_message"] = np.array(messages, dtype=object)
        block["tags"] = tag_column(block["iter_index"])
        for k, c in cols.items():
            c.add(block[k])
        w.maybe_spill()
    if missing:
        m = len(missing)
        add: dict[str, npt.NDArray[Any]] = {
            k: np.zeros(m, dtype=dt) for k, dt in ITERATION_COLUMNS.items()
        }
        add["iter_index"][:] = [extra.get(r, (-1, 0))[0] for r in missing]
        add["n_written"][:] = [extra.get(r, (-1, 0))[1] for r in missing]
        add["status"][:] = ITERATION_STATUS["incomplete"]
        add["reason"][:] = ITERATION_REASONS["writer_crashed"]
        for k in ("expected_messages", "missing_messages", "partition", "offset"):
            add[k][:] = -1
        add["error_message"] = np.array([""] * m, dtype=object)
        add["tags"] = tag_column(add["iter_index"])
        for k, c in cols.items():
            c.add(add[k])
    for c in cols.values():
        c.finish()
    w.dirty.clear()
    # tags of iterations that are not in this file: kept at the recording level
    unmatched = {str(i): t for i, t in tags.items() if i not in matched}
    out.attrs["unmatched_tags"] = json.dumps(unmatched, separators=(",", ":"))
    return total


def _read_tags(f: h5py.File, commit: Commit) -> dict[int, dict[str, str]]:
    """The committed /live/tags rows, merged per iter_index."""
    live = f["live"]
    n = commit.limits["n_tags"]
    if not n:
        return {}
    rows = {k: live["tags"][k][:n] for k in TAG_COLUMNS}
    lo = int(rows["offset"].min())
    hi = int((rows["offset"] + rows["size"]).max())
    pool = live["bytes"][lo:hi]
    return merge_tags(rows["iter_index"], rows["offset"] - lo, rows["size"], pool)


def finalize(
    partial: Path,
    final: Path,
    *,
    status: str,
    reason: str = "",
    options: OutputOptions | None = None,
    end_time: float | None = None,
    extra_attrs: Mapping[str, Any] | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    check: Callable[[Path], Sequence[str]] | None = None,
    heap_checked: bool = False,
) -> Path:
    """Write ``final`` from the live file ``partial``; returns ``final``. ``check`` (e.g.
    ``k2eg-recorder verify``) gets the written file before it takes its name and ``partial``
    is removed: problems it returns raise :class:`DamagedFileError` and leave ``partial``
    as it was, with no ``final``. ``heap_checked``: the caller has scanned ``partial``'s
    global heap (:func:`~recorder.sinks.h5open.check_heap`), so opening it does not again."""
    tmp = final.with_name(final.name + FINAL_SUFFIX)
    if final.exists():  # before the work (and checked again before the rename)
        raise FileExistsError(f"{final} exists; refusing to overwrite")
    if tmp.exists():
        tmp.unlink()
    with open_live(partial, scan_heap=not heap_checked, rdcc_nbytes=CHUNK_CACHE) as f:
        attrs = dict(f.attrs)
        if options is None:
            options = _stored_options(attrs.get("output_options"), final.parent)
        try:
            _write_final(f, tmp, attrs, options, status=status, reason=reason,
                         end_time=end_time, extra_attrs=extra_attrs, block_bytes=block_bytes)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    try:  # the copy goes with any failure (an fsync's ENOSPC/EIO too): the partial stays
        sync_file(tmp)
        problems = list(check(tmp)) if check is not None else []
        if problems:
            raise DamagedFileError(
                f"the finalized file would not pass k2eg-recorder verify ({len(problems)} "
                f"problem(s)); the first: {problems[0]}")
        # read-only, as created otherwise: 0444 less the umask (the unit's UMask=0027 keeps
        # the data from other users: 0440)
        os.chmod(tmp, stat.S_IMODE(os.stat(tmp).st_mode) & ~0o222)
        if final.exists():
            raise FileExistsError(f"{final} exists; refusing to overwrite")
        os.rename(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # the new name on disk before the partial file goes: a power cut can keep directory
    # changes out of order, and the removal alone would leave only the .finalizing copy
    sync_directory(final.parent)
    partial.unlink()
    sync_directory(partial.parent)
    return final


def _stored_options(text: Any, directory: Path) -> OutputOptions:
    """The output options a live file was written with (its compression is the final
    file's). Written by another version they may not validate here (an option added since,
    one refused since): then its compression settings are taken, defaults for the rest."""
    if not isinstance(text, str):
        return OutputOptions(directory=directory)
    try:
        return OutputOptions.model_validate_json(text)
    except ValueError:
        pass
    try:
        stored = json.loads(text)
    except ValueError:
        stored = None
    keep = {k: stored[k] for k in ("compression", "compression_level", "shuffle")
            if k in stored} if isinstance(stored, dict) else {}
    try:
        return OutputOptions(directory=directory, **keep)
    except ValueError:
        return OutputOptions(directory=directory)


def _write_final(f: h5py.File, tmp: Path, attrs: dict[str, Any], options: OutputOptions, *,
                 status: str, reason: str, end_time: float | None,
                 extra_attrs: Mapping[str, Any] | None, block_bytes: int) -> None:
    commit = read_commit(f)
    pv_names = read_pv_names(f, commit)
    n_pvs = len(pv_names)
    n_iter_live = commit.limits["n_iterations"]
    plan = _scan(f, commit, n_pvs, n_iter_live, block_bytes)
    uri_json = attrs.get("pv_uri_map")
    uris = json.loads(uri_json) if isinstance(uri_json, str) else {}
    # no chunk cache: otherwise each open dataset keeps chunks in memory (memory would grow
    # with the number of PVs); rows are written in large blocks anyway
    with h5py.File(tmp, "x", libver=("v110", "v110"), rdcc_nbytes=CHUNK_CACHE) as out:
        for k, v in attrs.items():
            if k != "required_plugins":
                out.attrs[k] = v
        out.attrs["status"] = status
        out.attrs["status_reason"] = reason
        end = end_time if end_time is not None else time.time()
        end_text, end_ns = _iso(end), int(end * 1e9)
        start_ns = attrs.get("start_time_ns")
        if isinstance(start_ns, (int, np.integer)) and end_ns < start_ns:
            # the wall clock was stepped back (NTP) since the recording started: it ends at
            # its start, never before it
            end_ns = int(start_ns)
            start_text = attrs.get("start_time")
            end_text = start_text if isinstance(start_text, str) else _iso(end_ns / 1e9)
        out.attrs["end_time"] = end_text
        out.attrs["end_time_ns"] = end_ns
        out.attrs["layout"] = "final"
        out.attrs["format_version"] = FORMAT_VERSION
        for k, v in (extra_attrs or {}).items():
            out.attrs[k] = v
        w = _Writer(out, options, 0, uris, block_bytes)
        n_iter = _write_iterations(f, out, w, commit, plan)
        w.n_iter = n_iter
        w.piece_rows = plan_piece_rows(plan, n_iter, block_bytes)
        kafka = create_group(out.id, "kafka")
        live = f["live"]
        nk = commit.limits["n_kafka"]
        _write_kafka(w, kafka, {k: live["kafka"][k][:nk] for k in KAFKA_COLUMNS})
        pvs = w.pvs
        set_attrs(pvs, {"NX_class": "NXcollection"})
        pvs.attrs.create("pv_names", pv_names, dtype=STR)
        writers = [
            _PV(w, name, n=int(plan.counts[col]), kind=int(plan.kind[col]),
                dcode=int(plan.dtype[col]), width=int(plan.width[col]),
                split_message=bool(plan.entries[col] > 1))
            for col, name in enumerate(pv_names)
        ]
        meta = _Meta(f, commit.limits["n_meta"])
        prior = np.zeros(n_pvs, dtype=np.int64)
        for lo, hi in zip(plan.cuts[:-1], plan.cuts[1:], strict=True):
            pv = live["samples"]["pv"][lo:hi].astype(np.int64)
            order = _pv_order(pv)
            occ = _occurrence(pv, prior, order)
            prior = prior + np.bincount(pv, minlength=n_pvs)
            m = meta.take(pv, occ, prior)
            block = _read_block(f, lo, hi, m)
            sp = pv[order]
            starts = np.r_[0, np.flatnonzero(np.diff(sp)) + 1] if len(sp) else np.zeros(0, int)
            ends = np.r_[starts[1:], len(sp)] if len(sp) else np.zeros(0, int)
            # the block's columns grouped by PV (in row order within a PV): one slice each
            grouped = {k: v[order] for k, v in block.s.items()}
            # metadata entries by PV: local row within the PV's rows of this block
            m_order = np.argsort(m["pv"], kind="stable")
            m_pv = m["pv"][m_order]
            cols = sp[starts]
            m_lo = np.searchsorted(m_pv, cols, "left").tolist()
            m_hi = np.searchsorted(m_pv, cols, "right").tolist()
            m_row = m["row"][m_order].tolist()
            m_off = m["offset"][m_order].tolist()
            m_size = m["size"][m_order].tolist()
            for col, a, z, ml, mh in zip(cols.tolist(), starts.tolist(), ends.tolist(), m_lo,
                                         m_hi, strict=True):
                pw = writers[col]
                entries = {m_row[i] - pw.rows: block.text(m_off[i], m_size[i])
                           for i in range(ml, mh)}
                pw.add(block, {k: v[a:z] for k, v in grouped.items()}, entries)
                w.maybe_spill()
            del block
        writers.reverse()
        while writers:  # (each PV's objects are released once written)
            writers.pop().finish()
            w.maybe_spill()
        _write_pv_info(out, w.info)
        out.attrs.create("required_plugins", sorted(w.plugins), dtype=STR)
        out.attrs["n_iterations"] = n_iter
        out.attrs["n_values"] = int(commit.limits["n_samples"])


def _write_kafka(w: _Writer, group: Any, columns: dict[str, Any]) -> None:
    """/kafka: a row per flush, so compact while small, chunked and compressed in long
    recordings; ``time`` with the time attributes. ``topic`` stays fixed-length (S255),
    which the writer's string path (vlen UTF-8) does not take."""
    for name, data in columns.items():
        if data.dtype.kind != "S":  # numbers: compact or chunked, as every column
            w.create(group, name, data, attrs=TIME_ATTRS if name == "time" else None)
            continue
        plugin = None
        if data.nbytes <= COMPACT_MAX:
            kwargs: dict[str, Any] = {"dcpl": _DCPL_COMPACT}
        else:
            kwargs, plugin = filter_kwargs(w.options, data.dtype)
            kwargs["chunks"] = (w.chunk_rows(np.dtype(np.uint8), (data.dtype.itemsize,),
                                             len(data)),)
        ds = h5py.Group(group).create_dataset(name, data=data, track_times=False, **kwargs)
        if plugin:  # named, as on every dataset the writer's path makes (w.create)
            w.plugins.add(plugin)
            ds.attrs["required_filter"] = plugin


def _write_pv_info(out: h5py.File, rows: list[dict[str, Any]]) -> None:
    """/pv_info: one row per PV (in /pvs@pv_names order), the per-PV description."""
    fields = [(name, STR if kind == "s" else np.dtype(kind)) for name, kind in PV_INFO_FIELDS]
    table = np.zeros(len(rows), dtype=np.dtype(fields))
    for name, kind in PV_INFO_FIELDS:
        if kind == "s":
            table[name] = np.array([r[name] for r in rows] or [], dtype=object)
        else:
            table[name] = [r[name] for r in rows]
    kwargs: dict[str, Any] = {}
    if len(rows):
        kwargs = {"chunks": (min(len(rows), 4096),), "compression": "gzip",
                  "compression_opts": 4, "shuffle": True}
    ds = out.create_dataset("pv_info", data=table, track_times=False, **kwargs)
    ds.attrs["description"] = (
        "one row per PV: name, group, source URI, protocol, kind, storage dtype, count, "
        "flags (of every row when the same, else -1: the group's flags dataset), "
        "units, precision, display/control/alarm limits and enum choices of its first "
        "metadata (NaN / empty when absent), that metadata as JSON, and the number of "
        "metadata entries (> 1: every entry is in /metadata/<PV>/row and "
        "/metadata/<PV>/json, <PV> escaped as in the group name)")


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"
