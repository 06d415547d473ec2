"""Run definitions (YAML -> validated :class:`RunDefinition`), reload diffs, daemon settings.

Imports neither confluent_kafka nor h5py.
"""

from recorder.config.diff import RunChange, RunDiff, diff_runs
from recorder.config.loader import (
    LoadedRuns,
    Problem,
    RunDefinitionError,
    RunSource,
    check_runs,
    load_runs,
    parse_runs,
)
from recorder.config.models import RunDefinition, RunMetadata, SnapshotSpec

__all__ = [
    "LoadedRuns",
    "Problem",
    "RunChange",
    "RunDefinition",
    "RunDefinitionError",
    "RunDiff",
    "RunMetadata",
    "RunSource",
    "SnapshotSpec",
    "check_runs",
    "diff_runs",
    "load_runs",
    "parse_runs",
]
