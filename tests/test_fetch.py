"""kbfs.fetch against real HTTP servers (tests/httpsource.py) on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from kbfs import fetch, tree
from kbfs.errors import NotFound, SourceUnavailable, VerificationError
from kbfs.fetch import Fetcher

try:
    from tests.httpsource import HTTPSource, free_port
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from httpsource import HTTPSource, free_port  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(60)

BS = 64 << 10  # small blocks keep the tests fast; the code paths are the same


@pytest.fixture
def data() -> bytes:
    # 10 full blocks and a short last one.
    return os.urandom(10 * BS + 12345)


@pytest.fixture
def src():
    with HTTPSource() as s:
        yield s


@pytest.fixture
def src2():
    with HTTPSource() as s:
        yield s


@pytest.fixture(autouse=True)
def short_penalty(monkeypatch):
    # Production keeps a failed source at the back for 10 s; tests need it shorter.
    monkeypatch.setattr(fetch, "PENALTY", 0.5)


def blocks_of(data: bytes, first: int, count: int) -> bytes:
    return data[first * BS:(first + count) * BS]


def test_tree_and_blocks_byte_exact(src, data):
    info = src.add(data, block_size=BS)
    with Fetcher([src.url]) as f:
        assert f.fetch_tree(info.sha1, info.size, BS) == info.leaves_blob
        n = tree.block_count(info.size, BS)
        for first, count in [(0, 1), (0, n), (3, 4), (n - 1, 1), (n - 2, 2), (9, 2)]:
            got = f.fetch_blocks(info.sha1, info.size, first, count, info.leaves, BS)
            assert got == blocks_of(data, first, count)
        assert f.last_source(info.sha1) == src.sha1_url(info.sha1)
        stats = f.statistics()
        assert stats["sources"][src.url]["bytes"] >= len(data)
        assert stats["sources"][src.url]["errors"] == 0


def test_default_block_size_tree(src):
    data = os.urandom(3 * tree.BLOCK_SIZE + 7)
    info = src.add(data)
    with Fetcher([src.url]) as f:
        assert f.fetch_tree(info.sha1, info.size) == info.leaves_blob
        got = f.fetch_blocks(info.sha1, info.size, 2, 2, info.leaves)
        assert got == data[2 * tree.BLOCK_SIZE:]
        assert src.counts()["connections"] == 1  # keep-alive: one connection for all


def test_empty_file(src):
    info = src.add(b"", block_size=BS)
    with Fetcher([src.url]) as f:
        assert f.fetch_blocks(info.sha1, 0, 0, 1, info.leaves, BS) == b""
        assert f.fetch_tree(info.sha1, 0, BS) == info.leaves_blob


def test_lying_source_skipped(src, src2, data):
    info = src.add(data, block_size=BS)
    src2.add(data, block_size=BS)
    src.mode = "lie"
    with Fetcher([src.url, src2.url]) as f:
        assert f.fetch_blocks(info.sha1, info.size, 0, 11, info.leaves, BS) == data
        assert f.last_source(info.sha1) == src2.sha1_url(info.sha1)
        assert f.statistics()["sources"][src.url]["lies"] == 1


def test_all_sources_lying(src, src2, data):
    info = src.add(data, block_size=BS)
    src2.add(data, block_size=BS)
    src.mode = src2.mode = "lie"
    with Fetcher([src.url, src2.url]) as f, pytest.raises(VerificationError):
        f.fetch_blocks(info.sha1, info.size, 2, 3, info.leaves, BS)


@pytest.mark.parametrize("mode", ["short", "no_range", "error500", "not_found", "refuse"])
def test_failing_first_source_falls_over(src, src2, data, mode):
    info = src.add(data, block_size=BS)
    src2.add(data, block_size=BS)
    src.mode = mode
    with Fetcher([src.url, src2.url], deadline=5) as f:
        t0 = time.monotonic()
        assert f.fetch_blocks(info.sha1, info.size, 1, 5, info.leaves, BS) == blocks_of(data, 1, 5)
        assert time.monotonic() - t0 < 3
        assert f.last_source(info.sha1) == src2.sha1_url(info.sha1)


@pytest.mark.parametrize("mode", ["short", "no_range", "error500", "refuse"])
def test_failing_only_source_raises(src, data, mode):
    info = src.add(data, block_size=BS)
    src.mode = mode
    with Fetcher([src.url], deadline=5) as f:
        t0 = time.monotonic()
        with pytest.raises((SourceUnavailable, VerificationError)):
            f.fetch_blocks(info.sha1, info.size, 1, 5, info.leaves, BS)
        assert time.monotonic() - t0 < 5


def test_200_for_whole_file_is_fine(src, data):
    info = src.add(data, block_size=BS)
    src.mode = "no_range"
    with Fetcher([src.url]) as f:
        assert f.fetch_blocks(info.sha1, info.size, 0, 11, info.leaves, BS) == data


@pytest.mark.parametrize("mode", ["stall", "trickle"])
def test_stall_and_trickle_are_bounded(src, src2, data, mode):
    info = src.add(data, block_size=BS)
    src.mode = mode
    with Fetcher([src.url], timeout=10, deadline=3) as f:
        t0 = time.monotonic()
        with pytest.raises(SourceUnavailable):
            f.fetch_blocks(info.sha1, info.size, 0, 4, info.leaves, BS)
        assert time.monotonic() - t0 < 3 + 1.5
    # With a good second source the call succeeds, abandoning the slow one in time.
    src2.add(data, block_size=BS)
    with Fetcher([src.url, src2.url], timeout=10, deadline=8) as f:
        t0 = time.monotonic()
        assert f.fetch_blocks(info.sha1, info.size, 0, 4, info.leaves, BS) == blocks_of(data, 0, 4)
        assert time.monotonic() - t0 < 6


def test_partial_progress_continues_at_next_source(src, src2, data):
    info = src.add(data, block_size=BS)
    src2.add(data, block_size=BS)
    src.mode = "short"  # sends the first half of the range, then hangs up
    with Fetcher([src.url, src2.url]) as f:
        assert f.fetch_blocks(info.sha1, info.size, 0, 8, info.leaves, BS) == blocks_of(data, 0, 8)
    # The verified first half (4 blocks) was kept: the second source was asked for the rest.
    assert src2.ranges() == [(f"/sha1/{info.sha1}", f"bytes={4 * BS}-{8 * BS - 1}")]


def test_direct_urls_rank_after_the_relay_until_proven(src, src2, data):
    """A URL a share advertised through /api/find is not put first on its say-so: the
    relay's own URL is used while it works; the direct one once it delivered verified
    bytes (here: while the relay failed), and then it stays preferred."""
    info = src.add(data, block_size=BS)
    src2.add(data, block_size=BS)
    src.extra_urls.append(src2.url + "/sha1/{sha1}")  # src2 plays the direct share
    with Fetcher([src.url]) as f:
        assert f.fetch_blocks(info.sha1, info.size, 0, 2, info.leaves, BS) == blocks_of(data, 0, 2)
        assert f.last_source(info.sha1) == src.sha1_url(info.sha1)
        found = f.find(info.sha1)
        assert found is not None and found.urls[0] == src2.sha1_url(info.sha1)
        f.fetch_blocks(info.sha1, info.size, 2, 2, info.leaves, BS)
        assert src.counts()["find"] == 1  # the answer is kept
        assert src2.counts().get("sha1", 0) == 0
    # A relay whose /sha1/ fails from the start: the direct share takes over and has now
    # proven itself, so it stays in front of the (unproven) relay once that recovers.
    src.mode = "error500"
    with Fetcher([src.url]) as f:
        assert f.fetch_blocks(info.sha1, info.size, 4, 2, info.leaves, BS) == blocks_of(data, 4, 2)
        assert f.last_source(info.sha1) == src2.sha1_url(info.sha1)
        src.mode = "ok"
        time.sleep(fetch.PENALTY + 0.1)
        n = src.counts()["sha1"]
        assert f.fetch_blocks(info.sha1, info.size, 6, 2, info.leaves, BS) == blocks_of(data, 6, 2)
        assert f.last_source(info.sha1) == src2.sha1_url(info.sha1)
        assert src.counts()["sha1"] == n


def test_rootless_tree_asks_the_relay_before_a_proven_direct_url(src, src2, data):
    """Proof on one content does not buy trust for a root-less tree of another: the
    relay's own /tree/ is asked first."""
    info = src.add(data, block_size=BS)
    other = os.urandom(3 * BS)
    info2 = src.add(other, block_size=BS)
    src2.add(data, block_size=BS)
    src2.add(other, block_size=BS)
    src.extra_urls.append(src2.url + "/sha1/{sha1}")
    src.mode = "error500"
    with Fetcher([src.url]) as f:
        f.fetch_blocks(info.sha1, info.size, 0, 2, info.leaves, BS)  # src2 proven
        assert f.last_source(info.sha1) == src2.sha1_url(info.sha1)
        src.mode = "ok"
        time.sleep(fetch.PENALTY + 0.1)
        assert f.fetch_tree(info2.sha1, info2.size, BS) == info2.leaves_blob
        assert src2.counts().get("tree", 0) == 0 and src.counts()["tree"] == 1


