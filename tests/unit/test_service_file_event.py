"""The daemon's file event for a file it cannot read: still sent, saying why, with its size
(README, "The files topic": everything but the first six fields and ``bytes`` is read from the
file itself, null with ``error`` set if it could not be read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from recorder.admin.files import FileEvent
from recorder.config.daemon import DaemonSettings
from recorder.config.models import RunDefinition
from recorder.service import Service
from recorder.settings import KafkaSettings


class _Link:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, str | None]] = []

    def produce(self, topic: str, payload: bytes, *, key: str | None = None,
                on_delivery: Any = None) -> bool:
        self.sent.append((topic, payload, key))
        return True


def _service(tmp_path: Path) -> tuple[Service, _Link, RunDefinition]:
    service = Service(DaemonSettings(config_path=tmp_path / "none.yaml"), KafkaSettings(),
                      state_dir=tmp_path / "state", gc_tuning=False)
    link = _Link()
    service._link = link  # type: ignore[assignment]
    definition = RunDefinition.model_validate({
        "name": "r",
        "snapshot": {"snapshot_name": "snap", "pv_uri_list": ["pva://A:B"]},
        "output": {"directory": str(tmp_path / "out")},
    })
    return service, link, definition


def _event(link: _Link) -> FileEvent:
    ((_topic, payload, key),) = link.sent
    assert key == "r"
    return FileEvent.decode(payload)


def _damaged_so_hdf5_raises_runtime_error(directory: Path) -> Path:
    """A finalized file with 16 bytes of its metadata overwritten where HDF5 then raises
    RuntimeError (a bad checksum when the root's attributes are read), not OSError."""
    from recorder.client.events import (
        IterationClosed,
        IterationOpened,
        IterationStatus,
        ValuesReceived,
    )
    from recorder.client.values import PVSample
    from recorder.sinks.describe import file_event_fields
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions

    rec = HDF5Recording(OutputOptions(directory=directory), run_name="r", pv_uris=["pva://A"])
    for i in range(1, 4):
        rec.handle(IterationOpened("t", "s", i, i * 1_000_000))
        rec.handle(ValuesReceived("t", i, 1, i, (PVSample("A", {"value": float(i)}),)))
        rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None,
                                   i * 1_000_000, i * 1_000_000))
    (final,) = rec.close()
    data = final.read_bytes()
    damaged = directory / "damaged.h5"
    for offset in range(0, 4096, 64):
        damaged.write_bytes(data[:offset] + b"\xff" * 16 + data[offset + 16:])
        try:
            file_event_fields(damaged)
        except RuntimeError:
            return damaged
        except (OSError, KeyError, ValueError):
            continue
    pytest.fail("no damage found that makes HDF5 raise RuntimeError")


def test_a_file_hdf5_fails_on_inside_is_told_with_the_error(tmp_path: Path) -> None:
    """HDF5 raises RuntimeError for some damage ("Error iterating over attributes (incorrect
    metadata checksum ...)"): the event was not sent at all (the run's worker only logged
    "file event failed"), nor counted in files_total."""
    damaged = _damaged_so_hdf5_raises_runtime_error(tmp_path / "out")
    service, link, definition = _service(tmp_path)
    service._on_file(definition, damaged)
    event = _event(link)
    assert event.path == str(damaged) and event.status is None
    assert event.error is not None and event.error.startswith("RuntimeError: ")


def test_the_event_of_a_file_that_cannot_be_read_still_has_its_size(tmp_path: Path) -> None:
    """Its ``bytes`` was null too: a catalog or archive job lost the size of the file it is
    told of (the README: every field but the first six and ``bytes`` is null)."""
    service, link, definition = _service(tmp_path)
    damaged = tmp_path / "r_0000.h5"
    damaged.write_bytes(b"\0" * 4096)  # not (any more) an HDF5 file
    service._on_file(definition, damaged)
    event = _event(link)
    assert event.error is not None and event.status is None
    assert event.bytes == 4096


