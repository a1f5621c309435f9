/**
 * The stream job against memory-driver chains base ← mid ← top with a guest writing through the top's
 * parent edge: the top ends up allocating everything that was above the base and reads as the model, its
 * backing is the base, the copy-on-read filter is gone; events as in the 7.2 transcripts; error policies
 * with faults injected into the device; speed limit on a manual clock; QEMU's argument errors
 * (spec/jobs.md §5, §1.7–§1.10, qmp-transcripts.md §1).
 */
import {
  BlkError,
  BlockGraph,
  type BlockNode,
  backendParent,
  type Edge,
  filterDriver,
  type MemoryDriver,
  memoryDriver,
  PERM,
  PERM_ALL,
} from "@blk/core";
import { describe, expect, it } from "vitest";
import { commit } from "../src/commit/index.ts";
import { drainedSection, isJobError, JobManager } from "../src/index.ts";
import { STREAM_CHUNK, stream } from "../src/stream/index.ts";
import { compact, type ManualClock, setup, tick } from "./helpers.ts";
import { KiB, MiB, pump, rng, sha, until } from "./mirror-helpers.ts";

const CLUSTER = 64 * KiB;

interface Chain {
  manager: ReturnType<typeof setup>["manager"];
  clock: ManualClock;
  events: ReturnType<typeof setup>["events"];
  graph: BlockGraph;
  base: BlockNode;
  mid: BlockNode;
  top: BlockNode;
  guest: Edge;
  /** What the guest sees (initial chain content plus its writes). */
  model: Uint8Array;
  /** mid's own allocation at the start (cluster indexes). */
  midClusters: number[];
  mem(node: BlockNode): MemoryDriver;
}

/** Fills `n` random extents of `buf` (seeded) with non-zero patterns. */
function scatter(buf: Uint8Array, seed: number, n: number, maxLen: number): void {
  const r = rng(seed);
  for (let i = 0; i < n; i++) {
    const len = 1 + Math.floor(r() * maxLen);
    const off = Math.floor(r() * (buf.length - len));
    buf.fill(1 + Math.floor(r() * 250), off, off + len);
  }
}

async function chain(
  opts: { size?: number; seed?: number; midOwned?: boolean; midData?: Uint8Array; topData?: Uint8Array } = {},
): Promise<Chain> {
  const size = opts.size ?? 4 * MiB;
  const seed = opts.seed ?? 1;
  const { manager, clock, events } = setup();
  const graph = new BlockGraph({ random: rng(5) });
  const b = new Uint8Array(size);
  scatter(b, seed, 5, 300 * KiB);
  const m = opts.midData ?? new Uint8Array(size);
  if (opts.midData === undefined) scatter(m, seed + 100, 6, 400 * KiB);
  const t = opts.topData ?? new Uint8Array(size);
  if (opts.topData === undefined) scatter(t, seed + 200, 3, 200 * KiB);
  const base = await graph.open(memoryDriver, { size, data: b, clusterSize: CLUSTER }, { nodeName: "base" });
  const mid = await graph.open(
    memoryDriver,
    { size, data: m, clusterSize: CLUSTER },
    { nodeName: "mid", children: { backing: base }, ...(opts.midOwned === false ? { owned: false } : {}) },
  );
  const top = await graph.open(
    memoryDriver,
    { size, data: t, clusterSize: CLUSTER },
    { nodeName: "top", children: { backing: mid } },
  );
  const guest = graph.attach(backendParent("guest"), top, {
    name: "root",
    perm: PERM.WRITE | PERM.CONSISTENT_READ,
    shared: PERM_ALL,
  });
  const mem = (n: BlockNode): MemoryDriver => n.state as MemoryDriver;
  const midClusters: number[] = [];
  for (let c = 0; c < size / CLUSTER; c++) {
    if (mem(mid).clusterState(c * CLUSTER) !== "unallocated") midClusters.push(c);
  }
  return {
    manager,
    clock,
    events,
    graph,
    base,
    mid,
    top,
    guest,
    model: await mem(top).snapshot(),
    midClusters,
    mem,
  };
}

