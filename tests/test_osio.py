"""kbfs.osio: each seam function gives the same bytes (or answer) with the Linux calls and
with the portable fallbacks (`osio.portable()`), on real files, pipes, sockets and
processes of this machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from kbfs import osio

MODES = ["linux", "portable"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    if request.param == "linux" and not osio.ON_LINUX:
        pytest.skip("the Linux calls need Linux")
    with osio.portable(request.param == "portable"):
        assert osio.linux() == (request.param == "linux")
        yield request.param


def _file(tmp_path, name: str, data: bytes) -> int:  # type: ignore[no-untyped-def]
    path = tmp_path / name
    path.write_bytes(data)
    return os.open(path, os.O_RDWR)


DATA = os.urandom(3 * (1 << 20) + 12345)


def test_env_forces_fallbacks_at_import() -> None:
    # KBFS_PORTABLE=1 is read once, at import, in each process.
    code = "from kbfs import osio; print(osio.linux())"
    env = {**os.environ, "KBFS_PORTABLE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    env.pop("KBFS_PORTABLE")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(osio.ON_LINUX)


def test_readinto(mode: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fd = _file(tmp_path, "f", DATA)
    try:
        buf = bytearray(100_000)
        assert osio.readinto(fd, buf, 5) == len(buf)
        assert bytes(buf) == DATA[5:100_005]
        tail = bytearray(1000)
        assert osio.readinto(fd, memoryview(tail)[:500], len(DATA) - 200) == 200
        assert bytes(tail[:200]) == DATA[-200:]
    finally:
        os.close(fd)


def test_read_cached(mode: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fd = _file(tmp_path, "f", DATA)
    try:
        os.pread(fd, len(DATA), 0)  # in the page cache now
        buf = bytearray(65536)
        got = osio.read_cached(fd, buf, 4096)
        if mode == "portable":
            assert got is None  # "not known": the caller reads the waiting way
        else:
            assert got == len(buf) and bytes(buf) == DATA[4096:4096 + 65536]
    finally:
        os.close(fd)


@pytest.mark.parametrize("dst_offset", [None, 7])
def test_copy_range(mode: str, tmp_path, dst_offset: int | None) -> None:  # type: ignore[no-untyped-def]
    src = _file(tmp_path, "src", DATA)
    dst = _file(tmp_path, "dst", b"")
    try:
        n = osio.copy_range(src, dst, 1000, len(DATA), dst_offset)  # asks past the end
        assert n == len(DATA) - 1000
        at = 1000 if dst_offset is None else dst_offset
        assert os.pread(dst, n, at) == DATA[1000:]
        assert os.fstat(dst).st_size == at + n
    finally:
        os.close(src)
        os.close(dst)


def test_sendfile_to_file(mode: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = _file(tmp_path, "src", DATA)
    dst = _file(tmp_path, "dst", b"head")
    try:
        os.lseek(dst, 4, os.SEEK_SET)
        assert osio.sendfile(dst, src, 10, 2 << 20) == 2 << 20
        assert osio.sendfile(dst, src, len(DATA) - 5, 100) == 5  # the end of SRC
        with open(tmp_path / "dst", "rb") as f:
            assert f.read() == b"head" + DATA[10:10 + (2 << 20)] + DATA[-5:]
    finally:
        os.close(src)
        os.close(dst)


def test_splice_socket_pipe_socket(mode: str) -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    rfd, wfd, room = osio.pipe(1 << 20)
    payload = os.urandom(3 << 20)
    got = bytearray()

    def receive() -> None:
        while len(got) < len(payload):
            chunk = d.recv(1 << 20)
            if not chunk:
                return
            got.extend(chunk)

    sender = threading.Thread(target=a.sendall, args=(payload,), daemon=True)
    receiver = threading.Thread(target=receive, daemon=True)
    sender.start()
    receiver.start()
    try:
        assert room >= 4096
        b.setblocking(False)
        moved = 0
        while moved < len(payload):
            try:
                n = osio.splice(b.fileno(), wfd, min(room, len(payload) - moved))
            except BlockingIOError:
                time.sleep(0.001)
                continue
            out = 0
            while out < n:
                try:
                    out += osio.splice(rfd, c.fileno(), n - out)
                except BlockingIOError:
                    time.sleep(0.001)
            moved += n
        receiver.join(30)
        assert bytes(got) == payload
        assert osio.splice_ok() == (mode == "linux")
    finally:
        for s in (a, b, c, d):
            s.close()
        os.close(rfd)
        os.close(wfd)


def test_allocate_and_punch(mode: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fd = _file(tmp_path, "f", DATA)
    try:
        assert osio.allocate(fd, len(DATA) + (1 << 20)) == (mode == "linux" and osio.allocate(fd, 1))
        # Never changes what is read: the first bytes stay, the grown part reads as zeros.
        size = os.fstat(fd).st_size
        assert os.pread(fd, len(DATA), 0) == DATA
        assert os.pread(fd, size - len(DATA), len(DATA)) == b"\0" * (size - len(DATA))
        punched = osio.punch(fd, 1 << 20, 1 << 20)
        assert punched == (mode == "linux")  # tmp_path is ext4/tmpfs here: both punch
        expect = DATA[:1 << 20] + (b"\0" * (1 << 20) if punched else DATA[1 << 20: 2 << 20]) + DATA[2 << 20:]
        assert os.pread(fd, len(DATA), 0) == expect
        assert os.fstat(fd).st_size == size
    finally:
        os.close(fd)


def test_advise_datasync_direct(mode: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fd = _file(tmp_path, "f", DATA)
    try:
        for how in ("willneed", "dontneed", "sequential"):
            osio.advise(fd, 0, 0, how)
        os.pwrite(fd, b"x" * 4096, 0)
        osio.datasync(fd)
        assert osio.direct_flag() == (getattr(os, "O_DIRECT", 0) if mode == "linux" else 0)
        dfd = osio.reopen_direct(fd)
        if mode == "portable":
            assert dfd == -1
        if dfd >= 0:
            try:
                buf = osio.anonymous_memory(8192, huge_pages=False)
                buf[:] = b"y" * 8192
                try:
                    osio.pwrite_all(dfd, buf, 8192)
                except OSError:  # tmpfs: EINVAL, the callers fall back
                    osio.pwrite_all(fd, buf, 8192)
            finally:
                os.close(dfd)
        else:
            osio.pwrite_all(fd, b"y" * 8192, 8192)
        assert os.pread(fd, 16384, 0) == b"x" * 4096 + DATA[4096:8192] + b"y" * 8192
    finally:
        os.close(fd)


def test_anonymous_memory(mode: str) -> None:
    for n, huge in ((0, True), (5000, True), (osio.HUGE_PAGE * 2, True), (osio.HUGE_PAGE, False)):
        buf = osio.anonymous_memory(n, huge)
        assert len(buf) == max(1, n) and buf[:] == b"\0" * max(1, n)
        buf.close()
    assert isinstance(osio.tune_malloc(32 << 20, 128 << 20), bool)


def test_memory_and_boot(mode: str) -> None:
    mem = osio.memory_available()
    if mode == "linux":
        assert mem is not None and mem > 0
    assert mem is None or mem > 0
    first = osio.boot_id()
    assert first == osio.boot_id()  # the same boot, the same answer
    if mode == "linux":
        assert first and len(first) >= 32


def test_mount_device(mode: str) -> None:
    dev = osio.mount_device("/")
    if mode == "linux":
        assert dev is not None and ":" in dev
    else:
        assert dev is None
    assert osio.mount_device("/no/such/mount/point") is None
    assert osio._unescape_mountinfo(r"/a\040b\134c") == "/a b\\c"


def test_process_questions(mode: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "kbfs-marker"],
                             cwd=tmp_path)
    try:
        start = osio.process_start(child.pid)
        assert start is not None and start == osio.process_start(child.pid)
        assert start != osio.process_start(os.getpid()) or mode == "portable"  # ps: to the second
        assert osio.process_uid(child.pid) == os.getuid()
        assert osio.process_zombie(child.pid) is False
        # Right after the spawn, /proc/PID/cmdline can still read empty (seen once in CI under
        # load): ask again for a moment before judging.
        deadline = time.monotonic() + 5
        while True:
            got = osio.process_args(child.pid)
            if (got is not None and got[0]) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert got is not None
        args, cwd = got
        assert args[-1] == "kbfs-marker" and "time.sleep(30)" in " ".join(args)
        assert cwd == (str(tmp_path) if mode == "linux" else None)
        child.kill()
        time.sleep(0.3)  # exited, not reaped: a zombie
        assert osio.process_zombie(child.pid) is True
    finally:
        child.kill()
        child.wait()
    for ask in (osio.process_start, osio.process_uid, osio.process_zombie, osio.process_args):
        assert ask(child.pid) is None  # reaped: no such process
