"""``k2eg-recorder replay`` over a real broker: a recorded file goes back to Kafka as the
gateway's stream, and our client (assembler) and sink record it again into the same data."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from test_hdf5_roundtrip import make_samples, repr_exact

from recorder.client.assembler import IterationAssembler
from recorder.client.events import (
    IncompleteReason,
    IterationClosed,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.properties import SnapshotProperties
from recorder.client.wire import Data, Record, decode_snapshot_message
from recorder.reader import open_file, open_recording
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions, SegmentOptions

T0_NS = 1_700_000_000_000_000_000
STEP_NS = 300_000_000  # 300 ms between iterations
ITERATIONS = 6
SNAPSHOT = SnapshotProperties("rp-source", ("pva://F32", "pva://F64"), time_window=300)


def replay(bootstrap: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recorder.cli", "replay", "--bootstrap", bootstrap, *args],
        capture_output=True, text=True, timeout=120, check=False)


def write_source(directory: Path) -> list[Path]:
    """Six iterations of every type, in two segments: sub-push (two batches), a gateway error
    (iteration 3) and a lost tail (iteration 2)."""
    rec = HDF5Recording(OutputOptions(directory=directory,
                                      segment=SegmentOptions(max_iterations=3)),
                        run_name="source", snapshot=SNAPSHOT)
    for i in range(ITERATIONS):
        index, t = 100 + i, T0_NS + i * STEP_NS
        rec.handle(IterationOpened("t", "rp-source", index, t, offset=3 * i))
        samples = make_samples(i)
        n = len(samples)
        half = n // 2
        rec.handle(ValuesReceived("t", index, t, 1, tuple(samples[:half]), offset=3 * i + 1))
        rec.handle(ValuesReceived("t", index, t, 2, tuple(samples[half:]), offset=3 * i + 1))
        if i == 2:
            rec.handle(IterationClosed("t", "rp-source", index, IterationStatus.INCOMPLETE,
                                       IncompleteReason.NO_TAIL, t, 0, n_values=n, n_pvs=n,
                                       n_batches=2, offset=3 * i + 2))
        elif i == 3:
            rec.handle(IterationClosed("t", "rp-source", index, IterationStatus.INCOMPLETE,
                                       IncompleteReason.GATEWAY_ERROR, t, t + 1_000_000,
                                       error_code=7, error_message="IOC gone", n_values=n,
                                       n_pvs=n, n_batches=2, offset=3 * i + 2))
        else:
            rec.handle(IterationClosed("t", "rp-source", index, IterationStatus.COMPLETE, None,
                                       t, t + 1_000_000, n_values=n, n_pvs=n, n_batches=2,
                                       offset=3 * i + 2))
    paths = rec.close()
    assert len(paths) == 2
    return paths


def consume(bootstrap: str, topic: str, expect: int, timeout_s: float = 30.0) -> list[Any]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"rp-{topic}",
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < expect and time.monotonic() < deadline:
            out += [m for m in consumer.consume(500, 0.2) if m.error() is None]
        return out
    finally:
        consumer.close()


def record_again(messages: list[Any], directory: Path, missing_grace_s: float = 1.0) -> Path:
    """The consumed records through our client's assembler into our sink."""
    asm = IterationAssembler(iteration_timeout_s=3600, missing_grace_s=missing_grace_s)
    rec = HDF5Recording(OutputOptions(directory=directory), run_name="again")
    records = [Record(m.topic(), m.partition(), m.offset(), m.value(), m.headers())
               for m in messages]
    for event in asm.feed_many(records, 0.0) + asm.close():
        rec.handle(event)
    (path,) = rec.close()
    assert not {k: v for k, v in asm.counters.items() if k.startswith(("malformed", "late"))}
    return path


def on_the_wire(sample: Any) -> frozenset[str]:
    """The float32 paths a message can carry: an empty array has no element to say so."""
    def empty(path: str) -> bool:
        node: Any = sample.data
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        return node == []
    return frozenset(p for p in sample.float32_paths if not empty(p))


def n_messages(paths: list[Path]) -> int:
    with open_recording(paths) as r:
        its = r.iterations()
        values = sum(len(r.iterations_of(pv)) for pv in r.pv_names)
    return values + int((its["header_timestamp"] != 0).sum() + (its["tail_timestamp"] != 0).sum())


