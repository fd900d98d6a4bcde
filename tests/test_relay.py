"""The relay's HTTP API against real processes: a `kbfs relay` and a `kbfs share --listen`
on 127.0.0.1, read with `requests` (and raw `http.client` where requests would clean a
path up before sending it).

Covers Range semantics (RFC 9110, single ranges), HEAD, ETag/If-None-Match,
Cache-Control, CORS and preflight, /api/find, /api/shares, /tree, listings, files by
path, traversal attempts, and the share's direct --listen server.
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.parse
from pathlib import Path
from typing import Any

import netutil
import pytest
import requests

from kbfs import prv

SIZE_A = 3 * (1 << 20) + 12345  # several blocks, the last one short


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One relay and one share (with --listen) over a small tree of files."""
    tmp = tmp_path_factory.mktemp("relay")
    data = tmp / "data"
    (data / "sub" / "deeper").mkdir(parents=True)
    (data / ".hidden").mkdir()
    a = os.urandom(SIZE_A)
    (data / "a.bin").write_bytes(a)
    (data / "sub" / "b.txt").write_bytes(b"hello kbfs\n")
    (data / "sub" / "deeper" / "c.bin").write_bytes(os.urandom(5000))
    (data / "empty.bin").write_bytes(b"")
    (data / ".hidden" / "secret.txt").write_bytes(b"secret")
    (data / ".dotfile").write_bytes(b"dot")
    outside = tmp / "outside.txt"
    outside.write_bytes(b"outside the share")
    os.symlink(outside, data / "escape.txt")
    relay = netutil.start_relay(tmp / "logs")
    share = None
    try:
        share = netutil.start_share(data, relay.url, tmp / "logs", listen=True,
                                    state_dir=tmp / "state")
        digest = prv.digest_file(data / "a.bin")
        yield {"relay": relay, "share": share, "data": data, "a": a, "digest": digest,
               "sha_a": digest.sha1, "tmp": tmp}
    finally:
        if share is not None:
            share.stop()
        relay.stop()


def _get(world: Any, path: str, **kw: Any) -> requests.Response:
    return requests.get(world["relay"].url + path, timeout=10, **kw)


def _raw(base: str, path: str, method: str = "GET") -> tuple[int, bytes]:
    """Send PATH exactly as written (no client-side normalisation)."""
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------- API


def test_health_and_shares(world: Any) -> None:
    health = _get(world, "/api/health").json()
    assert health["ok"] is True and health["shares"] >= 1
    shares = _get(world, "/api/shares").json()
    entry = next(s for s in shares if s["id"] == world["share"].id)
    assert entry["files"] == 4  # a.bin, empty.bin, sub/b.txt, sub/deeper/c.bin
    assert entry["bytes"] == SIZE_A + 11 + 5000
    assert entry["connected_since"] <= time.time()
    assert entry["name"] == "data"


def test_find(world: Any) -> None:
    found = _get(world, f"/api/find/{world['sha_a']}").json()
    assert found["found"] is True and found["size"] == SIZE_A
    assert found["shares"] == [{"id": world["share"].id, "name": "data", "path": "a.bin"}]
    assert found["urls"] == [f"{world['share'].direct_url}/sha1/{world['sha_a']}",
                             f"{world['relay'].url}/sha1/{world['sha_a']}"]
    missing = _get(world, "/api/find/" + "0" * 40).json()
    assert missing == {"found": False, "size": 0, "shares": [], "urls": []}
    assert _get(world, "/api/find/xyz").status_code == 400


# ---------------------------------------------------------------- content and ranges


def test_full_get_headers(world: Any) -> None:
    r = _get(world, f"/sha1/{world['sha_a']}")
    assert r.status_code == 200
    assert r.content == world["a"]
    assert r.headers["Content-Length"] == str(SIZE_A)
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["ETag"] == f'"{world["sha_a"]}"'
    assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert "Content-Range" in r.headers["Access-Control-Expose-Headers"]


@pytest.mark.parametrize("header, expect", [
    ("bytes=0-9", (0, 10)),
    ("bytes=1048570-1048585", (1048570, 1048586)),  # across a block boundary
    ("bytes=3000000-", (3000000, SIZE_A)),
    ("bytes=-100", (SIZE_A - 100, SIZE_A)),
    ("bytes=-99999999", (0, SIZE_A)),  # suffix longer than the file: all of it
    (f"bytes={SIZE_A - 5}-{SIZE_A + 1000}", (SIZE_A - 5, SIZE_A)),  # clipped at the end
    (f"bytes={SIZE_A - 1}-{SIZE_A - 1}", (SIZE_A - 1, SIZE_A)),
])
def test_ranges(world: Any, header: str, expect: tuple[int, int]) -> None:
    r = _get(world, f"/sha1/{world['sha_a']}", headers={"Range": header})
    start, end = expect
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes {start}-{end - 1}/{SIZE_A}"
    assert r.headers["Content-Length"] == str(end - start)
    assert r.content == world["a"][start:end]


