"""The verified block cache on disk: every byte it returns was checked against a hash.

`BlockCache` answers `read(ref, offset, length)` from verified block files on disk and
fetches missing blocks from a `BlockSource` (normally `kbfs.fetch.Fetcher`, which this
module never imports: the source comes in through the constructor). It is synchronous and
thread-safe so the FUSE daemon (through `trio.to_thread`) and plain Python readers share it.

Content identity. Everything is kept under `FileRef.key`, what the pointer commits to: its
block tree root when it has one (the root binds the size and the block size, see
`kbfs.tree`), else `s1-<sha1>-<size>`. Two pointers that share a SHA-1 but not a size or a
root never share a block, a tree, a marker or a copy: a pointer with a real file's SHA-1
and its own root, read once from a fake source, cannot poison what the real pointer reads.
Sources are still asked by SHA-1 (that is how they are found); what they send is checked
against the leaves of the pointer being read.

On disk, under DIR (safe to share between processes of one user; 0700, files 0600):

    DIR/layout                             "kbfs-cache 2": this layout (an older one is discarded)
    DIR/mark.key                           32 random bytes keying the block marks (0600)
    DIR/blocks/<shard>/<key>/<index>       one verified block per file
    DIR/trees/<shard>/<key>                the leaves (32 bytes each)
    DIR/complete/<key>                     a root-less content matched its SHA-1 once
    DIR/files/<key>                        whole-file copies made by `local_path` (0600)

(<shard> is the first two hex digits of the root or the SHA-1.) A cache folder owned by
another user is refused (CacheError); ours is narrowed to 0700 when it is wider. A cache
of the old layout (keyed by SHA-1 alone) is deleted, with one log line: nothing in it is
trusted.

Every file is written under a unique temporary name (starting with '.') in its final
folder, then renamed: a block file that exists was fully written, whatever moment the
process was killed at (a kill -9 cannot lose data already in the page cache). Presence is
never recorded before that rename.

Durability: block files are NOT fsynced (an fsync per 1 MiB block cost more than the
network). What a power loss or a failing disk could leave behind (a renamed file whose data
never reached the disk, a flipped bit), or a block file changed by hand, is caught instead
by verifying each block file against its leaf the first time this process reads it (BLAKE3,
~5 GB/s: a fraction of a millisecond per block); the blocks verified so far are remembered
in memory. A block file that fails is deleted and fetched again. One shortcut: a block
file written or verified in this boot carries the xattr `user.kbfs.mark`, a keyed BLAKE3
MAC (under `DIR/mark.key`, which only the cache's owner can read) of (content key, block
index, st_dev, st_ino, st_size, boot id). A file whose mark checks out was verified in
this boot against this content's leaves and cannot have lost data to a power cut (that
would have meant a new boot), so it counts as verified without hashing, in any process. A
mark copied to another file, or written by anyone without the key, fails and the block is
hashed. Files of earlier boots, and file systems without user xattrs, are hashed on their
first read in each process. Trees of content with a root are re-verified against the root
on every load, so they are not fsynced; the leaves of root-less content and `complete/`
markers are.

Root-less content (pointers of the original tools: SHA-1 and size only). No root vouches
for any tree, so no byte of it is returned until the whole content has matched its SHA-1
once: the first read fetches every block (the leaves a source offers only check the
transfer), hashes the whole file with SHA-1 and, on a match only, records the leaves it
computed from the data (fsynced) and `complete/<key>`; the blocks fetched meanwhile are
staged under temporary names and put in place only then. A mismatch deletes everything
under the key and raises VerificationError naming the SHA-1. From then on blocks of that
content are checked against the recorded leaves, from any source, like content with a root.

Stores can run off the critical path (`background_stores=True`, or
`enable_background_stores()`, as the mount and the downloader do): the verified bytes go
to the reader at once and a store thread writes the block file (read-ahead jobs, which no
reader waits on, store their blocks themselves). The block stays in the in-flight registry,
with its bytes, until the rename, so nobody fetches it twice meanwhile. Queued stores are
bounded (`STORE_QUEUE_BLOCKS`). Present, verified blocks are read through an LRU of open
descriptors: one pread, no open or stat per read (`read_cached` is that path alone, for
callers on an event loop). `write_to` copies blocks into a caller's file at their offsets.

Concurrency: one in-flight entry (a Future) per block being fetched, so concurrent readers
of a block share one fetch; the global lock guards only dictionaries, never I/O.
Capacity: LRU by last access over block files, evicted to 90% of capacity, never evicting
files pinned by `open_file`; a floor of free disk space (`min_free`, at most 5% of the file
system). Blocks found on disk when the cache opens enter the LRU oldest content first (by
their folder's mtime). When a block cannot be stored (full disk, folder gone) the verified
bytes are still returned, uncached.

What it does not do: no network (only through the source), no FUSE, no pointer parsing,
no trust in any tree beyond the rules above; `files/` copies are not counted against
capacity.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import itertools
import logging
import mmap
import os
import re
import stat
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from blake3 import blake3

from kbfs import tree
from kbfs.errors import CacheError, KbfsError, VerificationError

log = logging.getLogger(__name__)

BLOCK_SIZE = tree.BLOCK_SIZE
MAX_RUN = 16            # blocks per fetch_blocks call from read()
PREFETCH_RUN = 8        # blocks per background fetch (one range request); with the
                        # read-ahead window several such requests are in flight
LOW_WATER = 0.9         # eviction goes down to this fraction of capacity
TREE_MEMORY = 1024      # trees kept in memory
FD_CACHE = 1024         # open descriptors of block files kept for reads (at most a
                        # quarter of the process's descriptor limit, see _fd_cache_size)
STORE_QUEUE_BLOCKS = 64  # blocks waiting for a background store at most (bounds memory)
STORE_THREADS = 2
RECENT_BLOCKS = 32      # read-ahead blocks kept in memory for their reader
REORDER = 4             # blocks a new stream's reads may arrive out of order (then its window)
READ_THROUGH_THREADS = 4  # pool threads reading one span of cold blocks in for a download
STALE_TEMP = 3600.0     # seconds after which a leftover temporary file is removed
FD_RECHECK_SECONDS = 1.0        # a kept block descriptor is checked for a deleted file
                                # at most this often (a deleted block reads right meanwhile)
FREE_RECHECK_SECONDS = 1.0      # free disk space is re-read at least this often, and on
FREE_RECHECK_MARGIN = 256 << 20  # every store once it is this close to the floor


_ROOT_RE = re.compile(r"[0-9a-f]{64}")
_SHA1_RE = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class FileRef:
    """Content to read, as one pointer commits to it; `key` names it in the cache (see the
    module docstring), `sha1` is what sources are asked for."""

    sha1: str
    size: int
    root: str | None          # None: a pointer from the original tools (the whole-file
    block_size: int = BLOCK_SIZE  # SHA-1 is checked once before any byte is served)
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The key names folders and files: only hex digits and a size ever get there.
        sha1 = self.sha1.lower()
        if not _SHA1_RE.fullmatch(sha1) or self.size < 0 or self.block_size <= 0:
            raise ValueError(f"not a content reference: {self.sha1!r}, {self.size}")
        object.__setattr__(self, "sha1", sha1)
        if self.root is not None:
            root = self.root.lower()
            if not _ROOT_RE.fullmatch(root):
                raise ValueError(f"not a block tree root: {self.root!r}")
            object.__setattr__(self, "root", root)
            key = root
        elif self.block_size == BLOCK_SIZE:
            key = f"s1-{sha1}-{self.size}"
        else:
            key = f"s1-{sha1}-{self.size}-{self.block_size}"
        object.__setattr__(self, "key", key)

    @property
    def blocks(self) -> int:
        return tree.block_count(self.size, self.block_size)


class BlockSource(Protocol):
    """Where missing blocks come from; `kbfs.fetch.Fetcher` implements it."""

    def fetch_tree(self, sha1: str, size: int, block_size: int = ..., root: str | None = None) -> bytes: ...

    def fetch_blocks(self, sha1: str, size: int, first: int, count: int,
                     leaves: Sequence[bytes], block_size: int = ...) -> bytes: ...


class _Fd:
    """An open block file shared by readers; closed when dropped and no reader uses it."""

    __slots__ = ("fd", "users", "dropped", "checked")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.dropped = False
        self.checked = time.monotonic()  # when the file was last seen to have its name


class _Flight:
    """A block being fetched: readers that need it wait here instead of fetching it again."""

    __slots__ = ("future", "prefetch")

    def __init__(self, prefetch: bool) -> None:
        self.future: cf.Future[Buffer] = cf.Future()
        self.prefetch = prefetch


Buffer = bytes | bytearray | memoryview  # a verified block: bytes, or a view into a fetched run

_tmp_counter = itertools.count()
XATTR_MARK = "user.kbfs.mark"
MARK_KEY_FILE = "mark.key"
MARK_BYTES = 16
LAYOUT_FILE = "layout"
LAYOUT = b"kbfs-cache 2\n"
_SUBFOLDERS = ("blocks", "trees", "complete", "files")


def _read_boot_id() -> bytes | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip() or None
    except OSError:
        return None


_BOOT_ID = _read_boot_id()


def _shard(key: str) -> str:
    """The two-character folder a content key's files go in (hex digits of its hash)."""
    return key[3:5] if key.startswith("s1-") else key[:2]


def _mark_value(secret: bytes, key: str, index: int, st: os.stat_result) -> bytes:
    """The mark of block INDEX of content KEY in the file whose fstat is ST (this boot).

    A keyed BLAKE3 hash (a MAC, like HMAC-SHA-256, but BLAKE3 is loaded already and a
    download of cached content never loads hashlib's OpenSSL: see test_download)."""
    # The mtime too: a file made later at a reused inode number has another one.
    msg = (f"{key}\0{index}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0".encode()
           + (_BOOT_ID or b""))
    return blake3(msg, key=secret).digest(MARK_BYTES)


