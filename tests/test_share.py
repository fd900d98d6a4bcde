"""Shares and relays as real processes under attack and failure.

Identity (signed admission, impersonation, --allow-shares), forged and replayed upload
ids, private shares and their tokens, relay restarts, a share killed mid-transfer,
16 concurrent clients, a stalled client next to a fast one, a file modified after it was
indexed, clean stops and one-line errors. Plus unit tests of tokens, keys and the
verified reader.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import netutil
import pytest
import requests
import trio
import trio_websocket
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kbfs import protocol, prv, share, tree
from kbfs.index import IndexedFile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def relay(tmp_path: Path) -> Any:
    proc = netutil.start_relay(tmp_path / "logs")
    yield proc
    proc.stop()


def _data(tmp_path: Path, size: int = 2 * (1 << 20) + 7) -> tuple[Path, bytes]:
    data = tmp_path / "data"
    data.mkdir()
    body = os.urandom(size)
    (data / "f.bin").write_bytes(body)
    return data, body


def _sha1(body: bytes) -> str:
    import hashlib

    return hashlib.sha1(body).hexdigest()


# ---------------------------------------------------------------- units


def test_share_id_and_key_file(tmp_path: Path) -> None:
    key = share.load_key(str(tmp_path / "st"))
    sid = share.share_id_of(key)
    assert protocol.SHARE_ID_RE.match(sid) and len(sid) == 32
    mode = stat.S_IMODE(os.stat(tmp_path / "st" / share.KEY_FILE).st_mode)
    assert mode == 0o600
    assert share.share_id_of(share.load_key(str(tmp_path / "st"))) == sid  # stable


def test_tokens(tmp_path: Path) -> None:
    st = str(tmp_path / "st")
    tok = share.issue_token(st, "a" * 32)
    secret = share._token_secret(st)
    assert share.check_token(secret, "a" * 32, f"Bearer {tok}")
    assert not share.check_token(secret, "b" * 32, f"Bearer {tok}")  # another share's
    assert not share.check_token(secret, "a" * 32, tok)  # no scheme
    assert not share.check_token(secret, "a" * 32, f"Bearer {tok[:-2]}xx")  # forged mac
    assert not share.check_token(secret, "a" * 32, None)
    assert not share.check_token(b"x" * 32, "a" * 32, f"Bearer {tok}")  # another secret
    expired = share.issue_token(st, "a" * 32, expires_in=-10)
    assert not share.check_token(secret, "a" * 32, f"Bearer {expired}")


def test_verified_reader_refuses_a_block_that_no_longer_matches(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    body = os.urandom(tree.BLOCK_SIZE + 100)
    path.write_bytes(body)
    st = os.stat(path)
    leaves, root = tree.tree_of_bytes(body)
    f = IndexedFile("x.bin", st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                    _sha1(body), "", root)
    reader = share._VerifiedReader(str(path), f, b"".join(leaves), 0, len(body))
    assert b"".join(bytes(c) for c in reader) == body
    reader.close()
    bad = b"".join(leaves[:1]) + b"\0" * 32  # second block's leaf wrong
    reader = share._VerifiedReader(str(path), f, bad, 0, len(body))
    with pytest.raises(share.Refused):
        list(reader)
    reader.close()
    with pytest.raises(share.Refused):
        share._VerifiedReader(str(path), f, b"\0" * 64, 0, 10)  # first block checked at once


# ---------------------------------------------------------------- a fake share


async def _fake_share(relay_url: str, key: Ed25519PrivateKey, *, claim_key: bytes | None = None,
                      host: str | None = None, claim_id: str | None = None,
                      files: list[list[Any]] | None = None,
                      on_get: Any = None) -> dict[str, Any]:
    """Connect like a share; return the relay's answer to the hello (and serve gets)."""
    pub = share.public_key_bytes(key)
    async with trio_websocket.open_websocket_url(protocol.websocket_url(relay_url)) as ws:
        challenge = base64.b64decode(json.loads(await ws.get_message())["challenge"])
        h = host or protocol.websocket_host_header(relay_url)
        sig = key.sign(protocol.handshake_payload(challenge, h, pub))
        shown = claim_key or pub
        await ws.send_message(json.dumps({
            "type": "hello", "public_key": base64.b64encode(shown).decode(),
            "signature": base64.b64encode(sig).decode(), "host": h,
            "id": claim_id or protocol.share_id_from_public_key(shown), "name": "fake"}))
        answer = json.loads(await ws.get_message())
        if answer["type"] != "welcome" or files is None:
            return answer
        await ws.send_message(json.dumps({"type": "files", "reset": True, "add": files,
                                          "scanning": False}))
        if on_get is not None:
            with trio.fail_after(20):
                while True:
                    msg = json.loads(await ws.get_message())
                    if msg["type"] == "get":
                        await on_get(msg, answer)
                        return answer
        return answer


