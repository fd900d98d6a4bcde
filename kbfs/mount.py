"""Wiring of a kbfs mount: Fetcher + piece cache + fusefs operations, daemon, status, unmount.

Every pointer (v2, v1, root-less) is read through one `piececache.PieceCache` in
CACHE_DIR/pieces/ with the whole configured capacity, `_Sources` as its source
(`fetch_pieces`, `fetch_tree`, `fetch_blocks`). Its counters are the status file's "cache"
(and "pieces", the same, for older readers of the status file).

`run_mount` serves a mount in the foreground (SIGINT/SIGTERM unmount cleanly);
`spawn_mount` re-executes `python -m kbfs mount ... -f` as a detached daemon whose output
goes to a log file, and returns only once the child reports the mount ready (through a
pipe) or failed. Each live mount writes a status file (pid and the process's start time,
source, mountpoint and the counters of the cache, the fetcher and the file system) under
the runtime folder, which `kbfs status` and `kbfs umount` read.

The runtime folder is private: XDG_RUNTIME_DIR or /run/user/UID when it is ours and 0700,
else TMPDIR/kbfs-UID, which must be a real folder of ours, mode 0700 (one that another
user created first is refused, never used). A status file is only a claim: before
`kbfs umount` signals the pid it names, it checks that the process is ours, started when
the status file says, and runs `kbfs mount` of that mountpoint (`daemon_pid`).

A pointer's original_path is offered to the fetcher as a local copy only when the owner of
the pointer file may read it (`user_may_read`): a root mount must not read files for a
pointer whose author could not.

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
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from kbfs import config, fusefs, kbfsurl, mirrorurl, osio, protocol, prv, tlsconf
from kbfs import tree as tree_mod
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
    """Check SOURCE: a local folder, or `kbfs://HOST:PORT/SHARE_ID[/sub/path]`
    (`kbfs+https://HOST[:PORT]/...` for an https relay; `kbfs.kbfsurl`)."""
    if kbfsurl.is_link(text):
        try:
            relay, share, sub = kbfsurl.parse(text)
        except BadRequest as exc:
            raise ConfigError(str(exc)) from None
        return Source(text, relay=relay, share=share, subpath=sub)
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


def private_dir_problem(path: str) -> str | None:
    """What makes PATH unfit to hold our private files, or None: it must be a folder (not a
    symbolic link to one), owned by us, that nobody else may enter or write (mode 0700)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if st.st_uid != os.getuid():
        return f"is owned by uid {st.st_uid}, not by us (uid {os.getuid()})"
    if st.st_mode & 0o077:
        return f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0700"
    return None


