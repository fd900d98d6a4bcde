// Copied from js/tree.js by js/vendor.mjs: edit js/tree.js, then run `node js/vendor.mjs`.
// The blake3-merkle-1 block tree and its range proofs: the same arithmetic and checks as
// kbfs/tree.py and kbfs/proof.py (docs/hash-tree.md, docs/pieces.md), for kbfs.js.
//
// What it does: tree shape arithmetic with no data (Shape), leaf/node/root hashes,
// the root of a full leaf list (v1 pointers), the canonical proof nodes of a piece range and
// the check of pieces + proof against a root or against a node verified before (v2).
// What it does not do: no I/O, no HTTP headers (wire.js), no caching. Every failure is a
// VerificationError; nothing here trusts a count or a name from a sender.
//
// Node names: [level, index]; level 0 holds the leaves; node (L, j) covers leaves
// [j*2^L, min((j+1)*2^L, n)); a node with one child equals it. Indices are plain numbers
// (exact below 2^53): no 32-bit bit operators, which would wrap above 2^31 pieces.

import { createBLAKE3 } from './hashes.js';

export const HASH_BYTES = 32;
export const ALGORITHM = 'blake3-merkle-1';
export const MAX_SIZE = Number.MAX_SAFE_INTEGER; // sizes above are refused (not exact in JS)

const blake3 = await createBLAKE3(); // one WASM instance, used synchronously only

export class VerificationError extends Error {
  constructor(message) {
    super(message);
    this.name = 'VerificationError';
  }
}

const LEAF = new Uint8Array([0]);
const scratch = new Uint8Array(1 + 2 * HASH_BYTES);

export function leafHash(piece) {
  blake3.init();
  blake3.update(LEAF);
  blake3.update(piece);
  return blake3.digest('binary');
}

export function nodeHash(left, right) {
  scratch[0] = 1;
  scratch.set(left, 1);
  scratch.set(right, 1 + HASH_BYTES);
  blake3.init();
  blake3.update(scratch);
  return blake3.digest('binary');
}

export function rootHash(size, blockSize, top) {
  const buf = new Uint8Array(1 + 8 + 4 + HASH_BYTES);
  const view = new DataView(buf.buffer);
  buf[0] = 2;
  view.setBigUint64(1, BigInt(size), true);
  view.setUint32(9, blockSize, true);
  buf.set(top, 13);
  blake3.init();
  blake3.update(buf);
  return blake3.digest('binary');
}

export function toHex(bytes) {
  let s = '';
  for (const b of bytes) s += b.toString(16).padStart(2, '0');
  return s;
}

export function fromHex(hex) {
  if (typeof hex !== 'string' || !/^[0-9a-fA-F]*$/.test(hex) || hex.length % 2) {
    throw new VerificationError('not hex');
  }
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.substr(2 * i, 2), 16);
  return out;
}