/** A guest writing random patterns (some zero-writes) through its edge one at a time, updating the model. */
function guestWriter(env: Chain, seed: number, writes: number): { done: Promise<void>; count(): number } {
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

const SUCCESS = (id: string): string[] => [
  `${id}:created`,
  `${id}:running`,
  `${id}:waiting`,
  `${id}:pending`,
  `BLOCK_JOB_COMPLETED:${id}`,
  `${id}:concluded`,
  `${id}:null`,
];

/** Fails writes of a memory node (only those at or after `from`-th) `times` times. */
function failWrites(mem: MemoryDriver, nth: number, times: number): { failed(): number } {
  let seen = 0;
  let failed = 0;
  mem.hook = (req) => {
    if (req.kind !== "write") return;
    seen++;
    if (seen >= nth && seen < nth + times) {
      failed++;
      throw new BlkError("EIO", "injected EIO");
    }
  };
  return { failed: () => failed };
}

describe("block-stream with base-node", () => {
  for (let round = 0; round < 3; round++) {
    it(`round ${round}: guest writing meanwhile; top allocates all above base, reads the model, backing is base`, async () => {
      const env = await chain({ seed: 10 + round });
      const job = await stream(env.manager, env.graph, {
        "job-id": "stream0",
        device: "top",
        "base-node": "base",
        speed: 16 * MiB,
      });
      expect(compact(env.events)).toEqual(["stream0:created", "stream0:running"]);
      // the copy-on-read filter took over the guest
      expect(env.guest.child.driver.format).toBe("copy-on-read");
      const g = guestWriter(env, 50 + round, 60);
      let atEnd = -1;
      void job.whenStatus("waiting").then(() => {
        atEnd = g.count();
      });
      await pump(env.clock, () => job.status === "null");
      await g.done;
      // the guest wrote while the job copied
      expect(atEnd).toBeGreaterThan(0);
      expect(atEnd).toBeLessThan(60);
      expect(await job.outcome).toEqual({ status: "completed" });
      expect(compact(env.events)).toEqual(SUCCESS("stream0"));
      const done = env.events.find((e) => e.event === "BLOCK_JOB_COMPLETED");
      expect(done?.data).toEqual({
        device: "stream0",
        len: 4 * MiB,
        offset: 4 * MiB,
        speed: 16 * MiB,
        type: "stream",
      });
      // graph: filter gone, guest back on top, top's backing is base, mid (monitor-owned) left unattached
      expect(env.guest.child).toBe(env.top);
      expect(env.top.backing).toBe(env.base);
      expect(env.mid.parents).toEqual([]);
      expect(
        env.graph
          .list()
          .map((n) => n.nodeName)
          .sort(),
      ).toEqual(["base", "mid", "top"]);
      // everything mid allocated is now allocated in top itself
      for (const c of env.midClusters)
        expect(env.mem(env.top).clusterState(c * CLUSTER)).not.toBe("unallocated");
      expect(job.bytesCopied).toBeGreaterThan(0);
      expect(sha(await env.top.read(0, env.model.length))).toBe(sha(env.model));
      expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
    });
  }

  it("an unowned intermediate node is deleted; the transcript's job is named by filter-node-name", async () => {
    const env = await chain({ midOwned: false });
    const job = await stream(env.manager, env.graph, {
      "job-id": "s1",
      device: "top",
      "base-node": "base",
      "filter-node-name": "cor0",
    });
    expect(env.graph.find("cor0")?.driver.format).toBe("copy-on-read");
    expect(env.guest.child.nodeName).toBe("cor0");
    expect(() => env.graph.find("mid")).not.toThrow();
    await pump(env.clock, () => job.status === "null");
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(env.graph.find("cor0")).toBeUndefined();
    expect(env.graph.find("mid")).toBeUndefined();
    expect(env.mid.closed).toBe(true);
    expect(env.top.backing).toBe(env.base);
    expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
  });

  it("only the device's backing edge moves (same edge object); another user of mid stays on mid", async () => {
    const env = await chain({ seed: 16 });
    const exp = env.graph.attach(backendParent("exp"), env.mid, { name: "root", perm: PERM.CONSISTENT_READ });
    const edge = env.top.children.get("backing");
    const job = await stream(env.manager, env.graph, { "job-id": "s14", device: "top", "base-node": "base" });
    await pump(env.clock, () => job.status === "null");
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(env.top.children.get("backing")).toBe(edge);
    expect(edge?.child).toBe(env.base);
    expect(exp.child).toBe(env.mid);
    expect(env.mid.parents).toEqual([exp]);
    expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
  });

  it("bottom: copies mid only, backing becomes mid's backing", async () => {
    const env = await chain({ seed: 3 });
    const job = await stream(env.manager, env.graph, { "job-id": "s2", device: "top", bottom: "mid" });
    await pump(env.clock, () => job.status === "null");
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(env.top.backing).toBe(env.base);
    expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
  });
});

describe("copy vs guest write race", () => {
  it("a guest write into a range being copied waits for the copy (no stale backing data over it)", async () => {
    const size = 2 * MiB;
    const midData = new Uint8Array(size);
    midData.fill(0x33, MiB, MiB + 256 * KiB);
    const env = await chain({ size, seed: 14, midData, topData: new Uint8Array(size) });
    const X = MiB + 64 * KiB;
    let hit = false;
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    env.mem(env.mid).hook = async (req) => {
      if (req.kind === "read" && req.offset <= X && X < req.offset + req.bytes) {
        hit = true;
        await gate;
      }
    };
    const job = await stream(env.manager, env.graph, {
      "job-id": "race",
      device: "top",
      "base-node": "base",
    });
    await pump(env.clock, () => hit);
    const data = new Uint8Array(4096).fill(0xee);
    let written = false;
    const w = env.guest.write(X, data).then(() => {
      written = true;
    });
    env.model.set(data, X);
    for (let i = 0; i < 20; i++) await tick();
    // held at the filter while the copy of its range is in flight
    expect(written).toBe(false);
    release();
    await w;
    env.mem(env.mid).hook = undefined;
    await pump(env.clock, () => job.status === "null");
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(sha(await env.top.read(X, 4096))).toBe(sha(data));
    expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
  });
});

describe("block-stream with the base right below the device", () => {
  it("copies nothing, guest reads do not populate, backing unchanged", async () => {
    const env = await chain({ seed: 15 });
    const job = await stream(env.manager, env.graph, {
      "job-id": "s13",
      device: "top",
      "base-node": "mid",
      speed: 1,
    });
    const c = env.midClusters.find((i) => env.mem(env.top).clusterState(i * CLUSTER) === "unallocated");
    const off = (c ?? 0) * CLUSTER;
    await env.guest.read(off, CLUSTER);
    expect(env.mem(env.top).clusterState(off)).toBe("unallocated");
    env.manager.blockJobSetSpeed({ device: "s13", speed: 0 });
    await pump(env.clock, () => job.status === "null");
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(job.bytesCopied).toBe(0);
    expect(env.top.backing).toBe(env.mid);
    expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
  });
});

describe("block-stream of the whole chain", () => {
  it("no base: top allocates everything any layer allocated and has no backing", async () => {
    const env = await chain({ seed: 21 });
    const baseClusters: number[] = [];
    for (let c = 0; c < env.model.length / CLUSTER; c++) {
      if (env.mem(env.base).clusterState(c * CLUSTER) !== "unallocated") baseClusters.push(c);
    }
    const job = await stream(env.manager, env.graph, { "job-id": "s3", device: "top" });
    const g = guestWriter(env, 77, 40);
    await pump(env.clock, () => job.status === "null");
    await g.done;
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(compact(env.events)).toEqual(SUCCESS("s3"));
    expect(env.top.backing).toBeUndefined();
    expect(env.top.children.has("backing")).toBe(false);
    for (const c of [...env.midClusters, ...baseClusters]) {
      expect(env.mem(env.top).clusterState(c * CLUSTER)).not.toBe("unallocated");
    }
    expect(sha(await env.top.read(0, env.model.length))).toBe(sha(env.model));
    // block status now reports the holes as zero (no backing)
    const st = await env.top.blockStatusAbove(0, env.model.length);
    expect(st.every((e) => e.allocated || e.zero)).toBe(true);
  });
});

describe("copy-on-read filter", () => {
  it("a guest read through the filter populates the top from the layers above base", async () => {
    const env = await chain({ seed: 4 });
    const job = await stream(env.manager, env.graph, {
      "job-id": "s4",
      device: "top",
      "base-node": "base",
      speed: 1, // crawl: the job copies at most one chunk before the read
    });
    const c = env.midClusters.find(
      (i) => env.mem(env.top).clusterState(i * CLUSTER) === "unallocated" && i > 8,
    );
    expect(c).toBeDefined();
    const off = (c ?? 0) * CLUSTER;
    expect(env.mem(env.top).clusterState(off)).toBe("unallocated");
    const got = await env.guest.read(off, CLUSTER);
    expect(sha(got)).toBe(sha(env.model.subarray(off, off + CLUSTER)));
    expect(env.mem(env.top).clusterState(off)).toBe("data");
    job.cancel({ force: true });
    await pump(env.clock, () => job.status === "null");
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(compact(env.events).slice(-4)).toEqual([
      "s4:aborting",
      "BLOCK_JOB_CANCELLED:s4",
      "s4:concluded",
      "s4:null",
    ]);
    // cancelled: the chain is left as it was (plus what was copied), filter gone
    expect(env.top.backing).toBe(env.mid);
    expect(env.guest.child).toBe(env.top);
    expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
  });
});

describe("error policies (fault injected into the device)", () => {
  it("on-error=report: fails with Input/output error, chain intact, a second run completes", async () => {
    const env = await chain({ seed: 5 });
    failWrites(env.mem(env.top), 2, 1);
    const job = await stream(env.manager, env.graph, { "job-id": "s5", device: "top", "base-node": "base" });
    await pump(env.clock, () => job.status === "null");
    const out = await job.outcome;
    expect(out.status).toBe("failed");
    expect(compact(env.events)).toEqual([
      "s5:created",
      "s5:running",
      "BLOCK_JOB_ERROR:s5",
      "s5:aborting",
      "BLOCK_JOB_COMPLETED:s5",
      "s5:concluded",
      "s5:null",
    ]);
    const err = env.events.find((e) => e.event === "BLOCK_JOB_ERROR");
    expect(err?.data).toEqual({ device: "s5", operation: "read", action: "report" });
    const done = env.events.find((e) => e.event === "BLOCK_JOB_COMPLETED");
    expect(done?.data).toMatchObject({ error: "Input/output error", type: "stream" });
    expect(env.top.backing).toBe(env.mid);
    expect(env.guest.child).toBe(env.top);
    expect(env.graph.list().map((n) => n.driver.format)).not.toContain("copy-on-read");
    expect(sha(await env.guest.read(0, env.model.length))).toBe(sha(env.model));

    env.mem(env.top).hook = undefined;
    env.events.length = 0;
    const again = await stream(env.manager, env.graph, {
      "job-id": "s5",
      device: "top",
      "base-node": "base",
    });
    await pump(env.clock, () => again.status === "null");
    expect(await again.outcome).toEqual({ status: "completed" });
    expect(compact(env.events)).toEqual(SUCCESS("s5"));
    expect(env.top.backing).toBe(env.base);
    expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
  });

  it("on-error=ignore: skips the chunk, copies the rest, and fails at the end (backing kept)", async () => {
    const env = await chain({ seed: 6 });
    const f = failWrites(env.mem(env.top), 1, 1);
    const job = await stream(env.manager, env.graph, {
      "job-id": "s6",
      device: "top",
      "base-node": "base",
      "on-error": "ignore",
    });
    await pump(env.clock, () => job.status === "null");
    expect(f.failed()).toBe(1);
    const out = await job.outcome;
    expect(out.status).toBe("failed");
    const errs = env.events.filter((e) => e.event === "BLOCK_JOB_ERROR");
    expect(errs.map((e) => e.data)).toEqual([{ device: "s6", operation: "read", action: "ignore" }]);
    const done = env.events.find((e) => e.event === "BLOCK_JOB_COMPLETED");
    expect(done?.data).toMatchObject({ error: "Input/output error", offset: 4 * MiB });
    expect(job.bytesCopied).toBeGreaterThan(0);
    expect(env.top.backing).toBe(env.mid);
    expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
  });

  it("on-error=stop: pauses with io-status failed, resume retries the chunk and completes", async () => {
    const env = await chain({ seed: 7 });
    failWrites(env.mem(env.top), 1, 1);
    const job = await stream(env.manager, env.graph, {
      "job-id": "s7",
      device: "top",
      "base-node": "base",
      "on-error": "stop",
    });
    await pump(env.clock, () => job.status === "paused");
    expect(env.manager.queryBlockJobs()[0]).toMatchObject({ "io-status": "failed", paused: true });
    env.manager.blockJobResume({ device: "s7" });
    await pump(env.clock, () => job.status === "null");
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(compact(env.events)).toEqual([
      "s7:created",
      "s7:running",
      "BLOCK_JOB_ERROR:s7",
      "s7:paused",
      "s7:running",
      "s7:waiting",
      "s7:pending",
      "BLOCK_JOB_COMPLETED:s7",
      "s7:concluded",
      "s7:null",
    ]);
    expect(env.top.backing).toBe(env.base);
    for (const c of env.midClusters)
      expect(env.mem(env.top).clusterState(c * CLUSTER)).not.toBe("unallocated");
    expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
  });
});

describe("speed, pause, manual finalize", () => {
  it("speed limit on the manual clock: copying at 1 MiB/s takes copied/speed seconds; unlimited takes no time", async () => {
    const size = 4 * MiB;
    const midData = new Uint8Array(size);
    midData.fill(7, 0, 2 * MiB);
    const env = await chain({ seed: 8, midData });
    const t0 = env.clock.now();
    const job = await stream(env.manager, env.graph, {
      "job-id": "s8",
      device: "top",
      "base-node": "base",
      speed: MiB,
    });
    expect(env.manager.queryBlockJobs()[0]?.speed).toBe(MiB);
    await pump(env.clock, () => job.status === "null", 100);
    const elapsed = (env.clock.now() - t0) / 1e9;
    // only what was copied costs time: mid's 2 MiB minus what top already had
    const expected = job.bytesCopied / MiB;
    expect(job.bytesCopied).toBeGreaterThan(MiB);
    expect(job.bytesCopied).toBeLessThanOrEqual(2 * MiB);
    expect(elapsed).toBeGreaterThanOrEqual(expected - 0.15);
    expect(elapsed).toBeLessThanOrEqual(expected + 0.25);
    expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));

    const env2 = await chain({ seed: 8, midData });
    const t1 = env2.clock.now();
    const job2 = await stream(env2.manager, env2.graph, { "job-id": "s9", device: "top" });
    await pump(env2.clock, () => job2.status === "null");
    expect(env2.clock.now() - t1).toBeLessThanOrEqual(100_000_000);
  });

  it("pause/resume at chunk boundaries; progress total is the length, current grows per chunk", async () => {
    const env = await chain({ seed: 9 });
    const job = await stream(env.manager, env.graph, { "job-id": "s10", device: "top", speed: MiB });
    await env.clock.advance(600_000_000);
    env.manager.jobPause({ id: "s10" });
    await pump(env.clock, () => job.status === "paused");
    const info = env.manager.queryJobs()[0];
    expect(info?.["total-progress"]).toBe(4 * MiB);
    const at = info?.["current-progress"] ?? 0;
    expect(at).toBeGreaterThanOrEqual(STREAM_CHUNK);
    expect(at).toBeLessThan(4 * MiB);
    await env.clock.advance(2_000_000_000);
    expect(env.manager.queryJobs()[0]?.["current-progress"]).toBe(at);
    env.manager.jobResume({ id: "s10" });
    env.manager.blockJobSetSpeed({ device: "s10", speed: 0 });
    await pump(env.clock, () => job.status === "null");
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
  });

  it("auto-finalize false: PENDING + BLOCK_JOB_PENDING; the graph changes only at job-finalize", async () => {
    const env = await chain({ seed: 12 });
    const job = await stream(env.manager, env.graph, {
      "job-id": "s11",
      device: "top",
      "base-node": "base",
      "auto-finalize": false,
      "auto-dismiss": false,
    });
    await pump(env.clock, () => job.status === "pending");
    expect(env.top.backing).toBe(env.mid);
    expect(compact(env.events).slice(-1)).toEqual(["BLOCK_JOB_PENDING:s11"]);
    await env.manager.jobFinalize({ id: "s11" });
    expect(job.status).toBe("concluded");
    expect(env.top.backing).toBe(env.base);
    env.manager.jobDismiss({ id: "s11" });
    expect(compact(env.events).slice(-4)).toEqual([
      "BLOCK_JOB_PENDING:s11",
      "BLOCK_JOB_COMPLETED:s11",
      "s11:concluded",
      "s11:null",
    ]);
  });
});

