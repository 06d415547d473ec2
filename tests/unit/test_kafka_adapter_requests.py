"""KafkaAdapter's requests to its consumer thread, when the caller gives up waiting."""

from __future__ import annotations

import threading
import time

import pytest

from recorder.client.kafka import KafkaAdapter, answer_within
from recorder.errors import TransportError
from recorder.settings import KafkaSettings


def test_a_request_the_caller_gave_up_on_while_it_was_served_does_not_kill_the_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow broker: the consumer thread is still querying a topic's watermarks when the
    caller's wait (answer_within) runs out and cancels the request. Its answer then went into
    the cancelled future, which raised InvalidStateError in the consumer thread: the thread
    died ("consumer thread crashed"), and with it every run's reading. The answer is now
    dropped and the thread reads on."""
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", app_name="cancel")
    adapter = KafkaAdapter(settings, lambda records, drained: None)
    serving = threading.Event()
    release = threading.Event()

    def slow_request() -> dict[int, tuple[int, int]]:  # as a slow assignment or seek
        serving.set()
        release.wait(10)
        return {0: (0, 5)}

    try:
        adapter.start(10.0)
        future = adapter.call_soon(slow_request)
        assert serving.wait(10)
        with pytest.raises(TransportError, match="did not answer"):
            answer_within(future, 0.05, "the offsets of 'snap'")
        release.set()
        assert adapter.call_soon(lambda: "read on").result(5) == "read on"
        assert adapter.running
        assert adapter.counters.get("consumer_thread_crashed", 0) == 0
    finally:
        release.set()
        adapter.close(2.0)


def test_requests_that_keep_coming_do_not_keep_the_consumer_thread_from_reading() -> None:
    """A hundred runs stopping at once each asked the consumer thread for its topic's
    watermarks every 20 ms while waiting for its final iteration. The thread served queued
    requests until none was left before it read again, so it no longer read: the gateway's
    replies to the other stops went unread, every one timed out, every file ended aborted.
    It now reads again after SERVE_BUDGET_S of requests; the rest wait for the next pass."""
    from recorder.client.kafka import SERVE_BUDGET_S

    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", app_name="budget")
    adapter = KafkaAdapter(settings, lambda records, drained: None)
    try:
        served: list[int] = []
        futures = [adapter.call_soon(lambda i=i: served.append(i) or time.sleep(0.005))
                   for i in range(100)]  # 0.5 s of requests queued
        started = time.monotonic()
        assert adapter._serve_requests(None, wait=False) is True  # type: ignore[arg-type]
        took = time.monotonic() - started
        assert 1 <= len(served) < 100 and took < SERVE_BUDGET_S + 0.1, (len(served), took)
        while len(served) < 100:  # the next passes serve the rest, in order
            adapter._serve_requests(None, wait=False)  # type: ignore[arg-type]
        assert served == list(range(100)) and all(f.done() for f in futures)
    finally:
        adapter.close(2.0)
