/**
 * Start-up: the command modules and the job manager load on first use (blkd's command line), and a lazy
 * daemon answers exactly as a fully loaded one — command list and order, schema, argument errors,
 * unknown commands. What a real blkd process loads is read from Node's module loader debug output.
 */
import { QmpClient, QmpError } from "@blk/qmp";
import { makeTempDir, spawnPeer } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { COMMAND_GROUPS } from "../src/command-groups.ts";
import { createDaemon, type Daemon } from "../src/index.ts";
import { BLKD, BUILT } from "./daemonize-helpers.ts";
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
    const env = { ...process.env, NODE_DEBUG: "esm" };
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
