#!/usr/bin/env node
// Committed shim, the package's `blk-img` (CommonJS, see ./package.json: a start without Node's ESM loader
// is a few ms faster): runs the built CLI (run `pnpm build` first; the README's commands do). It prefers
// the bundle `pnpm build` writes to dist/bundle/ — one script, compiled with V8's code cache of typical
// runs — unless it is missing, older than a file it bundles (something was rebuilt with `tsc -b` alone),
// or BLK_IMG_NO_BUNDLE=1; then dist/main.js (~100 modules through the ESM loader: slower to start).
// BLK_IMG_BUNDLE_DEBUG=1 tells which one runs, on stderr. scripts/bundle.mjs and
// tooling/scripts/bundle-bin.mjs build the bundle.
"use strict";
const NAME = "blk-img"; // dist/bundle/blk-img.cjs and blk-img.cache
const ENV = "BLK_IMG"; // BLK_IMG_NO_BUNDLE, BLK_IMG_BUNDLE_DEBUG, BLK_IMG_BUNDLE_WRITE_CACHE (the build's)
// ---- The same in every bundled bin's shim from here on (apps/cli/test/startup.test.ts compares them). ----
const { readFileSync, statSync, writeFileSync } = require("node:fs");
const Module = require("node:module");
const { dirname, join } = require("node:path");
const vm = require("node:vm");

const bundleDir = join(__dirname, "..", "dist", "bundle");
const debug = process.env[`${ENV}_BUNDLE_DEBUG`] === "1";

/** The bundle's script when it is there and up to date, else undefined. */
function bundleScript() {
  if (process.env[`${ENV}_NO_BUNDLE`] === "1") return undefined;
  try {
    const { script, inputs } = JSON.parse(readFileSync(join(bundleDir, "manifest.json"), "utf8"));
    const file = join(bundleDir, script);
    const built = statSync(file).mtimeMs;
    for (const f of inputs) if (statSync(join(bundleDir, f)).mtimeMs > built) return undefined;
    return file;
  } catch {
    return undefined;
  }
}

/** Runs the bundled script with its code cache (V8 rejects the cache of another Node: it compiles then). */
function loadBundle(file) {
  let cachedData;
  try {
    cachedData = readFileSync(join(bundleDir, `${NAME}.cache`));
  } catch {
    // no cache: V8 compiles
  }
  const script = new vm.Script(Module.wrap(readFileSync(file, "utf8")), {
    filename: file,
    cachedData,
    importModuleDynamically: vm.constants.USE_MAIN_CONTEXT_DEFAULT_LOADER,
  });
  if (debug) {
    const cache = cachedData === undefined ? "missing" : script.cachedDataRejected ? "rejected" : "accepted";
    process.stderr.write(`${NAME} bundle: ${file}, code cache ${cache}\n`);
  }
  const writeCache = process.env[`${ENV}_BUNDLE_WRITE_CACHE`];
  if (writeCache !== undefined && writeCache !== "") {
    // The build records the cache after a run (the functions compiled on the way included).
    delete process.env[`${ENV}_BUNDLE_WRITE_CACHE`];
    process.once("exit", () => writeFileSync(writeCache, script.createCachedData()));
  }
  const mod = { exports: {} };
  script.runInThisContext()(mod.exports, Module.createRequire(file), mod, file, dirname(file));
  return mod.exports;
}

const file = bundleScript();
if (file === undefined && debug) process.stderr.write(`${NAME} bundle: not used\n`);
(file === undefined ? import("../dist/main.js") : Promise.resolve(loadBundle(file)))
  .then(({ main }) => main(process.argv.slice(2)))
  .then(
    (code) => {
      process.exitCode = code;
    },
    (e) => {
      console.error(e);
      process.exitCode = 1;
    },
  );
