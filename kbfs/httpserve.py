"""HTTP serving plumbing shared by the relay and a share's `--listen` server.

What both servers need identically and neither may import from the other (they are
sibling adapters): the ASGI guard (request-head cap, CORS on every answer and on
preflight, kbfs errors mapped to 4xx JSON, a bug reduced to one log line and a 500),
JSON answers, header lookup, and the hypercorn configuration with the fixes we apply
to hypercorn 0.18 (a close racing a send, sockets left in CLOSE-WAIT) and the changes
that cut its per-request and per-byte cost (direct socket reads and writes when they
need no wait, no extra copies in h11, a cheaper idle timer).

It also offers one operation hypercorn has no interface for: `BodySplice` moves the
rest of one request's body straight into another connection's response body with
`os.splice` (socket -> pipe -> socket, the bytes never enter Python; through kbfs.osio, off
with KBFS_PORTABLE=1, when the ordinary path carries the body), when both are
plain HTTP/1.1 over TCP on Linux; it keeps both connections' h11 state consistent, so
both stay keep-alive. The relay uses it to pipe a share's upload into a client's
download. Everything it touches of hypercorn and h11 (pinned in setup.cfg) is here.
Nothing here knows shares, relays, files or ranges.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import h11
import h11._readers
import h11._receivebuffer
import h11._writers
import hypercorn.trio
import hypercorn.trio.task_group
import hypercorn.trio.tcp_server
import hypercorn.trio.worker_context
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.events import Closed, RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import HTTPStream

from kbfs import osio, protocol
from kbfs.errors import BadRequest, ConfigError, KbfsError, NotFound, RangeError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RECV_CHUNK = 1 << 20  # hypercorn reads 64 KiB per recv() by default: too small for 1 GB/s
# The first read of a request (head and the start of its body): what it takes of a big
# body has to go through Python even when the rest of the body is spliced.
HEAD_RECV = 128 << 10
CORS = [(k.lower().encode(), v.encode()) for k, v in protocol.CORS_HEADERS.items()]


class HttpError(KbfsError):
    """An answer other than success, with its HTTP status (and extra headers)."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or []


