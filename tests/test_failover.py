"""A relay that is one of several: a share connects to all of them (`--relay` repeated) and a
reader fails over when one dies in the middle of its read.

Real processes on 127.0.0.1: two relays, one share connected to both, and a link emulator
(bench/linkemu.py, 160 Mbit/s) in front of the first relay, so a 40 MiB read through it
lasts seconds and the kill lands mid-read. Relay A is killed (SIGKILL, by pid) once it has
sent part of the file (its /api/health `bytes_out`); `kbfs download` and `kbfs.open` must
still finish with the exact bytes, the rest coming from relay B.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netutil import RelayProc, ShareProc, get_json, start_relay, start_share, wait_share_ready

import kbfs
from kbfs import prv

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SIZE = 40 * MiB + 12345
KILL_AFTER = 6 * MiB  # relay A has sent this much of the file: kill it
pytestmark = pytest.mark.timeout(180)

_spec = importlib.util.spec_from_file_location("linkemu", REPO / "bench" / "linkemu.py")
assert _spec is not None and _spec.loader is not None
linkemu = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("linkemu", linkemu)
_spec.loader.exec_module(linkemu)


@dataclass
class World:
    a: RelayProc
    b: RelayProc
    share: ShareProc
    link_a: str  # relay A as readers reach it: through the link emulator
    data: bytes
    pointer: Path


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for var in ("KBFS_RELAY", "KBFS_CACHE_DIR", "KBFS_CACHE_SIZE", "KBFS_SEARCH_DIRS"):
        monkeypatch.delenv(var, raising=False)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = os.urandom(SIZE)
    (data_dir / "big.bin").write_bytes(data)
    pointer = tmp_path / "big.bin.prv"
    pointer.write_text(prv.create_pointer(data_dir / "big.bin").to_json())
    a = start_relay(tmp_path)
    b = start_relay(tmp_path)
    share = None
    link = None
    try:
        share = start_share(data_dir, a.url, tmp_path, "--relay", b.url)
        wait_share_ready(b.url, share.id)  # connected to both
        link = linkemu.LinkEmu(int(a.url.rsplit(":", 1)[1]), rtt_ms=2, mbit=160).start()
        yield World(a, b, share, f"http://127.0.0.1:{link.port}", data, pointer)
    finally:
        if link is not None:
            link.stop()
        if share is not None:
            share.stop()
        b.stop()
        a.stop()


def _sent_by(relay: RelayProc) -> int:
    return int(get_json(relay.url + "/api/health")["bytes_out"])


def _kill_when_sent(relay: RelayProc, reader: subprocess.Popen[bytes] | None, deadline: float = 60) -> int:
    """Wait until RELAY has sent KILL_AFTER bytes, then SIGKILL it; what it had sent."""
    end = time.monotonic() + deadline
    while (sent := _sent_by(relay)) < KILL_AFTER:
        assert time.monotonic() < end, "relay A never carried the read"
        assert reader is None or reader.poll() is None, "the read ended before relay A was killed"
        time.sleep(0.01)
    relay.kill()
    return sent


def test_download_completes_when_a_relay_dies_mid_read(world: World, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBFS_") or k == "KBFS_PORTABLE"}
    env.update(PYTHONPATH=str(REPO), KBFS_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "got.bin"
    t0 = time.monotonic()
    reader = subprocess.Popen([sys.executable, "-m", "kbfs", "download", str(world.pointer), "--no-local",
                               "-r", world.link_a, "-r", world.b.url, "-o", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    sent = _kill_when_sent(world.a, reader)
    assert sent < SIZE // 2  # killed mid-read: most of the file was still to come
    _, err = reader.communicate(timeout=120)
    took = time.monotonic() - t0
    assert reader.returncode == 0, err.decode()
    assert hashlib.sha1(out.read_bytes()).digest() == hashlib.sha1(world.data).digest()
    assert _sent_by(world.b) > 0  # the rest came from relay B
    print(f"\ndownload: relay A killed after {sent / MiB:.1f} MiB; done in {took:.1f} s")


def test_kbfs_open_completes_when_a_relay_dies_mid_read(world: World, tmp_path: Path) -> None:
    h = hashlib.sha1()
    got = 0
    killed_at = None
    t0 = time.monotonic()
    with kbfs.open(str(world.pointer), relays=[world.link_a, world.b.url], cache_dir=str(tmp_path / "cache"),
                   local=False) as f:
        while chunk := f.read(MiB):
            h.update(chunk)
            got += len(chunk)
            if killed_at is None and got >= KILL_AFTER:
                killed_at = _sent_by(world.a)
                assert killed_at < SIZE // 2  # most of the file still to come
                world.a.kill()
    assert killed_at is not None and got == SIZE
    assert h.digest() == hashlib.sha1(world.data).digest()
    assert _sent_by(world.b) > 0
    print(f"\nkbfs.open: relay A killed after {killed_at / MiB:.1f} MiB; done in {time.monotonic() - t0:.1f} s")
