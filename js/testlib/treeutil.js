// Test and bench support: a whole tree built from data (every level), and honest proofs cut
// from it. T is the tree module (js/tree.js in Node, lib/tree.js in a page), passed in so
// the same code runs in both. Not part of the package.
export function formula(n) {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (31 * i + 7) % 251;
  return out;
}

export function levels(T, data, bs) {
  const shape = new T.Shape(data.length, bs);
  const rows = [[]];
  for (let i = 0; i < shape.leaves; i++) rows[0].push(T.leafHash(data.subarray(i * bs, Math.min((i + 1) * bs, data.length))));
  while (rows[rows.length - 1].length > 1) {
    const prev = rows[rows.length - 1];
    const up = [];
    for (let i = 0; i + 1 < prev.length; i += 2) up.push(T.nodeHash(prev[i], prev[i + 1]));
    if (prev.length % 2) up.push(prev[prev.length - 1]);
    rows.push(up);
  }
  return { shape, rows, root: T.rootHash(shape.size, bs, rows[rows.length - 1][0]) };
}

// The honest proof of pieces [a, b) (below ANCHOR), from the levels of `levels`.
export function makeProof(T, t, a, b, anchor = null) {
  const nodes = T.proofNodes(t.shape, a, b, anchor);
  const out = new Uint8Array(32 * nodes.length);
  nodes.forEach(([l, j], k) => out.set(l < t.rows.length ? t.rows[l][j] : t.rows[t.rows.length - 1][0], 32 * k));
  return out;
}
