// MountainLab .mda timeseries (M channels x N timepoints) as a multichannel trace viewer:
// pan (drag, arrow keys, buttons) and zoom (time and amplitude). Only the window on screen
// is read (one contiguous range: timepoints are whole columns), then its two neighbours are
// prefetched. A screen never costs more than SCREEN_BUDGET bytes: a window larger than that
// is drawn as a coarse overview from evenly spread one-piece reads (mdaformat.planWindow),
// marked as such. A "view link" (viewstate.js) reopens the same content and state on any
// relay; a private share's token goes into it only when the user ticks the box.
//
// ctx (preview.js or view.js): file, read, alive, status, name; optional: state (the view
// link's), share / token (a private share's), linkBase (where view links point).
// Test hooks: the viewer element's data-* (t0, w, ch, amp, mode, draws, probe, screen-bytes)
// and the list #mda-reads (each read: data-kind show|prefetch, data-offset, data-length).
import { h } from '../dom.js';
import { ViewError, viewFragment } from '../viewstate.js';
import { decode } from './dtypes.js';
import { HEADER_READ, decimate, parseHeader, planWindow } from './mdaformat.js';
import { AXIS, GUTTER, drawTraces } from './traces.js';
import { ext } from './util.js';

export const SCREEN_BUDGET = 2 << 20; // bytes of data one screen may read
const FIRST_SCREEN = 512 << 10; // bytes of the default first window (fast to open)
const MAX_LANES = 64;
const MIN_W = 16;

