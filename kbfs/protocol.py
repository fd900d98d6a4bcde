"""The wire vocabulary shared by share, relay and clients: URL paths, header names,
identifier syntax, HTTP Range parsing and safe share-relative paths.

Pure functions only: nothing here opens a socket or a file. Range semantics follow
RFC 9110 section 14 for a single range: a satisfiable range gives (start, end)
with end exclusive; an unsatisfiable one raises `RangeError` (-> 416); a header
that does not parse is ignored (-> 200 with the whole body), as the RFC requires.
"""

from __future__ import annotations

import re
from typing import NamedTuple, TypeGuard

from kbfs.errors import BadRequest, RangeError

# ---- identifiers
SHA1_RE = re.compile(r"^[0-9a-f]{40}\Z")  # \Z: `$` would also take a final "\n"
SHARE_ID_RE = re.compile(r"^[a-z2-7]{16,64}\Z")  # base32 (lowercase, unpadded) of a key hash

# ---- paths of the relay's (and a share's --listen server's) HTTP API
HEALTH_PATH = "/api/health"
SHARES_PATH = "/api/shares"
FIND_PATH = "/api/find/{sha1}"
SHA1_PATH = "/sha1/{sha1}"
TREE_PATH = "/tree/{sha1}"
SHARE_LIST_PATH = "/s/{share}/list/{path}"
SHARE_FILE_PATH = "/s/{share}/file/{path}"

# ---- bounds
MAX_RANGE_HEADER = 1024
MAX_PATH_BYTES = 4096
MAX_PATH_DEPTH = 256

CACHE_CONTROL_IMMUTABLE = "public, max-age=31536000, immutable"
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "Range, Authorization, If-None-Match, Kbfs-Want-Proof",
    "Access-Control-Expose-Headers": "Content-Range, Content-Length, ETag, Accept-Ranges, Kbfs-Proof",
    "Access-Control-Max-Age": "86400",
}


def check_sha1(value: str) -> str:
    """Return VALUE lowercased if it is 40 hex digits, else raise BadRequest."""
    lowered = value.lower()
    if not SHA1_RE.match(lowered):
        raise BadRequest(f"malformed sha1 {value[:64]!r}: expected 40 hex digits")
    return lowered