export function equalBytes(a, b) {
  if (a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= a[i] ^ b[i];
  return d === 0;
}

const pow2 = (k) => 2 ** k;

export class Shape {
  constructor(size, blockSize) {
    if (!Number.isSafeInteger(size) || size < 0) throw new VerificationError(`bad size ${size}`);
    if (!Number.isSafeInteger(blockSize) || blockSize < 1 || blockSize >= 2 ** 32) {
      throw new VerificationError(`bad block size ${blockSize}`);
    }
    this.size = size;
    this.blockSize = blockSize;
    this.leaves = Math.max(1, Math.ceil(size / blockSize));
    let h = 0;
    while (pow2(h) < this.leaves) h++;
    this.height = h; // ceil(log2(n)), 0 for one piece
  }

  count(level) {
    return Math.ceil(this.leaves / pow2(level));
  }

  span(level, index) {
    if (!(index >= 0 && index < this.count(level))) {
      throw new VerificationError(`node (${level}, ${index}) is not in a tree of ${this.leaves} leaves`);
    }
    return [index * pow2(level), Math.min((index + 1) * pow2(level), this.leaves)];
  }

  children(level, index) {
    if (level === 0) return [];
    if (2 * index + 1 < this.count(level - 1)) return [[level - 1, 2 * index], [level - 1, 2 * index + 1]];
    return [[level - 1, 2 * index]];
  }

  checkRange(a, b) {
    if (!(Number.isSafeInteger(a) && Number.isSafeInteger(b) && a >= 0 && a < b && b <= this.leaves)) {
      throw new VerificationError(`pieces [${a}, ${b}) are not a non-empty range of a tree of ${this.leaves}`);
    }
  }

  byteSpan(a, b) {
    this.checkRange(a, b);
    return [a * this.blockSize, Math.min(b * this.blockSize, this.size)];
  }

  // The lowest node whose leaves include [a, b): the level where a and b-1 meet.
  covering(a, b) {
    this.checkRange(a, b);
    let level = 0;
    while (Math.floor(a / pow2(level)) !== Math.floor((b - 1) / pow2(level))) level++;
    return [level, Math.floor(a / pow2(level))];
  }
}

const key = (level, index) => `${level}.${index}`;

function startNode(shape, a, b, anchor) {
  if (!anchor) return [shape.height, 0];
  const [lo, hi] = shape.span(anchor[0], anchor[1]);
  if (!(lo <= a && b <= hi)) throw new VerificationError(`node ${anchor} does not cover pieces [${a}, ${b})`);
  return anchor;
}

// The canonical proof of pieces [a, b) (kbfs.proof.proof_nodes): nodes disjoint from the
// range whose subtrees with it cover the anchor's (default: the top's) leaves, left to right.
export function proofNodes(shape, a, b, anchor = null) {
  shape.checkRange(a, b);
  const out = [];
  const walk = (level, index) => {
    const [lo, hi] = shape.span(level, index);
    if (hi <= a || lo >= b) out.push([level, index]);
    else if (!(a <= lo && hi <= b)) for (const [l, j] of shape.children(level, index)) walk(l, j);
  };
  const [l, j] = startNode(shape, a, b, anchor);
  walk(l, j);
  return out;
}

function levelUp(nodes) {
  const up = [];
  for (let i = 0; i + 1 < nodes.length; i += 2) up.push(nodeHash(nodes[i], nodes[i + 1]));
  if (nodes.length % 2) up.push(nodes[nodes.length - 1]);
  return up;
}

// Check DATA (exactly the bytes of pieces [a, b)) and PROOF (exactly the hashes of
// proofNodes) up to the anchor (default: the top); return a Map "L.j" -> hash of every
// node verified on the way (kbfs.proof._verify). The caller compares the result's anchor
// (or the root built from the top) with what it trusts.
function verifyNodes(shape, a, b, data, proof, anchor) {
  let nodes, start, end;
  try {
    nodes = proofNodes(shape, a, b, anchor);
    [start, end] = shape.byteSpan(a, b);
  } catch (e) {
    throw new VerificationError(`cannot verify pieces [${a}, ${b}): ${e.message}`);
  }
  if (data.length !== end - start) {
    throw new VerificationError(`pieces [${a}, ${b}) are ${end - start} bytes; got ${data.length}`);
  }
  if (proof.length !== nodes.length * HASH_BYTES) {
    throw new VerificationError(`proof of pieces [${a}, ${b}) is ${nodes.length * HASH_BYTES} bytes; got ${proof.length}`);
  }
  const bs = shape.blockSize;
  const leaves = [];
  for (let i = 0; i < b - a; i++) leaves.push(leafHash(data.subarray(i * bs, Math.min((i + 1) * bs, data.length))));
  const given = new Map();
  nodes.forEach(([l, j], k) => given.set(key(l, j), proof.subarray(k * HASH_BYTES, (k + 1) * HASH_BYTES)));
  const out = new Map();
  const covered = (level, index) => {
    const [lo, hi] = shape.span(level, index);
    let row = leaves.slice(lo - a, hi - a);
    for (let k = 0; k <= level; k++) {
      if (k) row = levelUp(row);
      const first = Math.floor(lo / pow2(k));
      row.forEach((h, i) => out.set(key(k, first + i), h));
    }
    return row[0];
  };
  const value = (level, index) => {
    const [lo, hi] = shape.span(level, index);
    let h;
    if (hi <= a || lo >= b) h = given.get(key(level, index));
    else if (a <= lo && hi <= b) return covered(level, index);
    else {
      const kids = shape.children(level, index).map(([l, j]) => value(l, j));
      h = kids.length === 2 ? nodeHash(kids[0], kids[1]) : kids[0];
    }
    out.set(key(level, index), h);
    return h;
  };
  const [l, j] = startNode(shape, a, b, anchor);
  value(l, j);
  return out;
}

// Pieces [a, b) and their full proof against the pointer's ROOT (32 bytes).
export function verifyRange(root, shape, a, b, data, proof) {
  const out = verifyNodes(shape, a, b, data, proof, null);
  const top = out.get(key(shape.height, 0));
  if (!equalBytes(rootHash(shape.size, shape.blockSize, top), root)) {
    throw new VerificationError(`pieces [${a}, ${b}) and their proof do not hash up to the root`);
  }
  return out;
}

// Pieces [a, b) and a proof below ANCHOR ([L, j]) against that node's verified hash.
export function verifyBelow(shape, anchor, anchorHash, a, b, data, proof) {
  const out = verifyNodes(shape, a, b, data, proof, anchor);
  if (!equalBytes(out.get(key(anchor[0], anchor[1])), anchorHash)) {
    throw new VerificationError(`pieces [${a}, ${b}) and their proof do not hash up to node (${anchor})`);
  }
  return out;
}

// The lowest node of KNOWN (Map "L.j" -> hash) covering [a, b), as [[L, j], hash], or null.
export function lowestKnown(known, shape, a, b) {
  const [level, index] = shape.covering(a, b);
  for (let up = level; up <= shape.height; up++) {
    const j = Math.floor(index / pow2(up - level));
    const h = known.get(key(up, j));
    if (h) return [[up, j], h];
  }
  return null;
}

// The root (32 bytes) of a file of SHAPE whose leaves are LEAVES (v1: the /tree/ list).
export function rootFromLeaves(shape, leaves) {
  if (leaves.length !== shape.leaves) {
    throw new VerificationError(`${leaves.length} leaves for a file of ${shape.size} bytes; expected ${shape.leaves}`);
  }
  let level = leaves;
  while (level.length > 1) level = levelUp(level);
  return rootHash(shape.size, shape.blockSize, level[0]);
}
