/**
 * Active commit (`block-commit` whose top is the active layer or has a writer) against memory-driver chains
 * base ← mid ← top with a guest writing through the top's parent edge: READY with type `commit`, complete
 * moves the guest onto the base and the base reads the model; soft cancel after READY; cancel before READY
 * leaves the chain alone; the transcript's event sequence; a top with a writer below the device; dropped
 * unowned layers deleted; a shorter / read-only base; speed limit on the manual clock; errors
 * (spec/jobs.md §2.6, §4, qmp-transcripts.md §1 "block-commit (active)").
 */
import {
  BlkError,
  BlockGraph,
  type BlockNode,
  backendParent,
  type Edge,
  type MemoryDriver,
  memoryDriver,
  PERM,
  PERM_ALL,
} from "@blk/core";
import { describe, expect, it } from "vitest";
import { ActiveCommitJob, commit } from "../src/commit/index.ts";
import { checkNodeNotBusy, isJobError, type JobEvent } from "../src/index.ts";
import { compact, type ManualClock, settle, setup, tick } from "./helpers.ts";
import { KiB, MiB, pump, rng, sha, until } from "./mirror-helpers.ts";

const CLUSTER = 64 * KiB;

interface Env {
  manager: ReturnType<typeof setup>["manager"];
  clock: ManualClock;
  events: JobEvent[];
  graph: BlockGraph;
  /** Bottom first. */
  nodes: BlockNode[];
  /** The active layer (last of `nodes`). */
  top: BlockNode;
  guest: Edge;
  /** What the guest reads (initial chain view plus its writes). */
  model: Uint8Array;
  mem(node: BlockNode): MemoryDriver;
}

function scatter(buf: Uint8Array, seed: number, n: number, maxLen: number): void {
  const r = rng(seed);
  for (let i = 0; i < n; i++) {
    const len = 1 + Math.floor(r() * maxLen);
    const off = Math.floor(r() * (buf.length - len));
    buf.fill(1 + Math.floor(r() * 250), off, off + len);
  }
}

/** A chain of memory nodes named `names` (bottom first), each with scattered data; a guest on the last. */
async function chain(
  opts: {
    names?: string[];
    size?: number;
    seed?: number;
    unowned?: string[];
    sizes?: Record<string, number>;
    data?: Record<string, Uint8Array>;
    readOnly?: string[];
  } = {},
): Promise<Env> {
  const names = opts.names ?? ["base", "mid", "top"];
  const size = opts.size ?? 4 * MiB;
  const { manager, clock, events } = setup();
  const graph = new BlockGraph({ random: rng(9) });
  const nodes: BlockNode[] = [];
  let i = 0;
  for (const name of names) {
    const sz = opts.sizes?.[name] ?? size;
    let d = opts.data?.[name];
    if (d === undefined) {
      d = new Uint8Array(sz);
      scatter(d, (opts.seed ?? 1) * 37 + i++, 5, 300 * KiB);
    }
    const below = nodes.at(-1);
    nodes.push(
      await graph.open(
        memoryDriver,
        { size: sz, data: d, clusterSize: CLUSTER },
        {
          nodeName: name,
          ...(below === undefined ? {} : { children: { backing: below } }),
          ...(opts.unowned?.includes(name) === true ? { owned: false } : {}),
          ...(opts.readOnly?.includes(name) === true ? { readOnly: true } : {}),
        },
      ),
    );
  }
  const top = nodes.at(-1) as BlockNode;
  const guest = graph.attach(backendParent("guest"), top, {
    name: "root",
    perm: PERM.WRITE | PERM.CONSISTENT_READ,
    shared: PERM_ALL,
  });
  const mem = (n: BlockNode): MemoryDriver => n.state as MemoryDriver;
  return { manager, clock, events, graph, nodes, top, guest, model: await mem(top).snapshot(), mem };
}

const node = (env: Env, name: string): BlockNode => {
  const n = env.graph.find(name);
  if (n === undefined) throw new Error(`no node ${name}`);
  return n;
};

