// Test support: an HTTP server on 127.0.0.1 that forwards kbfs reads to a real relay and
// lies about the answer on purpose (MODES), and a recorder that notes the headers it got.
// Not part of the package; used by js/test/relay.test.js.
import { createServer } from 'node:http';

export const MODES = [
  'ok', // honest pass-through
  'flip-byte', // one body byte flipped, same length
  'flip-proof', // one byte of one Kbfs-Proof node flipped
  'proof-label', // the proof relabelled as pieces A+1-B+1
  'bs-label', // the proof relabelled as bs=2N
  'short-proof', // the proof minus its last node
  'drop-proof', // no Kbfs-Proof header
  'garbage-proof', // nodes=:not base64!:
  'short-body', // the body minus its last byte (Content-Length to match)
  'long-body', // the body plus one byte (Content-Length to match)
  'shift', // bytes and proof of the next pieces, labelled as the ones asked
  'content-range', // the right bytes under a Content-Range one byte off
  'tree-flip', // /tree/: one leaf byte flipped
  'tree-short', // /tree/: the last leaf missing
  'whole-flip', // a body without Range (root-less content) with one byte flipped
  'stall', // accepts the request and never answers
  'error-flood', // a 500 whose body is 64 MiB of JSON-looking bytes (counted in `flooded`)
];

function b64flip(value, edit) {
  const m = /nodes=:([A-Za-z0-9+/=]*):/.exec(value);
  const raw = Buffer.from(m[1], 'base64');
  return value.replace(m[0], `nodes=:${edit(raw).toString('base64')}:`);
}

const FORWARD = ['range', 'kbfs-want-proof', 'authorization'];

// Start a liar in front of UPSTREAM; returns {url, mode (settable), seen, close()}.
export async function startLiar(upstream, mode = 'ok') {
  const state = { mode, seen: [], flooded: 0 };
  const server = createServer(async (req, res) => {
    state.seen.push({ url: req.url, headers: req.headers });
    if (state.mode === 'stall') return; // closed by close()
    if (state.mode === 'error-flood') {
      res.writeHead(500, { 'content-type': 'application/json', 'access-control-allow-origin': '*' });
      const chunk = Buffer.alloc(65536, 0x20);
      let closed = false;
      res.on('close', () => { closed = true; });
      for (let sent = 0; sent < 64 << 20 && !closed; sent += chunk.length) {
        state.flooded += chunk.length;
        if (!res.write(chunk)) await new Promise((r) => { res.once('drain', r); res.once('close', r); });
      }
      res.end();
      return;
    }
    const headers = {};
    for (const h of FORWARD) if (req.headers[h]) headers[h] = req.headers[h];
    let range = req.headers.range;
    const m = range && /^bytes=(\d+)-(\d+)$/.exec(range);
    let shifted = null;
    if (state.mode === 'shift' && m) {
      const want = req.headers['kbfs-want-proof'];
      const bs = want ? Number(/bs=(\d+)/.exec(want)[1]) : 1 << 20; // v1: shift by a block
      const [s, e] = [Number(m[1]), Number(m[2])];
      shifted = { s, e, bs };
      headers.range = `bytes=${s + bs}-${e + bs}`;
      if (want) headers['kbfs-want-proof'] = `bs=${bs}`; // the full proof of the other pieces
    }
    let up;
    try {
      up = await fetch(upstream + req.url, { headers });
    } catch {
      res.writeHead(502).end();
      return;
    }
    let body = Buffer.from(await up.arrayBuffer());
    const out = {};
    for (const h of ['content-type', 'content-range', 'kbfs-proof', 'etag']) {
      const v = up.headers.get(h);
      if (v !== null) out[h] = v;
    }
    const isTree = req.url.startsWith('/tree/');
    const md = state.mode;
    if (md === 'flip-byte' && req.url.startsWith('/sha1/') && body.length) body[body.length >> 1] ^= 1;
    if (md === 'whole-flip' && !range && req.url.startsWith('/sha1/') && body.length) body[0] ^= 1;
    if (out['kbfs-proof']) {
      if (md === 'flip-proof') out['kbfs-proof'] = b64flip(out['kbfs-proof'], (r) => { if (r.length) r[0] ^= 1; return r; });
      if (md === 'short-proof') out['kbfs-proof'] = b64flip(out['kbfs-proof'], (r) => r.subarray(0, Math.max(0, r.length - 32)));
      if (md === 'garbage-proof') out['kbfs-proof'] = out['kbfs-proof'].replace(/nodes=:[^:]*:/, 'nodes=:not base64!:');
      if (md === 'drop-proof') delete out['kbfs-proof'];
      if (md === 'bs-label') out['kbfs-proof'] = out['kbfs-proof'].replace(/bs=(\d+)/, (_, n) => `bs=${2 * Number(n)}`);
      if (md === 'proof-label') {
        out['kbfs-proof'] = out['kbfs-proof'].replace(/pieces=(\d+)-(\d+)/, (_, a, b) => `pieces=${Number(a) + 1}-${Number(b) + 1}`);
      }
      if (shifted) {
        const a = shifted.s / shifted.bs;
        const b = Math.ceil((shifted.e + 1) / shifted.bs);
        out['kbfs-proof'] = out['kbfs-proof'].replace(/pieces=\d+-\d+/, `pieces=${a}-${b}`);
      }
    }
    if (shifted && out['content-range']) {
      const size = out['content-range'].split('/')[1];
      out['content-range'] = `bytes ${shifted.s}-${shifted.s + body.length - 1}/${size}`;
    }
    if (md === 'content-range' && out['content-range']) {
      out['content-range'] = out['content-range'].replace(/^bytes (\d+)-(\d+)/, (_, a, b) => `bytes ${Number(a) + 1}-${Number(b) + 1}`);
    }
    if (md === 'short-body' && req.url.startsWith('/sha1/')) body = body.subarray(0, body.length - 1);
    if (md === 'long-body' && req.url.startsWith('/sha1/')) body = Buffer.concat([body, Buffer.from([0])]);
    if (md === 'tree-flip' && isTree && body.length) body[0] ^= 1;
    if (md === 'tree-short' && isTree) body = body.subarray(0, Math.max(0, body.length - 32));
    out['content-length'] = String(body.length);
    out['access-control-allow-origin'] = '*';
    res.writeHead(up.status, out);
    res.end(body);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const url = `http://127.0.0.1:${server.address().port}`;
  return {
    url,
    seen: state.seen,
    set mode(v) {
      if (!MODES.includes(v)) throw new Error(`unknown mode ${v}`);
      state.mode = v;
    },
    get mode() {
      return state.mode;
    },
    get flooded() {
      return state.flooded;
    },
    close: () => new Promise((r) => { server.closeAllConnections?.(); server.close(r); }),
  };
}
