/**
 * Bounded guest impact during backup (blk extensions `x-blk-cbw-buffer-size`, `x-blk-max-guest-stall`):
 * a copy before a guest write holds the old data in memory and lets the guest write go on before the
 * target write completes, within a budget; the point in time is kept under concurrent guest writes and a
 * slow target; a failed buffered target write is retried from memory (or fails the job); the stall cap
 * breaks the snapshot instead of holding the guest. Assertions are on structure (which writes completed
 * while the target was blocked, budget accounting), never on time.
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
} from "@blk/core";
import { describe, expect, it } from "vitest";
import { type BackupOptions, backup, isJobError } from "../src/index.ts";
import { type ManualClock, settle, setup, tick } from "./helpers.ts";
import { rng, sha } from "./mirror-helpers.ts";

const C = 65536;
const MiB = 1 << 20;

interface World {
  manager: ReturnType<typeof setup>["manager"];
  clock: ManualClock;
  graph: BlockGraph;
  src: BlockNode;
  srcMem: MemoryDriver;
  tgtMem: MemoryDriver;
  guest: Edge;
  initial: Uint8Array;
  opts(extra?: Partial<BackupOptions>): BackupOptions;
}

function data(size: number, seed: number): Uint8Array {
  const r = rng(seed);
  const out = new Uint8Array(size);
  for (let c = 0; c < size / C; c++) {
    if (c % 5 === 4) continue;
    out.fill(1 + Math.floor(r() * 250), c * C, (c + 1) * C);
    out[c * C + 1] = c & 0xff;
  }
  return out;
}

async function world(size = MiB, backing?: Uint8Array, top?: Uint8Array): Promise<World> {
  const { manager, clock } = setup();
  const graph = new BlockGraph();
  const initial = top ?? data(size, 1);
  const children: Record<string, BlockNode> = {};
  if (backing !== undefined) {
    children.backing = await graph.open(memoryDriver, { size, data: backing }, { nodeName: "base" });
  }
  const src = await graph.open(memoryDriver, { size, data: initial }, { nodeName: "src", children });
  const tgt = await graph.open(memoryDriver, { size }, { nodeName: "tgt" });
  const guest = graph.attach(backendParent("guest"), src, {
    name: "root",
    perm: PERM.CONSISTENT_READ | PERM.WRITE,
  });
  return {
    manager,
    clock,
    graph,
    src,
    srcMem: src.state as MemoryDriver,
    tgtMem: tgt.state as MemoryDriver,
    guest,
    initial,
    opts: (extra = {}) => ({ graph, "job-id": "bk", device: "src", target: "tgt", sync: "none", ...extra }),
  };
}

/** Holds every target write until `open()`; counts the writes waiting. */
function blockTarget(mem: MemoryDriver): { open(): void; waiting(): number } {
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  let waiting = 0;
  mem.hook = async (req) => {
    if (req.kind !== "write" && req.kind !== "write-zeroes") return;
    waiting++;
    await gate;
    waiting--;
  };
  return {
    open: () => {
      mem.hook = undefined;
      release();
    },
    waiting: () => waiting,
  };
}

/** Tracks whether a promise settled. */
function track(p: Promise<unknown>): { done(): boolean; promise: Promise<unknown> } {
  let settled = false;
  const promise = p.finally(() => {
    settled = true;
  });
  return { done: () => settled, promise };
}

