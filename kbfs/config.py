"""User settings: relays, cache folder, cache size, local search folders and tokens.

Precedence, highest first: command-line options (passed in by the caller), the
environment (`KBFS_RELAY` comma-separated, `KBFS_CACHE_DIR`, `KBFS_CACHE_SIZE`,
`KBFS_SEARCH_DIRS` colon-separated, `KBFS_DIRECT` 0/1,
`KBFS_MIRRORS` comma-separated: static mirrors, docs/mirrors.md), then the JSON config file
`$XDG_CONFIG_HOME/kbfs/config.json` (default `~/.config/kbfs/config.json`), e.g.

    {"relays": ["http://relay.example.org:8080"], "cache_dir": "/scratch/kbfs-cache",
     "cache_size": "50G", "search_dirs": ["/data"], "direct": false,
     "tokens": {"vic4alrdmfsaebac5noakw5iq2yvs7qz": "kbfs1....",
                "http://other-relay.example.org:8080": "kbfs1...."}}

`direct` (default true): whether readers also fetch from the direct URLs (a share's
`--listen` server) that a relay's /api/find lists; false contacts only the relays.

Tokens (bearer tokens of private shares, `kbfs1.<payload>.<mac>`, made by `kbfs share
token`) are not overridden but gathered from all three places: `--token` (repeatable),
`KBFS_TOKEN` (comma-separated) and the config file's `"tokens"`, either a list of tokens
or a map whose keys are share ids or relay URLs. Each token names its share
(`protocol.token_claim`); one that does not is refused here, with the place it came from.
Where a token may be sent (`Settings.tokens_for`): a token from `--token`, `KBFS_TOKEN`,
the list, or the map under a share id goes to the relays the user configured and those a
`kbfs://` URL names; a token the map files under a relay URL goes to that relay too, and
is the only kind that ever goes to a relay the user did not configure (one a pointer's
hint named). Readers then send a token only with requests about the share it names.

This module only reads settings; it never touches the network or the cache.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from kbfs import kbfsurl, protocol
from kbfs.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str | int) -> int:
    """Parse '10G', '512M', '1.5GiB', '4096' into bytes (binary units)."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size must be non-negative, got {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"cannot read {text!r} as a size (examples: 4096, 512M, 10G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    """Human-readable binary size: 1.5 GiB, 12 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def config_dir() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return os.path.join(base, "kbfs")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "kbfs")


def default_state_dir(name: str) -> str:
    """Per-user state folder for a share or relay (kept outside any shared folder)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "kbfs", name)


