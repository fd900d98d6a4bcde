"""The .prv / .prvdir format: the original tools' fixtures, round trips, bad input, hashing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from kbfs import prv, tree
from kbfs.errors import PointerError

SHA1 = "e6937aa016bc06eda81d3b227fffde825d881ce5"
FCS = "head1000-c9c960a0b925474fab83942cc27d504fc24ac37b"
ROOT = "ab" * 32


def _good() -> dict:
    return {
        "original_checksum": SHA1,
        "original_size": 5000,
        "original_fcs": FCS,
        "original_path": "/tmp/x.bin",
        "prv_version": "0.11",
        "kbfs_tree": {"algorithm": "blake3-merkle-1", "block_size": 1048576, "root": ROOT},
    }


# ---------------------------------------------------------------- fixtures of the original tools


def test_legacy_pointer_parses(fixtures_dir: Path) -> None:
    p = prv.load_pointer(fixtures_dir / "legacy-content.bin.prv")
    assert p.sha1 == SHA1
    assert p.size == 5000
    assert p.fcs == FCS
    assert p.original_path == "/tmp/mountainlab-tmp/legacy-content.bin"
    assert p.prv_version == "0.11"
    assert p.tree is None


def test_legacy_real_world_parses(fixtures_dir: Path) -> None:
    p = prv.load_pointer(fixtures_dir / "legacy-real-world.prv")
    assert p.sha1 == "1febe49759c57f5855a71deb15b52f8bb7bf2ab9"
    assert p.size == 1219657748
    assert p.fcs == "head1000-566e4080e17c76e4f3d9b48548e64b1cae6a25fe"
    assert p.original_path == "/tmp/mountainlab-tmp/output_timeseries_out.mda"
    assert p.tree is None


def test_legacy_prvdir_parses(fixtures_dir: Path) -> None:
    d = prv.load_prvdir(fixtures_dir / "legacy-tree.prvdir")
    entries = dict(d.walk())
    assert sorted(entries) == ["legacy-content.bin", "sub/copy.bin"]
    assert all(p.sha1 == SHA1 and p.size == 5000 for p in entries.values())
    assert list(d.dirs) == ["sub"]
    assert d.dirs["sub"].dirs == {}


def test_create_reproduces_original_tool_bytes(fixtures_dir: Path) -> None:
    fixture = fixtures_dir / "legacy-content.bin.prv"
    original = prv.load_pointer(fixture)
    ours = prv.create_pointer(fixtures_dir / "legacy-content.bin")
    assert ours.tree is not None
    assert ours.original_path == str(fixtures_dir / "legacy-content.bin")
    as_old_tool = dataclasses.replace(ours, tree=None, original_path=original.original_path)
    assert as_old_tool.to_json().encode() == fixture.read_bytes()


def test_create_v1_reproduces_original_tool_bytes(fixtures_dir: Path) -> None:
    """A pointer with a 1 MiB tree (--block-size 1048576) is the same ml-prv-create JSON."""
    fixture = fixtures_dir / "legacy-content.bin.prv"
    original = prv.load_pointer(fixture)
    ours = prv.create_pointer(fixtures_dir / "legacy-content.bin", block_size=tree.BLOCK_SIZE)
    assert ours.tree is not None and ours.tree.block_size == 1048576
    data = (fixtures_dir / "legacy-content.bin").read_bytes()
    assert ours.tree.root == tree.tree_of_bytes(data, 1048576)[1]
    as_old_tool = dataclasses.replace(ours, tree=None, original_path=original.original_path)
    assert as_old_tool.to_json().encode() == fixture.read_bytes()


@pytest.mark.parametrize("block_size", [None, 65536, 1048576])
def test_our_pointer_keeps_the_old_keys_first(fixtures_dir: Path, block_size: int | None) -> None:
    """Default (64 KiB pieces), 64 KiB named, 1 MiB named: old keys first, kbfs_tree last."""
    ours = (prv.create_pointer(fixtures_dir / "legacy-content.bin") if block_size is None
            else prv.create_pointer(fixtures_dir / "legacy-content.bin", block_size=block_size))
    obj = json.loads(ours.to_json())
    assert list(obj) == [
        "original_checksum",
        "original_size",
        "original_fcs",
        "original_path",
        "prv_version",
        "kbfs_tree",
    ]
    assert obj["kbfs_tree"]["algorithm"] == tree.ALGORITHM
    want_bs = block_size or 65536  # the default is 64 KiB pieces
    assert obj["kbfs_tree"]["block_size"] == want_bs
    data = (fixtures_dir / "legacy-content.bin").read_bytes()
    assert obj["kbfs_tree"]["root"] == tree.tree_of_bytes(data, want_bs)[1]
    assert ours.to_json().startswith('{\n    "original_checksum": ')


@pytest.mark.parametrize("block_size", [65536, 1048576])
def test_round_trip_with_tree(tmp_path: Path, make_file: Callable[..., bytes], block_size: int) -> None:
    make_file(tmp_path / "a.bin", 3 * tree.BLOCK_SIZE + 17, seed=3)
    p = prv.create_pointer(tmp_path / "a.bin", block_size=block_size)
    assert p.tree is not None and p.tree.block_size == block_size
    (tmp_path / "a.bin.prv").write_text(p.to_json())
    back = prv.load_pointer(tmp_path / "a.bin.prv")
    assert back == p
    assert back.tree == p.tree
    assert back.to_json() == p.to_json()


def test_unknown_keys_survive_a_round_trip() -> None:
    obj = _good()
    obj["mountainlab_extra"] = {"x": [1, 2]}
    p = prv.parse_pointer(json.dumps(obj))
    assert p.extra == {"mountainlab_extra": {"x": [1, 2]}}
    assert json.loads(p.to_json()) == obj


def test_uppercase_hex_is_accepted_and_lowered() -> None:
    obj = _good()
    obj["original_checksum"] = SHA1.upper()
    obj["kbfs_tree"]["root"] = ROOT.upper()
    p = prv.parse_pointer(json.dumps(obj))
    assert p.sha1 == SHA1
    assert p.tree is not None and p.tree.root == ROOT


def test_prvdir_round_trip(tmp_path: Path, make_file: Callable[..., bytes]) -> None:
    src = tmp_path / "data"
    make_file(src / "a.bin", 10, seed=1)
    make_file(src / "sub" / "b.bin", 2000, seed=2)
    make_file(src / "sub" / "deeper" / "c.bin", 0)
    make_file(src / ".hidden", 5)
    make_file(src / "sub" / ".git" / "config", 5)
    d = prv.create_prvdir(src)
    assert sorted(rel for rel, _ in d.walk()) == ["a.bin", "sub/b.bin", "sub/deeper/c.bin"]
    (tmp_path / "data.prvdir").write_text(d.to_json())
    back = prv.load_prvdir(tmp_path / "data.prvdir")
    assert dict(back.walk()) == dict(d.walk())
    assert back.to_json() == d.to_json()


# ---------------------------------------------------------------- bad pointers


BAD_POINTERS: list[tuple[str, bytes | dict, str]] = [
    ("not-json", b"this is not json", "not valid JSON"),
    ("empty", b"", "not valid JSON"),
    ("bad-utf8", b'{"original_checksum": "\xff\xfe"}', "not valid JSON"),
    ("deep-json", b"[" * 60000, "not valid JSON"),
    ("array", b"[1, 2, 3]", "not a JSON object"),
    ("string", b'"abc"', "not a JSON object"),
]


def _bad(**changes: object) -> dict:
    obj = _good()
    for key, value in changes.items():
        if value is _DROP:
            del obj[key]
        else:
            obj[key] = value
    return obj


def _bad_tree(**changes: object) -> dict:
    obj = _good()
    for key, value in changes.items():
        if value is _DROP:
            del obj["kbfs_tree"][key]
        else:
            obj["kbfs_tree"][key] = value
    return obj


_DROP = object()

BAD_FIELDS: list[tuple[str, dict, str]] = [
    ("no-checksum", _bad(original_checksum=_DROP), "original_checksum"),
    ("int-checksum", _bad(original_checksum=123), "original_checksum"),
    ("short-checksum", _bad(original_checksum=SHA1[:-1]), "original_checksum"),
    ("long-checksum", _bad(original_checksum=SHA1 + "0"), "original_checksum"),
    ("nonhex-checksum", _bad(original_checksum="g" * 40), "original_checksum"),
    ("newline-checksum", _bad(original_checksum=SHA1 + "\n"), "original_checksum"),
    ("newline-fcs", _bad(original_fcs=FCS + "\n"), "original_fcs"),
    ("no-size", _bad(original_size=_DROP), "original_size"),
    ("string-size", _bad(original_size="5000"), "original_size"),
    ("bool-size", _bad(original_size=True), "original_size"),
    ("float-size", _bad(original_size=5000.0), "original_size"),
    ("negative-size", _bad(original_size=-1), "original_size"),
    ("huge-size", _bad(original_size=1 << 64), "original_size"),
    ("null-size", _bad(original_size=None), "original_size"),
    ("bad-fcs", _bad(original_fcs="head1000-xyz"), "original_fcs"),
    ("fcs-prefix", _bad(original_fcs="head999-" + SHA1), "original_fcs"),
    ("int-fcs", _bad(original_fcs=7), "original_fcs"),
    ("int-path", _bad(original_path=7), "original_path"),
    ("nul-path", _bad(original_path="/a\u0000b"), "original_path"),
    ("int-version", _bad(prv_version=0.11), "prv_version"),
    ("tree-list", _bad(kbfs_tree=[1]), "kbfs_tree"),
    ("tree-algorithm", _bad_tree(algorithm="sha256-merkle"), "kbfs_tree.algorithm"),
    ("tree-no-algorithm", _bad_tree(algorithm=_DROP), "kbfs_tree.algorithm"),
    ("tree-bool-bs", _bad_tree(block_size=True), "kbfs_tree.block_size"),
    ("tree-str-bs", _bad_tree(block_size="1048576"), "kbfs_tree.block_size"),
    ("tree-small-bs", _bad_tree(block_size=100), "kbfs_tree.block_size"),
    ("tree-huge-bs", _bad_tree(block_size=1 << 31), "kbfs_tree.block_size"),
    ("tree-short-root", _bad_tree(root=ROOT[:-2]), "kbfs_tree.root"),
    ("tree-nonhex-root", _bad_tree(root="z" * 64), "kbfs_tree.root"),
    ("tree-newline-root", _bad_tree(root=ROOT + "\n"), "kbfs_tree.root"),
    ("tree-int-root", _bad_tree(root=5), "kbfs_tree.root"),
    ("tree-no-root", _bad_tree(root=_DROP), "kbfs_tree.root"),
]


@pytest.mark.parametrize(
    ("label", "content", "why"),
    BAD_POINTERS + [(label, json.dumps(obj).encode(), why) for label, obj, why in BAD_FIELDS],
    ids=[x[0] for x in BAD_POINTERS] + [x[0] for x in BAD_FIELDS],
)
def test_bad_pointer(tmp_path: Path, label: str, content: bytes, why: str) -> None:
    path = tmp_path / f"{label}.prv"
    path.write_bytes(content)
    with pytest.raises(PointerError) as info:
        prv.load_pointer(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert why in message
    assert "\n" not in message


def test_good_pointer_passes_the_same_checks(tmp_path: Path) -> None:
    """The battery above only means something if the unmodified pointer is accepted."""
    path = tmp_path / "good.prv"
    path.write_text(json.dumps(_good()))
    assert prv.load_pointer(path).size == 5000


def test_oversized_pointer(tmp_path: Path) -> None:
    path = tmp_path / "big.prv"
    text = json.dumps(_good())
    path.write_text(text + " " * (prv.MAX_POINTER_BYTES + 1 - len(text)))
    with pytest.raises(PointerError, match=f"^{path}: larger than"):
        prv.load_pointer(path)
    # One byte less is still a pointer: the cap is exactly 64 KiB.
    path.write_text(text + " " * (prv.MAX_POINTER_BYTES - len(text)))
    assert prv.load_pointer(path).sha1 == SHA1
    with pytest.raises(PointerError, match="larger than"):
        prv.parse_pointer(text + " " * prv.MAX_POINTER_BYTES, "x.prv")


def test_missing_and_unreadable_pointer(tmp_path: Path) -> None:
    with pytest.raises(PointerError, match=f"^{tmp_path / 'nope.prv'}: "):
        prv.load_pointer(tmp_path / "nope.prv")
    with pytest.raises(PointerError, match=f"^{tmp_path}: "):
        prv.load_pointer(tmp_path)


def _nest(depth: int) -> dict:
    node: dict = {"files": {"f": _good()}, "dirs": {}}
    for _ in range(depth):
        node = {"files": {}, "dirs": {"d": node}}
    return node


def test_deep_prvdir(tmp_path: Path) -> None:
    path = tmp_path / "deep.prvdir"
    path.write_text(json.dumps(_nest(prv.MAX_PRVDIR_DEPTH + 1)))
    with pytest.raises(PointerError, match=f"^{path}: .*nested deeper"):
        prv.load_prvdir(path)
    path.write_text(json.dumps(_nest(prv.MAX_PRVDIR_DEPTH)))
    assert len(list(prv.load_prvdir(path).walk())) == 1


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "/etc", "a\u0000b"])
@pytest.mark.parametrize("where", ["files", "dirs"])
def test_bad_prvdir_entry_names(tmp_path: Path, name: str, where: str) -> None:
    obj: dict = {"files": {}, "dirs": {}}
    obj[where][name] = _good() if where == "files" else {"files": {}, "dirs": {}}
    path = tmp_path / "bad.prvdir"
    path.write_text(json.dumps(obj))
    with pytest.raises(PointerError, match="invalid entry name") as info:
        prv.load_prvdir(path)
    assert str(info.value).startswith(f"{path}: ")


def test_bad_pointer_inside_prvdir_names_the_entry(tmp_path: Path) -> None:
    obj = {"files": {}, "dirs": {"sub": {"files": {"x.bin": _bad(original_size=-5)}, "dirs": {}}}}
    path = tmp_path / "bad.prvdir"
    path.write_text(json.dumps(obj))
    with pytest.raises(PointerError) as info:
        prv.load_prvdir(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "sub/" in message and "x.bin" in message and "original_size" in message


@pytest.mark.parametrize("content", [b"[]", b'{"files": [], "dirs": {}}', b'{"dirs": 3}', b"nope"])
def test_bad_prvdir_shape(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.prvdir"
    path.write_bytes(content)
    with pytest.raises(PointerError, match=f"^{path}: "):
        prv.load_prvdir(path)


# ---------------------------------------------------------------- one-pass hashing

SIZES = [
    0,
    1,
    1000,
    1001,
    tree.BLOCK_SIZE - 1,
    tree.BLOCK_SIZE,
    tree.BLOCK_SIZE + 1,
    2 * tree.BLOCK_SIZE,
    17 * tree.BLOCK_SIZE + 3,
]


@pytest.mark.parametrize("block_size", [65536, 1048576])
@pytest.mark.parametrize("size", SIZES)
def test_digest_file(tmp_path: Path, make_file: Callable[..., bytes], size: int,
                     block_size: int) -> None:
    data = make_file(tmp_path / "f.bin", size, seed=size)
    seen: list[int] = []
    d = prv.digest_file(tmp_path / "f.bin", progress=seen.append, block_size=block_size,
                        keep_leaves=True)
    assert d.size == size
    assert sum(seen) == size
    assert d.sha1 == hashlib.sha1(data).hexdigest()
    assert d.fcs == "head1000-" + hashlib.sha1(data[:1000]).hexdigest()
    leaves, root = tree.tree_of_bytes(data, block_size)
    assert d.leaves == leaves
    assert d.root == root and d.block_size == block_size
    p = d.pointer("/abs/f.bin")
    assert p.tree == prv.TreeRef(root, block_size) and p.original_path == "/abs/f.bin"
    # Without keep_leaves (the default) the leaves fold into the root as they come.
    lean = prv.digest_file(tmp_path / "f.bin", block_size=block_size)
    assert lean.leaves is None and (lean.sha1, lean.root) == (d.sha1, root)


def test_digest_file_default_is_64k(tmp_path: Path, make_file: Callable[..., bytes]) -> None:
    data = make_file(tmp_path / "f.bin", 3 * tree.BLOCK_SIZE + 5, seed=7)
    d = prv.digest_file(tmp_path / "f.bin")
    assert prv.DEFAULT_BLOCK_SIZE == d.block_size == 65536
    assert d.root == tree.tree_of_bytes(data, 65536)[1] != tree.tree_of_bytes(data)[1]


def test_create_pointer_uses_absolute_path(
    tmp_path: Path, make_file: Callable[..., bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_file(tmp_path / "f.bin", 10)
    monkeypatch.chdir(tmp_path)
    assert prv.create_pointer("f.bin").original_path == os.path.join(str(tmp_path), "f.bin")


@pytest.mark.parametrize("block_size", [65536, 1048576])
def test_file_matches(tmp_path: Path, make_file: Callable[..., bytes], block_size: int) -> None:
    make_file(tmp_path / "f.bin", 5000, seed=1)
    p = prv.create_pointer(tmp_path / "f.bin", block_size=block_size)
    assert prv.file_matches(tmp_path / "f.bin", p) == (True, "")

    make_file(tmp_path / "same-size.bin", 5000, seed=2)
    ok, why = prv.file_matches(tmp_path / "same-size.bin", p)
    assert not ok and "SHA-1" in why

    make_file(tmp_path / "short.bin", 4999, seed=1)
    ok, why = prv.file_matches(tmp_path / "short.bin", p)
    assert not ok and "size is 4999" in why

    assert p.tree is not None
    wrong_root = dataclasses.replace(p, tree=dataclasses.replace(p.tree, root="0" * 64))
    ok, why = prv.file_matches(tmp_path / "f.bin", wrong_root)
    assert not ok and "block tree root" in why

    ok, why = prv.file_matches(tmp_path / "missing.bin", p)
    assert not ok and "missing.bin" in why

    legacy = dataclasses.replace(p, tree=None)
    assert prv.file_matches(tmp_path / "f.bin", legacy) == (True, "")


def test_digest_file_refuses_a_growing_file(tmp_path: Path, make_file: Callable[..., bytes]) -> None:
    path = tmp_path / "growing.bin"
    make_file(path, 1000)

    def append(_n: int) -> None:
        with open(path, "ab") as f:
            f.write(b"more")

    with pytest.raises(PointerError, match="grew"):
        prv.digest_file(path, progress=append)


# ---------------------------------------------------------------- 64 KiB pieces (issue 15)


def _formula_bytes(size: int) -> bytes:
    """The 64 KiB vectors' content: byte i is (31*i+7) mod 251."""
    period = bytes((31 * i + 7) % 251 for i in range(251))
    return (period * (size // 251 + 1))[:size]


@pytest.mark.parametrize("chunk", [None, 4096, 65536 + 17, 3 * 65536 - 1])
def test_digest_file_64k_vectors(tmp_path: Path, fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                 chunk: int | None) -> None:
    """One pass of digest_file gives the 64 KiB tree of every vector, whatever the read
    size (CHUNK: reads that split pieces, shorter and longer than a piece)."""
    if chunk is not None:
        monkeypatch.setattr(prv, "READ_CHUNK", chunk)
    doc = json.loads((fixtures_dir / "tree-vectors-64k.json").read_text())
    assert doc["block_size"] == 65536
    for v in doc["vectors"]:
        path = tmp_path / f"v{v['size']}.bin"
        data = _formula_bytes(v["size"])
        path.write_bytes(data)
        d = prv.digest_file(path, block_size=65536, keep_leaves=True)
        assert d.root == v["root"], v["content"]
        assert d.leaves is not None
        assert len(d.leaves) == v["pieces"], v["content"]
        assert d.leaves[0].hex() == v["first_leaf"] and d.leaves[-1].hex() == v["last_leaf"]
        assert d.sha1 == hashlib.sha1(data).hexdigest() and d.size == v["size"]
        p = prv.create_pointer(path, block_size=65536)
        assert p.tree == prv.TreeRef(v["root"], 65536)
        assert prv.create_pointer(path).tree == p.tree  # 64 KiB pieces are the default
        assert prv.file_matches(path, p) == (True, "")
        if v["size"] == 40 * 65536:  # the same bytes as a 1 MiB tree: another root
            v1 = prv.digest_file(path, block_size=tree.BLOCK_SIZE).root
            assert v1 == doc["same_40_piece_content_with_1MiB_blocks_root"]


def test_digest_file_blocks_larger_than_a_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A block larger than the read buffer is hashed across reads (up to the 1 GiB limit)."""
    monkeypatch.setattr(prv, "READ_CHUNK", 1 << 16)
    data = os.urandom(5 * (1 << 18) + 12345)
    (tmp_path / "f").write_bytes(data)
    for bs in (1 << 12, 1 << 18, 1 << 20, 1 << 30):
        assert prv.digest_file(tmp_path / "f", block_size=bs).root == tree.tree_of_bytes(data, bs)[1]


@pytest.mark.parametrize("bad", [0, 1000, 2048, 65535, 65537, 3 << 16, 1 << 31, True, "65536"])
def test_bad_block_sizes_refused(tmp_path: Path, bad: object) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(PointerError, match="power of two from 4096 to 2\\^30"):
        prv.digest_file(tmp_path / "f", block_size=bad)  # type: ignore[arg-type]


def test_64k_pointer_keeps_the_original_format(tmp_path: Path, fixtures_dir: Path) -> None:
    """A 64 KiB pointer is the original tool's JSON (its keys, its order, its values) plus
    kbfs_tree, which the original tools ignore: dropping kbfs_tree leaves exactly what
    ml-prv-create writes for that file, and a 64 KiB folder pointer likewise."""
    data = _formula_bytes(1114115)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.bin").write_bytes(data)
    (tmp_path / "d" / "sub" / "b.bin").write_bytes(data[:70000])
    p = prv.create_pointer(tmp_path / "d" / "a.bin", block_size=65536)
    obj = json.loads(p.to_json())
    assert list(obj) == ["original_checksum", "original_size", "original_fcs", "original_path",
                         "prv_version", "kbfs_tree"]
    assert set(obj["kbfs_tree"]) == {"algorithm", "block_size", "root"}
    assert obj["kbfs_tree"]["algorithm"] == "blake3-merkle-1" and obj["kbfs_tree"]["block_size"] == 65536
    vectors = json.loads((fixtures_dir / "tree-vectors-64k.json").read_text())["vectors"]
    assert obj["kbfs_tree"]["root"] == next(v["root"] for v in vectors if v["size"] == 1114115)
    legacy = {k: v for k, v in obj.items() if k != "kbfs_tree"}
    assert legacy == {"original_checksum": hashlib.sha1(data).hexdigest(), "original_size": len(data),
                      "original_fcs": "head1000-" + hashlib.sha1(data[:1000]).hexdigest(),
                      "original_path": str(tmp_path / "d" / "a.bin"), "prv_version": "0.11"}
    # The same shape as the original tool's own pointer fixture.
    original = json.loads((fixtures_dir / "legacy-content.bin.prv").read_text())
    assert list(legacy) == list(original)
    assert prv.parse_pointer(json.dumps(legacy)).tree is None
    folder = prv.create_prvdir(tmp_path / "d", block_size=65536)
    assert {q.tree.block_size for _, q in folder.walk() if q.tree} == {65536}
    again = prv.parse_prvdir(folder.to_json())
    assert [q for _, q in again.walk()] == [q for _, q in folder.walk()]