describe("queries and drains", () => {
  it("query-block-jobs while running; a drain of a held node pauses the job", async () => {
    const env = await chain({ seed: 17 });
    const job = await stream(env.manager, env.graph, { "job-id": "s15", device: "top", speed: MiB });
    expect(env.manager.queryBlockJobs()).toEqual([
      {
        type: "stream",
        device: "s15",
        len: 4 * MiB,
        offset: 0,
        busy: false,
        paused: false,
        speed: MiB,
        "io-status": "ok",
        ready: false,
        status: "running",
        "auto-finalize": true,
        "auto-dismiss": true,
      },
    ]);
    let drainedStatus = "";
    await drainedSection([env.mid], async () => {
      await pump(env.clock, () => job.status === "paused");
      drainedStatus = job.status;
    });
    expect(drainedStatus).toBe("paused");
    await pump(env.clock, () => job.status === "null");
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(compact(env.events)).toContain("s15:paused");
    expect(sha(await env.mem(env.top).snapshot())).toBe(sha(env.model));
  });
});

describe("backing file name hook", () => {
  it("calls changeBackingFile on the device's driver state: base's name and format, or backing-file", async () => {
    for (const backingFile of [undefined, "/images/base.qcow2"]) {
      const env = await chain({ seed: 13 });
      const calls: [string | undefined, string | undefined][] = [];
      Object.assign(env.top.state, {
        changeBackingFile: (filename: string | undefined, format: string | undefined): Promise<void> => {
          calls.push([filename, format]);
          return Promise.resolve();
        },
      });
      const job = await stream(env.manager, env.graph, {
        "job-id": "s12",
        device: "top",
        "base-node": "base",
        ...(backingFile === undefined ? {} : { "backing-file": backingFile }),
      });
      await pump(env.clock, () => job.status === "null");
      expect(await job.outcome).toEqual({ status: "completed" });
      expect(calls).toEqual([[backingFile ?? "base", "x-blk-memory"]]);
    }
  });
});

