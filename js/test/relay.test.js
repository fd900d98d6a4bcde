// kbfs.js through a real `kbfs relay` and real `kbfs share`s, started by tests/test_js.py,
// which passes what it started in KBFS_JS_WORLD (a JSON file). Run alone it is skipped.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';

import { openContent } from '../kbfs.js';
import { startLiar } from '../testlib/lying.js';

const worldPath = process.env.KBFS_JS_WORLD;
const W = worldPath ? JSON.parse(readFileSync(worldPath, 'utf8')) : null;
const skip = W ? false : 'KBFS_JS_WORLD not set: run through tests/test_js.py (it starts a relay and shares)';

const bytesOf = (key) => new Uint8Array(readFileSync(W.files[key].path));
const same = (got, want, what) => assert.ok(Buffer.from(got).equals(Buffer.from(want)), `${what}: bytes differ`);

describe('kbfs.js against a real relay', { skip }, () => {
  let liar;
  let big;
  before(async () => {
    liar = await startLiar(W.relay);
    big = bytesOf('big');
  });
  after(async () => liar.close());

  const relays = () => [W.relay];

  test('v2 pointer (64 KiB pieces, proofs): true bytes at any offset, fewer requests on re-reads', async () => {
    const f = await openContent(W.files.big.v2, { relays: relays() });
    assert.equal(f.kind, 'proofs');
    assert.equal(f.size, big.length);
    assert.equal(f.sha1, W.files.big.sha1);
    assert.equal(f.name, 'big.bin');
    for (const [o, n] of [[0, 10], [65535, 2], [1 << 20, 200000], [big.length - 7, 100], [3, big.length]]) {
      same(await f.read(o, n), big.subarray(o, o + n), `read(${o}, ${n})`);
    }
    const before = f.stats.requests;
    same(await f.read(65535, 2), big.subarray(65535, 65537), 'cached read');
    assert.equal(f.stats.requests, before, 'a cached piece is not asked again');
    assert.equal((await f.read(big.length + 5, 10)).length, 0);
    await assert.rejects(f.read(-1, 2), RangeError);
  });

  test('v2 pointer as JSON text, proofs below a known node on the second read', async () => {
    const f = await openContent(JSON.stringify(W.files.big.v2), { relays: relays() });
    same(await f.read(2 * 65536, 10), big.subarray(2 * 65536, 2 * 65536 + 10), 'first');
    assert.ok(f.reader.known.size > 0, 'upper nodes remembered');
    same(await f.read(5 * 65536, 10), big.subarray(5 * 65536, 5 * 65536 + 10), 'second, anchored');
  });

  test('v1 pointer (1 MiB blocks): leaf list checked against the root, blocks against leaves', async () => {
    const f = await openContent(W.files.big.v1, { relays: relays() });
    assert.equal(f.kind, 'leaves');
    same(await f.read(1000, 3 << 20), big.subarray(1000, 1000 + (3 << 20)), 'v1 read');
    same(await f.read(big.length - 10, 10), big.subarray(big.length - 10), 'v1 tail');
  });

  test('root-less pointer of the original tools: whole content against its SHA-1', async () => {
    const f = await openContent(W.files.legacy.rootless, { relays: relays() });
    assert.equal(f.kind, 'rootless');
    same(await f.read(100, 50), bytesOf('legacy').subarray(100, 150), 'legacy read');
    const small = await openContent(W.files.legacy.rootless, { relays: relays(), rootlessLimit: 1000 });
    await assert.rejects(small.read(0, 1), /has no block tree.*above the limit of 1000/);
  });

  test('sha1:// and kbfs:// sources', async () => {
    const s = await openContent(`sha1://${W.files.legacy.sha1}/x.bin?label=1`, { relays: relays() });
    assert.equal(s.size, W.files.legacy.size);
    assert.equal(s.name, 'x.bin');
    same(await s.read(0, 5000), bytesOf('legacy'), 'sha1://');
    const host = W.relay.split('://')[1];
    const k = await openContent(`kbfs://${host}/${W.share}/sub/name%20with%20space.bin`);
    assert.equal(k.name, 'name with space.bin');
    same(await k.read(0, 70000), bytesOf('spaced'), 'kbfs://');
    const kb = await openContent(`kbfs://${host}/${W.share}/big.bin`);
    assert.equal(kb.kind, 'proofs');
    same(await kb.read(77777, 5), big.subarray(77777, 77782), 'kbfs:// big');
    await assert.rejects(openContent(`kbfs://${host}/${W.share}/nope.bin`), /no such file/);
    await assert.rejects(openContent(`kbfs://${host}/${W.share}/sub`), /is a folder/);
    await assert.rejects(openContent(`sha1://${'0'.repeat(40)}`, { relays: relays() }), /no connected share/);
  });

  test('empty file', async () => {
    for (const kind of ['v1', 'v2']) {
      const f = await openContent(W.files.empty[kind], { relays: relays() });
      assert.equal((await f.read(0, 10)).length, 0);
    }
    const bad = { ...W.files.empty.v2, kbfs_tree: { ...W.files.empty.v2.kbfs_tree, root: W.files.big.v2.kbfs_tree.root } };
    await assert.rejects(openContent(bad, { relays: relays() }), /not the root of an empty file/);
  });

  test('private share: nothing without the token, true bytes with it', async () => {
    const host = W.relay.split('://')[1];
    const url = `kbfs://${host}/${W.private}/secret.bin`;
    await assert.rejects(openContent(url), (e) => e.status === 401 && /private share: give its token/.test(e.message));
    const none = await openContent(W.files.secret.v2, { relays: relays() });
    await assert.rejects(none.read(0, 10), /HTTP 404/);
    const want = bytesOf('secret');
    const f = await openContent(url, { token: W.token });
    same(await f.read(1, 200000), want.subarray(1, 200001), 'kbfs:// with token');
    const g = await openContent(W.files.secret.v2, { relays: relays(), token: W.token });
    same(await g.read(0, want.length), want, 'pointer with token');
    await assert.rejects(openContent(url, { token: 'Bearer x\r\nX: y' }), /not a kbfs share token/);
    await assert.rejects(openContent(url, { token: W.token.slice(0, -4) + 'AAAA' }), /did not accept the token given/);
  });

  test('the token never goes to a relay only a source hint names', async () => {
    liar.mode = 'ok';
    liar.seen.length = 0;
    const p = { ...W.files.big.v2, kbfs_sources: [liar.url] };
    const f = await openContent(p, { relays: [W.dead], token: W.token });
    same(await f.read(10, 10), big.subarray(10, 20), 'via the hint');
    assert.ok(liar.seen.length > 0, 'the hint was asked');
    assert.ok(liar.seen.every((r) => !r.headers.authorization), 'no Authorization to the hint');
    liar.seen.length = 0;
    const t = await openContent(W.files.big.v2, { relays: [liar.url], token: W.token });
    await t.read(0, 1);
    assert.ok(liar.seen.every((r) => r.headers.authorization === `Bearer ${W.token}`), 'a given relay gets it');
  });

  test('failover from a dead relay to a live one', async () => {
    const f = await openContent(W.files.big.v2, { relays: [W.dead, W.relay] });
    same(await f.read(300000, 1000), big.subarray(300000, 301000), 'after failover');
    assert.ok(f.stats.failovers >= 1);
    const d = await openContent(W.files.big.v2, { relays: [W.dead] });
    await assert.rejects(d.read(0, 1), /127\.0\.0\.1:\d+: unreachable/);
  });

  // Each lie: refused alone (nothing returned), and the next relay gives the true bytes.
  const lies = [
    ['flip-byte', 'v2', 'bytes'], ['flip-proof', 'v2', 'proof node'], ['proof-label', 'v2', 'proof label'], ['bs-label', 'v2', 'proof block size'],
    ['short-proof', 'v2', 'proof length'], ['drop-proof', 'v2', 'missing proof'], ['garbage-proof', 'v2', 'proof encoding'],
    ['short-body', 'v2', 'short body'], ['long-body', 'v2', 'long body'], ['shift', 'v2', 'position'],
    ['content-range', 'v2', 'Content-Range'], ['flip-byte', 'v1', 'v1 bytes'], ['short-body', 'v1', 'v1 length'],
    ['tree-flip', 'v1', 'leaf list'], ['tree-short', 'v1', 'leaf list length'], ['shift', 'v1', 'v1 position'],
    ['whole-flip', 'rootless', 'root-less bytes'], ['short-body', 'rootless', 'root-less length'],
  ];
  for (const [mode, kind, what] of lies) {
    test(`a lying relay is refused and failed over: ${what} (${mode}, ${kind})`, async () => {
      liar.mode = mode;
      const ptr = kind === 'rootless' ? W.files.legacy.rootless : W.files.big[kind];
      const data = kind === 'rootless' ? bytesOf('legacy') : big;
      const [o, n] = kind === 'rootless' ? [10, 100] : [3 * 65536 + 5, 2 * 65536];
      const alone = await openContent(ptr, { relays: [liar.url] });
      await assert.rejects(alone.read(o, n), (e) => e.name === 'ReadError');
      const both = await openContent(ptr, { relays: [liar.url, W.relay] });
      same(await both.read(o, n), data.subarray(o, o + n), `${mode} then the real relay`);
      assert.ok(both.stats.failovers >= 1);
      liar.mode = 'ok';
    });
  }

  test('a lie on a proof below a known node (the second read of a file) is refused too', async () => {
    for (const mode of ['flip-byte', 'flip-proof', 'shift']) {
      liar.mode = 'ok';
      const f = await openContent(W.files.big.v2, { relays: [liar.url] });
      await f.read(2 * 65536, 10);
      assert.ok(f.reader.known.size > 0);
      liar.mode = mode;
      await assert.rejects(f.read(5 * 65536, 10), (e) => e.name === 'ReadError', mode);
      liar.mode = 'ok';
      const g = await openContent(W.files.big.v2, { relays: [liar.url, W.relay] });
      await g.read(2 * 65536, 10);
      liar.mode = mode;
      same(await g.read(5 * 65536, 10), big.subarray(5 * 65536, 5 * 65536 + 10), `${mode} below a known node`);
      liar.mode = 'ok';
    }
  });

  test('an error answer is read with a bound (a 64 MiB error page is cut short)', async () => {
    liar.mode = 'error-flood';
    const before = liar.flooded;
    const f = await openContent(W.files.big.v2, { relays: [liar.url] });
    await assert.rejects(f.read(0, 10), /HTTP 500/);
    await new Promise((r) => setTimeout(r, 300));
    assert.ok(liar.flooded - before < 32 << 20, `the liar wrote ${liar.flooded - before} bytes`);
    liar.mode = 'ok';
  });

  test('the LRU of verified pieces stays within cacheBytes, reads larger than it still whole', async () => {
    const f = await openContent(W.files.big.v2, { relays: relays(), cacheBytes: 3 * 65536 });
    same(await f.read(0, 1 << 20), big.subarray(0, 1 << 20), 'a read of 16 pieces through a 3-piece cache');
    assert.ok(f.reader.lru.bytes <= 3 * 65536 && f.reader.lru.map.size <= 3, `${f.reader.lru.bytes} bytes kept`);
    const n = f.stats.requests;
    await f.read(15 * 65536, 10); // the last piece read is kept
    assert.equal(f.stats.requests, n);
    await f.read(0, 10); // the first was evicted
    assert.equal(f.stats.requests, n + 1);
  });

  test('a silent relay costs the first-byte timeout, then the next relay answers', async () => {
    liar.mode = 'stall';
    const t0 = Date.now();
    const f = await openContent(W.files.big.v2, { relays: [liar.url, W.relay], firstByteTimeout: 300 });
    same(await f.read(1000, 10), big.subarray(1000, 1010), 'after the silent relay');
    assert.ok(Date.now() - t0 < 3000, `took ${Date.now() - t0} ms`);
    const alone = await openContent(W.files.big.v2, { relays: [liar.url], firstByteTimeout: 300 });
    await assert.rejects(alone.read(0, 1), /no answer within the first-byte timeout/);
    liar.mode = 'ok';
  });
});
