// MountainLab .mda arrays: the header, and which bytes a window of time needs. No DOM, no
// network: mda.js reads, traces.js draws.
//
// Header (little-endian int32s): a type code (-2 uint8, -3 float32, -4 int16, -5 int32,
// -6 uint16, -7 float64, -8 uint32), the bytes per entry, the number of dimensions D (a
// negative D: -D dimensions written as int64), then the D sizes. The data follow,
// column-major: the first dimension fastest. A timeseries is M channels x N timepoints, so
// timepoint t is the M entries at dataStart + t*M*bpe: any time window is one contiguous
// byte range. Three or more dimensions are read as M x (the product of the rest).
//
// What it does not do: the pre-2016 header without a type code (a positive first int32),
// complex types (-1), big-endian files.

export const MDA_TYPES = {
  '-2': { dtype: 'uint8', bytes: 1 },
  '-3': { dtype: 'float32', bytes: 4 },
  '-4': { dtype: 'int16', bytes: 2 },
  '-5': { dtype: 'int32', bytes: 4 },
  '-6': { dtype: 'uint16', bytes: 2 },
  '-7': { dtype: 'float64', bytes: 8 },
  '-8': { dtype: 'uint32', bytes: 4 },
};
export const MAX_DIMS = 50; // the original reader's bound
export const HEADER_READ = 12 + 8 * MAX_DIMS; // enough bytes for any header

export class MdaError extends Error {}

/** The header of BYTES (the file's first bytes) for a file of FILESIZE bytes:
 * {dtype, bpe, dims, channels, samples, dataStart, dataBytes}, or an MdaError saying what
 * is wrong in one line. The data must fit in the file (trailing bytes are allowed). */
export function parseHeader(bytes, fileSize) {
  if (bytes.length < 12) throw new MdaError(`not an .mda file: ${bytes.length} bytes, a header has at least 12`);
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const code = v.getInt32(0, true);
  const type = MDA_TYPES[String(code)];
  if (!type) {
    throw new MdaError(code > 0 ? `unsupported .mda header: a positive first number (${code}), the pre-2016 format`
      : `unknown .mda type code ${code} (known: -2 uint8, -3 float32, -4 int16, -5 int32, -6 uint16, -7 float64, -8 uint32)`);
  }
  const bpe = v.getInt32(4, true);
  if (bpe !== type.bytes) throw new MdaError(`.mda header: ${bpe} bytes per entry for ${type.dtype} (expected ${type.bytes})`);
  const rawDims = v.getInt32(8, true);
  const wide = rawDims < 0;
  const ndims = Math.abs(rawDims);
  if (ndims < 1 || ndims > MAX_DIMS) throw new MdaError(`.mda header: ${rawDims} dimensions (1 to ${MAX_DIMS})`);
  const dataStart = 12 + ndims * (wide ? 8 : 4);
  if (bytes.length < dataStart) throw new MdaError(`.mda header: cut short (${bytes.length} of ${dataStart} bytes)`);
  const dims = [];
  for (let i = 0; i < ndims; i++) {
    const d = wide ? v.getBigInt64(12 + 8 * i, true) : BigInt(v.getInt32(12 + 4 * i, true));
    if (d < 1n || d > BigInt(Number.MAX_SAFE_INTEGER)) throw new MdaError(`.mda header: dimension ${i + 1} is ${d} (1 to 2^53-1)`);
    dims.push(Number(d));
  }
  let entries = 1n;
  for (const d of dims) entries *= BigInt(d);
  const dataBytes = entries * BigInt(bpe);
  if (dataBytes > BigInt(fileSize - dataStart)) {
    throw new MdaError(`.mda header: ${dims.join(' x ')} ${type.dtype} needs ${dataBytes} bytes of data; the file has ${Math.max(0, fileSize - dataStart)}`);
  }
  const channels = ndims === 1 ? 1 : dims[0];
  const samples = ndims === 1 ? dims[0] : Number(entries / BigInt(dims[0]));
  return { dtype: type.dtype, bpe, dims, channels, samples, dataStart, dataBytes: Number(dataBytes) };
}

/** What to read for the window of W timepoints from T0 within BUDGET bytes:
 *  {mode: 'full', reads: [{offset, length, t, n}]}  every timepoint (one contiguous read), or
 *  {mode: 'sparse', reads: [...]}  when the window's bytes exceed BUDGET: K reads of one
 *  piece (BLOCK bytes, piece-aligned, K = BUDGET / BLOCK) spread evenly over the window, each
 *  the whole timepoints inside that piece: a coarse overview that never costs more than
 *  BUDGET bytes (plus the proof), however large the window. */
export function planWindow(hdr, t0, w, budget, block) {
  const stride = hdr.channels * hdr.bpe;
  const end = Math.min(hdr.samples, t0 + w);
  const n = Math.max(0, end - t0);
  if (n * stride <= budget) {
    return { mode: 'full', reads: n ? [{ offset: hdr.dataStart + t0 * stride, length: n * stride, t: t0, n }] : [] };
  }
  const k = Math.max(2, Math.floor(budget / block));
  const reads = [];
  let last = -1;
  for (let i = 0; i < k; i++) {
    const at = t0 + Math.floor(((i + 0.5) * n) / k); // the timepoint this read is about
    const byte = hdr.dataStart + at * stride;
    const pStart = Math.floor(byte / block) * block;
    const pEnd = pStart + block;
    // whole timepoints inside [pStart, pEnd), at least the one at `at`
    let t = Math.max(t0, Math.ceil((pStart - hdr.dataStart) / stride));
    let tEnd = Math.min(end, Math.floor((pEnd - hdr.dataStart) / stride));
    if (tEnd <= t) { t = at; tEnd = at + 1; }
    if (t < last) t = last;
    if (tEnd <= t) continue;
    last = tEnd;
    reads.push({ offset: hdr.dataStart + t * stride, length: (tEnd - t) * stride, t, n: tEnd - t });
  }
  return { mode: 'sparse', reads };
}

/** Per pixel column of WIDTH, the min and max of each channel in CHANNELS over the
 * timepoints of CHUNKS ([{t, n, values}], values channel-fastest, M per timepoint) for the
 * window [T0, T0+W). Columns without data are NaN. -> {min: [Float64Array], max: [...]} */
export function decimate(chunks, m, channels, t0, w, width) {
  const min = channels.map(() => new Float64Array(width).fill(NaN));
  const max = channels.map(() => new Float64Array(width).fill(NaN));
  const scale = width / w;
  for (const { t, n, values } of chunks) {
    for (let i = 0; i < n; i++) {
      const x = Math.floor((t + i - t0) * scale);
      if (x < 0 || x >= width) continue;
      const base = i * m;
      for (let c = 0; c < channels.length; c++) {
        const val = Number(values[base + channels[c]]);
        if (Number.isNaN(val)) continue;
        if (!(min[c][x] <= val)) min[c][x] = val; // also when still NaN
        if (!(max[c][x] >= val)) max[c][x] = val;
      }
    }
  }
  return { min, max };
}
