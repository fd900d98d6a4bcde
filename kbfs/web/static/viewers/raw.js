// Raw binary as a typed array: the reader chooses the dtype, byte order, channel count
// and a header to skip; a paged table of samples x channels reads only the page shown.
import { fill, h } from '../dom.js';
import { DTYPES } from './dtypes.js';
import { arrayTable } from './table.js';
import { ext, parseNumber } from './util.js';

export const viewer = {
  id: 'raw',
  label: 'raw numbers',
  match: (name) => ['bin', 'raw', 'dat', 'i16', 'f32'].includes(ext(name)),
  async render(el, ctx) {
    const dtype = h('select', { id: 'raw-dtype', 'aria-label': 'dtype' },
      Object.keys(DTYPES).filter((d) => d !== 'bool').map((d) => h('option', { value: d }, d)));
    dtype.value = ext(ctx.name) === 'f32' ? 'float32' : 'int16';
    const order = h('select', { id: 'raw-order', 'aria-label': 'byte order' },
      h('option', { value: 'le' }, 'little-endian'), h('option', { value: 'be' }, 'big-endian'));
    const channels = h('input', { id: 'raw-channels', type: 'number', min: 1, max: 100000, value: 1, size: 5,
      'aria-label': 'channels' });
    const skip = h('input', { id: 'raw-offset', value: '0', size: 10, 'aria-label': 'header bytes' });
    const out = h('div', { id: 'raw-table' });
    const apply = async (ev) => {
      if (ev) ev.preventDefault();
      const nch = Math.max(1, Math.min(100000, Math.floor(Number(channels.value)) || 1));
      const start = Math.max(0, parseNumber(skip.value) || 0);
      const item = DTYPES[dtype.value].size;
      const rows = Math.floor(Math.max(0, ctx.file.size - start) / (item * nch));
      fill(out);
      if (!rows) { out.append(h('p', { class: 'muted' }, 'Not one whole sample at these settings.')); return; }
      await arrayTable(out, ctx, { dataStart: start, rows, columns: nch, dtype: dtype.value, little: order.value === 'le' });
    };
    el.append(h('form', { class: 'controls', id: 'raw-form', onsubmit: apply },
      h('label', {}, 'dtype ', dtype), ' ', h('label', {}, order), ' ',
      h('label', {}, 'channels ', channels), ' ', h('label', {}, 'skip bytes ', skip), ' ',
      h('button', { type: 'submit', id: 'raw-apply' }, 'show')), out);
    await apply();
  },
};
