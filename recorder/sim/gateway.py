"""Kafka adapter of the gateway simulator: one thread runs the command loop.

The thread owns the command-topic Consumer (every call on it is made from that thread, the
confluent-kafka >= 2.16 rule), an AdminClient (snapshot topics are created synchronously, before
the ack that names them) and the Producer (``poll(0)`` every loop, ``flush`` on stop). The
command topic is read with ``assign()`` at explicit offsets: its end offset when the simulator
starts (or a given offset), so there is no consumer-group join delay and no command produced
after :meth:`GatewaySimulator.start` returns is missed.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import structlog

from recorder.errors import RecorderError, TransportError
from recorder.sim.engine import CreateTopic, Flush, Produce, SimConfig, SimEngine

log = structlog.get_logger("recorder.sim")

# commands are read as the gateway does (cmd-max-fecth-element / cmd-max-fecth-time-out,
# k2eg-protocol.md §1.1): at most 10 in at most 10 ms, then acted on, so only triggers that
# close together coalesce (§3.6). Also bounds stop() latency and stall-release latency.
CMD_FETCH_MAX = 10
CMD_FETCH_TIMEOUT_S = 0.010
# the producer's largest message (message.max.bytes, unless kafka_options set it): images as
# large as the recorder takes (its 64 MiB MAX_MESSAGE_BYTES); librdkafka's 1 MB default
# refused a 1024x1024 image
SIM_MESSAGE_BYTES = 65 * 1024 * 1024


class GatewaySimulator:
    """A k2eg gateway simulator on a Kafka cluster, run in a background thread.

    >>> sim = GatewaySimulator("127.0.0.1:9092", "cmd-in-topic").start()
    >>> ...  # send commands with any k2eg client
    >>> sim.stop()
    """

    def __init__(
        self,
        bootstrap_servers: str,
        cmd_topic: str,
        config: SimConfig | None = None,
        *,
        start_offset: int | None = None,
        kafka_options: Mapping[str, str] | None = None,
        create_cmd_topic: bool = True,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.cmd_topic = cmd_topic
        self.config = config or SimConfig()
        self.start_offset = start_offset
        self.kafka_options = dict(kafka_options or {})
        self.create_cmd_topic = create_cmd_topic
        self.engine: SimEngine | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stop_requested = False  # request_stop(): a plain flag, safe in a signal handler
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._created: set[str] = set()

    # --- lifecycle ---------------------------------------------------------------------------
    def continue_iterations(self, snapshot_name: str, last_index: int) -> None:
        """See :meth:`SimEngine.continue_iterations` (the simulator must be running)."""
        engine = self.engine
        if engine is None:
            raise RuntimeError("the gateway simulator is not running")
        engine.continue_iterations(snapshot_name, last_index)

    def start(self, timeout_s: float = 20.0) -> GatewaySimulator:
        """Start the loop thread; returns once the command topic is assigned."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        self._new_run()
        self._thread = threading.Thread(target=self._thread_main, name="k2eg-sim", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            self.stop()
            raise TransportError(f"simulator did not start within {timeout_s:g} s")
        if self._error is not None:
            error = self._error
            self.stop()
            raise TransportError(f"simulator failed to start: {error}") from error
        return self

    def _new_run(self) -> None:
        """Forget the previous run (start() after stop()): not ready, no error, no engine
        until the new loop says so, and its topics are created again."""
        self._stop.clear()
        self._stop_requested = False
        self._ready.clear()
        self._error = None
        self.engine = None
        self._created.clear()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the loop, flush the producer, close the consumer (in the loop thread)."""
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():  # pragma: no cover - a hung librdkafka call
                log.error("sim.stop.timeout", timeout_s=timeout_s)

    def run(self) -> None:
        """Run the loop in the calling thread until :meth:`request_stop` (CLI use)."""
        self._thread_main()
        if self._error is not None:
            raise TransportError(f"simulator failed: {self._error}") from self._error

    def request_stop(self) -> None:
        """End :meth:`run` after the current step. Only sets a flag, so a signal handler may
        call it (one that took a lock the interrupted main thread holds would wait for
        itself for ever)."""
        self._stop_requested = True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> GatewaySimulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- the loop ----------------------------------------------------------------------------
    def _common(self) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "log.connection.close": "false",  # idle-connection closes are not errors
            **self.kafka_options,
        }

    def _thread_main(self) -> None:
        try:
            self._loop()
        except RecorderError as exc:  # said by start()/run(): no traceback
            self._error = exc
            log.error("sim.failed", error=str(exc))
        except BaseException as exc:  # reported to start()/run()
            self._error = exc
            log.exception("sim.failed")
        finally:
            self._ready.set()

    def _loop(self) -> None:
        from confluent_kafka import Consumer, Producer, TopicPartition
        from confluent_kafka.admin import AdminClient

        from recorder.client.kafka import close_producer, librdkafka_logger

        # librdkafka's own lines (a broker going away) as log events, not raw stderr
        common = {**self._common(), "logger": librdkafka_logger(log)}
        admin = AdminClient(common)
        if self.create_cmd_topic:
            self._create_topic(admin, self.cmd_topic)
        producer = Producer({"message.max.bytes": SIM_MESSAGE_BYTES, **common, "linger.ms": 1})
        consumer = Consumer(
            {
                **common,
                "group.id": f"k2eg-sim-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 20,
                "enable.partition.eof": False,
            }
        )
        try:
            metadata = consumer.list_topics(self.cmd_topic, timeout=10)
            topic_md = metadata.topics.get(self.cmd_topic)
            if topic_md is None or topic_md.error is not None or not topic_md.partitions:
                raise TransportError(f"command topic {self.cmd_topic!r} is not available")
            assignment = []
            for partition in sorted(topic_md.partitions):
                tp = TopicPartition(self.cmd_topic, partition)
                if self.start_offset is not None:
                    offset = self.start_offset
                else:
                    _low, offset = consumer.get_watermark_offsets(tp, timeout=10)
                assignment.append(TopicPartition(self.cmd_topic, partition, offset))
            consumer.assign(assignment)
            engine = SimEngine(
                self.config, now=time.monotonic(), wall_offset=time.time() - time.monotonic()
            )
            self.engine = engine
            log.info(
                "sim.started",
                cmd_topic=self.cmd_topic,
                protocol=self.config.protocol.value,
                offsets={tp.partition: tp.offset for tp in assignment},
            )
            self._ready.set()
            while not (self._stop.is_set() or self._stop_requested):
                now = time.monotonic()
                wait = min(max(engine.next_deadline(now) - now, 0.0), CMD_FETCH_TIMEOUT_S)
                messages = consumer.consume(num_messages=CMD_FETCH_MAX, timeout=wait)
                now = time.monotonic()
                for message in messages:
                    error = message.error()
                    if error is not None:
                        log.warning("sim.consume.error", error=str(error))
                        continue
                    engine.handle_command(message.value() or b"", now)
                engine.tick(now)
                self._execute(engine, admin, producer)
                producer.poll(0)
        finally:
            remaining = producer.flush(10)
            if remaining:
                log.error("sim.flush.incomplete", remaining=remaining)
            consumer.close()
            close_producer(producer)
            log.info("sim.stopped")

    def _execute(self, engine: SimEngine, admin: Any, producer: Any) -> None:
        for action in engine.drain():
            if isinstance(action, Produce):
                self._produce(producer, action)
            elif isinstance(action, CreateTopic):
                self._create_topic(admin, action.name, action.partitions)
            elif isinstance(action, Flush):
                producer.flush(10)

    @staticmethod
    def _produce(producer: Any, action: Produce) -> None:
        from confluent_kafka import KafkaException

        for attempt in range(100):
            try:
                producer.produce(
                    action.topic,
                    value=action.value,
                    key=action.key.encode(),
                    headers=list(action.headers),
                    timestamp=action.timestamp_ms or 0,  # 0: the producer's clock
                )
                return
            except BufferError:  # local queue full: serve delivery reports and retry
                producer.poll(0.05 * min(attempt + 1, 4))
            except KafkaException as exc:  # refused (a message too large): the gateway logs
                log.error("sim.produce.failed", topic=action.topic,  # it and goes on
                          bytes=len(action.value), error=str(exc.args[0]))
                return
        log.error("sim.produce.dropped", topic=action.topic)

    def _create_topic(self, admin: Any, name: str, partitions: int = 1) -> None:
        if name in self._created:
            return
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.cimpl import NewTopic

        future = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)],
            operation_timeout=10,
        )[name]
        try:
            future.result(15)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TransportError(f"cannot create topic {name!r}: {exc}") from exc
        except TimeoutError:  # the future's own: the broker did not answer
            raise TransportError(f"no answer from Kafka at {self.bootstrap_servers} within "
                                 f"15 s (creating topic {name!r})") from None
        self._created.add(name)


def wait_until(predicate: Any, timeout_s: float, interval_s: float = 0.02) -> bool:
    """Poll ``predicate()`` until true or ``timeout_s`` passed (a helper for tests and demo)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


__all__ = ["GatewaySimulator", "wait_until"]

