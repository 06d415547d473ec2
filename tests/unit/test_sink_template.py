"""Template decoding (the sink's fast path) must give exactly what the slow path gives.

Every stream is fed three times: through :class:`RecordingBuffer` with templates, with
``fast=False`` (``split_sample`` for every row; the FlushBatches must be identical, array by
array, byte pool included) and through the buffer as it was before templates
(``legacy_buffer``; same content once byte-pool offsets are resolved, since strings and
metadata JSON are now added to the byte pool at flush time).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from legacy_buffer import RecordingBuffer as LegacyBuffer
from pv_mutations import FIELD_MUTATIONS, mutated_iterations

from recorder.client.events import (
    IncompleteReason,
    IterationClosed,
    IterationEvent,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.values import PVSample
from recorder.sim.encoding import Float32, Float32Array, pack
from recorder.sim.pvs import parse_pv, pv_structure
from recorder.sinks.buffer import FlushBatch, RecordingBuffer
from recorder.sinks.codec import DTYPE_CODES, split_sample
from recorder.sinks.codec import STRING_DTYPE_CODE as STRING_CODE
from recorder.sinks.packed import PackedSamples
from recorder.sinks.process_codec import _decode_event, _Encoder, _new_packer, _unpack
from recorder.sinks.template import TemplateSet, walk

T0 = 1_763_700_000 * 1_000_000_000
SIM_PVS = [
    "SIM:AI:DOUBLE:1", "SIM:AI:FLOAT:2", "SIM:AI:LONG:3", "SIM:AI:INT:4", "SIM:AI:SHORT:5",
    "SIM:AI:BYTE:6", "SIM:AI:ULONG:7", "SIM:AI:UINT:8", "SIM:AI:USHORT:9", "SIM:AI:UBYTE:10",
    "SIM:BI:BOOL:11", "SIM:SI:STRING:12", "SIM:MBBI:ENUM:13", "SIM:WF:DOUBLE:14:N40",
    "SIM:WF:FLOAT:15:N20", "SIM:WF:INT:16", "SIM:WFVAR:DOUBLE:17:N5", "SIM:TABLE:18",
    "SIM:IMG:UBYTE:19:S4x3", "SIM:IMG:DOUBLE:20:S3x2", "SIM:WF:STRING:21:N3",
]  # fmt: skip


# ------------------------------------------------------------------------------ building
def message(pv: str, struct_: Any, k: int, *, trailer: bytes = b"") -> PVSample:
    """A lazily-built sample as the wire decoder makes it: the PV map at the end of a data
    message (``trailer``: extra bytes after it, so that ``end`` is given)."""
    head = pack({"message_type": 1, "timestamp": 1_763_700_000_000 + k, "iter_index": k,
                 "msg_seq": k * 7})
    head = bytes([0x85]) + head[1:] + pack(pv)
    body = pack(struct_)
    raw = head + body + trailer
    return PVSample.from_raw(pv, raw, len(head), len(head) + len(body) if trailer else None)


def eager(pv: str, struct_: Any) -> PVSample:
    """A hand-built sample with the same content (its bytes are not kept)."""
    raw = pack(struct_)
    lazy = PVSample.from_raw(pv, raw, 0)
    return PVSample(pv, msgpack.unpackb(raw), lazy.float32_paths)


def sim(pv: str, k: int, wall_ns: int) -> dict[str, Any]:
    return pv_structure(parse_pv(pv), k, wall_ns)


def iteration(k: int, samples: list[PVSample], *, batches: int = 1,
              status: IterationStatus = IterationStatus.COMPLETE) -> list[IterationEvent]:
    """Open, values (in ``batches`` events), close of iteration ``k``."""
    events: list[IterationEvent] = [IterationOpened("t", "snap", k, T0 + k, offset=10 * k)]
    step = max(1, -(-len(samples) // batches))
    for b in range(0, len(samples), step):
        events.append(ValuesReceived("t", k, b + 1, T0 + k, tuple(samples[b : b + step]),
                                     offset=10 * k + 1 + b // step))
    reason = None if status is IterationStatus.COMPLETE else IncompleteReason.GATEWAY_ERROR
    events.append(IterationClosed("t", "snap", k, status, reason, T0 + k, T0 + k + 1,
                                  error_message="" if reason is None else f"boom {k}",
                                  n_values=len(samples), offset=10 * k + 9))
    return events


# ------------------------------------------------------------------------------ comparing
def feed(make: Callable[[], RecordingBuffer | LegacyBuffer], events: list[IterationEvent],
         flush_every: int, rotate_every: int = 0) -> list[list[Any]]:
    """Batches (per segment) taken every ``flush_every`` events; the segment rotates
    (carry_over) every ``rotate_every`` events."""
    buf = make()
    out: list[list[Any]] = [[]]
    for i, ev in enumerate(events, 1):
        buf.handle(ev)
        if i % flush_every == 0:
            out[-1].append(buf.take())
        if rotate_every and i % rotate_every == 0:
            out[-1].append(buf.take())
            buf = buf.carry_over()
            buf.activate_oldest()
            out.append([])
    buf.close_open("recording_stopped")
    out[-1].append(buf.take())
    return out


def assert_same_batch(a: FlushBatch, b: FlushBatch) -> None:
    """Equal batches, except where in its pool an array row's elements are (the fast path
    copies each decoded piece in one stretch): :func:`resolved` compares those elements."""
    for group in ("samples", "meta", "iterations", "tags", "pvs"):
        da, db = getattr(a, group), getattr(b, group)
        assert da.keys() == db.keys(), group
        for k in da:
            assert da[k].dtype == db[k].dtype, (group, k)
            if group == "samples" and k == "offset":
                text = da["dtype"] == STRING_CODE
                assert da[k][text].tobytes() == db[k][text].tobytes()
                assert np.array_equal(da[k] >= 0, db[k] >= 0)
                continue
            assert da[k].tobytes() == db[k].tobytes(), (group, k)
    assert a.pools.keys() == b.pools.keys()
    for code in a.pools:
        assert a.pools[code].dtype == b.pools[code].dtype
        assert a.pools[code].size == b.pools[code].size, code
    assert a.byte_pool.tobytes() == b.byte_pool.tobytes()
    assert a.new_pvs == b.new_pvs
    assert a.offsets == b.offsets


def resolved(batches: list[Any]) -> dict[str, Any]:
    """Everything a batch stream says, with byte-pool and element-pool offsets replaced by
    the bytes and the elements they point at."""
    pool = b"".join(bytes(x.byte_pool) for x in batches)
    elements: dict[int, Any] = {}
    for x in batches:
        for code, arr in x.pools.items():
            elements.setdefault(code, []).append(arr)
    elements = {k: np.concatenate(v) for k, v in elements.items()}

    def text(o: int, n: int) -> bytes:
        return pool[o : o + n] if o >= 0 else b""

    out: dict[str, Any] = {"samples": [], "meta": [], "iterations": [], "tags": [],
                           "pvs": [], "pools": {k: (v.dtype, v.size) for k, v in elements.items()},
                           "offsets": []}
    for x in batches:
        s = x.samples
        for i in range(len(s["pv"])):
            row: dict[str, Any] = {k: s[k][i].tobytes() for k in s if k != "offset"}
            o, n, code = int(s["offset"][i]), int(s["size"][i]), int(s["dtype"][i])
            if code == STRING_CODE:
                row["offset"] = text(o, n)
            elif o >= 0:
                row["offset"] = elements[code][o : o + n].tobytes()
                assert len(row["offset"]) == n * elements[code].itemsize
            else:
                row["offset"] = o
            out["samples"].append(row)
        m = x.meta
        out["meta"] += [(int(p), int(r), text(int(o), int(n)))
                        for p, r, o, n in zip(m["pv"], m["row"], m["offset"], m["size"],
                                              strict=True)]
        it = x.iterations
        for i in range(len(it["iter_index"])):
            it_row = {k: int(it[k][i]) for k in it}
            it_row["error_message"] = text(it_row["error_message"],
                                           it_row["error_message_size"])
            out["iterations"].append(it_row)
        t = x.tags
        out["tags"] += [(int(i), text(int(o), int(n)))
                        for i, o, n in zip(t["iter_index"], t["offset"], t["size"], strict=True)]
        out["pvs"] += [text(int(o), int(n)) for o, n in zip(x.pvs["offset"], x.pvs["size"],
                                                             strict=True)]
        out["pvs"] += x.new_pvs
        out["offsets"].append(x.offsets)
    return out


def assert_tiles(batch: FlushBatch) -> None:
    """The array rows of a batch cover each of its pools exactly once (no gap, no overlap)."""
    s = batch.samples
    for code, pool in batch.pools.items():
        rows = np.flatnonzero((s["offset"] >= 0) & (s["dtype"] == code))
        offsets, sizes = s["offset"][rows], s["size"][rows]
        order = np.argsort(offsets, kind="stable")
        starts, ends = offsets[order], offsets[order] + sizes[order]
        assert int(sizes.sum()) == pool.size, code
        assert (starts[1:] == ends[:-1]).all(), code


def through_pipe(events: list[IterationEvent]) -> list[IterationEvent]:
    """The events as a writer process gets them (the pipe's codec, bytes and all): the
    lazily-built samples of an event arrive as one :class:`PackedSamples`."""
    enc, packer = _Encoder(), _new_packer()
    return [_decode_event(_unpack(packer.pack(enc.event(ev)[0]))) for ev in events]


def check(events_of: Callable[[], list[IterationEvent]], flush_every: int = 7,
          rotate_every: int = 0) -> list[FlushBatch]:
    """Feed fresh copies of the stream (samples cache their decoding) the three ways, and
    the fast way as a writer process gets it (:func:`through_pipe`)."""
    fast = feed(RecordingBuffer, events_of(), flush_every, rotate_every)
    slow = feed(lambda: RecordingBuffer(fast=False), events_of(), flush_every, rotate_every)
    legacy = feed(LegacyBuffer, events_of(), flush_every, rotate_every)
    piped = feed(RecordingBuffer, through_pipe(events_of()), flush_every, rotate_every)
    assert [len(x) for x in fast] == [len(x) for x in slow] == [len(x) for x in legacy]
    assert [len(x) for x in piped] == [len(x) for x in fast]
    for seg_a, seg_p in zip(fast, piped, strict=True):
        for p in seg_p:
            assert_tiles(p)
        assert resolved(seg_a) == resolved(seg_p)
    for seg_a, seg_b in zip(fast, slow, strict=True):
        for a, b in zip(seg_a, seg_b, strict=True):
            assert_same_batch(a, b)
            assert_tiles(a)
            assert_tiles(b)
        assert resolved(seg_a) == resolved(seg_b)
    for seg_a, seg_c in zip(fast, legacy, strict=True):  # byte offsets restart per segment
        assert resolved(seg_a) == resolved(seg_c)
    return [b for seg in fast for b in seg]


def fast_rows(batches: list[FlushBatch]) -> int:
    return sum(len(b.samples["pv"]) for b in batches)


# ------------------------------------------------------------------------------ streams
def sim_stream(n_iter: int = 12, *, batches: int = 1, eager_every: int = 0) -> list[
        IterationEvent]:
    events: list[IterationEvent] = []
    for k in range(n_iter):
        wall = T0 + k * 100_000_000 + (k * 7919) % 1000
        samples = []
        for j, pv in enumerate(SIM_PVS):
            struct_ = sim(pv, k, wall)
            if eager_every and (k + j) % eager_every == 0:
                samples.append(eager(pv, struct_))
            else:
                samples.append(message(pv, struct_, k, trailer=b"\xc0" * (j % 2)))
        events += iteration(k, samples, batches=batches)
    return events


def test_sim_pvs_every_family() -> None:
    batches = check(lambda: sim_stream(15, batches=2), flush_every=5)
    assert fast_rows(batches) == 15 * len(SIM_PVS)


STEADY = ["SIM:AI:DOUBLE:1", "SIM:AI:FLOAT:2", "SIM:AI:LONG:3", "SIM:BI:BOOL:4",
          "SIM:MBBI:ENUM:5", "SIM:WF:DOUBLE:6:N50", "SIM:WF:FLOAT:7:N9"]


def steady_stream(first: int, n_iter: int, pvs: list[str] = STEADY,
                  tag_of: Callable[[int, int], Any] | None = None) -> list[IterationEvent]:
    """PVs whose structure does not change: only values, timestamps, alarm numbers (and
    ``timeStamp.userTag = tag_of(k, j)`` if given)."""
    events: list[IterationEvent] = []
    for k in range(first, first + n_iter):
        samples = []
        for j, pv in enumerate(pvs):
            s = sim(pv, 0, T0 + k * 100_000_000 + 70_000 + j)
            if tag_of is not None:
                s["timeStamp"]["userTag"] = tag_of(k, j)
            if pv.startswith("SIM:AI:DOUBLE"):
                s["value"] = float(k) / 7.0
                s["alarm"]["severity"] = k % 3
            elif pv.startswith("SIM:AI:FLOAT"):
                s["value"] = Float32(k / 3.0)
            elif pv.startswith("SIM:AI:LONG"):
                s["value"] = 2**40 + k  # one encoding width
            elif pv.startswith("SIM:BI"):
                s["value"] = k % 2 == 0
            elif pv.startswith("SIM:MBBI"):
                s["value"]["index"] = k % 4
            elif pv.startswith("SIM:WF:DOUBLE"):
                s["value"] = [float(k + i) for i in range(50)]
            else:
                s["value"] = Float32Array([k * 0.5 + i for i in range(9)])
            samples.append(message(pv, s, k))
        events += iteration(k, samples)
    return events


def spy_split_sample(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The PV of every sample the buffer hands to split_sample (the slow path), from now on."""
    import recorder.sinks.buffer as buffer_module

    calls: list[str] = []
    real = buffer_module.split_sample

    def spy(sample: PVSample) -> Any:
        calls.append(sample.pv)
        return real(sample)

    monkeypatch.setattr(buffer_module, "split_sample", spy)
    return calls


def test_templates_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous: once learned, a steady stream is decoded without split_sample."""
    calls = spy_split_sample(monkeypatch)
    buf = RecordingBuffer()
    for ev in steady_stream(0, 3):
        buf.handle(ev)
    first = buf.take()
    assert sorted(set(calls)) == sorted(STEADY)  # learned from one sample each
    assert len(buf.templates.templates) == len(STEADY)
    calls.clear()
    for ev in steady_stream(3, 40):
        buf.handle(ev)
    second = buf.take()
    assert calls == []
    assert len(second.samples["pv"]) == 40 * len(STEADY)
    assert len(second.meta["pv"]) == 0 and len(first.meta["pv"]) == len(STEADY)
    # and the same as the slow path
    check(lambda: steady_stream(0, 43), flush_every=9)


def piped_stream(first: int, n_iter: int) -> list[IterationEvent]:
    """Per iteration, in one event: a waveform whose PV map is larger than BIG_MESSAGE, two
    small scalars, a string (decoded one by one) and a second large waveform."""
    out: list[IterationEvent] = []
    for k in range(first, first + n_iter):
        wall = T0 + k * 100_000_000 + 70_000
        w1 = sim("SIM:WF:DOUBLE:1:N300", 0, wall)
        w1["value"] = [k + i / 8 for i in range(300)]
        w2 = sim("SIM:WF:FLOAT:2:N600", 0, wall + 1)
        w2["value"] = Float32Array([k - i / 4 for i in range(600)])
        a = sim("SIM:AI:DOUBLE:3", 0, wall + 2)
        a["value"] = k / 7
        b = sim("SIM:AI:LONG:4", k, wall + 3)
        text = sim("SIM:SI:STRING:5", k, wall + 4)
        out += iteration(k, [message("W1", w1, k), message("A", a, k), message("S", text, k),
                             message("B", b, k, trailer=b"\xc0"), message("W2", w2, k)])
    return out


def test_piped_samples_are_decoded_where_they_lie_in_the_blob(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer process gets each event's samples as one PackedSamples (the pipe's blob and
    positions): the buffer decodes them in the blob, with no sample object per row; only a
    row decoded one by one (learning, a string) becomes a sample, and large PV maps are
    copied out of the blob into their own messages. The file's content is the same."""
    import recorder.sinks.buffer as buffer_module

    assert len(pack(sim("SIM:WF:DOUBLE:1:N300", 0, T0))) > buffer_module.BIG_MESSAGE
    events = through_pipe(piped_stream(0, 40))
    packs = [ev.samples for ev in events if isinstance(ev, ValuesReceived)]
    assert len(packs) == 40 and all(type(p) is PackedSamples for p in packs)
    calls = spy_split_sample(monkeypatch)
    buf = RecordingBuffer()
    batches = []
    for i, ev in enumerate(events, 1):
        buf.handle(ev)
        if i % 30 == 0:
            batches.append(buf.take())
    batches.append(buf.take())
    assert all(p._samples is None for p in packs)  # never made into samples
    assert sorted(set(calls)) == ["A", "B", "S", "W1", "W2"]
    assert calls.count("S") == 40 and len(calls) == 44  # learning once per PV, strings each
    assert sum(len(b.samples["pv"]) for b in batches) == 40 * 5
    check(lambda: piped_stream(0, 40), flush_every=30)
    check(lambda: piped_stream(0, 40), flush_every=1000, rotate_every=70)


def test_mixed_eager_and_lazy_samples_and_partial_batches() -> None:
    check(lambda: sim_stream(10, batches=3, eager_every=3), flush_every=4)


def test_piped_hand_built_samples_keep_their_float_widths() -> None:
    """Hand-built samples cross the pipe packed with msgpack (every float as float64) and
    their float32 paths beside: a float64 value after a float32 one (same bytes layout)
    must not be decoded with the float32 one's template (nor the other way round)."""
    def events() -> list[IterationEvent]:
        out: list[IterationEvent] = []
        for k in range(12):
            s = sim("SIM:AI:DOUBLE:1", k, T0 + k)
            s["value"] = Float32(1.5) if k % 3 == 1 else 0.1
            s["display"]["limitLow"] = Float32(-2.5) if k % 4 == 2 else -2.5
            out += iteration(k, [eager("A", s)])
        return out

    check(events, flush_every=5)
    buf = RecordingBuffer()
    for ev in through_pipe(events()):
        buf.handle(ev)
    rows = buf.take().samples
    f32, f64 = DTYPE_CODES[np.dtype(np.float32)], DTYPE_CODES[np.dtype(np.float64)]
    assert rows["dtype"].tolist() == [f32 if k % 3 == 1 else f64 for k in range(12)]


def test_overlapping_iterations_pending_samples() -> None:
    def events() -> list[IterationEvent]:
        out: list[IterationEvent] = []
        pv = "SIM:AI:DOUBLE:1"
        wf = "SIM:WF:DOUBLE:2:N8"
        for k in range(0, 12, 2):
            a = [message(pv, sim(pv, k, T0 + k), k), message(wf, sim(wf, k, T0 + k), k)]
            b = [message(pv, sim(pv, k + 1, T0 + k + 1), k + 1),
                 message(wf, sim(wf, k + 1, T0 + k + 1), k + 1)]
            ia, ib = iteration(k, a), iteration(k + 1, b)
            # k+1 opens and gets its values before k's values and tail
            out += [ia[0], ib[0], ib[1], ia[1], ib[2], ia[2]]
        # values after close, values without open
        out.append(ValuesReceived("t", 10, 2, T0, (message(pv, sim(pv, 99, T0), 99),),
                                  offset=500))
        out.append(ValuesReceived("t", 77, 1, T0, (message(pv, sim(pv, 98, T0), 98),),
                                  offset=501))
        return out

    for flush_every in (1, 2, 3, 5, 100):
        check(events, flush_every=flush_every)


def test_segment_rotation_carries_open_iterations() -> None:
    check(lambda: sim_stream(12, batches=2), flush_every=4, rotate_every=9)
    check(lambda: sim_stream(12, batches=2), flush_every=100, rotate_every=5)


def scalar_variants(k: int) -> dict[str, Any]:
    """An NTScalar double whose metadata, alarm and timestamp encodings change."""
    s = sim("SIM:AI:DOUBLE:1", k, T0 + k * 1_000_003)
    s["value"] = [0.5, -0.0, math.inf, float("nan"), 1e300][k % 5]
    if k % 7 == 3:
        s["display"]["limitHigh"] = 20.0  # metadata change (and back)
    if k % 5 == 2:
        s["alarm"] = {"severity": 2, "status": 3, "message": "HIHI"}
    if k % 6 == 4:
        s["alarm"]["message"] = "LOLO"  # same length, other bytes
    ts = s["timeStamp"]
    ts["nanoseconds"] = [5, 200, 70_000, 999_999_999, 123_456_789][k % 5]
    if k % 11 == 5:
        ts["nanoseconds"] = 1_000_000_000  # out of range: stays in the rest
    if k % 13 == 6:
        ts["secondsPastEpoch"] = 2**63  # out of range: stays in the rest
    if k % 13 == 7:
        ts["secondsPastEpoch"] = -5
    if k % 17 == 8:
        s["alarm"]["severity"] = 2**31  # not int32: stays in the rest
    return s


def test_scalar_metadata_alarm_and_time_changes() -> None:
    def events() -> list[IterationEvent]:
        out: list[IterationEvent] = []
        for k in range(120):
            out += iteration(k, [message("A", scalar_variants(k), k),
                                 message("B", scalar_variants(k // 3), k)])
        return out

    check(events, flush_every=13)
    check(events, flush_every=200)


def test_a_structure_seen_before_reuses_its_stored_json() -> None:
    """An alarm message flapping between two texts changes the PV's structure every few
    rows: each change gets its /live/meta row, but the JSON of a structure the PV had before
    in this segment is not stored again (same resolved stream as the old buffer)."""
    def events() -> list[IterationEvent]:
        out: list[IterationEvent] = []
        for k in range(60):
            s = sim("SIM:AI:DOUBLE:1", k, T0 + k * 1_000_003)
            if (k // 3) % 2:
                s["alarm"] = {"severity": 2, "status": 3, "message": "HIHI"}
            out += iteration(k, [message("A", s, k)])
        return out

    for rotate in (0, 45):
        fast = check(events, flush_every=13, rotate_every=rotate)
        legacy = feed(LegacyBuffer, events(), 13, rotate)
        meta = [(int(o), int(n)) for b in fast
                for o, n in zip(b.meta["offset"], b.meta["size"], strict=True)]
        stored = [m for seg in legacy for m in resolved(seg)["meta"]]  # (pv, row, JSON)
        distinct = {m[2] for m in stored}
        assert len(meta) == len(stored) > 10
        # per segment each structure is stored once (offsets restart in the next segment)
        assert len(set(meta)) <= len(distinct) * (2 if rotate else 1) < len(meta)
        assert (sum(len(b.byte_pool) for b in fast)
                < sum(len(b.byte_pool) for seg in legacy for b in seg) * 0.6)


def int_value(k: int) -> int:
    values = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
              -1, -32, -33, -128, -129, -(2**15), -(2**31), -(2**63)]
    return values[k % len(values)]


def test_integers_of_every_width_and_uint64() -> None:
    def events() -> list[IterationEvent]:
        out: list[IterationEvent] = []
        for k in range(90):
            s = sim("SIM:AI:LONG:1", 0, T0 + k)
            s["value"] = int_value(k // 2)
            e = sim("SIM:MBBI:ENUM:2", k, T0 + k)
            e["value"]["index"] = [0, 3, 2**63, 200, -1][k % 5]
            out += iteration(k, [message("I", s, k), message("E", e, k)])
        return out

    check(events, flush_every=11)


def test_float32_values_and_nan_payloads() -> None:
    snan32 = struct.unpack(">f", b"\x7f\x80\x00\x01")[0]  # becomes a quiet NaN on the way
    nan64 = struct.unpack(">d", b"\x7f\xf0\x00\x00\x00\x00\x00\x01")[0]

    def events() -> list[IterationEvent]:
        out: list[IterationEvent] = []
        for k in range(40):
            f = sim("SIM:AI:FLOAT:1", k, T0 + k)
            f["value"] = Float32([1.5, snan32, -0.0, 3.4e38][k % 4])
            d = sim("SIM:AI:DOUBLE:2", k, T0 + k)
            d["value"] = [nan64, 2.5][k % 2]
            w = sim("SIM:WF:FLOAT:3:N4", k, T0 + k)
            w["value"] = Float32Array([snan32, 1.0, float(k), -2.0])
            v = sim("SIM:WF:DOUBLE:4:N3", k, T0 + k)
            v["value"] = [nan64, float(k), -0.0]
            out += iteration(k, [message("F", f, k), message("D", d, k), message("W", w, k),
                                 message("V", v, k)])
        return out

    check(events, flush_every=9)


def test_bool_waveform_lengths_and_empty_arrays() -> None:
    def events() -> list[IterationEvent]:
        out: list[IterationEvent] = []
        for k in range(60):
            b = sim("SIM:BI:BOOL:1", k, T0 + k)
            w = sim("SIM:WF:DOUBLE:2:N3", k, T0 + k)
            w["value"] = [float(i) for i in range([3, 3, 0, 17, 3, 70000 if k == 31 else 2][
                k % 6])]
            out += iteration(k, [message("B", b, k), message("W", w, k)])
        return out

    check(events, flush_every=10)


def test_values_after_close_and_incomplete_iterations() -> None:
    def events() -> list[IterationEvent]:
        out: list[IterationEvent] = []
        for k in range(10):
            samples = [message("A", scalar_variants(k), k)]
            status = IterationStatus.INCOMPLETE if k % 3 == 1 else IterationStatus.COMPLETE
            out += iteration(k, samples, status=status)
            out.append(ValuesReceived("t", k, 9, T0, (message("A", scalar_variants(k + 50),
                                                              k),), late=True, offset=-1))
        return out

    check(events, flush_every=6)


# ------------------------------------------------------------------------------ property
MUTATIONS = (*FIELD_MUTATIONS, "eager", "garbage")


@st.composite
def streams(draw: st.DrawFn) -> list[tuple[int, str, list[tuple[str, dict[str, Any], str]]]]:
    """Iterations of a few PVs with random mutations of their structure."""
    iterations = mutated_iterations(
        draw, max_iterations=25, mutations=MUTATIONS, max_mutations=2, fixed=(dict, list, str),
        values=st.one_of(st.floats(), st.integers(-(2**63), 2**64 - 1), st.booleans()),
        messages=["", "HIHI", "LOLO", "é"], limits=[0, 0.0, -1.0, 1, True])
    out = []
    for k, samples in enumerate(iterations):
        modes = [(pv, s, "eager" if "eager" in muts else "garbage" if "garbage" in muts
                  else "lazy") for pv, s, muts in samples]
        out.append((k, draw(st.sampled_from(["in_order", "overlap"])), modes))
    return out


def build(stream: list[tuple[int, str, list[tuple[str, dict[str, Any], str]]]]
          ) -> list[IterationEvent]:
    events: list[IterationEvent] = []
    held: list[IterationEvent] = []
    for k, order, samples in stream:
        built = []
        for pv, s, mode in samples:
            if mode == "eager":
                built.append(eager(pv, s))
            elif mode == "garbage":  # bytes msgpack-python cannot decode (invalid UTF-8)
                raw = pack(s).replace(b"\xa8NO_ALARM", b"\xa8NO_ALA\xff\xfe")
                built.append(PVSample.from_raw(pv, raw, 0))
            else:
                built.append(message(pv, s, k))
        evs = iteration(k, built)
        if order == "overlap" and not held:
            held = evs  # opened later, closed after the next one
            events.append(evs[0])
            continue
        events += evs[:1] + evs[1:-1]
        if held:
            events += held[1:]
            held = []
        events.append(evs[-1])
    events += held[1:]
    return events


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams(), flush_every=st.integers(1, 30), rotate=st.integers(0, 40))
def test_property_fast_equals_slow(stream: Any, flush_every: int, rotate: int) -> None:
    check(lambda: build(stream), flush_every=flush_every, rotate_every=rotate)


# ------------------------------------------------------------------------------ templates
def test_walker_refuses_malformed_and_duplicates() -> None:
    good = pack(sim("SIM:AI:DOUBLE:1", 0, T0))
    assert walk(good) is not None
    assert walk(good[:-1]) is None
    assert walk(good + b"\xc0") is None
    assert walk(b"\x92\x01\x02") is None
    dup = b"\x82\xa5value\x01\xa5value\x02"
    assert walk(dup) is None


def test_learning_refuses_strings_and_self_check_failures() -> None:
    ts = TemplateSet()
    s = message("S", sim("SIM:SI:STRING:1", 0, T0), 0)
    assert s.raw is not None
    assert not ts.learn(0, s.raw, split_sample(s))
    d = message("D", sim("SIM:AI:DOUBLE:1", 0, T0), 0)
    assert d.raw is not None
    split = split_sample(d)
    split.fval += 1.0  # a split that does not describe the payload
    assert not ts.learn(1, d.raw, split)
    assert ts.learn(1, d.raw, split_sample(d))


def iter_samples(batches: list[FlushBatch]) -> Iterator[int]:
    for b in batches:
        yield from b.samples["pv"].tolist()


@pytest.mark.parametrize("flush_every", [3, 1000])
def test_row_order_is_arrival_order(flush_every: int) -> None:
    batches = check(lambda: sim_stream(6, batches=2), flush_every=flush_every)
    cols = list(iter_samples(batches))
    assert cols == [c for _ in range(6) for c in range(len(SIM_PVS))]


# ------------------------------------------------------------------------------ decoding paths
# Small messages are joined in arrival order and gathered by layout; large ones are joined by
# template and long runs decoded in place. Force each path (and chunk boundaries everywhere).
PATHS = {
    "in_place": {"BIG_MESSAGE": 0, "RUN_MIN": 2, "RUN_MIN_BYTES": 0},
    "in_place_small_chunks": {"BIG_MESSAGE": 0, "RUN_MIN": 2, "RUN_MIN_BYTES": 0,
                              "CHUNK_BYTES": 3000},
    "sorted_gathered": {"BIG_MESSAGE": 0, "RUN_MIN": 10**9, "RUN_MIN_BYTES": 10**18},
    "arrival_small_chunks": {"BIG_MESSAGE": 10**18, "CHUNK_BYTES": 1500},
}


def force(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    import recorder.sinks.buffer as buffer_module

    for name, value in PATHS[path].items():
        monkeypatch.setattr(buffer_module, name, value)


def variants_stream() -> list[IterationEvent]:
    out: list[IterationEvent] = []
    for k in range(60):
        out += iteration(k, [message("A", scalar_variants(k), k),
                             message("B", scalar_variants(k // 3), k, trailer=b"\xc0\xc0")])
    return out


def waveform_stream() -> list[IterationEvent]:
    """Waveforms whose ns width changes (several templates per PV), a metadata change and
    back, an element of another type (same length), float32 with a signaling NaN."""
    snan32 = struct.unpack(">f", b"\x7f\x80\x00\x01")[0]
    out: list[IterationEvent] = []
    for k in range(40):
        w = sim("SIM:WF:DOUBLE:1:N30", k, T0 + k)
        w["timeStamp"]["nanoseconds"] = 500 if k % 4 == 0 else 70_000 + k
        w["value"] = [float(k * 30 + i) for i in range(30)]
        if 10 <= k < 13:
            w["display"]["units"] = "xx"  # same length, other bytes
        if k == 20:
            w["value"][7] = 2**62  # an int element: same length, other marker
        f = sim("SIM:WF:FLOAT:2:N12", k, T0 + k)
        f["value"] = Float32Array([snan32 if i == 3 else k + i / 4 for i in range(12)])
        out += iteration(k, [message("W", w, k), message("F", f, k, trailer=b"\xc0")])
    return out


@pytest.mark.parametrize("path", list(PATHS))
def test_decoding_paths_equal_slow_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    force(monkeypatch, path)
    check(lambda: sim_stream(8, batches=2, eager_every=4), flush_every=6)
    check(lambda: steady_stream(0, 30), flush_every=40)
    check(variants_stream, flush_every=25)
    check(variants_stream, flush_every=1000)
    check(waveform_stream, flush_every=33)
    check(waveform_stream, flush_every=1000, rotate_every=50)


@pytest.mark.parametrize("path", ["in_place", "in_place_small_chunks"])
def test_in_place_runs_are_used(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Not vacuous: steady waveforms are decoded in place, their arrays left in the
    messages until the pool is written."""
    import recorder.sinks.buffer as buffer_module
    import recorder.sinks.template as template_module

    force(monkeypatch, path)
    runs: list[int] = []
    raw: list[int] = []
    real_run = template_module.TemplateSet.decode_run
    real_view = template_module.RawArrays.view

    def spy_run(self: TemplateSet, big: Any, rows: Any, **kw: Any) -> Any:
        runs.append(len(rows))
        return real_run(self, big, rows, **kw)

    def spy_view(self: Any) -> Any:
        raw.append(len(self.msgs))
        return real_view(self)

    monkeypatch.setattr(template_module.TemplateSet, "decode_run", spy_run)
    monkeypatch.setattr(template_module.RawArrays, "view", spy_view)
    buf = buffer_module.RecordingBuffer()
    for ev in steady_stream(0, 30):
        buf.handle(ev)
    buf.take()
    runs.clear()
    raw.clear()
    for ev in steady_stream(30, 30):
        buf.handle(ev)
    batch = buf.take()
    assert len(batch.samples["pv"]) == 30 * len(STEADY)
    assert (batch.samples["offset"] >= 0).sum() == 60  # the two waveform PVs
    # (a run cut to one row by a chunk boundary is gathered instead)
    assert 0.9 * 30 * len(STEADY) <= sum(runs) <= 30 * len(STEADY)
    assert 50 <= sum(raw) <= 60


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams(), flush_every=st.integers(1, 30), rotate=st.integers(0, 40),
       path=st.sampled_from(list(PATHS)))
def test_property_paths_equal_slow(stream: Any, flush_every: int, rotate: int,
                                   path: str) -> None:
    with pytest.MonkeyPatch.context() as mp:
        force(mp, path)
        check(lambda: build(stream), flush_every=flush_every, rotate_every=rotate)


def test_steady_waveforms_of_a_pv_are_one_stretch_of_the_pool() -> None:
    """The fast path copies each decoded piece whole: one flush of steady waveforms puts
    each PV's arrays side by side in its pool, in row order (two PVs per pool: in arrival
    order they would alternate)."""
    pvs = [*STEADY, "SIM:WF:DOUBLE:8:N50", "SIM:WF:FLOAT:9:N9"]
    buf = RecordingBuffer()
    for ev in steady_stream(0, 30, pvs):
        buf.handle(ev)
    buf.take()  # templates learned
    for ev in steady_stream(30, 30, pvs):
        buf.handle(ev)
    batch = buf.take()
    assert_tiles(batch)
    s = batch.samples
    arrays = np.flatnonzero(s["offset"] >= 0)
    assert len(arrays) == 120
    for pv in np.unique(s["pv"][arrays]).tolist():
        rows = arrays[s["pv"][arrays] == pv]
        offsets, sizes = s["offset"][rows], s["size"][rows]
        assert len(rows) == 30 and (sizes == sizes[0]).all()
        assert (np.diff(offsets) == sizes[0]).all()


def test_samples_sharing_one_message_are_sized_and_decoded_as_their_own() -> None:
    """Several PV maps in one message (not what the client produces, but possible for a
    hand-fed sink): memory is accounted per PV map, not per message, and the batch is the
    same as for one message per PV."""
    import numpy as np

    from recorder.client.events import (
        IterationClosed,
        IterationOpened,
        IterationStatus,
        ValuesReceived,
    )
    from recorder.sim.encoding import pack as _pack
    from recorder.sinks.buffer import RecordingBuffer

    payloads = [_pack({"value": float(i) / 3, "alarm": {"severity": 0, "status": 0,
                                                         "message": ""},
                       "timeStamp": {"secondsPastEpoch": 1_700_000_000 + i,
                                     "nanoseconds": 123_456_789, "userTag": 0}})
                for i in range(200)]
    blob = b"".join(payloads)
    bounds = np.cumsum([0] + [len(p) for p in payloads]).tolist()
    shared = tuple(PVSample.from_raw(f"P{i}", blob, bounds[i], bounds[i + 1])
                   for i in range(200))
    own = tuple(PVSample.from_raw(f"P{i}", p, 0) for i, p in enumerate(payloads))
    batches = []
    for samples in (shared, own):
        buf = RecordingBuffer()
        buf.handle(IterationOpened("t", "s", 1, 1))
        buf.handle(ValuesReceived("t", 1, 1, 1, samples))
        assert buf.buffered_bytes < 2 * len(blob) + 200 * 256, buf.buffered_bytes
        buf.handle(IterationClosed("t", "s", 1, IterationStatus.COMPLETE, None, 1, 1))
        batches.append(buf.take())
    a, b = batches
    for k in a.samples:
        np.testing.assert_array_equal(a.samples[k], b.samples[k], err_msg=k)
    np.testing.assert_array_equal(a.byte_pool, b.byte_pool)


# ------------------------------------------------------------------------------ user tags
def tagged_stream(first: int, n_iter: int, tag_of: Callable[[int, int], Any]
                  ) -> list[IterationEvent]:
    """:func:`steady_stream` with ``timeStamp.userTag = tag_of(k, j)`` (a pulse id...)."""
    return steady_stream(first, n_iter, tag_of=tag_of)


def test_a_changing_user_tag_is_a_column_and_keeps_the_fast_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pulse id in timeStamp.userTag changes every sample: it is taken out into the
    user_tag column (flag 32), the rest stays the same (no metadata entry per sample) and
    the template decodes it (no split_sample once learned)."""
    calls = spy_split_sample(monkeypatch)
    pulse = lambda k, j: 1_000_000 + 3 * k + j  # noqa: E731  (uint32 on the wire)
    buf = RecordingBuffer()
    for ev in tagged_stream(0, 3, pulse):
        buf.handle(ev)
    first = buf.take()
    calls.clear()
    for ev in tagged_stream(3, 40, pulse):
        buf.handle(ev)
    second = buf.take()
    assert calls == []
    assert len(second.meta["pv"]) == 0 and len(first.meta["pv"]) == len(STEADY)
    tags = second.samples["user_tag"]
    assert tags.dtype == np.int32
    expect = [pulse(k, j) for k in range(3, 43) for j in range(len(STEADY))]
    assert tags.tolist() == expect
    assert ((second.samples["flags"] & 32) != 0).all()


@pytest.mark.parametrize("tag_of", [
    lambda k, j: 1_000_000 + 3 * k + j,  # one width: the template's
    lambda k, j: (k * 37 + j) % 300 - 150,  # fixint, int8/uint8, negative: several widths
    lambda k, j: [5, 0, 2**31 - 1, -(2**31), 2**31, True, None, 1.5, 7][(k + j) % 9],
], ids=["pulse", "widths", "edges"])
def test_user_tags_decode_as_the_slow_path(tag_of: Callable[[int, int], Any]) -> None:
    """Zero, out-of-int32, bool, nil and float tags stay in the rest; the fast path gives
    exactly what split_sample gives, and the legacy buffer (via split_sample) agrees."""
    check(lambda: tagged_stream(0, 30, tag_of), flush_every=7)
    check(lambda: tagged_stream(0, 30, tag_of), flush_every=100)
