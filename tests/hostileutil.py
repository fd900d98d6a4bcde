"""Helpers of the hostile-input and relay-load tests: raw HTTP over sockets, a fake share
that speaks the control protocol with its own key, log checks and process figures.

    status, head, body = raw_http(url, b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    async with fake_share(relay_url) as fs: ...      # admitted, fs.secret, fs.ws
    async with rogue_relay(real_url) as rogue: ...   # a relay that relays admissions
    assert_logs_clean(proc)                          # no traceback, no 500, no ASGI error
    rss_kib(pid), open_fds(pid)
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_websocket
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kbfs import protocol

# What must never appear in a relay's or share's log, whatever it was sent.
BAD_LOG = re.compile(r"Traceback|internal error|Error in ASGI|Exception in ASGI|"
                     r"Unhandled|TypeError|AttributeError|KeyError|ValueError|IndexError")


def host_port(url: str) -> tuple[str, int]:
    u = urllib.parse.urlsplit(url)
    assert u.hostname and u.port
    return u.hostname, u.port


def raw_http(url: str, data: bytes, timeout: float = 10.0,
             send_timeout: float | None = None) -> tuple[int | None, bytes, bytes]:
    """Send DATA as is on a fresh connection; return (status or None, head, body).

    None means the server closed (or reset) the connection without an answer. Reads
    one response (to its Content-Length) or until the server closes. Raises
    AssertionError when the server neither answers nor closes within TIMEOUT.
    """
    sock = socket.create_connection(host_port(url), timeout=timeout)
    buf = b""
    try:
        sock.settimeout(send_timeout or timeout)
        try:
            sock.sendall(data)
        except OSError:  # the server stopped reading or closed: read what it said
            pass
        sock.settimeout(timeout)
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                raise AssertionError(f"no answer and no close within {timeout}s: {buf[:200]!r}"
                                     ) from None
            except OSError:  # reset
                break
            if not chunk:
                break
            buf += chunk
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if m and len(body) >= int(m.group(1)):
                    break
                if not m and re.search(rb"(?im)^transfer-encoding:", head) is None and (
                        head.split(b" ", 2)[1:2] in ([b"204"], [b"304"])):
                    break
    finally:
        sock.close()
    head, _, body = buf.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return (int(m.group(1)) if m else None), head, body


def get_request(path: bytes | str, *headers: bytes | str, method: str = "GET") -> bytes:
    """A raw HTTP/1.1 request with Connection: close."""
    p = path.encode("latin-1") if isinstance(path, str) else path
    lines = [method.encode() + b" " + p + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [h.encode("latin-1") if isinstance(h, str) else h for h in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def assert_4xx_or_closed(status: int | None, what: object) -> None:
    assert status is None or 400 <= status < 500, (what, status)


def log_text(proc: Any) -> str:
    """Everything a netutil process wrote to stderr (its log)."""
    return proc.proc.stderr()


def assert_logs_clean(proc: Any, since: int = 0) -> None:
    text = log_text(proc)[since:]
    m = BAD_LOG.search(text)
    assert m is None, text[max(0, m.start() - 500): m.start() + 1500] if m else ""


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------- a fake share


@dataclass
class FakeShare:
    ws: trio_websocket.WebSocketConnection
    id: str
    secret: str
    key: Ed25519PrivateKey

    async def send(self, obj: Any) -> None:
        await self.ws.send_message(json.dumps(obj))

    async def next_get(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next `get` message (pongs and others skipped)."""
        with trio.fail_after(timeout):
            while True:
                msg = json.loads(await self.ws.get_message())
                if msg.get("type") == "get":
                    return msg

    async def record(self, into: list[str], answer: str = "silent") -> None:
        """Keep every message the relay sends (raw text) in INTO until the connection
        ends. ANSWER says what to do with a `get`: "silent" ignores it (a share that
        lists content and never serves it), "reject" refuses it with 404 at once."""
        try:
            while True:
                text = await self.ws.get_message()
                into.append(text if isinstance(text, str) else text.decode("latin-1"))
                msg = json.loads(text)
                if msg.get("type") == "get" and answer == "reject":
                    await self.send({"type": "reject", "id": msg["id"], "status": 404,
                                     "message": "not here"})
        except trio_websocket.ConnectionClosed:
            pass


