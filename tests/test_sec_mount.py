"""Attacks on a real kbfs mount (issue 14, items 5, 7, 16, 17), each on real processes.

- another local user (`nobody`, through `setpriv`) against a root mount: no way in without
  `--allow-other`; with it, only what the pointer files' modes grant, and never a local
  original the pointer's author could not read;
- a hostile .prvdir: sizes that sum past every C field (statfs, ls -l, du must answer and
  the daemon must live), and entry names no folder can hold (skipped, the rest lists);
- a runtime folder another user planted first, and a stale status file naming a process
  that is not the mount's daemon (`kbfs umount` must not signal it).

Content comes from `tests.httpsource.HTTPSource` (a real HTTP server standing in for a
relay). Every mount is unmounted and its daemon stopped in teardown (tests/mountutil.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kbfs import prv
from tests.httpsource import HTTPSource
from tests.mountutil import (
    NEEDS_FUSE,
    Mount,
    alive,
    force_unmount,
    isolated_env,
    mounted,
    run_kbfs,
    stop_pid,
)

pytestmark = NEEDS_FUSE

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
needs_root = pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root (a root mount) and setpriv (to act as another user)",
)


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*AS_NOBODY, *cmd], capture_output=True, timeout=60)


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A folder other users can traverse (pytest's tmp_path is 0700), removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="kbfs-sec-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def serve_pointer(src: HTTPSource, folder: Path, name: str, data: bytes, mode: int) -> Path:
    """Serve DATA from SRC and write FOLDER/NAME.prv (mode MODE) without a local original."""
    store = folder.parent / "originals"
    store.mkdir(exist_ok=True)
    original = store / hashlib.sha1(data).hexdigest()
    original.write_bytes(data)
    src.add(path=str(original))
    pointer = dataclasses.replace(prv.create_pointer(original), original_path="")
    path = folder / f"{name}.prv"
    path.write_text(pointer.to_json())
    path.chmod(mode)
    return path


# ---------------------------------------------------------------- item 5: another local user


@needs_root
def test_root_mount_is_closed_to_other_users_without_allow_other(open_base: Path) -> None:
    folder = open_base / "pointers"
    folder.mkdir(mode=0o755)
    with HTTPSource() as src:
        serve_pointer(src, folder, "public.bin", b"for everyone\n", 0o644)
        (folder / "plain.txt").write_text("plain\n")
        (folder / "plain.txt").chmod(0o644)
        with mounted(str(folder), open_base, relays=[src.url], extra=["--timeout", "5"]) as m:
            assert Path(m.path("public.bin")).read_bytes() == b"for everyone\n"  # root reads
            for name in ("public.bin", "plain.txt"):
                res = as_nobody("cat", m.path(name))
                assert res.returncode != 0, f"nobody read {name} through a root mount"
            assert as_nobody("ls", m.mountpoint).returncode != 0


@needs_root
def test_allow_other_grants_only_what_the_pointer_files_grant(open_base: Path) -> None:
    folder = open_base / "pointers"
    folder.mkdir(mode=0o755)
    secret = open_base / "root-only"
    secret.mkdir(mode=0o700)
    private_original = secret / "shadow.bin"
    private_original.write_bytes(b"root's secret " * 100)
    private_original.chmod(0o600)
    with HTTPSource() as src:
        serve_pointer(src, folder, "secret.bin", b"root only\n", 0o600)
        serve_pointer(src, folder, "public.bin", b"for everyone\n", 0o644)
        (folder / "plain-secret.txt").write_text("plain secret\n")
        (folder / "plain-secret.txt").chmod(0o600)
        (folder / "plain-public.txt").write_text("plain public\n")
        (folder / "plain-public.txt").chmod(0o644)
        pd = prv.PrvDir()
        pd.files["inner.bin"] = prv.Pointer(hashlib.sha1(b"x").hexdigest(), 1)
        (folder / "closed.prvdir").write_text(pd.to_json())
        (folder / "closed.prvdir").chmod(0o600)
        # A hostile pointer, written by nobody: a root-less pointer whose original_path is
        # a root-only file, with that file's true SHA-1 (say, guessed or leaked).
        hostile = prv.create_pointer(private_original)
        hostile = dataclasses.replace(hostile, tree=None)
        (folder / "stolen.bin.prv").write_text(hostile.to_json())
        (folder / "stolen.bin.prv").chmod(0o644)
        os.chown(folder / "stolen.bin.prv", NOBODY, NOBODY)
        extra = ["--timeout", "3", "--allow-other"]
        with mounted(str(folder), open_base, relays=[src.url], extra=extra) as m:
            st = os.stat(m.path("secret.bin"))
            assert (st.st_mode & 0o7777, st.st_uid) == (0o400, 0)
            assert os.stat(m.path("public.bin")).st_mode & 0o7777 == 0o444
            assert os.stat(m.path("plain-secret.txt")).st_mode & 0o7777 == 0o400
            assert os.stat(m.path("closed")).st_mode & 0o7777 == 0o500
            assert os.stat(m.path("stolen.bin")).st_uid == NOBODY
            # What the modes allow, nobody gets; what they do not, nobody does not.
            assert as_nobody("cat", m.path("public.bin")).stdout == b"for everyone\n"
            assert as_nobody("cat", m.path("plain-public.txt")).stdout == b"plain public\n"
            for name in ("secret.bin", "plain-secret.txt", "closed/inner.bin"):
                res = as_nobody("cat", m.path(*name.split("/")))
                assert res.returncode != 0 and b"ermission denied" in res.stderr, name
            assert as_nobody("ls", m.path("closed")).returncode != 0
            # The root daemon must not read a root-only original for nobody's pointer.
            res = as_nobody("cat", m.path("stolen.bin"))
            assert res.returncode != 0, "nobody read a root-only file through its pointer"
            assert b"root's secret" not in res.stdout
            assert Path(m.path("secret.bin")).read_bytes() == b"root only\n"  # root still reads


def test_allow_other_needs_fuse_conf_for_a_user(tmp_path: Path) -> None:
    """Not root and no user_allow_other: one clear line, nothing mounted."""
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root to run the mount as another user")
    with open("/etc/fuse.conf", encoding="utf-8") as f:
        if any(line.strip() == "user_allow_other" for line in f):
            pytest.skip("/etc/fuse.conf allows it here")
    base = Path(tempfile.mkdtemp(prefix="kbfs-sec-user-"))
    try:
        os.chown(base, NOBODY, NOBODY)
        for sub in ("src", "mnt"):
            (base / sub).mkdir()
            os.chown(base / sub, NOBODY, NOBODY)
        env = isolated_env(base)
        env["HOME"] = str(base)
        res = subprocess.run(
            [*AS_NOBODY, sys.executable, "-m", "kbfs", "mount", str(base / "src"),
             str(base / "mnt"), "--cache-dir", str(base / "cache"), "--allow-other"],
            capture_output=True, text=True, env=env, timeout=60,
        )
        assert res.returncode != 0, res.stdout
        assert "user_allow_other" in res.stderr and "Traceback" not in res.stderr
        assert not os.path.ismount(base / "mnt")
    finally:
        force_unmount(str(base / "mnt"), None)
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------- item 7: values past C fields

HUGE_ENTRIES = 16_400
HUGE_SIZE = (1 << 62) - 1


def test_huge_prvdir_sizes_do_not_kill_the_daemon(tmp_path: Path) -> None:
    folder = tmp_path / "pointers"
    folder.mkdir()
    pd = prv.PrvDir()
    fake = hashlib.sha1(b"never served").hexdigest()
    for i in range(HUGE_ENTRIES):
        pd.files[f"f{i:05d}.bin"] = prv.Pointer(fake, HUGE_SIZE)
    (folder / "huge.prvdir").write_text(pd.to_json())
    (folder / "normal.txt").write_text("still served\n")
    with mounted(str(folder), tmp_path, extra=["--timeout", "2"]) as m:
        ls = subprocess.run(["ls", "-l", m.path("huge")], capture_output=True, text=True,
                            timeout=120)
        assert ls.returncode == 0, ls.stderr
        assert len(ls.stdout.splitlines()) == HUGE_ENTRIES + 1  # "total" + one per entry
        assert str(HUGE_SIZE) in ls.stdout
        du = subprocess.run(["du", "-s", m.path("huge")], capture_output=True, text=True,
                            timeout=120)
        assert du.returncode == 0, du.stderr
        st = subprocess.run(["stat", "-f", m.mountpoint], capture_output=True, text=True,
                            timeout=60)
        assert st.returncode == 0, st.stderr
        assert re.search(r"Blocks: Total: \d+", st.stdout), st.stdout
        os.statvfs(m.mountpoint)
        assert alive(m.pid), "the daemon died: " + m.log_text()[-2000:]
        assert Path(m.path("normal.txt")).read_text() == "still served\n"
        assert os.stat(m.path("huge", "f00000.bin")).st_size == HUGE_SIZE
        assert "Traceback" not in m.log_text()


def test_every_fuse_handler_is_guarded() -> None:
    """Each request handler, defined or inherited, goes through the guard: an exception
    escaping any of them would end pyfuse3's main loop and the mount."""
    import inspect

    import pyfuse3

    from kbfs.fusefs import KbfsOperations

    for name in dir(pyfuse3.Operations):
        method = getattr(KbfsOperations, name)
        if not name.startswith("_") and inspect.iscoroutinefunction(method):
            assert getattr(method, "_kbfs_guarded", False), name