def test_impersonation_is_refused(relay: Any, tmp_path: Path) -> None:
    victim = Ed25519PrivateKey.generate()
    victim_pub = share.public_key_bytes(victim)
    attacker = Ed25519PrivateKey.generate()

    async def main() -> None:
        # claims the victim's key but can only sign with its own
        a = await _fake_share(relay.url, attacker, claim_key=victim_pub)
        assert a["type"] == "refused" and "signature" in a["message"]
        # a signature made for another relay host
        b = await _fake_share(relay.url, attacker, host="evil.example:80")
        assert b["type"] == "refused"
        # claims an id that is not its key's
        c = await _fake_share(relay.url, attacker,
                              claim_id=protocol.share_id_from_public_key(victim_pub))
        assert c["type"] == "refused"
        ok = await _fake_share(relay.url, attacker)
        assert ok["type"] == "welcome"
        assert ok["id"] == share.share_id_of(attacker)

    trio.run(main)


def test_forged_and_replayed_upload_ids(relay: Any) -> None:
    key = Ed25519PrivateKey.generate()
    body = b"z" * 5000
    sha = _sha1(body)
    entry = [["z.bin", sha, len(body), 1.0, "head1000-" + "0" * 40, "0" * 64]]
    results: dict[str, Any] = {}

    async def on_get(msg: dict[str, Any], welcome: dict[str, Any]) -> None:
        url = relay.url + protocol.UPLOAD_PATH.format(token=msg["id"])
        hdr = protocol.UPLOAD_SECRET_HEADER

        def posts() -> None:
            s = requests.Session()
            results["no_secret"] = s.post(url, data=body, timeout=10).status_code
            results["wrong_secret"] = s.post(url, data=body, headers={hdr: "nope"},
                                             timeout=10).status_code
            results["guessed_id"] = s.post(relay.url + "/_upload/guess", data=body,
                                           headers={hdr: welcome["upload_secret"]},
                                           timeout=10).status_code
            results["ok"] = s.post(url, data=body, headers={hdr: welcome["upload_secret"]},
                                   timeout=10).status_code
            results["replay"] = s.post(url, data=body, headers={hdr: welcome["upload_secret"]},
                                       timeout=10).status_code

        await trio.to_thread.run_sync(posts)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _fake_share(relay.url, key, files=entry, on_get=on_get))
            for _ in range(100):
                if any(s["id"] == share.share_id_of(key) and s["files"] == 1
                       for s in relay.shares()):
                    break
                await trio.sleep(0.05)
            r = await trio.to_thread.run_sync(
                lambda: requests.get(f"{relay.url}/sha1/{sha}", timeout=20))
            results["client"] = (r.status_code, r.content)

    trio.run(main)
    assert results["no_secret"] == 403 and results["wrong_secret"] == 403
    assert results["guessed_id"] == 404
    assert results["ok"] == 204 and results["replay"] == 404
    assert results["client"] == (200, body)


def test_allow_shares(tmp_path: Path) -> None:
    allowed_state = tmp_path / "allowed-state"
    allowed_id = share.share_id_of(share.load_key(str(allowed_state)))
    allow = tmp_path / "allow.txt"
    allow.write_text(f"# readers' shares\n{allowed_id}\n")
    data, _ = _data(tmp_path, 1000)
    with netutil.start_relay(tmp_path / "logs", "--allow-shares", str(allow)) as relay:
        with netutil.start_share(data, relay.url, tmp_path, state_dir=allowed_state):
            assert [s["id"] for s in relay.shares()] == [allowed_id]
        other = netutil.start_share(data, relay.url, tmp_path, wait=False)
        try:
            other.proc.wait_line(r"refused by .*allow-shares", timeout=15)
            assert relay.shares() == []
        finally:
            other.stop()
    bad = tmp_path / "bad.txt"
    bad.write_text("not an id!\n")
    result = netutil.run_kbfs("relay", "--port", "0", "--allow-shares", str(bad))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "not a share id" in result.stderr


# ---------------------------------------------------------------- private shares


