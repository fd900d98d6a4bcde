"""Fetcher.fetch_pieces: verified pieces in one request, against real HTTP servers.

The sources are tests/httpsource.py servers on 127.0.0.1 that make Kbfs-Proof headers
from the content's own bytes (kbfs.proof), honestly or lying in each way a source can
(`PROOF_MODES`), so these tests do not depend on the share side. The last test reads
pieces through a real relay and share (tests/netutil.py) once the share serves proofs.
"""

from __future__ import annotations

import base64
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kbfs import fetch, piecewire, proof, tree
from kbfs.errors import BadRequest, NotFound, SourceError, VerificationError
from kbfs.fetch import Fetcher

try:
    from tests.httpsource import HTTPSource
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from httpsource import HTTPSource  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(120)

BS = 4096  # the smallest block size a pointer may name: deep trees from small files


@pytest.fixture(autouse=True)
def short_penalty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "PENALTY", 0.5)


@pytest.fixture
def src():
    with HTTPSource() as s:
        s.proofs = "ok"
        yield s


@pytest.fixture
def src2():
    with HTTPSource() as s:
        s.proofs = "ok"
        yield s


def _slice(data: bytes, bs: int, a: int, b: int) -> bytes:
    return data[a * bs:b * bs]


def test_one_request_true_bytes_and_the_wire(src: HTTPSource) -> None:
    """The request is one GET with the piece-aligned Range (the last piece short) and
    Kbfs-Want-Proof: bs=N; the answer's proof and bytes verify; the bytes are returned."""
    data = os.urandom(37 * BS + 100)
    info = src.add(data, block_size=BS)
    n = tree.block_count(len(data), BS)
    with Fetcher([src.url]) as f:
        for a, b in [(0, 1), (3, 9), (n - 1, n), (0, n), (n - 3, n), (16, 17)]:
            src.reset_counts()
            got = f.fetch_pieces(info.sha1, info.size, info.root, BS, a, b - a)
            assert got == _slice(data, BS, a, b)
            end = min(b * BS, len(data))
            assert src.ranges() == [(f"/sha1/{info.sha1}", f"bytes={a * BS}-{end - 1}")]
            assert src.proof_log()[0][:2] == ((a, b), None)
        stats = f.statistics()["sources"][src.url]
        assert stats["proofs"] == 6 and stats["lies"] == 0 and stats["proof_bytes"] > 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.data())
def test_hypothesis_sizes_and_ranges(src: HTTPSource, data: st.DataObject) -> None:
    """Any size, block size and piece range: the true bytes, with or without `known`."""
    bs = data.draw(st.sampled_from([4096, 8192, 65536]), "bs")
    size = data.draw(st.integers(0, 70 * 4096), "size")
    content = random.Random(size * 7 + bs).randbytes(size)
    info = src.add(content, block_size=bs)
    n = tree.block_count(size, bs)
    a = data.draw(st.integers(0, n - 1), "a")
    b = data.draw(st.integers(a + 1, n), "b")
    known: dict[proof.Node, bytes] | None = data.draw(st.sampled_from([None, {}]), "known")
    with Fetcher([src.url]) as f:
        assert f.fetch_pieces(info.sha1, size, info.root, bs, a, b - a, known=known) == _slice(content, bs, a, b)
        if known is not None:  # and again, now with an anchor
            c = data.draw(st.integers(0, n - 1), "c")
            d = data.draw(st.integers(c + 1, n), "d")
            assert f.fetch_pieces(info.sha1, size, info.root, bs, c, d - c, known=known) == _slice(content, bs, c, d)
            assert all(level >= piecewire.KNOWN_LEVEL for level, _ in known)


LIES = ["wrong", "other", "label", "bs", "short", "garbage", "huge", "colossal", "flip", "no_range"]


