// The kbfs.js benchmark body, the same code in Node and in a Chromium page (bench/bench_js.py):
// T is the tree module, K the kbfs.js module, U testlib/treeutil.js, passed in so each
// side imports them its own way. Not part of the package.
//
// verify(): checking pieces already in memory, no network: v2 (64 KiB pieces in runs of
//   RUN bytes with their proofs, verifyRange) and v1 (1 MiB blocks against their leaves).
// read(): openContent + read of a whole file through a real relay, READ bytes at a time.

const MB = 1e6;

export async function verify(T, U, { mib = 64, run = 1 << 20, rounds = 3 } = {}) {
  const size = mib << 20;
  const data = U.formula(size);
  const bs = 65536;
  const t = U.levels(T, data, bs);
  const per = run / bs;
  const proofs = [];
  for (let a = 0; a < t.shape.leaves; a += per) proofs.push([a, Math.min(a + per, t.shape.leaves), U.makeProof(T, t, a, Math.min(a + per, t.shape.leaves))]);
  const v1 = U.levels(T, data, 1 << 20);
  const out = { mib, run, v2: [], v1: [] };
  for (let r = 0; r < rounds; r++) {
    let t0 = performance.now();
    for (const [a, b, pf] of proofs) {
      const [s, e] = t.shape.byteSpan(a, b);
      T.verifyRange(t.root, t.shape, a, b, data.subarray(s, e), pf);
    }
    out.v2.push(size / MB / ((performance.now() - t0) / 1000));
    t0 = performance.now();
    for (let i = 0; i < v1.shape.leaves; i++) {
      const block = data.subarray(i << 20, Math.min((i + 1) << 20, size));
      if (!T.equalBytes(T.leafHash(block), v1.rows[0][i])) throw new Error('v1 block does not verify');
    }
    out.v1.push(size / MB / ((performance.now() - t0) / 1000));
  }
  return out;
}

export async function read(K, pointer, relays, { chunk = 8 << 20, rounds = 2 } = {}) {
  const out = { size: pointer.original_size, chunk, mbps: [], requests: [] };
  for (let r = 0; r < rounds; r++) {
    const f = await K.openContent(pointer, { relays, parallel: 4 });
    const t0 = performance.now();
    let got = 0;
    const reads = [];
    for (let o = 0; o < f.size; o += chunk) reads.push(f.read(o, chunk).then((b) => { got += b.length; }));
    await Promise.all(reads);
    if (got !== f.size) throw new Error(`read ${got} of ${f.size} bytes`);
    out.mbps.push(f.size / MB / ((performance.now() - t0) / 1000));
    out.requests.push(f.stats.requests);
  }
  return out;
}
