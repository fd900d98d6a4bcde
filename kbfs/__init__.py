"""kbfs: share huge research data files by tiny pointer files (`.prv`).

The package root only names the version and re-exports the two reader entry
points (`kbfs.open`, `kbfs.realize`) lazily, so `import kbfs` stays cheap and
never pulls in FUSE or the HTTP stack.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "open", "realize"]


def open(source: str, **kwargs: Any) -> Any:  # noqa: A001 - mirrors builtins.open on purpose
    """Open SOURCE (a .prv path, sha1://SHA1, kbfs://...) as a read-only verified file object."""
    from kbfs import client

    return client.open(source, **kwargs)


def realize(source: str, **kwargs: Any) -> str:
    """Return the local path of a complete, verified copy of SOURCE."""
    from kbfs import client

    return client.realize(source, **kwargs)
