"""The Kafka offset a recording reports durable never runs ahead of what its file holds.

A resumed recording reads on from ``last_durable_offset + 1`` (``/kafka`` of the file the
crash left, or the state file saved from ``last_durable_offset``): a message at or below it
whose content is not in the file is lost for good. Each case feeds a k2eg message stream
through the real assembler into an :class:`~recorder.sinks.hdf5.HDF5Recording` in a child
process, flushes at one moment (as the daemon's pump does between any two events), and the
child dies there (``os._exit``: no close). The leftover is recovered as the daemon does at
its restart, and every data message at or below the offset the file reports must be in it
(each data message carries its own PV, named after its offset: the PV has a row in the
file), and every iteration whose
tail is at or below it must have its row.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

TOPIC = "durable_snap"

CHILD = r"""
import json, os, sys
sys.path.insert(0, sys.argv[3])
from k2eg_sequences import data_msg, header_msg, ntscalar, records, tail_msg
from recorder.client.assembler import IterationAssembler
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions

TOPIC, case = sys.argv[1], sys.argv[2]
T = 1_763_700_000_000
seq = {"n": 0}


def d(idx, offset, *, last=False, sequenced=True):
    kw = {"msg_seq": offset, "sub": 0, "last": last} if sequenced else {}
    return data_msg(idx, T + offset, f"P:{offset}", ntscalar(float(offset)), **kw)


if case == "opened_by_data":
    # a resumed topic: the first message read is data of an iteration whose header came
    # before the resume point; legacy stream, so the batch stays open until the next message
    msgs = [d(7, 0, sequenced=False)]
elif case == "younger_batch_held":
    # iteration 1's tail says a message is missing: 1 stays open (grace) while 2 begins;
    # 2's first batch (3 messages) waits in memory until 1 closes
    msgs = [header_msg("s", 1, T, msg_seq=0), d(1, 1), d(1, 2, last=True),
            tail_msg("s", 1, T + 3, msg_seq=3, total=6),
            header_msg("s", 2, T + 4, msg_seq=0), d(2, 5), d(2, 6), d(2, 7, last=True)]
elif case == "younger_close_held":
    # as above, but 2 ends with a gateway error before any data: its row waits in memory
    msgs = [header_msg("s", 1, T, msg_seq=0), d(1, 1, last=True),
            tail_msg("s", 1, T + 2, msg_seq=2, total=5),
            header_msg("s", 2, T + 3, msg_seq=0),
            tail_msg("s", 2, T + 4, error=3, error_message="boom", msg_seq=1, total=2)]
elif case == "header_after_data":
    # iteration 5 opened by its data, 6 by its data; 5's header comes late, amid 6's batch;
    # both time out: the flush comes right after 5's close
    msgs = [d(5, 0, sequenced=False), d(6, 1, sequenced=False), d(6, 2, sequenced=False),
            header_msg("s", 5, T - 1)]
else:
    raise SystemExit(f"unknown case {case}")

asm = IterationAssembler(missing_grace_s=60.0, iteration_timeout_s=5.0)
rec = HDF5Recording(OutputOptions(directory=sys.argv[4], flush_interval_s=3600),
                    run_name="durable", pv_uris=[], start_wall=1.7e9)
events = asm.feed_many(records(TOPIC, msgs), 0.0)
if case == "header_after_data":  # the daemon's pump may flush between any two events
    events += asm.expire(10.0)
    events = events[: next(i for i, e in enumerate(events) if type(e).__name__ ==
                           "IterationClosed") + 1]
for ev in events:
    rec.handle(ev)
rec.flush()
print(json.dumps({"durable": rec.last_durable_offset.get((TOPIC, 0), -1),
                  "events": [type(e).__name__ + str(e.iter_index) + "@" + str(e.offset)
                             for e in events]}), flush=True)
