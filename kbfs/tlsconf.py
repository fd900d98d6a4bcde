"""TLS settings: the relay's own certificate, and what clients trust.

Server side: `check_server_files` loads a `--certfile`/`--keyfile` pair once at start,
so a missing, unreadable or mismatched pair is one ConfigError line before anything
listens (hypercorn itself would fail later with a traceback).

Client side: `client_context` is the one SSLContext every kbfs client uses (the share's
websocket and uploads, readers through `requests` via `Adapter`): the system store
(OpenSSL's default paths, which honour `SSL_CERT_FILE` / `SSL_CERT_DIR`), plus the file
named by `REQUESTS_CA_BUNDLE` or `CURL_CA_BUNDLE` (a private CA: added, not instead of
the system store), plus certifi's bundle when the system store is empty (macOS, minimal
containers). Host names and expiry are checked (CERT_REQUIRED, check_hostname).
`advice` turns a certificate failure into one line saying what to do.

It does not: choose proxies (`kbfs.proxyconf`), open connections, or ever turn
verification off (there is no "insecure" switch on purpose).
"""

from __future__ import annotations

import os
import ssl
import threading
from typing import Any

from requests.adapters import HTTPAdapter

from kbfs.errors import ConfigError

CA_ENV = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")  # extra CA files, as requests reads them

_lock = threading.Lock()
_context: ssl.SSLContext | None = None
_context_key: tuple[str | None, ...] = ()


def check_server_files(certfile: str, keyfile: str) -> None:
    """ConfigError (one line) unless CERTFILE and KEYFILE load as a certificate chain and
    its private key."""
    for option, path in (("--certfile", certfile), ("--keyfile", keyfile)):
        if not os.path.isfile(path):
            raise ConfigError(f"{option} {path}: no such file")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{option} {path}: not readable by this user")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        raise ConfigError(f"--certfile {certfile} / --keyfile {keyfile}: not a PEM certificate "
                          f"and its key ({exc.reason or exc})") from None
    except OSError as exc:
        raise ConfigError(f"--certfile {certfile} / --keyfile {keyfile}: {exc.strerror or exc}"
                          ) from None


def _env_key() -> tuple[str | None, ...]:
    return tuple(os.environ.get(name) for name in (*CA_ENV, "SSL_CERT_FILE", "SSL_CERT_DIR"))


def client_context() -> ssl.SSLContext:
    """The SSLContext for connections to relays, shares and mirrors (made once; made
    again when the CA variables change, so a test or a long process sees new values)."""
    global _context, _context_key
    key = _env_key()
    with _lock:
        if _context is not None and key == _context_key:
            return _context
        ctx = ssl.create_default_context()  # system store; SSL_CERT_FILE/DIR honoured
        if not ctx.get_ca_certs() and not os.environ.get("SSL_CERT_DIR"):
            try:
                import certifi  # a dependency of requests

                ctx.load_verify_locations(certifi.where())
            except (ImportError, OSError, ssl.SSLError):
                pass
        for name in CA_ENV:
            path = os.environ.get(name)
            if path:
                try:
                    if os.path.isdir(path):
                        ctx.load_verify_locations(capath=path)
                    else:
                        ctx.load_verify_locations(cafile=path)
                except (OSError, ssl.SSLError) as exc:
                    raise ConfigError(f"{name}={path}: not a readable PEM CA file "
                                      f"({getattr(exc, 'strerror', None) or exc})") from None
                break  # requests' rule: REQUESTS_CA_BUNDLE first, else CURL_CA_BUNDLE
        _context, _context_key = ctx, key
        return ctx


class Adapter(HTTPAdapter):
    """A requests adapter whose https connections (direct and through a proxy's tunnel)
    verify with `client_context` rather than certifi's bundle alone."""

    def init_poolmanager(self, *args: Any, **kw: Any) -> None:
        kw["ssl_context"] = client_context()
        super().init_poolmanager(*args, **kw)

    def proxy_manager_for(self, proxy: str, **kw: Any) -> Any:
        kw["ssl_context"] = client_context()
        return super().proxy_manager_for(proxy, **kw)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        if verify is True and url.lower().startswith("https"):
            # The context holds the trusted CAs; requests would add certifi's file to it
            # on every connection (ca_certs), mutating the shared context.
            conn.cert_reqs = "CERT_REQUIRED"
            conn.ca_certs = None
            conn.ca_cert_dir = None
            return
        super().cert_verify(conn, url, verify, cert)


def session() -> Any:
    """A requests.Session whose https verification uses `client_context` (proxies and
    the rest of the environment as requests reads it)."""
    import requests

    s = requests.Session()
    adapter = Adapter()
    s.mount("https://", adapter)
    return s


def _verify_error(exc: BaseException | None) -> ssl.SSLCertVerificationError | None:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return e
        todo.extend([e.__cause__, e.__context__])
        todo.extend(a for a in getattr(e, "args", ())[:3] if isinstance(a, BaseException))
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
    return None


def advice(exc: BaseException, where: str = "") -> str | None:
    """One line saying why WHERE's certificate was refused and what to do, or None when
    EXC is not a certificate failure."""
    err = _verify_error(exc)
    if err is None:
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" not in text and "certificate verify failed" not in text:
            return None
        message = text
    else:
        message = str(err.verify_message or err.reason or err)
    at = f"{where}: " if where else ""
    low = message.lower()
    if "hostname mismatch" in low or "ip address mismatch" in low or "doesn't match" in low:
        return (f"{at}TLS certificate refused: it is not for this host name ({message}); "
                "use the host name the certificate was issued for")
    if "expired" in low or "not yet valid" in low:
        return (f"{at}TLS certificate refused: {message}; the server's operator must renew "
                "it (or this machine's clock is wrong)")
    if "self-signed" in low or "self signed" in low or "local issuer" in low or "unknown ca" in low:
        return (f"{at}TLS certificate refused: {message}; for a private CA set "
                "SSL_CERT_FILE (or REQUESTS_CA_BUNDLE) to its PEM file")
    return f"{at}TLS certificate refused: {message}"
