#!/usr/bin/env node
// Refresh (or, with --check, compare) the browser copy of kbfs.js in kbfs/web/static/lib/:
//
//   lib/kbfs.js, lib/tree.js, ...          js/*.js as they are, with a first line saying so
//   lib/hashes.js                          js/hashes.js with `from 'hash-wasm'` rewritten to
//                                          `from './hash-wasm/index.esm.min.js'`
//   lib/hash-wasm/index.esm.min.js         hash-wasm's ESM build (no imports of its own)
//   lib/hash-wasm/LICENSE                  its MIT license
//
// So the same sources import the npm package in Node and a relative file in a page (no
// import map, no build step). Run `node js/vendor.mjs` after changing js/ or updating
// hash-wasm (npm ci in js/ first); tests/test_js.py runs `--check`, which exits 1 naming
// each stale, missing or extra file.
import { existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const JS = dirname(fileURLToPath(import.meta.url));
const LIB = join(JS, '..', 'kbfs', 'web', 'static', 'lib');
const HW = join(JS, 'node_modules', 'hash-wasm');
const MODULES = ['kbfs.js', 'kbfsurl.js', 'pointer.js', 'readers.js', 'sources.js', 'tree.js', 'wire.js', 'hashes.js'];
const BARE = "from 'hash-wasm'";
const VENDORED = "from './hash-wasm/index.esm.min.js'";

function wanted() {
  const out = new Map();
  for (const name of MODULES) {
    let text = readFileSync(join(JS, name), 'utf8');
    if (name === 'hashes.js') {
      if (!text.includes(BARE)) throw new Error(`js/hashes.js has no ${BARE}`);
      text = text.replaceAll(BARE, VENDORED);
    } else if (text.includes("'hash-wasm'")) {
      throw new Error(`js/${name} imports hash-wasm directly: only js/hashes.js may (the browser copy rewrites that one)`);
    }
    out.set(name, `// Copied from js/${name} by js/vendor.mjs: edit js/${name}, then run \`node js/vendor.mjs\`.\n${text}`);
  }
  if (!existsSync(HW)) throw new Error('js/node_modules/hash-wasm is missing: run `npm ci` in js/ first');
  const version = JSON.parse(readFileSync(join(HW, 'package.json'), 'utf8')).version;
  out.set('hash-wasm/index.esm.min.js', readFileSync(join(HW, 'dist', 'index.esm.min.js'), 'utf8'));
  out.set('hash-wasm/LICENSE', `hash-wasm ${version} (https://www.npmjs.com/package/hash-wasm)\n\n${readFileSync(join(HW, 'LICENSE'), 'utf8')}`);
  return out;
}

function present(dir, base = dir) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory()
    ? present(join(dir, e.name), base) : [relative(base, join(dir, e.name))]));
}

const files = wanted();
if (process.argv.includes('--check')) {
  const problems = [];
  for (const [name, text] of files) {
    const path = join(LIB, name);
    if (!existsSync(path)) problems.push(`missing ${name}`);
    else if (readFileSync(path, 'utf8') !== text) problems.push(`stale ${name}`);
  }
  for (const name of present(LIB)) if (!files.has(name)) problems.push(`extra ${name}`);
  if (problems.length) {
    console.error(`kbfs/web/static/lib/ is not current (${problems.join(', ')}): run \`node js/vendor.mjs\``);
    process.exit(1);
  }
  console.log(`kbfs/web/static/lib/ is current (${files.size} files)`);
} else {
  for (const [name, text] of files) {
    mkdirSync(dirname(join(LIB, name)), { recursive: true });
    writeFileSync(join(LIB, name), text);
  }
  console.log(`wrote ${files.size} files to kbfs/web/static/lib/`);
}
