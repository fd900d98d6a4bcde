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

from kbfs import prv, tree

SIZE_A = 3 * (1 << 20) + 12345  # several blocks, the last one short


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One relay and one share (with --listen) over a small tree of files."""
    tmp = tmp_path_factory.mktemp("relay")
    data = tmp / "data"
    (data / "sub" / "deeper").mkdir(parents=True)
    (data / ".git").mkdir()  # excluded: version control (other dotfiles are data)
    a = os.urandom(SIZE_A)
    (data / "a.bin").write_bytes(a)
    (data / "sub" / "b.txt").write_bytes(b"hello kbfs\n")
    (data / "sub" / "deeper" / "c.bin").write_bytes(os.urandom(5000))
    (data / "empty.bin").write_bytes(b"")
    (data / ".git" / "secret.txt").write_bytes(b"secret")
    (data / ".DS_Store").write_bytes(b"dot")
    outside = tmp / "outside.txt"
    outside.write_bytes(b"outside the share")
    os.symlink(outside, data / "escape.txt")
    relay = netutil.start_relay(tmp / "logs")
    share = None
    try:
        share = netutil.start_share(data, relay.url, tmp / "logs", listen=True,
                                    state_dir=tmp / "state")
        # The 1 MiB tree: what /tree/ serves (listings name the 64 KiB one, digest64).
        digest = prv.digest_file(data / "a.bin", block_size=tree.BLOCK_SIZE, keep_leaves=True)
        digest64 = prv.digest_file(data / "a.bin", block_size=prv.DEFAULT_BLOCK_SIZE)
        yield {"relay": relay, "share": share, "data": data, "a": a, "digest": digest,
               "digest64": digest64,
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
    assert found["shares"] == [{"id": world["share"].id, "name": "data", "path": "a.bin",
                                "url": f"{world['share'].direct_url}/sha1/{world['sha_a']}"}]
    assert found["urls"] == [f"{world['share'].direct_url}/sha1/{world['sha_a']}",
                             f"{world['relay'].url}/sha1/{world['sha_a']}"]
    assert found["mirrors"] == []   # a relay without --mirror advertises none (docs/mirrors.md)
    missing = _get(world, "/api/find/" + "0" * 40).json()
    assert missing == {"found": False, "size": 0, "shares": [], "urls": [], "mirrors": []}
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
    assert names == ["a.bin", "empty.bin"]  # nothing excluded, no symlink leaving the folder
    a = top["files"][0]
    assert a["size"] == SIZE_A and isinstance(a["mtime"], float)
    pointer = prv.pointer_from_dict(a["prv"])
    assert pointer.sha1 == world["sha_a"] and pointer.size == SIZE_A
    # A share that knows the 64 KiB tree (this one) is listed with 64 KiB-piece pointers.
    assert pointer.tree == prv.TreeRef(world["digest64"].root, 65536)
    # the path inside the share, never the share's folder on its machine
    assert pointer.original_path == "a.bin"
    assert str(world["data"]) not in str(top)
    assert _get(world, f"/s/{sid}/list").json() == top
    sub = _get(world, f"/s/{sid}/list/sub").json()
    assert sub["path"] == "sub" and sub["dirs"] == ["deeper"]
    assert [f["name"] for f in sub["files"]] == ["b.txt"]
    assert sub["files"][0]["prv"]["original_path"] == "sub/b.txt"
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
    "/s/{sid}/file/.git/secret.txt",
    "/s/{sid}/file/.DS_Store",
    "/s/{sid}/file/escape.txt",
    "/s/{sid}/file/sub%5c..%5ca.bin",
    "/s/{sid}/file/a.bin%00",
    "/s/{sid}/list/..",
    "/s/{sid}/list/%2e%2e",
    "/s/{sid}/list/.git",
    "/s/{sid}/file/index.sqlite",
    "/s/{sid}/file/share.key",
])
def test_traversal_refused(world: Any, path: str) -> None:
    status, body = _raw(world["relay"].url, path.format(sid=world["share"].id))
    assert 400 <= status < 500, (path, status, body[:200])
    assert b"outside the share" not in body and b"secret" not in body.replace(b"secret.txt", b"")
    assert b"root:" not in body


@pytest.mark.parametrize("path", [
    "/s/{sid}/file/a.bin%0A",  # the route's `$` matched before the final line break: a.bin
    "/s/{sid}/file/sub/b.txt%0a",
    "/s/{sid}/file/%0A/",  # found by test_props_net: a 307 redirect
    "/s/{sid}/list/sub%0A",
    "/sha1/{sha1}%0A",
])
def test_line_break_in_path_refused(world: Any, path: str) -> None:
    """A path with a line break names no file here: a 400, never the file whose name is
    the path without it (URL routes end in `$`, which matches before a final newline)."""
    status, body = _raw(world["relay"].url, path.format(sid=world["share"].id,
                                                        sha1=world["sha_a"]))
    assert status == 400, (path, status, body[:200])
    assert b"line break" in body


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


# ---------------------------------------------------------------- the upload pipe, in-process
#
# A relay served inside the test process (so STALL_TIMEOUT can be lowered and KBFS_SPLICE
# switched per test), a fake share (hostileutil) that POSTs its uploads by hand over one
# keep-alive socket, and clients on raw sockets. Each case runs through the kernel splice
# (`httpserve.BodySplice`) and, where it applies, through the ordinary chunked path.

_MODES = [pytest.param("1", id="splice"), pytest.param("0", id="plain")]


class _Conn:
    """One keep-alive HTTP/1.1 connection on a trio stream, read by hand."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def open(cls, url: str, rcvbuf: int | None = None) -> _Conn:
        import trio
        u = urllib.parse.urlsplit(url)
        stream = await trio.open_tcp_stream(u.hostname, u.port)
        if rcvbuf is not None:
            import socket as socket_module
            stream.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_RCVBUF, rcvbuf)
        return cls(stream)

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(1 << 20)
        self.buf += data
        return bool(data)

    async def head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buf:
            if not await self._fill():
                raise EOFError("closed before a response head")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:])}
        return int(lines[0].split()[1]), headers

    async def body(self, length: int) -> bytes:
        """LENGTH bytes of body; fewer when the server closes first."""
        while len(self.buf) < length:
            if not await self._fill():
                break
        out, self.buf = self.buf[:length], self.buf[length:]
        return out

    async def answer(self) -> tuple[int, bytes]:
        status, headers = await self.head()
        return status, await self.body(int(headers.get("content-length", "0")))

    async def get(self, path: str, *headers: str) -> None:
        await self.stream.send_all((f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                                    + "".join(h + "\r\n" for h in headers) + "\r\n").encode())

    async def closed(self) -> bool:
        """True when the server has closed this connection (nothing more to read)."""
        try:
            return not await self._fill()
        except OSError:
            return True


