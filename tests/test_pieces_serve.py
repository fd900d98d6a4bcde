"""Verified 64 KiB pieces served by real `kbfs share` and `kbfs relay` processes (issue 15).

A reader with a v2 pointer (64 KiB tree) asks `GET /sha1/X` with a piece-aligned Range and
`Kbfs-Want-Proof: bs=65536`; through the relay and from the share's --listen server alike,
the answer carries `Kbfs-Proof` and the pieces verify against the root computed here from
the file's bytes (`kbfs.tree` with block size 65536), and no tampered proof byte does.
Plain GETs are what they were; unaligned ranges and other block sizes get no proof; a file
changed under the share gets no proof (nor bytes); an index from before the 64 KiB tree is
rehashed; a share's proof header reaches the reader only rebuilt from its parsed parts.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import trio

from kbfs import piecewire, proof, protocol, prv, tree
from kbfs.errors import VerificationError
from kbfs.share import Refused, Share, ShareOptions
from tests.hostileutil import fake_share, host_port
from tests.netutil import RelayProc, ShareProc, start_relay, start_share

BS = proof.PIECE_SIZE
MiB = 1 << 20
SIZES = {"zero.bin": 0, "one.bin": 1, "piece.bin": BS, "mib1.bin": MiB + 1,
         "five.bin": 5 * MiB + 12345}


def _bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("pieces")
    data = tmp / "data"
    data.mkdir()
    files = {}
    for i, (name, size) in enumerate(SIZES.items()):
        body = _bytes(size, i)
        (data / name).write_bytes(body)
        files[name] = {"data": body, "sha1": hashlib.sha1(body).hexdigest(),
                       "root": tree.tree_of_bytes(body, BS)[1]}  # what a v2 pointer names
    relay = start_relay(tmp)
    share = start_share(data, relay.url, tmp, listen=True)
    try:
        yield {"relay": relay, "share": share, "files": files, "tmp": tmp}
    finally:
        share.stop()
        relay.stop()


def _bases(world: dict[str, Any]) -> list[str]:
    return [world["relay"].url, world["share"].direct_url]


def _get(base: str, sha1: str, start: int | None, end: int | None,
         want: str | None = f"bs={BS}") -> requests.Response:
    headers = {}
    if start is not None and end is not None:
        headers["Range"] = f"bytes={start}-{end - 1}"
    if want is not None:
        headers[protocol.WANT_PROOF_HEADER] = want
    return requests.get(f"{base}/sha1/{sha1}", headers=headers, timeout=30)


def _ranges(n: int, rng: random.Random) -> list[tuple[int, int]]:
    out = {(0, 1), (n - 1, n), (0, n)}
    for _ in range(5):
        a = rng.randrange(n)
        out.add((a, rng.randrange(a + 1, min(n, a + 20) + 1)))
    return sorted(out)


def _assert_tampered_fail(root: str, size: int, a: int, b: int, data: bytes,
                          nodes: bytes) -> None:
    for i in range(len(nodes)):
        bad = bytearray(nodes)
        bad[i] ^= 1 << (i % 8)
        with pytest.raises(VerificationError):
            proof.verify_range(root, size, BS, a, b, data, bytes(bad))
    for cut in (nodes[:-32], nodes + nodes[:32]) if nodes else (b"\0" * 32,):
        with pytest.raises(VerificationError):
            proof.verify_range(root, size, BS, a, b, data, cut)
    if data:
        bad_data = bytearray(data)
        bad_data[len(data) // 2] ^= 0x80
        with pytest.raises(VerificationError):
            proof.verify_range(root, size, BS, a, b, bytes(bad_data), nodes)


@pytest.mark.parametrize("via", ["relay", "direct"])
def test_piece_ranges_carry_proofs_that_verify(world: dict[str, Any], via: str) -> None:
    base = world["relay"].url if via == "relay" else world["share"].direct_url
    rng = random.Random(15)
    for name, f in world["files"].items():
        size = len(f["data"])
        if size == 0:
            continue
        shape = proof.Shape(size, BS)
        for a, b in _ranges(shape.leaves, rng):
            start, end = shape.byte_span(a, b)
            r = _get(base, f["sha1"], start, end)
            assert r.status_code == 206, (name, a, b, r.status_code, r.text[:200])
            assert r.content == f["data"][start:end]
            value = r.headers.get(protocol.PROOF_HEADER)
            assert value is not None, (name, a, b, dict(r.headers))
            assert value.startswith(f"pieces={a}-{b}; bs={BS}; nodes=:")
            nodes = piecewire.parse_proof(value, a, b, BS)  # what readers parse
            assert nodes == protocol.parse_proof_value(value, a, b, BS)
            assert len(nodes) == 32 * len(proof.proof_nodes(shape, a, b))
            proof.verify_range(f["root"], size, BS, a, b, r.content, nodes)
            _assert_tampered_fail(f["root"], size, a, b, r.content, nodes)


@pytest.mark.parametrize("via", ["relay", "direct"])
def test_below_gives_the_shorter_proof(world: dict[str, Any], via: str) -> None:
    base = world["relay"].url if via == "relay" else world["share"].direct_url
    f = world["files"]["five.bin"]
    size = len(f["data"])
    shape = proof.Shape(size, BS)
    first = _get(base, f["sha1"], *shape.byte_span(20, 21))
    known = proof.verify_range_nodes(f["root"], size, BS, 20, 21, first.content,
                                     piecewire.parse_proof(first.headers.get("Kbfs-Proof"),
                                                           20, 21, BS))
    for a, b in [(21, 22), (17, 19), (16, 32), (40, 48), (64, shape.leaves)]:
        anchor = proof.lowest_known(known, shape, a, b)
        assert anchor is not None
        start, end = shape.byte_span(a, b)
        r = _get(base, f["sha1"], start, end, f"bs={BS}; below={anchor[0]}.{anchor[1]}")
        assert r.status_code == 206 and r.content == f["data"][start:end]
        nodes = piecewire.parse_proof(r.headers.get("Kbfs-Proof"), a, b, BS)
        assert len(nodes) == 32 * len(proof.proof_nodes(shape, a, b, anchor))
        assert len(nodes) <= 32 * len(proof.proof_nodes(shape, a, b))
        proof.verify_below(shape, anchor, known[anchor], a, b, r.content, nodes)
        for i in range(len(nodes)):
            bad = bytearray(nodes)
            bad[i] ^= 0x01
            with pytest.raises(VerificationError):
                proof.verify_below(shape, anchor, known[anchor], a, b, r.content, bytes(bad))
    # An anchor that does not cover the range (or is not in the tree): the full proof.
    for below in ("0.3", "4.0", "60.7"):
        start, end = shape.byte_span(70, 72)
        r = _get(base, f["sha1"], start, end, f"bs={BS}; below={below}")
        nodes = piecewire.parse_proof(r.headers.get("Kbfs-Proof"), 70, 72, BS)
        proof.verify_range(f["root"], size, BS, 70, 72, r.content, nodes)


def test_no_proof_for_unaligned_ranges_other_block_sizes_or_bad_asks(
        world: dict[str, Any]) -> None:
    f = world["files"]["five.bin"]
    data, size = f["data"], len(f["data"])
    asks = [
        ((1, BS + 1), f"bs={BS}"),            # not starting on a piece
        ((0, BS - 1), f"bs={BS}"),            # not ending on one
        ((BS, 2 * BS + 7), f"bs={BS}"),
        ((0, MiB), f"bs={MiB}"),              # the 1 MiB tree: not proven this round
        ((0, 4096), "bs=4096"),
        ((0, BS), "bs=banana"),               # malformed: the plain answer
        ((0, BS), f"bs={BS}; below=x.y"),
        ((0, BS), f"bs={BS}; bs={BS}"),
        ((0, BS), "below=1.0"),
    ]
    for base in _bases(world):
        for (start, end), want in asks:
            r = _get(base, f["sha1"], start, end, want)
            assert r.status_code == 206 and r.content == data[start:end], (base, want)
            assert protocol.PROOF_HEADER not in r.headers, (base, start, end, want)
        # No Range (a 200 of the whole file) and a multi-range: no proof either.
        r = _get(base, f["sha1"], None, None)
        assert r.status_code == 200 and r.content == data
        assert protocol.PROOF_HEADER not in r.headers
        r = requests.get(f"{base}/sha1/{f['sha1']}", timeout=30, headers={
            "Range": f"bytes=0-{BS - 1},{BS}-{2 * BS - 1}", "Kbfs-Want-Proof": f"bs={BS}"})
        assert r.status_code == 200 and protocol.PROOF_HEADER not in r.headers
        # An open-ended range to the end is aligned when it starts on a piece.
        r = _get(base, f["sha1"], None, None)
        r = requests.get(f"{base}/sha1/{f['sha1']}", timeout=30, headers={
            "Range": f"bytes={80 * BS}-", "Kbfs-Want-Proof": f"bs={BS}"})
        n = proof.Shape(size, BS).leaves
        nodes = piecewire.parse_proof(r.headers.get("Kbfs-Proof"), 80, n, BS)
        proof.verify_range(f["root"], size, BS, 80, n, r.content, nodes)


def test_empty_and_tiny_files(world: dict[str, Any]) -> None:
    zero = world["files"]["zero.bin"]
    proof.verify_range(zero["root"], 0, BS, 0, 1, b"", b"")  # no bytes, no nodes: the root
    for base in _bases(world):
        r = _get(base, zero["sha1"], None, None)
        assert r.status_code == 200 and r.content == b""
        assert protocol.PROOF_HEADER not in r.headers
        r = requests.get(f"{base}/sha1/{zero['sha1']}", timeout=30,
                         headers={"Range": "bytes=0-0", "Kbfs-Want-Proof": f"bs={BS}"})
        assert r.status_code == 416
        one = world["files"]["one.bin"]
        r = _get(base, one["sha1"], 0, 1)
        assert r.headers["Kbfs-Proof"] == f"pieces=0-1; bs={BS}; nodes=::"
        proof.verify_range(one["root"], 1, BS, 0, 1, r.content, b"")


def _head_names(r: requests.Response) -> list[str]:
    return sorted(k.lower() for k in r.headers if k.lower() not in ("date", "server"))


def test_plain_gets_are_unchanged(world: dict[str, Any]) -> None:
    """curl, browsers and caches: the same headers as before this change, no Kbfs-Proof."""
    f = world["files"]["five.bin"]
    expect_206 = sorted(["content-type", "accept-ranges", "etag", "cache-control",
                         "content-range", "content-length", "access-control-allow-origin",
                         "access-control-allow-methods", "access-control-allow-headers",
                         "access-control-expose-headers", "access-control-max-age"])
    # The relay's content answers also say nosniff and a sandbox CSP (shared bytes never
    # render as a page of the relay's origin: issue 18); a share's own answers do not.
    relay_extra = ["content-security-policy", "x-content-type-options"]
    for base in _bases(world):
        r = _get(base, f["sha1"], 3 * BS, 5 * BS, want=None)
        assert r.status_code == 206 and r.content == f["data"][3 * BS:5 * BS]
        extra = relay_extra if base == world["relay"].url else []
        assert _head_names(r) == sorted(expect_206 + extra), base
        r = _get(base, f["sha1"], None, None, want=None)
        assert r.status_code == 200 and r.content == f["data"]
        assert "kbfs-proof" not in _head_names(r)
        assert r.headers["Access-Control-Expose-Headers"].endswith("Kbfs-Proof")
        r = requests.options(f"{base}/sha1/{f['sha1']}", timeout=10, headers={
            "Origin": "https://example.org", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "range, kbfs-want-proof"})
        assert r.status_code == 204
        assert "Kbfs-Want-Proof" in r.headers["Access-Control-Allow-Headers"]
    # /tree/ is unchanged: the 1 MiB leaves.
    r = requests.get(f"{world['relay'].url}/tree/{f['sha1']}", timeout=30)
    assert r.content == b"".join(tree.tree_of_bytes(f["data"])[0])


def _hide_change(state_dir: Path, data_dir: Path, rel: str) -> None:
    """Make the index's row of REL match the file's stat again after its bytes changed: a
    change the stat does not show (coarse timestamps, a restored mtime on a filesystem
    without ctime). Only the content checks can catch it then."""
    st = os.stat(data_dir / rel)
    conn = sqlite3.connect(state_dir / "index.sqlite", timeout=30)
    try:
        conn.execute("UPDATE files SET size = ?, mtime_ns = ?, ctime_ns = ?, inode = ? "
                     "WHERE path = ?", (st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                        st.st_ino, rel))
        conn.commit()
    finally:
        conn.close()


def test_changed_file_gets_no_wrong_proof(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    body = _bytes(3 * MiB + 5, 7)
    (data_dir / "c.bin").write_bytes(body)
    (data_dir / "d.bin").write_bytes(body[:2 * MiB])
    sha1 = hashlib.sha1(body).hexdigest()
    sha1_d = hashlib.sha1(body[:2 * MiB]).hexdigest()
    with start_relay(tmp_path) as relay, start_share(data_dir, relay.url, tmp_path,
                                                     listen=True) as share:
        for base in (relay.url, share.direct_url):
            assert _get(base, sha1, BS, 2 * BS).headers.get("Kbfs-Proof")
        # A visible change (ctime moves): refused as any read is (409 -> 404 for readers).
        with open(data_dir / "c.bin", "r+b") as fh:
            fh.seek(MiB + 10)
            fh.write(b"\xff")
        for base in (relay.url, share.direct_url):
            r = _get(base, sha1, MiB, MiB + BS)
            assert r.status_code == 404 and "Kbfs-Proof" not in r.headers, (base, r.status_code)
        # A change the stat does not show, in the group of the range's edge: the group is
        # read for the proof, does not match its stored node: no proof, no bytes.
        with open(data_dir / "d.bin", "r+b") as fh:
            fh.seek(MiB + 3 * BS)
            fh.write(b"\x00" if body[MiB + 3 * BS] else b"\x01")
        _hide_change(share.state_dir, data_dir, "d.bin")
        for base in (relay.url, share.direct_url):
            r = _get(base, sha1_d, MiB + 7 * BS, MiB + 8 * BS)
            assert r.status_code == 404 and "Kbfs-Proof" not in r.headers, (base, r.status_code)


def test_proof_checks_the_group_it_reads(tmp_path: Path) -> None:
    """`Share.piece_proof` on its own (no data read beside it): a group that changed under
    an unchanged stat is refused (409), never turned into a proof."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    body = _bytes(2 * MiB, 8)
    (data_dir / "e.bin").write_bytes(body)
    share = Share(ShareOptions(str(data_dir), state_dir=str(tmp_path / "state")))
    try:
        share.index.scan()
        f = share.index.lookup_path("e.bin")
        assert f is not None
        want = protocol.WantProof(BS)
        real = str(data_dir / "e.bin")
        value = share.piece_proof(f, real, want, MiB + BS, MiB + 2 * BS)
        assert value is not None
        root = tree.tree_of_bytes(body, BS)[1]
        nodes = piecewire.parse_proof(value, 17, 18, BS)
        proof.verify_range(root, len(body), BS, 17, 18, body[MiB + BS:MiB + 2 * BS], nodes)
        assert share.piece_proof(f, real, protocol.WantProof(MiB), 0, MiB) is None
        with open(real, "r+b") as fh:
            fh.seek(MiB + 9 * BS)
            fh.write(bytes([body[MiB + 9 * BS] ^ 1]))
        _hide_change(tmp_path / "state", data_dir, "e.bin")
        f = share.index.lookup_path("e.bin")
        assert f is not None
        with pytest.raises(Refused) as caught:
            share.piece_proof(f, real, want, MiB + BS, MiB + 2 * BS)
        assert caught.value.status == 409
        # A range whose proof needs no node of the changed group still gets its proof.
        assert share.piece_proof(f, real, want, 0, BS) is not None
    finally:
        share.index.close()