function niceUp(v) {
  if (!(v > 0) || !Number.isFinite(v)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

export const viewer = {
  id: 'mda',
  label: '.mda timeseries',
  match: (name) => ext(name) === 'mda',
  async render(el, ctx) {
    const file = ctx.file;
    // At t = 0 (a recording opened from its start) the first window follows the header in
    // the same pieces: one request for both saves a round trip before the first screen.
    const head = !(ctx.state && ctx.state.t) ? FIRST_SCREEN + HEADER_READ : HEADER_READ;
    const hdr = parseHeader(await ctx.read(0, Math.min(file.size, head)), file.size);
    if (!ctx.alive()) return;
    const M = hdr.channels;
    const N = hdr.samples;
    const stride = M * hdr.bpe;
    const given = ctx.state || {};
    const s = { ch: [0, Math.min(M, 32) - 1], t: 0, w: 0, a: 0 };
    if (given.ch) s.ch = [Math.min(given.ch[0], M - 1), Math.min(given.ch[1], M - 1)];
    if (s.ch[1] - s.ch[0] + 1 > MAX_LANES) s.ch[1] = s.ch[0] + MAX_LANES - 1;
    s.w = Math.max(1, Math.min(N, given.w || Math.max(MIN_W, Math.floor(FIRST_SCREEN / stride))));
    s.t = Math.max(0, Math.min(given.t || 0, N - s.w));
    s.a = given.a || 0;
    const block = file.blockSize || 65536;

    const canvas = h('canvas', { id: 'mda-canvas', tabindex: 0, 'aria-label': 'traces; arrows pan and zoom' });
    canvas.style.maxWidth = '100%';
    canvas.style.border = '1px solid #d9dee7';
    canvas.style.touchAction = 'none';
    canvas.style.cursor = 'grab';
    const info = h('div', { class: 'muted', id: 'mda-info' });
    const reads = h('ol', { id: 'mda-reads', hidden: true });
    const chInput = h('input', { id: 'mda-channels', size: 9, 'aria-label': 'channels', value: '' });
    const tInput = h('input', { id: 'mda-t', size: 12, 'aria-label': 'first timepoint', value: '' });
    const linkBox = h('input', { id: 'view-link', readonly: true, size: 60, 'aria-label': 'view link' });
    const withToken = h('input', { type: 'checkbox', id: 'link-token' });
    const warn = h('span', { class: 'error', id: 'link-token-warning', hidden: true },
      'The link now holds your token: anyone who gets it can read the whole private share until the token expires.');
    const btn = (id, label, title, fn) => h('button', { type: 'button', id, title, onclick: () => { fn(); update(); } }, label);
    const pan = (f) => { s.t = Math.round(s.t + f * s.w); };
    const zoomT = (f) => { const mid = s.t + s.w / 2; s.w = Math.round(s.w * f); clamp(); s.t = Math.round(mid - s.w / 2); };
    const bar = h('div', { class: 'controls' },
      btn('mda-start', '|◀', 'start', () => { s.t = 0; }),
      btn('mda-back', '◀◀', 'back one screen', () => pan(-1)),
      btn('mda-left', '◀', 'back a quarter', () => pan(-0.25)),
      btn('mda-right', '▶', 'on a quarter', () => pan(0.25)),
      btn('mda-next', '▶▶', 'on one screen', () => pan(1)),
      btn('mda-end', '▶|', 'end', () => { s.t = N; }),
      ' time ', btn('mda-zoom-out', '−', 'more time (zoom out)', () => zoomT(2)),
      btn('mda-zoom-in', '+', 'less time (zoom in)', () => zoomT(0.5)),
      ' amplitude ', btn('mda-amp-down', '−', 'smaller traces', () => { s.a *= 2; }),
      btn('mda-amp-up', '+', 'larger traces', () => { s.a /= 2; }),
      h('form', { id: 'mda-form', onsubmit: (ev) => { ev.preventDefault(); applyInputs(); update(); } },
        h('label', {}, ' channels ', chInput), ' ', h('label', {}, 't ', tInput), ' ',
        h('button', { type: 'submit', id: 'mda-go' }, 'go')));
    const copy = h('button', { type: 'button', id: 'copy-view-link' }, 'copy view link');
    copy.addEventListener('click', async () => {
      try { await navigator.clipboard.writeText(linkBox.value); copy.textContent = 'copied'; } catch {
        linkBox.select(); copy.textContent = 'select + Ctrl-C';
      }
      setTimeout(() => { copy.textContent = 'copy view link'; }, 1500);
    });
    withToken.addEventListener('change', () => { warn.hidden = !withToken.checked; showLink(); });
    const linkRow = h('div', { class: 'controls', id: 'view-link-row' }, copy, ' ', linkBox,
      ctx.token ? h('label', {}, ' ', withToken, ' put my token in the link') : null, ' ', warn);
    el.append(h('p', { class: 'muted', id: 'mda-header' },
      `${M} channels × ${N} timepoints of ${hdr.dtype} (${hdr.dims.join(' × ')}), data from byte ${hdr.dataStart}`),
    bar, canvas, info, linkRow, reads);

    function clamp() {
      s.w = Math.max(Math.min(MIN_W, N), Math.min(N, s.w));
      s.t = Math.max(0, Math.min(s.t, N - s.w));
    }
    function applyInputs() {
      const m = /^\s*([0-9]+)\s*(?:-\s*([0-9]+))?\s*$/.exec(chInput.value);
      if (m) {
        const a = Math.min(Number(m[1]), M - 1);
        const b = Math.min(m[2] === undefined ? a : Number(m[2]), M - 1, a + MAX_LANES - 1);
        if (b >= a) s.ch = [a, b];
      }
      const t = Number(tInput.value.trim());
      if (Number.isSafeInteger(t) && t >= 0) s.t = t;
    }
    const view = { sha1: file.sha1, name: ctx.name || file.name, size: file.size, root: file.root, bs: block,
      share: ctx.private ? ctx.share : '' };
    function showLink() {
      if (!file.root) { linkBox.value = 'no view link: this pointer has no tree root'; return; }
      const base = ctx.linkBase || `${location.origin}/v/`;
      linkBox.value = base + '#' + viewFragment(view, s, withToken.checked ? ctx.token : '');
      if (ctx.onState) ctx.onState(viewFragment(view, s));
    }

    const log = (kind, r) => reads.append(h('li', { dataset: { kind, offset: r.offset, length: r.length } }));
    log('header', { offset: 0, length: Math.min(file.size, head) });
    let pending = 0; // reads under way (data-pending: a test waits for 0)
    const load = async (r, kind) => {
      log(kind, r);
      el.dataset.pending = ++pending;
      try {
        return { t: r.t, n: r.n, values: decode(await ctx.read(r.offset, r.length), hdr.dtype, true) };
      } finally { el.dataset.pending = --pending; }
    };
    let draws = 0;
    let busy = false;
    let again = false;
    async function drawOnce() {
      const st = { ...s, ch: [...s.ch] };
      const plan = planWindow(hdr, st.t, st.w, SCREEN_BUDGET, block);
      const chunks = await Promise.all(plan.reads.map((r) => load(r, 'show')));
      if (!ctx.alive()) return;
      const chans = [];
      for (let c = st.ch[0]; c <= st.ch[1]; c++) chans.push(c);
      const width = Math.max(200, Math.floor((el.clientWidth || 900) - 2));
      canvas.width = width;
      canvas.height = Math.max(160, Math.min(560, chans.length * 26)) + AXIS;
      const dec = decimate(chunks, M, chans, st.t, st.w, width - GUTTER);
      // each lane centred on its channel's middle value on this screen (offsets removed)
      const centre = chans.map((_, c) => {
        let lo = Infinity;
        let hi = -Infinity;
        for (let x = 0; x < dec.min[c].length; x++) {
          if (dec.min[c][x] < lo) lo = dec.min[c][x];
          if (dec.max[c][x] > hi) hi = dec.max[c][x];
        }
        return lo <= hi ? { mid: (lo + hi) / 2, half: (hi - lo) / 2 } : { mid: 0, half: 0 };
      });
      for (let c = 0; c < chans.length; c++) {
        for (let x = 0; x < dec.min[c].length; x++) { dec.min[c][x] -= centre[c].mid; dec.max[c][x] -= centre[c].mid; }
      }
      if (!s.a) s.a = st.a = niceUp(Math.max(...centre.map((c) => c.half))); // first screen: the widest fills its lane
      const note = plan.mode === 'sparse'
        ? `overview: ${plan.reads.length} sparse reads of one piece each (a screen reads at most ${SCREEN_BUDGET >> 20} MiB); zoom in to see every timepoint`
        : '';
      drawTraces(canvas, { dec, labels: chans.map((c) => `ch ${c}`), amp: st.a, t0: st.t, w: st.w, note,
        gaps: plan.mode === 'sparse' });
      const screenBytes = plan.reads.reduce((n, r) => n + r.length, 0);
      const first = plan.mode === 'full' && chunks.length ? chans.map((c) => String(chunks[0].values[c])).join(',') : '';
      Object.assign(el.dataset, { t0: st.t, w: st.w, ch: `${st.ch[0]}-${st.ch[1]}`, amp: st.a, mode: plan.mode,
        probe: first, screenBytes, draws: ++draws, drawnAt: performance.now().toFixed(1) });
      info.textContent = `timepoints ${st.t}–${st.t + st.w - 1} of ${N} · channels ${st.ch[0]}–${st.ch[1]} of ${M} · ` +
        `±${st.a} per lane · this screen read ${(screenBytes / 1024).toFixed(0)} KiB` +
        (plan.mode === 'sparse' ? ' (coarse overview)' : '');
      chInput.value = `${st.ch[0]}-${st.ch[1]}`;
      if (document.activeElement !== tInput) tInput.value = String(st.t);
      showLink();
      if (plan.mode === 'full') {  // the neighbours, so a pan shows at once (not awaited)
        for (const t of [st.t + st.w, st.t - st.w]) {
          const p = planWindow(hdr, Math.max(0, t), Math.min(st.w, N - Math.max(0, t)), SCREEN_BUDGET, block);
          if (t >= 0 && t < N && p.mode === 'full') for (const r of p.reads) load(r, 'prefetch').catch(() => {});
        }
      }
    }
    async function update() {
      clamp();
      if (busy) { again = true; return; }
      busy = true;
      try {
        do { again = false; await drawOnce(); } while (again && ctx.alive());
      } catch (err) {
        if (ctx.alive()) { info.textContent = `Cannot draw: ${err.message || err}`; info.className = 'error'; }
      } finally { busy = false; }
    }
    ctx.update = (state) => {  // a new view state (view.js: the link's fragment changed)
      if (state.ch) s.ch = [Math.min(state.ch[0], M - 1), Math.min(state.ch[1], M - 1, state.ch[0] + MAX_LANES - 1)];
      for (const k of ['t', 'w', 'a']) if (state[k]) s[k] = state[k];
      update();
    };

    canvas.addEventListener('keydown', (ev) => {
      const keys = {
        ArrowLeft: () => pan(ev.shiftKey ? -1 : -0.25), ArrowRight: () => pan(ev.shiftKey ? 1 : 0.25),
        PageUp: () => pan(-1), PageDown: () => pan(1), Home: () => { s.t = 0; }, End: () => { s.t = N; },
        '+': () => zoomT(0.5), '=': () => zoomT(0.5), '-': () => zoomT(2),
        ArrowUp: () => { s.a /= 2; }, ArrowDown: () => { s.a *= 2; },
      };
      if (!keys[ev.key]) return;
      ev.preventDefault();
      keys[ev.key]();
      update();
    });
    let drag = null;
    canvas.addEventListener('pointerdown', (ev) => {
      drag = { x: ev.clientX, t: s.t };
      canvas.setPointerCapture(ev.pointerId);
      canvas.style.cursor = 'grabbing';
      canvas.focus();
    });
    canvas.addEventListener('pointermove', (ev) => {
      if (!drag) return;
      s.t = Math.round(drag.t - ((ev.clientX - drag.x) / Math.max(1, canvas.width - GUTTER)) * s.w);
      update();
    });
    const end = () => { drag = null; canvas.style.cursor = 'grab'; };
    canvas.addEventListener('pointerup', end);
    canvas.addEventListener('pointercancel', end);
    if (given.ch && given.ch[0] >= M) throw new ViewError(`the view asks for channel ${given.ch[0]}; the file has ${M}`);
    await update();
  },
};
