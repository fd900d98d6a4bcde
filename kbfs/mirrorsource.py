"""Reading from a static mirror: the objects' URLs, leaf lists, and pieces with a proof
built from the mirror's stored outboard.

A `Mirror` turns an object name (`kbfs.mirrorurl`: `data/..`, `outboard/{B}/..`) into a
URL: the base URL + name for http(s) mirrors; for `s3://BUCKET/PREFIX` a presigned GET
URL when boto3 is installed and AWS credentials are configured (signed requests), else
the bucket's plain HTTP address (anonymous: `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`
path-style, else `https://BUCKET.s3.amazonaws.com`). A `Target` is one content on one
mirror; `kbfs.fetch.Fetcher` keeps it on a source and calls:

- `Target.get_leaves`: the leaf list (v1 pointers' `fetch_tree`): the first 32*n bytes of
  the outboard, one Range GET, read exactly (a longer, shorter or 200 answer is refused);
- `Target.read_pieces`: pieces [a, b) (v2 pointers' `fetch_pieces`): one Range GET of the
  data and, at the same time, the proof's nodes from the outboard (docs/pieces.md, "Static
  mirror"): the edge groups' leaves (<= 512 bytes each, from which levels 0..3 are
  derived), the outboard's tail (its upper levels, read once per content and kept), and a
  small range per level for any node below the tail. The proof is assembled and checked
  with the data up to the pointer's root (or a verified anchor) before anything returns.
  The fetcher's `fetch_blocks` needs nothing here: it Range-GETs `Target.data_url` and
  checks each block against the (verified) leaves, as for any source.

Tokens are never sent to a mirror (no Authorization header at all). Every answer goes
through `kbfs.httpread`'s checks (206 + exact Content-Range, bodies read to the length
asked and no further, deadlines). What it does not do: rank, penalise or fail over (the
fetcher does), or trust anything: the tail kept is only an unverified cache of bytes, and
is dropped when a proof made with it fails.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests

from kbfs import mirrorurl, piecewire, proof
from kbfs.errors import VerificationError
from kbfs.httpread import _Failed, _Lie, _net_why
from kbfs.proof import HASH_BYTES, Node, Shape

GROUP = proof.GROUP_LEVEL
TAIL_BYTES = 32 << 10   # bytes of an outboard's tail read on first touch (its upper levels)
MAX_TAILS = 256         # contents whose tail is kept (8 MiB at most)
PRESIGN_SECONDS = 3600  # lifetime of a presigned URL; reused for half of it
NODE_THREADS = 8        # node requests in flight beside the data request, all readers


class Mirror:
    """A mirror's base (`mirrorurl.mirror_problem`-checked) and how to address its objects."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.key = "mirror " + url  # what the fetcher keeps this mirror's health under
        scheme, _, rest = url.partition("://")
        self._s3 = scheme == "s3"
        self._bucket, _, prefix = rest.partition("/")
        self._prefix = prefix + "/" if prefix else ""
        self._lock = threading.Lock()
        self._signed: dict[str, tuple[float, str]] = {}
        self._client: Any = None
        self._anon_base: str | None = None

    def object_url(self, name: str) -> str:
        """The URL to GET object NAME (relative to the mirror's base) from."""
        if not self._s3:
            return f"{self.url}/{name}"
        key = self._prefix + name
        client = self._s3_client()
        if client is None:
            return f"{self._anon_base}/{key}"
        now = time.monotonic()
        with self._lock:
            hit = self._signed.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        signed = str(client.generate_presigned_url(
            "get_object", Params={"Bucket": self._bucket, "Key": key}, ExpiresIn=PRESIGN_SECONDS))
        with self._lock:
            if len(self._signed) > 4096:
                self._signed.clear()
            self._signed[key] = (now + PRESIGN_SECONDS / 2, signed)
        return signed

    def _s3_client(self) -> Any:
        """A boto3 client when boto3 and credentials are there (presigned URLs), else None
        and `_anon_base` set (plain anonymous GETs). Decided once per mirror."""
        with self._lock:
            if self._client is not None or self._anon_base is not None:
                return self._client
        endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                    or "").rstrip("/")
        client = None
        try:
            import boto3
            from botocore.config import Config

            session = boto3.session.Session()
            if session.get_credentials() is not None:
                client = session.client("s3", endpoint_url=endpoint or None,
                                        config=Config(signature_version="s3v4"))
        except ImportError:
            client = None
        with self._lock:
            self._client = client
            if client is None:
                self._anon_base = (f"{endpoint}/{self._bucket}" if endpoint
                                   else f"https://{self._bucket}.s3.amazonaws.com")
        return client

    def target(self, sha1: str) -> Target:
        return Target(self, sha1)


