"""Finalization: rewrite a live ``*.partial`` file into the final per-PV layout.

The final file is written next to the partial one as ``<final>.finalizing``, fsync'ed,
made read-only (0444) and renamed to its final name; only then is the partial file removed.
A crash at any point leaves the partial file intact, so ``recover`` can simply run this again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from recorder.client.values import ValueKind
from recorder.sinks.buffer import ITERATION_COLUMNS, ITERATION_REASONS, ITERATION_STATUS
from recorder.sinks.codec import (
    DTYPE_BY_CODE,
    F_VALUE,
    KINDS_BY_CODE,
    STRING_DTYPE_CODE,
    decode_rest,
    encode_rest,
    escape_name,
    rebuild_data,
)
from recorder.sinks.filters import filter_kwargs, rows_per_chunk
from recorder.sinks.livefile import LiveView, read_live
from recorder.sinks.options import OutputOptions

FINAL_SUFFIX = ".finalizing"
STATUS_ENUM = h5py.enum_dtype(ITERATION_STATUS, basetype="u1")
REASON_ENUM = h5py.enum_dtype(
    {(k or "none"): v for k, v in ITERATION_REASONS.items()}, basetype="u1"
)
STR = h5py.string_dtype("utf-8")

# display / control / valueAlarm fields copied to PV attributes
META_ATTRS: dict[str, tuple[str, str]] = {
    "units": ("display", "units"),
    "precision": ("display", "precision"),
    "description": ("display", "description"),
    "format": ("display", "format"),
    "display_limit_low": ("display", "limitLow"),
    "display_limit_high": ("display", "limitHigh"),
    "control_limit_low": ("control", "limitLow"),
    "control_limit_high": ("control", "limitHigh"),
    "control_min_step": ("control", "minStep"),
    "alarm_low_alarm_limit": ("valueAlarm", "lowAlarmLimit"),
    "alarm_low_warning_limit": ("valueAlarm", "lowWarningLimit"),
    "alarm_high_warning_limit": ("valueAlarm", "highWarningLimit"),
    "alarm_high_alarm_limit": ("valueAlarm", "highAlarmLimit"),
    "alarm_hysteresis": ("valueAlarm", "hysteresis"),
}


def _attr_value(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, default=str)


def metadata_attrs(rest: Mapping[str, Any]) -> dict[str, Any]:
    """PV attributes (units, precision, limits, enum choices) from a rest structure."""
    d = rest.get("d", {})
    out: dict[str, Any] = {}
    for attr, (group, key) in META_ATTRS.items():
        sub = d.get(group)
        if isinstance(sub, Mapping) and sub.get(key) is not None:
            out[attr] = _attr_value(sub[key])
    value = d.get("value")
    if isinstance(value, Mapping) and isinstance(value.get("choices"), list):
        out["choices"] = [str(c) for c in value["choices"]]
    return out


def _rest_at(entries: list[tuple[int, dict[str, Any]]], row: int) -> dict[str, Any]:
    found = entries[0][1]
    for r, rest in entries:
        if r > row:
            break
        found = rest
    return found


def _image_shape(rest: Mapping[str, Any], size: int) -> tuple[int, ...]:
    dims = rest["d"].get("dimension")
    sizes: list[int] = []
    if isinstance(dims, list):
        for dim in dims:
            if isinstance(dim, Mapping):
                s = dim.get("size", 0)
                sizes.append(int(s) if isinstance(s, int) else 0)
    shape = tuple(reversed(sizes))
    if shape and int(np.prod(shape)) == size:
        return shape
    return (size,)


class _PVWriter:
    def __init__(self, out: h5py.File, view: LiveView, options: OutputOptions) -> None:
        self.out = out
        self.view = view
        self.options = options
        self.plugins: set[str] = set()

    def dataset(self, group: h5py.Group, name: str, data: npt.NDArray[Any], **attrs: Any) -> None:
        kwargs: dict[str, Any] = {}
        plugin = None
        if data.size and data.dtype.kind not in "OST":
            kwargs, plugin = filter_kwargs(self.options, data.dtype)
            row_bytes = max(1, int(np.prod(data.shape[1:])) * data.dtype.itemsize)
            rows = min(len(data), rows_per_chunk(row_bytes, target=512 * 1024))
            kwargs["chunks"] = (max(1, rows), *data.shape[1:])
            kwargs["maxshape"] = (None, *data.shape[1:])
        elif data.size:
            kwargs = {"compression": "gzip", "compression_opts": 4, "chunks": True}
            kwargs["maxshape"] = (None, *data.shape[1:])
        ds = group.create_dataset(name, data=data, **kwargs)
        if plugin:
            self.plugins.add(plugin)
            ds.attrs["required_filter"] = plugin
        for k, v in attrs.items():
            ds.attrs[k] = v

    def write_pv(self, col: int, idx: npt.NDArray[np.int64], n_iter: int) -> None:
        view = self.view
        name = view.pv_names[col]
        s = {k: v[idx] for k, v in view.samples.items()}
        n = len(idx)
        sel = np.flatnonzero(view.meta["pv"] == col)
        entries = [
            (
                int(view.meta["row"][i]),
                decode_rest(view.text(int(view.meta["offset"][i]), int(view.meta["size"][i]))),
            )
            for i in sel
        ]
        g = self.out["pvs"].create_group(escape_name(name))
        g.attrs["NX_class"] = "NXlog"
        g.attrs["pv_name"] = name
        uri = view.attrs.get("pv_uri_map")
        uris = json.loads(uri) if isinstance(uri, str) else {}
        if name in uris:
            g.attrs["source"] = uris[name]
            g.attrs["protocol"] = uris[name].split("://", 1)[0]
        flags = s["flags"].copy()
        kinds = s["kind"]
        dtypes = s["dtype"]
        valued = np.flatnonzero(flags & F_VALUE)
        if len(valued):
            kind = KINDS_BY_CODE[int(kinds[valued[0]])]
        else:
            kind = KINDS_BY_CODE[int(kinds[0])] if n else ValueKind.NONE
        dcode = int(dtypes[valued[0]]) if len(valued) else 0
        # rows whose typed value does not match the PV's first typed value: value into the rest
        demote = np.zeros(n, dtype=bool)
        if len(valued):
            mismatch = (kinds != kinds[valued[0]]) | (dtypes != dcode)
            demote = (flags & F_VALUE).astype(bool) & mismatch
        value_ds: npt.NDArray[Any] | None = None
        shape_ds: npt.NDArray[Any] | None = None
        if len(valued) and dcode:
            if dcode == STRING_DTYPE_CODE:
                texts = []
                for i in range(n):
                    if demote[i] or not flags[i] & F_VALUE:
                        texts.append("")
                        continue
                    t = view.text(int(s["offset"][i]), int(s["size"][i])).decode("utf-8")
                    if "\x00" in t:
                        demote[i] = True
                        t = ""
                    texts.append(t)
                value_ds = np.array(texts, dtype=object)
            elif kind in (ValueKind.ARRAY, ValueKind.NDARRAY):
                pool = view.pools[dcode]
                arrays: list[npt.NDArray[Any]] = []
                rank = None
                for i in range(n):
                    if demote[i] or not flags[i] & F_VALUE:
                        arrays.append(np.empty(0, dtype=pool.dtype))
                        continue
                    o, z = int(s["offset"][i]), int(s["size"][i])
                    a = pool[o : o + z]
                    if kind is ValueKind.NDARRAY:
                        a = a.reshape(_image_shape(_rest_at(entries, i), z))
                    if rank is None:
                        rank = a.ndim
                    if a.ndim != rank:
                        demote[i] = True
                        a = np.empty(0, dtype=pool.dtype)
                    arrays.append(a)
                rank = rank or 1
                shapes = np.zeros((n, rank), dtype=np.int64)
                for i, a in enumerate(arrays):
                    if a.ndim == rank:
                        shapes[i] = a.shape
                maxshape = tuple(int(x) for x in shapes.max(axis=0)) if n else (0,) * rank
                value_ds = np.zeros((n, *maxshape), dtype=pool.dtype)
                for i, a in enumerate(arrays):
                    if a.size:
                        region: tuple[int | slice, ...] = (i, *(slice(0, d) for d in a.shape))
                        value_ds[region] = a
                shape_ds = shapes
            else:
                dt = DTYPE_BY_CODE[dcode]
                if dt.kind == "f":
                    value_ds = s["fval"].astype(dt)
                elif dt == np.uint64:
                    value_ds = s["ival"].view(np.uint64)
                else:
                    value_ds = s["ival"].astype(dt)
                value_ds = value_ds.copy()
                value_ds[demote | ~(flags & F_VALUE).astype(bool)] = 0
        # demoted rows: their value goes into the metadata log (and the rest after them back)
        if demote.any():
            entries = self._demote(entries, np.flatnonzero(demote), s, view, kind)
            flags[demote] &= ~np.uint8(F_VALUE)
        # the dataset family
        time_attrs = {"units": "ns", "start": "1970-01-01T00:00:00Z"}
        if value_ds is not None:
            self.dataset(g, "value", value_ds)
            if dcode != STRING_DTYPE_CODE:
                g["value"].attrs["dtype"] = DTYPE_BY_CODE[dcode].name
        if shape_ds is not None:
            self.dataset(g, "shape", shape_ds)
        self.dataset(g, "time", s["time"], **time_attrs)
        self.dataset(g, "iteration", s["iteration"])
        self.dataset(g, "severity", s["severity"])
        self.dataset(g, "status", s["status"])
        self.dataset(g, "flags", flags)
        # XFEL-style index: first row and count of this PV's values for each /iterations row
        iter_rows = s["iter_row"]
        count = np.bincount(iter_rows[iter_rows >= 0], minlength=n_iter)[:n_iter].astype(np.int64)
        first = np.zeros(n_iter, dtype=np.int64)
        if n_iter:
            positions = np.searchsorted(
                np.where(iter_rows >= 0, iter_rows, np.iinfo(np.int64).max), np.arange(n_iter)
            )
            first = positions.astype(np.int64)
            if not np.all(np.diff(iter_rows[iter_rows >= 0]) >= 0):  # never expected
                raise ValueError(f"PV {name}: rows are not grouped by iteration")
        self.dataset(g, "first", first)
        self.dataset(g, "count", count)
        g.attrs["kind"] = kind.value
        g.attrs["storage_dtype"] = DTYPE_BY_CODE[dcode].name if dcode in DTYPE_BY_CODE else (
            "utf-8" if dcode == STRING_DTYPE_CODE else "none"
        )
        g.attrs["count"] = n
        if entries:
            for k, v in metadata_attrs(entries[0][1]).items():
                if isinstance(v, list):
                    g.attrs.create(k, v, dtype=STR)
                else:
                    g.attrs[k] = v
            meta = g.create_group("metadata")
            meta.attrs["description"] = (
                "the PV structure without the per-sample fields (JSON, see file-format.md); "
                "row[i] is the first value row it applies to"
            )
            meta.create_dataset("row", data=np.array([r for r, _ in entries], dtype=np.int64))
            meta.create_dataset(
                "json",
                data=np.array([encode_rest(rest).decode() for _, rest in entries], dtype=object),
                dtype=STR,
            )

    def _demote(
        self,
        entries: list[tuple[int, dict[str, Any]]],
        rows: npt.NDArray[np.int64],
        s: dict[str, npt.NDArray[Any]],
        view: LiveView,
        kind: ValueKind,
    ) -> list[tuple[int, dict[str, Any]]]:
        from recorder.reader import sample_value

        by_row = dict(entries)
        base = list(entries)
        for r in rows.tolist():
            rest = _rest_at(base, r)
            value = sample_value(view, s, r, rest)
            row_kind = int(s["kind"][r])
            data = rebuild_data(
                rest, flags=F_VALUE, kind=row_kind, time_ns=0, severity=0, status=0, value=value
            )
            by_row[r] = {"d": data, "f": rest.get("f", [])}
            if r + 1 < len(s["pv"]) and (r + 1) not in by_row:
                by_row[r + 1] = rest
        return sorted(by_row.items())


def finalize(
    partial: Path,
    final: Path,
    *,
    status: str,
    reason: str = "",
    options: OutputOptions | None = None,
    end_time: float | None = None,
    extra_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``final`` from the live file ``partial``; returns ``final``."""
    tmp = final.with_name(final.name + FINAL_SUFFIX)
    if tmp.exists():
        tmp.unlink()
    with h5py.File(partial, "r", swmr=True) as f:
        view = read_live(f)
    _add_unclosed_iterations(view)
    if options is None:
        opts_json = view.attrs.get("output_options")
        options = OutputOptions.model_validate_json(opts_json) if isinstance(opts_json, str) \
            else OutputOptions(directory=final.parent)
    with h5py.File(tmp, "x", libver=("v110", "v110")) as out:
        for k, v in view.attrs.items():
            if k != "required_plugins":
                out.attrs[k] = v
        out.attrs["status"] = status
        out.attrs["status_reason"] = reason
        end = end_time if end_time is not None else time.time()
        out.attrs["end_time"] = _iso(end)
        out.attrs["end_time_ns"] = int(end * 1e9)
        out.attrs["layout"] = "final"
        for k, v in (extra_attrs or {}).items():
            out.attrs[k] = v
        w = _PVWriter(out, view, options)
        it = out.create_group("iterations")
        n_iter = len(view.iterations["iter_index"])
        for name in ITERATION_COLUMNS:
            if name in ("error_message", "error_message_size"):
                continue
            data = view.iterations[name]
            if name == "status":
                it.create_dataset(name, data=data.astype(np.uint8), dtype=STATUS_ENUM)
            elif name == "reason":
                it.create_dataset(name, data=data.astype(np.uint8), dtype=REASON_ENUM)
            else:
                w.dataset(it, name, data)
        messages = [
            view.text(int(o), int(z)).decode("utf-8", "replace") if o >= 0 else ""
            for o, z in zip(
                view.iterations["error_message"].tolist(),
                view.iterations["error_message_size"].tolist(),
                strict=True,
            )
        ]
        it.create_dataset("error_message", data=np.array(messages, dtype=object), dtype=STR)
        for k in ("header_timestamp", "tail_timestamp"):
            it[k].attrs["units"] = "ns"
            it[k].attrs["start"] = "1970-01-01T00:00:00Z"
        kafka = out.create_group("kafka")
        for k, v in view.kafka.items():
            kafka.create_dataset(k, data=v)
        pvs = out.create_group("pvs")
        pvs.attrs["NX_class"] = "NXcollection"
        pvs.attrs.create("pv_names", view.pv_names, dtype=STR)
        order = np.argsort(view.samples["pv"], kind="stable")
        cols = view.samples["pv"][order]
        for col in range(len(view.pv_names)):
            lo, hi = np.searchsorted(cols, [col, col + 1])
            w.write_pv(col, order[lo:hi], n_iter)
        out.attrs.create("required_plugins", sorted(w.plugins), dtype=STR)
        out.attrs["n_iterations"] = n_iter
        out.attrs["n_values"] = len(view.samples["pv"])
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o444)
    if final.exists():
        raise FileExistsError(f"{final} exists; refusing to overwrite")
    os.rename(tmp, final)
    partial.unlink()
    dfd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return final


def _add_unclosed_iterations(view: LiveView) -> None:
    """Rows for iterations that have values in the file but were never closed (a crash)."""
    n_iter = len(view.iterations["iter_index"])
    rows = view.samples["iter_row"]
    if not len(rows) or int(rows.max()) < n_iter:
        return
    missing = np.arange(n_iter, int(rows.max()) + 1)
    iter_index = []
    n_written = []
    for r in missing:
        sel = rows == r
        iter_index.append(int(view.samples["iteration"][sel][0]) if sel.any() else -1)
        n_written.append(int(sel.sum()))
    extra: dict[str, Any] = {k: np.zeros(len(missing), dtype=dt) for k, dt in
                             ITERATION_COLUMNS.items()}
    extra["iter_index"][:] = iter_index
    extra["n_written"][:] = n_written
    extra["status"][:] = ITERATION_STATUS["incomplete"]
    extra["reason"][:] = ITERATION_REASONS["writer_crashed"]
    for k in ("error_message", "expected_messages", "missing_messages", "partition", "offset"):
        extra[k][:] = -1
    for k, v in extra.items():
        view.iterations[k] = np.concatenate([view.iterations[k], v])


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"
