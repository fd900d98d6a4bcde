"""The `kbfs mount`, `kbfs umount`, `kbfs status` and `kbfs cache ...` commands.

Thin click commands over `kbfs.mount` (imported inside the commands, so `kbfs prv ...`
never loads FUSE, trio or requests). They raise kbfs errors and let the root group turn
them into one line; they never print tracebacks. Registered by one line in `kbfs.cli`.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import sys
import time
from typing import Any

import click

from kbfs import config, prv
from kbfs.cli_mirror import mirror_option
from kbfs.cliutil import progress_bar
from kbfs.config import format_size
from kbfs.errors import ConfigError, KbfsError

PREFETCH_CHUNK = 8 << 20
PREFETCH_THREADS = 4


@click.command("mount")
@click.argument("source")
@click.argument("mountpoint")
@click.option(
    "--relay",
    "relays",
    multiple=True,
    metavar="URL",
    help="Relay to fetch from (repeat for failover, in order). Env: KBFS_RELAY.",
)
@click.option(
    "--token",
    "tokens",
    multiple=True,
    metavar="TOKEN",
    help="Token of a private share (repeatable; also KBFS_TOKEN, comma-separated, or "
    '"tokens" in the config file). Sent to the configured relays and the kbfs:// relay only.',
)
@click.option("--cache-dir", metavar="DIR", help="Block cache folder. Env: KBFS_CACHE_DIR.")
@click.option(
    "--cache-size",
    metavar="SIZE",
    help="Cache cap, e.g. 50G (default: 10% of the free disk space).",
)
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground.")
@click.option(
    "--no-local",
    is_flag=True,
    help="Never read a pointer's original file on this machine; always fetch through relays.",
)
@click.option(
    "--allow-other",
    is_flag=True,
    help="Let other local users read the mount, as far as the modes it shows allow "
    "(a file shows its pointer file's read bits). Off by default, also for root; "
    "non-root users need user_allow_other in /etc/fuse.conf.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1),
    hidden=True,
    help="Bound in seconds of an uncached read when no source answers (default 30).",
)
@click.option("--ready-fd", type=int, hidden=True)
@mirror_option
@click.pass_context
def mount_cmd(
    ctx: click.Context,
    source: str,
    mountpoint: str,
    relays: tuple[str, ...],
    tokens: tuple[str, ...],
    cache_dir: str | None,
    cache_size: str | None,
    foreground: bool,
    no_local: bool,
    allow_other: bool,
    timeout: float | None,
    ready_fd: int | None,
) -> None:
    """Mount SOURCE at MOUNTPOINT: every NAME.prv appears as NAME, full size, read on demand.

    \b
    SOURCE is a folder of .prv/.prvdir pointers (other files pass through read-only),
    or kbfs://HOST:PORT/SHARE_ID[/sub/path] for a whole share through its relay
    (kbfs+https://HOST[:PORT]/SHARE_ID[/sub/path] for an https relay).
    Returns once the mount is ready; stop it with `kbfs umount MOUNTPOINT`.
    """
    from kbfs import mount

    try:
        settings = config.load_settings(
            relays=list(relays), cache_dir=cache_dir, cache_size=cache_size, tokens=list(tokens),
            mirrors=ctx.meta.get("kbfs_mirrors"),
        )
        src = mount.parse_source(source)
        mnt = mount.check_mountpoint(mountpoint)
        os.makedirs(settings.cache_dir, exist_ok=True)
        mount.runtime_dir()  # a runtime folder that is not private fails now, not once mounted
        if allow_other and os.getuid() != 0:
            from kbfs import fusefs

            if not fusefs.fuse_conf_allows_other():
                raise ConfigError(
                    "--allow-other: /etc/fuse.conf has no user_allow_other line, so only "
                    "root may let other users in"
                )
    except (KbfsError, OSError) as exc:
        if ready_fd is not None:
            mount._signal_ready(ready_fd, f"error: {exc}")
        raise
    if foreground:
        if ready_fd is not None or (ctx.obj and ctx.obj.get("verbose")):
            logging.getLogger("kbfs").setLevel(logging.INFO)
        deadline = timeout if timeout is not None else 30.0
        opts = mount.MountOptions(
            src, mnt, settings, timeout=min(10.0, deadline), deadline=deadline, ready_fd=ready_fd,
            use_local=not no_local, allow_other=allow_other,
        )
        mount.run_mount(opts)
        return
    argv = ["--debug"] if ctx.obj and ctx.obj.get("debug") else []
    argv += [
        "mount",
        src.text if src.share else str(src.local_dir),
        mnt,
        "-f",
        "--cache-dir",
        settings.cache_dir,
    ]
    for relay in settings.relays:
        argv += ["--relay", relay]
    for mirror in settings.mirrors:
        argv += ["--mirror", mirror]
    if settings.cache_size is not None:
        argv += ["--cache-size", str(settings.cache_size)]
    if timeout is not None:
        argv += ["--timeout", str(timeout)]
    if no_local:
        argv.append("--no-local")
    if allow_other:
        argv.append("--allow-other")
    # Tokens go to the daemon in its environment, never on its command line (which any
    # user can read in /proc).
    env_tokens = ",".join(t for t in [*tokens, os.environ.get("KBFS_TOKEN", "")] if t)
    pid, logfile = mount.spawn_mount(argv, mnt, settings.cache_dir,
                                     env_extra={"KBFS_TOKEN": env_tokens} if env_tokens else None)
    click.echo(f"mounted {source} at {mnt} (pid {pid}; log {logfile})")
    # The daemon's warnings at mount time (an unreachable relay) are in its status file.
    for st in mount.read_statuses(mnt):
        for line in st.get("warnings") or []:
            click.echo(f"kbfs: warning: {line}", err=True)


@click.command("umount")
@click.argument("mountpoint")
@click.option("-z", "--lazy", is_flag=True, help="Detach now even if files are open.")
def umount_cmd(mountpoint: str, lazy: bool) -> None:
    """Unmount a kbfs mount and stop its daemon."""
    from kbfs import mount

    note = mount.unmount(mountpoint, lazy=lazy)
    if note:
        click.echo(note, err=True)
    click.echo(f"unmounted {mountpoint}")


def _rate(nbytes: float, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:.1f} MB/s" if seconds > 0 else "-"


def _describe_status(st: dict[str, Any]) -> list[str]:
    fs, cache, fetch = st.get("fs") or {}, st.get("cache") or {}, st.get("fetch") or {}
    state = (
        "running"
        if st["alive"] and st["mounted"]
        else ("daemon gone" if not st["alive"] else "not mounted")
    )
    up = time.time() - float(st.get("started", time.time()))
    lines = [
        f"{st.get('mountpoint')}  <-  {st.get('source')}",
        f"  state: {state}, pid {st.get('pid')}, up {up / 60:.0f} min, cache {st.get('cache_dir')}",
    ]
    hits, misses = int(cache.get("hits", 0) or 0), int(cache.get("misses", 0) or 0)
    hit_rate = f"{100 * hits / (hits + misses):.0f}%" if hits + misses else "-"
    served = fs.get("bytes_served", cache.get("bytes_served", 0)) or 0
    fetched = cache.get("bytes_fetched", 0) or 0
    lines.append(
        f"  served {format_size(served)} in {fs.get('reads', 0)} reads, "
        f"fetched {format_size(fetched)}, hit rate {hit_rate}, "
        f"errors {fs.get('errors', 0)}, open files {fs.get('open_files', 0)}"
    )
    pieces = st.get("pieces") or {}
    if isinstance(pieces, dict) and (pieces.get("reads") or pieces.get("fallback_reads")):
        # v2 content (64 KiB pieces verified by proof), counted apart from the block cache
        lines.append(
            f"  pieces: served {format_size(pieces.get('bytes_served', 0) or 0)} in "
            f"{pieces.get('reads', 0)} reads ({pieces.get('hits', 0)} from the cache), fetched "
            f"{pieces.get('pieces_fetched', 0)} pieces ({format_size(pieces.get('bytes_fetched', 0) or 0)}) "
            f"in {pieces.get('fetches', 0)} requests, "
            f"{pieces.get('fallback_contents', 0)} files read by leaf list (no proofs)")
    unreachable = st.get("unreachable_at_mount") or {}
    for relay in st.get("relays") or []:
        if relay in unreachable:
            lines.append(f"  relay {relay}: unreachable at mount time ({unreachable[relay]})")
    for url, s in sorted((fetch.get("sources") or {}).items()):
        if not isinstance(s, dict):
            continue
        line = (
            f"  source {url}: {format_size(s.get('bytes', 0) or 0)}, "
            f"{_rate(s.get('bytes', 0) or 0, s.get('seconds', 0) or 0)}, "
            f"errors {s.get('errors', 0)}"
        )
        if s.get("last_error"):
            line += f", last error: {s['last_error']}"
        lines.append(line)
    for e in st.get("last_errors") or []:
        if isinstance(e, dict):
            ago = time.time() - float(e.get("time") or time.time())
            src = e.get("source")
            via = f", last good source {src}" if src and src != "no source" else ""
            lines.append(f"  last error ({ago:.0f} s ago{via}): "
                         f"reading {e.get('file')}: {e.get('error')}")
    problems = st.get("problems") or {}
    if isinstance(problems, dict):
        for why in problems.values():
            lines.append(f"  pointer problem: {why}")
    return lines


@click.command("status")
@click.argument("mountpoint", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
def status_cmd(mountpoint: str | None, as_json: bool) -> None:
    """Show each kbfs mount: bytes served and fetched, hit rate, per-source speed, the last
    read errors and pointers that could not be read."""
    from kbfs import mount

    statuses = mount.read_statuses(os.path.abspath(mountpoint) if mountpoint else None)
    if mountpoint and not statuses:
        raise KbfsError(f"{mountpoint}: not a kbfs mount (no status found)")
    if as_json:
        click.echo(json.dumps(statuses, indent=2, default=str))
        return
    if not statuses:
        click.echo("no kbfs mounts")
        return
    for st in statuses:
        for line in _describe_status(st):
            click.echo(line)


@click.group("cache")
def cache_group() -> None:
    """Inspect, empty or fill the local block cache."""


_cache_dir_option = click.option(
    "--cache-dir", metavar="DIR", help="Cache folder. Env: KBFS_CACHE_DIR."
)


def _open_cache(cache_dir: str | None, relays: tuple[str, ...] = (), timeout: float = 10.0) -> Any:
    from kbfs.fetch import Fetcher
    from kbfs.piececache import PieceCache

    settings = config.load_settings(relays=list(relays), cache_dir=cache_dir)
    fetcher = Fetcher(settings.relays, timeout=timeout, local_dirs=settings.search_dirs,
                      direct=settings.direct)
    pieces = os.path.join(settings.cache_dir, "pieces")  # kbfs.client.PIECES_DIR
    return settings, fetcher, PieceCache(pieces, fetcher, settings.resolved_cache_size())


@cache_group.command("stats")
@_cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def cache_stats(cache_dir: str | None, as_json: bool) -> None:
    """Size, capacity and contents of the cache."""
    settings, fetcher, block_cache = _open_cache(cache_dir)
    try:
        stats = block_cache.statistics()
        store = stats.pop("store", {})
        stats.update(used=store.get("used", 0), capacity=store.get("capacity", 0),
                     contents=store.get("contents", 0))
    finally:
        block_cache.close()
        fetcher.close()
    if as_json:
        click.echo(json.dumps(stats, indent=2, default=str))
        return
    click.echo(f"cache folder: {settings.cache_dir}")
    for key, value in stats.items():
        if isinstance(value, int) and ("bytes" in key or key in ("capacity", "size", "used")):
            click.echo(f"{key:>16}: {format_size(value)} ({value})")
        else:
            click.echo(f"{key:>16}: {value}")


@cache_group.command("clear")
@_cache_dir_option
@click.option("--force", is_flag=True, help="Clear even while a mount uses this cache.")
def cache_clear(cache_dir: str | None, force: bool) -> None:
    """Delete every cached block, tree and piece."""
    from kbfs import mount

    settings = config.load_settings(cache_dir=cache_dir)
    users = [
        s for s in mount.read_statuses() if s["alive"] and s.get("cache_dir") == settings.cache_dir
    ]
    if users and not force:
        raise KbfsError(
            f"{settings.cache_dir} is used by the mount at {users[0]['mountpoint']}; "
            "unmount it first or use --force"
        )
    _, fetcher, block_cache = _open_cache(cache_dir)   # discards an old block cache too
    try:
        block_cache.clear()
        import shutil

        from kbfs import cachefiles

        shutil.rmtree(cachefiles.copies_dir(block_cache), ignore_errors=True)  # realize's copies
    finally:
        block_cache.close()
        fetcher.close()
    click.echo(f"cleared {settings.cache_dir}")


def _pointers_of(path: str) -> list[tuple[str, prv.Pointer]]:
    if path.endswith(".prvdir"):
        return [(f"{path}:{rel}", p) for rel, p in prv.load_prvdir(path).walk()]
    return [(path, prv.load_pointer(path))]


def _read_through_mount(path: str, bar: Any) -> None:
    # Reading the file makes the mount's daemon fetch and cache it, in its own cache.
    with open(path, "rb", buffering=0) as f:
        while True:
            chunk = f.read(PREFETCH_CHUNK)
            if not chunk:
                break
            bar.update(len(chunk))


@cache_group.command("prefetch")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@_cache_dir_option
@click.option("--relay", "relays", multiple=True, metavar="URL", help="Relay (for .prv paths).")
def cache_prefetch(paths: tuple[str, ...], cache_dir: str | None, relays: tuple[str, ...]) -> None:
    """Fetch PATHS into the cache now: files in a kbfs mount, or .prv/.prvdir pointers."""
    from kbfs import mount

    in_mount: list[str] = []
    pointers: list[tuple[str, prv.Pointer]] = []
    for path in paths:
        if mount.find_mount_of(path) is not None:
            if os.path.isdir(path):
                raise ConfigError(f"{path}: a folder; name the files to prefetch")
            in_mount.append(path)
        elif path.endswith((".prv", ".prvdir")) and os.path.isfile(path):
            pointers.extend(_pointers_of(path))
        else:
            raise ConfigError(f"{path}: neither a file in a kbfs mount nor a .prv/.prvdir pointer")
    total = sum(os.path.getsize(p) for p in in_mount) + sum(p.size for _, p in pointers)
    with progress_bar(total, "prefetching") as bar:
        for path in in_mount:
            _read_through_mount(path, bar)
        if pointers:
            _prefetch_pointers(pointers, cache_dir, relays, bar)
    click.echo(
        f"prefetched {len(in_mount) + len(pointers)} files, {format_size(total)}",
        err=not sys.stdout.isatty(),
    )


def _prefetch_pointers(
    pointers: list[tuple[str, prv.Pointer]],
    cache_dir: str | None,
    relays: tuple[str, ...],
    bar: Any,
) -> None:
    from kbfs import fusefs

    _, fetcher, block_cache = _open_cache(cache_dir, relays)
    try:
        with concurrent.futures.ThreadPoolExecutor(PREFETCH_THREADS) as pool:
            for name, pointer in pointers:
                if pointer.original_path and os.path.isabs(pointer.original_path):
                    fetcher.add_local_candidate(pointer.sha1, pointer.original_path)
                ref = fusefs.file_ref(pointer)

                def one(off: int, ref: Any = ref) -> int:
                    return len(block_cache.read(ref, off, min(PREFETCH_CHUNK, ref.size - off)))

                try:
                    for n in pool.map(one, range(0, pointer.size, PREFETCH_CHUNK)):
                        bar.update(n)
                except KbfsError as exc:
                    raise KbfsError(f"{name}: {exc}") from None
    finally:
        block_cache.close()
        fetcher.close()


def register(group: click.Group) -> None:
    """Add the mount commands to the root `kbfs` group."""
    group.add_command(mount_cmd)
    group.add_command(umount_cmd)
    group.add_command(status_cmd)
    group.add_command(cache_group)