def _upload_head(token: str, secret: str, length: int) -> bytes:
    return (f"POST /_upload/{token} HTTP/1.1\r\nHost: x\r\n"
            f"X-Kbfs-Upload-Secret: {secret}\r\nContent-Length: {length}\r\n\r\n").encode()


def _pattern(size: int, seed: int = 7) -> bytes:
    import random
    return random.Random(seed).randbytes(size)


def _inprocess(monkeypatch: pytest.MonkeyPatch, splice: str, test: Any,
               stall: float | None = None) -> None:
    """Run TEST(relay, url) against a relay served in this process."""
    import trio

    from kbfs import osio
    from kbfs import relay as relay_module

    if splice == "1" and not osio.splice_ok():
        pytest.skip("no splice (KBFS_PORTABLE=1 or not Linux): the KBFS_SPLICE=0 case runs this path")
    monkeypatch.setenv("KBFS_SPLICE", splice)
    if stall is not None:
        monkeypatch.setattr(relay_module, "STALL_TIMEOUT", stall)

    async def main() -> None:
        r = relay_module.Relay()
        async with trio.open_nursery() as nursery:
            url = await nursery.start(relay_module.serve, r, "127.0.0.1", 0)
            with trio.fail_after(60):
                await test(r, url)
            nursery.cancel_scope.cancel()

    trio.run(main)


async def _asked(url: str, fs: Any, rcvbuf: int | None = None) -> tuple[_Conn, dict[str, Any], _Conn]:
    """A client connection that has asked fake share FS for f.bin, the `get` the share
    received for it, and a fresh connection for the share's upload."""
    client = await _Conn.open(url, rcvbuf)
    await client.get(f"/s/{fs.id}/file/f.bin")
    msg = await fs.next_get()
    return client, msg, await _Conn.open(url)


def _entry(name: str, size: int) -> list[Any]:
    # The relay never checks content: any sha1 will do for a fake share's catalogue.
    import hashlib
    return [name, hashlib.sha1(name.encode()).hexdigest(), size, 0, "", "0" * 64]


