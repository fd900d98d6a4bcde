"""`kbfs ls SOURCE`: what a share, a folder of it, a relay, a folder of pointers or a
.prvdir holds, with sizes and dates (`--json` for programs).

The listing itself is `kbfs.bulk.list_folder`; this module parses options and prints.
"""

from __future__ import annotations

import inspect
import json
import time
from typing import Any

import click

from kbfs import bulk, cli_get, kbfsurl
from kbfs.config import format_size


def _when(mtime: float | None) -> str:
    if not mtime:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(mtime))


def make_client(opts: dict[str, Any]) -> Any:
    """A Client from the reader options `cli_get` defines (whatever they are)."""
    params = inspect.signature(cli_get._client).parameters
    return cli_get._client(**{k: opts[k] for k in params if k in opts})


@click.command("ls")
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
@cli_get._source_options
def ls(source: str, as_json: bool, **opts: Any) -> None:
    """List SOURCE: size, date, name (folders end with '/').

    \b
    SOURCE is kbfs://HOST:PORT/SHARE_ID[/FOLDER] (a share or a folder of it;
    kbfs+https://HOST[:PORT]/... on an https relay), kbfs://HOST:PORT/,
    kbfs+https://HOST[:PORT]/ or http(s)://HOST:PORT (the shares a relay lists; private
    ones only with their token), a local folder of .prv/.prvdir pointers, or a .prvdir.
    """
    c = make_client(opts)
    entries = bulk.list_folder(c, source)
    if as_json:
        click.echo(json.dumps([e.to_json() for e in entries], indent=2))
        return
    for e in entries:
        size = format_size(e.size) if e.size is not None else "-"
        name = e.name + ("/" if e.is_dir else "")
        extra = ""
        if "share_name" in e.info:
            extra = (f"  {e.info['files']} files, {e.info['share_name']}"
                     + (" (private)" if e.info.get("private") else ""))
        click.echo(f"{size:>10}  {_when(e.mtime):16}  {name}{extra}")


def download_folder_if(c: Any, source: str, out: str | None, jobs: int, local: bool) -> bool:
    """`kbfs download` of a folder source (see `kbfs.bulk`): download it under OUT (default:
    ./NAME) with one progress bar over all its bytes, print the folder; False when SOURCE
    names one file (the caller downloads it)."""
    import os

    from kbfs.cliutil import progress_bar
    from kbfs.errors import KbfsError

    if not bulk.is_folder_source(c, source):
        return False
    name = os.path.basename(source.rstrip("/"))
    if name.endswith(".prvdir"):
        name = name[: -len(".prvdir")]
    if kbfsurl.names_relay(source):
        raise KbfsError(f"{source}: names a relay; download one of its shares "
                        "(kbfs ls shows them)")
    target = out or (name if name not in ("", ".", "..") else "download")
    # The bar needs the total: list first (cheap), then download with the bar.
    files = list(bulk.walk_files(c, source))
    size = sum(r.ref.size for _, r in files)
    with progress_bar(size, f"downloading {len(files)} files") as bar:
        result = bulk.download_folder(c, source, target, local=local, workers=jobs,
                                      progress=bar.update, files=files)
    for line in result.failed:
        click.echo(f"kbfs: {line}", err=True)
    if result.failed:
        raise KbfsError(f"{len(result.failed)} of {result.files} files failed (the others are "
                        f"in {result.target}); run the same command again to resume")
    click.echo(result.target)
    return True