@dataclass(frozen=True)
class Target:
    """Content SHA1 on MIRROR."""

    mirror: Mirror
    sha1: str

    @property
    def data_url(self) -> str:
        return self.mirror.object_url(mirrorurl.data_key(self.sha1))

    def outboard_url(self, block_size: int) -> str:
        return self.mirror.object_url(mirrorurl.outboard_key(self.sha1, block_size))

    def get_leaves(self, net: Any, size: int, block_size: int, t: float,
                   head: float) -> tuple[int, bytes]:
        """(status, leaves) as `HttpPlumbing._get_small` answers (200 and the leaf list, or
        the error status and b''); requests.ConnectionError when the mirror cannot be
        reached. A lie (200 to the range, a wrong Content-Range) is (200, b'')."""
        shape = Shape(size, block_size)
        want = shape.leaves * HASH_BYTES
        buf = bytearray(want)
        try:
            net._stream(self.outboard_url(block_size), 0, want, shape.outboard_size(0), 0, None,
                        block_size, memoryview(buf), time.monotonic() + t, head)
        except _Lie:
            return 200, b""
        except _Failed as exc:
            status = exc.args[3] if len(exc.args) > 3 else 0
            if status:
                return status, b""
            raise requests.ConnectionError(f"{self.mirror.url} {exc.args[0]}") from None
        except (ValueError, OSError) as exc:
            raise requests.ConnectionError(f"{self.mirror.url}: {_net_why(exc)}") from None
        return 200, bytes(buf)

    def read_pieces(self, net: Any, shape: Shape, root: str, a: int, b: int, out: memoryview,
                    until: float, head: float,
                    anchor: tuple[Node, bytes] | None) -> tuple[dict[Node, bytes], int]:
        """Fill OUT with pieces [a, b) and check them by a proof made of the mirror's
        stored nodes; return (the nodes verified, the proof's length). Raises _Failed
        (unreachable, an error status, a short answer) or _Lie (anything that does not
        verify); OUT then holds unverified bytes."""
        start, end = shape.byte_span(a, b)
        ob_url = self.outboard_url(shape.block_size)
        ob_size = shape.outboard_size(0)
        wanted = proof.proof_nodes(shape, a, b, anchor[0] if anchor else None)
        low = [n for n in wanted if n[0] < GROUP]
        high = [n for n in wanted if n[0] >= GROUP]
        tail_start = max(0, ob_size - TAIL_BYTES)
        tail_key = (self.mirror.url, self.sha1, shape.block_size)
        tail = _tails.get(tail_key) if any(shape.offset(*n, 0) >= tail_start for n in high) else b""
        jobs: dict[str, Future[bytes]] = {}

        def ask(name: str, lo: int, hi: int) -> None:
            jobs[name] = _pool().submit(_range, net, ob_url, lo, hi, ob_size, until, head)

        groups = sorted({j >> (GROUP - level) for level, j in low})
        for g in groups:
            lo, hi = shape.span(GROUP, g)  # above the top: the whole tree, one group
            ask(f"g{g}", lo * HASH_BYTES, hi * HASH_BYTES)
        if tail is None:
            ask("tail", tail_start, ob_size)
        below = [n for n in high if shape.offset(*n, 0) < tail_start]
        for off, length in proof.proof_ranges(shape, below, 0):
            ask(f"r{off}", off, off + length)
        try:
            net._stream(self.data_url, start, end, shape.size, a, None, shape.block_size, out,
                        until, head)
        finally:
            results = {name: _result(f, until) for name, f in jobs.items()}
        for value in results.values():
            if isinstance(value, BaseException):
                raise value
        got: dict[str, bytes] = {k: v for k, v in results.items() if isinstance(v, bytes)}
        if tail is None:
            tail = got["tail"]
        levels = {g: _group_levels(got[f"g{g}"]) for g in groups}

        def get_node(level: int, index: int) -> bytes:
            if level < GROUP:
                g = index >> (GROUP - level)
                return levels[g][level][index - (g << (GROUP - level))]
            at = shape.offset(level, index, 0)
            if at >= tail_start:
                return bytes(tail[at - tail_start: at - tail_start + HASH_BYTES])
            for off, blob in ((int(k[1:]), v) for k, v in got.items() if k.startswith("r")):
                if off <= at < off + len(blob):
                    return blob[at - off: at - off + HASH_BYTES]
            raise VerificationError(f"node ({level}, {index}) was not fetched")

        try:
            nodes = proof.make_proof(get_node, shape, a, b, anchor[0] if anchor else None)
            verified = piecewire.check_pieces(root, shape, a, b, out, nodes, anchor)
        except (VerificationError, IndexError, KeyError) as exc:
            _tails.drop(tail_key)  # an unverified cache: never keep what failed
            raise _Lie(f"pieces {a}-{b - 1} and the mirror's tree nodes do not verify: {exc}",
                       0) from None
        if "tail" in got:
            _tails.put(tail_key, got["tail"])
        return verified, len(nodes)


