"""Helpers for the Karabo bridge tests: strict container comparison and the wire transform."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from karabo_bridge import Client
from karabo_bridge.serializer import deserialize, serialize

from recorder.sinks.bridge.mapping import Train
from recorder.sinks.bridge.sink import KaraboBridgeSink, wire_safe


def over_the_wire(train: Train, version: str) -> Train:
    """What a karabo_bridge client receives for ``train`` (same serializer as the sink)."""
    data, meta = train
    frames = serialize(wire_safe(data) if version == "2.2" else data, meta,
                       protocol_version=version)
    got, got_meta = deserialize([bytes(f) for f in frames])
    return strip_v1(got, got_meta, version)


def strip_v1(data: dict[str, Any], meta: dict[str, Any], version: str) -> Train:
    if version == "1.0":  # protocol 1.0 repeats the metadata inside data[source]
        data = {src: {k: v for k, v in d.items() if k != "metadata"} for src, d in data.items()}
    return data, meta


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) < 200 else text[:200] + "..."


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Strict equality: same keys, same types (numpy dtypes and shapes included), NaN == NaN."""
    if isinstance(a, Mapping):
        assert isinstance(b, Mapping), (path, type(b))
        assert set(a) == set(b), (path, sorted(set(a) ^ set(b)))
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}")
        return
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), (path, type(b))
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype, a.shape, b.shape)
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), (path, _short(a), _short(b))
        return
    if isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), (path, _short(a), _short(b))
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
        return
    assert type(a) is type(b), (path, type(a), type(b), _short(a), _short(b))
    if isinstance(a, float | np.floating) and math.isnan(float(a)):
        assert math.isnan(float(b)), (path, b)
        return
    assert a == b, (path, _short(a), _short(b))


class Collector:
    """A karabo_bridge.Client (REQ or SUB) calling next() in a thread until stopped."""

    def __init__(self, endpoint: str, sock: str) -> None:
        self.client = Client(endpoint, sock=sock, timeout=0.3)
        self.trains: list[Train] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"test-bridge-{sock}")

    def start(self) -> Collector:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.trains.append(self.client.next())
            except TimeoutError:
                continue

    def stop(self) -> list[Train]:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()
        self.client.__exit__(None, None, None)  # destroys its zmq context
        return self.trains


def tid(train: Train) -> int:
    from recorder.sinks.bridge.mapping import RECORDER_SOURCE

    return int(train[1][RECORDER_SOURCE]["timestamp.tid"])


def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def wait_subscribed(sink: KaraboBridgeSink) -> None:
    wait_for(lambda: sink.has_subscribers, what="the SUB client's subscription")
