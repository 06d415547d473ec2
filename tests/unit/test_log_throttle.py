"""Repeated Kafka messages: the throttle (pure logic) and librdkafka's log lines through it."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from structlog.testing import capture_logs

from recorder.client.kafka import LibrdkafkaLog, _transport_error
from recorder.client.throttle import RepeatThrottle, normalized


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_first_admitted_repeats_held_back_then_counted_after_the_window() -> None:
    clock = Clock()
    t = RepeatThrottle(60.0, clock=clock)
    assert t.admit("a") == 0
    for _ in range(5):
        clock.now += 10
        assert t.admit("a") is None  # 10..50 s after: held back
    clock.now += 10  # 60 s after the admitted one
    assert t.admit("a") == 5
    assert t.admit("a") is None
    clock.now += 61
    assert t.admit("a") == 1
    clock.now += 600
    assert t.admit("a") == 0  # nothing held back since


def test_log_fields() -> None:
    clock = Clock()
    t = RepeatThrottle(60.0, clock=clock)
    assert t.log_fields("a") == {}
    assert t.log_fields("a") is None
    assert t.log_fields("a") is None
    clock.now += 60
    assert t.log_fields("a") == {"repeated": 2}


def test_keys_are_independent_and_bounded() -> None:
    clock = Clock()
    t = RepeatThrottle(60.0, clock=clock, max_keys=2)
    assert t.admit("a") == 0
    assert t.admit("b") == 0
    assert t.admit("a") is None
    assert t.admit("c") == 0  # forgets "a", the least recently admitted
    assert t.admit("a") == 0  # new again (its held-back count went with it)
    assert t.admit("c") is None


def test_zero_window_admits_everything() -> None:
    t = RepeatThrottle(0.0, clock=Clock())
    assert [t.admit("a") for _ in range(3)] == [0, 0, 0]


@pytest.mark.parametrize("kwargs", [{"window_s": -1.0}, {"max_keys": 0}])
def test_invalid_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RepeatThrottle(**kwargs)


def test_thread_safe_counts() -> None:
    t = RepeatThrottle(3600.0)
    admitted: list[int | None] = []

    def worker() -> None:
        for _ in range(1000):
            admitted.append(t.admit("k"))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert admitted.count(0) == 1 and admitted.count(None) == 3999


def test_normalized_numbers() -> None:
    assert normalized("Connect to ipv4#127.0.0.1:9 failed (after 12ms)") == (
        "Connect to ipv###.#.#.#:# failed (after #ms)")
    assert normalized("no digits") == "no digits"


FAIL = ("FAIL [rdkafka#producer-%d] [thrd:127.0.0.1:9/bootstrap]: 127.0.0.1:9/bootstrap: "
        "Connect to ipv4#127.0.0.1:9 failed: Connection refused (after %dms in state CONNECT)")


def test_librdkafka_lines_become_events_with_repeats_counted() -> None:
    import structlog

    clock = Clock()
    sink = LibrdkafkaLog(structlog.get_logger("test").bind(adapter="a"),
                         RepeatThrottle(60.0, clock=clock))
    with capture_logs() as logs:
        # confluent-kafka passes a logging level and "%s [%s] %s"-style text
        sink.log(40, FAIL % (1, 0))
        sink.log(40, FAIL % (2, 1))  # another handle, another delay: a repeat
        sink.log(40, "%s [%s] %s", "FAIL", "rdkafka#producer-2", "127.0.0.1:9/bootstrap: x")
        clock.now += 60
        sink.log(40, FAIL % (1, 3))
        sink.log(30, "not %d formatted %s")  # bad text never raises
    assert [(e["log_level"], e["event"], e["facility"]) for e in logs] == [
        ("error", "librdkafka", "FAIL"), ("error", "librdkafka", "FAIL"),
        ("error", "librdkafka", "FAIL"), ("warning", "librdkafka", "not")]
    assert logs[0]["message"].startswith("[thrd:127.0.0.1:9/bootstrap]: 127.0.0.1:9/bootstrap")
    assert "rdkafka#" not in logs[0]["message"]
    assert "repeated" not in logs[0] and "repeated" not in logs[1]
    assert logs[1]["message"] == "127.0.0.1:9/bootstrap: x"
    assert logs[2]["repeated"] == 1
    assert logs[3]["adapter"] == "a"


def test_transport_error_text_of_a_kafka_exception() -> None:
    from confluent_kafka import KafkaError, KafkaException

    exc = KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata"))
    assert str(_transport_error("metadata request for 'x'", exc)) == (
        "Kafka metadata request for 'x' failed: Failed to get metadata (_TRANSPORT)")
    assert str(_transport_error("client creation", ValueError("bad"))) == (
        "Kafka client creation failed: bad")


def test_failed_deliveries_while_kafka_is_down_are_throttled() -> None:
    """Kafka unreachable for an hour: every heartbeat (one each 5 s) times out in the
    producer and was logged as its own ``delivery failed`` warning, 720 an hour of the same
    text; the README promises each distinct message once a minute, with the count of the
    repeats held back. The deliveries still fail (and are counted) each time."""
    from recorder.client.kafka import KafkaAdapter
    from recorder.settings import KafkaSettings

    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", app_name="throttled")
    adapter = KafkaAdapter(settings, lambda records, drained: None,
                           producer_config={"message.timeout.ms": 50})
    failures: list[object] = []
    try:
        with capture_logs() as logs:
            for _ in range(4):
                adapter.produce("status-topic-delivery-throttle", b"{}",
                                on_delivery=failures.append)
                assert adapter.flush(5.0) == 0
    finally:
        adapter.close(1.0)
    assert len(failures) == 4 and all(f is not None for f in failures)
    assert adapter.counters["delivery_failed"] == 4
    failed = [e for e in logs if e["event"] == "delivery failed"]
    assert len(failed) == 1, failed
    assert failed[0]["topic"] == "status-topic-delivery-throttle"


def test_a_consumer_error_that_comes_back_with_every_consume_is_throttled() -> None:
    """A partition whose leader is gone, a topic deleted under the consumer: librdkafka
    hands the same error with each consume() (many a second); each is counted, the line is
    written once a minute per topic, partition and error, with the count held back."""
    from confluent_kafka import KafkaError

    from recorder.client.kafka import KafkaAdapter
    from recorder.settings import KafkaSettings

    class Errored:
        def __init__(self, topic: str) -> None:
            self._topic = topic

        def error(self) -> KafkaError:
            return KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, "Broker: Unknown topic")

        def topic(self) -> str:
            return self._topic

        def partition(self) -> int:
            return 0

    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", app_name="consumer-errors")
    adapter = KafkaAdapter(settings, lambda records, drained: None)
    try:
        with capture_logs() as logs:
            for _ in range(50):
                adapter._consumer_error(Errored("gone-topic-throttle"))  # type: ignore[arg-type]
            adapter._consumer_error(Errored("other-topic-throttle"))  # type: ignore[arg-type]
    finally:
        adapter.close(1.0)
    assert adapter.counters["consumer_errors"] == 51
    lines = [(e["topic"], e.get("repeated")) for e in logs if e["event"] == "consumer error"]
    assert lines == [("gone-topic-throttle", None), ("other-topic-throttle", None)]
