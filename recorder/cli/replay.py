"""``k2eg-recorder replay``: publish a recorded file back to Kafka as the gateway's snapshot
stream (see :mod:`recorder.replay` for what is and is not reproduced).

Examples::

    k2eg-recorder replay /data/k2eg/bpm/bpm_20261121T101500Z_000.h5 --topic bpm-replay
    k2eg-recorder replay FILE --topic t --speed 0                # as fast as the broker takes it
    k2eg-recorder replay FILE --topic t --speed 10 --iterations 100:199 --pv BPM:X --pv BPM:Y
    k2eg-recorder replay FILE --all-segments --topic t            # every segment of its recording

The topic is never guessed: replaying into the topic a gateway publishes (the one the file was
recorded from) would mix old iterations into every consumer of that snapshot, so that topic is
refused unless ``--to-recorded-topic`` is given.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from recorder.cli.argtypes import kafka_topic, not_empty

HELP = "publish a recorded file back to Kafka as the gateway's snapshot stream"

EXIT_USAGE = 2
EXIT_UNDELIVERED = 1
REPLAY_MESSAGE_BYTES = 65 * 1024 * 1024
"""The producer's largest message (message.max.bytes, unless RECORDER_KAFKA__ sets it): what
the recorder takes (the client's 64 MiB MAX_MESSAGE_BYTES) and room for the keys replay adds
(librdkafka's 1 MB default refused a recorded image the gateway had sent)."""
REPLAY_QUEUE_KB = 2 * REPLAY_MESSAGE_BYTES // 1024
"""The producer's local queue (queue.buffering.max.kbytes, unless RECORDER_KAFKA__ sets it):
replay waits for deliveries beyond it, so its memory is bounded; it holds the largest
message (a larger one would wait for room forever)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="recorded files (.h5, or a .partial being written), replayed in "
                        "segment order")
    parser.add_argument("--topic", required=True, type=kafka_topic,
                        help="the Kafka topic to publish to (created with 1 partition if "
                        "missing)")
    parser.add_argument("--bootstrap", type=not_empty, default=None,
                        help="Kafka bootstrap servers (default: $RECORDER_BOOTSTRAP_SERVERS); "
                        "SASL/TLS options come from RECORDER_KAFKA__* as for the daemon")
    parser.add_argument("--speed", type=_speed, default=1.0,
                        help="pace: 1 = as recorded (the gateway's header times), 10 = ten "
                        "times faster, 0 = as fast as possible (default 1)")
    parser.add_argument("--protocol", choices=("sequenced", "legacy"), default="sequenced",
                        help="sequenced (msg_seq/submission_seq/total_messages, what the "
                        "official k2eg client 0.3.2 needs; default) or legacy (gateway main)")
    parser.add_argument("--snapshot-name", default=None,
                        help="snapshot_name in headers and tails and the message key "
                        "(default: the file's)")
    parser.add_argument("--iterations", default=None, metavar="FIRST:LAST",
                        help="only these iter_index values (inclusive; either side may be "
                        "empty)")
    parser.add_argument("--pv", action="append", default=None, metavar="NAME",
                        help="only this PV (repeatable; default: all)")
    parser.add_argument("--all-segments", action="store_true",
                        help="replay every segment of the recording of each FILE (found next "
                        "to it by recording uid)")
    parser.add_argument("--to-recorded-topic", action="store_true",
                        help="allow publishing to the topic the file was recorded from")
    parser.add_argument("--verbose", action="store_true",
                        help="show librdkafka's own log (connection retries) on stderr")


def _speed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be 0 (as fast as possible) or a positive "
                                         "factor")
    return value


def parse_range(text: str | None) -> tuple[int | None, int | None]:
    """``FIRST:LAST`` (inclusive, either may be empty) or a single ``N``."""
    if text is None:
        return None, None
    first_s, sep, last_s = text.partition(":")
    if not sep:
        last_s = first_s
    try:
        first = int(first_s) if first_s.strip() else None
        last = int(last_s) if last_s.strip() else None
    except ValueError:
        raise ValueError(f"--iterations {text!r}: expected FIRST:LAST, e.g. 100:199, 100: "
                         "or :199") from None
    if first is not None and last is not None and first > last:
        raise ValueError(f"--iterations {text!r}: FIRST is after LAST")
    return first, last


def pace_warning(behind_s: float, seconds: float, speed: float) -> str | None:
    """What to tell when iterations went out noticeably later than their paced time (more
    than 0.5 s and 10% of the replay), else None."""
    if speed <= 0 or behind_s <= max(0.5, 0.1 * seconds):
        return None
    return (f"could not keep --speed {speed:g}: iterations went out up to {behind_s:.1f} s "
            "later than their recorded pace (reading and packing the file is the limit: see "
            "the README's replay figures; a lower --speed keeps the pace)")


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from recorder.errors import RecorderError
    from recorder.replay import Selection
    from recorder.settings import KafkaSettings, settings_problems

    try:
        first, last = parse_range(args.iterations)
        overrides = {} if args.bootstrap is None else {"bootstrap_servers": args.bootstrap}
        kafka = KafkaSettings.from_env(**overrides)
        files = _files(args.files, args.all_segments)
    except ValidationError as exc:
        print(f"k2eg-recorder replay: invalid settings:\n{settings_problems(exc)}",
              file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError, RecorderError) as exc:
        print(f"k2eg-recorder replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    selection = Selection(first, last, frozenset(args.pv) if args.pv else None)
    try:
        return _replay(args, kafka, files, selection)
    finally:
        for f in files:
            f.close()


def _files(paths: list[Path], all_segments: bool) -> list[Any]:
    """The files opened, in segment order (each path's recording's segments with
    ``all_segments``); a missing or foreign file is an error naming it."""
    from recorder.cli.inspect_cmd import quietly_opened
    from recorder.reader import RecordingFile, open_recording

    for p in paths:
        if p.is_dir():
            raise IsADirectoryError(f"{p}: not a file (a directory): give its .h5 files, or "
                                    "one of them with --all-segments")
        if not p.is_file():
            raise FileNotFoundError(f"{p}: {'not a file' if p.exists() else 'no such file'}")
    opened: list[Any] = []
    try:
        if all_segments:
            seen: set[Path] = set()
            for p in paths:
                rec = quietly_opened(open_recording, p)
                for f in rec.files:
                    if f.path.resolve() in seen:
                        f.close()
                    else:
                        seen.add(f.path.resolve())
                        opened.append(f)
        else:
            for p in paths:
                opened.append(RecordingFile(p))
            opened.sort(key=_segment_order(opened))
    except Exception:
        for f in opened:
            f.close()
        raise
    return opened


def _segment_order(files: list[Any]) -> Any:
    """The sort key that puts each recording's files in segment order (as
    :class:`~recorder.reader.Recording` does), recordings in the order first given."""
    from recorder.sinks.describe import plain

    first: dict[str, int] = {}
    for k, f in enumerate(files):
        first.setdefault(str(f.attrs.get("recording_uid")), k)
    return lambda f: (first[str(f.attrs.get("recording_uid"))], int(f.attrs.get("segment", 0)),
                      str(plain(f.attrs.get("segment_start_time", ""))), f.path.name)


def _replay(args: argparse.Namespace, kafka: Any, files: list[Any], selection: Any) -> int:
    from confluent_kafka import KafkaError, KafkaException, Producer
    from confluent_kafka.admin import AdminClient

    from recorder.replay import (
        ReplayIteration,
        continues,
        encode_iteration,
        iterations,
        recorded_topic_of,
        snapshot_name_of,
    )
    from recorder.sim.encoding import SER_HEADER, SER_MSGPACK

    for f in files:
        recorded = recorded_topic_of(f)
        if recorded and recorded == args.topic and not args.to_recorded_topic:
            print(f"k2eg-recorder replay: {f.path} was recorded from topic {recorded!r}; "
                  "replaying into it would mix old iterations into what its gateway publishes "
                  "(pass --to-recorded-topic if that is what you want)", file=sys.stderr)
            return EXIT_USAGE
    if selection.pvs is not None:  # a PV may be missing from some segments, not from all
        unknown = sorted(selection.pvs - {pv for f in files for pv in f.pv_names})
        if unknown:
            names = ", ".join(unknown)
            said = (f"{files[0].path} has no PV {names}" if len(files) == 1
                    else f"no PV {names} in any of the {len(files)} files")
            print(f"k2eg-recorder replay: {said}", file=sys.stderr)
            return EXIT_USAGE

    base = kafka.librdkafka_config()
    if not args.verbose:  # the outcome is printed; librdkafka's connection retries only here
        base["log_level"] = 2
    # as the gateway produces; the local queue bounded (librdkafka's default is 1 GB: a
    # replay faster than the broker could queue that much)
    conf = {"queue.buffering.max.kbytes": REPLAY_QUEUE_KB,
            "message.max.bytes": REPLAY_MESSAGE_BYTES, **base, "linger.ms": 5,
            "compression.type": "snappy"}
    try:
        admin = AdminClient(base)
        producer = Producer(conf)
    except KafkaException as exc:  # a setting librdkafka refuses: nothing was sent
        err = exc.args[0] if exc.args else None
        if not (isinstance(err, KafkaError) and err.code() == KafkaError._INVALID_ARG):
            raise
        print(f"k2eg-recorder replay: Kafka settings: {err.str()} (set by RECORDER_KAFKA__* "
              "in the environment)", file=sys.stderr)
        return EXIT_USAGE
    problem = _create_topic(admin, args.topic)
    if problem:
        print(f"k2eg-recorder replay: {problem} (Kafka at {kafka.bootstrap_servers}: "
              "--bootstrap or RECORDER_BOOTSTRAP_SERVERS)", file=sys.stderr)
        return EXIT_UNDELIVERED

    failed: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(str(err))

    stop = _stop_on_signals()
    headers = [(SER_HEADER, SER_MSGPACK)]
    sequenced = args.protocol == "sequenced"
    n_iterations = n_values = n_messages = 0
    t_start = time.monotonic()
    origin: tuple[float, int] | None = None  # (monotonic, recorded ms) of the first iteration
    behind = 0.0  # the most an iteration went out later than its paced time (s)
    # the last iteration of the previous file and how many msg_seq numbers it used: the
    # first row of the next one may be its rest (an iteration open at a rotation, or cut by
    # a crash and resumed)
    carried: tuple[ReplayIteration, int] | None = None
    last: tuple[ReplayIteration, int] | None = None
    try:
        for f in files:
            snapshot = args.snapshot_name or snapshot_name_of(f)
            key = snapshot.encode()
            carried, last = last, None
            for it in iterations(f, selection):
                if stop():
                    break
                sent = 0
                if carried is not None and (it.samples or it.header_ms is not None
                                            or it.tail_ms is not None):  # a row
                    sent = carried[1] if continues(carried[0], it) else 0
                    carried = None
                if args.speed > 0 and it.timestamp_ms:
                    if origin is None:
                        origin = (time.monotonic(), it.timestamp_ms)
                    due = origin[0] + (it.timestamp_ms - origin[1]) / 1000.0 / args.speed
                    behind = max(behind, time.monotonic() - due)
                    while not stop() and (wait := due - time.monotonic()) > 0:
                        producer.poll(min(wait, 0.2))
                messages = encode_iteration(it, snapshot, sequenced=sequenced, sent=sent)
                for value in messages:
                    _produce(producer, args.topic, key, value, headers=headers,
                             on_delivery=delivered)
                    n_messages += 1
                # the msg_seq numbers it used: its messages, and a lost header's number
                # (skipped, not sent) when it begins the iteration
                last = (it, sent + len(messages) + (1 if not sent and it.header_ms is None else 0))
                n_iterations += 1 if not sent and (it.header_ms is not None
                                                   or it.tail_ms is not None) else 0
                n_values += len(it.samples) + len(it.late)
                producer.poll(0)
            if stop():
                break
        remaining = producer.flush(30)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    seconds = time.monotonic() - t_start
    names = ", ".join(str(f.path) for f in files)
    interrupted = " (interrupted)" if stop() else ""
    print(f"replayed {n_iterations} iterations, {n_values} values ({n_messages} messages) of "
          f"{names} to topic {args.topic!r} at {kafka.bootstrap_servers} in {seconds:.1f} s"
          f"{interrupted}")
    warning = pace_warning(behind, seconds, args.speed)
    if warning:
        print(f"k2eg-recorder replay: {warning}", file=sys.stderr)
    if remaining or failed:
        print(f"k2eg-recorder replay: {remaining + len(failed)} of {n_messages} messages not "
              f"delivered" + (f": {failed[0]}" if failed else " (Kafka did not confirm them "
                              "within 30 s)"), file=sys.stderr)
        return EXIT_UNDELIVERED
    return 130 if interrupted else 0


def _create_topic(admin: Any, topic: str, timeout_s: float = 10.0) -> str | None:
    """Create ``topic`` (1 partition, as the gateway does) unless it exists; what went wrong,
    or None."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.cimpl import NewTopic

    try:
        admin.create_topics([NewTopic(topic, 1)], request_timeout=timeout_s)[topic].result(
            timeout=timeout_s + 2)
    except KafkaException as exc:
        err: Any = exc.args[0] if exc.args else None
        code = err.code() if isinstance(err, KafkaError) else None
        if code == KafkaError.TOPIC_ALREADY_EXISTS:
            return None
        if code in (KafkaError._TIMED_OUT, KafkaError._TRANSPORT):
            return f"no answer from Kafka within {timeout_s:.0f} s"
        return f"cannot create topic {topic!r}: {exc}"
    except Exception as exc:  # a future's own timeout: the broker did not answer
        return f"no answer from Kafka within {timeout_s:.0f} s ({type(exc).__name__})"
    return None


def _produce(producer: Any, topic: str, key: bytes, value: bytes, *, headers: Any,
             on_delivery: Any) -> None:
    from confluent_kafka import KafkaException

    while True:
        try:
            producer.produce(topic, value=value, key=key, headers=headers,
                             on_delivery=on_delivery)
            return
        except BufferError:  # the local queue is full: let deliveries drain it
            producer.poll(0.1)
        except KafkaException as exc:  # refused at once (too large): not delivered
            on_delivery(exc.args[0] if exc.args else exc, None)
            return


def _stop_on_signals() -> Any:
    """SIGINT/SIGTERM end the replay after the message being produced (what was produced is
    still delivered); returns the "stop requested" test."""
    requested = False

    def handler(_signum: int, _frame: FrameType | None) -> None:
        nonlocal requested
        requested = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return lambda: requested
