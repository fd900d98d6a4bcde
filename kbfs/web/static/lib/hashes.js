// Copied from js/hashes.js by js/vendor.mjs: edit js/hashes.js, then run `node js/vendor.mjs`.
// The one place kbfs.js imports its hash functions from: BLAKE3 and SHA-1 of hash-wasm
// (WebAssembly, maintained on npm). In Node and bundlers the bare name resolves to the
// package; the browser copy in kbfs/web/static/lib/ is this file with the name rewritten
// to the vendored build beside it (js/vendor.mjs), so no import map is needed.
export { createBLAKE3, createSHA1 } from './hash-wasm/index.esm.min.js';
