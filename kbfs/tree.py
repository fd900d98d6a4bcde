"""The BLAKE3 block tree ("blake3-merkle-1") that lets any byte range be verified.

A file is cut into blocks of a pointer's block size (the last may be short; an empty
file has one empty block): `DEFAULT_BLOCK_SIZE` (64 KiB pieces) for pointers kbfs writes
now, `BLOCK_SIZE` (1 MiB) for the "v1" tree of older pointers, of the share's stored
leaves, of `/tree/` and of the block cache; any power of two from 4 KiB to 1 GiB is valid.
Each block gives a leaf, leaves are paired into nodes level by level, and the root binds
the top node to the file's size and block size:

    leaf = BLAKE3(0x00 || block)
    node = BLAKE3(0x01 || left || right)     (an odd last node is carried up unchanged)
    root = BLAKE3(0x02 || u64le(size) || u32le(block_size) || top)

This module is pure: it hashes bytes it is given and never opens a file or a
socket. Reading files in one pass lives in `kbfs.prv.digest_file`; `TreeBuilder` folds
leaves into the root as they come, so a pass over a huge file keeps O(log n) hashes, not
its leaf list (16 M leaves for 1 TiB at 64 KiB).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from blake3 import blake3

from kbfs.errors import VerificationError

ALGORITHM = "blake3-merkle-1"
BLOCK_SIZE = 1 << 20
"""The v1 block size (1 MiB): older pointers, the share's leaves, `/tree/`, the block cache.
Functions here default to it; code that means "what new pointers use" names
DEFAULT_BLOCK_SIZE."""
DEFAULT_BLOCK_SIZE = 1 << 16
"""The block size kbfs writes into new pointers: 64 KiB pieces, proved (docs/pieces.md)."""
LEAF_BYTES = 32

_LEAF, _NODE, _ROOT = b"\x00", b"\x01", b"\x02"


def block_count(size: int, block_size: int = BLOCK_SIZE) -> int:
    """Number of blocks of a file of SIZE bytes (an empty file has one empty block)."""
    if size < 0:
        raise ValueError("size must be non-negative")
    return max(1, -(-size // block_size))


def block_span(index: int, size: int, block_size: int = BLOCK_SIZE) -> tuple[int, int]:
    """Byte offsets [start, end) of block INDEX of a file of SIZE bytes."""
    start = index * block_size
    return start, min(start + block_size, size)


def leaf_hash(block: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte leaf of one block."""
    hasher = blake3(_LEAF)
    hasher.update(block)
    return hasher.digest()


def _top_node(leaves: Sequence[bytes]) -> bytes:
    level = list(leaves)
    while len(level) > 1:
        paired = [blake3(_NODE + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


class TreeBuilder:
    """The top node of the tree of leaves added one by one, in O(log n) memory.

    The tree pairs aligned nodes level by level and carries an odd last node up, so the
    leaves seen so far form complete subtrees of decreasing sizes: a stack, where two
    subtrees of one level merge as soon as the second is complete. At the end the stack
    folds from the right (a shorter right part pairs with its complete left neighbour).
    """

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []  # (level, node), levels strictly decreasing
        self.count = 0

    def add(self, leaf: bytes) -> None:
        level, node = 0, leaf
        stack = self._stack
        while stack and stack[-1][0] == level:
            node = blake3(_NODE + stack.pop()[1] + node).digest()
            level += 1
        stack.append((level, node))
        self.count += 1

    def top(self) -> bytes:
        """The top node (ValueError before any leaf)."""
        if not self._stack:
            raise ValueError("no leaves")
        node = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            node = blake3(_NODE + left + node).digest()
        return node

    def root(self, size: int, block_size: int) -> str:
        """The hex root for a file of SIZE bytes (VerificationError when the number of
        leaves added does not fit SIZE at BLOCK_SIZE)."""
        _check_count(self.count, size, block_size)
        return _root_of(size, block_size, self.top())


def _check_count(count: int, size: int, block_size: int) -> None:
    if count != block_count(size, block_size):
        raise VerificationError(
            f"{count} leaves for a file of {size} bytes; expected {block_count(size, block_size)}"
        )


def _root_of(size: int, block_size: int, top: bytes) -> str:
    return blake3(_ROOT + struct.pack("<QI", size, block_size) + top).hexdigest()


def root_from_leaves(leaves: Sequence[bytes], size: int, block_size: int = BLOCK_SIZE) -> str:
    """The lowercase hex root of a file of SIZE bytes whose blocks have these leaves."""
    _check_count(len(leaves), size, block_size)
    return _root_of(size, block_size, _top_node(leaves))


def split_leaves(blob: bytes) -> list[bytes]:
    """Cut a concatenation of 32-byte leaves (as served by `/tree/{sha1}`) into a list."""
    if len(blob) % LEAF_BYTES:
        raise VerificationError(f"tree of {len(blob)} bytes is not a whole number of leaves")
    return [bytes(blob[i : i + LEAF_BYTES]) for i in range(0, len(blob), LEAF_BYTES)]


def verify_leaves(leaves: Sequence[bytes], size: int, root: str, block_size: int = BLOCK_SIZE) -> None:
    """Raise VerificationError unless LEAVES hash up to ROOT for a file of SIZE bytes."""
    actual = root_from_leaves(leaves, size, block_size)
    if actual != root.lower():
        raise VerificationError(f"block tree root {actual} does not match the pointer's {root}")


def block_matches(block: bytes | bytearray | memoryview, leaf: bytes) -> bool:
    """True when BLOCK hashes to LEAF."""
    return leaf_hash(block) == leaf


def verify_block(block: bytes | bytearray | memoryview, leaf: bytes, index: int = 0) -> None:
    """Raise VerificationError unless BLOCK hashes to LEAF."""
    if not block_matches(block, leaf):
        raise VerificationError(f"block {index} does not match its leaf")


def tree_of_bytes(data: bytes, block_size: int = BLOCK_SIZE) -> tuple[list[bytes], str]:
    """Leaves and root of an in-memory byte string (tests, small files)."""
    view = memoryview(data)
    leaves = [
        leaf_hash(view[start:end])
        for start, end in (block_span(i, len(data), block_size) for i in range(block_count(len(data), block_size)))
    ]
    return leaves, root_from_leaves(leaves, len(data), block_size)
