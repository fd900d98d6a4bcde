// Numeric element types: decoding bytes of any alignment and byte order into typed arrays
// (through a DataView, so a window starting at an odd offset needs no copy to align).

export const DTYPES = {
  uint8: { size: 1, get: 'getUint8', array: Uint8Array },
  int8: { size: 1, get: 'getInt8', array: Int8Array },
  uint16: { size: 2, get: 'getUint16', array: Uint16Array },
  int16: { size: 2, get: 'getInt16', array: Int16Array },
  uint32: { size: 4, get: 'getUint32', array: Uint32Array },
  int32: { size: 4, get: 'getInt32', array: Int32Array },
  uint64: { size: 8, get: 'getBigUint64', array: BigUint64Array },
  int64: { size: 8, get: 'getBigInt64', array: BigInt64Array },
  float16: { size: 2, get: 'float16', array: Float32Array },
  float32: { size: 4, get: 'getFloat32', array: Float32Array },
  float64: { size: 8, get: 'getFloat64', array: Float64Array },
  bool: { size: 1, get: 'getUint8', array: Uint8Array },
};

function half(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const e = (bits >> 10) & 0x1f;
  const m = bits & 0x3ff;
  if (e === 0) return sign * m * 2 ** -24;
  if (e === 31) return m ? NaN : sign * Infinity;
  return sign * (1 + m / 1024) * 2 ** (e - 15);
}

/** BYTES (Uint8Array) as a typed array of DTYPE; trailing bytes of a partial element are
 * left out. */
export function decode(bytes, dtype, littleEndian = true) {
  const t = DTYPES[dtype];
  if (!t) throw new Error(`unknown dtype ${dtype}`);
  const n = Math.floor(bytes.length / t.size);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const out = new t.array(n);
  if (t.get === 'float16') {
    for (let i = 0; i < n; i++) out[i] = half(view.getUint16(i * 2, littleEndian));
  } else {
    const get = view[t.get].bind(view);
    for (let i = 0; i < n; i++) out[i] = get(i * t.size, littleEndian);
  }
  return out;
}

/** A value as a short string for a table cell. */
export function fmtValue(v, dtype) {
  if (typeof v === 'bigint') return v.toString();
  if (dtype === 'bool') return v ? 'True' : 'False';
  if (dtype.startsWith('float')) {
    if (Number.isInteger(v) && Math.abs(v) < 1e15) return v.toFixed(1);
    return Math.abs(v) >= 1e6 || (v !== 0 && Math.abs(v) < 1e-4) ? v.toExponential(4) : String(+v.toPrecision(6));
  }
  return String(v);
}
