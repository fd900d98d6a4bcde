"""The reader's Python API: name a source, get verified bytes.

Sources a user can name:

    path/to/NAME.prv                    a pointer file
    sha1://SHA1[/NAME]                  the original KBucket URI (size asked of the relays)
    kbfs://HOST:PORT/SHARE_ID/a/b.h5    a file in a share, as listed by that (http) relay
    kbfs+https://HOST[:PORT]/SHARE_ID/a/b.h5   the same on an https relay (`kbfs.kbfsurl`)

Where the bytes come from, in order: the pointer's `original_path` when that file
still exists with the right size, SHA-1 and (when the pointer has one) block tree root at
the pointer's block size (hashed once, then remembered by (path, size, mtime, ctime,
inode, device) in `CACHE_DIR/client-state.json`, 0600), a file of the same name and size
in a configured search folder (checked the same way), the block cache, then the relays
(the `Fetcher` tries direct share URLs first and fails over). A local copy is used only
once it matched everything the pointer says.

Public functions: `resolve`, `open`, `realize`, `locate`, `download`; and the fsspec
file systems `Sha1FileSystem` ("sha1"), `KbfsFileSystem` ("kbfs") and `KbfsHttpsFileSystem`
("kbfs+https"), made and registered
with fsspec on first use of their names (fsspec's entry points do that), or when this
module is imported after fsspec. One `BlockCache` per cache folder and one
`Fetcher` per relay list are shared by every call in the process.

v2 pointers (a root and 64 KiB leaves, `reader.takes_pieces`) are read through one
`kbfs.piececache.PieceCache` per cache folder, in `CACHE_DIR/pieces/`, made on the first
v2 read (`_make_pieces`; v1-only use never imports it), with the router as its source
(`Fetcher.fetch_pieces`: verified pieces with a proof, one round trip); see
`reader.PieceReads` for the fall-back when no source proves. Capacity: the configured size
is split when the piece cache is made, half for it and half for the block cache (until then
the block cache has all of it). `kbfs.open`/fsspec/`cat` read v2 content in 64 KiB-buffered
pieces; `download` reads it in large sequential chunks through the piece cache (whose
read-ahead fills the link) into a temporary file, checks the whole file's SHA-1 once, and
renames it into place. A failed or interrupted v2 download keeps its pieces in the piece
cache (not a part file): the same download again reads them from there.

This module wires the pieces together (layer L4); it holds no verification logic of
its own: blocks are verified by the cache or the fetcher, local copies by
`prv.file_matches`-style digests. `download` writes fetched blocks straight into
`.NAME.kbfs-part` next to the target (opened with O_NOFOLLOW and resumed only when it is a
regular file of ours; O_DIRECT where it can) and does NOT store them in
the cache; blocks already cached are copied from it (in the kernel, as `cp` does; when the
cache holds every block the part file's disk blocks are allocated first, see
`_preallocate`). It never prints; the command line (`cli_get`) does.
"""

from __future__ import annotations

import atexit
import builtins
import errno
import fcntl
import io
import json
import logging
import mmap
import os
import posixpath
import queue
import re
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from kbfs import cachefiles, kbfsurl, osio, protocol, prv, tree
from kbfs.buffers import DIRECT_ALIGN, anonymous_memory
from kbfs.config import Settings, load_settings
from kbfs.errors import (
    BadRequest,
    ConfigError,
    KbfsError,
    NotFound,
    PointerError,
    SourceError,
    VerificationError,
)
from kbfs.fileref import FileRef
from kbfs.piececache import PieceCache
from kbfs.reader import KbfsFile, takes_pieces

if TYPE_CHECKING:
    from kbfs.fetch import Fetcher

log = logging.getLogger(__name__)

__all__ = [
    "Resolved",
    "Location",
    "DownloadResult",
    "Client",
    "get_client",
    "resolve",
    "open",
    "realize",
    "locate",
    "download",
    "Sha1FileSystem",  # noqa: F822 - made on first use by the module's __getattr__
    "KbfsFileSystem",  # noqa: F822
    "KbfsHttpsFileSystem",  # noqa: F822
]

STATE_FILE = "client-state.json"
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_STATE_MAX_ENTRIES = 10_000
DEFAULT_BUFFER = 1 << 20
# A download fetches runs of up to this many blocks, one range request each, in
# DOWNLOAD_WORKERS threads. Measured through a relay on 2 cores (bench/bench_download.py,
# CPU of relay + share + client per GiB): 64-block runs cost the share a fifth less than
# 16-block ones, and a third and fourth worker cost the relay ~25% more CPU for no speed.
# Memory: (workers + 1) runs of buffers.
DOWNLOAD_CHUNK_BLOCKS = 64
DOWNLOAD_WORKERS = 2
# Root-less (legacy) content goes through the cache in spans of this many blocks, each
# fetched by the cache in one range request (its MAX_RUN).
LEGACY_CHUNK_BLOCKS = 16
# A v2 download reads the piece cache in chunks of this size: the first is one request,
# then the cache's read-ahead (bandwidth x delay) runs ahead of the chunks.
PIECE_DOWNLOAD_CHUNK = 4 << 20
PIECES_DIR = "pieces"     # CACHE_DIR/pieces/: the piece cache of v2 content


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Resolved:
    """What a source names: the content (`ref`), a file name, and where it came from."""

    ref: FileRef
    name: str
    original_path: str = ""
    pointer: prv.Pointer | None = None
    # Relays the source itself names (a kbfs:// URL's host), tried before configured ones.
    relays: tuple[str, ...] = ()
    # For kbfs:// sources: the share's own URL of the file (shown by `locate`).
    share_url: str = ""
    # A pointer's source hints (`kbfs_sources`), tried after the configured relays.
    hints: tuple[str, ...] = ()


@dataclass(frozen=True)
class Location:
    """Where a source's content can be had (the answer of `kbfs locate`)."""

    resolved: Resolved
    local: list[str] = field(default_factory=list)      # verified local copies
    cached_bytes: int = 0
    cache_state: str = "pending"                         # 'tree' | 'sha1' | 'pending'
    urls: list[str] = field(default_factory=list)        # network sources, in the order tried


@dataclass(frozen=True)
class DownloadResult:
    path: str
    size: int
    from_local: str | None      # the local copy that was copied, if any
    cached_before: int          # bytes already in the cache when the download began
    seconds: float
    fetched: int = 0            # bytes that came over the network
    resumed: int = 0            # bytes kept from the part file of an earlier run


class _Tally:
    """Where a download's bytes came from.

    This and `_Shared` are plain classes, not dataclasses: each dataclass costs every
    command ~0.3 ms of start-up to generate its methods, and nothing compares these."""

    def __init__(self) -> None:
        self.fetched = 0
        self.resumed = 0
        self.copied = 0


# ---------------------------------------------------------------- remembered local checks


