"""The pointers a share hands out name its 64 KiB tree (issue 15), and older parts still work.

A real `kbfs share` tells a relay that says `features: ["root64"]` each file's 64 KiB tree
root (a 7th catalogue field); the relay's listings, and so `kbfs ls`, folder downloads,
`kbfs://` resolution, fsspec and `kbfs.open`, get 64 KiB-piece pointers read through the
piece cache. A share running older code sends 6 fields (a fake share here): its files are
listed with the 1 MiB tree, as before. A relay running older code says no such feature (a
fake relay here, speaking the control protocol to a real share): the share sends it 6 fields.
Hostile 7th fields are refused entry by entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import requests
import trio
import trio_websocket

import kbfs
from kbfs import bulk, client, protocol, prv, tree

try:
    from tests import hostileutil, netutil
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import hostileutil  # type: ignore[no-redef]
    import netutil  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(120)

PIECE = 65536
MiB = 1 << 20
OLD_KEYS = ["original_checksum", "original_size", "original_fcs", "original_path", "prv_version"]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("sharepointers")
    data = base / "data"
    files = {"big.bin": random.Random(1).randbytes(3 * MiB + 5),
             "sub/small.txt": b"hello pieces\n", "empty.bin": b""}
    for rel, body in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(body)
    with netutil.start_relay(base) as relay, netutil.start_share(data, relay.url, base) as sh:
        yield {"relay": relay, "share": sh, "files": files, "base": base}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for k in list(os.environ):
        if k.startswith("KBFS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    e = {k: v for k, v in os.environ.items() if not k.startswith("KBFS_")}
    e.update(XDG_CONFIG_HOME=str(tmp_path / "config"), KBFS_CACHE_DIR=str(tmp_path / "cache"))
    return e


def _url(net: dict[str, Any], path: str = "") -> str:
    return protocol.kbfs_url(net["relay"].url, net["share"].id, path)


def test_listing_pointers_name_the_64k_tree(net: dict[str, Any]) -> None:
    """Every listed file's pointer: the original tools' keys first (what they read), then
    kbfs_tree with block_size 65536 and the 64 KiB tree's root of the bytes on disk."""
    relay, sid = net["relay"].url, net["share"].id
    for folder in ("", "sub"):
        listing = requests.get(f"{relay}/s/{sid}/list/{folder}", timeout=10).json()
        assert listing["files"]
        for entry in listing["files"]:
            rel = f"{folder}/{entry['name']}" if folder else entry["name"]
            body = net["files"][rel]
            obj = entry["prv"]
            assert list(obj) == [*OLD_KEYS, "kbfs_tree"]
            assert obj["original_checksum"] == hashlib.sha1(body).hexdigest()
            assert obj["kbfs_tree"] == {"algorithm": "blake3-merkle-1", "block_size": PIECE,
                                        "root": tree.tree_of_bytes(body, PIECE)[1]}


def test_readers_of_listings_get_64k_pointers(net: dict[str, Any], tmp_path: Path) -> None:
    """kbfs:// resolution, kbfs.open, folder listings and walks (kbfs/bulk.py): the 64 KiB
    tree, read through the piece cache."""
    cache = str(tmp_path / "cache")
    r = client.resolve(_url(net, "big.bin"), cache_dir=cache)
    big = net["files"]["big.bin"]
    assert (r.ref.block_size, r.ref.root) == (PIECE, tree.tree_of_bytes(big, PIECE)[1])
    with kbfs.open(_url(net, "big.bin"), cache_dir=cache, local=False) as f:
        f.seek(MiB + 3)
        assert f.read(4096) == big[MiB + 3:MiB + 4099]
        f.seek(0)
        assert f.read() == big
    c = client.get_client(cache_dir=cache)
    assert c.pieces.statistics()["fetches"] >= 1  # the piece cache served it, by proofs
    walked = dict(bulk.walk_files(c, _url(net)))
    assert sorted(walked) == sorted(net["files"])
    for rel, res in walked.items():
        assert res.ref.block_size == PIECE
        assert res.ref.root == tree.tree_of_bytes(net["files"][rel], PIECE)[1]
    listed = {e.name: e for e in bulk.list_folder(c, _url(net))}
    big_entry = listed["big.bin"].pointer
    assert big_entry is not None and big_entry.tree == prv.TreeRef(r.ref.root or "", PIECE)


def test_cli_and_fsspec_read_64k_pointers_of_a_share(net: dict[str, Any], tmp_path: Path,
                                                     env: dict[str, str]) -> None:
    """`kbfs ls`, `kbfs download` of a folder and of one file, fsspec's kbfs:// ls and open."""
    run = [sys.executable, "-m", "kbfs"]
    ls = subprocess.run([*run, "ls", "--json", _url(net)], env=env, capture_output=True,
                        timeout=60)
    assert ls.returncode == 0, ls.stderr.decode()
    names = {e["name"]: e for e in json.loads(ls.stdout)}
    assert names["big.bin"]["sha1"] == hashlib.sha1(net["files"]["big.bin"]).hexdigest()
    out = tmp_path / "got"
    d = subprocess.run([*run, "download", _url(net), "--no-local", "-o", str(out)], env=env,
                       capture_output=True, timeout=60)
    assert d.returncode == 0, d.stderr.decode()
    for rel, body in net["files"].items():
        assert (out / rel).read_bytes() == body, rel
    assert os.path.isdir(tmp_path / "cache" / "pieces")  # through the piece cache
    fs = fsspec.filesystem("kbfs", cache_dir=str(tmp_path / "cache2"), local=False)
    top = {posix.rsplit("/", 1)[-1]: e for e in fs.ls(_url(net), detail=True)
           for posix in [e["name"].rstrip("/")]}
    assert top["big.bin"]["size"] == len(net["files"]["big.bin"])
    with fs.open(_url(net, "sub/small.txt")) as f:
        assert f.read() == net["files"]["sub/small.txt"]


