"""Property-based tests of the parsers that face untrusted input.

Every input must end in a value or a clean kbfs error: never another exception.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kbfs import protocol, prv
from kbfs.errors import BadRequest, PointerError, RangeError

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=20), kids, max_size=6),
    max_leaves=30,
)
pointer_keys = st.sampled_from(
    ["original_checksum", "original_size", "original_fcs", "original_path", "prv_version", "kbfs_tree"]
)


@FAST
@given(st.binary(max_size=2000))
def test_pointer_parser_never_crashes_on_bytes(data: bytes) -> None:
    try:
        p = prv.parse_pointer(data, "fuzz.prv")
    except PointerError as exc:
        assert str(exc).startswith("fuzz.prv")
    else:
        assert len(p.sha1) == 40 and p.size >= 0


@FAST
@given(st.dictionaries(pointer_keys, json_values, max_size=6))
def test_pointer_parser_never_crashes_on_objects(obj: dict) -> None:
    try:
        p = prv.parse_pointer(json.dumps(obj), "obj.prv")
    except PointerError as exc:
        assert str(exc).startswith("obj.prv")
    else:
        # Whatever parses must survive a round trip unchanged.
        assert prv.parse_pointer(p.to_json()) == p


@FAST
@given(json_values)
def test_prvdir_parser_never_crashes(obj: object) -> None:
    try:
        d = prv.parse_prvdir(json.dumps(obj), "x.prvdir")
    except PointerError as exc:
        assert str(exc).startswith("x.prvdir")
    else:
        for rel, _p in d.walk():
            assert ".." not in rel.split("/")


@FAST
@given(st.one_of(st.none(), st.text(max_size=60), st.from_regex(r"bytes=\d{0,6}-\d{0,6}", fullmatch=True)),
       st.integers(min_value=0, max_value=10**6))
def test_range_parser_total(header: str | None, size: int) -> None:
    try:
        r = protocol.parse_range(header, size)
    except RangeError as exc:
        assert exc.size == size
        return
    if r is not None:
        start, end = r
        assert 0 <= start < end <= size
        assert protocol.parse_content_range(protocol.content_range(start, end, size)) == (start, end, size)


@FAST
@given(st.text(max_size=200))
def test_safe_relpath_never_escapes(path: str) -> None:
    try:
        rel = protocol.safe_relpath(path)
    except BadRequest:
        return
    parts = rel.split("/") if rel else []
    assert not rel.startswith("/")
    # Dot names are data since issue 16 (zarr's .zarray); "." and ".." never pass.
    assert all(p and p not in (".", "..") for p in parts)
    assert "\0" not in rel and "\\" not in rel


@FAST
@given(st.text(max_size=80))
def test_content_range_parser_total(value: str) -> None:
    try:
        start, end, size = protocol.parse_content_range(value)
    except BadRequest:
        return
    assert 0 <= start < end <= size


def test_range_examples() -> None:
    assert protocol.parse_range("bytes=0-0", 10) == (0, 1)
    assert protocol.parse_range("bytes=-3", 10) == (7, 10)
    assert protocol.parse_range("bytes=-30", 10) == (0, 10)
    assert protocol.parse_range("bytes=8-", 10) == (8, 10)
    assert protocol.parse_range("bytes=5-100", 10) == (5, 10)
    assert protocol.parse_range("bytes=5-4", 10) is None
    assert protocol.parse_range("bytes=0-1,3-4", 10) is None
    assert protocol.parse_range("items=0-1", 10) is None
    assert protocol.parse_range("bytes=abc", 10) is None
    for bad in ("bytes=10-", "bytes=10-20", "bytes=-0"):
        try:
            protocol.parse_range(bad, 10)
        except RangeError as exc:
            assert exc.size == 10
        else:
            raise AssertionError(f"{bad} should be unsatisfiable")