# ---------------------------------------------------------------- item 17: bad entry names


def test_bad_names_in_a_prvdir_are_skipped_one_by_one(tmp_path: Path) -> None:
    folder = tmp_path / "pointers"
    folder.mkdir()
    with HTTPSource() as src:
        data = random.Random(17).randbytes(70_000)
        original = tmp_path / "good-original"
        original.write_bytes(data)
        src.add(path=str(original))
        good = dataclasses.replace(prv.create_pointer(original), original_path="")
        # Only one bad entry: a lone surrogate, which JSON carries and no file name can.
        one = prv.PrvDir()
        one.files["good.bin"] = good
        one.files["bad\ud800.bin"] = good
        (folder / "one.prvdir").write_text(one.to_json())
        # Every kind of bad name, in files and in dirs.
        many = prv.PrvDir()
        many.files["good.bin"] = good
        for bad in ("\udcff", "a/b", "nul\0byte", ".", "..", "", "x" * 256):
            many.files[bad] = good
            many.dirs[bad + "d" if bad not in ("", ".", "..") else bad] = prv.PrvDir()
        many.dirs["sub"] = prv.PrvDir(files={"inner.bin": good, "\ud801": good})
        (folder / "many.prvdir").write_text(many.to_json())
        with mounted(str(folder), tmp_path, relays=[src.url], extra=["--timeout", "5"]) as m:
            assert os.listdir(m.path("one")) == ["good.bin"]
            assert Path(m.path("one", "good.bin")).read_bytes() == data
            assert sorted(os.listdir(m.path("many"))) == ["good.bin", "sub"]
            assert os.listdir(m.path("many", "sub")) == ["inner.bin"]
            assert Path(m.path("many", "sub", "inner.bin")).read_bytes() == data
            log = m.log_text()
            assert "skipping an entry" in log and "not valid UTF-8" in log
            assert "Traceback" not in log


