"""The share-side index: what `kbfs share` serves from.

`ShareIndex` walks a shared folder and keeps, for every regular file, its relative
path, stat tuple (size, mtime_ns, ctime_ns, inode), SHA-1, fcs, block-tree root and
leaves (1 MiB tree), and the level-4 nodes and root of its 64 KiB tree (`groups`,
`root64`: what a share needs to prove 64 KiB pieces, docs/pieces.md) in SQLite
(`STATE_DIR/index.sqlite`, WAL mode, one connection per thread), so it can answer
"which file has this SHA-1", "what are its leaves / group nodes" and "what is in this
folder" from any thread while a scan is still running.

What a scan does:

- walks ROOT_DIR with `os.scandir`, skipping excluded paths (`excluded`: the
  `DEFAULT_EXCLUDES` -- version-control folders, editor temporaries, download part
  files, key folders -- plus the caller's patterns, `kbfs share --exclude`), anything
  that is not a regular file or a folder, the state folder when it lies inside
  ROOT_DIR, and symlinks whose real path leaves ROOT_DIR or is excluded (`public.txt ->
  .git/config`, `-> .ssh/id_rsa` are not shared). Other dotfiles are data (zarr's
  `.zarray`, `.zattrs`) and are shared. A symlink that stays inside to a shared path is
  followed; a link back to one of its own ancestor folders is not;
- skips regular files with more than one hard link (`st_nlink > 1`) unless
  `hard_links=True` (env `KBFS_SHARE_HARD_LINKS=1`): a hard link is the same file as its
  other names, which may lie outside the folder or be excluded, and nothing tells where
  they are. Each skipped link is logged once (per index) at warning level;
- re-hashes (one pass, `filehash.digest_file`) only files whose stat tuple changed
  since the last scan, or whose row lacks the 64 KiB tree (an index written before it
  existed: its table gets the columns, one log line, and each such file is hashed again;
  until then `pieces` has nothing for it, so no proof is served), drops rows of files
  that are gone, and commits in batches so files hashed early in a long first scan are
  served before the scan ends;
- never records a hash for a file that changed while it was being read: such a
  file is hashed again a few times, then skipped with a warning until the next scan.

What it does not do: it does not watch the folder (a caller rescans), serve bytes,
know about relays, or write anything inside ROOT_DIR (the data may be read-only).
A stat match is trusted as "content unchanged", as rsync and git do; `is_current`
lets a server check that before it serves a file.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kbfs import filehash, prv, tree
from kbfs.errors import KbfsError, NotFound

log = logging.getLogger(__name__)

INDEX_FILE = "index.sqlite"
HARD_LINKS_ENV = "KBFS_SHARE_HARD_LINKS"  # "1": share files with several hard links
_LOGGED_MAX = 10000  # paths whose skipping was logged (each once)

# Never shared, whatever the caller adds: fnmatch patterns (case-sensitive), each tried
# on every name of a path and on every leading part of the path (so a folder's pattern
# excludes all below it). Version control holds history and remotes' credentials;
# editors' and kbfs's own temporaries are half-written files; key folders are secrets
# that a shared home folder would otherwise give away.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git", ".hg", ".svn", ".bzr",               # version control
    ".*.swp", ".*.swo", ".*.swx", "*~", ".#*",   # vim, emacs, backups
    ".DS_Store", "._*", ".Trash-*",              # desktop litter
    ".*.kbfs-part", "*.part-????????",           # kbfs download part files
    ".ssh", ".gnupg",                            # keys
)

_COLUMNS = "path, size, mtime_ns, ctime_ns, inode, sha1, fcs, root"
_SELECT = _COLUMNS + ", root64"  # what an IndexedFile is read from
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path     TEXT PRIMARY KEY,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    inode    INTEGER NOT NULL,
    sha1     TEXT NOT NULL,
    fcs      TEXT NOT NULL,
    root     TEXT NOT NULL,
    leaves   BLOB NOT NULL,
    groups   BLOB,
    root64   TEXT
);
CREATE INDEX IF NOT EXISTS files_sha1 ON files (sha1);
"""

# Columns added after the first schema, with their types: an older table gets them (NULL),
# and a row whose `groups` is NULL is hashed again by the next scan.
_ADDED_COLUMNS = (("groups", "BLOB"), ("root64", "TEXT"))

StatKey = tuple[int, int, int, int]  # (size, mtime_ns, ctime_ns, inode)


