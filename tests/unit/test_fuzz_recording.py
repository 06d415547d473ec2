"""Malformed and hostile content that the decoder lets through reaches the HDF5 sink: the
segment must still be finalized, readable and pass ``verify``."""

from __future__ import annotations

from pathlib import Path

from k2eg_sequences import MSGPACK_HEADERS, T0, iteration, ntscalar

from recorder.client.assembler import IterationAssembler
from recorder.client.wire import Record
from recorder.reader import open_file
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions
from recorder.verify import verify_file


def _record(tmp_path: Path, msgs: list[bytes]) -> tuple[Path, IterationAssembler]:
    asm = IterationAssembler()
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="fuzz")
    records = [Record("t", 0, i, raw, MSGPACK_HEADERS) for i, raw in enumerate(msgs)]
    for event in (*asm.feed_many(records, 0.0), *asm.close()):
        rec.handle(event)
    files = rec.close()
    assert rec.status == "complete", rec.reason
    (final,) = files
    return final, asm


def test_a_pv_named_with_nul_does_not_fail_the_segment(tmp_path: Path) -> None:
    """A data message whose PV key holds a NUL (HDF5 names and strings end at NUL) made the
    finalization fail ('VLEN strings do not support embedded NULLs'): the run failed at its
    next rotation or stop and `recover` could never finalize the .partial. It is counted as
    malformed and skipped; the other PVs are recorded."""
    msgs = []
    for k, sequenced in ((1, True), (2, False)):
        batch = [("GOOD", ntscalar(1.0)), ("BAD\x00PV", ntscalar(2.0))]
        msgs += [m.raw for m in iteration("s", k, [(T0 + k, batch)], sequenced=sequenced)]
    final, asm = _record(tmp_path, msgs)
    assert asm.counters["malformed.bad_type"] == 2
    with open_file(final) as f:
        assert list(f.pv_names) == ["GOOD"]
        assert f.values("GOOD").tolist() == [1.0, 1.0]
    assert verify_file(final, data=True).ok
