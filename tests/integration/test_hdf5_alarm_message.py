"""Format 3.0: ``alarm.message`` as a per-row column (docs/decisions/0005).

A PV whose alarm message flaps (``"NO_ALARM"`` <-> ``"HIGH"``) used to get one metadata entry
(the whole structure as JSON, uncompressed in the global heap) per change; now its rows carry
a code into ``alarm_message@texts`` and flag 16, and the structure is stored once.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from test_hdf5_roundtrip import record_closed, same

from recorder.client.values import PVSample
from recorder.reader import open_file
from recorder.sinks import final_pv
from recorder.sinks import finalize as finalize_module
from recorder.sinks import hdf5 as hdf5_module
from recorder.sinks.codec import F_MESSAGE, MESSAGE_MAX_BYTES, strip_message
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions

N = 40
DISPLAY = {"units": "A", "precision": 3, "limitLow": -10.0, "limitHigh": 10.0,
           "description": "a long enough description " * 4}


def _ts(i: int) -> dict[str, Any]:
    return {"secondsPastEpoch": 1_700_000_000 + i, "nanoseconds": 1000 * i, "userTag": 0}


def _alarm(i: int, message: Any) -> dict[str, Any]:
    return {"severity": 2 if message == "HIGH" else 0, "status": 3 if message == "HIGH" else 0,
            "message": message}


def _flap(i: int) -> str:
    return "HIGH" if (i // 3) % 2 else "NO_ALARM"


def _odd(i: int) -> Any:
    """Messages that cannot (or need not) be a column: nil, not a string, NUL, too long."""
    return [None, 7, "a\x00b", "L" * (MESSAGE_MAX_BYTES + 1), "ok", "ok"][i % 6]


def _samples(i: int) -> list[PVSample]:
    def pv(name: str, alarm: dict[str, Any] | None, **extra: Any) -> PVSample:
        data: dict[str, Any] = {"value": float(i), "timeStamp": _ts(i)}
        if alarm is not None:
            data["alarm"] = alarm
        data["display"] = {**DISPLAY, **extra}
        return PVSample(name, data)

    return [
        pv("FLAP", _alarm(i, _flap(i))),  # flapping: a column, one metadata entry
        pv("FLAP2", _alarm(i, _flap(i))),  # the same codes and texts: a hard link
        pv("CONST", _alarm(i, "NO_ALARM")),  # never changes: no column
        # the structure changes (units), the message does not: a column of one text
        pv("UNITS", _alarm(i, "LOLO"), units="A" if i < N // 2 else "mA"),
        pv("ODD", _alarm(i, _odd(i))),  # some rows keep their message in the metadata
        # no alarm at first, then a flapping one: the column starts with -1
        pv("LATE", _alarm(i, _flap(i)) if i >= 10 else None),
    ]


def _record(directory: Path) -> tuple[Path, dict[str, list[PVSample]]]:
    rec = HDF5Recording(OutputOptions(directory=directory), run_name="msg")
    return record_closed(rec, N, _samples)


def _messages(sent: list[PVSample]) -> list[Any]:
    return [s.alarm_message for s in sent]  # str, None when absent or not a string


def _info(h: h5py.File) -> dict[str, Any]:
    return {r["pv_name"].decode(): r for r in h["pv_info"][()]}


def test_flapping_message_is_a_column_and_the_structure_is_stored_once(
    tmp_path: Path,
) -> None:
    path, sent = _record(tmp_path)
    with h5py.File(path, "r") as h:
        assert h.attrs["format_version"] == "5.1"
        info = _info(h)
        g = h["pvs/FLAP"]
        assert "FLAP" not in h["metadata"] and info["FLAP"]["metadata_entries"] == 1
        assert info["FLAP"]["flags"] & F_MESSAGE
        assert b'"message":null' in info["FLAP"]["metadata"]
        msg = g["alarm_message"]
        assert msg.dtype == np.int32 and list(msg.attrs["texts"]) == ["NO_ALARM", "HIGH"]
        texts = np.array(list(msg.attrs["texts"]), dtype=object)
        assert texts[msg[()]].tolist() == [_flap(i) for i in range(N)]
        # identical codes and texts: one dataset, two names
        assert h["pvs/FLAP2/alarm_message"] == msg
        # a constant structure keeps its one message in its one metadata entry
        assert "alarm_message" not in h["pvs/CONST"] and "CONST" not in h["metadata"]
        assert not info["CONST"]["flags"] & F_MESSAGE
        assert b'"message":"NO_ALARM"' in info["CONST"]["metadata"]
        # the structure changes for another reason: the message is a column all the same
        units = h["pvs/UNITS"]
        assert list(units["alarm_message"].attrs["texts"]) == ["LOLO"]
        assert units["alarm_message"][()].tolist() == [0] * N
        assert h["metadata/UNITS/row"][()].tolist() == [0, N // 2]
        assert all(b'"message":null' in j for j in h["metadata/UNITS/json"][()])
    with open_file(path) as f:
        for pv, samples in sent.items():
            same(f.samples(pv), samples)
            assert f.alarm_messages(pv).tolist() == _messages(samples), pv


def test_messages_that_stay_in_the_metadata(tmp_path: Path) -> None:
    """Nil, non-string, NUL and over-long messages are not taken out (flag 16 clear, code
    -1); rows before a PV's first message are -1 too."""
    path, sent = _record(tmp_path)
    with h5py.File(path, "r") as h:
        odd = h["pvs/ODD"]
        flags = odd["flags"][()]
        codes = odd["alarm_message"][()]
        taken = [i % 6 >= 4 for i in range(N)]
        assert ((flags & F_MESSAGE) != 0).tolist() == taken
        assert (codes >= 0).tolist() == taken
        assert list(odd["alarm_message"].attrs["texts"]) == ["ok"]
        late = h["pvs/LATE"]
        assert late["alarm_message"][()].tolist()[:10] == [-1] * 10
        assert (late["alarm_message"][()][10:] >= 0).all()
    with open_file(path) as f:
        assert f.alarm_messages("ODD").tolist() == [
            m if isinstance(m, str) else None for m in (_odd(i) for i in range(N))]
        assert f.alarm_messages("LATE").tolist() == [None] * 10 + [
            _flap(i) for i in range(10, N)]
        same(f.samples("ODD"), sent["ODD"])
        same(f.samples("LATE"), sent["LATE"])