describe("argument errors (QEMU's messages); nothing is left behind", () => {
  it("refuses bad combinations and nodes outside the chain", async () => {
    const env = await chain();
    const other = await env.graph.open(memoryDriver, { size: MiB }, { nodeName: "other" });
    const flt = await env.graph.openFilterAbove(filterDriver(), {}, other, { nodeName: "flt" });
    expect(flt.nodeName).toBe("flt");
    const cases: [Record<string, unknown>, string][] = [
      [{ device: "nosuch" }, "Cannot find device='nosuch' nor node-name='nosuch'"],
      [
        { device: "top", base: "base", "base-node": "base" },
        "'base' and 'base-node' cannot be specified at the same time",
      ],
      [
        { device: "top", base: "base", bottom: "mid" },
        "'base' and 'bottom' cannot be specified at the same time",
      ],
      [
        { device: "top", bottom: "mid", "base-node": "base" },
        "'bottom' and 'base-node' cannot be specified at the same time",
      ],
      [{ device: "top", "base-node": "other" }, "Node 'other' is not a backing image of 'top'"],
      [{ device: "top", "base-node": "top" }, "Node 'top' is not a backing image of 'top'"],
      [{ device: "top", "base-node": "nosuch" }, "Cannot find device='' nor node-name='nosuch'"],
      [{ device: "top", base: "nosuch.qcow2" }, "Base 'nosuch.qcow2' not found"],
      [{ device: "top", bottom: "flt" }, "Node 'flt' is a filter, use a non-filter node as 'bottom'"],
      [{ device: "top", bottom: "other" }, "Node 'other' is not in a chain starting from 'top'"],
      [{ device: "top", "backing-file": "x" }, "backing file specified, but streaming the entire chain"],
      [{ device: "top", "base-node": "base" }, "Invalid job ID ''"],
      [{ device: "top", "job-id": "1x" }, "Invalid job ID '1x'"],
      [{ device: "top", "job-id": "s", speed: -1 }, "Parameter 'speed' expects a non-negative value"],
    ];
    for (const [args, msg] of cases) {
      const e = await stream(env.manager, env.graph, args as never).then(
        () => undefined,
        (x: unknown) => x,
      );
      expect(isJobError(e) || e instanceof BlkError, msg).toBe(true);
      expect((e as Error).message).toBe(msg);
    }
    expect(env.guest.child).toBe(env.top);
    expect(env.graph.list().map((n) => n.driver.format)).not.toContain("copy-on-read");
    expect(env.manager.queryJobs()).toEqual([]);
    // the events of the failed creations: created → null only for the job-id/speed failures after creation
    expect(compact(env.events)).toEqual(["s:created", "s:null"]);
  });

  it("a node held by another stream is busy", async () => {
    const env = await chain();
    const job = await stream(env.manager, env.graph, { "job-id": "a", device: "top", speed: 1 });
    const e = await stream(env.manager, env.graph, { "job-id": "b", device: "mid" }).catch((x: unknown) => x);
    expect((e as Error).message).toBe("Node 'mid' is busy: block device is in use by block job: stream");
    job.cancel({ force: true });
    await pump(env.clock, () => job.status === "null");
    await until(() => env.guest.child === env.top);
  });
});

