"""The reader's side of verified pieces on the wire: headers and checks, no I/O.

A reader asks for pieces [a, b) of a file with one ordinary range GET (docs/pieces.md,
"Serving pieces"; docs/protocol.md):

    GET /sha1/{sha1}
    Range: bytes={a*bs}-{min(b*bs, size) - 1}
    Kbfs-Want-Proof: bs=65536[; below=L.J]

and a source that can prove them answers the usual 206 with

    Kbfs-Proof: pieces=a-b; bs=65536; nodes=:BASE64:

This module builds the request's values (`piece_range`, `want_value`), parses the answer's
header strictly (`parse_proof`: bounded size, the pieces and block size asked for, a clean
structured-field byte sequence) and checks data and proof against the pointer's root or a
node verified earlier (`anchor_for`, `check_pieces`, on top of `kbfs.proof`). It keeps the
reader's memory of verified upper nodes bounded (`remember`).

`below`: a reader that holds a verified node covering the range (`proof.lowest_known` over
its `known` nodes) names it, and an up-to-date source sends only the nodes below it. A
source may ignore `below` and send the full proof; the answer does not say which it did, so
`check_pieces` tells them apart by length (the anchored proof's nodes are a subset of the
full proof's, so equal lengths mean the same nodes) and verifies accordingly. Either way
every byte is checked up to the pointer's root before it is returned.

What it does not do: no sockets, no source ranking, no caching of data. A missing header is
`NoProof` (the source did not offer one: not a lie); anything wrong in a header that is
there is a `VerificationError` (the source is lying or broken).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping

from kbfs import proof
from kbfs.errors import SourceError, VerificationError
from kbfs.proof import Node, Shape

WANT_HEADER = "Kbfs-Want-Proof"
PROOF_HEADER = "Kbfs-Proof"

MAX_PROOF_HEADER = 8192
"""Characters of a Kbfs-Proof value a reader reads at all. The longest proof there can be
(a file of 2^64 bytes in 4 KiB pieces: 52 levels, two nodes per level, 3,328 bytes) is 4,440
base64 characters plus the names; a longer value is refused before it is decoded."""

KNOWN_LEVEL = proof.GROUP_LEVEL
"""The lowest level of verified nodes `remember` keeps for shorter later proofs: with 64 KiB
pieces level 4 is one node per 1 MiB group, so a later proof inside a group is <= 4 nodes."""

MAX_KNOWN = 16384
"""Nodes `remember` keeps per content (about 2 MiB with the dict): upper levels first, so
the top of the tree is always kept and the lower kept levels are those touched first."""

_PARAM_RE = re.compile(r"^([a-z]+)=(.*)$")
_PIECES_RE = re.compile(r"^([0-9]{1,20})-([0-9]{1,20})$")
_NUMBER_RE = re.compile(r"^[0-9]{1,20}$")
_NODES_RE = re.compile(r"^:([A-Za-z0-9+/]*={0,2}):$")


class NoProof(SourceError):
    """No source offered a proof for the pieces asked (they answer without Kbfs-Proof:
    an older share or relay, a plain web server). A reader falls back to the leaf-list
    path (`fetch_tree` + `fetch_blocks`) or says what is missing; it never returns
    unproven bytes."""


def piece_range(shape: Shape, a: int, b: int) -> tuple[int, int]:
    """Byte offsets [start, end) of pieces [a, b): the request's `Range: bytes=start-(end-1)`."""
    return shape.byte_span(a, b)


def want_value(block_size: int, anchor: Node | None = None) -> str:
    """The Kbfs-Want-Proof value: `bs=65536`, or `bs=65536; below=L.J` for a proof that
    stops at ANCHOR, a node the reader has verified."""
    value = f"bs={block_size}"
    return value if anchor is None else f"{value}; below={anchor[0]}.{anchor[1]}"


