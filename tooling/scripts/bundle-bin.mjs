// A package's bundled bin (blkd, blk-img): after `tsc -b`, bundles the package's dist/main.js and everything
// it imports (the @blk packages' dist/, fzstd; not koffi, a native addon) with rolldown into one script,
// dist/bundle/<name>.cjs, and records V8's code cache of typical runs in dist/bundle/<name>.cache. The
// package's committed bin shim runs that script with the cache when both are up to date, else dist/main.js.
//
// Why: Node 20's ESM loader costs about as much per module as the code it compiles (blkd and blk-img load
// ~100 modules before their first I/O), and without a compile cache (module.enableCompileCache is Node 22)
// V8 parses and compiles the start-up path on every start. One script with a code cache skips both.
// Modules imported on first use stay lazy: their code is in the script, but runs only when imported.
//
// `manifest.json` lists the bundled files; the shim ignores a bundle older than any of them (a package
// rebuilt with `tsc -b` alone), so a stale bundle never runs.
//
// The shims (apps/*/bin/) are tiny committed CommonJS files, the same code after their two constants (the
// output name and the environment prefix): bins must exist before a build, and a published bin cannot load
// a file from tooling/. Their environment: <PREFIX>_NO_BUNDLE=1 runs dist/, <PREFIX>_BUNDLE_DEBUG=1 says on
// stderr which one runs and whether V8 took the cache, <PREFIX>_BUNDLE_WRITE_CACHE=<file> (the build's)
// writes the script's code cache to that file at exit.
//
// Used from a package's scripts/bundle.mjs:
//   await bundleBin({ pkg, name: "blk-img", envPrefix: "BLK_IMG", shim: "bin/blk-img.js",
//     loadRolldown: () => import("rolldown"), warmUp });
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";

/**
 * Node's own modules are required at the top of a CommonJS bundle, also for the modules that run only when
 * first imported: those a start may not need (TLS, sockets, zlib, hashes: ~6 ms of CPU time for
 * `blk-img info`) load on their first use instead, through an object that requires them when one of its
 * properties is first read. Only for a module the script uses for member access alone (`node_zlib.x`).
 */
