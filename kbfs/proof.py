"""Range proofs over the blake3-merkle-1 block tree: verify some pieces without the leaf list.

`kbfs.tree` checks a block against the full list of leaves. This module lets a reader check
the pieces [a, b) of a file against the pointer's root with O(log n) tree nodes instead:
a *proof*. It is the same tree (docs/hash-tree.md), with any block size (64 KiB pieces for
new pointers, 1 MiB for the old ones). Layouts and the serving design: docs/pieces.md.

What it does:

- `Shape`: tree arithmetic without any data: leaves, levels, nodes per level, which leaves a
  node covers, the lowest node covering a leaf range, and the byte offset of a node in an
  *outboard* (levels from a lowest one up to the top, level by level, 32 bytes per node).
- `level_up`, `nodes_of`, `levels_from`, `outboard`, `root_of`: build levels from a list of
  leaves or of group nodes (a share keeps only levels >= GROUP_LEVEL).
- `proof_nodes`, `make_proof`: the canonical minimal proof of a piece range, from any source
  of nodes (`outboard_getter`, `group_getter` re-deriving a group's low levels from its data).
- `verify_range`, `verify_range_nodes`, `verify_below`: check pieces and a proof against the
  root (or against a node verified earlier, for a shorter second proof).

What it does not do: no I/O (no files, no sockets, no HTTP headers), no caching policy, and no
trust decisions beyond "these bytes match this root". Positions are piece indices; cutting a
byte range out of verified pieces is the caller's job.

Node names: (level, index); level 0 holds the leaves; level L holds ceil(n / 2^L) nodes, and
node (L, j) covers leaves [j * 2^L, min((j + 1) * 2^L, n)). A node with one child (the odd last
one of a level) equals that child. Levels above the top are defined the same way: one node,
equal to the top. All arithmetic is on Python ints, so shapes of any size cost nothing.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from blake3 import blake3

from kbfs import tree
from kbfs.errors import VerificationError

HASH_BYTES = 32
PIECE_SIZE = 1 << 16
"""The piece (leaf) size of new pointers: 64 KiB."""
GROUP_LEVEL = 4
"""The level a share keeps: with 64 KiB pieces, one node per aligned 1 MiB group of 16 pieces."""

Node = tuple[int, int]
"""A tree node named (level, index)."""
GetNode = Callable[[int, int], bytes]
"""A source of node hashes: get_node(level, index) -> 32 bytes."""

Data = bytes | bytearray | memoryview

_NODE, _ROOT = b"\x01", b"\x02"


@dataclass(frozen=True)
class Shape:
    """The shape of the tree of a file of SIZE bytes cut into BLOCK_SIZE pieces (no data)."""

    size: int
    block_size: int = tree.BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError("size must be non-negative")
        if self.block_size < 1 or self.block_size >= 1 << 32:
            raise ValueError("block size must be in [1, 2^32)")
        if self.size >= 1 << 64:
            raise ValueError("size must fit in 64 bits")

    @property
    def leaves(self) -> int:
        """n: the number of pieces (an empty file has one empty piece)."""
        return tree.block_count(self.size, self.block_size)

    @property
    def height(self) -> int:
        """The level of the top node: ceil(log2(n)); 0 for a one-piece file."""
        return (self.leaves - 1).bit_length()

    @property
    def levels(self) -> int:
        """Number of levels from the leaves to the top, both included."""
        return self.height + 1

    def count(self, level: int) -> int:
        """Nodes at LEVEL: ceil(n / 2^level) (1 at and above the top)."""
        if level < 0:
            raise ValueError(f"level {level} is negative")
        return (self.leaves + (1 << level) - 1) >> level

    def _check(self, level: int, index: int) -> None:
        if not 0 <= index < self.count(level):
            raise ValueError(f"node ({level}, {index}) is not in a tree of {self.leaves} leaves")

    def span(self, level: int, index: int) -> tuple[int, int]:
        """The leaves [lo, hi) that node (LEVEL, INDEX) covers."""
        self._check(level, index)
        return index << level, min((index + 1) << level, self.leaves)

    def piece_span(self, index: int) -> tuple[int, int]:
        """Byte offsets [start, end) of piece INDEX."""
        self._check(0, index)
        return tree.block_span(index, self.size, self.block_size)

    def byte_span(self, a: int, b: int) -> tuple[int, int]:
        """Byte offsets [start, end) of the pieces [a, b); the data of a proof covers exactly these."""
        self._check_range(a, b)
        return a * self.block_size, min(b * self.block_size, self.size)

    def pieces_of_bytes(self, start: int, end: int) -> tuple[int, int]:
        """The pieces [a, b) holding the bytes [start, end) (one piece for an empty range)."""
        if not 0 <= start <= end <= self.size:
            raise ValueError(f"bytes [{start}, {end}) are not in a file of {self.size}")
        a = min(start // self.block_size, self.leaves - 1)
        b = max(a + 1, -(-end // self.block_size))
        return a, b

    def two_children(self, level: int, index: int) -> bool:
        """True when node (LEVEL, INDEX) is a hash of two children (False: carried, or a leaf)."""
        self._check(level, index)
        return level > 0 and 2 * index + 1 < self.count(level - 1)

    def children(self, level: int, index: int) -> list[Node]:
        """The children of a node: two, one (it is carried up unchanged), or none for a leaf."""
        if level == 0:
            self._check(level, index)
            return []
        if self.two_children(level, index):
            return [(level - 1, 2 * index), (level - 1, 2 * index + 1)]
        return [(level - 1, 2 * index)]

    def covering(self, a: int, b: int) -> Node:
        """The lowest node whose leaves include [a, b)."""
        self._check_range(a, b)
        level = (a ^ (b - 1)).bit_length()
        return level, a >> level

    def exact(self, a: int, b: int) -> Node | None:
        """The lowest node covering exactly the leaves [a, b), or None."""
        level, index = self.covering(a, b)
        return (level, index) if self.span(level, index) == (a, b) else None

    def _check_range(self, a: int, b: int) -> None:
        if not 0 <= a < b <= self.leaves:
            raise ValueError(f"pieces [{a}, {b}) are not a non-empty range of a tree of {self.leaves}")

    # -- the outboard: levels LOWEST..top, each level's nodes in order, 32 bytes each --

    def outboard_top(self, lowest: int) -> int:
        """The highest level an outboard from LOWEST stores: the top, or LOWEST when above it."""
        return max(lowest, self.height)

    def outboard_size(self, lowest: int) -> int:
        """Bytes of the outboard holding levels LOWEST..top."""
        return self._before(self.outboard_top(lowest) + 1, lowest) * HASH_BYTES

    def _before(self, level: int, lowest: int) -> int:
        return sum(self.count(k) for k in range(lowest, level))

    def offset(self, level: int, index: int, lowest: int) -> int:
        """Byte offset of node (LEVEL, INDEX) in the outboard that starts at level LOWEST."""
        self._check(level, index)
        if not lowest <= level <= self.outboard_top(lowest):
            raise ValueError(f"level {level} is not in an outboard of levels {lowest}..{self.outboard_top(lowest)}")
        return (self._before(level, lowest) + index) * HASH_BYTES


# -- building levels -------------------------------------------------------------------------


def node_hash(left: bytes, right: bytes) -> bytes:
    """The parent of two nodes: BLAKE3(0x01 || left || right)."""
    return blake3(_NODE + left + right).digest()


def level_up(nodes: Sequence[bytes]) -> list[bytes]:
    """The next level: pairs hashed left to right, an odd last node carried up unchanged.

    Exact for a whole level, or for an aligned slice of one (starting at an index that is a
    multiple of 2^k for k steps up, and ending at a multiple of 2^k or at the level's end).
    """
    if not nodes:
        raise ValueError("a level has at least one node")
    up = [node_hash(nodes[i], nodes[i + 1]) for i in range(0, len(nodes) - 1, 2)]
    if len(nodes) % 2:
        up.append(nodes[-1])
    return up


def nodes_of(nodes: Sequence[bytes], up: int) -> list[bytes]:
    """The nodes UP levels above NODES (a whole level or an aligned slice, see `level_up`).

    `nodes_of(leaves_of_one_group, GROUP_LEVEL)` is that group's node; `nodes_of(leaves, 4)`
    over the whole file is the list of group nodes.
    """
    level = list(nodes)
    for _ in range(up):
        level = level_up(level)
    return level


def levels_from(nodes: Sequence[bytes], shape: Shape, level: int = 0) -> list[list[bytes]]:
    """All levels from LEVEL (whose nodes are NODES) up to `shape.outboard_top(level)`."""
    if len(nodes) != shape.count(level):
        raise VerificationError(
            f"{len(nodes)} nodes at level {level}; a tree of {shape.leaves} has {shape.count(level)}"
        )
    if any(len(x) != HASH_BYTES for x in nodes):
        raise VerificationError("a node is not 32 bytes")
    out = [list(nodes)]
    while len(out) < shape.outboard_top(level) - level + 1:
        out.append(level_up(out[-1]))
    return out


def root_of(shape: Shape, top: bytes) -> str:
    """The hex root of a file of this shape whose top node is TOP."""
    return blake3(_ROOT + struct.pack("<QI", shape.size, shape.block_size) + top).hexdigest()


def outboard(nodes: Sequence[bytes], shape: Shape, lowest_level: int = 0) -> bytes:
    """The outboard of levels LOWEST_LEVEL..top, built from the nodes of LOWEST_LEVEL.

    With lowest_level 0 its first 32*n bytes are the leaf list (`GET /tree/{sha1}`).
    """
    return b"".join(b"".join(level) for level in levels_from(nodes, shape, lowest_level))


def outboard_getter(ob: Data, shape: Shape, lowest_level: int = 0) -> GetNode:
    """A `get_node` reading an in-memory outboard (levels LOWEST_LEVEL..top)."""
    if len(ob) != shape.outboard_size(lowest_level):
        raise VerificationError(f"outboard of {len(ob)} bytes; expected {shape.outboard_size(lowest_level)}")
    view = memoryview(ob)

    def get_node(level: int, index: int) -> bytes:
        at = shape.offset(level, index, lowest_level)
        return bytes(view[at : at + HASH_BYTES])

    return get_node


def group_getter(shape: Shape, group_level: int, upper: GetNode, read_group: Callable[[int], Data]) -> GetNode:
    """A `get_node` for a store that keeps only levels >= GROUP_LEVEL (e.g. a share's outboard).

    Nodes at GROUP_LEVEL and above come from UPPER. A lower node is re-derived from the data of
    its group (`read_group(g)` returns the bytes of pieces [g*2^group_level, ...) up to the
    group's end), and the group is checked against its stored node first: a share never
    serves a proof over data that changed under it (VerificationError). The last group read is
    kept, since a proof asks for several nodes of the same group.
    """
    memo: dict[int, list[list[bytes]]] = {}

    def get_node(level: int, index: int) -> bytes:
        if level >= group_level:
            return upper(level, index)
        shape.span(level, index)  # range check
        g = index >> (group_level - level)
        if g not in memo:
            memo.clear()
            lo, hi = shape.span(group_level, g)
            data = memoryview(read_group(g))
            start = lo * shape.block_size
            expect = min(hi * shape.block_size, shape.size) - start
            if len(data) != expect:
                raise VerificationError(f"group {g} has {len(data)} bytes; expected {expect}")
            bs = shape.block_size
            leaves = [tree.leaf_hash(data[i * bs : (i + 1) * bs]) for i in range(hi - lo)]
            levels = [leaves]
            for _ in range(group_level):
                levels.append(level_up(levels[-1]))
            if levels[-1][0] != upper(group_level, g):
                raise VerificationError(f"group {g} does not match its stored node")
            memo[g] = levels
        return memo[g][level][index - (g << (group_level - level))]

    return get_node


# -- proofs ----------------------------------------------------------------------------------


def proof_nodes(shape: Shape, a: int, b: int, anchor: Node | None = None) -> list[Node]:
    """The canonical proof of pieces [a, b): the nodes to send, in order.

    Walking down from ANCHOR (default: the top), a node inside [a, b) is computed from the
    data, a node outside it is part of the proof, and a node straddling an edge is split into
    its children. The result: the minimal set of nodes disjoint from [a, b) whose subtrees and
    [a, b) together cover the anchor's leaves, in left-to-right order, each named at the
    highest level where it is a child of a two-child node. At most two per level.
    """
    shape._check_range(a, b)
    start = _anchor(shape, a, b, anchor)
    out: list[Node] = []

    def walk(level: int, index: int) -> None:
        lo, hi = shape.span(level, index)
        if hi <= a or lo >= b:
            out.append((level, index))
        elif not (a <= lo and hi <= b):
            for child in shape.children(level, index):
                walk(*child)

    walk(*start)
    return out


def _anchor(shape: Shape, a: int, b: int, anchor: Node | None) -> Node:
    if anchor is None:
        return shape.height, 0
    level, index = anchor
    lo, hi = shape.span(level, index)
    if not (lo <= a and b <= hi):
        raise ValueError(f"node {anchor} does not cover pieces [{a}, {b})")
    return anchor


def make_proof(get_node: GetNode, shape: Shape, a: int, b: int, anchor: Node | None = None) -> bytes:
    """The proof of pieces [a, b): the 32-byte hashes of `proof_nodes`, concatenated."""
    parts = []
    for level, index in proof_nodes(shape, a, b, anchor):
        h = bytes(get_node(level, index))
        if len(h) != HASH_BYTES:
            raise VerificationError(f"node ({level}, {index}) is {len(h)} bytes, not 32")
        parts.append(h)
    return b"".join(parts)


def proof_ranges(shape: Shape, nodes: Sequence[Node], lowest_level: int) -> list[tuple[int, int]]:
    """(offset, length) byte ranges of an outboard from LOWEST_LEVEL holding NODES, merged.

    Every node must be at LOWEST_LEVEL or above. Siblings are adjacent, so a range-reading
    reader needs at most about one range per level.
    """
    offsets = sorted(shape.offset(level, index, lowest_level) for level, index in nodes)
    out: list[tuple[int, int]] = []
    for at in offsets:
        if out and out[-1][0] + out[-1][1] == at:
            out[-1] = (out[-1][0], out[-1][1] + HASH_BYTES)
        else:
            out.append((at, HASH_BYTES))
    return out


def encode_header(proof: bytes) -> str:
    """A proof as a header value (base64, no newlines): about 2 KiB for a 1 TiB file."""
    return base64.b64encode(proof).decode("ascii")


def decode_header(value: str) -> bytes:
    """The proof in a header value; VerificationError when it is not clean base64."""
    try:
        return base64.b64decode(value.strip().encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as e:
        raise VerificationError(f"malformed proof header: {e}") from None


# -- verification ----------------------------------------------------------------------------


def verify_range(root: str | bytes, size: int, block_size: int, a: int, b: int, data: Data, proof: Data) -> None:
    """Raise VerificationError unless DATA is pieces [a, b) of the file whose pointer has ROOT.

    DATA must be exactly the bytes of those pieces (`Shape.byte_span`), PROOF exactly the
    hashes of `proof_nodes(shape, a, b)`. Anything else (a bad range, size or block size, a
    wrong length, a tampered byte or node) is a VerificationError.
    """
    verify_range_nodes(root, size, block_size, a, b, data, proof)


def verify_range_nodes(
    root: str | bytes, size: int, block_size: int, a: int, b: int, data: Data, proof: Data
) -> dict[Node, bytes]:
    """As `verify_range`, returning every node it verified (for shorter proofs later).

    The result holds the leaves of [a, b), the nodes above them, the proof nodes and every
    node on the way to the top; all are known to hash up to ROOT. Keep it (or its upper part),
    and a later range can be checked with `verify_below` against a node it holds.
    """
    shape = _shape(size, block_size)
    want = _root_bytes(root)
    out = _verify(shape, a, b, data, proof, None)
    top = out[(shape.height, 0)]
    if blake3(_ROOT + struct.pack("<QI", shape.size, shape.block_size) + top).digest() != want:
        raise VerificationError(f"pieces [{a}, {b}) and their proof do not hash up to the root")
    return out


def verify_below(
    shape: Shape, anchor: Node, anchor_hash: bytes, a: int, b: int, data: Data, proof: Data
) -> dict[Node, bytes]:
    """Check pieces [a, b) against ANCHOR, a node verified before (e.g. by `verify_range_nodes`).

    PROOF is `make_proof(..., anchor=ANCHOR)`: only the nodes below the anchor. Returns the
    nodes it verified, as `verify_range_nodes` does.
    """
    out = _verify(shape, a, b, data, proof, anchor)
    if out[anchor] != anchor_hash:
        raise VerificationError(f"pieces [{a}, {b}) and their proof do not hash up to node {anchor}")
    return out


def lowest_known(known: Mapping[Node, bytes], shape: Shape, a: int, b: int) -> Node | None:
    """The lowest node in KNOWN covering pieces [a, b), to use as `anchor` (None: use the root)."""
    level, index = shape.covering(a, b)
    for up in range(level, shape.height + 1):
        node = (up, index >> (up - level))
        if node in known:
            return node
    return None


def _shape(size: int, block_size: int) -> Shape:
    try:
        return Shape(size, block_size)
    except (ValueError, TypeError) as e:
        raise VerificationError(f"no tree for size {size}, block size {block_size}: {e}") from None


def _root_bytes(root: str | bytes) -> bytes:
    if isinstance(root, bytes) and len(root) == HASH_BYTES:
        return root
    try:
        raw = bytes.fromhex(root.decode("ascii") if isinstance(root, bytes) else root)
    except (ValueError, UnicodeDecodeError):
        raw = b""
    if len(raw) != HASH_BYTES:
        raise VerificationError("a root is 32 bytes (64 hex digits)")
    return raw


def _verify(shape: Shape, a: int, b: int, data: Data, proof: Data, anchor: Node | None) -> dict[Node, bytes]:
    try:
        nodes = proof_nodes(shape, a, b, anchor)
        start, end = shape.byte_span(a, b)
    except (ValueError, TypeError) as e:
        raise VerificationError(f"cannot verify pieces [{a}, {b}): {e}") from None
    if len(data) != end - start:
        raise VerificationError(f"pieces [{a}, {b}) are {end - start} bytes; got {len(data)}")
    if len(proof) != len(nodes) * HASH_BYTES:
        raise VerificationError(f"proof of pieces [{a}, {b}) is {len(nodes) * HASH_BYTES} bytes; got {len(proof)}")
    view, pv = memoryview(data), memoryview(proof)
    bs = shape.block_size
    leaves = [tree.leaf_hash(view[i * bs : (i + 1) * bs]) for i in range(b - a)]
    out: dict[Node, bytes] = {}
    given = {node: bytes(pv[k * HASH_BYTES : (k + 1) * HASH_BYTES]) for k, node in enumerate(nodes)}

    def covered(level: int, index: int) -> bytes:
        # An aligned slice of the range's leaves, built up level by level.
        lo, hi = shape.span(level, index)
        row = leaves[lo - a : hi - a]
        for k in range(level + 1):
            if k:
                row = level_up(row)
            first = lo >> k
            for i, h in enumerate(row):
                out[(k, first + i)] = h
        return row[0]

    def value(level: int, index: int) -> bytes:
        lo, hi = shape.span(level, index)
        if hi <= a or lo >= b:
            h = given[(level, index)]
        elif a <= lo and hi <= b:
            return covered(level, index)
        else:
            kids = [value(*child) for child in shape.children(level, index)]
            h = node_hash(kids[0], kids[1]) if len(kids) == 2 else kids[0]
        out[(level, index)] = h
        return h

    value(*_anchor(shape, a, b, anchor))
    return out
