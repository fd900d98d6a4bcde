"""What a long-running command (kbfs relay, kbfs share) needs to run under a service manager.

Log lines: one line per event, whatever the message holds. A newline, carriage return,
escape or other control character in a message (a share's --name, a file name, a
traceback) is written as a visible escape (\\n, \\x1b), so nothing a peer sends can forge
or hide a line, move the cursor or colour a terminal. Each line carries its level: under
systemd (stderr is the journal, $JOURNAL_STREAM) as the `<N>` syslog priority prefix the
journal reads and strips (journalctl -p warning works; the journal adds the time), else as
"TIME LOGGER LEVEL message". The lines a command prints on standard output (its URL, its
share id) go through `say`, one line each, with `<6>` (info) under the journal.

Start checks: `check_share_folder` and `check_state_folder` turn an unusable folder (not
there, not a folder, unreadable, not writable, on a read-only file system) into one
ConfigError line before anything starts, instead of a traceback or a share that runs and
serves nothing.

What this module does NOT do: progress bars (callers draw them only on a terminal), log
rotation or files (the service manager keeps the lines), or any retry.
"""

from __future__ import annotations

import logging
import os
import re
import sys

from kbfs.errors import ConfigError

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
JOURNAL_FORMAT = "%(name)s %(levelname)s %(message)s"  # the journal stamps time itself
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\x1b": "\\x1b"}
# syslog priorities (sd-daemon(3) prefixes) of the logging levels
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def one_line(text: str) -> str:
    """TEXT with every control character but tab written as a visible escape: one line."""
    return _CONTROL.sub(lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def to_journal(stream: object = None) -> bool:
    """Whether STREAM (default: stderr) is systemd's journal: $JOURNAL_STREAM names its
    device and inode (systemd.exec(5)); a stream redirected elsewhere by the unit is not."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(getattr(stream or sys.stderr, "fileno")())  # noqa: B009 - any object
    except (AttributeError, OSError, ValueError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def priority(level: int) -> int:
    """The syslog priority of a logging LEVEL (debug: 7)."""
    return next((p for lvl, p in _PRIORITY if level >= lvl), 7)


class LineFormatter(logging.Formatter):
    """One line per record (see the module docstring), with its level."""

    def __init__(self, journal: bool) -> None:
        super().__init__(JOURNAL_FORMAT if journal else FORMAT)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = one_line(super().format(record))
        return f"<{priority(record.levelno)}>{line}" if self.journal else line


def configure(level: int) -> None:
    """Log records of LEVEL and above to stderr, one line each (replaces basicConfig)."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter(to_journal(sys.stderr)))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def say(line: str) -> None:
    """Print one event LINE on standard output (flushed: a pipe or the journal sees it at
    once)."""
    text = one_line(line)
    if to_journal(sys.stdout):
        text = "<6>" + text
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- start checks

def check_share_folder(path: str) -> None:
    """ConfigError unless PATH is a folder this process can list and enter."""
    what = f"share folder {one_line(path)}"
    if not os.path.exists(path):
        raise ConfigError(f"{what}: does not exist")
    if not os.path.isdir(path):
        raise ConfigError(f"{what}: not a folder")
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot be read ({exc.strerror}); the share runs as "
                          f"uid {os.geteuid()}") from None


def check_state_folder(path: str, given: bool) -> None:
    """ConfigError unless PATH (made if missing, 0700) is a folder this process can write:
    a real file is made and removed, which also finds a read-only file system. GIVEN: it
    came from --state-dir (else from the default place, which the message says)."""
    what = f"state folder {one_line(path)}" + ("" if given else " (the default; choose one with --state-dir)")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(f"{what}: not a folder")
    import secrets  # here: `kbfs` start-up does not pay for it

    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        probe = os.path.join(path, f".kbfs-write-test.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{what}: not writable ({exc.strerror}); the share runs as uid "
                          f"{os.geteuid()}") from None
