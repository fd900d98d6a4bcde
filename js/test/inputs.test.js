// Hostile values for every check of kbfs.js's inputs: sources, pointers, relay URLs, tokens,
// Kbfs-Proof headers, Content-Range and body lengths. No network.
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { test } from 'node:test';

import { openContent } from '../kbfs.js';
import { kbfsLink, linkPrefix, parseLink } from '../kbfsurl.js';
import { parsePointer, parseSource, relayBase } from '../pointer.js';
import { checkToken } from '../sources.js';
import { checkAnswer, parseProof, readExactly } from '../wire.js';

const SHA = 'e6937aa016bc06eda81d3b227fffde825d881ce5';
const ROOT = 'ab'.repeat(32);
const good = { original_checksum: SHA, original_size: 5000, kbfs_tree: { algorithm: 'blake3-merkle-1', block_size: 65536, root: ROOT } };
const ID = 'vic4alrdmfsaebac5noakw5iq2yvs7qz';

test('pointers: every field checked', () => {
  assert.deepEqual(parsePointer(good), { sha1: SHA, size: 5000, root: ROOT, blockSize: 65536, path: '', hints: [] });
  assert.equal(parsePointer(JSON.stringify({ ...good, original_checksum: SHA.toUpperCase() })).sha1, SHA);
  const bad = [
    [null, /not a JSON object/], [[], /not a JSON object/], ['{', /not valid JSON/], ['x'.repeat(70000), /larger than/],
    [{ ...good, original_checksum: SHA + '0' }, /40 hex/], [{ ...good, original_checksum: `${SHA.slice(0, 39)}\n` }, /40 hex/],
    [{ ...good, original_size: -1 }, /non-negative integer/], [{ ...good, original_size: 1.5 }, /non-negative integer/],
    [{ ...good, original_size: '5000' }, /non-negative integer/], [{ ...good, original_size: true }, /non-negative integer/],
    [{ ...good, original_size: 2 ** 60 }, /above what kbfs.js reads/],
    [{ ...good, original_path: 'a\0b' }, /original_path/],
    [{ ...good, kbfs_tree: 'x' }, /must be an object/],
    [{ ...good, kbfs_tree: { ...good.kbfs_tree, algorithm: 'sha256' } }, /algorithm/],
    [{ ...good, kbfs_tree: { ...good.kbfs_tree, block_size: 1024 } }, /block_size/],
    [{ ...good, kbfs_tree: { ...good.kbfs_tree, block_size: 2 ** 31 } }, /block_size/],
    [{ ...good, kbfs_tree: { ...good.kbfs_tree, root: ROOT.slice(1) } }, /64 hex/],
  ];
  for (const [value, why] of bad) assert.throws(() => parsePointer(value), why, JSON.stringify(value)?.slice(0, 80));
});

test('source hints: bad ones dropped, never an error; at most 8', () => {
  const hints = ['http://ok.example:8080', 'http://user:pw@h', 'ftp://h', 'http://h/path', 'http://h?q', 'javascript:alert(1)', 5,
    ...Array.from({ length: 10 }, (_, i) => `http://h${i}`)];
  const p = parsePointer({ ...good, kbfs_sources: hints });
  assert.deepEqual(p.hints, ['http://ok.example:8080', 'http://h0']);
});

test('relay URLs: http(s)://host[:port] only', () => {
  assert.equal(relayBase('http://127.0.0.1:8080'), 'http://127.0.0.1:8080');
  assert.equal(relayBase('https://relay.example.org/'), 'https://relay.example.org');
  for (const u of ['http://u@h', 'http://u:p@h:1', 'file:///etc', 'http://h/x', 'http://h/?a', 'http://h#f', 'http://h:99999',
    'http:// h', 'http://h\\x', 'http://h/.', '']) {
    assert.equal(relayBase(u), null, u);
  }
  return assert.rejects(openContent(good, { relays: ['http://u:p@h'] }), /not http\(s\)/);
});