os._exit(0)
"""

# per case: each data message's offset, and each tail's (iteration, offset)
DATA = {
    "opened_by_data": [0],
    "younger_batch_held": [1, 2, 5, 6, 7],
    "younger_close_held": [1],
    "header_after_data": [0, 1, 2],
}
TAILS = {
    "opened_by_data": [],
    "younger_batch_held": [(1, 3)],
    "younger_close_held": [(1, 2), (2, 4)],
    "header_after_data": [],
}


@pytest.mark.parametrize("case", sorted(DATA))
def test_the_durable_offset_never_passes_what_the_file_holds(tmp_path: Path,
                                                              case: str) -> None:
    from recorder.daemon.leftovers import offsets_in_file
    from recorder.sinks.recover import recover_file

    out = tmp_path / "out"
    got = subprocess.run(
        [sys.executable, "-c", CHILD, TOPIC, case, str(Path(__file__).parent), str(out)],
        capture_output=True, text=True, timeout=120, check=False)
    assert got.returncode == 0, got.stderr
    told = json.loads(got.stdout.splitlines()[-1])
    partials = sorted(out.glob("*.partial"))
    assert len(partials) == 1
    final = recover_file(partials[0], by="the test")
    durable = offsets_in_file(final, TOPIC).get(0, -1)
    assert durable == told["durable"], told  # what the daemon saved is what the file says
    with h5py.File(final, "r") as f:
        pvs = {name for name, g in f["pvs"].items() if len(g["time"])} if "pvs" in f else set()
        rows = {int(i) for i in f["iterations/iter_index"][()]}
    lost = [o for o in DATA[case] if o <= durable and f"P:{o}" not in pvs]
    assert not lost, (f"durable offset {durable}, but the file lacks the data messages at "
                      f"{lost}", told)
    lost_rows = [i for i, o in TAILS[case] if o <= durable and i not in rows]
    assert not lost_rows, (f"durable offset {durable}, but the file has no row for the "
                           f"iterations {lost_rows}", told)


def test_the_daemon_reads_the_offsets_of_a_file_compressed_with_a_plugin(
        tmp_path: Path) -> None:
    """The daemon resumes after the offsets a recovered file holds (its /kafka log), read in
    the daemon's own process, which never imports hdf5plugin. With ``compression: zstd``
    (or blosc2) /kafka/topic is zstd-compressed once a file has a few dozen flushes (it is
    compact only up to 8 KiB: 32 rows): the read failed ("cannot read the Kafka offsets"),
    and the run resumed from the older offsets of its state file (data written twice)."""
    pytest.importorskip("hdf5plugin")
    from recorder.client.events import (
        IterationClosed,
        IterationOpened,
        IterationStatus,
        ValuesReceived,
    )
    from recorder.client.values import PVSample
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions

    rec = HDF5Recording(OutputOptions(directory=tmp_path, compression="zstd"),
                        run_name="z", pv_uris=["pva://A"])
    for i in range(1, 41):  # a flush each: 40 rows of /kafka
        rec.handle(IterationOpened(TOPIC, "s", i, i, offset=3 * i))
        rec.handle(ValuesReceived(TOPIC, i, 1, i, (PVSample("A", {"value": float(i)}),),
                                  offset=3 * i + 1))
        rec.handle(IterationClosed(TOPIC, "s", i, IterationStatus.COMPLETE, None, i, i,
                                   offset=3 * i + 2))
        rec.flush()
    (final,) = rec.close()
    with h5py.File(final, "r") as f:
        assert f["kafka/topic"].chunks is not None  # compressed with the plugin
    got = subprocess.run(  # the daemon's process: no hdf5plugin imported
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from recorder.daemon.leftovers import offsets_in_file; "
         "print(offsets_in_file(Path(sys.argv[1]), sys.argv[2]))", str(final), TOPIC],
        capture_output=True, text=True, timeout=120, check=False)
    assert got.stdout.strip().splitlines()[-1] == "{0: 122}", got.stdout + got.stderr
