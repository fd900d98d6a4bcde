"""The `kbfs relay`, `kbfs share DIR` and `kbfs share token DIR` commands.

Wiring only: parse options, build a `relay.Relay` or a `share.Share`, run it under
trio until SIGINT/SIGTERM, and print the lines people (and tests) wait for, flushed:
`kbfs relay listening on URL`, `kbfs share id ID`, `kbfs share connected to URL ...`,
`kbfs share link kbfs://HOST:PORT/ID/` (`kbfs+https://...` for an https relay). `kbfs share
token` prints the token alone on stdout (for scripts) and, on stderr, the lines a reader
pastes.
Errors are raised as kbfs exceptions; the root group prints them as one line.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import click
import trio

from kbfs import mirrorurl, service, sharestate, tlsconf, tokens
from kbfs import relay as relay_mod
from kbfs import share as share_mod
from kbfs.errors import ConfigError

log = logging.getLogger(__name__)


def _say(line: str) -> None:
    service.say(line)  # one line, `<6>` under the journal


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--listen {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8081")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


async def _until_signal(main: Callable[..., Any], *args: Any) -> None:
    """Run MAIN until it returns or SIGINT/SIGTERM arrives; then cancel it cleanly."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    log.info("signal %s: stopping", signum)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(watch)
            await main(*args)
            nursery.cancel_scope.cancel()


def _info_logging(*names: str) -> None:
    """Show INFO lines of these loggers (connect/disconnect) even without -v."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in names:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)


@click.command("relay")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port; the URL is printed).")
@click.option("--state-dir", type=click.Path(file_okay=False), help="Folder for the relay's state.")
@click.option("--allow-shares", type=click.Path(dir_okay=False, exists=True),
              help="File of share ids (one a line) allowed to connect; re-read when it changes.")
@click.option("--public-url", "public_urls", multiple=True, metavar="URL",
              help="The URL shares connect to, e.g. http://relay.example.org:8080 "
                   "(repeatable). Shares are admitted only when they connected to one of "
                   "these. Needed with a wildcard --host; default: http://HOST:PORT.")
@click.option("--certfile", type=click.Path(dir_okay=False), metavar="PEM",
              help="Serve HTTPS/WSS with this certificate chain (with --keyfile).")
@click.option("--keyfile", type=click.Path(dir_okay=False), metavar="PEM",
              help="The private key of --certfile.")
@click.option("--mirror", "mirrors", multiple=True, metavar="URL",
              help="A static mirror (docs/mirrors.md) /api/find lists for readers to use "
                   "before this relay (repeatable).")
@click.option("--trust-proxy", is_flag=True,
              help="Behind a reverse proxy: take client addresses from its X-Forwarded-For "
                   "(and the scheme from X-Forwarded-Proto). Never without such a proxy.")
def relay_command(host: str, port: int, state_dir: str | None, allow_shares: str | None,
                  public_urls: tuple[str, ...], certfile: str | None, keyfile: str | None,
                  trust_proxy: bool, mirrors: tuple[str, ...] = ()) -> None:
    """Run a relay: shares connect out to it, anyone reads their files through it.

    \b
    Logs one line per share connect/disconnect. Stops on Ctrl-C or SIGTERM.
    HTTP API: /api/health /api/shares /api/find/SHA1 /sha1/SHA1 /tree/SHA1
              /s/SHARE/list/PATH /s/SHARE/file/PATH   (see docs/protocol.md)
    """
    relay = relay_mod.Relay(allow_shares_file=allow_shares, state_dir=state_dir,
                            public_urls=public_urls)
    try:
        relay.mirrors = [mirrorurl.check_mirror(m, "--mirror") for m in mirrors]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if relay_mod.needs_public_url(relay, host):
        raise ConfigError(f"--host {host} listens on every address: give --public-url URL, "
                          "the URL shares connect to (e.g. http://relay.example.org:8080), "
                          "or a specific --host")
    if bool(certfile) != bool(keyfile):
        raise ConfigError("--certfile and --keyfile go together")
    if certfile and keyfile:
        tlsconf.check_server_files(certfile, keyfile)
    if state_dir:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    _info_logging("kbfs.relay")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(functools.partial(
                relay_mod.serve, certfile=certfile, keyfile=keyfile, trust_proxy=trust_proxy),
                relay, host, port)
            _say(f"kbfs relay listening on {url}")

    trio.run(_until_signal, main)
    _say("kbfs relay stopped")


class _ScanBar:
    """A progress line for the first indexing pass, on a terminal only."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self.lock = threading.Lock()
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def on_total(self, n: int) -> None:
        self.total = n

    def progress(self, n: int) -> None:
        if not self.tty:
            return
        with self.lock:
            self.done += n
            pct = 100.0 * self.done / self.total if self.total else 100.0
            if pct - self.last >= 1 or self.done >= self.total:
                self.last = pct
                sys.stderr.write(f"\rindexing: {pct:5.1f}% of {self.total / 1e9:.2f} GB ")
                if self.done >= self.total:
                    sys.stderr.write("\n")
                sys.stderr.flush()