@pytest.fixture
def source(tmp_path: Path) -> list[Path]:
    return write_source(tmp_path / "source")


def test_a_replayed_recording_records_again_value_for_value(
    kafka_bootstrap: str, unique_name: Callable[[str], str], source: list[Path], tmp_path: Path,
) -> None:
    topic = unique_name("replay")
    done = replay(kafka_bootstrap, str(source[0]), "--all-segments", "--topic", topic,
                  "--speed", "0")
    assert done.returncode == 0, done.stderr
    assert f"replayed {ITERATIONS} iterations" in done.stdout
    messages = consume(kafka_bootstrap, topic, n_messages(source))
    assert len(messages) == n_messages(source)
    assert {m.key() for m in messages} == {b"rp-source"}  # the gateway's key: snapshot name
    again = record_again(messages, tmp_path / "again")

    with open_recording(source) as a, open_file(again) as b:
        assert b.pv_names == a.pv_names
        for pv in a.pv_names:
            sa, sb = a.samples(pv), b.samples(pv)
            assert [repr_exact(s.data) for s in sb] == [repr_exact(s.data) for s in sa], pv
            assert [s.float32_paths for s in sb] == [on_the_wire(s) for s in sa], pv
            assert b.iterations_of(pv).tolist() == a.iterations_of(pv).tolist()
        ia, ib = a.iterations(), b.iterations()
        for col in ("iter_index", "header_timestamp", "tail_timestamp", "status", "reason",
                    "error_code", "error_message", "n_values", "n_pvs"):
            assert ib[col].tolist() == ia[col].tolist(), col
    assert ib["reason"].tolist()[2:4] == ["no_tail", "gateway_error"]


def test_replay_paces_selects_and_refuses_the_recorded_topic(
    kafka_bootstrap: str, unique_name: Callable[[str], str], source: list[Path],
) -> None:
    # the file's own snapshot topic is refused: old iterations would reach live consumers
    refused = replay(kafka_bootstrap, str(source[0]), "--topic", SNAPSHOT.topic)
    assert refused.returncode == 2
    assert "--to-recorded-topic" in refused.stderr and "recorded from topic" in refused.stderr

    # one PV, iterations 100..101 of the first segment, at 2x: 300 ms apart -> >= 150 ms
    topic = unique_name("replay-sel")
    done = replay(kafka_bootstrap, str(source[0]), "--topic", topic, "--speed", "2",
                  "--iterations", "100:101", "--pv", "F64", "--protocol", "legacy")
    assert done.returncode == 0, done.stderr
    messages = consume(kafka_bootstrap, topic, 6)
    decoded = [decode_snapshot_message(m.value(), m.headers()) for m in messages]
    assert [(type(d).__name__, d.iter_index) for d in decoded] == [
        ("Header", 100), ("Data", 100), ("Tail", 100), ("Header", 101), ("Data", 101),
        ("Tail", 101)]
    assert all(d.msg_seq is None for d in decoded)  # legacy stream
    assert {d.sample.pv for d in decoded if isinstance(d, Data)} == {"F64"}
    created = [m.timestamp()[1] for m in messages]  # producer time (ms)
    assert created[3] - created[0] >= 140  # paced: never earlier than 150 ms, minus rounding

    # mistakes are named, nothing is published
    missing = replay(kafka_bootstrap, "/nonexistent/x.h5", "--topic", topic)
    assert missing.returncode == 2 and "/nonexistent/x.h5: no such file" in missing.stderr
    directory = replay(kafka_bootstrap, str(source[0].parent), "--topic", topic)
    assert directory.returncode == 2, directory
    assert f"{source[0].parent}: not a file (a directory)" in directory.stderr, directory
    unknown = replay(kafka_bootstrap, str(source[0]), "--topic", topic, "--pv", "NOPE")
    assert unknown.returncode == 2 and "no PV NOPE" in unknown.stderr
    # also over several files (a PV may be missing from some segments, not from all)
    for files in (["--all-segments", str(source[0])], [str(p) for p in source]):
        empty = unique_name("replay-nopv")
        unknown = replay(kafka_bootstrap, *files, "--topic", empty, "--pv", "F64",
                         "--pv", "NOPE")
        assert unknown.returncode == 2, unknown
        assert "no PV NOPE" in unknown.stderr and unknown.stdout == "", unknown