@dataclass(frozen=True)
class IndexedFile:
    """One indexed file. `path` is relative to the shared folder, '/'-separated. `root`:
    its 1 MiB tree's root; `root64`: its 64 KiB tree's ("" for a row from an index before
    it, until the next scan hashes the file again)."""

    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    sha1: str
    fcs: str
    root: str
    root64: str = ""

    def tree_ref(self) -> prv.TreeRef:
        """The tree a pointer to this file names: 64 KiB pieces when the row has that tree
        (what the share proves), else the 1 MiB tree (read through the leaf list)."""
        if self.root64:
            return prv.TreeRef(self.root64, prv.DEFAULT_BLOCK_SIZE)
        return prv.TreeRef(self.root, tree.BLOCK_SIZE)

    def pointer(self, root_dir: str) -> prv.Pointer:
        """The file's pointer (`tree_ref`); original_path is its absolute path under ROOT_DIR."""
        original = os.path.join(os.path.abspath(root_dir), *self.path.split("/"))
        return prv.Pointer(
            self.sha1, self.size, self.fcs, original, prv.PRV_VERSION, self.tree_ref()
        )

    def stat_key(self) -> StatKey:
        return (self.size, self.mtime_ns, self.ctime_ns, self.inode)


@dataclass(frozen=True)
class ScanStats:
    """What one scan did. `skipped`: files that could not be hashed (kept out of the index)."""

    added: int
    updated: int
    removed: int
    unchanged: int
    hashed_bytes: int
    seconds: float
    skipped: int = 0


class _Connection(sqlite3.Connection):
    """A connection that can be weakly referenced (the base class cannot)."""


def _stat_key(st: os.stat_result) -> StatKey:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _to_sql_int(n: int) -> int:
    # SQLite integers are signed 64-bit; some filesystems hand out inodes >= 2**63.
    return n - (1 << 64) if n >= 1 << 63 else n


def _from_sql_int(n: int) -> int:
    return n + (1 << 64) if n < 0 else n


def _row_to_file(row: tuple[str, int, int, int, int, str, str, str, str | None]) -> IndexedFile:
    path, size, mtime_ns, ctime_ns, inode, sha1, fcs, root, root64 = row
    return IndexedFile(path, size, mtime_ns, ctime_ns, _from_sql_int(inode), sha1, fcs, root,
                       root64 or "")


def _clean_relpath(relpath: str) -> str:
    return "/".join(part for part in relpath.split("/") if part and part != ".")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def excluded(relpath: str, patterns: tuple[str, ...] = DEFAULT_EXCLUDES) -> bool:
    """True when the '/'-separated RELPATH is excluded by one of the fnmatch PATTERNS:
    one matches a name in it, or one of its leading parts (`raw`, `raw/tmp`, ...)."""
    parts = [p for p in relpath.split("/") if p]
    for i, name in enumerate(parts):
        lead = "/".join(parts[: i + 1])
        for pattern in patterns:
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(lead, pattern):
                return True
    return False


def _relative(path: str, folder: str) -> str:
    """PATH (inside FOLDER) relative to FOLDER, '/'-separated."""
    return path[len(folder.rstrip(os.sep)):].strip(os.sep).replace(os.sep, "/")


@dataclass(frozen=True)
class _Candidate:
    relpath: str
    abspath: str
    key: StatKey