def test_more_texts_than_the_column_takes(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond MESSAGE_TEXTS_MAX distinct texts, new ones stay in the metadata entries."""
    monkeypatch.setattr(final_pv, "MESSAGE_TEXTS_MAX", 1)
    path, sent = _record(tmp_path)
    with h5py.File(path, "r") as h:
        g = h["pvs/FLAP"]
        assert list(g["alarm_message"].attrs["texts"]) == ["NO_ALARM"]
        high = [_flap(i) == "HIGH" for i in range(N)]
        assert (g["alarm_message"][()] < 0).tolist() == high
        jsons = h["metadata/FLAP/json"][()]
        assert any(b'"message":"HIGH"' in j for j in jsons)
        assert any(b'"message":null' in j for j in jsons)
    with open_file(path) as f:
        for pv, samples in sent.items():
            same(f.samples(pv), samples)
            assert f.alarm_messages(pv).tolist() == _messages(samples), pv


def test_spilled_message_column_equals_the_buffered_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a tiny memory budget the column is written in blocks, its texts at the end."""
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir()
    many.mkdir()
    path1, sent = _record(one)
    monkeypatch.setattr(hdf5_module, "finalize", functools.partial(
        finalize_module.finalize, block_bytes=1024))
    path2, _ = _record(many)
    with h5py.File(path1, "r") as a, h5py.File(path2, "r") as b:
        for pv in ("FLAP", "UNITS", "ODD", "LATE"):
            ca, cb = a[f"pvs/{pv}/alarm_message"], b[f"pvs/{pv}/alarm_message"]
            assert ca[()].tolist() == cb[()].tolist(), pv
            assert list(ca.attrs["texts"]) == list(cb.attrs["texts"]), pv
            assert ca.chunks is None and cb.chunks is not None, pv  # compact / spilled
        assert "alarm_message" not in b["pvs/CONST"]
    with open_file(path2) as f:
        for pv, samples in sent.items():
            same(f.samples(pv), samples)


def test_format_2_files_are_still_read(tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2.0 file (message in the metadata entries, no column) reads the same."""
    monkeypatch.setattr(final_pv, "strip_message", lambda raw: None)
    monkeypatch.setattr(finalize_module, "FORMAT_VERSION", "2.0")
    path, sent = _record(tmp_path)
    with h5py.File(path, "r") as h:
        assert h.attrs["format_version"] == "2.0"
        assert "alarm_message" not in h["pvs/FLAP"]
        assert len(h["metadata/FLAP/row"]) > 2
    with open_file(path) as f:
        for pv, samples in sent.items():
            same(f.samples(pv), samples)
            assert f.alarm_messages(pv).tolist() == _messages(samples), pv


def test_strip_message() -> None:
    raw = b'{"d":{"alarm":{"severity":null,"message":"HIGH"},"value":null},"f":[]}'
    assert strip_message(raw) == (
        b'{"d":{"alarm":{"severity":null,"message":null},"value":null},"f":[]}', "HIGH")
    assert strip_message(b'{"d":{"value":1},"f":[]}') is None
    assert strip_message(b'{"d":{"alarm":{"message":null}},"f":[]}') is None
    assert strip_message(b'{"d":{"alarm":"message"},"f":[]}') is None
    assert strip_message(b'{"d":{"alarm":{"message":"\\ud800"}},"f":[]}') is None
