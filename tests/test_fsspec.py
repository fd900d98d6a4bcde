"""Real relay and share processes: the sha1:// and kbfs:// forms, through kbfs.open, the
command line and fsspec (`fsspec.open`, `ls`, `info`, `cat_file`).

One relay and one share (tests/netutil.py) serve a small folder for the whole module.
The share runs on this machine, so its pointers' original_path exists here: tests that
must go over the network pass `local=False` (or `--no-local`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
from netutil import RelayProc, ShareProc, start_relay, start_share

import kbfs
from kbfs import client, prv

MiB = 1 << 20


@dataclass
class Net:
    relay: RelayProc
    share: ShareProc
    data_dir: Path
    files: dict[str, bytes]

    @property
    def hostport(self) -> str:
        return self.relay.url.split("://", 1)[1]

    def kbfs_url(self, rel: str) -> str:
        return f"kbfs://{self.hostport}/{self.share.id}/{rel}"

    def sha1(self, rel: str) -> str:
        return hashlib.sha1(self.files[rel]).hexdigest()


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    tmp = tmp_path_factory.mktemp("net")
    data_dir = tmp / "data"
    files = {
        "top.bin": os.urandom(3 * MiB + 123),
        "sub/deep.bin": os.urandom(MiB + 1),
        "sub/more/tiny.txt": b"hello kbfs\n",
    }
    for rel, data in files.items():
        (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (data_dir / rel).write_bytes(data)
    relay = start_relay(tmp)
    try:
        share = start_share(data_dir, relay.url, tmp)
    except BaseException:
        relay.stop()
        raise
    try:
        yield Net(relay, share, data_dir, files)
    finally:
        share.stop()
        relay.stop()


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for var in ("KBFS_RELAY", "KBFS_CACHE_DIR", "KBFS_CACHE_SIZE", "KBFS_SEARCH_DIRS"):
        monkeypatch.delenv(var, raising=False)


# ---------------------------------------------------------------- kbfs.open and the CLI


def test_kbfs_uri_through_the_relay(net: Net, tmp_path: Path) -> None:
    url = net.kbfs_url("sub/deep.bin")
    cache_dir = str(tmp_path / "cache")
    r = client.resolve(url, cache_dir=cache_dir)
    assert r.name == "deep.bin" and r.ref.sha1 == net.sha1("sub/deep.bin")
    assert r.ref.root is not None  # the listing's pointer carries the block tree
    assert r.relays == (net.relay.url,)
    with kbfs.open(url, cache_dir=cache_dir, local=False) as f:
        assert f.read() == net.files["sub/deep.bin"]
    c = client.get_client(cache_dir=cache_dir)
    assert c.cache.cached_bytes(r.ref) == len(net.files["sub/deep.bin"])  # came over the network
    loc = client.locate(url, cache_dir=cache_dir)
    assert loc.urls[0].endswith(f"/s/{net.share.id}/file/sub/deep.bin")
    assert f"{net.relay.url}/sha1/{r.ref.sha1}" in loc.urls
    # A listing names the file by its path inside the share, never the share's folder on
    # its machine (issue 14, item 12): nothing local is found from it here.
    assert r.pointer is not None and r.pointer.original_path == "sub/deep.bin"
    assert loc.local == []


def test_prv_and_sha1_through_the_relay(net: Net, tmp_path: Path) -> None:
    sha1 = net.sha1("top.bin")
    ptr = tmp_path / "top.bin.prv"
    # The pointer the share's own machine would write; its original is not used (local=False).
    ptr.write_text(prv.create_pointer(net.data_dir / "top.bin").to_json())
    s = {"relays": [net.relay.url], "cache_dir": str(tmp_path / "cache")}
    with kbfs.open(str(ptr), local=False, **s) as f:
        f.seek(MiB + 5)
        assert f.read(100) == net.files["top.bin"][MiB + 5:MiB + 105]
    with kbfs.open(f"sha1://{sha1}/top.bin", **s) as f:
        assert hashlib.sha1(f.read()).hexdigest() == sha1


def test_cli_download_and_cat_of_kbfs_uri(net: Net, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBFS_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), KBFS_CACHE_DIR=str(tmp_path / "cache"))
    url = net.kbfs_url("top.bin")
    out = tmp_path / "got.bin"
    proc = subprocess.run([sys.executable, "-m", "kbfs", "download", url, "--no-local", "-o",
                           str(out)], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.read_bytes() == net.files["top.bin"]
    proc = subprocess.run([sys.executable, "-m", "kbfs", "cat", net.kbfs_url("sub/more/tiny.txt"),
                           "--no-local", "--offset", "6"], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == b"kbfs\n", proc.stderr.decode()
    proc = subprocess.run([sys.executable, "-m", "kbfs", "cat", net.kbfs_url("nope.bin")],
                          env=env, capture_output=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.decode().count("\n") == 1
    assert "no such file" in proc.stderr.decode()


def test_relay_down_local_original_still_serves(tmp_path: Path, make_file: Any) -> None:
    """Own relay and share: stop both, the pointer's original_path still serves."""
    data_dir = tmp_path / "data"
    data = make_file(data_dir / "rec.bin", 2 * MiB + 7, seed=31)
    relay = start_relay(tmp_path)
    try:
        share = start_share(data_dir, relay.url, tmp_path)
        try:
            url = f"kbfs://{relay.url.split('://')[1]}/{share.id}/rec.bin"
            r = client.resolve(url, cache_dir=str(tmp_path / "cache"))
        finally:
            share.stop()
    finally:
        relay.stop()
    assert r.pointer is not None and r.pointer.original_path == "rec.bin"  # share-relative
    # The pointer as the share's own machine writes it (its absolute original_path).
    ptr = tmp_path / "rec.bin.prv"
    ptr.write_text(dataclasses.replace(r.pointer, original_path=str(data_dir / "rec.bin"))
                   .to_json())
    s = {"relays": [relay.url], "cache_dir": str(tmp_path / "cache")}
    with kbfs.open(str(ptr), **s) as f:
        assert f.read() == data
    assert kbfs.realize(str(ptr), **s) == str(data_dir / "rec.bin")
    assert prv.file_matches(data_dir / "rec.bin", r.pointer)[0]


