// tree.js against the format's own vectors (tests/fixtures, the same files tests/test_tree.py
// and tests/test_proof.py check kbfs/tree.py and kbfs/proof.py with) and hostile proofs.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import {
  Shape, proofNodes, rootFromLeaves, toHex, fromHex,
  verifyBelow, verifyRange, lowestKnown,
} from '../tree.js';
import * as T from '../tree.js';
import * as U from '../testlib/treeutil.js';

const fixtures = new URL('../../tests/fixtures/', import.meta.url);
const vectors = (name) => JSON.parse(readFileSync(new URL(name, fixtures), 'utf8'));

const levels = (data, bs) => U.levels(T, data, bs);
const makeProof = (t, a, b, anchor = null) => U.makeProof(T, t, a, b, anchor);
const { formula } = U;

test('1 MiB vectors: leaves and roots as kbfs/tree.py', () => {
  const v = vectors('tree-vectors.json');
  for (const c of v.vectors) {
    const data = new Uint8Array(c.size).fill(c.byte);
    const t = levels(data, v.block_size);
    assert.equal(t.rows[0].length, c.blocks, c.content);
    assert.equal(toHex(t.rows[0][0]), c.first_leaf, c.content);
    assert.equal(toHex(rootFromLeaves(t.shape, t.rows[0])), c.root, c.content);
  }
});

test('64 KiB vectors: leaves, group nodes and roots as kbfs/proof.py', () => {
  const v = vectors('tree-vectors-64k.json');
  for (const c of v.vectors) {
    const t = levels(formula(c.size), 65536);
    assert.equal(t.shape.leaves, c.pieces, c.content);
    assert.equal(toHex(t.rows[0][0]), c.first_leaf);
    assert.equal(toHex(t.rows[0][t.rows[0].length - 1]), c.last_leaf);
    assert.equal(toHex(t.root), c.root, c.content);
    if (c.group_nodes_level4) {
      const l4 = t.rows.length > 4 ? t.rows[4] : [t.rows[t.rows.length - 1][0]];
      assert.deepEqual(l4.map(toHex), c.group_nodes_level4, c.content);
    }
  }
  const forty = levels(formula(2621440), 1 << 20);
  assert.equal(toHex(forty.root), v.same_40_piece_content_with_1MiB_blocks_root);
});

test('docs/pieces.md five-piece example: proof nodes in order, root', () => {
  const t = levels(formula(4 * 65536 + 10), 65536);
  assert.equal(toHex(t.root), 'd81e18b26d86434fd2cdd8555b6623910763843efe0aeddfd7a78b62a6d55ce9');
  assert.deepEqual(proofNodes(t.shape, 2, 3), [[1, 0], [0, 3], [2, 1]]);
  assert.deepEqual(proofNodes(t.shape, 0, 1), [[0, 1], [1, 1], [2, 1]]);
  assert.deepEqual(proofNodes(t.shape, 1, 3), [[0, 0], [0, 3], [2, 1]]);
  assert.deepEqual(proofNodes(t.shape, 4, 5), [[2, 0]]);
  assert.deepEqual(proofNodes(t.shape, 0, 5), []);
});

test('every range of several shapes verifies; any flipped byte, node, length or position fails', () => {
  for (const size of [1, 65536, 65537, 5 * 65536 + 10, 17 * 65536 + 3, 40 * 65536]) {
    const data = formula(size);
    const t = levels(data, 65536);
    const n = t.shape.leaves;
    for (let a = 0; a < n; a++) {
      for (let b = a + 1; b <= n; b += Math.max(1, Math.floor(n / 5))) {
        const [s, e] = t.shape.byteSpan(a, b);
        const body = data.subarray(s, e);
        const pf = makeProof(t, a, b);
        verifyRange(t.root, t.shape, a, b, body, pf);
        const bad = body.slice();
        bad[bad.length - 1] ^= 1;
        assert.throws(() => verifyRange(t.root, t.shape, a, b, bad, pf), /do not hash up/);
        assert.throws(() => verifyRange(t.root, t.shape, a, b, body.subarray(1), pf), /bytes; got/);
        if (pf.length) {
          const badp = pf.slice();
          badp[0] ^= 1;
          assert.throws(() => verifyRange(t.root, t.shape, a, b, body, badp), /do not hash up/);
          assert.throws(() => verifyRange(t.root, t.shape, a, b, body, pf.subarray(32)), /proof of pieces/);
        }
        if (b < n) {
          // the same bytes claimed one piece later: wrong position
          assert.throws(() => verifyRange(t.root, t.shape, a + 1, b + 1, body, makeProof(t, a + 1, b + 1)));
        }
      }
    }
    // another size or block size under the same top: the root binds both
    const other = new Shape(size + 1, 65536);
    if (other.leaves === n) assert.throws(() => verifyRange(t.root, other, 0, n, data.slice(0, size), new Uint8Array(0)));
  }
});

test('proofs below a verified node are shorter and checked against it', () => {
  const data = formula(40 * 65536);
  const t = levels(data, 65536);
  const first = verifyRange(t.root, t.shape, 0, 1, data.subarray(0, 65536), makeProof(t, 0, 1));
  const known = new Map([...first].filter(([k]) => Number(k.split('.')[0]) >= 4));
  const [anchor, h] = lowestKnown(known, t.shape, 3, 4);
  assert.deepEqual(anchor, [4, 0]);
  const below = makeProof(t, 3, 4, anchor);
  assert.ok(below.length < makeProof(t, 3, 4).length);
  verifyBelow(t.shape, anchor, h, 3, 4, data.subarray(3 * 65536, 4 * 65536), below);
  const wrong = h.slice();
  wrong[0] ^= 1;
  assert.throws(() => verifyBelow(t.shape, anchor, wrong, 3, 4, data.subarray(3 * 65536, 4 * 65536), below));
});

test('hex helpers', () => {
  assert.equal(toHex(fromHex('00ff10')), '00ff10');
  assert.throws(() => fromHex('0'));
});

test('shapes above 2^31 pieces: no 32-bit arithmetic', () => {
  const s = new Shape(2 ** 50, 65536); // 2^34 pieces
  assert.equal(s.leaves, 2 ** 34);
  assert.equal(s.height, 34);
  const a = 2 ** 33 + 5;
  const nodes = proofNodes(s, a, a + 1);
  assert.equal(nodes.length, 34);
  assert.deepEqual(nodes[0], [33, 0]); // left to right: the left half first ...
  assert.ok(nodes.some(([l, j]) => l === 0 && j === a - 1)); // ... piece a's sibling ...
  assert.deepEqual(nodes[nodes.length - 1], [32, 3]); // ... the last quarter last
  assert.deepEqual(s.covering(2 ** 32 - 1, 2 ** 32 + 1), [33, 0]);
  assert.throws(() => new Shape(2 ** 53, 65536));
});
