"""The `kbfs` command line: nouns as groups, verbs as commands.

This module builds the root group, the `prv` commands, and the one place where
kbfs exceptions become one clear line on stderr and an exit code (a traceback
only with `--debug`). Other command groups live in `cli_*` modules and are
registered at the bottom; they raise kbfs errors and never print tracebacks.

Start-up: `main` keeps the cyclic GC off while modules are imported and the command line is
parsed, and turns it back on (after `gc.freeze()`) just before the command runs; see
`_resume_gc`.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import re
import sys
from typing import Any

import click

from kbfs import __version__, prv, service, tree
from kbfs.cliutil import progress_bar
from kbfs.config import format_size
from kbfs.errors import KbfsError

log = logging.getLogger("kbfs")


# Commands that live in other modules, loaded only when named: `kbfs prv create` must not
# pay for importing hypercorn, trio, cryptography and requests (about 0.3 s) on every run.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "share": ("kbfs.cli_net", "share_command"),
    "relay": ("kbfs.cli_net", "relay_command"),
    "mount": ("kbfs.cli_mount", "mount_cmd"),
    "umount": ("kbfs.cli_mount", "umount_cmd"),
    "status": ("kbfs.cli_mount", "status_cmd"),
    "cache": ("kbfs.cli_mount", "cache_group"),
    "download": ("kbfs.cli_get", "download"),
    "cat": ("kbfs.cli_get", "cat"),
    "locate": ("kbfs.cli_get", "locate"),
    "ls": ("kbfs.cli_ls", "ls"),
    "mirror": ("kbfs.cli_mirror", "mirror_group"),
    "view": ("kbfs.cli_view", "view_group"),
}


class KbfsGroup(click.Group):
    """A click group that loads command modules lazily and turns expected failures
    into one line and exit code 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS and cmd_name not in self.commands:
            module_name, attr = LAZY_COMMANDS[cmd_name]
            module = importlib.import_module(module_name)
            command = getattr(module, attr)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (KbfsError, OSError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"kbfs: error: {_describe(exc)}", err=True)
            ctx.exit(1)
        except ModuleNotFoundError as exc:
            if exc.name != "pyfuse3" or (ctx.obj and ctx.obj.get("debug")):
                raise
            # pyfuse3 is the mount extra: everything else works without it.
            click.echo("kbfs: error: mounting needs pyfuse3 and libfuse 3: pip install 'kbfs[mount]'", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("kbfs: interrupted", err=True)
            ctx.exit(130)


# Start-up (interpreter, click, kbfs's modules, the command's module imported lazily) makes
# tens of thousands of objects that live as long as the process. Left on, the cyclic GC
# scans them again and again while they are made, and once more at exit: ~10 ms of the
# ~65 ms a `kbfs download` of cached content spent outside its copy. So `main` turns the GC
# off and `_resume_gc` moves what exists to the permanent generation (never scanned again)
# and turns it back on, before the command's own work, which may run for days (a relay, a
# mount) and must have its cycles collected as usual.
_gc_paused = False


def _resume_gc() -> None:
    """End of start-up: freeze the objects made so far, turn the GC back on (if `main`
    turned it off)."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        gc.enable()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


@click.group(cls=KbfsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kbfs")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.option("-v", "--verbose", is_flag=True, help="Log what is being done.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """kbfs: share huge data files by tiny .prv pointers; read them as verified local files.

    \b
    Publish:   kbfs share DIR --relay URL
    Serve:     kbfs relay --port 8080 --public-url http://HOST:8080
    Point:     kbfs prv create FILE_OR_DIR
    Read:      kbfs mount POINTERS MNT | kbfs download SRC | kbfs cat SRC | kbfs ls SRC
    """
    # Click has imported the subcommand's module by now (KbfsGroup.get_command) and calls
    # this before the subcommand: start-up is over.
    _resume_gc()
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    service.configure(level)  # one line per record, with its level (the journal's too)


@cli.group("prv")
def prv_group() -> None:
    """Create, inspect and verify .prv pointer files."""


@prv_group.command("create")
# No exists=True on these paths: click would answer with a 4-line usage error; the
# commands report a missing or unreadable path as one `kbfs: error:` line instead.
@click.argument("path", type=click.Path())
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False),
              help="Where to write the pointer (default: NAME.prv or NAME.prvdir here).")
@click.option("-r", "--relay", "relays", multiple=True, metavar="URL",
              help="A relay that serves this content, written into the pointer as a source "
                   "hint (repeatable; default: the relays of the share of PATH's folder, if "
                   "this user shares it); readers try hints after their own relays.")
@click.option("--no-hints", is_flag=True, help="Write no source hints.")
@click.option("--block-size", "block_size", default=str(prv.DEFAULT_BLOCK_SIZE), metavar="N",
              help="Leaf size of the block tree: 65536 (64K, the default) for 64 KiB pieces, "
                   "read in small verified pieces; 1048576 (1M) for 1 MiB blocks, as kbfs "
                   "wrote before. A power of two from 4096 to 2^30.")
def prv_create(path: str, out: str | None, relays: tuple[str, ...], no_hints: bool,
               block_size: str) -> None:
    """Hash PATH into NAME.prv (a file) or NAME.prvdir (a folder), in the current folder.

    Reads every file once, computing its SHA-1 (for the original MountainLab tools)
    and its BLAKE3 block tree (so every byte range can be verified). The pointer goes
    into the current folder, not next to the data: the data's folder may be shared, and
    a pointer written there would be shared as data too.
    """
    bs = _block_size(block_size)
    path = os.path.normpath(path)
    hints = [] if no_hints else list(relays) or _share_relays_of(path)
    # Checked before hours of hashing: a bad --relay is one line, now.
    prv.Pointer("0" * 40, 0).with_sources(hints)
    name = os.path.basename(os.path.abspath(path)) or "root"
    if os.path.isdir(path):
        target = out or name + ".prvdir"
        total = sum(
            os.path.getsize(os.path.join(d, f))
            for d, dirs, files in os.walk(path)
            for f in files
            if not f.startswith(".") and os.path.isfile(os.path.join(d, f))
        )
        with progress_bar(total, f"hashing {name}") as bar:
            folder = prv.create_prvdir(path, progress=bar.update, block_size=bs)
        if hints:
            folder = folder.with_sources(hints)
        text = folder.to_json()
    else:
        target = out or name + ".prv"
        with progress_bar(os.path.getsize(path), f"hashing {name}") as bar:
            text = prv.create_pointer(path, progress=bar.update, block_size=bs
                                      ).with_sources(hints).to_json()
    tmp = target + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, target)
    click.echo(target)


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _block_size(text: str) -> int:
    """--block-size: bytes, or with a K/M/G suffix (KiB/MiB/GiB: powers of 1024), checked by
    `prv.check_block_size` (a power of two from 4 KiB to 1 GiB); one-line error otherwise."""
    m = re.fullmatch(r"(\d{1,12}) *([KMG]?)(?:I?B)?", text.strip().upper())
    if m is None:
        raise prv.PointerError(f"--block-size {text!r}: not a size (65536, 64K, 1M)")
    try:
        return prv.check_block_size(int(m.group(1)) * _SIZE_UNITS[m.group(2)])
    except prv.PointerError as exc:
        raise prv.PointerError(f"--block-size {text}: {str(exc).partition(': ')[2]}") from None


def _share_relays_of(path: str) -> list[str]:
    """The relays of this user's `kbfs share` of a folder holding PATH (the `relays` its
    state folder's share.json records, under XDG_STATE_HOME/kbfs/share-*), or []. Read
    from a few small files, without importing the share's code; said on stderr."""
    from kbfs.config import default_state_dir

    real = os.path.realpath(path)
    base = os.path.dirname(default_state_dir("share-x"))
    try:
        names = [n for n in os.listdir(base) if n.startswith("share-")]
    except OSError:
        return []
    for name in sorted(names):
        try:
            with open(os.path.join(base, name, "share.json"), encoding="utf-8") as f:
                info = json.loads(f.read(1 << 16))
        except (OSError, ValueError):
            continue
        folder = info.get("folder") if isinstance(info, dict) else None
        relays = info.get("relays") if isinstance(info, dict) else None
        if not isinstance(folder, str) or not isinstance(relays, list) or not relays:
            continue
        if real == folder or real.startswith(folder.rstrip("/") + "/"):
            good = prv.source_hints(relays, os.path.join(base, name, "share.json"))
            if good:
                click.echo(f"kbfs: source hints {', '.join(good)} (the relays of the share of "
                           f"{folder}; --no-hints or --relay to choose)", err=True)
            return good
    return []


def _load_any(path: str) -> prv.Pointer | prv.PrvDir:
    if path.endswith(".prvdir"):
        return prv.load_prvdir(path)
    return prv.load_pointer(path)


@prv_group.command("info")
@click.argument("pointer", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the validated pointer as JSON.")
def prv_info(pointer: str, as_json: bool) -> None:
    """Show what a .prv (or .prvdir) points at."""
    p = _load_any(pointer)
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=4))
        return
    if isinstance(p, prv.PrvDir):
        entries = list(p.walk())
        total = sum(q.size for _, q in entries)
        click.echo(f"{pointer}: folder pointer, {len(entries)} files, {format_size(total)}")
        sizes = sorted({q.tree.block_size for _, q in entries if q.tree})
        if sizes:
            click.echo("tree:      " + ", ".join(_blocks(b) for b in sizes))
        for rel, q in entries:
            click.echo(f"  {q.sha1}  {q.size:>14}  {rel}")
        return
    click.echo(f"file:      {pointer}")
    click.echo(f"size:      {p.size} bytes ({format_size(p.size)})")
    click.echo(f"sha1:      {p.sha1}")
    click.echo(f"fcs:       {p.fcs or '-'}")
    click.echo(f"original:  {p.original_path or '-'}")
    click.echo(f"version:   {p.prv_version}")
    hints = p.source_hints()
    click.echo(f"sources:   {', '.join(hints) if hints else '-'}")
    if p.tree:
        click.echo(f"tree:      {p.tree.algorithm}, {_blocks(p.tree.block_size)}, root {p.tree.root}")
    else:
        click.echo("tree:      none (original-tool pointer: verified by whole-file SHA-1)")


