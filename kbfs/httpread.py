"""The fetcher's HTTP plumbing: requests to sources, and their answers read with bounds.

`HttpPlumbing` (a mixin of `kbfs.fetch.Fetcher`, which sets the attributes it names) keeps
one keep-alive `http.client` connection per thread and origin for plain-http origins
without a proxy (`_plain_conns`, `plain_request`), and one `requests.Session` per thread
for https, proxies and userinfo URLs (`_session`, proxies looked up once per origin).
`_stream` GETs one byte range into a preallocated buffer: 206 + Content-Range checked
(`_check_range_answer`), the body read one socket read at a time under the deadline, a
read timeout and a throughput floor, each block checked against its leaf as soon as it
is complete (`_read_body`). `_get_small` reads a small answer (find, tree, listing)
refusing more than its limit (`AnswerTooLarge`); an error answer's body is read up to
`ERROR_LIMIT` for its reason (`_reason`). `_Lie` / `_Failed` (and `_SlowStart`) are how
one attempt at a source ended; `_net_why` says a network failure in plain words.

It does not: choose, rank or penalise sources, retry, fall over to another source, or
check proofs (all `kbfs.fetch`; pieces: `kbfs.piecewire`). Its underscore names are
`kbfs.fetch`'s, shared with it only.
"""

from __future__ import annotations

import http.client
import io
import json
import select
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import requests

from kbfs import protocol, tlsconf, tree
from kbfs.errors import BadRequest
from kbfs.sourceurls import origin as _origin

MIN_THROUGHPUT = 256 << 10  # bytes/s below which a transfer is abandoned...
THROUGHPUT_GRACE = 2.0    # ...once it has run this long (slow start, small ranges)
READ_CHUNK = 1 << 20      # bytes per socket read while streaming
POOL_SIZE = 32
ERROR_LIMIT = 4096        # bytes of an error answer read for its reason ({"error": ...})


class _Lie(Exception):
    """A source sent bytes that do not match their leaf (or a 200 for a range)."""


class _Failed(Exception):
    """A source failed to deliver (network, status, short body, too slow).

    args: (why, blocks verified, answered, HTTP status or 0). WHY reads after the
    source's name: "is unreachable (connection refused)", "answered 404: ..."."""


class _SlowStart(_Failed):
    """A source did not start its answer within the time it was given."""


class _SlowAnswer(requests.ConnectionError):
    """A small GET whose answer did not start within the time it was given."""


class Unreachable(requests.ConnectionError):
    """No connection could be made; the message reads after the source's name
    ("is unreachable (connection refused)")."""


class AnswerTooLarge(requests.RequestException):
    """An answer (tree, /api/find, listing) is larger than what it may be."""


def _read_answer(url: str, status: int, length: str | None, read: Any, limit: int) -> bytes:
    """`_read_bounded` for a 200; an error answer's body up to ERROR_LIMIT, else b''."""
    if status == 200:
        return _read_bounded(url, length, read, limit)
    try:
        return _read_bounded(url, length, read, ERROR_LIMIT)
    except AnswerTooLarge:
        return b""


def _read_bounded(url: str, length: str | None, read: Any, limit: int) -> bytes:
    """The body READ(n) gives, at most LIMIT bytes; AnswerTooLarge (naming URL) past it or
    when the Content-Length LENGTH announces more; requests.ConnectionError on I/O errors."""
    if length is not None:
        try:
            announced = int(length)
        except ValueError:
            raise requests.ConnectionError(f"{url}: bad Content-Length {length[:40]!r}") from None
        if announced > limit:
            raise AnswerTooLarge(f"{url}: answer of {announced} bytes (Content-Length), "
                                 f"more than the {limit} expected")
    pieces: list[bytes] = []
    got = 0
    while True:
        try:
            piece = read(min(READ_CHUNK, limit + 1 - got))
        except Exception as exc:  # noqa: BLE001 - OSError, IncompleteRead, urllib3 errors
            raise requests.ConnectionError(f"{url}: {exc.__class__.__name__}: {_short(exc)}"
                                           ) from None
        if not piece:
            return b"".join(pieces)
        pieces.append(piece)
        got += len(piece)
        if got > limit:
            raise AnswerTooLarge(f"{url}: answer larger than the {limit} bytes expected")


