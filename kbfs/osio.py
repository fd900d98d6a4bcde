"""The one seam for every Linux-only call kbfs makes, each with a portable fallback.

What is behind it: splice (socket -> pipe -> socket) and its pipe, sendfile between files,
preadv (and preadv2's RWF_NOWAIT page-cache probe), O_DIRECT, copy_file_range, fallocate
(allocate and punch holes), posix_fadvise, anonymous memory with transparent huge pages
(madvise), fdatasync, glibc's malloc thresholds, and what kbfs reads from /proc (free
memory, the boot id, the mount table, a process's start time, command line, working
folder, owner and state). kbfs uses no inotify.

`KBFS_PORTABLE=1` in the environment forces every fallback. It is read ONCE, when this
module is imported (each kbfs process decides at start; `make test` runs the non-FUSE tests
a second time with it set). Tests switch it inside one process with `portable()`.

Every function gives the same bytes (or the same answer) both ways; the fallbacks are only
slower, or give up a hint (`advise`, `allocate`, `punch` and `tune_malloc` may do nothing;
`read_cached` answers None: "not known to be in memory, read it the waiting way"). The
process questions fall back to `ps`, which macOS and the BSDs have.

What this module does NOT do: decide when a fast path is worth it (the callers do), retry,
or log above debug level. It imports nothing of kbfs (layer 0).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import sys
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

ON_LINUX = sys.platform.startswith("linux")
# Read once at import (see the module docstring); `portable()` flips it for tests.
_linux: bool = ON_LINUX and os.environ.get("KBFS_PORTABLE", "") != "1"

HUGE_PAGE = 2 << 20
DEFAULT_PIPE_BYTES = 64 << 10  # what a pipe holds when its size cannot be asked
_COPY_CHUNK = 1 << 20
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EXDEV, errno.ENOTSUP)


def linux() -> bool:
    """Whether the Linux-only calls are used (Linux, and KBFS_PORTABLE=1 not set)."""
    return _linux


@contextlib.contextmanager
def portable(on: bool = True) -> Iterator[None]:
    """Within the block, use the portable fallbacks (ON) or the Linux calls (not ON, on
    Linux only). For tests: the flag is process-wide, not per thread."""
    global _linux
    saved = _linux
    _linux = ON_LINUX and not on
    try:
        yield
    finally:
        _linux = saved


# ---------------------------------------------------------------- reads and copies

def readinto(fd: int, buf: Any, offset: int) -> int:
    """Read into BUF (a writable buffer) at OFFSET of FD; bytes read (fewer only at the
    end of the file, or as one pread may). preadv straight into BUF; pread and a copy
    where preadv is missing (macOS before 11) or the seam is off."""
    if _linux and hasattr(os, "preadv"):
        return os.preadv(fd, [buf], offset)
    view = memoryview(buf).cast("B")
    data = os.pread(fd, len(view), offset)
    view[:len(data)] = data
    return len(data)


def nowait_reads() -> bool:
    """Whether `read_cached` can answer at all (preadv2 with RWF_NOWAIT)."""
    return _linux and hasattr(os, "RWF_NOWAIT") and hasattr(os, "preadv")


def read_cached(fd: int, buf: Any, offset: int) -> int | None:
    """Read into BUF at OFFSET only from the page cache, never waiting for the disk
    (RWF_NOWAIT): bytes read, or None when not all of it is in memory. Fallback: None
    (the caller then reads the waiting way, e.g. in a thread)."""
    if not nowait_reads():
        return None
    try:
        return os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in _NOT_SUPPORTED:  # a file system without RWF_NOWAIT
            return None
        raise


def pwrite_all(fd: int, data: Any, offset: int) -> None:
    """Write all of DATA at OFFSET of FD (pwrite until done)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def copy_range(src: int, dst: int, offset: int, length: int, dst_offset: int | None = None) -> int:
    """Copy LENGTH bytes at OFFSET of SRC to DST_OFFSET (default: OFFSET) of DST; bytes
    copied (fewer only at the end of SRC). copy_file_range (in the kernel, maybe a reflink)
    where it works; else pread/pwrite through a 1 MiB buffer."""
    dst_offset = offset if dst_offset is None else dst_offset
    done = 0
    if _linux and hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(src, dst, length - done, offset + done, dst_offset + done)
                if n == 0:
                    return done
                done += n
            return done
        except OSError as exc:
            if exc.errno not in _NOT_SUPPORTED:
                raise
            log.debug("copy_file_range refused (%s): copying through a buffer", exc)
    while done < length:
        chunk = os.pread(src, min(_COPY_CHUNK, length - done), offset + done)
        if not chunk:
            break
        pwrite_all(dst, chunk, dst_offset + done)
        done += len(chunk)
    return done


def sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int:
    """Send COUNT bytes at OFFSET of the file IN_FD to OUT_FD at its current position (a
    file or a blocking socket); bytes sent (fewer only at the end of IN_FD). Linux's
    sendfile takes any OUT_FD; elsewhere (macOS: sockets only) pread and write."""
    done = 0
    if _linux and hasattr(os, "sendfile"):
        try:
            while done < count:
                n = os.sendfile(out_fd, in_fd, offset + done, count - done)
                if n == 0:
                    return done
                done += n
            return done
        except OSError as exc:
            if exc.errno not in _NOT_SUPPORTED:
                raise
    while done < count:
        chunk = os.pread(in_fd, min(_COPY_CHUNK, count - done), offset + done)
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            view = view[os.write(out_fd, view):]
        done += len(chunk)
    return done


# ---------------------------------------------------------------- splice

def splice_ok() -> bool:
    """Whether `splice` moves bytes in the kernel (Linux's os.splice with sizable pipes).
    Callers with a Python path of their own use that path when this is False."""
    return _linux and hasattr(os, "splice") and hasattr(os, "pipe2")


def pipe(size: int) -> tuple[int, int, int]:
    """A non-blocking close-on-exec pipe (read fd, write fd, bytes it holds), asked to hold
    SIZE bytes (F_SETPIPE_SZ; refused over the per-user limit, which is only slower)."""
    import fcntl

    if _linux and hasattr(os, "pipe2"):
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    else:
        rfd, wfd = os.pipe()
        for fd in (rfd, wfd):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
    room = DEFAULT_PIPE_BYTES
    if _linux and hasattr(fcntl, "F_SETPIPE_SZ"):
        with contextlib.suppress(OSError):
            fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, size)
        room = fcntl.fcntl(wfd, fcntl.F_GETPIPE_SZ)
    return rfd, wfd, room


SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


def splice(src: int, dst: int, count: int, flags: int = SPLICE_FLAGS) -> int:
    """Move up to COUNT bytes from SRC to DST (one of them a pipe); bytes moved, 0 at the
    end of SRC; BlockingIOError when a non-blocking end is not ready. Fallback: one read
    and a write of what was read (which may then block or raise like os.write)."""
    if splice_ok():
        return os.splice(src, dst, count, flags=flags)
    data = os.read(src, count)
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(dst, view):]
        except BlockingIOError:
            # Bytes already taken from SRC must not be lost: wait for room.
            import select

            select.select([], [dst], [])
    return len(data)


# ---------------------------------------------------------------- writes, space, hints

def direct_flag() -> int:
    """os.O_DIRECT (writes past the page cache, aligned buffers and offsets only), or 0."""
    return getattr(os, "O_DIRECT", 0) if _linux else 0


