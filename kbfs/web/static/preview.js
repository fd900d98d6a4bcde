// The preview of one file: a choice of viewers (viewers/*.js, one module each), the one its
// name suggests first. Each viewer reads only what it shows, through kbfs.js's read()
// (verified bytes). The bytes asked are listed under the preview (`#read-log`), so what a
// view costs is visible.
//
// A viewer module exports `viewer = { id, label, match(name, size) -> bool,
// render(el, ctx) }`; ctx: { file (kbfs.js: size, sha1, name, read), read(offset, length)
// (file.read, logged), alive() (false once another file or viewer is chosen), name,
// status(text) }. Adding a viewer: a new file in viewers/ and one line in VIEWERS.
import { fill, fmtSize, h } from './dom.js';
import { viewer as csv } from './viewers/csv.js';
import { viewer as hex } from './viewers/hex.js';
import { viewer as image } from './viewers/image.js';
import { viewer as mda } from './viewers/mda.js';
import { viewer as npy } from './viewers/npy.js';
import { viewer as raw } from './viewers/raw.js';
import { viewer as text } from './viewers/text.js';

// Order: the first that matches a name is the default; text, hex, raw match anything.
export const VIEWERS = [csv, npy, mda, image, text, hex, raw];

let generation = 0;

export function register(viewer, first = true) {
  if (first) VIEWERS.unshift(viewer); else VIEWERS.push(viewer);
}

function defaultViewer(name, size) {
  return VIEWERS.find((v) => v.match(name, size)) || hex;
}

export async function showPreview(el, share, f) {
  const mine = ++generation;
  const alive = () => mine === generation && el.isConnected;
  const select = h('select', { id: 'viewer-choice', 'aria-label': 'viewer' },
    VIEWERS.map((v) => h('option', { value: v.id }, v.label)));
  const status = h('span', { class: 'muted', id: 'preview-status' });
  const body = h('div', { class: 'preview-body', id: 'preview-body' });
  const log = h('details', { class: 'read-log' }, h('summary', { id: 'read-summary' }, 'bytes read: none'),
    h('ol', { id: 'read-log' }));
  fill(el, h('h3', {}, 'Preview ', select, ' ', status), body, log);
  if (f.size === 0) { fill(body, h('p', { class: 'muted' }, 'The file is empty.')); return; }
  status.textContent = 'opening…';
  let file;
  try {
    const { openContent } = await import('./lib/kbfs.js');
    file = await openContent(f.prv, { relays: [location.origin], token: share.token || undefined });
  } catch (err) {
    if (alive()) { status.textContent = ''; fill(body, h('p', { class: 'error' }, `Cannot open: ${err.message || err}`)); }
    return;
  }
  if (!alive()) return;
  status.textContent = '';
  let total = 0;
  const read = async (offset, length) => {
    const want = Math.max(0, Math.min(length, file.size - offset));
    if (want === 0) return new Uint8Array(0);
    const bytes = await file.read(offset, want);
    total += bytes.length;
    log.querySelector('#read-log').append(h('li', { dataset: { offset, length: bytes.length } },
      `${offset}–${offset + bytes.length - 1} (${fmtSize(bytes.length)})`));
    log.querySelector('#read-summary').textContent =
      `bytes read: ${fmtSize(total)} of ${fmtSize(file.size)} in ${log.querySelectorAll('#read-log li').length} reads`;
    return bytes;
  };
  const run = async (viewer) => {
    const my = ++generation;
    const ctx = { file, read, name: f.name, alive: () => my === generation && el.isConnected,
      share: share.id, private: !!share.private, token: share.token || '', // for mda.js's view links
      status: (t) => { if (ctx.alive()) status.textContent = t; } };
    fill(body);
    body.dataset.viewer = viewer.id;
    try {
      await viewer.render(body, ctx);
    } catch (err) {
      if (ctx.alive()) fill(body, h('p', { class: 'error' }, `${viewer.label}: ${err.message || err}`));
    }
  };
  const first = defaultViewer(f.name, f.size);
  select.value = first.id;
  select.addEventListener('change', () => run(VIEWERS.find((v) => v.id === select.value)));
  await run(first);
}
