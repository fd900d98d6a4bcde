"""`kbfs mirror export` / `push`: write content into a static mirror layout.

For each file a SOURCE names (a pointer, a folder of pointers, a .prvdir, sha1://,
kbfs://; folders through `kbfs.bulk.walk_files`) the bytes are read through the normal
verified reader (`Client.open`: a local copy only once its SHA-1 and root matched, else
the cache and the relays, every block checked against the pointer) and written to the
store (`kbfs.mirrorstore`) as `data/..`; while they stream by, `_Hasher` computes their
SHA-1 and the leaves of every tree in `mirrorurl.BLOCK_SIZES` (and the pointer's own), from
which the level-0 outboards (`outboard/{B}/..`, docs/pieces.md) are written after the data.
The SHA-1 and the pointer's root are compared with the pointer's once more at the end; a
mismatch removes the object and fails that file. Last, the index `kbfs-mirror.json` is
merged with what was there (a mirror can be filled by several runs).

Resumable: a file whose data and outboards are all there with the right sizes (for S3 also
the sha1 they were uploaded with) is skipped; a file whose data is there but not its
outboards (a run killed in between) is hashed again from the folder's own copy when the
store is a folder (the outboards are derived from those bytes after they matched the
pointer's SHA-1 and root), else read again through the reader (from the cache, mostly).

Memory: the leaves of one file (64 bytes per 64 KiB piece: 32 MiB per GiB... of leaves per
TiB of file, 512 MiB) are held until its outboards are written. It does not print (the
command line, `kbfs.cli_mirror`, does), serve, or verify a mirror (`kbfs.mirrorverify`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kbfs import bulk, mirrorurl, proof, tree
from kbfs.client import Client, Resolved
from kbfs.errors import KbfsError, VerificationError

log = logging.getLogger(__name__)

READ = 8 << 20  # bytes per read from the verified reader (a multiple of every block size)


@dataclass
class ExportResult:
    files: int = 0
    written: int = 0       # bytes of data written this run
    skipped: int = 0       # files already complete in the store
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


class _Hasher:
    """SHA-1 and the leaves of several block sizes over bytes fed in order."""

    def __init__(self, block_sizes: list[int]) -> None:
        self.sha1 = hashlib.sha1()
        self.sizes = block_sizes
        self.leaves: dict[int, list[bytes]] = {b: [] for b in block_sizes}
        self._tail: dict[int, bytearray] = {b: bytearray() for b in block_sizes}
        self.size = 0

    def feed(self, data: bytes) -> None:
        self.sha1.update(data)
        self.size += len(data)
        view = memoryview(data)
        for bs in self.sizes:
            tail, leaves = self._tail[bs], self.leaves[bs]
            pos = 0
            if tail:
                take = min(bs - len(tail), len(view))
                tail += view[:take]
                pos = take
                if len(tail) == bs:
                    leaves.append(tree.leaf_hash(tail))
                    tail.clear()
            while len(view) - pos >= bs:
                leaves.append(tree.leaf_hash(view[pos: pos + bs]))
                pos += bs
            tail += view[pos:]

    def finish(self) -> None:
        for bs in self.sizes:
            if self._tail[bs] or not self.leaves[bs]:
                self.leaves[bs].append(tree.leaf_hash(bytes(self._tail[bs])))
                self._tail[bs].clear()

    def outboard(self, bs: int) -> bytes:
        return proof.outboard(self.leaves[bs], proof.Shape(self.size, bs), 0)

    def root(self, bs: int) -> str:
        return tree.root_from_leaves(self.leaves[bs], self.size, bs)


def block_sizes(r: Resolved) -> list[int]:
    return list(dict.fromkeys([*mirrorurl.BLOCK_SIZES, r.ref.block_size]))


def outboard_size(size: int, bs: int) -> int:
    return proof.Shape(size, bs).outboard_size(0)


def files_of(c: Client, sources: list[str]) -> Iterator[tuple[str, Resolved]]:
    """(name, resolved) for every file SOURCES name (folders walked)."""
    for source in sources:
        if bulk.is_folder_source(c, source):
            yield from bulk.walk_files(c, source)
        else:
            r = c.resolve(source)
            yield r.name, r


def complete(store: Any, r: Resolved) -> bool:
    """Are R's data and every outboard in STORE, with the right sizes?"""
    sha1, size = r.ref.sha1, r.ref.size
    return store.has(mirrorurl.data_key(sha1), size, sha1) and all(
        store.has(mirrorurl.outboard_key(sha1, bs), outboard_size(size, bs), sha1)
        for bs in block_sizes(r))


