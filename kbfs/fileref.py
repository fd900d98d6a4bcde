"""What a pointer commits to, as the cache names it: `FileRef` (sha1, size, root, block size).

`FileRef.key` names a content everywhere in the cache (a data file, a catalogue row, stored
nodes): its block tree root when the pointer has one (the root binds the size and the block
size, see `kbfs.tree`), else `s1-<sha1>-<size>` (with `-<block size>` when that is not
1 MiB). Two pointers sharing a SHA-1 but not a root never share a piece: a pointer with a
real file's SHA-1 and a root of its own, read from a fake source, cannot poison what the
real pointer reads. Sources are still asked by SHA-1 (that is how they are found).

Only the value and its checks: no I/O, no verification (layer L0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kbfs import tree

BLOCK_SIZE = tree.BLOCK_SIZE
Buffer = bytes | bytearray | memoryview  # verified bytes as readers hand them on

_ROOT_RE = re.compile(r"[0-9a-f]{64}")
_SHA1_RE = re.compile(r"[0-9a-f]{40}")

__all__ = ["BLOCK_SIZE", "Buffer", "FileRef"]


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
        # The key names files and rows: only hex digits and a size ever get there.
        sha1 = self.sha1.lower() if isinstance(self.sha1, str) else ""
        if (not _SHA1_RE.fullmatch(sha1) or not isinstance(self.size, int) or self.size < 0
                or not isinstance(self.block_size, int) or self.block_size <= 0):
            raise ValueError(f"not a content reference: {self.sha1!r}, {self.size}")
        object.__setattr__(self, "sha1", sha1)
        if self.root is not None:
            root = self.root.lower() if isinstance(self.root, str) else ""
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
        """Blocks (pieces) of this content at its block size (an empty content has one)."""
        return tree.block_count(self.size, self.block_size)
