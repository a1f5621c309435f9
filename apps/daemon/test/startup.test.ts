/**
 * Start-up: the command modules and the job manager load on first use (blkd's command line), and a lazy
 * daemon answers exactly as a fully loaded one — command list and order, schema, argument errors,
 * unknown commands. What a real blkd process loads is read from Node's module loader debug output, for
 * dist/ (BLKD_NO_BUNDLE=1); the bundle the bin prefers is one script run with V8's code cache.
 */
import { cpSync, existsSync, mkdirSync, readFileSync, statSync, utimesSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { QmpClient, QmpError } from "@blk/qmp";
import { makeTempDir, run, spawnPeer } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { COMMAND_GROUPS } from "../src/command-groups.ts";
import { createDaemon, type Daemon } from "../src/index.ts";
import { BLKD, BUILT, BUNDLE_MANIFEST } from "./daemonize-helpers.ts";
import { startSession } from "./helpers.ts";

async function outcome(d: Daemon, command: string, args?: Record<string, unknown>): Promise<unknown> {
  try {
    return { return: await d.execute(command, args) };
  } catch (e) {
    if (e instanceof QmpError) return { class: e.errorClass, desc: e.desc };
    throw e;
  }
}

describe("lazy command registration", () => {
  it("every command module registers exactly the names its group lists, in that order", async () => {
    await using d = await createDaemon({ lazy: true });
    const listed = d.registry.names();
    await d.loadAll();
    for (const group of COMMAND_GROUPS) {
      const m = (await group.load())(d, d.registry).map((c) => c.name);
      expect(m, `group ${group.id} (src/command-groups.ts)`).toEqual(group.names);
    }
    expect(await d.execute("query-commands")).toEqual(listed.map((name) => ({ name })));
  });

  it("query-commands and query-qmp-schema are the same lazy or not", async () => {
    await using eager = await createDaemon();
    await using lazy = await createDaemon({ lazy: true });
    expect(lazy.registry.allLoaded).toBe(false);
    expect(await lazy.execute("query-commands")).toEqual(await eager.execute("query-commands"));
    await using lazy2 = await createDaemon({ lazy: true });
    expect(await lazy2.execute("query-qmp-schema")).toEqual(await eager.execute("query-qmp-schema"));
  });

  it("each command's first call answers as in a loaded daemon (argument errors, unknown commands)", async () => {
    await using eager = await createDaemon();
    const names = eager.registry.names().filter((n) => n !== "quit");
    for (const name of [...names, "no-such-command"]) {
      for (const args of [{ "x-bogus": 1 }, {}]) {
        await using lazy = await createDaemon({ lazy: true });
        // `nbd-server-start {}` and the like fail on a missing argument; none of these changes state.
        expect(await outcome(lazy, name, args), `${name} ${JSON.stringify(args)}`).toEqual(
          await outcome(eager, name, args),
        );
      }
    }
  });

  it("the job manager loads with the first job command", async () => {
    await using d = await createDaemon({ lazy: true });
    expect(() => d.jobs).toThrow(/not loaded/);
    expect(await d.execute("query-jobs")).toEqual([]);
    expect(d.jobs.queryJobs()).toEqual([]);
  });

  it("over QMP: unknown commands and concurrent first calls of one module", async () => {
    await using s = await startSession({ lazy: true });
    expect(await s.error("no-such-command")).toEqual({
      class: "CommandNotFound",
      desc: "The command no-such-command has not been found",
    });
    await s.qmp.execute("blockdev-add", { driver: "null-co", "node-name": "n" });
    // Two first calls of the same module at once share its load.
    const [a, b] = await Promise.all([
      s.qmp.execute("block-dirty-bitmap-add", { node: "n", name: "b0" }),
      s.qmp.execute("block-dirty-bitmap-add", { node: "n", name: "b1" }),
    ]);
    expect([a, b]).toEqual([{}, {}]);
    expect(await s.error("block-dirty-bitmap-add", { node: "n", name: "b0" })).toEqual({
      class: "GenericError",
      desc: "Bitmap already exists: b0",
    });
  });
});

/** The module URLs a blkd process loaded, from Node's ESM loader debug output. */
const loaded = (stderr: string): string[] =>
  [...stderr.matchAll(/Storing (file:\S+)/g)].map((m) => m[1] as string);

describe.skipIf(!BUILT)("what a blkd process loads", () => {
  it("--version loads no package; a null-co node and a monitor load no job or command module they do not use", async () => {
    await using dir = makeTempDir("blkd-startup");
    const env = { ...process.env, NODE_DEBUG: "esm", BLKD_NO_BUNDLE: "1" };
    await using v = await spawnPeer(process.execPath, [BLKD, "--version"], { env, timeoutMs: 30_000 });
    expect(await v.exited).toBe(0);
    const versionLoads = loaded(v.output());
    expect(versionLoads.some((u) => u.endsWith("/dist/main.js"))).toBe(true);
    expect(versionLoads.filter((u) => u.includes("/packages/"))).toEqual([]);

    const sock = dir.join("qmp.sock");
    await using d = await spawnPeer(
      process.execPath,
      [
        BLKD,
        "--blockdev",
        "null-co,node-name=n",
        "--chardev",
        `socket,id=m0,path=${sock},server=on,wait=off`,
        "--monitor",
        "chardev=m0",
      ],
      { env, timeoutMs: 30_000, ready: (out) => out.includes('"msg":"started"') },
    );
    const atStart = loaded(d.output());
    expect(atStart.some((u) => u.endsWith("/dist/commands/nodes.js"))).toBe(true);
    expect(atStart.filter((u) => u.includes("/packages/jobs/"))).toEqual([]);
    for (const m of ["block-jobs", "create", "transaction", "snapshots", "bitmaps", "exports"])
      expect(atStart.filter((u) => u.endsWith(`/dist/commands/${m}.js`))).toEqual([]);
    const qmp = await QmpClient.connect({ path: sock }, { timeoutMs: 10_000 });
    expect(await qmp.execute("query-jobs")).toEqual([]);
    await qmp.execute("quit");
    await qmp.close();
    expect(await d.exited).toBe(0);
    expect(loaded(d.output()).some((u) => u.includes("/packages/jobs/"))).toBe(true);
  });
});

const bundleBuilt = existsSync(BUNDLE_MANIFEST);
if (!bundleBuilt)
  console.log("startup.test: bundle tests skipped, apps/daemon/dist/bundle/ not built (pnpm build)");

describe.skipIf(!bundleBuilt)("the bundle", () => {
  it("bin/blkd.cjs runs it with its code cache: nothing from dist/, koffi loads, lazy modules work", async (ctx) => {
    // A package rebuilt with `tsc -b` alone since `pnpm build` makes the bundle stale (the bin then runs
    // dist/, which the test above covers): nothing to test here until the next build.
    const { script, inputs } = JSON.parse(readFileSync(BUNDLE_MANIFEST, "utf8")) as {
      script: string;
      inputs: string[];
    };
    const bundleDir = dirname(BUNDLE_MANIFEST);
    const built = statSync(join(bundleDir, script)).mtimeMs;
    const newer = inputs.filter((f) => statSync(join(bundleDir, f)).mtimeMs > built);
    if (newer.length > 0) {
      console.log(`startup.test: bundle stale (${newer[0]} is newer): run pnpm build`);
      ctx.skip();
    }
    await using dir = makeTempDir("blkd-bundle");
    const env = { ...process.env, NODE_DEBUG: "esm,module", BLKD_BUNDLE_DEBUG: "1" };
    // Through the ESM wrapper kept at the old path too.
    for (const bin of [BLKD, BLKD.replace(/\.cjs$/, ".js")]) {
      await using v = await spawnPeer(process.execPath, [bin, "--version"], { env, timeoutMs: 30_000 });
      expect(await v.exited).toBe(0);
      expect(v.output()).toMatch(/blkd bundle: \S+\/dist\/bundle\/blkd\.cjs, code cache accepted/);
      expect(v.output()).toMatch(/^blkd version \d/m);
      expect(loaded(v.output()).filter((u) => u.includes("/dist/"))).toEqual([]);
    }
    const img = dir.join("disk.img");
    writeFileSync(img, Buffer.alloc(1 << 20));
    const sock = dir.join("qmp.sock");
    await using d = await spawnPeer(
      process.execPath,
      [
        BLKD,
        "--blockdev",
        `driver=file,node-name=f,filename=${img}`,
        "--blockdev",
        "driver=raw,node-name=disk,file=f",
        "--nbd-server",
        `addr.type=unix,addr.path=${dir.join("nbd.sock")}`,
        "--export",
        "type=nbd,id=e,node-name=disk",
        "--chardev",
        `socket,id=m0,path=${sock},server=on,wait=off`,
        "--monitor",
        "chardev=m0",
      ],
      { env, timeoutMs: 30_000, ready: (out) => out.includes('"msg":"started"') },
    );
    expect(d.output()).toMatch(/code cache accepted/);
    // The file driver's system calls: koffi resolved from @blk/drivers (it is not in the bundle).
    expect(d.output()).toMatch(/load "[^"]*\/koffi\/index\.cjs"/);
    const qmp = await QmpClient.connect({ path: sock }, { timeoutMs: 10_000 });
    // Modules imported on first use (the job manager, the qcow2 driver and create jobs) run from the bundle.
    expect(await qmp.execute("query-jobs")).toEqual([]);
    expect(await qmp.execute("query-version")).toMatchObject({ package: expect.stringMatching(/^blk \d/) });
    await qmp.execute("blockdev-create", {
      "job-id": "c",
      options: { driver: "qcow2", file: "f", size: 1 << 20 },
    });
    await qmp.waitEvent("JOB_STATUS_CHANGE", {
      since: 0,
      where: (e) => e.id === "c" && e.status === "concluded",
      timeoutMs: 20_000,
    });
    expect(await qmp.execute("query-jobs")).toMatchObject([{ id: "c", status: "concluded" }]);
    await qmp.execute("quit");
    await qmp.close();
    expect(await d.exited).toBe(0);
    expect(loaded(d.output()).filter((u) => u.includes("/dist/"))).toEqual([]);
    expect(script).toBe("blkd.cjs");
  });

  it("the bin shim runs dist/main.js when the bundle is missing or older than a file it bundles", async () => {
    // A copy of the shim next to a fake dist/ whose two entries say which one ran.
    await using dir = makeTempDir("blkd-shim");
    mkdirSync(dir.join("bin"));
    mkdirSync(dir.join("dist/bundle"), { recursive: true });
    cpSync(BLKD, dir.join("bin/blkd.cjs"));
    writeFileSync(
      dir.join("dist/main.js"),
      'export async function main(argv) { process.stdout.write("dist " + argv.join(" ")); return 0; }\n',
    );
    const shim = dir.join("bin/blkd.cjs");
    const ran = async (env?: NodeJS.ProcessEnv): Promise<string> =>
      (await run(process.execPath, [shim, "x"], { env: { ...process.env, ...env } })).stdout;
    expect(await ran()).toBe("dist x");
    writeFileSync(
      dir.join("dist/bundle/blkd.cjs"),
      'exports.main = async (argv) => { process.stdout.write("bundle " + argv.join(" ")); return 0; };\n',
    );
    writeFileSync(
      dir.join("dist/bundle/manifest.json"),
      JSON.stringify({ script: "blkd.cjs", inputs: ["../main.js"] }),
    );
    const at = (path: string, seconds: number): void => utimesSync(dir.join(path), seconds, seconds);
    at("dist/main.js", 1_000_000);
    at("dist/bundle/blkd.cjs", 2_000_000);
    expect(await ran()).toBe("bundle x");
    expect(await ran({ BLKD_NO_BUNDLE: "1" })).toBe("dist x");
    at("dist/main.js", 3_000_000);
    expect(await ran()).toBe("dist x");
  });
});
