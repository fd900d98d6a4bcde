"""The URLs a reader uses for a source, checked and built as plain strings.

`direct_base` accepts a direct URL a relay's `/api/find` listed only in the form
`http(s)://host[:port][/plain/prefix]/sha1/{sha1}` (at most `MAX_URL` printable ASCII
characters; no userinfo, query, fragment, dot segments or escapes) and gives the base
the caller builds its `/sha1/` and `/tree/` URLs from; `tree_url` is the `/tree/` URL
beside a `/sha1/` one; `origin` is the `scheme://host:port` a source's health is kept
under.

It does not: touch the network, rank sources (`Fetcher._rank`), or decide where a token
may go (`fetch._direct_auth`).
"""

from __future__ import annotations

import re

from kbfs import protocol

MAX_URL = 2048            # characters of a direct URL taken from /api/find


def origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


# A direct URL's host: a DNS name or IPv4 address, or an IPv6 literal; an optional port.
_NETLOC_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\])"
                        r"(?::(?P<port>[0-9]{1,5}))?$")
# A path prefix before /sha1/{sha1} (a --public-url behind a proxy): plain segments only.
_PREFIX_RE = re.compile(r"^(?:/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)*$")


def direct_base(url: str, sha1: str) -> tuple[str | None, str]:
    """(base, '') when URL is a usable content URL of SHA1 as /api/find lists it:
    `http(s)://HOST[:PORT][/PREFIX]/sha1/{sha1}`, nothing else (no userinfo, query,
    fragment, dot segments, escapes or control characters; at most MAX_URL characters).
    BASE is `scheme://host[:port][/prefix]`: the caller builds /sha1/ and /tree/ URLs
    from it. (None, why) otherwise."""
    if not isinstance(url, str) or len(url) > MAX_URL:
        return None, "too long"
    if not url.isascii() or not url.isprintable() or " " in url:
        return None, "characters outside printable ASCII"
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        return None, "not an http:// or https:// URL"
    if "?" in rest or "#" in rest:
        return None, "has a query or fragment"
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        return None, "has userinfo"
    m = _NETLOC_RE.match(netloc)
    if m is None:
        return None, "not a host[:port]"
    if m.group("port") is not None and not 0 < int(m.group("port")) < 65536:
        return None, "bad port"
    suffix = protocol.SHA1_PATH.format(sha1=sha1)
    path = slash + path
    if not path.endswith(suffix):
        return None, f"path does not end in {protocol.SHA1_PATH}"
    prefix = path[: -len(suffix)]
    if not _PREFIX_RE.match(prefix):
        return None, "path prefix is not plain segments"
    return f"{scheme}://{netloc}{prefix}", ""


def tree_url(url: str, sha1: str) -> str | None:
    """The /tree/ URL next to a /sha1/ content URL (share and relay serve both)."""
    suffix = protocol.SHA1_PATH.format(sha1=sha1)
    if url.endswith(suffix):
        return url[: -len(suffix)] + protocol.TREE_PATH.format(sha1=sha1)
    return None