def raw_public_key(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def hello(relay_url: str, challenge_msg: dict[str, Any], key: Ed25519PrivateKey,
          sign_with: Ed25519PrivateKey | None = None, **override: Any) -> dict[str, Any]:
    """A hello for CHALLENGE_MSG claiming KEY's identity, signed by SIGN_WITH (or KEY)."""
    challenge = base64.b64decode(challenge_msg["challenge"])
    host = protocol.websocket_host_header(relay_url)
    public = raw_public_key(key)
    signature = (sign_with or key).sign(protocol.handshake_payload(challenge, host, public))
    msg = {"type": "hello", "version": protocol.CONTROL_VERSION,
           "id": protocol.share_id_from_public_key(public),
           "public_key": base64.b64encode(public).decode(),
           "signature": base64.b64encode(signature).decode(), "host": host,
           "name": "fake", "private": False, "listen_url": "", "root": "/fake"}
    msg.update(override)
    return msg


@asynccontextmanager
async def control_socket(relay_url: str) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    async with trio_websocket.open_websocket_url(
            protocol.websocket_url(relay_url), max_message_size=64 << 20, connect_timeout=5,
            disconnect_timeout=2) as ws:
        yield ws


@asynccontextmanager
async def fake_share(relay_url: str, files: list[list[Any]] | None = None,
                     key: Ed25519PrivateKey | None = None,
                     **hello_fields: Any) -> AsyncIterator[FakeShare]:
    """A share admitted with its own fresh key, publishing FILES (catalogue entries);
    HELLO_FIELDS override those of its hello (e.g. private=True, name=...)."""
    key = key or Ed25519PrivateKey.generate()
    async with control_socket(relay_url) as ws:
        challenge = json.loads(await ws.get_message())
        await ws.send_message(json.dumps(hello(relay_url, challenge, key, **hello_fields)))
        welcome = json.loads(await ws.get_message())
        assert welcome["type"] == "welcome", welcome
        await ws.send_message(json.dumps({"type": "files", "reset": True, "add": files or [],
                                          "remove": [], "scanning": False}))
        yield FakeShare(ws, welcome["id"], welcome["upload_secret"], key)


async def closed_within(ws: trio_websocket.WebSocketConnection, seconds: float) -> bool:
    """True when the relay closes WS within SECONDS (any messages before are skipped)."""
    with trio.move_on_after(seconds):
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed:
            return True
    return False


# ---------------------------------------------------------------- a rogue relay


@dataclass
class RogueRelay:
    """A relay that a share connects to, and that passes the share's admission on to the
    real relay: see `rogue_relay`."""

    url: str  # what to give the share as --relay
    real_url: str
    answers: list[dict[str, Any]] = field(default_factory=list)  # the real relay's to hellos
    admitted: trio.Event = field(default_factory=trio.Event)  # the real relay said welcome


@asynccontextmanager
async def rogue_relay(real_url: str) -> AsyncIterator[RogueRelay]:
    """A websocket server on 127.0.0.1:0 that, for each share connecting to it, opens a
    control connection to REAL_URL carrying the same Host header as the share's (which
    the rogue chooses freely) and forwards every message both ways: the real relay's
    challenge to the share, the share's signed hello to the real relay, the welcome back,
    and the catalogue and everything after. Before admissions were bound to the relay's
    own identity, this got the share admitted at the real relay through the rogue."""
    rogue = RogueRelay("", real_url)
    real_host, real_port = host_port(real_url)

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        share_ws = await request.accept()
        host = protocol.websocket_host_header(rogue.url)  # the Host the share signed
        async with trio.open_nursery() as nursery:
            stream = await trio.open_tcp_stream(real_host, real_port)
            real_ws = await trio_websocket.wrap_client_stream(
                nursery, stream, host, protocol.CONTROL_PATH, max_message_size=64 << 20)

            async def pump(src: trio_websocket.WebSocketConnection,
                           dst: trio_websocket.WebSocketConnection, from_real: bool) -> None:
                try:
                    while True:
                        text = await src.get_message()
                        if from_real:
                            msg = json.loads(text)
                            if msg.get("type") in ("welcome", "refused"):
                                rogue.answers.append(msg)
                                if msg["type"] == "welcome":
                                    rogue.admitted.set()
                        await dst.send_message(text)
                except trio_websocket.ConnectionClosed:
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, share_ws, real_ws, False)
            nursery.start_soon(pump, real_ws, share_ws, True)
        for ws in (share_ws, real_ws):
            with trio.move_on_after(1):
                await ws.aclose()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0,
                                     None)
        rogue.url = f"http://127.0.0.1:{server.port}"
        yield rogue
        nursery.cancel_scope.cancel()