function lazyBuiltins(code) {
  const decl =
    /^let (\w+) = require\("(node:(?:crypto|tls|net|zlib|stream|http|https|http2|dns|dgram|child_process|worker_threads|readline))"\);$/gm;
  const lazy = [];
  let r = code.replace(decl, (line, binding, id) => {
    const uses = code.match(new RegExp(`\\b${binding}\\b(?!\\.)`, "g"))?.length ?? 0;
    if (uses !== 1) return line; // used other than as `binding.x`: loads with the script
    lazy.push(binding);
    return `let ${binding} = __bundleBinLazy(${JSON.stringify(id)});`;
  });
  if (lazy.length === 0) return code;
  // What tree-shaking leaves of an unused constant built from such a module's property (a statement
  // `${node_tls.DEFAULT_CIPHERS}`; from the NBD TLS helpers) would load it at start: dropped.
  r = r.replace(new RegExp(`^\\t*\`\\$\\{(?:${lazy.join("|")})\\.\\w+\\}\`;\\n`, "gm"), "");
  const helper =
    "var __bundleBinLazy = (id) => {\n\tlet m;\n\treturn new Proxy({}, { get: (_, k) => (m ??= require(id))[k] });\n};\n";
  // After a "use strict" directive, if the script starts with one.
  const directive = /^(["'])use strict\1;?\n/.exec(r)?.[0] ?? "";
  return directive + helper + r.slice(directive.length);
}

/**
 * @typedef {object} WarmUp
 * @property {string} bin the shim's path
 * @property {string} tmp a temporary directory (removed afterwards)
 * @property {NodeJS.ProcessEnv} env the environment a warm-up run needs: the cache is read from and
 *   written back to dist/bundle/<name>.cache, so successive runs add up (each compiles the functions its
 *   command needs on top of those the cache already has)
 * @property {(args: string[]) => Promise<string>} run runs the shim with `args` and that environment to
 *   completion; fails unless it exits 0 from the bundle; resolves to its stdout
 * @property {(msg: string) => never} fail stops the build with `msg`
 */

/**
 * Bundles `<pkg>/dist/main.js` into `<pkg>/dist/bundle/<name>.cjs` and records its code cache with
 * `warmUp` (which runs the shim once or more with the given environment). `loadRolldown` imports rolldown,
 * a devDependency of the package (`() => import("rolldown")` in its script).
 * @param {{ pkg: string, name: string, envPrefix: string, shim: string,
 *   loadRolldown: () => Promise<typeof import("rolldown")>, warmUp: (w: WarmUp) => Promise<void> }} o
 */
export async function bundleBin({ pkg, name, envPrefix, shim, loadRolldown, warmUp }) {
  const out = join(pkg, "dist", "bundle");
  const fail = (msg) => {
    throw new Error(`${name} bundle: ${msg}; update the bundle script (tooling/scripts/bundle-bin.mjs)`);
  };

  let rolldown;
  try {
    ({ rolldown } = await loadRolldown());
  } catch (e) {
    // A platform without a rolldown binary: the shim runs dist/main.js, only slower to start.
    rmSync(out, { recursive: true, force: true });
    console.warn(
      `${name} bundle: skipped, rolldown does not load here (${e instanceof Error ? e.message : e})`,
    );
    return;
  }

  // A CommonJS script has no import.meta: each module's `import.meta.url` becomes the URL of the dist/ file
  // it was bundled from, so what a module finds relative to itself (the file driver's koffi, resolved from
  // @blk/drivers; package.json; the bin) it finds as from dist/. The shim only runs the bundle when every
  // bundled file is there.
  const importMeta = {
    name: "bundle-bin-import-meta",
    transform(code, id) {
      if (!code.includes("import.meta")) return null;
      // Imported bindings, not require(): a module may have a `require` of its own (the file driver's).
      const rel = JSON.stringify(relative(out, id));
      const url = `__bundleBinUrl(__bundleBinJoin(__dirname, ${rel})).href`;
      const r = code.replaceAll("import.meta.url", url);
      if (r.includes("import.meta")) fail(`${id} uses import.meta in a way the bundle does not handle`);
      return `import { pathToFileURL as __bundleBinUrl } from "node:url";\nimport { join as __bundleBinJoin } from "node:path";\n${r}`;
    },
  };

  const bundle = await rolldown({
    input: join(pkg, "dist", "main.js"),
    platform: "node",
    external: [/^node:/, "koffi"],
    plugins: [importMeta],
    onLog(level, log, handler) {
      // main.js imports on first use modules that others import statically: expected.
      if (log.code === "INEFFECTIVE_DYNAMIC_IMPORT") return;
      handler(level, log);
    },
  });
  rmSync(out, { recursive: true, force: true });
  mkdirSync(out, { recursive: true });
  const { output } = await bundle.write({
    dir: out,
    format: "cjs",
    entryFileNames: `${name}.cjs`,
    // One script: what is imported on first use is wrapped and runs when imported.
    codeSplitting: false,
    // Error classes and the like keep their names (a bundle renames clashing top-level bindings).
    keepNames: true,
    // JSDoc is a third of the source: keep only legal comments.
    comments: { legal: true, annotation: false, jsdoc: false },
  });
  await bundle.close();
  const [chunk] = output;
  if (output.length !== 1 || chunk?.type !== "chunk") fail(`expected one script, got ${output.length} files`);
  if (/\bimport\.meta\b/.test(chunk.code)) fail("import.meta left in the script");
  const scriptFile = join(out, chunk.fileName);
  writeFileSync(scriptFile, lazyBuiltins(readFileSync(scriptFile, "utf8")));

  // manifest.json: the bundled modules, relative to dist/bundle/ (the shim compares their times with the
  // script's; tests read it).
  const inputs = chunk.moduleIds.filter((id) => !id.startsWith("\0")).map((id) => relative(out, id));
  for (const f of inputs) statSync(join(out, f)); // each one a file the shim can stat
  writeFileSync(join(out, "manifest.json"), `${JSON.stringify({ script: chunk.fileName, inputs })}\n`);

  const cache = join(out, `${name}.cache`);
  const bin = join(pkg, shim);
  const env = {
    ...process.env,
    [`${envPrefix}_BUNDLE_WRITE_CACHE`]: cache,
    [`${envPrefix}_BUNDLE_DEBUG`]: "1",
    [`${envPrefix}_NO_BUNDLE`]: "",
  };
  const run = (args) =>
    new Promise((resolve, reject) => {
      const child = spawn(process.execPath, [bin, ...args], { stdio: ["ignore", "pipe", "pipe"], env });
      let stdout = "";
      let stderr = "";
      child.stdout.on("data", (d) => {
        stdout += d;
      });
      child.stderr.on("data", (d) => {
        stderr += d;
      });
      const timer = setTimeout(() => child.kill("SIGKILL"), 60_000);
      child.on("error", reject);
      child.on("close", (code) => {
        clearTimeout(timer);
        const lines = stderr.split("\n").filter((l) => l !== "");
        const own = `${name} bundle: ${join(out, `${name}.cjs`)}, `;
        if (code !== 0 || !lines.some((l) => l.startsWith(own))) {
          reject(new Error(`${name} bundle: ${args.join(" ")} exited with ${code}:\n${stderr}`));
          return;
        }
        // Anything else on stderr (a warning: koffi not loading, say) is shown, not fatal: the file driver
        // runs without it on a platform koffi does not support.
        const other = lines.filter((l) => !l.startsWith(own));
        if (other.length > 0) console.warn(`${name} bundle: ${args.join(" ")}:\n${other.join("\n")}`);
        resolve(stdout);
      });
    });
  const tmp = mkdtempSync(join(tmpdir(), `${name}-bundle-`));
  try {
    await warmUp({ bin, tmp, env, run, fail });
    statSync(cache);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
  const kib = (f) => (statSync(join(out, f)).size / 1024).toFixed(0);
  console.log(
    `${name} bundle: dist/bundle/${name}.cjs (${inputs.length} modules, ${kib(`${name}.cjs`)} KiB), code cache ${kib(`${name}.cache`)} KiB`,
  );
}