# ---------------------------------------------------------------- fsspec


def test_protocols_are_registered() -> None:
    assert fsspec.get_filesystem_class("sha1") is client.Sha1FileSystem
    assert fsspec.get_filesystem_class("kbfs") is client.KbfsFileSystem


def test_entry_points_name_the_classes() -> None:
    """An installed kbfs registers both protocols without being imported first."""
    code = ("import fsspec; c = fsspec.get_filesystem_class('sha1'); "
            "k = fsspec.get_filesystem_class('kbfs'); print(c.__module__, c.__name__, k.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["kbfs.client", "Sha1FileSystem", "KbfsFileSystem"], proc.stderr


def test_fsspec_open_sha1(net: Net, tmp_path: Path) -> None:
    sha1 = net.sha1("top.bin")
    with fsspec.open(f"sha1://{sha1}/top.bin", "rb", relays=[net.relay.url],
                     cache_dir=str(tmp_path / "cache")) as f:
        assert f.read(10) == net.files["top.bin"][:10]
        f.seek(-10, io.SEEK_END)
        assert f.read() == net.files["top.bin"][-10:]
    fs = fsspec.filesystem("sha1", relays=[net.relay.url], cache_dir=str(tmp_path / "cache"))
    assert fs.size(f"sha1://{sha1}") == len(net.files["top.bin"])
    assert fs.cat_file(f"{sha1}/top.bin", start=5, end=25) == net.files["top.bin"][5:25]
    assert fs.info(sha1)["type"] == "file"
    with pytest.raises(FileNotFoundError):
        fs.info("00" * 20)
    with pytest.raises(PermissionError):
        fs.open(sha1, "wb")


def test_fsspec_open_kbfs(net: Net, tmp_path: Path) -> None:
    cache_dir = str(tmp_path / "cache")
    url = net.kbfs_url("sub/deep.bin")
    with fsspec.open(url, "rb", cache_dir=cache_dir, local=False) as f:
        assert f.read() == net.files["sub/deep.bin"]
    c = client.get_client(cache_dir=cache_dir)
    assert c.cache.statistics()["bytes_fetched"] >= len(net.files["sub/deep.bin"])
    with fsspec.open(net.kbfs_url("sub/more/tiny.txt"), "rt", cache_dir=cache_dir) as t:
        assert t.read() == "hello kbfs\n"


def test_fsspec_kbfs_listing(net: Net, tmp_path: Path) -> None:
    fs = fsspec.filesystem("kbfs", cache_dir=str(tmp_path / "cache"), local=False)
    top = f"{net.hostport}/{net.share.id}"
    entries = {e["name"]: e for e in fs.ls(f"kbfs://{top}")}
    assert entries[f"{top}/sub"]["type"] == "directory"
    assert entries[f"{top}/top.bin"]["size"] == len(net.files["top.bin"])
    assert entries[f"{top}/top.bin"]["sha1"] == net.sha1("top.bin")
    assert fs.ls(f"{top}/sub", detail=False) == [f"{top}/sub/more", f"{top}/sub/deep.bin"]
    assert fs.isdir(f"{top}/sub/more") and fs.isfile(f"{top}/sub/more/tiny.txt")
    assert not fs.exists(f"{top}/missing.bin")
    assert fs.cat_file(f"{top}/top.bin", start=MiB - 2, end=MiB + 2) == \
        net.files["top.bin"][MiB - 2:MiB + 2]
    assert fs.cat_file(f"{top}/top.bin", start=-4) == net.files["top.bin"][-4:]
