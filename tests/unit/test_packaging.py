"""What pyproject.toml lets pip install: the oldest version each requirement admits must have
what the code uses of it (the test environment has the newest ones, so nothing else here
would see an older one break)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"

# package -> (oldest version the code works with, why)
OLDEST_THAT_WORKS = {
    "confluent-kafka": ("2.16", "with 2.13 to 2.15 a message over receive.message.max.bytes "
                                "made metadata requests fail and Kafka look unreachable on and "
                                "off: the runs never got the error as their last_error, as the "
                                "README promises (test_large_messages)"),
    "hdf5plugin": ("4.1", "hdf5plugin.Blosc2 (compression: blosc2) came in 4.1: with 4.0 a "
                          "blosc2 run passed validate, then its recording failed with "
                          "AttributeError"),
    "msgpack": ("1.0.4", "msgpack before 1.0.4 has no wheel for Python 3.11 and installs "
                         "without its C extension: its pure-Python packer made the bridge's "
                         "protocol 1.0 frames with arrays no client decodes ('buffer is too "
                         "small'), and a deeply nested PV map raised RecursionError (logged "
                         "as a decoder bug) instead of being counted not_msgpack"),
}


def _requirements() -> list[tuple[str, Requirement]]:
    project = tomllib.loads(PYPROJECT.read_text("utf-8"))["project"]
    found = [("dependencies", Requirement(r)) for r in project["dependencies"]]
    for extra, reqs in project["optional-dependencies"].items():
        found += [(f"[{extra}]", Requirement(r)) for r in reqs]
    return found


def _lowest(req: Requirement) -> Version | None:
    """The lowest version ``req`` admits by its lower bound (None: no lower bound)."""
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", ">", "==", "~=")]
    return max(bounds) if bounds else None


@pytest.mark.parametrize("name", sorted(OLDEST_THAT_WORKS))
def test_no_requirement_admits_a_version_the_code_breaks_on(name: str) -> None:
    oldest, why = OLDEST_THAT_WORKS[name]
    reqs = [(where, r) for where, r in _requirements() if r.name == name]
    assert reqs, f"{name} is not in pyproject.toml"
    for where, req in reqs:
        lowest = _lowest(req)
        assert lowest is not None and lowest >= Version(oldest), (
            f"{where} {req} admits versions before {oldest}, but {why}")
