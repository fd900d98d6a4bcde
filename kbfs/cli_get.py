"""`kbfs download`, `kbfs cat` and `kbfs locate`: verified reads without FUSE.

Each command names one SOURCE (a .prv file, sha1://SHA1[/NAME],
kbfs://HOST:PORT/SHARE_ID/PATH or kbfs+https://HOST[:PORT]/SHARE_ID/PATH) and goes through
`kbfs.client`, which reads through the shared block cache. A private share's token comes
from `--token` (repeatable), `KBFS_TOKEN` or the config file (`kbfs.config` says where
each is sent). This module only
parses options and prints; it raises kbfs errors and leaves turning them into one line
to the root group in `kbfs.cli`, except for an interrupted download, whose line says that
the same command again resumes (exit status 130).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from kbfs import client
from kbfs.cli_mirror import mirror_option
from kbfs.cliutil import SIZE, progress_bar
from kbfs.config import format_size

log = logging.getLogger(__name__)


def _source_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every command that reads a source."""
    f = click.option("--no-local", "no_local", is_flag=True,
                     help="Ignore local copies (original_path, search folders).")(f)
    f = click.option("--cache-dir", type=click.Path(file_okay=False),
                     help="Block cache folder (default: KBFS_CACHE_DIR, config, ~/.cache/kbfs).")(f)
    f = click.option("--cache-size", type=SIZE, default=None,
                     help="Cache capacity, e.g. 50G (default: 10% of free space).")(f)
    f = click.option("--token", "tokens", multiple=True, metavar="TOKEN",
                     help="Token of a private share (repeatable; also KBFS_TOKEN, "
                          "comma-separated, or \"tokens\" in the config file).")(f)
    f = click.option("-r", "--relay", "relays", multiple=True, metavar="URL",
                     help="Relay to ask (repeatable; default: KBFS_RELAY or the config file).")(f)
    f = mirror_option(f)
    return f



def _client(relays: tuple[str, ...], cache_dir: str | None,
            cache_size: int | None, tokens: tuple[str, ...] = ()) -> client.Client:
    ctx = click.get_current_context(silent=True)
    mirrors = ctx.meta.get("kbfs_mirrors") if ctx is not None else None
    return client.get_client(list(relays) or None, cache_dir, cache_size, tokens=list(tokens),
                             mirrors=mirrors)


def register(group: click.Group) -> None:
    """Add download, cat and locate to the root group."""
    group.add_command(download)
    group.add_command(cat)
    group.add_command(locate)


@click.command()
@click.argument("source")
@click.option("-o", "--output", "out", type=click.Path(), default=None,
              help="Where to write (a file, or a folder to put NAME in; default: ./NAME).")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=client.DOWNLOAD_WORKERS,
              show_default=True, help="Range requests in flight at once.")
@_source_options
def download(source: str, out: str | None, jobs: int, relays: tuple[str, ...],
             tokens: tuple[str, ...], cache_dir: str | None, cache_size: int | None,
             no_local: bool) -> None:
    """Download SOURCE, verifying every block; prints the path written.

    The file appears at OUT only once it is complete and verified. Until then it is
    written as .NAME.kbfs-part next to OUT; when a download fails or is interrupted that
    file is kept, and the same command again fetches only the blocks it lacks.
    """
    c = _client(relays, cache_dir, cache_size, tokens)
    from kbfs import cli_ls  # a folder (.prvdir, pointers, kbfs://.../FOLDER/): kbfs.bulk

    if cli_ls.download_folder_if(c, source, out, jobs, not no_local):
        return
    r = c.resolve(source)
    try:
        with progress_bar(r.ref.size, f"downloading {r.name}") as bar:
            result = c.download(r, out, local=not no_local, workers=jobs, progress=bar.update)
    except KeyboardInterrupt as exc:
        part = getattr(exc, "kbfs_part", None)
        click.echo("kbfs: interrupted" + (
            f"; the verified part is kept in {part}: run the same command again to resume"
            if part else ""), err=True)
        sys.exit(130)
    rate = result.size / result.seconds / (1 << 20) if result.seconds > 0 else 0.0
    how = f"copied from {result.from_local}" if result.from_local else (
        f"{format_size(result.cached_before)} already cached, "
        + (f"{format_size(result.resumed)} kept from an interrupted run, "
           if result.resumed else "")
        + f"{format_size(result.fetched)} fetched")
    log.info("%s: %s in %.2f s (%.0f MiB/s), %s", result.path, format_size(result.size),
             result.seconds, rate, how)
    click.echo(result.path)


@click.command()
@click.argument("source")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True,
              help="First byte to write.")
@click.option("--length", type=click.IntRange(min=0), default=None,
              help="How many bytes (default: to the end).")
@_source_options
def cat(source: str, offset: int, length: int | None, relays: tuple[str, ...],
        tokens: tuple[str, ...], cache_dir: str | None, cache_size: int | None,
        no_local: bool) -> None:
    """Write SOURCE's verified bytes to standard output."""
    c = _client(relays, cache_dir, cache_size, tokens)
    out = sys.stdout.buffer
    try:
        for piece in c.cat(source, offset, length, local=not no_local):
            out.write(piece)
        out.flush()
    except BrokenPipeError:
        # The reader went away (`kbfs cat x.prv | head`): that is the reader's choice, not
        # an error. Point stdout at /dev/null so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


@click.command()
@click.argument("source")
@_source_options
def locate(source: str, relays: tuple[str, ...], tokens: tuple[str, ...],
           cache_dir: str | None, cache_size: int | None, no_local: bool) -> None:
    """Say where SOURCE's content can be had: local copies, the cache, URLs."""
    c = _client(relays, cache_dir, cache_size, tokens)
    loc = c.locate(source)
    r = loc.resolved
    click.echo(f"name:    {r.name}")
    click.echo(f"sha1:    {r.ref.sha1}")
    click.echo(f"size:    {r.ref.size} bytes ({format_size(r.ref.size)})")
    if r.ref.root:
        click.echo(f"root:    {r.ref.root}")
    if not no_local:
        for path in loc.local:
            click.echo(f"local:   {path} (size and SHA-1 checked)")
    pct = 100.0 * loc.cached_bytes / r.ref.size if r.ref.size else 100.0
    click.echo(f"cache:   {format_size(loc.cached_bytes)} of {format_size(r.ref.size)} "
               f"({pct:.0f}%), verified: {loc.cache_state}")
    for url in loc.urls:
        click.echo(f"url:     {url}")
    if not loc.local and not loc.urls and loc.cached_bytes < r.ref.size:
        click.echo("nowhere else: no local copy, no relay knows it", err=True)
