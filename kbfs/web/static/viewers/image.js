// Images (PNG, JPEG, GIF, WebP, BMP, SVG, ICO, AVIF): an image is shown whole, so the
// whole file is read (up to MAX_BYTES), verified, and handed to an <img> as a blob: URL.
// An SVG in an <img> runs no script.
import { h } from '../dom.js';
import { ext } from './util.js';

const TYPES = { png: 'image/png', jpg: 'image/jpeg', jpeg: 'image/jpeg', gif: 'image/gif',
  webp: 'image/webp', bmp: 'image/bmp', svg: 'image/svg+xml', ico: 'image/x-icon', avif: 'image/avif' };
const MAX_BYTES = 64 << 20;
const CHUNK = 4 << 20;

export const viewer = {
  id: 'image',
  label: 'image',
  match: (name) => ext(name) in TYPES,
  async render(el, ctx) {
    const size = ctx.file.size;
    if (size > MAX_BYTES) {
      el.append(h('p', { class: 'muted' }, `Larger than ${MAX_BYTES >> 20} MiB: not previewed (use hex).`));
      return;
    }
    const parts = [];
    for (let off = 0; off < size; off += CHUNK) {
      parts.push(await ctx.read(off, CHUNK));
      if (!ctx.alive()) return;
      ctx.status(`${Math.min(size, off + CHUNK)} of ${size} bytes`);
    }
    const url = URL.createObjectURL(new Blob(parts, { type: TYPES[ext(ctx.name)] || 'application/octet-stream' }));
    const img = h('img', { src: url, alt: ctx.name, id: 'image-view', class: 'image-view' });
    img.addEventListener('load', () => ctx.status(`${img.naturalWidth} × ${img.naturalHeight} pixels`));
    img.addEventListener('error', () => ctx.status('not an image this browser can show'));
    el.append(img);
  },
};
