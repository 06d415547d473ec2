"""Random mutations of simulator PV structures, shared by the property tests (hypothesis).

Importable from every test directory: pytest puts ``tests/`` (the rootdir conftest's
directory) on ``sys.path``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

from recorder.sim.pvs import parse_pv, pv_structure

PROPERTY_PVS = ["SIM:AI:DOUBLE:1", "SIM:AI:FLOAT:2", "SIM:AI:INT:3", "SIM:WF:DOUBLE:4:N6",
                "SIM:MBBI:ENUM:5", "SIM:BI:BOOL:6", "SIM:SI:STRING:7", "SIM:IMG:USHORT:8:S3x2"]
FIELD_MUTATIONS = ("value", "display", "alarm", "message", "ns", "sec", "tag", "frame",
                   "length")
# timeStamp.userTag: taken out when a nonzero int32 (codec.F_USER_TAG), else kept in the rest
USER_TAGS = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from(
    [0, 1, 127, 128, -1, -33, 2**31 - 1, -(2**31), 2**31, -(2**31) - 1, 2**40, True, False,
     None, 1.5, "7"]))
T0_NS = 1_763_700_000 * 1_000_000_000  # iteration k's structures are stamped T0_NS + k * 999_983


def mutate(draw: st.DrawFn, s: dict[str, Any], muts: set[str], *,
           values: st.SearchStrategy[Any], messages: Sequence[Any],
           limits: Sequence[Any], fixed: tuple[type, ...] = (dict, list)) -> None:
    """Apply the ``muts`` (of :data:`FIELD_MUTATIONS`) to the PV structure ``s`` in place:
    a value drawn from ``values`` (unless the value is one of ``fixed``), ``display.limitLow``
    from ``limits``, alarm severity/status beyond int32, a message from ``messages``,
    nanoseconds and seconds outside the storable range, a user tag (:data:`USER_TAGS`), an
    image's uniqueId (as a user tag) and frame nanoseconds, a waveform cut to 0..8 elements."""
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
    if "tag" in muts:
        s["timeStamp"]["userTag"] = draw(USER_TAGS)
    if "frame" in muts and "uniqueId" in s:
        s["uniqueId"] = draw(USER_TAGS)
        s["dataTimeStamp"]["nanoseconds"] = draw(st.sampled_from([0, 999_999_999, 10**9, -1]))
    if "length" in muts and isinstance(s["value"], list):
        s["value"] = s["value"][: draw(st.integers(0, 8))]


def mutated_iterations(draw: st.DrawFn, *, max_iterations: int, mutations: Sequence[str],
                       max_mutations: int, **mutate_kw: Any,
                       ) -> list[list[tuple[str, dict[str, Any], set[str]]]]:
    """1..``max_iterations`` iterations of 1-4 distinct :data:`PROPERTY_PVS`: each PV's
    simulator structure of that iteration with a drawn set of up to ``max_mutations`` of
    ``mutations`` applied by :func:`mutate` (``mutate_kw``: its strategies). Per iteration,
    (pv, structure, the set drawn) per PV: names in ``mutations`` beyond
    :data:`FIELD_MUTATIONS` are the caller's to apply."""
    n_iter = draw(st.integers(1, max_iterations))
    pvs = draw(st.lists(st.sampled_from(PROPERTY_PVS), min_size=1, max_size=4, unique=True))
    out = []
    for k in range(n_iter):
        samples = []
        for pv in pvs:
            s = pv_structure(parse_pv(pv), k, T0_NS + k * 999_983)
            muts = draw(st.sets(st.sampled_from(mutations), max_size=max_mutations))
            mutate(draw, s, muts, **mutate_kw)
            samples.append((pv, s, muts))
        out.append(samples)
    return out
