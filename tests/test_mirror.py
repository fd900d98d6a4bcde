"""Static mirrors (docs/mirrors.md) with real processes: `kbfs mirror export` into a folder
served by Debian's nginx, read back by `kbfs cat` / `download` (v1 and v2 pointers), `kbfs
mirror verify`, resumption, bad input, and lying mirrors (tests/lyingmirror.py) passed over
for an honest one. The S3 side is tests/test_mirror_s3.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kbfs import mirrorurl, prv, tree
from tests.lyingmirror import NGINX, LyingMirror, Nginx

pytestmark = pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx (nginx-light) missing")

REPO = str(Path(__file__).resolve().parent.parent)
SIZE = 3 * (1 << 20) + 12345  # four 1 MiB blocks (the last partial), 49 64 KiB pieces
TOKEN = "kbfs1.eyJzIjoidmljNGFscmRtZnNhZWJhYzVub2FrdzVpcTJ5dnM3cXoiLCJlIjowfQ.bWFj"


def kbfs(tmp: Path, *args: str, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("KBFS_", "AWS_"))}
    e.update(PYTHONPATH=REPO, XDG_CONFIG_HOME=str(tmp / "config"), HOME=str(tmp / "home"),
             KBFS_CACHE_DIR=str(tmp / f"cache-{os.urandom(4).hex()}"))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "kbfs", *args], capture_output=True,
                          timeout=timeout, env=e, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def content(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("mirror")
    data = os.urandom(SIZE)
    (d / "data.bin").write_bytes(data)
    (d / "small.txt").write_bytes(b"hello mirror\n")
    for name, bs in (("v2", 1 << 16), ("v1", tree.BLOCK_SIZE)):
        p = prv.create_pointer(d / "data.bin", block_size=bs)
        (d / f"{name}.prv").write_text(p.to_json())
    (d / "small.prv").write_text(prv.create_pointer(d / "small.txt").to_json())
    out = d / "exported"
    r = kbfs(d, "mirror", "export", str(d / "v2.prv"), str(d / "v1.prv"), str(d / "small.prv"),
             str(out))
    assert r.returncode == 0, r.stderr
    # The readers must not find the original: copies for the hostile tests read the mirror.
    moved = d / "pointers"
    moved.mkdir()
    for name in ("v2", "v1", "small"):
        obj = json.loads((d / f"{name}.prv").read_text())
        obj["original_path"] = "/nonexistent/" + name
        (moved / f"{name}.prv").write_text(json.dumps(obj))
    return {"dir": d, "data": data, "out": out, "ptr": moved}


def test_export_layout_and_index(content: dict[str, object]) -> None:
    out = content["out"]
    assert isinstance(out, Path)
    p = prv.load_pointer(content["ptr"] / "v2.prv")  # type: ignore[operator]
    assert (out / mirrorurl.data_key(p.sha1)).read_bytes() == content["data"]
    for bs in mirrorurl.BLOCK_SIZES:
        ob = (out / mirrorurl.outboard_key(p.sha1, bs)).read_bytes()
        n = tree.block_count(SIZE, bs)
        assert ob[: 32 * n] == b"".join(tree.leaf_hash(content["data"][i * bs:(i + 1) * bs])  # type: ignore[index]
                                        for i in range(n))
    index = json.loads((out / mirrorurl.INDEX_KEY).read_text())
    assert index["format"] == mirrorurl.FORMAT
    entry = index["objects"][p.sha1]
    assert entry["size"] == SIZE and entry["roots"]["65536"] == p.tree.root  # type: ignore[union-attr]
    assert not list(out.rglob(".*.part"))


def test_nginx_serves_the_folder_to_every_reader(content: dict[str, object], tmp_path: Path) -> None:
    """nginx serves the exported folder as it is; cat and download of v1 and v2 pointers
    read only from it (no relay anywhere), byte-exact; the reader's token goes nowhere."""
    ptr, data = content["ptr"], content["data"]
    assert isinstance(ptr, Path) and isinstance(data, bytes)
    with Nginx(content["out"], tmp_path) as web:  # type: ignore[arg-type]
        for name in ("v2", "v1"):
            r = kbfs(tmp_path, "cat", "--mirror", web.url, "--token", TOKEN, str(ptr / f"{name}.prv"))
            assert r.returncode == 0, r.stderr
            assert r.stdout == data
            r = kbfs(tmp_path, "cat", "--mirror", web.url, str(ptr / f"{name}.prv"),
                     "--offset", "2000000", "--length", "70000")
            assert r.stdout == data[2000000:2070000], r.stderr
            target = tmp_path / f"{name}.out"
            r = kbfs(tmp_path, "download", "--mirror", web.url, str(ptr / f"{name}.prv"), "-o",
                     str(target), env={"KBFS_TOKEN": TOKEN})
            assert r.returncode == 0, r.stderr
            assert target.read_bytes() == data
        # KBFS_MIRRORS and the config file name mirrors too.
        r = kbfs(tmp_path, "cat", str(ptr / "small.prv"), env={"KBFS_MIRRORS": web.url})
        assert r.stdout == b"hello mirror\n", r.stderr
        (tmp_path / "config" / "kbfs").mkdir(parents=True)
        (tmp_path / "config" / "kbfs" / "config.json").write_text(json.dumps({"mirrors": [web.url]}))
        r = kbfs(tmp_path, "cat", str(ptr / "small.prv"))
        assert r.stdout == b"hello mirror\n", r.stderr
        log = web.requests()
        assert any("range=[bytes=" in line and " 206" in line for line in log)
        assert all("auth=[-]" in line for line in log), [x for x in log if "auth=[-]" not in x]
        # A v2 read is data + tree nodes, each a single range (as S3 and GCS answer).
        assert any("/outboard/65536/" in line for line in log)