def _check_range_answer(status: int, length: str | None, content_range: str | None,
                        start: int, end: int, size: int) -> None:
    """Raise _Lie / _Failed unless the answer is the asked range [START, END) of SIZE bytes."""
    if status == 200:
        # A 200 is only the truth when the range asked for was the whole file.
        if not (start == 0 and end == size and length == str(size)):
            raise _Lie("answered 200 to a range request", 0)
    elif status != 206:
        raise _Failed(f"HTTP {status}", 0, True)
    else:
        try:
            a, b, total = protocol.parse_content_range(content_range or "")
        except BadRequest as exc:
            raise _Lie(str(exc), 0) from None
        if (a, b, total) != (start, end, size):
            raise _Lie(f"Content-Range {a}-{b - 1}/{total}, asked {start}-{end - 1}/{size}", 0)


def _plain_request(conns: dict[str, http.client.HTTPConnection], netloc: str, path: str,
                   headers: dict[str, str],
                   t: float) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """GET PATH from NETLOC over the kept-alive connection in CONNS (made when missing or
    closed by the server); one retry on a fresh connection when a reused one fails."""
    for attempt in (1, 2):
        conn = conns.get(netloc)
        reused = conn is not None and conn.sock is not None and not _dropped(conn.sock)
        if conn is None or not reused:
            if conn is not None:
                conn.close()
            conn = conns[netloc] = http.client.HTTPConnection(netloc, timeout=t)
        conn.timeout = t
        if conn.sock is not None:
            conn.sock.settimeout(t)
        try:
            conn.request("GET", path, headers=headers)
            return conn, conn.getresponse()
        except TimeoutError:
            conn.close()  # the server accepted (or the network ate the SYN) and is silent
            raise _SlowStart(f"no answer within {t:g} s", 0, False) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if not (reused and attempt == 1):  # else: a keep-alive the server had just closed
                raise _Failed(f"is unreachable ({_net_why(exc)})", 0, False) from None
    raise AssertionError("unreachable")


def _dropped(sock: socket.socket) -> bool:
    """True when an idle keep-alive connection was closed by the server (it is readable)."""
    try:
        poller = select.poll()  # not select(): file descriptors may be above 1023
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _direct_reader(r: requests.Response) -> http.client.HTTPResponse | None:
    """The http.client response under R when its body can be read straight into our
    buffer (plain Content-Length body, no decoding); None means use urllib3's read1."""
    fp = getattr(r.raw, "_fp", None)
    if (isinstance(fp, http.client.HTTPResponse) and not fp.chunked
            and isinstance(fp.length, int) and isinstance(fp.fp, io.BufferedReader)
            and not r.headers.get("Content-Encoding")):
        return fp
    return None


def _socket_of(r: requests.Response) -> socket.socket | None:
    """The socket under a streamed response, to bound each read by the deadline."""
    try:
        conn = r.raw.connection
        sock = getattr(conn, "sock", None)
        return sock if isinstance(sock, socket.socket) else None
    except Exception:  # noqa: BLE001 - no socket: rely on the request's read timeout
        return None


def _reason(status: int, body: bytes) -> str:
    """What an error answer says, in one short printable line: its JSON `error`, else
    the first line of its text, else the bare status."""
    text = ""
    try:
        obj = json.loads(body)
        if isinstance(obj, dict) and isinstance(obj.get("error"), str):
            text = obj["error"]
    except ValueError:
        text = body[:300].decode("utf-8", "replace").strip().split("\n", 1)[0]
    text = "".join(c if c.isprintable() else "?" for c in text).strip()[:240]
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