def test_no_broker_is_a_clear_error(tmp_path: Path, source: list[Path]) -> None:
    port_closed = "127.0.0.1:9"  # discard port: nothing listens on loopback
    done = replay(port_closed, str(source[0]), "--topic", "t")
    assert done.returncode == 1
    assert "no answer from Kafka within 10 s" in done.stderr
    assert "FAIL" not in done.stderr  # librdkafka's own retry log only with --verbose


def test_gateway_bytes_recorded_then_replayed_are_the_same_bytes(tmp_path: Path) -> None:
    """Through a finalized file and back: the data messages of the simulator's PVs (the
    gateway's encoding; a float PV's valueAlarm limits are float32 too) come out identical."""
    from recorder.replay import ReplayIteration, encode_iteration, iterations
    from recorder.sim.encoding import pack
    from recorder.sim.messages import data_message
    from recorder.sim.pvs import parse_pv, pv_structure

    names = ["SIM:AI:FLOAT:2", "SIM:AI:DOUBLE:1", "SIM:WF:FLOAT:1", "SIM:IMG:FLOAT:1:S8x4",
             "SIM:TABLE:1", "SIM:MBBI:1", "SIM:AI:DOUBLE:4:U1000"]
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="bytes")
    sent: dict[tuple[int, str], bytes] = {}
    for k in range(3):
        index, t_ms = k + 1, 1_700_000_000_000 + 100 * k
        samples = []
        for i, name in enumerate(names):
            structure = pv_structure(parse_pv(name), k, t_ms * 1_000_000 - 5_000)
            raw = pack(data_message(name, structure, t_ms, index, msg_seq=i + 2,
                                    last_of_submission=i == len(names) - 1))
            sent[index, name] = raw
            received = decode_snapshot_message(raw, [("k2eg-ser-type", b"Msgpack")])
            assert isinstance(received, Data)
            samples.append(received.sample)
        t_ns = t_ms * 1_000_000
        rec.handle(IterationOpened("t", "s", index, t_ns))
        rec.handle(ValuesReceived("t", index, t_ns, 1, tuple(samples)))
        rec.handle(IterationClosed("t", "s", index, IterationStatus.COMPLETE, None, t_ns, t_ns))
    (path,) = rec.close()
    with open_file(path) as f:
        assert {"value", "valueAlarm.lowAlarmLimit", "valueAlarm.hysteresis"} <= (
            f.samples("SIM:AI:FLOAT:2")[0].float32_paths)
        for it in iterations(f):
            # in the sent order (the file keeps its own PV order), as one submission
            it.samples.sort(key=lambda s: names.index(s.pv))
            replayed = encode_iteration(
                ReplayIteration(it.iter_index, it.header_ms, None, samples=it.samples),
                "s", sequenced=True)[1:]
            assert len(replayed) == len(names)
            for name, raw in zip(names, replayed, strict=True):
                assert raw == sent[it.iter_index, name], (it.iter_index, name)