test('sources: sha1://, kbfs links and pointers, hostile forms refused', () => {
  assert.deepEqual(parseSource(`sha1://${SHA}/dir/x%20y.bin?label=1#f`), { kind: 'sha1', sha1: SHA, name: 'x y.bin' });
  assert.equal(parseSource(`sha1://${SHA}`).name, SHA);
  assert.deepEqual(parseSource(`kbfs://h:8080/${ID}/a/b%20c.bin`), { kind: 'kbfs', relay: 'http://h:8080', share: ID, path: 'a/b c.bin', name: 'b c.bin' });
  assert.deepEqual(parseSource(` kbfs+https://h/${ID}/a/b%20c.bin\n`), { kind: 'kbfs', relay: 'https://h', share: ID, path: 'a/b c.bin', name: 'b c.bin' });
  assert.equal(parseSource(JSON.stringify(good)).kind, 'pointer');
  const bad = [
    [`sha1://${SHA.slice(1)}`, /40 hex/], ['sha1://', /40 hex/], [`sha1://${SHA}/%zz`, /percent/],
    [`kbfs://h:1/${ID}/`, /top folder/], [`kbfs+https://h/${ID}`, /top folder/],
    ['http://h/x', /unknown kind of source/], ['http://u:hunter2@h/x', /^SourceError: http:\/\/h\/x: unknown kind/], [42, /a source is/],
  ];
  for (const [value, why] of bad) assert.throws(() => parseSource(value), why, String(value));
});

test('kbfs links: kbfs://HOST:PORT (http) and kbfs+https://HOST[:PORT], as kbfs/kbfsurl.py', () => {
  const links = {
    [`kbfs://h:8080/${ID}/a%20b/c`]: ['http://h:8080', 'a b/c'],
    [`kbfs://h:80/${ID}/x`]: ['http://h', 'x'], // canonical: no default port (kbfsurl.canonical_relay)
    [`kbfs+https://h/${ID}/a%20b/c`]: ['https://h', 'a b/c'],
    [`kbfs+https://h:443/${ID}/x`]: ['https://h', 'x'],
    [`kbfs+https://relay.example.org:8443/${ID}/d/%2e.zarray`]: ['https://relay.example.org:8443', 'd/..zarray'],
    [`kbfs+https://[::1]:8443/${ID}//x//y/`]: ['https://[::1]:8443', 'x/y'],
    [`kbfs+https://127.0.0.1:65535/${ID}/%E2%82%AC`]: ['https://127.0.0.1:65535', '\u20ac'],
  };
  for (const [link, [relay, path]] of Object.entries(links)) assert.deepEqual(parseLink(link), { relay, share: ID, path }, link);
  assert.deepEqual(parseLink('kbfs+https://h/', false), { relay: 'https://h', share: '', path: '' });
  assert.deepEqual(parseLink('kbfs://h:1', false), { relay: 'http://h:1', share: '', path: '' });
  // the words of kbfsurl.py's line for each (tests/test_kbfs_https.py BAD); never the password
  const bad = [
    [`kbfs://alice:hunter2@127.0.0.1:1/${ID}/x`, 'no user name or password'],
    [`kbfs+https://alice@127.0.0.1/${ID}/x`, 'no user name or password'],
    [`kbfs+https://alice:hunter2@127.0.0.1/`, 'no user name or password'],
    [`kbfs://127.0.0.1/${ID}/x`, 'writes its port'],
    [`kbfs://127.0.0.1:0/${ID}/x`, "port '0'"],
    [`kbfs+https://127.0.0.1:65536/${ID}/x`, "port '65536'"],
    [`kbfs://127.0.0.1:+80/${ID}/x`, "port '+80'"],
    [`kbfs://127.0.0.1:\uff18\uff10/${ID}/x`, 'is not a number'],
    [`kbfs+https://127.0.0.1:/${ID}/x`, "port ''"],
    [`kbfs://127.0.0.1:1:2/${ID}/x`, "port '1:2'"],
    ['kbfs://127.0.0.1:1/../x', 'malformed share id'],
    [`kbfs://127.0.0.1:1/${ID.toUpperCase()}/x`, 'malformed share id'],
    [`kbfs+https://127.0.0.1/${ID}/a/../../x`, "'..'"],
    [`kbfs+https://127.0.0.1/${ID}/%2e%2e/%2E%2E/x`, "'..'"],
    [`kbfs+https://127.0.0.1/${ID}/a/%2E/x`, "'.'"],
    [`kbfs://127.0.0.1:1/${ID}/a%00b`, 'NUL'],
    [`kbfs://127.0.0.1:1/${ID}/a%5cb`, 'backslash'],
    [`kbfs://127.0.0.1:1/${ID}/${'a/'.repeat(300)}x`, 'too deep'],
    [`kbfs://127.0.0.1:1/${ID}/${'a'.repeat(5000)}`, 'too long'],
    [`KBFS://127.0.0.1:1/${ID}/x`, 'lower case, kbfs://'],
    [`Kbfs+Https://127.0.0.1/${ID}/x`, 'lower case, kbfs+https://'],
    [`kbfs+http://127.0.0.1:1/${ID}/x`, 'an http relay is kbfs://HOST:PORT/...'],
    [`kbfs+wss://127.0.0.1/${ID}/x`, 'unknown kind of kbfs link'],
    [`kbfs://127.0.0.1\n:1/${ID}/x`, 'control character'],
    [`kbfs+https://127.0.0.1\t/${ID}/x`, 'control character'],
    [`kbfs+https://127.0.0.1\u200b/${ID}/x`, 'control character'],
    [`kbfs://[::1/${ID}/x`, 'not HOST:PORT'],
    [`kbfs://[::1]x:1/${ID}/x`, 'not HOST:PORT'],
    ['kbfs+https:///', 'no host'],
    [`kbfs+https://h//x`, 'no share id'],
    [`kbfs+https://h%/${ID}/x`, 'has no valid host'],
    // stricter than Python: what its writer %-encodes, raw
    [`kbfs://127.0.0.1:1/${ID}/x?y`, 'no query'], [`kbfs://127.0.0.1:1/${ID}/a b`, 'no query'],
    [`kbfs://127.0.0.1:1/${ID}/%zz`, 'bad percent-encoding'],
  ];
  for (const [link, words] of bad) {
    for (const parse of [parseLink, parseSource]) {
      let msg = null;
      try {
        parse(link);
      } catch (e) {
        assert.equal(e.name, 'SourceError', link);
        msg = e.message;
      }
      assert.ok(msg !== null, `${JSON.stringify(link.slice(0, 80))} was taken`);
      assert.ok(msg.includes(words) && !msg.includes('\n') && !msg.includes('hunter2') && !msg.includes('alice'), `${link.slice(0, 80)}: ${msg}`);
    }
  }
});

