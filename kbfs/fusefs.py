"""The kbfs FUSE file system: a read-only view where every pointer is its full-size original.

`KbfsOperations` is a `pyfuse3.Operations` subclass over an inode table built from SOURCE:

- a local folder: `NAME.prv` shows as `NAME` (the pointer's size, the .prv file's mtime),
  `NAME.prvdir` as a folder tree, everything else passes through read-only. A real `NAME`
  wins over `NAME.prv`; a malformed pointer shows as the plain `.prv` file and is logged
  once. Folders are scanned lazily and rescanned when their mtime changes; listing and
  stat never touch the network.
- a remote share: the tree comes from an injected `list_dir(path) -> dict` callable (the
  relay's listing JSON, see docs/internals.md), run in a worker thread and kept for a while
  so that a relay outage does not empty the view.

Reads of pointer files (every kind: v2, v1, root-less) go through the injected cache
(`kbfs.piececache.PieceCache`, which has its own single flight and read-ahead): open holds
the content against eviction, each read is one `cache.read` in a worker thread (a
`trio.CapacityLimiter` bounds them) so one slow fetch never blocks the trio loop. Only what
cannot block is answered inline on the trio thread: `cache.read_cached`, a content with every
piece present whose bytes are all in the page cache (preadv2 RWF_NOWAIT); KBFS_INLINE_READS=0
turns that off (measured: docs/internals.md, inline reads).
Every kbfs error becomes EIO with one log line naming the file
and the source; every handler is guarded (`_guard_handlers`): no exception escapes one, so
the mount never crashes, and every value packed into a kernel structure is clamped to its
field's range (a hostile .prvdir may sum to more than 2^64 bytes).

Modes never widen access: a file shown for a pointer gets the pointer file's read bits and
owner (a 0600 pointer shows as 0400), a .prvdir's folders get its read bits plus the
matching search bits, a pass-through file or folder keeps its own r and x bits. Nothing is
writable. Other users reach the mount at all only with `allow_other`, which `kbfs mount
--allow-other` asks for explicitly (with `default_permissions`, always on, the kernel
checks these modes).

This module must not import `requests` or `kbfs.fetch` (layer L3: stdlib, pyfuse3, trio, L0
modules only; the cache is injected). What it needs of the fetcher (the last source used, local
candidates) is injected as callables by `kbfs.mount`.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3
import trio

from kbfs import osio, prv
from kbfs.errors import KbfsError
from kbfs.fileref import Buffer, FileRef

log = logging.getLogger(__name__)

# Pointer content is immutable, so the kernel may keep names and attributes for long.
ENTRY_TIMEOUT = 300.0
ATTR_TIMEOUT = 3600.0
# Pass-through files and folders of a local SOURCE can change under us.
LIVE_TIMEOUT = 1.0
# How often a local folder's mtime is re-checked, and how long a remote listing is kept.
RESCAN_INTERVAL = 1.0
REMOTE_LISTING_TTL = 60.0
MAX_PROBLEMS = 100  # pointers with a problem kept for `kbfs status`
MAX_LAST_ERRORS = 8  # failed reads kept for `kbfs status`
READ_THREADS = 32
READ_AHEAD_KB = 4096

ROOT_INODE = pyfuse3.ROOT_INODE

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT

XATTR_SHA1 = b"user.kbfs.sha1"
XATTR_SIZE = b"user.kbfs.size"
XATTR_CACHED = b"user.kbfs.cached"
XATTR_VERIFIED = b"user.kbfs.verified"
XATTR_SOURCE = b"user.kbfs.source"
XATTR_POINTER = b"user.kbfs.pointer"
POINTER_XATTRS = [XATTR_SHA1, XATTR_SIZE, XATTR_CACHED, XATTR_VERIFIED, XATTR_SOURCE, XATTR_POINTER]

# Node kinds.
LOCAL_DIR = "local-dir"  # a real folder of a local SOURCE
PRVDIR_DIR = "prvdir-dir"  # a folder inside a .prvdir
REMOTE_DIR = "remote-dir"  # a folder of a remote share
POINTER = "pointer"  # a file served through the block cache
PLAIN = "plain"  # a real file of a local SOURCE, read with pread

_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])

# Ranges of the C fields values are packed into (pyfuse3 raises OverflowError beyond them).
_I64_MAX = (1 << 63) - 1
_U64_MAX = (1 << 64) - 1
_ID_MAX = (1 << 32) - 2  # uid_t/gid_t; (uid_t)-1 means "no change" to the kernel


def _clamp(value: int, low: int, high: int) -> int:
    return low if value < low else high if value > high else value


def _read_bits(mode: int) -> int:
    """The read bits of MODE: what a file shown for a pointer file may grant."""
    return mode & 0o444


def _folder_bits(mode: int) -> int:
    """The read bits of MODE and the search bit beside each: a folder for a .prvdir file."""
    r = mode & 0o444
    return r | (r >> 2)


@dataclass
class Node:
    """One inode. Folders keep `children` (name -> inode), None until first listed."""

    inode: int
    kind: str
    parent: int
    name: bytes
    path: str = ""  # local: the real folder/file, or the .prv/.prvdir file behind it
    rel: str = ""  # remote: share-relative path; prvdir: path inside the .prvdir
    pointer: prv.Pointer | None = None
    prvdir: prv.PrvDir | None = None
    ref: FileRef | None = None
    size: int = 0
    mode: int = stat.S_IFDIR | 0o555
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    children: dict[bytes, int] | None = None
    scanned_mtime_ns: int = -1
    checked_at: float = 0.0
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def is_dir(self) -> bool:
        return self.kind in (LOCAL_DIR, PRVDIR_DIR, REMOTE_DIR)

    def display(self) -> str:
        """A name for log lines: the pointer or real file behind this node."""
        if self.kind == REMOTE_DIR or (self.kind == POINTER and not self.path):
            return "/" + self.rel
        if self.kind == PRVDIR_DIR or (self.kind == POINTER and self.rel):
            return f"{self.path}:{self.rel}"
        return self.path


@dataclass
class _Spec:
    """A directory entry found by a scan, before it has an inode (built in a worker thread)."""

    key: tuple[str, ...]
    name: bytes
    kind: str
    path: str = ""
    rel: str = ""
    pointer: prv.Pointer | None = None
    prvdir: prv.PrvDir | None = None
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0

    @classmethod
    def pointer_file(cls, key: tuple[str, ...], name: str, pointer: prv.Pointer,
                     stamp: tuple[int, int, int, int], perm: int, path: str = "",
                     rel: str = "") -> _Spec:
        """A pointer shown as its original: a read-only file of the original's size.
        STAMP: the (uid, gid, mtime_ns, ctime_ns) it shows; PERM: its permission bits (the
        pointer file's read bits: never more than the pointer file grants)."""
        uid, gid, mtime_ns, ctime_ns = stamp
        return cls(key, os.fsencode(name), POINTER, path=path, rel=rel, pointer=pointer,
                   size=pointer.size, mode=stat.S_IFREG | _read_bits(perm), uid=uid, gid=gid,
                   mtime_ns=mtime_ns, ctime_ns=ctime_ns)

    @classmethod
    def folder(cls, key: tuple[str, ...], name: str, kind: str, stamp: tuple[int, int, int, int],
               perm: int, path: str = "", rel: str = "",
               prvdir: prv.PrvDir | None = None) -> _Spec:
        """A read-only folder of pointers (a .prvdir's, or a remote share's); STAMP as above,
        PERM its permission bits (r and x only)."""
        uid, gid, mtime_ns, ctime_ns = stamp
        return cls(key, os.fsencode(name), kind, path=path, rel=rel, prvdir=prvdir,
                   mode=stat.S_IFDIR | (perm & 0o555), uid=uid, gid=gid, mtime_ns=mtime_ns,
                   ctime_ns=ctime_ns)


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns


@dataclass
class _OpenFile:
    node: Node
    fd: int = -1


# Handlers whose failure the kernel is never told of: pyfuse3 ends its main loop when one
# raises anything, FUSEError included, so their guard swallows every exception.
_NO_REPLY = frozenset({"forget"})


def _guard(fn: _F) -> _F:
    """Turn every failure of a handler into a FUSEError (EIO for anything unexpected): an
    exception that escapes a handler ends pyfuse3's main loop, and with it the mount. An
    unexpected exception is logged with its traceback once per handler and type, then only
    counted (`errors`), so a program that retries does not flood the log."""
    if getattr(fn, "_kbfs_guarded", False):
        return fn
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: KbfsOperations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            if name in _NO_REPLY:
                return None
            raise
        except KbfsError as exc:
            self._count("errors")
            log.error("%s: %s", name, exc)
            failure = errno.EIO
        except OSError as exc:
            failure = exc.errno or errno.EIO
        except Exception as exc:
            self._count("errors")
            key = (name, type(exc).__name__)
            if key not in self._internal_errors:
                self._internal_errors.add(key)
                log.exception("internal error in %s%r (answered EIO; logged once)",
                              name, args[:2])
            failure = errno.EIO
        if name in _NO_REPLY:
            return None
        raise pyfuse3.FUSEError(failure)

    wrapper._kbfs_guarded = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def _guard_handlers(cls: type[pyfuse3.Operations]) -> type[pyfuse3.Operations]:
    """Guard every request handler of CLS, the ones it defines and the ones it inherits,
    so that a handler added later without `@_guard` cannot take the mount down."""
    import inspect

    for name in dir(pyfuse3.Operations):
        if name.startswith("_"):
            continue
        method = getattr(cls, name)
        if inspect.iscoroutinefunction(method):
            setattr(cls, name, _guard(method))
    return cls


def file_ref(pointer: prv.Pointer) -> FileRef:
    """The cache key of a pointer's content."""
    if pointer.tree is None:
        return FileRef(pointer.sha1, pointer.size, None)
    return FileRef(pointer.sha1, pointer.size, pointer.tree.root, pointer.tree.block_size)


@_guard_handlers
class KbfsOperations(pyfuse3.Operations):
    """Read-only pyfuse3 operations over a local folder of pointers or a remote share.

    Exactly one of SOURCE_DIR (a local folder) or LIST_DIR (a remote share's listing
    callable, `list_dir("sub/dir") -> {"dirs": [...], "files": [...]}`) is given.
    SOURCE_OF(sha1) names the last source that served the content (for the xattr);
    ON_POINTER(pointer, uid, gid) is told of every pointer met and the owner of the file it
    came from (the pointer's author), e.g. to register its original path as a local
    candidate when that owner may read it.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        cache: Any,
        *,
        source_dir: str | None = None,
        list_dir: Callable[[str], dict[str, Any]] | None = None,
        source_of: Callable[[str], str | None] | None = None,
        on_pointer: Callable[[prv.Pointer, int, int], None] | None = None,
        read_threads: int = READ_THREADS,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        super().__init__()
        if (source_dir is None) == (list_dir is None):
            raise ValueError("give exactly one of source_dir and list_dir")
        self.cache = cache   # kbfs.piececache.PieceCache: every pointer's reads
        self.pieces = cache  # the same (older callers named it so)
        self.source_dir = os.path.abspath(source_dir) if source_dir is not None else None
        self.list_dir = list_dir
        self.source_of = source_of or (lambda sha1: None)
        self.on_pointer = on_pointer
        self.read_threads = read_threads
        # KBFS_INLINE_READS=0 turns the inline path off (the A/B in bench/bench_mount.py).
        inline = os.environ.get("KBFS_INLINE_READS", "1") != "0"
        self._read_cached: Callable[[Any, int, int], Any] | None = (
            getattr(cache, "read_cached", None) if inline else None)
        self._limiter: trio.CapacityLimiter | None = None
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.nodes: dict[int, Node] = {}
        self._by_key: dict[tuple[str, ...], int] = {}
        self._next_inode = ROOT_INODE + 1
        self._open: dict[int, _OpenFile] = {}
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}
        self._next_fh = 1
        self._logged: set[tuple[str, int]] = set()
        self._internal_errors: set[tuple[str, str]] = set()
        self._last_error_log: dict[int, float] = {}
        # For `kbfs status`: pointers that could not be read (path -> why), and the last
        # read failures; both bounded, both under _stats_lock (read by the status thread).
        self._problems: dict[str, str] = {}
        self._last_errors: dict[str, dict[str, Any]] = {}
        self._stats_lock = threading.Lock()
        self._stats: dict[str, int] = {
            "reads": 0,
            "bytes_served": 0,
            "errors": 0,
            "opens": 0,
            "open_files": 0,
        }
        now = time.time_ns()
        if self.source_dir is not None:
            st = os.stat(self.source_dir)
            root = Node(
                ROOT_INODE,
                LOCAL_DIR,
                ROOT_INODE,
                b"",
                path=self.source_dir,
                mode=stat.S_IFDIR | (st.st_mode & 0o555),
                uid=st.st_uid,
                gid=st.st_gid,
                mtime_ns=st.st_mtime_ns,
                ctime_ns=st.st_ctime_ns,
            )
            self._by_key[("l", self.source_dir)] = ROOT_INODE
        else:
            root = Node(
                ROOT_INODE,
                REMOTE_DIR,
                ROOT_INODE,
                b"",
                rel="",
                uid=self.uid,
                gid=self.gid,
                mtime_ns=now,
                ctime_ns=now,
            )
            self._by_key[("r", "")] = ROOT_INODE
        self.nodes[ROOT_INODE] = root

    # ------------------------------------------------------------ bookkeeping

    @property
    def limiter(self) -> trio.CapacityLimiter:
        # Created lazily: a CapacityLimiter must be made inside the running trio loop.
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self.read_threads)
        return self._limiter

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] = self._stats.get(key, 0) + n

    def statistics(self) -> dict[str, int]:
        """Counters of the file system side: reads, bytes served, errors, open files, inodes."""
        with self._stats_lock:
            out = dict(self._stats)
        out["inodes"] = len(self.nodes)
        return out

    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _adopt(self, parent: Node, spec: _Spec) -> int:
        """Give SPEC an inode, reusing the one its key had so inodes stay stable across scans."""
        inode = self._by_key.get(spec.key)
        node = self.nodes.get(inode) if inode is not None else None
        if node is None or node.kind != spec.kind:
            inode = self._next_inode
            self._next_inode += 1
            node = Node(inode, spec.kind, parent.inode, spec.name)
            self.nodes[inode] = node
            self._by_key[spec.key] = inode
        node.parent, node.name = parent.inode, spec.name
        node.path, node.rel = spec.path, spec.rel
        node.size, node.mode, node.uid, node.gid = spec.size, spec.mode, spec.uid, spec.gid
        node.mtime_ns, node.ctime_ns = spec.mtime_ns, spec.ctime_ns
        if spec.kind == POINTER and spec.pointer is not None:
            if node.pointer != spec.pointer:
                node.pointer = spec.pointer
                node.ref = file_ref(spec.pointer)
                if self.on_pointer is not None:
                    try:
                        self.on_pointer(spec.pointer, spec.uid, spec.gid)
                    except Exception:  # a hook's failure must not hide the file
                        log.exception("on_pointer hook failed for %s", spec.path or spec.rel)
        if spec.kind == PRVDIR_DIR and node.prvdir is not spec.prvdir:
            node.prvdir = spec.prvdir
            node.children = None  # the .prvdir changed: rebuild its folder
        return node.inode

    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        """The kernel's view of NODE."""
        # Every value is clamped to its C field: sizes and times come from pointers and
        # listings, and one out of range would make pyfuse3 raise instead of answering.
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = _clamp(node.inode, 1, _U64_MAX)
        attr.generation = 0
        live = node.kind in (PLAIN, LOCAL_DIR)
        attr.entry_timeout = LIVE_TIMEOUT if live else ENTRY_TIMEOUT
        attr.attr_timeout = LIVE_TIMEOUT if live else ATTR_TIMEOUT
        attr.st_mode = node.mode & 0o170555  # the type, r and x bits: never w, setuid or sticky
        attr.st_nlink = 2 if node.is_dir else 1
        attr.st_uid = _clamp(node.uid, 0, _ID_MAX)
        attr.st_gid = _clamp(node.gid, 0, _ID_MAX)
        attr.st_rdev = 0
        size = _clamp(node.size, 0, _I64_MAX)
        attr.st_size = size
        attr.st_blksize = 1 << 20 if node.kind == POINTER else 4096
        attr.st_blocks = (size + 511) // 512
        attr.st_atime_ns = _clamp(node.mtime_ns, -_I64_MAX, _I64_MAX)
        attr.st_mtime_ns = _clamp(node.mtime_ns, -_I64_MAX, _I64_MAX)
        attr.st_ctime_ns = _clamp(node.ctime_ns, -_I64_MAX, _I64_MAX)
        return attr

    # ------------------------------------------------------------ scanning

    async def _ensure_children(self, node: Node, fresh: bool = False) -> dict[bytes, int]:
        """Children of a folder, (re)built when stale. Local folders never touch the network.

        FRESH re-checks a local folder's mtime now (a name the kernel asks for and we do
        not know may have just been created).
        """
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if node.kind == PRVDIR_DIR:
            if node.children is None:
                self._apply(node, self._prvdir_specs(node))
            assert node.children is not None
            return node.children
        interval = RESCAN_INTERVAL if node.kind == LOCAL_DIR else REMOTE_LISTING_TTL
        if fresh and node.kind == LOCAL_DIR:
            interval = 0.0
        if node.children is not None:
            if time.monotonic() - node.checked_at < interval:
                return node.children
        async with node.lock:
            if node.children is not None and time.monotonic() - node.checked_at < min(
                0.05, interval
            ):
                return node.children  # another task just refreshed it
            if node.kind == LOCAL_DIR:
                specs, mtime_ns = await trio.to_thread.run_sync(
                    self._scan_local, node.path, node.scanned_mtime_ns
                )
                if specs is not None:
                    self._apply(node, specs)
                    node.scanned_mtime_ns = mtime_ns
            else:
                try:
                    specs = await trio.to_thread.run_sync(
                        self._scan_remote, node.rel, limiter=self.limiter
                    )
                except (KbfsError, OSError) as exc:
                    if node.children is None:
                        raise
                    # Keep the last listing: offline reads of cached files must keep working.
                    log.warning(
                        "listing /%s failed (%s); keeping the previous listing", node.rel, exc
                    )
                    specs = None
                if specs is not None:
                    self._apply(node, specs)
            node.checked_at = time.monotonic()
        assert node.children is not None
        return node.children

    def _apply(self, node: Node, specs: list[_Spec]) -> None:
        node.children = {spec.name: self._adopt(node, spec) for spec in specs}

    def problems(self) -> dict[str, str]:
        """Pointers and entries this mount could not use: {path: why} (at most
        MAX_PROBLEMS, newest kept)."""
        with self._stats_lock:
            return dict(self._problems)

    def last_errors(self) -> list[dict[str, Any]]:
        """The last failed reads, newest last: [{"file", "sha1", "error", "source", "time"}]
        (one per source that last failed, at most MAX_LAST_ERRORS)."""
        with self._stats_lock:
            return list(self._last_errors.values())

    def _note_problem(self, path: str, message: str | None) -> None:
        with self._stats_lock:
            self._problems.pop(path, None)
            if message is not None:
                self._problems[path] = message
                while len(self._problems) > MAX_PROBLEMS:
                    self._problems.pop(next(iter(self._problems)))

    def _log_once(self, path: str, mtime_ns: int, message: str) -> None:
        self._note_problem(path, message)
        if (path, mtime_ns) not in self._logged:
            self._logged.add((path, mtime_ns))
            log.warning("%s", message)

    def _scan_local(self, path: str, known_mtime_ns: int) -> tuple[list[_Spec] | None, int]:
        """List a real folder (worker thread). Returns (None, mtime) when it has not changed."""
        st_dir = os.stat(path)
        if st_dir.st_mtime_ns == known_mtime_ns:
            return None, known_mtime_ns
        entries: dict[str, os.stat_result] = {}
        with os.scandir(path) as it:
            for entry in it:
                try:
                    entries[entry.name] = entry.stat()  # follows symlinks; a broken one is skipped
                except OSError:
                    continue
        specs: list[_Spec] = []
        claimed: set[str] = set()
        # Pointers first, so that a name taken by NAME.prv is not taken again by NAME.prvdir.
        for name in sorted(entries, key=lambda n: (not n.endswith(".prv"), n)):
            st = entries[name]
            full = os.path.join(path, name)
            if stat.S_ISREG(st.st_mode) and name.endswith((".prv", ".prvdir")):
                target = name[: -len(".prv")] if name.endswith(".prv") else name[: -len(".prvdir")]
                # The real file wins over its pointer; then the pointer shows as itself.
                if target and target not in entries and target not in claimed:
                    spec = self._pointer_spec(full, name, target, st)
                    if spec is not None:
                        claimed.add(target)
                        specs.append(spec)
                        continue
            specs.append(self._plain_spec(full, name, st))
        return specs, st_dir.st_mtime_ns

    def _pointer_spec(self, full: str, name: str, target: str, st: os.stat_result) -> _Spec | None:
        try:
            if name.endswith(".prv"):
                pointer = prv.load_pointer(full)
                if self._problems:
                    self._note_problem(full, None)  # fixed since
                return _Spec.pointer_file(("p", full, pointer.sha1), target, pointer, _stamp(st),
                                          st.st_mode, path=full)

            def bad_name(message: str) -> None:
                self._log_once(message, st.st_mtime_ns, message)

            return _Spec.folder(("d", full, ""), target, PRVDIR_DIR, _stamp(st),
                                _folder_bits(st.st_mode), path=full,
                                prvdir=prv.load_prvdir(full, on_bad_name=bad_name))
        except KbfsError as exc:
            self._log_once(full, st.st_mtime_ns, f"malformed pointer shown as a plain file: {exc}")
            return None

    @staticmethod
    def _plain_spec(full: str, name: str, st: os.stat_result) -> _Spec:
        if stat.S_ISDIR(st.st_mode):
            kind, mode = LOCAL_DIR, stat.S_IFDIR | (st.st_mode & 0o555)
        else:
            kind, mode = PLAIN, stat.S_IFREG | (st.st_mode & 0o555)
        size = st.st_size if kind == PLAIN else 0
        uid, gid, mtime_ns, ctime_ns = _stamp(st)
        return _Spec(("l", full), os.fsencode(name), kind, path=full, size=size, mode=mode,
                     uid=uid, gid=gid, mtime_ns=mtime_ns, ctime_ns=ctime_ns)

    def _prvdir_specs(self, node: Node) -> list[_Spec]:
        assert node.prvdir is not None
        specs: list[_Spec] = []
        prefix = node.rel + "/" if node.rel else ""
        stamp = (node.uid, node.gid, node.mtime_ns, node.ctime_ns)  # the .prvdir file's
        # The .prvdir file's bits, passed down: its folders r+x, its files r.
        for name, sub in node.prvdir.dirs.items():
            specs.append(_Spec.folder(("d", node.path, prefix + name), name, PRVDIR_DIR, stamp,
                                      node.mode, path=node.path, rel=prefix + name, prvdir=sub))
        for name, pointer in node.prvdir.files.items():
            if name in node.prvdir.dirs:
                continue  # a folder and a file of one name: the folder wins
            specs.append(_Spec.pointer_file(("p", node.path, prefix + name, pointer.sha1), name,
                                            pointer, stamp, node.mode, path=node.path,
                                            rel=prefix + name))
        return specs

    def _scan_remote(self, rel: str) -> list[_Spec]:
        """Turn one listing of the share into entries (worker thread; may block on the network)."""
        assert self.list_dir is not None
        listing = self.list_dir(rel)
        prefix = rel + "/" if rel else ""
        specs: list[_Spec] = []
        seen: set[str] = set()
        now = time.time_ns()
        # A share's files show as the mounting user's, readable by whoever reaches the mount
        # (only the mounting user, unless it was mounted with --allow-other).
        for name in listing.get("dirs", []):
            problem = prv.entry_name_problem(name)
            if problem is not None or name in seen:
                self._log_once(f"/{prefix}{name!r:.80}", 0,
                               f"skipping a folder of /{rel}: {problem or 'duplicate name'}")
                continue
            seen.add(name)
            specs.append(_Spec.folder(("r", prefix + name), name, REMOTE_DIR,
                                      (self.uid, self.gid, now, now), 0o555, rel=prefix + name))
        for item in listing.get("files", []):
            try:
                name = item["name"]
                problem = prv.entry_name_problem(name)
                if problem is not None or name in seen:
                    raise ValueError(problem or f"duplicate name {name!r}")
                pointer = prv.pointer_from_dict(item.get("prv"), f"/{prefix}{name}")
                mtime_ns = int(float(item.get("mtime", 0)) * 1e9)
            except (KbfsError, KeyError, TypeError, ValueError, OverflowError) as exc:
                self._log_once(
                    f"/{prefix}{item!r:.80}", 0, f"skipping a listing entry of /{rel}: {exc}"
                )
                continue
            seen.add(name)
            specs.append(_Spec.pointer_file(("rp", prefix + name, pointer.sha1), name, pointer,
                                            (self.uid, self.gid, mtime_ns, mtime_ns), 0o444,
                                            rel=prefix + name))
        return specs

    # ------------------------------------------------------------ metadata handlers

    @_guard
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if name == b".":
            return self.attributes(parent)
        if name == b"..":
            return self.attributes(self._node(parent.parent))
        children = await self._ensure_children(parent)
        inode = children.get(name)
        if inode is None and parent.kind == LOCAL_DIR:
            inode = (await self._ensure_children(parent, fresh=True)).get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attributes(self._node(inode))

    @_guard
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.kind == PLAIN:
            # Pass-through files report their current size: the source may have changed.
            st = await trio.to_thread.run_sync(os.stat, node.path)
            node.size, node.mtime_ns, node.ctime_ns = st.st_size, st.st_mtime_ns, st.st_ctime_ns
        return self.attributes(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Inodes are kept for the life of the mount (a few hundred bytes each) so that they
        # stay stable; nothing to do.
        return None

    @_guard
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        node = self._node(inode)
        children = await self._ensure_children(node)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = sorted(children.items())
        return fh

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh, [])
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            node = self.nodes.get(inode)
            if node is None:
                continue
            if not pyfuse3.readdir_reply(token, name, self.attributes(node), index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_guard
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = 1 << 20
        data.f_frsize = 4096
        # Sizes of up to 2^62 each: a large enough .prvdir sums past fsblkcnt_t. Clamped to
        # 2^63-1, not 2^64-1, which tools that read the field as signed show as -1.
        total = sum(n.size for n in self.nodes.values() if not n.is_dir)
        data.f_blocks = _clamp(total // 4096, 0, _I64_MAX)
        data.f_bfree = data.f_bavail = 0
        data.f_files = _clamp(len(self.nodes), 0, _I64_MAX)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    @_guard
    async def access(self, inode: int, mode: int, ctx: Any = None) -> bool:
        self._node(inode)
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    # ------------------------------------------------------------ reads

    @_guard
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        fh = self._next_fh
        self._next_fh += 1
        if node.kind == PLAIN:
            fd = await trio.to_thread.run_sync(os.open, node.path, os.O_RDONLY | os.O_CLOEXEC)
            self._open[fh] = _OpenFile(node, fd=fd)
            self._count("opens")
            # The source file may change, so the kernel must not keep stale pages.
            return pyfuse3.FileInfo(fh=fh, keep_cache=False)
        assert node.ref is not None
        ref = node.ref
        # In a thread: the first open of a content looks up its catalogue row.
        await trio.to_thread.run_sync(self.cache.open_file, ref, limiter=self.limiter)
        self._open[fh] = _OpenFile(node)
        self._count("opens")
        self._count("open_files")
        # The content is immutable: pages read once may stay in the page cache.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> Buffer:  # type: ignore[override]
        # Any buffer will do: pyfuse3 copies it into its reply (a view saves a block copy).
        of = self._open.get(fh)
        if of is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        node = of.node
        if node.kind == PLAIN:
            data: bytes = await trio.to_thread.run_sync(
                os.pread, of.fd, size, off, limiter=self.limiter
            )
            self._count_read(len(data))
            return data
        if off >= node.size or size <= 0:
            return b""
        length = min(size, node.size - off)
        ref = node.ref
        assert ref is not None
        if self._read_cached is not None:
            # Inline, on the trio thread, only what cannot block: a content with every piece
            # present whose bytes are all in the page cache (preadv2 RWF_NOWAIT). Anything
            # else takes the thread hop (docs/internals.md, inline reads).
            cached = self._read_cached(ref, off, length)
            if cached is not None:
                self._count_read(len(cached))
                return cached
        try:
            data = await trio.to_thread.run_sync(self.cache.read, ref, off, length,
                                                 limiter=self.limiter)
        except (KbfsError, OSError) as exc:
            self._count("errors")
            self._log_read_error(node, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        self._count_read(len(data))
        return data  # type: ignore[no-any-return]

    def _count_read(self, n: int) -> None:
        with self._stats_lock:
            self._stats["reads"] += 1
            self._stats["bytes_served"] += n

    def _log_read_error(self, node: Node, exc: BaseException) -> None:
        sha1 = node.pointer.sha1 if node.pointer else "?"
        try:
            source = self.source_of(sha1) or "no source"
        except Exception:
            source = "unknown source"
        with self._stats_lock:
            self._last_errors.pop(source, None)
            self._last_errors[source] = {"file": node.display(), "sha1": sha1,
                                         "error": str(exc), "source": source,
                                         "time": time.time()}
            while len(self._last_errors) > MAX_LAST_ERRORS:
                self._last_errors.pop(next(iter(self._last_errors)))
        # One line per failure, but not a flood when a program retries every page.
        now = time.monotonic()
        if now - self._last_error_log.get(node.inode, -1e9) < 5.0:
            return
        self._last_error_log[node.inode] = now
        log.error(
            "read of %s (sha1 %s) failed: %s [last source: %s]", node.display(), sha1, exc, source
        )

    async def release(self, fh: int) -> None:
        of = self._open.pop(fh, None)
        if of is None:
            return
        try:
            if of.fd >= 0:
                os.close(of.fd)
            elif of.node.ref is not None:
                self._count("open_files", -1)
                self.cache.close_file(of.node.ref)  # a counter in memory: no I/O
        except Exception:  # release has no caller to tell; never let it kill the loop
            log.exception("release of %s failed", of.node.display())

    async def flush(self, fh: int) -> None:
        return None

    # ------------------------------------------------------------ xattrs

    @_guard
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        node = self._node(inode)
        return list(POINTER_XATTRS) if node.kind == POINTER else []

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        node = self._node(inode)
        if node.kind != POINTER or node.pointer is None or node.ref is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        pointer, ref = node.pointer, node.ref
        if name == XATTR_SHA1:
            return pointer.sha1.encode()
        if name == XATTR_SIZE:
            return str(pointer.size).encode()
        reads = self.cache
        if name == XATTR_CACHED:
            n = await trio.to_thread.run_sync(reads.cached_bytes, ref, limiter=self.limiter)
            return str(n).encode()
        if name == XATTR_VERIFIED:
            v = await trio.to_thread.run_sync(reads.verified, ref, limiter=self.limiter)
            return str(v).encode()
        if name == XATTR_SOURCE:
            source = await trio.to_thread.run_sync(self.source_of, pointer.sha1)
            return (source or "none").encode()
        if name == XATTR_POINTER:
            return pointer.to_json().encode()
        raise pyfuse3.FUSEError(errno.ENODATA)

    # ------------------------------------------------------------ refused: this is a read-only view

    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setxattr(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)


# ---------------------------------------------------------------- kernel-side helpers


def mount_options(fsname: str = "kbfs", allow_other: bool = False) -> set[str]:
    """pyfuse3 options for a read-only kbfs mount.

    ALLOW_OTHER lets other users in (only when asked for: `kbfs mount --allow-other`; never
    because the caller is root or /etc/fuse.conf would permit it). `default_permissions`,
    always on, makes the kernel check the modes the mount shows, for them and for the owner.
    """
    opts = {
        "fsname=" + fsname.replace(",", "_"),
        "subtype=kbfs",
        "ro",
        "default_permissions",
        "noatime",
    }
    if allow_other:
        opts.add("allow_other")
    return opts


def fuse_conf_allows_other() -> bool:
    """Whether /etc/fuse.conf lets a user other than root mount with allow_other."""
    try:
        with open("/etc/fuse.conf", encoding="utf-8") as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def mount_device(mountpoint: str) -> str | None:
    """'major:minor' of the file system mounted at MOUNTPOINT (from /proc/self/mountinfo,
    not stat(), so the daemon can ask without a round trip through its own file system);
    None off Linux or with KBFS_PORTABLE=1 (kbfs.osio)."""
    return osio.mount_device(mountpoint)


def raise_read_ahead(mountpoint: str, kb: int = READ_AHEAD_KB) -> bool:
    """Raise the kernel's read-ahead of the mount to KB KiB when permitted.

    FUSE mounts start with 128 KiB. Measured here (warm cache, page cache dropped): 128 KiB
    is several times slower than 1 MiB, and 4 MiB (four blocks in flight) beat 1 MiB by about
    40%. Returns whether it was raised.
    """
    dev = mount_device(mountpoint)
    if dev is None:
        return False
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(str(kb))
    except OSError as exc:
        log.info(
            "cannot raise read-ahead (%s: %s); sequential reads will be slower", path, exc.strerror
        )
        return False
    return True
