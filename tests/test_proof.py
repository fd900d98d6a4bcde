"""Range proofs over the block tree (kbfs.proof): vectors, exhaustive small trees, tampering, huge shapes."""

from __future__ import annotations

import functools
import json
import math
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kbfs import proof, tree
from kbfs.errors import VerificationError
from kbfs.proof import Node, Shape

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_PERIOD = bytes((31 * i + 7) % 251 for i in range(251))


def formula_bytes(size: int) -> bytes:
    """The vectors' content: byte i is (31*i+7) mod 251 (period 251)."""
    return (_PERIOD * (size // 251 + 1))[:size]


def random_file(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def full_tree(data: bytes, bs: int) -> tuple[Shape, list[list[bytes]], str]:
    shape = Shape(len(data), bs)
    leaves, root = tree.tree_of_bytes(data, bs)
    return shape, proof.levels_from(leaves, shape, 0), root


def getter(levels: list[list[bytes]]) -> Callable[[int, int], bytes]:
    return lambda level, index: levels[level][index]


def pieces(data: bytes, shape: Shape, a: int, b: int) -> bytes:
    start, end = shape.byte_span(a, b)
    return data[start:end]


def reference_proof(shape: Shape, a: int, b: int) -> list[Node]:
    """The proof by brute force: every node outside [a, b) whose two-child parent meets [a, b)."""
    out = []
    for level in range(shape.height):
        for j in range(shape.count(level)):
            lo, hi = shape.span(level, j)
            if not (hi <= a or lo >= b):
                continue
            plo, phi = shape.span(level + 1, j // 2)
            if plo < b and phi > a and shape.two_children(level + 1, j // 2):
                out.append((level, j))
    return sorted(out, key=lambda node: shape.span(*node)[0])


# -- the fixtures ----------------------------------------------------------------------------


def _vectors_64k(fixtures_dir: Path) -> dict:
    doc = json.loads((fixtures_dir / "tree-vectors-64k.json").read_text())
    assert doc["algorithm"] == tree.ALGORITHM
    assert doc["block_size"] == proof.PIECE_SIZE
    assert len(doc["vectors"]) >= 8
    return doc


def test_vectors_64k(fixtures_dir: Path) -> None:
    doc = _vectors_64k(fixtures_dir)
    bs = doc["block_size"]
    groups_checked = 0
    for v in doc["vectors"]:
        data = formula_bytes(v["size"])
        shape, levels, root = full_tree(data, bs)
        leaves = levels[0]
        assert shape.leaves == v["pieces"] == len(leaves), v["content"]
        assert leaves[0].hex() == v["first_leaf"], v["content"]
        assert leaves[-1].hex() == v["last_leaf"], v["content"]
        assert root == v["root"] == proof.root_of(shape, levels[-1][0]), v["content"]
        if "group_nodes_level4" in v:
            groups = [bytes.fromhex(h) for h in v["group_nodes_level4"]]
            assert proof.nodes_of(leaves, proof.GROUP_LEVEL) == groups, v["content"]
            assert levels[proof.GROUP_LEVEL] == groups and shape.count(proof.GROUP_LEVEL) == len(groups)
            for g, node in enumerate(groups):  # each group from its own pieces alone
                lo, hi = shape.span(proof.GROUP_LEVEL, g)
                assert proof.nodes_of(leaves[lo:hi], proof.GROUP_LEVEL) == [node]
                assert (hi - lo) == min(16, shape.leaves - 16 * g)
            # A share's outboard (levels >= 4) reaches the same root.
            ob = proof.outboard(groups, shape, proof.GROUP_LEVEL)
            assert len(ob) == shape.outboard_size(proof.GROUP_LEVEL)
            assert proof.root_of(shape, ob[-32:]) == v["root"]
            groups_checked += 1
        # Every piece range verifies against the vector's root.
        for a in range(shape.leaves):
            for b in range(a + 1, shape.leaves + 1):
                p = proof.make_proof(getter(levels), shape, a, b)
                proof.verify_range(v["root"], v["size"], bs, a, b, pieces(data, shape, a, b), p)
    assert groups_checked >= 4


def test_vectors_64k_same_content_1mib(fixtures_dir: Path) -> None:
    doc = _vectors_64k(fixtures_dir)
    data = formula_bytes(40 * 65536)
    shape, levels, root = full_tree(data, tree.BLOCK_SIZE)
    assert root == doc["same_40_piece_content_with_1MiB_blocks_root"]
    assert shape.leaves == 3
    for a, b in [(0, 1), (1, 2), (2, 3), (0, 3), (1, 3)]:
        p = proof.make_proof(getter(levels), shape, a, b)
        proof.verify_range(root, len(data), tree.BLOCK_SIZE, a, b, pieces(data, shape, a, b), p)
        with pytest.raises(VerificationError):  # same bytes, claimed as 64 KiB pieces
            proof.verify_range(root, len(data), 65536, a, b, pieces(data, shape, a, b), p)


def test_vectors_1mib(fixtures_dir: Path) -> None:
    doc = json.loads((fixtures_dir / "tree-vectors.json").read_text())
    assert doc["block_size"] == tree.BLOCK_SIZE
    for v in doc["vectors"]:
        data = bytes([v["byte"]]) * v["size"]
        shape, levels, root = full_tree(data, tree.BLOCK_SIZE)
        assert shape.leaves == v["blocks"] and levels[0][0].hex() == v["first_leaf"]
        assert proof.root_of(shape, levels[-1][0]) == v["root"] == root
        ob = proof.outboard(levels[0], shape, 0)
        assert ob[: 32 * shape.leaves] == b"".join(levels[0])  # starts with the /tree/{sha1} leaf list
        get = proof.outboard_getter(ob, shape, 0)
        for a in range(shape.leaves):
            for b in range(a + 1, shape.leaves + 1):
                p = proof.make_proof(get, shape, a, b)
                proof.verify_range(v["root"].upper(), v["size"], tree.BLOCK_SIZE, a, b, pieces(data, shape, a, b), p)


def test_hash_tree_worked_example() -> None:
    """docs/hash-tree.md's three blocks: piece 2's proof is n01 alone."""
    bs = tree.BLOCK_SIZE
    data = b"a" * bs + b"b" * bs + b"c" * 10
    shape, levels, root = full_tree(data, bs)
    assert root == "4ea22132f98975531f711cae5c47b4bd4e8b3cac134971077af36378988cb72a"
    assert proof.proof_nodes(shape, 2, 3) == [(1, 0)]
    assert levels[1][0].hex() == "36bf5e03ea4b2d2a55f44fdbc99c8335a704fab7dec683f6e3b8cc0ec5b780dd"
    assert proof.proof_nodes(shape, 0, 1) == [(0, 1), (1, 1)]
    assert levels[1][1] == levels[0][2]  # carried up unchanged


# -- shape arithmetic ------------------------------------------------------------------------


def test_shape_basics() -> None:
    s = Shape(0, 65536)
    assert (s.leaves, s.height, s.levels, s.count(0), s.count(9)) == (1, 0, 1, 1, 1)
    assert s.byte_span(0, 1) == (0, 0) and s.piece_span(0) == (0, 0)
    s = Shape(17 * 65536 - 3, 65536)
    assert (s.leaves, s.height, s.levels) == (17, 5, 6)
    assert [s.count(k) for k in range(7)] == [17, 9, 5, 3, 2, 1, 1]
    assert s.span(4, 1) == (16, 17) and s.span(1, 8) == (16, 17) and s.span(5, 0) == (0, 17)
    assert s.two_children(4, 0) and not s.two_children(4, 1) and not s.two_children(0, 3)
    assert s.children(3, 2) == [(2, 4)] and s.children(5, 0) == [(4, 0), (4, 1)] and s.children(0, 0) == []
    assert s.covering(3, 4) == (0, 3) and s.covering(2, 4) == (1, 1) and s.covering(3, 5) == (3, 0)
    assert s.covering(0, 17) == (5, 0) and s.covering(16, 17) == (0, 16)
    assert s.exact(0, 16) == (4, 0) and s.exact(1, 3) is None and s.exact(16, 17) == (0, 16)
    assert s.byte_span(16, 17) == (16 * 65536, 17 * 65536 - 3)
    assert s.pieces_of_bytes(65535, 65537) == (0, 2) and s.pieces_of_bytes(0, 0) == (0, 1)
    assert s.pieces_of_bytes(s.size, s.size) == (16, 17)
    assert s.offset(0, 0, 0) == 0 and s.offset(1, 0, 0) == 17 * 32 and s.offset(5, 0, 0) == (17 + 9 + 5 + 3 + 2) * 32
    assert s.outboard_size(0) == 37 * 32 and s.outboard_size(4) == 3 * 32 and s.outboard_size(7) == 32
    for bad in [(-1, 1), (3, 3), (5, 2), (0, 18)]:
        with pytest.raises(ValueError):
            s.covering(*bad)
    with pytest.raises(ValueError):
        s.span(0, 17)
    with pytest.raises(ValueError):
        s.offset(3, 0, 4)
    with pytest.raises(ValueError):
        Shape(-1, 65536)
    with pytest.raises(ValueError):
        Shape(10, 0)


def test_shape_matches_kbfs_tree() -> None:
    for size in [0, 1, 4095, 4096, 4097, 10 * 4096, 10 * 4096 + 1]:
        s = Shape(size, 4096)
        assert s.leaves == tree.block_count(size, 4096)
        assert all(s.piece_span(i) == tree.block_span(i, size, 4096) for i in range(s.leaves))


@pytest.mark.parametrize("n", range(1, 41))
def test_outboard_offsets_and_levels(n: int) -> None:
    bs = 8
    data = random_file(n * bs - (n % 3), seed=n)
    shape, levels, root = full_tree(data, bs)
    assert shape.leaves == n and len(levels) == shape.levels
    assert proof.root_of(shape, levels[-1][0]) == root == tree.root_from_leaves(levels[0], len(data), bs)
    for level, row in enumerate(levels):
        assert len(row) == shape.count(level)
        for j, h in enumerate(row):
            kids = shape.children(level, j)
            if len(kids) == 2:
                assert h == proof.node_hash(levels[kids[0][0]][kids[0][1]], levels[kids[1][0]][kids[1][1]])
            elif kids:
                assert h == levels[level - 1][2 * j]
    for lowest in range(0, shape.height + 3):
        ob = proof.outboard(proof.nodes_of(levels[0], lowest), shape, lowest)
        assert len(ob) == shape.outboard_size(lowest)
        assert ob[-32:] == levels[-1][0]
        for level in range(lowest, shape.outboard_top(lowest) + 1):
            for j in range(shape.count(level)):
                at = shape.offset(level, j, lowest)
                expect = levels[min(level, shape.height)][j]
                assert ob[at : at + 32] == expect
                assert proof.outboard_getter(ob, shape, lowest)(level, j) == expect


# -- proofs of every range of small trees ----------------------------------------------------


@pytest.mark.parametrize("n", range(1, 41))
def test_every_range_of_small_trees(n: int) -> None:
    bs = 16
    data = random_file(max(0, n * bs - 5), seed=1000 + n)
    shape, levels, root = full_tree(data, bs)
    assert shape.leaves == n
    bound = 2 * math.log2(n) + 2
    for a in range(n):
        for b in range(a + 1, n + 1):
            nodes = proof.proof_nodes(shape, a, b)
            assert nodes == reference_proof(shape, a, b), (a, b)
            assert len(nodes) <= bound
            # Disjoint from [a, b), from each other, and together with it they cover the tree.
            spans = sorted([shape.span(*x) for x in nodes] + [(a, b)])
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(p[1] == q[0] for p, q in zip(spans, spans[1:], strict=False))
            p = proof.make_proof(getter(levels), shape, a, b)
            assert len(p) == 32 * len(nodes)
            got = proof.verify_range_nodes(root, len(data), bs, a, b, pieces(data, shape, a, b), p)
            for (level, j), h in got.items():
                assert levels[min(level, shape.height)][j] == h
            assert all(got[(0, i)] == levels[0][i] for i in range(a, b))


def test_empty_file() -> None:
    shape, levels, root = full_tree(b"", 65536)
    assert proof.proof_nodes(shape, 0, 1) == [] and proof.make_proof(getter(levels), shape, 0, 1) == b""
    proof.verify_range(root, 0, 65536, 0, 1, b"", b"")
    for bad_data, bad_proof in [(b"x", b""), (b"", b"\0" * 32)]:
        with pytest.raises(VerificationError):
            proof.verify_range(root, 0, 65536, 0, 1, bad_data, bad_proof)
    with pytest.raises(VerificationError):
        proof.verify_range(root, 1, 65536, 0, 1, b"", b"")


# -- tampering -------------------------------------------------------------------------------


TAMPER_CASES = [(1, 0, 1), (2, 1, 2), (5, 1, 4), (17, 16, 17), (17, 3, 9), (23, 0, 23), (33, 7, 8), (40, 13, 29)]


@pytest.mark.parametrize(("n", "a", "b"), TAMPER_CASES)
def test_tampering_is_rejected(n: int, a: int, b: int) -> None:
    bs = 16
    data = random_file(n * bs - 7, seed=n * 7 + a)
    shape, levels, root = full_tree(data, bs)
    size = len(data)
    body = pieces(data, shape, a, b)
    p = proof.make_proof(getter(levels), shape, a, b)
    proof.verify_range(root, size, bs, a, b, body, p)

    def rejected(r: str | bytes, sz: int, bsz: int, aa: int, bb: int, d: bytes, pr: bytes) -> None:
        with pytest.raises(VerificationError):
            proof.verify_range(r, sz, bsz, aa, bb, d, pr)

    for k in range(0, len(p), 32):  # every node, one bit flipped in each of its bytes
        for i in range(32):
            bad = bytearray(p)
            bad[k + i] ^= 1 << (i % 8)
            rejected(root, size, bs, a, b, body, bytes(bad))
    for k in range(0, len(p), 32):  # a node swapped for another true node
        bad = bytearray(p)
        bad[k : k + 32] = levels[0][a]
        rejected(root, size, bs, a, b, body, bytes(bad))
    for i in range(len(body)):  # every byte of data flipped
        bad = bytearray(body)
        bad[i] ^= 0xFF
        rejected(root, size, bs, a, b, bytes(bad), p)
    rejected(root, size, bs, a, b, body[:-1], p)  # short or long data
    rejected(root, size, bs, a, b, body + b"\0", p)
    if p:  # truncated (a whole-file range has an empty proof)
        rejected(root, size, bs, a, b, body, p[:-1])
        rejected(root, size, bs, a, b, body, p[:-32])
    rejected(root, size, bs, a, b, body, p + b"\0")  # extended
    rejected(root, size, bs, a, b, body, p + b"\0" * 32)
    rejected(root, size, bs, a, b, body, p + (p[:32] or levels[0][0]))
    if len(p) >= 64:  # reordered
        rejected(root, size, bs, a, b, body, p[32:64] + p[:32] + p[64:])
    for da, db in [(1, 1), (-1, -1), (0, 1), (1, 0), (0, -1), (-1, 0)]:  # shifted position
        if 0 <= a + da < b + db <= n and (da, db) != (0, 0):
            rejected(root, size, bs, a + da, b + db, body, p)
            other = proof.make_proof(getter(levels), shape, a + da, b + db)
            rejected(root, size, bs, a + da, b + db, body, other)
    for sz in [size - 1, size + 1, size + bs, size - bs]:  # wrong size
        rejected(root, sz, bs, a, b, body, p)
    for bsz in [bs // 2, bs - 1, bs + 1, bs * 2, 0, -1]:  # wrong block size
        rejected(root, size, bsz, a, b, body, p)
    wrong_root = bytes.fromhex(root)[::-1].hex()
    rejected(wrong_root, size, bs, a, b, body, p)
    rejected("xyz", size, bs, a, b, body, p)
    rejected(root[:-2], size, bs, a, b, body, p)
    for aa, bb in [(-1, b), (a, n + 1), (b, a), (a, a)]:  # not a range of this file
        rejected(root, size, bs, aa, bb, body, p)
    # The right answer for the wrong question: a true proof of another range.
    for aa, bb in [(0, 1), (n - 1, n)]:
        if (aa, bb) != (a, b):
            rejected(root, size, bs, a, b, body, proof.make_proof(getter(levels), shape, aa, bb))
    # Root given as raw bytes works too.
    proof.verify_range(bytes.fromhex(root), size, bs, a, b, body, p)


def test_second_preimage_node_as_leaf_is_rejected() -> None:
    """Two child hashes presented as a piece's bytes do not pass for the node above them."""
    bs = 64
    data = random_file(4 * bs, seed=5)
    shape, levels, root = full_tree(data, bs)
    fake = levels[0][0] + levels[0][1]  # 64 bytes: the body of node (1, 0)
    p = proof.make_proof(getter(levels), shape, 0, 1)
    with pytest.raises(VerificationError):
        proof.verify_range(root, len(data), bs, 0, 1, fake, p)


# -- shares: outboard of levels >= 4 plus group data -----------------------------------------


@pytest.mark.parametrize("n", [1, 5, 16, 17, 18, 31, 33, 40, 70])
def test_group_getter_serves_the_same_proofs(n: int) -> None:
    bs = 32
    data = random_file(n * bs - 3, seed=n)
    shape, levels, root = full_tree(data, bs)
    g_level = proof.GROUP_LEVEL
    ob = proof.outboard(proof.nodes_of(levels[0], g_level), shape, g_level)
    assert len(ob) == shape.outboard_size(g_level)
    reads: list[int] = []

    def read_group(g: int) -> bytes:
        reads.append(g)
        lo, hi = shape.span(g_level, g)
        return data[lo * bs : min(hi * bs, len(data))]

    get = proof.group_getter(shape, g_level, proof.outboard_getter(ob, shape, g_level), read_group)
    for a, b in {(0, 1), (n - 1, n), (n // 2, n // 2 + 1), (0, n), (n // 3, max(n // 3 + 1, 2 * n // 3))}:
        reads.clear()
        p = proof.make_proof(get, shape, a, b)
        assert p == proof.make_proof(getter(levels), shape, a, b)
        assert len(reads) <= 2 + 2  # the groups at the two edges (memo keeps one at a time)
        proof.verify_range(root, len(data), bs, a, b, pieces(data, shape, a, b), p)

    def bad_read(g: int) -> bytes:
        body = bytearray(read_group(g))
        body[0] ^= 1
        return bytes(body)

    bad = proof.group_getter(shape, g_level, proof.outboard_getter(ob, shape, g_level), bad_read)
    if n > 1:
        with pytest.raises(VerificationError):  # piece 0's proof needs group 0's lower nodes
            proof.make_proof(bad, shape, 0, 1)
    short = proof.group_getter(shape, g_level, proof.outboard_getter(ob, shape, g_level), lambda g: b"x")
    if n > 1:
        with pytest.raises(VerificationError):
            proof.make_proof(short, shape, 0, 1)


def test_outboard_getter_rejects_wrong_length() -> None:
    shape = Shape(10 * 64, 64)
    with pytest.raises(VerificationError):
        proof.outboard_getter(b"\0" * 32, shape, 0)
    with pytest.raises(VerificationError):
        proof.levels_from([b"\0" * 32] * 9, shape, 0)


def test_proof_ranges_in_outboard() -> None:
    bs = 16
    data = random_file(40 * bs, seed=3)
    shape, levels, root = full_tree(data, bs)
    ob = proof.outboard(levels[0], shape, 0)
    for a, b in [(0, 1), (5, 6), (13, 29), (39, 40)]:
        nodes = proof.proof_nodes(shape, a, b)
        ranges = proof.proof_ranges(shape, nodes, 0)
        assert len(ranges) <= shape.levels
        got = b"".join(ob[at : at + ln] for at, ln in ranges)
        assert sorted(got[i : i + 32] for i in range(0, len(got), 32)) == sorted(levels[x[0]][x[1]] for x in nodes)


def test_header_round_trip() -> None:
    p = bytes(range(96))
    assert proof.decode_header(proof.encode_header(p)) == p
    for bad in ["not base64!", "AAA", "é"]:
        with pytest.raises(VerificationError):
            proof.decode_header(bad)


# -- shorter second proofs from verified nodes -----------------------------------------------


@pytest.mark.parametrize("n", [2, 7, 16, 17, 40])
def test_neighbour_proof_below_known_node(n: int) -> None:
    bs = 16
    data = random_file(n * bs - 1, seed=n + 77)
    shape, levels, root = full_tree(data, bs)
    get = getter(levels)
    for a in range(n - 1):
        first = proof.make_proof(get, shape, a, a + 1)
        known = proof.verify_range_nodes(root, len(data), bs, a, a + 1, pieces(data, shape, a, a + 1), first)
        b = a + 1  # the next piece: its sibling path is mostly known
        anchor = proof.lowest_known(known, shape, b, b + 1)
        assert anchor is not None
        short = proof.make_proof(get, shape, b, b + 1, anchor=anchor)
        full = proof.make_proof(get, shape, b, b + 1)
        assert len(short) <= len(full)
        body = pieces(data, shape, b, b + 1)
        more = proof.verify_below(shape, anchor, known[anchor], b, b + 1, body, short)
        assert more[(0, b)] == levels[0][b]
        if a % 2 == 0 and b < n - 1 or n == 2:
            assert short == b""  # the next piece's leaf was in the first proof
        with pytest.raises(VerificationError):
            proof.verify_below(shape, anchor, bytes(32), b, b + 1, body, short)
        with pytest.raises(VerificationError):
            proof.verify_below(shape, anchor, known[anchor], b, b + 1, body, short + b"\0")
        if body:
            with pytest.raises(VerificationError):
                proof.verify_below(shape, anchor, known[anchor], b, b + 1, bytes([body[0] ^ 1]) + body[1:], short)
    with pytest.raises(ValueError):
        proof.proof_nodes(shape, 0, n, anchor=(0, 0))


# -- hypothesis: sizes, block sizes, ranges --------------------------------------------------


@st.composite
def file_and_range(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    bs = draw(st.sampled_from([1, 3, 64, 4096, 65536, 1 << 20]))
    size = draw(st.integers(0, min(4 << 20, bs * draw(st.sampled_from([1, 2, 17, 64, 300])))))
    n = tree.block_count(size, bs)
    a = draw(st.integers(0, n - 1))
    b = draw(st.integers(a + 1, min(n, a + 1 + draw(st.sampled_from([0, 1, 5, n])))))
    return bs, size, a, b, draw(st.integers(0, 2**32))


@FAST
@given(file_and_range())
def test_hypothesis_proofs_verify(case: tuple[int, int, int, int, int]) -> None:
    bs, size, a, b, seed = case
    data = random_file(size, seed)
    shape, levels, root = full_tree(data, bs)
    assert root == tree.root_from_leaves(levels[0], size, bs)
    nodes = proof.proof_nodes(shape, a, b)
    assert len(nodes) <= 2 * math.log2(shape.leaves) + 2
    p = proof.make_proof(getter(levels), shape, a, b)
    body = pieces(data, shape, a, b)
    proof.verify_range(root, size, bs, a, b, body, p)
    rnd = random.Random(seed)
    if p:
        bad = bytearray(p)
        bad[rnd.randrange(len(p))] ^= 1 << rnd.randrange(8)
        with pytest.raises(VerificationError):
            proof.verify_range(root, size, bs, a, b, body, bytes(bad))
    if body:
        bad = bytearray(body)
        bad[rnd.randrange(len(body))] ^= 1 << rnd.randrange(8)
        with pytest.raises(VerificationError):
            proof.verify_range(root, size, bs, a, b, bytes(bad), p)


@FAST
@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=300), st.sampled_from([16, 4096, 65536]))
def test_hypothesis_agrees_with_root_from_leaves(leaves: list[bytes], bs: int) -> None:
    size = len(leaves) * bs - 1
    shape = Shape(size, bs)
    levels = proof.levels_from(leaves, shape, 0)
    assert proof.root_of(shape, levels[-1][0]) == tree.root_from_leaves(leaves, size, bs)
    for lowest in (1, 4, 9):
        groups = proof.nodes_of(leaves, lowest)
        assert len(groups) == shape.count(lowest)
        assert proof.outboard(groups, shape, lowest)[-32:] == levels[-1][0]


# -- huge trees, without data ----------------------------------------------------------------


class UniformTree:
    """A file of N pieces of one repeated byte (last piece LAST bytes): nodes in O(log n), no data."""

    def __init__(self, n: int, bs: int, last: int) -> None:
        self.bs, self.last = bs, last
        self.shape = Shape((n - 1) * bs + last, bs)
        assert self.shape.leaves == n
        self.full = [tree.leaf_hash(b"\x5a" * bs)]
        for _ in range(70):
            self.full.append(proof.node_hash(self.full[-1], self.full[-1]))

    @functools.cache  # noqa: B019 - a test helper, lives as long as the test
    def node(self, level: int, index: int) -> bytes:
        lo, hi = self.shape.span(level, index)
        if level == 0:
            return tree.leaf_hash(b"\x5a" * (self.bs if hi < self.shape.leaves else self.last))
        if hi - lo == 1 << level and hi < self.shape.leaves:
            return self.full[level]
        kids = self.shape.children(level, index)
        if len(kids) == 1:
            return self.node(*kids[0])
        return proof.node_hash(self.node(*kids[0]), self.node(*kids[1]))

    def root(self) -> str:
        return proof.root_of(self.shape, self.node(self.shape.height, 0))

    def data(self, a: int, b: int) -> bytes:
        start, end = self.shape.byte_span(a, b)
        return b"\x5a" * (end - start)


def test_uniform_tree_matches_real_tree() -> None:
    u = UniformTree(37, 8, 5)
    data = u.data(0, 37)
    leaves, root = tree.tree_of_bytes(data, 8)
    assert u.root() == root
    levels = proof.levels_from(leaves, u.shape, 0)
    assert all(u.node(k, j) == levels[k][j] for k in range(u.shape.levels) for j in range(u.shape.count(k)))


@pytest.mark.parametrize("n", [2**24 + 3, 2**24, 2**24 - 1, 2**40 + 12345, 3 * 2**33 + 1])
def test_huge_shapes(n: int) -> None:
    u = UniformTree(n, 4096, 100)
    shape = u.shape
    root = u.root()
    rnd = random.Random(n)
    cases = [(0, 1), (n - 1, n), (n - 2, n), (0, n), (n // 2, n // 2 + 1), (2**23 - 1, 2**23 + 1)]
    cases += [(x, x + rnd.randint(1, 40)) for x in (rnd.randrange(n - 50) for _ in range(6))]
    for a, b in cases:
        nodes = proof.proof_nodes(shape, a, b)
        assert len(nodes) <= 2 * math.log2(n) + 2
        spans = [shape.span(*x) for x in nodes]
        assert all(hi <= a or lo >= b for lo, hi in spans)
        assert sum(hi - lo for lo, hi in spans) + (b - a) == n
        assert spans == sorted(spans)
        if b - a > 64:
            continue
        p = proof.make_proof(u.node, shape, a, b)
        body = u.data(a, b)
        got = proof.verify_range_nodes(root, shape.size, 4096, a, b, body, p)
        assert got[(shape.height, 0)] == u.node(shape.height, 0)
        with pytest.raises(VerificationError):
            proof.verify_range(root, shape.size + 1, 4096, a, b, body, p)
        if p:
            bad = bytearray(p)
            bad[-1] ^= 1
            with pytest.raises(VerificationError):
                proof.verify_range(root, shape.size, 4096, a, b, body, bytes(bad))
    # Outboard offsets stay exact arithmetic: the top is the last node of the file.
    for lowest in (0, 4, 10):
        assert shape.offset(shape.height, 0, lowest) == shape.outboard_size(lowest) - 32
    assert shape.outboard_size(4) < shape.outboard_size(0) // 15


@FAST
@given(st.integers(2, 2**47), st.data())
def test_hypothesis_huge_proof_shapes(n: int, draw: st.DataObject) -> None:
    shape = Shape(n * 65536 - 1, 65536)
    a = draw.draw(st.integers(0, n - 1))
    b = draw.draw(st.integers(a + 1, n))
    nodes = proof.proof_nodes(shape, a, b)
    assert len(nodes) <= 2 * math.log2(n) + 2
    spans = [shape.span(*x) for x in nodes]
    assert sum(hi - lo for lo, hi in spans) + (b - a) == n
    assert all(hi <= a or lo >= b for lo, hi in spans) and spans == sorted(spans)
    for level, j in nodes:  # each named where its parent has two children and meets [a, b)
        plo, phi = shape.span(level + 1, j // 2)
        assert shape.two_children(level + 1, j // 2) and plo < b and phi > a
    level, j = shape.covering(a, b)
    lo, hi = shape.span(level, j)
    assert lo <= a and b <= hi
    for kid in shape.children(level, j):  # the lowest such node: no child covers the range
        klo, khi = shape.span(*kid)
        assert not (klo <= a and b <= khi) or shape.span(*kid) == (lo, hi)


def test_root_formula() -> None:
    shape = Shape(12345, 4096)
    top = bytes(range(32))
    assert proof.root_of(shape, top) == blake3(b"\x02" + struct.pack("<QI", 12345, 4096) + top).hexdigest()


def test_pieces_doc_example() -> None:
    """The five-piece example of docs/pieces.md."""
    bs = 65536
    data = formula_bytes(4 * bs + 10)
    shape, levels, root = full_tree(data, bs)
    assert (shape.leaves, shape.height) == (5, 3)
    assert root == "d81e18b26d86434fd2cdd8555b6623910763843efe0aeddfd7a78b62a6d55ce9"
    assert levels[3][0].hex().startswith("08f09f7d") and levels[2][0].hex().startswith("962e547f")
    assert levels[1][0].hex().startswith("6da3a0c5") and levels[1][1].hex().startswith("5abf8715")
    assert [h.hex()[:8] for h in levels[0]] == ["c612afe7", "fa3fa118", "ba5c40ba", "81d8405c", "1b2a7265"]
    assert levels[2][1] == levels[1][2] == levels[0][4]
    table = {
        (2, 3): ([(1, 0), (0, 3), (2, 1)], [160, 96, 288]),
        (0, 1): ([(0, 1), (1, 1), (2, 1)], [32, 192, 288]),
        (1, 3): ([(0, 0), (0, 3), (2, 1)], [0, 96, 288]),
        (4, 5): ([(2, 0)], [256]),
        (0, 5): ([], []),
    }
    for (a, b), (nodes, offsets) in table.items():
        assert proof.proof_nodes(shape, a, b) == nodes
        assert [shape.offset(level, j, 0) for level, j in nodes] == offsets
    x = levels[0][2]
    n11 = proof.node_hash(x, levels[0][3])
    n20 = proof.node_hash(levels[1][0], n11)
    assert proof.root_of(shape, proof.node_hash(n20, levels[2][1])) == root
    assert 12 * bs == 786432 and 15 * bs - 1 == 983039  # the header example's Range
