"""Shared pytest fixtures: generic helpers only (the format fixtures, test files).

`tests/fixtures/` holds copies of the format facts (pointers written by the original
`ml-prv-create`, tree vectors): the tests never read anything outside the checkout, so a
fresh clone passes alone.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    """The folder of format fixtures (real pointers from the original tools, tree vectors)."""
    if not FIXTURES.is_dir():
        pytest.fail(f"format fixtures not found at {FIXTURES}")
    return FIXTURES


def write_file(path: str | os.PathLike[str], size: int, seed: int = 0) -> bytes:
    """Write SIZE pseudo-random bytes (reproducible from SEED) to PATH and return them."""
    data = random.Random(seed).randbytes(size)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return data


@pytest.fixture
def make_file() -> Callable[..., bytes]:
    """`make_file(path, size, seed=0)`: write reproducible random bytes, return them."""
    return write_file


# ---------------------------------------------------------------- the KBFS_PORTABLE=1 pass
# `make test` runs the suite a second time with KBFS_PORTABLE=1 (kbfs.osio's fallbacks in
# every process). FUSE tests run in the first pass only: the mount's own code has nothing
# behind the seam worth a second mount of everything, and they are most of the time. A test
# is a FUSE test when marked `fuse` (mountutil.NEEDS_FUSE) or when it calls mountutil's
# `mounted` itself.
PORTABLE_RUN = os.environ.get("KBFS_PORTABLE", "") == "1"
PORTABLE_SKIP = "FUSE test: runs in the first pass, not the KBFS_PORTABLE=1 pass"
# Files whose subject is not behind the seam: once is enough (the package build, the units).
PORTABLE_ONCE = {"test_package.py", "test_services.py", "test_layers.py"}
_portable_skipped: list[str] = []


def _uses_fuse(item: pytest.Item) -> bool:
    if item.get_closest_marker("fuse") is not None:
        return True
    code = getattr(getattr(item, "function", None), "__code__", None)
    return code is not None and "mounted" in code.co_names


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not PORTABLE_RUN:
        return
    for item in items:
        if _uses_fuse(item):
            item.add_marker(pytest.mark.skip(reason=PORTABLE_SKIP))
            _portable_skipped.append(item.nodeid)
        elif item.path.name in PORTABLE_ONCE:
            item.add_marker(pytest.mark.skip(reason="runs in the first pass only (nothing behind kbfs.osio)"))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if PORTABLE_RUN:
        terminalreporter.write_line(
            f"KBFS_PORTABLE=1 pass: {len(_portable_skipped)} FUSE tests skipped ({PORTABLE_SKIP})")
