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
