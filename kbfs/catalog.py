"""The piece store's catalogue: which pieces of which content are durably on disk (SQLite).

One SQLite file (`DIR/catalog.sqlite`, WAL, synchronous=FULL, 0600) shared by every
process using the store folder; each call is one short transaction (BEGIN IMMEDIATE for
writes, a busy timeout for the others), and one Catalog is safe to share between threads.

    contents(key, size, piece_size, ino, bitmap, used, access)
        bitmap: bit i (byte i>>3, mask 1<<(i&7)) set = piece i is durably in the data file
        ino:    st_ino of the data file the bits describe (see below)
        used:   bytes of the present pieces; access: LRU clock value of the last use
    pins(key, count)         pinned contents are never evicted (a count, kept across restarts)
    nodes(key, name, blob)   stored tree nodes, opaque blobs: hints, never trusted by the store
    meta(name, value)        'clock', the LRU counter

The caller's rule, which this module cannot check: bits are committed (`commit`) only
after the bytes of their pieces were fdatasynced, so a crash or power loss loses bits,
never adds one. This module adds two rules of its own:

- Bits name a file: a row carries the inode number of its data file, and `commit` adds
  bits only where the row still names the inode the caller wrote to (and holds open, so
  that number cannot be reused meanwhile). A content removed or re-created by another
  process in between keeps none of the caller's bits.
- `register(..., reset=True)` (a data file just made, not yet published) clears the bits
  and names the new inode *before* the file gets its name, so a file that reuses an old
  inode number never inherits the old file's bits.

What it does not do: no file I/O besides SQLite's own, no verification, no policy (which
contents to evict is the caller's choice within `evict`'s LRU order).
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS contents (
    key TEXT PRIMARY KEY, size INTEGER NOT NULL, piece_size INTEGER NOT NULL,
    ino INTEGER NOT NULL, bitmap BLOB NOT NULL, used INTEGER NOT NULL, access INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS contents_access ON contents(access);
CREATE TABLE IF NOT EXISTS pins (key TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (key TEXT NOT NULL, name TEXT NOT NULL, blob BLOB NOT NULL,
    PRIMARY KEY (key, name));
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


# ---- bitmaps (bytes; bit i = byte i >> 3, mask 1 << (i & 7))

def piece_count(size: int, piece_size: int) -> int:
    """Pieces of a content of SIZE bytes (an empty content has none)."""
    return (size + piece_size - 1) // piece_size


def empty_bitmap(count: int) -> bytearray:
    return bytearray((count + 7) // 8)


def has(bitmap: bytes | bytearray, index: int) -> bool:
    byte = index >> 3
    return byte < len(bitmap) and bool(bitmap[byte] & (1 << (index & 7)))


def set_bits(bitmap: bytearray, indices: Iterable[int]) -> None:
    for i in indices:
        bitmap[i >> 3] |= 1 << (i & 7)


def merge(into: bytearray, other: bytes | bytearray) -> None:
    """OR the bits of OTHER into INTO (same length; extra bytes of OTHER are ignored)."""
    n = min(len(into), len(other))
    merged = int.from_bytes(into[:n], "little") | int.from_bytes(other[:n], "little")
    into[:n] = merged.to_bytes(n, "little")


def popcount(bitmap: bytes | bytearray) -> int:
    return int.from_bytes(bitmap, "little").bit_count()


def missing(bitmap: bytes | bytearray, first: int, last: int) -> list[int]:
    """Indices in [FIRST, LAST] whose bit is clear."""
    return [i for i in range(first, last + 1) if not has(bitmap, i)]


def ranges(bitmap: bytes | bytearray, count: int) -> list[tuple[int, int]]:
    """The present pieces as inclusive (first, last) runs."""
    runs: list[tuple[int, int]] = []
    start = -1
    for i in range(count):
        if has(bitmap, i):
            if start < 0:
                start = i
        elif start >= 0:
            runs.append((start, i - 1))
            start = -1
    if start >= 0:
        runs.append((start, count - 1))
    return runs


def used_bytes(bitmap: bytes | bytearray, size: int, piece_size: int) -> int:
    """Bytes of the present pieces (the last piece may be short)."""
    count = piece_count(size, piece_size)
    used = popcount(bitmap) * piece_size
    if count and has(bitmap, count - 1):
        used -= count * piece_size - size
    return used


@dataclass(frozen=True)
class Row:
    key: str
    size: int
    piece_size: int
    ino: int
    bitmap: bytes
    used: int
    access: int


class Catalog:
    """The catalogue at PATH (created 0600 if missing); see the module docstring."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.path = path
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise PermissionError(f"{path}: not a regular file of ours")
        except FileNotFoundError:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            except FileExistsError:
                pass
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        with self._write():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):  # another layout: caches are re-fetchable
                for table in ("contents", "pins", "nodes", "meta"):
                    self._db.execute(f"DROP TABLE IF EXISTS {table}")
            for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('clock', 0)")

    # ---- transactions
    class _Tx:
        def __init__(self, cat: Catalog) -> None:
            self.cat = cat

        def __enter__(self) -> sqlite3.Connection:
            self.cat._lock.acquire()
            try:
                self.cat._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.cat._lock.release()
                raise
            return self.cat._db

        def __exit__(self, kind: object, value: object, tb: object) -> None:
            try:
                self.cat._db.execute("COMMIT" if kind is None else "ROLLBACK")
            finally:
                self.cat._lock.release()

    def _write(self) -> Catalog._Tx:
        return Catalog._Tx(self)

    def _tick(self, db: sqlite3.Connection) -> int:
        db.execute("UPDATE meta SET value = value + 1 WHERE name = 'clock'")
        return int(db.execute("SELECT value FROM meta WHERE name = 'clock'").fetchone()[0])

    # ---- contents
    def register(self, key: str, size: int, piece_size: int, ino: int, reset: bool) -> bytes:
        """Make KEY's row name the data file with inode INO; its committed bitmap. The bits
        are kept only when the row already named INO and RESET is false. A row with
        another size or piece size raises ValueError (a key binds both)."""
        count = piece_count(size, piece_size)
        with self._write() as db:
            row = db.execute("SELECT size, piece_size, ino, bitmap FROM contents WHERE key = ?",
                             (key,)).fetchone()
            if row is not None and (row[0], row[1]) != (size, piece_size):
                raise ValueError(f"content {key}: size/piece size {size}/{piece_size} "
                                 f"differ from the catalogue's {row[0]}/{row[1]}")
            if row is not None and not reset and row[2] == ino:
                return bytes(row[3])
            db.execute("INSERT OR REPLACE INTO contents VALUES (?, ?, ?, ?, ?, 0, ?)",
                       (key, size, piece_size, ino, bytes(empty_bitmap(count)), self._tick(db)))
            return bytes(empty_bitmap(count))

    def row(self, key: str) -> Row | None:
        with self._lock:
            r = self._db.execute("SELECT key, size, piece_size, ino, bitmap, used, access "
                                 "FROM contents WHERE key = ?", (key,)).fetchone()
        return None if r is None else Row(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6])

    def commit(self, bits: Mapping[str, tuple[int, Iterable[int]]], touches: Iterable[str] = ()) -> set[str]:
        """In one transaction: add the pieces of BITS (key -> (inode written to, indices))
        to rows that still name that inode, and mark TOUCHES (and the keys of BITS) used
        now. Returns the keys whose bits were dropped (row gone or naming another file)."""
        dropped: set[str] = set()
        with self._write() as db:
            now = self._tick(db)
            for key, (ino, indices) in bits.items():
                r = db.execute("SELECT size, piece_size, bitmap FROM contents WHERE key = ? AND ino = ?",
                               (key, ino)).fetchone()
                if r is None:
                    dropped.add(key)
                    continue
                bm = bytearray(r[2])
                set_bits(bm, indices)
                db.execute("UPDATE contents SET bitmap = ?, used = ?, access = ? WHERE key = ?",
                           (bytes(bm), used_bytes(bm, r[0], r[1]), now, key))
            for key in set(touches) - set(bits):
                db.execute("UPDATE contents SET access = ? WHERE key = ?", (now, key))
        return dropped

    def evict(self, amount: int, skip: Iterable[str] = ()) -> list[tuple[str, int]]:
        """Remove least recently used rows, never a pinned one or one in SKIP, until their
        used bytes add up to AMOUNT (or none is left): [(key, used)], committed."""
        skipped = set(skip)
        gone: list[tuple[str, int]] = []
        freed = 0
        with self._write() as db:
            cursor = db.execute("SELECT key, used FROM contents WHERE key NOT IN "
                                "(SELECT key FROM pins WHERE count > 0) ORDER BY access")
            for key, used in cursor.fetchall():
                if freed >= amount:
                    break
                if key in skipped:
                    continue
                gone.append((key, used))
                freed += used
            for key, _ in gone:
                db.execute("DELETE FROM contents WHERE key = ?", (key,))
                db.execute("DELETE FROM nodes WHERE key = ?", (key,))
        return gone

    def remove(self, keys: Iterable[str]) -> None:
        """Delete the rows and nodes of KEYS (committed); pins stay."""
        with self._write() as db:
            for key in keys:
                db.execute("DELETE FROM contents WHERE key = ?", (key,))
                db.execute("DELETE FROM nodes WHERE key = ?", (key,))

    def keys(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT key FROM contents")]

    def totals(self) -> tuple[int, int]:
        """(contents, used bytes) over the whole catalogue."""
        with self._lock:
            n, used = self._db.execute("SELECT count(*), coalesce(sum(used), 0) FROM contents").fetchone()
        return int(n), int(used)

    # ---- pins
    def pin(self, key: str, delta: int) -> int:
        """Add DELTA to KEY's pin count (never below 0); the new count."""
        with self._write() as db:
            r = db.execute("SELECT count FROM pins WHERE key = ?", (key,)).fetchone()
            count = max(0, (r[0] if r else 0) + delta)
            if count:
                db.execute("INSERT OR REPLACE INTO pins VALUES (?, ?)", (key, count))
            else:
                db.execute("DELETE FROM pins WHERE key = ?", (key,))
        return count

    def pins(self) -> dict[str, int]:
        with self._lock:
            return {k: c for k, c in self._db.execute("SELECT key, count FROM pins")}

    # ---- tree nodes (hints)
    def put_nodes(self, key: str, name: str, blob: bytes) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO nodes VALUES (?, ?, ?)", (key, name, bytes(blob)))

    def get_nodes(self, key: str, name: str) -> bytes | None:
        with self._lock:
            r = self._db.execute("SELECT blob FROM nodes WHERE key = ? AND name = ?", (key, name)).fetchone()
        return None if r is None else bytes(r[0])

    def clear(self) -> list[str]:
        """Delete every row and node (pins stay); the keys that had rows."""
        with self._write() as db:
            keys = [r[0] for r in db.execute("SELECT key FROM contents")]
            db.execute("DELETE FROM contents")
            db.execute("DELETE FROM nodes")
        return keys

    def close(self) -> None:
        with self._lock:
            self._db.close()
