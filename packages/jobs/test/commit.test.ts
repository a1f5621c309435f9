/**
 * Intermediate commit against memory-driver chains base ← mid ← top with a guest writing through the top's
 * parent edge: the base ends up with mid's view of the data, the overlay reads the model and its backing
 * is the base, commit_top is gone; the transcript's 4-layer commit-then-stream sequence; error policies
 * with faults injected into the base and mid; speed limit on a manual clock; QEMU's argument errors
 * (spec/jobs.md §4, §1.7–§1.10, qmp-transcripts.md §1).
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
import { ActiveCommitJob, COMMIT_BUFFER_SIZE, commit } from "../src/commit/index.ts";
import { isJobError } from "../src/index.ts";
import { stream } from "../src/stream/index.ts";
import { compact, type ManualClock, setup, tick } from "./helpers.ts";
import { KiB, MiB, pump, rng, sha } from "./mirror-helpers.ts";

const CLUSTER = 64 * KiB;

interface Env {
  manager: ReturnType<typeof setup>["manager"];
  clock: ManualClock;
  events: ReturnType<typeof setup>["events"];
  graph: BlockGraph;
  nodes: BlockNode[];
  /** The active layer (last of `nodes`). */
  top: BlockNode;
  guest: Edge;
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
      scatter(d, (opts.seed ?? 1) * 31 + i++, 5, 300 * KiB);
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

function guestWriter(env: Env, seed: number, writes: number): { done: Promise<void>; count(): number } {
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
        await env.guest.write(off, data);
        env.model.set(data, off);
      }
      await tick();
    }
  })();
  return { done, count: () => n };
}

function failIo(mem: MemoryDriver, kind: "read" | "write", nth: number, times: number): { failed(): number } {
  let seen = 0;
  let failed = 0;
  mem.hook = (req) => {
    if (req.kind !== kind) return;
    seen++;
    if (seen >= nth && seen < nth + times) {
      failed++;
      throw new BlkError("EIO", "injected EIO");
    }
  };
  return { failed: () => failed };
}

const SUCCESS = (id: string): string[] => [
  `${id}:created`,
  `${id}:running`,
  `${id}:waiting`,
  `${id}:pending`,
  `BLOCK_JOB_COMPLETED:${id}`,
  `${id}:concluded`,
  `${id}:null`,
];

