"""The relay: a public HTTP front for shares that sit behind firewalls.

A share connects out to the relay over one websocket (`/_control`), proves who it is
by signing a fresh challenge with its Ed25519 key, and sends its file catalogue. The
relay answers HTTP clients (`/sha1/`, `/tree/`, `/s/{share}/...`, `/api/...`) from that
catalogue; for content it sends the share a small control message with a one-time
unguessable id, and the share POSTs the body to `/_upload/{id}`. The relay pipes that
POST body into the waiting client response, so memory per transfer is bounded and a
slow client slows only its own share upload: when both connections are plain HTTP/1.1
over TCP (Linux), in the kernel (`httpserve.BodySplice`: socket -> pipe -> socket, the
bytes never enter Python); otherwise chunk by chunk through hypercorn's small receive
queue.

Trust: a share is admitted only with a signature for one of this relay's own hosts
(`--public-url`, else its listening address), so admissions cannot be relayed by a rogue
relay. A reader's bearer token is sent to the one share it names and to no other; a
private share's content, files, listing and very presence are answered only to requests
it accepted (the same 404 as for absent content on /sha1/ and /tree/). A request is sent
to the shares holding the content in turn, hedged after HEDGE_DELAY, first to start wins.
Everything shares send that is logged is escaped.

Verified pieces: a reader's `Kbfs-Want-Proof` (parsed, passed on in canonical form in the
`get`) and the share's `Kbfs-Proof` (an upload request header, checked for its shape and
the pieces and block size asked, then rewritten from its parsed parts into the answer's
head, never copied raw) pass through; the relay makes and checks no proof itself: the
reader checks it against its pointer's root.

File bytes never travel over the websocket. This module must not import `share`,
`fetch` or `cache`; it never reads shared files itself. See docs/protocol.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from starlette.routing import Route, Router, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from kbfs import httpserve, protocol, proxyfix, prv, tree, webui
from kbfs.errors import BadRequest, ConfigError, NotFound
from kbfs.httpserve import Endpoint, HttpError, Receive, Scope, Send, header, send_json

log = logging.getLogger(__name__)


HANDSHAKE_TIMEOUT = 10.0  # a share must answer the challenge within this
START_TIMEOUT = 10.0  # a share must start its upload POST (or refuse) within this
# A share that has not started its upload (nor refused) this long after it was asked: the
# next share holding the content is asked too; the first to start wins.
HEDGE_DELAY = 1.5
STALL_TIMEOUT = 60.0  # no byte moving in a transfer for this long ends it
IDLE_TIMEOUT = 45.0  # a share silent for this long (it pings every 10 s) is dropped
AUTH_TIMEOUT = 10.0
AUTH_CACHE_SECONDS = 60.0  # at most; never past the token's own expiry
OUTBOX_SLOTS = 1024  # control messages queued for one share
MAX_CONTROL_MESSAGE = 4 << 20
MAX_AUTH_HEADER = 4096



class FileEntry(NamedTuple):
    """One file of a share's catalogue, as the share reported it."""

    path: str
    sha1: str
    size: int
    mtime: float
    fcs: str
    root: str
    root64: str = ""  # the 64 KiB tree's root ("": a share before it; listed with 1 MiB)


_ROOT64_RE = re.compile(r"[0-9a-f]{64}\Z")


def parse_entry(item: Any) -> FileEntry:
    """Validate one catalogue entry `[path, sha1, size, mtime, fcs, root(, root64)]` from a
    share; root64 (protocol.FEATURE_ROOT64) is 64 lowercase hex digits or null."""
    if not isinstance(item, list) or len(item) not in (6, 7):
        raise BadRequest("catalogue entry must be [path, sha1, size, mtime, fcs, root, root64]")
    path, sha1, size, mtime, fcs, root = item[:6]
    root64 = item[6] if len(item) == 7 else None
    if root64 is not None and (not isinstance(root64, str) or not _ROOT64_RE.match(root64)):
        raise BadRequest("catalogue root64 must be 64 lowercase hex digits or null")
    if not isinstance(path, str) or not path or protocol.safe_relpath(path) != path:
        raise BadRequest(f"unsafe catalogue path {str(path)[:80]!r}")
    if not isinstance(sha1, str) or not protocol.SHA1_RE.match(sha1):
        raise BadRequest("catalogue sha1 must be 40 lowercase hex digits")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < protocol.MAX_LISTED_SIZE:
        raise BadRequest("catalogue size must be a non-negative integer below 2^62")
    if isinstance(mtime, bool) or not isinstance(mtime, int | float):
        raise BadRequest("catalogue mtime must be a number")
    if not isinstance(fcs, str) or not isinstance(root, str) or len(root) != 64:
        raise BadRequest("catalogue fcs/root malformed")
    return FileEntry(path, sha1, size, float(mtime), fcs, root.lower(), root64 or "")


def _loggable(value: object) -> str:
    """VALUE as one log line: anything a share or client sent may hold line breaks
    (a forged log line) or other control characters; they are escaped."""
    return str(value)[:1000].encode("unicode_escape").decode("ascii")