describe("x-blk-cbw-buffer-size: the guest write goes on once the old data is in memory", () => {
  it("a guest write completes while its copy's target write is still held; the budget counts it", async () => {
    const w = await world();
    const t = blockTarget(w.tgtMem);
    const job = await backup(w.manager, w.opts({ "x-blk-cbw-buffer-size": 4 * C }));
    expect(job.cbw.bufferSize).toBe(4 * C);
    await w.guest.write(3 * C + 10, new Uint8Array(100).fill(0xaa));
    // the guest write is done, the source has the new data, the copy is held at the target
    expect((await w.srcMem.snapshot())[3 * C + 10]).toBe(0xaa);
    await settle();
    expect(t.waiting()).toBe(1);
    expect(job.cbw.bufferStats).toMatchObject({ bytes: C, bufferedWrites: 1, syncWrites: 0 });
    expect(job.cbw.bufferedCopies).toBe(1);
    // the buffered bytes are still to do (sync=none: the total is the whole disk)
    expect(job.progress).toEqual({ current: 0, total: MiB });
    // a second write to the same cluster needs nothing more
    await w.guest.write(3 * C + 20, new Uint8Array(10).fill(0xbb));
    expect(job.cbw.bufferStats.bufferedWrites).toBe(1);
    t.open();
    await job.cbw.flushBuffered();
    expect(job.cbw.bufferStats).toMatchObject({ bytes: 0, maxBytes: C });
    expect(job.progress).toEqual({ current: C, total: MiB });
    const tgt = await w.tgtMem.snapshot();
    expect(sha(tgt.subarray(3 * C, 4 * C))).toBe(sha(w.initial.subarray(3 * C, 4 * C)));
    job.cancel();
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
  });

  it("once the budget is used up, a guest write waits for its target write, as in QEMU", async () => {
    const w = await world();
    const t = blockTarget(w.tgtMem);
    const job = await backup(w.manager, w.opts({ "x-blk-cbw-buffer-size": 2 * C }));
    // two single-cluster writes fit; a two-cluster write does not fit in what is left
    await w.guest.write(1 * C, new Uint8Array(C).fill(1));
    await w.guest.write(5 * C, new Uint8Array(C).fill(2));
    const third = track(w.guest.write(8 * C, new Uint8Array(2 * C).fill(3)));
    await settle(10);
    expect(third.done()).toBe(false);
    expect(job.cbw.bufferStats).toMatchObject({
      bytes: 2 * C,
      maxBytes: 2 * C,
      bufferedWrites: 2,
      syncWrites: 1,
    });
    expect((await w.srcMem.snapshot())[8 * C]).toBe(w.initial[8 * C]);
    t.open();
    await third.promise;
    await job.cbw.flushBuffered();
    expect(job.cbw.bufferStats.bytes).toBe(0);
    const tgt = await w.tgtMem.snapshot();
    for (const c of [1, 5, 8, 9]) {
      expect(sha(tgt.subarray(c * C, (c + 1) * C))).toBe(sha(w.initial.subarray(c * C, (c + 1) * C)));
    }
    job.cancel();
    await job.outcome;
  });

  it("0: every guest write waits for its target write (QEMU's behaviour)", async () => {
    const w = await world();
    const t = blockTarget(w.tgtMem);
    const job = await backup(w.manager, w.opts({ "x-blk-cbw-buffer-size": 0 }));
    const write = track(w.guest.write(2 * C, new Uint8Array(10).fill(9)));
    await settle(10);
    expect(t.waiting()).toBe(1);
    expect(write.done()).toBe(false);
    expect(job.cbw.bufferStats).toMatchObject({ bytes: 0, bufferedWrites: 0, syncWrites: 1 });
    t.open();
    await write.promise;
    job.cancel();
    await job.outcome;
  });

  it("the copy loop leaves buffered clusters alone and the job completes only once they landed", async () => {
    const w = await world();
    const t = blockTarget(w.tgtMem);
    const job = await backup(
      w.manager,
      w.opts({ sync: "full", "x-blk-cbw-buffer-size": MiB, "x-perf": { "max-workers": 1, "max-chunk": C } }),
    );
    await settle();
    // the background copy holds one chunk at the target; guest writes elsewhere complete anyway
    for (const c of [4, 9, 12]) await w.guest.write(c * C, new Uint8Array(C).fill(0x77));
    expect(job.cbw.bufferStats.bufferedWrites).toBe(3);
    expect(job.status).toBe("running");
    t.open();
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(sha(await w.tgtMem.snapshot())).toBe(sha(w.initial));
    expect(job.progress).toEqual({ current: MiB, total: MiB });
  });

  it("refuses a negative budget or stall cap", async () => {
    const w = await world();
    await expect(backup(w.manager, w.opts({ "x-blk-cbw-buffer-size": -1 }))).rejects.toThrow(
      "x-blk-cbw-buffer-size must be zero (which means no buffering) or positive",
    );
    await expect(backup(w.manager, w.opts({ "x-blk-max-guest-stall": -5 }))).rejects.toThrow(
      "x-blk-max-guest-stall must be zero (which means no limit) or positive",
    );
    expect(w.guest.child).toBe(w.src);
  });
});