@pytest.mark.parametrize("lie", LIES)
def test_every_lie_rejected_and_the_next_source_used(src: HTTPSource, src2: HTTPSource, lie: str) -> None:
    """A source whose proof, label, block size, length, encoding, header size or bytes are
    wrong never gets its bytes returned: the next source serves, and the liar goes last."""
    data = os.urandom(40 * BS + 5)
    liar, honest = src, src2
    info = liar.add(data, block_size=BS)
    honest.add(data, block_size=BS)
    if lie == "flip":
        liar.mode = "lie"   # bytes flipped, the honest proof of the true bytes
    elif lie == "no_range":
        liar.mode = "no_range"  # a 200 with the whole file for a range
    else:
        liar.proofs = lie
    with Fetcher([liar.url, honest.url]) as f:
        got = f.fetch_pieces(info.sha1, info.size, info.root, BS, 5, 3)
        assert got == _slice(data, BS, 5, 8)
        # (colossal: http.client refuses the header line. The piece request is the first on
        # its connection, no /api/find before it, so this is not taken for a dropped
        # keep-alive and asked again: one request, as for every other lie.)
        assert liar.counts()["sha1"] == 1
        assert honest.counts()["sha1"] == 1
        stats = f.statistics()["sources"]
        assert stats[honest.url]["proofs"] == 1
        if lie == "colossal":  # more than http.client reads: a failed answer, not a lie
            assert stats[liar.url]["errors"] == 1
        else:
            assert stats[liar.url]["lies"] == 1
            # A liar goes last for LIE_PENALTY: the next read does not ask it first.
            assert f.fetch_pieces(info.sha1, info.size, info.root, BS, 9, 1) == _slice(data, BS, 9, 10)
            assert liar.counts()["sha1"] == 1 and honest.counts()["sha1"] == 2
    # Alone, the liar is refused outright.
    with Fetcher([liar.url], deadline=5) as f:
        with pytest.raises(SourceError if lie == "colossal" else VerificationError):
            f.fetch_pieces(info.sha1, info.size, info.root, BS, 5, 3)


def test_wrong_root_is_a_lie_everywhere(src: HTTPSource) -> None:
    data = os.urandom(10 * BS)
    info = src.add(data, block_size=BS)
    with Fetcher([src.url]) as f, pytest.raises(VerificationError, match="fail verification"):
        f.fetch_pieces(info.sha1, info.size, "ab" * 32, BS, 2, 1)


def test_known_shortens_later_proofs(src: HTTPSource) -> None:
    """The first piece of a file costs the full proof (its height in nodes); the verified
    upper nodes go into KNOWN, and the next piece of the same group asks below=4.j and gets
    at most 4 nodes; a source that ignores below (full proofs) still verifies."""
    data = os.urandom(1024 * BS)  # 1024 pieces: height 10
    info = src.add(data, block_size=BS)
    shape = proof.Shape(len(data), BS)
    known: dict[proof.Node, bytes] = {}
    with Fetcher([src.url]) as f:
        assert f.fetch_pieces(info.sha1, info.size, info.root, BS, 100, 1, known=known) == _slice(data, BS, 100, 101)
        first = src.proof_log()[-1]
        assert first[1] is None and first[2] == 10 * 32
        assert known and min(level for level, _ in known) == piecewire.KNOWN_LEVEL
        assert (shape.height, 0) in known
        for k in (101, 102, 110):  # same group of 16 (pieces 96..111)
            assert f.fetch_pieces(info.sha1, info.size, info.root, BS, k, 1, known=known) == _slice(data, BS, k, k + 1)
            (pieces, below, nbytes) = src.proof_log()[-1]
            assert pieces == (k, k + 1) and below == (4, 6) and nbytes <= 4 * 32
        total = f.statistics()["sources"][src.url]["proof_bytes"]
        assert total <= 10 * 32 + 3 * 4 * 32
        # Another group: the anchor is a higher kept node, still shorter than the full proof.
        f.fetch_pieces(info.sha1, info.size, info.root, BS, 700, 2, known=known)
        assert src.proof_log()[-1][1] is not None and src.proof_log()[-1][2] < 10 * 32
        # A source that ignores below= sends the full proof: told apart by its length.
        src.proofs = "full"
        assert f.fetch_pieces(info.sha1, info.size, info.root, BS, 103, 2, known=known) == _slice(data, BS, 103, 105)
        assert src.proof_log()[-1][2] > 4 * 32
        assert f.statistics()["sources"][src.url]["lies"] == 0


