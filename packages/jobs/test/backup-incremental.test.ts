/**
 * Incremental backup (spec/jobs.md §3, spec/hbitmap.md §7.5, transcript §3): a full backup that resets a
 * dirty bitmap, incrementals into overlays whose backing is the previous backup, a failed incremental
 * that loses no dirty bit, and the three `bitmap-mode` outcomes on success and on failure.
 */
import {
  BlkError,
  BlockGraph,
  type BlockNode,
  backendParent,
  type DirtyBitmap,
  type Edge,
  type MemoryDriver,
  memoryDriver,
  PERM,
} from "@blk/core";
import { describe, expect, it } from "vitest";
import { type BitmapSyncMode, backup, type JobEvent, JobManager } from "../src/index.ts";
import { compact, record } from "./helpers.ts";

const C = 65536;
const MiB = 1 << 20;

function filled(size: number, seed: number): Uint8Array {
  const out = new Uint8Array(size);
  let x = seed;
  for (let i = 0; i < size; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    out[i] = (x >>> 16) & 0xff;
  }
  return out;
}

/** The clusters (64 KiB) a bitmap marks dirty. */
function dirtyClusters(b: DirtyBitmap): number[] {
  const out: number[] = [];
  for (let off = 0; off < b.size; off += C) if (b.get(off)) out.push(off / C);
  return out;
}

const same = (a: Uint8Array, b: Uint8Array): boolean => Buffer.compare(Buffer.from(a), Buffer.from(b)) === 0;

interface Env {
  graph: BlockGraph;
  manager: JobManager;
  events: JobEvent[];
  src: BlockNode;
  guest: Edge;
  /** Writes a few bytes into each cluster given. */
  touch: (clusters: number[], value: number) => Promise<void>;
  /** A new empty memory target, optionally over a backing node. */
  target: (name: string, backing?: BlockNode) => Promise<BlockNode>;
  b0: () => DirtyBitmap;
}

async function env(size = 2 * MiB, granularity = C): Promise<Env> {
  const graph = new BlockGraph();
  const manager = new JobManager();
  const events = record(manager);
  const src = await graph.open(memoryDriver, { size, data: filled(size, 5) }, { nodeName: "a" });
  const guest = graph.attach(backendParent("guest"), src, {
    name: "root",
    perm: PERM.CONSISTENT_READ | PERM.WRITE,
  });
  await src.createBitmap({ name: "b0", granularity });
  return {
    graph,
    manager,
    events,
    src,
    guest,
    async touch(clusters, value) {
      for (const c of clusters) await guest.write(c * C + 1000, new Uint8Array(300).fill(value));
    },
    target: (name, backing) =>
      graph.open(memoryDriver, { size }, { nodeName: name, ...(backing ? { children: { backing } } : {}) }),
    b0() {
      const b = src.getBitmap("b0");
      if (b === undefined) throw new Error("b0 is gone");
      return b;
    },
  };
}

