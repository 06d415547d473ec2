"""``output.live_compression``: the file being written is uncompressed by default (fastest);
a compressed live file finalizes to the same content."""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest
from test_hdf5_roundtrip import record, same

from recorder.reader import open_file
from recorder.sinks.filters import filter_kwargs
from recorder.sinks.options import Compression, OutputOptions


def test_live_default_is_uncompressed_final_is_gzip(tmp_path: Path) -> None:
    opts = OutputOptions(directory=tmp_path)
    assert opts.live_compression is Compression.NONE
    assert filter_kwargs(opts, None, live=True) == ({}, None)
    assert filter_kwargs(opts, None)[0]["compression"] == "gzip"
    gz = OutputOptions(directory=tmp_path, live_compression="gzip", compression="none")
    assert filter_kwargs(gz, None, live=True)[0]["compression_opts"] == 1  # fast level
    assert filter_kwargs(gz, None) == ({}, None)


@pytest.mark.parametrize("live", ["none", "gzip", "lzf"])
def test_live_file_filters_and_same_final_content(tmp_path: Path, live: str) -> None:
    rec, sent = record(tmp_path, n_iter=6, live_compression=live)
    rec.flush()
    partial = rec.current_path
    assert partial is not None and partial.name.endswith(".partial")
    with h5py.File(partial, "r", swmr=True) as h:
        ds = h["live/samples/fval"]
        assert ds.compression == (None if live == "none" else live)
    (final,) = rec.close()
    with open_file(final) as f:
        for pv, samples in sent.items():
            same(list(f.samples(pv)), samples)
    with h5py.File(final, "r") as h:  # the final layout uses `compression` (gzip default)
        chunked = [h[n] for n in ("iterations/iter_index",) if h[n].chunks is not None]
        for ds in chunked:
            assert ds.compression == "gzip"


def test_lzf_files_say_what_other_readers_need(tmp_path: Path) -> None:
    """LZF is h5py's filter, not libhdf5's (Debian's h5dump cannot print such data): every
    lzf dataset names it in ``required_filter`` and the file lists it in
    ``required_plugins``, as for zstd/blosc2; the file passes verify."""
    from test_hdf5_roundtrip import write_iteration

    from recorder.client.values import PVSample
    from recorder.sinks.filters import LZF_FILTER
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.verify import verify_file

    rec = HDF5Recording(OutputOptions(directory=tmp_path, compression="lzf"), run_name="lzf")
    for i in range(8):  # ~1 MB of waveform: chunked (small columns become compact, unfiltered)
        write_iteration(rec, i, [PVSample("W", {"value": [float(i + k) for k in range(16384)]})])
    (final,) = rec.close()
    with h5py.File(final, "r") as h:
        assert list(h.attrs["required_plugins"]) == [LZF_FILTER]
        lzf: list[h5py.Dataset] = []
        h.visititems(lambda _n, o: lzf.append(o) if isinstance(o, h5py.Dataset)
                     and o.compression == "lzf" else None)
        assert lzf and all(ds.attrs["required_filter"] == LZF_FILTER for ds in lzf)
    assert verify_file(final, data=True).errors == []


@pytest.mark.parametrize("live", ["zstd", "blosc2"])
def test_a_leftover_compressed_with_a_plugin_is_recovered_in_a_fresh_process(
        tmp_path: Path, live: str) -> None:
    """A .partial written with ``live_compression`` zstd/blosc2 (and gzip or no plugin for
    the final file) left by a crash: the daemon recovers it at its restart in a fresh child
    process, which never imported hdf5plugin, so HDF5 could not read the live data ("can't
    open directory (/usr/local/lib/plugin)"): the leftover stayed, the daemon said it could
    not recover it (`recover --no-verify` as well)."""
    import shutil

    from recorder.daemon.leftovers import recover_in_child

    pytest.importorskip("hdf5plugin")
    rec, sent = record(tmp_path / "w", n_iter=6, live_compression=live, compression="gzip")
    rec.flush()
    assert rec.current_path is not None
    partial = tmp_path / rec.current_path.name
    shutil.copy(rec.current_path, partial)  # as a crash leaves it
    rec.close()
    final = recover_in_child(partial)
    assert not partial.exists()
    with open_file(final) as f:
        assert f.status == "aborted"
        for pv, samples in sent.items():
            same(list(f.samples(pv)), samples)


def test_ls_reads_a_live_file_compressed_with_a_plugin(tmp_path: Path) -> None:
    """`k2eg-recorder ls` (a fresh process: hdf5plugin not imported) reads the commit
    records of a .partial written with live_compression zstd; it said "cannot read: ...
    can't open directory (/usr/local/lib/plugin)" and left the recording out."""
    import json
    import subprocess
    import sys

    pytest.importorskip("hdf5plugin")
    rec, _sent = record(tmp_path, n_iter=6, live_compression="zstd")
    rec.flush()
    out = subprocess.run([sys.executable, "-m", "recorder.cli", "ls", "--json", str(tmp_path)],
                         check=False, capture_output=True, text=True, timeout=120)
    rec.close()
    assert out.returncode == 0, out.stdout + out.stderr
    (g,) = json.loads(out.stdout)["recordings"]
    assert g["iterations"] == 6 and g["files"][0]["partial"], g
