"""kbfs links: the one parser and the one writer of `kbfs://` and `kbfs+https://` URLs.

    kbfs://HOST:PORT/SHARE_ID/PATH            a share on the relay at http://HOST:PORT
    kbfs+https://HOST[:PORT]/SHARE_ID/PATH    a share on the relay at https://HOST[:PORT]
    kbfs://HOST:PORT/, kbfs+https://HOST/     a relay (the shares it lists: `kbfs ls`)

`kbfs://` keeps meaning plain http with an explicit port, so every link printed before
https relays existed still works. `kbfs+https://` (the `git+https` / `svn+ssh` spelling:
kbfs over https) takes the port https does, 443 when none is written. PATH is
percent-encoded (`link` writes it so; `parse` decodes it once, then `protocol.safe_relpath`
refuses '..', NUL and backslash).

Refused, each with one line that never echoes a user name or password: a user name or
password (`kbfs://u:p@h:1/...`: it would go to the relay as HTTP basic auth), a missing,
zero, signed or out-of-range port, a malformed host, a malformed share id, an unsafe path,
a scheme in upper or mixed case (`KBFS://`: every tool that reads links, the JS reader
too, matches the lower-case prefix, so one spelling is taken everywhere) and
`kbfs+http://` (say `kbfs://`: one spelling per relay, so caches and token rules that key
on the link's relay see one URL).

The relay URL a link gives is canonical (`canonical_relay`: no default port, no trailing
slash), the form `config.normalize_relay` gives a configured relay, so a token the config
file files under `https://HOST:PORT` applies to exactly the links naming that relay
(`config.Settings.tokens_for`) and never to `kbfs://HOST:PORT` (plain http) or another port.

Pure functions: no network, no listing (whether the share or path exists is the relay's
answer, read by `kbfs.client` and `kbfs.bulk`).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from kbfs.errors import BadRequest

HTTP_SCHEME = "kbfs://"          # the relay speaks http; the port is always written
HTTPS_SCHEME = "kbfs+https://"   # the relay speaks https; port 443 unless written
SCHEMES = (HTTP_SCHEME, HTTPS_SCHEME)
SYNTAX = "kbfs://HOST:PORT/SHARE_ID/PATH (http relay) or kbfs+https://HOST[:PORT]/SHARE_ID/PATH"

_PORT_RE = re.compile(r"[0-9]{1,5}\Z")  # ASCII digits only: int() takes '+1', ' 1', '１'
_DEFAULT_PORT = {"http": 80, "https": 443}


class Link(NamedTuple):
    relay: str   # canonical relay URL: http://HOST:PORT or https://HOST[:PORT]
    share: str   # "" when the link names only a relay
    path: str    # share-relative, decoded and safe ("" for the share's top folder)


def is_link(text: str) -> bool:
    """Whether TEXT claims to be a kbfs link: its scheme is `kbfs` or `kbfs+...` in any
    case. Callers send such text to `parse`, which takes the two spellings and says what is
    wrong with any other (rather than "unknown kind of source")."""
    scheme, sep, _ = text.partition("://")
    low = scheme.lower()
    return bool(sep) and (low == "kbfs" or low.startswith("kbfs+"))


def names_relay(text: str) -> bool:
    """Whether TEXT is a kbfs link with nothing after its host (a relay, not a share)."""
    return is_link(text) and "/" not in text.partition("://")[2].rstrip("/")


def _shown(text: str) -> str:
    """TEXT for an error line: no user name or password, no control characters, bounded."""
    text = re.sub(r"(://)[^/@]*@", r"\1", text)
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text[:120] + ("…" if len(text) > 120 else "")


def _scheme_of(text: str) -> str:
    """'http' or 'https' for a link in one of the two spellings, else BadRequest."""
    if text.startswith(HTTP_SCHEME):
        return "http"
    if text.startswith(HTTPS_SCHEME):
        return "https"
    scheme = text.partition("://")[0]
    low = scheme.lower()
    if low + "://" in SCHEMES:
        raise BadRequest(f"{_shown(text)}: write the scheme in lower case, {low}://")
    if low == "kbfs+http":
        raise BadRequest(f"{_shown(text)}: a link to an http relay is kbfs://HOST:PORT/... "
                         "(kbfs+https:// for https)")
    raise BadRequest(f"{_shown(text)}: unknown kind of kbfs link; expected {SYNTAX}")


def canonical_relay(url: str) -> str:
    """URL (`scheme://host[:port]`, no path) without a trailing slash or its scheme's
    default port: the one spelling of a relay that token and cache keys compare."""
    url = url.rstrip("/")
    scheme, sep, host = url.partition("://")
    default = _DEFAULT_PORT.get(scheme)
    if sep and default is not None and host.endswith(f":{default}") and "/" not in host:
        return url[: -len(f":{default}")]
    return url


def _relay_of(text: str, scheme: str, hostport: str) -> str:
    from kbfs.protocol import relay_base_problem

    if "@" in hostport:
        raise BadRequest(f"{_shown(text)}: a kbfs link carries no user name or password")
    # urlsplit drops tabs and newlines (WHATWG): 'h\n:1' would pass its checks as 'h:1'
    if any(c.isspace() or not c.isprintable() for c in hostport):
        raise BadRequest(f"{_shown(text)}: the host holds a space or control character")
    if hostport.startswith("["):  # an IPv6 literal: [::1]:8443
        end = hostport.find("]") + 1
        if not end:
            raise BadRequest(f"{_shown(text)}: {hostport[:80]!r} is not HOST:PORT")
        host, tail = hostport[:end], hostport[end:]
    else:  # a second ':' lands in the port and fails its check
        host, colon, after_colon = hostport.partition(":")
        tail = colon + after_colon
    if not host:
        raise BadRequest(f"{_shown(text)}: no host; expected {SYNTAX}")
    if tail and not tail.startswith(":"):
        raise BadRequest(f"{_shown(text)}: {hostport[:80]!r} is not HOST:PORT")
    port_text = tail[1:] if tail else None
    if port_text is None:
        if scheme == "http":
            raise BadRequest(f"{_shown(text)}: a kbfs:// link writes its port (kbfs://HOST:PORT/"
                             "...); for an https relay on port 443 write kbfs+https://HOST/...")
        port = _DEFAULT_PORT[scheme]
    elif not _PORT_RE.match(port_text) or not 0 < int(port_text) < 65536:
        raise BadRequest(f"{_shown(text)}: port {port_text[:20]!r} is not a number from 1 to 65535")
    else:
        port = int(port_text)
    problem, base = relay_base_problem(f"{scheme}://{host}:{port}")
    if problem is not None:
        raise BadRequest(f"{_shown(text)}: host {host[:80]!r} {problem}")
    return canonical_relay(base)


def parse(text: str, want_share: bool = True) -> Link:
    """The relay, share and path TEXT names (a link in one of the two spellings); BadRequest
    with one line saying what is wrong otherwise. WANT_SHARE False also takes a link that
    names only a relay (share "")."""
    from urllib.parse import unquote  # ~1.4 ms of start-up: loaded only for links

    from kbfs.protocol import check_share_id, safe_relpath

    scheme = _scheme_of(text)
    rest = text.partition("://")[2]
    hostport, _, after = rest.partition("/")
    relay = _relay_of(text, scheme, hostport)
    share, _, raw = after.partition("/")
    if not share:
        if want_share or raw:
            raise BadRequest(f"{_shown(text)}: no share id; expected {SYNTAX}")
        return Link(relay, "", "")
    try:
        check_share_id(share)
        path = safe_relpath(unquote(raw))
    except BadRequest as exc:
        raise BadRequest(f"{_shown(text)}: {exc}") from None
    return Link(relay, share, path)


def prefix(relay_url: str) -> str:
    """The link of the relay at RELAY_URL (http:// or https://), without a slash:
    `kbfs://HOST:PORT` (port always written) or `kbfs+https://HOST[:PORT]` (no :443)."""
    from urllib.parse import urlsplit  # see parse

    parts = urlsplit(relay_url)
    scheme = parts.scheme
    if scheme not in _DEFAULT_PORT:
        raise BadRequest(f"relay URL {_shown(relay_url)} must be http:// or https://")
    port = parts.port or _DEFAULT_PORT[scheme]
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if scheme == "http":
        return f"{HTTP_SCHEME}{host}:{port}"
    return f"{HTTPS_SCHEME}{host}" + ("" if port == 443 else f":{port}")


def link(relay_url: str, share_id: str, path: str = "") -> str:
    """The link to PATH (share-relative, not encoded) of share SHARE_ID on RELAY_URL."""
    from urllib.parse import quote  # see parse

    return f"{prefix(relay_url)}/{share_id}/{quote(path, safe='/')}"