def export(c: Client, files: list[tuple[str, Resolved]], store: Any, *, local: bool = True,
           progress: Callable[[int], None] | None = None) -> ExportResult:
    """Write FILES into STORE (see the module docstring); one failure does not stop the rest."""
    t0 = time.monotonic()
    res = ExportResult()
    step = progress or (lambda n: None)
    index = store.read_index() or {"format": mirrorurl.FORMAT, "objects": {}}
    done_sha1: set[str] = set()
    for name, r in files:
        res.files += 1
        sha1 = r.ref.sha1
        if sha1 in done_sha1:
            _note(index, name, r, None)
            step(r.ref.size)
            continue
        try:
            if complete(store, r):
                res.skipped += 1
                roots = None
                step(r.ref.size)
            else:
                roots = _export_one(c, r, store, local, step)
                res.written += r.ref.size
            _note(index, name, r, roots)
            done_sha1.add(sha1)
        except KbfsError as exc:
            res.failed.append(f"{name}: {exc}")
            log.info("export of %s failed: %s", name, exc)
    store.write_index(index)
    res.seconds = time.monotonic() - t0
    return res


def _export_one(c: Client, r: Resolved, store: Any, local: bool,
                step: Callable[[int], None]) -> dict[str, str]:
    sha1, size = r.ref.sha1, r.ref.size
    sizes = block_sizes(r)
    h = _Hasher(sizes)
    data_name = mirrorurl.data_key(sha1)
    own = store.local_path(data_name) if store.has(data_name, size, sha1) else None
    if own is not None:
        # Our own earlier output: hashed here, and used only if it matches the pointer.
        with open(own, "rb") as mine:
            for chunk in iter(lambda: mine.read(READ), b""):
                h.feed(chunk)
                step(len(chunk))
    else:
        with c.open(r, local=local) as f:
            def read(n: int) -> bytes:
                chunk = f.read(min(n, READ))
                h.feed(chunk)
                step(len(chunk))
                return chunk

            if store.has(data_name, size, sha1):
                while read(READ):
                    pass
            else:
                store.put_stream(data_name, read, size, sha1)
    h.finish()
    try:
        if h.size != size or h.sha1.hexdigest() != sha1:
            raise VerificationError(f"the bytes read have SHA-1 {h.sha1.hexdigest()} "
                                    f"({h.size} bytes), the pointer says {sha1} ({size})")
        if r.ref.root is not None and h.root(r.ref.block_size) != r.ref.root:
            raise VerificationError("the bytes read do not hash to the pointer's root")
    except VerificationError:
        store.remove(data_name)
        raise
    roots = {}
    for bs in sizes:
        store.put_bytes(mirrorurl.outboard_key(sha1, bs), h.outboard(bs), sha1)
        roots[str(bs)] = h.root(bs)
    return roots


def _note(index: dict[str, Any], name: str, r: Resolved, roots: dict[str, str] | None) -> None:
    entry = index["objects"].setdefault(r.ref.sha1, {"size": r.ref.size, "roots": {}, "names": []})
    if roots:
        entry["roots"].update(roots)
    elif r.ref.root is not None:
        entry["roots"].setdefault(str(r.ref.block_size), r.ref.root)
    names = entry.setdefault("names", [])
    if name not in names and len(names) < 4:
        names.append(name)