def test_a_kafka_setting_the_client_refuses_is_a_usage_error(source: list[Path]) -> None:
    """A misspelt RECORDER_KAFKA__* property (SASL/TLS settings come from there): one line
    naming it, exit 2, as the admin commands say it (it was a librdkafka traceback)."""
    import os

    env = {**os.environ, "RECORDER_KAFKA__FOO__BAR": "1"}
    done = subprocess.run([sys.executable, "-m", "recorder.cli", "replay", "--bootstrap",
                           "127.0.0.1:9", str(source[0]), "--topic", "t"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done
    assert done.stderr.startswith('k2eg-recorder replay: Kafka settings: No such '
                                  'configuration property: "foo.bar"'), done.stderr
    assert "Traceback" not in done.stderr


def test_an_iteration_split_by_a_rotation_is_replayed_as_one(
    kafka_bootstrap: str, unique_name: Callable[[str], str], tmp_path: Path,
) -> None:
    """Iteration 3 was open when segment 1 began: its first value is in segment 0 (a row
    without tail), the rest and its tail in segment 1. Replayed with --all-segments it is one
    iteration again: its header once, its messages numbered on (it was sent twice from
    msg_seq 1, and the sequenced stream's second value was dropped as a duplicate)."""
    from test_hdf5_roundtrip import _ts

    from recorder.client.values import PVSample

    rec = HDF5Recording(OutputOptions(directory=tmp_path / "src",
                                      segment=SegmentOptions(max_iterations=2)),
                        run_name="rot", snapshot=SNAPSHOT)

    def t(i: int) -> int:
        return T0_NS + i * STEP_NS

    def value(i: int, x: float, batch: int = 1) -> None:
        rec.handle(ValuesReceived("t", i, t(i), batch,
                                  (PVSample("A", {"value": x, "timeStamp": _ts(i)}),)))

    def close(i: int, n: int) -> None:
        rec.handle(IterationClosed("t", "rp-source", i, IterationStatus.COMPLETE, None, t(i),
                                   t(i) + 1_000_000, n_values=n, n_pvs=1, n_batches=n))

    rec.handle(IterationOpened("t", "rp-source", 1, t(1)))
    value(1, 1.0)
    close(1, 1)
    rec.handle(IterationOpened("t", "rp-source", 2, t(2)))
    value(2, 2.0)
    rec.handle(IterationOpened("t", "rp-source", 3, t(3)))
    value(3, 3.0)
    close(2, 1)
    rec.handle(IterationOpened("t", "rp-source", 4, t(4)))  # rotation: 3 is still open
    value(3, 3.5, 2)
    close(3, 2)
    value(4, 4.0)
    close(4, 1)
    paths = rec.close()
    assert len(paths) == 2
    with open_recording(paths) as r:
        assert r.iterations_of("A").tolist() == [1, 2, 3, 3, 4]

    topic = unique_name("replay-split")
    done = replay(kafka_bootstrap, str(paths[0]), "--all-segments", "--topic", topic,
                  "--speed", "0")
    assert done.returncode == 0, done.stderr
    assert "replayed 4 iterations, 5 values (13 messages)" in done.stdout, done.stdout
    again = record_again(consume(kafka_bootstrap, topic, 13), tmp_path / "again")
    with open_file(again) as b:
        assert b.values("A").tolist() == [1.0, 2.0, 3.0, 3.5, 4.0]
        assert b.iterations_of("A").tolist() == [1, 2, 3, 3, 4]
        its = b.iterations()
        assert its["iter_index"].tolist() == [1, 2, 3, 4]
        assert its["status"].tolist() == ["complete"] * 4
        assert its["n_values"].tolist() == [1, 1, 2, 1]


def test_an_iteration_cut_by_a_crash_is_replayed_with_every_value(
    kafka_bootstrap: str, unique_name: Callable[[str], str], tmp_path: Path,
) -> None:
    """Iteration 2 (sub-push) had its first batch in segment 0 when the writer was killed:
    the recovered file has it without header (``writer_crashed``), the resumed segment 1
    its rest and tail, without header either. Replayed with --all-segments its data are
    numbered on from the first part's: the rest began at the first part's last msg_seq
    (the header's number, skipped, was not counted), and a sequenced consumer dropped that
    value as a duplicate."""
    from test_hdf5_roundtrip import _ts

    from recorder.client.values import PVSample
    from recorder.sinks.hdf5 import _PARKED
    from recorder.sinks.recover import recover_file

    def t(i: int) -> int:
        return T0_NS + i * STEP_NS

    def value(rec: HDF5Recording, i: int, x: float, batch: int = 1) -> None:
        rec.handle(ValuesReceived("t", i, t(i), batch,
                                  (PVSample("A", {"value": x, "timeStamp": _ts(i)}),)))

    first = HDF5Recording(OutputOptions(directory=tmp_path / "src"), run_name="cut",
                          snapshot=SNAPSHOT)
    first.handle(IterationOpened("t", "rp-source", 1, t(1)))
    value(first, 1, 1.0)
    first.handle(IterationClosed("t", "rp-source", 1, IterationStatus.COMPLETE, None, t(1),
                                 t(1) + 1_000_000, n_values=1, n_pvs=1, n_batches=1,
                                 expected_messages=3, missing_messages=0))
    first.handle(IterationOpened("t", "rp-source", 2, t(2)))
    value(first, 2, 2.0)
    first.flush()
    # the writer dies here: its file stays .partial (the handle is never closed)
    assert first.current_path is not None and first._lock is not None
    _PARKED.append(first._file)
    first._lock.release()
    crashed = recover_file(first.current_path)
    # the resumed recording: the rest of iteration 2 without its header, then iteration 3
    resumed = HDF5Recording(OutputOptions(directory=tmp_path / "src"), run_name="cut",
                            snapshot=SNAPSHOT, recording_uid=first.uid, first_segment=1,
                            start_wall=first.start_wall)
    value(resumed, 2, 2.5, 2)
    resumed.handle(IterationClosed("t", "rp-source", 2, IterationStatus.INCOMPLETE,
                                   IncompleteReason.MISSING_MESSAGES, None, t(2) + 1_000_000,
                                   n_values=1, n_pvs=1, n_batches=1, expected_messages=4,
                                   missing_messages=2))
    resumed.handle(IterationOpened("t", "rp-source", 3, t(3)))
    value(resumed, 3, 3.0)
    resumed.handle(IterationClosed("t", "rp-source", 3, IterationStatus.COMPLETE, None, t(3),
                                   t(3) + 1_000_000, n_values=1, n_pvs=1, n_batches=1,
                                   expected_messages=3, missing_messages=0))
    (rest,) = resumed.close()
    with open_recording([crashed, rest]) as r:
        assert r.iterations_of("A").tolist() == [1, 2, 2, 3]
        assert r.iterations()["reason"].tolist() == ["", "writer_crashed", "missing_messages",
                                                     ""]

    topic = unique_name("replay-cut")
    done = replay(kafka_bootstrap, str(crashed), "--all-segments", "--topic", topic,
                  "--speed", "0")
    assert done.returncode == 0, done.stderr
    n = int(done.stdout.split("(")[1].split()[0])  # "... values (N messages) ..."
    messages = consume(kafka_bootstrap, topic, n)
    seqs = [decode_snapshot_message(m.value(), m.headers()) for m in messages]
    of_2 = [getattr(x, "msg_seq", None) for x in seqs if x.iter_index == 2]
    assert len(of_2) == len(set(of_2)), of_2  # every message of iteration 2 numbered once
    again = record_again(messages, tmp_path / "again", missing_grace_s=0.0)
    with open_file(again) as b:
        assert b.values("A").tolist() == [1.0, 2.0, 2.5, 3.0]
        assert b.iterations_of("A").tolist() == [1, 2, 2, 3]
        assert b.iterations()["iter_index"].tolist() == [1, 2, 3]


def test_iterations_missing_messages_or_their_header_stay_so(
    kafka_bootstrap: str, unique_name: Callable[[str], str], tmp_path: Path,
) -> None:
    """A sequenced iteration recorded with messages missing (its tail's total_messages more
    than arrived) or without its header is replayed so: total_messages as recorded, data
    numbered from 2 after a lost header. It was replayed complete (every stored message
    renumbered from 1), and a lost header was no longer counted as a missing message."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path / "src"), run_name="miss",
                        snapshot=SNAPSHOT)
    for i in range(3):
        index, t = 100 + i, T0_NS + i * STEP_NS
        samples = tuple(make_samples(i)[:3])
        if i != 1:
            rec.handle(IterationOpened("t", "rp-source", index, t))
        rec.handle(ValuesReceived("t", index, t, 1, samples))
        reason, expected, missing = [(None, 5, 0), (IncompleteReason.NO_HEADER, 5, 1),
                                     (IncompleteReason.MISSING_MESSAGES, 7, 2)][i]
        rec.handle(IterationClosed(
            "t", "rp-source", index,
            IterationStatus.COMPLETE if reason is None else IterationStatus.INCOMPLETE,
            reason, None if i == 1 else t, t + 1_000_000, n_values=3, n_pvs=3, n_batches=1,
            expected_messages=expected, missing_messages=missing))
    (path,) = rec.close()

    topic = unique_name("replay-missing")
    done = replay(kafka_bootstrap, str(path), "--topic", topic, "--speed", "0")
    assert done.returncode == 0, done.stderr
    again = record_again(consume(kafka_bootstrap, topic, 14), tmp_path / "again",
                         missing_grace_s=0.0)
    with open_file(path) as a, open_file(again) as b:
        ia, ib = a.iterations(), b.iterations()
        for col in ("iter_index", "header_timestamp", "tail_timestamp", "status", "reason",
                    "expected_messages", "missing_messages", "n_values"):
            assert ib[col].tolist() == ia[col].tolist(), col

    # one PV of three: the other PVs' values are left out, not missing
    topic = unique_name("replay-missing-pv")
    done = replay(kafka_bootstrap, str(path), "--topic", topic, "--speed", "0", "--pv", "F64")
    assert done.returncode == 0, done.stderr
    again = record_again(consume(kafka_bootstrap, topic, 8), tmp_path / "again-pv",
                         missing_grace_s=0.0)
    with open_file(again) as b:
        ib = b.iterations()
        assert ib["status"].tolist() == ia["status"].tolist()
        assert ib["reason"].tolist() == ia["reason"].tolist()
        assert ib["missing_messages"].tolist() == ia["missing_messages"].tolist()
        assert ib["expected_messages"].tolist() == [3, 3, 5]


def test_segments_given_out_of_order_are_replayed_in_segment_order(
    kafka_bootstrap: str, unique_name: Callable[[str], str], source: list[Path],
) -> None:
    """FILE... are "replayed in segment order" (--help): given last segment first, the
    iterations went out 103..105 then 100..102, a restart to any consumer."""
    topic = unique_name("replay-order")
    done = replay(kafka_bootstrap, str(source[1]), str(source[0]), "--topic", topic,
                  "--speed", "0", "--pv", "F64")
    assert done.returncode == 0, done.stderr
    messages = consume(kafka_bootstrap, topic, 17)
    decoded = [decode_snapshot_message(m.value(), m.headers()) for m in messages]
    indexes = [d.iter_index for d in decoded if isinstance(d, Data)]
    assert indexes == [100, 101, 102, 103, 104, 105]


def test_a_value_larger_than_the_producers_default_message_size_is_replayed(
    kafka_bootstrap: str, unique_name: Callable[[str], str], tmp_path: Path,
) -> None:
    """A 2 MB image the gateway published (its own message.max.bytes) and the recorder
    recorded: replay stopped with a KafkaException traceback (librdkafka's 1 MB default)."""
    from recorder.client.values import PVSample

    rec = HDF5Recording(OutputOptions(directory=tmp_path / "src"), run_name="big",
                        snapshot=SNAPSHOT)
    image = PVSample("IMG", {"value": {"ushortValue": list(range(1000)) * 1000},
                             "dimension": [{"size": 1000}, {"size": 1000}], "uniqueId": 1,
                             "timeStamp": {"secondsPastEpoch": 1_700_000_000,
                                           "nanoseconds": 0, "userTag": 0}})
    rec.handle(IterationOpened("t", "rp-source", 1, T0_NS))
    rec.handle(ValuesReceived("t", 1, T0_NS, 1, (image,)))
    rec.handle(IterationClosed("t", "rp-source", 1, IterationStatus.COMPLETE, None, T0_NS,
                               T0_NS, n_values=1, n_pvs=1, n_batches=1))
    (path,) = rec.close()
    topic = unique_name("replay-big")
    done = replay(kafka_bootstrap, str(path), "--topic", topic, "--speed", "0")
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    messages = consume(kafka_bootstrap, topic, 3)
    again = record_again(messages, tmp_path / "again")
    with open_file(path) as a, open_file(again) as b:
        assert repr_exact(b.samples("IMG")[0].data) == repr_exact(a.samples("IMG")[0].data)

    # a limit set lower (RECORDER_KAFKA__*): the message is not delivered, said so, exit 1
    import os

    env = {**os.environ, "RECORDER_KAFKA__MESSAGE__MAX__BYTES": "1000000"}
    refused = subprocess.run([sys.executable, "-m", "recorder.cli", "replay", "--bootstrap",
                              kafka_bootstrap, str(path), "--topic", topic, "--speed", "0"],
                             env=env, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 1, refused
    assert "1 of 3 messages not delivered" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