@pytest.mark.parametrize("header", ["bytes=abc", "bytes=5-2", "items=0-5", "bytes=0-1,5-9",
                                    "bytes", "bytes=-"])
def test_malformed_range_is_ignored(world: Any, header: str) -> None:
    r = _get(world, f"/sha1/{world['sha_a']}", headers={"Range": header})
    assert r.status_code == 200
    assert len(r.content) == SIZE_A


@pytest.mark.parametrize("header", [f"bytes={SIZE_A}-", f"bytes={SIZE_A + 10}-{SIZE_A + 20}",
                                    "bytes=-0"])
def test_unsatisfiable_range(world: Any, header: str) -> None:
    r = _get(world, f"/sha1/{world['sha_a']}", headers={"Range": header})
    assert r.status_code == 416
    assert r.headers["Content-Range"] == f"bytes */{SIZE_A}"


def test_head(world: Any) -> None:
    r = requests.head(f"{world['relay'].url}/sha1/{world['sha_a']}", timeout=10)
    assert r.status_code == 200 and r.content == b""
    assert r.headers["Content-Length"] == str(SIZE_A)
    assert r.headers["ETag"] == f'"{world["sha_a"]}"'
    r = requests.head(f"{world['relay'].url}/sha1/{world['sha_a']}", timeout=10,
                      headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.headers["Content-Range"] == f"bytes 10-19/{SIZE_A}"
    assert r.headers["Content-Length"] == "10"


def test_etag_revalidation(world: Any) -> None:
    r = _get(world, f"/sha1/{world['sha_a']}", headers={"If-None-Match": f'"{world["sha_a"]}"'})
    assert r.status_code == 304 and r.content == b""
    # If-Range with another validator: the whole body, not the range
    r = _get(world, f"/sha1/{world['sha_a']}", headers={"Range": "bytes=0-9", "If-Range": '"x"'})
    assert r.status_code == 200 and len(r.content) == SIZE_A


def test_cors_preflight(world: Any) -> None:
    r = requests.options(f"{world['relay'].url}/sha1/{world['sha_a']}", timeout=10, headers={
        "Origin": "https://example.org", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "range"})
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert "Range" in r.headers["Access-Control-Allow-Headers"]
    assert "GET" in r.headers["Access-Control-Allow-Methods"]
    for name in ("Content-Range", "Content-Length", "ETag", "Accept-Ranges"):
        assert name in r.headers["Access-Control-Expose-Headers"]
    # CORS on errors too, so browser code can read the status
    r = _get(world, "/sha1/" + "1" * 40)
    assert r.status_code == 404 and r.headers["Access-Control-Allow-Origin"] == "*"


def test_unknown_and_malformed_sha1(world: Any) -> None:
    t0 = time.monotonic()
    r = _get(world, "/sha1/" + "ab" * 20)
    assert r.status_code == 404 and time.monotonic() - t0 < 1.0
    assert "error" in r.json()
    for bad in ("xyz", "ab" * 21, "g" * 40):
        assert _get(world, f"/sha1/{bad}").status_code == 400
    assert _get(world, "/tree/nothex").status_code == 400
    assert _get(world, "/no/such/endpoint").status_code == 404
    # uppercase hex names the same content
    assert _get(world, f"/sha1/{world['sha_a'].upper()}",
                headers={"Range": "bytes=0-0"}).status_code == 206


def test_empty_file(world: Any) -> None:
    sha = prv.digest_file(world["data"] / "empty.bin").sha1
    r = _get(world, f"/sha1/{sha}")
    assert r.status_code == 200 and r.content == b"" and r.headers["Content-Length"] == "0"
    assert _get(world, f"/sha1/{sha}", headers={"Range": "bytes=0-"}).status_code == 416


def test_tree_matches_index_leaves(world: Any) -> None:
    leaves = b"".join(world["digest"].leaves)
    r = _get(world, f"/tree/{world['sha_a']}")
    assert r.status_code == 200 and r.content == leaves
    assert r.headers["Content-Type"] == "application/octet-stream"
    direct = requests.get(f"{world['share'].direct_url}/tree/{world['sha_a']}", timeout=10)
    assert direct.content == leaves
    assert _get(world, "/tree/" + "2" * 40).status_code == 404


# ---------------------------------------------------------------- listing and paths


def test_list_root_and_sub(world: Any) -> None:
    sid = world["share"].id
    top = _get(world, f"/s/{sid}/list/").json()
    assert top["share"] == sid and top["path"] == ""
    assert top["dirs"] == ["sub"]
    names = [f["name"] for f in top["files"]]
    assert names == ["a.bin", "empty.bin"]  # no hidden file, no symlink leaving the folder
    a = top["files"][0]
    assert a["size"] == SIZE_A and isinstance(a["mtime"], float)
    pointer = prv.pointer_from_dict(a["prv"])
    assert pointer.sha1 == world["sha_a"] and pointer.size == SIZE_A
    assert pointer.tree is not None and pointer.tree.root == world["digest"].root
    assert pointer.original_path.endswith("a.bin")
    assert _get(world, f"/s/{sid}/list").json() == top
    sub = _get(world, f"/s/{sid}/list/sub").json()
    assert sub["path"] == "sub" and sub["dirs"] == ["deeper"]
    assert [f["name"] for f in sub["files"]] == ["b.txt"]
    assert _get(world, f"/s/{sid}/list/sub/deeper/").json()["files"][0]["name"] == "c.bin"
    assert _get(world, f"/s/{sid}/list/nope").status_code == 404
    assert _get(world, f"/s/{sid}/list/a.bin").status_code == 404
    assert _get(world, "/s/" + "a" * 32 + "/list/").status_code == 404
    assert _get(world, "/s/NOT-AN-ID/list/").status_code == 400


def test_file_by_path(world: Any) -> None:
    sid = world["share"].id
    r = _get(world, f"/s/{sid}/file/sub/b.txt")
    assert r.status_code == 200 and r.content == b"hello kbfs\n"
    assert r.headers["ETag"] == f'"{prv.digest_file(world["data"] / "sub" / "b.txt").sha1}"'
    r = _get(world, f"/s/{sid}/file/a.bin", headers={"Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == world["a"][-10:]
    assert _get(world, f"/s/{sid}/file/sub/none.txt").status_code == 404


@pytest.mark.parametrize("path", [
    "/s/{sid}/file/../a.bin",
    "/s/{sid}/file/sub/../a.bin",
    "/s/{sid}/file/%2e%2e/%2e%2e/etc/passwd",
    "/s/{sid}/file/sub/%2e%2e%2fa.bin",
    "/s/{sid}/file//etc/passwd",
    "/s/{sid}/file/%2fetc%2fpasswd",
    "/s/{sid}/file/.hidden/secret.txt",
    "/s/{sid}/file/.dotfile",
    "/s/{sid}/file/escape.txt",
    "/s/{sid}/file/sub%5c..%5ca.bin",
    "/s/{sid}/file/a.bin%00",
    "/s/{sid}/list/..",
    "/s/{sid}/list/%2e%2e",
    "/s/{sid}/list/.hidden",
    "/s/{sid}/file/index.sqlite",
    "/s/{sid}/file/share.key",
])
def test_traversal_refused(world: Any, path: str) -> None:
    status, body = _raw(world["relay"].url, path.format(sid=world["share"].id))
    assert 400 <= status < 500, (path, status, body[:200])
    assert b"outside the share" not in body and b"secret" not in body.replace(b"secret.txt", b"")
    assert b"root:" not in body


def test_direct_listen_server(world: Any) -> None:
    base = world["share"].direct_url
    r = requests.get(f"{base}/sha1/{world['sha_a']}", headers={"Range": "bytes=100-199"},
                     timeout=10)
    assert r.status_code == 206 and r.content == world["a"][100:200]
    assert r.headers["Content-Range"] == f"bytes 100-199/{SIZE_A}"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    r = requests.get(f"{base}/sha1/{world['sha_a']}", timeout=10)
    assert r.status_code == 200 and r.content == world["a"]
    assert requests.get(f"{base}/sha1/{'3' * 40}", timeout=10).status_code == 404
    assert requests.get(f"{base}/sha1/zzz", timeout=10).status_code == 400
    r = requests.get(f"{base}/sha1/{world['sha_a']}", headers={"Range": f"bytes={SIZE_A}-"},
                     timeout=10)
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{SIZE_A}"
    assert requests.head(f"{base}/sha1/{world['sha_a']}", timeout=10).headers[
        "Content-Length"] == str(SIZE_A)


def test_state_dir_inside_share_is_not_served(world: Any, tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "x.bin").write_bytes(b"x" * 100)
    share = netutil.start_share(data, world["relay"].url, tmp_path, state_dir=data / "state")
    try:
        listing = _get(world, f"/s/{share.id}/list/").json()
        assert listing["dirs"] == [] and [f["name"] for f in listing["files"]] == ["x.bin"]
        for name in ("state/share.key", "state/index.sqlite", "state/token.secret"):
            assert _get(world, f"/s/{share.id}/file/{name}").status_code == 404
    finally:
        share.stop()
