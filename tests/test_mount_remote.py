"""A real relay and a real share as processes, and a FUSE mount of `kbfs://HOST:PORT/SHARE_ID`.

The relay and the share are real processes (tests/netutil.py), stopped by their pids in
teardown; the mount is cleaned up by tests/mountutil.py.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mountutil import NEEDS_FUSE, isolated_env, mounted
from tests.netutil import ShareProc, start_relay, start_share

pytestmark = NEEDS_FUSE

MiB = 1 << 20


@dataclass
class Net:
    relay_url: str
    share_id: str
    data: Path
    share: ShareProc

    def source(self, sub: str = "") -> str:
        host = self.relay_url.removeprefix("http://")
        return f"kbfs://{host}/{self.share_id}" + (f"/{sub}" if sub else "")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    base = tmp_path_factory.mktemp("net")
    data = base / "data"
    (data / "sub" / "deeper").mkdir(parents=True)
    rng = random.Random(5)
    (data / "a.bin").write_bytes(rng.randbytes(5 * MiB + 17))
    (data / "b.bin").write_bytes(rng.randbytes(2 * MiB))
    (data / "sub" / "c.txt").write_text("see\n")
    (data / "sub" / "deeper" / "d.bin").write_bytes(rng.randbytes(MiB + 1))
    with start_relay(base) as relay, start_share(data, relay.url, base) as share:
        yield Net(relay.url, share.id, data, share)


def md5_file(path: Path | str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def test_remote_share_listing_and_reads(net: Net, tmp_path: Path) -> None:
    with mounted(net.source(), tmp_path, extra=["--timeout", "5"]) as m:
        assert sorted(os.listdir(m.mountpoint)) == ["a.bin", "b.bin", "sub"]
        assert sorted(os.listdir(m.path("sub"))) == ["c.txt", "deeper"]
        assert os.path.getsize(m.path("a.bin")) == 5 * MiB + 17
        for rel in ("a.bin", "b.bin", "sub/c.txt", "sub/deeper/d.bin"):
            assert md5_file(m.path(*rel.split("/"))) == md5_file(net.data / rel), rel
        # Bytes came through the relay, not from the share's folder on this machine.
        source = os.getxattr(m.path("a.bin"), "user.kbfs.source").decode()
        assert source.startswith("http://"), source
        assert os.getxattr(m.path("a.bin"), "user.kbfs.verified") == b"tree"
        with pytest.raises(OSError) as info:
            open(m.path("new"), "w")  # noqa: SIM115
        assert info.value.errno in (errno.EROFS, errno.EACCES)


def test_remote_sub_path(net: Net, tmp_path: Path) -> None:
    with mounted(net.source("sub"), tmp_path) as m:
        assert sorted(os.listdir(m.mountpoint)) == ["c.txt", "deeper"]
        assert open(m.path("c.txt")).read() == "see\n"


def test_remote_bad_share_fails_clearly(net: Net, tmp_path: Path) -> None:
    from tests.mountutil import run_kbfs

    (tmp_path / "mnt").mkdir()
    host = net.relay_url.removeprefix("http://")
    res = run_kbfs(
        [
            "mount",
            f"kbfs://{host}/{'a' * 32}",
            str(tmp_path / "mnt"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        env=isolated_env(tmp_path),
    )
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "cannot list the share" in res.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_remote_offline_after_share_stops(tmp_path: Path) -> None:
    """Cached files keep reading with the share gone; an uncached one fails with EIO, quickly."""
    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(9)
    (data / "cached.bin").write_bytes(rng.randbytes(2 * MiB))
    (data / "later.bin").write_bytes(rng.randbytes(2 * MiB))
    with start_relay(tmp_path) as relay, start_share(data, relay.url, tmp_path) as share:
        source = f"kbfs://{relay.url.removeprefix('http://')}/{share.id}"
        with mounted(source, tmp_path, extra=["--timeout", "3"]) as m:
            assert md5_file(m.path("cached.bin")) == md5_file(data / "cached.bin")
            os.stat(m.path("later.bin"))
            share.kill()
            relay.kill()
            # Drop the kernel's copy so the read reaches the daemon's disk cache.
            with open(m.path("cached.bin"), "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert md5_file(m.path("cached.bin")) == md5_file(data / "cached.bin")
            t0 = time.monotonic()
            with pytest.raises(OSError) as info:
                md5_file(m.path("later.bin"))
            assert info.value.errno == errno.EIO
            assert time.monotonic() - t0 < 15


def test_zarr_v2_and_v3_stores_through_a_mounted_share(tmp_path: Path) -> None:
    """zarr stores in a shared folder, opened with zarr from the mount of its kbfs:// share:
    v2 keeps its metadata in dotfiles (.zarray, .zattrs, .zgroup), which the share must
    serve and the mount must list; v3 has zarr.json, and its probes for v2 names must be
    plain "not found" (ENOENT), never EIO."""
    zarr = pytest.importorskip("zarr")
    np = pytest.importorskip("numpy")
    data = tmp_path / "data"
    data.mkdir()
    values = np.arange(60_000, dtype="float64").reshape(300, 200)
    for fmt in (2, 3):
        group = zarr.open_group(str(data / f"v{fmt}.zarr"), mode="w", zarr_format=fmt)
        group.attrs["lab"] = "kbfs"
        arr = group.create_array("x", shape=values.shape, chunks=(64, 64), dtype="float64")
        arr[:] = values
    assert (data / "v2.zarr" / ".zgroup").exists() and (data / "v2.zarr" / "x" / ".zarray").exists()
    with start_relay(tmp_path) as relay, start_share(data, relay.url, tmp_path) as share:
        host = relay.url.removeprefix("http://")
        with mounted(f"kbfs://{host}/{share.id}", tmp_path, extra=["--timeout", "5"]) as m:
            assert ".zgroup" in os.listdir(m.path("v2.zarr"))
            for fmt in (2, 3):
                g = zarr.open_group(m.path(f"v{fmt}.zarr"), mode="r")
                assert g.attrs["lab"] == "kbfs"
                got = g["x"]
                assert got.shape == values.shape
                assert np.array_equal(got[:], values)
                assert np.array_equal(got[100:164, 7:9], values[100:164, 7:9])
            with pytest.raises(FileNotFoundError):
                os.stat(m.path("v3.zarr", ".zarray"))


def test_private_share_mounts_with_token(tmp_path: Path) -> None:
    """A --private share mounts with --token (passed to the daemon in its environment,
    not on its command line); without one the mount fails with one line."""
    from tests.mountutil import run_kbfs

    data = tmp_path / "data"
    data.mkdir()
    payload = os.urandom(MiB + 3)
    (data / "p.bin").write_bytes(payload)
    with start_relay(tmp_path) as relay, start_share(data, relay.url, tmp_path,
                                                       "--private") as share:
        source = f"kbfs://{relay.url.removeprefix('http://')}/{share.id}"
        (tmp_path / "denied").mkdir()
        denied = run_kbfs(["mount", source, str(tmp_path / "denied"), "--cache-dir",
                           str(tmp_path / "c0")], env=isolated_env(tmp_path), timeout=90)
        assert denied.returncode == 1 and denied.stderr.count("\n") == 1, denied.stderr
        with mounted(source, tmp_path, extra=["--token", share.token, "--timeout", "5"]) as m:
            with open(f"/proc/{m.pid}/cmdline", "rb") as f:
                assert share.token.encode() not in f.read()
            with open(m.path("p.bin"), "rb") as f:
                assert f.read() == payload
