"""Bearer tokens of a private share: made, checked, listed and revoked.

`issue_token` makes `kbfs1.<payload>.<mac>` (HMAC-SHA256 with the secret `token.secret` of
the share's state folder, 30-day expiry by default) and records its id and label in
`tokens.jsonl`; `check_token` checks one (MAC, share id, expiry, not revoked);
`issued_tokens` lists them; `revoke_token` appends an id to `revoked` (`read_revoked`).
Used by `kbfs.share` (checking) and `kbfs share token` (`kbfs.cli_net`).

It does not: decide who may read (`Share.authorized`, which re-reads `revoked` when it
changes), tell relays of a revocation (`Share`, `auth_reset`), or pick a token on the
reader's side (`kbfs.config`, `protocol.token_claim`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from typing import Any

from kbfs import protocol
from kbfs.errors import ConfigError
from kbfs.sharestate import private_file

TOKEN_SECRET_FILE = "token.secret"


def _token_secret(state_dir: str, create: bool = True) -> bytes:
    path = os.path.join(state_dir, TOKEN_SECRET_FILE)
    data = private_file(path, lambda: secrets.token_bytes(32),
                         None if create else f"{state_dir}: no token secret yet")
    if len(data) < 32:
        raise ConfigError(f"{path}: token secret is too short")
    return data


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


DEFAULT_TOKEN_DAYS = 30.0  # `kbfs share token` without --expires
TOKENS_FILE = "tokens.jsonl"  # one JSON line per token issued: id, label, expiry, issued
REVOKED_FILE = "revoked"  # ids of revoked tokens, one a line


def token_id(token: str) -> str:
    """The id of a token (`kbfs1.<payload>.<mac>`, or its payload part): 24 hex digits of
    SHA-256 of `kbfs1.<payload>`. Listed by `kbfs share token --list`, given to --revoke."""
    body = token.strip()
    if body.count(".") >= 2:
        body = body.rpartition(".")[0]
    return hashlib.sha256(body.encode("utf-8", "replace")).hexdigest()[:24]


def issue_token(state_dir: str, share_id: str, expires_in: float | None = None,
                label: str = "") -> str:
    """A bearer token for the private share SHARE_ID: `kbfs1.<payload>.<hmac>`.

    The HMAC key lives only in STATE_DIR, so only this share can check its tokens. The
    payload names the share (`s`), so the relay sends the token to this share only; `e`
    is the expiry (Unix time, 0 for never; EXPIRES_IN None means never). The token's id
    and label are appended to STATE_DIR/tokens.jsonl (for --list and --revoke).
    """
    now = time.time()
    payload = {"s": share_id, "e": int(now + expires_in) if expires_in else 0,
               "n": label[:100], "r": secrets.token_hex(8)}
    body = protocol.SHARE_TOKEN_PREFIX + _b64u(json.dumps(payload, separators=(",", ":")).encode())
    mac = hmac.new(_token_secret(state_dir), body.encode(), hashlib.sha256).digest()
    record = {"id": token_id(body), "label": payload["n"], "expires": payload["e"],
              "issued": int(now)}
    fd = os.open(os.path.join(state_dir, TOKENS_FILE),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return body + "." + _b64u(mac)


def _token_payload(secret: bytes, authorization: str | None) -> tuple[str, dict[str, Any]] | None:
    """(token id, payload) of `Bearer <token>` when the token's MAC is right, else None."""
    if not authorization or len(authorization) > 4096:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    body, _, mac = token.strip().rpartition(".")
    if not body.startswith(protocol.SHARE_TOKEN_PREFIX):
        return None
    try:
        given = _unb64u(mac)
        payload = json.loads(_unb64u(body[len(protocol.SHARE_TOKEN_PREFIX):]))
    except (binascii.Error, ValueError):
        return None
    expected = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(given, expected) or not isinstance(payload, dict):
        return None
    return token_id(body), payload


def check_token(secret: bytes, share_id: str, authorization: str | None,
                revoked: frozenset[str] | set[str] = frozenset()) -> bool:
    """True when AUTHORIZATION is `Bearer <a valid, unexpired token of SHARE_ID>` whose
    id is not in REVOKED."""
    checked = _token_payload(secret, authorization)
    if checked is None:
        return False
    tid, payload = checked
    expiry = payload.get("e", 0)
    if isinstance(expiry, bool) or not isinstance(expiry, int | float):
        return False
    return (payload.get("s") == share_id and (not expiry or time.time() < expiry)
            and tid not in revoked)


def issued_tokens(state_dir: str) -> list[dict[str, Any]]:
    """The tokens issued for STATE_DIR's share (tokens.jsonl), oldest first, each with
    `revoked` set."""
    revoked = read_revoked(state_dir)
    out: list[dict[str, Any]] = []
    try:
        with open(os.path.join(state_dir, TOKENS_FILE), encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("id"), str):
                    out.append({**record, "revoked": record["id"] in revoked})
    except FileNotFoundError:
        pass
    return out


def read_revoked(state_dir: str) -> frozenset[str]:
    """The ids of the revoked tokens of STATE_DIR's share."""
    try:
        with open(os.path.join(state_dir, REVOKED_FILE), encoding="utf-8") as f:
            return frozenset(line.strip() for line in f if line.strip())
    except FileNotFoundError:
        return frozenset()


_TOKEN_ID_RE = re.compile(r"[0-9a-f]{24}\Z")


def revoke_token(state_dir: str, share_id: str, token_or_id: str) -> str:
    """Revoke a token of this share, given whole or by its id; returns its id.

    A whole token must be one of this share's (its MAC checks out); an id must be one
    `issued_tokens` lists. A running share refuses the token at once (it reads the file
    on every check) and tells its relays to forget cached answers (`auth_reset`).
    """
    text = token_or_id.strip()
    if text.lower().startswith("bearer "):
        text = text[7:].strip()
    if _TOKEN_ID_RE.match(text):
        if not any(t["id"] == text for t in issued_tokens(state_dir)):
            raise ConfigError(f"no token with id {text} was issued for this share")
        tid = text
    else:
        checked = _token_payload(_token_secret(state_dir, create=False), f"Bearer {text}")
        if checked is None or checked[1].get("s") != share_id:
            raise ConfigError("not a token of this share (nor a token id from --list)")
        tid = checked[0]
    if tid not in read_revoked(state_dir):
        fd = os.open(os.path.join(state_dir, REVOKED_FILE),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(tid + "\n")
            f.flush()
            os.fsync(f.fileno())
    return tid
