"""Leaf lists of contents read by their leaves, not by proofs: fetched once, kept, re-checked.

`LeafLists(store, source)` answers `get(ref)`: the leaves (32-byte BLAKE3 hashes, one per
block of `ref.block_size`) of a content with a root, for the pieces of pointers that no
source proves (v1 pointers with 1 MiB blocks; v2 content whose sources answer NoProof).
The first call for a content fetches them (`source.fetch_tree`, GET /tree/) and checks
them against the root; they are kept in memory (an LRU bounded in bytes) and in the piece
store as a node hint (`NODES_LEAVES`), which is checked against the root again on every
load: a hint changed on disk costs a fetch, never a wrong byte.

Root-less content (no root vouches for any leaf list) has a record instead: the leaves
computed from its bytes once they matched its SHA-1 (`kbfs.rootless`), kept under
`NODES_PROVEN` (durable: the catalogue commits with synchronous=FULL). `proven(ref)` gives
them, or None while the content never matched. The record lives and dies with the
content's catalogue row (eviction removes both in one transaction).

Concurrent callers for one content share one fetch. Not here: fetching blocks, storing
pieces, deciding which contents are read by leaves (`kbfs.verifiers`).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from collections import OrderedDict
from typing import Any, Protocol

from kbfs import tree
from kbfs.errors import VerificationError

log = logging.getLogger(__name__)

NODES_LEAVES = "leaves"          # hint: a rooted content's leaf list (checked on load)
NODES_PROVEN = "sha1-leaves"     # record: a root-less content's leaves, once it matched its SHA-1
MEMORY_BYTES = 64 << 20          # leaf lists kept in memory (a 1 TiB v1 file has 32 MiB)
MEMORY_ENTRIES = 1024


class NodeStore(Protocol):
    """What this needs of `kbfs.piecestore.PieceStore`."""

    def put_nodes(self, key: str, name: str, blob: bytes) -> None: ...
    def get_nodes(self, key: str, name: str) -> bytes | None: ...


class TreeSource(Protocol):
    def fetch_tree(self, sha1: str, size: int, block_size: int = ..., root: str | None = None) -> bytes: ...


class LeafLists:
    """Leaf lists by content key; see the module docstring. Thread-safe."""

    def __init__(self, store: NodeStore, source: TreeSource, memory: int = MEMORY_BYTES) -> None:
        self.store = store
        self.source = source
        self.memory = memory
        self._lock = threading.Lock()
        self._mem: OrderedDict[tuple[str, int, int], list[bytes]] = OrderedDict()
        self._bytes = 0
        self._flights: dict[tuple[str, int, int], cf.Future[list[bytes]]] = {}
        self.fetched = 0     # leaf lists fetched from a source (statistics)

    def get(self, ref: Any) -> list[bytes]:
        """The verified leaves of REF (which has a root); VerificationError when no source
        gives leaves that hash up to it."""
        if ref.root is None:
            raise ValueError(f"{ref.sha1} has no root: its leaves are only ever proven")
        shape = (ref.key, ref.size, ref.block_size)
        hit = self._cached(shape)
        if hit is not None:
            return hit
        with self._lock:
            flight = self._flights.get(shape)
            owner = flight is None
            if flight is None:
                flight = self._flights[shape] = cf.Future()
        if not owner:
            return flight.result()
        try:
            leaves = self._load(ref)
            self.remember(ref, leaves)
            flight.set_result(leaves)
            return leaves
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._flights.pop(shape, None)

    def _load(self, ref: Any) -> list[bytes]:
        want = tree.block_count(ref.size, ref.block_size) * tree.LEAF_BYTES
        blob = self.store.get_nodes(ref.key, NODES_LEAVES)
        if blob is not None:
            if len(blob) == want:
                leaves = tree.split_leaves(blob)
                try:
                    tree.verify_leaves(leaves, ref.size, ref.root, ref.block_size)
                    return leaves
                except VerificationError:
                    pass
            log.warning("stored leaves of %s do not match root %s: fetched again", ref.sha1, ref.root)
        # The root goes along so the source can pass over a source serving a wrong tree.
        blob = self.source.fetch_tree(ref.sha1, ref.size, block_size=ref.block_size, root=ref.root)
        if len(blob) != want:
            raise VerificationError(f"tree of {ref.sha1} has {len(blob)} bytes, expected {want}")
        leaves = tree.split_leaves(blob)
        tree.verify_leaves(leaves, ref.size, ref.root, ref.block_size)
        with self._lock:
            self.fetched += 1
        try:
            self.store.put_nodes(ref.key, NODES_LEAVES, bytes(blob))
        except Exception as exc:  # noqa: BLE001 - a hint: kept in memory all the same
            log.info("cannot store the leaves of %s: %s", ref.sha1, exc)
        return leaves

    def proven(self, ref: Any) -> list[bytes] | None:
        """The leaves recorded when root-less REF matched its SHA-1, or None."""
        shape = (ref.key, ref.size, ref.block_size)
        hit = self._cached(shape)
        if hit is not None:
            return hit
        blob = self.store.get_nodes(ref.key, NODES_PROVEN)
        want = tree.block_count(ref.size, ref.block_size) * tree.LEAF_BYTES
        if blob is None or len(blob) != want:
            return None
        leaves = tree.split_leaves(blob)
        self.remember(ref, leaves)
        return leaves

    def record_proven(self, ref: Any, leaves: list[bytes]) -> None:
        """Record LEAVES (computed from root-less REF's bytes, which matched its SHA-1)."""
        self.store.put_nodes(ref.key, NODES_PROVEN, b"".join(leaves))
        self.remember(ref, leaves)

    def keep(self, ref: Any, leaves: list[bytes]) -> None:
        """Keep LEAVES of REF, which has a root, found by the caller (`kbfs.rootless.prove_root`
        checked them against it): in memory, and as the store's hint (checked on load)."""
        self.remember(ref, leaves)
        try:
            self.store.put_nodes(ref.key, NODES_LEAVES, b"".join(leaves))
        except Exception as exc:  # noqa: BLE001 - a hint: kept in memory all the same
            log.info("cannot store the leaves of %s: %s", ref.sha1, exc)

    def remember(self, ref: Any, leaves: list[bytes]) -> None:
        shape = (ref.key, ref.size, ref.block_size)
        n = len(leaves) * tree.LEAF_BYTES
        with self._lock:
            old = self._mem.pop(shape, None)
            if old is not None:
                self._bytes -= len(old) * tree.LEAF_BYTES
            self._mem[shape] = leaves
            self._bytes += n
            while self._mem and (self._bytes > self.memory or len(self._mem) > MEMORY_ENTRIES):
                _, gone = self._mem.popitem(last=False)
                self._bytes -= len(gone) * tree.LEAF_BYTES

    def in_memory(self, ref: Any) -> list[bytes] | None:
        """REF's leaves if they are in memory (no I/O), else None."""
        return self._cached((ref.key, ref.size, ref.block_size))

    def known(self, ref: Any) -> bool:
        """Whether REF's leaves are in memory (no I/O)."""
        return self._cached((ref.key, ref.size, ref.block_size)) is not None

    def _cached(self, shape: tuple[str, int, int]) -> list[bytes] | None:
        with self._lock:
            hit = self._mem.get(shape)
            if hit is not None:
                self._mem.move_to_end(shape)
            return hit

    def forget(self) -> None:
        with self._lock:
            self._mem.clear()
            self._bytes = 0
