"""HTTP serving plumbing shared by the relay and a share's `--listen` server.

What both servers need identically and neither may import from the other (they are
sibling adapters): the ASGI guard (request-head cap, CORS on every answer and on
preflight, kbfs errors mapped to 4xx JSON, a bug reduced to one log line and a 500),
JSON answers, header lookup, and the hypercorn configuration with the fixes we apply
to hypercorn 0.18 (a close racing a send, sockets left in CLOSE-WAIT) and the changes
that cut its per-request and per-byte cost (direct socket reads and writes when they
need no wait, no extra copies in h11, a cheaper idle timer).
Nothing here knows shares, relays, files or ranges.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import h11
import h11._receivebuffer
import hypercorn.trio
import hypercorn.trio.tcp_server
import hypercorn.trio.worker_context
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.events import Closed, RawData

from kbfs import protocol
from kbfs.errors import BadRequest, ConfigError, KbfsError, NotFound, RangeError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RECV_CHUNK = 1 << 20  # hypercorn reads 64 KiB per recv() by default: too small for 1 GB/s
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
                  _close_on_client_eof):
        try:
            patch()
        except AttributeError as exc:  # other hypercorn/h11 internals (setup.cfg pins them)
            log.warning("hypercorn/h11 patch %s not applied: %s", patch.__name__, exc)
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim_threshold, 128 << 20)
    except (OSError, AttributeError):  # not glibc: only slower
        pass


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
    send lock, the bytes are first offered to the (non-blocking) socket directly; only
    what it cannot take at once, and every error, goes the usual way. (Hypercorn
    acknowledges a websocket close before it tells the application: with writes this
    quick, an application must act on the disconnect message at once; the relay does.)
    """
    server = hypercorn.trio.tcp_server.TCPServer
    if getattr(server, "_kbfs_guarded", False):
        return
    original = server.protocol_send

    async def protocol_send(self: Any, event: Any) -> None:
        if type(event) is RawData and not self.send_lock.locked():
            raw = getattr(getattr(self.stream, "socket", None), "_sock", None)
            if isinstance(raw, socket.socket) and event.data:
                try:
                    sent = raw.send(event.data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    sent = -1  # broken: let the usual path find out and close
                if sent == len(event.data):
                    return
                if sent > 0:
                    event = RawData(data=memoryview(event.data)[sent:])  # type: ignore[arg-type]
        try:
            await original(self, event)
        except trio.BusyResourceError:
            await self.protocol.handle(Closed())

    server.protocol_send = protocol_send  # type: ignore[method-assign]
    server._kbfs_guarded = True  # type: ignore[attr-defined]


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
    """
    eager = 0
    while True:
        try:
            data = raw.recv(RECV_CHUNK)
        except BlockingIOError:
            eager = 0
            try:
                await trio.lowlevel.wait_readable(raw)
            except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
                break
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
    await server.protocol.handle(Closed())