class _State:
    """Small persistent memory in the cache folder, so expensive checks happen once.

    `files`: path (and block size when not the default) -> its stat stamp (size, mtime,
    ctime, inode, device) and the (sha1, root at that block size) we hashed it to; `sizes`:
    sha1 -> size, so a `sha1://` source whose content is cached still opens with every
    relay down. The file is 0600 in the 0700 cache folder: only this user can forge it.
    Several processes may share the file: each save merges with what is on disk.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._files: dict[str, list[Any]] = {}
        self._sizes: dict[str, int] = {}
        self._load_into(self._files, self._sizes)

    def _load_into(self, files: dict[str, list[Any]], sizes: dict[str, int]) -> None:
        try:
            with builtins.open(self._path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return  # a missing or damaged memory only costs a re-check
        if isinstance(data, dict):
            if isinstance(data.get("files"), dict):
                files.update({k: v for k, v in data["files"].items()
                              if isinstance(v, list) and len(v) == 7})
            if isinstance(data.get("sizes"), dict):
                sizes.update({k: v for k, v in data["sizes"].items() if isinstance(v, int)})

    def _save(self) -> None:
        files: dict[str, list[Any]] = {}
        sizes: dict[str, int] = {}
        self._load_into(files, sizes)
        files.update(self._files)
        sizes.update(self._sizes)
        # Keep the newest entries (dicts keep insertion order) so the file stays small.
        files = dict(list(files.items())[-_STATE_MAX_ENTRIES:])
        sizes = dict(list(sizes.items())[-_STATE_MAX_ENTRIES:])
        os.makedirs(os.path.dirname(self._path), exist_ok=True)
        tmp = f"{self._path}.{os.urandom(16).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            with builtins.open(fd, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "files": files, "sizes": sizes}, f)
            os.replace(tmp, self._path)
        except OSError as exc:
            log.debug("cannot save %s: %s", self._path, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def digest(self, path: str, st: os.stat_result,
               block_size: int = tree.BLOCK_SIZE) -> tuple[str, str]:
        """(sha1, root at BLOCK_SIZE) of the file at PATH, hashed only if its stat changed
        since last time (the ctime too: a changed file cannot keep it, whatever its mtime)."""
        key = os.path.realpath(path)
        if block_size != tree.BLOCK_SIZE:
            key += f"\0{block_size}"
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
        with self._lock:
            known = self._files.get(key)
        if known is not None and known[:5] == stamp:
            return str(known[5]), str(known[6])
        log.info("checking local copy %s (%d bytes) once", path, st.st_size)
        sha1, root = _digest_at(path, block_size)
        after = os.stat(path)
        if [after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino,
                after.st_dev] != stamp:
            # Changed while we read it: do not remember a digest of moving bytes.
            return sha1, root
        with self._lock:
            self._files.pop(key, None)
            self._files[key] = [*stamp, sha1, root]
            self._save()
        return sha1, root

    def remember_size(self, sha1: str, size: int) -> None:
        with self._lock:
            if self._sizes.get(sha1) == size:
                return
            self._sizes[sha1] = size
            self._save()

    def known_size(self, sha1: str) -> int | None:
        with self._lock:
            size = self._sizes.get(sha1)
        if size is None:
            # Another process may have learnt it since we loaded.
            files: dict[str, list[Any]] = {}
            sizes: dict[str, int] = {}
            self._load_into(files, sizes)
            size = sizes.get(sha1)
        return size


def _digest_at(path: str, block_size: int) -> tuple[str, str]:
    """(sha1, block tree root at BLOCK_SIZE) of the file at PATH, in one read."""
    if block_size in (tree.BLOCK_SIZE, tree.DEFAULT_BLOCK_SIZE):  # v1 and v2 pointers
        d = prv.digest_file(path, None, block_size)
        return d.sha1, d.root
    import hashlib  # a local copy of a pointer with another block size: rare

    sha1 = hashlib.sha1()
    leaves: list[bytes] = []
    size = 0
    step = max(1, (16 << 20) // block_size) * block_size
    with builtins.open(path, "rb", buffering=0) as f:
        while True:
            chunk = f.read(step)
            if not chunk:
                break
            sha1.update(chunk)
            view = memoryview(chunk)
            leaves.extend(tree.leaf_hash(view[i:i + block_size])
                          for i in range(0, len(chunk), block_size))
            size += len(chunk)
            if len(chunk) % block_size:
                if f.read(1):
                    raise VerificationError(f"{path}: a short read before its end")
                break
    if not leaves:
        leaves.append(tree.leaf_hash(b""))
    return sha1.hexdigest(), tree.root_from_leaves(leaves, size, block_size)


# ---------------------------------------------------------------- sources for the cache


# Which bearer tokens may go to which relay: ((relay, (token, ...)), ...), sorted; see
# `config.Settings.tokens_for`. Hashable, so it can key a Fetcher.
_Tokens = tuple[tuple[str, tuple[str, ...]], ...]


def _tokens_key(tokens: dict[str, tuple[str, ...]]) -> _Tokens:
    return tuple(sorted((relay, ts) for relay, ts in tokens.items() if ts))


class _Router:
    """The cache's `BlockSource`: sends each sha1 to a Fetcher over the right relays.

    The cache is one per folder but sources name different relays (a kbfs:// URL
    carries its own) and may carry tokens for some of them; the router keeps one Fetcher
    per (relay list, tokens) and remembers which each sha1 was resolved with, and the
    share and path a kbfs:// URL named it by (to say, when that content is gone, whether
    the share now holds another version of the path: `_explain`).
    """

    def __init__(self, local_dirs: Sequence[str], direct: bool = True) -> None:
        self._local_dirs = tuple(local_dirs)
        self._direct = direct  # Settings.direct: use share URLs from /api/find
        self._lock = threading.Lock()
        self._fetchers: dict[tuple[tuple[str, ...], _Tokens], Fetcher] = {}
        self._routes: dict[str, tuple[tuple[str, ...], _Tokens]] = {}
        self._known: dict[tuple[tuple[str, ...], _Tokens], None] = {}  # every route, in order
        self._named: dict[str, tuple[str, str, str]] = {}  # sha1 -> (relay, share, path)

    def fetcher(self, relays: Sequence[str], tokens: _Tokens = ()) -> Fetcher:
        key = (tuple(dict.fromkeys(relays)), tokens)
        with self._lock:
            self._known[key] = None
            f = self._fetchers.get(key)
            if f is None:
                # Imported here: the HTTP stack costs a fifth of a second of start-up that a
                # `kbfs download` or `kbfs cat` of content already cached never needs.
                from kbfs.fetch import Fetcher

                f = self._fetchers[key] = Fetcher(list(key[0]), local_dirs=self._local_dirs,
                                                  direct=self._direct, tokens=dict(tokens))
            return f

    def route(self, sha1: str, relays: Sequence[str], tokens: _Tokens = (),
              named: tuple[str, str, str] | None = None) -> None:
        """Use RELAYS (before any relays already routed for SHA1) to fetch SHA1, sending
        TOKENS (relay -> tokens) where they may go; NAMED: the (relay, share, path) of
        the kbfs:// URL that named SHA1.

        Only remembered: the Fetcher (and the HTTP stack) is made when a block or a tree
        is first needed, which a download of cached content never does."""
        with self._lock:
            old_relays, old_tokens = self._routes.get(sha1, ((), ()))
            merged = tuple(dict.fromkeys([*relays, *old_relays]))
            given: dict[str, tuple[str, ...]] = {}
            for relay, ts in (*tokens, *old_tokens):
                given[relay] = tuple(dict.fromkeys([*given.get(relay, ()), *ts]))
            route = (merged, _tokens_key(given))
            self._routes[sha1] = route
            self._known[route] = None
            if named is not None:
                self._named[sha1] = named

    def for_sha1(self, sha1: str) -> Fetcher:
        with self._lock:
            route = self._routes.get(sha1)
            named = self._named.get(sha1)
            if route is None:
                given: dict[str, tuple[str, ...]] = {}
                for _, tokens in self._known:
                    for relay, ts in tokens:
                        given[relay] = tuple(dict.fromkeys([*given.get(relay, ()), *ts]))
                route = (tuple(dict.fromkeys(r for rs, _ in self._known for r in rs)),
                         _tokens_key(given))
        f = self.fetcher(*route)
        if named is not None:
            f.prefer_share(sha1, named[1])
        return f

    @contextmanager
    def _explain(self, sha1: str) -> Iterator[None]:
        """Turn "no source has SHA1" into "the share now holds another version of that
        path" when a kbfs:// URL named SHA1 and the share's listing now shows other
        content there (asked only once the read has failed)."""
        try:
            yield
        except NotFound as exc:
            with self._lock:
                named = self._named.get(sha1)
            if named is None:
                raise
            relay, share, path = named
            parent, _, name = path.rpartition("/")
            try:
                entry = _listing_entry(_list_share(self.for_sha1(sha1), relay, share, parent), name)
            except KbfsError:
                raise exc from None
            if entry is None:
                raise NotFound(f"share {share} no longer has {path} (it held sha1 {sha1}): "
                               f"{exc}") from None
            now = (entry.get("prv") or {}).get("original_checksum")
            if now and now != sha1:
                raise NotFound(
                    f"share {share} now holds a different version of {path} (sha1 {now}, "
                    f"{entry.get('size')} bytes) than the one asked for (sha1 {sha1}): open "
                    "the kbfs:// URL again to read the new one") from None
            raise

    def fetch_tree(self, sha1: str, size: int, block_size: int = tree.BLOCK_SIZE, root: str | None = None) -> bytes:
        with self._explain(sha1):
            return self.for_sha1(sha1).fetch_tree(sha1, size, block_size, root)

    def fetch_blocks(
        self, sha1: str, size: int, first: int, count: int, leaves: Sequence[bytes],
        block_size: int = tree.BLOCK_SIZE,
    ) -> bytes:
        with self._explain(sha1):
            return self.for_sha1(sha1).fetch_blocks(sha1, size, first, count, leaves, block_size)

    def fetch_blocks_into(
        self, sha1: str, size: int, first: int, count: int, leaves: Sequence[bytes],
        out: memoryview, block_size: int = tree.BLOCK_SIZE,
    ) -> None:
        # The cache's copy-free path (no bytes() of every fetched run).
        with self._explain(sha1):
            self.for_sha1(sha1).fetch_blocks_into(sha1, size, first, count, leaves, out,
                                                  block_size)

    def fetch_pieces(self, sha1: str, size: int, root: str, block_size: int, first: int,
                     count: int, *, known: Any = None) -> bytes:
        # The piece cache's source (v2 pointers): verified by proof in the Fetcher.
        with self._explain(sha1):
            return self.for_sha1(sha1).fetch_pieces(sha1, size, root, block_size, first, count,
                                                    known=known)

    def statistics(self) -> dict[str, Any]:
        with self._lock:
            fetchers = dict(self._fetchers)
        # Keyed by the relay list (and, when tokens go with it, how many: never the tokens).
        return {",".join(k[0]) + (f" (+{sum(len(t) for _, t in k[1])} tokens)" if k[1] else ""):
                f.statistics() for k, f in fetchers.items()}


class _Shared:
    """What every Client of one cache folder shares (a plain class: see `_Tally`)."""

    def __init__(self, cache: PieceCache, router: _Router, state: _State) -> None:
        self.cache = cache
        self.router = router
        self.state = state


_shared_lock = threading.Lock()
_shared: dict[str, _Shared] = {}
_clients: dict[tuple[Any, ...], Client] = {}


def _shared_for(settings: Settings) -> _Shared:
    """The one cache (and its router) of a cache folder in this process."""
    with _shared_lock:
        sh = _shared.get(settings.cache_dir)
        if sh is None:
            router = _Router(settings.search_dirs, settings.direct)
            cache = PieceCache(os.path.join(settings.cache_dir, PIECES_DIR), router,
                               settings.resolved_cache_size())
            sh = _Shared(cache, router, _State(os.path.join(settings.cache_dir, STATE_FILE)))
            _shared[settings.cache_dir] = sh
        return sh


@atexit.register
def _close_all() -> None:
    with _shared_lock:
        shared = list(_shared.values())
        _shared.clear()
        _clients.clear()
    for sh in shared:
        try:
            sh.cache.close()
        except Exception as exc:  # noqa: BLE001 - closing at exit must not mask the real outcome
            log.debug("closing cache: %s", exc)


# ---------------------------------------------------------------- source parsing


def _ref_of(pointer: prv.Pointer) -> FileRef:
    if pointer.tree is None:
        return FileRef(pointer.sha1, pointer.size, None)
    return FileRef(pointer.sha1, pointer.size, pointer.tree.root, pointer.tree.block_size)


def _strip_prv(name: str) -> str:
    return name[: -len(".prv")] if name.endswith(".prv") else name


def parse_sha1_uri(source: str) -> tuple[str, str]:
    """`sha1://SHA1[/NAME]` (or `SHA1[/NAME]` once fsspec stripped the scheme) -> (sha1, name)."""
    rest = source[len("sha1://"):] if source.startswith("sha1://") else source
    sha1_part, _, name = rest.strip("/").partition("/")
    try:
        sha1 = protocol.check_sha1(sha1_part)
    except BadRequest:
        raise BadRequest(f"{source}: expected sha1://SHA1[/NAME] with 40 hex digits") from None
    # urllib.parse (with ipaddress) is ~1.4 ms of start-up: loaded only for these URIs.
    from urllib.parse import unquote

    name = posixpath.basename(unquote(name).rstrip("/"))
    return sha1, name


def parse_kbfs_uri(source: str) -> tuple[str, str, str]:
    """`kbfs://HOST:PORT/SHARE_ID/path` or `kbfs+https://HOST[:PORT]/SHARE_ID/path` ->
    (relay URL, share id, share-relative path); BadRequest saying why not (`kbfs.kbfsurl`)."""
    return kbfsurl.parse(source)


# ---------------------------------------------------------------- the client


class Client:
    """Resolves sources and reads them through the shared cache, for one set of settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        sh = _shared_for(settings)
        self.cache = sh.cache
        self.pieces = sh.cache    # the same one cache (older callers named it so)
        self._router = sh.router
        self._state = sh.state

    def reads_of(self, ref: FileRef) -> PieceCache:
        """The cache REF is read through: the one piece cache, for every pointer kind."""
        return self.cache

    @property
    def fetcher(self) -> Fetcher:
        """The Fetcher over the configured relays (with the tokens that may go to them)."""
        return self._fetcher_for(self.settings.relays)

    def _fetcher_for(self, relays: Sequence[str], named: Sequence[str] = ()) -> Fetcher:
        """A Fetcher over RELAYS, with the tokens that may go to each (NAMED: relays a
        kbfs:// URL names, trusted with the user's tokens like the configured ones)."""
        return self._router.fetcher(relays, self._tokens(relays, named))

    def _tokens(self, relays: Sequence[str], named: Sequence[str] = ()) -> _Tokens:
        return _tokens_key(self.settings.tokens_for(list(relays), tuple(named)))

    def _route(self, r: Resolved, named: tuple[str, str, str] | None = None) -> None:
        """Tell the router where R's content is read from: the relays R names (a kbfs://
        URL's), the configured relays, then R's hints; tokens only where they may go."""
        relays = [*r.relays, *self.settings.relays, *r.hints]
        relays = mirror_route(self.settings.mirrors, relays, r.pointer)  # docs/mirrors.md
        self._router.route(r.ref.sha1, relays, self._tokens(relays, r.relays), named)

    # ---- resolving

    def resolve(self, source: str | os.PathLike[str]) -> Resolved:
        """Turn a source into the content it names; raises a KbfsError saying why not."""
        text = os.fspath(source)
        if text.startswith("sha1://"):
            r = self._resolve_sha1(text)
        elif kbfsurl.is_link(text):
            r = self._resolve_kbfs(text)
        elif _SCHEME_RE.match(text) and not os.path.exists(text):
            raise BadRequest(
                f"{text}: unknown kind of source; name a .prv file, sha1://SHA1[/NAME] "
                f"or {kbfsurl.SYNTAX}"
            )
        else:
            r = self._resolve_pointer_file(text)
        self._route(r, parse_kbfs_uri(text) if kbfsurl.is_link(text) else None)
        return r

    def _resolve_pointer_file(self, path: str) -> Resolved:
        if os.path.isdir(path):
            raise PointerError(f"{path}: is a folder; name one .prv file (or mount the folder)")
        if not os.path.exists(path):
            raise NotFound(f"{path}: no such pointer file")
        p = prv.load_pointer(path)
        name = _strip_prv(os.path.basename(path)) or posixpath.basename(p.original_path) or p.sha1
        return Resolved(_ref_of(p), name, p.original_path, p, hints=tuple(p.source_hints()))

    def _resolve_sha1(self, source: str) -> Resolved:
        sha1, name = parse_sha1_uri(source)
        size = None
        if self.settings.relays:
            try:
                found = self.fetcher.find(sha1)
            except KbfsError as exc:
                # Relays down: a size we learnt before still lets cached content open.
                log.info("find %s: %s", sha1, exc)
                found = None
                size = self._state.known_size(sha1)
                if size is None:
                    raise
            if found is not None:
                size = int(found.size)
                self._state.remember_size(sha1, size)
        if size is None:
            size = self._state.known_size(sha1)
        if size is None:
            if not self.settings.relays:
                raise ConfigError(
                    f"{source}: the size of a sha1:// source is asked of a relay, and none is "
                    "configured (use --relay, KBFS_RELAY or the config file)"
                )
            raise NotFound(f"{source}: no relay knows this content")
        # Legacy rule: no root vouches for the tree, so the cache trusts the first tree it
        # gets and checks the whole-file SHA-1 once every block is present.
        return Resolved(FileRef(sha1, size, None), name or sha1)

    def _resolve_kbfs(self, source: str) -> Resolved:
        relay, share, relpath = parse_kbfs_uri(source)
        if not relpath:
            raise BadRequest(f"{source}: names the share's top folder, not a file")
        parent, _, name = relpath.rpartition("/")
        listing = _list_share(self._fetcher_for([relay], [relay]), relay, share, parent)
        entry = _listing_entry(listing, name)
        if entry is None:
            if name in (listing.get("dirs") or []):
                raise BadRequest(f"{source}: is a folder, not a file")
            raise NotFound(f"{source}: no such file in share {share}")
        p = prv.pointer_from_dict(entry.get("prv"), source)
        url = relay + protocol.share_url_path(protocol.SHARE_FILE_PATH, share=share, path=relpath)
        return Resolved(_ref_of(p), name, p.original_path, p, (relay,), url)

    def resolve_pointer(self, pointer: prv.Pointer, name: str,
                        relays: Sequence[str] = ()) -> Resolved:
        """A pointer already parsed (an entry of a .prvdir or of a share's listing) as a
        source: read through RELAYS (e.g. the relay that listed it), the configured relays,
        then the pointer's hints."""
        r = Resolved(_ref_of(pointer), name, pointer.original_path, pointer, tuple(relays),
                     hints=tuple(pointer.source_hints()))
        self._route(r)
        return r

    def list_share(self, relay: str, share: str, path: str) -> dict[str, Any]:
        """The checked listing of folder PATH of SHARE at RELAY (`protocol.parse_listing`)."""
        return _list_share(self._fetcher_for([relay], [relay]), relay, share, path)

    def is_copy(self, path: str, ref: FileRef) -> bool:
        """Whether PATH is a complete copy of REF (size, SHA-1 and root; remembered by stat)."""
        return self._local_matches(path, ref)

    # ---- local copies

    def local_copies(self, r: Resolved, first_only: bool = True) -> list[str]:
        """Verified local files holding R's content: original_path, then search folders."""
        candidates: list[str] = []
        if r.original_path:
            candidates.append(r.original_path)
        names = dict.fromkeys(n for n in (r.name, posixpath.basename(r.original_path)) if n)
        for d in self.settings.search_dirs:
            candidates.extend(os.path.join(d, n) for n in names)
        found = []
        for path in dict.fromkeys(candidates):
            if self._local_matches(path, r.ref):
                found.append(path)
                if first_only:
                    break
        return found

    def _local_matches(self, path: str, ref: FileRef) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != ref.size:
            return False
        try:
            sha1, root = self._state.digest(path, st, ref.block_size)
        except (OSError, KbfsError) as exc:
            log.info("local copy %s unreadable: %s", path, exc)
            return False
        if sha1 != ref.sha1:
            log.info("local copy %s has SHA-1 %s, not %s; not used", path, sha1, ref.sha1)
            return False
        # Everything the pointer commits to: its root too, at the pointer's block size.
        if ref.root is not None and root != ref.root:
            log.info("local copy %s has the SHA-1 but not the block tree root; not used", path)
            return False
        return True

    # ---- reading

    def _check_sources(self, r: Resolved, whole: bool) -> None:
        """Say plainly when nothing could supply missing blocks (rather than a fetch error)."""
        if r.relays or r.hints or self.settings.relays or self.settings.mirrors or (
                r.pointer is not None and r.pointer.mirror_hints()):
            return
        cached = self.reads_of(r.ref).cached_bytes(r.ref)
        if cached < r.ref.size if whole else cached == 0:
            raise ConfigError(
                f"{r.name}: no local copy and no relay configured "
                "(use --relay, KBFS_RELAY or the config file)"
            )

    def open(self, source: str | os.PathLike[str] | Resolved, *, local: bool = True,
             buffer_size: int | None = None) -> BinaryIO:
        """A read-only, seekable binary file of SOURCE's verified bytes.

        BUFFER_SIZE: of the BufferedReader (default DEFAULT_BUFFER; for v2 content its block
        size, so that a small random read asks for one 64 KiB piece, not 1 MiB)."""
        r = source if isinstance(source, Resolved) else self.resolve(source)
        if buffer_size is None:
            buffer_size = r.ref.block_size if takes_pieces(r.ref) else DEFAULT_BUFFER
        if local:
            copies = self.local_copies(r)
            if copies:
                return builtins.open(copies[0], "rb", buffering=buffer_size)
        self._check_sources(r, whole=False)
        raw = KbfsFile(self.reads_of(r.ref), r.ref, r.name)
        return io.BufferedReader(raw, buffer_size=buffer_size)  # type: ignore[return-value]

    def realize(self, source: str | os.PathLike[str] | Resolved, *, local: bool = True) -> str:
        """Path of a complete, verified copy: a checked local original, else the cache's copy."""
        r = source if isinstance(source, Resolved) else self.resolve(source)
        if local:
            copies = self.local_copies(r)
            if copies:
                return copies[0]
        self._check_sources(r, whole=True)
        return cachefiles.local_path(self.cache, r.ref)

    def locate(self, source: str | os.PathLike[str] | Resolved) -> Location:
        """Every place SOURCE's content can be had from, without fetching any of it."""
        r = source if isinstance(source, Resolved) else self.resolve(source)
        local = self.local_copies(r, first_only=False)
        reads = self.reads_of(r.ref)
        cached = reads.cached_bytes(r.ref)
        state = reads.verified(r.ref)
        urls: list[str] = [r.share_url] if r.share_url else []
        relays = [*r.relays, *self.settings.relays]
        if relays:
            try:
                found = self._fetcher_for(relays, r.relays).find(r.ref.sha1)
            except KbfsError as exc:
                log.info("find %s: %s", r.ref.sha1, exc)
                found = None
            if found is not None:
                urls.extend(found.urls)
        return Location(r, local, cached, state, list(dict.fromkeys(urls)))

    def download(
        self,
        source: str | os.PathLike[str] | Resolved,
        out: str | None = None,
        *,
        local: bool = True,
        workers: int = DOWNLOAD_WORKERS,
        progress: Callable[[int], None] | None = None,
        on_total: Callable[[int], None] | None = None,
    ) -> DownloadResult:
        """Write SOURCE's verified bytes to OUT (default: NAME in the current folder).

        OUT appears only once complete and verified (renamed into place); on any failure
        nothing is left at OUT and the error is re-raised. Content with a block tree root is
        written to `.NAME.kbfs-part` next to OUT, kept when a download fails or is killed:
        the next download of the same content to OUT re-checks its blocks and fetches only
        those that do not match (see `_download_blocks`). Root-less (legacy) content goes
        through the cache instead, whose blocks the next run resumes from.
        """
        started = time.monotonic()
        r = source if isinstance(source, Resolved) else self.resolve(source)
        target = _target_path(out, r.name)
        copies = self.local_copies(r) if local else []
        if not copies:
            self._check_sources(r, whole=True)
        cached_before = 0 if copies else self.reads_of(r.ref).cached_bytes(r.ref)
        if on_total is not None:
            on_total(r.ref.size)
        tally = _Tally()
        if copies:
            with _atomic_output(target) as fd, builtins.open(copies[0], "rb") as src:
                _copy_range(src.fileno(), fd, 0, r.ref.size, progress)
        elif r.ref.root is None or takes_pieces(r.ref):
            tally = self._download_pieces(r.ref, target, progress)
        else:
            tally = self._download_blocks(r.ref, target, workers, progress)
        if copies or r.ref.root is None or takes_pieces(r.ref):
            # These paths resume from the cache, not from `.NAME.kbfs-part`; one left by a
            # 1 MiB run (or an older kbfs) is obsolete now that TARGET is whole and verified.
            _drop_part(target)
        return DownloadResult(target, r.ref.size, copies[0] if copies else None, cached_before,
                              time.monotonic() - started, tally.fetched, tally.resumed)

    def _download_pieces(self, ref: FileRef, target: str,
                         progress: Callable[[int], None] | None) -> _Tally:
        """Fill TARGET with REF's bytes (v2, or root-less), read through the piece cache in
        sequential chunks of PIECE_DOWNLOAD_CHUNK (every piece verified by proof against the
        root, or by the leaf list), written to a temporary file renamed into place once the
        whole file matched the pointer's SHA-1 too.

        Root-less REF that never matched its SHA-1: the cache's whole-file pass hands its
        bytes straight to the file as they come (one fetch, whatever the cache's size).

        Resuming: pieces fetched by a failed or interrupted run are in the piece cache and
        are read from there (the result's `cached_before`); no part file is kept."""
        import hashlib  # these downloads only: a cached v1 download never loads it

        tally = _Tally()
        reads = self.cache
        reported = 0
        before = reads.statistics().get("bytes_fetched", 0)
        digest = hashlib.sha1()
        reads.open_file(ref)
        try:
            with _atomic_output(target) as fd:
                os.ftruncate(fd, ref.size)

                def sink(offset: int, data: memoryview) -> None:
                    _pwrite_all(fd, data, offset)
                    if progress is not None:
                        progress(len(data))

                if ref.root is None and reads.check_whole(ref, sink):
                    return tally   # the pass matched the SHA-1 over exactly these bytes
                pos = 0
                while pos < ref.size:
                    n = min(PIECE_DOWNLOAD_CHUNK, ref.size - pos)
                    data = reads.read(ref, pos, n)
                    if len(data) != n:
                        raise VerificationError(f"sha1 {ref.sha1}: the cache gave {len(data)} "
                                                f"bytes at {pos}, not {n}")
                    _pwrite_all(fd, data, pos)
                    digest.update(data)
                    pos += n
                    if progress is not None and pos > reported:
                        progress(pos - reported)
                        reported = pos
                if digest.hexdigest() != ref.sha1:
                    raise VerificationError(
                        f"sha1 {ref.sha1}: the bytes its root {ref.root} commits to have SHA-1 "
                        f"{digest.hexdigest()}; the pointer contradicts itself, nothing written")
        except KbfsError as exc:
            if exc.args and reads.cached_bytes(ref):
                exc.args = (f"{exc.args[0]} (the verified pieces so far stay in the cache: the "
                            "same download again resumes from them)", *exc.args[1:])
            raise
        finally:
            reads.close_file(ref)
            tally.fetched = reads.statistics().get("bytes_fetched", 0) - before
        return tally

    def _download_blocks(self, ref: FileRef, target: str, workers: int,
                         progress: Callable[[int], None] | None) -> _Tally:
        """Fill TARGET with REF's blocks (REF has a root), by way of `.NAME.kbfs-part`.

        Each block comes from the first place that has it: the part file a killed or failed
        run left (each of its blocks hashed against its leaf; a hole or a half-written block
        simply fails), the cache (copied, verified), else the network, in runs of
        DOWNLOAD_CHUNK_BLOCKS fetched by WORKERS threads into reused buffers (each block
        verified against its leaf by the fetcher) and written straight into the part file.
        Fetched blocks are NOT stored in the cache: that wrote every byte twice, and the
        copy into the page cache was most of a download's CPU (issue 5).
        """
        folder, name = os.path.split(target)
        part = os.path.join(folder, f".{name}.kbfs-part")
        fd = _open_part(part)
        tally = _Tally()
        ok = False
        left = True  # a part file of an earlier run is never removed, even when this run fails
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise KbfsError(f"{target}: another download to this file is under way "
                                f"(it holds {part})") from None
            left = os.fstat(fd).st_size > 0
            self.cache.open_file(ref)
            try:
                self._fill_part(ref, fd, workers, progress, tally)
            except KbfsError as exc:
                if (left or tally.fetched + tally.copied) and exc.args:
                    # The one line the user sees says where the work so far went.
                    exc.args = (f"{exc.args[0]} (the verified part is kept in {part}: "
                                f"the same download again resumes from it)", *exc.args[1:])
                raise
            except KeyboardInterrupt as exc:
                if left or tally.fetched + tally.copied:
                    # For the command line's one line: where the work so far is kept.
                    exc.kbfs_part = part  # type: ignore[attr-defined]
                raise
            finally:
                self.cache.close_file(ref)
            os.replace(part, target)
            ok = True
        finally:
            os.close(fd)
            if not ok and not left and tally.fetched + tally.copied == 0:
                # Nothing worth resuming from: leave no stray part file behind.
                _unlink_quiet(part)
            elif not ok:
                log.info("kept %s: the next download to %s resumes from it", part, target)
        return tally

    def _fill_part(self, ref: FileRef, fd: int, workers: int,
                   progress: Callable[[int], None] | None, tally: _Tally) -> None:
        """Make FD (the part file) hold exactly REF's verified bytes; see `_download_blocks`."""
        leaves = self.cache.leaves(ref)
        bs = ref.block_size
        n_blocks = ref.blocks
        old_size = os.fstat(fd).st_size
        todo = list(range(n_blocks))
        if old_size:
            todo = _check_part(fd, ref, leaves, _data_blocks(fd, old_size, bs, n_blocks))
            tally.resumed = ref.size - _bytes_of(todo, ref)
            if progress is not None and tally.resumed:
                progress(tally.resumed)
        if old_size != ref.size:
            os.ftruncate(fd, ref.size)
        # One writer of the file at a time: concurrent writers of one file spin on its inode
        # lock in the kernel (measured: twice the CPU of the whole download).
        out_lock = threading.Lock()
        cached = self.cache.cached_bytes(ref) if todo else 0
        if cached:
            if cached >= ref.size:
                # Every block is in the cache: this download is cp's work. See _preallocate.
                _preallocate(fd, ref.size)
            todo = self._copy_cached(ref, fd, todo, out_lock, progress, tally)
        if not todo:
            return
        fetcher = self._router  # the route resolve() made; says why when content is gone
        # Runs short enough that every worker gets two of a small download.
        run_blocks = max(1, min(DOWNLOAD_CHUNK_BLOCKS, -(-len(todo) // (2 * max(1, workers)))))
        runs = list(_block_runs(todo, run_blocks))
        n_workers = max(1, min(workers, len(runs)))
        # Workers stream runs into buffers from FREE and hand them to one writer thread, so a
        # worker goes on receiving while its last run is written (an O_DIRECT write waits
        # for the disk). Memory: (workers + 1) runs.
        free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for _ in range(n_workers + 1):
            free.put(anonymous_memory(min(run_blocks * bs, ref.size)))
        writes: queue.SimpleQueue[tuple[mmap.mmap, int, int] | None] = queue.SimpleQueue()
        results: queue.SimpleQueue[tuple[int, BaseException | None]] = queue.SimpleQueue()
        stop = threading.Event()
        next_run = iter(runs)
        take = threading.Lock()
        writer = _PartWriter(fd, out_lock, bs)

        def get_buffer() -> mmap.mmap | None:
            while not stop.is_set():
                try:
                    return free.get(timeout=0.2)
                except queue.Empty:
                    continue
            return None

        def fetch_worker() -> None:
            try:
                while not stop.is_set():
                    with take:
                        job = next(next_run, None)
                    if job is None:
                        return
                    first, count = job
                    lo, hi = first * bs, min((first + count) * bs, ref.size)
                    buf = get_buffer()
                    if buf is None:
                        return
                    view = memoryview(buf)
                    try:
                        fetcher.fetch_blocks_into(ref.sha1, ref.size, first, count, leaves,
                                                  view[:hi - lo], bs)
                    finally:
                        view.release()
                    writes.put((buf, lo, hi - lo))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                results.put((0, exc))

        def write_worker() -> None:
            try:
                while (item := writes.get()) is not None:
                    buf, lo, n = item
                    view = memoryview(buf)
                    try:
                        writer.write(view[:n], lo)
                    finally:
                        view.release()
                    free.put(buf)
                    results.put((n, None))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                stop.set()
                results.put((0, exc))

        threads = [threading.Thread(target=fetch_worker, name=f"kbfs-dl-{k}", daemon=True)
                   for k in range(n_workers)]
        write_thread = threading.Thread(target=write_worker, name="kbfs-dl-write", daemon=True)
        write_thread.start()
        for t in threads:
            t.start()
        try:
            for _ in runs:  # one result per run written (an empty file too: one leaf check)
                n, exc = results.get()
                if exc is not None:
                    raise exc
                tally.fetched += n
                if progress is not None and n:
                    progress(n)
        finally:
            stop.set()
            writes.put(None)
            for t in threads:
                t.join(timeout=0.5)  # one still in a request ends by itself (its deadline)
            # The writer ends after the runs queued before None (at most workers + 1): it
            # must be gone before FD is closed, or it could write into a reused descriptor.
            write_thread.join()
            writer.close()

    def _copy_cached(self, ref: FileRef, fd: int, todo: list[int], lock: threading.Lock,
                     progress: Callable[[int], None] | None, tally: _Tally) -> list[int]:
        """Copy the blocks of TODO present in the piece cache into FD; return those still
        missing, in order. One thread: writers of one file serialize on its inode lock."""
        missing: list[int] = []
        step = DOWNLOAD_CHUNK_BLOCKS
        for k in range(0, len(todo), step):
            span = todo[k:k + step]
            left = cachefiles.copy_present(self.cache, ref, fd, span, lock)
            missing.extend(left)
            n = _bytes_of(span, ref) - _bytes_of(left, ref)
            tally.copied += n
            if progress is not None and n:
                progress(n)
        return missing

    def cat(self, source: str | os.PathLike[str] | Resolved, offset: int = 0,
            length: int | None = None, *, local: bool = True,
            chunk: int = 8 << 20) -> Iterator[bytes]:
        """Verified bytes [offset, offset+length) of SOURCE, in pieces of at most CHUNK."""
        r = source if isinstance(source, Resolved) else self.resolve(source)
        if offset < 0 or (length is not None and length < 0):
            raise BadRequest("offset and length must be non-negative")
        if offset > r.ref.size:
            raise BadRequest(f"offset {offset} is past the end of {r.name} ({r.ref.size} bytes)")
        end = r.ref.size if length is None else min(r.ref.size, offset + length)
        with self.open(r, local=local) as f:
            f.seek(offset)
            pos = offset
            while pos < end:
                data = f.read(min(chunk, end - pos))
                if not data:
                    raise VerificationError(f"{r.name}: ended early at {pos} of {r.ref.size} bytes")
                pos += len(data)
                yield data


def _list_share(fetcher: Any, relay: str, share: str, path: str) -> dict[str, Any]:
    """The listing of folder PATH of SHARE at RELAY, checked by protocol.parse_listing."""
    listing = fetcher.list_share(relay, share, path)
    try:
        return protocol.parse_listing(listing)
    except BadRequest as exc:
        raise SourceError(f"{relay}: listing of {path or '/'} in share {share}: {exc}") from None


def _listing_entry(listing: dict[str, Any], name: str) -> dict[str, Any] | None:
    for entry in listing.get("files") or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    return None


def _target_path(out: str | None, name: str) -> str:
    safe = posixpath.basename(name.replace("\\", "/")) or "download"
    if safe in (".", ".."):
        safe = "download"
    if out is None:
        return os.path.abspath(safe)
    if os.path.isdir(out):
        return os.path.join(os.path.abspath(out), safe)
    target = os.path.abspath(out)
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        # Said here, before any work: else the error names a temporary file in it.
        raise KbfsError(f"{folder}: no such folder to download into")
    return target


def _open_part(part: str) -> int:
    """Open (or create) the part file PART of a download, refusing anything but a
    regular file of ours: a symlink or a file planted by another user in a shared folder
    must not make the download write through it (O_NOFOLLOW; fstat after the open)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(part, flags, 0o644)  # the mode the download ends with (umask applies)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KbfsError(f"{part}: is a symbolic link; not writing through it "
                            "(remove it to download here)") from None
        raise KbfsError(f"{part}: cannot open the part file: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise KbfsError(f"{part}: not a regular file with one name; not resuming from it "
                            "(remove it to download here)")
        if st.st_uid != os.geteuid():
            raise KbfsError(f"{part}: belongs to another user (uid {st.st_uid}); not resuming "
                            "from it (remove it to download here)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def _atomic_output(target: str) -> Iterator[int]:
    """Yield a descriptor on TARGET.part-XXXX; rename it to TARGET only if the body succeeds.

    On any failure (including KeyboardInterrupt) the partial file is removed, so TARGET
    never holds anything but a complete, verified copy.
    """
    part = f"{target}.part-{os.urandom(4).hex()}"
    # O_EXCL already refuses a planted name; O_NOFOLLOW says so for symlinks too. The
    # mode is narrowed by the umask as for any new file (0644 by default).
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    ok = False
    try:
        yield fd
        ok = True
    finally:
        os.close(fd)
        if ok:
            os.replace(part, target)
        else:
            try:
                os.unlink(part)
            except OSError:
                pass


class _PartWriter:
    """Writes verified runs of blocks into a download's part file, past the page cache
    (O_DIRECT) where the file system allows.

    Why: a buffered write of 1 GiB cost this kind of machine (a VM) 0.2 to 1.9 CPU-seconds
    in the kernel, copying into fresh page-cache pages, and varied with the load of other
    processes; an O_DIRECT write of the same costs ~0.02 s of CPU and runs at the disk's
    speed (1.6 GB/s here, faster than any relay). Only the aligned part of a run goes
    direct (buffers are mmap memory, offsets whole blocks); the short tail of the file
    and every write after an EINVAL (tmpfs, some FUSE file systems) go through FD.
    Writes are serialized by LOCK (see `_fill_part`).
    """

    def __init__(self, fd: int, lock: threading.Lock, block_size: int) -> None:
        self.fd = fd
        self.lock = lock
        self.dfd = -1
        if block_size % DIRECT_ALIGN == 0:
            self.dfd = osio.reopen_direct(fd)  # -1: not Linux, KBFS_PORTABLE=1 or refused

    def write(self, view: memoryview, offset: int) -> None:
        with self.lock:
            n = len(view) - len(view) % DIRECT_ALIGN if offset % DIRECT_ALIGN == 0 else 0
            if self.dfd >= 0 and n:
                try:
                    _pwrite_all(self.dfd, view[:n], offset)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    log.debug("O_DIRECT write refused (%s): buffered from now on", exc)
                    os.close(self.dfd)
                    self.dfd = -1
                    n = 0
            else:
                n = 0
            if n < len(view):
                _pwrite_all(self.fd, view[n:], offset + n)

    def close(self) -> None:
        with self.lock:
            if self.dfd >= 0:
                os.close(self.dfd)
                self.dfd = -1


def _drop_part(target: str) -> None:
    """Remove TARGET's `.NAME.kbfs-part` (never followed: a symlink there is removed, not its target)."""
    folder, name = os.path.split(target)
    part = os.path.join(folder, f".{name}.kbfs-part")
    if os.path.lexists(part):
        _unlink_quiet(part)
        log.info("removed %s: %s is complete", part, target)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _bytes_of(indices: Sequence[int], ref: FileRef) -> int:
    """Total length of blocks INDICES of REF."""
    total = 0
    for i in indices:
        start, end = tree.block_span(i, ref.size, ref.block_size)
        total += end - start
    return total


def _block_runs(indices: Sequence[int], limit: int) -> Iterator[tuple[int, int]]:
    """(first, count) of runs of consecutive INDICES (sorted), each at most LIMIT long."""
    first = -1
    count = 0
    for i in indices:
        if count and i == first + count and count < limit:
            count += 1
            continue
        if count:
            yield first, count
        first, count = i, 1
    if count:
        yield first, count


def _data_blocks(fd: int, size: int, block_size: int, n_blocks: int) -> list[int]:
    """Blocks of the first SIZE bytes of FD that hold some data (holes skipped when the
    file system tells them apart, SEEK_DATA; otherwise every block)."""
    last = min(n_blocks, -(-size // block_size))
    blocks: set[int] = set()
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole from POS to the end
                    break
                raise
            end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
            blocks.update(range(start // block_size, min(last, -(-end // block_size))))
            pos = end
    except (OSError, AttributeError):
        return list(range(last))
    return sorted(blocks)


def _check_part(fd: int, ref: FileRef, leaves: Sequence[bytes], candidates: list[int]) -> list[int]:
    """Blocks of REF that the part file FD does not hold verified: every block but the
    CANDIDATES that hash to their leaf (a hole or a half-written block fails)."""
    good: set[int] = set()
    buf = bytearray(min(ref.block_size, ref.size) or 1)
    for i in candidates:
        start, end = tree.block_span(i, ref.size, ref.block_size)
        view = memoryview(buf)[:end - start]
        if osio.readinto(fd, view, start) == end - start and tree.block_matches(view, leaves[i]):
            good.add(i)
    return [i for i in range(ref.blocks) if i not in good]


def _preallocate(fd: int, size: int) -> bool:
    """Give FD's first SIZE bytes their disk blocks now (fallocate(2), mode 0: what the
    file holds is unchanged, holes read as zeros, the size grows to at least SIZE); False
    when the platform or the file system cannot (nothing is changed then).

    For a download of content that is all in the cache, whose copy is the kernel's
    (`cp`'s) work: ext4 then writes into blocks already allocated instead of reserving
    each page as it is written (delayed allocation), measured at ~15 ms less kernel time
    per GiB out of ~270 and steadier runs (bench/bench_download.py, content cached). Called
    through ctypes, not os.posix_fallocate: where the file system has no fallocate (NFS,
    most FUSE file systems) glibc's posix_fallocate writes a byte into every 4 KiB of the
    range instead, which would cost more than the whole copy.
    """
    return osio.allocate(fd, size)


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _copy_range(src: int, dst: int, offset: int, length: int,
                progress: Callable[[int], None] | None) -> None:
    """Copy LENGTH bytes at OFFSET from SRC to DST in the kernel (copy_file_range) when possible."""
    end = offset + length
    pos = offset
    step = 64 << 20
    while pos < end:
        n = min(step, end - pos)
        done = osio.copy_range(src, dst, pos, n)  # copy_file_range, or through a buffer
        if done <= 0:
            raise VerificationError(f"local copy ended at {pos}, expected {end} bytes")
        pos += done
        if progress is not None:
            progress(done)


# ---------------------------------------------------------------- module-level API


def mirror_route(mirrors: Sequence[str], relays: Sequence[str],
                 pointer: prv.Pointer | None) -> list[str]:
    """RELAYS with the configured MIRRORS first and the pointer's mirror hints last, each
    `mirrorurl.mark`ed (the Fetcher splits them out; no token is ever given to one)."""
    from kbfs.mirrorurl import mark

    hinted = pointer.mirror_hints() if pointer is not None else []
    return [*map(mark, mirrors), *relays, *map(mark, hinted)]


def get_client(
    relays: Sequence[str] | None = None,
    cache_dir: str | None = None,
    cache_size: str | int | None = None,
    search_dirs: Sequence[str] | None = None,
    tokens: Sequence[str] | str | None = None,
    mirrors: Sequence[str] | None = None,
) -> Client:
    """The shared Client for these settings (command line > environment > config file).

    TOKENS: bearer tokens of private shares (`kbfs share token`), added to those of
    KBFS_TOKEN and the config file; see `kbfs.config` for where each may be sent."""
    if isinstance(tokens, str):
        tokens = [tokens]
    s = load_settings(list(relays) if relays else None, cache_dir, cache_size,
                      list(search_dirs) if search_dirs is not None else None,
                      tokens=list(tokens) if tokens else None,
                      mirrors=list(mirrors) if mirrors else None)
    key = (tuple(s.relays), s.cache_dir, s.cache_size, tuple(s.search_dirs), s.direct,
           tuple(s.tokens), tuple((r, tuple(t)) for r, t in sorted(s.relay_tokens.items())),
           tuple(s.mirrors))
    with _shared_lock:
        c = _clients.get(key)
    if c is None:
        c = Client(s)
        with _shared_lock:
            c = _clients.setdefault(key, c)
    return c


def resolve(source: str | os.PathLike[str], **settings: Any) -> Resolved:
    """What SOURCE names (see the module docstring for the forms)."""
    return get_client(**settings).resolve(source)


def open(source: str | os.PathLike[str], *, local: bool = True,  # noqa: A001 - kbfs.open mirrors open
         buffer_size: int | None = None, **settings: Any) -> BinaryIO:
    """Open SOURCE as a read-only, seekable binary file of verified bytes.

    SETTINGS: relays, cache_dir, cache_size, search_dirs, tokens (as for `get_client`).
    LOCAL=False skips local copies and reads through the cache.
    """
    return get_client(**settings).open(source, local=local, buffer_size=buffer_size)


def realize(source: str | os.PathLike[str], *, local: bool = True, **settings: Any) -> str:
    """Local path of a complete, verified copy of SOURCE (fetching what is missing)."""
    return get_client(**settings).realize(source, local=local)


def locate(source: str | os.PathLike[str], **settings: Any) -> Location:
    """Where SOURCE's content can be had: verified local copies, the cache, URLs."""
    return get_client(**settings).locate(source)


def download(source: str | os.PathLike[str], out: str | None = None, *, local: bool = True,
             workers: int = DOWNLOAD_WORKERS, progress: Callable[[int], None] | None = None,
             **settings: Any) -> DownloadResult:
    """Download SOURCE to OUT, verified; see `Client.download`."""
    return get_client(**settings).download(source, out, local=local, workers=workers,
                                           progress=progress)


# ---------------------------------------------------------------- fsspec


@contextmanager
def _fs_errors(path: str) -> Iterator[None]:
    """kbfs errors as the OSErrors Python file-system code expects (see _KbfsFSBase)."""
    from kbfs.errors import AccessDenied

    try:
        yield
    except NotFound as exc:
        raise FileNotFoundError(errno.ENOENT, str(exc), path) from None
    except BadRequest as exc:
        if "is a folder" in str(exc) or "top folder" in str(exc):
            raise IsADirectoryError(errno.EISDIR, str(exc), path) from None
        # A malformed sha1 or a path part no share can hold: it is not there.
        raise FileNotFoundError(errno.ENOENT, str(exc), path) from None
    except AccessDenied as exc:
        raise PermissionError(errno.EACCES, str(exc), path) from None


def _define_fsspec() -> dict[str, Any]:
    """Define and register the fsspec classes; called on first use of their names.

    fsspec costs a twentieth of a second to import, which `kbfs download` and `kbfs cat`
    never need: the classes are made when `Sha1FileSystem` / `KbfsFileSystem` is first
    looked up on this module (fsspec's entry points do that), or at import when fsspec is
    already loaded.
    """
    import fsspec
    from fsspec.spec import AbstractFileSystem

    class _KbfsFSBase(AbstractFileSystem):
        """Read-only fsspec file system over `Client`; subclasses name their protocol.

        Libraries probe for files that may not exist (zarr asks for `.zarray`,
        `zarr.json`, `.zmetadata`...), so every method says "not there" the way Python
        file systems do: FileNotFoundError, whether the relay said so (NotFound) or the
        path is one no share can hold (BadRequest: a malformed sha1 or path part);
        IsADirectoryError for opening a folder; PermissionError for a private share
        that wants a token (AccessDenied) and for writing. See `_fs_errors`.
        """

        protocol: str  # type: ignore[assignment]

        @classmethod
        def _strip_protocol(cls, path: Any) -> Any:
            if isinstance(path, list):
                return [cls._strip_protocol(p) for p in path]
            text, prefix = str(path), f"{cls.protocol}://"
            text = text[len(prefix):] if text.startswith(prefix) else text
            return text.strip("/")

        def _source(self, path: str) -> str:
            return f"{self.protocol}://{path}"

        def __init__(self, relays: Sequence[str] | str | None = None, cache_dir: str | None = None,
                     cache_size: str | int | None = None, search_dirs: Sequence[str] | None = None,
                     local: bool = True, tokens: Sequence[str] | str | None = None,
                     token: str | None = None, **storage_options: Any) -> None:
            super().__init__(**storage_options)
            if isinstance(relays, str):
                relays = [relays]
            if isinstance(tokens, str):
                tokens = [tokens]
            given = [*(tokens or ()), *([token] if token else [])]
            self.client = get_client(relays, cache_dir, cache_size, search_dirs, given or None)
            self.local = local

        def _resolved(self, path: str) -> Resolved:
            path = self._strip_protocol(path)
            with _fs_errors(path):
                return self.client.resolve(self._source(path))

        def _file_info(self, path: str, r: Resolved) -> dict[str, Any]:
            return {"name": path, "size": r.ref.size, "type": "file", "sha1": r.ref.sha1}

        def _open(self, path: str, mode: str = "rb", block_size: int | None = None,
                  autocommit: bool = True, cache_options: dict[str, Any] | None = None,
                  **kwargs: Any) -> Any:
            if mode != "rb":
                raise PermissionError(f"{self.protocol}:// is read-only (mode {mode!r})")
            r = self._resolved(path)
            with _fs_errors(path):
                return self.client.open(r, local=self.local, buffer_size=block_size or None)

        def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
            path = self._strip_protocol(path)
            return self._file_info(path, self._resolved(path))

        def size(self, path: str) -> int:
            return int(self.info(path)["size"])

        def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                     **kwargs: Any) -> bytes:
            r = self._resolved(path)
            size = r.ref.size
            a = 0 if start is None else (start if start >= 0 else max(0, size + start))
            b = size if end is None else (end if end >= 0 else max(0, size + end))
            if b <= a:
                return b""
            with _fs_errors(path):
                return b"".join(self.client.cat(r, a, b - a, local=self.local))

        def ukey(self, path: str) -> str:
            return self._resolved(path).ref.sha1


    class Sha1FileSystem(_KbfsFSBase):
        """fsspec "sha1": `sha1://SHA1[/NAME]`, content found through the relays or the cache."""

        protocol = "sha1"

        def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
            info = self.info(path)
            return [info] if detail else [info["name"]]


    class KbfsFileSystem(_KbfsFSBase):
        """fsspec "kbfs": `kbfs://HOST:PORT/SHARE_ID/path`, listed and read through that relay
        (with the user's token for that share, when it is private)."""

        protocol = "kbfs"

        def _listing(self, path: str) -> dict[str, Any]:
            with _fs_errors(path):
                relay, share, relpath = parse_kbfs_uri(self._source(path))
                return _list_share(self.client._fetcher_for([relay], [relay]), relay, share,
                                   relpath)

        def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
            path = self._strip_protocol(path)
            try:
                listing = self._listing(path)
            except FileNotFoundError:
                info = self.info(path)  # a file lists as itself, as on other file systems
                return [info] if detail else [info["name"]]
            out: list[dict[str, Any]] = [
                {"name": f"{path}/{d}", "size": 0, "type": "directory"}
                for d in listing.get("dirs") or []
            ]
            for entry in listing.get("files") or []:
                out.append({"name": f"{path}/{entry['name']}", "size": int(entry["size"]),
                            "type": "file", "sha1": (entry.get("prv") or {}).get("original_checksum")})
            return out if detail else [e["name"] for e in out]

        def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
            path = self._strip_protocol(path)
            with _fs_errors(path):
                relay, share, relpath = parse_kbfs_uri(self._source(path))
            if not relpath:
                return {"name": path, "size": 0, "type": "directory"}
            parent, _, name = relpath.rpartition("/")
            with _fs_errors(path):
                listing = _list_share(self.client._fetcher_for([relay], [relay]), relay, share,
                                      parent)
            if name in (listing.get("dirs") or []):
                return {"name": path, "size": 0, "type": "directory"}
            entry = _listing_entry(listing, name)
            if entry is None:
                raise FileNotFoundError(errno.ENOENT, f"no such file in share {share}", path)
            return {"name": path, "size": int(entry["size"]), "type": "file",
                    "sha1": (entry.get("prv") or {}).get("original_checksum")}

    class KbfsHttpsFileSystem(KbfsFileSystem):
        """fsspec "kbfs+https": `kbfs+https://HOST[:PORT]/SHARE_ID/path`, a share on an
        https relay (port 443 unless written); otherwise as "kbfs"."""

        protocol = "kbfs+https"

    classes: dict[str, Any] = {"Sha1FileSystem": Sha1FileSystem, "KbfsFileSystem": KbfsFileSystem,
                               "KbfsHttpsFileSystem": KbfsHttpsFileSystem}
    for cls_name, cls in classes.items():
        cls.__qualname__ = cls_name  # pickled by name, as a module-level class would be
    # Entry points in setup.cfg register these when kbfs is installed; registering here too
    # keeps `fsspec.open("sha1://...")` working from a source checkout once the classes exist.
    fsspec.register_implementation("sha1", Sha1FileSystem, clobber=True)
    fsspec.register_implementation("kbfs", KbfsFileSystem, clobber=True)
    fsspec.register_implementation("kbfs+https", KbfsHttpsFileSystem, clobber=True)
    return classes


_FSSPEC_NAMES = ("Sha1FileSystem", "KbfsFileSystem", "KbfsHttpsFileSystem")
_fsspec_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    if name in _FSSPEC_NAMES:
        with _fsspec_lock:
            if name not in globals():
                globals().update(_define_fsspec())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "fsspec" in sys.modules:  # already paid for: define and register at once
    __getattr__("Sha1FileSystem")
