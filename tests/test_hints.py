"""Source hints (`kbfs_sources` in a pointer): written by `kbfs prv create --relay URL`,
validated on read (a bad hint is dropped with one log line, never an error), used by
readers after their configured relays. End to end: a pointer made with --relay is read by
`kbfs cat` and through a mount with no relay configured at all (no KBFS_RELAY, an empty
config home), from a real relay and share.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kbfs import prv
from tests.mountutil import NEEDS_FUSE, mounted
from tests.netutil import start_relay, start_share

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def bare_env(base: Path) -> dict[str, str]:
    """An environment with no relay anywhere: no KBFS_RELAY, an empty config and home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBFS_")}
    home = base / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(base / "config"),
               XDG_CACHE_HOME=str(base / "xdg-cache"), KBFS_RUNTIME_DIR=str(base / "run"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def kbfs(args: list[str], env: dict[str, str], cwd: Path | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "kbfs", *args], capture_output=True, env=env,
                          cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------- format


def test_pointer_with_sources_keeps_the_legacy_fields() -> None:
    """A pointer with kbfs_sources parses with every ml-prv-create field intact, and the
    hints are written after them (old tools read named keys and ignore the rest)."""
    legacy = json.loads((FIXTURES / "legacy-content.bin.prv").read_text())
    with_hints = dict(legacy, kbfs_sources=["http://relay.example.org:8080"])
    p = prv.pointer_from_dict(with_hints, "hinted.prv")
    q = prv.pointer_from_dict(legacy, "legacy.prv")
    assert (p.sha1, p.size, p.fcs, p.original_path, p.prv_version) == (
        q.sha1, q.size, q.fcs, q.original_path, q.prv_version)
    assert p.source_hints() == ["http://relay.example.org:8080"]
    out = json.loads(p.to_json())
    assert list(out)[:5] == list(legacy)[:5]
    assert {k: out[k] for k in legacy} == legacy
    # Without hints, the original tool's bytes exactly.
    assert q.with_sources([]).to_json() == (FIXTURES / "legacy-content.bin.prv").read_text()


def test_bad_hints_are_dropped_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    good = [f"http://relay{i}.example.org:80{i}" for i in range(prv.MAX_SOURCES)]
    bad = ["http://user:pw@relay.example.org", "http://relay.example.org/?token=1",
           "ftp://relay.example.org", "http://relay.example.org/some/path", 42, "",
           "http://" + "a" * 600, "http://[::1", "http://relay.example.org#frag"]
    obj = {"original_checksum": "a" * 40, "original_size": 1,
           "kbfs_sources": [bad[0], *good, *bad[1:], "http://one-too-many.example.org"]}
    p = prv.pointer_from_dict(obj, "x.prv")  # never an error
    with caplog.at_level(logging.WARNING, logger="kbfs.prv"):
        assert p.source_hints() == good
    lines = [r for r in caplog.records if r.name == "kbfs.prv"]
    assert len(lines) == 1 and "a" * 40 in lines[0].getMessage()  # names the content
    assert "pw" not in lines[0].getMessage()  # a password a hint carried is not logged
    not_a_list = prv.pointer_from_dict(dict(obj, kbfs_sources="http://a:1"), "y.prv")
    assert not_a_list.source_hints() == []


def test_prv_create_relay_is_checked_first(tmp_path: Path) -> None:
    data = tmp_path / "x.bin"
    data.write_bytes(b"x")
    env = bare_env(tmp_path)
    bad = kbfs(["prv", "create", str(data), "--relay", "http://me:secret@relay:1"], env,
               cwd=tmp_path)
    assert bad.returncode == 1
    assert bad.stderr.decode().count("\n") == 1 and b"user name or password" in bad.stderr
    assert not (tmp_path / "x.bin.prv").exists()
    ok = kbfs(["prv", "create", str(data), "-r", "127.0.0.1:9", "-r", "https://r.example.org/"],
              env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    written = json.loads((tmp_path / "x.bin.prv").read_text())
    assert written["kbfs_sources"] == ["http://127.0.0.1:9", "https://r.example.org"]
    assert list(written)[-1] == "kbfs_tree"


# ---------------------------------------------------------------- end to end


@pytest.fixture
def shared(tmp_path: Path):  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    payload = os.urandom(3 * 1024 * 1024 + 17)
    (data / "sub" / "rec.bin").write_bytes(payload)
    relay = start_relay(tmp_path)
    share = start_share(data, relay.url, tmp_path)
    try:
        yield relay, data, payload
    finally:
        share.stop()
        relay.stop()


def test_pointer_with_relay_hint_reads_with_no_relay_configured(shared, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    relay, data, payload = shared
    env = bare_env(tmp_path)
    work = tmp_path / "pointers"
    work.mkdir()
    made = kbfs(["prv", "create", str(data / "sub" / "rec.bin"), "--relay", relay.url], env,
                cwd=work)
    assert made.returncode == 0, made.stderr
    assert (work / "rec.bin.prv").exists()
    # --no-local: the data is on this machine; the bytes must come from the hinted relay.
    got = kbfs(["cat", "--no-local", "rec.bin.prv"], env, cwd=work)
    assert got.returncode == 0, got.stderr
    assert got.stdout == payload
    out = tmp_path / "out.bin"
    dl = kbfs(["download", "--no-local", str(work / "rec.bin.prv"), "-o", str(out)], env)
    assert dl.returncode == 0, dl.stderr
    assert out.read_bytes() == payload


@pytest.mark.parametrize("_", [0], ids=["mount"])
@NEEDS_FUSE[0]
@NEEDS_FUSE[1]
def test_mount_uses_pointer_hints_with_no_relay_configured(shared, tmp_path: Path, _: int) -> None:  # type: ignore[no-untyped-def]
    relay, data, payload = shared
    env = bare_env(tmp_path)
    work = tmp_path / "pointers"
    work.mkdir()
    made = kbfs(["prv", "create", str(data / "sub" / "rec.bin"), "--relay", relay.url], env,
                cwd=work)
    assert made.returncode == 0, made.stderr
    with mounted(str(work), tmp_path / "m", extra=["--no-local"]) as m:
        with open(m.path("rec.bin"), "rb") as f:
            assert f.read() == payload


def test_prv_create_defaults_to_the_relays_of_the_share(tmp_path: Path) -> None:
    """A file inside a folder this user shares gets that share's relays as hints (from
    the share's state folder), and reads with no relay configured; --no-hints writes none,
    a file outside the folder gets none."""
    data = tmp_path / "data"
    data.mkdir()
    payload = os.urandom(100_000)
    (data / "x.bin").write_bytes(payload)
    (tmp_path / "outside.bin").write_bytes(b"o")
    state_home = tmp_path / "state"
    relay = start_relay(tmp_path)
    share = start_share(data, relay.url, tmp_path, state_dir=state_home / "kbfs" / "share-test")
    try:
        env = dict(bare_env(tmp_path), XDG_STATE_HOME=str(state_home))
        work = tmp_path / "work"
        work.mkdir()
        made = kbfs(["prv", "create", str(data / "x.bin")], env, cwd=work)
        assert made.returncode == 0, made.stderr
        assert relay.url.encode() in made.stderr  # says where the hints came from
        assert json.loads((work / "x.bin.prv").read_text())["kbfs_sources"] == [relay.url]
        got = kbfs(["cat", "--no-local", "x.bin.prv"], env, cwd=work)
        assert got.returncode == 0 and got.stdout == payload, got.stderr
        assert kbfs(["prv", "create", str(data / "x.bin"), "--no-hints", "-o", "n.prv"], env,
                    cwd=work).returncode == 0
        assert "kbfs_sources" not in json.loads((work / "n.prv").read_text())
        assert kbfs(["prv", "create", str(tmp_path / "outside.bin")], env, cwd=work).returncode == 0
        assert "kbfs_sources" not in json.loads((work / "outside.bin.prv").read_text())
    finally:
        share.stop()
        relay.stop()
