"""One sparse data file per content: the piece store's bytes on disk (no bookkeeping).

Layout under the store folder DIR (folders 0700, files 0600, never through a symlink):

    DIR/data/<key[:2]>/<key>            the content's bytes at their own offsets, sparse

A data file is made at its full size (ftruncate: no block is allocated until a piece is
written), under a temporary name beside its final one (`.<key>.<random>`), and published
with `os.link`, which fails rather than replace a file another process published first.
Pieces are written with pwrite at their offsets and read with pread; `sync` is fdatasync
(the data, and the allocation needed to read it back, are on the disk when it returns).

What this module does NOT do: it knows nothing of which pieces are present or valid (the
catalogue does), verifies nothing, and takes no locks. A byte read from a data file means
something only when the catalogue says its piece is there.

Linux-only calls (fallocate PUNCH_HOLE, copy_file_range, posix_fadvise, fdatasync) go
through `kbfs.osio`, the seam with a portable fallback for each (`punch` frees nothing and
returns False, `copy_range` copies through a buffer, `advise` does nothing, `sync` is fsync);
`KBFS_PORTABLE=1` forces the fallbacks. `LINUX_CALLS` says which way this process went.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import time

from kbfs import osio

log = logging.getLogger(__name__)

# Which way the seam (kbfs.osio) went at import: kept for the callers that ask.
LINUX_CALLS: bool = osio.linux()

MAX_KEY = 100  # a root is 64 hex digits; s1-<40 hex>-<size> at most 64 characters
_KEY_RE = re.compile(rf"[0-9a-z][0-9a-z-]{{2,{MAX_KEY - 1}}}")



def check_key(key: str) -> str:
    """KEY, if it is a valid content key ([0-9a-z-], 3..100 characters, no leading '-');
    else ValueError. Keys become file names: nothing else may reach the file system."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"bad content key {key!r:.120}")
    return key


def data_path(directory: str, key: str) -> str:
    """Where KEY's data file lives under the store folder DIRECTORY."""
    check_key(key)
    return os.path.join(directory, "data", key[:2], key)


def private_folder(path: str) -> None:
    """Make PATH a folder of ours with mode 0700 (created, or narrowed when wider).
    A symlink, a non-folder or a folder owned by another user raises PermissionError."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(errno.EPERM, "not a folder (or a symlink)", path)
    if st.st_uid != os.getuid():
        raise PermissionError(errno.EPERM, "folder owned by another user", path)
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700, follow_symlinks=False)


def _check_fd(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        os.close(fd)
        raise PermissionError(errno.EPERM, "not a regular file of ours", path)


def open_existing(path: str) -> int | None:
    """Open the data file at PATH read-write (O_NOFOLLOW); None if there is none.
    A symlink or a file that is not a regular file of ours raises PermissionError."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PermissionError(errno.EPERM, "symlink in place of a data file", path) from exc
        raise
    _check_fd(fd, path)
    return fd


