"""Small helpers shared by the command modules: progress bars and size options.

Only presentation lives here (no kbfs logic), so every `cli_*` module can use it
without importing another command module.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from kbfs.config import parse_size
from kbfs.errors import ConfigError


@contextmanager
def progress_bar(total: int, label: str) -> Iterator[Any]:
    """A click progress bar on a terminal's stderr; a no-op object when not a terminal.

    Yields an object with `update(n)`.
    """
    if not sys.stderr.isatty():
        yield _Silent()
        return
    bar: Any = click.progressbar(length=max(total, 1), label=label, file=sys.stderr, show_eta=True, show_percent=True)
    with bar:
        yield bar


class _Silent:
    def update(self, n: int, current_item: Any = None) -> None:
        pass


class SizeParam(click.ParamType):
    """A click parameter that accepts 4096, 512M, 10G."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeParam()