def _blocks(block_size: int) -> str:
    """'65536-byte blocks (64 KiB pieces)', '1048576-byte blocks (1 MiB)'."""
    what = (f"{block_size >> 20} MiB" if block_size % (1 << 20) == 0
            else f"{block_size >> 10} KiB" if block_size % 1024 == 0 else f"{block_size} B")
    return f"{block_size}-byte blocks ({what}{' pieces' if block_size < tree.BLOCK_SIZE else ''})"


@prv_group.command("verify")
@click.argument("pointer", type=click.Path())
@click.argument("file", type=click.Path())
def prv_verify(pointer: str, file: str) -> None:
    """Check that FILE is the content POINTER describes (exit 0 if so, 1 if not)."""
    p = prv.load_pointer(pointer)
    ok, why = prv.file_matches(file, p)
    if not ok:
        click.echo(f"kbfs: {file} does not match {pointer}: {why}", err=True)
        sys.exit(1)
    click.echo(f"{file}: OK ({p.sha1})")


def main(gc_paused: bool = False) -> None:
    """Console-script entry point: usage errors, too, are one line (click prints three).

    GC_PAUSED: the caller turned the cyclic GC off for start-up (`python -m kbfs` does,
    before importing this module); it is turned back on before the command runs either way.
    """
    global _gc_paused
    _gc_paused = gc_paused or gc.isenabled()
    gc.disable()
    try:
        result = _run()
    finally:
        _resume_gc()  # when no command ran (--help, a usage error)
    sys.exit(result)


def _run() -> int:
    """Run the command line; its exit status."""
    try:
        result = cli.main(prog_name="kbfs", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # a bare group: show its help
        click.echo(exc.format_message(), err=True)
        return exc.exit_code
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "kbfs"
        click.echo(f"kbfs: error: {exc.format_message()} (see '{where} --help')", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"kbfs: error: {exc.format_message()}", err=True)
        return exc.exit_code
    except click.Abort:
        click.echo("kbfs: interrupted", err=True)
        return 130
    return result if isinstance(result, int) else 0


__all__ = ["cli", "main"]
