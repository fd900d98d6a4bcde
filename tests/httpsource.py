"""A small, real HTTP content server for tests: serves kbfs's relay/share read API.

`HTTPSource` runs `http.server.ThreadingHTTPServer` on 127.0.0.1 (port 0) in a thread
and answers, from in-memory bytes or files on disk:

- `GET|HEAD /sha1/{sha1}` with `Range: bytes=A-B` -> 206 + Content-Range (200 without Range),
- `GET /tree/{sha1}` -> the concatenated 32-byte leaves,
- `GET /api/find/{sha1}` -> `{"found", "size", "shares", "urls"}` (extra URLs first, then its own).

It can misbehave on purpose (`source.mode = "lie"` etc., see `MODES`), counts requests
per kind and records the Range headers it saw. Use it as a context manager: the server
is always shut down, even when the test fails. It is test support only: no auth, no
limits, and it never imports the kbfs code under test beyond `kbfs.tree` (to build leaves)
and `kbfs.proof` (to build proofs).

Verified pieces (docs/pieces.md): with `source.proofs = "ok"` a /sha1/ request carrying
`Kbfs-Want-Proof: bs=N[; below=L.J]` for a piece-aligned single range gets `Kbfs-Proof:
pieces=A-B; bs=N; nodes=:BASE64:`, made from the content's own bytes at block size N (and
stopping at node L.J when asked). `proofs` lies on purpose too (see `PROOF_MODES`); the
default "none" serves no proof, as a source from before issue 15. `proof_log()` lists what
was sent: (pieces, below asked, proof bytes).

    with HTTPSource() as src:
        info = src.add(b"hello" * 1000, block_size=4096)
        requests.get(src.sha1_url(info.sha1), headers={"Range": "bytes=0-9"})
        src.mode = "lie"
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kbfs import proof, tree

# Behaviours of the /sha1/ (and, for "wrong_tree", /tree/) endpoints.
MODES = (
    "ok",          # honest
    "lie",         # right length, wrong bytes (one byte flipped per block served)
    "short",       # announces the full length, sends half, closes the connection
    "wrong_tree",  # /tree/ serves leaves of the right length that are wrong
    "no_range",    # ignores Range: 200 with the whole body
    "stall",       # sends the headers, then nothing until stopped
    "trickle",     # sends the body at `trickle_rate` bytes per second
    "error500",    # answers 500 to everything
    "not_found",   # answers 404 to /sha1/ and /tree/
    "refuse",      # the listening socket is closed: connections are refused
)

# Behaviours of Kbfs-Proof on /sha1/ (with `mode` "lie", an honest proof over flipped bytes).
PROOF_MODES = (
    "none",      # never sends Kbfs-Proof (a source from before issue 15)
    "ok",        # honest: the proof of the pieces asked, below=L.J honoured
    "full",      # honest but ignores below=L.J: always the proof up to the root
    "wrong",     # the right length, one node flipped
    "other",     # the honest proof of other pieces (shifted by one), labelled as asked
    "label",     # an honest proof of other pieces, labelled with those pieces
    "bs",        # the honest proof, labelled with another block size
    "short",     # the honest proof minus its last node
    "garbage",   # nodes=:not base64:
    "huge",      # a 20 KB header value (a real proof is at most ~4.4 KB)
    "colossal",  # a 100 KB header line (more than http.client reads)
)

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_WANT_RE = re.compile(r"^bs=(\d+)(?:; *below=(\d+)\.(\d+))?$")


@dataclass
class ContentInfo:
    """What a test needs to build a pointer/FileRef for served content."""

    sha1: str
    size: int
    root: str
    leaves: list[bytes]
    block_size: int
    data: bytes | None = None
    path: str | None = None

    @property
    def leaves_blob(self) -> bytes:
        return b"".join(self.leaves)

    def read(self, start: int, end: int) -> bytes:
        if self.data is not None:
            return self.data[start:end]
        assert self.path is not None
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), end - start, start)


@dataclass
class _State:
    contents: dict[str, ContentInfo] = field(default_factory=dict)
    mode: str = "ok"
    find_mode: str = "ok"  # ok | 404 | 500
    extra_urls: list[str] = field(default_factory=list)
    trickle_rate: int = 1024
    proofs: str = "none"
    proof_log: list[tuple[tuple[int, int], tuple[int, int] | None, int]] = field(default_factory=list)
    outboards: dict[tuple[str, int], bytes] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    ranges: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real relays do
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.state.lock:
            self.server.state.counts["connections"] += 1

    # ---- helpers
    def _send(self, status: int, body: bytes = b"", ctype: str = "application/octet-stream",
              head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _count(self, kind: str) -> None:
        st = self.server.state
        with st.lock:
            st.counts[kind] += 1
            if kind == "sha1":
                st.ranges.append((self.path, self.headers.get("Range")))

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        st = self.server.state
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) == 3 and parts[:2] == ["api", "find"]:
            self._count("find")
            return self._find(parts[2])
        if len(parts) != 2 or parts[0] not in ("sha1", "tree"):
            return self._send(404, b"no such path", "text/plain")
        kind, sha1 = parts
        self._count(kind)
        if st.mode == "error500":
            return self._send(500, b"boom", "text/plain")
        info = st.contents.get(sha1)
        if info is None or st.mode == "not_found":
            return self._send(404, b"unknown sha1", "text/plain")
        if kind == "tree":
            blob = info.leaves_blob
            if st.mode == "wrong_tree":
                blob = bytes(b ^ 0x5A for b in blob)
            return self._send(200, blob, head=head)
        self._serve_content(info, head)

    def _find(self, sha1: str) -> None:
        st = self.server.state
        if st.find_mode == "500":
            return self._send(500, b"boom", "text/plain")
        info = st.contents.get(sha1)
        if st.find_mode == "404" or info is None:
            body = {"found": False, "size": 0, "shares": [], "urls": []}
            return self._send(404, json.dumps(body).encode(), "application/json")
        urls = [u.format(sha1=sha1) for u in st.extra_urls]
        urls.append(self.server.base_url + f"/sha1/{sha1}")
        body = {"found": True, "size": info.size, "shares": [], "urls": urls}
        self._send(200, json.dumps(body).encode(), "application/json")

    def _serve_content(self, info: ContentInfo, head: bool) -> None:
        st = self.server.state
        size = info.size
        start, end, status = 0, size, 200
        header = self.headers.get("Range")
        m = _RANGE_RE.match(header or "")
        if m and st.mode != "no_range" and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:
                start, end = max(0, size - int(m.group(2))), size
            if start >= size or end <= start:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{info.sha1}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        value = self._proof_header(info, start, end) if status == 206 else None
        if value is not None:
            self.send_header("Kbfs-Proof", value)
        self.end_headers()
        if head:
            return
        mode = st.mode
        if mode == "stall":
            st.stopping.wait(120)
            self.close_connection = True
            return
        if mode == "short":
            half = start + (end - start) // 2
            self.wfile.write(info.read(start, half))
            self.wfile.flush()
            self.close_connection = True
            return
        if mode == "trickle":
            pos = start
            while pos < end and not st.stopping.is_set():
                n = min(st.trickle_rate, end - pos)
                try:
                    self.wfile.write(info.read(pos, pos + n))
                    self.wfile.flush()
                except OSError:
                    break
                pos += n
                st.stopping.wait(1.0)
            self.close_connection = True
            return
        chunk = 4 << 20
        pos = start
        while pos < end:
            piece = info.read(pos, min(end, pos + chunk))
            if mode == "lie":
                piece = _flip(piece, pos, info.block_size)
            try:
                self.wfile.write(piece)
            except OSError:
                self.close_connection = True
                return
            pos += len(piece)


    def _proof_header(self, info: ContentInfo, start: int, end: int) -> str | None:
        """The Kbfs-Proof value for bytes [START, END) as `proofs` says, or None."""
        st = self.server.state
        m = _WANT_RE.match(self.headers.get("Kbfs-Want-Proof") or "")
        if st.proofs == "none" or m is None:
            return None
        bs = int(m.group(1))
        if bs < 1 or bs >= 1 << 32:
            return None
        shape = proof.Shape(info.size, bs)
        if start % bs or not (end == info.size or end % bs == 0):
            return None  # not piece-aligned: no proof, as the wire format says
        a, b = start // bs, -(-end // bs)
        below = (int(m.group(2)), int(m.group(3))) if m.group(2) is not None else None
        key = (info.sha1, bs)
        with st.lock:
            ob = st.outboards.get(key)
        if ob is None:
            leaves, _ = tree.tree_of_bytes(info.read(0, info.size), bs)
            ob = proof.outboard(leaves, shape, 0)
            with st.lock:
                st.outboards[key] = ob
        get = proof.outboard_getter(ob, shape, 0)
        anchor = below if st.proofs != "full" else None
        try:
            nodes = proof.make_proof(get, shape, a, b, anchor)
        except ValueError:  # a below= node that does not cover the range: the full proof
            anchor, nodes = None, proof.make_proof(get, shape, a, b)
        label_a, label_b, label_bs = a, b, bs
        mode = st.proofs
        if mode == "wrong" and nodes:
            nodes = nodes[:-1] + bytes([nodes[-1] ^ 1])
        elif mode in ("other", "label"):
            oa = a + 1 if b < shape.leaves else a - 1
            if oa < 0:
                oa = a  # one piece only: nothing else to prove
            nodes = proof.make_proof(get, shape, oa, oa + b - a)
            if mode == "label":
                label_a, label_b = oa, oa + b - a
        elif mode == "bs":
            label_bs = bs * 2
        elif mode == "short":
            nodes = nodes[:-32] if nodes else bytes(31)
        with st.lock:
            st.proof_log.append(((a, b), below, len(nodes)))
        if mode == "garbage":
            return f"pieces={a}-{b}; bs={bs}; nodes=:not base64!:"
        if mode == "huge":
            return f"pieces={a}-{b}; bs={bs}; nodes=:{'A' * 20000}:"
        if mode == "colossal":
            return f"pieces={a}-{b}; bs={bs}; nodes=:{'A' * 100000}:"
        return f"pieces={label_a}-{label_b}; bs={label_bs}; nodes=:{proof.encode_header(nodes)}:"


def _flip(piece: bytes, offset: int, block_size: int) -> bytes:
    """Flip one byte inside every block that PIECE (at OFFSET) touches."""
    buf = bytearray(piece)
    first = offset // block_size
    last = (offset + len(buf) - 1) // block_size if buf else first - 1
    for b in range(first, last + 1):
        pos = max(b * block_size, offset) - offset
        buf[pos] ^= 0xFF
    return bytes(buf)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, addr: tuple[str, int], state: _State) -> None:
        self.state = state
        super().__init__(addr, _Handler)
        host, port = self.server_address[:2]
        self.base_url = f"http://{host}:{port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up mid-body are part of the tests, not news


class HTTPSource:
    """A threaded HTTP server on 127.0.0.1 serving content by sha1; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._state = _State()
        self._host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._refusing = False
        self.start()

    # ---- lifecycle
    def start(self) -> None:
        """Start serving (again, on the same port after `stop`)."""
        if self._server is not None:
            return
        self._state.stopping.clear()
        self._server = _Server((self._host, self._port), self._state)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket (the port is kept for `start`)."""
        srv, self._server = self._server, None
        if srv is None:
            return
        self._state.stopping.set()
        srv.shutdown()
        srv.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> HTTPSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- content
    def add(self, data: bytes | None = None, *, path: str | None = None,
            block_size: int = tree.BLOCK_SIZE, sha1: str | None = None) -> ContentInfo:
        """Serve DATA (or the file at PATH). SHA1 overrides the real SHA-1, to serve
        content that is self-consistent (tree and blocks agree) but is not what it claims."""
        if data is None:
            if path is None:
                raise ValueError("give data or path")
            with open(path, "rb") as f:
                data_for_hash = f.read()
        else:
            data_for_hash = data
        leaves, root = tree.tree_of_bytes(data_for_hash, block_size)
        real = hashlib.sha1(data_for_hash).hexdigest()
        info = ContentInfo(sha1=sha1 or real, size=len(data_for_hash), root=root, leaves=leaves,
                           block_size=block_size, data=data, path=path)
        with self._state.lock:
            self._state.contents[info.sha1] = info
        return info

    def remove(self, sha1: str) -> None:
        with self._state.lock:
            self._state.contents.pop(sha1, None)

    # ---- behaviour
    @property
    def mode(self) -> str:
        return "refuse" if self._refusing else self._state.mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"unknown mode {value!r}; one of {MODES}")
        if value == "refuse":
            self._refusing = True
            self.stop()
            return
        if self._refusing:
            self._refusing = False
            self.start()
        self._state.stopping.clear()
        self._state.mode = value

    @property
    def find_mode(self) -> str:
        return self._state.find_mode

    @find_mode.setter
    def find_mode(self, value: str) -> None:
        if value not in ("ok", "404", "500"):
            raise ValueError("find_mode is one of ok, 404, 500")
        self._state.find_mode = value

    @property
    def extra_urls(self) -> list[str]:
        """URL templates (with `{sha1}`) that /api/find lists before this server's own URL."""
        return self._state.extra_urls

    @property
    def proofs(self) -> str:
        """How /sha1/ answers Kbfs-Want-Proof: one of PROOF_MODES ("none" by default)."""
        return self._state.proofs

    @proofs.setter
    def proofs(self, value: str) -> None:
        if value not in PROOF_MODES:
            raise ValueError(f"unknown proof mode {value!r}; one of {PROOF_MODES}")
        self._state.proofs = value

    def proof_log(self) -> list[tuple[tuple[int, int], tuple[int, int] | None, int]]:
        """((a, b), below asked or None, bytes of proof nodes sent) per proof sent."""
        with self._state.lock:
            return list(self._state.proof_log)

    @property
    def trickle_rate(self) -> int:
        return self._state.trickle_rate

    @trickle_rate.setter
    def trickle_rate(self, value: int) -> None:
        self._state.trickle_rate = value

    # ---- addresses and counters
    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    def sha1_url(self, sha1: str) -> str:
        return f"{self.url}/sha1/{sha1}"

    def counts(self) -> dict[str, int]:
        """Requests seen per kind ('sha1', 'tree', 'find') and TCP 'connections' accepted."""
        with self._state.lock:
            return dict(self._state.counts)

    def ranges(self) -> list[tuple[str, str | None]]:
        """(path, Range header) of every /sha1/ request, in arrival order."""
        with self._state.lock:
            return list(self._state.ranges)

    def reset_counts(self) -> None:
        with self._state.lock:
            self._state.counts.clear()
            self._state.ranges.clear()
            self._state.proof_log.clear()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (for 'connection refused' tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll PREDICATE until it is true or TIMEOUT passes; return its last value."""
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > end:
            return bool(predicate())
        time.sleep(interval)
