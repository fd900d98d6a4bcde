"""Reader errors keep their cause (issue 16): the server's own reason, in plain words, in
one line on stderr, never a bare status or an exception class name.

Real `kbfs relay` / `kbfs share` processes (tests/netutil.py) and the `kbfs` command line;
a real HTTP source (tests/httpsource.py) for the slow download that Ctrl-C interrupts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from httpsource import HTTPSource
from netutil import get_json, start_relay, start_share

import kbfs
from kbfs import client, prv, tree
from kbfs.errors import NotFound

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of a `kbfs` run: no KBFS_* of the caller's, a fresh config and cache."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("KBFS_")}
    e.update(XDG_CONFIG_HOME=str(tmp_path / "config"), KBFS_CACHE_DIR=str(tmp_path / "cache"),
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return e


def kbfs_cli(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kbfs", *args], env=env, capture_output=True,
                          text=True, errors="replace", timeout=timeout,
                          stdin=subprocess.DEVNULL)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The failing run's stderr, checked to be one line and no traceback."""
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr
    assert "Traceback" not in err, err
    assert err.count("\n") == 1, err
    return err


def _hostport(url: str) -> str:
    return url.split("://", 1)[1]


# ---------------------------------------------------------------- the relay's reasons


def test_share_stopped_says_no_connected_share_has_the_file(tmp_path: Path, env: dict[str, str]
                                                            ) -> None:
    """Was: `no source gave the block tree of 2226...: HTTP 404`."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "units.csv").write_bytes(os.urandom(200_000))
    pointer = tmp_path / "units.csv.prv"
    pointer.write_text(prv.create_pointer(data_dir / "units.csv").to_json())
    with start_relay(tmp_path) as relay:
        share = start_share(data_dir, relay.url, tmp_path)
        share.stop()
        err = one_line(kbfs_cli(env, "cat", str(pointer), "--no-local", "--relay", relay.url))
    sha1 = hashlib.sha1((data_dir / "units.csv").read_bytes()).hexdigest()
    assert f"no connected share has this file (sha1 {sha1})" in err, err
    assert "block tree" not in err and ": HTTP 404\n" not in err, err


def test_mistyped_share_id_says_the_share_is_not_connected(tmp_path: Path, env: dict[str, str]
                                                           ) -> None:
    """Was: `/ not found in share ...`, while the relay had said the share is not connected."""
    with start_relay(tmp_path) as relay:
        wrong = "a" * 32
        err = one_line(kbfs_cli(env, "cat", f"kbfs://{_hostport(relay.url)}/{wrong}/units.csv"))
    assert f"share {wrong} is not connected" in err, err
    assert relay.url in err


def test_wrong_relay_port_says_unreachable(tmp_path: Path, env: dict[str, str]) -> None:
    """Was: `...: ConnectionError`."""
    data = tmp_path / "x.bin"
    data.write_bytes(os.urandom(100_000))
    pointer = tmp_path / "x.bin.prv"
    pointer.write_text(prv.create_pointer(data).to_json())
    data.unlink()
    err = one_line(kbfs_cli(env, "cat", str(pointer), "--relay", "http://127.0.0.1:1"))
    assert "relay http://127.0.0.1:1 is unreachable (connection refused)" in err, err
    assert "ConnectionError" not in err
    err = one_line(kbfs_cli(env, "cat", f"kbfs://127.0.0.1:1/{'a' * 32}/x.bin"))
    assert "relay http://127.0.0.1:1 is unreachable (connection refused)" in err, err


# ---------------------------------------------------------------- pointer vs what sources have


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path, bytes]]:
    """A relay and a share serving one 3 MiB file; (relay URL, its pointer, its bytes)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = os.urandom(3 * MiB + 17)
    (data_dir / "rec.bin").write_bytes(data)
    pointer = tmp_path / "rec.bin.prv"
    # v1 (1 MiB): the wording below is the leaf-list path's (a v2 read says what its proofs do).
    pointer.write_text(prv.create_pointer(data_dir / "rec.bin", block_size=tree.BLOCK_SIZE).to_json())
    with start_relay(tmp_path) as relay, start_share(data_dir, relay.url, tmp_path):
        yield relay.url, pointer, data