@pytest.mark.parametrize("splice", _MODES)
def test_pipe_byte_exact_and_both_connections_kept_alive(monkeypatch: pytest.MonkeyPatch,
                                                        splice: str) -> None:
    """Big and small bodies, whole and ranged, one after another on the same client
    connection and the same upload connection: every byte exact, every answer 204."""
    import trio
    from hostileutil import fake_share

    size = 5 * (1 << 20) + 3
    data = _pattern(size)

    async def test(relay: Any, url: str) -> None:
        async with fake_share(url, [_entry("f.bin", size)]) as fs:
            client = await _Conn.open(url)
            upload = await _Conn.open(url)
            for start, end in ((0, size), (1_000_001, 4_000_000), (4096, 8192), (0, size)):
                rng = () if (start, end) == (0, size) else (f"Range: bytes={start}-{end - 1}",)
                await client.get(f"/s/{fs.id}/file/f.bin", *rng)
                msg = await fs.next_get()
                assert (msg["start"], msg["end"]) == (start, end)
                body = data[start:end]

                async def share(body: bytes = body, token: str = msg["id"]) -> None:
                    await upload.stream.send_all(_upload_head(token, fs.secret, len(body))
                                                 + body[:100_000])
                    for i in range(100_000, len(body), 700_000):  # in pieces, as a share does
                        await upload.stream.send_all(body[i:i + 700_000])

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(share)
                    status, headers = await client.head()
                    assert status == (200 if not rng else 206)
                    assert await client.body(int(headers["content-length"])) == body
                assert await upload.answer() == (204, b"")
            health = relay.stats
            assert health["aborted"] == 0
            if splice == "1":
                assert health["bytes_spliced"] > size, health
            else:
                assert health["bytes_spliced"] == 0
            assert health["bytes_out"] == 2 * size + 2_999_999 + 4096
            await client.stream.aclose()
            await upload.stream.aclose()

    _inprocess(monkeypatch, splice, test)


@pytest.mark.parametrize("splice", _MODES)
def test_pipe_client_gone_mid_transfer(monkeypatch: pytest.MonkeyPatch, splice: str) -> None:
    """A client that hangs up mid-body ends its upload at once: 410 to the share."""
    import trio
    from hostileutil import fake_share

    size = 64 << 20

    async def test(relay: Any, url: str) -> None:
        async with fake_share(url, [_entry("f.bin", size)]) as fs:
            client, msg, upload = await _asked(url, fs)
            sent = 0

            async def trickle() -> None:  # slowly, so the relay waits on the share
                nonlocal sent
                chunk = b"x" * (1 << 20)
                try:
                    await upload.stream.send_all(_upload_head(msg["id"], fs.secret, size))
                    while sent < size:
                        await upload.stream.send_all(chunk)
                        sent += len(chunk)
                        await trio.sleep(0.05)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                assert (await client.head())[0] == 200
                assert len(await client.body(1 << 19)) == 1 << 19
                await trio.sleep(0.3)
                await client.stream.aclose()
                t0 = trio.current_time()
                status, answer = await upload.answer()
                nursery.cancel_scope.cancel()
            assert status == 410 and b"client" in answer
            assert trio.current_time() - t0 < 3
            assert sent < size
            assert relay.stats["aborted"] == 1
            await upload.stream.aclose()

    _inprocess(monkeypatch, splice, test)


@pytest.mark.parametrize("splice", _MODES)
def test_pipe_short_upload_and_trailing_bytes(monkeypatch: pytest.MonkeyPatch,
                                              splice: str) -> None:
    """An upload that stops early leaves its client with a short body and a closed
    connection; bytes after a complete body are the next request, never body bytes."""
    import trio
    from hostileutil import fake_share

    size = 6 << 20
    data = _pattern(size, 3)

    async def test(relay: Any, url: str) -> None:
        async with fake_share(url, [_entry("f.bin", size)]) as fs:
            for short in (True, False):
                client, msg, upload = await _asked(url, fs)

                async def share(short: bool = short, token: str = msg["id"],
                                upload: _Conn = upload) -> None:
                    await upload.stream.send_all(_upload_head(token, fs.secret, size)
                                                 + data[:1 << 20])
                    if short:  # 2 MiB of 6, then the share's connection ends
                        await upload.stream.send_all(data[1 << 20:2 << 20])
                        await trio.sleep(0.2)
                        await upload.stream.send_eof()
                    else:  # all of it, and more: the next request on that connection
                        await upload.stream.send_all(data[1 << 20:] + b"GARBAGE\r\n\r\n")

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(share)
                    assert (await client.head())[0] == 200
                    got = await client.body(size)
                if short:
                    assert data.startswith(got) and len(got) == 2 << 20
                    assert await client.closed()
                else:
                    assert got == data
                    assert (await upload.answer())[0] == 204
                status = None
                try:
                    status, _ = await upload.answer()
                except (EOFError, OSError):
                    pass
                assert status is None or status == 400
                assert relay.stats["aborted"] == 1
                await client.stream.aclose()
                await upload.stream.aclose()

    _inprocess(monkeypatch, splice, test)


