"""The way out for a share's own connections: straight, or through an HTTP proxy.

`proxy_for(url)` reads the environment as curl and requests do: `HTTPS_PROXY` for https
and wss URLs, `HTTP_PROXY` for http and ws ones (lower-case names too), `NO_PROXY`
(host names, domain suffixes, `*`) wins over both. The proxy is always asked for a
tunnel (`CONNECT host:port`), for plain http relays too: the share's uploads are long
POSTs streamed on a kept-alive connection, which a forwarding proxy would buffer or cut,
and a tunnel carries TLS end to end, so the proxy never sees a token or a byte. User
info in the proxy URL becomes `Proxy-Authorization: Basic`.

`open_websocket(url, ...)` opens the share's control websocket (wss verified with
`tlsconf.client_context`), through the tunnel when there is a proxy; `http_connection`
makes the `http.client` connection for the uploads the same way.

It does not: speak TLS to the proxy itself (an `https://` proxy URL is refused with one
line), retry, or serve readers (they go through `requests`, which reads the same
variables; `kbfs.httpread` keeps its plain fast path only when no proxy applies).
"""

from __future__ import annotations

import base64
import http.client
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
import trio_websocket

from kbfs import tlsconf
from kbfs.errors import ConfigError

MAX_PROXY_HEAD = 16 * 1024  # bytes of the proxy's answer to CONNECT
_bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # NO_PROXY


class ProxyRefused(OSError):
    """The proxy would not open the tunnel (its status line is the message)."""


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    auth: str  # "Basic ..." or ""

    def __str__(self) -> str:
        return f"http://{self.host}:{self.port}"


def proxy_for(url: str) -> Proxy | None:
    """The proxy the environment names for URL (http(s):// or ws(s)://), or None for a
    direct connection (no variable, or NO_PROXY matches the host). ConfigError for a
    proxy URL kbfs cannot use."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    host = parts.hostname or ""
    proxies = urllib.request.getproxies_environment()
    value = proxies.get(scheme)
    if not value or not host:
        return None
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if _bypass(netloc, proxies) or (netloc != host and _bypass(host, proxies)):
        return None
    name = f"{scheme}_proxy".upper()
    if "://" not in value:
        value = "http://" + value
    p = urllib.parse.urlsplit(value)
    if p.scheme != "http" or not p.hostname:
        raise ConfigError(f"{name}={value[:80]}: expected http://HOST:PORT (kbfs talks plain "
                          "HTTP to the proxy and tunnels through it with CONNECT)")
    try:
        port = p.port or 8080
    except ValueError:
        raise ConfigError(f"{name}={value[:80]}: bad port") from None
    auth = ""
    if p.username is not None:
        pair = f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
        auth = "Basic " + base64.b64encode(pair.encode()).decode()
    return Proxy(p.hostname, port, auth)


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def open_tunnel(proxy: Proxy, host: str, port: int) -> trio.SocketStream:
    """A TCP stream to HOST:PORT through PROXY's CONNECT (ProxyRefused when it says no)."""
    stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    try:
        target = _authority(host, port)
        head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        if proxy.auth:
            head += f"Proxy-Authorization: {proxy.auth}\r\n"
        await stream.send_all((head + "\r\n").encode("ascii"))
        buf = b""
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_PROXY_HEAD:
                raise ProxyRefused(f"proxy {proxy}: answer head too long")
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise ProxyRefused(f"proxy {proxy} closed the connection")
            buf += chunk
        status_line, _, rest = buf.partition(b"\r\n")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[1].startswith(b"2"):
            shown = status_line[:100].decode("latin-1")
            raise ProxyRefused(f"proxy {proxy} refused the tunnel to {target}: {shown}")
        if rest.partition(b"\r\n\r\n")[2]:  # the relay speaks only after us
            raise ProxyRefused(f"proxy {proxy} sent bytes after its answer")
    except BaseException:
        await stream.aclose()
        raise
    return stream


@asynccontextmanager
async def open_websocket(url: str, *, max_message_size: int, connect_timeout: float,
                         disconnect_timeout: float
                         ) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """The websocket at URL (ws:// or wss://), through the environment's proxy if any."""
    parts = urllib.parse.urlsplit(url)
    tls = parts.scheme == "wss"
    ctx = tlsconf.client_context() if tls else None
    proxy = proxy_for(url)
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    host_header = host if port == (443 if tls else 80) else f"{host}:{port}"
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    async with trio.open_nursery() as nursery:
        with trio.fail_after(connect_timeout):
            tcp = (await open_tunnel(proxy, host, port) if proxy is not None
                   else await trio.open_tcp_stream(host, port))
            stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = tcp
            if ctx is not None:
                # The handshake here, not left to trio-websocket: there a refused
                # certificate surfaces only as a connect timeout.
                ssl_stream = trio.SSLStream(tcp, ctx, server_hostname=host,
                                            https_compatible=True)
                try:
                    await ssl_stream.do_handshake()
                except BaseException:
                    await tcp.aclose()
                    raise
                stream = ssl_stream
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, host_header, resource, max_message_size=max_message_size)
        try:
            yield ws
        finally:
            with trio.move_on_after(disconnect_timeout):
                await ws.aclose()
            nursery.cancel_scope.cancel()


def http_connection(https: bool, host: str, port: int | None,
                    timeout: float) -> http.client.HTTPConnection:
    """An unconnected http.client connection to HOST:PORT (tunnelled through the
    environment's proxy if any; https verified with `tlsconf.client_context`)."""
    port = port or (443 if https else 80)
    proxy = proxy_for(f"{'https' if https else 'http'}://{_authority(host, port)}/")
    at_host, at_port = (proxy.host, proxy.port) if proxy else (host, port)
    conn: http.client.HTTPConnection
    if https:
        conn = http.client.HTTPSConnection(at_host, at_port, timeout=timeout,
                                           context=tlsconf.client_context())
    else:
        conn = http.client.HTTPConnection(at_host, at_port, timeout=timeout)
    if proxy is not None:
        conn.set_tunnel(host, port, headers={"Proxy-Authorization": proxy.auth}
                        if proxy.auth else None)
    return conn