def create_unpublished(directory: str, key: str, size: int) -> tuple[int, str]:
    """A new sparse file of SIZE bytes under a temporary name in KEY's shard folder:
    (fd, its path). Nothing else sees it until `publish`."""
    path = data_path(directory, key)
    private_folder(os.path.join(directory, "data"))
    private_folder(os.path.dirname(path))
    # os.urandom, not secrets: secrets loads hashlib (OpenSSL), which a cached read never needs
    tmp = os.path.join(os.path.dirname(path), f".{key}.{os.urandom(8).hex()}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        _unlink(tmp)
        raise
    return fd, tmp


def publish(tmp: str, path: str) -> bool:
    """Give the file at TMP its final name PATH unless a file is there already (then False,
    and TMP is gone either way). The folder is fsynced so the name survives a power cut."""
    try:
        os.link(tmp, path, follow_symlinks=False)
        published = True
    except FileExistsError:
        published = False
    finally:
        _unlink(tmp)
    if published:
        sync_folder(os.path.dirname(path))
    return published


def sync_folder(path: str) -> None:
    """fsync the folder PATH (its entries reach the disk)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def identity(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino) of the open file FD."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def file_size(fd: int) -> int:
    return os.fstat(fd).st_size


def write_at(fd: int, offset: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of DATA at OFFSET (pwrite until done)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view = view[n:]
        offset += n


def read_at(fd: int, offset: int, length: int) -> bytes:
    """LENGTH bytes at OFFSET (pread until done); fewer only at the end of the file."""
    first = os.pread(fd, length, offset)
    if len(first) == length or not first:
        return first
    parts = [first]
    got = len(first)
    while got < length:
        part = os.pread(fd, length - got, offset + got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def read_cached(fd: int, offset: int, length: int) -> bytearray | None:
    """LENGTH bytes at OFFSET only if all of them are in the page cache (preadv2 with
    RWF_NOWAIT: never waits for the disk), else None; None too off Linux or with the seam
    off (the caller then reads the waiting way, in a thread)."""
    buf = bytearray(length)
    return buf if length == 0 or osio.read_cached(fd, buf, offset) == length else None


def sync(fd: int) -> None:
    """fdatasync FD (fsync where there is none): what was written to it is durable when
    this returns."""
    osio.datasync(fd)


def punch(fd: int, offset: int, length: int) -> bool:
    """Free the disk blocks of [OFFSET, OFFSET+LENGTH) (they read as zeros after), keeping
    the file's size. False when the seam is off or the file system cannot (nothing freed,
    the bytes stay)."""
    return osio.punch(fd, offset, length)


def copy_range(src: int, dst: int, offset: int, length: int, dst_offset: int) -> int:
    """Copy LENGTH bytes at OFFSET of SRC to DST_OFFSET of DST; bytes copied (fewer only at
    the end of SRC). copy_file_range (in-kernel, maybe reflinked) behind the seam."""
    return osio.copy_range(src, dst, offset, length, dst_offset)


def advise(fd: int, offset: int, length: int, dontneed: bool) -> None:
    """Tell the kernel the range will be read soon (WILLNEED) or not again (DONTNEED).
    A hint only: nothing when the seam is off or the call fails."""
    osio.advise(fd, offset, length, "dontneed" if dontneed else "willneed")


def remove(directory: str, key: str) -> bool:
    """Unlink KEY's data file (open descriptors keep reading the old bytes); True if it was
    there. The caller must have removed the content's catalogue row first."""
    return _unlink(data_path(directory, key))


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def sweep(directory: str, known: set[str], min_age: float) -> int:
    """Unlink files under DIRECTORY/data whose name is not in KNOWN (data files without a
    catalogue row: a crash between an eviction's commit and its unlink; temporary files)
    and older than MIN_AGE seconds; how many."""
    top = os.path.join(directory, "data")
    now = time.time()
    gone = 0
    for shard in _listdir(top):
        folder = os.path.join(top, shard)
        for name in _listdir(folder):
            path = os.path.join(folder, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if name not in known and now - st.st_mtime >= min_age and not stat.S_ISDIR(st.st_mode):
                gone += _unlink(path)
    return gone


LEGACY = ("blocks", "trees", "complete", "files")   # today's cache (kbfs/cache.py) layout
LEGACY_FILES = ("layout", "mark.key")


def discard_legacy(directory: str) -> list[str]:
    """Remove today's cache layout (`blocks/`, `trees/`, `complete/`, `files/`, and its
    `layout` and `mark.key`) from DIRECTORY, with one log line; the names removed. Nothing
    is migrated: caches are re-fetchable. Symlinks are removed, never followed."""
    if not any(os.path.lexists(os.path.join(directory, n)) for n in LEGACY):
        return []
    removed: list[str] = []
    for name in (*LEGACY, *LEGACY_FILES):
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            _unlink(path)
        removed.append(name)
    log.warning("cache %s: removed the old block cache (%s); its contents are fetched again when needed",
                directory, ", ".join(removed))
    return removed