def test_private_share_needs_a_token(relay: Any, tmp_path: Path) -> None:
    data, body = _data(tmp_path, 300_000)
    state = tmp_path / "pstate"
    with netutil.start_share(data, relay.url, tmp_path, "--private", listen=True,
                             state_dir=state) as sh:
        tok = netutil.run_kbfs("share", "token", str(data), "--state-dir", str(state))
        assert tok.returncode == 0, tok.stderr
        token = tok.stdout.strip()
        good = {"Authorization": f"Bearer {token}"}
        bad = {"Authorization": "Bearer kbfs1.e30.AAAA"}
        sha = _sha1(body)
        url = f"{relay.url}/sha1/{sha}"
        # Content only a private share holds is, without its token, content nobody holds.
        forged = {"Authorization": "Bearer " + token.rpartition(".")[0] + ".AAAA"}
        assert requests.get(url, timeout=10).status_code == 404
        assert requests.get(url, headers=bad, timeout=10).status_code == 404
        assert requests.get(url, headers=forged, timeout=10).status_code == 404
        r = requests.get(url, headers={**good, "Range": "bytes=5-9"}, timeout=10)
        assert r.status_code == 206 and r.content == body[5:10]
        lst = f"{relay.url}/s/{sh.id}/list/"
        assert requests.get(lst, timeout=10).status_code == 401
        assert requests.get(lst, headers=bad, timeout=10).status_code == 401
        assert requests.get(lst, headers=forged, timeout=10).status_code == 401
        assert requests.get(lst, headers=good, timeout=10).json()["files"][0]["name"] == "f.bin"
        assert requests.get(f"{relay.url}/s/{sh.id}/file/f.bin", timeout=10).status_code == 401
        assert not requests.get(f"{relay.url}/api/find/{sha}", timeout=10).json()["found"]
        assert requests.get(f"{relay.url}/api/find/{sha}", headers=good,
                            timeout=10).json()["found"]
        direct = f"{sh.direct_url}/sha1/{sha}"
        assert requests.get(direct, timeout=10).status_code == 401
        assert requests.get(direct, headers=good, timeout=10).content == body


# ---------------------------------------------------------------- failures


def test_relay_restart_share_comes_back(tmp_path: Path) -> None:
    port = _free_port()
    data, body = _data(tmp_path, 100_000)
    relay = netutil.start_relay(tmp_path / "logs", port=port)
    sh = None
    try:
        sh = netutil.start_share(data, relay.url, tmp_path)
        relay.kill()
        time.sleep(0.5)
        relay = netutil.start_relay(tmp_path / "logs", port=port)
        t0 = time.monotonic()
        netutil.wait_share_ready(relay.url, sh.id, timeout=15)
        assert time.monotonic() - t0 < 10
        r = requests.get(f"{relay.url}/sha1/{_sha1(body)}", timeout=10)
        assert r.content == body
    finally:
        if sh is not None:
            sh.stop()
        relay.stop()


def test_share_killed_mid_transfer(relay: Any, tmp_path: Path) -> None:
    data, body = _data(tmp_path, 64 << 20)
    sh = netutil.start_share(data, relay.url, tmp_path)
    try:
        r = requests.get(f"{relay.url}/sha1/{_sha1(body)}", stream=True, timeout=10)
        assert r.status_code == 200
        it = r.iter_content(1 << 20)
        got = len(next(it))  # the transfer is under way (and stalled by us)
        sh.kill()
        t0 = time.monotonic()
        with pytest.raises(requests.exceptions.RequestException):
            for chunk in it:
                got += len(chunk)
        assert time.monotonic() - t0 < 5
        assert got < len(body)
    finally:
        sh.stop()
    # the relay forgot the share and answers at once
    t0 = time.monotonic()
    while relay.shares() and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    assert requests.get(f"{relay.url}/sha1/{_sha1(body)}", timeout=5).status_code == 404


def test_concurrent_clients_and_a_stalled_one(relay: Any, tmp_path: Path) -> None:
    data, body = _data(tmp_path, 24 << 20)
    sha = _sha1(body)
    with netutil.start_share(data, relay.url, tmp_path):
        url = f"{relay.url}/sha1/{sha}"
        stalled = requests.get(url, stream=True, timeout=30)  # reads nothing
        try:
            errors: list[str] = []

            def client(i: int) -> None:
                try:
                    if i % 2:
                        start = i * 1_000_003
                        r = requests.get(url, headers={"Range": f"bytes={start}-{start + 2_500_000}"},
                                         timeout=30)
                        ok = r.status_code == 206 and r.content == body[start:start + 2_500_001]
                    else:
                        r = requests.get(url, timeout=30)
                        ok = r.status_code == 200 and r.content == body
                    if not ok:
                        errors.append(f"client {i}: {r.status_code}")
                except requests.RequestException as exc:
                    errors.append(f"client {i}: {exc}")

            t0 = time.monotonic()
            threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors
            assert time.monotonic() - t0 < 30
            # the stalled client is still there, and still gets its bytes when it reads
            first = next(stalled.iter_content(1 << 20))
            assert body.startswith(first)
        finally:
            stalled.close()


