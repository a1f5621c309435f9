/**
 * Start-up: a command's module loads when it runs (what a real blk-img process loads is read from Node's
 * module loader debug output, for dist/ with BLK_IMG_NO_BUNDLE=1), and the bundle the bin prefers — one
 * script run with V8's code cache — answers as dist/ does; the shim falls back to dist/ when the bundle
 * is missing or stale, and is the same code as blkd's.
 */
import { cpSync, existsSync, mkdirSync, readFileSync, statSync, utimesSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { makeTempDir, run } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { COMMANDS } from "../src/main.ts";

const BIN = fileURLToPath(new URL("../bin/blk-img.js", import.meta.url));
const BUILT = existsSync(fileURLToPath(new URL("../dist/main.js", import.meta.url)));
const MANIFEST = fileURLToPath(new URL("../dist/bundle/manifest.json", import.meta.url));
const BLKD_SHIM = fileURLToPath(new URL("../../daemon/bin/blkd.cjs", import.meta.url));
const COMMAND_NAMES = [
  "amend",
  "bitmap",
  "check",
  "commit",
  "compare",
  "convert",
  "create",
  "info",
  "map",
  "measure",
  "rebase",
  "resize",
  "snapshot",
];

/** The module URLs a process loaded through the ESM loader (NODE_DEBUG=esm). */
const loaded = (stderr: string): string[] =>
  [...stderr.matchAll(/Storing (file:\S+)/g)].map((m) => m[1] as string);

/** A 1 MiB raw image with some data. */
function rawImage(path: string): string {
  const data = Buffer.alloc(1 << 20);
  for (let i = 0; i < data.length; i += 65536) data.fill(i / 65536 + 1, i, i + 4096);
  writeFileSync(path, data);
  return path;
}

describe("lazy commands", () => {
  it("COMMANDS has every command; one runs from its module on first call", async () => {
    expect(Object.keys(COMMANDS)).toEqual(COMMAND_NAMES);
    const out: string[] = [];
    const err: string[] = [];
    const ctx = {
      io: { stdout: { write: (s: string) => out.push(s) }, stderr: { write: (s: string) => err.push(s) } },
      out: (s: string) => void out.push(s),
      error: (s: string) => void err.push(`blk-img: ${s}\n`),
      err: (s: string) => void err.push(s),
    };
    expect(await COMMANDS.info?.(["-h"], ctx)).toBe(0);
    expect(out.join("")).toMatch(/^usage: blk-img info /);
  });
});

describe.skipIf(!BUILT)("what a blk-img process loads from dist/", () => {
  it("--version loads no command and no package; info loads its own command module only", async () => {
    await using dir = makeTempDir("blk-img-startup");
    const env = { ...process.env, NODE_DEBUG: "esm", BLK_IMG_NO_BUNDLE: "1" };
    const v = await run(process.execPath, [BIN, "--version"], { env, timeoutMs: 30_000 });
    expect(v.code).toBe(0);
    const versionLoads = loaded(v.stderr);
    expect(versionLoads.some((u) => u.endsWith("/apps/cli/dist/main.js"))).toBe(true);
    expect(versionLoads.filter((u) => u.includes("/dist/commands/") || u.includes("/packages/"))).toEqual([]);

    const r = await run(process.execPath, [BIN, "info", rawImage(dir.join("a.raw"))], {
      env,
      timeoutMs: 30_000,
    });
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("virtual size: 1 MiB (1048576 bytes)");
    const commands = loaded(r.stderr)
      .filter((u) => u.includes("/apps/cli/dist/commands/"))
      .map((u) => u.replace(/^.*\/commands\//, ""))
      .sort();
    // info prints snapshot tables with the snapshot command's formatter.
    expect(commands).toEqual(["info.js", "snapshot.js"]);
  });
});

const bundleBuilt = existsSync(MANIFEST);
if (!bundleBuilt)
  console.log("startup.test: bundle tests skipped, apps/cli/dist/bundle/ not built (pnpm build)");

describe.skipIf(!bundleBuilt)("the bundle", () => {
  it("bin/blk-img.js runs it with its code cache: nothing from dist/, koffi loads, same output as dist/", async (ctx) => {
    // A package rebuilt with `tsc -b` alone since `pnpm build` makes the bundle stale (the bin then runs
    // dist/, which the test above covers): nothing to test here until the next build.
    const { script, inputs } = JSON.parse(readFileSync(MANIFEST, "utf8")) as {
      script: string;
      inputs: string[];
    };
    expect(script).toBe("blk-img.cjs");
    const bundleDir = dirname(MANIFEST);
    const built = statSync(join(bundleDir, script)).mtimeMs;
    const newer = inputs.filter((f) => statSync(join(bundleDir, f)).mtimeMs > built);
    if (newer.length > 0) {
      console.log(`startup.test: bundle stale (${newer[0]} is newer): run pnpm build`);
      ctx.skip();
    }
    await using dir = makeTempDir("blk-img-bundle");
    const raw = rawImage(dir.join("a.raw"));
    const env = { ...process.env, NODE_DEBUG: "esm,module", BLK_IMG_BUNDLE_DEBUG: "1" };
    const plain = { ...process.env, BLK_IMG_NO_BUNDLE: "1" };
    const runs = [
      ["--version"],
      ["info", raw],
      ["convert", "-f", "raw", "-O", "qcow2", raw, dir.join("b.qcow2")],
      ["info", "--output=json", dir.join("b.qcow2")],
      ["map", "--output=json", dir.join("b.qcow2")],
      ["compare", raw, dir.join("b.qcow2")],
      ["nosuchcommand"],
    ];
    for (const args of runs) {
      const b = await run(process.execPath, [BIN, ...args], { env, timeoutMs: 30_000 });
      const d = await run(process.execPath, [BIN, ...args], { env: plain, timeoutMs: 30_000 });
      expect(b.stderr, args.join(" ")).toMatch(
        /blk-img bundle: \S+\/dist\/bundle\/blk-img\.cjs, code cache accepted/,
      );
      expect(loaded(b.stderr).filter((u) => u.includes("/dist/"))).toEqual([]);
      // The bundle's own lines and Node's debug output aside, the same as from dist/.
      const own = b.stderr
        .split("\n")
        .filter((l) => !/^(blk-img bundle: |MODULE \d+: |ESM \d+: )/.test(l))
        .join("\n");
      expect({ code: b.code, stdout: b.stdout, stderr: own }, args.join(" ")).toEqual({
        code: d.code,
        stdout: d.stdout,
        stderr: d.stderr,
      });
      if (args[0] === "info") {
        // The file driver's system calls: koffi resolved from @blk/drivers (it is not in the bundle).
        expect(b.stderr).toMatch(/load "[^"]*\/koffi\/index\.cjs"/);
        // Node's modules for TLS, compression and hashes load on first use, not with the script.
        expect(b.stderr).not.toMatch(/load built-in module node:(tls|zlib|crypto)\b/);
      }
    }
  });
});

describe("the bin shim", () => {
  it("runs dist/main.js when the bundle is missing or older than a file it bundles", async () => {
    // A copy of the shim next to a fake dist/ whose two entries say which one ran.
    await using dir = makeTempDir("blk-img-shim");
    mkdirSync(dir.join("bin"));
    mkdirSync(dir.join("dist/bundle"), { recursive: true });
    cpSync(BIN, dir.join("bin/blk-img.js"));
    cpSync(join(dirname(BIN), "package.json"), dir.join("bin/package.json"));
    writeFileSync(dir.join("package.json"), '{ "type": "module" }\n');
    writeFileSync(
      dir.join("dist/main.js"),
      'export async function main(argv) { process.stdout.write("dist " + argv.join(" ")); return 3; }\n',
    );
    const shim = dir.join("bin/blk-img.js");
    const ran = async (env?: NodeJS.ProcessEnv): Promise<string> => {
      const r = await run(process.execPath, [shim, "x"], {
        env: { ...process.env, ...env },
        timeoutMs: 30_000,
      });
      expect(r.code).toBe(3);
      return r.stdout;
    };
    expect(await ran()).toBe("dist x");
    writeFileSync(
      dir.join("dist/bundle/blk-img.cjs"),
      'exports.main = async (argv) => { process.stdout.write("bundle " + argv.join(" ")); return 3; };\n',
    );
    writeFileSync(
      dir.join("dist/bundle/manifest.json"),
      JSON.stringify({ script: "blk-img.cjs", inputs: ["../main.js"] }),
    );
    const at = (path: string, seconds: number): void => utimesSync(dir.join(path), seconds, seconds);
    at("dist/main.js", 1_000_000);
    at("dist/bundle/blk-img.cjs", 2_000_000);
    expect(await ran()).toBe("bundle x");
    expect(await ran({ BLK_IMG_NO_BUNDLE: "1" })).toBe("dist x");
    at("dist/main.js", 3_000_000);
    expect(await ran()).toBe("dist x");
  });

  it("is blkd's shim apart from its name and environment prefix", () => {
    const body = (file: string): string => {
      const text = readFileSync(file, "utf8");
      const at = text.indexOf("// ---- The same in every bundled bin's shim");
      expect(at, file).toBeGreaterThan(0);
      return text.slice(at);
    };
    expect(body(BIN)).toBe(body(BLKD_SHIM));
    expect(readFileSync(BIN, "utf8")).toMatch(/^const NAME = "blk-img";.*\nconst ENV = "BLK_IMG";/m);
  });
});
