// Copied from js/sources.js by js/vendor.mjs: edit js/sources.js, then run `node js/vendor.mjs`.
// The relays a kbfs.js file is read from: their order, failover and penalties, the token.
//
// Each request goes to the best relay first and, on any error (unreachable, an error
// status, a timeout, a wrong length, range, tree or proof), to the next one. A relay that
// sent bytes or nodes that failed verification goes last for LIAR_MS; one that failed
// otherwise goes after the others for FAIL_MS. The token of a private share goes only to
// relays marked `trusted` (the ones the caller listed and the one a kbfs:// path names),
// never to a pointer's source hints (docs/usage.md, "Private shares"; kbfs/fetch.py).
//
// What it does not do: verify anything (readers.js does, then reports a lie here).

import { VerificationError } from './tree.js';
import { NoProof, cancel, readText } from './wire.js';

const FAIL_MS = 10_000;
const LIAR_MS = 300_000;
const TOKEN_RE = /^kbfs1\.[A-Za-z0-9_-]{1,4000}\.[A-Za-z0-9_-]{16,100}$/;

export class ReadError extends Error {
  constructor(message, { status = 0 } = {}) {
    super(message);
    this.name = 'ReadError';
    this.status = status;
  }
}

export class HTTPStatusError extends Error {
  constructor(status, message) {
    super(message);
    this.name = 'HTTPStatusError';
    this.status = status;
  }
}

export function checkToken(token) {
  if (token === undefined || token === null || token === '') return '';
  if (typeof token !== 'string' || token.length > 4096 || !TOKEN_RE.test(token.trim())) {
    throw new ReadError('token: not a kbfs share token (kbfs1.PAYLOAD.MAC, from `kbfs share token DIR`)');
  }
  return token.trim();
}

function why(e) {
  if (e instanceof HTTPStatusError || e instanceof VerificationError || e instanceof NoProof) return e.message;
  if (e?.name === 'TimeoutError' || e?.name === 'AbortError') return e.message === 'no answer' ? 'no answer within the first-byte timeout' : 'timed out';
  const cause = e?.cause?.code || e?.cause?.message;
  return cause ? `unreachable (${cause})` : `unreachable (${e?.message ?? e})`;
}

export class Relays {
  // LIST: [{base, trusted}] in preference order; TOKEN: '' or a checked token.
  constructor(list, { token = '', fetch, timeout = 30_000, firstByteTimeout = 5_000 } = {}) {
    this.list = list.map((r, i) => ({ ...r, i, until: 0, rank: 0 }));
    this.token = token;
    this.fetchFn = fetch ? (url, init) => fetch.call(globalThis, url, init) : (url, init) => globalThis.fetch(url, init);
    this.timeout = timeout;
    this.firstByteTimeout = firstByteTimeout;
    this.stats = { requests: 0, bytes: 0, failovers: 0, lies: 0 };
  }

  order() {
    const now = Date.now();
    const rank = (r) => (r.until > now ? r.rank : 0);
    return [...this.list].sort((x, y) => rank(x) - rank(y) || x.i - y.i);
  }

  // GET relay.base + PATH with HEADERS (plus the token for a trusted relay); an answer
  // that is not 2xx is an HTTPStatusError (its body dropped).
  // EXPECT: the body's size, which adds a second per MB to the timeout (a slow link).
  async get(relay, path, headers = {}, expect = 0) {
    const h = { ...headers };
    if (this.token && relay.trusted) h.Authorization = `Bearer ${this.token}`;
    this.stats.requests++;
    // Two deadlines on one signal: the answer's head within firstByteTimeout (a silent relay
    // costs seconds, then the next is asked), the whole body within timeout (+1 s per MB).
    // A timer firing after the body was read aborts nothing.
    const ctl = new AbortController();
    const stop = (why) => () => ctl.abort(new DOMException(why, 'TimeoutError'));
    const head = setTimeout(stop('no answer'), this.firstByteTimeout);
    const all = setTimeout(stop('timed out'), Math.ceil(this.timeout + expect / 1000));
    all.unref?.(); // Node: a pending deadline does not keep the process alive
    let res;
    try {
      res = await this.fetchFn(relay.base + path, {
        headers: h,
        cache: 'no-store', // our own LRU holds verified bytes; a cached 206 may carry another range's proof
        redirect: 'error',
        signal: ctl.signal,
      });
    } finally {
      clearTimeout(head);
    }
    if (res.status < 200 || res.status > 299) {
      let detail = '';
      try {
        detail = JSON.parse(await readText(res, 16384)).error ?? ''; // bounded: a liar's error page
      } catch {
        await cancel(res);
      }
      // A relay answers 401 to a private share's listing for a token it does not accept too.
      const msg = (res.status === 401 && h.Authorization) || res.status === 403 ? 'did not accept the token given'
        : res.status === 401 ? 'private share: give its token'
          : `HTTP ${res.status}`;
      throw new HTTPStatusError(res.status, detail ? `${msg} (${String(detail).slice(0, 200)})` : msg);
    }
    return res;
  }

  // Run FN(relay) on each relay in turn until one succeeds; WHAT names the request in the
  // error that says why each relay failed.
  async attempt(what, fn) {
    const reasons = [];
    let status = 0;
    for (const relay of this.order()) {
      try {
        const out = await fn(relay);
        relay.until = 0;
        return out;
      } catch (e) {
        const lie = e instanceof VerificationError;
        if (lie) this.stats.lies++;
        relay.rank = lie ? 2 : 1;
        relay.until = Date.now() + (lie ? LIAR_MS : FAIL_MS);
        this.stats.failovers++;
        if (e instanceof HTTPStatusError && (!status || e.status === 401 || e.status === 403)) status = e.status;
        reasons.push(`${relay.base}: ${why(e)}`);
      }
    }
    if (!reasons.length) throw new ReadError(`${what}: no relay to ask`);
    throw new ReadError(`${what}: ${reasons.join('; ')}`, { status });
  }
}