def test_file_modified_after_indexing_is_not_served(relay: Any, tmp_path: Path) -> None:
    data, body = _data(tmp_path, 3 << 20)
    old = _sha1(body)
    with netutil.start_share(data, relay.url, tmp_path, "--rescan-interval", "600") as sh:
        assert requests.get(f"{relay.url}/sha1/{old}", headers={"Range": "bytes=0-9"},
                            timeout=10).status_code == 206
        new_body = bytearray(body)
        new_body[2 << 20] ^= 0xFF  # same size, one byte changed in the third block
        st = os.stat(data / "f.bin")
        with open(data / "f.bin", "r+b") as f:
            f.seek(2 << 20)
            f.write(bytes(new_body[2 << 20:(2 << 20) + 1]))
        os.utime(data / "f.bin", ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime too
        for headers in ({}, {"Range": "bytes=0-9"}):
            r = requests.get(f"{relay.url}/sha1/{old}", headers=headers, timeout=10)
            assert r.status_code == 404, r.status_code
        r = requests.get(f"{relay.url}/s/{sh.id}/file/f.bin", timeout=10)
        assert r.status_code in (200, 404)
        if r.status_code == 200:  # already rescanned: then it is the new content
            assert r.content == bytes(new_body) and r.headers["ETag"] != f'"{old}"'
        direct_check = prv.digest_file(data / "f.bin").sha1
        # the refusal started a rescan: the new content appears under its own sha1
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            r = requests.get(f"{relay.url}/sha1/{direct_check}", timeout=10)
            if r.status_code == 200:
                break
            time.sleep(0.1)
        assert r.status_code == 200 and r.content == bytes(new_body)
        assert requests.get(f"{relay.url}/sha1/{old}", timeout=10).status_code == 404


def test_clean_stop_and_one_line_errors(tmp_path: Path) -> None:
    relay = netutil.start_relay(tmp_path)
    data, _ = _data(tmp_path, 10)
    sh = netutil.start_share(data, relay.url, tmp_path)
    assert sh.stop() == 0
    assert relay.stop() == 0
    for args in (["share", str(tmp_path / "missing"), "--relay", relay.url],
                 ["share", str(data)],
                 ["share", str(data), "--relay", relay.url, "--listen", "nonsense"],
                 ["share", str(data), "--relay", "ftp://x", "--state-dir", str(tmp_path / "s")],
                 ["share", "token", str(tmp_path / "missing")]):
        result = netutil.run_kbfs(*args)
        assert result.returncode != 0, args
        assert "Traceback" not in result.stderr, args
        errors = [line for line in result.stderr.splitlines() if "rror" in line]
        assert len(errors) == 1, (args, result.stderr)  # one line says what is wrong


def _answer_of(raw: bytes) -> tuple[int, str, bool]:
    """What the share's upload client makes of the relay answer RAW (sent in two pieces)."""
    a, b = socket.socketpair()
    try:
        a.sendall(raw[:7])
        threading.Timer(0.05, lambda: (a.sendall(raw[7:]), a.shutdown(socket.SHUT_WR))).start()
        b.settimeout(5)
        return share._read_answer(b)
    finally:
        time.sleep(0.1)
        a.close()
        b.close()


def test_upload_answer_parser() -> None:
    """The hand parser of the relay's answers to uploads: status, body, keep-alive."""
    assert _answer_of(b"HTTP/1.1 204 \r\naccess-control-allow-origin: *\r\n\r\n") == (204, "", True)
    body = b'{"error":"client went away"}'
    raw = (b"HTTP/1.1 410 \r\ncontent-type: application/json\r\ncontent-length: "
           + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert _answer_of(raw) == (410, body.decode(), True)
    assert _answer_of(b"HTTP/1.1 204 \r\nConnection: close\r\n\r\n")[2] is False
    assert _answer_of(b"HTTP/1.0 204 \r\n\r\n")[2] is False
    # no length on an answer with a body: read what is there, never reuse the connection
    assert _answer_of(b"HTTP/1.1 200 \r\n\r\n")[2] is False
    with pytest.raises(share.http.client.HTTPException):
        _answer_of(b"garbage\r\n\r\n")
    with pytest.raises(share.http.client.HTTPException):
        _answer_of(b"HTTP/1.1 204 \r\ncontent-length: x\r\n\r\n")
    with pytest.raises(share.http.client.HTTPException):  # closed before the whole body
        _answer_of(b"HTTP/1.1 400 \r\ncontent-length: 10\r\n\r\nshort")
    with pytest.raises(share.http.client.HTTPException):  # closed before any answer
        _answer_of(b"")
