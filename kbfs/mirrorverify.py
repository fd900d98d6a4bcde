"""`kbfs mirror verify URL [SOURCE...]`: read a mirror back and check every object.

For each content (those SOURCE names, else those the mirror's own index lists) it GETs the
data object whole, streamed, hashing it as `kbfs.mirror` does (SHA-1, the leaves of each
tree), and then each outboard (read up to its expected size and no further), and reports:

- `missing NAME` when an object answers 404 (or 403, what S3 says to an anonymous reader
  for a key that is not there);
- `wrong NAME: WHY` when the data's size, SHA-1 or root (at the pointer's block size; with
  no SOURCE, the index's roots, which only say what the exporter claimed) do not match, or an
  outboard is not exactly the one those bytes give;
- `unreadable NAME: WHY` for any other failure (unreachable, 5xx).

`verify` returns the problems (the command exits 1 when there are any). It reads through
the mirror's own URLs (`mirrorsource.Mirror.object_url`: presigned for s3:// when
credentials are configured), never through relays or the cache, and sends no token.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import requests

from kbfs import mirrorurl, proof
from kbfs.errors import ConfigError, KbfsError
from kbfs.mirror import _Hasher
from kbfs.mirrorsource import Mirror

CHUNK = 1 << 20
TIMEOUT = 30.0


@dataclass(frozen=True)
class Item:
    """One content to check: SHA1 of SIZE bytes; ROOTS: block size -> the root it must
    have (the pointer's, or the index's); NAME: for messages."""

    sha1: str
    size: int
    roots: dict[int, str]
    name: str


class _Missing(Exception):
    pass


class _Unreadable(Exception):
    pass


def open_mirror(url: str) -> Mirror:
    problem, norm = mirrorurl.mirror_problem(url)
    if problem is not None:
        raise ConfigError(f"{mirrorurl.shown(url)}: not a mirror URL ({problem}); give "
                          "http(s)://HOST[:PORT][/PREFIX] or s3://BUCKET[/PREFIX]")
    return Mirror(norm)


def index_items(mirror: Mirror, session: requests.Session) -> list[Item]:
    """The contents the mirror's index lists (its claims: checked against the bytes)."""
    try:
        raw = _get(session, mirror.object_url(mirrorurl.INDEX_KEY), 256 << 20, lambda b: None,
                   keep=True)
    except _Missing:
        raise KbfsError(f"{mirror.url}: no {mirrorurl.INDEX_KEY}; name the SOURCEs to check") from None
    except _Unreadable as exc:
        raise KbfsError(f"{mirror.url}: {exc}") from None
    from kbfs.mirrorstore import _parse_index

    index = _parse_index(raw, f"{mirror.url}/{mirrorurl.INDEX_KEY}")
    items = []
    for sha1, entry in sorted(index["objects"].items()):
        try:
            mirrorurl.data_key(sha1)
            size = entry["size"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError("size")
            roots = {int(b): str(r) for b, r in (entry.get("roots") or {}).items()}
            names = entry.get("names") or [sha1]
        except (ValueError, TypeError, KeyError, AttributeError):
            raise KbfsError(f"{mirror.url}: the index's entry {str(sha1)[:50]!r} is malformed"
                            ) from None
        items.append(Item(sha1, size, roots, str(names[0])[:200]))
    return items


def verify(mirror: Mirror, items: list[Item], progress: Callable[[int], None] | None = None,
           session: requests.Session | None = None) -> tuple[int, list[str]]:
    """(objects checked, problem lines) for ITEMS on MIRROR."""
    s = session or _session()
    step = progress or (lambda n: None)
    problems: list[str] = []
    checked = 0
    for item in items:
        checked += 1
        problems.extend(_check(mirror, s, item, step))
    return checked, problems


def _check(mirror: Mirror, s: requests.Session, item: Item, step: Callable[[int], None]
           ) -> Iterator[str]:
    sizes = list(dict.fromkeys([*mirrorurl.BLOCK_SIZES, *item.roots]))
    h = _Hasher(sizes)
    name = mirrorurl.data_key(item.sha1)
    label = f"{name} ({item.name})" if item.name != item.sha1 else name
    def sink(b: bytes) -> None:
        h.feed(b)
        step(len(b))

    try:
        _get(s, mirror.object_url(name), item.size, sink, keep=False)
    except _Missing:
        yield f"missing {label}"
        return
    except _Unreadable as exc:
        yield f"unreadable {label}: {exc}"
        return
    h.finish()
    if h.size != item.size:
        yield f"wrong {label}: {h.size} bytes, expected {item.size}"
        return
    if h.sha1.hexdigest() != item.sha1:
        yield f"wrong {label}: its SHA-1 is {h.sha1.hexdigest()}"
        return
    for bs, root in item.roots.items():
        if h.root(bs) != root:
            yield f"wrong {label}: does not hash to the root {root[:16]}… ({bs}-byte pieces)"
    for bs in sizes:
        ob = mirrorurl.outboard_key(item.sha1, bs)
        want = h.outboard(bs)
        try:
            got = _get(s, mirror.object_url(ob), len(want), lambda b: None, keep=True)
        except _Missing:
            yield f"missing {ob}"
            continue
        except _Unreadable as exc:
            yield f"unreadable {ob}: {exc}"
            continue
        if got != want:
            yield f"wrong {ob}: " + _first_difference(got, want, proof.Shape(item.size, bs))


def _first_difference(got: bytes, want: bytes, shape: proof.Shape) -> str:
    if len(got) != len(want):
        return f"{len(got)} bytes, expected {len(want)}"
    at = next(i for i in range(0, len(want), 32) if got[i:i + 32] != want[i:i + 32])
    level = 0
    while at >= shape.offset(level, shape.count(level) - 1, 0) + 32:
        level += 1
    return f"node ({level}, {(at - shape.offset(level, 0, 0)) // 32}) is wrong"


def _get(s: requests.Session, url: str, limit: int, sink: Callable[[bytes], Any],
         keep: bool) -> bytes:
    """The whole object at URL (at most LIMIT bytes: a longer one is read to LIMIT + 1 and
    reported as such by its size), each chunk given to SINK; returned when KEEP."""
    try:
        r = s.get(url, stream=True, timeout=TIMEOUT, headers={"Accept-Encoding": "identity"},
                  proxies=requests.utils.get_environ_proxies(url))
    except requests.RequestException as exc:
        raise _Unreadable(f"{exc.__class__.__name__}: {str(exc)[:160]}") from None
    with r:
        if r.status_code in (403, 404):
            raise _Missing()
        if r.status_code != 200:
            raise _Unreadable(f"HTTP {r.status_code}")
        parts: list[bytes] = []
        got = 0
        try:
            while got <= limit:
                chunk = r.raw.read(min(CHUNK, limit + 1 - got))
                if not chunk:
                    break
                got += len(chunk)
                sink(chunk)
                if keep:
                    parts.append(chunk)
        except Exception as exc:  # noqa: BLE001 - urllib3/socket errors mid-body
            raise _Unreadable(f"{exc.__class__.__name__} after {got} bytes") from None
    return b"".join(parts)


def _session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # no ~/.netrc credentials to a mirror; proxies are passed per request
    s.verify = os.environ.get("REQUESTS_CA_BUNDLE") or True
    return s
