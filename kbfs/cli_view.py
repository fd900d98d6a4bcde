"""`kbfs view link | export`: view links of content and static pages of one view (issue 18).

Only options and printing live here: the link's form and the exported page are
`kbfs.viewexport`; the source is resolved through the client (a .prv pointer with a tree
root, or a kbfs:// URL, whose listing gives the pointer). Bad input (a source without a
tree root, a bad --state or --relay, an output folder that is something else) is one
`kbfs: error: ...` line, exit 1. A token given with --token is used to resolve a private
share's kbfs:// URL and marks the view as private (the page asks for the token); it is
never written into a link or a page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kbfs.errors import BadRequest


@click.group("view")
def view_group() -> None:
    """Views by link: the web page's viewer on given content and view state."""


def _options(f: Any) -> Any:
    f = click.option("--state", default="", metavar="STATE",
                     help="View state: ch=FIRST-LAST&t=TIMEPOINT&w=TIMEPOINTS&a=AMPLITUDE "
                     "(each optional; the page's defaults otherwise).")(f)
    f = click.option("--token", "tokens", multiple=True, metavar="TOKEN",
                     help="Token of a private share, to resolve its kbfs:// URL (never "
                     "written out; the page asks for it).")(f)
    return click.option("-r", "--relay", "relays", multiple=True, metavar="URL",
                        help="Relay the page reads from (repeatable; default: the relay a "
                        "kbfs:// source names).")(f)


def _resolve(source: str, relays: tuple[str, ...], tokens: tuple[str, ...],
             state: str) -> tuple[str, list[str]]:
    """(the view's fragment, the relays) for SOURCE."""
    from kbfs import client, kbfsurl, viewexport

    c = client.get_client(list(relays) or None, tokens=list(tokens))
    r = c.resolve(source)
    share = ""
    chosen = list(relays)
    if kbfsurl.is_link(source):
        relay, share_id, _ = client.parse_kbfs_uri(source)
        chosen = chosen or [relay]
        share = share_id if tokens else ""
    if not chosen:
        raise BadRequest(f"{source}: give --relay URL (the relays the page reads from)")
    frag = viewexport.fragment(r.ref.sha1, r.name, r.ref.size, r.ref.root or "", r.ref.block_size,
                               state, share)
    return frag, viewexport.check_relays(chosen)


@view_group.command("link")
@click.argument("source")
@_options
def link_cmd(source: str, relays: tuple[str, ...], tokens: tuple[str, ...], state: str) -> None:
    """Print a view link of SOURCE (a .prv pointer or kbfs:// URL) on the first relay."""
    frag, chosen = _resolve(source, relays, tokens, state)
    click.echo(f"{chosen[0]}/v/#{frag}")


@view_group.command("export")
@click.argument("source")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Folder to write the page into (new, empty or a previous export).")
@_options
def export_cmd(source: str, out: str, relays: tuple[str, ...], tokens: tuple[str, ...],
               state: str) -> None:
    """Write a static page of SOURCE's view into OUT: serve OUT from any web host; the page
    reads and verifies the content from the relays (they allow other origins: CORS)."""
    from kbfs import viewexport

    frag, chosen = _resolve(source, relays, tokens, state)
    n = viewexport.export_page(Path(out), frag, chosen)
    click.echo(f"kbfs view: {n} files in {out}; reads from {', '.join(chosen)}", err=True)
    click.echo(f"{Path(out) / 'index.html'}#{frag}")