def reopen_direct(fd: int, flags: int = os.O_WRONLY) -> int:
    """A second descriptor of FD's file opened with O_DIRECT | FLAGS (through
    /proc/self/fd), or -1 where that is not to be had (the caller writes through FD)."""
    if not direct_flag():
        return -1
    try:
        return os.open(f"/proc/self/fd/{fd}", flags | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("no O_DIRECT writes: %s", exc)
        return -1


_fallocate: Any = None  # fallocate(2) through ctypes once looked up; False: not to be had


def _fallocate_fn() -> Any:
    global _fallocate
    if _fallocate is None:
        _fallocate = False
        import ctypes  # here, not at import: every kbfs command imports this module

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            # fallocate64 takes 64-bit offsets everywhere; plain fallocate (musl) only
            # where off_t is 64 bits, which a 64-bit process's is.
            fn = getattr(libc, "fallocate64", None)
            if fn is None and ctypes.sizeof(ctypes.c_void_p) == 8:
                fn = getattr(libc, "fallocate", None)
            if fn is not None:
                fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
                fn.restype = ctypes.c_int
                _fallocate = fn
        except OSError as exc:
            log.debug("no fallocate: %s", exc)
    return _fallocate


def allocate(fd: int, size: int) -> bool:
    """Give FD's first SIZE bytes their disk blocks now (fallocate mode 0: contents kept,
    holes read as zeros, the size grows to at least SIZE); False when not to be had (nothing
    changed). Not os.posix_fallocate: where the file system lacks fallocate (NFS, FUSE)
    glibc's writes a byte into every 4 KiB instead, which costs more than it saves."""
    fn = _fallocate_fn() if _linux and size > 0 else None
    if not fn:
        return False
    if fn(fd, 0, 0, size) == 0:
        return True
    import ctypes

    log.debug("fallocate of %d bytes refused: %s", size, os.strerror(ctypes.get_errno()))
    return False


def punch(fd: int, offset: int, length: int) -> bool:
    """Free the disk blocks of [OFFSET, OFFSET+LENGTH) (they read as zeros after), keeping
    FD's size; False when not to be had (nothing freed, the bytes stay)."""
    fn = _fallocate_fn() if _linux and length > 0 else None
    if not fn:
        return False
    if fn(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        import ctypes

        err = ctypes.get_errno()
        if err in _NOT_SUPPORTED:
            return False
        raise OSError(err, os.strerror(err))
    return True


def advise(fd: int, offset: int, length: int, how: str) -> None:
    """Tell the kernel how [OFFSET, OFFSET+LENGTH) will be read (LENGTH 0: to the end):
    "willneed", "dontneed" or "sequential" (posix_fadvise). A hint only: nothing when the
    seam is off or the call fails."""
    if not _linux or not hasattr(os, "posix_fadvise"):
        return
    advice = {"willneed": "POSIX_FADV_WILLNEED", "dontneed": "POSIX_FADV_DONTNEED",
              "sequential": "POSIX_FADV_SEQUENTIAL"}[how]
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, getattr(os, advice))


def datasync(fd: int) -> None:
    """Make what was written to FD durable: fdatasync; fsync where there is none (macOS,
    where F_FULLFSYNC also flushes the drive's cache)."""
    if _linux and hasattr(os, "fdatasync"):
        os.fdatasync(fd)
        return
    import fcntl

    if hasattr(fcntl, "F_FULLFSYNC"):
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:  # not every file system has it
            pass
    os.fsync(fd)


def anonymous_memory(n: int, huge_pages: bool = True) -> mmap.mmap:
    """N bytes (at least 1) of private anonymous memory: page aligned (as O_DIRECT needs),
    zero pages until written. HUGE_PAGES: ask for transparent huge pages when N is at least
    one (MADV_HUGEPAGE; Linux only, a hint)."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    buf = mmap.mmap(-1, max(1, n), flags=flags) if flags else mmap.mmap(-1, max(1, n))
    if _linux and huge_pages and n >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


def tune_malloc(mmap_threshold: int, trim_threshold: int) -> bool:
    """Raise glibc's malloc mmap and trim thresholds (big buffers reused, not mapped and
    unmapped each time); False where libc is not glibc or the seam is off."""
    if not _linux:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, mmap_threshold)
        libc.mallopt(m_trim_threshold, trim_threshold)
        return True
    except (OSError, AttributeError):  # not glibc: only slower
        return False


# ---------------------------------------------------------------- the system's state

def memory_available() -> int | None:
    """Memory available without swapping, in bytes (/proc/meminfo's MemAvailable), or None.
    Fallback: free pages times the page size where sysconf knows them (a lower estimate:
    it leaves out the page cache), else None."""
    if _linux:
        try:
            with open("/proc/meminfo", "rb") as f:
                for line in f:
                    if line.startswith(b"MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return None
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def boot_id() -> bytes | None:
    """Something that names this boot of the machine, or None. Linux: the kernel's boot
    id; fallback: the kern.bootsessionuuid or kern.boottime sysctl (macOS, BSD)."""
    if _linux:
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as f:
                return f.read().strip() or None
        except OSError:
            return None
    for name in ("kern.bootsessionuuid", "kern.boottime"):
        out = _run(["sysctl", "-n", name])
        if out:
            return out.strip().encode()
    return None


def mount_device(mountpoint: str) -> str | None:
    """'major:minor' of the file system mounted at MOUNTPOINT, from /proc/self/mountinfo
    (not stat(), so a FUSE daemon can ask about its own mount); None when not mounted or
    unknown (the fallback: only Linux has that table, and only Linux uses the answer)."""
    if not _linux:
        return None
    target = os.path.realpath(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 4 and _unescape_mountinfo(parts[4]) == target:
                    found = parts[2]  # the last (topmost) mount on this point wins
    except OSError:
        return None
    return found


def _unescape_mountinfo(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 4 <= len(text) and text[i + 1: i + 4].isdigit():
            out.append(chr(int(text[i + 1: i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _run(args: list[str]) -> str | None:
    """ARGS' standard output, or None when it failed or is not there."""
    import subprocess

    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False,
                              env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 and done.stdout.strip() else None


def _stat_fields(pid: int) -> list[str] | None:
    # /proc/PID/stat: "pid (comm) state ...": comm may hold spaces and parentheses.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> int | str | None:
    """When PID started, or None (no such process). With the pid it names one process for
    good (a pid is reused, a start time with it not). Linux: clock ticks after boot
    (/proc/PID/stat field 22); fallback: `ps -o lstart` (a date, to the second). The two
    forms differ: compare only answers of the same mode."""
    if _linux:
        fields = _stat_fields(pid)
        try:
            return int(fields[19]) if fields else None  # fields[0] is field 3 (state)
        except (IndexError, ValueError):
            return None
    out = _run(["ps", "-o", "lstart=", "-p", str(int(pid))])
    return " ".join(out.split()) if out else None


def process_uid(pid: int) -> int | None:
    """The real user id that owns PID, or None."""
    if _linux:
        try:
            return os.stat(f"/proc/{pid}").st_uid
        except OSError:
            return None
    out = _run(["ps", "-o", "uid=", "-p", str(int(pid))])
    try:
        return int(out.strip()) if out else None
    except ValueError:
        return None


def process_zombie(pid: int) -> bool | None:
    """Whether PID has exited but not been reaped (a zombie), or None when unknown."""
    if _linux:
        fields = _stat_fields(pid)
        return fields[0] == "Z" if fields else None
    out = _run(["ps", "-o", "stat=", "-p", str(int(pid))])
    return out.strip().startswith("Z") if out else None


def process_args(pid: int) -> tuple[list[str], str | None] | None:
    """PID's command line and its working folder (None when unknown), or None. Linux: exact
    (/proc/PID/cmdline, cwd); fallback: `ps -o command`, split at spaces (an argument with
    a space in it comes back as two), and no working folder."""
    if _linux:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
            return args, os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return None
    out = _run(["ps", "-ww", "-o", "command=", "-p", str(int(pid))])
    return (out.split(), None) if out else None
