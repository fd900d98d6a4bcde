"""Running kbfs under a service manager: the daemon/ units, the log lines, the start checks.

- daemon/*.service pass `systemd-analyze verify` (skipped, with the reason, without it); a
  unit with a typo fails it (the check can fail).
- The share unit's state rule keeps a share's id across restarts and a move of its folder:
  a real `kbfs share` with the unit's environment (XDG_STATE_HOME, no --state-dir).
- `kbfs relay` and `kbfs share` log one line per event with its level: under the journal
  ($JOURNAL_STREAM names stderr) as `<N>` priorities, else "TIME LOGGER LEVEL ..."; a folder
  name holding a newline and an escape cannot forge a `kbfs share link` line; no progress
  bar or escape when not on a terminal.
- `kbfs share` stops with one line and a non-zero exit for each unusable folder or state
  folder (missing, a file, unreadable, not writable, read-only file system).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netutil import get_json, start_relay

from kbfs import service

REPO = Path(__file__).resolve().parent.parent
DAEMON = REPO / "daemon"
UNITS = sorted(DAEMON.glob("*.service"))
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.timeout(120)


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBFS_") or k == "KBFS_PORTABLE"}
    env.pop("JOURNAL_STREAM", None)
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", XDG_CONFIG_HOME=str(tmp / "config"), **extra)
    return env


def _kbfs(*args: str, env: dict[str, str], timeout: float = 30, prefix: tuple[str, ...] = (),
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "kbfs", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------- the units

def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    if SYSTEMD_ANALYZE is None:
        pytest.skip("no systemd-analyze on this machine: the units are not verified here")
    return subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    assert len(UNITS) == 3
    copy = tmp_path / unit.name
    shutil.copy(unit, copy)
    got = _verify(copy)
    assert got.returncode == 0 and not (got.stdout + got.stderr).strip(), got.stdout + got.stderr


def test_verify_finds_a_broken_unit(tmp_path: Path) -> None:
    bad = tmp_path / "kbfs-relay.service"
    text = (DAEMON / "kbfs-relay.service").read_text()
    bad.write_text(text.replace("Restart=always", "Restrat=always").replace("/usr/bin/env kbfs", "kbfs"))
    got = _verify(bad)
    assert got.returncode != 0
    assert "Restrat" in got.stderr and "not executable" in got.stderr


def _unit_value(unit: str, key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", (DAEMON / unit).read_text(), re.M)


def test_share_unit_keeps_the_id_across_restarts_and_a_move(tmp_path: Path) -> None:
    # The unit: state under XDG_STATE_HOME=/var/lib/kbfs (its StateDirectory), no --state-dir,
    # so the share finds its state again by the folder's share.json, also after a move.
    assert "XDG_STATE_HOME=/var/lib/kbfs" in _unit_value("kbfs-share@.service", "Environment")
    assert "kbfs" in _unit_value("kbfs-share@.service", "StateDirectory")
    exec_start = _unit_value("kbfs-share@.service", "ExecStart")[0]
    assert "--state-dir" not in exec_start and exec_start.startswith("/usr/bin/env kbfs share %f")
    state_home = tmp_path / "var-lib-kbfs"  # what /var/lib/kbfs is to the service
    state_home.mkdir(mode=0o700)
    env = _env(tmp_path, XDG_STATE_HOME=str(state_home))
    data = tmp_path / "lab"
    data.mkdir()
    (data / "a.bin").write_bytes(os.urandom(1000))

    def share_id(folder: Path) -> str:
        proc = subprocess.Popen([sys.executable, "-m", "kbfs", "share", str(folder), "--listen", "127.0.0.1:0"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            assert proc.stdout is not None
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if "kbfs share indexed" in line:
                    break
            found = [m.group(1) for ln in lines if (m := re.match(r"kbfs share id ([a-z2-7]+)$", ln.strip()))]
            assert found, "".join(lines)
            return found[0]
        finally:
            proc.terminate()
            proc.wait(20)

    first = share_id(data)
    assert share_id(data) == first  # a restart
    moved = tmp_path / "elsewhere" / "lab-moved"
    moved.parent.mkdir()
    data.rename(moved)
    assert share_id(moved) == first  # a move (the instance is named anew; the state is found)
    assert len(list((state_home / "kbfs").glob("share-*"))) == 1


# ---------------------------------------------------------------- log lines

def test_line_formatter_one_line_with_level() -> None:
    record = logging.LogRecord("kbfs.relay", logging.WARNING, __file__, 1,
                               "share %s: %s", ("x", "bad\nkbfs.relay INFO forged\r\x1b[31mred\x00"), None)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record.exc_info = sys.exc_info()
    plain = service.LineFormatter(journal=False).format(record)
    journal = service.LineFormatter(journal=True).format(record)
    for line in (plain, journal):
        assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\x00" not in line
        assert "bad\\nkbfs.relay INFO forged\\r\\x1b[31mred\\x00" in line
        assert "Traceback" in line and "boom\\nsecond line" in line  # the traceback, on the line
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ kbfs.relay WARNING share x: ", plain)
    assert journal.startswith("<4>kbfs.relay WARNING share x: ")
    assert [service.priority(lv) for lv in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]
    assert service.one_line("tab\tkept") == "tab\tkept"


def _start_logged(args: list[str], out: Path, err: Path, env: dict[str, str], journal: bool) -> subprocess.Popen[str]:
    """Start kbfs ARGS with stdout in OUT, stderr in ERR; JOURNAL: as under systemd, both
    one stream (OUT is ERR) that $JOURNAL_STREAM names."""
    out_f = open(out, "w")  # noqa: SIM115 - the child keeps them
    err_f = out_f if journal else open(err, "w")  # noqa: SIM115
    if journal:
        st = os.fstat(err_f.fileno())
        env = dict(env, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    proc = subprocess.Popen([sys.executable, "-m", "kbfs", *args], stdout=out_f, stderr=err_f, text=True,
                            env=env, stdin=subprocess.DEVNULL)
    out_f.close()
    err_f.close()
    return proc


def _wait_for(path: Path, pattern: str, timeout: float = 30) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m := re.search(pattern, path.read_text(errors="replace"), re.M):
            return m
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in {path}: {path.read_text(errors='replace')[-2000:]}")


@pytest.mark.parametrize("journal", [False, True], ids=["file", "journal"])
def test_relay_and_share_log_one_line_per_event(tmp_path: Path, journal: bool) -> None:
    env = _env(tmp_path)
    # A folder name that would forge a `kbfs share link` line (what daemon/README.md tells
    # admins to grep the journal for) and clear the terminal line, were it printed raw.
    data = tmp_path / "lab\nkbfs share link kbfs:FORGED\x1b[2K"
    data.mkdir()
    for i in range(30):
        (data / f"f{i}.bin").write_bytes(os.urandom(20_000))
    relay_log = tmp_path / ("relay.out" if journal else "relay.err")
    relay = _start_logged(["relay", "--host", "127.0.0.1", "--port", "0"], tmp_path / "relay.out",
                          tmp_path / "relay.err", env, journal)
    share = None
    try:
        url = _wait_for(tmp_path / "relay.out", r"kbfs relay listening on (http://\S+)").group(1)
        share = _start_logged(["share", str(data), "--relay", url, "--state-dir", str(tmp_path / "st"),
                               "--name", "lab"], tmp_path / "share.out",
                              tmp_path / "share.err", env, journal)
        _wait_for(tmp_path / "share.out", r"kbfs share link ")
        _wait_for(relay_log, r"connected from")
        share.terminate()
        share.wait(20)
        _wait_for(relay_log, r"disconnected")
    finally:
        for p in (share, relay):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(20)
    prefix = r"<\d>" if journal else r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ "
    record = re.compile(prefix + r"[\w.]+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
    for name in ("relay.out", "share.out") if journal else ("relay.err", "share.err", "relay.out", "share.out"):
        raw = (tmp_path / name).read_bytes()
        assert b"\r" not in raw and b"\x1b" not in raw, (name, raw[-500:])  # no bars, no escapes
        for line in raw.decode().splitlines():
            if name.endswith(".err") or (journal and not line.startswith("<6>kbfs ")):
                assert record.match(line), (name, line)  # a log record: with its level
    share_out = (tmp_path / "share.out").read_text()
    links = [ln for ln in share_out.splitlines() if re.match(r"(<6>)?kbfs share link", ln)]
    assert len(links) == 1 and "FORGED" not in links[0], share_out  # the forged one stayed inside its line
    assert "lab\\nkbfs share link kbfs:FORGED\\x1b[2K" in share_out
    relay_err = relay_log.read_text()
    assert re.search(r"^" + prefix + r"kbfs\.relay INFO share [a-z2-7]+ \('lab'\) connected from 127\.0\.0\.1",
                     relay_err, re.M), relay_err


# ---------------------------------------------------------------- start checks

def _no_dac() -> tuple[str, ...]:
    """A prefix that makes root obey file modes (no CAP_DAC_*), or () for anyone else."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: file modes cannot be made to matter")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search")