_OLD_SCHEMA = """
CREATE TABLE files (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, sha1 TEXT NOT NULL, fcs TEXT NOT NULL,
    root TEXT NOT NULL, leaves BLOB NOT NULL
);
CREATE INDEX files_sha1 ON files (sha1);
"""


def test_index_from_before_is_rescanned_then_proves(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    body = _bytes(2 * MiB + 3, 9)
    (data_dir / "old.bin").write_bytes(body)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    st = os.stat(data_dir / "old.bin")
    d = prv.digest_file(data_dir / "old.bin", block_size=MiB, keep_leaves=True)  # the v1 row
    assert d.leaves is not None
    conn = sqlite3.connect(state / "index.sqlite")
    conn.executescript(_OLD_SCHEMA)
    conn.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 ("old.bin", st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, d.sha1,
                  d.fcs, d.root, b"".join(d.leaves)))
    conn.commit()
    conn.close()
    with start_relay(tmp_path) as relay, start_share(data_dir, relay.url, tmp_path,
                                                     listen=True, state_dir=state) as share:
        r = _get(share.direct_url, d.sha1, MiB, MiB + BS)
        nodes = piecewire.parse_proof(r.headers.get("Kbfs-Proof"), 16, 17, BS)
        proof.verify_range(tree.tree_of_bytes(body, BS)[1], len(body), BS, 16, 17, r.content,
                           nodes)
        lines = [line for line in share.proc.stderr().splitlines() if "older kbfs" in line]
        assert len(lines) == 1, share.proc.stderr()[-2000:]
        assert "hashed again" in lines[0]
        assert "Traceback" not in share.proc.stderr()


