// Hex: one page (4 KiB, 256 lines of 16 bytes) at a time: offset, bytes, printable ASCII.
// Reads only the page shown; previous / next / go to an offset.
import { h } from '../dom.js';
import { parseNumber } from './util.js';

export const PAGE = 4096;

export function hexLines(bytes, base) {
  const lines = [];
  for (let i = 0; i < bytes.length; i += 16) {
    const row = bytes.subarray(i, i + 16);
    const hex = Array.from(row, (b) => b.toString(16).padStart(2, '0'));
    const text = Array.from(row, (b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : '.')).join('');
    const left = hex.slice(0, 8).join(' ');
    const right = hex.slice(8).join(' ');
    lines.push(`${(base + i).toString(16).padStart(10, '0')}  ${left.padEnd(23)}  ${right.padEnd(23)}  |${text}|`);
  }
  return lines.join('\n');
}

export const viewer = {
  id: 'hex',
  label: 'hex',
  match: () => false,  // chosen by hand, or when nothing else fits (preview.js)
  async render(el, ctx) {
    const size = ctx.file.size;
    const pages = Math.ceil(size / PAGE);
    const pre = h('pre', { class: 'hex-view', id: 'hex-view' });
    const where = h('span', { class: 'muted', id: 'hex-where' });
    const input = h('input', { id: 'hex-offset', size: 14, placeholder: 'offset (0x… or decimal)',
      'aria-label': 'offset' });
    let page = 0;
    const show = async (p) => {
      page = Math.max(0, Math.min(pages - 1, p));
      const bytes = await ctx.read(page * PAGE, PAGE);
      if (!ctx.alive()) return;
      pre.textContent = hexLines(bytes, page * PAGE);
      where.textContent = `bytes ${page * PAGE}–${page * PAGE + bytes.length - 1} of ${size} (page ${page + 1} of ${pages})`;
    };
    const go = (ev) => {
      ev.preventDefault();
      const n = parseNumber(input.value);
      if (Number.isFinite(n)) show(Math.floor(n / PAGE));
    };
    el.append(h('form', { class: 'controls', onsubmit: go },
      h('button', { type: 'button', id: 'hex-prev', onclick: () => show(page - 1) }, '◀ previous'),
      h('button', { type: 'button', id: 'hex-next', onclick: () => show(page + 1) }, 'next ▶'),
      input, h('button', { type: 'submit', id: 'hex-go' }, 'go'), ' ', where), h('div', { class: 'scroller' }, pre));
    await show(0);
  },
};