/** A guest writing random patterns (some zero-writes) one request at a time; `states` gets each model hash. */
function guestWriter(
  env: Env,
  seed: number,
  writes: number,
  states?: Set<string>,
): { done: Promise<void>; count(): number } {
  const r = rng(seed);
  const size = env.model.length;
  let n = 0;
  const done = (async () => {
    for (; n < writes; n++) {
      const len = 1 + Math.floor(r() * 96 * KiB);
      const off = Math.floor(r() * (size - len));
      if (r() < 0.15) {
        await env.guest.writeZeroes(off, len);
        env.model.fill(0, off, off + len);
      } else {
        const data = new Uint8Array(len).fill(1 + Math.floor(r() * 254));
        data[0] = n & 0xff;
        await env.guest.write(off, data);
        env.model.set(data, off);
      }
      states?.add(sha(env.model));
      await tick();
    }
  })();
  return { done, count: () => n };
}

/** Bytes allocated from `top` down to (excluding) `base`, in whole `granularity` units (the dirty init). */
async function allocatedAbove(top: BlockNode, base: BlockNode, granularity = CLUSTER): Promise<number> {
  const ext = await top.blockStatusAbove(0, top.length, { base });
  const dirty = new Set<number>();
  for (const e of ext) {
    if (!e.allocated) continue;
    for (let g = Math.floor(e.offset / granularity); g * granularity < e.offset + e.length; g++) dirty.add(g);
  }
  return dirty.size * granularity;
}

const formats = (env: Env): string[] => env.graph.list().map((n) => n.driver.format);

const READY_THEN_COMPLETE = (id: string): string[] => [
  `${id}:created`,
  `${id}:running`,
  `${id}:ready`,
  `BLOCK_JOB_READY:${id}`,
  `${id}:waiting`,
  `${id}:pending`,
  `BLOCK_JOB_COMPLETED:${id}`,
  `${id}:concluded`,
  `${id}:null`,
];