def test_non_utf8_file_names_in_source(tmp_path: Path) -> None:
    """Names in SRC that are not UTF-8 round-trip (os.fsencode) and do not break the folder."""
    folder = tmp_path / "pointers"
    folder.mkdir()
    with HTTPSource() as src:
        data = random.Random(18).randbytes(5000)
        ptr = serve_pointer(src, folder, "tmp", data, 0o644)
        os.rename(ptr, os.path.join(os.fsencode(folder), b"r\xe9sum\xe9.bin.prv"))
        with open(os.path.join(os.fsencode(folder), b"caf\xe9.txt"), "wb") as f:
            f.write(b"latin-1 name\n")
        (folder / "ok.txt").write_text("ok\n")
        with mounted(str(folder), tmp_path, relays=[src.url], extra=["--timeout", "5"]) as m:
            mnt = os.fsencode(m.mountpoint)
            assert sorted(os.listdir(mnt)) == [b"caf\xe9.txt", b"ok.txt", b"r\xe9sum\xe9.bin"]
            with open(os.path.join(mnt, b"r\xe9sum\xe9.bin"), "rb") as f:
                assert f.read() == data
            with open(os.path.join(mnt, b"caf\xe9.txt"), "rb") as f:
                assert f.read() == b"latin-1 name\n"