def test_liar_goes_last_for_long(src, src2, data, monkeypatch):
    """A source that sent bytes failing verification loses its proof and goes behind even
    a source that merely failed, for LIE_PENALTY seconds (not the short PENALTY)."""
    monkeypatch.setattr(fetch, "LIE_PENALTY", 3.0, raising=False)
    info = src.add(data, block_size=BS)
    src2.add(data, block_size=BS)
    with Fetcher([src.url, src2.url]) as f:
        f.fetch_blocks(info.sha1, info.size, 0, 1, info.leaves, BS)  # src proven
        assert f.last_source(info.sha1) == src.sha1_url(info.sha1)
        src.mode = "lie"
        f.fetch_blocks(info.sha1, info.size, 1, 1, info.leaves, BS)
        assert f.last_source(info.sha1) == src2.sha1_url(info.sha1)
        src.mode = "ok"
        time.sleep(fetch.PENALTY + 0.1)  # past the short penalty, inside the lie's
        n = src.counts()["sha1"]
        f.fetch_blocks(info.sha1, info.size, 2, 1, info.leaves, BS)
        assert src.counts()["sha1"] == n and f.last_source(info.sha1) == src2.sha1_url(info.sha1)
        src2.mode = "error500"  # only now, with the other failing, is the liar asked again
        f.fetch_blocks(info.sha1, info.size, 3, 1, info.leaves, BS)
        assert f.last_source(info.sha1) == src.sha1_url(info.sha1)