def _b64decode(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > 200:
        raise BadRequest(f"{what} must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64") from None


class ShareConn:
    """An admitted share: its identity, catalogue, outbox and in-flight request ids."""

    def __init__(self, share_id: str, name: str, private: bool, listen_url: str,
                 peer: str) -> None:
        self.id = share_id
        self.name = name
        self.private = private
        self.listen_url = listen_url
        self.peer = peer
        # Times this share was asked for content and had not started (nor refused) when
        # another share did, or when its time ran out; 0 again once it wins a request.
        # Shares with fewer are asked first.
        self.strikes = 0
        self.connected_since = time.time()
        self.upload_secret = secrets.token_urlsafe(32)
        self.scanning = True
        self.files: dict[str, FileEntry] = {}
        self.by_sha1: dict[str, set[str]] = {}
        self.dir_files: dict[str, set[str]] = {"": set()}
        self.dir_subdirs: dict[str, set[str]] = {"": set()}
        self.dir_count: dict[str, int] = {}
        self.total_bytes = 0
        self.pending: set[str] = set()
        self.auth_ok: dict[str, float] = {}  # sha256(Authorization) -> cached yes until
        self.auth_generation = 0  # bumped by each auth_reset: older answers are not cached
        self.auth_waiters: dict[str, list[Any]] = {}
        self.outbox_send, self.outbox_recv = trio.open_memory_channel[str](OUTBOX_SLOTS)
        self.cancel_scope = trio.CancelScope()
        self.closed = False

    def post(self, message: dict[str, Any]) -> bool:
        """Queue a control message; False when the share is gone or hopelessly behind."""
        if self.closed:
            return False
        try:
            self.outbox_send.send_nowait(json.dumps(message))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def first_path(self, sha1: str) -> str | None:
        paths = self.by_sha1.get(sha1)
        return min(paths) if paths else None

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "files": len(self.files), "bytes": self.total_bytes,
            "connected_since": self.connected_since, "private": self.private,
            "listen": bool(self.listen_url), "scanning": self.scanning,
        }


class Race:
    """The shares asked for one client request: the first whose upload arrives wins
    (`winner`); `changed` is set whenever one of them starts, refuses or goes away."""

    def __init__(self) -> None:
        self.changed = trio.Event()
        self.winner: Pending | None = None


@dataclass
class Pending:
    """One share asked for one client request, waiting for (or sending) its upload POST."""

    token: str
    share: ShareConn
    race: Race
    deadline: float  # trio time by which the share must start its upload (or refuse)
    length: int
    client_send: Send  # the waiting client's ASGI send: the upload writes straight into it
    client_scope: Scope  # the waiting client's request (its connection, for a splice)
    status: int
    headers: list[tuple[bytes, bytes]]
    start: int = 0  # the asked range's first byte
    want: protocol.WantProof | None = None  # the reader asked for a proof of its pieces
    started: trio.Event = field(default_factory=trio.Event)  # upload arrived, or refused
    # Cancelled by the upload handler when the upload is over; it cancels the client
    # request's wait for a disconnect (may happen before that wait even starts).
    over: trio.CancelScope = field(default_factory=trio.CancelScope)
    # Cancelled by the client request when its client goes away: stops a splice that is
    # waiting for the share (the ordinary path checks `client_gone` between chunks).
    stop: trio.CancelScope = field(default_factory=trio.CancelScope)
    reject: tuple[int, str] | None = None
    taken: bool = False  # its upload arrived: this one is the race's winner
    sent: int = 0
    complete: bool = False
    client_gone: bool = False

    def settle(self) -> None:
        """The share started, refused or went away: wake the request waiting for it."""
        self.started.set()
        self.race.changed.set()


_CONNECTION_ENDED = (WebSocketDisconnect, trio.TooSlowError, trio.BrokenResourceError,
                     trio.ClosedResourceError, OSError)


def _leaf_exceptions(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or EXC itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaf_exceptions(inner)]
    return [exc]