def normalize_relay(url: str) -> str:
    """'host:port' or 'http://host:port/' -> 'http://host:port'; a scheme's default port
    dropped ('https://h:443' -> 'https://h'), the spelling `kbfsurl.parse` gives a link's relay,
    so tokens filed under a relay URL meet the links that name it."""
    url = url.strip().rstrip("/")
    if not url:
        raise ConfigError("empty relay URL")
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"relay URL {url!r} must be http:// or https://")
    return kbfsurl.canonical_relay(url)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(value: object, what: str) -> bool:
    """True/False from a JSON bool or one of 1/0, true/false, yes/no, on/off."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{what}: expected 1 or 0 (true/false, yes/no), got {str(value)[:40]!r}")


@dataclass
class Settings:
    relays: list[str] = field(default_factory=list)
    cache_dir: str = field(default_factory=default_cache_dir)
    cache_size: int | None = None  # None: 10% of the free space where the cache lives
    search_dirs: list[str] = field(default_factory=list)
    direct: bool = True  # fetch from direct share URLs that /api/find lists
    # Tokens for the configured relays and those kbfs:// URLs name (--token, KBFS_TOKEN,
    # the config file's list, or its map under a share id), in that order.
    tokens: list[str] = field(default_factory=list)
    # Tokens the config file's map files under a relay URL: sent to that relay only (and
    # the only ones sent to a relay that is not configured).
    relay_tokens: dict[str, list[str]] = field(default_factory=dict)
    # Static mirrors (docs/mirrors.md), nearest first: asked before the relays; never tokens.
    mirrors: list[str] = field(default_factory=list)

    def tokens_for(self, relays: list[str] | tuple[str, ...],
                   named: tuple[str, ...] | list[str] = ()) -> dict[str, tuple[str, ...]]:
        """{relay: tokens that may be sent to it} for each of RELAYS (normalized URLs).

        The general tokens go to the configured relays and to NAMED (the relay a kbfs://
        URL names); every relay also gets the tokens the config file filed under its URL.
        A relay that is neither (e.g. one a pointer's hint named) gets only those."""
        trusted = set(self.relays) | set(named)
        out: dict[str, tuple[str, ...]] = {}
        for relay in relays:
            given = [*(self.tokens if relay in trusted else ()), *self.relay_tokens.get(relay, ())]
            if given:
                out[relay] = tuple(dict.fromkeys(given))
        return out

    def resolved_cache_size(self) -> int:
        if self.cache_size is not None:
            return self.cache_size
        os.makedirs(self.cache_dir, exist_ok=True)
        # shutil.disk_usage's `free`, without importing shutil (and its compression
        # modules: ~1.5 ms of every command's start-up).
        st = os.statvfs(self.cache_dir)
        return max(64 << 20, st.f_bavail * st.f_frsize // 10)


def check_token(token: object, where: str) -> str:
    """TOKEN stripped, if it is a kbfs bearer token that names its share; else
    ConfigError naming WHERE it came from (the token itself is never echoed whole)."""
    if not isinstance(token, str):
        raise ConfigError(f"{where}: a token must be a string (kbfs1.…)")
    text = token.strip()
    if text.lower().startswith("bearer "):
        text = text[len("bearer "):].strip()
    if protocol.token_claim("Bearer " + text) is None or any(c in text for c in " \r\n\t,"):
        shown = text[:12] + "…" if len(text) > 12 else text
        raise ConfigError(f"{where}: {shown!r} is not a kbfs share token (kbfs1.<payload>.<mac>, "
                          "as `kbfs share token DIR` prints)")
    return text


def token_share(token: str) -> str:
    """The share id a token (checked by `check_token`) names."""
    claim = protocol.token_claim("Bearer " + token)
    return claim.share if claim is not None else ""


def _file_tokens(value: object, path: str) -> tuple[list[str], dict[str, list[str]]]:
    """(general tokens, {relay URL: tokens}) from the config file's "tokens" value."""
    where = f"{path}: tokens"
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [check_token(t, where) for t in value], {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a list of tokens or a map "
                          "{share id or relay URL: token}")
    general: list[str] = []
    by_relay: dict[str, list[str]] = {}
    for key, item in value.items():
        items = item if isinstance(item, list) else [item]
        if isinstance(key, str) and protocol.SHARE_ID_RE.match(key):
            for t in items:
                t = check_token(t, f"{where}: {key}")
                if token_share(t) != key:
                    raise ConfigError(f"{where}: the token filed under share {key} is for "
                                      f"share {token_share(t)}")
                general.append(t)
        elif isinstance(key, str) and ("://" in key or ":" in key):
            relay = normalize_relay(key)
            by_relay.setdefault(relay, []).extend(check_token(t, f"{where}: {key}") for t in items)
        else:
            raise ConfigError(f"{where}: key {str(key)[:60]!r} is neither a share id nor a "
                              "relay URL")
    return general, by_relay


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    return data


def load_settings(
    relays: list[str] | tuple[str, ...] | None = None,
    cache_dir: str | None = None,
    cache_size: str | int | None = None,
    search_dirs: list[str] | None = None,
    direct: bool | None = None,
    tokens: list[str] | tuple[str, ...] | None = None,
    mirrors: list[str] | tuple[str, ...] | None = None,
) -> Settings:
    """Merge command-line values over the environment over the config file (tokens:
    gathered from all three, command line first)."""
    path = os.path.join(config_dir(), "config.json")
    file = _read_file(path)
    env = os.environ
    s = Settings()
    relay_list: list[str] = list(relays or [])
    if not relay_list and env.get("KBFS_RELAY"):
        relay_list = [r for r in env["KBFS_RELAY"].split(",") if r.strip()]
    if not relay_list:
        relay_list = list(file.get("relays", []))
    s.relays = [normalize_relay(r) for r in relay_list]
    s.cache_dir = os.path.abspath(
        os.path.expanduser(cache_dir or env.get("KBFS_CACHE_DIR") or file.get("cache_dir") or s.cache_dir)
    )
    size = cache_size if cache_size is not None else env.get("KBFS_CACHE_SIZE", file.get("cache_size"))
    s.cache_size = parse_size(size) if size is not None else None
    dirs = search_dirs
    if dirs is None:
        dirs = env["KBFS_SEARCH_DIRS"].split(":") if env.get("KBFS_SEARCH_DIRS") else file.get("search_dirs", [])
    s.search_dirs = [os.path.abspath(os.path.expanduser(d)) for d in dirs or [] if d]
    if direct is not None:
        s.direct = direct
    elif env.get("KBFS_DIRECT", "").strip():
        s.direct = parse_bool(env["KBFS_DIRECT"], "KBFS_DIRECT")
    elif "direct" in file:
        s.direct = parse_bool(file["direct"], f"{path}: direct")
    given = [check_token(t, "--token") for t in tokens or ()]
    given += [check_token(t, "KBFS_TOKEN") for t in env.get("KBFS_TOKEN", "").split(",")
              if t.strip()]
    general, s.relay_tokens = _file_tokens(file["tokens"], path) if "tokens" in file else ([], {})
    s.tokens = list(dict.fromkeys(given + general))
    s.mirrors = _mirrors(mirrors, env.get("KBFS_MIRRORS", ""), file.get("mirrors"), path)
    return s


def _mirrors(given: list[str] | tuple[str, ...] | None, env: str, file: object,
             path: str) -> list[str]:
    """The mirrors (`--mirror` > KBFS_MIRRORS, comma-separated > the file's "mirrors"),
    each checked (`mirrorurl.check_mirror`): a bad one is a ConfigError naming its place."""
    from kbfs import mirrorurl

    if given:
        urls, where = list(given), "--mirror"
    elif env.strip():
        urls, where = [u for u in env.split(",") if u.strip()], "KBFS_MIRRORS"
    elif file is not None:
        if not isinstance(file, list):
            raise ConfigError(f"{path}: mirrors: expected a list of URLs")
        urls, where = file, f"{path}: mirrors"
    else:
        return []
    try:
        return list(dict.fromkeys(mirrorurl.check_mirror(u, where) for u in urls))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