def test_find_failure_falls_back_to_sha1_url(src, data):
    info = src.add(data, block_size=BS)
    src.find_mode = "500"
    with Fetcher([src.url]) as f:
        assert f.find(info.sha1) is None
        assert f.fetch_blocks(info.sha1, info.size, 0, 1, info.leaves, BS) == blocks_of(data, 0, 1)


def test_failed_source_goes_to_back_and_recovers(src, src2, data):
    info = src.add(data, block_size=BS)
    src2.add(data, block_size=BS)
    src.mode = "error500"
    with Fetcher([src.url, src2.url]) as f:
        f.fetch_blocks(info.sha1, info.size, 0, 1, info.leaves, BS)
        n = src.counts()["sha1"]
        f.fetch_blocks(info.sha1, info.size, 1, 1, info.leaves, BS)
        assert src.counts()["sha1"] == n  # not asked again while penalised
        src.mode = "ok"
        time.sleep(fetch.PENALTY + 0.1)
        f.fetch_blocks(info.sha1, info.size, 2, 1, info.leaves, BS)
        # src2 has delivered verified bytes and src has not: src2 keeps first place...
        assert f.last_source(info.sha1) == src2.sha1_url(info.sha1)
        # ...and src, no longer penalised, is asked at once when src2 fails.
        src2.mode = "error500"
        t0 = time.monotonic()
        f.fetch_blocks(info.sha1, info.size, 3, 1, info.leaves, BS)
        assert f.last_source(info.sha1) == src.sha1_url(info.sha1)
        assert time.monotonic() - t0 < 1


