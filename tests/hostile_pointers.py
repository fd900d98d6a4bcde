"""Hostile pointers for tests: what a pointer author who wants a reader to get wrong bytes
(or a crash) can write. Each function returns a `prv.Pointer` (write it with `write`) or,
for pointers the parser must refuse, JSON text.

    real = prv.create_pointer(path)                         # the honest pointer of X
    fake = same_sha1_other_content(real, y_bytes)           # X's SHA-1, Y's size and root
    write(tmp_path / "fake.prv", fake)
    for name, text in unparsable(real): ...                  # each must be one clear error

Kinds: a real SHA-1 with another content's size and root (cache poisoning), a real root
with another size (the root binds the size: never satisfiable), a wrong root, a huge size,
a root-less pointer naming a chosen `original_path` (a local file of someone else's), and
non-hex / out-of-range fields. Test support only; it never talks to the network. Reusable
by any test of an untrusted source (mirrors, browsers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from kbfs import prv, tree

MAX_SIZE = (1 << 62) - 1  # the largest size the parser accepts


def _fcs(data: bytes) -> str:
    import hashlib

    return "head1000-" + hashlib.sha1(data[:1000]).hexdigest()


def same_sha1_other_content(real: prv.Pointer, data: bytes,
                            block_size: int = tree.BLOCK_SIZE) -> prv.Pointer:
    """REAL's SHA-1 over DATA's size and block tree root: self-consistent for a source
    serving DATA under REAL's SHA-1, and what a cache keyed by SHA-1 confuses with REAL."""
    _, root = tree.tree_of_bytes(data, block_size)
    return prv.Pointer(real.sha1, len(data), _fcs(data), "", prv.PRV_VERSION,
                       prv.TreeRef(root, block_size))


def root_with_other_size(real: prv.Pointer, size: int) -> prv.Pointer:
    """REAL's SHA-1 and root with another SIZE: no content can match it."""
    assert real.tree is not None
    return prv.Pointer(real.sha1, size, real.fcs, "", prv.PRV_VERSION, real.tree)


def wrong_root(real: prv.Pointer) -> prv.Pointer:
    """REAL's SHA-1 and size with a random root."""
    bs = real.tree.block_size if real.tree is not None else tree.BLOCK_SIZE
    return prv.Pointer(real.sha1, real.size, real.fcs, "", prv.PRV_VERSION,
                       prv.TreeRef(os.urandom(32).hex(), bs))


def huge(real: prv.Pointer, size: int = MAX_SIZE) -> prv.Pointer:
    """REAL's SHA-1 with an enormous size (and no tree: nothing to check it against)."""
    return prv.Pointer(real.sha1, size, real.fcs, "", prv.PRV_VERSION, None)


def rootless(real: prv.Pointer, original_path: str = "") -> prv.Pointer:
    """REAL as the original tools would write it (SHA-1 and size, no tree), naming
    ORIGINAL_PATH as where the file was (a local file of the attacker's choosing)."""
    return prv.Pointer(real.sha1, real.size, real.fcs, original_path, prv.PRV_VERSION, None)


def rootless_of(sha1: str, size: int, original_path: str = "") -> prv.Pointer:
    """A root-less pointer from scratch."""
    return prv.Pointer(sha1, size, "", original_path, prv.PRV_VERSION, None)


def unparsable(real: prv.Pointer) -> Iterator[tuple[str, str]]:
    """(what is wrong, JSON text) of pointers the parser must refuse with one clear line."""
    good = real.to_dict()

    def edit(**changes: object) -> str:
        obj = dict(good)
        obj.update(changes)
        return json.dumps(obj)

    yield "non-hex sha1", edit(original_checksum="g" * 40)
    yield "short sha1", edit(original_checksum="ab" * 10)
    yield "path in sha1", edit(original_checksum="../../" + "a" * 34)
    yield "negative size", edit(original_size=-1)
    yield "size too big", edit(original_size=1 << 62)
    yield "boolean size", edit(original_size=True)
    yield "string size", edit(original_size="10")
    yield "NUL in path", edit(original_path="a\0b")
    t = dict(good.get("kbfs_tree") or {"algorithm": tree.ALGORITHM,
                                        "block_size": tree.BLOCK_SIZE, "root": "0" * 64})
    yield "non-hex root", edit(kbfs_tree={**t, "root": "z" * 64})
    yield "path in root", edit(kbfs_tree={**t, "root": "../" + "0" * 61})
    yield "tiny block size", edit(kbfs_tree={**t, "block_size": 1})
    yield "unknown algorithm", edit(kbfs_tree={**t, "algorithm": "md5"})
    yield "not an object", "[1, 2, 3]"


def write(path: str | os.PathLike[str], pointer: prv.Pointer | str) -> str:
    """Write POINTER (or JSON text) to PATH; return PATH as a string."""
    text = pointer if isinstance(pointer, str) else pointer.to_json()
    Path(path).write_text(text)
    return os.fspath(path)
