"""Mirror URLs and the static mirror layout's object names: plain strings, no I/O.

A *mirror* is a place that serves content as static objects (docs/mirrors.md): an
`http(s)://HOST[:PORT][/PREFIX]` base URL (any web server, static host or CDN that answers
plain GET + Range) or `s3://BUCKET[/PREFIX]` (an S3-compatible bucket). Under its base:

    data/{sha1[:2]}/{sha1}                 the content's bytes
    outboard/{B}/{sha1[:2]}/{sha1}         the level-0 outboard of the tree with B-byte
                                           pieces (docs/pieces.md; its first 32*n bytes
                                           are the leaf list)
    kbfs-mirror.json                       the index (what was exported; readers never need it)

This module checks mirror URLs (`mirror_problem`, `mirror_hints` for a pointer's
`kbfs_mirrors`, a relay's `/api/find` `mirrors`, `KBFS_MIRRORS` and the config file), names
the objects (`data_key`, `outboard_key`), and marks a mirror in a list of relays
(`mark` / `unmark`): readers carry mirrors in the same ordered list as relays (so "mirrors
and relays in the user's order" is one list), and `kbfs.fetch` splits them out.

It does not fetch, verify, or decide order (`kbfs.mirrorsource`, `kbfs.fetch`). A mirror is
never trusted: every byte and node read from one is checked against the pointer's root.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

MARK = "mirror+"
"""Prefix of a mirror in a reader's list of relays (`mirror+https://...`, `mirror+s3://...`)."""
INDEX_KEY = "kbfs-mirror.json"
FORMAT = "kbfs-mirror-1"
MIRRORS_KEY = "kbfs_mirrors"
"""A pointer's mirror hints (validated like `kbfs_sources`)."""
MAX_MIRROR_CHARS = 512
MAX_HINTS = 8
BLOCK_SIZES = (1 << 20, 1 << 16)
REFUSED_HINT = ("a private bucket or server needs credentials, not a token: for an s3:// "
                "mirror configure AWS credentials (environment or ~/.aws) and install boto3 "
                "(pip install 'kbfs[s3]') so its requests are signed; an http(s) mirror must "
                "serve its objects to anyone")
"""What to do when every mirror asked refused (401/403): tokens are not the answer."""
"""The trees an export writes an outboard for: v1 (1 MiB) and v2 (64 KiB) pointers."""

_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_NETLOC_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\])"
                        r"(?::(?P<port>[0-9]{1,5}))?$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_~-][A-Za-z0-9._~-]*$")
# S3 bucket names (the rules AWS enforces; also good for MinIO, Ceph, moto).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def data_key(sha1: str) -> str:
    """The object holding SHA1's bytes, relative to the mirror's base."""
    _check_sha1(sha1)
    return f"data/{sha1[:2]}/{sha1}"


def outboard_key(sha1: str, block_size: int) -> str:
    """The object holding SHA1's level-0 outboard for BLOCK_SIZE pieces."""
    _check_sha1(sha1)
    if not isinstance(block_size, int) or not 1 <= block_size < 1 << 32:
        raise ValueError(f"bad block size {block_size!r}")
    return f"outboard/{block_size}/{sha1[:2]}/{sha1}"


def _check_sha1(sha1: str) -> None:
    if not isinstance(sha1, str) or not _SHA1_RE.match(sha1):
        raise ValueError(f"not a lowercase sha1: {str(sha1)[:50]!r}")


def mirror_problem(url: object) -> tuple[str | None, str]:
    """(what is wrong with URL as a mirror, or None; the normalised URL).

    `http(s)://HOST[:PORT][/PREFIX]` or `s3://BUCKET[/PREFIX]`: PREFIX plain path segments
    (no dot segments, escapes, query or fragment), no user name or password (a pointer or a
    relay must not make a reader send credentials), printable ASCII, at most
    MAX_MIRROR_CHARS characters; a trailing slash is dropped."""
    if not isinstance(url, str):
        return "not a string", ""
    if len(url) > MAX_MIRROR_CHARS:
        return f"longer than {MAX_MIRROR_CHARS} characters", ""
    text = url.strip()
    if not text.isascii() or not text.isprintable() or " " in text:
        return "characters outside printable ASCII", ""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("http", "https", "s3"):
        return "not an http://, https:// or s3:// URL", ""
    if "?" in rest or "#" in rest:
        return "has a query or fragment", ""
    netloc, _, path = rest.partition("/")
    if "@" in netloc:
        return "has a user name or password", ""
    if scheme == "s3":
        if not _BUCKET_RE.match(netloc) or ".." in netloc:
            return "not an S3 bucket name", ""
    else:
        m = _NETLOC_RE.match(netloc)
        if m is None:
            return "not a host[:port]", ""
        if m.group("port") is not None and not 0 < int(m.group("port")) < 65536:
            return "bad port", ""
    parts = [p for p in path.rstrip("/").split("/")] if path.rstrip("/") else []
    for part in parts:
        if not _SEGMENT_RE.match(part) or part in (".", ".."):
            return "path is not plain segments", ""
    return None, f"{scheme}://{netloc}" + "".join("/" + p for p in parts)


def check_mirror(url: object, where: str) -> str:
    """The normalised URL, or ValueError saying WHERE it came from and what is wrong."""
    problem, norm = mirror_problem(url)
    if problem is not None:
        raise ValueError(f"{where}: mirror {shown(url)!r}: {problem}")
    return norm


def mirror_hints(value: object, name: str = "<pointer>") -> list[str]:
    """The usable mirror URLs of a `kbfs_mirrors` value (or a relay's `mirrors`): at most
    MAX_HINTS, each valid, normalised, no duplicates. Anything else is dropped with one log
    line: a hint only adds a place to look, so a bad one never makes a read fail."""
    if value is None:
        return []
    if not isinstance(value, list):
        log.warning("%s: ignoring %s (not a list)", name, MIRRORS_KEY)
        return []
    out: list[str] = []
    dropped: list[str] = []
    for item in value:
        problem, norm = mirror_problem(item)
        if problem is not None:
            dropped.append(f"{shown(item)!r} ({problem})")
        elif norm not in out:
            if len(out) >= MAX_HINTS:
                dropped.append(f"{norm!r} (more than {MAX_HINTS} mirrors)")
            else:
                out.append(norm)
    if dropped:
        log.warning("%s: ignoring mirrors %s", name, ", ".join(dropped[:3])
                    + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else ""))
    return out


def shown(url: object) -> str:
    # Never echo a password a URL carried.
    return re.sub(r"//[^/@]*@", "//***@", str(url))[:60]


def mark(url: str) -> str:
    """URL (a checked mirror) as an entry of a reader's relay list."""
    return MARK + url


def unmark(entry: str) -> str | None:
    """The mirror URL of a marked entry; None for a relay."""
    return entry[len(MARK):] if entry.startswith(MARK) else None
