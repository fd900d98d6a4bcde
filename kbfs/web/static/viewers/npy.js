// NumPy .npy: the header (magic, version, the dict of descr / fortran_order / shape) is
// parsed from the first bytes, then the array is shown as a paged table that reads only
// the rows on screen (N-D arrays as shape[0] rows of the rest flattened).
import { h } from '../dom.js';
import { arrayTable } from './table.js';
import { ext } from './util.js';

const KINDS = { b1: 'bool', i1: 'int8', u1: 'uint8', i2: 'int16', u2: 'uint16', i4: 'int32', u4: 'uint32',
  i8: 'int64', u8: 'uint64', f2: 'float16', f4: 'float32', f8: 'float64' };
const MAX_HEADER = 1 << 20;

/** Parse an .npy header from BYTES (the file's first bytes) -> {version, headerLength,
 * dataStart, descr, dtype, little, fortran, shape}; more bytes needed -> {need: n}. */
export function parseNpyHeader(bytes) {
  const magic = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59];
  if (bytes.length < 10) return { need: 10 };
  if (!magic.every((b, i) => bytes[i] === b)) throw new Error('not an .npy file (no \\x93NUMPY magic)');
  const major = bytes[6];
  if (![1, 2, 3].includes(major)) throw new Error(`unknown .npy version ${major}.${bytes[7]}`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const fixed = major === 1 ? 10 : 12;
  if (bytes.length < fixed) return { need: fixed };
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  if (headerLength > MAX_HEADER) throw new Error(`.npy header of ${headerLength} bytes is too large`);
  const dataStart = fixed + headerLength;
  if (bytes.length < dataStart) return { need: dataStart };
  const text = new TextDecoder(major === 3 ? 'utf-8' : 'latin1').decode(bytes.subarray(fixed, dataStart));
  const descr = /'descr'\s*:\s*'([^']*)'/.exec(text);
  const fortran = /'fortran_order'\s*:\s*(True|False)/.exec(text);
  const shape = /'shape'\s*:\s*\(([^)]*)\)/.exec(text);
  if (!descr || !fortran || !shape) throw new Error('.npy header lacks descr, fortran_order or shape');
  const dims = shape[1].split(',').map((s) => s.trim()).filter(Boolean).map(Number);
  if (!dims.every((d) => Number.isSafeInteger(d) && d >= 0)) throw new Error('.npy shape is not a tuple of sizes');
  const m = /^([<>|=])([biuf]\d+)$/.exec(descr[1]);
  const dtype = m ? KINDS[m[2]] : undefined;
  return { version: `${major}.${bytes[7]}`, headerLength, dataStart, descr: descr[1], dtype,
    little: !m || m[1] !== '>', fortran: fortran[1] === 'True', shape: dims };
}

export const viewer = {
  id: 'npy',
  label: 'array (.npy)',
  match: (name) => ext(name) === 'npy',
  async render(el, ctx) {
    let head = await ctx.read(0, Math.min(ctx.file.size, 4096));
    let info = parseNpyHeader(head);
    if (info.need) {
      if (info.need > ctx.file.size) throw new Error('file ends inside its .npy header');
      head = await ctx.read(0, info.need);
      info = parseNpyHeader(head);
    }
    const count = info.shape.reduce((a, b) => a * b, 1);
    el.append(h('p', { id: 'npy-info' }, `dtype ${info.descr}${info.dtype ? ` (${info.dtype})` : ''}, shape (`,
      info.shape.join(', '), info.shape.length === 1 ? ',' : '', `), ${count} values`,
      info.fortran ? ', Fortran order (shown in storage order: columns as rows)' : '', `; header v${info.version}, data from byte ${info.dataStart}`));
    if (!info.dtype) {
      el.append(h('p', { class: 'muted' }, `dtype ${info.descr} is not shown as a table (use hex).`));
      return;
    }
    let rows;
    let columns;
    if (info.shape.length === 0) { rows = 1; columns = 1; } else if (info.shape.length === 1) {
      columns = Math.min(10, Math.max(1, info.shape[0]));
      rows = Math.ceil(info.shape[0] / columns);
    } else if (info.fortran) {
      rows = info.shape[info.shape.length - 1]; columns = count / Math.max(1, rows);
    } else {
      rows = info.shape[0]; columns = count / Math.max(1, rows);
    }
    if (count === 0) { el.append(h('p', { class: 'muted' }, 'The array is empty.')); return; }
    await arrayTable(el, ctx, { dataStart: info.dataStart, rows, columns, dtype: info.dtype, little: info.little });
  },
};
