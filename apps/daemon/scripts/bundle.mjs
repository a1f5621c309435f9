#!/usr/bin/env node
// The bundled bin: after `tsc -b`, bundles dist/main.js and everything it imports (the @blk packages'
// dist/, fzstd; not koffi, a native addon) with rolldown into one script, dist/bundle/blkd.cjs, and
// records V8's code cache of a typical start in dist/bundle/blkd.cache. bin/blkd.cjs runs that script
// with the cache when both are up to date, else dist/main.js.
//
// Why: Node 20's ESM loader costs about as much per module as the code it compiles (blkd loads ~90 modules
// before its monitor listens), and without a compile cache (module.enableCompileCache is Node 22) V8
// parses and compiles the start-up path on every start. One script with a code cache skips both. Modules
// imported on first use stay lazy: their code is in the script, but runs only when imported.
//
// `manifest.json` lists the bundled files; bin/blkd.cjs ignores a bundle older than any of them (a package
// rebuilt with `tsc -b` alone), so a stale bundle never runs.
//
//   node scripts/bundle.mjs     (the package's `build` script runs it after `tsc -b`)
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const pkg = join(dirname(fileURLToPath(import.meta.url)), "..");
const out = join(pkg, "dist", "bundle");

let rolldown;
try {
  ({ rolldown } = await import("rolldown"));
} catch (e) {
  // A platform without a rolldown binary: bin/blkd.cjs runs dist/main.js, only slower to start.
  rmSync(out, { recursive: true, force: true });
  console.warn(`blkd bundle: skipped, rolldown does not load here (${e instanceof Error ? e.message : e})`);
  process.exit(0);
}

const fail = (msg) => {
  throw new Error(`blkd bundle: ${msg}; update scripts/bundle.mjs`);
};

// A CommonJS script has no import.meta. Two uses in the bundled code, both relative to a module's URL:
// - the file driver loads koffi with a require() made from its own URL: koffi is @blk/drivers'
//   dependency, so that require is made from @blk/drivers (which @blk/daemon depends on);
// - version.ts and daemonize.ts find package.json and bin/blkd.cjs from their URL: the script's URL (they
//   look a level further up, from dist/bundle/).
const importMeta = {
  name: "blkd-import-meta",
  transform(code, id) {
    if (!code.includes("import.meta")) return null;
    let r = code;
    if (/[\\/]drivers[\\/]dist[\\/]file[\\/]sys\.js$/.test(id)) {
      const from = "createRequire(import.meta.url)";
      if (!r.includes(from)) fail(`${id} no longer has ${from}`);
      r = r.replace(from, 'createRequire(createRequire(__filename).resolve("@blk/drivers/file"))');
    }
    r = r.replaceAll("import.meta.url", 'require("node:url").pathToFileURL(__filename).href');
    if (r.includes("import.meta")) fail(`${id} uses import.meta in a way the bundle does not handle`);
    return r;
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
  entryFileNames: "blkd.cjs",
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

// manifest.json: the bundled modules, relative to dist/bundle/ (bin/blkd.cjs compares their times with the
// script's; tests read it).
const inputs = chunk.moduleIds.filter((id) => !id.startsWith("\0")).map((id) => relative(out, id));
for (const f of inputs) statSync(join(out, f)); // each one a file the shim can stat
writeFileSync(join(out, "manifest.json"), `${JSON.stringify({ script: chunk.fileName, inputs })}\n`);

// The code cache of a typical start: a file node, a raw node, an NBD export and a monitor, started and
// quit once (bin/blkd.cjs writes the cache at exit when BLKD_BUNDLE_WRITE_CACHE names the file).
const tmp = mkdtempSync(join(tmpdir(), "blkd-bundle-"));
try {
  writeFileSync(join(tmp, "disk.img"), Buffer.alloc(1 << 20));
  const qmp = join(tmp, "qmp.sock");
  const child = spawn(
    process.execPath,
    [
      join(pkg, "bin", "blkd.cjs"),
      "--blockdev",
      `driver=file,node-name=f,filename=${join(tmp, "disk.img")}`,
      "--blockdev",
      "driver=raw,node-name=disk,file=f",
      "--nbd-server",
      `addr.type=unix,addr.path=${join(tmp, "nbd.sock")}`,
      "--export",
      "type=nbd,id=e,node-name=disk,name=disk",
      "--chardev",
      `socket,id=m,path=${qmp},server=on,wait=off`,
      "--monitor",
      "chardev=m",
    ],
    {
      stdio: ["ignore", "ignore", "pipe"],
      env: { ...process.env, BLKD_BUNDLE_WRITE_CACHE: join(out, "blkd.cache") },
    },
  );
  let stderr = "";
  child.stderr.on("data", (d) => {
    stderr += d;
  });
  const exited = new Promise((resolve) => child.once("exit", resolve));
  const deadline = Date.now() + 60_000;
  for (;;) {
    const done = await new Promise((resolve) => {
      const s = connect(qmp);
      s.on("error", () => resolve(false));
      s.on("data", (d) => {
        if (String(d).includes('"QMP"')) s.write('{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n');
      });
      s.on("close", () => resolve(true));
    });
    if (done) break;
    if (Date.now() > deadline || child.exitCode !== null) {
      child.kill("SIGKILL");
      fail(`the bundled blkd did not start:\n${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  const code = await exited;
  if (code !== 0) fail(`the bundled blkd exited with ${code}:\n${stderr}`);
  statSync(join(out, "blkd.cache"));
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
const kib = (f) => (statSync(join(out, f)).size / 1024).toFixed(0);
console.log(
  `blkd bundle: dist/bundle/blkd.cjs (${inputs.length} modules, ${kib("blkd.cjs")} KiB), code cache ${kib("blkd.cache")} KiB`,
);