def _hostile(tmp: Path, case: str) -> tuple[list[str], str]:
    """`kbfs share` arguments for CASE, and what its one line must say."""
    data = tmp / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(b"x" * 100)
    (tmp / "a-file").write_text("not a folder")
    state = tmp / "state"
    if case == "folder missing":
        return [str(tmp / "nope"), "--state-dir", str(state)], "does not exist"
    if case == "folder is a file":
        return [str(tmp / "a-file"), "--state-dir", str(state)], "is a file"
    if case == "folder unreadable":
        os.chmod(data, 0)
        return [str(data), "--state-dir", str(state)], "is not readable"
    if case == "state is a file":
        return [str(data), "--state-dir", str(tmp / "a-file")], "is a file"
    if case == "state under a file":
        return [str(data), "--state-dir", str(tmp / "a-file" / "st")], f"state folder {tmp / 'a-file' / 'st'}: "
    if case == "state not writable":
        state.mkdir(mode=0o500)
        return [str(data), "--state-dir", str(state)], f"state folder {state}: not writable (Permission denied)"
    if case == "state parent not writable":
        (tmp / "ro").mkdir(mode=0o500)
        return [str(data), "--state-dir", str(tmp / "ro" / "st")], "not writable (Permission denied)"
    if case == "state on a read-only file system":
        return [str(data), "--state-dir", "/proc/kbfs-state"], "state folder /proc/kbfs-state: not writable"
    if case == "default state not writable":
        (tmp / "ro-home").mkdir(mode=0o500)
        return [str(data)], "(the default; choose one with --state-dir): not writable"
    raise AssertionError(case)


