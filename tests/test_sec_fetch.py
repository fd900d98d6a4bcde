"""Security of the reader's fetcher against hostile relays and shares (issue 14).

- items 2 and 9: a fake share on a real relay advertises a `--listen` URL: one serving a
  self-consistent wrong tree, one that accepts and never answers. Neither is trusted
  first; a silent source costs a read seconds, not the relay's 20 s start timeout.
- item 8: tree, /api/find and listing answers are read with a bound: a 48 MiB answer (by
  Content-Length, chunked, or behind a Content-Length that lies) does not raise memory,
  and the error names the source.
- item 10: URLs from a hostile /api/find (userinfo, query, fragment, ftp, file, other
  paths, too long) are never contacted; with direct URLs off (`KBFS_DIRECT=0`) not even
  a valid one is.

Real `kbfs relay` / `kbfs share` / `kbfs cat` processes where the attack needs them
(tests/netutil.py), a fake share speaking the control protocol (tests/hostileutil.py),
and small HTTP servers on 127.0.0.1 (tests/httpsource.py and the hostile one below).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import netutil
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hostileutil import FakeShare, control_socket, hello
from httpsource import HTTPSource

from kbfs import fetch, prv, tree
from kbfs.errors import SourceError, SourceUnavailable, VerificationError
from kbfs.fetch import Fetcher

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
HUGE = 48 * MiB
CHUNK = b"\x00" * MiB  # made once, before any memory is measured (the servers run in
FRAME = b"%x\r\n" % MiB + CHUNK + b"\r\n"  # this process: they must not allocate)


# ---------------------------------------------------------------- helpers


def env_of(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user with an empty config and a private cache."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("KBFS_")}
    e["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    e["KBFS_CACHE_DIR"] = str(tmp_path / "cache")
    e["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    e.update(extra)
    return e


def write_pointer(tmp_path: Path, data: bytes, name: str, rooted: bool = True,
                  block_size: int = tree.BLOCK_SIZE) -> tuple[str, Any]:
    """A pointer file to DATA, its original gone. A 1 MiB (v1) tree unless BLOCK_SIZE says
    otherwise: these tests' HTTPSource sources serve the 1 MiB leaf list and no proofs."""
    f = tmp_path / f"hash-{name}"
    f.write_bytes(data)
    p = prv.create_pointer(f, block_size=block_size)
    f.unlink()
    p = prv.Pointer(p.sha1, p.size, p.fcs, "/nonexistent/" + name, p.prv_version,
                    p.tree if rooted else None)
    path = tmp_path / (name + ".prv")
    path.write_text(p.to_json())
    return str(path), p


def cat(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "kbfs", "cat", *args], env=env,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


@contextmanager
def silent_server() -> Iterator[tuple[str, Counter[str]]]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    lsock.settimeout(0.1)
    counts: Counter[str] = Counter()
    held: list[socket.socket] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            counts["connections"] += 1
            held.append(conn)

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{lsock.getsockname()[1]}", counts
    finally:
        stop.set()
        th.join(2)
        lsock.close()
        for c in held:
            c.close()


@asynccontextmanager
async def fake_share(relay_url: str, files: list[list[Any]],
                     listen_url: str) -> AsyncIterator[FakeShare]:
    """A share admitted with its own key that lists FILES and advertises LISTEN_URL."""
    key = Ed25519PrivateKey.generate()
    async with control_socket(relay_url) as ws:
        challenge = json.loads(await ws.get_message())
        await ws.send_message(json.dumps(hello(relay_url, challenge, key, listen_url=listen_url)))
        welcome = json.loads(await ws.get_message())
        assert welcome["type"] == "welcome", welcome
        await ws.send_message(json.dumps({"type": "files", "reset": True, "add": files,
                                          "remove": [], "scanning": False}))
        yield FakeShare(ws, welcome["id"], welcome["upload_secret"], key)


def wait_holders(relay_url: str, sha1: str, n: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = netutil.get_json(f"{relay_url}/api/find/{sha1}")
        if len(found.get("shares", [])) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"relay never listed {n} holders of {sha1}")