# ---------------------------------------------------------------- an older share (6 fields)


def _entry(name: str, body: bytes, *root64: Any) -> list[Any]:
    return [name, hashlib.sha1(body).hexdigest(), len(body), 0, "", tree.tree_of_bytes(body)[1],
            *root64]


def test_catalogue_of_an_older_share_lists_1mib_pointers(tmp_path: Path) -> None:
    """6 fields (a share before 64 KiB trees) or a null 7th: the 1 MiB tree, as before; a
    7th field of 64 hex digits: the 64 KiB tree. A hostile 7th field (or an 8th) drops that
    entry alone, with a log line; kbfs:// resolution takes what the listing says."""
    body = b"x" * (MiB + 3)
    root64 = tree.tree_of_bytes(body, PIECE)[1]
    good = [_entry("old.bin", body), _entry("null.bin", body, None),
            _entry("new.bin", body, root64)]
    hostile = [_entry(f"bad{i}.bin", body, bad) for i, bad in enumerate(
        ["", root64[:63], root64 + "0", root64.upper(), "g" * 64, root64 + "\n", 7, [root64],
         {"root": root64}, True])] + [_entry("eight.bin", body, root64, root64)]
    with netutil.start_relay(tmp_path) as relay:
        async def main() -> dict[str, Any]:
            async with hostileutil.fake_share(relay.url, good + hostile) as fs:
                with trio.fail_after(10):
                    while True:
                        r = await trio.to_thread.run_sync(lambda: requests.get(
                            f"{relay.url}/s/{fs.id}/list/", timeout=5))
                        if r.status_code == 200 and r.json()["files"]:
                            break
                        await trio.sleep(0.05)
                resolved = await trio.to_thread.run_sync(lambda: {
                    n: client.resolve(protocol.kbfs_url(relay.url, fs.id, n),
                                      cache_dir=str(tmp_path / "cache")).ref
                    for n in ("old.bin", "new.bin")})
                return {"listing": r.json(), "refs": resolved}

        got = trio.run(main)
        log = hostileutil.log_text(relay)
    trees = {e["name"]: e["prv"]["kbfs_tree"] for e in got["listing"]["files"]}
    assert sorted(trees) == ["new.bin", "null.bin", "old.bin"]
    v1 = {"algorithm": "blake3-merkle-1", "block_size": MiB, "root": tree.tree_of_bytes(body)[1]}
    assert trees["old.bin"] == trees["null.bin"] == v1
    assert trees["new.bin"] == {"algorithm": "blake3-merkle-1", "block_size": PIECE, "root": root64}
    assert (got["refs"]["old.bin"].block_size, got["refs"]["new.bin"].block_size) == (MiB, PIECE)
    assert log.count("skipped a catalogue entry") == len(hostile)
    assert "root64 must be 64 lowercase hex digits" in log


# ---------------------------------------------------------------- an older relay


async def _old_relay_catalogue(data: Path, tmp_path: Path, features: list[str] | None
                               ) -> list[list[Any]]:
    """A relay speaking the control protocol on 127.0.0.1:0 (welcome with FEATURES, or
    without the key as relays before 64 KiB pointers); a real `kbfs share` connects to it.
    Returns the catalogue entries it sends after its scan."""
    got: list[list[Any]] = []
    done = trio.Event()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message(json.dumps({"type": "challenge", "version": 1,
                                          "challenge": "A" * 44}))
        hello = json.loads(await ws.get_message())
        welcome: dict[str, Any] = {"type": "welcome", "id": hello["id"], "upload_secret": "s",
                                   "upload_path": protocol.UPLOAD_PATH}
        if features is not None:
            welcome["features"] = features
        await ws.send_message(json.dumps(welcome))
        try:
            while True:
                msg = json.loads(await ws.get_message())
                if msg.get("type") == "files":
                    got.extend(msg.get("add") or [])
                    if msg.get("scanning") is False and got:
                        done.set()
                elif msg.get("type") == "ping":
                    await ws.send_message(json.dumps({"type": "pong", "t": msg.get("t")}))
        except trio_websocket.ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
        url = f"http://127.0.0.1:{server.port}"
        sh = await trio.to_thread.run_sync(
            lambda: netutil.start_share(data, url, tmp_path, wait=False))
        try:
            with trio.fail_after(30):
                await done.wait()
        finally:
            await trio.to_thread.run_sync(sh.stop)
            nursery.cancel_scope.cancel()
    return got


@pytest.mark.parametrize("features", [None, [], ["other"], ["root64"]])
def test_share_sends_root64_only_to_a_relay_that_takes_it(tmp_path: Path,
                                                          features: list[str] | None) -> None:
    """An older relay refuses 7-field entries (every file would vanish from it): the share
    sends 6 unless the welcome lists "root64"; then the 7th is the 64 KiB tree's root."""
    data = tmp_path / "data"
    data.mkdir()
    body = random.Random(2).randbytes(2 * MiB + 9)
    (data / "f.bin").write_bytes(body)
    entries = trio.run(_old_relay_catalogue, data, tmp_path, features)
    assert [e[0] for e in entries] == ["f.bin"]
    want = ["f.bin", hashlib.sha1(body).hexdigest(), len(body)]
    assert entries[0][:3] == want and entries[0][5] == tree.tree_of_bytes(body)[1]
    if features and protocol.FEATURE_ROOT64 in features:
        assert len(entries[0]) == 7 and entries[0][6] == tree.tree_of_bytes(body, PIECE)[1]
    else:
        assert len(entries[0]) == 6
