"""The command line as a user meets it: every bad invocation is one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

KBFS = [sys.executable, "-m", "kbfs"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KBFS, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["bogus"], "No such command 'bogus'"),
        (["relay", "--port", "99999"], "--port"),
        (["share", "/nonexistent-kbfs-dir", "--relay", "http://127.0.0.1:9"], "/nonexistent-kbfs-dir"),
        (["cat"], "Missing argument 'SOURCE'"),
        (["mount", "/nonexistent-kbfs-src", "/tmp"], "/nonexistent-kbfs-src"),
        (["cat", "sha1://nothex"], "sha1://nothex"),
        (["download", "sha1://" + "0" * 40, "--relay", "http://127.0.0.1:9", "--no-local"], "sha1://"),
        (["prv", "create", "/nonexistent-kbfs-file"], "/nonexistent-kbfs-file"),
        (["prv", "info", "--bogus-option", "x"], "--bogus-option"),
    ],
)
def test_bad_invocations_are_one_clear_line(args: list[str], needle: str, tmp_path: Path) -> None:
    proc = subprocess.run([*KBFS, *args], capture_output=True, text=True, timeout=90, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KBFS_CACHE_DIR": str(tmp_path / "c")})
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kbfs: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_help_lists_every_command_group() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    for name in ("prv", "share", "relay", "mount", "umount", "status", "cache", "download", "cat", "locate"):
        assert f"  {name} " in proc.stdout, name


def test_every_command_has_help() -> None:
    for args in (["share"], ["relay"], ["mount"], ["cache", "prefetch"], ["download"], ["prv", "verify"]):
        proc = run(*args, "--help")
        assert proc.returncode == 0 and "Usage: kbfs" in proc.stdout, args