@pytest.fixture
def net(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A real relay and a real share holding a.bin (2 blocks and a bit)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    a = os.urandom(2 * tree.BLOCK_SIZE + 4321)
    (data_dir / "a.bin").write_bytes(a)
    digest = prv.digest_file(data_dir / "a.bin", block_size=tree.BLOCK_SIZE, keep_leaves=True)  # v1
    relay = netutil.start_relay(tmp_path / "logs")
    try:
        share = netutil.start_share(data_dir, relay.url, tmp_path / "logs")
        try:
            entry = ["a.bin", digest.sha1, digest.size, time.time(), digest.fcs, digest.root]
            yield {"relay": relay, "share": share, "a": a, "digest": digest, "entry": entry}
        finally:
            share.stop()
    finally:
        relay.stop()


# ---------------------------------------------------------------- items 2 and 9


def test_anonymous_listen_url_is_not_trusted_first(net: dict[str, Any]) -> None:
    """A fake share lists a.bin's sha1 on the real relay and advertises a --listen URL
    serving other bytes of the same size under that sha1, with a tree that matches them.
    For a root-less read (the tree taken on trust) the relay, which the user chose, is
    asked before that URL: the reader gets the real tree and the real bytes."""
    digest, a = net["digest"], net["a"]
    with HTTPSource() as attacker:
        attacker.add(os.urandom(len(a)), sha1=digest.sha1)

        async def main() -> tuple[bytes, bytes]:
            async with fake_share(net["relay"].url, [net["entry"]], attacker.url) as fs:
                wait_holders(net["relay"].url, digest.sha1, 2)

                async def refuse_gets() -> None:  # the relay then asks the real share
                    while True:
                        msg = await fs.next_get(timeout=60)
                        await fs.send({"type": "reject", "id": msg["id"], "status": 404,
                                       "message": "no"})

                def read() -> tuple[bytes, bytes]:
                    with Fetcher([net["relay"].url]) as f:
                        blob = f.fetch_tree(digest.sha1, digest.size)  # no root: trust
                        leaves = tree.split_leaves(blob)
                        n = tree.block_count(digest.size)
                        return blob, f.fetch_blocks(digest.sha1, digest.size, 0, n, leaves)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(refuse_gets)
                    got = await trio.to_thread.run_sync(read)
                    nursery.cancel_scope.cancel()
                return got

        blob, data = trio.run(main)
        assert blob == b"".join(digest.leaves)
        assert data == a
        assert attacker.counts().get("tree", 0) == 0


def test_silent_share_and_silent_listen_url_cost_seconds_not_20(net: dict[str, Any],
                                                                tmp_path: Path) -> None:
    """A fake share lists a.bin, ignores every `get` and advertises a --listen URL that
    accepts connections and never answers. `kbfs cat` still reads a.bin from the real share
    in a few seconds: a source that does not start answering within the first-byte
    timeout is passed over (before: 10 s on the silent URL, then maybe the relay's 20 s)."""
    digest, a = net["digest"], net["a"]
    ptr, _ = write_pointer(tmp_path, a, "a.bin")
    env = env_of(tmp_path)
    with silent_server() as (silent_url, silent_counts):

        async def main() -> tuple[subprocess.CompletedProcess[bytes], float]:
            async with fake_share(net["relay"].url, [net["entry"]], silent_url):
                wait_holders(net["relay"].url, digest.sha1, 2)
                t0 = time.monotonic()
                proc = await trio.to_thread.run_sync(
                    lambda: cat(env, ptr, "--relay", net["relay"].url, "--no-local"))
                return proc, time.monotonic() - t0

        proc, took = trio.run(main)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout == a
    assert took < 9.5, (took, proc.stderr.decode()[-2000:])


def test_slow_only_source_still_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first-byte timeout passes a slow source over, it does not give up on it: the
    only source, answering after 1.5 s, still serves (one patient round)."""
    data = os.urandom(3 * 65536)
    leaves, _ = tree.tree_of_bytes(data, 65536)
    sha1 = hashlib.sha1(data).hexdigest()

    class Slow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            time.sleep(1.5)
            if self.path.startswith("/tree/"):
                body = b"".join(leaves)
                self.send_response(200)
            else:
                a, b = self.headers["Range"].split("=")[1].split("-")
                body = data[int(a):int(b) + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        with Fetcher([url], first_byte_timeout=0.5, deadline=20) as f:
            assert f.fetch_tree(sha1, len(data), 65536) == b"".join(leaves)
            assert f.fetch_blocks(sha1, len(data), 0, 3, leaves, 65536) == data
    finally:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------- item 8


class _Hostile(BaseHTTPRequestHandler):
    """Answers GETs of the kind `target` ('tree', 'api', 's') with HUGE bytes: MODE
    'length' (an honest Content-Length), 'chunked', or 'lying' (a Content-Length of
    `small` bytes, then HUGE bytes); anything else with a short 404."""

    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        kind = self.path.split("/")[1]
        self.server.counts[kind] += 1
        if kind != self.server.target:
            self.send_response(404)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            return
        mode = self.server.mode
        self.send_response(200)
        if mode == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(self.server.small if mode == "lying" else HUGE))
        self.end_headers()
        try:
            for _ in range(HUGE // MiB):
                if mode == "chunked":
                    self.wfile.write(FRAME)
                else:
                    self.wfile.write(CHUNK)
            if mode == "chunked":
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        self.close_connection = True


@contextmanager
def hostile(target: str, mode: str, small: int = 0) -> Iterator[Any]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    srv.daemon_threads = True
    srv.target, srv.mode, srv.small = target, mode, small  # type: ignore[attr-defined]
    srv.counts = Counter()  # type: ignore[attr-defined]
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"  # type: ignore[attr-defined]
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    out: list[int] = []
    tracemalloc.start()
    try:
        yield out
    finally:
        out.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


SIZE = 5 * tree.BLOCK_SIZE + 3  # 6 leaves: a 192-byte tree
SHA1 = "ab" * 20


@pytest.mark.parametrize("mode", ["length", "chunked", "lying"])
def test_tree_answer_is_read_with_a_bound(mode: str) -> None:
    want = tree.block_count(SIZE) * tree.LEAF_BYTES
    root = tree.tree_of_bytes(b"x" * SIZE)[1]
    with hostile("tree", mode, small=want) as srv, Fetcher([srv.url], deadline=10) as f:
        with peak_memory() as peak, pytest.raises((SourceUnavailable, VerificationError)) as ei:
            f.fetch_tree(SHA1, SIZE, root=root)
    assert peak[0] < 2 * MiB, peak  # before: 48 MiB read whole
    assert srv.url in str(ei.value)
    if mode != "lying":  # a lying Content-Length: the first `want` bytes fail the root
        assert "expected" in str(ei.value), ei.value


@pytest.mark.parametrize("mode", ["length", "chunked"])
def test_find_answer_is_read_with_a_bound(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    with hostile("api", mode) as srv, Fetcher([srv.url]) as f:
        with caplog.at_level(logging.WARNING, "kbfs.fetch"), peak_memory() as peak:
            assert f.find(SHA1) is None
    assert peak[0] < 2 * MiB + 2 * getattr(fetch, "FIND_LIMIT", 4 * MiB), peak
    assert any(srv.url in r.getMessage() and "expected" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("mode", ["length", "chunked"])
def test_listing_is_read_with_a_bound(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "LIST_LIMIT", 2 * MiB, raising=False)  # the same code, less RAM
    with hostile("s", mode) as srv, Fetcher([srv.url]) as f:
        with peak_memory() as peak, pytest.raises(SourceError) as ei:
            f.list_share(srv.url, "a" * 32, "sub")
    assert peak[0] < 8 * MiB, peak
    msg = str(ei.value)
    assert srv.url in msg and "expected" in msg and "\n" not in msg, msg


# ---------------------------------------------------------------- item 10


def hostile_urls(victim: HTTPSource) -> list[str]:
    v = victim.url
    host = v.split("//")[1]
    return [
        f"http://user:pw@{host}/sha1/{{sha1}}",
        f"http://{host}@{host}/sha1/{{sha1}}",
        f"{v}/sha1/{{sha1}}?steal=1",
        f"{v}/sha1/{{sha1}}#frag",
        f"ftp://{host}/sha1/{{sha1}}",
        "file:///etc/passwd",
        f"{v}/admin/delete",
        f"{v}/x/../sha1/{{sha1}}",
        f"{v}/%2e%2e/sha1/{{sha1}}",
        f"{v}/sha1/{'0' * 40}",  # another content's URL
        f"{v}/{'a' * 3000}/sha1/{{sha1}}",
        f"{v}/sha1/{{sha1}}\r\nX-Injected: 1",
    ]


def test_hostile_find_urls_are_never_contacted(caplog: pytest.LogCaptureFixture) -> None:
    """A rogue relay whose /api/find lists URLs of its choosing (and whose own /sha1/
    fails, so the reader would go on to them): none of them is contacted."""
    data = os.urandom(3 * 65536)
    with HTTPSource() as rogue, HTTPSource() as victim:
        info = rogue.add(data, block_size=65536)
        victim.add(data, block_size=65536)
        rogue.extra_urls.extend(hostile_urls(victim))
        rogue.mode = "error500"
        with caplog.at_level(logging.WARNING, "kbfs.fetch"), \
                Fetcher([rogue.url], deadline=4) as f:
            with pytest.raises(SourceUnavailable):
                f.fetch_blocks(info.sha1, info.size, 0, 3, info.leaves, 65536)
            with pytest.raises(SourceUnavailable):
                f.fetch_tree(info.sha1, info.size, 65536)
        assert victim.counts().get("connections", 0) == 0, victim.counts()
        refused = [r.getMessage() for r in caplog.records if "not using the URL" in r.getMessage()]
        assert len(refused) == len(hostile_urls(victim)), refused  # once each
        assert all("\n" not in m and "\r" not in m for m in refused)
        # The same content at a valid URL is used (so the above was the validation).
        rogue.extra_urls[:] = [victim.url + "/sha1/{sha1}"]
        with Fetcher([rogue.url]) as f:
            assert f.fetch_blocks(info.sha1, info.size, 0, 3, info.leaves, 65536) == data
        assert victim.counts()["sha1"] == 1


def test_direct_off_never_contacts_listen_url(tmp_path: Path) -> None:
    """With direct URLs off (Fetcher(direct=False); KBFS_DIRECT=0 for `kbfs cat`), a
    valid URL /api/find lists is never contacted, even when the relay fails."""
    data = os.urandom(tree.BLOCK_SIZE + 99)
    ptr, _ = write_pointer(tmp_path, data, "d.bin")
    with HTTPSource() as relay, HTTPSource() as listen:
        info = relay.add(data)
        listen.add(data)
        relay.extra_urls.append(listen.url + "/sha1/{sha1}")
        relay.mode = "error500"
        with Fetcher([relay.url], direct=False, deadline=3) as f:
            with pytest.raises(SourceUnavailable):
                f.fetch_tree(info.sha1, info.size)
            with pytest.raises(SourceUnavailable):
                f.fetch_blocks(info.sha1, info.size, 0, 2, info.leaves)
        off = cat(env_of(tmp_path / "off", KBFS_DIRECT="0"), ptr, "--relay", relay.url,
                  "--no-local")
        assert off.returncode != 0 and off.stdout == b""
        assert b"Traceback" not in off.stderr, off.stderr.decode()
        assert listen.counts().get("connections", 0) == 0, listen.counts()
        # Default (on): the listen URL serves when the relay cannot.
        on = cat(env_of(tmp_path / "on"), ptr, "--relay", relay.url, "--no-local")
        assert on.returncode == 0, on.stderr.decode()
        assert on.stdout == data
        assert listen.counts()["sha1"] >= 1


def test_bad_kbfs_direct_value_is_one_clear_error(tmp_path: Path) -> None:
    ptr, _ = write_pointer(tmp_path, b"hello", "h.bin")
    proc = cat(env_of(tmp_path, KBFS_DIRECT="maybe"), ptr, "--relay", "http://127.0.0.1:9")
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert "KBFS_DIRECT" in err and "Traceback" not in err, err
