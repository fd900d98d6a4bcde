"""kbfs's HTTP server layer (kbfs/httpserve.py: hypercorn with kbfs's patches) served
in-process on 127.0.0.1 with a tiny ASGI app, talked to over a raw socket: what the relay
and the share rely on that is easier to pin down here than through whole processes."""

from __future__ import annotations

import socket
from typing import Any

import trio

from kbfs import httpserve

BODY = 4 << 20  # far more than hypercorn's receive queue holds (10 chunks of <= 64 KiB)


async def _answer_without_reading(scope: Any, receive: Any, send: Any) -> None:
    """Answers a request after a pause, never reading its body (like the relay refusing
    an upload it will not take, or ending one whose reader went away)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await trio.sleep(0.5)  # the client's body fills the server's receive queue meanwhile
    await httpserve.send_json(send, 410, {"error": "not taken"})


def _post_big_body(base: str) -> tuple[bytes, bool]:
    """POST a BODY-byte body on a keep-alive connection; returns the answer's first bytes
    and whether the server then closed the connection (within 10 s)."""
    host, _, port = base.removeprefix("http://").partition(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    try:
        sock.sendall(f"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: {BODY}\r\n\r\n".encode())
        chunk = b"\0" * (64 << 10)
        sent = 0
        try:
            while sent < BODY:
                sent += sock.send(chunk[:BODY - sent])
        except OSError:
            pass  # the server may close before taking the whole body: that is fine
        answer = b""
        closed = False
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    closed = True
                    break
                answer += data
        except TimeoutError:
            pass  # open after 10 s: the connection was left hanging
        except OSError:
            closed = True  # reset: closed too
        return answer, closed
    finally:
        sock.close()


def test_answer_without_reading_a_big_body_closes_the_connection() -> None:
    """Hypercorn delivers `http.disconnect` into the app's receive queue when a request's
    stream ends; with the queue full of unread body chunks its wait for room never ended,
    and the connection stayed open, unserved (a share's next upload sent into it waited for
    ever: found by test_hostile). The server must answer and then close the connection,
    since the rest of the body will not be read."""

    async def main() -> None:
        config = httpserve.hypercorn_config("127.0.0.1", 0)
        async with trio.open_nursery() as nursery:
            base = await nursery.start(httpserve.serve, _answer_without_reading, config,
                                       "127.0.0.1", 0)
            for _ in range(3):  # and the server stays able to serve
                answer, closed = await trio.to_thread.run_sync(_post_big_body, base)
                assert answer.startswith(b"HTTP/1.1 410"), answer[:200]
                assert closed, "the connection was left open after the answer"
            nursery.cancel_scope.cancel()

    trio.run(main)