def _load_secret(directory: str) -> bytes | None:
    """The cache's mark key (made on first use), or None when marks cannot be trusted
    here (then every block file is hashed on its first read in each process)."""
    if _BOOT_ID is None:
        return None
    path = os.path.join(directory, MARK_KEY_FILE)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            _make_secret(path)
            continue
        except OSError as exc:
            log.warning("%s: cannot read the block mark key (%s): marks not used", path, exc)
            return None
        try:
            st = os.fstat(fd)
            data = os.read(fd, 64)
        finally:
            os.close(fd)
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and len(data) == 32:
            if stat.S_IMODE(st.st_mode) == 0o600:
                return data
            if st.st_mode & 0o077:
                # Others could have read it: a new key (every mark made with the old
                # one fails from now on, and those blocks are hashed once).
                log.warning("%s was readable by others: replaced", path)
                _unlink(path)
                continue
        log.warning("%s is not a 32-byte 0600 file of ours: block marks not used", path)
        return None
    return None


def _make_secret(path: str) -> None:
    """Create PATH holding 32 random bytes, atomically (a reader never sees it short)."""
    tmp = f"{path}.{os.getpid()}.{next(_tmp_counter)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, os.urandom(32))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process made one meanwhile: that one is used
    except FileExistsError:
        pass
    finally:
        _unlink(tmp)


_direct_ok = hasattr(os, "O_DIRECT")  # cleared on the first file system that refuses it
_bounce = threading.local()
DIRECT_ALIGN = 4096
HUGE_PAGE = 2 << 20