describe("active block-commit with a guest writing", () => {
  for (let round = 0; round < 3; round++) {
    it(`round ${round}: READY (type commit), complete moves the guest onto the base, which reads the model`, async () => {
      const env = await chain({ seed: 60 + round });
      const mid = node(env, "mid");
      const base = node(env, "base");
      const job = await commit(env.manager, env.graph, {
        "job-id": "commit1",
        device: "top",
        "base-node": "base",
      });
      expect(job).toBeInstanceOf(ActiveCommitJob);
      expect(job.type).toBe("commit");
      expect(compact(env.events)).toEqual(["commit1:created", "commit1:running"]);
      // the mirror_top filter took over the top's parents
      expect(env.guest.child.driver.format).toBe("mirror_top");
      expect(env.manager.queryBlockJobs()[0]).toMatchObject({ type: "commit", device: "commit1" });
      const g = guestWriter(env, 100 + round, 80);
      await pump(env.clock, () => job.status === "ready");
      const atReady = g.count();
      const ready = env.events.find((e) => e.event === "BLOCK_JOB_READY");
      expect(ready?.data).toMatchObject({ device: "commit1", speed: 0, type: "commit" });
      await until(() => g.count() >= atReady + 10 || g.count() === 80);
      job.complete();
      await g.done;
      expect(await job.outcome).toEqual({ status: "completed" });
      expect(atReady).toBeLessThan(80);
      expect(compact(env.events)).toEqual(READY_THEN_COMPLETE("commit1"));
      const done = env.events.find((e) => e.event === "BLOCK_JOB_COMPLETED");
      expect(done?.data).toMatchObject({ device: "commit1", speed: 0, type: "commit" });
      expect(done?.data).not.toHaveProperty("error");
      // the guest's edge now is on the base; the base alone reads the model
      expect(env.guest.child).toBe(base);
      expect(job.dropped).toBe(true);
      expect(sha(await env.guest.read(0, env.model.length))).toBe(sha(env.model));
      expect(sha(await env.mem(base).snapshot())).toBe(sha(env.model));
      // mirror_top gone; top and mid (monitor-owned) stay, out of the guest's path, their chain intact
      expect(formats(env)).not.toContain("mirror_top");
      expect(
        env.graph
          .list()
          .map((n) => n.nodeName)
          .sort(),
      ).toEqual(["base", "mid", "top"]);
      expect(env.top.parents).toEqual([]);
      expect(env.top.backing).toBe(mid);
      expect(base.parents.map((e) => e.name).sort()).toEqual(["backing", "root"]);
      expect(base.bitmaps).toEqual([]);
      // the next write lands in the base only
      const before = env.mem(env.top).counters.writes;
      await env.guest.write(0, new Uint8Array(512).fill(0xee));
      expect(env.mem(env.top).counters.writes).toBe(before);
      expect((await base.read(0, 512))[0]).toBe(0xee);
    });
  }

  it("soft cancel after READY: COMPLETED without the switch; the base holds a past state of the guest's view", async () => {
    const env = await chain({ seed: 70 });
    const states = new Set<string>([sha(env.model)]);
    const base = node(env, "base");
    const mid = node(env, "mid");
    const job = await commit(env.manager, env.graph, { "job-id": "c1", device: "top" });
    const g = guestWriter(env, 7, 80, states);
    await pump(env.clock, () => job.status === "ready");
    job.cancel();
    const outcome = await job.outcome;
    await g.done;
    expect(outcome).toEqual({ status: "cancelled", consistent: true });
    expect(compact(env.events)).toEqual([
      "c1:created",
      "c1:running",
      "c1:ready",
      "BLOCK_JOB_READY:c1",
      "c1:waiting",
      "c1:pending",
      "BLOCK_JOB_COMPLETED:c1",
      "c1:concluded",
      "c1:null",
    ]);
    expect(job.dropped).toBe(false);
    expect(env.guest.child).toBe(env.top);
    expect(env.top.backing).toBe(mid);
    expect(mid.backing).toBe(base);
    expect(formats(env)).not.toContain("mirror_top");
    expect(sha(await env.guest.read(0, env.model.length))).toBe(sha(env.model));
    expect(states.has(sha(await env.mem(base).snapshot()))).toBe(true);
    expect(base.parents.map((e) => e.name)).toEqual(["backing"]);
  });

  it("cancel before READY (no force) is forced: CANCELLED, chain untouched, graph restored", async () => {
    const env = await chain({ seed: 71, size: 8 * MiB });
    const base = node(env, "base");
    const mid = node(env, "mid");
    const job = await commit(env.manager, env.graph, {
      "job-id": "c2",
      device: "top",
      speed: MiB,
      "filter-node-name": "ctop",
    });
    expect(env.graph.find("ctop")?.driver.format).toBe("mirror_top");
    expect(env.guest.child.nodeName).toBe("ctop");
    const g = guestWriter(env, 8, 20);
    await env.clock.advance(300_000_000);
    await g.done;
    expect(job.status).toBe("running");
    env.manager.blockJobCancel({ device: "c2" });
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(compact(env.events)).toEqual([
      "c2:created",
      "c2:running",
      "c2:aborting",
      "BLOCK_JOB_CANCELLED:c2",
      "c2:concluded",
      "c2:null",
    ]);
    expect(env.events.find((e) => e.event === "BLOCK_JOB_CANCELLED")?.data).toMatchObject({
      type: "commit",
      device: "c2",
    });
    expect(env.graph.find("ctop")).toBeUndefined();
    expect(env.guest.child).toBe(env.top);
    expect(env.top.backing).toBe(mid);
    expect(mid.backing).toBe(base);
    expect(env.top.parents.map((e) => e.name)).toEqual(["root"]);
    expect(base.parents.map((e) => e.name)).toEqual(["backing"]);
    expect(sha(await env.guest.read(0, env.model.length))).toBe(sha(env.model));
    expect(env.manager.queryJobs()).toEqual([]);
  });

  it("force cancel in READY: CANCELLED, no switch", async () => {
    const env = await chain({ seed: 72 });
    const job = await commit(env.manager, env.graph, { "job-id": "c3", device: "top" });
    await pump(env.clock, () => job.status === "ready");
    env.manager.blockJobCancel({ device: "c3", force: true });
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(compact(env.events).slice(-4)).toEqual([
      "c3:aborting",
      "BLOCK_JOB_CANCELLED:c3",
      "c3:concluded",
      "c3:null",
    ]);
    expect(env.guest.child).toBe(env.top);
    expect(sha(await env.guest.read(0, env.model.length))).toBe(sha(env.model));
  });
});

