"""`kbfs prv ...`, `--version`, `--help`, run as a real `kbfs` process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import kbfs
from kbfs import prv, tree

KBFS = os.path.join(os.path.dirname(sys.executable), "kbfs")
MakeFile = Callable[..., bytes]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KBFS, *args], cwd=cwd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kbfs: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_version_and_help() -> None:
    r = run("--version")
    assert r.returncode == 0
    assert kbfs.__version__ in r.stdout
    r = run("--help")
    assert r.returncode == 0
    assert "prv" in r.stdout and "Usage" in r.stdout
    r = run("prv", "--help")
    assert r.returncode == 0
    for verb in ("create", "info", "verify"):
        assert verb in r.stdout


def test_create_file_default_output(tmp_path: Path, make_file: MakeFile) -> None:
    data = make_file(tmp_path / "x.bin", tree.BLOCK_SIZE + 11, seed=1)
    r = run("prv", "create", "x.bin", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "x.bin.prv"
    p = prv.load_pointer(tmp_path / "x.bin.prv")
    assert p.sha1 == hashlib.sha1(data).hexdigest()
    assert p.size == len(data)
    assert p.original_path == str(tmp_path / "x.bin")
    # The default tree: 64 KiB pieces (issue 15), not the 1 MiB of older pointers.
    assert p.tree == prv.TreeRef(tree.tree_of_bytes(data, 65536)[1], 65536)
    assert not (tmp_path / "x.bin.prv.tmp").exists()


def test_default_pointer_is_what_old_tools_read(tmp_path: Path, fixtures_dir: Path) -> None:
    """The default (64 KiB) pointer of the fixture's content, less `kbfs_tree` (which the
    original tools ignore) and with the fixture's original_path, is byte for byte the
    ml-prv-create pointer in tests/fixtures; kbfs_tree comes last."""
    (tmp_path / "legacy-content.bin").write_bytes((fixtures_dir / "legacy-content.bin").read_bytes())
    r = run("prv", "create", "--no-hints", "legacy-content.bin", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    obj = json.loads((tmp_path / "legacy-content.bin.prv").read_text())
    assert list(obj)[-1] == "kbfs_tree" and obj["kbfs_tree"]["block_size"] == 65536
    fixture = fixtures_dir / "legacy-content.bin.prv"
    old = {k: v for k, v in obj.items() if k != "kbfs_tree"}
    old["original_path"] = json.loads(fixture.read_text())["original_path"]
    assert json.dumps(old, indent=4).encode() == fixture.read_bytes()
    # What an old tool reads from it: every key it knows, the same values.
    legacy = prv.load_pointer(fixture)
    ours = prv.load_pointer(tmp_path / "legacy-content.bin.prv")
    assert (ours.sha1, ours.size, ours.fcs, ours.prv_version) == (
        legacy.sha1, legacy.size, legacy.fcs, legacy.prv_version)


@pytest.mark.parametrize("flag,bs", [("1048576", 1 << 20), ("1M", 1 << 20), ("4096", 4096),
                                     ("256K", 1 << 18), ("1G", 1 << 30), ("65536", 65536)])
def test_create_block_size_chooses(tmp_path: Path, make_file: MakeFile, flag: str, bs: int) -> None:
    """--block-size still chooses any power of two from 4 KiB to 1 GiB; 1M is the v1 tree."""
    data = make_file(tmp_path / "x.bin", 2 * tree.BLOCK_SIZE + 7, seed=5)
    r = run("prv", "create", "--no-hints", "--block-size", flag, "x.bin", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    p = prv.load_pointer(tmp_path / "x.bin.prv")
    assert p.tree == prv.TreeRef(tree.tree_of_bytes(data, bs)[1], bs)
    assert run("prv", "verify", "x.bin.prv", "x.bin", cwd=tmp_path).returncode == 0


def test_create_with_output(tmp_path: Path, make_file: MakeFile) -> None:
    make_file(tmp_path / "x.bin", 10)
    out = tmp_path / "elsewhere.prv"
    r = run("prv", "create", str(tmp_path / "x.bin"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert prv.load_pointer(out).size == 10
    assert not (tmp_path / "x.bin.prv").exists()


def test_create_writes_into_the_current_folder(tmp_path: Path, make_file: MakeFile) -> None:
    """Not next to the data: the data's folder may be shared, and a pointer written there
    would be shared as data too."""
    make_file(tmp_path / "data" / "x.bin", 10)
    make_file(tmp_path / "data" / "d" / "a.bin", 10)
    (tmp_path / "here").mkdir()
    for what, name in (("x.bin", "x.bin.prv"), ("d", "d.prvdir"), ("d/", "d.prvdir")):
        r = run("prv", "create", str(tmp_path / "data" / what), cwd=tmp_path / "here")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == name
        assert (tmp_path / "here" / name).is_file()
    assert sorted(os.listdir(tmp_path / "data")) == ["d", "x.bin"]


def test_create_folder(tmp_path: Path, make_file: MakeFile) -> None:
    make_file(tmp_path / "d" / "a.bin", 100, seed=1)
    make_file(tmp_path / "d" / "s" / "b.bin", 200, seed=2)
    make_file(tmp_path / "d" / ".hidden", 3)
    r = run("prv", "create", str(tmp_path / "d") + "/", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = prv.load_prvdir(tmp_path / "d.prvdir")
    assert sorted(rel for rel, _ in d.walk()) == ["a.bin", "s/b.bin"]


def test_info(tmp_path: Path, make_file: MakeFile, fixtures_dir: Path) -> None:
    make_file(tmp_path / "x.bin", 5000, seed=3)
    assert run("prv", "create", str(tmp_path / "x.bin"), cwd=tmp_path).returncode == 0
    p = prv.load_pointer(tmp_path / "x.bin.prv")
    assert p.tree is not None

    r = run("prv", "info", str(tmp_path / "x.bin.prv"))
    assert r.returncode == 0, r.stderr
    assert p.sha1 in r.stdout and "5000" in r.stdout and p.tree.root in r.stdout

    r = run("prv", "info", "--json", str(tmp_path / "x.bin.prv"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == p.to_dict()

    r = run("prv", "info", str(fixtures_dir / "legacy-content.bin.prv"))
    assert r.returncode == 0, r.stderr
    assert "e6937aa016bc06eda81d3b227fffde825d881ce5" in r.stdout
    assert "tree:      none" in r.stdout

    r = run("prv", "info", str(fixtures_dir / "legacy-tree.prvdir"))
    assert r.returncode == 0, r.stderr
    assert "2 files" in r.stdout and "sub/copy.bin" in r.stdout


def test_verify(tmp_path: Path, make_file: MakeFile, fixtures_dir: Path) -> None:
    make_file(tmp_path / "x.bin", 3000, seed=4)
    assert run("prv", "create", str(tmp_path / "x.bin"), cwd=tmp_path).returncode == 0
    r = run("prv", "verify", str(tmp_path / "x.bin.prv"), str(tmp_path / "x.bin"))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout

    make_file(tmp_path / "other.bin", 3000, seed=5)
    r = run("prv", "verify", str(tmp_path / "x.bin.prv"), str(tmp_path / "other.bin"))
    assert r.returncode == 1
    assert "does not match" in r.stderr and "SHA-1" in r.stderr
    assert "Traceback" not in r.stderr

    # A pointer of the original tools is checked by its whole-file SHA-1.
    r = run(
        "prv",
        "verify",
        str(fixtures_dir / "legacy-content.bin.prv"),
        str(fixtures_dir / "legacy-content.bin"),
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"not json at all", "not valid JSON"),
        (b'{"original_checksum": "abc", "original_size": 1}', "original_checksum"),
        (b'{"original_checksum": "' + b"a" * 40 + b'", "original_size": -1}', "original_size"),
        (b" " * (prv.MAX_POINTER_BYTES + 1), "larger than"),
    ],
    ids=["not-json", "short-sha1", "negative-size", "oversized"],
)
@pytest.mark.parametrize("command", ["info", "verify"])
def test_bad_pointer_is_one_line(
    tmp_path: Path, make_file: MakeFile, content: bytes, needle: str, command: str
) -> None:
    bad = tmp_path / "bad.prv"
    bad.write_bytes(content)
    make_file(tmp_path / "x.bin", 1)
    args = [str(bad)] if command == "info" else [str(bad), str(tmp_path / "x.bin")]
    assert_one_error_line(run("prv", command, *args), str(bad), needle)


def test_bad_prvdir_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.prvdir"
    bad.write_text(json.dumps({"files": {"..": {}}, "dirs": {}}))
    assert_one_error_line(run("prv", "info", str(bad)), str(bad), "invalid entry name")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.prv"
    bad.write_text("nope")
    r = run("--debug", "prv", "info", str(bad))
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "PointerError" in r.stderr


def test_unwritable_output_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"abc")
    # The output folder does not exist: an OSError, reported as one line.
    r = run("prv", "create", str(tmp_path / "x.bin"), "-o", str(tmp_path / "missing" / "x.prv"))
    assert_one_error_line(r, "No such file or directory")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["prv", "info", "{tmp}/missing.prv"], "No such file or directory"),
        (["prv", "info", "{tmp}"], "Is a directory"),
        (["prv", "verify", "{tmp}/missing.prv", "{tmp}/x.bin"], "No such file or directory"),
        (["prv", "create", "{tmp}/missing.bin"], "No such file or directory"),
    ],
    ids=["info-missing", "info-folder", "verify-missing", "create-missing"],
)
def test_missing_paths_are_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    (tmp_path / "x.bin").write_bytes(b"x")
    filled = [a.format(tmp=tmp_path) for a in args]
    assert_one_error_line(run(*filled), filled[2], needle)


def test_create_is_silent_when_not_a_terminal(tmp_path: Path, make_file: MakeFile) -> None:
    make_file(tmp_path / "x.bin", 2 * tree.BLOCK_SIZE)
    r = run("prv", "create", str(tmp_path / "x.bin"), cwd=tmp_path)
    assert r.returncode == 0
    assert r.stderr == ""


def _formula_bytes(size: int) -> bytes:
    period = bytes((31 * i + 7) % 251 for i in range(251))
    return (period * (size // 251 + 1))[:size]


@pytest.mark.parametrize("flag", ["65536", "64K", "64KiB"])
def test_create_block_size_64k_matches_the_vectors(tmp_path: Path, fixtures_dir: Path, flag: str) -> None:
    """`prv create --block-size 65536` writes a 64 KiB tree whose root is the vector's; `prv
    info` says so; a folder pointer gets 64 KiB trees for every file; so does the default;
    `--block-size 1M` writes the 1 MiB tree of older pointers."""
    vectors = json.loads((fixtures_dir / "tree-vectors-64k.json").read_text())["vectors"]
    v = next(v for v in vectors if v["size"] == 1114115)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "v.bin").write_bytes(_formula_bytes(v["size"]))
    r = run("prv", "create", "--no-hints", "--block-size", flag, "d/v.bin", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    p = prv.load_pointer(tmp_path / "v.bin.prv")
    assert p.tree == prv.TreeRef(v["root"], 65536)
    r = run("prv", "info", "v.bin.prv", cwd=tmp_path)
    assert r.returncode == 0 and "65536-byte blocks (64 KiB pieces)" in r.stdout
    assert f"root {v['root']}" in r.stdout
    r = run("prv", "verify", "v.bin.prv", "d/v.bin", cwd=tmp_path)
    assert r.returncode == 0, r.stderr

    r = run("prv", "create", "--no-hints", "--block-size", flag, "d", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    folder = prv.load_prvdir(tmp_path / "d.prvdir")
    assert folder.files["v.bin"].tree == prv.TreeRef(v["root"], 65536)
    r = run("prv", "info", "d.prvdir", cwd=tmp_path)
    assert r.returncode == 0 and "65536-byte blocks" in r.stdout

    r = run("prv", "create", "--no-hints", "-o", "default.prv", "d/v.bin", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert prv.load_pointer(tmp_path / "default.prv").tree == prv.TreeRef(v["root"], 65536)
    r = run("prv", "create", "--no-hints", "-o", "default.prvdir", "d", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert prv.load_prvdir(tmp_path / "default.prvdir").files["v.bin"].tree == p.tree

    r = run("prv", "create", "--no-hints", "--block-size", "1M", "-o", "v1.prv", "d/v.bin",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    q = prv.load_pointer(tmp_path / "v1.prv")
    assert q.tree is not None and q.tree.block_size == tree.BLOCK_SIZE
    assert q.tree.root == tree.tree_of_bytes(_formula_bytes(v["size"]))[1]
    assert "1048576-byte blocks (1 MiB)" in run("prv", "info", "v1.prv", cwd=tmp_path).stdout


@pytest.mark.parametrize("bad,needle", [
    ("1000", "power of two from 4096 to 2^30"),
    ("2048", "power of two from 4096 to 2^30"),
    ("65537", "power of two from 4096 to 2^30"),
    ("2G", "power of two from 4096 to 2^30"),
    ("big", "not a size"),
    ("-4096", "not a size"),
])
def test_create_bad_block_size_is_one_line(tmp_path: Path, make_file: MakeFile, bad: str,
                                           needle: str) -> None:
    make_file(tmp_path / "x.bin", 100)
    r = run("prv", "create", "--no-hints", f"--block-size={bad}", "x.bin", cwd=tmp_path)
    assert_one_error_line(r, "--block-size", needle)
    assert not (tmp_path / "x.bin.prv").exists()