describe("intermediate block-commit", () => {
  for (let round = 0; round < 3; round++) {
    it(`round ${round}: guest writing meanwhile; base holds mid's view, overlay reads the model, backing is base`, async () => {
      const env = await chain({ seed: 40 + round });
      const mid = node(env, "mid");
      const base = node(env, "base");
      const midView = await env.mem(mid).snapshot();
      const job = await commit(env.manager, env.graph, {
        "job-id": "commit0",
        device: "top",
        "top-node": "mid",
        "base-node": "base",
        speed: 16 * MiB,
      });
      expect(compact(env.events)).toEqual(["commit0:created", "commit0:running"]);
      // commit_top took over mid's parent (the overlay's backing link)
      expect(env.top.backing?.driver.format).toBe("commit_top");
      const g = guestWriter(env, 90 + round, 60);
      let atEnd = -1;
      void job.whenStatus("waiting").then(() => {
        atEnd = g.count();
      });
      await pump(env.clock, () => job.status === "null");
      await g.done;
      expect(atEnd).toBeGreaterThan(0);
      expect(atEnd).toBeLessThan(60);
      expect(await job.outcome).toEqual({ status: "completed" });
      expect(compact(env.events)).toEqual(SUCCESS("commit0"));
      const done = env.events.find((e) => e.event === "BLOCK_JOB_COMPLETED");
      expect(done?.data).toEqual({
        device: "commit0",
        len: 4 * MiB,
        offset: 4 * MiB,
        speed: 16 * MiB,
        type: "commit",
      });
      expect(env.top.backing).toBe(base);
      expect(job.dropped).toBe(true);
      expect(sha(await env.mem(base).snapshot())).toBe(sha(midView));
      expect(sha(await env.top.read(0, env.model.length))).toBe(sha(env.model));
      expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
      // commit_top gone, mid (monitor-owned) stays, out of the overlay's chain
      expect(
        env.graph
          .list()
          .map((n) => n.nodeName)
          .sort(),
      ).toEqual(["base", "mid", "top"]);
      expect(mid.parents).toEqual([]);
      expect(base.parents.filter((e) => e.parent === env.top)).toHaveLength(1);
    });
  }

  it("dropped nodes nobody owns are deleted; filter-node-name names commit_top", async () => {
    const env = await chain({ names: ["base", "a", "b", "top"], unowned: ["a", "b"], seed: 5 });
    const a = node(env, "a");
    const b = node(env, "b");
    const job = await commit(env.manager, env.graph, {
      "job-id": "c1",
      device: "top",
      "top-node": "b",
      "base-node": "base",
      "filter-node-name": "ct",
    });
    expect(env.graph.find("ct")?.driver.format).toBe("commit_top");
    await pump(env.clock, () => job.status === "null");
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(env.graph.find("ct")).toBeUndefined();
    expect(env.graph.find("a")).toBeUndefined();
    expect(env.graph.find("b")).toBeUndefined();
    expect(a.closed && b.closed).toBe(true);
    expect(env.top.backing).toBe(node(env, "base"));
    expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
  });

  it("the transcript's sequence on base <- sn1 <- sn2 <- top: commit sn2 into sn1, then stream top onto base", async () => {
    const env = await chain({ names: ["base", "sn1", "sn2", "top"], seed: 6 });
    const c = await commit(env.manager, env.graph, {
      "job-id": "commit0",
      device: "top",
      "top-node": "sn2",
      "base-node": "sn1",
    });
    await pump(env.clock, () => c.status === "null");
    expect(env.top.backing).toBe(node(env, "sn1"));
    const s = await stream(env.manager, env.graph, {
      "job-id": "stream0",
      device: "top",
      "base-node": "base",
    });
    await pump(env.clock, () => s.status === "null");
    expect(compact(env.events)).toEqual([...SUCCESS("commit0"), ...SUCCESS("stream0")]);
    expect(
      env.events
        .filter((e) => e.event === "BLOCK_JOB_COMPLETED")
        .map((e) => [e.data.type, e.data.len, e.data.offset]),
    ).toEqual([
      ["commit", 4 * MiB, 4 * MiB],
      ["stream", 4 * MiB, 4 * MiB],
    ]);
    expect(env.top.backing).toBe(node(env, "base"));
    expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
    // sn2 (dropped by the commit) is still listed: monitor-owned
    expect(env.graph.find("sn2")).toBeDefined();
  });

  it("a shorter base is grown to the top's length first", async () => {
    const env = await chain({ sizes: { base: MiB }, seed: 7 });
    const mid = node(env, "mid");
    const base = node(env, "base");
    const midView = await env.mem(mid).snapshot();
    const job = await commit(env.manager, env.graph, { "job-id": "c3", device: "top", "top-node": "mid" });
    await pump(env.clock, () => job.status === "null");
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(base.length).toBe(4 * MiB);
    expect(sha(await env.mem(base).snapshot())).toBe(sha(midView));
    expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
  });

  it("calls changeBackingFile on the overlay's driver state with the base's name and format", async () => {
    const env = await chain({ seed: 8 });
    const calls: [string | undefined, string | undefined][] = [];
    Object.assign(env.top.state, {
      changeBackingFile: (f: string | undefined, fmt: string | undefined): Promise<void> => {
        calls.push([f, fmt]);
        return Promise.resolve();
      },
    });
    const job = await commit(env.manager, env.graph, {
      "job-id": "c4",
      device: "top",
      "top-node": "mid",
      "backing-file": "base.qcow2",
    });
    await pump(env.clock, () => job.status === "null");
    expect(calls).toEqual([["base.qcow2", "x-blk-memory"]]);
  });
});