describe("incremental backup chain", () => {
  it("full + incrementals reproduce the source; a failed incremental loses no dirty bit", async () => {
    const e = await env();
    const snap = (n: BlockNode): Promise<Uint8Array> => (n.state as MemoryDriver).snapshot();

    // 1. full backup that also resets b0 (bitmap output only): b0 = writes during the job = none
    await e.touch([1, 2], 0x11);
    expect(dirtyClusters(e.b0())).toEqual([1, 2]);
    const t0 = await e.target("t0");
    const full = await backup(e.manager, {
      graph: e.graph,
      "job-id": "full0",
      device: "a",
      target: "t0",
      sync: "full",
      bitmap: "b0",
      "bitmap-mode": "on-success",
    });
    expect(e.b0().busy).toBe(true);
    expect(e.b0().recording).toBe(true);
    expect(await full.outcome).toEqual({ status: "completed" });
    expect(dirtyClusters(e.b0())).toEqual([]);
    expect(same(await snap(t0), await snap(e.src))).toBe(true);

    // 2. writes, then an incremental into an overlay of t0 (transcript §3: len = dirty bytes)
    await e.touch([3, 7, 8], 0x22);
    expect(dirtyClusters(e.b0())).toEqual([3, 7, 8]);
    const t1 = await e.target("t1", t0);
    e.events.length = 0;
    const inc1 = await backup(e.manager, {
      graph: e.graph,
      "job-id": "inc0",
      device: "a",
      target: "t1",
      sync: "bitmap",
      bitmap: "b0",
      "bitmap-mode": "on-success",
    });
    expect(await inc1.outcome).toEqual({ status: "completed" });
    expect(compact(e.events)).toEqual([
      "inc0:created",
      "inc0:running",
      "inc0:paused",
      "inc0:running",
      "inc0:waiting",
      "inc0:pending",
      "BLOCK_JOB_COMPLETED:inc0",
      "inc0:concluded",
      "inc0:null",
    ]);
    expect(e.events.find((x) => x.event === "BLOCK_JOB_COMPLETED")?.data).toEqual({
      device: "inc0",
      len: 3 * C,
      offset: 3 * C,
      speed: 0,
      type: "backup",
    });
    expect(e.b0().info()).toEqual({
      name: "b0",
      recording: true,
      busy: false,
      persistent: false,
      granularity: C,
      count: 0,
    });
    const t1Mem = t1.state as MemoryDriver;
    expect(t1Mem.dataClusters).toBe(3);
    expect(same(await snap(t1), await snap(e.src))).toBe(true);

    // 3. more writes; an incremental whose target fails: the job fails, b0 keeps its bits plus the
    //    writes made while the job ran
    await e.touch([7, 20, 30], 0x33);
    const t2 = await e.target("t2", t1);
    const t2Mem = t2.state as MemoryDriver;
    let duringJob = false;
    t2Mem.hook = async (req) => {
      if (req.kind !== "write") return;
      if (!duringJob) {
        duringJob = true;
        await e.touch([25], 0x44); // a guest write while the job runs (cluster 25 is not in the job)
      }
      throw new BlkError("EIO", "injected target failure");
    };
    const inc2 = await backup(e.manager, {
      graph: e.graph,
      "job-id": "inc1",
      device: "a",
      target: "t2",
      sync: "incremental",
      bitmap: "b0",
    });
    const out2 = await inc2.outcome;
    expect(out2.status).toBe("failed");
    expect(dirtyClusters(e.b0())).toEqual([7, 20, 25, 30]);
    expect(e.b0().busy).toBe(false);
    expect(e.b0().recording).toBe(true);

    // 4. a successful incremental into a fresh overlay of t1 completes the chain
    const t3 = await e.target("t3", t1);
    const inc3 = await backup(e.manager, {
      graph: e.graph,
      "job-id": "inc2",
      device: "a",
      target: "t3",
      sync: "incremental",
      bitmap: "b0",
    });
    expect(await inc3.outcome).toEqual({ status: "completed" });
    expect(dirtyClusters(e.b0())).toEqual([]);
    expect((t3.state as MemoryDriver).dataClusters).toBe(4);
    // t3 → t1 → t0 reads exactly as the source
    expect(same(await snap(t3), await snap(e.src))).toBe(true);
    expect(e.src.bitmaps.map((b) => b.name)).toEqual(["b0"]);
  });

  it("a bitmap finer than the cluster size is rounded outward to whole clusters", async () => {
    const e = await env(MiB, 4096);
    const t0 = await e.target("t0");
    await e.guest.write(5 * C + 4096, new Uint8Array(10).fill(1)); // one 4 KiB granule of cluster 5
    expect(e.b0().count()).toBe(4096);
    const job = await backup(e.manager, {
      graph: e.graph,
      "job-id": "fine",
      device: "a",
      target: "t0",
      sync: "incremental",
      bitmap: "b0",
    });
    expect(job.clusterSize).toBe(C);
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(job.progress).toEqual({ current: C, total: C });
    const t = t0.state as MemoryDriver;
    expect(t.dataClusters).toBe(1);
    const got = await t.snapshot();
    const want = await (e.src.state as MemoryDriver).snapshot();
    expect(same(got.subarray(5 * C, 6 * C), want.subarray(5 * C, 6 * C))).toBe(true);
    expect(e.b0().count()).toBe(0);
  });
});

describe("bitmap-mode outcomes (hbitmap.md §7.5)", () => {
  // b0 marks clusters 0..5; the job copies them one at a time; while cluster 3 is being written the guest
  // writes cluster 10 (recorded by the successor); on failure, the write of cluster 3 fails.
  const expected: Record<BitmapSyncMode, { ok: number[]; failed: number[] }> = {
    "on-success": { ok: [10], failed: [0, 1, 2, 3, 4, 5, 10] },
    never: { ok: [0, 1, 2, 3, 4, 5, 10], failed: [0, 1, 2, 3, 4, 5, 10] },
    always: { ok: [10], failed: [3, 4, 5, 10] },
  };
  for (const mode of ["on-success", "never", "always"] as const) {
    for (const fail of [false, true]) {
      it(`${mode}, job ${fail ? "fails" : "succeeds"}`, async () => {
        const e = await env(MiB);
        await e.touch([0, 1, 2, 3, 4, 5], 0x55);
        const tgt = await e.target("t");
        (tgt.state as MemoryDriver).hook = async (req) => {
          if (req.kind !== "write" || req.offset !== 3 * C) return;
          await e.touch([10], 0x66);
          if (fail) throw new BlkError("EIO", "injected");
        };
        const job = await backup(e.manager, {
          graph: e.graph,
          "job-id": "bm",
          device: "a",
          target: "t",
          sync: "bitmap",
          bitmap: "b0",
          "bitmap-mode": mode,
          "x-perf": { "max-workers": 1, "max-chunk": C },
        });
        const out = await job.outcome;
        expect(out.status).toBe(fail ? "failed" : "completed");
        const b = e.b0();
        expect(dirtyClusters(b)).toEqual(fail ? expected[mode].failed : expected[mode].ok);
        expect(b.busy).toBe(false);
        expect(b.frozen).toBe(false);
        expect(b.recording).toBe(true);
        // only b0 is left: the successor and the copy bitmap are gone
        expect(e.src.bitmaps).toEqual([b]);
      });
    }
  }

  it("a cancelled incremental reclaims (nothing lost), and the filter is gone", async () => {
    const e = await env(MiB);
    await e.touch([2, 4], 1);
    const tgt = await e.target("t");
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    (tgt.state as MemoryDriver).hook = () => gate;
    const job = await backup(e.manager, {
      graph: e.graph,
      "job-id": "c",
      device: "a",
      target: "t",
      sync: "incremental",
      bitmap: "b0",
    });
    await e.touch([9], 2);
    e.manager.jobCancel({ id: "c" });
    release();
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(dirtyClusters(e.b0())).toEqual([2, 4, 9]);
    expect(e.guest.child).toBe(e.src);
  });
});