# ---------------------------------------------------------------- item 16: runtime dir, umount


def _runtime_env(base: Path, tmpdir: Path) -> dict[str, str]:
    """The mount's environment without KBFS_RUNTIME_DIR: the default runtime folder is used,
    under TMPDIR (XDG_RUNTIME_DIR points at a folder everyone may write: never used)."""
    env = isolated_env(base)
    env.pop("KBFS_RUNTIME_DIR", None)
    env["TMPDIR"] = str(tmpdir)
    xdg = base / "xdg-open"
    xdg.mkdir(exist_ok=True)
    xdg.chmod(0o777)
    env["XDG_RUNTIME_DIR"] = str(xdg)
    return env


def _try_mount(folder: Path, base: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`kbfs mount` with ENV; a mount that happened anyway is undone at once."""
    mnt = base / "mnt"
    mnt.mkdir(exist_ok=True)
    res = run_kbfs(["mount", str(folder), str(mnt), "--cache-dir", str(base / "cache")],
                   env=env, timeout=90)
    m = re.search(r"pid (\d+);", res.stdout)
    force_unmount(str(mnt), int(m.group(1)) if m else None)
    return res


@pytest.mark.parametrize("hostile", ["symlink", "foreign-owner", "open-mode"])
def test_planted_runtime_dir_is_refused(tmp_path: Path, hostile: str) -> None:
    if hostile == "foreign-owner" and os.getuid() != 0:
        pytest.skip("needs root to chown a folder to another user")
    folder = tmp_path / "pointers"
    folder.mkdir()
    (folder / "a.txt").write_text("a\n")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    planted = tmpdir / f"kbfs-{os.getuid()}"
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir(mode=0o700)
    if hostile == "symlink":
        planted.symlink_to(elsewhere)
    else:
        planted.mkdir(mode=0o700)
        if hostile == "foreign-owner":
            os.chown(planted, NOBODY, NOBODY)
        else:
            planted.chmod(0o777)
    env = _runtime_env(tmp_path, tmpdir)
    res = _try_mount(folder, tmp_path, env)
    assert res.returncode != 0, f"mounted with a planted runtime folder: {res.stdout}"
    assert str(planted) in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert list(elsewhere.iterdir()) == [] and (hostile == "symlink" or not any(planted.iterdir()))
    assert not any((tmp_path / "xdg-open").iterdir())
    status = run_kbfs(["status"], env=env)
    assert status.returncode != 0 and str(planted) in status.stderr


def test_default_runtime_dir_is_private(tmp_path: Path) -> None:
    folder = tmp_path / "pointers"
    folder.mkdir()
    (folder / "a.txt").write_text("a\n")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    # As an older kbfs left it: ours, 0755 (nobody else could write in it): made private.
    (tmpdir / f"kbfs-{os.getuid()}").mkdir(mode=0o755)
    (tmpdir / f"kbfs-{os.getuid()}").chmod(0o755)
    env = _runtime_env(tmp_path, tmpdir)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run_kbfs(["mount", str(folder), str(mnt), "--cache-dir", str(tmp_path / "cache")],
                   env=env, timeout=90)
    m = re.search(r"pid (\d+);", res.stdout)
    try:
        assert res.returncode == 0, res.stderr
        run = tmpdir / f"kbfs-{os.getuid()}"
        for d in (run, run / "mounts"):
            st = os.lstat(d)
            assert (st.st_mode & 0o7777, st.st_uid) == (0o700, os.getuid()), d
        assert len(list((run / "mounts").glob("*.json"))) == 1
        log = Path(res.stdout.split("log ", 1)[1].rstrip(")\n"))
        assert os.stat(log).st_mode & 0o777 == 0o600 and os.stat(log.parent).st_mode & 0o777 == 0o700
        assert not any((tmp_path / "xdg-open").iterdir())
        assert run_kbfs(["umount", str(mnt)], env=env).returncode == 0
    finally:
        force_unmount(str(mnt), int(m.group(1)) if m else None)


@contextlib.contextmanager
def bystander(*argv: str) -> Iterator[subprocess.Popen[bytes]]:
    """A live process of ours that is not the mount's daemon, stopped afterwards."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE)
    try:
        time.sleep(0.2)
        yield proc
    finally:
        stop_pid(proc.pid)
        proc.wait(5)


def _status_file(env: dict[str, str]) -> Path:
    files = list(Path(env["KBFS_RUNTIME_DIR"], "mounts").glob("*.json"))
    assert len(files) == 1, files
    return files[0]


def _kill_daemon(m: Mount) -> Path:
    """SIGKILL the mount's daemon, as a crash would: its status file and a dead mount stay
    behind. Returns the status file (nothing rewrites it any more)."""
    status = _status_file(m.env)
    os.kill(m.pid, signal.SIGKILL)
    end = time.monotonic() + 10
    while alive(m.pid) and time.monotonic() < end:
        time.sleep(0.02)
    assert not alive(m.pid) and status.exists()
    return status


def test_umount_does_not_signal_a_stale_pid(tmp_path: Path) -> None:
    folder = tmp_path / "pointers"
    folder.mkdir()
    (folder / "a.txt").write_text("a\n")
    with mounted(str(folder), tmp_path) as m, bystander("sleep", "60") as sleeper:
        data = json.loads(_status_file(m.env).read_text())
        assert data["pid"] == m.pid and data.get("pid_start")
        status = _kill_daemon(m)
        # The crashed daemon's pid now belongs to an unrelated process (reused, or the file
        # was forged): umount clears the dead mount, and must leave that process alone.
        data["pid"] = sleeper.pid
        status.write_text(json.dumps(data))
        res = m.kbfs("umount", m.mountpoint)
        time.sleep(2.5)  # past the moment the old code sent its SIGTERM
        assert sleeper.poll() is None, "kbfs umount signalled an unrelated process"
        assert res.returncode == 0, res.stderr
        assert f"pid {sleeper.pid}" in res.stderr and "not signalled" in res.stderr
        assert not os.path.ismount(m.mountpoint)
        assert not status.exists()
        # Nothing mounted, and a status file naming the sleeper: refused, still no signal.
        status.write_text(json.dumps(data))
        res = m.kbfs("umount", m.mountpoint)
        assert res.returncode != 0 and "not a kbfs mount" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        time.sleep(2.5)
        assert sleeper.poll() is None
        assert not status.exists()


def test_umount_checks_the_start_time_of_a_lookalike(tmp_path: Path) -> None:
    """A process of ours whose command line looks like this mount's daemon, but which
    started at another time than the status file says (a reused pid): not signalled."""
    folder = tmp_path / "pointers"
    folder.mkdir()
    with mounted(str(folder), tmp_path) as m:
        status = _kill_daemon(m)
        data = json.loads(status.read_text())
        look = bystander(sys.executable, "-", "kbfs", "mount", str(folder), m.mountpoint)
        with look as proc:
            data["pid"] = proc.pid  # the same command line; pid_start is the daemon's
            status.write_text(json.dumps(data))
            res = m.kbfs("umount", m.mountpoint)
            time.sleep(2.5)
            assert proc.poll() is None, "kbfs umount signalled a look-alike process"
            assert res.returncode == 0 and "not signalled" in res.stderr, res.stderr
