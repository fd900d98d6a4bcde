"""A real relay and a real share as processes, and a FUSE mount of `kbfs://HOST:PORT/SHARE_ID`.

The relay and the share are started as `python -m kbfs relay|share` processes and stopped by
their pids in teardown; the mount is cleaned up by tests/mountutil.py.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mountutil import REPO, isolated_env, mounted

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(
        not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
        reason="needs /dev/fuse and fusermount3",
    ),
]

MiB = 1 << 20


@dataclass
class Proc:
    popen: subprocess.Popen[str]
    lines: list[str]

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}; output: {''.join(self.lines)}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


@contextlib.contextmanager
def kbfs_process(args: list[str], env: dict[str, str]) -> Iterator[Proc]:
    popen = subprocess.Popen(
        [sys.executable, "-m", "kbfs", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
    )
    proc = Proc(popen, [])

    def pump() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            proc.lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        yield proc
    finally:
        proc.kill()


@dataclass
class Net:
    relay_url: str
    share_id: str
    data: Path
    share: Proc

    def source(self, sub: str = "") -> str:
        host = self.relay_url.removeprefix("http://")
        return f"kbfs://{host}/{self.share_id}" + (f"/{sub}" if sub else "")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    base = tmp_path_factory.mktemp("net")
    env = isolated_env(base)
    env["XDG_STATE_HOME"] = str(base / "state")
    data = base / "data"
    (data / "sub" / "deeper").mkdir(parents=True)
    rng = random.Random(5)
    (data / "a.bin").write_bytes(rng.randbytes(5 * MiB + 17))
    (data / "b.bin").write_bytes(rng.randbytes(2 * MiB))
    (data / "sub" / "c.txt").write_text("see\n")
    (data / "sub" / "deeper" / "d.bin").write_bytes(rng.randbytes(MiB + 1))
    with kbfs_process(["relay", "--host", "127.0.0.1", "--port", "0"], env) as relay:
        url = relay.wait_for(r"listening on (http://\S+)").group(1)
        with kbfs_process(["share", str(data), "--relay", url], env) as share:
            share_id = share.wait_for(r"share id ([a-z2-7]+)").group(1)
            share.wait_for(r"share connected to")
            yield Net(url, share_id, data, share)


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
    env = isolated_env(tmp_path)
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(9)
    (data / "cached.bin").write_bytes(rng.randbytes(2 * MiB))
    (data / "later.bin").write_bytes(rng.randbytes(2 * MiB))
    with kbfs_process(["relay", "--host", "127.0.0.1", "--port", "0"], env) as relay:
        url = relay.wait_for(r"listening on (http://\S+)").group(1)
        with kbfs_process(["share", str(data), "--relay", url], env) as share:
            share_id = share.wait_for(r"share id ([a-z2-7]+)").group(1)
            share.wait_for(r"share connected to")
            source = f"kbfs://{url.removeprefix('http://')}/{share_id}"
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
