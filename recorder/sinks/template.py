"""Template decoding of PV payloads: the sink's fast path, vectorized per layout (pure code).

For one PV, consecutive msgpack payloads are byte-identical except for the value, the
timestamp and the alarm numbers as long as the metadata does not change. A :class:`Template`
is learned from one payload (and its :func:`~recorder.sinks.codec.split_sample`): the byte
positions and encodings of the *dynamic* fields (``value`` — a number, a bool, an enum index
or an array of fixed-width floats —, ``timeStamp.secondsPastEpoch`` / ``nanoseconds`` /
a nonzero ``userTag``, ``alarm.severity`` / ``status``); every other byte is *static*. A
payload of the same length whose static bytes equal the template's and whose dynamic fields
have the template's encodings (plus range checks: nanoseconds below 1e9, int32 alarm numbers
and user tags, ...) decodes to the same structure except for the dynamic values, so its
:class:`~recorder.sinks.codec.Split` is the template's with the dynamic columns read straight
from the bytes.

:meth:`TemplateSet.decode` does that for many payloads at once: rows are gathered into an
``(n, L)`` byte matrix per *layout* (same length and field positions, shared by PVs of the
same shape), the static bytes are checked (each row against the previous row of the same
template, and the first row of every run against the template itself), and the columns are
read with big-endian views. :meth:`TemplateSet.decode_run` does the same without gathering for
a run of messages of one template laid out back to back (equal lengths): the run is a strided
matrix of the joined bytes, whose dynamic bytes are zeroed so that "equal to the previous row"
is one flat comparison of the run with itself shifted by one message; waveform elements are
left in the messages (:class:`RawArrays`) and copied into the pool with one strided copy.
A template is only kept when, on the payload it was learned from, the vectorized decoding
gives exactly what ``split_sample`` gives (self-check; :meth:`TemplateSet.learn_many` checks
the payloads of one layout together); rows that do not match a template are left to the
caller (the slow path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from recorder.client.values import ValueKind
from recorder.client.wire import MsgpackTruncatedError as _MalformedError
from recorder.client.wire import container_header as _container
from recorder.client.wire import read_str as _read_str
from recorder.client.wire import skip_object as _skip
from recorder.sinks.codec import (
    DTYPE_CODES,
    F_SEVERITY,
    F_STATUS,
    F_TIME,
    F_USER_TAG,
    F_VALUE,
    KIND_CODES,
    Split,
)

PAD = bytes(8)  # appended to joined payloads: rows are gathered 8-byte wide
MAX_TEMPLATES_PER_PV = 8

# encodings of a dynamic number: the msgpack marker (its payload follows), or a class of
# one-byte encodings where the marker byte is the value itself
ENC_POSFIX = -1  # positive fixint 0x00-0x7f
ENC_NEGFIX = -2  # negative fixint 0xe0-0xff
ENC_BOOL = -3  # 0xc2 / 0xc3
_INT_FMT: dict[int, str] = {
    0xCC: ">u1", 0xCD: ">u2", 0xCE: ">u4", 0xCF: ">u8",
    0xD0: ">i1", 0xD1: ">i2", 0xD2: ">i4", 0xD3: ">i8",
}  # fmt: skip
_FLOAT_FMT: dict[int, str] = {0xCA: ">f4", 0xCB: ">f8"}
_INT64_CODE = DTYPE_CODES[np.dtype(np.int64)]
_UINT64_CODE = DTYPE_CODES[np.dtype(np.uint64)]
_F32_CODE = DTYPE_CODES[np.dtype(np.float32)]
_F64_CODE = DTYPE_CODES[np.dtype(np.float64)]
_KIND_SCALAR = KIND_CODES[ValueKind.SCALAR]
_KIND_BOOL = KIND_CODES[ValueKind.BOOL]
_KIND_ENUM = KIND_CODES[ValueKind.ENUM]
_KIND_ARRAY = KIND_CODES[ValueKind.ARRAY]
# seconds for which sec * 1e9 + ns (0 <= ns < 1e9) is within int64 whatever ns is
_SEC_MIN = -9_223_372_036
_SEC_MAX = 9_223_372_035
_NS_PER_S = 1_000_000_000
_I32_MIN = -(2**31)
_I32_MAX = 2**31 - 1

_U64 = np.dtype(np.uint64)


# --- the msgpack skeleton walker (learning only) ----------------------------------------------
_MAP, _ARRAY = 1, 2  # container kinds of wire's container_header
def _width(marker: int) -> int:
    """Payload bytes after the marker of a fixed-width number."""
    if marker in (0xCA, 0xCB):
        return 4 if marker == 0xCA else 8
    return int(_INT_FMT[marker][2])


_WATCHED = ("value", "timeStamp", "alarm")


def _leaf(raw: bytes, pos: int) -> tuple[int, int] | None:
    """(marker or encoding class, end) of a fixed-width number or bool at ``pos``, else None."""
    b = raw[pos]
    if b <= 0x7F:
        return ENC_POSFIX, pos + 1
    if b >= 0xE0:
        return ENC_NEGFIX, pos + 1
    if b in (0xC2, 0xC3):
        return ENC_BOOL, pos + 1
    if b in _INT_FMT or b in _FLOAT_FMT:
        return b, pos + 1 + _width(b)
    return None


@dataclass(slots=True)
class _Skeleton:
    leaves: dict[tuple[str, ...], tuple[int, int]] = field(default_factory=dict)  # -> (pos, enc)
    array: tuple[int, int, int] | None = None  # value: (first element, count, element marker)
    seen: dict[tuple[str, ...], int] = field(default_factory=dict)


def walk(raw: bytes) -> _Skeleton | None:
    """Positions of the fields a template may make dynamic; None if ``raw`` is not one
    well-formed msgpack map (or a watched field occurs twice)."""
    sk = _Skeleton()
    # msgpack's unpacker skips what is not watched (C speed), kept in step with ``pos``
    up = msgpack.Unpacker(max_buffer_size=max(len(raw), 1 << 20))
    try:
        up.feed(raw)
        kind, count, pos = _container(raw, 0)
        if kind != _MAP:
            return None
        if up.read_map_header() != count or up.tell() != pos:
            return None
        for _ in range(count):
            name = up.unpack()  # a key: str, else not watched (invalid UTF-8 raises)
            pos = up.tell()
            if name.__class__ is str and name in _WATCHED:
                _note(sk, (name,))
                pos = _watched(raw, pos, name, sk)
                up.skip()
                if up.tell() != pos:
                    return None
            else:
                up.skip()
                pos = up.tell()
        if pos != len(raw):
            return None
    except (_MalformedError, IndexError):
        return None
    except Exception:  # msgpack raises many types: not a template
        return None
    if any(n > 1 for n in sk.seen.values()):
        return None
    return sk


def _note(sk: _Skeleton, path: tuple[str, ...]) -> None:
    sk.seen[path] = sk.seen.get(path, 0) + 1


def _watched(raw: bytes, pos: int, name: str, sk: _Skeleton) -> int:
    leaf = _leaf(raw, pos)
    if leaf is not None:
        sk.leaves[(name,)] = (pos, leaf[0])
        return leaf[1]
    kind, count, p = _container(raw, pos)
    if kind == _MAP:
        for _ in range(count):
            sub, p = _read_str(raw, p, "strict")
            if sub is None:
                p = _skip(raw, p)
                continue
            _note(sk, (name, sub))
            inner = _leaf(raw, p)
            if inner is not None:
                sk.leaves[(name, sub)] = (p, inner[0])
                p = inner[1]
            else:
                p = _skip(raw, p)
        return p
    if name == "value":
        kind, count, first = _container(raw, pos)
        if kind == _ARRAY and count and first < len(raw) and raw[first] in _FLOAT_FMT:
            marker = raw[first]
            step = 1 + _width(marker)
            end = first + count * step
            if end <= len(raw) and raw[first:end:step] == bytes((marker,)) * count:
                sk.array = (first, count, marker)
                return end
    return _skip(raw, pos)


# --- templates --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Field:
    name: str  # sec, ns, tag, sev, stat, value (number / bool / enum index)
    pos: int  # marker position
    enc: int  # marker, or ENC_*

    @property
    def span(self) -> tuple[int, int]:
        """The dynamic bytes (the marker is static unless it holds the value)."""
        if self.enc < 0:
            return self.pos, self.pos + 1
        return self.pos + 1, self.pos + 1 + _width(self.enc)


@dataclass(slots=True)
class Layout:
    """Length and dynamic fields shared by templates; decodes gathered rows."""

    length: int
    fields: tuple[_Field, ...]
    array: tuple[int, int, int] | None  # (first element, count, marker)
    width: int = 0  # gathered row width (length rounded up to 8)
    static_width: int = 0  # bytes compared (array elements cut out), multiple of 8
    templates: list[int] = field(default_factory=list)  # template ids, by local index
    static: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros((0, 0), _U64))
    pending: list[npt.NDArray[np.uint64]] = field(default_factory=list)  # rows to add to static

    def __post_init__(self) -> None:
        self.width = -(-self.length // 8) * 8
        cut = 0
        if self.array is not None:
            _first, count, marker = self.array
            cut = count * (1 + _width(marker))
        self.static_width = -(-(self.length - cut) // 8) * 8
        self.static = np.zeros((0, self.static_width // 8), _U64)

    def static_bytes(self, mat: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
        """The compared bytes of gathered rows: dynamic bytes zeroed, array elements cut out
        (``mat`` may be changed)."""
        n = len(mat)
        if self.array is None:
            z = mat
            z[:, self.length :] = 0
            for f in self.fields:
                a, b = f.span
                z[:, a:b] = 0
        else:
            first, count, marker = self.array
            end = first + count * (1 + _width(marker))
            z = np.zeros((n, self.static_width), np.uint8)
            z[:, :first] = mat[:, :first]
            z[:, first : first + self.length - end] = mat[:, end : self.length]
            for f in self.fields:
                a, b = f.span
                if a >= end:
                    a, b = a - (end - first), b - (end - first)
                z[:, a:b] = 0
        flat: npt.NDArray[np.uint64] = z.view(_U64)
        return flat

    def read(self, mat: npt.NDArray[np.uint8], *, array: bool = True
             ) -> tuple[npt.NDArray[np.bool_], dict[str, Any]]:
        """Dynamic columns of gathered rows and which rows have valid dynamic fields
        (``array`` False: the array elements are neither checked nor read)."""
        n = len(mat)
        ok = np.ones(n, np.bool_)
        cols: dict[str, Any] = {}
        for f in self.fields:
            if f.enc in _FLOAT_FMT:
                a, b = f.span
                cols[f.name] = mat[:, a:b].copy().view(_FLOAT_FMT[f.enc])[:, 0]
                continue
            big: npt.NDArray[np.bool_] | None = None
            if f.enc == ENC_POSFIX:
                raw = mat[:, f.pos]
                ok &= raw < 0x80
                v = raw.astype(np.int64)
            elif f.enc == ENC_NEGFIX:
                raw = mat[:, f.pos]
                ok &= raw >= 0xE0
                v = raw.astype(np.int64) - 256
            elif f.enc == ENC_BOOL:
                raw = mat[:, f.pos]
                ok &= (raw == 0xC2) | (raw == 0xC3)
                v = raw.astype(np.int64) - 0xC2
            else:
                a, b = f.span
                wide = mat[:, a:b].copy().view(_INT_FMT[f.enc])[:, 0]
                if f.enc == 0xCF:
                    v = wide.astype(np.uint64).view(np.int64)
                    big = v < 0  # above INT64_MAX
                else:
                    v = wide.astype(np.int64)
            small = ~big if big is not None else None
            if f.name == "sec":
                ok &= (v >= _SEC_MIN) & (v <= _SEC_MAX)
            elif f.name == "ns":
                ok &= (v >= 0) & (v < _NS_PER_S)
            elif f.name in ("sev", "stat"):
                ok &= (v >= _I32_MIN) & (v <= _I32_MAX)
            elif f.name == "tag":  # a zero tag stays in the rest (codec.F_USER_TAG)
                ok &= (v >= _I32_MIN) & (v <= _I32_MAX) & (v != 0)
            if small is not None and f.name != "value":
                ok &= small
            cols[f.name] = v
            if f.name == "value" and big is not None:
                cols["value_big"] = big
        if self.array is not None and array:
            first, count, marker = self.array
            step = 1 + _width(marker)
            end = first + count * step
            ok &= (mat[:, first:end:step] == marker).all(axis=1)
            elems = mat[:, first:end].reshape(n, count, step)[:, :, 1:]
            be = elems.view(_FLOAT_FMT[marker])[:, :, 0]
            if marker == 0xCA:  # as msgpack-python: float32 -> double -> float32
                cols["array"] = be.astype(np.float64).astype(np.float32)
            else:
                cols["array"] = be.astype(np.float64)
        return ok, cols


@dataclass(slots=True)
class Template:
    col: int
    layout: int
    length: int
    split: Split  # of the payload it was learned from: constants and rest
    time_dyn: bool
    value_dyn: bool
    zero: bytes = b""  # the payload with dynamic bytes (and array elements) zeroed
    rest_json: bytes | None = None  # encode_rest(split.rest), once needed


@dataclass(slots=True)
class _Plan:
    """What learning found in one payload: its layout key and what is dynamic."""

    col: int
    payload: bytes
    split: Split
    key: tuple[Any, ...]  # (length, fields, array): the layout
    time_dyn: bool
    value_dyn: bool


def _plan(col: int, payload: bytes, split: Split) -> _Plan | None:
    if split.text is not None:
        return None
    sk = walk(payload)
    if sk is None:
        return None
    fields: list[_Field] = []
    leaves = sk.leaves
    time_dyn = False
    if split.flags & F_TIME:
        sec = leaves.get(("timeStamp", "secondsPastEpoch"))
        ns = leaves.get(("timeStamp", "nanoseconds"))
        if sec and ns and sec[1] not in (ENC_BOOL, 0xCA, 0xCB) and ns[1] not in (
            ENC_BOOL, 0xCA, 0xCB
        ):
            fields += [_Field("sec", *sec), _Field("ns", *ns)]
            time_dyn = True
    if split.flags & F_USER_TAG:
        tag = leaves.get(("timeStamp", "userTag"))
        if tag is None or tag[1] in (ENC_BOOL, 0xCA, 0xCB):
            return None  # the tag would be static, as if it never changed
        fields.append(_Field("tag", *tag))
    for flag, key, name in ((F_SEVERITY, "severity", "sev"), (F_STATUS, "status", "stat")):
        leaf = leaves.get(("alarm", key))
        if split.flags & flag and leaf and leaf[1] not in (ENC_BOOL, 0xCA, 0xCB):
            fields.append(_Field(name, *leaf))
    value_dyn = False
    array = None
    if split.flags & F_VALUE:
        kind = split.kind
        leaf = leaves.get(("value",))
        index = leaves.get(("value", "index"))
        if kind in (_KIND_SCALAR, _KIND_BOOL) and leaf is not None:
            if (kind == _KIND_BOOL) == (leaf[1] == ENC_BOOL):
                fields.append(_Field("value", *leaf))
                value_dyn = True
        elif kind == _KIND_ENUM and index is not None and index[1] not in (
            ENC_BOOL, 0xCA, 0xCB
        ):
            fields.append(_Field("index", *index))
            value_dyn = True
        elif kind == _KIND_ARRAY and sk.array is not None:
            array = sk.array
            value_dyn = True
    if split.array is not None and array is None:
        return None  # a static array would have to be copied per row
    fields.sort(key=lambda f: f.pos)
    return _Plan(col, payload, split, (len(payload), tuple(fields), array), time_dyn,
                 value_dyn)


def _zeroed(payload: bytes, layout: Layout) -> bytes:
    """``payload`` with the dynamic bytes and the array elements (markers included) zeroed."""
    z = bytearray(payload)
    for f in layout.fields:
        a, b = f.span
        z[a:b] = bytes(b - a)
    if layout.array is not None:
        first, count, marker = layout.array
        z[first : first + count * (1 + _width(marker))] = bytes(count * (1 + _width(marker)))
    return bytes(z)


class Columns:
    """Per-row sample columns being filled (see buffer.SAMPLE_COLUMNS)."""

    __slots__ = ("dtype", "flags", "fval", "ival", "kind", "severity", "size", "status",
                 "tid", "time", "user_tag")

    def __init__(self, n: int) -> None:
        self.tid = np.full(n, -1, np.int64)  # template of the row, -1: slow path
        self.time = np.zeros(n, np.int64)
        self.severity = np.zeros(n, np.int64)
        self.status = np.zeros(n, np.int64)
        self.user_tag = np.zeros(n, np.int64)
        self.flags = np.zeros(n, np.uint8)
        self.kind = np.zeros(n, np.uint8)
        self.dtype = np.zeros(n, np.uint8)
        self.ival = np.zeros(n, np.int64)
        self.fval = np.zeros(n, np.float64)
        self.size = np.full(n, -1, np.int64)  # array elements, -1: no array


@dataclass(slots=True)
class RawArrays:
    """Arrays still in their messages (equal lengths): element ``j`` of message ``k`` is a
    big-endian float at ``offset + j * step`` in ``msgs[k]``. Copied out by :meth:`view`
    when the pool is written (the joined bytes are then short-lived)."""

    msgs: list[bytes]
    offset: int
    msg_len: int
    count: int
    marker: int

    def view(self) -> npt.NDArray[Any]:
        step = 1 + _width(self.marker)
        joined = b"".join(self.msgs)
        return np.ndarray((len(self.msgs), self.count), _FLOAT_FMT[self.marker], joined,
                          self.offset, (self.msg_len, step))


# an array piece: rows (ascending), their arrays (rows x elements, typed; or still in the
# messages), dtype code
Piece = tuple[npt.NDArray[np.int64], "npt.NDArray[Any] | RawArrays", int]


class TemplateSet:
    """The learned templates (of all PVs of a recording)."""

    def __init__(self) -> None:
        self.templates: list[Template] = []
        self.layouts: list[Layout] = []
        self._layout_ids: dict[tuple[Any, ...], int] = {}
        self.by_pv: dict[int, dict[int, int]] = {}  # col -> payload length -> template id
        self._keys = np.zeros(0, np.int64)  # sorted (col << 32 | length)
        self._key_tid = np.zeros(0, np.int64)
        self._consts: dict[str, npt.NDArray[Any]] = {}
        self._layout_of = np.zeros(0, np.int64)
        self._local = np.zeros(0, np.int64)
        self._dirty = True
        # learning back-off after failures: col -> (failures, raw rows seen until retry)
        self.blocked: dict[int, tuple[int, int]] = {}

    # --- learning -----------------------------------------------------------------------------
    def may_learn(self, col: int, seen: int) -> bool:
        b = self.blocked.get(col)
        return b is None or seen >= b[1]

    def failed(self, col: int, seen: int) -> None:
        fails = self.blocked.get(col, (0, 0))[0] + 1
        self.blocked[col] = (fails, seen + 16 * 2 ** min(fails, 12))

    def learn(self, col: int, payload: bytes, split: Split) -> bool:
        """Learn a template for PV column ``col`` from ``payload`` (its ``split``); False if
        the payload cannot be a template (kept on the slow path)."""
        return self.learn_many([(col, payload, split)])[0]

    def learn_many(self, entries: Sequence[tuple[int, bytes, Split]]) -> list[bool]:
        """:meth:`learn` for several PVs (one column each) at once: payloads of the same
        layout are self-checked together (one vectorized reading per layout)."""
        results = [False] * len(entries)
        groups: dict[tuple[Any, ...], list[tuple[int, _Plan]]] = {}
        for i, (col, payload, split) in enumerate(entries):
            plan = _plan(col, payload, split)
            if plan is not None:
                groups.setdefault(plan.key, []).append((i, plan))
        for key, members in groups.items():
            lid = self._layout_ids.get(key)
            layout = Layout(*key) if lid is None else self.layouts[lid]
            width = layout.width
            pad = PAD[: width - layout.length]
            joined = b"".join([m.payload + pad for _, m in members])
            mat = np.frombuffer(joined, np.uint8).reshape(len(members), width).copy()
            # the self-check: the vectorized decoding of the payloads themselves
            ok, cols = layout.read(mat)
            static = layout.static_bytes(mat)
            for j, (i, m) in enumerate(members):
                if not ok[j] or not _same_columns(m.split, cols, m.time_dyn, m.value_dyn, j):
                    continue
                if lid is None:
                    lid = len(self.layouts)
                    self.layouts.append(layout)
                    self._layout_ids[key] = lid
                tid = len(self.templates)
                self.templates.append(Template(m.col, lid, layout.length, m.split, m.time_dyn,
                                               m.value_dyn, _zeroed(m.payload, layout)))
                layout.templates.append(tid)
                layout.pending.append(static[j : j + 1])
                per_pv = self.by_pv.setdefault(m.col, {})
                per_pv.pop(layout.length, None)
                per_pv[layout.length] = tid
                while len(per_pv) > MAX_TEMPLATES_PER_PV:
                    del per_pv[next(iter(per_pv))]
                self.blocked.pop(m.col, None)
                self._dirty = True
                results[i] = True
        return results

    def _refresh(self) -> None:
        if not self._dirty:
            return
        keys: list[int] = []
        tids: list[int] = []
        for col, per_pv in self.by_pv.items():
            for length, tid in per_pv.items():
                keys.append(col << 32 | length)
                tids.append(tid)
        k = np.array(keys, np.int64)
        order = np.argsort(k)
        self._keys = k[order]
        self._key_tid = np.array(tids, np.int64)[order]
        ts = self.templates
        s = [t.split for t in ts]
        self._consts = {
            "time": np.array([x.time_ns for x in s], np.int64),
            "severity": np.array([x.severity for x in s], np.int64),
            "status": np.array([x.status for x in s], np.int64),
            "user_tag": np.array([x.user_tag for x in s], np.int64),
            "flags": np.array([x.flags for x in s], np.uint8),
            "kind": np.array([x.kind for x in s], np.uint8),
            "dtype": np.array([x.dtype for x in s], np.uint8),
            "ival": np.array([x.ival for x in s], np.int64),
            "fval": np.array([x.fval for x in s], np.float64),
        }
        for layout in self.layouts:
            if layout.pending:
                layout.static = np.concatenate([layout.static, *layout.pending])
                layout.pending = []
        self._layout_of = np.array([t.layout for t in ts], np.int64)
        local = np.zeros(len(ts), np.int64)
        for layout in self.layouts:
            local[layout.templates] = np.arange(len(layout.templates))
        self._local = local
        self._dirty = False

    def compact(self) -> None:
        """Forget templates no PV uses any more (template ids change: call between takes)."""
        live = sorted(t for per_pv in self.by_pv.values() for t in per_pv.values())
        if len(self.templates) <= 2 * len(live) + 64:
            return
        self._refresh()
        old_templates, old_layouts, old_local = self.templates, self.layouts, self._local
        self.templates, self.layouts, self._layout_ids = [], [], {}
        layout_map: dict[int, int] = {}
        new_ids: dict[int, int] = {}
        statics: list[list[npt.NDArray[np.uint64]]] = []
        for tid in live:
            t = old_templates[tid]
            lay = old_layouts[t.layout]
            lid = layout_map.get(t.layout)
            if lid is None:
                lid = layout_map[t.layout] = len(self.layouts)
                self.layouts.append(Layout(lay.length, lay.fields, lay.array))
                self._layout_ids[(lay.length, lay.fields, lay.array)] = lid
                statics.append([])
            new_ids[tid] = len(self.templates)
            self.layouts[lid].templates.append(len(self.templates))
            statics[lid].append(lay.static[old_local[tid] : old_local[tid] + 1])
            self.templates.append(replace(t, layout=lid))
        for layout, rows in zip(self.layouts, statics, strict=True):
            layout.static = np.concatenate(rows)
        for per_pv in self.by_pv.values():
            for length, tid in per_pv.items():
                per_pv[length] = new_ids[tid]
        self._dirty = True

    # --- decoding -----------------------------------------------------------------------------
    def lookup(self, cols: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]
               ) -> npt.NDArray[np.int64]:
        """The template for each (PV column, payload length), -1 if none."""
        self._refresh()
        keys = self._keys
        if not len(keys) or not len(cols):
            return np.full(len(cols), -1, np.int64)
        want = cols << 32 | lengths
        at = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
        tid: npt.NDArray[np.int64] = np.where(keys[at] == want, self._key_tid[at], -1)
        return tid

    def _fill(self, r: npt.NDArray[np.int64], th: npt.NDArray[np.int64], *, out: Columns,
              pieces: list[Piece], cols: dict[str, Any], hit: npt.NDArray[np.bool_]) -> None:
        """Columns of matched rows ``r`` (templates ``th``) from the read ``cols``[hit]."""
        c = self._consts
        out.tid[r] = th
        out.flags[r] = c["flags"][th]
        out.kind[r] = c["kind"][th]
        if "sec" in cols:
            out.time[r] = cols["sec"][hit] * _NS_PER_S + cols["ns"][hit]
        else:
            out.time[r] = c["time"][th]
        out.severity[r] = cols["sev"][hit] if "sev" in cols else c["severity"][th]
        out.status[r] = cols["stat"][hit] if "stat" in cols else c["status"][th]
        out.user_tag[r] = cols["tag"][hit] if "tag" in cols else c["user_tag"][th]
        value = cols.get("value")
        if value is None:
            value = cols.get("index")
        if value is None:
            out.dtype[r] = c["dtype"][th]
            out.ival[r] = c["ival"][th]
            out.fval[r] = c["fval"][th]
            if "array" in cols:
                arr = cols["array"][hit]
                out.size[r] = arr.shape[1]
                code = _F32_CODE if arr.dtype == np.float32 else _F64_CODE
                pieces.append((r, arr, code))
        elif value.dtype.kind == "f":
            out.dtype[r] = c["dtype"][th]
            out.ival[r] = 0
            out.fval[r] = value[hit].astype(np.float64)
        else:
            big_v = cols.get("value_big")
            if big_v is not None:
                out.dtype[r] = np.where(big_v[hit], _UINT64_CODE, _INT64_CODE)
            else:
                out.dtype[r] = c["dtype"][th]
            out.ival[r] = value[hit]
            out.fval[r] = 0.0

    def decode_run(self, big: npt.NDArray[np.uint8], rows: npt.NDArray[np.int64], *,
                   at: int, msg_len: int, start: int, tid: int, out: Columns,
                   pieces: list[Piece], msgs: list[bytes] | None = None
                   ) -> npt.NDArray[np.bool_]:
        """Decode ``len(rows)`` payloads of template ``tid`` in place: message ``k`` is
        ``big[at + k * msg_len :]``, its payload at ``start`` in it. ``big`` (writable, padded
        with :data:`PAD`) gets its dynamic bytes and the bytes between payloads zeroed; array
        pieces are views of it, or :class:`RawArrays` of ``msgs`` (the messages) if given.
        Returns which rows matched."""
        self._refresh()
        n = len(rows)
        tmpl = self.templates[tid]
        layout = self.layouts[tmpl.layout]
        m = msg_len
        length = layout.length
        base = at + start
        u8 = np.uint8

        def rows_of(a: int, k: int, size: int, step: int = 1) -> npt.NDArray[np.uint8]:
            return np.ndarray((k, size), u8, big, base + a, (m, step))

        mat = rows_of(0, n, layout.width)
        ok, cols = layout.read(mat, array=False)
        for f in layout.fields:
            a, b = f.span
            rows_of(a, n, b - a)[...] = 0
        zero = np.frombuffer(tmpl.zero, np.uint8)
        if layout.array is None:
            if n > 1 and m > length:
                rows_of(length, n - 1, m - length)[...] = 0
            diff = np.flatnonzero(_shift_diff(big[base : base + (n - 1) * m + length], m, n))
            segs = [(0, length)]
        else:
            first, count, marker = layout.array
            step = 1 + _width(marker)
            end = first + count * step
            marks = rows_of(first, n, count, step)
            ok &= (marks == marker).all(axis=1)
            segs = [(0, first), (end, length)]
            differs = np.zeros(n, np.bool_)
            for a, b in segs:
                if b > a:
                    seg = rows_of(a, n, b - a)
                    differs[1:] |= (seg[1:] != seg[:-1]).any(axis=1)
            diff = np.flatnonzero(differs)
        # a row equal to the previous one (dynamic bytes zeroed) matches as that one does;
        # the first row and every row that differs from its predecessor: against the template
        starts = np.concatenate(([0], diff))
        good = np.ones(len(starts), np.bool_)
        for a, b in segs:
            if b > a:
                good &= (rows_of(a, n, b - a)[starts] == zero[a:b]).all(axis=1)
        is_start = np.zeros(n, np.int64)
        is_start[starts] = 1
        hit = good[np.cumsum(is_start) - 1] & ok
        if not hit.any():
            return hit
        r = rows[hit] if not hit.all() else rows
        self._fill(r, np.full(len(r), tid, np.int64), out=out, pieces=pieces, cols=cols,
                   hit=hit)
        if layout.array is not None:
            first, count, marker = layout.array
            step = 1 + _width(marker)
            out.size[r] = count
            code = _F32_CODE if marker == 0xCA else _F64_CODE
            if msgs is not None:
                kept = msgs if len(r) == n else [msgs[i] for i in np.flatnonzero(hit).tolist()]
                pieces.append((r, RawArrays(kept, start + first + 1, m, count, marker), code))
            else:
                be = np.ndarray((n, count), _FLOAT_FMT[marker], big, base + first + 1,
                                (m, step))
                pieces.append((r, be if len(r) == n else be[hit], code))
        return hit

    def decode(
        self,
        big: npt.NDArray[np.uint8],
        pos: npt.NDArray[np.int64],
        tids: npt.NDArray[np.int64],
        rows: npt.NDArray[np.int64],
        *,
        out: Columns,
        pieces: list[Piece],
    ) -> npt.NDArray[np.bool_]:
        """Decode payloads at ``pos`` in ``big`` (padded with :data:`PAD`) with templates
        ``tids``; matched rows get their columns in ``out`` at ``rows`` (arrays go to
        ``pieces``). ``rows`` ascend. Returns which rows matched."""
        self._refresh()
        matched = np.zeros(len(tids), np.bool_)
        if not len(tids):
            return matched
        lay = self._layout_of[tids]
        order = np.argsort(lay * len(self.templates) + tids, kind="stable")
        ls = lay[order]
        bounds = np.flatnonzero(np.diff(ls)) + 1
        for sel in np.split(order, bounds):
            layout = self.layouts[int(lay[sel[0]])]
            t = tids[sel]
            mat = sliding_window_view(big, layout.width)[pos[sel]]
            ok, cols = layout.read(mat)
            z = layout.static_bytes(mat)
            # static bytes: a row equal to the previous row of its template matches as that
            # one does; the first row of every run is compared with the template
            k = len(t)
            starts = run_starts(t)
            starts |= _shift_diff(z.reshape(-1).view(np.uint8), z.shape[1] * 8, k)
            first = np.flatnonzero(starts)
            ref = layout.static[self._local[t[first]]]
            good = ~(z[first] != ref).any(axis=1)
            hit = good[np.cumsum(starts) - 1] & ok
            matched[sel] = hit
            if not hit.any():
                continue
            self._fill(rows[sel][hit], t[hit], out=out, pieces=pieces, cols=cols, hit=hit)
        return matched


def run_starts(keys: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """Where a run of equal ``keys`` begins: row 0 and every row whose key differs from the
    previous row's (``keys`` non-empty)."""
    starts = np.empty(len(keys), np.bool_)
    starts[0] = True
    np.not_equal(keys[1:], keys[:-1], out=starts[1:])
    return starts


