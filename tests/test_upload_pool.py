"""The share's upload connections (kbfs.uploadpool, kbfs.share `_post`), with a real relay
and a real share, and a TCP tap between them that sees every connection the share opens.

- The first read after the share connected, and the reads after it, open no connection:
  the pool keeps one open ahead of the next request, and reuses it.
- A kept connection cut just as the share sends its next request into it (the stale
  keep-alive no poll can see) costs one clean retry on a new connection, not the read.
- A relay that closes idle connections (KBFS_HTTP_IDLE_TIMEOUT=1): later reads are
  served on a replaced connection, without a failure.
- Many concurrent uploads: every byte right, a bounded number of connections, and a
  second burst reuses them.
- The pool's own rules (newest first, expiry, bound, warm, close) on a stand-in
  connection (the real one is the share's `_Uploader`, above).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from netutil import start_relay, start_share

from kbfs.uploadpool import UploadPool

SIZE = 8 << 20


class Tap:
    """A TCP forwarder in front of the relay for the share only: counts the connections
    the share opens (its websocket starts with GET, the rest are upload connections,
    including those opened ahead of use that have sent nothing yet), and with `cut_next`
    closes the upload connection the next request arrives on, unforwarded (as a relay
    closing a kept connection while the share sends into it: no poll sees that coming)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.target = 0
        self.lock = threading.Lock()
        self.accepted = self.websockets = self.posts = self.cuts = 0
        self.cut_next = False
        self.closing = False
        # (its connection accepted, POST seen, the connection's first POST)
        self.post_times: list[tuple[float, float, bool]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def uploads(self) -> int:
        with self.lock:
            return self.accepted - self.websockets

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
            threading.Thread(target=self._serve, args=(client, time.monotonic()), daemon=True).start()

    def _serve(self, client: socket.socket, accepted: float) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True, accepted)

    def _pump(self, src: socket.socket, dst: socket.socket, from_share: bool, accepted: float = 0) -> None:
        first, posts = True, 0
        try:
            while data := src.recv(1 << 20):
                if from_share and first and data.startswith(b"GET "):
                    with self.lock:
                        self.websockets += 1
                if from_share and data.startswith(b"POST /_upload/"):
                    with self.lock:
                        self.posts += 1
                        self.post_times.append((accepted, time.monotonic(), posts == 0))
                        cut = self.cut_next
                        if cut:
                            self.cut_next = False
                            self.cuts += 1
                    posts += 1
                    if cut:
                        break
                first = False
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.closing = True
        self.sock.close()


@pytest.fixture()
def data(tmp_path: Path) -> tuple[Path, bytes]:
    folder = tmp_path / "data"
    folder.mkdir()
    blob = os.urandom(SIZE)
    (folder / "blob.bin").write_bytes(blob)
    return folder, blob


def start_pair(tmp_path: Path, folder: Path) -> Iterator[tuple[Any, Any, Tap]]:
    tap = Tap()
    relay = start_relay(tmp_path, "--public-url", tap.url)  # the share signs the tap's host
    tap.target = int(relay.url.rsplit(":", 1)[1])
    try:
        share = start_share(folder, tap.url, tmp_path)
        try:
            yield relay, share, tap
        finally:
            share.stop()
    finally:
        relay.stop()
        tap.close()


@pytest.fixture()
def pair(tmp_path: Path, data: tuple[Path, bytes]) -> Iterator[tuple[Any, Any, Tap]]:
    yield from start_pair(tmp_path, data[0])