def test_pointer_hint_names_the_mirror(content: dict[str, object], tmp_path: Path) -> None:
    ptr = content["ptr"]
    assert isinstance(ptr, Path)
    with Nginx(content["out"], tmp_path) as web:  # type: ignore[arg-type]
        obj = json.loads((ptr / "v2.prv").read_text())
        obj[mirrorurl.MIRRORS_KEY] = ["http://user:pw@127.0.0.1:1", "ftp://x", web.url]
        hinted = tmp_path / "hinted.prv"
        hinted.write_text(json.dumps(obj))
        r = kbfs(tmp_path, "cat", str(hinted))
        assert r.returncode == 0, r.stderr
        assert r.stdout == content["data"]
        assert b"pw" not in r.stderr  # the dropped hint's password is not echoed


@pytest.mark.parametrize("mode", ["wrong_bytes", "wrong_nodes", "short", "missing", "no_range",
                                  "huge", "forbidden"])
@pytest.mark.parametrize("name", ["v2", "v1"])
def test_lying_mirror_is_passed_over(content: dict[str, object], tmp_path: Path, mode: str,
                                     name: str) -> None:
    """A mirror listed first that lies is detected, and the honest one after it serves."""
    ptr, data = content["ptr"], content["data"]
    assert isinstance(ptr, Path)
    with LyingMirror(content["out"], mode) as liar, Nginx(content["out"], tmp_path) as web:  # type: ignore[arg-type]
        r = kbfs(tmp_path, "cat", "--mirror", liar.url, "--mirror", web.url, "--token", TOKEN,
                 str(ptr / f"{name}.prv"))
        assert r.returncode == 0, r.stderr
        assert r.stdout == data
        assert liar.seen, "the lying mirror was not asked at all"
        assert not any("authorization" in h for h in liar.seen)


@pytest.mark.parametrize("mode", ["wrong_bytes", "wrong_nodes", "no_range", "huge"])
def test_lying_mirror_alone_never_gives_wrong_bytes(content: dict[str, object], tmp_path: Path,
                                                    mode: str) -> None:
    ptr = content["ptr"]
    assert isinstance(ptr, Path)
    with LyingMirror(content["out"], mode) as liar:  # type: ignore[arg-type]
        # A part of a v2 file needs more of the nodes than the whole file.
        for name, part in (("v2", ()), ("v1", ()), ("v2", ("--offset", "2000000", "--length", "70000"))):
            r = kbfs(tmp_path, "cat", "--mirror", liar.url, str(ptr / f"{name}.prv"), *part)
            assert r.returncode == 1, (name, r.stderr)
            assert r.stdout == b"" or content["data"].startswith(r.stdout)  # type: ignore[union-attr]
            assert r.stderr.splitlines()[-1].startswith(b"kbfs: error: "), r.stderr
            assert b"Traceback" not in r.stderr, r.stderr


