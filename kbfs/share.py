"""The share: publish one folder through relays, from behind a firewall.

`Share` indexes its folder (`kbfs.index.ShareIndex`, in a worker thread, rescanned
periodically), keeps one outbound websocket per relay for control only (challenge
signed with the share's Ed25519 key, catalogue updates, pings, small requests), and
answers each request by POSTing the body to the relay's `/_upload/{id}` from one of its
upload threads, over a keep-alive `http.client` connection of that relay's pool
(`kbfs.uploadpool`: shared by the threads, one kept open ahead of the next request).
Every block it sends is first checked against the index's BLAKE3 leaves, and the file's stat against
the index (`is_current`): a file that changed since it was indexed is never served
under its old SHA-1; the upload is refused or cut short and a rescan is started. With
`--listen` the same verified reads are also served directly over HTTP (`/sha1/`,
`/tree/`).

Verified 64 KiB pieces (docs/pieces.md, "Serving pieces"): a request for a single
piece-aligned range with `Kbfs-Want-Proof: bs=65536` gets, beside the same verified
bytes, `Kbfs-Proof` (`piece_proof`): the proof of those pieces against the file's 64 KiB
tree, made from the index's level-4 nodes (levels >= 4) and, below them, from the one or
two 1 MiB groups at the range's edges, read again and checked against their stored nodes
first (a changed file: 409, as for any read). Nothing else changes: no proof for other
block sizes, unaligned ranges, or files whose index row predates the 64 KiB tree.

A private share checks bearer tokens it issued (`kbfs.tokens`: `issue_token`, HMAC with
a secret of its state folder, 30-day expiry by default, recorded in tokens.jsonl;
`revoke_token` appends to `revoked`, re-read on every check, and relays are told
`auth_reset`).

It serves only regular files of its index inside its folder: nothing excluded
(`index.DEFAULT_EXCLUDES` and `--exclude`; other dotfiles such as zarr's `.zarray` are
data), nothing of its state folder, no path leaving the folder.

Identity (`kbfs.sharestate`, `find_state_dir`): the key lives in the share's state
folder, which records the folder it shares (`share.json`); a folder that was moved (its
old path is gone and its indexed files are found, same sizes and mtimes, at the same
places under the new path) keeps its state and so its id; a new key is announced
loudly, naming an old share of a vanished folder of the same name when there is one.

Reconnection (`reconnect_delays`): exponential from 0.5 s, capped at 5 s
(`KBFS_SHARE_BACKOFF_MAX`), jittered; a relay that cannot be reached is reported once
per outage, not on every retry.

This module must not import `relay`, `fetch` or `cache`. See docs/protocol.md.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import queue
import random
import re
import select
import socket
import stat
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
import trio_websocket
from starlette.routing import Route, Router

from kbfs import httpserve, osio, proof, protocol, proxyconf, tlsconf, tree
from kbfs.config import normalize_relay
from kbfs.errors import (
    BadRequest,
    ConfigError,
    KbfsError,
    NotFound,
    VerificationError,
)
from kbfs.httpserve import Endpoint, HttpError, Receive, Scope, Send, header, send_json
from kbfs.index import IndexedFile, ShareIndex
from kbfs.sharestate import (  # noqa: F401 - moved there; still importable from here
    KEY_FILE,
    MOVE_SAMPLE,
    SHARE_INFO_FILE,
    StateChoice,
    find_state_dir,
    load_key,
    public_key_bytes,
    read_share_info,
    share_id_of,
    state_dir_for,
    write_share_info,
)
from kbfs.tokens import (  # noqa: F401 - moved there; still importable from here
    DEFAULT_TOKEN_DAYS,
    REVOKED_FILE,
    TOKEN_SECRET_FILE,
    TOKENS_FILE,
    _token_secret,
    check_token,
    issue_token,
    issued_tokens,
    read_revoked,
    revoke_token,
    token_id,
)
from kbfs.uploadpool import UploadPool

log = logging.getLogger(__name__)


PING_INTERVAL = 10.0
PONG_TIMEOUT = 20.0
HANDSHAKE_TIMEOUT = 10.0
UPLOAD_TIMEOUT = 60.0  # a relay not taking upload bytes for this long ends the upload
MAX_UPLOADS = 32  # concurrent uploads (worker threads)
WORKER_IDLE = 10.0  # an upload thread idle this long ends
# Upload connections (kbfs.uploadpool): kept per relay, not per thread; POOL_SPARE kept open
# ahead of the next requests, checked every POOL_CHECK s; closed after POOL_IDLE s unused
# (below the relay's and nginx's 75 s keep-alive timeouts).
POOL_IDLE = 30.0
POOL_CHECK = 2.0
# Kept open: a request right after another may come before the one just used is given back
# (and a viewer asks for a window and its two neighbours at once).
POOL_SPARE = 2
CATALOGUE_BATCH = 1000
SCAN_REFRESH = 2.0  # how often the catalogue is republished during a long scan
BACKOFF_MIN = 0.5
# A relay that comes back is found within this many seconds (the longest wait between two
# attempts); KBFS_SHARE_BACKOFF_MAX overrides it (tests).
BACKOFF_MAX = 5.0
BACKOFF_ENV = "KBFS_SHARE_BACKOFF_MAX"
LEAVES_CACHE_BYTES = 64 << 20
OUTBOARD_CACHE_BYTES = 64 << 20  # 64 KiB trees' levels >= 4 (about 64 bytes per MiB of file)
MAX_CONTROL_MESSAGE = 4 << 20
REVOCATION_POLL = 0.5  # how often a private share looks for revoked tokens (to tell relays)

_CONNECTION_FAILED = (trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, OSError,
                      trio.TooSlowError, trio.BrokenResourceError, KbfsError)


def _leaf_exceptions(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or EXC itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaf_exceptions(inner)]
    return [exc]


def reconnect_delays(cap: float = BACKOFF_MAX,
                     rng: random.Random | None = None) -> Iterator[float]:
    """The waits between attempts to reach a relay: BACKOFF_MIN doubling up to CAP, each
    times a random factor in [0.5, 1] (shares do not all come back at once), so no wait
    is longer than CAP and a relay that returns is found within CAP seconds."""
    uniform = (rng or random.Random()).uniform
    backoff = BACKOFF_MIN
    while True:
        yield min(backoff, cap) * uniform(0.5, 1.0)
        backoff = min(backoff * 2, cap)


def _backoff_max() -> float:
    text = os.environ.get(BACKOFF_ENV, "").strip()
    if not text:
        return BACKOFF_MAX
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise ConfigError(f"{BACKOFF_ENV}={text[:40]!r}: expected seconds (0 < s <= 3600)")
    return value


def _relay_url(url: str) -> str:
    """A --relay URL, normalised, or ConfigError naming what is wrong with it."""
    try:
        return protocol.check_relay_url(normalize_relay(url))
    except BadRequest as exc:
        raise ConfigError(f"--relay: {exc}") from None


def _failure_reason(exc: BaseException) -> str:
    """Why connecting failed, in a few plain words (`connection refused`, `HTTP 403`,
    `Name or service not known`), from the innermost exception that says something."""
    tls = tlsconf.advice(exc)  # a refused certificate: what to do, not "errno 1"
    if tls:
        return tls
    todo: list[BaseException] = [exc]
    said = ""
    for _ in range(20):
        if not todo:
            break
        e = todo.pop(0)
        if isinstance(e, trio_websocket.ConnectionRejected):
            return f"it answered HTTP {e.status_code}"
        if isinstance(e, socket.gaierror) and e.strerror:
            return str(e.strerror)  # "Name or service not known"
        if isinstance(e, OSError) and e.errno and e.errno > 0:
            text = os.strerror(e.errno)  # trio's own strerror adds the address
            return text[:1].lower() + text[1:]
        if isinstance(e, trio.TooSlowError):
            said = said or f"no answer within {HANDSHAKE_TIMEOUT:g} s"
        elif isinstance(e, trio_websocket.ConnectionClosed):
            said = said or "it closed the connection"
        elif isinstance(e, KbfsError | OSError) and str(e):
            said = said or str(e)
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        for inner in (e.__cause__, e.__context__):
            if inner is not None:
                todo.append(inner)
    return said or type(exc).__name__


class Refused(HttpError):
    """This share will not serve a request; `status` is the HTTP status it maps to
    (409: the file changed since it was indexed)."""


# ---------------------------------------------------------------- verified reads


_buffers: list[bytearray] = []
_buffers_lock = threading.Lock()


def _take_buffer() -> bytearray:
    """A block-sized buffer from a small pool: a fresh 1 MiB bytearray is mapped and
    faulted in page by page, which costs as much as reading and hashing the block."""
    with _buffers_lock:
        if _buffers:
            return _buffers.pop()
    return bytearray(tree.BLOCK_SIZE)


def _give_buffer(buf: bytearray) -> None:
    with _buffers_lock:
        if len(_buffers) < MAX_UPLOADS:
            _buffers.append(buf)


class _VerifiedReader:
    """Reads bytes [start, end) of an indexed file block by block, each block checked
    against its leaf before any of it is handed out. Blocking; one thread at a time.

    The first block is read and checked in the constructor, so a changed file is
    refused before an upload starts. `__iter__` yields memoryviews of one reused
    buffer: a consumer must be done with a chunk before asking for the next.
    """

    def __init__(self, path: str, f: IndexedFile, leaves: bytes, start: int, end: int) -> None:
        self.f = f
        self.leaves = leaves
        self.start, self.end = start, end
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(path, flags)
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                                  st.st_ino) != f.stat_key():
                raise Refused(409, f"{f.path} changed since it was indexed")
            self.buf = _take_buffer()
            self.view = memoryview(self.buf)
            self.block = start // tree.BLOCK_SIZE
            # Read and check the first block now, so a changed file is refused before
            # an upload starts rather than cut short in the middle.
            self.first: memoryview | None = self._read_block(self.block)
        except BaseException:
            os.close(self.fd)
            raise

    def __len__(self) -> int:
        return self.end - self.start

    def _read_block(self, index: int) -> memoryview:
        offset = index * tree.BLOCK_SIZE
        want = min(tree.BLOCK_SIZE, self.f.size - offset)
        got = 0
        while got < want:
            n = osio.readinto(self.fd, self.view[got:want], offset + got)
            if n <= 0:
                raise Refused(409, f"{self.f.path} is shorter than when it was indexed")
            got += n
        leaf = self.leaves[index * tree.LEAF_BYTES : (index + 1) * tree.LEAF_BYTES]
        block = self.view[:want]
        if tree.leaf_hash(block) != leaf:
            raise Refused(409, f"{self.f.path}: block {index} no longer matches the index")
        lo = max(self.start - offset, 0)
        hi = min(self.end - offset, want)
        return block[lo:hi]

    def next_chunk(self) -> memoryview | None:
        """The next verified chunk (at most one block), or None at the end."""
        if self.first is not None:
            chunk, self.first = self.first, None
            self.block += 1
            return chunk
        if self.block * tree.BLOCK_SIZE >= self.end:
            return None
        chunk = self._read_block(self.block)
        self.block += 1
        return chunk

    def __iter__(self) -> Iterator[memoryview]:
        while True:
            chunk = self.next_chunk()
            if chunk is None:
                return
            yield chunk

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            if hasattr(self, "buf"):
                self.first = None
                self.view.release()
                _give_buffer(self.buf)


# ---------------------------------------------------------------- upload connections


_URLSAFE_RE = re.compile(r"[A-Za-z0-9_-]{1,200}\Z")
_SMALL_BODY = 64 << 10  # bodies up to this go out in the same write as the request head
_MAX_ANSWER = 64 << 10  # bytes of the relay's answer to an upload (head, then body)


def _read_answer(sock: socket.socket) -> tuple[int, str, bool]:
    """The relay's answer to an upload: (status, body text, whether the connection may be
    kept). A small hand parser: the answers are tiny (a 204, or a short JSON error), and
    http.client's (a file object and the email header parser) costs more than the rest
    of reading them."""
    buf = b""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if len(buf) > _MAX_ANSWER:
            raise http.client.HTTPException("relay answer head too long")
        data = sock.recv(_MAX_ANSWER)
        if not data:
            raise http.client.RemoteDisconnected("relay closed the connection without answering")
        buf += data
    lines = buf[:end].split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise http.client.BadStatusLine(lines[0][:100].decode("latin-1"))
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    body = buf[end + 4:]
    length_text = headers.get(b"content-length")
    keep = parts[0] == b"HTTP/1.1" and headers.get(b"connection") != b"close"
    if length_text is None:
        # No length: only an answer without a body (204, 304) leaves the connection usable.
        keep = keep and status in (204, 304) and not body
        length = len(body)
    elif not length_text.isdigit() or int(length_text) > _MAX_ANSWER:
        raise http.client.HTTPException("relay answer with a bad Content-Length")
    else:
        length = int(length_text)
    while len(body) < length:
        data = sock.recv(length - len(body))
        if not data:
            raise http.client.IncompleteRead(body, length - len(body))
        body += data
    keep = keep and len(body) == length
    return status, body[:length].decode("utf-8", "replace"), keep


class _Uploader:
    """One keep-alive HTTP/1.1 connection to one relay, for the upload POSTs of one
    worker thread.

    Plain `http.client` underneath, not `requests`: an upload is one fixed-shape POST,
    and requests' per-request machinery (hooks, adapters, header merging, urllib3's
    pool) cost about as much CPU as reading and hashing a block. The request head and
    the first chunk of the body leave in one write (`sendmsg`), so the relay gets the
    whole request of a small range in one segment and parses it in one pass; Nagle is
    off, so the last short segment of a body is never held back waiting for an ACK.
    """

    def __init__(self, relay: str) -> None:
        parts = urllib.parse.urlsplit(relay)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Refused(400, f"relay URL {relay!r} is not http(s)")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port
        self.host_header = parts.netloc.rpartition("@")[2]
        self.prefix = parts.path.rstrip("/")
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self) -> socket.socket:
        conn = proxyconf.http_connection(self.https, self.host, self.port, UPLOAD_TIMEOUT)
        conn.connect()
        assert conn.sock is not None
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = conn
        return conn.sock  # type: ignore[no-any-return]

    def alive(self) -> bool:
        """Connected and not closed by the relay (never blocks)."""
        if self.conn is None or self.conn.sock is None:
            return False
        sock: socket.socket = self.conn.sock
        # An idle keep-alive connection with something to read has been closed by the
        # relay (its idle timeout): do not send into it.
        poller = select.poll()  # not select(): file descriptors may be above 1023
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            return True
        if not self.https:
            return False
        # TLS: what is there may be records with no data (TLS 1.3's session tickets, sent
        # after the handshake: a connection opened ahead of use has them unread).
        import ssl
        try:
            sock.setblocking(False)
            try:
                sock.recv(1)
            finally:
                sock.settimeout(UPLOAD_TIMEOUT)
        except ssl.SSLWantReadError:
            return True  # records only, no data, no close
        except OSError:
            return False
        return False  # the end of the stream, or bytes nobody asked for

    def open(self) -> None:
        """Connect now unless the kept-alive connection is still open."""
        self._socket()

    def _socket(self) -> socket.socket:
        """A connected socket: the kept-alive one unless the relay has closed it."""
        if self.alive():
            assert self.conn is not None
            return self.conn.sock  # type: ignore[no-any-return]
        self.close()
        return self._connect()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def post(self, token: str, secret: str, body: bytes | _VerifiedReader,
             extra: list[tuple[str, str]] | None = None) -> tuple[int, str]:
        """POST BODY to the relay's /_upload/TOKEN; returns (status, answer text). EXTRA:
        more request headers (`Kbfs-Proof`), values this share made (no line breaks).

        Raises OSError / http.client.HTTPException when the connection fails, and
        whatever the body's reader raises (Refused: a block no longer matches), after
        closing the connection so the relay sees a short body, never a wrong one.
        """
        sock = self._socket()
        head = (f"POST {self.prefix}{protocol.UPLOAD_PATH.format(token=token)} HTTP/1.1\r\n"
                f"Host: {self.host_header}\r\n"
                f"{protocol.UPLOAD_SECRET_HEADER}: {secret}\r\n"
                + "".join(f"{name}: {value}\r\n" for name, value in extra or ())
                + "Content-Type: application/octet-stream\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("ascii")
        try:
            if isinstance(body, bytes):
                self._send(sock, head, body)
            else:
                first = body.next_chunk()
                self._send(sock, head, first if first is not None else b"")
                while (chunk := body.next_chunk()) is not None:
                    sock.sendall(chunk)
            status, text, keep = _read_answer(sock)
        except BaseException:
            self.close()
            raise
        if not keep:
            self.close()
        return status, text

    def _send(self, sock: socket.socket, head: bytes, chunk: bytes | memoryview) -> None:
        if self.https:  # TLS sockets have no sendmsg
            if len(chunk) <= _SMALL_BODY:
                sock.sendall(head + bytes(chunk))
            else:
                sock.sendall(head)
                sock.sendall(chunk)
            return
        views = [memoryview(head), memoryview(chunk).cast("B")]
        while views:
            sent = sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]


# ---------------------------------------------------------------- the share


class _BytesLRU:
    """A thread-safe LRU of byte strings bounded by their total length (it keeps at least
    the newest entry, however long)."""

    def __init__(self, limit: int) -> None:
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._bytes = 0
        self._limit = limit
        self._lock = threading.Lock()

    def get(self, key: Any) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: bytes) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = value
            self._bytes += len(value)
            while self._bytes > self._limit and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)


@dataclass
class ShareOptions:
    """What `kbfs share` was asked to do."""

    root_dir: str
    relays: list[str] = field(default_factory=list)
    name: str = ""
    listen: tuple[str, int] | None = None
    public_url: str = ""  # how others reach the --listen server, when not its bind address
    state_dir: str = ""
    private: bool = False
    rescan_interval: float = 30.0
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns, besides the defaults


class Share:
    """A running share. Construct, then `await run()` inside trio."""

    def __init__(self, options: ShareOptions, report: Callable[[str], None] | None = None,
                 scan_progress: Callable[[int], None] | None = None,
                 scan_total: Callable[[int], None] | None = None) -> None:
        self.options = options
        self.root_dir = os.path.realpath(options.root_dir)
        if not os.path.isdir(self.root_dir):
            raise NotFound(f"{options.root_dir}: not a folder")
        self.relays = [_relay_url(r) for r in options.relays]  # bad URLs: before any state
        self.state_dir = os.path.realpath(options.state_dir
                                          or find_state_dir(self.root_dir).path)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        # A new key is a new id: every kbfs:// link to an older one breaks (the CLI says so).
        self.new_key = not os.path.exists(os.path.join(self.state_dir, KEY_FILE))
        self.key = load_key(self.state_dir)
        self.public_key = public_key_bytes(self.key)
        self.id = protocol.share_id_from_public_key(self.public_key)
        # What `find_state_dir` and `kbfs share token` look for next time.
        write_share_info(self.state_dir, folder=self.root_dir, id=self.id, relays=self.relays)
        self.backoff_max = _backoff_max()
        if options.name:
            try:
                self.name = protocol.check_share_name(options.name)
            except BadRequest as exc:
                raise ConfigError(f"--name: {exc}") from None
        else:
            self.name = protocol.clean_share_name(os.path.basename(self.root_dir)) or self.id
        if options.public_url:
            try:
                protocol.check_listen_url(options.public_url)
            except BadRequest as exc:
                raise ConfigError(f"--public-url: {exc}") from None
        self.token_secret = _token_secret(self.state_dir)
        self._revoked_key: tuple[int, int, int] | None = None  # (inode, size, mtime_ns)
        self._revoked: frozenset[str] = frozenset()
        self._revoked_lock = threading.Lock()
        self._relay_sockets: set[trio_websocket.WebSocketConnection] = set()
        self._refusals: dict[str, str] = {}  # relay -> the refusal last reported
        self._linked: set[str] = set()  # relays whose `kbfs share link` line was printed
        # `get`s the relay no longer waits for (another share answered first): skipped
        # by a worker that has not started them yet. Bounded; order of arrival.
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self.index = ShareIndex(self.root_dir, self.state_dir, exclude=options.exclude)
        self.report = report or (lambda line: log.info("%s", line))
        self.scan_progress = scan_progress
        self.scan_total = scan_total
        self.listen_url = ""
        self.scanning = True
        self.snapshot: dict[str, list[Any]] = {}
        self._changed = trio.Event()
        self._rescan = trio.Event()
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._pool_lock = threading.Lock()
        self._workers = self._idle = self._queued = 0  # upload threads; requests waiting
        self._pools: dict[str, UploadPool[_Uploader]] = {
            relay: UploadPool(partial(_Uploader, relay), MAX_UPLOADS, POOL_IDLE, spare=POOL_SPARE)
            for relay in self.relays}
        # Per file version: its 1 MiB leaves, and its 64 KiB tree's levels >= GROUP_LEVEL
        # (built from the index's level-4 nodes), each checked against the indexed root once.
        self._leaves = _BytesLRU(LEAVES_CACHE_BYTES)
        self._outboards = _BytesLRU(OUTBOARD_CACHE_BYTES)
        self._token: trio.lowlevel.TrioToken | None = None
        self.stats = {"uploads": 0, "refused": 0, "failed": 0, "bytes": 0, "proofs": 0}

    # ------------------------------------------------------------ main

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Index, serve and stay connected until cancelled."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                if self.options.listen is not None:
                    host, port = self.options.listen
                    bound = await nursery.start(self._serve_direct, host, port)
                    self.listen_url = (self.options.public_url or bound).rstrip("/")
                    self.report(f"kbfs share listening on {self.listen_url}")
                nursery.start_soon(self._scanner)
                if self.options.private:
                    nursery.start_soon(self._watch_revocations)
                for relay in self.relays:
                    nursery.start_soon(self._relay_loop, relay)
                task_status.started()
        finally:
            with self._pool_lock:
                workers = self._workers
            for _ in range(workers):
                self._jobs.put(None)
            for pool in self._pools.values():
                pool.close()
            self.index.close()

    # ------------------------------------------------------------ index and catalogue

    def request_rescan(self) -> None:
        """Ask for a rescan soon (thread-safe)."""
        if self._token is None:
            return
        try:
            trio.from_thread.run_sync(self._rescan.set, trio_token=self._token)
        except RuntimeError:  # called from the trio thread itself
            self._rescan.set()
        except trio.RunFinishedError:
            pass

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _scanner(self) -> None:
        first = True
        while True:
            self.scanning = True
            self._notify()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._refresh_while_scanning)
                try:
                    stats = await trio.to_thread.run_sync(
                        partial(self.index.scan, self.scan_progress if first else None,
                                self.scan_total if first else None),
                        abandon_on_cancel=True)
                except (KbfsError, OSError) as exc:
                    log.warning("scan of %s failed: %s", self.root_dir, exc)
                    stats = None
                nursery.cancel_scope.cancel()
            self.scanning = False
            await self._refresh_catalogue()
            if first or (stats and (stats.added or stats.updated or stats.removed)):
                files, nbytes = self.index.totals()
                self.report(f"kbfs share indexed {files} files, {nbytes} bytes"
                            + (f" ({stats.added} added, {stats.updated} updated, "
                               f"{stats.removed} removed)" if stats else ""))
            first = False
            self._notify()
            with trio.move_on_after(self.options.rescan_interval):
                await self._rescan.wait()
            self._rescan = trio.Event()

    async def _refresh_while_scanning(self) -> None:
        while True:
            started = trio.current_time()
            await self._refresh_catalogue()
            # Walking a large index costs time; never spend more than a fifth of it there.
            await trio.sleep(max(SCAN_REFRESH, 4 * (trio.current_time() - started)))

    async def _refresh_catalogue(self) -> None:
        snap = await trio.to_thread.run_sync(self._walk_index, abandon_on_cancel=True)
        if snap != self.snapshot:
            self.snapshot = snap
            self._notify()

    def _servable(self, relpath: str) -> str | None:
        """The real path of RELPATH if this share may serve it, else None."""
        try:
            if protocol.safe_relpath(relpath) != relpath or not relpath:
                return None
        except BadRequest:
            return None
        real = os.path.realpath(os.path.join(self.root_dir, *relpath.split("/")))
        if not real.startswith(self.root_dir + os.sep):
            return None
        if real == self.state_dir or real.startswith(self.state_dir + os.sep):
            return None
        # The index excludes these already; checked again here, on both names, so that a
        # row indexed under other rules (an older --exclude) is never served.
        if self.index.excluded(relpath) or self.index.excluded(real[len(self.root_dir) + 1:]
                                                               .replace(os.sep, "/")):
            return None
        return real

    def _walk_index(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        stack = [""]
        while stack:
            folder = stack.pop()
            dirs, files = self.index.list_dir(folder)
            for f in files:
                if self._servable(f.path) is not None:
                    # root64 last: a relay without FEATURE_ROOT64 gets the first six.
                    out[f.path] = [f.path, f.sha1, f.size, f.mtime_ns / 1e9, f.fcs, f.root,
                                   f.root64 or None]
            stack.extend(f"{folder}/{d}" if folder else d for d in dirs)
        return out

    def _leaves_of(self, f: IndexedFile) -> bytes:
        key = (f.sha1, f.mtime_ns, f.inode)
        blob = self._leaves.get(key)
        if blob is not None:
            return blob
        blob = self.index.leaves(f.sha1)
        try:  # once per file (then cached): the leaves must hash up to the indexed root
            tree.verify_leaves(tree.split_leaves(blob), f.size, f.root)
        except VerificationError:
            raise Refused(409, f"{f.path}: the index holds leaves that do not match its root"
                          ) from None
        self._leaves.put(key, blob)
        return blob

    def _outboard_of(self, f: IndexedFile) -> bytes | None:
        """F's 64 KiB tree from level 4 up (proof.outboard layout), or None when its index
        row has no 64 KiB tree yet (an older index, not yet rescanned): no proof then."""
        key = (f.sha1, f.mtime_ns, f.inode)
        ob = self._outboards.get(key)
        if ob is not None:
            return ob
        stored = self.index.pieces(f.sha1)
        if stored is None:
            return None
        groups, root64 = stored
        shape = proof.Shape(f.size, proof.PIECE_SIZE)
        try:  # once per file (then cached): the nodes must hash up to the indexed root
            levels = proof.levels_from(tree.split_leaves(groups), shape, proof.GROUP_LEVEL)
            if proof.root_of(shape, levels[-1][0]) != root64:
                raise VerificationError("root")
        except VerificationError:
            raise Refused(409, f"{f.path}: the index holds 64 KiB tree nodes that do not "
                          "match its root") from None
        ob = b"".join(b"".join(level) for level in levels)
        self._outboards.put(key, ob)
        return ob

    def piece_proof(self, f: IndexedFile, real: str, want: protocol.WantProof | None,
                    start: int, end: int) -> str | None:
        """The Kbfs-Proof value for bytes [start, end) of F, or None: not asked, a block
        size other than 64 KiB, a range that is not exactly whole pieces, or no 64 KiB tree
        in the index for F yet. Refused (409, and a rescan) when a group read for the proof
        no longer matches its stored node: a changed file gets no proof, as it gets no bytes.

        `want.below` that names a node of this tree covering the pieces gives the shorter
        proof below it; any other `below` is ignored (the full proof: readers tell the two
        apart by length)."""
        if want is None or want.block_size != proof.PIECE_SIZE:
            return None
        pieces = protocol.aligned_pieces(start, end, f.size, proof.PIECE_SIZE)
        ob = self._outboard_of(f) if pieces is not None else None
        if pieces is None or ob is None:
            return None
        a, b = pieces
        shape = proof.Shape(f.size, proof.PIECE_SIZE)
        anchor = want.below
        if anchor is not None:
            try:
                lo, hi = shape.span(*anchor)
            except ValueError:
                lo, hi = 0, -1
            if not (lo <= a and b <= hi):
                anchor = None
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(real, flags)
        except OSError as exc:
            self.request_rescan()
            raise Refused(404, f"{f.path}: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) != f.stat_key():
                raise Refused(409, f"{f.path} changed since it was indexed")

            def read_group(g: int) -> bytes:
                lo, hi = shape.byte_span(*shape.span(proof.GROUP_LEVEL, g))
                data = os.pread(fd, hi - lo, lo)
                while len(data) < hi - lo:
                    more = os.pread(fd, hi - lo - len(data), lo + len(data))
                    if not more:
                        break
                    data += more
                return data

            get = proof.group_getter(shape, proof.GROUP_LEVEL,
                                     proof.outboard_getter(ob, shape, proof.GROUP_LEVEL),
                                     read_group)
            nodes = proof.make_proof(get, shape, a, b, anchor)
        except VerificationError:
            self.request_rescan()
            raise Refused(409, f"{f.path}: a 1 MiB group no longer matches the index") from None
        except Refused:
            self.request_rescan()
            raise
        except OSError as exc:
            self.request_rescan()
            raise Refused(404, f"{f.path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        self.stats["proofs"] += 1
        return protocol.proof_value(a, b, proof.PIECE_SIZE, nodes)

    def resolve(self, sha1: str | None, path: str | None) -> tuple[IndexedFile, str]:
        """The indexed file (and its real path) for a request by sha1 or by path.

        Refuses (404) anything not in the index, outside the folder, excluded or in the
        state folder; refuses (409) and asks for a rescan when the file changed."""
        if path:
            try:
                clean = protocol.safe_relpath(path)
            except BadRequest as exc:
                raise Refused(400, str(exc)) from None
            f = self.index.lookup_path(clean)
            if f is None or (sha1 and f.sha1 != sha1):
                f = self.index.lookup_sha1(sha1) if sha1 else None
        elif sha1:
            f = self.index.lookup_sha1(sha1)
        else:
            raise Refused(400, "a request needs a sha1 or a path")
        if f is None:
            raise Refused(404, f"not in this share: {sha1 or path}")
        real = self._servable(f.path)
        if real is None:
            raise Refused(404, f"not servable: {f.path}")
        if not self.index.is_current(f):
            self.request_rescan()
            raise Refused(409, f"{f.path} changed since it was indexed; rescanning")
        return f, real

    def open_range(self, f: IndexedFile, real: str, start: int, end: int) -> _VerifiedReader:
        """A verified reader of bytes [start, end) of F (first block already checked)."""
        if not 0 <= start <= end <= f.size:
            raise Refused(416, f"range {start}-{end} outside {f.size} bytes")
        try:
            return _VerifiedReader(real, f, self._leaves_of(f), start, end)
        except Refused:
            self.request_rescan()
            raise
        except OSError as exc:
            self.request_rescan()
            raise Refused(404, f"{f.path}: {exc.strerror or exc}") from None

    def authorized(self, authorization: str | None) -> bool:
        """May a request carrying this Authorization header read this share?"""
        if not self.options.private:
            return True
        return check_token(self.token_secret, self.id, authorization, self.revoked())

    def revoked(self) -> frozenset[str]:
        """The ids of revoked tokens, re-read whenever the file changed (one stat per
        check: `kbfs share token --revoke` takes effect on the next request)."""
        path = os.path.join(self.state_dir, REVOKED_FILE)
        try:
            st = os.stat(path)
            key: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            key = None
        with self._revoked_lock:
            if key != self._revoked_key:
                self._revoked = read_revoked(self.state_dir)
                self._revoked_key = key
            return self._revoked

    async def _watch_revocations(self) -> None:
        """Tell every relay to forget its cached answers when a token is revoked."""
        known = self.revoked()
        while True:
            await trio.sleep(REVOCATION_POLL)
            now = self.revoked()
            if now == known:
                continue
            known = now
            for ws in list(self._relay_sockets):
                try:
                    await ws.send_message(json.dumps({"type": "auth_reset"}))
                except trio_websocket.ConnectionClosed:
                    pass

    # ------------------------------------------------------------ relay connection

    async def _relay_loop(self, relay: str) -> None:
        """Stay connected to RELAY for ever: reconnect after `reconnect_delays`; say once
        per outage that it is unreachable and why, and once when it is connected again."""
        delays = reconnect_delays(self.backoff_max)
        reported = False  # this outage was reported
        while True:
            admitted = [False]
            reason = ""
            try:
                await self._connect_once(relay, admitted)
            except Exception as exc:  # any failure: back off, try again for ever
                reason = _failure_reason(exc)
                for leaf in _leaf_exceptions(exc):
                    if not isinstance(leaf, _CONNECTION_FAILED):
                        log.warning("relay %s: %s: %s", relay, type(leaf).__name__, leaf)
            if admitted[0]:
                self.report(f"kbfs share lost relay {relay}; reconnecting")
                delays = reconnect_delays(self.backoff_max)
                reported = False
            elif reason and not reported:
                self.report(f"kbfs share: relay {relay} unreachable ({reason}); "
                            f"retrying every {self.backoff_max:g} s at most")
                reported = True
            elif reason:
                log.debug("relay %s: %s", relay, reason)
            await trio.sleep(next(delays))

    async def _connect_once(self, relay: str, admitted: list[bool]) -> None:
        """One connection to RELAY, until it ends; ADMITTED[0] is set once welcomed."""
        url = protocol.websocket_url(relay)
        async with proxyconf.open_websocket(  # wss verified; HTTPS_PROXY/NO_PROXY honoured
            url, max_message_size=MAX_CONTROL_MESSAGE, connect_timeout=HANDSHAKE_TIMEOUT,
            disconnect_timeout=2,
        ) as ws:
            challenge_msg = await self._receive(ws, HANDSHAKE_TIMEOUT)
            if challenge_msg.get("type") != "challenge":
                raise BadRequest("relay did not send a challenge")
            challenge = base64.b64decode(str(challenge_msg.get("challenge", "")))
            if len(challenge) < 16:
                raise BadRequest("relay challenge too short")
            host = protocol.websocket_host_header(relay)
            signature = self.key.sign(protocol.handshake_payload(challenge, host, self.public_key))
            await ws.send_message(json.dumps({
                "type": "hello", "version": protocol.CONTROL_VERSION, "id": self.id,
                "public_key": base64.b64encode(self.public_key).decode(),
                "signature": base64.b64encode(signature).decode(), "host": host,
                "name": self.name, "private": self.options.private,
                "listen_url": self.listen_url,
            }))
            welcome = await self._receive(ws, HANDSHAKE_TIMEOUT)
            if welcome.get("type") == "refused":
                why = str(welcome.get("message"))[:500].encode("unicode_escape").decode("ascii")
                if self._refusals.get(relay) != why:  # once, not on every retry
                    self._refusals[relay] = why
                    self.report(f"kbfs share refused by {relay}: {why}")
                return
            if welcome.get("type") != "welcome" or welcome.get("id") != self.id:
                raise BadRequest("relay did not welcome this share")
            secret = str(welcome.get("upload_secret", ""))
            features = welcome.get("features")
            root64 = isinstance(features, list) and protocol.FEATURE_ROOT64 in features
            self._refusals.pop(relay, None)
            admitted[0] = True
            listing = protocol.share_url_path(protocol.SHARE_LIST_PATH, share=self.id, path="")
            self.report(f"kbfs share connected to {relay}; browse {relay}{listing}")
            if relay not in self._linked:  # the line to hand out, once per relay
                self._linked.add(relay)
                self.report(f"kbfs share link {protocol.kbfs_url(relay, self.id)}  (give this "
                            "to readers" + ("; they also need a token from `kbfs share token "
                                            f"{self.root_dir}`)" if self.options.private
                                            else ")"))
            last_pong = [trio.current_time()]
            self._relay_sockets.add(ws)
            try:
                await self._serve_relay(ws, relay, secret, last_pong, root64)
            finally:
                self._relay_sockets.discard(ws)
                self._pools[relay].close_idle()  # the relay may be gone: its sockets with it

    async def _serve_relay(self, ws: trio_websocket.WebSocketConnection, relay: str,
                           secret: str, last_pong: list[float], root64: bool = False) -> None:
        """Answer one admitted relay connection's messages until it ends (ROOT64: the
        relay takes catalogue entries with the 64 KiB tree's root)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sync_catalogue, ws, root64)
            nursery.start_soon(self._heartbeat, ws, last_pong)
            nursery.start_soon(self._keep_warm, relay)
            while True:
                msg = await self._receive(ws, None)
                kind = msg.get("type")
                if kind == "pong":
                    last_pong[0] = trio.current_time()
                elif kind == "get":
                    self._dispatch(ws, relay, secret, msg)
                elif kind == "cancel" and isinstance(msg.get("id"), str):
                    self._cancelled[msg["id"][:200]] = None
                    while len(self._cancelled) > 4096:
                        self._cancelled.popitem(last=False)
                elif kind == "auth":
                    ok = self.authorized(msg.get("auth") if isinstance(msg.get("auth"), str)
                                         else None)
                    await ws.send_message(json.dumps(
                        {"type": "auth_result", "id": msg.get("id"), "ok": ok}))

    async def _receive(self, ws: trio_websocket.WebSocketConnection,
                       timeout: float | None) -> dict[str, Any]:
        with trio.fail_after(timeout if timeout is not None else float("inf")):
            text = await ws.get_message()
        try:
            msg = json.loads(text)
        except ValueError:
            raise BadRequest("relay sent a message that is not JSON") from None
        if not isinstance(msg, dict):
            raise BadRequest("relay sent a message that is not an object")
        return msg

    async def _heartbeat(self, ws: trio_websocket.WebSocketConnection,
                         last_pong: list[float]) -> None:
        while True:
            await ws.send_message(json.dumps({"type": "ping", "t": time.time()}))
            await trio.sleep(PING_INTERVAL)
            if trio.current_time() - last_pong[0] > PONG_TIMEOUT:
                raise trio.TooSlowError("relay stopped answering pings")

    async def _sync_catalogue(self, ws: trio_websocket.WebSocketConnection,
                              root64: bool = False) -> None:
        """Send the catalogue, then its changes; entries of 7 fields when ROOT64, else the
        first 6 (what a relay before 64 KiB pointers takes)."""
        sent: dict[str, list[Any]] = {}
        reset = True
        sent_scanning: bool | None = None
        while True:
            changed = self._changed
            snap, scanning = self.snapshot, self.scanning
            if reset or snap is not sent or scanning != sent_scanning:
                add = [v if root64 else v[:6] for k, v in snap.items() if sent.get(k) != v]
                remove = [k for k in sent if k not in snap]
                batches = [add[i:i + CATALOGUE_BATCH] for i in range(0, len(add), CATALOGUE_BATCH)]
                batches = batches or [[]]
                for i, batch in enumerate(batches):
                    msg: dict[str, Any] = {"type": "files", "add": batch}
                    if i == 0:
                        msg["reset"] = reset
                        msg["remove"] = [] if reset else remove
                    if i == len(batches) - 1:
                        msg["scanning"] = scanning
                    await ws.send_message(json.dumps(msg, separators=(",", ":")))
                sent, reset, sent_scanning = snap, False, scanning
            await changed.wait()

    def _dispatch(self, ws: trio_websocket.WebSocketConnection, relay: str, secret: str,
                  msg: dict[str, Any]) -> None:
        """Hand one `get` to the upload workers (trio thread; never blocks).

        A plain queue feeding up to MAX_UPLOADS long-lived threads rather than
        `trio.to_thread` per request: the upload is fire-and-forget (its answer goes to
        the relay, not back to trio), so the hop back into the event loop when a thread
        finishes, and the per-call thread-cache bookkeeping, were pure overhead on every
        request. Only a refusal comes back into trio (to send `reject`).
        """
        token = msg.get("id")
        if not isinstance(token, str) or not token or len(token) > 200:
            return
        with self._pool_lock:
            self._queued += 1
            spawn = self._queued > self._idle and self._workers < MAX_UPLOADS
            if spawn:
                self._workers += 1
                self._idle += 1
        self._jobs.put((ws, relay, secret, msg))
        if spawn:
            threading.Thread(target=self._worker, name="kbfs-upload", daemon=True).start()

    def _worker(self) -> None:
        """An upload thread: serves queued requests; retires after WORKER_IDLE s idle (its
        uploads' connections are the relay's pool's, kbfs.uploadpool: they stay open)."""
        while True:
            try:
                job = self._jobs.get(timeout=WORKER_IDLE)
            except queue.Empty:
                with self._pool_lock:
                    if self._queued >= self._idle:
                        continue  # a job is on its way to an idle worker: maybe us
                    self._idle -= 1
                    self._workers -= 1
                return
            if job is None:
                with self._pool_lock:
                    self._idle -= 1
                    self._workers -= 1
                return
            with self._pool_lock:
                self._queued -= 1
                self._idle -= 1
            try:
                self._serve_job(*job)
            finally:
                with self._pool_lock:
                    self._idle += 1

    def _serve_job(self, ws: trio_websocket.WebSocketConnection, relay: str, secret: str,
                   msg: dict[str, Any]) -> None:
        token = msg["id"]
        if ws.closed is not None:
            return  # that relay connection is gone: the relay has answered the client
        if token in self._cancelled:
            return  # another share answered first: the relay would refuse the upload
        try:
            self._upload(relay, secret, msg)
            return
        except Refused as exc:
            status, message = exc.status, str(exc)
            self.stats["refused"] += 1
        except Exception as exc:  # never let one request take the worker down
            status, message = 500, f"{type(exc).__name__}: {exc}"
            self.stats["failed"] += 1
        log.info("request %s refused: %s %s", token[:8], status, message)
        text = json.dumps({"type": "reject", "id": token, "status": status, "message": message})

        async def send_reject() -> None:
            try:
                await ws.send_message(text)
            except trio_websocket.ConnectionClosed:
                pass

        if self._token is not None:
            try:
                trio.from_thread.run(send_reject, trio_token=self._token)
            except trio.RunFinishedError:
                pass

    def _upload(self, relay: str, secret: str, msg: dict[str, Any]) -> None:
        """Serve one relay request: POST the verified body to the relay (worker thread)."""
        if not self.authorized(msg.get("auth") if isinstance(msg.get("auth"), str) else None):
            raise Refused(401 if not msg.get("auth") else 403, f"share {self.id} is private: "
                          "a valid bearer token is needed")
        sha1 = msg.get("sha1")
        path = msg.get("path")
        if sha1 is not None and (not isinstance(sha1, str) or not protocol.SHA1_RE.match(sha1)):
            raise Refused(400, "malformed sha1")
        if path is not None and not isinstance(path, str):
            raise Refused(400, "malformed path")
        token = msg["id"]
        if not _URLSAFE_RE.match(token) or not _URLSAFE_RE.match(secret):
            # Both go into the request head verbatim: nothing that could break out of it.
            raise Refused(400, "malformed upload id or secret")
        f, real = self.resolve(sha1, path)
        if msg.get("kind") == "tree":
            blob = self._leaves_of(f)
            self._post(relay, token, secret, lambda: blob)
            return
        start, end = msg.get("start"), msg.get("end")
        if not isinstance(start, int) or not isinstance(end, int):
            raise Refused(400, "malformed range")
        want = msg.get("want_proof")
        value = self.piece_proof(f, real, protocol.parse_want_proof(
            want if isinstance(want, str) else None), start, end)
        extra = [(protocol.PROOF_HEADER, value)] if value is not None else []
        self._post(relay, token, secret, lambda: self.open_range(f, real, start, end), extra)

    def _post(self, relay: str, token: str, secret: str,
              make_body: Callable[[], bytes | _VerifiedReader],
              extra: list[tuple[str, str]] | None = None) -> None:
        pool = self._pools[relay]
        uploader = pool.take()
        for attempt in (1, 2):
            body = make_body()
            try:
                status, text = uploader.post(token, secret, body, extra)
            except Refused:
                self.request_rescan()  # a block changed under an upload already running
                raise
            except (OSError, http.client.HTTPException) as exc:
                # A keep-alive connection the relay had just closed fails before the relay
                # sees anything: one retry, on a new connection. If the relay had taken the
                # id, it says 404.
                if attempt == 2:
                    self.stats["failed"] += 1
                    log.info("upload to %s failed: %s: %s", relay, type(exc).__name__, exc)
                    return
                uploader = pool.fresh()
                continue
            finally:
                if isinstance(body, _VerifiedReader):
                    body.close()
            pool.give(uploader)  # closed by post() when the relay may not keep it: dropped
            if status == 204:
                self.stats["uploads"] += 1
                self.stats["bytes"] += len(body)
            elif status != 404 or attempt == 1:
                log.info("relay answered upload with %s: %s", status, text[:200])
            return

    async def _keep_warm(self, relay: str) -> None:
        """Keep one upload connection to RELAY open ahead of the next request: its first
        byte then costs no handshake (kbfs.uploadpool)."""
        pool = self._pools[relay]
        while True:
            try:
                await trio.to_thread.run_sync(pool.warm, abandon_on_cancel=True)
            except (OSError, http.client.HTTPException) as exc:
                log.debug("upload connection to %s: %s: %s", relay, type(exc).__name__, exc)
            await trio.sleep(POOL_CHECK)

    # ------------------------------------------------------------ direct --listen server

    async def _serve_direct(self, host: str, port: int,
                            task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        router = Router(routes=[
            Route(protocol.HEALTH_PATH, Endpoint(self._direct_health), methods=["GET", "HEAD"]),
            Route("/sha1/{sha1}", Endpoint(self._direct_sha1), methods=["GET", "HEAD"]),
            Route("/tree/{sha1}", Endpoint(self._direct_tree), methods=["GET", "HEAD"]),
        ])

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            # A file changed since it was indexed: this content is not here any more.
            await httpserve.guarded(router, scope, receive, send, remap={409: 404})

        config = httpserve.hypercorn_config(host, port)
        await httpserve.serve(app, config, host, port, task_status=task_status)

    def _direct_cache_control(self, scope: Scope) -> bytes:
        """As the relay's rule: immutable for anyone, except a private share's answer or
        one to a request with a token, which no shared cache in front of --listen may
        keep (it would hand the bytes to the next reader without the token)."""
        if self.options.private or header(scope, b"authorization") is not None:
            return b"private, no-store"
        return protocol.CACHE_CONTROL_IMMUTABLE.encode()

    def _direct_lookup(self, scope: Scope) -> tuple[IndexedFile, str]:
        sha1 = protocol.check_sha1(scope["path_params"]["sha1"])
        if not self.authorized(header(scope, b"authorization")):
            raise Refused(401, f"share {self.id} is private: send Authorization: Bearer TOKEN")
        return self.resolve(sha1, None)

    async def _direct_health(self, scope: Scope, receive: Receive, send: Send) -> None:
        files, nbytes = self.index.totals()
        await send_json(send, 200, {"ok": True, "share": self.id, "files": files, "bytes": nbytes,
                                     "scanning": self.scanning, **self.stats})

    async def _direct_tree(self, scope: Scope, receive: Receive, send: Send) -> None:
        f, _ = await trio.to_thread.run_sync(self._direct_lookup, scope)
        blob = await trio.to_thread.run_sync(self._leaves_of, f)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(len(blob)).encode()),
            (b"etag", f'"{f.sha1}-tree"'.encode()),
            (b"cache-control", self._direct_cache_control(scope))]})
        await send({"type": "http.response.body", "body": blob})

    def _direct_open(self, scope: Scope) -> tuple[IndexedFile, int, _VerifiedReader | None,
                                                  list[tuple[bytes, bytes]]]:
        """Look up, resolve the range and open a verified reader, in one worker-thread hop."""
        f, real = self._direct_lookup(scope)
        etag = f'"{f.sha1}"'
        headers = [(b"content-type", b"application/octet-stream"), (b"accept-ranges", b"bytes"),
                   (b"etag", etag.encode()),
                   (b"cache-control", self._direct_cache_control(scope))]
        inm = header(scope, b"if-none-match")
        if inm is not None and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
            return f, 304, None, headers
        range_header = header(scope, b"range")
        if_range = header(scope, b"if-range")
        if if_range is not None and if_range.strip() != etag:
            range_header = None
        rng = protocol.parse_range(range_header, f.size)
        status, (start, end) = (200, (0, f.size)) if rng is None else (206, rng)
        if rng is not None:
            headers.append((b"content-range", protocol.content_range(start, end, f.size).encode()))
        headers.append((b"content-length", str(end - start).encode()))
        if scope["method"] == "HEAD" or start == end:
            return f, status, None, headers
        if rng is not None:
            value = self.piece_proof(f, real, protocol.parse_want_proof(
                header(scope, b"kbfs-want-proof")), start, end)
            if value is not None:
                headers.append((b"kbfs-proof", value.encode("ascii")))
        return f, status, self.open_range(f, real, start, end), headers

    async def _direct_sha1(self, scope: Scope, receive: Receive, send: Send) -> None:
        f, status, reader, headers = await trio.to_thread.run_sync(self._direct_open, scope)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if reader is None:
            await send({"type": "http.response.body", "body": b""})
            return
        try:
            async with trio.open_nursery() as nursery:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_disconnect)
                await self._direct_body(f, reader, send)
                nursery.cancel_scope.cancel()
        finally:
            reader.close()

    async def _direct_body(self, f: IndexedFile, reader: _VerifiedReader, send: Send) -> None:
        sent = 0
        while sent < len(reader):
            try:
                # The first chunk was read and checked when the reader was opened.
                if reader.first is not None:
                    chunk = reader.next_chunk()
                else:
                    chunk = await trio.to_thread.run_sync(reader.next_chunk,
                                                          abandon_on_cancel=False)
            except (Refused, OSError) as exc:
                log.warning("direct transfer of %s cut short: %s", f.path, exc)
                self.request_rescan()
                return  # hypercorn closes the connection: the client sees a short body
            if chunk is None:
                return
            sent += len(chunk)
            await send({"type": "http.response.body", "body": chunk,
                        "more_body": sent < len(reader)})