def test_known_is_bounded(src: HTTPSource, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(piecewire, "MAX_KNOWN", 12)
    data = os.urandom(4096 * BS // 4)  # 1024 pieces
    info = src.add(data, block_size=BS)
    known: dict[proof.Node, bytes] = {}
    with Fetcher([src.url]) as f:
        for k in range(0, 1024, 37):
            f.fetch_pieces(info.sha1, info.size, info.root, BS, k, 1, known=known)
    assert len(known) == 12
    assert (proof.Shape(len(data), BS).height, 0) in known  # the top is kept first


def test_no_proof_anywhere_is_a_clear_error(src: HTTPSource, src2: HTTPSource) -> None:
    """Sources that have the bytes but send no proof: NoProof naming the pieces, never the
    bytes; a source with proofs is preferred, and an unproving origin goes after it."""
    data = os.urandom(20 * BS)
    info = src.add(data, block_size=BS)
    src2.add(data, block_size=BS)
    src.proofs = src2.proofs = "none"
    with Fetcher([src.url, src2.url]) as f:
        with pytest.raises(piecewire.NoProof, match="no source could prove pieces 3-4") as exc:
            f.fetch_pieces(info.sha1, info.size, info.root, BS, 3, 2)
        assert "sent no proof" in str(exc.value) and isinstance(exc.value, SourceError)
        # Not a lie, not a failure: the same source still serves verified blocks.
        assert f.fetch_blocks(info.sha1, info.size, 3, 2, info.leaves, BS) == _slice(data, BS, 3, 5)
    src2.proofs = "ok"
    with Fetcher([src.url, src2.url]) as f:
        src.reset_counts()
        src2.reset_counts()
        assert f.fetch_pieces(info.sha1, info.size, info.root, BS, 7, 1) == _slice(data, BS, 7, 8)
        assert src.counts()["sha1"] == 1 and src2.counts()["sha1"] == 1
        # src answered without a proof: for NOPROOF_TTL it is asked after src2.
        assert f.fetch_pieces(info.sha1, info.size, info.root, BS, 8, 1) == _slice(data, BS, 8, 9)
        assert src.counts()["sha1"] == 1 and src2.counts()["sha1"] == 2


def test_not_found_and_stalled_sources(src: HTTPSource, src2: HTTPSource) -> None:
    data = os.urandom(8 * BS)
    info = src.add(data, block_size=BS)
    src2.add(data, block_size=BS)
    src.mode = "not_found"
    with Fetcher([src.url], deadline=5) as f, pytest.raises(NotFound):
        f.fetch_pieces(info.sha1, info.size, info.root, BS, 0, 1)
    src.mode = "stall"
    with Fetcher([src.url, src2.url], first_byte_timeout=0.3, timeout=1, deadline=10) as f:
        assert f.fetch_pieces(info.sha1, info.size, info.root, BS, 2, 2) == _slice(data, BS, 2, 4)


def test_first_piece_of_a_new_sha1_is_one_request(src: HTTPSource, src2: HTTPSource) -> None:
    """A sha1 this Fetcher has never seen: the piece request goes to the relay's own
    /sha1/ at once, with no /api/find before it (the relay routes /sha1/ itself and the
    proof needs nothing find says): the first byte costs one round trip, not two. The
    second relay, ranked after the first, is not asked anything."""
    data = os.urandom(20 * BS)
    info = src.add(data, block_size=BS)
    src2.add(data, block_size=BS)
    with Fetcher([src.url, src2.url]) as f:
        assert f.fetch_pieces(info.sha1, info.size, info.root, BS, 4, 2) == _slice(data, BS, 4, 6)
        assert src.counts() == {"connections": 1, "sha1": 1}
        assert src2.counts() == {}
        assert f.fetch_pieces(info.sha1, info.size, info.root, BS, 9, 1) == _slice(data, BS, 9, 10)
        assert src.counts() == {"connections": 1, "sha1": 2}


def test_relay_404_falls_back_to_find_and_the_direct_url(src: HTTPSource, src2: HTTPSource) -> None:
    """A relay whose /sha1/ answers 404 (or cannot prove): only then is /api/find asked,
    once, and the direct URL it lists serves the piece in the same call; the find answer is
    kept, so the next piece goes to the proven direct URL with no find."""
    data = os.urandom(20 * BS)
    relay, share = src, src2
    info = relay.add(data, block_size=BS)   # known to its /api/find ...
    relay.mode = "not_found"                # ... but its /sha1/ answers 404
    relay.extra_urls.append(share.url + "/sha1/{sha1}")
    share.add(data, block_size=BS)
    with Fetcher([relay.url]) as f:
        assert f.fetch_pieces(info.sha1, info.size, info.root, BS, 2, 3) == _slice(data, BS, 2, 5)
        assert relay.counts()["sha1"] == 1 and relay.counts()["find"] == 1
        assert share.counts() == {"connections": 1, "sha1": 1} and share.counts().get("find") is None
        assert f.last_source(info.sha1) == share.url + f"/sha1/{info.sha1}"
        assert f.fetch_pieces(info.sha1, info.size, info.root, BS, 7, 1) == _slice(data, BS, 7, 8)
        assert relay.counts()["find"] == 1 and share.counts()["sha1"] == 2
    # No proof at the relay is the same: find, then the direct URL that proves.
    relay.mode = "ok"
    relay.proofs = "none"
    relay.reset_counts()
    share.reset_counts()
    with Fetcher([relay.url]) as f:
        assert f.fetch_pieces(info.sha1, info.size, info.root, BS, 0, 1) == _slice(data, BS, 0, 1)
        assert relay.counts()["sha1"] == 1 and relay.counts()["find"] == 1
        assert share.counts()["sha1"] == 1


def test_empty_file_and_bad_ranges(src: HTTPSource) -> None:
    info = src.add(b"", block_size=BS)
    with Fetcher([src.url]) as f:
        assert f.fetch_pieces(info.sha1, 0, info.root, BS, 0, 1) == b""
        assert src.counts().get("sha1", 0) == 0
        with pytest.raises(VerificationError):
            f.fetch_pieces(info.sha1, 0, "cd" * 32, BS, 0, 1)
        for first, count in [(1, 1), (0, 2), (-1, 1), (0, 0)]:
            with pytest.raises(BadRequest):
                f.fetch_pieces(info.sha1, 0, info.root, BS, first, count)


# -- the header itself (kbfs.piecewire) -----------------------------------------------------


def test_parse_proof_strict() -> None:
    good = proof.encode_header(bytes(range(64)))
    assert piecewire.parse_proof(f"pieces=3-5; bs=65536; nodes=:{good}:", 3, 5, 65536) == bytes(range(64))
    assert piecewire.parse_proof("nodes=::;bs=65536;pieces=0-1;later=x", 0, 1, 65536) == b""
    with pytest.raises(piecewire.NoProof):
        piecewire.parse_proof(None, 0, 1, 65536)
    for bad in [f"pieces=3-6; bs=65536; nodes=:{good}:",      # other pieces
                f"pieces=3-5; bs=4096; nodes=:{good}:",       # other block size
                f"pieces=3-5; bs=65536; nodes={good}",        # not a byte sequence
                f"pieces=3-5; bs=65536; nodes=:{good[:-2]}:",  # bad base64
                f"pieces=3-5; pieces=3-5; bs=65536; nodes=:{good}:",
                f"pieces=+3-5; bs=65536; nodes=:{good}:",
                f"bs=65536; nodes=:{good}:", "pieces=3-5; bs=65536", "garbage", "",
                f"pieces=3-5; bs=65536; nodes=:{good}:, pieces=3-5; bs=65536; nodes=::"]:
        with pytest.raises(VerificationError):
            piecewire.parse_proof(bad, 3, 5, 65536)


def test_header_size_bound() -> None:
    """The longest proof there can be fits MAX_PROOF_HEADER; a longer value is refused
    before it is decoded."""
    worst = proof.Shape((1 << 64) - 1, 4096)
    n = worst.leaves
    nodes = max(len(proof.proof_nodes(worst, a, a + 1)) for a in (1, n // 3, n - 2))
    nodes = max(nodes, len(proof.proof_nodes(worst, 1, n - 1)))
    value = f"pieces={n - 2}-{n - 1}; bs=4096; nodes=:{base64.b64encode(bytes(32 * nodes)).decode()}:"
    assert len(value) <= piecewire.MAX_PROOF_HEADER
    assert len(piecewire.parse_proof(value, n - 2, n - 1, 4096)) == 32 * nodes
    over = "pieces=0-1; bs=4096; nodes=:" + "A" * piecewire.MAX_PROOF_HEADER + ":"
    with pytest.raises(VerificationError, match="characters"):
        piecewire.parse_proof(over, 0, 1, 4096)


def test_remember_keeps_upper_levels_first() -> None:
    verified = {(level, j): bytes([level, j]) * 16 for level in range(8) for j in range(3)}
    known: dict[proof.Node, bytes] = {}
    assert piecewire.remember(known, verified, limit=7) == 7
    assert all(level >= 5 for level, _ in known) and (7, 0) in known
    assert piecewire.remember(known, verified, limit=100) == 12 - 7
    assert all(level >= piecewire.KNOWN_LEVEL for level, _ in known)


# -- a real relay and share (tests/netutil.py) ----------------------------------------------


def test_real_relay_and_share_serve_proofs(tmp_path) -> None:
    """A 64 KiB pointer read by pieces through a real `kbfs relay` and `kbfs share`, and from
    the share's --listen URL: true bytes, each verified by the proof the share made (the
    relay passes it through), later proofs shorter with `known`; a 1 MiB pointer of the same
    file gets NoProof (shares prove 64 KiB trees) and its blocks as before. Failed with
    NoProof before the share served Kbfs-Proof (commit 70364e3)."""
    try:
        from tests import netutil
    except ImportError:
        import netutil  # type: ignore[no-redef]
    from kbfs import prv

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    content = os.urandom(3 * (1 << 20) + 12345)
    (data_dir / "f.bin").write_bytes(content)
    p64 = prv.create_pointer(data_dir / "f.bin", block_size=65536)
    p1m = prv.create_pointer(data_dir / "f.bin", block_size=tree.BLOCK_SIZE)  # v1: 1 MiB
    assert p64.tree is not None and p1m.tree is not None
    n = tree.block_count(len(content), 65536)
    with netutil.start_relay(tmp_path) as relay, \
            netutil.start_share(data_dir, relay.url, tmp_path, listen=True) as share:
        known: dict[proof.Node, bytes] = {}
        with Fetcher([relay.url], direct=False) as f:
            spent = []
            for a, b in [(20, 21), (21, 22), (0, 16), (n - 2, n), (5, 40)]:
                got = f.fetch_pieces(p64.sha1, p64.size, p64.tree.root, 65536, a, b - a, known=known)
                assert got == content[a * 65536:b * 65536], (a, b)
                spent.append(f.statistics()["sources"][relay.url]["proof_bytes"] - sum(spent))
            stats = f.statistics()["sources"][relay.url]
            assert stats["proofs"] == 5 and stats["lies"] == 0
            # 49 pieces, height 6: the first proof is the full one (one node per level);
            # with `known` the next piece of its group costs at most the 4 levels below the
            # group's node, and a whole kept group costs nothing.
            assert spent[0] == 6 * 32 and spent[1] <= 4 * 32 and spent[2] == 0, spent
            # A 1 MiB pointer: the share proves only its 64 KiB tree, so NoProof (one line
            # naming the pieces), and the same relay still serves its blocks by the leaf list.
            with pytest.raises(piecewire.NoProof, match="no source could prove pieces 1-2"):
                f.fetch_pieces(p1m.sha1, p1m.size, p1m.tree.root, tree.BLOCK_SIZE, 1, 2)
            leaves = tree.split_leaves(f.fetch_tree(p1m.sha1, p1m.size, root=p1m.tree.root))
            assert f.fetch_blocks(p1m.sha1, p1m.size, 1, 3, leaves) == content[1 << 20:]
        with Fetcher([share.direct_url]) as f:
            assert f.fetch_pieces(p64.sha1, p64.size, p64.tree.root, 65536, 7, 3) == content[7 * 65536:10 * 65536]
            assert f.statistics()["sources"][share.direct_url]["proofs"] == 1