def test_local_candidate_with_relay_down(tmp_path, data):
    path = tmp_path / "orig.bin"
    path.write_bytes(data)
    leaves, _ = tree.tree_of_bytes(data, BS)
    sha1 = hashlib.sha1(data).hexdigest()
    with Fetcher([f"http://127.0.0.1:{free_port()}"], deadline=5) as f:
        f.add_local_candidate(sha1, str(path))
        t0 = time.monotonic()
        assert f.fetch_blocks(sha1, len(data), 0, 11, leaves, BS) == data
        assert f.fetch_blocks(sha1, len(data), 10, 1, leaves, BS) == data[10 * BS:]
        assert f.fetch_tree(sha1, len(data)) == b"".join(tree.tree_of_bytes(data)[0])
        assert time.monotonic() - t0 < 2
        assert f.last_source(sha1) == str(path)


def test_local_candidate_wrong_content_skipped(tmp_path, src, data):
    info = src.add(data, block_size=BS)
    path = tmp_path / "changed.bin"
    path.write_bytes(os.urandom(len(data)))  # same size, other bytes
    with Fetcher([src.url]) as f:
        f.add_local_candidate(info.sha1, str(path))
        assert f.fetch_blocks(info.sha1, info.size, 0, 3, info.leaves, BS) == blocks_of(data, 0, 3)
        assert f.last_source(info.sha1) == src.sha1_url(info.sha1)


def test_no_source_at_all():
    with Fetcher([f"http://127.0.0.1:{free_port()}"], deadline=2) as f:
        leaves, _ = tree.tree_of_bytes(b"x" * 10, BS)
        t0 = time.monotonic()
        with pytest.raises(SourceUnavailable):
            f.fetch_blocks("0" * 40, 10, 0, 1, leaves, BS)
        with pytest.raises(SourceUnavailable):
            f.fetch_tree("0" * 40, 10)
        assert time.monotonic() - t0 < 2.5


def test_wrong_length_tree_skipped(src, src2):
    data = os.urandom(3 * tree.BLOCK_SIZE)
    info = src.add(data)
    src2.add(data)
    with Fetcher([src.url, src2.url]) as f:
        # Claiming another size, every tree has the wrong length: it is the pointer's size
        # that does not match what the sources have (a hand edit), and the error says so.
        with pytest.raises(VerificationError, match="does not match what any source has"):
            f.fetch_tree(info.sha1, 5 * tree.BLOCK_SIZE)
        src.mode = "not_found"
        assert f.fetch_tree(info.sha1, info.size) == info.leaves_blob


def test_parallel_fetches(src, data):
    info = src.add(data, block_size=BS)
    errors: list[BaseException] = []
    with Fetcher([src.url]) as f:
        def work(i: int) -> None:
            try:
                for k in range(5):
                    first = (i + k) % 11
                    got = f.fetch_blocks(info.sha1, info.size, first, 1, info.leaves, BS)
                    assert got == blocks_of(data, first, 1)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


def test_list_share_not_found(src):
    with Fetcher([src.url]) as f, pytest.raises(NotFound):
        f.list_share(src.url, "a" * 16, "sub/dir")


def test_environment_proxies_still_apply(src, data, monkeypatch):
    """Proxies come from the environment once per origin (not per request), NO_PROXY too."""
    info = src.add(data)
    for key in ("no_proxy", "NO_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens
    with Fetcher([src.url], deadline=2, timeout=1) as f:
        with pytest.raises(SourceUnavailable):
            f.fetch_tree(info.sha1, info.size)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with Fetcher([src.url], deadline=5) as f:
        leaves = tree.split_leaves(f.fetch_tree(info.sha1, info.size))
        assert f.fetch_blocks(info.sha1, info.size, 0, 1, leaves) == data  # one 1 MiB block


def test_wrong_tree_from_first_source_skipped_when_root_known(src, src2, data):
    info = src.add(data, block_size=BS)
    src2.add(data, block_size=BS)
    src.mode = "wrong_tree"
    root = info.root
    with Fetcher([src.url, src2.url]) as f:
        # Without a root the first tree of the right length is all anyone can judge...
        assert f.fetch_tree(info.sha1, info.size, BS) != info.leaves_blob
        # ...with one, the liar is passed over and counted as such.
        assert f.fetch_tree(info.sha1, info.size, BS, root=root) == info.leaves_blob
        assert f.statistics()["sources"][src.url]["lies"] >= 1
    with Fetcher([src.url]) as f, pytest.raises(VerificationError):
        f.fetch_tree(info.sha1, info.size, BS, root=root)  # every source lied
