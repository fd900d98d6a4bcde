"""Property-based tests (hypothesis) of the share's path handling and of the listing parser.

The Range header, pointer and `safe_relpath` parsers are covered in test_properties.py.
Here:

- the share's own path resolution (`Share.resolve` + `open_range`) in process, on random
  paths: a file of the folder that the index holds, or a `Refused` 4xx, never another
  exception, never a file outside the folder, excluded, a symlink's target or the state;
- the same end to end through a live relay and share: random paths (with encoded
  traversal, invalid UTF-8, overlong UTF-8) under `/s/{share}/file/` and `/list/`, and
  random names under the share's `/sha1/`: a 2xx only for real files/folders with their
  exact bytes, otherwise a 4xx; never a 5xx, never bytes from outside the folder;
- `protocol.parse_listing` (what clients use to read `/s/{share}/list/` JSON): every
  value ends in a clean listing or BadRequest, and a relay's real listing passes as is.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

import netutil
import pytest
import requests
from hostileutil import get_request, raw_http
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kbfs import protocol, prv
from kbfs.errors import BadRequest
from kbfs.share import Refused, Share, ShareOptions

OUTSIDE = b"OUTSIDE-THE-SHARE-e41b"
SECRET = b"HIDDEN-SECRET-5d0f"
NET = settings(max_examples=150, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
LOCAL = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _make_tree(root: Path) -> dict[str, bytes]:
    """A small share folder with traps around it; returns its servable files."""
    data = root / "data"
    files = {"a.bin": os.urandom(70_000), "sub/b.txt": b"hello\n", "sub/deep/c.bin": b"c" * 5000,
             "%2e%2e": b"literal percent name\n", "sp ace.txt": b"space\n",
             "\u00e9t\u00e9.txt": b"utf-8 name\n", "empty.bin": b""}
    for rel, body in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(body)
    (data / ".git").mkdir()  # excluded (other dotfiles are data since issue 16)
    (data / ".git" / "secret.txt").write_bytes(SECRET)
    (data / ".DS_Store").write_bytes(SECRET)
    (root / "outside.txt").write_bytes(OUTSIDE)
    os.symlink(root / "outside.txt", data / "escape.txt")
    os.symlink(root, data / "up")
    os.symlink(data / "a.bin", data / "link-in.bin")  # inside the folder: served
    return {**files, "link-in.bin": files["a.bin"]}


# names and pieces random paths are made of
PIECES = st.sampled_from([
    "a.bin", "sub", "b.txt", "deep", "c.bin", "%2e%2e", "sp ace.txt", "\u00e9t\u00e9.txt",
    "empty.bin", ".git", "secret.txt", ".DS_Store", "escape.txt", "up", "outside.txt",
    "link-in.bin", "data", "state", "..", ".", "", "...", "%2e", "%2f", "%00", "%5c", "%c0%ae",
    "%c0%af", "%ff", "%e0%80%ae", "%252e", "\\", "\0", "~", "*", "?", "#", ";", "%", "%%",
])
REAL = st.sampled_from(["a.bin", "sub/b.txt", "sub/deep/c.bin", "%2e%2e", "sp ace.txt",
                        "\u00e9t\u00e9.txt", "empty.bin", "link-in.bin", "sub", "sub/deep", ""])
PATHS = st.one_of(
    st.lists(st.one_of(PIECES, st.text(max_size=8)), max_size=8).map("/".join),
    REAL,
    # real paths, perhaps with extra slashes or a piece around them
    st.tuples(st.sampled_from(["", "/", "//", "./", "../", "sub/../"]), REAL,
              st.sampled_from(["", "/", "//", "/.", "/..", "%00"])).map("".join),
)


# ---------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def local_share(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("propshare")
    files = _make_tree(root)
    share = Share(ShareOptions(str(root / "data"), state_dir=str(root / "data" / "state")))
    share.index.scan()
    yield share, files, root
    share.index.close()


@LOCAL
@given(path=PATHS, sha1=st.one_of(st.none(), st.text(max_size=41),
                                  st.sampled_from(["0" * 40, "a" * 40])))
def test_share_resolve_never_escapes(local_share: Any, path: str, sha1: str | None) -> None:
    share, files, root = local_share
    if sha1 is not None and not protocol.SHA1_RE.match(sha1):
        sha1 = None  # _upload refuses a malformed sha1 before resolve (400)
    try:
        f, real = share.resolve(sha1, path)
    except Refused as exc:
        assert 400 <= exc.status < 500
        event(f"refused {exc.status}")
        return
    event("served")
    assert real.startswith(share.root_dir + os.sep)
    assert f.path in files, f.path  # an indexed, servable file; never excluded, outside, state
    reader = share.open_range(f, real, 0, f.size)
    try:
        got = b"".join(bytes(c) for c in reader)
    finally:
        reader.close()
    assert got == files[f.path]


@LOCAL
@given(path=PATHS, start=st.integers(-2, 80_000), end=st.integers(-2, 80_000))
def test_share_open_range_total(local_share: Any, path: str, start: int, end: int) -> None:
    share, files, _ = local_share
    try:
        f, real = share.resolve(None, path)
        reader = share.open_range(f, real, start, end)
    except Refused as exc:
        assert 400 <= exc.status < 500
        return
    try:
        got = b"".join(bytes(c) for c in reader)
    finally:
        reader.close()
    assert got == files[f.path][start:end]


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("propnet")
    files = _make_tree(root)
    relay = netutil.start_relay(root / "logs")
    share = None
    try:
        share = netutil.start_share(root / "data", relay.url, root / "logs", listen=True,
                                    state_dir=root / "state")
        dirs = {"", "sub", "sub/deep"}
        yield {"relay": relay, "share": share, "files": files, "dirs": dirs,
               "sha1s": {prv.digest_file(root / "data" / r).sha1: b for r, b in files.items()}}
    finally:
        if share is not None:
            share.stop()
        relay.stop()
        for proc in (relay, share):
            if proc is not None:
                text = proc.proc.stderr()
                assert "Traceback" not in text and "internal error" not in text, text[-3000:]


def _target(prefix: str, path: str) -> bytes:
    # '%' sequences go out as written (they are the point); everything else that is not
    # allowed raw in a request target is percent-encoded, as a client would.
    return (prefix + urllib.parse.quote(path, safe="/%~*;:@!$&'()+,=")).encode("ascii")


def _server_view(path: str) -> str | None:
    """The share-relative path the relay should see for PATH, or None if it must refuse.

    Mirrors the HTTP stack: one percent-decoding (invalid UTF-8 becomes U+FFFD), then
    protocol.safe_relpath."""
    decoded = urllib.parse.unquote(urllib.parse.quote(path, safe="/%~*;:@!$&'()+,="),
                                   errors="replace")
    try:
        return protocol.safe_relpath(decoded)
    except BadRequest:
        return None


@NET
@given(path=PATHS)
def test_relay_file_paths(net: Any, path: str) -> None:
    sid = net["share"].id
    status, head, body = raw_http(net["relay"].url, get_request(_target(f"/s/{sid}/file/", path)))
    assert status is not None and status < 500, (path, status, body[:200])
    assert OUTSIDE not in body and SECRET not in body
    event(f"HTTP {status}")
    rel = _server_view(path)
    if 200 <= status < 300:
        assert rel in net["files"], (path, rel)
        assert body == net["files"][rel]
    else:
        assert 400 <= status < 500
        assert rel not in net["files"], (path, rel, status, body[:200])


@NET
@given(path=PATHS)
def test_relay_list_paths(net: Any, path: str) -> None:
    sid = net["share"].id
    status, _, body = raw_http(net["relay"].url, get_request(_target(f"/s/{sid}/list/", path)))
    assert status is not None and status < 500, (path, status, body[:200])
    event(f"HTTP {status}")
    rel = _server_view(path)
    if status == 200:
        assert rel in net["dirs"], (path, rel)
        listing = protocol.parse_listing(json.loads(body))
        names = {f["name"] for f in listing["files"]} | set(listing["dirs"])  # type: ignore[union-attr]
        prefix = rel + "/" if rel else ""
        want = {r[len(prefix):].split("/")[0] for r in net["files"] if r.startswith(prefix)}
        assert names == want
    else:
        assert 400 <= status < 500 and rel not in net["dirs"], (path, rel, status)


@NET
@given(name=st.one_of(st.text(max_size=50), st.sampled_from(["0" * 40, "A" * 40, "%2e%2e"]),
                      st.from_regex(r"[0-9a-fA-F]{38,42}", fullmatch=True)),
       kind=st.sampled_from(["sha1", "tree"]),
       base=st.sampled_from(["relay", "direct"]))
def test_content_names(net: Any, name: str, kind: str, base: str) -> None:
    url = net["relay"].url if base == "relay" else net["share"].direct_url
    status, _, body = raw_http(url, get_request(_target(f"/{kind}/", name)))
    assert status is not None and status < 500, (name, status, body[:200])
    assert OUTSIDE not in body and SECRET not in body
    if 200 <= status < 300 and kind == "sha1":
        assert body == net["sha1s"][name.lower()]


def test_real_listing_passes_the_parser(net: Any) -> None:
    sid = net["share"].id
    for folder in sorted(net["dirs"]):
        raw = requests.get(f"{net['relay'].url}/s/{sid}/list/{folder}", timeout=10).json()
        clean = protocol.parse_listing(raw)
        assert clean["dirs"] == raw["dirs"] and clean["files"] == raw["files"]
        for entry in clean["files"]:  # type: ignore[union-attr]
            prv.pointer_from_dict(entry["prv"])


# ---------------------------------------------------------------- the listing parser


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=10), kids, max_size=5),
    max_leaves=25,
)
names = st.one_of(st.text(max_size=12), st.sampled_from(["", ".", "..", ".x", "a/b", "a\\b",
                                                         "a\0b", "ok", "ok", "x" * 2000]))
file_entries = st.one_of(
    json_values,
    st.fixed_dictionaries({"name": names, "size": st.one_of(st.integers(-5, 2**64), json_values),
                           "mtime": st.one_of(st.floats(), json_values),
                           "prv": st.one_of(st.just({"original_checksum": "0" * 40}), json_values)}),
)
listings = st.one_of(
    json_values,
    st.fixed_dictionaries({"share": json_values, "path": json_values,
                           "dirs": st.one_of(st.lists(st.one_of(names, json_values), max_size=6),
                                             json_values),
                           "files": st.one_of(st.lists(file_entries, max_size=6), json_values)}),
)


@settings(max_examples=500, deadline=None)
@given(listings)
def test_listing_parser_total(obj: Any) -> None:
    try:
        out = protocol.parse_listing(obj)
    except BadRequest:
        return
    assert set(out) == {"share", "path", "dirs", "files"}
    assert isinstance(out["share"], str) and isinstance(out["path"], str)
    dirs, files = out["dirs"], out["files"]
    assert isinstance(dirs, list) and isinstance(files, list)
    seen = list(dirs) + [f["name"] for f in files]
    assert len(seen) == len(set(seen)), "names are unique"
    for n in seen:
        assert isinstance(n, str) and n and n not in (".", "..")
        assert "/" not in n and "\\" not in n and "\0" not in n
        assert protocol.safe_relpath(n) == n
    for f in files:
        assert set(f) == {"name", "size", "mtime", "prv"}
        assert type(f["size"]) is int and f["size"] >= 0
        assert isinstance(f["mtime"], float) and f["mtime"] == f["mtime"]
        assert isinstance(f["prv"], dict)
    # parsing is idempotent
    assert protocol.parse_listing(out) == out


def test_listing_parser_examples() -> None:
    p = {"original_checksum": "0" * 40, "original_size": 1}
    ok = {"share": "s", "path": "", "dirs": ["d", "d", "..", ".", ".h", "a/b", 5],
          "files": [{"name": "f", "size": 1, "mtime": 2, "prv": p},
                    {"name": "d", "size": 1, "mtime": 2, "prv": p},  # clashes with a folder
                    {"name": "g", "size": -1, "mtime": 2, "prv": p},
                    {"name": "h", "size": True, "mtime": 2, "prv": p},
                    {"name": "i", "size": 1, "mtime": float("nan"), "prv": p},
                    {"name": "j", "size": 1, "mtime": 2, "prv": "x"}, "junk"]}
    out = protocol.parse_listing(ok)
    assert out["dirs"] == ["d", ".h"]  # a dot name is a name (zarr's .zarray)
    assert out["files"] == [{"name": "f", "size": 1, "mtime": 2.0, "prv": p}]
    assert protocol.parse_listing({}) == {"share": "", "path": "", "dirs": [], "files": []}
    for bad in ([], "x", None, {"dirs": "abc"}, {"files": {"a": 1}}, {"dirs": 5}):
        with pytest.raises(BadRequest):
            protocol.parse_listing(bad)