def check_share_id(value: str) -> str:
    """Return VALUE if it has the syntax of a share id, else raise BadRequest."""
    if not SHARE_ID_RE.match(value):
        raise BadRequest(f"malformed share id {value[:80]!r}")
    return value


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Resolve a Range header against a representation of SIZE bytes.

    Returns None when the whole body should be sent (no header, or one that does
    not parse, or a multi-range request, which we answer with the full body as the
    RFC allows), else (start, end) with end exclusive, clipped to SIZE.
    Raises RangeError when the range is syntactically valid but unsatisfiable.
    """
    if header is None or len(header) > MAX_RANGE_HEADER:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    spec = spec.strip()
    if "," in spec:
        return None
    first, dash, last = spec.partition("-")
    first, last = first.strip(), last.strip()
    # ASCII digits only: str.isdigit() is also true of '²' or '٣', which int() refuses
    # or reads as another number (a 500, or the wrong range).
    if not dash or (first and not (first.isascii() and first.isdigit())) or (
            last and not (last.isascii() and last.isdigit())):
        return None
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeError(f"suffix range of {suffix} bytes on {size} bytes", size)
        return max(0, size - suffix), size
    start = int(first)
    end = int(last) + 1 if last else size
    if last and int(last) < start:
        return None  # invalid byte-range-spec: ignore the header
    if start >= size:
        raise RangeError(f"range starts at {start}, past the end ({size} bytes)", size)
    return start, min(end, size)


# ---- verified pieces: a proof beside a piece-aligned range (docs/pieces.md, "Serving pieces")

WANT_PROOF_HEADER = "Kbfs-Want-Proof"  # request: `bs=65536[; below=L.J]`
PROOF_HEADER = "Kbfs-Proof"  # answer: `pieces=A-B; bs=65536; nodes=:BASE64:`
MAX_WANT_PROOF = 200  # characters of a Kbfs-Want-Proof value looked at
MAX_PROOF_HEADER = 8192  # characters of a Kbfs-Proof value (a 2^62-byte file's is < 4,200)
_MAX_LEVEL = 64
_PARAM_RE = re.compile(r"([a-z][a-z0-9-]{0,15})=([^;]*)\Z")
_UINT_RE = re.compile(r"(0|[1-9][0-9]{0,19})\Z")
_PIECES_RE = re.compile(r"(0|[1-9][0-9]{0,19})-([1-9][0-9]{0,19})\Z")
_BELOW_RE = re.compile(r"(0|[1-9][0-9]?)\.(0|[1-9][0-9]{0,19})\Z")
_NODES_RE = re.compile(r":([A-Za-z0-9+/]*={0,2}):\Z")


class WantProof(NamedTuple):
    """A reader's Kbfs-Want-Proof: the block size of its pointer's tree, and optionally a
    node (level, index) it has verified, for a proof that stops there."""

    block_size: int
    below: tuple[int, int] | None = None

    def value(self) -> str:
        """The canonical header value (what the relay passes on to a share)."""
        base = f"bs={self.block_size}"
        return base if self.below is None else f"{base}; below={self.below[0]}.{self.below[1]}"


def _params(value: str) -> dict[str, str] | None:
    """`name=value; name=value` (structured-field parameters, each name once), or None."""
    out: dict[str, str] = {}
    for part in value.split(";"):
        m = _PARAM_RE.match(part.strip())
        if m is None or m.group(1) in out:
            return None
        out[m.group(1)] = m.group(2).strip()
    return out


def parse_want_proof(value: str | None) -> WantProof | None:
    """The Kbfs-Want-Proof VALUE, or None when absent or malformed (then the answer simply
    has no proof: a reader falls back). `bs` is required (1 <= bs < 2^32); `below=L.J`
    optional (L <= 64); unknown parameters are ignored."""
    if value is None or len(value) > MAX_WANT_PROOF:
        return None
    params = _params(value)
    if params is None or not _UINT_RE.match(params.get("bs", "")):
        return None
    bs = int(params["bs"])
    if not 0 < bs < 1 << 32:
        return None
    below = None
    if "below" in params:
        m = _BELOW_RE.match(params["below"])
        if m is None or int(m.group(1)) > _MAX_LEVEL:
            return None
        below = (int(m.group(1)), int(m.group(2)))
    return WantProof(bs, below)


def aligned_pieces(start: int, end: int, size: int, block_size: int) -> tuple[int, int] | None:
    """The pieces [a, b) whose bytes are exactly [start, end) of a SIZE-byte file (a range
    `bytes=a*bs-(min(b*bs, size)-1)`), or None when the range is empty or not so aligned."""
    if not 0 <= start < end <= size or start % block_size or (end % block_size and end != size):
        return None
    return start // block_size, -(-end // block_size)


def proof_value(a: int, b: int, block_size: int, nodes: bytes) -> str:
    """The Kbfs-Proof value for pieces [a, b) with proof NODES (proof.make_proof's bytes)."""
    import base64

    return f"pieces={a}-{b}; bs={block_size}; nodes=:{base64.b64encode(nodes).decode('ascii')}:"


def parse_proof_value(value: str, a: int, b: int, block_size: int) -> bytes:
    """The proof bytes of a Kbfs-Proof VALUE that must be for pieces [a, b) of BLOCK_SIZE;
    BadRequest for anything else (too long, malformed, other pieces or block size, nodes
    that are not whole 32-byte hashes). Checks the shape only: whether the nodes are right
    is for the reader, against its pointer's root."""
    import base64
    import binascii

    if len(value) > MAX_PROOF_HEADER:
        raise BadRequest(f"{PROOF_HEADER} longer than {MAX_PROOF_HEADER} characters")
    params = _params(value)
    if params is None:
        raise BadRequest(f"malformed {PROOF_HEADER}")
    pieces = _PIECES_RE.match(params.get("pieces", ""))
    if pieces is None or (int(pieces.group(1)), int(pieces.group(2))) != (a, b):
        raise BadRequest(f"{PROOF_HEADER} is not for pieces {a}-{b}")
    if params.get("bs") != str(block_size):
        raise BadRequest(f"{PROOF_HEADER} is not for bs={block_size}")
    nodes = _NODES_RE.match(params.get("nodes", ""))
    if nodes is None:
        raise BadRequest(f"{PROOF_HEADER} without nodes=:BASE64:")
    try:
        raw = base64.b64decode(nodes.group(1), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{PROOF_HEADER} nodes are not base64") from None
    if len(raw) % 32 or len(raw) > 2 * 32 * _MAX_LEVEL:
        raise BadRequest(f"{PROOF_HEADER} nodes of {len(raw)} bytes are not whole hashes")
    return raw


def content_range(start: int, end: int, size: int) -> str:
    """The Content-Range value of bytes [start, end) of SIZE."""
    return f"bytes {start}-{end - 1}/{size}"


def unsatisfied_range(size: int) -> str:
    """The Content-Range value of a 416 answer."""
    return f"bytes */{size}"


def parse_content_range(value: str) -> tuple[int, int, int]:
    """Parse `bytes A-B/SIZE` into (start, end exclusive, size); raise BadRequest otherwise."""
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", value.strip())
    if not m:
        raise BadRequest(f"malformed Content-Range {value[:80]!r}")
    a, b, size = (int(g) for g in m.groups())
    if b < a or b >= size:
        raise BadRequest(f"inconsistent Content-Range {value[:80]!r}")
    return a, b + 1, size


def safe_relpath(path: str) -> str:
    """Normalise a share-relative path from a URL, refusing anything that could escape.

    The result uses '/' separators, has no leading slash, no '.' or '..' parts, no NUL
    or backslash. Names may start with a dot (`.zarray`): which names a share serves is
    the share's decision (its index's exclusions), not the syntax's. PATH must already
    be percent-decoded (once). The empty string means the share's top folder. Raises
    BadRequest otherwise.
    """
    if len(path) > MAX_PATH_BYTES:
        raise BadRequest("path too long")
    # PATH is decoded exactly once, by the HTTP framework; decoding again here would
    # turn a literal '%2e' in a file name into a traversal.
    decoded = path
    if "\0" in decoded or "\\" in decoded:
        raise BadRequest("path contains NUL or backslash")
    if decoded.startswith("/") and decoded.strip("/"):
        decoded = decoded.lstrip("/")
    parts = [p for p in decoded.split("/") if p]
    if len(parts) > MAX_PATH_DEPTH:
        raise BadRequest("path too deep")
    for part in parts:
        if part in (".", ".."):
            raise BadRequest(f"path part {part[:40]!r} is not allowed")
    return "/".join(parts)


def share_url_path(template: str, **values: str) -> str:
    """Fill a path template, percent-encoding path values (slashes kept)."""
    # Imported here: urllib.parse (with ipaddress) is ~1.4 ms of every command's start-up,
    # and a download of cached content builds no URL.
    from urllib.parse import quote

    return template.format(**{k: quote(v, safe="/") for k, v in values.items()})


# ---- share <-> relay control channel and upload POSTs (see docs/protocol.md)
CONTROL_PATH = "/_control"  # the share's websocket
UPLOAD_PATH = "/_upload/{token}"  # the share POSTs one response body here
UPLOAD_SECRET_HEADER = "X-Kbfs-Upload-Secret"
CONTROL_VERSION = 1
# In the welcome's "features": this relay takes catalogue entries with a 7th field, the root
# of the file's 64 KiB tree (or null), and lists such files with 64 KiB-piece pointers. A
# share sends 6-field entries to a relay that does not say so (an older relay refuses 7).
FEATURE_ROOT64 = "root64"
HANDSHAKE_CONTEXT = b"kbfs-relay-admission-v1"
SHARE_TOKEN_PREFIX = "kbfs1."  # bearer tokens issued by `kbfs share token`


def share_id_from_public_key(public_key: bytes) -> str:
    """The share id of a raw 32-byte Ed25519 public key.

    Lowercase unpadded base32 of the first 20 bytes of SHA-256(key): 32 characters.
    """
    import base64
    import hashlib

    if len(public_key) != 32:
        raise BadRequest("an Ed25519 public key has 32 bytes")
    digest = hashlib.sha256(public_key).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower().rstrip("=")


def handshake_payload(challenge: bytes, host: str, public_key: bytes) -> bytes:
    """The bytes a share signs to be admitted: context, relay challenge, the Host it
    connected to (so a signature made for one relay cannot be replayed at another)
    and its own public key."""
    return b"\n".join([HANDSHAKE_CONTEXT, challenge, host.lower().encode("utf-8"), public_key])


def websocket_url(relay_url: str) -> str:
    """ws(s)://host:port/_control for an http(s) relay URL."""
    base = relay_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :] + CONTROL_PATH
    if base.startswith("http://"):
        return "ws://" + base[len("http://") :] + CONTROL_PATH
    raise BadRequest(f"relay URL {relay_url!r} must start with http:// or https://")


def relay_base_problem(url: str) -> tuple[str | None, str]:
    """(what is wrong with URL as a relay's base URL, or None; the base `scheme://host[:port]`).

    The one rule for every relay URL a user or a pointer gives (`kbfs share --relay`,
    `kbfs prv create --relay`, source hints): http:// or https://, a host and optional port,
    no user name or password, no path, query or fragment. A relay answers at the root of its
    host (`/_control`, `/_upload/...`, `/s/...`): a URL with a path would reach none of them.
    The reason never quotes the URL (a password it carries is not echoed); for a URL with a
    path the base is still returned, for a message that says what to give instead.
    """
    from urllib.parse import urlsplit  # see share_url_path

    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        return f"does not parse ({exc})", ""
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL", ""
    if not parts.hostname or any(c.isspace() or c in "\\\0" for c in parts.netloc):
        return "has no valid host", ""
    if "@" in parts.netloc:
        return "must not carry a user name or password", ""
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    base = f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in text or "#" in text:
        return "has a path, query or fragment: a relay answers at the root of its host", base
    return None, base


def check_relay_url(url: str) -> str:
    """The base of relay URL (see `relay_base_problem`), or BadRequest with the reason."""
    problem, base = relay_base_problem(url)
    if problem is None:
        return base
    shown = re.sub(r"//[^/@]*@", "//", url.strip())[:100]  # never a user name or password
    raise BadRequest(f"relay URL {shown!r} {problem}" + (f", give {base}" if base else ""))


def kbfs_url(relay_url: str, share_id: str, path: str = "") -> str:
    """The link readers are given to PATH of share SHARE_ID on the relay at RELAY_URL:
    `kbfs://HOST:PORT/...` for an http relay (port always written), `kbfs+https://HOST[:PORT]/...`
    for an https one (`kbfs.kbfsurl`, which also parses them)."""
    from kbfs import kbfsurl  # (lazily: only the share and token commands write links)

    return kbfsurl.link(relay_url, share_id, path)


def websocket_host_header(relay_url: str) -> str:
    """The Host header trio-websocket sends for RELAY_URL (port omitted for 80/443)."""
    from urllib.parse import urlsplit  # see share_url_path

    parsed = urlsplit(relay_url)
    host = parsed.hostname or ""
    default = 443 if parsed.scheme == "https" else 80
    port = parsed.port or default
    return host if port in (80, 443) else f"{host}:{port}"


# ---- the JSON listing of a share folder (`GET /s/{share}/list/{path}`), read by clients

MAX_LISTING_ENTRIES = 1_000_000
MAX_LISTED_SIZE = 1 << 62


def _listable_name(name: object) -> TypeGuard[str]:
    """True for one safe path component: what a listing may name a file or folder."""
    return (isinstance(name, str) and 0 < len(name) <= 1024 and name not in (".", "..")
            and not any(c in name for c in "/\\\0"))


def parse_listing(obj: object) -> dict[str, object]:
    """Validate a decoded share listing; return a clean copy.

    The result is `{"share": str, "path": str, "dirs": [name, ...], "files": [{"name",
    "size", "mtime", "prv"}, ...]}`: names are single safe path components (no '/',
    '\\', NUL, '.' or '..'; `.zarray` is a name), unique across dirs and files; sizes are
    non-negative ints, mtimes finite floats, `prv` a JSON object (its fields are checked
    by `prv.pointer_from_dict` where it is used). Entries that break these rules are
    dropped, so one bad entry does not hide a folder; a listing whose shape is wrong
    (not an object, `dirs`/`files` not lists, too many entries) raises BadRequest.
    """
    if not isinstance(obj, dict):
        raise BadRequest("listing is not a JSON object")
    dirs_in = obj.get("dirs", [])
    files_in = obj.get("files", [])
    if dirs_in is None:
        dirs_in = []
    if files_in is None:
        files_in = []
    if not isinstance(dirs_in, list) or not isinstance(files_in, list):
        raise BadRequest("listing dirs and files must be lists")
    if len(dirs_in) + len(files_in) > MAX_LISTING_ENTRIES:
        raise BadRequest("listing has too many entries")
    share = obj.get("share", "")
    path = obj.get("path", "")
    seen: set[str] = set()
    dirs: list[str] = []
    for name in dirs_in:
        if _listable_name(name) and name not in seen:
            seen.add(name)
            dirs.append(name)
    files: list[dict[str, object]] = []
    for item in files_in:
        if not isinstance(item, dict):
            continue
        name, size, mtime = item.get("name"), item.get("size"), item.get("mtime", 0)
        pointer = item.get("prv")
        if not _listable_name(name) or name in seen:
            continue
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < MAX_LISTED_SIZE:
            continue
        if isinstance(mtime, bool) or not isinstance(mtime, int | float):
            continue
        if not isinstance(pointer, dict):
            continue
        mtime = float(mtime)
        if mtime != mtime or mtime in (float("inf"), float("-inf")):
            continue
        seen.add(name)
        files.append({"name": name, "size": size, "mtime": mtime, "prv": pointer})
    return {"share": share if isinstance(share, str) else "",
            "path": path if isinstance(path, str) else "", "dirs": dirs, "files": files}


# ---- request heads

MAX_HEAD_BYTES = 16 * 1024  # request line + headers; beyond it: 431


def head_bytes(raw_path: bytes, query_string: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """About how many bytes a request head took on the wire (target + headers).

    The HTTP layer's own limit only applies to a head that arrives in pieces (a head
    read in one large recv() is parsed whole), so servers check this on every request.
    """
    return len(raw_path) + len(query_string) + sum(len(k) + len(v) + 4 for k, v in headers)


# ---- who a bearer token is for, share names, advertised URLs (checked at admission)

MAX_SHARE_NAME = 100
MAX_LISTEN_URL = 500
# Characters a share name may not hold besides control and other non-printable ones: the
# name is shown in logs, JSON and (some day) HTML pages, so nothing that could end a quoted
# attribute or open a tag.
_NAME_FORBIDDEN = frozenset("<>&\"'`\\")


class TokenClaim(NamedTuple):
    """What a `kbfs1.` bearer token says about itself (not checked: only its share can)."""

    share: str  # the id of the share that issued it
    expires: float  # Unix time, 0: never


def token_claim(authorization: str | None) -> TokenClaim | None:
    """The share id and expiry an `Authorization: Bearer kbfs1.<payload>.<mac>` header
    names, or None when it is not such a header.

    The relay uses it to send a token to the share it names and to no other: the
    payload is readable by anyone, and only the named share can tell whether the MAC is
    right, so a claim decides where the token may go, never whether it is valid.
    """
    import base64
    import binascii
    import json

    if not authorization or len(authorization) > 4096:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(SHARE_TOKEN_PREFIX):
        return None
    parts = token[len(SHARE_TOKEN_PREFIX):].split(".")
    if len(parts) != 2:
        return None
    try:
        raw = base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError):
        return None
    if not isinstance(payload, dict):
        return None
    share, expires = payload.get("s"), payload.get("e", 0)
    if not isinstance(share, str) or not SHARE_ID_RE.match(share):
        return None
    if isinstance(expires, bool) or not isinstance(expires, int | float) or expires < 0:
        return None
    return TokenClaim(share, float(expires))


def check_share_name(name: str) -> str:
    """Return NAME if it may name a share: 1..100 printable characters, none of
    `< > & " ' \\` ` (see _NAME_FORBIDDEN); else raise BadRequest."""
    if not 0 < len(name) <= MAX_SHARE_NAME:
        raise BadRequest(f"share name must have 1 to {MAX_SHARE_NAME} characters")
    bad = [c for c in name if not c.isprintable() or c in _NAME_FORBIDDEN]
    if bad or name != name.strip():
        what = repr(bad[0]) if bad else "leading or trailing space"
        raise BadRequest(f"share name {name[:40]!r} has {what}: use printable characters, "
                         "not < > & \" ' ` \\")
    return name


def clean_share_name(name: str) -> str:
    """NAME made acceptable to `check_share_name` (bad characters become '_'); for
    default names taken from folder names."""
    out = "".join(c if c.isprintable() and c not in _NAME_FORBIDDEN else "_" for c in name)
    return out.strip()[:MAX_SHARE_NAME].strip()


def check_listen_url(url: str) -> str:
    """Return URL without a final '/' if a share may advertise it for direct reads:
    http(s), a host, no userinfo, query or fragment, printable ASCII, at most 500
    characters. Else raise BadRequest."""
    from urllib.parse import urlsplit  # see share_url_path

    if len(url) > MAX_LISTEN_URL or not url.isascii() or not url.isprintable() or " " in url:
        raise BadRequest(f"listen_url must be printable ASCII of at most {MAX_LISTEN_URL} "
                         "characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise BadRequest(f"listen_url {url[:80]!r} does not parse") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"listen_url {url[:80]!r} must be an http(s) URL with a host")
    if "@" in parts.netloc:
        raise BadRequest("listen_url must not carry a user name or password")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise BadRequest("listen_url must not have a query or fragment")
    return url.rstrip("/")


def url_host(url: str) -> str:
    """The host (and port, when not the scheme's default) a share signs when it connects
    to the relay at URL: `websocket_host_header`, lowercased."""
    return websocket_host_header(url).lower()
