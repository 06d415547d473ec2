"""k2eg-recorder: record k2eg gateway snapshots from Kafka into chunked HDF5 files."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("k2eg-recorder")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