describe("point in time with a buffer, a slow target and concurrent guest writes", () => {
  const seeds = Number(process.env.BLK_BACKUP_BUFFER_SEEDS ?? 2);

  /** Target writes take 1 to 6 turns of the event loop (seeded). */
  function slowTarget(mem: MemoryDriver, seed: number): void {
    const r = rng(seed);
    mem.hook = async (req) => {
      if (req.kind !== "write" && req.kind !== "write-zeroes") return;
      const n = 1 + Math.floor(r() * 6);
      for (let i = 0; i < n; i++) await tick();
    };
  }

  /** Rounds of up to 4 concurrent non-overlapping guest writes; returns the model and touched clusters. */
  async function guestRounds(
    w: World,
    seed: number,
    until: () => boolean,
  ): Promise<{ model: Uint8Array; touched: Set<number> }> {
    const r = rng(seed);
    const size = w.initial.length;
    const model = (await w.srcMem.snapshot()).slice();
    const touched = new Set<number>();
    for (let round = 0; !until() && round < 4000; round++) {
      const used: number[] = [];
      const ops: Promise<void>[] = [];
      for (let k = 0; k < 4; k++) {
        const c = Math.floor(r() * (size / C - 1));
        if (used.some((u) => Math.abs(u - c) < 2)) continue;
        used.push(c);
        const off = c * C + Math.floor(r() * C);
        const len = 1 + Math.floor(r() * C);
        for (let x = Math.floor(off / C); x * C < off + len; x++) touched.add(x);
        if (r() < 0.2) {
          model.fill(0, off, off + len);
          ops.push(w.guest.writeZeroes(off, len));
        } else {
          const d = new Uint8Array(len).fill(1 + Math.floor(r() * 250));
          model.set(d, off);
          ops.push(w.guest.write(off, d));
        }
      }
      await w.clock.advance(10_000_000);
      await Promise.all(ops);
    }
    return { model, touched };
  }

  for (let seed = 1; seed <= seeds; seed++) {
    it(`sync=full (seed ${seed}): target == source at job start`, async () => {
      const w = await world(2 * MiB);
      slowTarget(w.tgtMem, seed);
      const job = await backup(
        w.manager,
        w.opts({
          sync: "full",
          speed: 2 * MiB,
          "x-blk-cbw-buffer-size": 4 * C,
          "x-perf": { "max-chunk": C },
        }),
      );
      let over = false;
      void job.outcome.then(() => (over = true));
      const g = await guestRounds(w, seed * 11, () => over);
      expect(await job.outcome).toEqual({ status: "completed" });
      expect(job.cbw.bufferStats.bufferedWrites).toBeGreaterThan(0);
      expect(job.cbw.bufferStats.maxBytes).toBeLessThanOrEqual(4 * C);
      expect(sha(await w.tgtMem.snapshot())).toBe(sha(w.initial));
      expect(sha(await w.srcMem.snapshot())).toBe(sha(g.model));
      expect(job.progress).toEqual({ current: 2 * MiB, total: 2 * MiB });
    });
  }

  it("sync=top: allocated clusters as they were, unallocated ones never written", async () => {
    const size = 2 * MiB;
    const base = data(size, 5);
    const top = new Uint8Array(size);
    for (let c = 0; c < size / C; c += 3) top.fill(0x30 + (c % 50), c * C, (c + 1) * C);
    const w = await world(size, base, top);
    await w.src.writeZeroes(7 * C, C);
    const allocated = new Set<number>();
    for (let c = 0; c < size / C; c++) if (w.srcMem.clusterState(c * C) !== "unallocated") allocated.add(c);
    const initial = await w.srcMem.snapshot();
    slowTarget(w.tgtMem, 9);
    const job = await backup(
      w.manager,
      w.opts({ sync: "top", speed: 4 * MiB, "x-blk-cbw-buffer-size": 8 * C, "x-perf": { "max-chunk": C } }),
    );
    let over = false;
    void job.outcome.then(() => (over = true));
    await guestRounds(w, 99, () => over);
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(job.cbw.bufferStats.bufferedWrites).toBeGreaterThan(0);
    const got = await w.tgtMem.snapshot();
    for (let c = 0; c < size / C; c++) {
      if (allocated.has(c)) {
        expect(sha(got.subarray(c * C, (c + 1) * C))).toBe(sha(initial.subarray(c * C, (c + 1) * C)));
      } else {
        expect(w.tgtMem.clusterState(c * C)).toBe("unallocated");
      }
    }
  });

  it("sync=none: every guest-written cluster holds its old data on the target", async () => {
    const w = await world(2 * MiB);
    slowTarget(w.tgtMem, 3);
    const job = await backup(w.manager, w.opts({ sync: "none", "x-blk-cbw-buffer-size": 4 * C }));
    let n = 0;
    const g = await guestRounds(w, 5, () => ++n > 30);
    await job.cbw.flushBuffered();
    job.cancel();
    await job.outcome;
    const got = await w.tgtMem.snapshot();
    expect(job.cbw.bufferStats.bufferedWrites).toBeGreaterThan(0);
    for (let c = 0; c < (2 * MiB) / C; c++) {
      if (g.touched.has(c)) {
        expect(sha(got.subarray(c * C, (c + 1) * C))).toBe(sha(w.initial.subarray(c * C, (c + 1) * C)));
      } else {
        expect(w.tgtMem.clusterState(c * C)).toBe("unallocated");
      }
    }
  });
});