def _group_levels(leaves: bytes) -> list[list[bytes]]:
    """Levels 0..GROUP of one aligned group, from its leaves (`proof.level_up` is exact
    for an aligned slice)."""
    row = [leaves[i: i + HASH_BYTES] for i in range(0, len(leaves), HASH_BYTES)]
    out = [row]
    for _ in range(GROUP):
        out.append(proof.level_up(out[-1]))
    return out


def _range(net: Any, url: str, lo: int, hi: int, size: int, until: float, head: float) -> bytes:
    buf = bytearray(hi - lo)
    net._stream(url, lo, hi, size, 0, None, 1, memoryview(buf), until, head)
    return bytes(buf)


def _result(f: Future[bytes], until: float) -> bytes | BaseException:
    try:
        return f.result(timeout=max(0.05, until - time.monotonic()))
    except (_Failed, _Lie) as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - a timeout or a bug in a node request: a failure
        return _Failed(f"tree nodes: {exc.__class__.__name__}", 0, False)


class _Tails:
    """The outboard tails read so far (unverified bytes, bounded, least recently used out)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()

    def get(self, key: tuple[str, str, int]) -> bytes | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is not None:
                self._data.move_to_end(key)
            return hit

    def put(self, key: tuple[str, str, int], value: bytes) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > MAX_TAILS:
                self._data.popitem(last=False)

    def drop(self, key: tuple[str, str, int]) -> None:
        with self._lock:
            self._data.pop(key, None)


_tails = _Tails()
_pool_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _pool_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(NODE_THREADS, thread_name_prefix="kbfs-mirror")
        return _executor


_mirrors: dict[str, Mirror] = {}
_mirrors_lock = threading.Lock()


def mirror_for(url: str) -> Mirror:
    """The one Mirror object per URL in this process (its presigned URLs are shared)."""
    with _mirrors_lock:
        m = _mirrors.get(url)
        if m is None:
            m = _mirrors[url] = Mirror(url)
        return m


def split(entries: list[str]) -> tuple[list[str], list[tuple[str, Mirror | None]]]:
    """(relays, the whole list in order as (relay URL, None) or (mirror URL, Mirror)) of a
    reader's relay list in which mirrors are `mirrorurl.mark`ed. An entry that does not
    pass `mirror_problem` is dropped (callers check what users type before)."""
    relays: list[str] = []
    order: list[tuple[str, Mirror | None]] = []
    for entry in entries:
        url = mirrorurl.unmark(entry)
        if url is None:
            relays.append(entry)
            order.append((entry, None))
            continue
        problem, norm = mirrorurl.mirror_problem(url)
        if problem is None and all(u != norm for u, _ in order):
            order.append((norm, mirror_for(norm)))
    return relays, order