def _private_dir(path: str) -> str:
    """Create PATH (mode 0700) unless it exists, then check it is private; else ConfigError.

    mkdir never follows a symbolic link, and the check looks at the name itself (lstat):
    a folder or link another user planted first is refused, not used. Once it is ours,
    nobody else can replace it (a sticky /tmp lets only the owner rename or delete)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        # Ours, and nobody else could ever write in it (e.g. 0755, as older kbfs versions
        # left it): nothing in it can be planted, so making it private is safe.
        if (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
                and st.st_mode & 0o077 and not st.st_mode & 0o022):
            os.chmod(path, 0o700, follow_symlinks=False)
    problem = private_dir_problem(path)
    if problem is not None:
        raise ConfigError(
            f"{path} {problem}: refusing to keep mount status there "
            "(remove it, or set KBFS_RUNTIME_DIR to a private folder)"
        )
    return path


def runtime_dir() -> str:
    """Where mount status files live (a private folder; see the module docstring).

    KBFS_RUNTIME_DIR if set; else XDG_RUNTIME_DIR/kbfs or /run/user/UID/kbfs when that
    runtime folder is ours and 0700; else TMPDIR/kbfs-UID (tempfile.gettempdir()). The
    folder and its `mounts` must be ours, mode 0700, or ConfigError says why."""
    uid = os.getuid()
    base = os.environ.get("KBFS_RUNTIME_DIR")
    if base:
        os.makedirs(base, mode=0o700, exist_ok=True)
    else:
        for xdg in (os.environ.get("XDG_RUNTIME_DIR"), f"/run/user/{uid}"):
            if xdg and os.path.isabs(xdg) and private_dir_problem(xdg) is None:
                base = _private_dir(os.path.join(xdg, "kbfs"))
                break
        else:
            base = _private_dir(os.path.join(tempfile.gettempdir(), f"kbfs-{uid}"))
    return _private_dir(os.path.join(base, "mounts"))


def status_path(mountpoint: str) -> str:
    key = hashlib.sha1(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(runtime_dir(), key + ".json")


def log_path(cache_dir: str, mountpoint: str) -> str:
    key = hashlib.sha1(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, "logs")
    os.makedirs(folder, mode=0o700, exist_ok=True)  # logs name the files read: private
    return os.path.join(folder, f"mount-{key}.log")


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def process_start_time(pid: int) -> int | str | None:
    """When PID started (Linux: clock ticks after boot, /proc/PID/stat field 22; elsewhere or
    with KBFS_PORTABLE=1: `ps`'s start date; kbfs.osio), or None.

    With the pid it names one process for good: a pid is reused, a start time with it not."""
    return osio.process_start(pid)


def _runs_mount_of(pid: int, mountpoint: str) -> bool:
    """Whether PID's command line is a `kbfs ... mount ... MOUNTPOINT` (as spawn_mount runs
    it: python -m kbfs mount SRC MNT -f ..., or the kbfs script)."""
    got = osio.process_args(pid)
    if got is None:
        return False
    args, cwd = got
    is_kbfs = any(a == "kbfs" or os.path.basename(a) == "kbfs" for a in args[:3])
    target = os.path.normpath(mountpoint)
    # Without its working folder (not Linux) only absolute arguments can name the mountpoint.
    names_it = any(os.path.normpath(os.path.join(cwd or "/", a)) == target for a in args
                   if cwd is not None or os.path.isabs(a))
    return is_kbfs and "mount" in args and names_it


def daemon_pid(status: dict[str, Any]) -> int:
    """The pid of the daemon STATUS describes if that process is alive and really is it:
    ours, started when the status file says (when it says), running `kbfs mount` of its
    mountpoint. Else 0: the file is stale (or forged), and its pid belongs to someone else."""
    try:
        pid = int(status.get("pid", 0) or 0)
    except (TypeError, ValueError):
        return 0
    if pid <= 0 or pid == os.getpid() or not pid_alive(pid):
        return 0
    if osio.process_uid(pid) != os.getuid():
        return 0
    recorded = status.get("pid_start")
    if recorded is not None and process_start_time(pid) != recorded:
        return 0
    if not _runs_mount_of(pid, str(status.get("mountpoint", ""))):
        return 0
    return pid


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); it is not serving.
    return osio.process_zombie(pid) is not True


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
        data["alive"] = daemon_pid(data) != 0
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
    allow_other: bool = False  # let other users in (only when asked: kbfs mount --allow-other)


@lru_cache(maxsize=256)
def _groups_of(uid: int, gid: int) -> frozenset[int]:
    try:
        return frozenset(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)) | {gid}
    except (KeyError, OSError):
        return frozenset({gid})


def user_may_read(path: str, uid: int, gid: int) -> bool:
    """Whether user UID (primary group GID) may read PATH by the mode bits of the file and
    of every folder above it (search). ACLs are not consulted: a file shared only through
    an ACL is not used, which costs a fetch, never a leak."""
    if uid == 0:
        return True
    groups = _groups_of(uid, gid)

    def allows(st: os.stat_result, bit: int) -> bool:  # bit: 4 read, 1 search
        if st.st_uid == uid:
            return bool(st.st_mode & (bit << 6))
        if st.st_gid in groups:
            return bool(st.st_mode & (bit << 3))
        return bool(st.st_mode & bit)

    try:
        real = os.path.realpath(path)
        folder = os.path.dirname(real)
        while True:
            if not allows(os.stat(folder), 1):
                return False
            if folder == "/":
                break
            folder = os.path.dirname(folder)
        st = os.stat(real)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and allows(st, 4)


MAX_HINT_SETS = 64  # distinct kbfs_sources lists a mount makes a Fetcher for
PROBE_TIMEOUT = 3.0


class _Sources:
    """The cache's `BlockSource` for a mount: each sha1 goes to a Fetcher over the
    configured relays, followed by the source hints (`kbfs_sources`) of the pointer that
    named it. Content without hints (and everything once MAX_HINT_SETS distinct hint
    lists were seen) uses the main Fetcher, so a hint only ever adds places to look, for
    the content whose pointer gave it."""

    def __init__(self, make: Callable[[list[str]], Any], relays: Sequence[str]) -> None:
        self._make = make
        self.relays = tuple(relays)
        self.main = make(list(relays))
        self._lock = threading.Lock()
        self._by_hints: dict[tuple[str, ...], Any] = {}
        self._routes: dict[str, Any] = {}

    def add_hints(self, sha1: str, hints: Sequence[str]) -> None:
        extra = tuple(h for h in dict.fromkeys(hints) if h not in self.relays)
        if not extra:
            return
        with self._lock:
            f = self._by_hints.get(extra)
            if f is None:
                if len(self._by_hints) >= MAX_HINT_SETS:
                    log.info("%s: more than %d different source hint lists; hints ignored",
                             sha1, MAX_HINT_SETS)
                    return
                f = self._by_hints[extra] = self._make([*self.relays, *extra])
            self._routes[sha1.lower()] = f

    def for_sha1(self, sha1: str) -> Any:
        with self._lock:
            return self._routes.get(sha1.lower(), self.main)

    def all_relays(self) -> list[str]:
        """Configured relays, then every hinted one."""
        with self._lock:
            hinted = [h for key in self._by_hints for h in key]
        return list(dict.fromkeys([*self.relays, *hinted]))

    def fetch_tree(self, sha1: str, size: int, block_size: int = tree_mod.BLOCK_SIZE,
                   root: str | None = None) -> bytes:
        return bytes(self.for_sha1(sha1).fetch_tree(sha1, size, block_size, root))

    def fetch_blocks(self, sha1: str, size: int, first: int, count: int,
                     leaves: Sequence[bytes], block_size: int = tree_mod.BLOCK_SIZE) -> bytes:
        return bytes(self.for_sha1(sha1).fetch_blocks(sha1, size, first, count, leaves,
                                                      block_size))

    def fetch_blocks_into(self, sha1: str, size: int, first: int, count: int,
                          leaves: Sequence[bytes], out: memoryview,
                          block_size: int = tree_mod.BLOCK_SIZE) -> None:
        self.for_sha1(sha1).fetch_blocks_into(sha1, size, first, count, leaves, out, block_size)

    def fetch_pieces(self, sha1: str, size: int, root: str, block_size: int, first: int,
                     count: int, *, known: Any = None) -> bytes:
        return bytes(self.for_sha1(sha1).fetch_pieces(sha1, size, root, block_size, first,
                                                      count, known=known))

    def add_local_candidate(self, sha1: str, path: str) -> None:
        self.for_sha1(sha1).add_local_candidate(sha1, path)

    def last_source(self, sha1: str) -> str | None:
        return self.for_sha1(sha1).last_source(sha1)  # type: ignore[no-any-return]

    def list_share(self, relay: str, share: str, path: str) -> dict[str, Any]:
        return self.main.list_share(relay, share, path)  # type: ignore[no-any-return]

    def statistics(self) -> dict[str, Any]:
        """The Fetchers' statistics merged: counters summed per source URL."""
        with self._lock:
            fetchers = [self.main, *self._by_hints.values()]
        sources: dict[str, dict[str, Any]] = {}
        last: dict[str, str] = {}
        for f in fetchers:
            st = f.statistics()
            last.update(st.get("last_source") or {})
            for key, counters in (st.get("sources") or {}).items():
                into = sources.setdefault(key, {})
                for name, value in counters.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        into[name] = into.get(name, 0) + value
                    else:
                        into[name] = value
        return {"sources": sources, "last_source": last}

    def close(self) -> None:
        with self._lock:
            fetchers = [self.main, *self._by_hints.values()]
        for f in fetchers:
            f.close()


