"""`kbfs ls` and `kbfs download` of a folder, against a real relay and share.

ls: a share, a folder of it, a relay's shares (http:// and kbfs://HOST/), a local folder of
pointers, a .prvdir; --json. Folder downloads: a .prvdir, a folder of pointers and a
kbfs:// folder, every byte checked; a rerun skips complete files and resumes a part file;
a hostile .prvdir or a name planted as a symlink never writes outside the target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netutil import get_json, start_relay, start_share

REPO = Path(__file__).resolve().parent.parent


def env_of(base: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBFS_")}
    env.update(XDG_CONFIG_HOME=str(base / "config"), KBFS_CACHE_DIR=str(base / "cache"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def kbfs(base: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kbfs", *args], capture_output=True, text=True,
                          env=env_of(base), cwd=cwd, timeout=120, stdin=subprocess.DEVNULL)


FILES = {
    "a.bin": 1_500_000,
    "sub/b.bin": 2_100_000,
    "sub/deeper/c.txt": 10,
    "empty.bin": 0,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    base = tmp_path_factory.mktemp("verbs")
    data = base / "data"
    contents = {}
    for rel, size in FILES.items():
        path = data / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        contents[rel] = os.urandom(size)
        path.write_bytes(contents[rel])
    relay = start_relay(base)
    share = start_share(data, relay.url, base)
    try:
        yield base, relay, share, data, contents
    finally:
        share.stop()
        relay.stop()


def host(relay_url: str) -> str:
    return relay_url.split("://", 1)[1]


def check_tree(root: Path, contents: dict[str, bytes]) -> None:
    got = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert got == contents


def test_ls_share_folder_and_relay(world) -> None:  # type: ignore[no-untyped-def]
    base, relay, share, data, contents = world
    url = f"kbfs://{host(relay.url)}/{share.id}/"
    r = kbfs(base, "ls", url)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith("  sub/")  # folders first, with '/'
    assert any(line.endswith("  a.bin") and "1.4 MiB" in line for line in lines), lines
    r = kbfs(base, "ls", "--json", url + "sub")
    assert r.returncode == 0, r.stderr
    entries = {e["name"]: e for e in json.loads(r.stdout)}
    assert entries["b.bin"]["size"] == 2_100_000 and entries["b.bin"]["type"] == "file"
    assert entries["deeper"]["type"] == "directory"
    for relay_source in (relay.url, f"kbfs://{host(relay.url)}/"):
        r = kbfs(base, "ls", "--json", relay_source)
        assert r.returncode == 0, r.stderr
        (entry,) = json.loads(r.stdout)
        assert entry["name"] == share.id and entry["files"] == len(FILES)
        assert entry["url"] == url
    r = kbfs(base, "ls", f"kbfs://{host(relay.url)}/{share.id}/nothing-here")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr


def test_ls_local_pointers_and_prvdir(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, relay, share, data, contents = world
    assert kbfs(base, "prv", "create", str(data), cwd=tmp_path).returncode == 0
    assert kbfs(base, "prv", "create", str(data / "a.bin"), cwd=tmp_path).returncode == 0
    r = kbfs(base, "ls", "--json", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert [(e["name"], e["type"], e["size"]) for e in json.loads(r.stdout)] == [
        ("data", "directory", None), ("a.bin", "file", 1_500_000)]
    r = kbfs(base, "ls", str(tmp_path / "data.prvdir"))
    assert r.returncode == 0, r.stderr
    assert [line.split()[-1] for line in r.stdout.splitlines()] == ["sub/", "a.bin", "empty.bin"]


def test_download_share_folder_once_then_resumes(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, relay, share, data, contents = world
    out = tmp_path / "got"
    url = f"kbfs://{host(relay.url)}/{share.id}/"
    r = kbfs(base, "download", "--no-local", url, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    check_tree(out, contents)
    # A rerun skips what is complete, redoes what changed, and resumes: a share lists 64 KiB
    # pointers, whose downloads resume from the piece cache (not from a part file), so the
    # rerun asks the relay for no byte. A part file a 1 MiB run left is obsolete once its
    # file is whole: removed (a symlink planted there is removed, never followed).
    (out / "a.bin").write_bytes(b"damaged")
    os.unlink(out / "sub" / "b.bin")
    part = out / "sub" / ".b.bin.kbfs-part"
    part.write_bytes(contents["sub/b.bin"][:1 << 20])
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not kbfs's")
    os.symlink(outside, out / ".a.bin.kbfs-part")
    mtime = (out / "sub" / "deeper" / "c.txt").stat().st_mtime_ns
    sent = get_json(relay.url + "/api/health")["bytes_out"]
    r = kbfs(base, "-v", "download", "--no-local", url, "-o", str(out))
    assert r.returncode == 0, r.stderr
    check_tree(out, contents)
    assert (out / "sub" / "deeper" / "c.txt").stat().st_mtime_ns == mtime  # skipped
    assert get_json(relay.url + "/api/health")["bytes_out"] == sent     # all from the cache
    assert not part.exists() and not os.path.lexists(out / ".a.bin.kbfs-part")
    assert outside.read_bytes() == b"not kbfs's"
    # One subfolder of the share.
    r = kbfs(base, "download", "--no-local", url + "sub", "-o", str(tmp_path / "sub"))
    assert r.returncode == 0, r.stderr
    check_tree(tmp_path / "sub", {k[4:]: v for k, v in contents.items() if k.startswith("sub/")})


def test_download_prvdir_and_folder_of_pointers(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, relay, share, data, contents = world
    ptrs = tmp_path / "ptrs"
    ptrs.mkdir()
    made = kbfs(base, "prv", "create", str(data), "--relay", relay.url, cwd=ptrs)
    assert made.returncode == 0, made.stderr
    r = kbfs(base, "download", "--no-local", str(ptrs / "data.prvdir"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # was: original_checksum must be 40 hex digits
    check_tree(tmp_path / "data", contents)
    (ptrs / "more").mkdir()
    assert kbfs(base, "prv", "create", str(data / "a.bin"), "-r", relay.url,
                cwd=ptrs / "more").returncode == 0
    r = kbfs(base, "download", "--no-local", str(ptrs), "-o", str(tmp_path / "all"))
    assert r.returncode == 0, r.stderr
    check_tree(tmp_path / "all", {**{"data/" + k: v for k, v in contents.items()},
                                  "more/a.bin": contents["a.bin"]})


@pytest.mark.parametrize("name", ["..", "../escape.bin", "/etc/escape.bin", "a/../../x", "."])
def test_hostile_prvdir_writes_nothing_outside(world, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    base, relay, share, data, contents = world
    good = kbfs(base, "prv", "create", str(data / "a.bin"), "-o", str(tmp_path / "a.prv"))
    assert good.returncode == 0, good.stderr
    pointer = json.loads((tmp_path / "a.prv").read_text())
    hostile = tmp_path / "evil.prvdir"
    hostile.write_text(json.dumps({"files": {"ok.bin": pointer, name: pointer},
                                   "dirs": {"..": {"files": {"x.bin": pointer}}}}))
    work = tmp_path / "work"
    work.mkdir()
    r = kbfs(base, "download", "--no-local", str(hostile), "-o", str(work / "out"),
             "--relay", relay.url)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.prv", "evil.prvdir"]


def test_symlink_in_target_is_not_followed_out(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, relay, share, data, contents = world
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "sub")
    r = kbfs(base, "download", "--no-local", f"kbfs://{host(relay.url)}/{share.id}/",
             "-o", str(out))
    assert r.returncode == 1, r.stderr
    assert "outside" in r.stderr
    assert list(elsewhere.iterdir()) == []
    assert (out / "a.bin").read_bytes() == contents["a.bin"]  # the others were written


def test_private_share_ls_and_folder_download_with_token(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    payload = os.urandom(1_200_000)
    (data / "sub" / "p.bin").write_bytes(payload)
    with start_relay(tmp_path) as relay, start_share(data, relay.url, tmp_path,
                                                       "--private") as share:
        url = f"kbfs://{host(relay.url)}/{share.id}/"
        denied = kbfs(tmp_path, "ls", url)
        assert denied.returncode == 1 and denied.stderr.count("\n") == 1, denied.stderr
        r = kbfs(tmp_path, "ls", url + "sub", "--token", share.token)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[-1] == "p.bin"
        r = kbfs(tmp_path, "ls", "--json", relay.url)
        assert r.returncode == 0, r.stderr
        assert share.id not in r.stdout      # a private share is not listed without its token
        r = kbfs(tmp_path, "ls", "--json", relay.url, "--token", share.token)
        assert r.returncode == 0, r.stderr
        assert share.id in r.stdout          # ... and is with it
        r = kbfs(tmp_path, "download", "--no-local", url, "--token", share.token,
                 "-o", str(tmp_path / "got"))
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "got" / "sub" / "p.bin").read_bytes() == payload
