"""`kbfs relay --trust-proxy`: the client address and scheme from the reverse proxy.

Behind nginx or Caddy every connection comes from the proxy, so the relay's log lines
(and anything keyed by the peer) would name the proxy. With `TrustProxy` around the
app, a request's `client` becomes the last `X-Forwarded-For` entry (the one the trusted
proxy appended: entries before it are whatever the client sent and prove nothing) and
its `scheme` the `X-Forwarded-Proto` (http/https only). A value that is not an IP
address is ignored (the connection's own address stays). Without `--trust-proxy` the
headers are never read: anyone can send them.

Not hypercorn's ProxyFixMiddleware: it deep-copies each scope, and the relay's scopes
carry the connection objects its body splice needs (`httpserve.HTTP1_EXTENSION`); this
one copies the scope's top level only. It does not: check that the request came from
the proxy (bind the relay to loopback or firewall it, as docs/deploy.md says).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Scope]]
Send = Callable[[Scope], Awaitable[None]]


def _last(headers: Any, name: bytes) -> str | None:
    value = None
    for key, raw in headers:
        if key.lower() == name:
            value = raw  # several header lines: the last one is the nearest proxy's
    if value is None:
        return None
    return value.decode("latin-1").rsplit(",", 1)[-1].strip()


def forwarded(scope: Scope) -> Scope:
    """SCOPE with client and scheme taken from the proxy's X-Forwarded-* headers (a
    shallow copy; SCOPE itself when there is nothing to take)."""
    headers = scope.get("headers") or []
    changes: dict[str, Any] = {}
    client = _last(headers, b"x-forwarded-for")
    if client:
        try:
            address = str(ipaddress.ip_address(client.strip("[]")))
            changes["client"] = (address, 0)
        except ValueError:
            pass
    proto = _last(headers, b"x-forwarded-proto")
    if proto and proto.lower() in ("http", "https"):
        tls = proto.lower() == "https"
        if scope.get("type") == "websocket":
            changes["scheme"] = "wss" if tls else "ws"
        else:
            changes["scheme"] = "https" if tls else "http"
    if not changes:
        return scope
    return {**scope, **changes}


class TrustProxy:
    """ASGI middleware: APP sees `forwarded(scope)` for http and websocket requests."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") in ("http", "websocket"):
            scope = forwarded(scope)
        await self.app(scope, receive, send)
