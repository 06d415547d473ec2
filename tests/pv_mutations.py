"""Random mutations of simulator PV structures, shared by the property tests (hypothesis).

Importable from every test directory: pytest puts ``tests/`` (the rootdir conftest's
directory) on ``sys.path``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

PROPERTY_PVS = ["SIM:AI:DOUBLE:1", "SIM:AI:FLOAT:2", "SIM:AI:INT:3", "SIM:WF:DOUBLE:4:N6",
                "SIM:MBBI:ENUM:5", "SIM:BI:BOOL:6", "SIM:SI:STRING:7"]
FIELD_MUTATIONS = ("value", "display", "alarm", "message", "ns", "sec", "length")


def mutate(draw: st.DrawFn, s: dict[str, Any], muts: set[str], *,
           values: st.SearchStrategy[Any], messages: Sequence[Any],
           limits: Sequence[Any], fixed: tuple[type, ...] = (dict, list)) -> None:
    """Apply the ``muts`` (of :data:`FIELD_MUTATIONS`) to the PV structure ``s`` in place:
    a value drawn from ``values`` (unless the value is one of ``fixed``), ``display.limitLow``
    from ``limits``, alarm severity/status beyond int32, a message from ``messages``,
    nanoseconds and seconds outside the storable range, a waveform cut to 0..8 elements."""
    if "value" in muts and not isinstance(s["value"], fixed):
        s["value"] = draw(values)
    if "display" in muts and "display" in s:
        s["display"]["limitLow"] = draw(st.sampled_from(limits))
    if "alarm" in muts:
        s["alarm"]["severity"] = draw(st.integers(-(2**33), 2**33))
        s["alarm"]["status"] = draw(st.integers(0, 300))
    if "message" in muts:
        s["alarm"]["message"] = draw(st.sampled_from(messages))
    if "ns" in muts:
        s["timeStamp"]["nanoseconds"] = draw(st.integers(-5, 2 * 10**9))
    if "sec" in muts:
        s["timeStamp"]["secondsPastEpoch"] = draw(st.integers(-(2**63), 2**64 - 1))
    if "length" in muts and isinstance(s["value"], list):
        s["value"] = s["value"][: draw(st.integers(0, 8))]