describe("the transcript's active commit", () => {
  it("events and READY/COMPLETED data as qemu-storage-daemon 7.2 (len = data allocated above the base)", async () => {
    // qmp-transcripts.md §1: base <- top after the stream; block-commit {job-id, device: top, base-node: base}
    const size = 8 * MiB;
    const topData = new Uint8Array(size);
    topData.fill(5, 0, 2 * MiB);
    topData.fill(6, 5 * MiB + 4096, 6 * MiB);
    const env = await chain({ names: ["base", "top"], size, seed: 73, data: { top: topData } });
    const base = node(env, "base");
    // as in the transcript, nobody uses top (added with blockdev-add only)
    env.guest.detach();
    const expected = await allocatedAbove(env.top, base);
    expect(expected).toBe(3 * MiB);
    const job = await commit(env.manager, env.graph, {
      "job-id": "commit1",
      device: "top",
      "base-node": "base",
    });
    // the command returns after created, running
    expect(compact(env.events)).toEqual(["commit1:created", "commit1:running"]);
    await pump(env.clock, () => job.status === "ready");
    expect(env.manager.queryBlockJobs()[0]).toMatchObject({
      type: "commit",
      device: "commit1",
      len: expected,
      offset: expected,
      ready: true,
      status: "ready",
    });
    env.manager.blockJobComplete({ device: "commit1" });
    await pump(env.clock, () => job.status === "null");
    expect(compact(env.events)).toEqual(READY_THEN_COMPLETE("commit1"));
    const data = { device: "commit1", len: expected, offset: expected, speed: 0, type: "commit" };
    expect(env.events.find((e) => e.event === "BLOCK_JOB_READY")?.data).toEqual(data);
    expect(env.events.find((e) => e.event === "BLOCK_JOB_COMPLETED")?.data).toEqual(data);
    expect(env.manager.queryJobs()).toEqual([]);
    // top still exists (monitor-owned, it had no parents); its chain is unchanged; base holds its view
    expect(env.graph.find("top")).toBe(env.top);
    expect(env.top.parents).toEqual([]);
    expect(env.top.backing).toBe(base);
    expect(formats(env)).not.toContain("mirror_top");
    expect(sha(await env.mem(base).snapshot())).toBe(sha(env.model));
  });

  it("READY → standby on pause; complete in standby acts after resume; manual finalize and dismiss", async () => {
    const env = await chain({ seed: 81 });
    const base = node(env, "base");
    const job = await commit(env.manager, env.graph, {
      "job-id": "c10",
      device: "top",
      "auto-finalize": false,
      "auto-dismiss": false,
    });
    await pump(env.clock, () => job.status === "ready");
    env.manager.jobPause({ id: "c10" });
    await settle();
    expect(job.status).toBe("standby");
    env.manager.jobComplete({ id: "c10" });
    await env.clock.advance(300_000_000);
    expect(job.status).toBe("standby");
    env.manager.jobResume({ id: "c10" });
    await pump(env.clock, () => job.status === "pending");
    // not switched before finalize; the guest's writes are held meanwhile (as QEMU's drained section)
    expect(env.guest.child.driver.format).toBe("mirror_top");
    await env.manager.jobFinalize({ id: "c10" });
    expect(job.status).toBe("concluded");
    expect(env.guest.child).toBe(base);
    env.manager.jobDismiss({ id: "c10" });
    expect(compact(env.events)).toEqual([
      "c10:created",
      "c10:running",
      "c10:ready",
      "BLOCK_JOB_READY:c10",
      "c10:standby",
      "c10:ready",
      "c10:waiting",
      "c10:pending",
      "BLOCK_JOB_PENDING:c10",
      "BLOCK_JOB_COMPLETED:c10",
      "c10:concluded",
      "c10:null",
    ]);
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(sha(await env.mem(base).snapshot())).toBe(sha(env.model));
  });

  it("while running: the job holds mirror_top, the top, the layers down to the base and a writer on the base", async () => {
    const env = await chain({ names: ["base", "a", "b", "top"], seed: 74 });
    const job = await commit(env.manager, env.graph, {
      "job-id": "j",
      device: "top",
      "base-node": "base",
      speed: 1,
    });
    const held = job.heldEdges.map((e) => [e.name, e.child.nodeName]);
    expect(held).toEqual([
      ["main node", job.filter.nodeName],
      ["source", "top"],
      ["intermediate node", "b"],
      ["intermediate node", "a"],
      ["target", "base"],
    ]);
    expect(job.filter.driver.format).toBe("mirror_top");
    expect(job.filter.nodeName).toMatch(/^#block\d{5}$/);
    const base = node(env, "base");
    const writer = base.parents.find((e) => e.name === "root");
    expect(writer?.perm).toBe(PERM.WRITE);
    // the top is no longer a root node; the chain's nodes are busy for other jobs
    const again = (args: Record<string, unknown>): Promise<unknown> =>
      commit(env.manager, env.graph, { "job-id": "k", ...args } as never).catch((x: unknown) => x);
    expect(((await again({ device: "top" })) as Error).message).toBe("Need a root block node");
    for (const n of ["top", "b", "a", "base"]) {
      expect(() => checkNodeNotBusy(node(env, n))).toThrow(
        `Node '${n}' is busy: block device is in use by block job: commit`,
      );
    }
    job.cancel();
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(base.parents.map((e) => e.name)).toEqual(["backing"]);
  });
});

describe("graph variants", () => {
  it("dropped layers nobody owns are deleted on complete", async () => {
    const env = await chain({ names: ["base", "a", "b", "top"], unowned: ["a", "b", "top"], seed: 75 });
    const [, a, b] = env.nodes as [BlockNode, BlockNode, BlockNode];
    const job = await commit(env.manager, env.graph, { "job-id": "c4", device: "top" });
    const g = guestWriter(env, 9, 30);
    await pump(env.clock, () => job.status === "ready");
    job.complete();
    await g.done;
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(env.graph.list().map((n) => n.nodeName)).toEqual(["base"]);
    expect(env.top.closed && a.closed && b.closed).toBe(true);
    expect(env.guest.child).toBe(node(env, "base"));
    expect(sha(await env.guest.read(0, env.model.length))).toBe(sha(env.model));
  });

  it("a top with a writer below the device: its parents (overlay, export) move to the base", async () => {
    const env = await chain({ seed: 76 });
    const mid = node(env, "mid");
    const base = node(env, "base");
    const exp = env.graph.attach(backendParent("exp"), mid, {
      name: "root",
      perm: PERM.WRITE | PERM.CONSISTENT_READ,
      shared: PERM_ALL,
    });
    const calls: [string | undefined, string | undefined][] = [];
    Object.assign(env.top.state, {
      changeBackingFile: (f: string | undefined, fmt: string | undefined): Promise<void> => {
        calls.push([f, fmt]);
        return Promise.resolve();
      },
    });
    const refused = await commit(env.manager, env.graph, {
      "job-id": "c5",
      device: "top",
      "top-node": "mid",
      "backing-file": "x",
    }).catch((x: unknown) => x);
    expect((refused as Error).message).toBe("'backing-file' specified, but 'top' has a writer on it");
    const midView = await env.mem(mid).snapshot();
    const job = await commit(env.manager, env.graph, { "job-id": "c5", device: "top", "top-node": "mid" });
    expect(job).toBeInstanceOf(ActiveCommitJob);
    expect(exp.child.driver.format).toBe("mirror_top");
    expect(env.top.backing?.driver.format).toBe("mirror_top");
    const g = guestWriter(env, 10, 30);
    await pump(env.clock, () => job.status === "ready");
    await g.done;
    // a write through the export lands in mid (and is committed); the guest sees it where top has nothing
    await exp.write(CLUSTER, new Uint8Array(CLUSTER).fill(0x42));
    midView.fill(0x42, CLUSTER, 2 * CLUSTER);
    if (env.mem(env.top).clusterState(CLUSTER) === "unallocated") env.model.fill(0x42, CLUSTER, 2 * CLUSTER);
    job.complete();
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(exp.child).toBe(base);
    expect(env.top.backing).toBe(base);
    expect(mid.parents).toEqual([]);
    expect(calls).toEqual([["base", "x-blk-memory"]]);
    expect(sha(await env.mem(base).snapshot())).toBe(sha(midView));
    expect(sha(await env.guest.read(0, env.model.length))).toBe(sha(env.model));
  });

  it("a shorter, read-only base is grown and made writable; it stays writable as the new active layer", async () => {
    const env = await chain({ sizes: { base: MiB }, readOnly: ["base"], seed: 77 });
    const base = node(env, "base");
    expect(base.readOnly).toBe(true);
    const job = await commit(env.manager, env.graph, { "job-id": "c6", device: "top" });
    expect(base.readOnly).toBe(false);
    const g = guestWriter(env, 11, 20);
    await pump(env.clock, () => job.status === "ready");
    job.complete();
    await g.done;
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(base.length).toBe(4 * MiB);
    expect(base.readOnly).toBe(false);
    expect(sha(await env.mem(base).snapshot())).toBe(sha(env.model));
  });

  it("a read-only base goes back to read-only when the job is cancelled", async () => {
    const env = await chain({ readOnly: ["base"], seed: 78 });
    const base = node(env, "base");
    const job = await commit(env.manager, env.graph, { "job-id": "c7", device: "top", speed: 1 });
    expect(base.readOnly).toBe(false);
    job.cancel();
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
    await tick();
    expect(base.readOnly).toBe(true);
  });
});

describe("errors", () => {
  it("on-error=report with a failing base write: COMPLETED with error, chain untouched", async () => {
    const env = await chain({ seed: 79 });
    const base = node(env, "base");
    let writes = 0;
    env.mem(base).hook = (req) => {
      if (req.kind === "write" && ++writes === 2) throw new BlkError("EIO", "injected EIO");
    };
    const job = await commit(env.manager, env.graph, { "job-id": "c8", device: "top" });
    const g = guestWriter(env, 12, 20);
    await pump(env.clock, () => job.status === "null");
    await g.done;
    expect((await job.outcome).status).toBe("failed");
    expect(compact(env.events)).toEqual([
      "c8:created",
      "c8:running",
      "BLOCK_JOB_ERROR:c8",
      "c8:aborting",
      "BLOCK_JOB_COMPLETED:c8",
      "c8:concluded",
      "c8:null",
    ]);
    expect(env.events.find((e) => e.event === "BLOCK_JOB_ERROR")?.data).toEqual({
      device: "c8",
      operation: "write",
      action: "report",
    });
    expect(env.events.find((e) => e.event === "BLOCK_JOB_COMPLETED")?.data).toMatchObject({
      error: "Input/output error",
      type: "commit",
    });
    expect(env.guest.child).toBe(env.top);
    expect(formats(env)).not.toContain("mirror_top");
    expect(sha(await env.guest.read(0, env.model.length))).toBe(sha(env.model));
  });

  it("refusals leave nothing behind (no filter, no job, base read-only again)", async () => {
    const env = await chain({ readOnly: ["base"] });
    await env.graph.open(memoryDriver, { size: MiB }, { nodeName: "taken" });
    const cases: [Record<string, unknown>, string][] = [
      [{ device: "top" }, "Invalid job ID ''"],
      [{ device: "top", "job-id": "c", speed: -1 }, "Parameter 'speed' expects a non-negative value"],
      [
        { device: "top", "job-id": "c", "filter-node-name": "taken" },
        "Duplicate nodes with node-name='taken'",
      ],
      [{ device: "top", "backing-file": "b" }, "'backing-file' specified, but 'top' is the active layer"],
      [{ device: "top", "base-node": "top" }, "cannot commit an image into itself"],
    ];
    for (const [args, msg] of cases) {
      const e = await commit(env.manager, env.graph, args as never).then(
        () => undefined,
        (x: unknown) => x,
      );
      expect((e as Error | undefined)?.message, msg).toBe(msg);
    }
    expect(env.guest.child).toBe(env.top);
    expect(formats(env)).not.toContain("mirror_top");
    expect(node(env, "base").readOnly).toBe(true);
    expect(node(env, "base").parents.map((e) => e.name)).toEqual(["backing"]);
    expect(env.manager.queryJobs()).toEqual([]);
    expect(
      isJobError(await commit(env.manager, env.graph, { device: "nosuch" }).catch((x: unknown) => x)),
    ).toBe(true);
  });
});

describe("speed", () => {
  it("8 MiB/s on 40 MiB allocated above the base: READY after the first 32 MiB have been paid for", async () => {
    const size = 48 * MiB;
    const top = new Uint8Array(size);
    top.fill(3, 0, 40 * MiB);
    const zero = new Uint8Array(0);
    const env = await chain({ size, seed: 80, data: { base: zero, mid: zero, top } });
    const t0 = env.clock.now();
    const job = await commit(env.manager, env.graph, { "job-id": "c9", device: "top", speed: 8 * MiB });
    await pump(env.clock, () => job.status === "ready", 100);
    // 16 MiB per iteration (the default buffer); each is paid before the next one starts
    const elapsed = (env.clock.now() - t0) / 1e9;
    expect(elapsed).toBeGreaterThanOrEqual(3.9);
    expect(elapsed).toBeLessThanOrEqual(4.3);
    expect(env.events.find((e) => e.event === "BLOCK_JOB_READY")?.data).toMatchObject({
      len: 40 * MiB,
      offset: 40 * MiB,
      speed: 8 * MiB,
    });
    job.complete();
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(sha(await env.mem(node(env, "base")).snapshot())).toBe(sha(env.model));
  });
});
