"""The blake3-merkle-1 block tree: the shared test vectors and the verification helpers."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
from blake3 import blake3

from kbfs import tree
from kbfs.errors import VerificationError


def _vectors(fixtures_dir: Path) -> list[dict]:
    doc = json.loads((fixtures_dir / "tree-vectors.json").read_text())
    assert doc["algorithm"] == tree.ALGORITHM
    assert doc["block_size"] == tree.BLOCK_SIZE
    assert len(doc["vectors"]) >= 5
    return doc["vectors"]


def test_tree_vectors(fixtures_dir: Path) -> None:
    for v in _vectors(fixtures_dir):
        data = bytes([v["byte"]]) * v["size"]
        leaves, root = tree.tree_of_bytes(data)
        assert len(leaves) == v["blocks"] == tree.block_count(v["size"]), v["content"]
        assert leaves[0].hex() == v["first_leaf"], v["content"]
        assert root == v["root"], v["content"]
        tree.verify_leaves(leaves, v["size"], v["root"])
        tree.verify_leaves(leaves, v["size"], v["root"].upper())


def test_tree_vectors_64k(fixtures_dir: Path) -> None:
    """The 64 KiB vectors (issue 15's pointers) through kbfs.tree: same code, any leaf size."""
    doc = json.loads((fixtures_dir / "tree-vectors-64k.json").read_text())
    assert doc["algorithm"] == tree.ALGORITHM and doc["block_size"] == 65536
    period = bytes((31 * i + 7) % 251 for i in range(251))
    for v in doc["vectors"]:
        data = (period * (v["size"] // 251 + 1))[: v["size"]]
        leaves, root = tree.tree_of_bytes(data, 65536)
        assert len(leaves) == v["pieces"] == tree.block_count(v["size"], 65536), v["content"]
        assert (leaves[0].hex(), leaves[-1].hex()) == (v["first_leaf"], v["last_leaf"])
        assert root == v["root"], v["content"]
        tree.verify_leaves(leaves, v["size"], v["root"], 65536)
        with pytest.raises(VerificationError):  # the block size is bound into the root
            tree.verify_leaves(leaves, v["size"], v["root"], 1 << 17)


def test_tree_builder_matches_the_level_by_level_tree(fixtures_dir: Path) -> None:
    """TreeBuilder (leaves folded as they come, O(log n) memory) gives the same root as
    pairing whole levels, for every leaf count up to 300 (odd nodes at many levels) and for
    the 64 KiB vectors; it refuses a leaf count that does not fit the size."""
    rng = random.Random(3)
    for n in range(1, 301):
        leaves = [rng.randbytes(32) for _ in range(n)]
        b = tree.TreeBuilder()
        for leaf in leaves:
            b.add(leaf)
        size = n * 4096 - 1
        assert b.root(size, 4096) == tree.root_from_leaves(leaves, size, 4096), n
    doc = json.loads((fixtures_dir / "tree-vectors-64k.json").read_text())
    period = bytes((31 * i + 7) % 251 for i in range(251))
    for v in doc["vectors"]:
        data = (period * (v["size"] // 251 + 1))[: v["size"]]
        b = tree.TreeBuilder()
        for leaf in tree.tree_of_bytes(data, 65536)[0]:
            b.add(leaf)
        assert b.root(v["size"], 65536) == v["root"], v["content"]
        with pytest.raises(VerificationError, match="leaves for a file"):
            b.root(v["size"] + 2 * 65536, 65536)
    with pytest.raises(ValueError):
        tree.TreeBuilder().top()


def test_default_block_size_is_64k() -> None:
    assert tree.DEFAULT_BLOCK_SIZE == 65536 and tree.BLOCK_SIZE == 1 << 20


def test_three_blocks_by_hand() -> None:
    """The worked example of docs/hash-tree.md, computed straight from the definition."""
    bs = tree.BLOCK_SIZE
    data = b"a" * bs + b"b" * bs + b"c" * 10
    l0, l1, l2 = (blake3(b"\x00" + data[i : i + bs]).digest() for i in range(0, len(data), bs))
    n01 = blake3(b"\x01" + l0 + l1).digest()
    top = blake3(b"\x01" + n01 + l2).digest()  # l2 was carried up unchanged, then paired
    root = blake3(b"\x02" + struct.pack("<QI", len(data), bs) + top).hexdigest()
    leaves, got = tree.tree_of_bytes(data, bs)
    assert leaves == [l0, l1, l2]
    assert got == root
    # The figures printed in docs/hash-tree.md.
    assert l2.hex() == "5b658fbcca5708680f03a0b747151fc9f1c7a62136b696c753c5e27eace48d2d"
    assert top.hex() == "52a9e0c913621b52e2a1fe5779785d72e05d1b665b18ef8b04e476ae6e920f50"
    assert root == "4ea22132f98975531f711cae5c47b4bd4e8b3cac134971077af36378988cb72a"


def test_block_count_and_span() -> None:
    assert tree.block_count(0) == 1
    assert tree.block_count(1) == 1
    assert tree.block_count(tree.BLOCK_SIZE) == 1
    assert tree.block_count(tree.BLOCK_SIZE + 1) == 2
    assert tree.block_span(1, tree.BLOCK_SIZE + 5) == (tree.BLOCK_SIZE, tree.BLOCK_SIZE + 5)
    with pytest.raises(ValueError):
        tree.block_count(-1)


def test_root_depends_on_size_and_block_size() -> None:
    leaves, root = tree.tree_of_bytes(b"x" * 100, 4096)
    assert tree.root_from_leaves(leaves, 100, 8192) != root
    with pytest.raises(VerificationError):
        tree.verify_leaves(leaves, 101, root, 4096)


def test_verify_leaves_failures() -> None:
    data = random.Random(1).randbytes(3 * 4096 + 512)
    leaves, root = tree.tree_of_bytes(data, 4096)
    assert len(leaves) == 4
    tree.verify_leaves(leaves, len(data), root, 4096)

    swapped = [leaves[1], leaves[0], *leaves[2:]]
    with pytest.raises(VerificationError, match="does not match"):
        tree.verify_leaves(swapped, len(data), root, 4096)

    flipped = [bytes([leaves[2][0] ^ 1]) + leaves[2][1:] if i == 2 else x for i, x in enumerate(leaves)]
    with pytest.raises(VerificationError):
        tree.verify_leaves(flipped, len(data), root, 4096)

    with pytest.raises(VerificationError, match="leaves"):
        tree.verify_leaves(leaves[:-1], len(data), root, 4096)
    with pytest.raises(VerificationError, match="leaves"):
        tree.verify_leaves([*leaves, leaves[-1]], len(data), root, 4096)

    with pytest.raises(VerificationError):
        tree.verify_leaves(leaves, len(data), "0" * 64, 4096)


def test_verify_block() -> None:
    data = b"q" * 5000
    leaves, _ = tree.tree_of_bytes(data, 4096)
    tree.verify_block(data[:4096], leaves[0], 0)
    tree.verify_block(memoryview(data)[4096:], leaves[1], 1)
    assert tree.block_matches(data[4096:], leaves[1])
    with pytest.raises(VerificationError, match="block 1"):
        tree.verify_block(data[4096:-1], leaves[1], 1)
    with pytest.raises(VerificationError):
        tree.verify_block(data[:4096], leaves[1], 1)
    # A leaf is not the plain BLAKE3 of the block: the 0x00 prefix separates leaves from nodes.
    assert not tree.block_matches(data[:4096], blake3(data[:4096]).digest())


def test_split_leaves() -> None:
    leaves, _ = tree.tree_of_bytes(b"z" * 10000, 4096)
    assert tree.split_leaves(b"".join(leaves)) == leaves
    assert tree.split_leaves(b"") == []
    with pytest.raises(VerificationError):
        tree.split_leaves(b"".join(leaves) + b"\x00")