def _state_dir(directory: str, state_dir: str | None) -> sharestate.StateChoice:
    """--state-dir, else the share's state folder by `share.find_state_dir`'s rule."""
    if state_dir:
        return sharestate.StateChoice(os.path.realpath(state_dir))
    return sharestate.find_state_dir(directory)


def _err(line: str) -> None:
    click.echo(line, err=True)
    sys.stderr.flush()


class _ShareCommand(click.Command):
    """`kbfs share DIR ...`, which also dispatches `kbfs share token DIR`."""

    def __init__(self, *args: Any, token_command: click.Command, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token_command = token_command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] == "token":
            ctx.meta["kbfs.share.token"] = self.token_command.make_context(
                "share token", args[1:], parent=ctx.parent)
            return []
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        sub = ctx.meta.pop("kbfs.share.token", None)
        if sub is not None:
            with sub:
                return self.token_command.invoke(sub)
        return super().invoke(ctx)


@click.command("token")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="The share's state folder, if not the default.")
@click.option("--expires", "expires_days", type=float, default=tokens.DEFAULT_TOKEN_DAYS,
              show_default=True, help="Days until the token expires (0: never).")
@click.option("--label", default="", help="A note kept inside the token (who it is for).")
@click.option("--revoke", metavar="TOKEN|ID", default=None,
              help="Revoke this token (or token id from --list) instead of making one; "
                   "a running share refuses it at once.")
@click.option("--list", "list_tokens", is_flag=True,
              help="List the tokens made for this share (id, label, expiry, revoked).")
@click.option("--relay", "relays", multiple=True, metavar="URL",
              help="Relay for the example lines (default: the share's last --relay, "
                   "else KBFS_RELAY).")
def token_command(directory: str, state_dir: str | None, expires_days: float, label: str,
                  revoke: str | None, list_tokens: bool, relays: tuple[str, ...]) -> None:
    """Print a bearer token for the private share of DIRECTORY (or --list, --revoke).

    \b
    stdout: the token alone (TOKEN=$(kbfs share token DIR) works); stderr: the
    lines to give the reader, who uses one of
      export KBFS_TOKEN=TOKEN
      kbfs download kbfs://HOST:PORT/SHARE_ID/PATH --token TOKEN
      ~/.config/kbfs/config.json: {"tokens": {"SHARE_ID": "TOKEN"}}
    Readers send it as `Authorization: Bearer TOKEN`; the relay passes it to this
    share only (the token names it), which checks it with a secret kept in its state
    folder. Tokens expire after 30 days unless --expires says otherwise.
    """
    choice = _state_dir(directory, state_dir)
    sd = choice.path
    if choice.note:
        _err(choice.note)
    if revoke is not None or list_tokens:
        key = sharestate.load_key(sd, create=False)
        if revoke is not None:
            tid = tokens.revoke_token(sd, sharestate.share_id_of(key), revoke)
            _say(f"kbfs share token {tid} revoked")
            return
        for t in tokens.issued_tokens(sd):
            expires = t.get("expires") or 0
            state = ("revoked" if t["revoked"] else
                     "expired" if expires and expires < time.time() else "valid")
            when = (time.strftime("%Y-%m-%d %H:%M", time.localtime(expires)) if expires
                    else "never")
            _say(f"{t['id']}  {state:7}  expires {when}  {str(t.get('label', ''))!r}")
        return
    if expires_days < 0 or expires_days != expires_days:
        raise ConfigError("--expires must be a number of days, 0 for never")
    os.makedirs(sd, mode=0o700, exist_ok=True)
    key = sharestate.load_key(sd)  # made here when the share has not run yet
    share_id = sharestate.share_id_of(key)
    sharestate.write_share_info(sd, folder=os.path.realpath(directory), id=share_id)
    expires = expires_days * 86400 if expires_days else None
    token = tokens.issue_token(sd, share_id, expires, label)
    _say(token)
    for line in _token_lines(token, share_id, _example_relay(sd, relays)):
        _err(line)


def _example_relay(state_dir: str, relays: tuple[str, ...]) -> str:
    """The relay URL for the example lines: --relay, the share's own, KBFS_RELAY, or a
    placeholder."""
    known = list(relays) or sharestate.read_share_info(state_dir).get("relays") or [
        r for r in os.environ.get("KBFS_RELAY", "").split(",") if r.strip()]
    return str(known[0]) if known else "http://RELAYHOST:PORT"


