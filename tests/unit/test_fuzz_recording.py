"""Malformed and hostile content that the decoder lets through reaches the HDF5 sink: the
segment must still be finalized, readable and pass ``verify``."""

from __future__ import annotations

from pathlib import Path

from k2eg_sequences import MSGPACK_HEADERS, T0, iteration, ntscalar, pack

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


def test_pvs_whose_every_value_is_in_the_metadata_pass_verify(tmp_path: Path) -> None:
    """A string PV whose every value is bytes that are not UTF-8 (a Latin-1 text), and a
    table PV whose every table has a NUL in a column name, keep their values in the rows'
    metadata JSON; the finalized file had no `value` for them although /pv_info says
    'string' / 'table', and `verify` (the nightly check) failed the file. `value` holds the
    fill the format promises for such rows."""
    latin1 = b"\x82\xa5value\xa3\xb0C\xff\xa9timeStamp" + pack(
        {"secondsPastEpoch": 1_700_000_000, "nanoseconds": 0, "userTag": 0})
    table = {"labels": ["a\x00"], "value": {"a\x00": [1, 2]}}
    msgs = []
    for k in (1, 2):
        msgs += [m.raw for m in iteration(
            "s", k, [(T0 + k, [("TEXT", {"value": "x"}), ("TABLE", table)])], sequenced=True)]
    # the string PV's values: Latin-1 bytes (the test helpers pack only valid UTF-8)
    msgs = [raw.replace(pack("TEXT") + pack({"value": "x"}), pack("TEXT") + latin1)
            for raw in msgs]
    final, _ = _record(tmp_path, msgs)
    report = verify_file(final, data=True)
    assert report.ok, [str(p) for p in report.problems]
    with open_file(final) as f:
        assert [s.data["value"] for s in f.samples("TEXT")] == ["\udcb0C\udcff"] * 2
        assert [s.data["value"] for s in f.samples("TABLE")] == [{"a\x00": [1, 2]}] * 2


def test_numbers_beyond_int64_do_not_fail_the_recording(tmp_path: Path) -> None:
    """An iter_index, a tail's error code or total_messages beyond int64 (uint64 on the
    wire) made the writer's flush raise OverflowError: the recording failed, and again on
    each resume from the same offsets. Such messages are refused (counted as malformed) or
    the field not known; the good iterations are recorded."""
    good = [m.raw for m in iteration("s", 1, [(T0, [("A", ntscalar(1.0))])], sequenced=True)]
    big_index = [m.raw for m in iteration("s", 2**64 - 1, [(T0 + 1, [("A", ntscalar(2.0))])],
                                          sequenced=True)]
    big_error = [m.raw for m in iteration("s", 3, [(T0 + 2, [("A", ntscalar(3.0))])],
                                          sequenced=False, error=2**63, error_message="e")]
    tail = pack({"message_type": 2, "error": 0, "iter_index": 4, "timestamp": T0 + 3,
                 "snapshot_name": "s", "msg_seq": 3, "total_messages": 2**64 - 1})
    big_total = [m.raw for m in iteration("s", 4, [(T0 + 3, [("A", ntscalar(4.0))])],
                                          sequenced=True)]
    big_total[-1] = tail
    final, asm = _record(tmp_path, good + big_index + big_error + big_total)
    assert asm.counters["malformed.bad_type"] == 3 + 1  # iteration 2's messages, 3's tail
    with open_file(final) as f:
        iterations = f.iterations()
        assert iterations["iter_index"].tolist() == [1, 3, 4]
        # total_messages not known: the tail's msg_seq says it is message 3 of 3
        assert iterations["expected_messages"].tolist()[2] == 3
    assert verify_file(final, data=True).ok


def test_a_tail_error_message_with_nul_does_not_fail_the_segment(tmp_path: Path) -> None:
    """A tail whose error_message held a NUL made finalization fail ('VLEN strings do not
    support embedded NULLs'): the run failed at its next rotation or stop, and recover
    could not finalize the .partial. The final file has U+FFFD for the NUL, as for the other
    texts HDF5 strings cannot hold."""
    msgs = [m.raw for m in iteration("s", 1, [(T0, [("A", ntscalar(1.0))])], sequenced=True,
                                     error=3, error_message="bad\x00PV")]
    final, _ = _record(tmp_path, msgs)
    with open_file(final) as f:
        iterations = f.iterations()
        assert iterations["error_code"].tolist() == [3]
        assert iterations["error_message"].tolist() == ["bad\ufffdPV"]
    assert verify_file(final, data=True).ok


def test_a_tail_error_message_that_is_not_utf8_is_recorded(tmp_path: Path) -> None:
    """A tail whose error_message was not UTF-8 (Latin-1) was dropped as not_msgpack: the
    iteration closed without its tail (incomplete) and its error code was lost."""
    msgs = [m.raw for m in iteration("s", 1, [(T0, [("A", ntscalar(1.0))])], sequenced=True,
                                     error=3, error_message="XdegC")]
    msgs[-1] = msgs[-1].replace(b"XdegC", b"\xb0C...")
    final, asm = _record(tmp_path, msgs)
    assert not any(k.startswith("malformed.") for k in +asm.counters)
    with open_file(final) as f:
        iterations = f.iterations()
        assert iterations["reason"].tolist() == ["gateway_error"]  # not "closed" (no tail)
        assert iterations["error_code"].tolist() == [3]
        assert iterations["error_message"].tolist() == ["\ufffdC..."]
    assert verify_file(final, data=True).ok
