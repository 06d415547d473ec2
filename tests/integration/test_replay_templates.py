"""Replay packs a finalized file's rows by template (recorder.replay_pack) and reads it a
window of iterations at a time, bounded in bytes: the messages are those of every sample
rebuilt and packed whole, whatever the windows, values and structures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hdf5_roundtrip import record_closed
from test_live_view import _mixed, _mutated_streams

from recorder import replay
from recorder.client.values import PVSample
from recorder.reader import RecordingFile, open_file
from recorder.replay_pack import PackedStructure, StructureTemplate
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions


def messages(path: Path, *, sequenced: bool = True) -> list[bytes]:
    with open_file(path) as f:
        return [m for it in replay.iterations(f)
                for m in replay.encode_iteration(it, "snap", sequenced=sequenced)]


def whole_messages(path: Path, mp: pytest.MonkeyPatch, *, sequenced: bool = True
                   ) -> list[bytes]:
    """What replay sent before templates: every row rebuilt as a sample, packed whole."""
    with mp.context() as m:
        m.setattr(RecordingFile, "stored_rows", lambda *_a: None)
        return messages(path, sequenced=sequenced)


def test_templates_give_the_bytes_of_every_sample_packed_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="tmpl")
    path, sent = record_closed(rec, 30, _mixed)
    expected = whole_messages(path, monkeypatch)
    assert len(expected) > sum(map(len, sent.values())) == 240  # and headers, tails
    packed: list[bool] = []
    real_pack = StructureTemplate.pack

    def spy(self: StructureTemplate, row: Any) -> bytes:
        packed.append(True)
        return real_pack(self, row)

    monkeypatch.setattr(StructureTemplate, "pack", spy)
    monkeypatch.setattr(replay, "WINDOW_BYTES", 2_000)  # many windows, of 1 to 8 iterations
    assert messages(path) == expected
    # not vacuous: most of the 240 rows were packed by template (X's rows of other types,
    # NT's without a timeStamp and the first row of each entry and window: packed whole)
    assert len(packed) > 150
    monkeypatch.setattr(replay, "FIRST_WINDOW", 1)
    assert messages(path, sequenced=False) == whole_messages(path, monkeypatch,
                                                            sequenced=False)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(stream=_mutated_streams(), window_bytes=st.sampled_from([1, 3_000, 1 << 26]))
def test_property_templates_give_the_bytes_of_samples_packed_whole(
    tmp_path_factory: pytest.TempPathFactory, stream: list[list[PVSample]], window_bytes: int
) -> None:
    directory = tmp_path_factory.mktemp("prop")
    rec = HDF5Recording(OutputOptions(directory=directory), run_name="prop")
    path, _ = record_closed(rec, len(stream), lambda i: stream[i])
    with pytest.MonkeyPatch.context() as mp:
        expected = whole_messages(path, mp)
        mp.setattr(replay, "WINDOW_BYTES", window_bytes)
        assert messages(path) == expected


def test_a_window_holds_about_window_bytes_of_waveforms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window was 65,536 values whatever their size: replaying a 230 MB file of 1,000-
    element waveforms held 2.6 GB of Python floats. Windows are now sized by the bytes per
    iteration seen so far, and the values are held packed."""
    ts = {"secondsPastEpoch": 1_700_000_000, "nanoseconds": 0, "userTag": 0}

    def waveforms(i: int) -> list[PVSample]:
        return [PVSample(f"W{k}", {"value": [float(i + k)] * 1_000, "timeStamp": ts})
                for k in range(3)]

    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="wf")
    path, _ = record_closed(rec, 40, waveforms)
    spans: list[int] = []
    real = RecordingFile.stored_rows

    def spy(self: RecordingFile, pv: str, lo: int, hi: int | None) -> Any:
        rows = real(self, pv, lo, hi)
        if pv == "W0":
            spans.append(len(rows or ()))
        return rows

    monkeypatch.setattr(RecordingFile, "stored_rows", spy)
    monkeypatch.setattr(replay, "WINDOW_BYTES", 100_000)  # ~3.7 iterations of 3 x 9 kB
    with open_file(path) as f:
        its = list(replay.iterations(f))
    assert [len(it.samples) for it in its] == [3] * 40
    assert all(isinstance(s, PackedStructure) for it in its for s in it.samples[1:])
    assert spans[0] == replay.FIRST_WINDOW and sum(spans) == 40
    assert max(spans[1:]) == 3 and len(spans) == 1 + 11, spans


def test_a_value_that_cannot_be_rebuilt_is_named_damaged(tmp_path: Path) -> None:
    """Rows are rebuilt in replay now, outside the reader's methods: damage found there is
    still a DamagedFileError naming the file (the CLI prints it), not a bare KeyError."""
    import json

    import h5py

    from recorder.errors import DamagedFileError

    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="dmg")
    path, _ = record_closed(rec, 3, _mixed)
    path.chmod(0o644)
    with h5py.File(path, "r+") as h5:
        info = h5["pv_info"]
        rows = info[()]
        (i,) = [k for k, name in enumerate(rows["pv_name"]) if name in (b"FLAP", "FLAP")]
        rest = json.loads(rows[i]["metadata"])
        del rest["d"]["timeStamp"]  # its rows still say their time was taken out (flag 1)
        rows[i]["metadata"] = json.dumps(rest)
        info[...] = rows
    with open_file(path) as f, pytest.raises(DamagedFileError, match=f"{path}: damaged: "):
        list(replay.iterations(f))