CASES = ["folder missing", "folder is a file", "folder unreadable", "state is a file", "state under a file",
         "state not writable", "state parent not writable", "state on a read-only file system",
         "default state not writable"]


@pytest.mark.parametrize("case", CASES)
def test_share_refuses_an_unusable_folder_in_one_line(tmp_path: Path, case: str) -> None:
    tmp = tmp_path / "t"
    tmp.mkdir()
    os.chmod(tmp_path, 0o755)
    args, says = _hostile(tmp, case)
    env = _env(tmp_path, XDG_STATE_HOME=str(tmp / "ro-home" / "state"))
    got = _kbfs("share", *args, "--listen", "127.0.0.1:0", env=env, prefix=_no_dac(), timeout=30)
    lines = got.stderr.strip().splitlines()
    assert got.returncode != 0 and len(lines) == 1, (got.returncode, got.stdout, got.stderr)
    assert lines[0].startswith("kbfs: error: ") and says in lines[0], lines[0]
    assert "Traceback" not in got.stderr and "kbfs share id" not in got.stdout  # nothing started


def test_share_starts_with_a_usable_folder_and_new_state(tmp_path: Path) -> None:
    # The checks pass what they should: a fresh state folder is made (0700) and the share runs.
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(b"x" * 100)
    relay = start_relay(tmp_path)
    try:
        env = _env(tmp_path)
        proc = subprocess.Popen([*_no_dac(), sys.executable, "-m", "kbfs", "share", str(data), "--relay",
                                 relay.url, "--state-dir", str(tmp_path / "new" / "state")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            assert proc.stdout is not None
            share_id = ""
            for line in proc.stdout:
                if m := re.match(r"kbfs share id ([a-z2-7]+)", line):
                    share_id = m.group(1)
                if "kbfs share link" in line:
                    break
            assert share_id and any(s["id"] == share_id for s in get_json(relay.url + "/api/shares"))
            assert (tmp_path / "new" / "state").stat().st_mode & 0o777 == 0o700
            assert not list((tmp_path / "new" / "state").glob(".kbfs-write-test*"))
        finally:
            proc.terminate()
            proc.wait(20)
    finally:
        relay.stop()