def read(relay: Any, sha1: str, start: int, length: int, timeout: float = 20) -> bytes:
    req = urllib.request.Request(f"{relay.url}/sha1/{sha1}",
                                 headers={"Range": f"bytes={start}-{start + length - 1}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()  # type: ignore[no-any-return]


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_reads_open_no_connection_once_connected(pair: Any, data: tuple[Path, bytes]) -> None:
    relay, _, tap = pair
    blob = data[1]
    sha1 = hashlib.sha1(blob).hexdigest()
    wait_for(lambda: tap.uploads() >= 2)  # the connections kept open ahead of the first read
    time.sleep(0.3)
    before = tap.uploads()
    spans = []
    for k in range(12):
        start = (k * 700_001) % (SIZE - 300_000)
        t0 = time.monotonic()
        assert read(relay, sha1, start, 250_000 + k) == blob[start:start + 250_000 + k]
        spans.append((t0, time.monotonic()))
        time.sleep(0.1)
    assert len(tap.post_times) == 12
    # every read's upload went out on a connection opened well before the read was asked
    # (one more may be opened meanwhile, kept for a request that comes while one is busy)
    for k, ((t0, t1), (accepted, posted, first)) in enumerate(zip(spans, tap.post_times, strict=True)):
        assert t0 <= posted <= t1, (k, t0, posted, t1)
        assert not first or t0 - accepted > 0.05, (k, t0 - accepted)
    assert tap.uploads() <= before + 1, (before, tap.uploads())


def test_a_kept_connection_cut_at_reuse_is_retried_once(pair: Any, data: tuple[Path, bytes]) -> None:
    relay, share, tap = pair
    blob = data[1]
    sha1 = hashlib.sha1(blob).hexdigest()
    assert read(relay, sha1, 0, 1000) == blob[:1000]  # the kept connection has served once
    for k in range(3):
        tap.cut_next = True
        before = tap.uploads()
        t = time.monotonic()
        start = 1_000_000 * (k + 1)
        assert read(relay, sha1, start, 300_000) == blob[start:start + 300_000]
        assert time.monotonic() - t < 5  # not the relay's 10 s start timeout
        assert tap.cuts == k + 1
        assert tap.uploads() >= before + 1  # the retry went out on a new connection
        assert read(relay, sha1, start + 5, 10) == blob[start + 5:start + 15]
    assert "failed" not in share.proc.stderr().lower()


def test_a_relay_closing_idle_connections(tmp_path: Path, data: tuple[Path, bytes],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KBFS_HTTP_IDLE_TIMEOUT", "1")  # the relay's keep-alive timeout
    folder, blob = data
    sha1 = hashlib.sha1(blob).hexdigest()
    for relay, share, tap in start_pair(tmp_path, folder):
        for k in range(4):
            start = 123_457 * (k + 1)
            t = time.monotonic()
            assert read(relay, sha1, start, 200_000) == blob[start:start + 200_000]
            assert time.monotonic() - t < 5
            time.sleep(1.6)  # the relay has closed what the share kept
        assert "failed" not in share.proc.stderr().lower()
        assert tap.uploads() >= 3  # closed by the relay, opened again by the share


def test_many_concurrent_uploads(pair: Any, data: tuple[Path, bytes]) -> None:
    relay, _, tap = pair
    blob = data[1]
    sha1 = hashlib.sha1(blob).hexdigest()
    n = 64

    def one(k: int) -> bool:
        start = k * (SIZE // n)
        return read(relay, sha1, start, 100_000 + k, timeout=60) == blob[start:start + 100_000 + k]

    with ThreadPoolExecutor(n) as ex:
        assert all(ex.map(one, range(n)))
    first = tap.uploads()
    assert first <= 32 + 2, first  # MAX_UPLOADS threads, each on one connection at a time
    with ThreadPoolExecutor(8) as ex:
        assert all(ex.map(one, range(n)))
    assert tap.uploads() <= first + 2, (first, tap.uploads())  # the second burst reused them


class Stub:
    """A stand-in connection for the pool's own rules (the real one is tested above)."""

    def __init__(self, fail: bool = False) -> None:
        self.open_ = self.closed = False
        self.dead = False
        self.fail = fail

    def alive(self) -> bool:
        return self.open_ and not self.closed and not self.dead

    def open(self) -> None:
        if self.fail:
            raise OSError("refused")
        self.open_ = True

    def close(self) -> None:
        self.closed = True


def test_pool_rules() -> None:
    now = [0.0]
    made: list[Stub] = []

    def make() -> Stub:
        made.append(Stub())
        return made[-1]

    pool = UploadPool(make, max_idle=2, idle_seconds=30, clock=lambda: now[0])
    pool.warm()  # none idle: one opened ahead of use
    assert len(made) == 1 and made[0].open_ and pool.idle_count() == 1
    pool.warm()  # one idle and fresh: nothing more
    assert len(made) == 1
    a = pool.take()
    assert a is made[0] and pool.idle_count() == 0
    b = pool.take()  # none idle: a new, unconnected one
    assert b is made[1] and not b.open_
    b.open()
    now[0] = 1
    pool.give(a)
    now[0] = 2
    pool.give(b)
    assert pool.take() is b  # the newest first
    c = make()
    c.open()
    pool.give(b)
    pool.give(c)  # over max_idle: closed
    assert c.closed and pool.idle_count() == 2
    b.dead = True  # closed by the relay while idle: skipped and closed
    assert pool.take() is a and b.closed
    pool.give(a)
    now[0] = 40  # older than idle_seconds: closed, and warm opens a new one
    pool.warm()
    assert a.closed and pool.idle_count() == 1 and made[-1].open_
    closed = Stub()
    pool.give(closed)  # never opened: not kept
    assert pool.idle_count() == 1
    assert pool.fresh() is not pool.take()
    failing = UploadPool(lambda: Stub(fail=True), 2, 30)
    with pytest.raises(OSError):
        failing.warm()
    assert failing.idle_count() == 0
    pool.give(made[-1])
    pool.close()
    assert made[-1].closed
    d = Stub()
    d.open()
    pool.give(d)  # after close: closed at once
    assert d.closed and pool.idle_count() == 0
    two = UploadPool(Stub, max_idle=4, idle_seconds=30, spare=2)
    two.warm()
    assert two.idle_count() == 2
    kept = two.take()
    two.warm()  # one in use: another opened, two idle again
    assert two.idle_count() == 2
    two.give(kept)
    assert two.take() is kept  # the one just used first


class TlsTap(Tap):
    """The tap as a TLS terminator (Python's ssl, TLS 1.3: it sends its session tickets
    right after the handshake, as Caddy does), forwarding plain bytes to the relay."""

    def __init__(self, context: Any) -> None:
        self.context = context
        super().__init__()

    def _serve(self, client: socket.socket, accepted: float) -> None:
        import select

        try:
            tls = self.context.wrap_socket(client, server_side=True)
            upstream = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            client.close()
            return
        try:  # one thread: an ssl socket is not to be read and written by two at once
            while True:
                ready = [tls] if tls.pending() else select.select([tls, upstream], [], [], 30)[0]
                if not ready:
                    break
                if tls in ready:
                    data = tls.recv(1 << 20)
                    if not data:
                        break
                    upstream.sendall(data)
                if upstream in ready:
                    data = upstream.recv(1 << 20)
                    if not data:
                        break
                    tls.sendall(data)
        except OSError:
            pass
        tls.close()
        upstream.close()


def test_tls_connections_opened_ahead_are_used(tmp_path: Path, data: tuple[Path, bytes],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Over TLS 1.3 a connection opened ahead of use has unread records (the server's
    session tickets): they do not make it look closed (it would be dropped, and a new one
    opened for every read)."""
    import ssl

    from deployutil import make_pki

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    pki = make_pki(tmp_path / "pki")
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(str(pki.good[0]), str(pki.good[1]))
    folder, blob = data
    sha1 = hashlib.sha1(blob).hexdigest()
    tap = TlsTap(server)
    tap_url = tap.url.replace("http://127.0.0.1", "https://localhost")
    relay = start_relay(tmp_path, "--public-url", tap_url)
    tap.target = int(relay.url.rpartition(":")[2])
    try:
        share = start_share(folder, tap_url, tmp_path)
        try:
            wait_for(lambda: tap.accepted >= 3, timeout=20)  # the websocket and two kept
            time.sleep(0.5)
            before = tap.accepted
            for k in range(10):
                start = 300_007 * (k + 1)
                assert read(relay, sha1, start, 100_000) == blob[start:start + 100_000]
            assert tap.accepted <= before + 1, (before, tap.accepted)
        finally:
            share.stop()
    finally:
        relay.stop()
        tap.close()