def probe_relay(relay: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why RELAY cannot be reached now (one phrase), or None when it answers its health
    URL. Any HTTP answer counts as reachable: only "nothing answers" is reported."""
    import requests

    try:
        tlsconf.session().get(relay + protocol.HEALTH_PATH, timeout=timeout,
                              allow_redirects=False)
    except requests.ConnectionError as exc:
        text = str(exc)
        if tlsconf.advice(exc):
            return tlsconf.advice(exc)
        if "refused" in text.lower():
            return "connection refused"
        if "name or service" in text.lower() or "resolve" in text.lower():
            return "host name not found"
        return "cannot connect"
    except requests.Timeout:
        return f"no answer within {timeout:.0f} s"
    except requests.RequestException as exc:
        return type(exc).__name__
    return None


def probe_relays(relays: Sequence[str]) -> dict[str, str]:
    """{relay: why unreachable} for each of RELAYS that does not answer (probed at once)."""
    from concurrent.futures import ThreadPoolExecutor

    if not relays:
        return {}
    with ThreadPoolExecutor(min(8, len(relays))) as pool:
        answers = dict(zip(relays, pool.map(probe_relay, relays), strict=True))
    return {r: why for r, why in answers.items() if why is not None}


def _build(opts: MountOptions) -> tuple[_Sources, Any, fusefs.KbfsOperations]:
    # Imported here: the fetch stack (requests) is only needed by a mount that runs.
    from kbfs.fetch import Fetcher
    from kbfs.piececache import PieceCache

    src = opts.source
    relays = list(opts.settings.relays)
    if src.relay and src.relay not in relays:
        relays.insert(0, src.relay)
    if not relays and src.local_dir is not None:
        log.warning(
            "no relay configured (--relay or KBFS_RELAY): only cached or local content, "
            "and content whose pointers carry source hints, reads"
        )

    named = [src.relay] if src.relay else []

    def make(relay_list: list[str]) -> Fetcher:
        # Tokens only where they may go (Settings.tokens_for): never to a relay only a
        # pointer's hint named.
        # Mirrors first (docs/mirrors.md): marked entries the Fetcher splits out.
        return Fetcher([*map(mirrorurl.mark, opts.settings.mirrors), *relay_list],
                       timeout=opts.timeout, deadline=opts.deadline,
                       local_dirs=opts.settings.search_dirs, direct=opts.settings.direct,
                       tokens=opts.settings.tokens_for(relay_list, named))

    fetcher = _Sources(make, relays)
    capacity = opts.settings.resolved_cache_size()
    # read_around: neighbourhoods after local misses (kbfs/readahead2.py ReadAround).
    cache = PieceCache(os.path.join(opts.settings.cache_dir, "pieces"), fetcher, capacity,
                       read_around=True)

    def on_pointer(pointer: prv.Pointer, uid: int, gid: int) -> None:
        if src.local_dir:
            # Hints of a remote share's listing are not needed: its relay is known.
            fetcher.add_hints(pointer.sha1, [*pointer.source_hints(), *map(
                mirrorurl.mark, pointer.mirror_hints())])
        # A local pointer's original_path may name a copy on this machine (checked block by
        # block, like any source); a remote share's paths are of the share's machine. The
        # daemon may read more than the pointer's author (UID, GID: the pointer file's
        # owner) could: a copy that author may not read is never offered.
        path = pointer.original_path
        if not (opts.use_local and src.local_dir and path and os.path.isabs(path)):
            return
        if user_may_read(path, uid, gid):
            fetcher.add_local_candidate(pointer.sha1, path)
        else:
            log.info("not reading %s for a pointer owned by uid %d: that user may not read it",
                     path, uid)

    list_dir: Callable[[str], dict[str, Any]] | None = None
    if src.share is not None:
        relay, share, sub = src.relay, src.share, src.subpath
        assert relay is not None

        def list_dir(path: str) -> dict[str, Any]:
            full = "/".join(p for p in (sub, path) if p)
            # names, sizes and shapes checked here; each pointer by fusefs
            return protocol.parse_listing(fetcher.list_share(relay, share, full))

    ops = fusefs.KbfsOperations(
        cache,
        source_dir=src.local_dir,
        list_dir=list_dir,
        source_of=fetcher.last_source,
        on_pointer=on_pointer,
    )
    return fetcher, cache, ops


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
        fetcher, cache, ops = _build(opts)
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
        # A relay that is down now makes every uncached read fail (EIO, after the fetch
        # deadline): say so once, at mount time, rather than only in the log later.
        unreachable = probe_relays(fetcher.relays)
        warnings = [f"relay {relay} is unreachable ({why}): reads of content not cached "
                    "will fail until it is back" for relay, why in unreachable.items()]
        for line in warnings:
            log.warning("%s", line)
        options = fusefs.mount_options("kbfs", allow_other=opts.allow_other)
        try:
            pyfuse3.init(ops, opts.mountpoint, options)
        except RuntimeError as exc:
            raise KbfsError(f"{opts.mountpoint}: cannot mount ({exc}); see the log") from None
    except BaseException as exc:
        _signal_ready(ready_fd, f"error: {exc}")
        cache.close()
        fetcher.close()
        raise

    status_file = status_path(opts.mountpoint)
    started = time.time()
    pid_start = process_start_time(os.getpid())

    def write_status() -> None:
        data = {
            "pid": os.getpid(),
            "pid_start": pid_start,  # with the pid: which process (see daemon_pid)
            "source": opts.source.text,
            "mountpoint": opts.mountpoint,
            "cache_dir": opts.settings.cache_dir,
            "log": os.environ.get("KBFS_MOUNT_LOG", ""),
            "started": started,
            "updated": time.time(),
            "fs": ops.statistics(),
            "cache": _safe(cache.statistics),
            "pieces": _safe(cache.statistics),
            "fetch": _safe(fetcher.statistics),
            "relays": fetcher.all_relays(),
            "warnings": warnings,
            "unreachable_at_mount": unreachable,
            # Why reads failed, and which pointers could not be read (path: reason).
            "last_errors": ops.last_errors(),
            "problems": ops.problems(),
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
        cache.close()
        fetcher.close()
        log.info("unmounted %s", opts.mountpoint)


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # statistics must never take the mount down
        return {"error": str(exc)}


# ---------------------------------------------------------------- background mount


def spawn_mount(
    argv: Sequence[str], mountpoint: str, cache_dir: str, timeout: float = READY_TIMEOUT,
    env_extra: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Run `python -m kbfs ARGV --ready-fd N` detached; return (pid, log file) once ready.

    ARGV are the arguments of the foreground mount command (starting at `mount`). Raises
    KbfsError with the child's own error line when it fails.
    """
    logfile = log_path(cache_dir, mountpoint)
    r, w = os.pipe()
    env = dict(os.environ, **(env_extra or {}), KBFS_MOUNT_LOG=logfile)
    # 0600, and never through a link planted in a folder another user could write.
    fd = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with open(fd, "ab") as out:
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


def unmount(mountpoint: str, lazy: bool = False, timeout: float = 15.0) -> str | None:
    """Unmount MOUNTPOINT and stop its daemon. Raises KbfsError when it is busy or not a mount.

    Only a process `daemon_pid` confirms is signalled; returns a note for the user when the
    status file named another process (left alone), else None."""
    path = os.path.abspath(os.path.expanduser(mountpoint))
    statuses = read_statuses(path)
    claimed = int(statuses[0].get("pid", 0) or 0) if statuses else 0
    pid = daemon_pid(statuses[0]) if statuses else 0
    note = None
    if claimed and not pid and pid_alive(claimed):
        note = (f"{mountpoint}: the status file names pid {claimed}, which is not this mount's "
                "daemon; it was not signalled")
    dead = _is_dead_mount(path)
    if os.path.ismount(path) or dead:
        ok, why = _fusermount(path, lazy=lazy or dead)
        if not ok:
            if "busy" in why.lower():
                raise KbfsError(
                    f"{mountpoint}: busy (a program has a file open there); close it, or use --lazy"
                )
            raise KbfsError(f"{mountpoint}: cannot unmount: {why}")
    elif not pid:
        for st in statuses:  # stale: nothing of it is running
            with contextlib.suppress(OSError):
                os.unlink(st["status_file"])
        raise KbfsError(f"{mountpoint}: not a kbfs mount" + (f" ({note})" if note else ""))
    if pid:
        # Unmounting ends the daemon's loop by itself; the signal covers a daemon that hangs.
        # Each signal re-checks the process: its pid could be reused once it exits.
        start = statuses[0].get("pid_start")
        end = time.monotonic() + timeout

        def still_it() -> bool:
            return pid_alive(pid) and (start is None or process_start_time(pid) == start)

        while still_it() and time.monotonic() < end:
            time.sleep(0.05)
            if time.monotonic() > end - timeout + 2 and still_it():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        if still_it():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for st in statuses:
        with contextlib.suppress(OSError):
            os.unlink(st["status_file"])
    return note


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