def test_verify_reports_missing_and_wrong(content: dict[str, object], tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(content["out"], out)  # type: ignore[arg-type]
    ptr = content["ptr"]
    assert isinstance(ptr, Path)
    p = prv.load_pointer(ptr / "v2.prv")
    small = prv.load_pointer(ptr / "small.prv")
    with Nginx(out, tmp_path) as web:
        r = kbfs(tmp_path, "mirror", "verify", web.url)
        assert r.returncode == 0, r.stderr + r.stdout
        r = kbfs(tmp_path, "mirror", "verify", web.url, str(ptr / "v1.prv"))
        assert r.returncode == 0, r.stderr + r.stdout
        data = out / mirrorurl.data_key(p.sha1)
        blob = bytearray(data.read_bytes())
        blob[1234567] ^= 1
        data.write_bytes(bytes(blob))
        node = out / mirrorurl.outboard_key(small.sha1, 65536)
        node.write_bytes(b"\0" * len(node.read_bytes()))
        os.unlink(out / mirrorurl.outboard_key(small.sha1, tree.BLOCK_SIZE))
        for args in ((), (str(ptr / "v2.prv"), str(ptr / "small.prv"))):
            r = kbfs(tmp_path, "mirror", "verify", web.url, *args)
            assert r.returncode == 1
            lines = r.stdout.decode().splitlines()
            assert any(x.startswith(f"wrong {mirrorurl.data_key(p.sha1)}") and "SHA-1" in x
                       for x in lines), lines
            assert f"wrong {mirrorurl.outboard_key(small.sha1, 65536)}: node (0, 0) is wrong" in lines
            assert f"missing {mirrorurl.outboard_key(small.sha1, tree.BLOCK_SIZE)}" in lines
        os.unlink(data)
        r = kbfs(tmp_path, "mirror", "verify", web.url, str(ptr / "v2.prv"))
        assert r.returncode == 1 and r.stdout.decode().startswith(f"missing {mirrorurl.data_key(p.sha1)}")


def test_export_resumes_and_refuses_bad_input(content: dict[str, object], tmp_path: Path) -> None:
    d, ptr = content["dir"], content["ptr"]
    assert isinstance(d, Path) and isinstance(ptr, Path)
    out = tmp_path / "m"
    # A folder of pointers (the original file is there: read as a verified local copy).
    folder = tmp_path / "pointers"
    folder.mkdir()
    for name in ("v2", "v1", "small"):
        shutil.copy(d / f"{name}.prv", folder / f"{name}.prv")
    r = kbfs(tmp_path, "mirror", "export", str(folder), str(out))
    assert r.returncode == 0, r.stderr
    assert b"0 already there" in r.stderr
    r = kbfs(tmp_path, "mirror", "export", str(folder), str(out))
    assert r.returncode == 0 and b"0 B written" in r.stderr, r.stderr
    # Killed between the data and the outboards: the outboards are made again.
    p = prv.load_pointer(ptr / "v2.prv")
    os.unlink(out / mirrorurl.outboard_key(p.sha1, 65536))
    r = kbfs(tmp_path, "mirror", "export", str(d / "v2.prv"), str(out))
    assert r.returncode == 0, r.stderr
    assert (out / mirrorurl.outboard_key(p.sha1, 65536)).read_bytes() == \
        (content["out"] / mirrorurl.outboard_key(p.sha1, 65536)).read_bytes()  # type: ignore[operator]
    # Bad input: one line, exit 1, no traceback.
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "bad.prv"
    bad.write_text("{not json")
    for args in ((str(d / "v2.prv"), str(tmp_path / "afile")), (str(bad), str(out)),
                 ("sha1://zz", str(out)), (str(d / "v2.prv"), "http://x/y")):
        r = kbfs(tmp_path, "mirror", "export", *args)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.count(b"\n") == 1 and r.stderr.startswith(b"kbfs: error: "), r.stderr
    for args in (("verify", "ftp://x"), ("verify", "http://u:p@h/")):
        r = kbfs(tmp_path, "mirror", *args)
        assert r.returncode == 1 and r.stderr.startswith(b"kbfs: error: "), r.stderr
        assert b"p@" not in r.stderr
    r = kbfs(tmp_path, "cat", "--mirror", "http://a/../b", str(ptr / "small.prv"))
    assert r.returncode == 1 and r.stderr.startswith(b"kbfs: error: --mirror"), r.stderr


def test_relay_advertises_its_mirror(content: dict[str, object], tmp_path: Path) -> None:
    """`kbfs relay --mirror URL`: /api/find lists it, and a reader of the relay takes the
    bytes from the mirror (nginx), not from the share behind the relay."""
    from tests.netutil import get_json, start_relay, start_share

    share_dir = tmp_path / "lab-folder"
    share_dir.mkdir()
    shutil.copy(content["dir"] / "data.bin", share_dir / "data.bin")  # type: ignore[operator]
    p = prv.load_pointer(content["ptr"] / "v1.prv")  # type: ignore[operator]
    with Nginx(content["out"], tmp_path) as web:  # type: ignore[arg-type]
        relay = start_relay(tmp_path, "--mirror", web.url)
        try:
            share = start_share(share_dir, relay.url, tmp_path)
            try:
                found = get_json(f"{relay.url}/api/find/{p.sha1}")
                assert found["mirrors"] == [web.url]
                before = get_json(relay.url + "/api/health")["bytes_out"]
                r = kbfs(tmp_path, "cat", "--relay", relay.url, f"sha1://{p.sha1}")
                assert r.returncode == 0, r.stderr
                assert r.stdout == content["data"]
                assert get_json(relay.url + "/api/health")["bytes_out"] == before
                assert any(f"/data/{p.sha1[:2]}/{p.sha1}" in x for x in web.requests())
            finally:
                share.stop()
        finally:
            relay.stop()
    r = kbfs(tmp_path, "relay", "--host", "127.0.0.1", "--port", "0", "--mirror", "ftp://x")
    assert r.returncode == 1 and r.stderr.startswith(b"kbfs: error: --mirror"), r.stderr