describe("buffered target write failures", () => {
  it("on-target-error=ignore: retried from memory, not from the source the guest has overwritten", async () => {
    const w = await world();
    let failures = 0;
    w.tgtMem.hook = (req) => {
      if (req.kind === "write" && req.offset === 6 * C && failures < 1) {
        failures++;
        throw new BlkError("EIO", "injected");
      }
    };
    const events: string[] = [];
    w.manager.onEvent((e) => events.push(e.event));
    const job = await backup(w.manager, w.opts({ "on-target-error": "ignore" }));
    await w.guest.write(6 * C, new Uint8Array(C).fill(0x99));
    await settle(10);
    expect(failures).toBe(1);
    expect(events).toContain("BLOCK_JOB_ERROR");
    expect(job.cbw.bufferStats).toMatchObject({ failedWrites: 1, bytes: 0 });
    const tgt = await w.tgtMem.snapshot();
    expect(sha(tgt.subarray(6 * C, 7 * C))).toBe(sha(w.initial.subarray(6 * C, 7 * C)));
    job.cancel();
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
  });

  it("on-target-error=report: the guest write succeeded, the job fails", async () => {
    const w = await world();
    w.tgtMem.hook = (req) => {
      if (req.kind === "write") throw new BlkError("EIO", "injected");
    };
    const job = await backup(
      w.manager,
      w.opts({ sync: "full", "x-perf": { "max-workers": 1, "max-chunk": C } }),
    );
    await w.guest.write(10 * C, new Uint8Array(4).fill(9));
    expect((await w.srcMem.snapshot())[10 * C]).toBe(9);
    const outcome = await job.outcome;
    expect(outcome.status).toBe("failed");
    expect(job.error?.message).toBe("Input/output error");
  });
});

describe("x-blk-max-guest-stall", () => {
  it("a guest write held longer than the cap proceeds; the snapshot breaks and the job fails", async () => {
    const w = await world();
    const t = blockTarget(w.tgtMem);
    const job = await backup(
      w.manager,
      w.opts({ sync: "none", "x-blk-cbw-buffer-size": 0, "x-blk-max-guest-stall": 50 }),
    );
    const write = track(w.guest.write(2 * C, new Uint8Array(10).fill(9)));
    await settle(10);
    expect(write.done()).toBe(false);
    await w.clock.advance(49_000_000);
    expect(write.done()).toBe(false);
    await w.clock.advance(1_000_000);
    await write.promise;
    expect((await w.srcMem.snapshot())[2 * C]).toBe(9);
    expect(job.cbw.snapshotError?.code).toBe("ETIMEDOUT");
    const outcome = await job.outcome;
    expect(outcome.status).toBe("failed");
    expect(job.error?.message).toBe("Connection timed out");
    // later guest writes no longer copy anything
    await w.guest.write(12 * C, new Uint8Array(10).fill(9));
    t.open();
    expect(isJobError(job.error)).toBe(false);
  });
});

describe("the background copy yields to an active guest (with a buffer budget)", () => {
  it("at most 2 background chunks in flight while the guest writes; all of max-workers once it is quiet", async () => {
    const w = await world(2 * MiB);
    const t = blockTarget(w.tgtMem);
    const job = await backup(
      w.manager,
      w.opts({ sync: "full", "x-blk-cbw-buffer-size": MiB, "x-perf": { "max-workers": 16, "max-chunk": C } }),
    );
    await settle(10);
    // the filter starts as if the guest were writing
    expect(job.cbw.engine.stats.inFlight).toBe(2);
    await w.guest.write(30 * C, new Uint8Array(10).fill(1));
    await w.clock.advance(50_000_000);
    expect(job.cbw.engine.stats.inFlight).toBe(2);
    // a slice without guest writes: the copy goes to max-workers
    await w.clock.advance(100_000_000);
    await settle(10);
    expect(job.cbw.engine.stats.inFlight).toBe(16);
    t.open();
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(sha(await w.tgtMem.snapshot())).toBe(sha(w.initial));
  });

  it("without a budget (QEMU's behaviour) the copy keeps max-workers chunks in flight from the start", async () => {
    const w = await world(2 * MiB);
    const t = blockTarget(w.tgtMem);
    const job = await backup(
      w.manager,
      w.opts({ sync: "full", "x-blk-cbw-buffer-size": 0, "x-perf": { "max-workers": 16, "max-chunk": C } }),
    );
    await settle(10);
    expect(job.cbw.engine.stats.inFlight).toBe(16);
    t.open();
    expect(await job.outcome).toEqual({ status: "completed" });
  });
});