def _disk_free(path: str) -> int:
    """Bytes free to unprivileged users on PATH's file system (shutil.disk_usage's `free`,
    without importing shutil and its compression modules at every command's start-up)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _disk_total(path: str) -> int:
    """Size of PATH's file system in bytes (shutil.disk_usage's `total`)."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def anonymous_memory(n: int, huge_pages: bool = True) -> mmap.mmap:
    """N bytes (at least 1) of private anonymous memory: page-aligned, as O_DIRECT writes
    need, and zero pages until written (not MAP_SHARED, mmap's default, whose pages cost a
    shmem page fault each: measured at 4% of a download).

    HUGE_PAGES: ask for transparent huge pages when N is at least one (MADV_HUGEPAGE): one
    page fault per 2 MiB instead of per 4 KiB, which for the mount's fresh 8 MiB read-ahead
    runs cost more than the copy of their bytes off the socket. A download, which reuses a
    few run buffers, measured its kernel time up by half with them: it passes False."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    buf = mmap.mmap(-1, max(1, n), flags=flags) if flags else mmap.mmap(-1, max(1, n))
    if huge_pages and n >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


def _write_direct(fd: int, data: Buffer) -> None:
    """Write DATA (a multiple of DIRECT_ALIGN long) to FD opened with O_DIRECT, through an
    aligned per-thread buffer (mmap memory is page aligned; a bytes object is not)."""
    n = len(data)
    if isinstance(data, memoryview) and isinstance(data.obj, mmap.mmap):
        # A block of a fetched run (page-aligned mmap memory, blocks at multiples of
        # 1 MiB): written as it is, without the copy through the bounce buffer.
        try:
            done = 0
            while done < n:
                done += os.write(fd, data[done:n])
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL or done:
                raise
    buf: mmap.mmap | None = getattr(_bounce, "buf", None)
    if buf is None or len(buf) < n:
        buf = _bounce.buf = anonymous_memory(max(n, BLOCK_SIZE))
    view = memoryview(buf)
    try:
        view[:n] = data
        done = 0
        while done < n:
            done += os.write(fd, view[done:n])
    finally:
        view.release()


def _write_atomic(path: str, data: Buffer, durable: bool = True,
                  mark: Callable[[int], None] | None = None, direct: bool = False,
                  final: bool = True) -> str:
    """Write DATA to PATH so PATH either does not exist or holds all of DATA (fsynced
    before the rename when DURABLE; MARK(fd) is called on the written file before the
    rename; with DIRECT, past the page cache when the length and the file system allow).
    FINAL False: leave it under its temporary name, which is returned (a staged block)."""
    global _direct_ok
    if direct and _direct_ok and len(data) and len(data) % DIRECT_ALIGN == 0:
        try:
            return _write_atomic_to(path, data, durable, mark, os.O_DIRECT, final)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _direct_ok = False  # e.g. tmpfs: buffered from now on
            log.debug("no O_DIRECT writes under %s: %s", path, exc)
    return _write_atomic_to(path, data, durable, mark, 0, final)


def _write_atomic_to(path: str, data: Buffer, durable: bool,
                     mark: Callable[[int], None] | None, flags: int, final: bool = True) -> str:
    folder, name = os.path.split(path)
    # Unique per process, thread and call; the leading dot keeps it from ever being
    # taken for a block (names of blocks are digits only).
    tmp = os.path.join(folder,
                       f".{name}.{os.getpid()}.{threading.get_ident()}.{next(_tmp_counter)}.tmp")
    mode = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | flags
    try:
        fd = os.open(tmp, mode, 0o600)
    except FileNotFoundError:
        # The folder vanished (cleared by hand, or never made): recreate it once.
        _make_folder(folder)
        fd = os.open(tmp, mode, 0o600)
    try:
        try:
            if flags:
                _write_direct(fd, data)
            else:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            if durable:
                os.fsync(fd)
            if mark is not None:
                mark(fd)
        finally:
            os.close(fd)
        if final:
            os.rename(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    return path if final else tmp
DEFAULT_MIN_FREE = 1 << 30  # bytes of free disk the cache leaves (at most 5% of the file system)

class BlockCache:
    """Verified blocks on disk with LRU eviction; see the module docstring."""

    def __init__(self, directory: str, source: BlockSource, capacity: int,
                 min_free: int | None = None, workers: int = 8,
                 background_stores: bool = False) -> None:
        self.directory = os.path.abspath(directory)
        self.source = source
        self.capacity = capacity
        self.min_free = DEFAULT_MIN_FREE if min_free is None else min_free
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, int], _Flight] = {}
        self._tree_flights: dict[tuple[str, int, int], cf.Future[list[bytes]]] = {}
        # Content key -> (size, block size, leaves): checked against the root, or recorded
        # once root-less content matched its SHA-1; most recently used last. The size and
        # block size are kept because a hostile pointer can pair a real root with others.
        self._trees: OrderedDict[str, tuple[int, int, list[bytes]]] = OrderedDict()
        # (content key, index) -> size, least recently used first.
        self._lru: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._file_bytes: Counter[str] = Counter()
        self._file_blocks: Counter[str] = Counter()
        self._total = 0
        self._reserved = 0  # bytes of stores under way (counted against the cap before they land)
        self._pins: Counter[str] = Counter()
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self._closed = False
        self._stats: Counter[str] = Counter()
        # Blocks whose file this process has checked against its leaf (or written itself).
        self._good: set[tuple[str, int]] = set()
        # Blocks whose file should be in the page cache (read ahead, or written or read
        # through it): the only ones a NOWAIT read tries.
        self._paged: set[tuple[str, int]] = set()
        self._free_seen = 0         # free disk bytes at the last statvfs, less stores since
        self._free_at = -1e9        # when that statvfs was (time.monotonic)
        self._fds: OrderedDict[tuple[str, int], _Fd] = OrderedDict()
        self._fd_max = _fd_cache_size()
        # Blocks fetched by read-ahead, kept in memory for the reader they were fetched for
        # (their files are written past the page cache), least recently fetched first.
        self._recent: OrderedDict[tuple[str, int], Buffer] = OrderedDict()
        self._pool = cf.ThreadPoolExecutor(max_workers=max(1, workers),
                                           thread_name_prefix="kbfs-prefetch")
        self._store_pool: cf.ThreadPoolExecutor | None = None
        self._store_slots = threading.BoundedSemaphore(STORE_QUEUE_BLOCKS)
        if background_stores:
            self._store_pool = cf.ThreadPoolExecutor(max_workers=STORE_THREADS,
                                                     thread_name_prefix="kbfs-store")
        _private_folder(self.directory)
        for sub in _SUBFOLDERS:
            _private_folder(os.path.join(self.directory, sub))
        self._discard_old_layout()
        self._secret = _load_secret(self.directory)
        # On a small file system the default floor (1 GiB) would leave no room at all: there
        # it is 5% of the file system instead.
        if min_free is None:
            try:
                self.min_free = min(self.min_free, _disk_total(self.directory) // 20)
            except OSError:
                pass
        self._scan()

    # ---- paths
    def _block_path(self, key: str, index: int) -> str:
        return os.path.join(self.directory, "blocks", _shard(key), key, str(index))

    def _tree_path(self, key: str) -> str:
        return os.path.join(self.directory, "trees", _shard(key), key)

    def _complete_path(self, key: str) -> str:
        return os.path.join(self.directory, "complete", key)

    def _file_path(self, key: str) -> str:
        return os.path.join(self.directory, "files", key)

    def _discard_old_layout(self) -> None:
        """Delete what a cache of the old layout (everything keyed by SHA-1 alone) holds:
        it cannot tell two pointers with one SHA-1 apart, so none of it is trusted."""
        marker = os.path.join(self.directory, LAYOUT_FILE)
        try:
            with open(marker, "rb") as f:
                if f.read(64) == LAYOUT:
                    return
        except OSError:
            pass
        old = 0
        for sub in _SUBFOLDERS:
            top = os.path.join(self.directory, sub)
            for name in _listdir(top):
                path = os.path.join(top, name)
                if sub in ("blocks", "trees") and len(name) == 2 and os.path.isdir(path):
                    for entry in _listdir(path):
                        if _SHA1_RE.fullmatch(entry) or entry.startswith("."):
                            old += 1
                            _remove_tree(os.path.join(path, entry))
                elif _SHA1_RE.fullmatch(name) or name.startswith("."):
                    old += 1
                    _remove_tree(path)
        if old:
            log.warning("cache %s: deleted %d entries of the old cache layout (keyed by SHA-1 "
                        "alone, not trusted); they are fetched again when needed",
                        self.directory, old)
        try:
            _write_atomic(marker, LAYOUT)
        except OSError as exc:
            self._note_error(f"cannot write {marker}: {exc}")

    def _mark_fn(self, key: str, index: int) -> Callable[[int], None] | None:
        """What `_write_atomic` calls to mark block INDEX of KEY (None: no marks here)."""
        secret = self._secret
        if secret is None:
            return None

        def mark(fd: int) -> None:
            self._mark(fd, key, index)

        return mark

    def _mark(self, fd: int, key: str, index: int) -> None:
        """Mark the block file open at FD as verified, in this boot, as block INDEX of KEY."""
        if self._secret is None:
            return
        try:
            os.setxattr(fd, XATTR_MARK, _mark_value(self._secret, key, index, os.fstat(fd)))
        except OSError:
            pass  # no user xattrs here: the block is hashed on its first read instead

    def _marked(self, fd: int, key: str, index: int, st: os.stat_result) -> bool:
        """Whether the block file open at FD (fstat ST) carries a valid mark of this boot."""
        if self._secret is None:
            return False
        try:
            return os.getxattr(fd, XATTR_MARK) == _mark_value(self._secret, key, index, st)
        except OSError:
            return False

    # ---- startup scan
    def _scan(self) -> None:
        """Index the block files already on disk, oldest content first (another process may
        be adding and removing files meanwhile: a file that vanishes is simply not present).

        Two stats per content, not one per block: every command that opens the cache pays
        for this (a stat per block cost 0.4 s per 100 GiB of cache). A content's blocks all
        have the size of its lowest present block except possibly the highest (the file's
        short last block), so those two are stat'ed; a block file of another size is caught
        when it is opened (`_fd_acquire` checks every size) and dropped then. The age of a
        content is its folder's mtime, which each stored or removed block renews."""
        found: list[tuple[float, str, int, int]] = []
        now = time.time()
        root = os.path.join(self.directory, "blocks")
        for prefix in _listdir(root):
            for sha1 in _listdir(os.path.join(root, prefix)):
                folder = os.path.join(root, prefix, sha1)
                indices = []
                for name in _listdir(folder):
                    if name.isdigit():
                        indices.append(int(name))
                    elif name.startswith("."):
                        path = os.path.join(folder, name)
                        try:
                            if now - os.stat(path).st_mtime > STALE_TEMP:
                                _unlink(path)  # a temporary file left by a killed writer
                        except OSError:
                            pass
                if not indices:
                    continue
                indices.sort()
                try:
                    age = os.stat(folder).st_mtime
                    full = os.stat(os.path.join(folder, str(indices[0]))).st_size
                    last = (full if len(indices) == 1
                            else os.stat(os.path.join(folder, str(indices[-1]))).st_size)
                except OSError:
                    continue  # being removed meanwhile: not present
                for i in indices:
                    found.append((age, sha1, i, last if i == indices[-1] else full))
        found.sort()
        with self._lock:
            for _, sha1, index, size in found:
                self._index_add(sha1, index, size)

    def _index_add(self, sha1: str, index: int, size: int) -> None:
        key = (sha1, index)
        if key in self._lru:
            self._lru.move_to_end(key)
            return
        self._lru[key] = size
        self._total += size
        self._file_bytes[sha1] += size
        self._file_blocks[sha1] += 1

    def _index_drop(self, sha1: str, index: int) -> None:
        """Forget block INDEX of SHA1 (the caller holds the lock)."""
        key = (sha1, index)
        self._good.discard(key)
        self._paged.discard(key)
        self._recent.pop(key, None)
        ent = self._fds.pop(key, None)
        if ent is not None:
            self._fd_drop(ent)
        size = self._lru.pop(key, None)
        if size is None:
            return
        self._total -= size
        self._file_bytes[sha1] -= size
        self._file_blocks[sha1] -= 1
        if self._file_blocks[sha1] <= 0:
            del self._file_blocks[sha1]
            del self._file_bytes[sha1]

    # ---- trees
    def _leaves(self, ref: FileRef,
                sink: Callable[[int, Buffer], None] | None = None) -> list[bytes]:
        """The leaves of REF: checked against its root, or for root-less content the ones
        recorded once the whole content matched its SHA-1 (running that first pass if it
        never did: see `_prove_sha1`, which hands SINK every byte it reads)."""
        fkey = (ref.key, ref.size, ref.block_size)
        with self._lock:
            hit = self._trees.get(ref.key)
            if hit is not None:
                if hit[:2] != fkey[1:]:
                    raise VerificationError(
                        f"{ref.sha1}: the pointer's block tree root {ref.root} is that of "
                        f"{hit[0]} bytes in blocks of {hit[1]}, not {ref.size} in {ref.block_size}")
                self._trees.move_to_end(ref.key)
                return hit[2]
            flight = self._tree_flights.get(fkey)
            owner = flight is None
            if flight is None:
                flight = self._tree_flights[fkey] = cf.Future()
        if not owner:
            return flight.result()
        try:
            leaves = self._load_tree(ref, sink)
            flight.set_result(leaves)
            return leaves
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._tree_flights.pop(fkey, None)

    def _check_ref(self, ref: FileRef) -> None:
        """Before any block of REF is read: its leaves are loaded for its size and block
        size (VerificationError for a pointer pairing a root with another size), and
        root-less content has matched its SHA-1. A dictionary look-up once loaded."""
        hit = self._trees.get(ref.key)
        if hit is None or hit[0] != ref.size or hit[1] != ref.block_size:
            self._leaves(ref)

    def _read_tree_file(self, ref: FileRef) -> list[bytes] | None:
        want = ref.blocks * tree.LEAF_BYTES
        try:
            fd = os.open(self._tree_path(ref.key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            blob = os.read(fd, want + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
        return tree.split_leaves(blob) if len(blob) == want else None

    def _remember_tree(self, ref: FileRef, leaves: list[bytes]) -> None:
        with self._lock:
            self._trees[ref.key] = (ref.size, ref.block_size, leaves)
            self._trees.move_to_end(ref.key)
            while len(self._trees) > TREE_MEMORY:
                self._trees.popitem(last=False)

    def _load_tree(self, ref: FileRef,
                   sink: Callable[[int, Buffer], None] | None = None) -> list[bytes]:
        if ref.root is None:
            leaves = None
            if os.path.exists(self._complete_path(ref.key)):
                leaves = self._read_tree_file(ref)
            if leaves is None:
                leaves = self._prove_sha1(ref, sink)
            self._remember_tree(ref, leaves)
            return leaves
        want = ref.blocks * tree.LEAF_BYTES
        leaves = self._read_tree_file(ref)
        if leaves is not None:
            try:
                tree.verify_leaves(leaves, ref.size, ref.root, ref.block_size)
            except VerificationError:
                # Damaged, or this pointer pairs the root with another size: fetched (and
                # checked) again. The blocks stay: each was stored after its check against
                # the leaves of this root and is checked again (or by its mark) when read.
                log.warning("cached tree of %s does not match root %s: not used",
                            ref.sha1, ref.root)
                leaves = None
        if leaves is None:
            # The root goes along so the source can pass over a source serving a wrong tree.
            blob = self.source.fetch_tree(ref.sha1, ref.size, block_size=ref.block_size,
                                          root=ref.root)
            if len(blob) != want:
                raise VerificationError(
                    f"tree of {ref.sha1} has {len(blob)} bytes, expected {want}")
            leaves = tree.split_leaves(blob)
            tree.verify_leaves(leaves, ref.size, ref.root, ref.block_size)
            try:
                # Checked against the root on every load: no fsync needed.
                _write_atomic(self._tree_path(ref.key), blob, durable=False)
            except OSError as exc:
                self._note_error(f"cannot store the tree of {ref.sha1}: {exc}")
        self._remember_tree(ref, leaves)
        return leaves

    def _prove_sha1(self, ref: FileRef,
                    sink: Callable[[int, Buffer], None] | None = None) -> list[bytes]:
        """The first read of root-less REF: fetch all of it, hash it whole with SHA-1 and
        return the leaves computed from its bytes, recorded (fsynced, with `complete/KEY`)
        only on a match; raise VerificationError, keeping nothing, on a mismatch.

        The leaves a source offers only check the transfer (a source that lies
        consistently about tree and bytes passes them, not the SHA-1). The blocks are
        written under temporary names as they come and renamed into place only after
        the match. SINK(offset, bytes), when given, receives every byte in order (a
        download writes them to its part file: one fetch, whatever the cache's size)."""
        import hashlib  # root-less content only: not loaded at start-up

        log.info("%s has no block tree: reading the whole file once to check its SHA-1",
                 ref.sha1)
        # Whatever lies under this key without its marker was never proven: not reused.
        self._drop_content(ref.key, marker=True)
        want = ref.blocks * tree.LEAF_BYTES
        offered = self.source.fetch_tree(ref.sha1, ref.size, block_size=ref.block_size)
        if len(offered) != want:
            raise VerificationError(f"tree of {ref.sha1} has {len(offered)} bytes, expected {want}")
        transport = tree.split_leaves(offered)
        into = getattr(self.source, "fetch_blocks_into", None)
        hasher = hashlib.sha1()
        mine: list[bytes] = []
        staged: list[tuple[int, str, int]] = []  # (index, temporary path, bytes reserved)
        bs = ref.block_size
        done = False
        try:
            for first in range(0, ref.blocks, MAX_RUN):
                count = min(MAX_RUN, ref.blocks - first)
                lo, hi = first * bs, min((first + count) * bs, ref.size)
                if into is not None:
                    view = memoryview(anonymous_memory(hi - lo)) if hi > lo else memoryview(b"")
                    into(ref.sha1, ref.size, first, count, transport, view, bs)
                else:
                    data = self.source.fetch_blocks(ref.sha1, ref.size, first, count,
                                                    transport, bs)
                    if len(data) != hi - lo:
                        raise VerificationError(
                            f"source returned {len(data)} bytes for blocks "
                            f"{first}-{first + count - 1} of {ref.sha1}")
                    view = memoryview(data)
                hasher.update(view)
                if sink is not None and hi > lo:
                    sink(lo, view)
                with self._lock:
                    self._stats["bytes_fetched"] += hi - lo
                for k in range(count):
                    a, b = tree.block_span(k, len(view), bs)
                    block = view[a:b]
                    mine.append(tree.leaf_hash(block))
                    n = len(block)
                    if not self._make_room(n):
                        continue
                    try:
                        tmp = _write_atomic(self._block_path(ref.key, first + k), block,
                                            durable=False, final=False,
                                            mark=self._mark_fn(ref.key, first + k))
                    except OSError as exc:
                        with self._lock:
                            self._reserved -= n
                        self._note_error(f"cannot stage block {first + k} of {ref.sha1}: {exc}")
                        continue
                    staged.append((first + k, tmp, n))
            actual = hasher.hexdigest()
            if actual != ref.sha1:
                log.error("%s: the content served has SHA-1 %s; nothing of it is kept or served",
                          ref.sha1, actual)
                self._note_error(None)
                raise VerificationError(
                    f"{ref.sha1}: the content the sources served has SHA-1 {actual}, not the "
                    "pointer's (a source served self-consistent but wrong data)")
            try:
                _write_atomic(self._tree_path(ref.key), b"".join(mine), durable=True)
                _write_atomic(self._complete_path(ref.key), b"", durable=True)
            except OSError as exc:
                # Proven in this process all the same; others prove it again.
                self._note_error(f"cannot record that {ref.sha1} matched its SHA-1: {exc}")
                return mine
            for index, tmp, n in staged:
                try:
                    os.rename(tmp, self._block_path(ref.key, index))
                except OSError:
                    _unlink(tmp)
                    with self._lock:
                        self._reserved -= n
                    continue
                with self._lock:
                    self._reserved -= n
                    self._index_add(ref.key, index, n)
                    self._good.add((ref.key, index))  # bytes this process just hashed
                    self._paged.add((ref.key, index))
            done = True
            log.info("%s: SHA-1 matches; its blocks are checked against the leaves from now on",
                     ref.sha1)
            return mine
        finally:
            if not done:  # a mismatch, a failed fetch, an interrupt: nothing is kept
                for _, tmp, n in staged:
                    _unlink(tmp)
                    with self._lock:
                        self._reserved -= n

    # ---- blocks on disk
    def _fd_drop(self, ent: _Fd) -> None:
        """Close ENT once no reader uses it (the caller holds the lock)."""
        ent.dropped = True
        if ent.users == 0 and ent.fd >= 0:
            os.close(ent.fd)
            ent.fd = -1

    def _fd_release(self, ent: _Fd) -> None:
        with self._lock:
            ent.users -= 1
            if ent.dropped:
                self._fd_drop(ent)

    def _fd_acquire(self, ref: FileRef, index: int, blen: int) -> _Fd | None:
        """An open descriptor of block INDEX (its size checked when opened), or None when
        the block file is not there (or not usable: then it is deleted)."""
        key = (ref.key, index)
        with self._lock:
            ent = self._fds.get(key)
            if ent is not None:
                ent.users += 1
                self._fds.move_to_end(key)
        if ent is not None:
            # Another process (its eviction, `kbfs cache clear`, rm) may have deleted the
            # file: its old inode still reads right, but would hold the disk space for as
            # long as the descriptor stays cached, and the block would never be stored again.
            # Checked once per FD_RECHECK_SECONDS per descriptor, not on every use: an
            # fstat is ~1 us, but ~5 us between 1 MiB copies, whose memcpy evicts what it
            # touches (measured: 5 ms of a 1 GiB cached download's ~280).
            now = time.monotonic()
            if now - ent.checked < FD_RECHECK_SECONDS:
                return ent
            try:
                unlinked = os.fstat(ent.fd).st_nlink == 0
            except OSError:
                unlinked = True
            if not unlinked:
                ent.checked = now
                return ent
            with self._lock:
                if self._fds.get(key) is ent:
                    del self._fds[key]
                    self._fd_drop(ent)
            self._fd_release(ent)
            # Fall through to the name: a store may have renamed a new copy over the old
            # inode (then that copy is used), or the block is really gone (then it leaves
            # the index below and None says so).
        path = self._block_path(ref.key, index)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            with self._lock:
                # Evicted, maybe by another process: forget it. Unless a store of this
                # process is under way (in flight) or has just put it in place (its
                # descriptor is kept): the name can appear between the open above and this
                # lock, and forgetting a block stored meanwhile made the caller fetch it
                # again (test_background_stores_serve_at_once_and_store_behind, ~1 run in
                # 10 under load).
                if key not in self._inflight and key not in self._fds:
                    self._index_drop(ref.key, index)
            return None
        except OSError as exc:
            self._note_error(f"cannot open cached block {index} of {ref.sha1}: {exc}")
            return None
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            self._note_error(f"cannot stat cached block {index} of {ref.sha1}: {exc}")
            return None
        fsize = st.st_size
        if fsize != blen:
            # Not possible for a file we renamed into place; never serve it. Deleted only
            # once REF is known to be this content's size: a hostile pointer pairing the
            # root with another size must not delete the real content's blocks (its
            # `_leaves` raises VerificationError instead).
            os.close(fd)
            self._leaves(ref)
            self._bad_block(ref, index, f"has {fsize} bytes, not {blen}")
            return None
        trusted = self._marked(fd, ref.key, index, st)
        with self._lock:
            if trusted:
                self._good.add(key)
            ent = self._fd_insert(key, fd)
            ent.users += 1
            return ent

    def _fd_insert(self, key: tuple[str, int], fd: int) -> _Fd:
        """Keep FD open for block KEY (or close it when one is kept already); the caller
        holds the lock."""
        ent = self._fds.get(key)
        if ent is not None:  # opened by another thread meanwhile: use that one
            os.close(fd)
        else:
            ent = self._fds[key] = _Fd(fd)
            while len(self._fds) > self._fd_max:
                _, old = self._fds.popitem(last=False)
                self._fd_drop(old)
        self._fds.move_to_end(key)
        return ent

    def _bad_block(self, ref: FileRef, index: int, why: str) -> None:
        self._note_error(f"cached block {index} of {ref.sha1} {why}: deleted, fetched again")
        _unlink(self._block_path(ref.key, index))
        with self._lock:
            self._index_drop(ref.key, index)

    def _load_slice(self, ref: FileRef, index: int, lo: int = 0, hi: int | None = None,
                    nowait: bool = False, into: memoryview | None = None
                    ) -> bytes | bytearray | memoryview | None:
        """Bytes [lo, hi) of the verified block INDEX from disk, or None when not present.

        A block this process has verified costs one pread of just the slice asked for (a
        128 KiB FUSE read costs 128 KiB of I/O). The first read of a block file in this
        process reads all of it and checks it against its leaf (see the module docstring).
        NOWAIT: only bytes already in the page cache (RWF_NOWAIT), else None, and never
        a first read (which must hash the whole block); the bytes land in INTO (hi - lo
        long) when given, else in a new buffer."""
        start, end = tree.block_span(index, ref.size, ref.block_size)
        blen = end - start
        hi = blen if hi is None else hi
        key = (ref.key, index)
        ent = self._fd_acquire(ref, index, blen)
        if ent is None:
            return None
        try:
            with self._lock:
                good = key in self._good
            data: bytes | bytearray | memoryview | None
            if nowait:
                if not good:
                    return None
                buf = into if into is not None else bytearray(hi - lo)
                try:
                    got = os.preadv(ent.fd, [buf], lo, os.RWF_NOWAIT)
                except BlockingIOError:
                    got = -1
                if got != hi - lo:
                    # Not (all) in the page cache (evicted since): the caller reads in a
                    # thread, and NOWAIT reads skip this block until it is read ahead again.
                    with self._lock:
                        self._paged.discard(key)
                    return None
                data = buf
            elif good:
                data = os.pread(ent.fd, hi - lo, lo)
            else:
                whole = os.pread(ent.fd, blen, 0)
                leaves = self._leaves(ref)
                if len(whole) != blen or not tree.block_matches(whole, leaves[index]):
                    data = None
                else:
                    self._mark(ent.fd, ref.key, index)
                    with self._lock:
                        self._good.add(key)
                        self._paged.add(key)  # all of it was just read
                    data = whole if (lo, hi) == (0, blen) else whole[lo:hi]
        except OSError as exc:
            self._note_error(f"cannot read cached block {index} of {ref.sha1}: {exc}")
            return None
        finally:
            self._fd_release(ent)
        if data is None:
            self._bad_block(ref, index, "does not match its leaf")
            return None
        if len(data) != hi - lo:
            self._bad_block(ref, index, f"gave {len(data)} bytes, not {hi - lo}")
            return None
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
            else:
                self._index_add(ref.key, index, blen)  # stored by another process
        return data

    def enable_background_stores(self) -> None:
        """Write fetched blocks in store threads from now on (see the module docstring)."""
        with self._lock:
            if self._store_pool is None and not self._closed:
                self._store_pool = cf.ThreadPoolExecutor(max_workers=STORE_THREADS,
                                                         thread_name_prefix="kbfs-store")

    def read_cached(self, ref: FileRef, offset: int, length: int, nowait: bool = False,
                    into: memoryview | None = None) -> Buffer | None:
        """Bytes [offset, offset+length) of REF (at most two blocks) when they can be had
        without fetching or hashing, else None: from a read-ahead block still in memory, or
        one pread of a block file this process has verified. Cheap enough for an event
        loop thread. NOWAIT: a block file only when its bytes should be in the page cache
        (read ahead by `_advise_job`, or written or read through it) and only if they are
        there (RWF_NOWAIT): it never waits for the disk. INTO (at least LENGTH bytes): where
        NOWAIT reads land, so that a caller that copies the result at once (the FUSE reply)
        reuses one buffer instead of faulting in a fresh megabyte per read; the result may
        then be a view of INTO, valid until INTO is reused."""
        end = min(ref.size, offset + length)
        if offset >= end or offset < 0:
            return None
        hit = self._trees.get(ref.key)
        if hit is None or hit[0] != ref.size or hit[1] != ref.block_size:
            # The leaves not loaded for this size (or root-less content not yet proven in
            # this process): `read_buffer` loads (proves) them, or refuses the pointer.
            return None
        bs = ref.block_size
        first, last = offset // bs, (end - 1) // bs
        if last - first > 1:
            return None
        pieces: list[Buffer] = []
        in_into = 0  # pieces read into INTO, each at its place there
        for i in range(first, last + 1):
            lo = offset - i * bs if i == first else 0
            hi = end - i * bs if i == last else min(bs, ref.size - i * bs)
            key = (ref.key, i)
            with self._lock:
                ahead = self._recent.get(key)
                usable = key in self._good and (not nowait or key in self._paged)
            if ahead is not None:
                pieces.append(memoryview(ahead)[lo:hi])  # read ahead, still in memory
                continue
            if not usable:
                return None
            target = into[lo + i * bs - offset:hi + i * bs - offset] if into is not None else None
            data = self._load_slice(ref, i, lo, hi, nowait, target)
            if data is None:
                return None
            pieces.append(data)
            in_into += data is target  # (only NOWAIT reads land in INTO)
        with self._lock:
            self._stats["hits"] += len(pieces)
            self._stats["bytes_served"] += end - offset
        if in_into == len(pieces) > 1:
            assert into is not None
            return into[:end - offset].toreadonly()  # already side by side: no join
        if len(pieces) == 1:
            only = pieces[0]
            return only.toreadonly() if isinstance(only, memoryview) else only
        return b"".join(pieces)

    def _present(self, ref: FileRef, index: int) -> bool:
        with self._lock:
            if (ref.key, index) in self._lru:
                return True
        return os.path.exists(self._block_path(ref.key, index))

    def _store(self, ref: FileRef, index: int, data: Buffer, direct: bool = False) -> bool:
        """Store a verified block; False (logged) when it could not be stored. DIRECT
        writes it past the page cache (read-ahead streams: see `_fetch_owned`)."""
        n = len(data)
        if not self._make_room(n):
            with self._lock:
                self._stats["store_skipped"] += 1
            return False
        try:
            _write_atomic(self._block_path(ref.key, index), data, durable=False,
                          mark=self._mark_fn(ref.key, index), direct=direct)
        except OSError as exc:
            with self._lock:
                self._reserved -= n
            self._note_error(f"cannot store block {index} of {ref.sha1}: {exc}")
            if exc.errno == errno.ENOSPC:
                self._evict(self.capacity // 10)
            return False
        try:
            # Opened now, while its name is hot in the dentry cache, and kept for reads:
            # a later read then costs no path lookup (after a drop of the caches, three
            # directory reads from disk before the data itself).
            rfd = os.open(self._block_path(ref.key, index), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            rfd = -1
        with self._lock:
            self._reserved -= n
            self._index_add(ref.key, index, n)
            self._good.add((ref.key, index))  # written from bytes verified in this process
            if not direct:
                self._paged.add((ref.key, index))
            if rfd >= 0:
                self._fd_insert((ref.key, index), rfd)
        return True

    # ---- capacity
    def _make_room(self, n: int) -> bool:
        """Evict so that N more bytes fit under capacity and above the free-space floor.

        On True the N bytes stay reserved until the caller's store lands or fails, so
        concurrent stores (readers, read-ahead, background writers) cannot together
        overshoot the cap between their checks and their writes."""
        with self._lock:
            over = self._total + self._reserved + n - self.capacity
        if over > 0:
            self._evict(over + self.capacity - int(self.capacity * LOW_WATER))
        with self._lock:
            if self._total + self._reserved + n > self.capacity:
                return False
            self._reserved += n
            # Far above the floor, a recent reading (less what was stored since) will do:
            # one statvfs per block was one more GIL hand-off per MiB streamed.
            if (time.monotonic() - self._free_at < FREE_RECHECK_SECONDS
                    and self._free_seen - n > self.min_free + FREE_RECHECK_MARGIN):
                self._free_seen -= n
                return True
        try:
            free = _disk_free(self.directory)
        except OSError:
            return True  # the write will tell
        with self._lock:
            self._free_seen, self._free_at = free - n, time.monotonic()
        if free - n < self.min_free:
            self._evict(self.min_free - (free - n))
            try:
                free = _disk_free(self.directory)
            except OSError:
                return True
            if free - n < self.min_free:
                with self._lock:
                    self._reserved -= n
                return False
        return True

    def _evict(self, amount: int) -> int:
        """Remove at least AMOUNT bytes of least recently used, unpinned blocks."""
        victims: list[tuple[str, int]] = []
        freed = 0
        with self._lock:
            for key, size in self._lru.items():
                if freed >= amount:
                    break
                if self._pins[key[0]] or key in self._inflight:
                    continue
                victims.append(key)
                freed += size
            for sha1, index in victims:
                self._index_drop(sha1, index)
            self._stats["evictions"] += len(victims)
        for sha1, index in victims:
            _unlink(self._block_path(sha1, index))
        return freed

    # ---- fetching
    def _claim(self, ref: FileRef, indices: Sequence[int], prefetch: bool
               ) -> tuple[list[int], dict[int, _Flight]]:
        """Register this thread as the fetcher of the blocks nobody is fetching yet."""
        owned: list[int] = []
        waits: dict[int, _Flight] = {}
        with self._lock:
            for i in indices:
                if prefetch and (ref.key, i) in self._lru:
                    continue  # stored since the caller looked
                flight = self._inflight.get((ref.key, i))
                if flight is not None:
                    waits[i] = flight
                else:
                    self._inflight[(ref.key, i)] = _Flight(prefetch)
                    owned.append(i)
        return owned, waits

    def _fetch_owned(self, ref: FileRef, owned: list[int], run: int,
                     out: dict[int, Buffer] | None, store: bool = True) -> None:
        """Fetch, publish and store the blocks this thread claimed, in runs of consecutive ones."""
        with self._lock:
            flights = {i: self._inflight[(ref.key, i)] for i in owned}
        error: BaseException | None = None
        handed: set[int] = set()  # blocks a background store now owns (and unregisters)
        into = getattr(self.source, "fetch_blocks_into", None)
        try:
            leaves = self._leaves(ref) if owned else []
            for first, count in _runs(owned, run):
                lo = first * ref.block_size
                hi = min((first + count) * ref.block_size, ref.size)
                view: memoryview
                if into is not None:
                    # Straight into one buffer; blocks are views of it: no copies. mmap
                    # memory is page-aligned, so O_DIRECT stores can write from it as it
                    # is, and is not zeroed byte by byte first as a bytearray is.
                    view = memoryview(anonymous_memory(hi - lo)) if hi > lo else memoryview(b"")
                    into(ref.sha1, ref.size, first, count, leaves, view, ref.block_size)
                else:
                    data = self.source.fetch_blocks(ref.sha1, ref.size, first, count, leaves,
                                                    ref.block_size)
                    if len(data) != hi - lo:
                        raise VerificationError(f"source returned {len(data)} bytes for blocks "
                                                f"{first}-{first + count - 1} of {ref.sha1}")
                    view = memoryview(data)
                blocks: list[Buffer] = []
                for k in range(count):
                    a, b = tree.block_span(k, len(view), ref.block_size)
                    block = view[a:b]
                    blocks.append(block)
                    flights[first + k].future.set_result(block)  # waiters go on at once
                    if out is not None:
                        out[first + k] = block
                    elif store:
                        self._keep_recent((ref.key, first + k), block)
                with self._lock:
                    self._stats["bytes_fetched"] += len(view)
                # Whoever waits for these blocks has them now; a store thread writes them
                # while this one fetches on (a read-ahead job that stored its own blocks
                # waited for the disk between its range requests). The bounded store queue
                # paces the fetching. Read-ahead streams (out is None) write with O_DIRECT:
                # their reader keeps the bytes in its own page cache (the FUSE file's), so
                # the block files need not fill it a second time; that copy cost as much
                # CPU as the fetch itself here.
                direct = out is None
                if store and self._queue_stores(ref, first, blocks, flights, direct):
                    handed.update(range(first, first + count))
                    continue
                for k, stored in enumerate(blocks):
                    if store:
                        self._store(ref, first + k, stored, direct=direct)
                with self._lock:
                    for k in range(count):
                        self._inflight.pop((ref.key, first + k), None)
        except BaseException as exc:
            error = exc
            raise
        finally:
            with self._lock:
                for i in owned:
                    if i in handed:
                        continue
                    fl = flights[i]
                    if not fl.future.done():
                        fl.future.set_exception(error or CacheError("fetch abandoned"))
                    if self._inflight.get((ref.key, i)) is fl:
                        del self._inflight[(ref.key, i)]

    def _keep_recent(self, key: tuple[str, int], block: Buffer) -> None:
        with self._lock:
            self._recent[key] = block
            self._recent.move_to_end(key)
            while len(self._recent) > RECENT_BLOCKS:
                self._recent.popitem(last=False)

    def _queue_stores(self, ref: FileRef, first: int, blocks: list[Buffer],
                      flights: dict[int, _Flight], direct: bool = False) -> bool:
        """Hand verified BLOCKS (already published to readers) to a store thread; False
        when stores are synchronous or the store pool is gone (the caller stores them)."""
        pool = self._store_pool
        if pool is None or self._closed:
            return False
        for _ in blocks:
            self._store_slots.acquire()  # back-pressure: bounded bytes waiting in memory
        with self._lock:
            self._pending += 1
        try:
            pool.submit(self._store_job, ref, first, blocks, flights, direct)
        except RuntimeError:  # shut down meanwhile
            for _ in blocks:
                self._store_slots.release()
            self._job_done()
            return False
        return True

    def _store_job(self, ref: FileRef, first: int, blocks: list[Buffer],
                   flights: dict[int, _Flight], direct: bool = False) -> None:
        try:
            for k, data in enumerate(blocks):
                try:
                    self._store(ref, first + k, data, direct=direct)
                except Exception:  # noqa: BLE001 - a background job: log, never raise
                    log.exception("store of block %d of %s failed", first + k, ref.sha1)
                    self._note_error(None)
                finally:
                    # Only now (the file renamed, or the store given up) may it be fetched again.
                    with self._lock:
                        if self._inflight.get((ref.key, first + k)) is flights[first + k]:
                            del self._inflight[(ref.key, first + k)]
                    self._store_slots.release()
        finally:
            self._job_done()

    def _obtain(self, ref: FileRef, indices: list[int], out: dict[int, Buffer],
                store: bool = True) -> None:
        with self._lock:
            # Stored (and no longer in flight) since the caller looked: read, not fetched.
            stored = [i for i in indices if (ref.key, i) in self._lru
                      and (ref.key, i) not in self._inflight]
        if stored:
            for i in stored:
                data = self._load_slice(ref, i)
                if data is not None:
                    out[i] = data
            indices = [i for i in indices if i not in out]
        owned, waits = self._claim(ref, indices, prefetch=False)
        if owned:
            self._fetch_owned(ref, owned, MAX_RUN, out, store)
        retry = []
        for i, flight in waits.items():
            try:
                out[i] = flight.future.result()
            except Exception:
                if not flight.prefetch:
                    raise
                retry.append(i)  # a failed read-ahead is not this reader's failure
        if retry:
            owned, waits2 = self._claim(ref, retry, prefetch=False)
            if owned:
                self._fetch_owned(ref, owned, MAX_RUN, out)
            for i, flight in waits2.items():
                out[i] = flight.future.result()

    # ---- public API
    def read(self, ref: FileRef, offset: int, length: int) -> bytes:
        """Up to LENGTH verified bytes of REF at OFFSET (clipped to its size); blocking."""
        data = self.read_buffer(ref, offset, length)
        return data if isinstance(data, bytes) else bytes(data)

    def read_buffer(self, ref: FileRef, offset: int, length: int) -> Buffer:
        """`read`, but the bytes may come as a read-only view of a fetched block (no copy
        of a whole block for a caller, like the FUSE reply, that copies them anyway)."""
        self._check_open()
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be non-negative")
        end = min(ref.size, offset + length)
        if offset >= end:
            return b""
        self._check_ref(ref)
        bs = ref.block_size
        first, last = offset // bs, (end - 1) // bs
        pieces: dict[int, Buffer] = {}   # block index -> just the part this read needs
        missing: list[int] = []
        for i in range(first, last + 1):
            lo = offset - i * bs if i == first else 0
            hi = end - i * bs if i == last else tree.block_span(i, ref.size, bs)[1] - i * bs
            with self._lock:
                ahead = self._recent.get((ref.key, i))
            if ahead is not None:
                pieces[i] = memoryview(ahead)[lo:hi]  # read ahead, still in memory
                continue
            data = self._load_slice(ref, i, lo, hi)
            if data is None:
                missing.append(i)
            else:
                pieces[i] = data
        if missing:
            fetched: dict[int, Buffer] = {}
            self._obtain(ref, missing, fetched)
            for i in missing:
                lo = offset - i * bs if i == first else 0
                hi = end - i * bs if i == last else len(fetched[i])
                pieces[i] = memoryview(fetched[i])[lo:hi]  # sliced, not copied
        with self._lock:
            self._stats["hits"] += last - first + 1 - len(missing)
            self._stats["misses"] += len(missing)
            self._stats["bytes_served"] += end - offset
        if first == last:
            only = pieces[first]
            return only.toreadonly() if isinstance(only, memoryview) else only
        return b"".join(pieces[i] for i in range(first, last + 1))

    def write_to(self, ref: FileRef, fd: int, first: int, count: int,
                 store: bool = True, lock: threading.Lock | None = None) -> int:
        """Write verified blocks [first, first+count) of REF into FD, each at its own offset
        in the content (a download's output file); returns the bytes written.

        Present blocks are copied from their files (in the kernel once verified in this
        process); missing ones are fetched (one range request per run) and written as soon
        as they are verified, then stored in the cache behind (not at all with STORE False,
        e.g. for content bigger than the whole cache). Threads writing into the same FD
        should share one LOCK: concurrent writers of one file contend for its inode lock
        in the kernel, which spins (that doubled the CPU of a download). Blocking."""
        self._check_open()
        bs = ref.block_size
        last = min(ref.blocks, first + count)
        if ref.size == 0 or first >= last:
            return 0
        self._check_ref(ref)
        buf = memoryview(bytearray(min(bs, ref.size)))  # reused for blocks to verify
        held = lock if lock is not None else contextlib.nullcontext()
        missing: list[int] = []
        for i in range(first, last):
            if not self._copy_block(ref, i, fd, buf, held):
                missing.append(i)
        if missing:
            fetched: dict[int, Buffer] = {}
            self._obtain(ref, missing, fetched, store)
            with held:
                for i in missing:
                    _pwrite_all(fd, fetched[i], i * bs)
        written = min(ref.size, last * bs) - first * bs
        with self._lock:
            self._stats["hits"] += last - first - len(missing)
            self._stats["misses"] += len(missing)
            self._stats["bytes_served"] += written
        return written

    def _copy_block(self, ref: FileRef, index: int, fd: int, buf: memoryview,
                    held: contextlib.AbstractContextManager[Any]) -> bool:
        """Copy the present block INDEX into FD at its offset, verifying it first if this
        process has not yet; False when it is not present (or failed verification)."""
        start, end = tree.block_span(index, ref.size, ref.block_size)
        blen = end - start
        key = (ref.key, index)
        ent = self._fd_acquire(ref, index, blen)
        if ent is None:
            return False
        ok = True
        try:
            with self._lock:
                good = key in self._good
            if good:
                with held:
                    _copy_all(ent.fd, fd, blen, start)
            else:
                view = buf[:blen]
                got = os.preadv(ent.fd, [view], 0)
                if got != blen or not tree.block_matches(view, self._leaves(ref)[index]):
                    ok = False
                else:
                    self._mark(ent.fd, ref.key, index)
                    with self._lock:
                        self._good.add(key)
                    with held:
                        _pwrite_all(fd, view, start)
        finally:
            self._fd_release(ent)
        if not ok:
            self._bad_block(ref, index, "does not match its leaf")
            return False
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
            else:
                self._index_add(ref.key, index, blen)
        return True

    def leaves(self, ref: FileRef) -> list[bytes]:
        """The leaves of REF, checked against its root (stored tree, else fetched from the
        source): what a caller that fetches blocks itself verifies them against."""
        self._check_open()
        return self._leaves(ref)

    def copy_present(self, ref: FileRef, fd: int, indices: Sequence[int],
                     lock: threading.Lock | None = None) -> list[int]:
        """Copy those of blocks INDICES of REF that are in the cache into FD, each at its
        offset in the content, verified as `write_to` does; never fetches. Returns the
        indices that were not copied (not present, or failed their leaf: then deleted).

        For a downloader that fetches missing blocks itself without storing them. LOCK as
        for `write_to`. Blocking. Block files out of memory are read from disk one at a
        time here: a caller copying many has them read in ahead, a span at a time, with
        `advise(read_through=True)` (without that, 1 GiB written past the page cache by
        read-ahead stores took 1.5 s to copy; see bench/bench_download.py)."""
        self._check_open()
        if ref.size == 0:
            return list(indices)
        self._check_ref(ref)
        buf = memoryview(bytearray(min(ref.block_size, ref.size)))
        held = lock if lock is not None else contextlib.nullcontext()
        missing: list[int] = []
        served = 0
        for i in indices:
            if self._copy_block(ref, i, fd, buf, held):
                start, end = tree.block_span(i, ref.size, ref.block_size)
                served += end - start
            else:
                missing.append(i)
        with self._lock:
            self._stats["hits"] += len(indices) - len(missing)
            self._stats["bytes_served"] += served
        return missing

    def prefetch(self, ref: FileRef, first: int, count: int,
                 wanted: Callable[[int], bool] | None = None) -> None:
        """Fetch missing blocks [first, first+count) in the background, and hint the
        present ones in (`advise`, with WANTED); never raises."""
        try:
            if self._closed or (ref.root is None and ref.key not in self._trees):
                return  # root-less content is read whole once, by its first reader
            last = min(ref.blocks, first + count)
            missing: list[int] = []
            present: list[int] = []
            for i in range(max(0, first), last):
                (present if self._present(ref, i) else missing).append(i)
            self.advise(ref, present, wanted)
            owned, _ = self._claim(ref, missing, prefetch=True)
            for run_first, run_count in _runs(owned, PREFETCH_RUN):
                run = list(range(run_first, run_first + run_count))
                with self._lock:
                    self._pending += 1
                try:
                    self._pool.submit(self._prefetch_job, ref, run)
                except RuntimeError:  # closed meanwhile
                    self._abandon(ref, run)
                    self._job_done()
        except Exception:  # noqa: BLE001 - read-ahead must never break a read
            log.exception("prefetch of %s failed", ref.sha1)

    def _submit(self, job: Any, *args: Any) -> None:
        """Run JOB(*ARGS) in the prefetch pool, counted as pending (see wait_idle)."""
        with self._lock:
            self._pending += 1
        try:
            self._pool.submit(job, *args)
        except RuntimeError:  # closed meanwhile
            self._job_done()

    def advise(self, ref: FileRef, indices: Sequence[int],
               wanted: Callable[[int], bool] | None = None, *, read_through: bool = False) -> None:
        """Start the kernel reading the present blocks INDICES into the page cache, from a
        pool thread (`_advise`): a copier hints the next span while it copies this one.
        WANTED(index), asked just before each hint: False skips the block (a stream whose
        reader has moved past it; a pool thread may get to a hint late). READ_THROUGH: for
        a copier that reads every block once, right behind (a download); see `_advise`."""
        if indices and not self._closed:
            self._submit(self._advise_job, ref, list(indices), wanted, read_through)

    def _advise(self, ref: FileRef, indices: Sequence[int],
                wanted: Callable[[int], bool] | None = None, read_through: bool = False) -> None:
        """Start the kernel reading the present blocks INDICES into the page cache. Each
        block is its own small file, so the kernel's own read-ahead never runs past one
        block: without this, a sequential reader of cached content waits for one 1 MiB
        disk read at a time (measured: warm reads at half the disk's speed).

        READ_THROUGH: a block already in memory is left alone (one RWF_NOWAIT probe of its
        last byte, instead of a hint); any other is read through the file's ordinary read
        path into /dev/null (`_read_through`) instead of hinted. POSIX_FADV_WILLNEED's
        forced read-ahead fills the page cache with 4 KiB pages, the read path with large
        folios, and a page's second read moves it to the kernel's active list one folio at
        a time: measured on Linux 6.18/ext4, copying a GiB of blocks a second time after
        WILLNEED read them in took 25-50 ms longer than the copies after it (262,144
        activations), ~15 ms after a read-through, and then during the copy that follows
        the read-through, which waits for the disk anyway. Not for the mount: its
        read-ahead hints well ahead of the reader to keep the disk busy with many blocks at
        once, which WILLNEED does without a waiting thread per block in flight."""
        if not (read_through and _CAN_READ_THROUGH):
            def hint(index: int, fd: int, length: int) -> bool:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                return True

            self._each_block_fd(ref, indices, hint, wanted)
            return
        probe = bytearray(1)
        cold: list[int] = []

        def in_memory(index: int, fd: int, length: int) -> bool:
            if _in_page_cache(fd, length, probe):
                return True
            cold.append(index)
            return False

        self._each_block_fd(ref, indices, in_memory, wanted)
        # A read-through waits for its block's disk reads: blocks out of memory are read on
        # up to READ_THROUGH_THREADS pool threads at once (runs of neighbours), which keeps
        # the disk as busy as WILLNEED's queued reads did (one thread: a from-disk download
        # ~10% slower). Blocks already in memory cost one probe on this thread only.
        if not cold:
            return
        share = -(-len(cold) // READ_THROUGH_THREADS)
        runs = [cold[k:k + share] for k in range(0, len(cold), share)]
        for run in runs[1:]:
            self._submit(self._read_through_job, ref, run)
        self._read_through(ref, runs[0])

    def _each_block_fd(self, ref: FileRef, indices: Sequence[int],
                       act: Callable[[int, int, int], bool],
                       wanted: Callable[[int], bool] | None = None) -> None:
        """ACT(index, fd, length) for each present block of INDICES (WANTED as for
        `advise`), on a descriptor of the block file; True from it marks the block as in
        the page cache. An OSError from ACT skips the block: these are hints."""
        for index in indices:
            if self._closed:
                return
            if wanted is not None and not wanted(index):
                continue
            start, end = tree.block_span(index, ref.size, ref.block_size)
            ent = self._fd_acquire(ref, index, end - start)
            if ent is None:
                continue
            try:
                paged = act(index, ent.fd, end - start)
            except OSError:
                continue  # only a hint
            finally:
                self._fd_release(ent)
            if paged:
                with self._lock:
                    self._paged.add((ref.key, index))

    def _read_through(self, ref: FileRef, indices: Sequence[int]) -> None:
        """Read blocks INDICES through the page cache into /dev/null (`_read_through_fd`)."""
        sink = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            self._each_block_fd(ref, indices,
                                lambda index, fd, length: _read_through_fd(fd, length, sink))
        finally:
            os.close(sink)

    def _read_through_job(self, ref: FileRef, indices: list[int]) -> None:
        """`_read_through` in the prefetch pool."""
        try:
            self._read_through(ref, indices)
        except Exception:  # noqa: BLE001 - a hint must never break a read
            log.exception("read-through of cached blocks of %s failed", ref.sha1)
        finally:
            self._job_done()

    def release_pages(self, ref: FileRef, indices: Sequence[int]) -> None:
        """Let the kernel drop the page cache of the block files INDICES, from a pool
        thread: a reader that keeps the bytes in a page cache of its own (the mount's FUSE
        file) is past them, and two copies of each block in memory halve what the page
        cache holds (and cost the allocation of a fresh page for every 4 KiB twice)."""
        if indices and not self._closed:
            self._submit(self._release_job, ref, list(indices))

    def _release_job(self, ref: FileRef, indices: list[int]) -> None:
        try:
            for index in indices:
                key = (ref.key, index)
                with self._lock:
                    self._paged.discard(key)
                    ent = self._fds.get(key)
                    if ent is None:
                        continue  # not opened by this process: not read through it
                    ent.users += 1
                try:
                    os.posix_fadvise(ent.fd, 0, 0, os.POSIX_FADV_DONTNEED)
                except OSError:
                    pass  # only a hint
                else:
                    with self._lock:
                        self._stats["blocks_released"] += 1
                finally:
                    self._fd_release(ent)
        except Exception:  # noqa: BLE001 - a hint must never break a read
            log.exception("drop-behind of cached blocks of %s failed", ref.sha1)
        finally:
            self._job_done()

    def _advise_job(self, ref: FileRef, indices: list[int],
                    wanted: Callable[[int], bool] | None = None, read_through: bool = False) -> None:
        """`_advise` in the prefetch pool (a read-ahead window, a copier's next span)."""
        try:
            self._advise(ref, indices, wanted, read_through)
        except Exception:  # noqa: BLE001 - a hint must never break a read
            log.exception("read-ahead of cached blocks of %s failed", ref.sha1)
        finally:
            self._job_done()

    def _prefetch_job(self, ref: FileRef, run: list[int]) -> None:
        try:
            if self._closed:
                self._abandon(ref, run)
                return
            self._fetch_owned(ref, run, PREFETCH_RUN, None)
        except KbfsError as exc:
            log.warning("prefetch of blocks %d-%d of %s failed: %s", run[0], run[-1], ref.sha1, exc)
            self._note_error(None)
        except Exception:  # noqa: BLE001 - logged, never raised: a background job
            log.exception("prefetch of %s failed", ref.sha1)
            self._note_error(None)
        finally:
            self._job_done()

    def _abandon(self, ref: FileRef, run: list[int]) -> None:
        with self._lock:
            for i in run:
                fl = self._inflight.pop((ref.key, i), None)
                if fl is not None and not fl.future.done():
                    fl.future.set_exception(CacheError("cache closed"))

    def _job_done(self) -> None:
        with self._lock:
            self._pending -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no prefetch or background store is pending; False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def open_file(self, ref: FileRef) -> None:
        """Pin REF's blocks against eviction until the matching `close_file`."""
        with self._lock:
            self._pins[ref.key] += 1

    def close_file(self, ref: FileRef) -> None:
        with self._lock:
            self._pins[ref.key] -= 1
            if self._pins[ref.key] <= 0:
                del self._pins[ref.key]

    def note_jump(self) -> None:
        """Count a read-ahead stream restarted by a jump (`ReadAhead`; statistics)."""
        with self._lock:
            self._stats["stream_jumps"] += 1

    def cached_bytes(self, ref: FileRef) -> int:
        """Bytes of REF present in the cache (as known to this process)."""
        with self._lock:
            return self._file_bytes.get(ref.key, 0)

    def verified(self, ref: FileRef) -> str:
        """'tree' when REF has a root, 'sha1' once root-less content matched its SHA-1,
        else 'pending' (none of it has been served)."""
        if ref.root is not None:
            return "tree"
        return "sha1" if os.path.exists(self._complete_path(ref.key)) else "pending"

    def check_whole(self, ref: FileRef, sink: Callable[[int, Buffer], None] | None = None) -> bool:
        """Make sure root-less REF has matched its SHA-1 once (the first pass of the module
        docstring, if it never did; VerificationError on a mismatch). True when this call
        ran that pass, and then SINK(offset, bytes) received all of the content in order;
        False when it was proven already (or by another thread meanwhile). Content with a
        root: its leaves are loaded and False is returned."""
        self._check_open()
        ran = False

        def counted(offset: int, data: Buffer) -> None:
            nonlocal ran
            ran = True
            if sink is not None:
                sink(offset, data)

        self._leaves(ref, counted if ref.root is None else None)
        return ran

    def local_path(self, ref: FileRef) -> str:
        """Path of a complete, verified copy of REF (`DIR/files/<key>`, mode 0600 in the
        0700 cache folder: for this user only), made if needed."""
        self._check_open()
        self._leaves(ref)  # root-less content: proven first
        path = self._file_path(ref.key)
        try:
            if os.stat(path).st_size == ref.size:
                return path
        except FileNotFoundError:
            pass
        chunk = MAX_RUN * ref.block_size
        folder = os.path.dirname(path)
        _make_folder(folder)
        tmp = os.path.join(folder, f".{ref.key}.{os.getpid()}.{next(_tmp_counter)}.tmp")
        self.open_file(ref)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            with open(fd, "wb") as f:
                for offset in range(0, ref.size, chunk):
                    # Keep the next chunks coming while this one is written out.
                    nxt = (offset + chunk) // ref.block_size
                    self.prefetch(ref, nxt, 2 * MAX_RUN)
                    f.write(self.read_buffer(ref, offset, chunk))
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
        finally:
            self.close_file(ref)
            _unlink(tmp)
        return path

    def statistics(self) -> dict[str, Any]:
        """Counters: hits, misses (blocks), bytes_served, bytes_fetched, evictions, errors,
        store_skipped, blocks_released (page cache let go behind a stream), stream_jumps
        (read-ahead windows restarted by a read far from the stream's last), cached_bytes,
        capacity, in_flight."""
        with self._lock:
            return {
                "hits": self._stats["hits"],
                "misses": self._stats["misses"],
                "bytes_served": self._stats["bytes_served"],
                "bytes_fetched": self._stats["bytes_fetched"],
                "evictions": self._stats["evictions"],
                "errors": self._stats["errors"],
                "store_skipped": self._stats["store_skipped"],
                "blocks_released": self._stats["blocks_released"],
                "stream_jumps": self._stats["stream_jumps"],
                "cached_bytes": self._total,
                "capacity": self.capacity,
                "in_flight": len(self._inflight),
            }

    def clear(self) -> None:
        """Delete every block, tree, marker and copy whose file is not pinned (on disk too,
        so content stored by other processes sharing the folder goes as well)."""
        with self._lock:
            pinned = set(self._pins)
        for key in self._keys_on_disk():
            if key not in pinned:
                self._drop_content(key, marker=True)

    def close(self) -> None:
        """Stop background work (queued prefetches are abandoned, running ones finish;
        queued stores are all written)."""
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=False)
        if self._store_pool is not None:
            self._store_pool.shutdown(wait=True, cancel_futures=False)
        with self._lock:
            fds, self._fds = list(self._fds.values()), OrderedDict()
            for ent in fds:
                self._fd_drop(ent)

    def __enter__(self) -> BlockCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- content on disk
    def _drop_content(self, key: str, marker: bool = False) -> None:
        """Delete every block and the tree of content KEY (with MARKER, its complete
        marker and its copy too), and forget whatever this process knew of them."""
        with self._lock:
            for k in [k for k in self._lru if k[0] == key]:
                self._index_drop(*k)
            for k in [k for k in self._fds if k[0] == key]:
                self._fd_drop(self._fds.pop(k))
            self._good = {k for k in self._good if k[0] != key}
            self._paged = {k for k in self._paged if k[0] != key}
            self._trees.pop(key, None)
            for k in [k for k in self._recent if k[0] == key]:
                del self._recent[k]
        if marker:
            _unlink(self._complete_path(key))  # first: what remains is never taken as proven
            _unlink(self._file_path(key))
        folder = os.path.dirname(self._block_path(key, 0))
        for name in _listdir(folder):
            if name.isdigit():  # temporaries belong to their writers (stale ones are swept)
                _unlink(os.path.join(folder, name))
        try:
            os.rmdir(folder)
        except OSError:
            pass
        _unlink(self._tree_path(key))

    def _keys_on_disk(self) -> set[str]:
        out: set[str] = set()
        for top in ("blocks", "trees"):
            root = os.path.join(self.directory, top)
            for prefix in _listdir(root):
                out.update(n for n in _listdir(os.path.join(root, prefix)) if not n.startswith("."))
        for top in ("complete", "files"):
            out.update(n for n in _listdir(os.path.join(self.directory, top))
                       if not n.startswith("."))
        with self._lock:
            out.update(k[0] for k in self._lru)
        return out

    # ---- small helpers
    def _note_error(self, message: str | None) -> None:
        if message:
            log.warning("%s", message)
        with self._lock:
            self._stats["errors"] += 1

    def _check_open(self) -> None:
        if self._closed:
            raise CacheError("the block cache is closed")


class ReadAhead:
    """Per open file: detects sequential reads and keeps a growing window fetched ahead.

    The window doubles (1, 2, 4, ... max_window blocks) with each read that continues the
    previous one (same offset as its end, or a few blocks past it: the kernel's read-ahead
    reaches the daemon as several concurrent reads, reordered; a read a few blocks behind
    is such a late one and changes nothing) and resets on a jump. "A few" is REORDER, or
    the window once it is larger. Random reads prefetch nothing.

    DROP_BEHIND (a reader that keeps the bytes in a page cache of its own: the mount's FUSE
    file) releases the page cache of the block files a sequential stream has passed, more
    than REORDER blocks back, in batches (`BlockCache.release_pages`). Streaming a cached
    file then holds one copy of it in memory, not two (measured on 1 GiB: 1.2 GiB of page
    cache after the read instead of 2.1), and the next blocks' read-ahead reuses the pages
    just let go. The caller decides when that is worth its cost (see `fusefs.drop_behind`).
    """

    def __init__(self, cache: BlockCache, ref: FileRef, max_window: int = 32,
                 drop_behind: bool = False) -> None:
        self.cache = cache
        self.ref = ref
        self.max_window = max(1, max_window)
        self.drop_behind = drop_behind
        self.window = 0
        self._lock = threading.Lock()
        self._prev_end: int | None = None
        self._ahead = 0  # blocks before this index were already submitted
        self._behind = 0  # blocks before this index were released (or are not this stream's)
        self._released: range | None = None  # the last batch released (released again next)

    def on_read(self, offset: int, length: int) -> None:
        bs = self.ref.block_size
        end = min(self.ref.size, offset + max(0, length))
        release: range | None = None
        fetch: tuple[int, int] | None = None
        with self._lock:  # one decision per read: reads come from several threads
            prev, here = self._prev_end, offset // bs
            delta = None if prev is None else here - max(0, prev - 1) // bs
            # How far out of order this stream's reads may arrive: REORDER, or once the
            # stream runs, its window (those blocks are fetched or on their way anyway).
            # FUSE serves the kernel's read-ahead on several threads at once: in cold
            # 1 GiB streams, reads arrived 5-6 blocks out of order 5-10 times each, and
            # with REORDER alone each restarted the window from one block (and the
            # drop-behind point); with the window as slack, none did in six runs.
            slack = max(REORDER, self.window)
            if delta is not None and -slack <= delta < 0:
                # A read the kernel issued with its neighbours and that arrived after
                # them: not a jump.
                return
            sequential = delta is not None and (offset == prev or 0 <= delta <= slack)
            if sequential:
                self.window = min(self.max_window, max(1, self.window * 2))
            else:
                if self.window:
                    self.cache.note_jump()
                self.window = 0
                self._ahead = 0
                self._behind = here  # what lies before a jump is not this stream's
                self._released = None
            self._prev_end = end
            if sequential and self.drop_behind:
                release = self._release_due(here)
            if self.window:
                fetch = self._fetch_due(end)
        if release:
            self.cache.release_pages(self.ref, release)
        if fetch:
            # Hints still queued when the stream has released their blocks are dropped:
            # a late WILLNEED would read a block back in behind the reader.
            self.cache.prefetch(self.ref, *fetch,
                                self._not_released if self.drop_behind else None)

    def _release_due(self, here: int) -> range | None:
        """Blocks to release now that a sequential read reached block HERE (lock held):
        a batch of PREFETCH_RUN once more than REORDER blocks back, with the batch before
        it once more. FUSE runs several reads of a stream at once, not in order, and the
        kernel keeps the pages of a block whose read is still under way: the second pass
        lets go of what the first could not."""
        done = here - REORDER - 1
        if done - self._behind < PREFETCH_RUN:
            return None
        start = self._released.start if self._released is not None else self._behind
        self._released = range(self._behind, done)
        self._behind = done
        return range(start, done)

    def _fetch_due(self, end: int) -> tuple[int, int] | None:
        """(first, count) of the blocks to fetch or hint in after a sequential read that
        ended at END, or None (lock held)."""
        bs = self.ref.block_size
        nxt = -(-end // bs)  # the first block after this read
        first = max(nxt, self._ahead)
        last = min(self.ref.blocks, nxt + self.window)
        # Top the window up in batches, not one block per block read: every range
        # request costs a relay round trip, so few large ones beat many 1-block ones.
        batch = min(self.window, PREFETCH_RUN)
        if first >= last or (last - first < batch and first > nxt and last < self.ref.blocks):
            return None
        self._ahead = last
        return first, last - first

    def _not_released(self, index: int) -> bool:
        """For the prefetch pool's queued hints (no lock: one int read, and a hint that
        races a release only reads a block in once more)."""
        return index >= self._behind


def _runs(indices: Sequence[int], limit: int) -> Iterator[tuple[int, int]]:
    """(first, count) of runs of consecutive indices, each at most LIMIT long."""
    start = prev = None
    count = 0
    for i in sorted(indices):
        if start is not None and i == prev + 1 and count < limit:  # type: ignore[operator]
            prev = i
            count += 1
            continue
        if start is not None:
            yield start, count
        start = prev = i
        count = 1
    if start is not None:
        yield start, count


def _pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _copy_all(src: int, dst: int, length: int, dst_offset: int) -> None:
    """Copy bytes [0, LENGTH) of SRC to DST at DST_OFFSET, in the kernel when it can."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src, dst, length - done, done, dst_offset + done)
        except OSError:
            n = 0
        if n <= 0:
            data = os.pread(src, length - done, done)
            if not data:
                raise OSError(errno.EIO, f"block file ended after {done} of {length} bytes")
            _pwrite_all(dst, data, dst_offset + done)
            n = len(data)
        done += n


# Reading a block file into the page cache through its read path (`BlockCache._advise`):
# Linux's preadv2 flags and sendfile from a file (not only to a socket).
_CAN_READ_THROUGH = hasattr(os, "RWF_NOWAIT") and hasattr(os, "sendfile") and sys.platform == "linux"


def _in_page_cache(fd: int, length: int, probe: bytearray) -> bool:
    """Whether the last byte of FD's first LENGTH bytes is in the page cache (a block
    file is read whole, so its last page stands for the rest). Never waits for a disk."""
    try:
        return os.preadv(fd, [probe], max(0, length - 1), os.RWF_NOWAIT) == 1
    except OSError:  # EAGAIN: not in memory; EOPNOTSUPP: no RWF_NOWAIT here. Read it through.
        return False


def _read_through_fd(fd: int, length: int, sink: int) -> bool:
    """Read FD's first LENGTH bytes through the page cache into SINK (/dev/null): the
    kernel's ordinary read path and read-ahead, without a copy to user space. Whether it
    read them all."""
    done = 0
    while done < length:
        n = os.sendfile(sink, fd, done, length - done)
        if n <= 0:
            return False
        done += n
    return True


def _fd_cache_size() -> int:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 64
    if soft == resource.RLIM_INFINITY:
        return FD_CACHE
    return max(16, min(FD_CACHE, soft // 4))


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _private_folder(path: str) -> None:
    """Make PATH a folder that only we can enter (0700; an existing one of ours is narrowed
    to that), or raise CacheError when it is not ours or not a folder."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as exc:
        raise CacheError(f"{path}: cannot use as a cache folder: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"{path}: not a folder; cannot use it as a cache folder")
    if st.st_uid != os.geteuid():
        raise CacheError(f"{path}: the cache folder belongs to another user (uid {st.st_uid}); "
                         "use one of your own (--cache-dir)")
    if st.st_mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError as exc:
            raise CacheError(f"{path}: cannot make the cache folder private: "
                             f"{exc.strerror or exc}") from None


def _make_folder(folder: str) -> None:
    """Make FOLDER and any missing parents, each 0700 (os.makedirs gives the mode to the
    last one only)."""
    parent = os.path.dirname(folder)
    if parent != folder and not os.path.isdir(parent):
        _make_folder(parent)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass


def _remove_tree(path: str) -> None:
    """Delete PATH (a file, or a folder and everything in it); errors are ignored."""
    if os.path.isdir(path) and not os.path.islink(path):
        import shutil  # only for a cache of the old layout: not loaded at start-up

        shutil.rmtree(path, ignore_errors=True)
    else:
        _unlink(path)