describe("error policies", () => {
  it("on-error=report with a failing base write: COMPLETED with error, chain reads, second run completes", async () => {
    const env = await chain({ seed: 11 });
    const mid = node(env, "mid");
    const base = node(env, "base");
    const midView = await env.mem(mid).snapshot();
    failIo(env.mem(base), "write", 2, 1);
    const job = await commit(env.manager, env.graph, { "job-id": "c5", device: "top", "top-node": "mid" });
    const g = guestWriter(env, 5, 20);
    await pump(env.clock, () => job.status === "null");
    await g.done;
    expect((await job.outcome).status).toBe("failed");
    expect(compact(env.events)).toEqual([
      "c5:created",
      "c5:running",
      "BLOCK_JOB_ERROR:c5",
      "c5:aborting",
      "BLOCK_JOB_COMPLETED:c5",
      "c5:concluded",
      "c5:null",
    ]);
    expect(env.events.find((e) => e.event === "BLOCK_JOB_ERROR")?.data).toEqual({
      device: "c5",
      operation: "write",
      action: "report",
    });
    expect(env.events.find((e) => e.event === "BLOCK_JOB_COMPLETED")?.data).toMatchObject({
      error: "Input/output error",
      type: "commit",
    });
    expect(env.top.backing).toBe(mid);
    expect(env.graph.list().map((n) => n.driver.format)).not.toContain("commit_top");
    expect(sha(await env.guest.read(0, env.model.length))).toBe(sha(env.model));

    env.mem(base).hook = undefined;
    env.events.length = 0;
    const again = await commit(env.manager, env.graph, { "job-id": "c5", device: "top", "top-node": "mid" });
    await pump(env.clock, () => again.status === "null");
    expect(await again.outcome).toEqual({ status: "completed" });
    expect(compact(env.events)).toEqual(SUCCESS("c5"));
    expect(env.top.backing).toBe(base);
    expect(sha(await env.mem(base).snapshot())).toBe(sha(midView));
    expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
  });

  it("a read error in mid is reported as operation read", async () => {
    const env = await chain({ seed: 12 });
    failIo(env.mem(node(env, "mid")), "read", 1, 1);
    const job = await commit(env.manager, env.graph, { "job-id": "c6", device: "top", "top-node": "mid" });
    await pump(env.clock, () => job.status === "null");
    expect((await job.outcome).status).toBe("failed");
    expect(env.events.find((e) => e.event === "BLOCK_JOB_ERROR")?.data).toEqual({
      device: "c6",
      operation: "read",
      action: "report",
    });
  });

  it("on-error=ignore retries the same chunk at once and completes", async () => {
    const env = await chain({ seed: 13 });
    const base = node(env, "base");
    const midView = await env.mem(node(env, "mid")).snapshot();
    const f = failIo(env.mem(base), "write", 1, 2);
    const job = await commit(env.manager, env.graph, {
      "job-id": "c7",
      device: "top",
      "top-node": "mid",
      "on-error": "ignore",
    });
    await pump(env.clock, () => job.status === "null");
    expect(f.failed()).toBe(2);
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(env.events.filter((e) => e.event === "BLOCK_JOB_ERROR").map((e) => e.data)).toEqual([
      { device: "c7", operation: "write", action: "ignore" },
      { device: "c7", operation: "write", action: "ignore" },
    ]);
    expect(sha(await env.mem(base).snapshot())).toBe(sha(midView));
  });

  it("on-error=stop pauses (io-status failed); resume retries and completes", async () => {
    const env = await chain({ seed: 14 });
    const base = node(env, "base");
    const midView = await env.mem(node(env, "mid")).snapshot();
    failIo(env.mem(base), "write", 1, 1);
    const job = await commit(env.manager, env.graph, {
      "job-id": "c8",
      device: "top",
      "top-node": "mid",
      "on-error": "stop",
    });
    await pump(env.clock, () => job.status === "paused");
    expect(env.manager.queryBlockJobs()[0]).toMatchObject({ "io-status": "failed", paused: true });
    env.manager.blockJobResume({ device: "c8" });
    await pump(env.clock, () => job.status === "null");
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(compact(env.events)).toEqual([
      "c8:created",
      "c8:running",
      "BLOCK_JOB_ERROR:c8",
      "c8:paused",
      "c8:running",
      "c8:waiting",
      "c8:pending",
      "BLOCK_JOB_COMPLETED:c8",
      "c8:concluded",
      "c8:null",
    ]);
    expect(sha(await env.mem(base).snapshot())).toBe(sha(midView));
  });

  it("force cancel: CANCELLED, commit_top removed, overlay still on mid", async () => {
    const env = await chain({ seed: 15 });
    const job = await commit(env.manager, env.graph, {
      "job-id": "c9",
      device: "top",
      "top-node": "mid",
      speed: 1,
    });
    await env.clock.advance(100_000_000);
    env.manager.blockJobCancel({ device: "c9" });
    await pump(env.clock, () => job.status === "null");
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(compact(env.events).slice(-4)).toEqual([
      "c9:aborting",
      "BLOCK_JOB_CANCELLED:c9",
      "c9:concluded",
      "c9:null",
    ]);
    expect(env.top.backing).toBe(node(env, "mid"));
    expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
  });
});