@pytest.mark.parametrize("splice", _MODES)
def test_pipe_slow_client_holds_back_its_upload(monkeypatch: pytest.MonkeyPatch,
                                                splice: str) -> None:
    """A client that stops reading stops its share's upload (bounded memory), and gets
    every byte when it reads again."""
    import hashlib

    import trio
    from hostileutil import fake_share

    size = 160 << 20

    async def test(relay: Any, url: str) -> None:
        async with fake_share(url, [_entry("f.bin", size)]) as fs:
            client, msg, upload = await _asked(url, fs, rcvbuf=128 << 10)
            sent = 0
            digest = hashlib.sha1()

            async def share() -> None:
                nonlocal sent
                await upload.stream.send_all(_upload_head(msg["id"], fs.secret, size))
                while sent < size:
                    piece = _pattern(1 << 20, sent)
                    digest.update(piece)
                    await upload.stream.send_all(piece)
                    sent += len(piece)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(share)
                assert (await client.head())[0] == 200
                await trio.sleep(1.5)  # reading nothing
                held = sent
                assert held < 96 << 20, held  # kernel buffers and the pipe, not the file
                got = hashlib.sha1(client.buf)
                total = len(client.buf)
                client.buf = b""
                while total < size:
                    data = await client.stream.receive_some(1 << 20)
                    assert data
                    got.update(data)
                    total += len(data)
            assert total == size and got.hexdigest() == digest.hexdigest()
            assert await upload.answer() == (204, b"")

    _inprocess(monkeypatch, splice, test)


@pytest.mark.parametrize("splice", _MODES)
def test_pipe_stalled_share_and_stalled_client(monkeypatch: pytest.MonkeyPatch,
                                               splice: str) -> None:
    """STALL_TIMEOUT ends a transfer whose share stops sending (400 to it) and one whose
    client stops reading (410), both cutting their client's body short."""
    import trio
    from hostileutil import fake_share

    size = 64 << 20

    async def test(relay: Any, url: str) -> None:
        async with fake_share(url, [_entry("f.bin", size)]) as fs:
            # the share stops after 2 MiB, its connection open
            client, msg, upload = await _asked(url, fs)
            answers: list[tuple[int, bytes]] = []

            async def share(token: str, count: int) -> None:
                async def answer() -> None:
                    answers.append(await upload.answer())
                    nursery.cancel_scope.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(answer)
                    try:
                        await upload.stream.send_all(_upload_head(token, fs.secret, size))
                        for _ in range(count):
                            await upload.stream.send_all(b"s" * (1 << 20))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(share, msg["id"], 2)
                assert (await client.head())[0] == 200
                t0 = trio.current_time()
                assert len(await client.body(size)) == 2 << 20
            status, answer = answers.pop()
            assert status == 400 and b"stalled" in answer, answer
            assert trio.current_time() - t0 < 5
            await client.stream.aclose()
            await upload.stream.aclose()
            # the client reads nothing at all
            client, msg, upload = await _asked(url, fs, rcvbuf=64 << 10)
            t0 = trio.current_time()
            await share(msg["id"], 64)
            status, answer = answers.pop()
            assert status == 410 and b"client" in answer, answer
            assert trio.current_time() - t0 < 6
            assert relay.stats["aborted"] == 2
            assert (relay.stats["bytes_spliced"] > 0) == (splice == "1")
            await client.stream.aclose()
            await upload.stream.aclose()

    _inprocess(monkeypatch, splice, test, stall=1.0)


def test_requests_leave_no_reference_cycles(monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection handle a request carries for splices (a scope extension) must not
    tie each request's objects into a cycle: left to the cyclic garbage collector, they
    cost every process full collections of ~10 ms, stalling requests."""
    import gc

    async def test(relay: Any, url: str) -> None:
        conn = await _Conn.open(url)
        await conn.get("/api/health")
        await conn.answer()
        gc.collect()
        gc.disable()
        try:
            for _ in range(200):
                await conn.get("/api/health")
                assert (await conn.answer())[0] == 200
            await conn.stream.aclose()
            assert gc.collect() == 0
        finally:
            gc.enable()

    _inprocess(monkeypatch, "1", test)