def _token_lines(token: str, share_id: str, relay: str) -> list[str]:
    """What a reader pastes to use TOKEN (the format readers' tools take; docs/usage.md)."""
    from kbfs import protocol

    try:
        url = protocol.kbfs_url(share_mod._relay_url(relay), share_id)
    except ConfigError:
        url = f"kbfs://RELAYHOST:PORT/{share_id}/"
    config = json.dumps({"tokens": {share_id: token}})
    return [
        f"# give the reader this token for share {share_id}; they use one of:",
        f"export KBFS_TOKEN={token}",
        f"kbfs download {url}PATH --token {token}",
        f"# or in ~/.config/kbfs/config.json: {config}",
    ]


@click.command("share", cls=_ShareCommand, token_command=token_command)
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--relay", "relays", multiple=True, metavar="URL",
              help="Relay to connect to (repeatable). Default: KBFS_RELAY.")
@click.option("--name", default="", help="A readable name for the share (default: folder name).")
@click.option("--listen", metavar="HOST:PORT", help="Also serve /sha1/ and /tree/ directly here.")
@click.option("--public-url", default="", metavar="URL",
              help="URL others use to reach --listen (default: its bound address).")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Where the key (so the share id), token secret and index live (default: "
                   "the one found for DIR under ~/.local/state/kbfs, even after a move).")
@click.option("--private", is_flag=True, help="Serve only readers with a token (kbfs share token).")
@click.option("--rescan-interval", default="30", show_default=True, metavar="SECONDS",
              help="Seconds between rescans of DIR for changes.")
@click.option("--exclude", "excludes", multiple=True, metavar="PATTERN",
              help="Do not share paths matching this fnmatch pattern (repeatable; tried on "
                   "each name and on the path inside DIR: '*.tmp', 'raw/scratch').")
def share_command(directory: str, relays: tuple[str, ...], name: str, listen: str | None,
                  public_url: str, state_dir: str | None, private: bool,
                  rescan_interval: str, excludes: tuple[str, ...]) -> None:
    """Publish DIRECTORY through relays (no inbound port needed).

    \b
    Indexes DIR (files already indexed are served during a long first pass),
    connects out to each relay and reconnects for ever (a returning relay is
    found within 5 s), rescans for changes. Prints the share id and, once
    connected, the kbfs:// link to give readers. `kbfs share token DIR` prints
    a bearer token for a --private share. Stops on Ctrl-C or SIGTERM.
    \b
    Dotfiles are shared (zarr's .zarray), except: .git .hg .svn .bzr, editor
    temporaries (.*.swp *~ .#*), .DS_Store ._* .Trash-*, download part files
    (.*.kbfs-part *.part-XXXXXXXX), .ssh .gnupg, and --exclude patterns.
    The share's id lives with its key in its state folder, which is found
    again when DIR is moved (see docs/protocol.md, Identity).
    """
    if not relays and os.environ.get("KBFS_RELAY"):
        relays = tuple(r for r in os.environ["KBFS_RELAY"].split(",") if r.strip())
    if not relays and not listen:
        raise ConfigError("give --relay URL (or KBFS_RELAY), or --listen HOST:PORT")
    try:
        interval = float(rescan_interval)
    except ValueError:
        raise ConfigError(f"--rescan-interval {rescan_interval!r}: expected seconds") from None
    if interval <= 0:
        raise ConfigError("--rescan-interval must be positive")
    service.check_share_folder(directory)  # unusable folders: one line, before anything runs
    choice = _state_dir(directory, state_dir)
    service.check_state_folder(choice.path, given=bool(state_dir))
    options = share_mod.ShareOptions(
        root_dir=directory, relays=list(relays), name=name,
        listen=_parse_listen(listen) if listen else None, public_url=public_url,
        state_dir=choice.path, private=private, rescan_interval=interval,
        exclude=list(excludes))
    bar = _ScanBar()
    share = share_mod.Share(options, report=_say, scan_progress=bar.progress,
                            scan_total=bar.on_total)
    _info_logging("kbfs.share")
    if choice.note:
        _say(choice.note)
    _say(f"kbfs share id {share.id}")
    _say(f"kbfs share folder {share.root_dir} (state in {share.state_dir})")
    if share.new_key and not choice.old_id:
        _say(f"kbfs share: new key, new share id {share.id} (kept in {share.state_dir}); "
             "if this folder was shared before under another id, stop and restart with "
             "--state-dir OLD_STATE_FOLDER to keep that id and its links")
    if private:
        _say(f"kbfs share is private: make reader tokens with `kbfs share token {directory}`")
    trio.run(_until_signal, share.run)
    _say("kbfs share stopped")


def register(cli: click.Group) -> None:
    """Add `relay` and `share` to the root command group."""
    cli.add_command(relay_command)
    cli.add_command(share_command)


__all__ = ["register"]
