"""One read pass over a shared file: everything the share's index keeps about it.

`digest_file` reads a file once and returns (`ShareDigest`) its SHA-1, fcs, the leaves
and root of the 1 MiB tree (what `prv.digest_file` gives, the tree of default pointers
and of `/tree/`), and for the 64 KiB tree of `prv create --block-size 65536` ("v2")
pointers only what a share keeps (docs/pieces.md, "The group level"): the nodes at
`proof.GROUP_LEVEL` (one 32-byte node per aligned 1 MiB group of 16 pieces, the last
possibly partial) and the root. From those and the data a share makes the proof of any
piece range (`proof.group_getter`), so it never stores the 16 leaves per MiB.

`stable_digest` is the share's rule around it: a file that changed while it was read
(its stat before and after differ, or its size is not what was read) is read again a
few times, then given up on, never recorded.

Each chunk is hashed three ways at once: SHA-1 in a worker thread, the 1 MiB leaves in
this one, the 64 KiB leaves and their group nodes in a second worker (all three release
the GIL), so the pass costs about the slowest of them, not their sum; docs/pieces.md
has the measured cost. What it does not do: no SQLite, no decisions about which files
to hash (`kbfs.index`), no serving.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kbfs import proof, tree
from kbfs.prv import FCS_HEAD_BYTES, READ_CHUNK, PointerError

HASH_ATTEMPTS = 3  # a file still changing after this many reads waits for the next scan
PIECE = proof.PIECE_SIZE
GROUP = PIECE << proof.GROUP_LEVEL  # 1 MiB: the bytes of one group of 16 pieces
assert GROUP == tree.BLOCK_SIZE  # a read chunk is whole groups and whole 1 MiB blocks at once


@dataclass(frozen=True)
class ShareDigest:
    """What one pass over a file yields for the share's index.

    `leaves`, `root`: the 1 MiB tree. `groups`: the 64 KiB tree's level-4 nodes, in
    order; `root64`: that tree's root (what a v2 pointer of this file names).
    """

    sha1: str
    size: int
    fcs: str
    leaves: list[bytes]
    root: str
    groups: list[bytes]
    root64: str


def _group_nodes(chunk: memoryview) -> list[bytes]:
    """The level-4 nodes of the 64 KiB tree over CHUNK (whole groups, but the file's last)."""
    out = []
    for g in range(0, len(chunk), GROUP):
        part = chunk[g : g + GROUP]
        leaves = [tree.leaf_hash(part[i : i + PIECE]) for i in range(0, len(part), PIECE)]
        out.append(proof.nodes_of(leaves, proof.GROUP_LEVEL)[0])
    return out


def root64_of(groups: list[bytes], size: int) -> str:
    """The root of the 64 KiB tree of a file of SIZE bytes whose level-4 nodes are GROUPS
    (VerificationError when their count does not fit SIZE)."""
    shape = proof.Shape(size, PIECE)
    return proof.root_of(shape, proof.levels_from(groups, shape, proof.GROUP_LEVEL)[-1][0])


def digest_file(path: str | os.PathLike[str],
                progress: Callable[[int], None] | None = None) -> ShareDigest:
    """Read PATH once; see the module docstring. PROGRESS gets each chunk's length.

    Raises OSError, or PointerError when the file grew or gave a short read mid-way.
    """
    sha1 = hashlib.sha1()
    leaves: list[bytes] = []
    groups: list[bytes] = []
    head = b""
    size = 0
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(2) as pool:
        # As prv.digest_file: a small buffer for a small file (zeroing 16 MiB per small
        # file was ~50x slower), one byte more than the size to notice growth, else
        # whole 1 MiB blocks so reads stay aligned.
        want = os.fstat(f.fileno()).st_size + 1
        if want >= tree.BLOCK_SIZE:
            want = min(READ_CHUNK, -(-want // tree.BLOCK_SIZE) * tree.BLOCK_SIZE)
        buf = bytearray(want)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)  # type: ignore[attr-defined]
            if not n:
                break
            chunk = view[:n]
            if size < FCS_HEAD_BYTES:
                head += bytes(chunk[: FCS_HEAD_BYTES - size])
            # Threads pay off only for large chunks (starting a job costs about as much
            # as hashing 100 KB); small ones are hashed inline.
            if n >= tree.BLOCK_SIZE:
                job_sha = pool.submit(sha1.update, chunk)
                job_groups = pool.submit(_group_nodes, chunk)
            else:
                sha1.update(chunk)
                groups.extend(_group_nodes(chunk))
            leaves.extend(tree.leaf_hash(chunk[i : i + tree.BLOCK_SIZE])
                          for i in range(0, n, tree.BLOCK_SIZE))
            if n >= tree.BLOCK_SIZE:
                job_sha.result()
                groups.extend(job_groups.result())
            size += n
            if progress is not None:
                progress(n)
            if n % tree.BLOCK_SIZE:
                # A short read before EOF would misalign the blocks; finish with plain reads.
                if f.read():
                    raise PointerError(f"{os.fspath(path)}: file grew or returned a short read "
                                       "while hashing")
                break
    if not leaves:  # an empty file: one empty block, one empty piece
        leaves.append(tree.leaf_hash(b""))
        groups.append(tree.leaf_hash(b""))
    fcs = "head1000-" + hashlib.sha1(head).hexdigest()
    return ShareDigest(sha1.hexdigest(), size, fcs, leaves, tree.root_from_leaves(leaves, size),
                       groups, root64_of(groups, size))


def stable_digest(path: str, progress: Callable[[int], None] | None = None
                  ) -> tuple[ShareDigest | None, os.stat_result | None, int, str]:
    """(digest, the stat it belongs to, bytes read, why not) for a file that held still.

    The file is read up to HASH_ATTEMPTS times; a read counts only when the file's stat
    before and after it are equal and its size is what was read. Otherwise (None, None,
    bytes read, the reason).
    """
    nbytes = 0
    why = ""
    for _ in range(HASH_ATTEMPTS):
        try:
            before = os.stat(path)
            if not stat.S_ISREG(before.st_mode):
                return None, None, nbytes, "no longer a regular file"
            digest = digest_file(path, progress)
            after = os.stat(path)
        except (OSError, PointerError) as exc:
            why = str(exc)
            continue
        nbytes += digest.size
        if (_key(before) != _key(after)) or digest.size != before.st_size:
            why = "changed while being hashed"
            continue
        return digest, before, nbytes, ""
    return None, None, nbytes, why


def _key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