@pytest.mark.parametrize("edit", ["size", "root"])
def test_edited_pointer_says_it_does_not_match(served: tuple[str, Path, bytes], tmp_path: Path,
                                               env: dict[str, str], edit: str) -> None:
    """A hand-edited size or root: the pointer is what does not match, not the sources."""
    relay, pointer, data = served
    obj = json.loads(pointer.read_text())
    if edit == "size":
        obj["original_size"] = len(data) + 5 * tree.BLOCK_SIZE
    else:
        obj["kbfs_tree"]["root"] = "0" * len(obj["kbfs_tree"]["root"])
    edited = tmp_path / "edited.prv"
    edited.write_text(json.dumps(obj))
    err = one_line(kbfs_cli(env, "cat", str(edited), "--no-local", "--relay", relay))
    assert "the pointer does not match what any source has" in err, err
    if edit == "size":
        assert f"the sources hold {len(data)} bytes" in err, err
    # The same pointer unedited reads.
    ok = kbfs_cli(env, "cat", str(pointer), "--no-local", "--relay", relay)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr


def test_changed_file_says_the_share_holds_another_version(tmp_path: Path) -> None:
    """A kbfs:// file opened, then changed on the share: the read says the share now holds
    a different version of that path (was: a bare 404 or 'no source ...')."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "rec.bin").write_bytes(os.urandom(2 * MiB))
    cache_dir = str(tmp_path / "cache")
    with start_relay(tmp_path) as relay, start_share(data_dir, relay.url, tmp_path,
                                                     "--rescan-interval", "0.3") as share:
        url = f"kbfs://{_hostport(relay.url)}/{share.id}/rec.bin"
        r = client.resolve(url, cache_dir=cache_dir)
        new = os.urandom(2 * MiB)
        (data_dir / "rec.bin").write_bytes(new)
        new_sha1 = hashlib.sha1(new).hexdigest()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listing = get_json(f"{relay.url}/s/{share.id}/list/")
            if any(f["prv"]["original_checksum"] == new_sha1 for f in listing["files"]):
                break
            time.sleep(0.1)
        c = client.get_client(cache_dir=cache_dir)
        with pytest.raises(NotFound) as info:
            with c.open(r, local=False) as f:
                f.read()
        text = str(info.value)
        assert f"share {share.id} now holds a different version of rec.bin" in text, text
        assert new_sha1 in text
        # Opened again, the URL reads the new version.
        with kbfs.open(url, cache_dir=cache_dir, local=False) as f:
            assert f.read() == new


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_during_download_says_rerun_resumes(tmp_path: Path, env: dict[str, str]) -> None:
    data = os.urandom(8 * MiB)
    (tmp_path / "big.bin").write_bytes(data)
    pointer = tmp_path / "big.bin.prv"
    ptr = prv.create_pointer(tmp_path / "big.bin", block_size=tree.BLOCK_SIZE)  # HTTPSource: no proofs
    pointer.write_text(dataclasses.replace(ptr, original_path="").to_json())
    out = tmp_path / "out" / "big.bin"
    out.parent.mkdir()
    with HTTPSource() as src:
        src.add(data)
        src.mode = "trickle"
        # 2 s per MiB per connection and two workers: the 8 MiB arrive in four waves of
        # 2 MiB, so Ctrl-C after the first comes mid-way. (With the default workers every
        # block was fetched at once and landed at the same moment: the download was often
        # complete before the signal, rc 0, in the full suite.)
        src.trickle_rate = 512 << 10
        args = [sys.executable, "-m", "kbfs", "download", str(pointer), "--no-local",
                "--relay", src.url, "-o", str(out), "-j", "2"]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, stdin=subprocess.DEVNULL)
        part = out.parent / ".big.bin.kbfs-part"
        deadline = time.monotonic() + 30
        # Wait until some verified run is in the part file, then interrupt.
        while time.monotonic() < deadline:
            if part.exists() and os.stat(part).st_blocks * 512 >= 2 * MiB:
                break
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert f"the verified part is kept in {part}: run the same command again to resume" in err
        assert part.exists() and not out.exists()
        src.mode = "ok"
        again = kbfs_cli(env, *args[3:], timeout=60)
        assert again.returncode == 0, again.stderr
        assert out.read_bytes() == data