def _shift_diff(region: npt.NDArray[np.uint8], m: int, n: int) -> npt.NDArray[np.bool_]:
    """Which rows ``k`` (1 <= k < n) of ``region`` (row ``k`` at ``k * m``) may differ from
    row ``k - 1`` (a superset: a compared word may straddle two rows)."""
    mask = np.zeros(n, np.bool_)
    tot = len(region) - m
    if n < 2 or tot <= 0:
        return mask
    w = tot // 8 * 8
    found: list[npt.NDArray[np.int64]] = []
    if w:
        ne = region[m : m + w].view(_U64) != region[:w].view(_U64)
        if ne.any():
            p = np.flatnonzero(ne) * 8
            found += [p, p + 7]
    if w < tot:
        tail = np.flatnonzero(region[m + w :] != region[w:tot])
        if len(tail):
            found.append(tail + w)
    for p in found:
        k = p // m + 1
        mask[k[k < n]] = True
    return mask


def _same_columns(split: Split, cols: dict[str, Any], time_dyn: bool, value_dyn: bool,
                  j: int = 0) -> bool:
    """The self-check: does the vectorized reading of learning payload ``j`` give ``split``?"""
    if time_dyn and int(cols["sec"][j]) * _NS_PER_S + int(cols["ns"][j]) != split.time_ns:
        return False
    if "sev" in cols and int(cols["sev"][j]) != split.severity:
        return False
    if "stat" in cols and int(cols["stat"][j]) != split.status:
        return False
    if "tag" in cols and int(cols["tag"][j]) != split.user_tag:
        return False
    if not value_dyn:
        return split.array is None
    if "array" in cols:
        arr = cols["array"][j]
        ref = split.array
        return (
            ref is not None
            and ref.dtype == arr.dtype
            and ref.shape == arr.shape
            and ref.tobytes() == arr.tobytes()
            and split.ival == 0
            and split.fval == 0.0
        )
    if split.array is not None:
        return False
    value = cols["value"] if "value" in cols else cols["index"]
    if value.dtype.kind == "f":
        fval = float(value.astype(np.float64)[j])
        same_bits = np.float64(fval).tobytes() == np.float64(split.fval).tobytes()
        return same_bits and split.ival == 0 and split.dtype in (_F32_CODE, _F64_CODE)
    big = cols.get("value_big")
    dtype = _UINT64_CODE if big is not None and bool(big[j]) else None
    if split.kind not in {_KIND_ENUM, _KIND_BOOL}:
        if dtype is None:
            dtype = _INT64_CODE
        if split.dtype != dtype:
            return False
    elif big is not None and bool(big[j]):
        return False
    return int(value[j]) == split.ival and split.fval == 0.0
