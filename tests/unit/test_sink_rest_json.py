"""The metadata JSON of the sink (``codec.encode_rest``): its fast path (json's C encoder on
plain structures) gives exactly the bytes of the tagging path, for any structure."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from recorder.sinks.codec import (
    _from_jsonable,
    _to_jsonable,
    decode_rest,
    encode_rest,
)


def tagged(rest: Any) -> bytes:
    """The tagging path alone (what encode_rest did before its fast path)."""
    return json.dumps(_to_jsonable(rest), separators=(",", ":"), allow_nan=False).encode()


leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
    st.binary(max_size=4), st.sampled_from([np.float64(1.5), np.int64(7), np.bool_(True),
                                            np.float32(0.25)]),
)
keys = st.one_of(st.text(max_size=6), st.sampled_from(["__float__", "__map__", "__x", "_"]),
                 st.integers(-3, 3), st.booleans())
structures = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(keys, inner, max_size=4),
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(structures)
def test_fast_path_gives_the_tagged_bytes(d: Any) -> None:
    rest = {"d": d, "f": []}
    raw = encode_rest(rest)
    assert raw == tagged(rest)
    # decoding: the untagged fast path parses to what the tag-resolving path gives
    assert repr(decode_rest(raw)) == repr(_from_jsonable(json.loads(raw)))


def test_plain_structures_take_the_fast_path_and_round_trip() -> None:
    rest = {"d": {"value": None, "alarm": {"severity": None, "message": "HIHI"},
                  "display": {"limitLow": -1.5, "choices": ["a", "b"], "precision": 3,
                              "form": {"index": 0}}, "flag": True, "nil": None},
            "f": ["value"]}
    raw = encode_rest(rest)
    assert raw == json.dumps(rest, separators=(",", ":")).encode()
    assert decode_rest(raw) == rest


def test_what_json_cannot_say_is_tagged_and_comes_back() -> None:
    rest = {"d": {1: "int key", "__float__": 2, "nan": math.nan, "inf": -math.inf,
                  "bytes": b"\x00\xff", "tuple": (1, {2: 3})}, "f": []}
    raw = encode_rest(rest)
    assert raw == tagged(rest)
    back = decode_rest(raw)["d"]
    assert back[1] == "int key" and back["__float__"] == 2 and back["bytes"] == b"\x00\xff"
    assert math.isnan(back["nan"]) and back["inf"] == -math.inf
    assert back["tuple"] == [1, {2: 3}]


def test_a_negative_nan_keeps_its_sign() -> None:
    """x86's default NaN (0.0/0.0 in an IOC, in a table column or metadata) has its sign bit
    set: the JSON tag said "nan" for it, and it came back positive."""
    neg = -math.nan
    assert math.copysign(1.0, neg) < 0
    raw = encode_rest({"d": {"value": {"a": [1.5, neg, math.nan]}}, "f": []})
    back = decode_rest(raw)["d"]["value"]["a"]
    assert [math.copysign(1.0, x) for x in back[1:]] == [-1.0, 1.0]
    assert all(map(math.isnan, back[1:]))
