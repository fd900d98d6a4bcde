"""A share's state folder and identity: where it is, what it records, its key.

`find_state_dir` finds the state folder (key, token secret, index) of the share of a
folder, under the per-user state base, also after the folder was moved (`share.json`
records the folder; a moved folder is recognised by its indexed files); `read_share_info`
/ `write_share_info` keep `share.json`; `load_key` makes or loads the share's Ed25519 key
(0600, `private_file`), whose public key is the share id (`share_id_of`).

It does not: index (`kbfs.index`), serve or connect (`kbfs.share`), or make and check
tokens (`kbfs.tokens`, which keeps its secret here with `private_file`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kbfs import protocol
from kbfs.config import default_state_dir
from kbfs.errors import ConfigError

log = logging.getLogger("kbfs.share")  # its warnings are the share's (`kbfs share` shows them)

KEY_FILE = "share.key"
SHARE_INFO_FILE = "share.json"  # in the state folder: {"folder", "id", "relays"}
MOVE_SAMPLE = 50  # indexed files looked at to recognise a moved folder


def state_dir_for(root_dir: str) -> str:
    """The state folder a new share of ROOT_DIR gets (outside the folder), named from its
    real path when it is first shared; `find_state_dir` finds it again after a move."""
    digest = hashlib.sha256(os.path.realpath(root_dir).encode("utf-8", "surrogateescape"))
    return default_state_dir("share-" + digest.hexdigest()[:16])


def read_share_info(state_dir: str) -> dict[str, Any]:
    """STATE_DIR/share.json ({"folder", "id", "relays"}), or {} when missing or unreadable."""
    try:
        with open(os.path.join(state_dir, SHARE_INFO_FILE), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def write_share_info(state_dir: str, **fields: Any) -> None:
    """Merge FIELDS into STATE_DIR/share.json (written whole, then renamed into place)."""
    info = {**read_share_info(state_dir), **fields}
    tmp = os.path.join(state_dir, f".{SHARE_INFO_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(info, f)
    os.replace(tmp, os.path.join(state_dir, SHARE_INFO_FILE))


def _holds_index_of(state_dir: str, folder: str) -> bool:
    """True when most of a sample of STATE_DIR's indexed files are under FOLDER at the
    same relative paths with the same size and mtime (what `mv`, `rsync -a`, `cp -a`
    keep), and at least one is: FOLDER is the folder that index was made of."""
    import sqlite3

    db_path = os.path.join(state_dir, "index.sqlite")
    if not os.path.exists(db_path):
        return False
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute("SELECT path, size, mtime_ns FROM files ORDER BY random() LIMIT ?",
                                (MOVE_SAMPLE,)).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return False
    found = 0
    for path, size, mtime_ns in rows:
        try:
            st = os.stat(os.path.join(folder, *str(path).split("/")))
        except OSError:
            continue
        found += (st.st_size, st.st_mtime_ns) == (size, mtime_ns)
    return found > 0 and found * 10 >= len(rows) * 9


@dataclass
class StateChoice:
    """Where a share's state is, and the line to print about how it was chosen ('')."""

    path: str
    note: str = ""
    old_id: str = ""  # a new share: the id of a vanished folder of the same name


def find_state_dir(root_dir: str) -> StateChoice:
    """The state folder (key, token secret, index) of the share of ROOT_DIR.

    The rule, under the per-user state base (`$XDG_STATE_HOME/kbfs`; the systemd unit
    sets it to /var/lib/kbfs): the `share-*` folder whose share.json names ROOT_DIR's
    real path; else the folder named from that path (made before share.json existed);
    else one whose recorded folder is gone and whose index matches ROOT_DIR's files (the
    folder was moved: its id is kept, and the note says so); else a new folder, and when
    a vanished folder of the same name had a share, the note names its id and the
    `--state-dir` that keeps it.
    """
    real = os.path.realpath(root_dir)
    base = default_state_dir("")
    try:
        names = sorted(n for n in os.listdir(base) if n.startswith("share-"))
    except OSError:
        names = []
    infos = {n: read_share_info(os.path.join(base, n)) for n in names}
    for n, info in infos.items():
        if info.get("folder") == real:
            return StateChoice(os.path.join(base, n))
    named = state_dir_for(real)
    if os.path.isdir(named) and not infos.get(os.path.basename(named)):
        return StateChoice(named)
    gone = [(n, info) for n, info in infos.items() if isinstance(info.get("folder"), str)
            and not os.path.isdir(info["folder"])]
    for n, info in gone:
        if _holds_index_of(os.path.join(base, n), real):
            return StateChoice(os.path.join(base, n),
                               f"kbfs share: {real} is {info['folder']} moved: keeping its "
                               f"share id {info.get('id', '?')}")
    if os.path.exists(named):  # that name is another folder's state (this path's old one)
        named += "-" + secrets.token_hex(4)
    for n, info in gone:
        if os.path.basename(info["folder"]) == os.path.basename(real) and info.get("id"):
            return StateChoice(named, old_id=str(info["id"]), note=(
                f"kbfs share: WARNING: {info['folder']} (gone) was shared as "
                f"{info['id']}; if {real} is that folder, stop and run `kbfs share {real} "
                f"--state-dir {os.path.join(base, n)}` to keep that id and its links"))
    return StateChoice(named)


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _read_private(path: str) -> bytes:
    st = os.stat(path)
    if st.st_mode & 0o077:
        log.warning("%s was readable by others; making it private (0600)", path)
        os.chmod(path, 0o600)
    with open(path, "rb") as f:
        return f.read(1 << 16)


def private_file(path: str, make: Callable[[], bytes], missing: str | None) -> bytes:
    """The bytes of the 0600 file PATH, made with MAKE on first use (or ConfigError MISSING
    when MISSING is given and the file is not there yet)."""
    if not os.path.exists(path):
        if missing is not None:
            raise ConfigError(missing)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            _write_private(path, make())
        except FileExistsError:
            pass  # another process made it first: use theirs
    return _read_private(path)


def load_key(state_dir: str, create: bool = True) -> Ed25519PrivateKey:
    """The share's Ed25519 key from STATE_DIR, made (mode 0600) on first use."""
    def new_pem() -> bytes:
        return Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    path = os.path.join(state_dir, KEY_FILE)
    pem = private_file(path, new_pem, None if create else
                        f"{state_dir}: no share key yet (run `kbfs share DIR` once)")
    try:
        loaded = serialization.load_pem_private_key(pem, password=None)
    except ValueError as exc:
        raise ConfigError(f"{path}: not a share key ({exc})") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key")
    return loaded


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key."""
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def share_id_of(key: Ed25519PrivateKey) -> str:
    """The share id of KEY (see protocol.share_id_from_public_key)."""
    return protocol.share_id_from_public_key(public_key_bytes(key))
