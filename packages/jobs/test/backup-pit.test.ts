/**
 * Backup point-in-time proofs: a simulated guest overwrites random parts of the source (concurrently,
 * while copies are in flight) during the job, and the target equals the source as of job start, byte for
 * byte (sync full), cluster for cluster (sync top), or for every guest-written cluster (sync none).
 * Also the speed limit on an injected clock, and copies before guest writes ignoring it.
 */
import {
  BlockGraph,
  type BlockNode,
  backendParent,
  type Edge,
  type MemoryDriver,
  memoryDriver,
  PERM,
} from "@blk/core";
import { describe, expect, it } from "vitest";
import type { JobManager } from "../src/index.ts";
import { backup } from "../src/index.ts";
import { type ManualClock, settle, setup, tick } from "./helpers.ts";

const C = 65536;
const MiB = 1 << 20;

/** A small deterministic PRNG (xorshift32), in [0, 1). */
function prng(seed: number): () => number {
  let x = seed | 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

function randomBytes(rnd: () => number, n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = Math.floor(rnd() * 256);
  return out;
}

/** Source data: random, with every 5th cluster left zero (unallocated). */
function sourceData(size: number, seed: number): Uint8Array {
  const rnd = prng(seed);
  const out = randomBytes(rnd, size);
  for (let c = 0; c < size / C; c += 5) out.fill(0, c * C, (c + 1) * C);
  return out;
}

const same = (a: Uint8Array, b: Uint8Array): boolean => Buffer.compare(Buffer.from(a), Buffer.from(b)) === 0;

interface Guest {
  /** Current content the guest expects. */
  model: Uint8Array;
  /** Clusters the guest wrote to. */
  touched: Set<number>;
  /** One round: up to `n` non-overlapping writes / zero-writes issued at once (not awaited). */
  round(n: number): Promise<unknown>[];
}

function guestOn(edge: Edge, initial: Uint8Array, seed: number): Guest {
  const rnd = prng(seed);
  const size = initial.length;
  const model = initial.slice();
  const touched = new Set<number>();
  return {
    model,
    touched,
    round(n) {
      const used: [number, number][] = [];
      const ops: Promise<unknown>[] = [];
      for (let k = 0; k < n; k++) {
        const off = Math.floor(rnd() * size);
        const len = Math.min(size - off, 1 + Math.floor(rnd() * 3 * C));
        if (used.some(([a, b]) => off < b && a < off + len)) continue;
        used.push([off, off + len]);
        for (let c = Math.floor(off / C); c * C < off + len; c++) touched.add(c);
        if (rnd() < 0.2) {
          model.fill(0, off, off + len);
          ops.push(edge.writeZeroes(off, len));
        } else {
          const data = randomBytes(rnd, len);
          model.set(data, off);
          ops.push(edge.write(off, data));
        }
      }
      return ops;
    },
  };
}

interface World {
  manager: JobManager;
  clock: ManualClock;
  graph: BlockGraph;
  src: BlockNode;
  tgt: BlockNode;
  tgtMem: MemoryDriver;
  guest: Edge;
}

async function world(size: number, data: Uint8Array, backing?: Uint8Array): Promise<World> {
  const { manager, clock } = setup();
  const graph = new BlockGraph();
  const children: Record<string, BlockNode> = {};
  if (backing !== undefined) {
    children.backing = await graph.open(memoryDriver, { size, data: backing }, { nodeName: "base" });
  }
  const src = await graph.open(memoryDriver, { size, data }, { nodeName: "src", children });
  const tgt = await graph.open(memoryDriver, { size }, { nodeName: "tgt" });
  const tgtMem = tgt.state as MemoryDriver;
  // target writes take a turn of the event loop: copies stay in flight while the guest writes
  tgtMem.hook = async (req) => {
    if (req.kind === "write" || req.kind === "write-zeroes") await tick();
  };
  const guest = graph.attach(backendParent("guest"), src, {
    name: "root",
    perm: PERM.CONSISTENT_READ | PERM.WRITE,
  });
  return { manager, clock, graph, src, tgt, tgtMem, guest };
}

/** Runs the guest against the job until it ends: a round of writes, 20 ms of clock, repeat. */
async function drive(w: World, guest: Guest, job: { outcome: Promise<unknown> }): Promise<number> {
  const state = { done: false };
  void job.outcome.then(() => {
    state.done = true;
  });
  let rounds = 0;
  while (!state.done) {
    const ops = guest.round(2);
    await w.clock.advance(20_000_000);
    await Promise.all(ops);
    if (++rounds > 5000) throw new Error("backup did not finish");
  }
  return rounds;
}

describe("point in time under a writing guest", () => {
  // BLK_BACKUP_PIT_SEEDS=200 runs more random guests (default 3).
  const seeds = Number(process.env.BLK_BACKUP_PIT_SEEDS ?? 3);
  for (let seed = 1; seed <= seeds; seed++) {
    it(`sync=full: the target equals the source as of job start (seed ${seed})`, async () => {
      const size = 2 * MiB;
      const initial = sourceData(size, seed);
      const w = await world(size, initial);
      const guest = guestOn(w.guest, initial, seed * 7);
      const job = await backup(w.manager, {
        graph: w.graph,
        "job-id": "pit",
        device: "src",
        target: "tgt",
        sync: "full",
        speed: MiB,
        "x-perf": { "max-chunk": C },
      });
      const rounds = await drive(w, guest, job);
      expect(await job.outcome).toEqual({ status: "completed" });
      expect(rounds).toBeGreaterThanOrEqual(5);
      expect(guest.touched.size).toBeGreaterThan(size / C / 2);
      expect(same(await w.tgtMem.snapshot(), initial)).toBe(true);
      expect(same(await (w.src.state as MemoryDriver).snapshot(), guest.model)).toBe(true);
      expect(job.progress).toEqual({ current: size, total: size });
    });
  }

  it("sync=top: clusters allocated in the top layer at start are copied as they were, nothing else", async () => {
    const size = 2 * MiB;
    const base = sourceData(size, 11);
    // the top layer allocates every third cluster (some of them as zeroes)
    const topData = new Uint8Array(size);
    const rnd = prng(12);
    for (let c = 0; c < size / C; c += 3) topData.set(randomBytes(rnd, C), c * C);
    const w = await world(size, topData, base);
    const srcMem = w.src.state as MemoryDriver;
    await w.src.writeZeroes(4 * C, C); // allocated zero cluster in the top
    const allocated = new Set<number>();
    for (let c = 0; c < size / C; c++) if (srcMem.clusterState(c * C) !== "unallocated") allocated.add(c);
    const initial = await srcMem.snapshot();
    const guest = guestOn(w.guest, initial, 13);
    const job = await backup(w.manager, {
      graph: w.graph,
      "job-id": "pit",
      device: "src",
      target: "tgt",
      sync: "top",
      speed: 4 * MiB,
      "x-perf": { "max-chunk": C },
    });
    await drive(w, guest, job);
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(job.progress.total).toBe(allocated.size * C);
    const got = await w.tgtMem.snapshot();
    for (let c = 0; c < size / C; c++) {
      if (allocated.has(c)) {
        expect(same(got.subarray(c * C, (c + 1) * C), initial.subarray(c * C, (c + 1) * C))).toBe(true);
      } else {
        expect(w.tgtMem.clusterState(c * C)).toBe("unallocated");
      }
    }
    expect(same(await srcMem.snapshot(), guest.model)).toBe(true);
  });

  it("sync=none: every cluster the guest wrote holds its old data on the target, the rest is untouched", async () => {
    const size = 2 * MiB;
    const initial = sourceData(size, 21);
    const w = await world(size, initial);
    const guest = guestOn(w.guest, initial, 22);
    const events: string[] = [];
    w.manager.onEvent((e) => events.push(e.event === "JOB_STATUS_CHANGE" ? e.data.status : e.event));
    const job = await backup(w.manager, {
      graph: w.graph,
      "job-id": "none0",
      device: "src",
      target: "tgt",
      sync: "none",
    });
    for (let r = 0; r < 20; r++) {
      const ops = guest.round(4);
      await settle(1);
      await Promise.all(ops);
    }
    expect(job.status).toBe("running");
    w.manager.jobCancel({ id: "none0" });
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(events).toEqual([
      "created",
      "running",
      "paused",
      "running",
      "aborting",
      "BLOCK_JOB_CANCELLED",
      "concluded",
      "null",
    ]);
    const got = await w.tgtMem.snapshot();
    expect(guest.touched.size).toBeGreaterThan(5);
    for (let c = 0; c < size / C; c++) {
      if (guest.touched.has(c)) {
        expect(same(got.subarray(c * C, (c + 1) * C), initial.subarray(c * C, (c + 1) * C))).toBe(true);
      } else {
        expect(w.tgtMem.clusterState(c * C)).toBe("unallocated");
      }
    }
    // progress counts the clusters copied before guest writes; len stays the whole disk
    expect(job.progress).toEqual({ current: guest.touched.size * C, total: size });
    expect(w.guest.child).toBe(w.src);
  });
});

describe("speed limit (injected clock)", () => {
  it("copies about `speed` bytes per second; copies before guest writes ignore it; set-speed 0 wakes the job", async () => {
    const size = 4 * MiB;
    const initial = sourceData(size, 31).map((b) => b | 1);
    const w = await world(size, initial);
    w.tgtMem.hook = undefined;
    const job = await backup(w.manager, {
      graph: w.graph,
      "job-id": "slow",
      device: "src",
      target: "tgt",
      sync: "full",
      speed: MiB,
      "x-perf": { "max-chunk": C },
    });
    await w.clock.advance(1_000_000_000);
    const at1s = job.progress.current;
    expect(at1s).toBeGreaterThanOrEqual(0.85 * MiB);
    expect(at1s).toBeLessThanOrEqual(1.25 * MiB);
    expect(w.manager.queryBlockJobs()[0]).toMatchObject({ speed: MiB, len: size });

    // a guest write to an uncopied cluster completes without the clock moving, and counts as progress
    await w.guest.write(60 * C, new Uint8Array(100).fill(7));
    expect(job.progress.current).toBe(at1s + C);
    const tgtNow = await w.tgtMem.snapshot();
    expect(same(tgtNow.subarray(60 * C, 61 * C), initial.subarray(60 * C, 61 * C))).toBe(true);

    await w.clock.advance(1_000_000_000);
    const at2s = job.progress.current - C;
    expect(at2s).toBeGreaterThanOrEqual(1.8 * MiB);
    expect(at2s).toBeLessThanOrEqual(2.3 * MiB);
    expect(job.status).toBe("running");

    w.manager.blockJobSetSpeed({ device: "slow", speed: 0 });
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(w.clock.now()).toBe(2_000_000_000);
    const expected = initial.slice();
    expect(same(await w.tgtMem.snapshot(), expected)).toBe(true);
  });
});
