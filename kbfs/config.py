"""User settings: relays, cache folder, cache size and local search folders.

Precedence, highest first: command-line options (passed in by the caller), the
environment (`KBFS_RELAY` comma-separated, `KBFS_CACHE_DIR`, `KBFS_CACHE_SIZE`,
`KBFS_SEARCH_DIRS` colon-separated, `KBFS_DIRECT` 0/1), then the JSON config file
`$XDG_CONFIG_HOME/kbfs/config.json` (default `~/.config/kbfs/config.json`), e.g.

    {"relays": ["http://relay.example.org:8080"], "cache_dir": "/scratch/kbfs-cache",
     "cache_size": "50G", "search_dirs": ["/data"], "direct": false}

`direct` (default true): whether readers also fetch from the direct URLs (a share's
`--listen` server) that a relay's /api/find lists; false contacts only the relays.

This module only reads settings; it never touches the network or the cache.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

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
    """'host:port' or 'http://host:port/' -> 'http://host:port'."""
    url = url.strip().rstrip("/")
    if not url:
        raise ConfigError("empty relay URL")
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"relay URL {url!r} must be http:// or https://")
    return url


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

    def resolved_cache_size(self) -> int:
        if self.cache_size is not None:
            return self.cache_size
        os.makedirs(self.cache_dir, exist_ok=True)
        # shutil.disk_usage's `free`, without importing shutil (and its compression
        # modules: ~1.5 ms of every command's start-up).
        st = os.statvfs(self.cache_dir)
        return max(64 << 20, st.f_bavail * st.f_frsize // 10)


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
) -> Settings:
    """Merge command-line values over the environment over the config file."""
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
    return s
