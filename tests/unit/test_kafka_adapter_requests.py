"""KafkaAdapter's requests to its consumer thread, when the caller gives up waiting."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from recorder.client.kafka import KafkaAdapter, _Request, answer_within
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

    def slow_watermarks(consumer: Any, request: _Request) -> dict[int, tuple[int, int]]:
        serving.set()
        release.wait(10)
        return {0: (0, 5)}

    monkeypatch.setattr(adapter, "_do_watermarks", slow_watermarks)
    try:
        adapter.start(10.0)
        future = adapter.watermarks("snap")
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