describe("speed", () => {
  it("1 MiB/s: elapsed manual-clock time matches the bytes copied; skipped chunks cost nothing", async () => {
    const size = 4 * MiB;
    const mid = new Uint8Array(size);
    mid.fill(9, 0, 2 * MiB);
    const env = await chain({
      seed: 16,
      data: { mid, base: new Uint8Array(size), top: new Uint8Array(size) },
    });
    const t0 = env.clock.now();
    const job = await commit(env.manager, env.graph, {
      "job-id": "c10",
      device: "top",
      "top-node": "mid",
      speed: MiB,
    });
    await pump(env.clock, () => job.status === "null", 100);
    expect(job.bytesCopied).toBe(2 * MiB);
    const elapsed = (env.clock.now() - t0) / 1e9;
    expect(elapsed).toBeGreaterThanOrEqual(1.85);
    expect(elapsed).toBeLessThanOrEqual(2.25);
    expect(COMMIT_BUFFER_SIZE).toBe(512 * KiB);
  });
});

describe("argument errors (QEMU's messages)", () => {
  it("refuses bad arguments; nothing is left behind", async () => {
    const env = await chain({ names: ["base", "mid", "top"] });
    await env.graph.open(memoryDriver, { size: MiB }, { nodeName: "other" });
    const cases: [Record<string, unknown>, string, string?][] = [
      [{ device: "nosuch" }, "Device 'nosuch' not found", "DeviceNotFound"],
      [{ device: "mid" }, "Need a root block node"],
      [{ device: "other" }, "cannot commit an image into itself"],
      [{ device: "top", top: "mid", "top-node": "mid" }, "'top-node' and 'top' are mutually exclusive"],
      [{ device: "top", base: "base", "base-node": "base" }, "'base-node' and 'base' are mutually exclusive"],
      [{ device: "top", "top-node": "other" }, "'other' is not in this backing file chain"],
      [{ device: "top", "top-node": "nosuch" }, "Cannot find device='' nor node-name='nosuch'"],
      [{ device: "top", top: "nosuch.qcow2" }, "Top image file nosuch.qcow2 not found"],
      [
        { device: "top", "top-node": "mid", "base-node": "other" },
        "'other' is not in this backing file chain",
      ],
      [{ device: "top", "top-node": "mid", base: "x.qcow2" }, "Can't find 'x.qcow2' in the backing chain"],
      [{ device: "top", "top-node": "mid", "base-node": "mid" }, "cannot commit an image into itself"],
      [{ device: "top", "backing-file": "b" }, "'backing-file' specified, but 'top' is the active layer"],
      [{ device: "top", "top-node": "mid" }, "Invalid job ID ''"],
      [
        { device: "top", "top-node": "mid", "job-id": "c", speed: -1 },
        "Parameter 'speed' expects a non-negative value",
      ],
    ];
    for (const [args, msg, cls] of cases) {
      const e = await commit(env.manager, env.graph, args as never).then(
        () => undefined,
        (x: unknown) => x,
      );
      expect((e as Error | undefined)?.message, msg).toBe(msg);
      if (cls !== undefined) expect(isJobError(e) && e.qmpClass).toBe(cls);
    }
    expect(env.top.backing).toBe(node(env, "mid"));
    expect(env.graph.list().map((n) => n.driver.format)).not.toContain("commit_top");
    expect(node(env, "base").parents).toHaveLength(1);
    expect(env.manager.queryJobs()).toEqual([]);
  });

  it("active commit (top is the active layer) starts an ActiveCommitJob (see active-commit.test.ts)", async () => {
    const env = await chain();
    const job = await commit(env.manager, env.graph, { "job-id": "a", device: "top", "base-node": "base" });
    expect(job).toBeInstanceOf(ActiveCommitJob);
    expect(env.manager.queryBlockJobs()[0]).toMatchObject({ device: "a", type: "commit" });
    job.cancel();
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(env.manager.queryJobs()).toEqual([]);
  });
});
