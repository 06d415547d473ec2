"""HDF5 filter keyword arguments for h5py ``create_dataset`` (gzip, lzf, zstd, blosc2).

Stored chunks carry a checksum whatever the compression but ``none``: gzip's deflate stream
has its own (zlib's Adler-32), and lzf, zstd and blosc2 chunks get HDF5's ``fletcher32``
filter after the compressor (built into every HDF5 library, so no reader needs more than the
compressor itself), so that a damaged chunk fails to read instead of reading back as other
values (``k2eg-recorder verify --data``). ``none`` stays unfiltered: fletcher32 there made a
plain read ~7x slower (32 MB of float64: 0.011 -> 0.076 s), the cost of the other three's
decompression.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any

import numpy as np

from recorder.errors import SinkError
from recorder.sinks.options import Compression, OutputOptions

DEFAULT_LEVELS = {Compression.GZIP: 4, Compression.ZSTD: 3, Compression.BLOSC2: 5}
LZF_FILTER = "lzf (h5py; other HDF5 readers need its LZF plugin)"
CHECKSUM = {"fletcher32": True}  # after the compressor: the stored bytes are checked
LIVE_LEVELS = {Compression.GZIP: 1, Compression.ZSTD: 1, Compression.BLOSC2: 1}


def missing_plugin(compression: Compression) -> str | None:
    """Why ``compression`` cannot be written on this host (the package its filter comes
    from is not installed), or None. Looks the package up without importing it (the daemon
    process does not import h5py)."""
    if compression in (Compression.ZSTD, Compression.BLOSC2) and (
            importlib.util.find_spec("hdf5plugin") is None):
        return (f"compression {compression.value!r} needs the hdf5plugin package, which is "
                "not installed here (pip install 'k2eg-recorder[compression]', or "
                "hdf5plugin)")
    return None


def register_plugins(required: Any) -> None:
    """Register hdf5plugin's filters (zstd, blosc2) when a file's ``required_plugins``
    attribute names them, so that this process can read it: processes that did not write
    it (recover's, ``ls``, the daemon reading offsets and file events) have not imported
    the package, and it costs ~6 MB to load, so only files that need it do. Without the
    package the read fails with HDF5's words."""
    names = [] if required is None else np.atleast_1d(required).tolist()
    if any("hdf5plugin" in str(n) for n in names):
        with contextlib.suppress(ImportError):
            import hdf5plugin  # noqa: F401


def filter_kwargs(
    options: OutputOptions, dtype: np.dtype[Any] | None, *, live: bool = False
) -> tuple[dict[str, Any], str | None]:
    """(create_dataset keyword arguments, required plugin name or None)."""
    comp = options.live_compression if live else options.compression
    level = options.compression_level
    if live or level is None:
        level = (LIVE_LEVELS if live else DEFAULT_LEVELS).get(comp, 0)
    assert level is not None
    shuffle = bool(
        options.shuffle
        and dtype is not None
        and dtype.kind in "iub"
        and dtype.itemsize > 1
    )
    if comp is Compression.NONE:
        return {}, None
    if comp is Compression.GZIP:
        return {"compression": "gzip", "compression_opts": level, "shuffle": shuffle}, None
    if comp is Compression.LZF:  # in h5py, not in libhdf5: h5dump cannot decode it alone
        return {"compression": "lzf", "shuffle": shuffle, **CHECKSUM}, LZF_FILTER
    try:
        import hdf5plugin
    except ImportError as exc:
        raise SinkError(missing_plugin(comp) or f"hdf5plugin: {exc}") from exc
    if comp is Compression.ZSTD:
        return ({**hdf5plugin.Zstd(clevel=level), "shuffle": shuffle, **CHECKSUM},
                "zstd (hdf5plugin)")
    blosc_shuffle = hdf5plugin.Blosc2.SHUFFLE if shuffle else hdf5plugin.Blosc2.NOFILTER
    return (
        {**hdf5plugin.Blosc2(cname="zstd", clevel=level, filters=blosc_shuffle), **CHECKSUM},
        "blosc2 (hdf5plugin)",
    )


def rows_per_chunk(row_bytes: int, target: int = 256 * 1024, max_rows: int = 65536) -> int:
    """Rows per chunk so a chunk holds about ``target`` bytes (at least one row)."""
    return int(max(1, min(max_rows, target // max(1, row_bytes))))