class ShareIndex:
    """The SQLite index of one shared folder; safe to use from several threads."""

    def __init__(
        self,
        root_dir: str,
        state_dir: str,
        *,
        commit_seconds: float = 0.5,
        commit_files: int = 500,
        hard_links: bool | None = None,
        exclude: tuple[str, ...] | list[str] = (),
    ) -> None:
        self.root_dir = os.path.realpath(root_dir)
        # What is never indexed (module docstring): the defaults, then the caller's.
        self.excludes = DEFAULT_EXCLUDES + tuple(p.strip("/") for p in exclude if p.strip("/"))
        # Files with several hard links: refused unless asked for (module docstring).
        self.hard_links = (os.environ.get(HARD_LINKS_ENV, "").strip() == "1"
                           if hard_links is None else hard_links)
        self._logged: set[str] = set()
        if not os.path.isdir(self.root_dir):
            raise NotFound(f"{root_dir}: not a folder")
        self.state_dir = os.path.realpath(state_dir)
        os.makedirs(self.state_dir, exist_ok=True)
        self.db_path = os.path.join(self.state_dir, INDEX_FILE)
        # How often a scan makes its progress visible to readers: a commit every
        # COMMIT_SECONDS or COMMIT_FILES recorded files, whichever comes first.
        self.commit_seconds = commit_seconds
        self.commit_files = commit_files
        self._local = threading.local()
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._connections_lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self._closed = False
        try:
            self._db().executescript(_SCHEMA)
            self._add_columns()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise KbfsError(
                f"{self.db_path}: cannot use the index ({exc}); delete it to rebuild it"
            ) from None

    def _add_columns(self) -> None:
        """Give a table made by an older kbfs the columns it lacks (its rows rehash)."""
        db = self._db()
        have = {row[1] for row in db.execute("PRAGMA table_info(files)")}
        missing = [(name, kind) for name, kind in _ADDED_COLUMNS if name not in have]
        if not missing:
            return
        for name, kind in missing:
            db.execute(f"ALTER TABLE files ADD COLUMN {name} {kind}")
        count, _ = self.totals()
        log.warning("%s was written by an older kbfs (no 64 KiB piece tree): its %d files "
                    "are hashed again by this scan; until then they are served without "
                    "piece proofs", self.db_path, count)

    # ------------------------------------------------------------ connections

    def _db(self) -> sqlite3.Connection:
        if self._closed:
            raise KbfsError(f"index of {self.root_dir} is closed")
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: readers never hold a transaction open between calls;
            # the scan opens its own with BEGIN. check_same_thread=False only so close()
            # can close every thread's connection; each is otherwise used by one thread.
            conn = sqlite3.connect(
                self.db_path,
                timeout=60,
                isolation_level=None,
                check_same_thread=False,
                factory=_Connection,
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._connections_lock:
                self._connections.add(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection; the index cannot be used afterwards."""
        self._closed = True
        with self._connections_lock:
            conns = list(self._connections)
            self._connections.clear()
        for conn in conns:
            conn.close()

    def __enter__(self) -> ShareIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ queries

    def lookup_path(self, relpath: str) -> IndexedFile | None:
        """The indexed file at RELPATH ('/'-separated, relative to the folder), if any."""
        row = self._db().execute(
            f"SELECT {_SELECT} FROM files WHERE path = ?", (_clean_relpath(relpath),)
        ).fetchone()
        return _row_to_file(row) if row else None

    def lookup_sha1(self, sha1: str) -> IndexedFile | None:
        """A file with this SHA-1: the first (by path) still current on disk, else the first."""
        rows = self._db().execute(
            f"SELECT {_SELECT} FROM files WHERE sha1 = ? ORDER BY path", (sha1.lower(),)
        ).fetchall()
        files = [_row_to_file(r) for r in rows]
        # Copies of one content are common in data folders; prefer one that has not
        # changed since the scan so a server does not pick a stale copy needlessly.
        for f in files:
            if self.is_current(f):
                return f
        return files[0] if files else None

    def leaves(self, sha1: str) -> bytes:
        """The concatenated 32-byte leaves of the content SHA1; NotFound if unknown."""
        row = self._db().execute(
            "SELECT leaves FROM files WHERE sha1 = ? LIMIT 1", (sha1.lower(),)
        ).fetchone()
        if row is None:
            raise NotFound(f"no indexed file has sha1 {sha1}")
        return bytes(row[0])

    def pieces(self, sha1: str) -> tuple[bytes, str] | None:
        """(level-4 nodes of the 64 KiB tree, concatenated; its root) of the content SHA1,
        or None when no row of it has them yet (an index from before them, not yet rescanned)."""
        row = self._db().execute(
            "SELECT groups, root64 FROM files WHERE sha1 = ? AND groups IS NOT NULL"
            " AND root64 IS NOT NULL LIMIT 1", (sha1.lower(),)
        ).fetchone()
        return (bytes(row[0]), str(row[1])) if row else None

    def list_dir(self, relpath: str) -> tuple[list[str], list[IndexedFile]]:
        """(sorted sub-folder names, files by name) directly inside RELPATH ('' is the top).

        Folders exist here only as prefixes of indexed files, so a folder without
        files does not appear. The walk skips over each sub-folder's rows with one
        range query instead of reading them, so listing the top of a large share
        costs about (files here + sub-folders) rows.
        """
        prefix = _clean_relpath(relpath)
        prefix = prefix + "/" if prefix else ""
        # '0' is the character after '/', so [P, P[:-1]+'0') holds exactly the paths under P
        # in SQLite's binary (UTF-8 byte) order.
        end = prefix[:-1] + "0" if prefix else None
        dirs: list[str] = []
        files: list[IndexedFile] = []
        db = self._db()
        start = prefix
        while True:
            if end is None:
                cur = db.execute(
                    f"SELECT {_SELECT} FROM files WHERE path >= ? ORDER BY path", (start,)
                )
            else:
                cur = db.execute(
                    f"SELECT {_SELECT} FROM files WHERE path >= ? AND path < ? ORDER BY path",
                    (start, end),
                )
            next_start = None
            for row in cur:
                rest = row[0][len(prefix) :]
                name, slash, _ = rest.partition("/")
                if slash:
                    dirs.append(name)
                    next_start = prefix + name + "0"
                    break
                files.append(_row_to_file(row))
            cur.close()
            if next_start is None:
                return sorted(dirs), files
            start = next_start

    def totals(self) -> tuple[int, int]:
        """(number of files, total bytes) in the index."""
        count, total = self._db().execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files"
        ).fetchone()
        return int(count), int(total)

    def excluded(self, relpath: str) -> bool:
        """True when RELPATH ('/'-separated, relative to the folder) is not to be shared."""
        return excluded(relpath, self.excludes)

    def is_current(self, f: IndexedFile) -> bool:
        """True when the file on disk still has the stat tuple recorded with its hash."""
        try:
            st = os.stat(os.path.join(self.root_dir, *f.path.split("/")))
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and _stat_key(st) == f.stat_key()

    # ------------------------------------------------------------ scanning

    def _walk(self) -> Iterator[_Candidate]:
        """Every regular file to index, with the stat tuple of its target."""
        root_st = os.stat(self.root_dir)
        # Each folder carries the ids of its ancestors: a symlinked folder is listed
        # wherever it is linked, but a link back to an ancestor (a loop) is cut.
        # A folder reached through a symlink has another real path than its listed one:
        # its entries are checked by real path too (`alias -> data` must not give away
        # `data/secret` when `data/secret` is excluded), the fourth item says so.
        stack: list[tuple[str, str, frozenset[tuple[int, int]], bool]] = [
            (self.root_dir, "", frozenset({(root_st.st_dev, root_st.st_ino)}), False)
        ]
        while stack:
            folder, rel, ancestors, linked = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                log.warning("cannot list %s: %s", folder, exc.strerror or exc)
                continue
            subdirs: list[tuple[str, str, frozenset[tuple[int, int]], bool]] = []
            for entry in entries:
                try:
                    entry.name.encode("utf-8")
                except UnicodeEncodeError:
                    log.warning("skipping %r: its name is not valid UTF-8", entry.path)
                    continue
                relpath = rel + entry.name
                if excluded(relpath, self.excludes):
                    log.debug("not sharing %s: excluded", entry.path)
                    continue
                try:
                    is_link = entry.is_symlink()
                    if is_link or linked:
                        target = os.path.realpath(entry.path)
                        if not _inside(target, self.root_dir):
                            self._skip(entry.path, "symlink leaves the shared folder")
                            continue
                        if _inside(target, self.state_dir):
                            continue
                        if excluded(_relative(target, self.root_dir), self.excludes):
                            self._skip(entry.path, "symlink to an excluded path")
                            continue
                        st = os.stat(target)
                    else:
                        st = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    log.warning("skipping %s: %s", entry.path, exc.strerror or exc)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    dir_id = (st.st_dev, st.st_ino)
                    if dir_id in ancestors:
                        log.debug("skipping %s: symlink loop", entry.path)
                        continue
                    if _inside(os.path.realpath(entry.path), self.state_dir):
                        continue
                    subdirs.append((entry.path, relpath + "/", ancestors | {dir_id},
                                    linked or is_link))
                elif stat.S_ISREG(st.st_mode):
                    if st.st_nlink > 1 and not self.hard_links:
                        self._skip(entry.path, f"{st.st_nlink} hard links (its other names may "
                                   f"be outside the folder; {HARD_LINKS_ENV}=1 shares them)")
                        continue
                    yield _Candidate(relpath, entry.path, _stat_key(st))
            # Reversed so the stack pops folders in name order (deterministic scans).
            stack.extend(reversed(subdirs))

    def _skip(self, path: str, why: str) -> None:
        """Log once per path (per index) that PATH is not shared, and why."""
        if path in self._logged:
            return
        if len(self._logged) < _LOGGED_MAX:
            self._logged.add(path)
        log.warning("not sharing %s: %s", path, why)

    def scan(
        self,
        progress: Callable[[int], None] | None = None,
        on_total: Callable[[int], None] | None = None,
    ) -> ScanStats:
        """Bring the index up to date with the folder; see the module docstring.

        ON_TOTAL is called once, before any hashing, with the bytes about to be hashed
        (0 when nothing changed); PROGRESS is called with byte counts while hashing.
        Scans are serialised: a second scan started meanwhile waits for the first.
        """
        with self._scan_lock:
            return self._scan(progress, on_total)

    def _scan(
        self,
        progress: Callable[[int], None] | None,
        on_total: Callable[[int], None] | None,
    ) -> ScanStats:
        started = time.monotonic()
        db = self._db()
        # A row without the 64 KiB tree (older index) matches no stat: it is hashed again.
        known: dict[str, StatKey | None] = {
            path: (size, mtime_ns, ctime_ns, _from_sql_int(inode)) if complete else None
            for path, size, mtime_ns, ctime_ns, inode, complete in db.execute(
                "SELECT path, size, mtime_ns, ctime_ns, inode, groups IS NOT NULL FROM files"
            )
        }
        present: set[str] = set()
        todo: list[_Candidate] = []
        unchanged = 0
        for cand in self._walk():
            present.add(cand.relpath)
            if known.get(cand.relpath) == cand.key:
                unchanged += 1
            else:
                todo.append(cand)

        gone = [path for path in known if path not in present]
        if gone:
            # Removals first, in their own commit: a deleted file must stop being
            # offered before the (possibly long) hashing pass starts.
            db.execute("BEGIN")
            db.executemany("DELETE FROM files WHERE path = ?", ((p,) for p in gone))
            db.execute("COMMIT")

        if on_total is not None:
            on_total(sum(c.key[0] for c in todo))

        added = updated = skipped = hashed_bytes = 0
        pending = 0
        last_commit = time.monotonic()
        db.execute("BEGIN")
        try:
            for cand in todo:
                if self._closed:
                    raise KbfsError(f"index of {self.root_dir} closed during a scan")
                recorded, nbytes = self._hash_one(db, cand, progress)
                hashed_bytes += nbytes
                if recorded:
                    if cand.relpath in known:
                        updated += 1
                    else:
                        added += 1
                else:
                    skipped += 1
                pending += 1
                now = time.monotonic()
                if pending >= self.commit_files or now - last_commit >= self.commit_seconds:
                    db.execute("COMMIT")
                    db.execute("BEGIN")
                    pending, last_commit = 0, now
            db.execute("COMMIT")
        except BaseException as exc:
            # Files recorded before the last batch commit stay; the rest is hashed again
            # next time. The connection may already be closed (close() during a scan).
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            if self._closed and isinstance(exc, sqlite3.Error):
                raise KbfsError(f"index of {self.root_dir} closed during a scan") from None
            raise
        return ScanStats(
            added=added,
            updated=updated,
            removed=len(gone),
            unchanged=unchanged,
            hashed_bytes=hashed_bytes,
            seconds=time.monotonic() - started,
            skipped=skipped,
        )

    def _hash_one(
        self,
        db: sqlite3.Connection,
        cand: _Candidate,
        progress: Callable[[int], None] | None,
    ) -> tuple[bool, int]:
        """Hash one file and record it; (recorded, bytes read). Never records a moving file."""
        digest, st, nbytes, why = filehash.stable_digest(cand.abspath, progress)
        if digest is None or st is None:
            log.warning("not indexing %s for now: %s", cand.abspath, why)
            # The old row (if any) describes content that is no longer there.
            db.execute("DELETE FROM files WHERE path = ?", (cand.relpath,))
            return False, nbytes
        key = _stat_key(st)
        db.execute(
            f"INSERT OR REPLACE INTO files ({_COLUMNS}, leaves, groups, root64)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (cand.relpath, key[0], key[1], key[2], _to_sql_int(key[3]), digest.sha1,
             digest.fcs, digest.root, b"".join(digest.leaves), b"".join(digest.groups),
             digest.root64),
        )
        return True, nbytes
