"""Property test: any PV structure, under any PV name the decoder takes, is recorded into a
segment that is finalized, passes ``verify`` and gives back what was decoded."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from k2eg_sequences import MSGPACK_HEADERS, T0

from recorder.client.assembler import IterationAssembler
from recorder.client.events import ValuesReceived
from recorder.client.wire import Record
from recorder.reader import open_file
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions
from recorder.verify import verify_file

KEYS = st.sampled_from(["value", "alarm", "timeStamp", "display", "labels", "index",
                        "choices", "severity", "status", "message", "secondsPastEpoch",
                        "nanoseconds", "userTag", "dimension", "size", "codec", "uniqueId",
                        "dataTimeStamp", "ubyteValue", "floatValue", "name", "parameters"])
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
    st.floats(width=32), st.text(max_size=6), st.binary(max_size=6),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
)
structures = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(KEYS, st.text(max_size=4), st.integers(-2, 2)), inner,
                        max_size=4),
    ),
    max_leaves=16,
)
pv_maps = st.dictionaries(st.one_of(KEYS, st.text(max_size=4)), structures, max_size=5)
NAMES = st.one_of(
    st.sampled_from(["", ".", "..", "/", "a/b", "%2F", "%00", "%", ".x", "X" * 300]),
    st.text(st.characters(codec="utf-8"), max_size=10),  # NUL: refused by the decoder
)


def _message(k: int, pv: str, body: dict[str, Any], latin1: bool) -> bytes:
    head = {"message_type": 1, "timestamp": T0 + k, "iter_index": k}
    raw = msgpack.packb(head)
    raw = bytes([0x84]) + raw[1:] + msgpack.packb(pv)
    payload = msgpack.packb(body, use_single_float=False)
    if latin1:  # bin -> str of the same bytes: strings that are not UTF-8
        payload = payload.replace(b"\xc4", b"\xd9")
    return raw + payload


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.tuples(NAMES, st.lists(st.tuples(pv_maps, st.booleans()), min_size=1,
                                          max_size=4)),
                min_size=1, max_size=3, unique_by=lambda t: t[0]))
def test_any_structure_under_any_name_is_recorded(pvs: list[Any]) -> None:
    records = []
    for pv, bodies in pvs:
        for k, (body, latin1) in enumerate(bodies, start=1):
            records.append(Record("t", 0, len(records), _message(k, pv, body, latin1),
                                  MSGPACK_HEADERS))
    records.sort(key=lambda r: r.offset)
    with tempfile.TemporaryDirectory() as tmp:
        asm = IterationAssembler()
        rec = HDF5Recording(OutputOptions(directory=Path(tmp)), run_name="fuzz")
        sent: dict[str, list[Any]] = {}
        for event in (*asm.feed_many(records, 0.0), *asm.close()):
            if isinstance(event, ValuesReceived):
                for s in event.samples:
                    sent.setdefault(s.pv, []).append(s.data)
            rec.handle(event)
        files = rec.close()
        assert rec.status == "complete", rec.reason
        (final,) = files
        report = verify_file(final, data=True)
        assert report.ok, [str(p) for p in report.problems]
        with open_file(final) as f:
            for pv, datas in sent.items():
                assert len(f.samples(pv)) == len(datas), pv
                assert len(f.values(pv)) == len(datas), pv