def parse_proof(value: str | None, a: int, b: int, block_size: int) -> bytes:
    """The proof bytes in a Kbfs-Proof VALUE for pieces [a, b) of BLOCK_SIZE.

    None (no header): NoProof. Otherwise the value must be at most MAX_PROOF_HEADER
    characters, `;`-separated `name=value` parameters each named once, with `pieces=a-b`
    and `bs=BLOCK_SIZE` exactly as asked and `nodes=:BASE64:`; unknown parameters are
    ignored (later versions may add some). Anything else: VerificationError.
    """
    if value is None:
        raise NoProof(f"no {PROOF_HEADER} header")
    if len(value) > MAX_PROOF_HEADER:
        raise VerificationError(f"{PROOF_HEADER} of {len(value)} characters (at most "
                                f"{MAX_PROOF_HEADER})")
    params: dict[str, str] = {}
    for part in value.split(";"):
        m = _PARAM_RE.match(part.strip())
        if m is None:
            raise VerificationError(f"malformed {PROOF_HEADER} parameter {part.strip()[:40]!r}")
        if m.group(1) in params:
            raise VerificationError(f"{PROOF_HEADER} names {m.group(1)} twice")
        params[m.group(1)] = m.group(2)
    m = _PIECES_RE.match(params.get("pieces", ""))
    if m is None:
        raise VerificationError(f"{PROOF_HEADER} without pieces=A-B")
    if (int(m.group(1)), int(m.group(2))) != (a, b):
        raise VerificationError(f"{PROOF_HEADER} is for pieces {m.group(1)}-{m.group(2)}, "
                                f"asked {a}-{b}")
    bs = params.get("bs", "")
    if not _NUMBER_RE.match(bs) or int(bs) != block_size:
        raise VerificationError(f"{PROOF_HEADER} is for bs={bs[:20]}, asked bs={block_size}")
    m = _NODES_RE.match(params.get("nodes", ""))
    if m is None:
        raise VerificationError(f"{PROOF_HEADER} without nodes=:BASE64:")
    return proof.decode_header(m.group(1))


def anchor_for(known: Mapping[Node, bytes] | None, shape: Shape, a: int,
               b: int) -> tuple[Node, bytes] | None:
    """The lowest node of KNOWN covering pieces [a, b) and its hash (None: ask for the full
    proof): what `want_value` names as `below`, and what `check_pieces` checks against.
    Taken once per request, so a KNOWN that other readers grow meanwhile cannot change it."""
    if not known:
        return None
    node = proof.lowest_known(known, shape, a, b)
    if node is None:
        return None
    value = known.get(node)
    return None if value is None else (node, value)


def check_pieces(root: str, shape: Shape, a: int, b: int, data: proof.Data, nodes: bytes,
                 anchor: tuple[Node, bytes] | None = None) -> dict[Node, bytes]:
    """Raise VerificationError unless DATA is pieces [a, b) of the file whose pointer has
    ROOT (SHAPE: its size and block size) by the proof NODES; return the nodes verified.

    With ANCHOR (a verified node covering [a, b) and its hash, from `anchor_for`), NODES may
    be the proof below that node (what `want_value(bs, node)` asked for) or the full proof,
    told apart by their length (see the module docstring).
    """
    if anchor is not None:
        node, value = anchor
        if len(nodes) == len(proof.proof_nodes(shape, a, b, node)) * proof.HASH_BYTES:
            return proof.verify_below(shape, node, value, a, b, data, nodes)
    return proof.verify_range_nodes(root, shape.size, shape.block_size, a, b, data, nodes)


def remember(known: MutableMapping[Node, bytes], verified: Mapping[Node, bytes],
             lowest: int | None = None, limit: int | None = None) -> int:
    """Add the VERIFIED nodes at level LOWEST (default KNOWN_LEVEL) and above to KNOWN,
    highest levels first, while KNOWN holds fewer than LIMIT (default MAX_KNOWN); return how
    many were added. Only verified nodes may go in: KNOWN anchors later proofs."""
    lowest = KNOWN_LEVEL if lowest is None else lowest
    limit = MAX_KNOWN if limit is None else limit
    added = 0
    for node in sorted((n for n in verified if n[0] >= lowest), key=lambda n: -n[0]):
        if node in known:
            continue
        if len(known) >= limit:
            break
        known[node] = verified[node]
        added += 1
    return added