class Relay:
    """The relay's state and its ASGI application (`Relay.app`)."""

    def __init__(self, allow_shares_file: str | None = None, state_dir: str | None = None,
                 public_urls: list[str] | tuple[str, ...] = ()) -> None:
        self.shares: dict[str, ShareConn] = {}
        # The hosts (`host[:port]`, as a share signs them) this relay is reached by: a
        # share is admitted only with a signature for one of them, so a signature a rogue
        # relay obtained for its own host gets nobody in here. From --public-url, else the
        # address `serve` binds (see `add_identity`).
        self.identities: set[str] = set()
        for url in public_urls:
            self.add_identity(url)
        self.sha1_shares: dict[str, set[str]] = {}
        self.mirrors: list[str] = []  # `--mirror`: listed in /api/find (docs/mirrors.md)
        self.pending: dict[str, Pending] = {}
        self.allow_shares_file = allow_shares_file
        self.state_dir = state_dir
        self._allow_cache: tuple[float, frozenset[str]] | None = None
        self.started = time.time()
        # bytes_spliced: the part of bytes_out moved by the kernel (httpserve.BodySplice)
        self.stats = {"requests": 0, "bytes_out": 0, "bytes_spliced": 0, "aborted": 0,
                      "rejected_uploads": 0}
        if allow_shares_file is not None:
            self.allowed_ids()  # fail at start on a bad file
        get = ["GET", "HEAD"]
        self.router = Router(routes=[
            Route(protocol.HEALTH_PATH, Endpoint(self._health), methods=get),
            Route(protocol.SHARES_PATH, Endpoint(self._shares), methods=get),
            Route("/api/find/{sha1}", Endpoint(self._find), methods=get),
            Route("/sha1/{sha1}", Endpoint(self._sha1), methods=get),
            Route("/tree/{sha1}", Endpoint(self._tree), methods=get),
            # a browser's navigation to a listing URL gets the web page (kbfs/webui.py)
            Route("/s/{share}/list", Endpoint(webui.html_or(self._list)), methods=get),
            Route("/s/{share}/list/{path:path}", Endpoint(webui.html_or(self._list)), methods=get),
            Route("/s/{share}/file/{path:path}", Endpoint(self._file), methods=get),
            Route("/_upload/{token}", Endpoint(self._upload), methods=["POST"]),
            WebSocketRoute(protocol.CONTROL_PATH, self._control),
            *webui.routes(),
        ])

    def add_identity(self, url: str) -> None:
        """Admit shares that connect to this relay as URL (`http(s)://host[:port]`)."""
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--public-url {url[:100]!r}: expected http(s)://HOST[:PORT]")
        try:
            host = protocol.url_host(url)
        except ValueError:
            host = ""
        if not host:
            raise ConfigError(f"--public-url {url[:100]!r}: expected http(s)://HOST[:PORT]")
        self.identities.add(host)

    # ------------------------------------------------------------ ASGI entry

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI application: CORS on every answer, kbfs errors turned into statuses."""
        await httpserve.guarded(self.router, scope, receive, send)

    # ------------------------------------------------------------ allow list

    def allowed_ids(self) -> frozenset[str] | None:
        """The ids in --allow-shares (re-read when the file changes), or None for all."""
        path = self.allow_shares_file
        if path is None:
            return None
        try:
            mtime = os.stat(path).st_mtime
        except OSError as exc:
            raise ConfigError(f"--allow-shares {path}: {exc.strerror}") from None
        if self._allow_cache and self._allow_cache[0] == mtime:
            return self._allow_cache[1]
        ids = set()
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                text = line.split("#", 1)[0].strip()
                if not text:
                    continue
                if not protocol.SHARE_ID_RE.match(text):
                    raise ConfigError(f"--allow-shares {path}:{n}: {text[:80]!r} is not a share id")
                ids.add(text)
        self._allow_cache = (mtime, frozenset(ids))
        return self._allow_cache[1]

    # ------------------------------------------------------------ catalogue

    def _add_file(self, conn: ShareConn, e: FileEntry) -> None:
        if e.path in conn.files:
            self._remove_file(conn, e.path)
        conn.files[e.path] = e
        conn.total_bytes += e.size
        paths = conn.by_sha1.setdefault(e.sha1, set())
        if not paths:
            self.sha1_shares.setdefault(e.sha1, set()).add(conn.id)
        paths.add(e.path)
        parent, _, name = e.path.rpartition("/")
        conn.dir_files.setdefault(parent, set()).add(name)
        child = parent
        while child:
            conn.dir_count[child] = conn.dir_count.get(child, 0) + 1
            up, _, base = child.rpartition("/")
            conn.dir_subdirs.setdefault(up, set()).add(base)
            conn.dir_files.setdefault(child, set())
            child = up

    def _remove_file(self, conn: ShareConn, path: str) -> None:
        e = conn.files.pop(path, None)
        if e is None:
            return
        conn.total_bytes -= e.size
        paths = conn.by_sha1.get(e.sha1, set())
        paths.discard(path)
        if not paths:
            conn.by_sha1.pop(e.sha1, None)
            holders = self.sha1_shares.get(e.sha1)
            if holders is not None:
                holders.discard(conn.id)
                if not holders:
                    del self.sha1_shares[e.sha1]
        parent, _, name = path.rpartition("/")
        files = conn.dir_files.get(parent)
        if files is not None:
            files.discard(name)
        child = parent
        while child:
            left = conn.dir_count.get(child, 0) - 1
            up, _, base = child.rpartition("/")
            if left <= 0:
                conn.dir_count.pop(child, None)
                conn.dir_files.pop(child, None)
                conn.dir_subdirs.pop(child, None)
                conn.dir_subdirs.get(up, set()).discard(base)
            else:
                conn.dir_count[child] = left
            child = up

    def _drop_catalogue(self, conn: ShareConn) -> None:
        for sha1 in conn.by_sha1:
            holders = self.sha1_shares.get(sha1)
            if holders is not None:
                holders.discard(conn.id)
                if not holders:
                    del self.sha1_shares[sha1]
        conn.files.clear()
        conn.by_sha1.clear()
        conn.dir_files = {"": set()}
        conn.dir_subdirs = {"": set()}
        conn.dir_count.clear()
        conn.total_bytes = 0

    # ------------------------------------------------------------ control channel

    async def _control(self, ws: WebSocket) -> None:
        await ws.accept()
        peer = f"{ws.client[0]}:{ws.client[1]}" if ws.client else "?"
        conn: ShareConn | None = None
        try:
            conn = await self._admit(ws, peer)
            if conn is not None:
                with conn.cancel_scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._control_writer, ws, conn, nursery.cancel_scope)
                        await self._control_reader(ws, conn)
                        nursery.cancel_scope.cancel()
        except Exception as exc:  # a group from the nursery, or a failed handshake
            for leaf in _leaf_exceptions(exc):
                if isinstance(leaf, BadRequest):
                    log.warning("share %s from %s: protocol error: %s",
                                conn.id if conn else "?", peer, _loggable(leaf))
                elif not isinstance(leaf, _CONNECTION_ENDED):
                    log.warning("share %s from %s: %s: %s", conn.id if conn else "?", peer,
                                type(leaf).__name__, _loggable(leaf))
        finally:
            if conn is not None:
                self._disconnected(conn)
            if ws.application_state == WebSocketState.CONNECTED:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await ws.close(1000)
                    except Exception:  # the socket may be gone already
                        pass

    async def _receive_json(self, ws: WebSocket, timeout: float) -> dict[str, Any]:
        with trio.fail_after(timeout):
            message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        text = message.get("text")
        if text is None:
            raise BadRequest("control messages must be JSON text")
        if len(text) > MAX_CONTROL_MESSAGE:
            raise BadRequest("control message too large")
        try:
            obj = json.loads(text)
        except ValueError:
            raise BadRequest("control message is not JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            raise BadRequest("control message must be an object with a type")
        return obj

    async def _admit(self, ws: WebSocket, peer: str) -> ShareConn | None:
        challenge = secrets.token_bytes(32)
        await ws.send_text(json.dumps({
            "type": "challenge", "version": protocol.CONTROL_VERSION,
            "challenge": base64.b64encode(challenge).decode(),
        }))
        hello = await self._receive_json(ws, HANDSHAKE_TIMEOUT)

        async def refuse(why: str) -> None:
            log.warning("share refused from %s: %s", peer, _loggable(why))
            await ws.send_text(json.dumps({"type": "refused", "message": why}))
            await ws.close(4003)

        if hello.get("type") != "hello":
            await refuse("expected a hello message")
            return None
        try:
            public_key = _b64decode(hello.get("public_key"), "public_key")
            signature = _b64decode(hello.get("signature"), "signature")
            share_id = protocol.share_id_from_public_key(public_key)
            key = Ed25519PublicKey.from_public_bytes(public_key)
        except (BadRequest, ValueError) as exc:
            await refuse(f"bad identity: {exc}")
            return None
        signed_host = hello.get("host")
        if not isinstance(signed_host, str) or signed_host.lower() not in self.identities:
            # Not the Host header of this request: a rogue relay chooses the header it
            # sends here, and would pass on a challenge it got signed for its own host.
            await refuse(f"the share signed for relay host {str(signed_host)[:100]!r}, which is "
                         f"not this relay ({', '.join(sorted(self.identities))}): connect to "
                         "the relay's public URL (its --public-url)")
            return None
        try:
            key.verify(signature, protocol.handshake_payload(challenge, signed_host, public_key))
        except InvalidSignature:
            await refuse(f"bad signature for share {share_id}")
            return None
        if hello.get("id") not in (None, share_id):
            await refuse(f"claimed id {str(hello.get('id'))[:80]!r} does not match its key")
            return None
        allowed = self.allowed_ids()
        if allowed is not None and share_id not in allowed:
            await refuse(f"share {share_id} is not in this relay's --allow-shares list")
            return None
        # `root` (the share's absolute folder, sent by older shares) is checked for its
        # type only and never kept: listings name files relative to the share.
        name, listen_url, root_dir = (hello.get(k) or "" for k in ("name", "listen_url", "root"))
        if not all(isinstance(v, str) for v in (name, listen_url, root_dir)):
            await refuse("name, listen_url and root must be strings")
            return None
        try:
            if name:
                protocol.check_share_name(name)
            if listen_url:
                listen_url = protocol.check_listen_url(listen_url)
        except BadRequest as exc:
            await refuse(str(exc))
            return None
        conn = ShareConn(share_id, name or share_id, bool(hello.get("private")), listen_url,
                         peer)
        old = self.shares.get(share_id)
        if old is not None:
            log.info("share %s reconnected from %s; dropping its old connection", share_id, peer)
            self._disconnected(old)
            old.cancel_scope.cancel()
        self.shares[share_id] = conn
        await ws.send_text(json.dumps({
            "type": "welcome", "id": share_id, "upload_secret": conn.upload_secret,
            "upload_path": protocol.UPLOAD_PATH, "features": [protocol.FEATURE_ROOT64],
        }))
        log.info("share %s (%r) connected from %s%s", share_id, conn.name, peer,
                 " [private]" if conn.private else "")
        return conn

    async def _control_writer(self, ws: WebSocket, conn: ShareConn,
                              scope: trio.CancelScope) -> None:
        try:
            async for text in conn.outbox_recv:
                with trio.fail_after(STALL_TIMEOUT):
                    await ws.send_text(text)
        except Exception as exc:  # the websocket broke: end the whole connection
            if not isinstance(exc, _CONNECTION_ENDED):
                log.warning("share %s: control send failed: %s", conn.id, exc)
        scope.cancel()

    async def _control_reader(self, ws: WebSocket, conn: ShareConn) -> None:
        while True:
            try:
                msg = await self._receive_json(ws, IDLE_TIMEOUT)
            except WebSocketDisconnect:
                # Gone from the catalogue at once, before the nursery unwinds: the share
                # already has its close acknowledged, and may ask /api/shares right away.
                self._disconnected(conn)
                raise
            kind = msg["type"]
            if kind == "ping":
                conn.post({"type": "pong", "t": msg.get("t")})
            elif kind == "files":
                if not all(isinstance(msg.get(k) or [], list) for k in ("add", "remove")):
                    raise BadRequest("files message: add and remove must be lists")
                if msg.get("reset"):
                    self._drop_catalogue(conn)
                for path in msg.get("remove") or []:
                    if isinstance(path, str):
                        self._remove_file(conn, path)
                for item in msg.get("add") or []:
                    try:
                        self._add_file(conn, parse_entry(item))
                    except BadRequest as exc:
                        log.warning("share %s: skipped a catalogue entry: %s", conn.id,
                                    _loggable(exc))
                if "scanning" in msg:
                    conn.scanning = bool(msg["scanning"])
            elif kind == "reject":
                token = msg.get("id")
                p = self.pending.get(token) if isinstance(token, str) else None
                if p is not None and p.share is conn and not p.taken:
                    status = msg.get("status")
                    status = status if isinstance(status, int) and 400 <= status < 600 else 502
                    p.reject = (status, str(msg.get("message", ""))[:300])
                    p.settle()
            elif kind == "auth_reset":
                # The share's tokens changed (one was revoked): no cached yes survives.
                conn.auth_ok.clear()
                conn.auth_generation += 1
            elif kind == "auth_result":
                waiter = conn.auth_waiters.get(str(msg.get("id")))
                if waiter is not None:
                    waiter[1] = msg.get("ok") is True
                    waiter[0].set()
            else:
                raise BadRequest(f"unknown control message type {kind[:40]!r}")

    def _disconnected(self, conn: ShareConn) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.outbox_send.close()
        if self.shares.get(conn.id) is conn:
            del self.shares[conn.id]
            self._drop_catalogue(conn)
        for token in list(conn.pending):
            p = self.pending.get(token)
            if p is not None and not p.taken:
                p.reject = (503, f"share {conn.id} disconnected")
                p.settle()
        for waiter in conn.auth_waiters.values():
            waiter[0].set()
        log.info("share %s (%r) disconnected", conn.id, conn.name)

    # ------------------------------------------------------------ private shares

    async def _authorized(self, conn: ShareConn, scope: Scope) -> bool:
        """May this request see the private share CONN? (the share itself decides)

        Only a `kbfs1.` token that names CONN's id is ever shown to CONN: a token goes to
        the share that issued it and to no other (a share listing the same content, or
        any other, never sees it). A yes is cached for AUTH_CACHE_SECONDS at most, never
        past the token's own expiry, and forgotten when the share says its tokens changed
        (`auth_reset`: a token was revoked).
        """
        if not conn.private:
            return True
        auth = header(scope, b"authorization")
        if not auth or len(auth) > MAX_AUTH_HEADER:
            return False
        claim = protocol.token_claim(auth)
        if claim is None or claim.share != conn.id:
            return False
        key = hashlib.sha256(auth.encode("latin-1")).hexdigest()
        now = time.monotonic()
        if conn.auth_ok.get(key, 0) > now:
            return True
        token = secrets.token_urlsafe(16)
        waiter: list[Any] = [trio.Event(), False]
        conn.auth_waiters[token] = waiter
        generation = conn.auth_generation
        try:
            if not conn.post({"type": "auth", "id": token, "auth": auth}):
                return False
            with trio.move_on_after(AUTH_TIMEOUT):
                await waiter[0].wait()
        finally:
            conn.auth_waiters.pop(token, None)
        # A yes given before an auth_reset that has arrived since is not kept.
        if waiter[1] and conn.auth_generation == generation:
            lifetime = AUTH_CACHE_SECONDS
            if claim.expires:
                lifetime = min(lifetime, claim.expires - time.time())
            if lifetime > 0:
                if len(conn.auth_ok) > 1000:
                    conn.auth_ok.clear()
                conn.auth_ok[key] = now + lifetime
        return bool(waiter[1])

    async def _visible(self, conns: list[ShareConn], scope: Scope) -> list[ShareConn]:
        """The shares of CONNS this request may know of: public ones, and private ones
        that accept its token (asked one by one: only the share a token names is asked)."""
        return [c for c in conns if not c.private or await self._authorized(c, scope)]

    # ------------------------------------------------------------ JSON API

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        public = sum(1 for c in self.shares.values() if not c.private)
        await send_json(send, 200, {
            "ok": True, "shares": public, "uptime": round(time.time() - self.started, 3),
            "pending": len(self.pending), **self.stats,
        })

    async def _shares(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Private shares only for a request whose token they accept.
        visible = await self._visible(list(self.shares.values()), scope)
        await send_json(send, 200, [c.summary() for c in visible])

    def _base_url(self, scope: Scope) -> str:
        host = header(scope, b"host")
        if not host:
            server = scope.get("server") or ("127.0.0.1", 80)
            host = f"{server[0]}:{server[1]}"
        return f"{scope.get('scheme', 'http')}://{host}"

    async def _find(self, scope: Scope, receive: Receive, send: Send) -> None:
        sha1 = protocol.check_sha1(scope["path_params"]["sha1"])
        shares, direct, size = [], [], 0
        for conn in await self._visible(self._holders(sha1), scope):
            path = conn.first_path(sha1)
            if path is None:
                continue
            size = conn.files[path].size
            # "url": this share's own direct URL, so a reader sends a token there only
            # when it is the URL of the share the token names.
            url = conn.listen_url + protocol.SHA1_PATH.format(sha1=sha1) if conn.listen_url else ""
            shares.append({"id": conn.id, "name": conn.name, "path": path, "url": url})
            if url:
                direct.append(url)
        if shares:
            direct.append(self._base_url(scope) + protocol.SHA1_PATH.format(sha1=sha1))
        await send_json(send, 200, {"found": bool(shares), "size": size, "shares": shares,
                                     "urls": direct, "mirrors": self.mirrors if shares else []})

    def _holders(self, sha1: str) -> list[ShareConn]:
        """Connected shares that list SHA1: those that have answered first (fewest
        strikes), then public before private, then least busy."""
        conns = [self.shares[i] for i in self.sha1_shares.get(sha1, ()) if i in self.shares]
        return sorted(conns, key=lambda c: (c.strikes, c.private, len(c.pending)))

    async def _share(self, scope: Scope) -> ShareConn:
        """The connected share of the request's path, once the request may see it
        (401 for a private share without a token it accepts, before anything else)."""
        share_id = protocol.check_share_id(scope["path_params"]["share"])
        conn = self.shares.get(share_id)
        if conn is None:
            raise NotFound(f"share {share_id} is not connected")
        if not await self._authorized(conn, scope):
            raise HttpError(401, f"share {conn.id} is private: send Authorization: Bearer TOKEN",
                            [(b"www-authenticate", b'Bearer realm="kbfs"')])
        return conn

    async def _list(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = protocol.safe_relpath(scope["path_params"].get("path", ""))
        conn = await self._share(scope)
        if path and path not in conn.dir_count:
            raise NotFound(f"no folder {path!r} in share {conn.id}")
        files = []
        for name in sorted(conn.dir_files.get(path, ())):
            e = conn.files[f"{path}/{name}" if path else name]
            # original_path: the file's path inside the share, never the share's folder
            # on its machine (which the relay does not know).
            # A share that sent its 64 KiB tree proves pieces of it: hand out that pointer.
            ref = (prv.TreeRef(e.root64, prv.DEFAULT_BLOCK_SIZE) if e.root64
                   else prv.TreeRef(e.root, tree.BLOCK_SIZE))
            pointer = prv.Pointer(e.sha1, e.size, e.fcs, e.path, tree=ref)
            files.append({"name": name, "size": e.size, "mtime": e.mtime, "prv": pointer.to_dict()})
        await send_json(send, 200, {
            "share": conn.id, "path": path, "dirs": sorted(conn.dir_subdirs.get(path, ())),
            "files": files,
        })

    # ------------------------------------------------------------ content

    async def _content_candidates(self, scope: Scope
                                  ) -> tuple[str, list[tuple[ShareConn, str]], int]:
        """(sha1, [(share, path)] of every connected share holding it that this request
        may read, size) or NotFound: content only private shares hold is answered for a
        request without their token exactly as content nobody holds."""
        sha1 = protocol.check_sha1(scope["path_params"]["sha1"])
        holders = await self._visible(self._holders(sha1), scope)
        candidates = [(c, path) for c in holders if (path := c.first_path(sha1)) is not None]
        if not candidates:
            raise NotFound(f"no connected share has {sha1}")
        return sha1, candidates, candidates[0][0].files[candidates[0][1]].size

    async def _sha1(self, scope: Scope, receive: Receive, send: Send) -> None:
        sha1, candidates, size = await self._content_candidates(scope)
        await self._serve_content(scope, receive, send, candidates, sha1, size,
                                  _cache_control(scope, candidates, protocol.CACHE_CONTROL_IMMUTABLE))

    async def _file(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = protocol.safe_relpath(scope["path_params"]["path"])
        conn = await self._share(scope)
        entry = conn.files.get(path)
        if entry is None:
            raise NotFound(f"no file {path!r} in share {conn.id}")
        await self._serve_content(scope, receive, send, [(conn, path)], entry.sha1, entry.size,
                                  _cache_control(scope, [(conn, path)], "no-cache"))

    async def _tree(self, scope: Scope, receive: Receive, send: Send) -> None:
        sha1, candidates, size = await self._content_candidates(scope)
        length = tree.LEAF_BYTES * tree.block_count(size)
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(length).encode()),
            (b"etag", f'"{sha1}-tree"'.encode()),
            (b"cache-control",
             _cache_control(scope, candidates, protocol.CACHE_CONTROL_IMMUTABLE).encode()),
        ]
        if scope["method"] == "HEAD":
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        await self._relay_body(scope, receive, send, candidates, sha1, "tree", 0, length, 200,
                               headers)

    async def _serve_content(self, scope: Scope, receive: Receive, send: Send,
                             candidates: list[tuple[ShareConn, str]], sha1: str, size: int,
                             cache_control: str) -> None:
        etag = f'"{sha1}"'
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"accept-ranges", b"bytes"),
            # shared bytes never render as a page of this origin (HTML, SVG): issue 18
            (b"x-content-type-options", b"nosniff"),
            (b"content-security-policy", b"sandbox"),
            (b"etag", etag.encode()),
            (b"cache-control", cache_control.encode()),
        ]
        inm = header(scope, b"if-none-match")
        if inm is not None and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        range_header = header(scope, b"range")
        if_range = header(scope, b"if-range")
        if if_range is not None and if_range.strip() != etag:
            range_header = None
        rng = protocol.parse_range(range_header, size)
        want = None
        if rng is None:
            status, start, end = 200, 0, size
        else:
            status, (start, end) = 206, rng
            headers.append((b"content-range", protocol.content_range(start, end, size).encode()))
            # Passed on only for a piece-aligned range: the only kind a share proves.
            want = protocol.parse_want_proof(header(scope, b"kbfs-want-proof"))
            if want is not None and protocol.aligned_pieces(start, end, size,
                                                            want.block_size) is None:
                want = None
        headers.append((b"content-length", str(end - start).encode()))
        if scope["method"] == "HEAD" or end == start:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        await self._relay_body(scope, receive, send, candidates, sha1, "data", start, end, status,
                               headers, want)

    async def _relay_body(self, scope: Scope, receive: Receive, send: Send,
                          candidates: list[tuple[ShareConn, str]], sha1: str, kind: str,
                          start: int, end: int, status: int,
                          headers: list[tuple[bytes, bytes]],
                          want: protocol.WantProof | None = None) -> None:
        """Ask the candidate shares; the first upload to arrive is piped to the client.

        The first candidate is asked; a refusal moves on to the next at once, and a share
        that has neither started nor refused within HEDGE_DELAY gets company: the next
        candidate is asked too, and so on. The first upload to arrive wins; the shares
        still waiting are told to `cancel` (an upload of theirs that comes anyway gets
        404) and get a strike, so shares that answer are asked first next time. A share
        gets START_TIMEOUT to start. The client's Authorization goes only to the share
        its token names (`protocol.token_claim`); every other share is asked without it.
        """
        self.stats["requests"] += 1
        auth = header(scope, b"authorization")
        if auth is not None and len(auth) > MAX_AUTH_HEADER:
            raise BadRequest("Authorization header too long")
        claim = protocol.token_claim(auth)
        race = Race()
        waiting = list(candidates)
        asked: list[Pending] = []
        refusals: list[tuple[int, str]] = []
        next_hedge = 0.0
        try:
            while True:
                # No checkpoint between looking at the asked shares and waiting on this
                # event: whatever happens after the look sets it.
                race.changed = trio.Event()
                now = trio.current_time()
                for p in list(asked):
                    if p.taken:
                        p.share.strikes = 0
                        for other in asked:
                            if other is not p:
                                if other.reject is None:
                                    other.share.strikes += 1
                                    other.share.post({"type": "cancel", "id": other.token})
                                self._forget(other)
                        asked = [p]
                        await self._wait_piped(p, receive)
                        return
                    if p.reject is not None or now >= p.deadline:
                        if p.reject is None:
                            p.share.strikes += 1
                        refusals.append(p.reject or (504, f"share {p.share.id} did not answer "
                                                          f"within {START_TIMEOUT:g} s"))
                        asked.remove(p)
                        self._forget(p)
                if waiting and (not asked or now >= next_hedge):
                    conn, path = waiting.pop(0)
                    if conn.closed:
                        continue
                    p = Pending(secrets.token_urlsafe(24), conn, race, now + START_TIMEOUT,
                                end - start, send, scope, status, headers, start, want)
                    self.pending[p.token] = p
                    conn.pending.add(p.token)
                    message = {"type": "get", "id": p.token, "kind": kind, "sha1": sha1,
                               "path": path, "start": start, "end": end,
                               "auth": auth if claim is not None and claim.share == conn.id
                               else None}
                    if want is not None:
                        message["want_proof"] = want.value()
                    if not conn.post(message):
                        refusals.append((503, f"share {conn.id} is not reachable"))
                        self._forget(p)
                        continue
                    asked.append(p)
                    next_hedge = now + HEDGE_DELAY
                    continue
                if not asked:
                    break
                wake = min(p.deadline for p in asked)
                if waiting:
                    wake = min(wake, next_hedge)
                with trio.move_on_at(wake):
                    await race.changed.wait()
        finally:
            for p in asked:
                if not p.taken:
                    p.share.post({"type": "cancel", "id": p.token})
                self._forget(p)
        statuses = {code for code, _ in refusals}
        why = "; ".join(text for _, text in refusals) or "no share could serve it"
        if 401 in statuses:
            raise HttpError(401, why, [(b"www-authenticate", b'Bearer realm="kbfs"')])
        if 403 in statuses:
            raise HttpError(403, why)
        if statuses and statuses <= {404, 409, 410}:
            raise NotFound(why)
        raise HttpError(503 if 504 not in statuses else 504, why, [(b"retry-after", b"5")])

    def _forget(self, p: Pending) -> None:
        """P is no longer waited for: its token is unknown from now on."""
        if not p.taken:
            self.pending.pop(p.token, None)
        p.share.pending.discard(p.token)

    async def _wait_piped(self, p: Pending, receive: Receive) -> None:
        """Wait while the upload handler writes P's body into this client's response.

        The client's ASGI call must stay open meanwhile (returning ends the response);
        a client that goes away is flagged so the upload handler stops at once. After an
        aborted transfer, returning without the final body message makes hypercorn close
        the connection: the client sees a short body, never a clean end. (The upload
        handler counts the transfer.)
        """
        # Waiting here for the client's disconnect, in this very task (rather than a
        # watcher task per request), until the upload handler cancels P.over.
        with p.over:
            while (await receive())["type"] != "http.disconnect":
                pass
            p.client_gone = True
            p.stop.cancel()

    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = scope["path_params"]["token"]
        p = self.pending.get(token)
        secret = header(scope, protocol.UPLOAD_SECRET_HEADER.lower().encode()) or ""
        if p is None or p.taken or p.race.winner is not None:
            # (another share asked for the same request started first: this one lost)
            self.stats["rejected_uploads"] += 1
            raise NotFound("unknown or already used upload id")
        if not hmac.compare_digest(secret.encode(), p.share.upload_secret.encode()):
            self.stats["rejected_uploads"] += 1
            raise HttpError(403, "upload secret does not match the asked share")
        length = header(scope, b"content-length")
        if length is None or not (length.isascii() and length.isdigit()) or int(length) != p.length:
            raise BadRequest(f"upload must have Content-Length {p.length}")
        p.taken = True
        p.race.winner = p
        self.pending.pop(token, None)
        proof_header = self._proof_header(p, header(scope, b"kbfs-proof"))
        if proof_header is not None:
            p.headers = [*p.headers, (b"kbfs-proof", proof_header.encode("ascii"))]
        p.settle()
        try:
            outcome = await self._pipe(p, scope, receive)
        finally:
            # Counted here, before the share gets its answer (not by the client's task,
            # which runs later): whoever reads the counters after an upload's answer
            # sees that transfer in them.
            self.stats["bytes_out"] += p.sent
            if p.sent != p.length or not p.complete:
                self.stats["aborted"] += 1
                log.info("transfer %s from share %s ended after %d of %d bytes", p.token[:8],
                         p.share.id, p.sent, p.length)
            p.over.cancel()
        if outcome == "complete":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        else:
            # The rest of the body stays unread: this connection cannot carry another
            # upload, and the share must not send one into it (it would wait for an answer
            # that never comes).
            await send_json(send, 410 if "client" in outcome else 400, {"error": outcome},
                            [(b"connection", b"close")])

    def _proof_header(self, p: Pending, value: str | None) -> str | None:
        """The Kbfs-Proof for P's client from the share's upload header VALUE: only when
        the client asked, and only a value of the expected shape for the pieces and block
        size asked, rebuilt from its parsed parts (a share cannot put anything else into
        a reader's answer head). A bad one is dropped with a log line: the reader gets
        the bytes without a proof and falls back, as with a share that makes none."""
        if p.want is None or value is None:
            return None
        bs = p.want.block_size
        # The range was piece-aligned when it was asked (`_serve_content`).
        a, b = p.start // bs, -(-(p.start + p.length) // bs)
        try:
            nodes = protocol.parse_proof_value(value, a, b, bs)
        except BadRequest as exc:
            log.info("share %s sent a bad proof header: %s", p.share.id, _loggable(exc))
            return None
        return protocol.proof_value(a, b, bs, nodes)

    async def _pipe(self, p: Pending, scope: Scope, receive: Receive) -> str:
        """Copy the upload body (SCOPE's, read with RECEIVE) into the client response
        (P.client_send). Returns how it ended.

        In the kernel when both connections allow it (`httpserve.BodySplice`); else (and
        for what a splice leaves) no queue in between: each chunk is written to the
        client before the next is read from the share, so a slow client slows exactly
        one upload, and memory per transfer is hypercorn's small receive queue.
        """
        client_send = p.client_send
        await client_send({"type": "http.response.start", "status": p.status,
                           "headers": p.headers})
        length = p.length
        splice = httpserve.BodySplice.between(scope, receive, p.client_scope, client_send)
        if splice is not None:
            ended = "client went away"  # unless the splice returns: cancelled by P.stop
            with p.stop:
                ended = await splice.run(STALL_TIMEOUT)
            p.sent = splice.moved
            self.stats["bytes_spliced"] += splice.spliced
            if p.client_gone or ended.startswith("destination"):
                p.client_gone = True
                return "client went away"
            if ended == "complete":
                if p.sent != length:  # cannot be: the upload's Content-Length is the length
                    return "short upload"
                # Marked before the last write: see below.
                p.complete = True
                try:
                    await client_send({"type": "http.response.body", "body": b"",
                                       "more_body": False})
                except Exception as exc:
                    log.info("transfer %s: client write failed: %s: %s", p.token[:8],
                             type(exc).__name__, exc)
                    p.client_gone = True
                    p.complete = False
                    return "client went away"
                return "complete"
            if ended == "source stalled":
                return "share stalled"
            if ended != "unspliced":
                return "share went away"
        while True:
            if p.client_gone and not p.complete:
                return "client went away"
            with trio.move_on_after(STALL_TIMEOUT) as timer:
                message = await receive()
            if timer.cancelled_caught:
                return "share stalled"
            if message["type"] == "http.disconnect":
                return "share went away"
            body = message.get("body", b"")
            if body:
                sent = p.sent + len(body)
                if sent > length:
                    return "upload longer than asked"
                # Marked before the last write: the client's normal end of response
                # (hypercorn then reports it "disconnected") must not look like an abort.
                p.complete = sent == length
                p.sent = sent
                try:
                    # A client that stops reading would hold the share's upload (and its
                    # worker) for ever: no byte moving for STALL_TIMEOUT ends it too.
                    with trio.fail_after(STALL_TIMEOUT):
                        await client_send({"type": "http.response.body", "body": body,
                                           "more_body": not p.complete})
                except Exception as exc:  # broke under this write, or stalled
                    log.info("transfer %s: client write failed: %s: %s", p.token[:8],
                             type(exc).__name__, exc)
                    p.client_gone = True
                    p.complete = False
                    return "client went away"
            if not message.get("more_body", False):
                return "complete" if p.complete else "short upload"


PRIVATE_CACHE_CONTROL = "private, no-store"


def _cache_control(scope: Scope, candidates: list[tuple[ShareConn, str]], public: str) -> str:
    """PUBLIC for an answer any cache may keep and give to anyone; "private, no-store"
    when the request carried a token or a private share may answer: a shared cache
    (nginx proxy_cache, squid) must never hand a private share's bytes, or the fact that
    it holds them, to a reader without the token (docs/deploy.md)."""
    if header(scope, b"authorization") is not None or any(c.private for c, _ in candidates):
        return PRIVATE_CACHE_CONTROL
    return public


WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


def needs_public_url(relay: Relay, host: str) -> bool:
    """True when RELAY, listening on HOST, would not know which host shares sign for:
    a wildcard address and no --public-url."""
    return not relay.identities and host in WILDCARD_HOSTS


async def serve(relay: Relay, host: str, port: int,
                task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED, *,
                certfile: str | None = None, keyfile: str | None = None,
                trust_proxy: bool = False) -> None:
    """Serve RELAY on HOST:PORT until cancelled; reports the bound base URL when ready.

    A relay without a public URL admits shares that connect to the address it is bound
    to (`http://HOST:PORT`, and `localhost:PORT` on a loopback address); on a wildcard
    address it needs one (ConfigError). CERTFILE/KEYFILE: serve HTTPS and WSS (HTTP/1.1
    only); TRUST_PROXY: client addresses from X-Forwarded-For (`kbfs.proxyfix`)."""
    if needs_public_url(relay, host):
        raise ConfigError(f"listening on {host or 'every address'} needs --public-url URL "
                          "(the URL shares connect to, e.g. http://relay.example.org:8080)")
    config = httpserve.hypercorn_config(host, port, max_ws_message=MAX_CONTROL_MESSAGE)
    if certfile and keyfile:
        config.certfile, config.keyfile = certfile, keyfile
        config.alpn_protocols = ["http/1.1"]  # the pipes and splices are HTTP/1.1's
    app = proxyfix.TrustProxy(relay.app) if trust_proxy else relay.app

    async def serving(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        await httpserve.serve(app, config, host, port, task_status=task_status)

    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(serving)
        if not relay.identities:
            relay.add_identity(url)
            if host in ("127.0.0.1", "::1", "localhost"):
                scheme = url.partition("://")[0]
                relay.add_identity(f"{scheme}://localhost:{protocol.url_host(url).rpartition(':')[2]}")
        task_status.started(url)