def status_of(exc: KbfsError) -> int:
    """The HTTP status a kbfs error maps to."""
    if isinstance(exc, HttpError):
        return exc.status
    if isinstance(exc, RangeError):
        return 416
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, BadRequest):
        return 400
    return 500


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of request header NAME (lowercase bytes), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def send_json(send: Send, status: int, obj: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """A complete JSON answer (never cached: JSON answers describe changing state)."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store")] + (extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Endpoint:
    """A raw ASGI app around `async def handler(scope, receive, send)` for starlette routes
    (starlette would wrap a bound method as a request/response function)."""

    def __init__(self, handler: ASGIApp) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


async def guarded(app: ASGIApp, scope: Scope, receive: Receive, send: Send,
                  remap: dict[int, int] | None = None) -> None:
    """Run APP for one connection: bounded request head, CORS everywhere, kbfs errors as
    4xx JSON (statuses optionally remapped), anything else one log line and a 500."""
    if scope["type"] in ("http", "websocket") and protocol.head_bytes(
            scope.get("raw_path") or b"", scope.get("query_string") or b"",
            scope.get("headers") or []) > protocol.MAX_HEAD_BYTES:
        if scope["type"] == "http":
            await send_json(send, 431, {"error": "request head too large"})
        else:
            await send({"type": "websocket.close", "code": 1009})
        return
    if scope["type"] in ("http", "websocket") and "\n" in scope.get("path", ""):
        # URL routes end in `$`, which also matches before a final line break: without
        # this, /s/ID/file/a.bin%0A served a.bin. No route here takes a line break.
        if scope["type"] == "http":
            await send_json(send, 400, {"error": "path contains a line break"}, CORS)
        else:
            await send({"type": "websocket.close", "code": 1008})
        return
    if scope["type"] != "http":
        await app(scope, receive, send)
        return
    if scope["method"] == "OPTIONS":
        await send({"type": "http.response.start", "status": 204,
                    "headers": CORS + [(b"content-length", b"0"), (b"allow", b"GET, HEAD, OPTIONS")]})
        await send({"type": "http.response.body", "body": b""})
        return
    started = False

    async def send_cors(message: Message) -> None:
        nonlocal started
        if message["type"] == "http.response.start":
            started = True
            message["headers"] = list(message.get("headers", [])) + CORS
        await send(message)

    try:
        await app(scope, receive, send_cors)
    except KbfsError as exc:
        if started:
            return  # the body was under way: ending it early is all that is left
        extra = exc.headers if isinstance(exc, HttpError) else []
        if isinstance(exc, RangeError):
            extra = [(b"content-range", protocol.unsatisfied_range(exc.size).encode())]
        status = status_of(exc)
        status = (remap or {}).get(status, status)
        await send_json(send_cors, status, {"error": str(exc)}, extra)
    except Exception as exc:  # a bug: one line in the log, a 500 to the client
        log.error("internal error on %s %s: %s: %s", scope.get("method"),
                  scope.get("path", "")[:200], type(exc).__name__, exc)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("traceback", exc_info=True)
        if not started:
            await send_json(send_cors, 500, {"error": "internal error"})


def http_idle_timeout() -> float:
    """Seconds a connection may wait for a complete request head: KBFS_HTTP_IDLE_TIMEOUT
    (default 75; tests lower it to watch slowloris clients being cut)."""
    try:
        value = float(os.environ.get("KBFS_HTTP_IDLE_TIMEOUT", "75"))
    except ValueError:
        raise ConfigError("KBFS_HTTP_IDLE_TIMEOUT must be a number of seconds") from None
    if not 0.5 <= value <= 3600:
        raise ConfigError("KBFS_HTTP_IDLE_TIMEOUT must be from 0.5 to 3600 seconds")
    return value


def hypercorn_config(host: str, port: int, max_ws_message: int | None = None) -> HyperConfig:
    """Hypercorn settings shared by the relay and a share's --listen server."""
    config = HyperConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.loglevel = "WARNING"
    # Also the bound on a client that never finishes its request head (slowloris): the
    # idle timer runs from accept (or the end of the last response) to a complete head.
    config.keep_alive_timeout = http_idle_timeout()
    config.keep_alive_max_requests = 1 << 30
    if max_ws_message is not None:
        config.websocket_max_message_size = max_ws_message
    config.max_app_queue_size = 4  # request-body chunks queued per connection (1 MiB each)
    config.h11_max_incomplete_size = 16 * 1024
    config.graceful_timeout = 2
    config.include_server_header = False
    return config


async def serve(app: ASGIApp, config: HyperConfig, host: str, port: int,
                task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve APP until cancelled; reports the bound base URL once listening."""
    tune_process()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn.trio.serve, app, config)  # type: ignore[arg-type]
        task_status.started(binds[0] if binds else f"http://{host}:{port}")


def tune_process() -> None:
    """Settings for moving ~1 GB/s through one Python process, and hypercorn fixes.

    Hypercorn reads 64 KiB per recv() by default; the upload POSTs are the relay's hot
    path, and fewer, larger chunks cut its per-chunk Python overhead. 1 MiB buffers
    are above glibc's default mmap threshold, so each one would be mapped, faulted in
    page by page and unmapped again: raising the thresholds lets malloc reuse them.
    """
    hypercorn.trio.tcp_server.MAX_RECV = RECV_CHUNK  # type: ignore[attr-defined]
    for patch in (_h11_fewer_copies, _cheaper_idle_timer, _guard_send_eof_race,
                  _close_on_client_eof, _expose_http1_connections):
        try:
            patch()
        except AttributeError as exc:  # other hypercorn/h11 internals (setup.cfg pins them)
            log.warning("hypercorn/h11 patch %s not applied: %s", patch.__name__, exc)
    osio.tune_malloc(32 << 20, 128 << 20)  # not glibc (or KBFS_PORTABLE=1): only slower


def _h11_fewer_copies() -> None:
    """Stop h11 (under hypercorn) copying every body chunk two or three extra times.

    h11 0.16 copies each received body chunk out of its buffer twice (a slice to test
    for emptiness, then the slice it returns), and joins every chunk it sends into a new
    bytes object even when there is only one piece. For the relay, which receives each
    upload chunk and sends it on, that was three needless passes over each megabyte on
    top of the kernel's own copies. Handing over the whole buffer when all of it is
    asked for, and a lone piece as it is (h11 documents the result of `send` as a
    bytes-like object; hypercorn writes it to the socket before the call returns) keeps
    the behaviour and drops the copies.
    """
    buffer_class = h11._receivebuffer.ReceiveBuffer
    if getattr(buffer_class, "_kbfs_fewer_copies", False):
        return

    def maybe_extract_at_most(self: Any, count: int) -> bytearray | None:
        data = self._data
        if not data or count <= 0:
            return None
        if count >= len(data):
            self._data = bytearray()
            self._next_line_search = 0
            self._multiple_lines_search = 0
            return data  # type: ignore[no-any-return]
        return self._extract(count)  # type: ignore[no-any-return]

    def send(self: h11.Connection, event: Any) -> Any:
        data_list = self.send_with_data_passthrough(event)
        if data_list is None:
            return None
        if len(data_list) == 1:
            return data_list[0]
        return b"".join(data_list)

    buffer_class.maybe_extract_at_most = maybe_extract_at_most  # type: ignore[method-assign]
    buffer_class._kbfs_fewer_copies = True  # type: ignore[attr-defined]
    h11.Connection.send = send  # type: ignore[method-assign,assignment]


def _cheaper_idle_timer() -> None:
    """Re-arm hypercorn's per-connection idle timer without waiting for a task to start.

    Hypercorn stops a connection's idle timer when a request arrives and restarts it
    when the answer is done, each restart a `nursery.start()` of a new task behind a
    lock: several scheduler passes per request just to move a deadline. Starting the
    timer task with `start_soon` inside a cancel scope made beforehand does the same
    (a scope cancelled before its task runs cancels the task at once), and there is no
    await between cancelling the old timer and recording the new one, so no lock.
    """
    single_task = hypercorn.trio.worker_context.TrioSingleTask
    if getattr(single_task, "_kbfs_cheaper", False):
        return

    async def run_in(scope: trio.CancelScope, action: Callable[[], Awaitable[None]]) -> None:
        with scope:
            await action()

    async def restart(self: Any, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = trio.CancelScope()
        task_group._nursery.start_soon(run_in, self._handle, action)

    async def stop(self: Any) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None

    single_task.restart = restart  # type: ignore[method-assign]
    single_task.stop = stop  # type: ignore[method-assign]
    single_task._kbfs_cheaper = True  # type: ignore[attr-defined]


def _guard_send_eof_race() -> None:
    """Keep one closing connection from taking the whole server down, and write without
    a trip through the event loop when the socket can take the bytes at once.

    Hypercorn 0.18's TCPServer closes a connection with `send_eof()` outside its send
    lock; if the read task answers a websocket close or ping frame at that moment, its
    `send_all` raises `trio.BusyResourceError`, which nothing catches, and the error
    ends `serve()` (seen here when a refused share closed its websocket). A send that
    races a close is treated as a send on a closed connection.

    Each hypercorn write (a response head, a body chunk, a websocket frame) took a lock
    and a trio socket send: four passes through trio's scheduler, which made the
    scheduler the largest single CPU cost of a relayed request. When nobody holds the
    send lock, the bytes are first offered to the (non-blocking) socket directly; what it
    cannot take at once is written by `_send_rest`, whose wait, unlike hypercorn's, can
    be cancelled (a peer that stops reading must not hold a writer for ever). Other
    sockets (TLS) go the usual way. (Hypercorn acknowledges a websocket close before it
    tells the application: with writes this quick, an application must act on the
    disconnect message at once; the relay does.)
    """
    server = hypercorn.trio.tcp_server.TCPServer
    if getattr(server, "_kbfs_guarded", False):
        return
    original = server.protocol_send

    async def protocol_send(self: Any, event: Any) -> None:
        raw = getattr(getattr(self.stream, "socket", None), "_sock", None)
        if type(event) is RawData and isinstance(raw, socket.socket) and event.data:
            data = memoryview(event.data)
            if not self.send_lock.locked():
                try:
                    sent = raw.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    sent = -1  # broken: let the usual path find out and close
                if sent == len(data):
                    return
                if sent >= 0:
                    async with self.send_lock:
                        await _send_rest(self, raw, data[sent:])
                    return
            else:
                async with self.send_lock:
                    await _send_rest(self, raw, data)
                return
        try:
            await original(self, event)
        except trio.BusyResourceError:
            await self.protocol.handle(Closed())

    server.protocol_send = protocol_send  # type: ignore[method-assign]
    server._kbfs_guarded = True  # type: ignore[attr-defined]


async def _send_rest(server: Any, raw: socket.socket, data: memoryview) -> None:
    """Write DATA to the connection's non-blocking socket RAW (send lock held), waiting in
    the event loop when it is full.

    Unlike hypercorn's own write (a `send_all` shielded from cancellation), this wait can
    be cancelled: a peer that stops reading would otherwise hold its writer for ever
    (the relay's transfer, and with it the share's upload, waited with no end). A write
    cancelled part way has left half a message on the wire, so the connection is shut
    down at once (hypercorn closes it on finding out); a broken one is reported closed,
    as hypercorn does."""
    try:
        while data:
            try:
                n = raw.send(data)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(raw)
                continue
            data = data[n:]
    except trio.Cancelled:
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)
        raise
    except (OSError, trio.ClosedResourceError, trio.BrokenResourceError):
        await server.protocol.handle(Closed())


def _close_on_client_eof() -> None:
    """Close a keep-alive connection as soon as its client closes it.

    Hypercorn 0.18's TCPServer, on reading EOF from an idle keep-alive connection,
    leaves its read loop but then waits for the connection's idle timer (the
    keep-alive timeout, 75 s) before closing the socket: every client that hangs up
    leaves a CLOSE-WAIT socket behind for that long (a client churning connections
    runs the server out of file descriptors). Stopping the idle timer once the read
    loop is over lets the connection close at once.
    """
    server = hypercorn.trio.tcp_server.TCPServer
    if getattr(server, "_kbfs_close_on_eof", False):
        return
    original = server._read_data

    async def _read_data(self: Any) -> None:
        try:
            raw = getattr(getattr(self.stream, "socket", None), "_sock", None)
            if isinstance(raw, socket.socket) and not self.config.read_timeout:
                await _read_plain(self, raw)
            else:
                await original(self)
        finally:
            with trio.CancelScope(shield=True):
                await self.idle_task.stop()

    server._read_data = _read_data  # type: ignore[method-assign]
    server._kbfs_close_on_eof = True  # type: ignore[attr-defined]


async def _read_plain(server: Any, raw: socket.socket) -> None:
    """Hypercorn's read loop for a plain (non-TLS) socket, without its per-read overhead.

    The same as TCPServer._read_data without a read timeout: read, hand the bytes to the
    protocol, stop at EOF or on an error, then report the connection closed. It reads
    the non-blocking socket directly and waits in the event loop only when nothing is
    there, where trio's stream adds a cancel scope and two scheduler passes per read.
    It still yields at least every few reads, so a client that keeps sending cannot
    keep other connections from running.

    When splices are enabled, the read that starts a new request takes at most
    HEAD_RECV bytes (the head and a small body in one go): whatever it takes of a big
    body is copied through Python even when a `BodySplice` then moves the rest.

    A `BodySplice` may put a hold on the loop (`server._kbfs_hold`): the loop then stops
    reading (its wait for the socket is cancelled) until the hold is released, so the
    splice alone reads the socket meanwhile. A splice that consumed the rest of the
    body asks the loop to let h11 report the body's end before it reads again.
    """
    server._kbfs_hold = None
    server._kbfs_wait = None
    server._kbfs_read_done = False
    server._kbfs_plain_reader = True  # a BodySplice may hold this loop
    wrapper = server.protocol
    first_read = HEAD_RECV if splice_enabled() else RECV_CHUNK
    eager = 0
    try:
        while True:
            hold: _ReadHold | None = server._kbfs_hold
            if hold is not None:
                hold.parked = True
                hold.poke()
                await hold.released.wait()
                if hold.end_body:
                    await server.protocol.protocol._handle_events()
                continue
            # (`wrapper.protocol`, not kept: an h2c upgrade replaces it)
            h11_state = getattr(getattr(wrapper.protocol, "connection", None), "their_state", None)
            try:
                data = raw.recv(first_read if h11_state is h11.IDLE else RECV_CHUNK)
            except BlockingIOError:
                eager = 0
                with trio.CancelScope() as wait:  # cancelled by a splice that wants the socket
                    server._kbfs_wait = wait
                    try:
                        await trio.lowlevel.wait_readable(raw)
                    except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
                        break
                    finally:
                        server._kbfs_wait = None
                continue
            except OSError:
                break
            await server.protocol.handle(RawData(data=data))
            if not data:
                break
            eager += 1
            if eager >= 4:
                eager = 0
                await trio.lowlevel.checkpoint()
    finally:
        server._kbfs_read_done = True
        hold = server._kbfs_hold
        if hold is not None:
            hold.poke()
    await server.protocol.handle(Closed())


# ---------------------------------------------------------------- body splice

HTTP1_EXTENSION = "kbfs.http1"  # scope["extensions"] key of a request's Http1Conn
SPLICE_PIPE_BYTES = 1 << 20  # kernel pipe between the two sockets: bytes in flight per splice
SPLICE_MIN_BYTES = 256 << 10  # less body than this left unread: not worth taking the socket
SPLICE_WAKE_BYTES = 256 << 10  # a splice waiting for its source wakes for this much (or the rest)
_SPLICE_FLAGS = osio.SPLICE_FLAGS


def splice_enabled() -> bool:
    """Whether body splices may be used: Linux's os.splice, unless KBFS_SPLICE=0 (the
    tests use that to keep the ordinary path covered)."""
    return osio.splice_ok() and os.environ.get("KBFS_SPLICE", "1") != "0"


class _ReadHold:
    """A splice's claim on a connection's socket: its read loop stops reading meanwhile."""

    __slots__ = ("parked", "released", "attention", "end_body")

    def __init__(self) -> None:
        self.parked = False  # the read loop has stopped and waits for `released`
        self.released = trio.Event()
        self.attention: trio.Event | None = None  # set when the loop parks, ends or queues
        self.end_body = False  # the splice read the whole body: let h11 see its end

    def poke(self) -> None:
        if self.attention is not None:
            self.attention.set()


class Http1Conn:
    """One request's plain HTTP/1.1-over-TCP connection, as hypercorn 0.18 runs it: its
    TCPServer (socket, send lock, read loop), H11Protocol (h11 state), HTTPStream and the
    queue its ASGI `receive` reads. Found in `scope["extensions"][HTTP1_EXTENSION]`."""

    __slots__ = ("server", "protocol", "_stream", "queue")

    def __init__(self, server: Any, protocol: H11Protocol, stream: HTTPStream,
                 queue: trio.MemoryReceiveChannel[Any]) -> None:
        self.server = server
        self.protocol = protocol
        # Weak: the stream holds the scope, which holds this. A cycle per request would
        # leave every request's objects to the cyclic garbage collector, whose full
        # passes stalled requests by ~10 ms (seen as a p90 of 13 ms in bench_latency).
        self._stream = weakref.ref(stream)
        self.queue = queue

    def socket(self) -> socket.socket | None:
        """The connection's socket while this request is still its current one, or None."""
        stream = self._stream()
        if stream is None or self.protocol.stream is not stream or stream.closed:
            return None
        raw = getattr(getattr(self.server.stream, "socket", None), "_sock", None)
        return raw if isinstance(raw, socket.socket) and raw.fileno() >= 0 else None


