"""`kbfs mirror export | push | verify`: static mirrors of kbfs content (docs/mirrors.md).

Only options and printing live here: the layout is `kbfs.mirrorurl`, writing it
`kbfs.mirror` (through `kbfs.mirrorstore`), reading it back `kbfs.mirrorverify`. Bad input
(a SOURCE that does not resolve, a target that is not a folder or an s3:// URL, a mirror
URL that does not parse) is one `kbfs: error: ...` line from the root group, exit 1; a run
in which some files failed prints one line per file and exits 1 (run it again to resume).
"""

from __future__ import annotations

from typing import Any

import click

from kbfs.cliutil import progress_bar
from kbfs.config import format_size
from kbfs.errors import KbfsError


@click.group("mirror")
def mirror_group() -> None:
    """Static mirrors: export content to a folder or bucket any web server can serve."""


def mirror_option(f: Any) -> Any:
    """`--mirror URL` (repeatable; docs/mirrors.md), kept in the context for `_client`."""
    def keep(ctx: click.Context, _: Any, value: tuple[str, ...]) -> None:
        ctx.meta["kbfs_mirrors"] = list(value)

    return click.option("--mirror", "mirrors", multiple=True, metavar="URL", expose_value=False,
                        callback=keep, help="Static mirror to read from before the relays, "
                        "http(s)://HOST/PREFIX or s3://BUCKET/PREFIX (repeatable, nearest "
                        "first; also KBFS_MIRRORS or \"mirrors\" in the config file).")(f)


def _reader_options(f: Any) -> Any:
    f = mirror_option(f)  # a mirror can be filled from another
    f = click.option("--no-local", "no_local", is_flag=True,
                     help="Ignore local copies (read through the cache and relays).")(f)
    f = click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                     help="Block cache folder.")(f)
    f = click.option("--token", "tokens", multiple=True, metavar="TOKEN",
                     help="Token of a private share (repeatable).")(f)
    f = click.option("-r", "--relay", "relays", multiple=True, metavar="URL",
                     help="Relay to read the sources through (repeatable).")(f)
    return f


def _client(relays: tuple[str, ...], cache_dir: str | None, tokens: tuple[str, ...]) -> Any:
    from kbfs import client

    ctx = click.get_current_context(silent=True)
    return client.get_client(list(relays) or None, cache_dir, tokens=list(tokens),
                             mirrors=ctx.meta.get("kbfs_mirrors") if ctx is not None else None)


def _run(sources: tuple[str, ...], target: str, endpoint_url: str | None, relays: tuple[str, ...],
         cache_dir: str | None, tokens: tuple[str, ...], no_local: bool, verb: str) -> None:
    from kbfs import mirror, mirrorstore

    store = mirrorstore.open_store(target, endpoint_url)
    c = _client(relays, cache_dir, tokens)
    files = list(mirror.files_of(c, list(sources)))
    total = sum(r.ref.size for _, r in files)
    with progress_bar(total, f"{verb} {len(files)} files") as bar:
        res = mirror.export(c, files, store, local=not no_local, progress=bar.update)
    for line in res.failed:
        click.echo(f"kbfs: {line}", err=True)
    click.echo(f"kbfs mirror: {res.files} files in {store.where}: {format_size(res.written)} "
               f"written, {res.skipped} already there, {len(res.failed)} failed "
               f"({res.seconds:.1f} s)", err=True)
    if res.failed:
        raise KbfsError(f"{len(res.failed)} of {res.files} files failed; run the same command "
                        "again to resume")


@mirror_group.command("export")
@click.argument("sources", nargs=-1, required=True)
@click.argument("target", metavar="DIR")
@_reader_options
def export_cmd(sources: tuple[str, ...], target: str, relays: tuple[str, ...],
               tokens: tuple[str, ...], cache_dir: str | None, no_local: bool) -> None:
    """Write SOURCE... (pointers, folders of them, .prvdir, sha1://, kbfs://) into DIR as a
    static mirror: the bytes, their tree nodes and an index, every byte verified as read.
    Serve DIR with any web server that answers Range requests; run again to resume."""
    _run(sources, target, None, relays, cache_dir, tokens, no_local, "exporting")


@mirror_group.command("push")
@click.argument("sources", nargs=-1, required=True)
@click.argument("target", metavar="s3://BUCKET/PREFIX")
@click.option("--endpoint-url", default=None, metavar="URL",
              help="S3 endpoint (default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, AWS).")
@_reader_options
def push_cmd(sources: tuple[str, ...], target: str, endpoint_url: str | None,
             relays: tuple[str, ...], tokens: tuple[str, ...], cache_dir: str | None,
             no_local: bool) -> None:
    """Upload SOURCE... into an S3-compatible bucket in the mirror layout (boto3: parallel
    multipart uploads; objects already there with the right size and sha1 are skipped)."""
    if not target.startswith("s3://"):
        raise KbfsError(f"{target}: push writes to s3://BUCKET/PREFIX (export writes a folder)")
    _run(sources, target, endpoint_url, relays, cache_dir, tokens, no_local, "pushing")


@mirror_group.command("verify")
@click.argument("url")
@click.argument("sources", nargs=-1)
@_reader_options
def verify_cmd(url: str, sources: tuple[str, ...], relays: tuple[str, ...],
               tokens: tuple[str, ...], cache_dir: str | None, no_local: bool) -> None:
    """Read the mirror at URL back and check every object: against SOURCE...'s pointers
    (SHA-1, size, root), else against its own index. Prints what is missing or wrong and
    exits 1 if anything is."""
    from kbfs import mirror, mirrorverify

    m = mirrorverify.open_mirror(url)
    session = mirrorverify._session()
    if sources:
        c = _client(relays, cache_dir, tokens)
        items = [mirrorverify.Item(r.ref.sha1, r.ref.size,
                                   {r.ref.block_size: r.ref.root} if r.ref.root else {}, name)
                 for name, r in mirror.files_of(c, list(sources))]
        items = list({i.sha1: i for i in items}.values())
    else:
        items = mirrorverify.index_items(m, session)
    with progress_bar(sum(i.size for i in items), f"verifying {len(items)} files") as bar:
        checked, problems = mirrorverify.verify(m, items, bar.update, session)
    for line in problems:
        click.echo(line)
    click.echo(f"kbfs mirror: {checked} files checked on {m.url}: "
               + (f"{len(problems)} problems" if problems else "all good"), err=True)
    if problems:
        raise SystemExit(1)
