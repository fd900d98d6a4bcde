// Copied from js/wire.js by js/vendor.mjs: edit js/wire.js, then run `node js/vendor.mjs`.
// kbfs.js's side of the HTTP wire: the Kbfs-Want-Proof / Kbfs-Proof headers (strictly as
// kbfs/piecewire.py parses them), the Content-Range of an answer, and bodies read with a
// bound (docs/pieces.md "Serving pieces", docs/protocol.md).
//
// What it does not do: choose relays or retry (kbfs.js), hash anything (tree.js). A missing
// Kbfs-Proof is a NoProof (the source offers none: not a lie); anything wrong in a header
// that is there, or in a body, is a VerificationError.

import { VerificationError } from './tree.js';

export const WANT_HEADER = 'Kbfs-Want-Proof';
export const PROOF_HEADER = 'Kbfs-Proof';
export const MAX_PROOF_HEADER = 8192; // piecewire.MAX_PROOF_HEADER

export class NoProof extends Error {
  constructor(message) {
    super(message);
    this.name = 'NoProof';
  }
}

export function wantValue(blockSize, anchor = null) {
  return anchor ? `bs=${blockSize}; below=${anchor[0]}.${anchor[1]}` : `bs=${blockSize}`;
}

const PARAM_RE = /^([a-z]+)=(.*)$/s;
const PIECES_RE = /^([0-9]{1,20})-([0-9]{1,20})$/;
const NUMBER_RE = /^[0-9]{1,20}$/;
const NODES_RE = /^:([A-Za-z0-9+/]*={0,2}):$/;

// The proof bytes of a Kbfs-Proof VALUE that must be for pieces [a, b) of BLOCK_SIZE.
export function parseProof(value, a, b, blockSize) {
  if (value === null || value === undefined) throw new NoProof(`no ${PROOF_HEADER} header`);
  if (value.length > MAX_PROOF_HEADER) {
    throw new VerificationError(`${PROOF_HEADER} of ${value.length} characters (at most ${MAX_PROOF_HEADER})`);
  }
  const params = new Map();
  for (const part of value.split(';')) {
    const m = PARAM_RE.exec(part.trim());
    if (!m) throw new VerificationError(`malformed ${PROOF_HEADER} parameter ${JSON.stringify(part.trim().slice(0, 40))}`);
    if (params.has(m[1])) throw new VerificationError(`${PROOF_HEADER} names ${m[1]} twice`);
    params.set(m[1], m[2]);
  }
  const pm = PIECES_RE.exec(params.get('pieces') ?? '');
  if (!pm) throw new VerificationError(`${PROOF_HEADER} without pieces=A-B`);
  if (Number(pm[1]) !== a || Number(pm[2]) !== b) {
    throw new VerificationError(`${PROOF_HEADER} is for pieces ${pm[1]}-${pm[2]}, asked ${a}-${b}`);
  }
  const bs = params.get('bs') ?? '';
  if (!NUMBER_RE.test(bs) || Number(bs) !== blockSize) {
    throw new VerificationError(`${PROOF_HEADER} is for bs=${bs.slice(0, 20)}, asked bs=${blockSize}`);
  }
  const nm = NODES_RE.exec(params.get('nodes') ?? '');
  if (!nm) throw new VerificationError(`${PROOF_HEADER} without nodes=:BASE64:`);
  return decodeBase64(nm[1]);
}

// Strict base64 (Python's b64decode(validate=True)): whole quanta, padding only at the end.
export function decodeBase64(text) {
  if (text.length % 4) throw new VerificationError(`malformed proof header: ${text.length} base64 characters`);
  let bin;
  try {
    bin = atob(text);
  } catch {
    throw new VerificationError('malformed proof header: not base64');
  }
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

const CONTENT_RANGE_RE = /^bytes ([0-9]{1,20})-([0-9]{1,20})\/([0-9]{1,20})$/;

// Check that an answer is the bytes [start, end) of a SIZE-byte representation: a 206 with
// exactly that Content-Range, or a 200 when the whole of it was asked. Returns nothing.
export function checkAnswer(res, start, end, size) {
  if (res.status === 200 && start === 0 && end === size) return;
  if (res.status !== 206) throw new VerificationError(`answered ${res.status} to a range request`);
  const cr = res.headers.get('Content-Range');
  const m = CONTENT_RANGE_RE.exec((cr ?? '').trim());
  if (!m || Number(m[1]) !== start || Number(m[2]) !== end - 1 || Number(m[3]) !== size) {
    throw new VerificationError(`Content-Range ${JSON.stringify((cr ?? '').slice(0, 80))}; asked bytes ${start}-${end - 1}/${size}`);
  }
}

// The body of RES, which must be exactly EXPECT bytes: a longer or shorter one is refused
// (a longer one before more than EXPECT + one chunk is read).
export async function readExactly(res, expect) {
  const cl = res.headers.get('Content-Length');
  if (cl !== null && /^[0-9]+$/.test(cl.trim()) && Number(cl) !== expect) {
    await cancel(res);
    throw new VerificationError(`Content-Length ${cl}; expected ${expect}`);
  }
  const out = new Uint8Array(expect);
  let got = 0;
  if (!res.body) {
    if (expect) throw new VerificationError(`empty body; expected ${expect} bytes`);
    return out;
  }
  const reader = res.body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (got + value.length > expect) {
      await reader.cancel().catch(() => {});
      throw new VerificationError(`body longer than the ${expect} bytes asked`);
    }
    out.set(value, got);
    got += value.length;
  }
  if (got !== expect) throw new VerificationError(`body of ${got} bytes; expected ${expect}`);
  return out;
}

// At most LIMIT bytes of RES's body as text (JSON answers: /api/find, listings).
export async function readText(res, limit) {
  const cl = res.headers.get('Content-Length');
  if (cl !== null && Number(cl) > limit) {
    await cancel(res);
    throw new VerificationError(`answer of ${cl} bytes (at most ${limit})`);
  }
  const chunks = [];
  let got = 0;
  if (res.body) {
    const reader = res.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      got += value.length;
      if (got > limit) {
        await reader.cancel().catch(() => {});
        throw new VerificationError(`answer longer than ${limit} bytes`);
      }
      chunks.push(value);
    }
  }
  const all = new Uint8Array(got);
  let at = 0;
  for (const c of chunks) {
    all.set(c, at);
    at += c.length;
  }
  return new TextDecoder().decode(all);
}

export async function cancel(res) {
  try {
    await res.body?.cancel();
  } catch {
    // the connection is dropped either way
  }
}