def _http1_conn(scope: Scope, send: Any, queue: trio.MemoryReceiveChannel[Any]) -> Http1Conn | None:
    """The Http1Conn of the request SCOPE that hypercorn is spawning (SEND is its
    HTTPStream.app_send), or None when it is not plain HTTP/1.1 over TCP."""
    if scope.get("type") != "http" or scope.get("http_version") != "1.1":
        return None
    stream = getattr(send, "__self__", None)
    protocol = getattr(getattr(stream, "send", None), "__self__", None)
    server = getattr(getattr(protocol, "send", None), "__self__", None)
    if (not isinstance(stream, HTTPStream) or not isinstance(protocol, H11Protocol)
            or not isinstance(protocol.connection, h11.Connection)
            or not isinstance(server, hypercorn.trio.tcp_server.TCPServer)
            or not isinstance(server.stream, trio.SocketStream)):  # TLS: an SSLStream
        return None
    return Http1Conn(server, protocol, stream, queue)


def _put_disconnect(put_channel: trio.MemorySendChannel[Any],
                    queue: trio.MemoryReceiveChannel[Any], message: Any) -> None:
    """Queue a request's `http.disconnect` without waiting. Hypercorn queues it when the
    stream closes, also when the application has already answered without reading the
    whole body (the relay's answer to an aborted upload): the queue is then full of body
    chunks nobody will read, and hypercorn's wait for room, in the finishing task, never
    ended; the connection stayed open, unserved (seen: a share's next upload on it waited
    for ever). Body chunks that were still queued make room: the request is over."""
    while True:
        try:
            put_channel.send_nowait(message)
            return
        except trio.WouldBlock:
            try:
                queue.receive_nowait()
            except trio.WouldBlock:
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