def _serve_upload(relay_url: str, msg: dict[str, Any], secret: str, body: bytes,
                  proof_header: str) -> None:
    req = (f"POST /_upload/{msg['id']} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
           f"{protocol.UPLOAD_SECRET_HEADER}: {secret}\r\n"
           f"Kbfs-Proof: {proof_header}\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body
    sock = socket.create_connection(host_port(relay_url), timeout=10)
    try:
        sock.sendall(req)
        sock.recv(4096)
    finally:
        sock.close()


def test_relay_passes_only_well_formed_proofs(world: dict[str, Any]) -> None:
    """The relay forwards the reader's ask in canonical form and rebuilds a share's
    Kbfs-Proof from its parsed parts: extra parameters are dropped, and a value for other
    pieces, another block size, broken base64, partial hashes or over 8 KiB never reaches
    the reader (who then gets the bytes without a proof)."""
    relay_url = world["relay"].url
    body = os.urandom(3 * BS)
    sha1 = hashlib.sha1(body).hexdigest()
    entry = ["h.bin", sha1, len(body), 0, "", "0" * 64]
    good = "A" * 43 + "="  # one 32-byte node
    cases = [
        (f"pieces=1-2; bs={BS}; nodes=:{good}:; x=<script>", f"pieces=1-2; bs={BS}; nodes=:{good}:"),
        (f"bs={BS};nodes=:{good}:;pieces=1-2", f"pieces=1-2; bs={BS}; nodes=:{good}:"),
        (f"pieces=0-1; bs={BS}; nodes=:{good}:", None),
        (f"pieces=1-2; bs={MiB}; nodes=:{good}:", None),
        (f"pieces=1-2; bs={BS}; nodes=:{good[:-2]}:", None),
        (f"pieces=1-2; bs={BS}; nodes=:AAAA:", None),
        (f"pieces=1-2; bs={BS}; nodes={good}", None),
        (f"pieces=1-2; bs={BS}; nodes=:{good}:; pad=" + "x" * 8200, None),
        ("pieces=1-2; pieces=1-2; bs=65536; nodes=::", None),
    ]

    async def main() -> None:
        async with fake_share(relay_url, [entry]) as fs:
            for sent, expect in cases:
                got: list[Any] = []

                async def reader(got: list[Any] = got) -> None:
                    def go() -> Any:
                        return requests.get(f"{relay_url}/sha1/{sha1}", timeout=20, headers={
                            "Range": f"bytes={BS}-{2 * BS - 1}",
                            "Kbfs-Want-Proof": f"bs={BS} ;below=2.0;future=1"})
                    got.append(await trio.to_thread.run_sync(go))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reader)
                    msg = await fs.next_get()
                    assert msg["want_proof"] == f"bs={BS}; below=2.0", msg
                    await trio.to_thread.run_sync(_serve_upload, relay_url, msg, fs.secret,
                                                  body[BS:2 * BS], sent)
                r = got[0]
                assert r.status_code == 206 and r.content == body[BS:2 * BS]
                assert r.headers.get("Kbfs-Proof") == expect, (sent[:80], r.headers)
            # Not asked: a share's header is not passed on at all.
            got = []

            async def plain() -> None:
                got.append(await trio.to_thread.run_sync(lambda: requests.get(
                    f"{relay_url}/sha1/{sha1}", timeout=20,
                    headers={"Range": f"bytes={BS}-{2 * BS - 1}"})))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(plain)
                msg = await fs.next_get()
                assert "want_proof" not in msg
                await trio.to_thread.run_sync(_serve_upload, relay_url, msg, fs.secret,
                                              body[BS:2 * BS], cases[0][0])
            assert "Kbfs-Proof" not in got[0].headers

    trio.run(main)
    time.sleep(0.1)


def test_share_health_counts_proofs(world: dict[str, Any]) -> None:
    share: ShareProc = world["share"]
    relay: RelayProc = world["relay"]
    before = requests.get(share.direct_url + "/api/health", timeout=5).json()["proofs"]
    f = world["files"]["mib1.bin"]
    _get(relay.url, f["sha1"], MiB, MiB + 1)
    _get(share.direct_url, f["sha1"], 0, BS)
    assert requests.get(share.direct_url + "/api/health", timeout=5).json()["proofs"] == before + 2
