"""OutputOptions: template validation and safe file names."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydantic import ValidationError

from recorder.sinks.codec import escape_name, unescape_name
from recorder.sinks.options import OutputOptions, partial_path, render_file_name, unique_path

START = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def test_default_template_renders(tmp_path: Path) -> None:
    opts = OutputOptions(directory=tmp_path)
    p = render_file_name(opts, run="linac", snapshot="s", start=START, seq=7)
    assert p == (tmp_path / "linac_20250102T030405Z_0007.h5").resolve()
    seg = render_file_name(opts, run="linac", snapshot="s", start=START, seq=7, segment=2)
    assert seg.name == "linac_20250102T030405Z_0007_s0002.h5"


@pytest.mark.parametrize("run", ["../../etc/passwd", "/abs/x", "..", "a/b\\c", "é\x00"])
def test_names_stay_inside_directory(tmp_path: Path, run: str) -> None:
    opts = OutputOptions(directory=tmp_path, file_template="{run}.h5")
    p = render_file_name(opts, run=run, snapshot="", start=START, seq=0)
    assert p.parent == tmp_path.resolve()
    assert not p.name.startswith(".")


@pytest.mark.parametrize("template", [".h5", "データ.h5", "..nxs", "{snapshot}.hdf5"])
def test_a_name_left_without_a_stem_keeps_its_extension(tmp_path: Path, template: str) -> None:
    """A template whose stem sanitizes away (non-ASCII text only, dots only, an empty
    {snapshot}) gave the file the bare extension as its name ("h5"): no .h5 file, which
    ``ls``, ``verify DIR`` and ``open_recording`` do not see."""
    opts = OutputOptions(directory=tmp_path, file_template=template)
    ext = template.rpartition(".")[2]
    for segment in (0, 2):
        p = render_file_name(opts, run="r", snapshot="", start=START, seq=0, segment=segment)
        assert p.parent == tmp_path.resolve()
        assert p.name.endswith("." + ext) and len(p.name) > len(ext) + 1, p.name
        assert not p.name.startswith(".")


@pytest.mark.parametrize(
    "template", ["{run}{bogus}.h5", "{run}.txt", "a/{run}.h5", "{run!r}.h5", "{start:%Q", ""]
)
def test_bad_templates_rejected(tmp_path: Path, template: str) -> None:
    with pytest.raises(ValidationError):
        OutputOptions(directory=tmp_path, file_template=template)


def test_level_checked(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        OutputOptions(directory=tmp_path, compression="gzip", compression_level=12)
    with pytest.raises(ValidationError):
        OutputOptions(directory=tmp_path, compression="none", compression_level=1)
    with pytest.raises(ValidationError):
        OutputOptions(directory=tmp_path, unknown=1)  # type: ignore[call-arg]


def test_unique_path_never_reuses(tmp_path: Path) -> None:
    p = tmp_path / "x.h5"
    p.touch()
    q = unique_path(p)
    assert q != p
    partial_path(q).touch()
    assert unique_path(p) not in (p, q)


@pytest.mark.parametrize("name", ["A:B", "a/b", ".x", "%2F", "", "x%y/."])
def test_escape_roundtrip(name: str) -> None:
    esc = escape_name(name)
    assert "/" not in esc and esc not in ("", ".")
    assert unescape_name(esc) == name


def test_a_name_too_long_keeps_its_segments_apart(tmp_path: Path) -> None:
    """A name over 200 bytes is shortened; cut at its end it lost the segment number (and
    {seq}, {start}): every segment of a recording rendered to one name."""
    opts = OutputOptions(directory=tmp_path,
                         file_template="{run}_{snapshot}_{start:%Y%m%dT%H%M%SZ}_{seq:04d}.h5")
    names = {render_file_name(opts, run="r", snapshot="s" * 190, start=START, seq=seq,
                              segment=segment).name
             for seq in (0, 1) for segment in (0, 1, 2)}
    assert len(names) == 6
    assert all(len(n) <= 200 and n.endswith(".h5") and n.startswith("r_sss") for n in names)
    again = render_file_name(opts, run="r", snapshot="s" * 190, start=START, seq=1, segment=2)
    assert again.name in names  # the same inputs, the same name (a resume finds its files)


def test_start_as_epoch_seconds_is_utc_whatever_the_host_time_zone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """{start:%s} (Unix seconds) went through the C library, which reads the UTC start as
    local time: on a host in Europe/Berlin the name said an hour (in summer two) earlier."""
    import time

    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        opts = OutputOptions(directory=tmp_path, file_template="{run}_{start:%s}_{seq}.h5")
        start = dt.datetime(2026, 7, 1, 0, 0, 0, tzinfo=dt.UTC)
        path = render_file_name(opts, run="r", snapshot="s", start=start, seq=1)
        assert path.name == f"r_{int(start.timestamp())}_1.h5"
        opts = OutputOptions(directory=tmp_path, file_template="{start:%Y%%s%s.%f}.h5")
        path = render_file_name(opts, run="r", snapshot="s", start=start, seq=1)
        assert path.name == f"2026_s{int(start.timestamp())}.000000.h5"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