def _expose_http1_connections() -> None:
    """Give each plain HTTP/1.1 request its Http1Conn as an ASGI scope extension.

    Hypercorn's TaskGroup.spawn_app (below, otherwise as in 0.18) creates a request's
    ASGI receive queue and starts the application; it is the one place that sees the
    scope, the queue and (through the bound `send`) the connection before the
    application runs. The queue's writer also wakes a splice waiting for the read loop.
    """
    task_group = hypercorn.trio.task_group.TaskGroup
    if getattr(task_group, "_kbfs_exposed", False):
        return
    handle = hypercorn.trio.task_group._handle

    async def spawn_app(self: Any, app: Any, config: HyperConfig, scope: Scope,
                        send: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        put_channel, queue = trio.open_memory_channel[Any](config.max_app_queue_size)
        conn = _http1_conn(scope, send, queue) if splice_enabled() else None
        server = conn.server if conn is not None else None
        if conn is not None:
            scope["extensions"][HTTP1_EXTENSION] = conn

        async def put(message: Any) -> None:
            if message.get("type") == "http.disconnect":
                _put_disconnect(put_channel, queue, message)
            else:
                await put_channel.send(message)
            hold = getattr(server, "_kbfs_hold", None)
            if hold is not None:
                hold.poke()

        self._nursery.start_soon(handle, app, config, scope, queue.receive, send,
                                 trio.to_thread.run_sync, trio.from_thread.run)
        return put

    # (set per connection by _read_plain; this default: hypercorn's own read loop runs)
    hypercorn.trio.tcp_server.TCPServer._kbfs_plain_reader = False  # type: ignore[attr-defined]
    task_group.spawn_app = spawn_app  # type: ignore[method-assign,assignment]
    task_group._kbfs_exposed = True  # type: ignore[attr-defined]


class BodySplice:
    """Move the rest of one HTTP/1.1 request's body into another connection's response.

    SRC is the request whose body is moved (its ASGI `receive`); DST is a request whose
    response head, with a Content-Length equal to the body's remaining length, has
    been sent (its ASGI `send`). `run()` first forwards, through DST's `send`, whatever
    hypercorn has already read of the body, while it stops SRC's read loop; then it
    moves the rest socket -> pipe -> socket with `os.splice`, holding DST's send lock,
    and tells both h11 connections how many bytes went by (SRC's reader, DST's writer),
    so that afterwards SRC's body is complete and DST's response wants only its end:
    the caller sends the final empty body message, and both connections stay
    keep-alive. Back-pressure is the kernel's: the pipe holds at most SPLICE_PIPE_BYTES
    and nothing is read from SRC while DST cannot take what is in it. `moved` counts
    the body bytes written to DST so far, also when `run()` is cancelled; `spliced` the
    part of them that went through the kernel pipe.
    """

    def __init__(self, src: Http1Conn, dst: Http1Conn, receive: Receive, send: Send) -> None:
        self.src, self.dst = src, dst
        self.receive, self.send = receive, send
        self.moved = 0
        self.spliced = 0
        self._lowat = 1  # SO_RCVLOWAT of SRC's socket as this splice last set it

    @classmethod
    def between(cls, src_scope: Scope, receive: Receive, dst_scope: Scope,
                send: Send) -> BodySplice | None:
        """A splice from SRC_SCOPE's request body to DST_SCOPE's response, or None when
        either is not plain HTTP/1.1 over TCP (TLS, HTTP/2, splice unavailable or off)."""
        src = src_scope.get("extensions", {}).get(HTTP1_EXTENSION)
        dst = dst_scope.get("extensions", {}).get(HTTP1_EXTENSION)
        if (not isinstance(src, Http1Conn) or not isinstance(dst, Http1Conn)
                or src.server is dst.server or not src.server._kbfs_plain_reader):
            return None
        return cls(src, dst, receive, send)

    async def run(self, stall_timeout: float) -> str:
        """Move the body; how it ended:

        - "complete": all of it is in DST and SRC's request is over;
        - "unspliced": not worth it or not possible (little left, unexpected h11 state);
          what was forwarded before finding out is counted in `moved`: go on the
          ordinary way (RECEIVE, SEND) for the rest;
        - "source closed" / "source stalled" (no byte for STALL_TIMEOUT seconds);
        - "destination closed" / "destination stalled".

        After anything but "complete" or "unspliced", DST's response cannot be finished
        (bytes may be lost in the pipe): end it by closing, as for a short upload.
        """
        src = self.src
        conn = src.protocol.connection
        reader = getattr(conn, "_reader", None)
        server = src.server
        if (not isinstance(reader, h11._readers.ContentLengthReader)
                or reader._remaining < SPLICE_MIN_BYTES or server._kbfs_hold is not None
                or server._kbfs_read_done or src.socket() is None):
            return "unspliced"
        hold = _ReadHold()
        server._kbfs_hold = hold
        if server._kbfs_wait is not None:
            server._kbfs_wait.cancel()
        try:
            ended = await self._forward_read(hold, stall_timeout)
            if ended:
                return ended
            ended = await self._splice(reader, stall_timeout)
            if ended != "complete":
                return ended
            hold.end_body = True
        finally:
            if server._kbfs_hold is hold:
                server._kbfs_hold = None
            hold.released.set()
        # The read loop now lets h11 see the end of the body (their state DONE), which
        # must happen before SRC answers, or hypercorn would not keep it alive.
        with trio.move_on_after(stall_timeout):
            message = await self.receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                return "complete"
            return "source closed"
        return "source stalled"

    async def _forward_read(self, hold: _ReadHold, stall_timeout: float) -> str | None:
        """Forward what the read loop queued until it parks; None once it has, else how
        the body ended meanwhile (it may all have been read already)."""
        queue = self.src.queue
        while True:
            try:
                message = queue.receive_nowait()
            except trio.WouldBlock:
                if hold.parked:
                    return None
                if self.src.server._kbfs_read_done:
                    return "source closed"
                hold.attention = trio.Event()
                with trio.move_on_after(stall_timeout) as timer:
                    await hold.attention.wait()
                hold.attention = None
                if timer.cancelled_caught:
                    return "source stalled"
                continue
            if message["type"] != "http.request":
                return "source closed"
            body = message.get("body", b"")
            if body:
                try:
                    with trio.move_on_after(stall_timeout) as timer:
                        await self.send({"type": "http.response.body", "body": body,
                                         "more_body": True})
                except Exception:  # the destination's connection broke under this write
                    return "destination closed"
                if timer.cancelled_caught:  # (it may have taken part: DST is done for)
                    return "destination stalled"
                self.moved += len(body)
            if not message.get("more_body", False):
                return "complete"

    async def _splice(self, reader: Any, stall_timeout: float) -> str:
        """Splice READER's remaining bytes from SRC's socket into DST's (read loop parked)."""
        src_conn = self.src.protocol.connection
        dst_conn = self.dst.protocol.connection
        writer = getattr(dst_conn, "_writer", None)
        if (src_conn.their_state is not h11.SEND_BODY or src_conn._receive_buffer
                or src_conn._receive_buffer_closed or dst_conn.our_state is not h11.SEND_BODY
                or not isinstance(writer, h11._writers.ContentLengthWriter)
                or writer._length != reader._remaining):
            return "unspliced"
        # Over the per-user pipe limit the pipe keeps its default 64 KiB: slower only.
        rfd, wfd, room = osio.pipe(SPLICE_PIPE_BYTES)
        try:
            async with self.dst.server.send_lock:  # nothing else writes to DST meanwhile
                return await self._splice_loop(reader, writer, rfd, wfd, room, stall_timeout)
        finally:
            os.close(rfd)
            os.close(wfd)
            src_sock = self.src.socket()
            if src_sock is not None and self._lowat != 1:
                with contextlib.suppress(OSError):  # back to what the read loop expects
                    src_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    async def _splice_loop(self, reader: Any, writer: Any, rfd: int, wfd: int, room: int,
                           stall_timeout: float) -> str:
        # Every byte is accounted to h11 as soon as it moves (READER when it leaves SRC's
        # socket, WRITER when it enters DST's), so the state is right however this ends.
        # Sockets are looked up before each call, never kept across a wait: hypercorn
        # may close one meanwhile, and its descriptor number could be reused.
        in_pipe = 0
        busy = 0
        while reader._remaining or in_pipe:
            src_sock, dst_sock = self.src.socket(), self.dst.socket()
            if src_sock is None:
                return "source closed"
            if dst_sock is None:
                return "destination closed"
            progress = dst_blocked = False
            if reader._remaining and in_pipe < room:
                try:
                    n = osio.splice(src_sock.fileno(), wfd, min(reader._remaining, room - in_pipe),
                                    flags=_SPLICE_FLAGS)
                except BlockingIOError:  # nothing to read, or the pipe is full
                    n = -1
                except OSError:
                    return "source closed"
                if n == 0:
                    return "source closed"
                if n > 0:
                    reader._remaining -= n
                    in_pipe += n
                    progress = True
            if in_pipe:
                try:
                    n = osio.splice(rfd, dst_sock.fileno(), in_pipe, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    n, dst_blocked = 0, True
                except OSError:  # EPIPE, ECONNRESET: the destination is gone
                    return "destination closed"
                if n > 0:
                    writer._length -= n
                    in_pipe -= n
                    self.moved += n
                    self.spliced += n
                    progress = True
            if progress:
                busy += 1
                if busy >= 8:  # let other connections run
                    busy = 0
                    await trio.lowlevel.checkpoint()
                continue
            busy = 0
            # Stuck. With bytes in the pipe that DST will not take, wait for DST (SRC's
            # data waits in its socket meanwhile: that is the back-pressure); otherwise
            # the pipe is empty and SRC has sent nothing yet.
            with trio.move_on_after(stall_timeout) as timer:
                try:
                    if dst_blocked:
                        await trio.lowlevel.wait_writable(dst_sock)
                    else:
                        # Woken for every segment, this loop's scheduler passes would
                        # cost more than the bytes: wait for a useful amount (the
                        # kernel caps it at half the receive buffer, and wakes anyway
                        # under memory pressure, at EOF or on an error).
                        lowat = min(reader._remaining, SPLICE_WAKE_BYTES)
                        if lowat != self._lowat:
                            src_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
                            self._lowat = lowat
                        await trio.lowlevel.wait_readable(src_sock)
                except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
                    return "destination closed" if dst_blocked else "source closed"
            if timer.cancelled_caught:
                return "destination stalled" if dst_blocked else "source stalled"
        return "complete"