def _net_why(exc: BaseException) -> str:
    """A network failure in plain words: 'connection refused', 'host not found', ..."""
    tls = tlsconf.advice(exc)  # a refused certificate says what to do about it
    if tls:
        return tls
    seen: BaseException | None = exc
    texts = []
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, socket.gaierror):
            return "host name not found"
        if isinstance(seen, ConnectionResetError):
            return "connection reset"
        if isinstance(seen, TimeoutError | socket.timeout):
            return "no answer (timed out)"
        texts.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    text = " ".join(texts).lower()
    for needle, why in (("refused", "connection refused"), ("name or service", "host name not found"),
                        ("nodename nor servname", "host name not found"),
                        ("temporary failure in name", "host name not found"),
                        ("reset by peer", "connection reset"), ("timed out", "no answer (timed out)"),
                        ("no route", "no route to host"), ("unreachable", "network unreachable"),
                        ("certificate", "TLS certificate refused")):
        if needle in text:
            return why
    return f"{exc.__class__.__name__}: {_short(exc)}"


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 160 else text[:157] + "..."


class HttpPlumbing:
    """The HTTP methods of `kbfs.fetch.Fetcher`; the Fetcher's `__init__` sets these."""

    timeout: float
    min_throughput: float
    _lock: threading.Lock
    _tls: threading.local
    _sessions: list[requests.Session]
    _proxies: dict[str, dict[str, str]]
    _plain: list[dict[str, http.client.HTTPConnection]]

    def _session(self) -> requests.Session:
        s: requests.Session | None = getattr(self._tls, "session", None)
        if s is None:
            s = requests.Session()
            # Proxies from the environment are looked up once per origin (`_get`), not
            # on every request: with trust_env requests re-reads the environment and
            # stats ~/.netrc per request, a few tenths of a millisecond of each 4 KiB read.
            s.trust_env = False
            # The CAs: tlsconf's context (system store, SSL_CERT_FILE, REQUESTS_CA_BUNDLE).
            adapter = tlsconf.Adapter(pool_connections=POOL_SIZE, pool_maxsize=POOL_SIZE,
                                      max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            self._tls.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def _get(self, url: str, **kw: Any) -> requests.Response:
        return self._session().get(url, proxies=self._proxies_of(url), **kw)

    def _stream(self, url: str, start: int, end: int, size: int, first: int,
                leaves: Sequence[bytes] | None, block_size: int, out: memoryview,
                until: float, head: float, auth: str | None = None,
                extra: Mapping[str, str] | None = None,
                on_head: Any = None) -> tuple[int, int]:
        """GET bytes [START, END) of URL into OUT, each block checked against LEAVES as it
        completes (None: no check, the caller verifies the whole, e.g. by a proof). EXTRA:
        more request headers; ON_HEAD(getheader), when given, sees the answer's headers
        after its status and Content-Range passed, before the body is read, and may raise
        to abandon it (the connection is then closed, never reused)."""
        want = end - start
        remaining = until - time.monotonic()
        if remaining <= 0:
            raise _Failed("deadline passed", 0, False)
        t = min(self.timeout, remaining, head)  # until the answer's head; _read_body after
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        if auth:
            headers["Authorization"] = f"Bearer {auth}"
        headers.update(extra or {})
        if self._plain_ok(url):
            return self._stream_plain(url, headers, t, start, end, size, first, leaves,
                                      block_size, out, until, on_head)
        try:
            r = self._get(url, headers=headers, stream=True, timeout=(t, t))
        except (requests.ConnectTimeout, requests.ReadTimeout):
            raise _SlowStart(f"no answer within {t:g} s", 0, False) from None
        except requests.RequestException as exc:
            raise _Failed(f"is unreachable ({_net_why(exc)})", 0, False) from None
        with r:
            if r.status_code not in (200, 206):
                body = _read_answer(url, r.status_code, r.headers.get("Content-Length"),
                                    r.raw.read, ERROR_LIMIT)
                raise _Failed(_reason(r.status_code, body), 0, True, r.status_code)
            _check_range_answer(r.status_code, r.headers.get("Content-Length"),
                                r.headers.get("Content-Range"), start, end, size)
            if on_head is not None:
                on_head(r.headers.get)
            direct = _direct_reader(r)
            if direct is not None:
                got = self._read_body(direct, None, _socket_of(r), want, first, leaves,
                                      block_size, out, until)
                # The body was read under http.client's bookkeeping: let it see the end
                # (length 0), then hand the connection back to urllib3's pool for keep-alive.
                try:
                    direct.read(0)
                    r.raw.release_conn()
                except Exception:  # noqa: BLE001 - a lost keep-alive is not an error
                    pass
                return got
            return self._read_body(None, r.raw.read1, _socket_of(r), want, first, leaves,
                                   block_size, out, until)

    def _stream_plain(self, url: str, headers: dict[str, str], t: float, start: int, end: int,
                      size: int, first: int, leaves: Sequence[bytes] | None, block_size: int,
                      out: memoryview, until: float, on_head: Any = None) -> tuple[int, int]:
        """`_stream` over this thread's own keep-alive `http.client` connection to URL's
        origin: for plain http without a proxy, requests' per-request machinery (hooks,
        adapters, header merging, urllib3's pool) costs more CPU than the 4 KiB read a
        FUSE reader asked for. Same checks, same streaming verification."""
        netloc, _, path = url.partition("://")[2].partition("/")
        conn, resp = _plain_request(self._plain_conns(), netloc, "/" + path, headers, t)
        ok = False
        try:
            if resp.status not in (200, 206):
                body = _read_answer(url, resp.status, resp.getheader("Content-Length"),
                                    resp.read, ERROR_LIMIT)
                raise _Failed(_reason(resp.status, body), 0, True, resp.status)
            _check_range_answer(resp.status, resp.getheader("Content-Length"),
                                resp.getheader("Content-Range"), start, end, size)
            if on_head is not None:
                on_head(resp.getheader)
            if (resp.chunked or not isinstance(resp.length, int)
                    or resp.getheader("Content-Encoding") or not isinstance(resp.fp, io.BufferedReader)):
                raise _Failed("answer without a plain Content-Length body", 0, True)
            got = self._read_body(resp, None, conn.sock, end - start, first, leaves, block_size,
                                  out, until)
            resp.read(0)  # let http.client see the end of the body
            ok = resp.isclosed()
            return got
        finally:
            resp.close()
            if not ok:
                conn.close()  # never reuse a connection with a body left unread

    def _plain_conns(self) -> dict[str, http.client.HTTPConnection]:
        """This thread's keep-alive http.client connections, by host:port."""
        conns: dict[str, http.client.HTTPConnection] | None = getattr(self._tls, "plain", None)
        if conns is None:
            conns = self._tls.plain = {}
            with self._lock:
                self._plain.append(conns)
        return conns

    def _plain_ok(self, url: str) -> bool:
        """May URL go over a plain http.client connection (http, no proxy, no userinfo)?"""
        return url.startswith("http://") and "@" not in _origin(url) and not self._proxies_of(url)

    def _get_small(self, url: str, t: float, limit: int,
                   head: float | None = None, auth: str | None = None) -> tuple[int, bytes]:
        """(status, body) of a small GET (find, tree, listing): the body is streamed and
        refused (AnswerTooLarge) past LIMIT bytes, or at once when its Content-Length says
        so; an error answer's body is read up to ERROR_LIMIT (for its reason, `_reason`)
        and dropped past it. The answer must start within HEAD seconds (default T).
        AUTH: a bearer token to send. requests' exceptions; `Unreachable` when no
        connection could be made."""
        head = t if head is None else min(head, t)
        headers = {"Accept-Encoding": "identity"}
        if auth:
            headers["Authorization"] = f"Bearer {auth}"
        if not self._plain_ok(url):
            try:
                r = self._get(url, headers=headers, timeout=(head, head), stream=True)
            except (requests.ConnectTimeout, requests.ReadTimeout):
                raise _SlowAnswer(f"{url}: no answer within {head:g} s") from None
            except requests.ConnectionError as exc:
                raise Unreachable(f"is unreachable ({_net_why(exc)})") from None
            with r:
                sock = _socket_of(r)
                if sock is not None:
                    sock.settimeout(t)
                return r.status_code, _read_answer(
                    url, r.status_code, r.headers.get("Content-Length"),
                    lambda n: r.raw.read(n, decode_content=True), limit)
        netloc, _, path = url.partition("://")[2].partition("/")
        try:
            conn, resp = _plain_request(self._plain_conns(), netloc, "/" + path, headers, head)
        except _SlowStart as exc:
            raise _SlowAnswer(f"{url}: {exc.args[0]}") from None
        except _Failed as exc:
            raise Unreachable(exc.args[0]) from None
        done = False
        try:
            if conn.sock is not None:
                conn.sock.settimeout(t)
            body = _read_answer(url, resp.status, resp.getheader("Content-Length"), resp.read,
                                limit)
            resp.read(0)
            done = resp.isclosed()
        finally:
            resp.close()
            if not done:
                conn.close()  # never reuse a connection with a body left unread
        return resp.status, body

    def _proxies_of(self, url: str) -> dict[str, str]:
        origin = _origin(url)
        proxies = self._proxies.get(origin)
        if proxies is None:
            proxies = self._proxies[origin] = requests.utils.get_environ_proxies(url)
        return proxies

    def _read_body(self, direct: http.client.HTTPResponse | None,
                   read1: Any, sock: socket.socket | None, want: int, first: int,
                   leaves: Sequence[bytes] | None, block_size: int, out: memoryview,
                   until: float) -> tuple[int, int]:
        """Read WANT body bytes into OUT, verifying each block as soon as it is complete
        (LEAVES None: no check here; blocks verified is then always 0).

        DIRECT: an http.client response whose buffered reader we read straight into OUT;
        else READ1(n) returns the next piece. Returns (blocks verified, bytes read).
        """
        got = 0
        verified = 0
        t0 = time.monotonic()
        while got < want:
            now = time.monotonic()
            if now >= until:
                raise _Failed(f"deadline passed after {got} of {want} bytes", verified, True)
            elapsed = now - t0
            if elapsed > THROUGHPUT_GRACE and got / elapsed < self.min_throughput:
                raise _Failed(f"too slow: {got} bytes in {elapsed:.1f} s", verified, True)
            if sock is not None:
                # Shrink the socket timeout as the deadline nears so one stalled read
                # cannot carry the call past it.
                sock.settimeout(max(0.05, min(self.timeout, until - now, THROUGHPUT_GRACE * 2)))
            try:
                # One socket read per step (readinto1/read1, never a blocking fill of the
                # whole buffer) so a trickling source is seen as slow, not waited for.
                if direct is not None:
                    n = direct.fp.readinto1(out[got:min(want, got + READ_CHUNK)])
                    direct.length -= n  # type: ignore[operator]  # checked int above
                else:
                    piece = read1(min(READ_CHUNK, want - got))
                    n = len(piece)
                    out[got:got + n] = piece
            except Exception as exc:  # noqa: BLE001 - OSError, IncompleteRead, urllib3 errors
                raise _Failed(f"{exc.__class__.__name__} after {got} of {want} bytes",
                              verified, True) from None
            if not n:
                raise _Failed(f"short body: {got} of {want} bytes", verified, True)
            got += n
            # Verify each block as soon as it is complete, so a lie stops the transfer early.
            while leaves is not None and verified * block_size < got and (
                    (verified + 1) * block_size <= got or got == want):
                lo = verified * block_size
                hi = min(lo + block_size, want)
                if not tree.block_matches(out[lo:hi], leaves[first + verified]):
                    raise _Lie(f"block {first + verified} does not match its leaf", verified)
                verified += 1
        return verified, got