describe("README", () => {
  it("stream and commit example", async () => {
    const graph = new BlockGraph();
    const base = await graph.open(memoryDriver, { size: 1 << 20 }, { nodeName: "base" });
    const mid = await graph.open(
      memoryDriver,
      { size: 1 << 20 },
      { nodeName: "mid", children: { backing: base } },
    );
    const top = await graph.open(
      memoryDriver,
      { size: 1 << 20 },
      { nodeName: "top", children: { backing: mid } },
    );
    const vm = graph.attach(backendParent("vm"), top, {
      name: "root",
      perm: PERM.WRITE | PERM.CONSISTENT_READ,
    });
    await mid.write(65536, new Uint8Array(4096).fill(0xbb));

    const manager = new JobManager();
    const events: string[] = [];
    manager.onEvent((e) => events.push(e.event === "JOB_STATUS_CHANGE" ? e.data.status : e.event));

    // Intermediate commit: mid's data goes into base, top's backing becomes base.
    const c = await commit(manager, graph, {
      "job-id": "commit0",
      device: "top",
      "top-node": "mid",
      "base-node": "base",
    });
    expect(await c.outcome).toEqual({ status: "completed" });
    expect(top.backing).toBe(base);

    // Stream the whole chain into top: top no longer needs a backing node.
    const s = await stream(manager, graph, { "job-id": "stream0", device: "top" });
    expect(await s.outcome).toEqual({ status: "completed" });
    expect(top.backing).toBeUndefined();
    expect((await vm.read(65536, 4096))[0]).toBe(0xbb);
    expect(events.slice(0, 7)).toEqual([
      "created",
      "running",
      "waiting",
      "pending",
      "BLOCK_JOB_COMPLETED",
      "concluded",
      "null",
    ]);
  });
});
