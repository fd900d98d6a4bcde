"""Wiring of a kbfs mount: Fetcher + BlockCache + fusefs operations, daemon, status, unmount.

`run_mount` serves a mount in the foreground (SIGINT/SIGTERM unmount cleanly);
`spawn_mount` re-executes `python -m kbfs mount ... -f` as a detached daemon whose output
goes to a log file, and returns only once the child reports the mount ready (through a
pipe) or failed. Each live mount writes a status file (pid, source, mountpoint and the
counters of the cache, the fetcher and the file system) under the runtime folder, which
`kbfs status` and `kbfs umount` read.

All user-facing failures are raised as `KbfsError` with one clear message; this module
never prints (the CLI does) except into the daemon's log.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kbfs import config, fusefs, protocol, prv
from kbfs.errors import BadRequest, ConfigError, KbfsError

log = logging.getLogger(__name__)

STATUS_INTERVAL = 2.0
READY_TIMEOUT = 60.0
KBFS_SCHEME = "kbfs://"


# ---------------------------------------------------------------- sources and checks


@dataclass(frozen=True)
class Source:
    """A parsed SOURCE argument: a local folder, or a share at a relay."""

    text: str
    local_dir: str | None = None
    relay: str | None = None
    share: str | None = None
    subpath: str = ""


def parse_source(text: str) -> Source:
    """Check SOURCE: a local folder, or `kbfs://HOST:PORT/SHARE_ID[/sub/path]`."""
    if text.startswith(KBFS_SCHEME):
        rest = text[len(KBFS_SCHEME) :]
        host, _, path = rest.partition("/")
        share, _, sub = path.partition("/")
        if not host or not share:
            raise ConfigError(f"{text}: expected kbfs://HOST:PORT/SHARE_ID[/sub/path]")
        try:
            protocol.check_share_id(share)
            sub = protocol.safe_relpath(sub)
        except BadRequest as exc:
            raise ConfigError(f"{text}: {exc}") from None
        return Source(text, relay=config.normalize_relay(host), share=share, subpath=sub)
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.exists(path):
        raise ConfigError(f"{text}: no such folder")
    if not os.path.isdir(path):
        raise ConfigError(f"{text}: not a folder (mount a folder of .prv files)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"{text}: permission denied")
    return Source(text, local_dir=path)


def _is_dead_mount(path: str) -> bool:
    # statfs, not stat: the kernel answers stat of a FUSE root from its attribute cache for
    # a while after the daemon died, so a remount right after a crash would see a live mount.
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def check_mountpoint(mountpoint: str) -> str:
    """The absolute mountpoint, after checking it can take a mount (else ConfigError).

    A dead kbfs mount left by a killed daemon ("transport endpoint is not connected") is
    lazily unmounted first, so a remount over the same cache just works.
    """
    path = os.path.abspath(os.path.expanduser(mountpoint))
    if _is_dead_mount(path):
        log.warning("%s: clearing a dead mount left by a stopped daemon", path)
        _fusermount(path, lazy=True)
    if not os.path.lexists(path):
        raise ConfigError(f"{mountpoint}: no such folder (create it first)")
    if not os.path.isdir(path):
        raise ConfigError(f"{mountpoint}: not a folder")
    if os.path.ismount(path):
        raise ConfigError(f"{mountpoint}: something is already mounted there")
    if not os.path.exists("/dev/fuse"):
        raise ConfigError("/dev/fuse is missing: FUSE is not available on this machine")
    if shutil.which("fusermount3") is None and os.getuid() != 0:
        raise ConfigError("fusermount3 not found: install the fuse3 package")
    return path


# ---------------------------------------------------------------- runtime folder and status


def runtime_dir() -> str:
    """Where mount status files live: KBFS_RUNTIME_DIR, XDG_RUNTIME_DIR or a private tmp folder."""
    base = os.environ.get("KBFS_RUNTIME_DIR")
    if not base:
        xdg = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
        base = (
            os.path.join(xdg, "kbfs")
            if os.path.isdir(xdg)
            else os.path.join(tempfile.gettempdir(), f"kbfs-{os.getuid()}")
        )
    path = os.path.join(base, "mounts")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def status_path(mountpoint: str) -> str:
    key = hashlib.sha1(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(runtime_dir(), key + ".json")


def log_path(cache_dir: str, mountpoint: str) -> str:
    key = hashlib.sha1(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, "logs")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"mount-{key}.log")


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); it is not serving.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def read_statuses(mountpoint: str | None = None) -> list[dict[str, Any]]:
    """Status of every mount this user runs (or of one), with `alive` and `mounted` flags."""
    paths = (
        [status_path(mountpoint)]
        if mountpoint
        else [
            os.path.join(runtime_dir(), n)
            for n in sorted(os.listdir(runtime_dir()))
            if n.endswith(".json")
        ]
    )
    out = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        data["alive"] = pid_alive(int(data.get("pid", 0) or 0))
        data["mounted"] = os.path.ismount(str(data.get("mountpoint", "")))
        data["status_file"] = path
        out.append(data)
    return out


# ---------------------------------------------------------------- foreground mount


@dataclass
class MountOptions:
    source: Source
    mountpoint: str
    settings: config.Settings
    timeout: float = 10.0
    deadline: float = 30.0
    ready_fd: int | None = None
    use_local: bool = True  # read a pointer's original_path when it is on this machine


def _build(opts: MountOptions) -> tuple[Any, Any, fusefs.KbfsOperations]:
    # Imported here: the fetch stack (requests) is only needed by a mount that runs.
    from kbfs import cache as kcache
    from kbfs.fetch import Fetcher

    src = opts.source
    relays = list(opts.settings.relays)
    if src.relay and src.relay not in relays:
        relays.insert(0, src.relay)
    if not relays and src.local_dir is not None:
        log.warning(
            "no relay configured (--relay or KBFS_RELAY): only cached or local content reads"
        )
    fetcher = Fetcher(
        relays, timeout=opts.timeout, deadline=opts.deadline, local_dirs=opts.settings.search_dirs
    )
    capacity = opts.settings.resolved_cache_size()
    block_cache = kcache.BlockCache(opts.settings.cache_dir, fetcher, capacity)

    def on_pointer(pointer: prv.Pointer) -> None:
        # A local pointer's original_path may name a copy on this machine (checked block by
        # block, like any source); a remote share's paths are of the share's machine.
        if (opts.use_local and src.local_dir and pointer.original_path
                and os.path.isabs(pointer.original_path)):
            fetcher.add_local_candidate(pointer.sha1, pointer.original_path)

    list_dir: Callable[[str], dict[str, Any]] | None = None
    if src.share is not None:
        relay, share, sub = src.relay, src.share, src.subpath
        assert relay is not None

        def list_dir(path: str) -> dict[str, Any]:
            full = "/".join(p for p in (sub, path) if p)
            # names, sizes and shapes checked here; each pointer by fusefs
            return protocol.parse_listing(fetcher.list_share(relay, share, full))

    ops = fusefs.KbfsOperations(
        block_cache,
        source_dir=src.local_dir,
        list_dir=list_dir,
        source_of=fetcher.last_source,
        on_pointer=on_pointer,
    )
    return fetcher, block_cache, ops


_signalled: set[int] = set()


def _signal_ready(fd: int | None, message: str) -> None:
    """Tell the waiting parent "ok" or "error: ..." once; later calls do nothing.

    Once closed, the descriptor's number may be reused (by a socket, say), so it must
    never be written to or closed a second time.
    """
    if fd is None or fd in _signalled:
        return
    _signalled.add(fd)
    with contextlib.suppress(OSError):
        os.write(fd, (message.strip() + "\n").encode())
    with contextlib.suppress(OSError):
        os.close(fd)


def run_mount(opts: MountOptions) -> None:
    """Mount and serve until unmounted or signalled. Raises KbfsError when it cannot mount."""
    import pyfuse3
    import trio

    ready_fd = opts.ready_fd
    try:
        fetcher, block_cache, ops = _build(opts)
    except (KbfsError, OSError) as exc:
        _signal_ready(ready_fd, f"error: {exc}")
        raise
    try:
        if opts.source.share is not None:
            # A wrong share id or a relay that is down should fail now, clearly, not at ls.
            try:
                assert ops.list_dir is not None
                ops.list_dir("")
            except KbfsError as exc:
                raise KbfsError(f"{opts.source.text}: cannot list the share: {exc}") from None
        options = fusefs.mount_options("kbfs")
        try:
            pyfuse3.init(ops, opts.mountpoint, options)
        except RuntimeError as exc:
            raise KbfsError(f"{opts.mountpoint}: cannot mount ({exc}); see the log") from None
    except BaseException as exc:
        _signal_ready(ready_fd, f"error: {exc}")
        block_cache.close()
        fetcher.close()
        raise

    status_file = status_path(opts.mountpoint)
    started = time.time()

    def write_status() -> None:
        data = {
            "pid": os.getpid(),
            "source": opts.source.text,
            "mountpoint": opts.mountpoint,
            "cache_dir": opts.settings.cache_dir,
            "log": os.environ.get("KBFS_MOUNT_LOG", ""),
            "started": started,
            "updated": time.time(),
            "fs": ops.statistics(),
            "cache": _safe(block_cache.statistics),
            "fetch": _safe(fetcher.statistics),
        }
        _write_json(status_file, data)

    async def serve() -> None:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                with trio.open_signal_receiver(
                    signal.SIGINT, signal.SIGTERM, signal.SIGHUP
                ) as sigs:
                    async for signum in sigs:
                        log.info("signal %d: unmounting %s", signum, opts.mountpoint)
                        pyfuse3.terminate()
                        return

            async def when_ready() -> None:
                # A stat through our own mount proves the kernel handshake is done.
                await trio.to_thread.run_sync(os.stat, opts.mountpoint)
                fusefs.raise_read_ahead(opts.mountpoint)
                await trio.to_thread.run_sync(write_status)
                log.info("mounted %s at %s", opts.source.text, opts.mountpoint)
                _signal_ready(ready_fd, "ok")
                while True:
                    await trio.sleep(STATUS_INTERVAL)
                    try:
                        await trio.to_thread.run_sync(write_status)
                    except OSError as exc:
                        log.warning("cannot write %s: %s", status_file, exc)

            nursery.start_soon(on_signals)
            nursery.start_soon(when_ready)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    finally:
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
        with contextlib.suppress(OSError):
            os.unlink(status_file)
        _signal_ready(ready_fd, "error: the mount stopped before it was ready")
        block_cache.close()
        fetcher.close()
        log.info("unmounted %s", opts.mountpoint)


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # statistics must never take the mount down
        return {"error": str(exc)}


# ---------------------------------------------------------------- background mount


def spawn_mount(
    argv: Sequence[str], mountpoint: str, cache_dir: str, timeout: float = READY_TIMEOUT
) -> tuple[int, str]:
    """Run `python -m kbfs ARGV --ready-fd N` detached; return (pid, log file) once ready.

    ARGV are the arguments of the foreground mount command (starting at `mount`). Raises
    KbfsError with the child's own error line when it fails.
    """
    logfile = log_path(cache_dir, mountpoint)
    r, w = os.pipe()
    env = dict(os.environ, KBFS_MOUNT_LOG=logfile)
    with open(logfile, "ab") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "kbfs", *argv, "--ready-fd", str(w)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            pass_fds=(w,),
            start_new_session=True,
            cwd="/",  # a daemon must not keep the caller's folder (or a mount) busy
            env=env,
            close_fds=True,
        )
    os.close(w)
    message = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in message:
            left = deadline - time.monotonic()
            if left <= 0:
                child.kill()
                raise KbfsError(
                    f"{mountpoint}: the mount was not ready after {timeout:.0f} s (log: {logfile})"
                )
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 4096)
            if not chunk:
                break
            message += chunk
    finally:
        os.close(r)
    line = message.decode(errors="replace").strip()
    if line == "ok":
        return child.pid, logfile
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(5)
    if line.startswith("error: "):
        raise KbfsError(line[len("error: ") :])
    raise KbfsError(
        f"{mountpoint}: the mount daemon exited ({_last_line(logfile)}; log: {logfile})"
    )


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip() if lines else "no output"


# ---------------------------------------------------------------- unmount


def _fusermount(path: str, lazy: bool = False) -> tuple[bool, str]:
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [path]
    if shutil.which("fusermount3") is None:
        cmd = ["umount"] + (["-l"] if lazy else []) + [path]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return res.returncode == 0, (res.stderr or res.stdout).strip()


def unmount(mountpoint: str, lazy: bool = False, timeout: float = 15.0) -> None:
    """Unmount MOUNTPOINT and stop its daemon. Raises KbfsError when it is busy or not a mount."""
    path = os.path.abspath(os.path.expanduser(mountpoint))
    statuses = read_statuses(path)
    pid = int(statuses[0].get("pid", 0)) if statuses else 0
    dead = _is_dead_mount(path)
    if os.path.ismount(path) or dead:
        ok, why = _fusermount(path, lazy=lazy or dead)
        if not ok:
            if "busy" in why.lower():
                raise KbfsError(
                    f"{mountpoint}: busy (a program has a file open there); close it, or use --lazy"
                )
            raise KbfsError(f"{mountpoint}: cannot unmount: {why}")
    elif not (pid and pid_alive(pid)):
        raise KbfsError(f"{mountpoint}: not a kbfs mount")
    if pid and pid_alive(pid):
        # Unmounting ends the daemon's loop by itself; the signal covers a daemon that hangs.
        end = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < end:
            time.sleep(0.05)
            if time.monotonic() > end - timeout + 2:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for st in statuses:
        with contextlib.suppress(OSError):
            os.unlink(st["status_file"])


def find_mount_of(path: str) -> dict[str, Any] | None:
    """The status of the live kbfs mount that holds PATH, if any."""
    real = os.path.realpath(path)
    best = None
    for st in read_statuses():
        mnt = str(st.get("mountpoint", ""))
        if st["alive"] and (real == mnt or real.startswith(mnt.rstrip("/") + "/")):
            if best is None or len(mnt) > len(str(best["mountpoint"])):
                best = st
    return best