test('kbfs links written: kbfs+https://HOST[:PORT] for https (no :443), kbfs://HOST:PORT for http (80 written)', () => {
  const cases = {
    'https://h': `kbfs+https://h/${ID}/a%20b/c`,
    'https://h:443/': `kbfs+https://h/${ID}/a%20b/c`,
    'https://h:8443': `kbfs+https://h:8443/${ID}/a%20b/c`,
    'https://[::1]:8443': `kbfs+https://[::1]:8443/${ID}/a%20b/c`,
    'http://h:8080': `kbfs://h:8080/${ID}/a%20b/c`,
    'http://h': `kbfs://h:80/${ID}/a%20b/c`, // `kbfs://h/...` would be refused (no port)
    'http://127.0.0.1:80': `kbfs://127.0.0.1:80/${ID}/a%20b/c`,
  };
  for (const [relay, link] of Object.entries(cases)) {
    assert.equal(kbfsLink(relay, ID, 'a b/c'), link, relay);
    assert.deepEqual(parseLink(link), { relay: relayBase(relay), share: ID, path: 'a b/c' }, link);
  }
  // Python's quote(path, safe='/'): only letters, digits and _.-~ stay
  assert.equal(kbfsLink('https://h', ID, "d/it's (1)!*~_.-€ #?%.bin"), `kbfs+https://h/${ID}/d/it%27s%20%281%29%21%2A~_.-%E2%82%AC%20%23%3F%25.bin`);
  assert.equal(kbfsLink('https://h', ID, 'd/'), `kbfs+https://h/${ID}/d/`);
  assert.equal(kbfsLink('https://h', ID), `kbfs+https://h/${ID}/`);
  assert.equal(linkPrefix('https://h:444'), 'kbfs+https://h:444');
  for (const relay of ['ftp://h', 'h:80', '', 'file:///x']) assert.throws(() => linkPrefix(relay), /must be http:\/\/ or https:\/\//, relay);
});

test('an https relay is named kbfs+https:// in the error of a kbfs link', async () => {
  const server = createServer();
  await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
  const { port } = server.address();
  await new Promise((ok) => server.close(ok)); // nothing listens there now: the request fails
  await assert.rejects(openContent(`kbfs+https://127.0.0.1:${port}/${ID}/d/a%20b.bin`, { timeout: 5000 }),
    (e) => e.message.startsWith(`kbfs+https://127.0.0.1:${port}/${ID}/d/a%20b.bin: https://127.0.0.1:${port}: `) || assert.fail(e.message));
  await assert.rejects(openContent(`kbfs://127.0.0.1:${port}/${ID}/x`, { timeout: 5000 }),
    (e) => e.message.startsWith(`kbfs://127.0.0.1:${port}/${ID}/x: http://127.0.0.1:${port}: `) || assert.fail(e.message));
});

test('tokens: only kbfs1 tokens, nothing that could split a header', () => {
  const t = 'kbfs1.eyJzIjoieCJ9.' + 'A'.repeat(43);
  assert.equal(checkToken(t), t);
  assert.equal(checkToken(undefined), '');
  for (const bad of ['Bearer ' + t, t + '\r\nX: y', 'kbfs1..x', 'abc', t + ' x', 'kbfs1.' + 'a'.repeat(5000) + '.' + 'A'.repeat(43), 7]) {
    assert.throws(() => checkToken(bad), /not a kbfs share token/, String(bad).slice(0, 40));
  }
});

test('Kbfs-Proof header: parsed strictly, as kbfs/piecewire.py', () => {
  const n64 = Buffer.alloc(64, 7).toString('base64');
  assert.equal(parseProof(`pieces=2-3; bs=65536; nodes=:${n64}:`, 2, 3, 65536).length, 64);
  assert.equal(parseProof(`pieces=2-3;bs=65536;nodes=::;future=1`, 2, 3, 65536).length, 0);
  assert.throws(() => parseProof(null, 2, 3, 65536), { name: 'NoProof' });
  const bad = [
    [`pieces=2-4; bs=65536; nodes=:${n64}:`, /asked 2-3/], [`pieces=1-3; bs=65536; nodes=::`, /asked 2-3/],
    [`pieces=2-3; bs=131072; nodes=::`, /bs=/], [`pieces=2-3; bs=0x10000; nodes=::`, /bs=/], [`pieces=2-3; nodes=::`, /bs=/],
    [`pieces=2-3; bs=65536`, /nodes=/], [`pieces=2-3; bs=65536; nodes=${n64}`, /nodes=/],
    [`pieces=2-3; bs=65536; nodes=:${n64.replace(/=+$/, '')}:`, /malformed proof/], [`pieces=2-3; bs=65536; nodes=:${n64.slice(1)}:`, /malformed proof/], [`pieces=2-3; bs=65536; nodes=:a=b=:`, /nodes=/],
    [`pieces=2-3; bs=65536; nodes=:not base64!:`, /nodes=/], [`pieces=2-3; pieces=2-3; bs=65536; nodes=::`, /twice/],
    [`pieces=2-3; bs=65536; nodes=:${'A'.repeat(9000)}:`, /at most 8192/], [`pieces=2-3, bs=65536`, /pieces=A-B/],
    [`Pieces=2-3; bs=65536; nodes=::`, /malformed/], [`pieces=-2-3; bs=65536; nodes=::`, /pieces=A-B/],
  ];
  for (const [value, why] of bad) assert.throws(() => parseProof(value, 2, 3, 65536), why, value.slice(0, 60));
});

test('answers: status and Content-Range must be the range asked', () => {
  const res = (status, cr) => new Response('', { status, headers: cr ? { 'Content-Range': cr } : {} });
  checkAnswer(res(206, 'bytes 10-19/100'), 10, 20, 100);
  checkAnswer(res(200), 0, 100, 100);
  for (const [r, why] of [[res(200), /answered 200/], [res(206, 'bytes 11-20/100'), /asked bytes 10-19\/100/],
    [res(206, 'bytes 10-19/101'), /Content-Range/], [res(206), /Content-Range/], [res(206, 'bytes 10-19/*'), /Content-Range/],
    [res(206, 'bytes 10-19/100, 0-1/100'), /Content-Range/], [res(404), /answered 404/]]) {
    assert.throws(() => checkAnswer(r, 10, 20, 100), why);
  }
});

test('bodies: exactly the length expected', async () => {
  const body = (n, headers = {}) => new Response(new Uint8Array(n), { headers });
  assert.equal((await readExactly(body(10), 10)).length, 10);
  await assert.rejects(readExactly(body(9), 10), /body of 9 bytes/);
  await assert.rejects(readExactly(body(11), 10), /longer than/);
  await assert.rejects(readExactly(body(10, { 'Content-Length': '11' }), 10), /Content-Length 11/);
});

test('read() arguments and options', async () => {
  await assert.rejects(openContent(good, { relays: 'http://h:1' }), /a list/);
  await assert.rejects(openContent(good), /give relays/);
  await assert.rejects(openContent(`sha1://${SHA}`), /give relays/);
  await assert.rejects(openContent(good, { relays: ['http://127.0.0.1:1'], token: 'x' }), /not a kbfs share token/);
  const f = await openContent(good, { relays: ['http://127.0.0.1:9'] });
  for (const [o, n] of [[-1, 1], [0, -1], [0.5, 1], [0, Infinity], ['0', 1]]) await assert.rejects(f.read(o, n), RangeError);
  assert.equal((await f.read(5000, 10)).length, 0);
});
