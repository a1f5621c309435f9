/**
 * Backup job: event sequences against the qsd 7.2 transcripts (spec/qmp-transcripts.md §1, §3, §7),
 * argument checks with QEMU's messages, the copy-before-write filter in the graph, zero detection,
 * cluster size rules, sync=top, error policies and cancel.
 */
import {
  BlkError,
  type BlockDriver,
  type BlockDriverInfo,
  BlockGraph,
  type BlockNode,
  backendParent,
  CHILD_ROLE,
  type Edge,
  MemoryDriver,
  type MemoryDriverOptions,
  memoryDriver,
  PERM,
} from "@blk/core";
import { describe, expect, it } from "vitest";
import type { BackupOptions } from "../src/index.ts";
// Imported from the module itself: the package root re-exports it once `src/index.ts` does.
import * as backupApi from "../src/index.ts";
import { type JobEvent, JobManager, JobTxn } from "../src/index.ts";
import { compact, record, settle } from "./helpers.ts";

const C = 65536;
const MiB = 1 << 20;

/** Deterministic bytes: cluster i is all zero when `zeroClusters` has i, else pseudo-random. */
function pattern(size: number, zeroClusters: ReadonlySet<number> = new Set()): Uint8Array {
  const out = new Uint8Array(size);
  let x = 0x9e3779b9;
  for (let i = 0; i < size; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = zeroClusters.has(Math.floor(i / C)) ? 0 : (x & 0xff) | 1;
  }
  return out;
}

interface Env {
  graph: BlockGraph;
  manager: JobManager;
  events: JobEvent[];
  src: BlockNode;
  tgt: BlockNode;
  srcMem: MemoryDriver;
  tgtMem: MemoryDriver;
  guest: Edge;
  base: (extra?: Partial<BackupOptions>) => BackupOptions;
}

async function env(
  opts: { size?: number; data?: Uint8Array; tgtSize?: number; tgt?: Partial<MemoryDriverOptions> } = {},
): Promise<Env> {
  const size = opts.size ?? MiB;
  const graph = new BlockGraph();
  const manager = new JobManager();
  const events = record(manager);
  const src = await graph.open(memoryDriver, { size, data: opts.data ?? pattern(size) }, { nodeName: "src" });
  const tgt = await graph.open(
    memoryDriver,
    { size: opts.tgtSize ?? size, ...opts.tgt },
    { nodeName: "tgt" },
  );
  const guest = graph.attach(backendParent("guest"), src, {
    name: "root",
    perm: PERM.CONSISTENT_READ | PERM.WRITE,
  });
  return {
    graph,
    manager,
    events,
    src,
    tgt,
    srcMem: src.state as MemoryDriver,
    tgtMem: tgt.state as MemoryDriver,
    guest,
    base: (extra = {}) => ({
      graph,
      "job-id": "backup0",
      device: "src",
      target: "tgt",
      sync: "full",
      ...extra,
    }),
  };
}

const equalBytes = (a: Uint8Array, b: Uint8Array): boolean =>
  a.length === b.length && Buffer.compare(Buffer.from(a), Buffer.from(b)) === 0;

describe("backup sync=full", () => {
  it("copies everything with the transcript's event sequence and removes its filter", async () => {
    const zeroes = new Set([3, 4, 9]);
    const e = await env({ data: pattern(MiB, zeroes) });
    const job = await backupApi.backup(e.manager, e.base());
    // blockdev-backup (§1): created, running, then the transient paused/running, all before the return
    expect(compact(e.events)).toEqual([
      "backup0:created",
      "backup0:running",
      "backup0:paused",
      "backup0:running",
    ]);
    // the filter took over the guest's edge and sits above the source
    expect(job.filter.driver.format).toBe("copy-before-write");
    expect(job.filter.nodeName).toMatch(/^#block\d{5}$/);
    expect(e.guest.child).toBe(job.filter);
    expect(job.filter.children.get("file")?.child).toBe(e.src);
    expect(job.filter.children.get("target")?.child).toBe(e.tgt);
    expect(e.graph.debugGraph().nodes.some((n) => n.type === "block-job" && n.name === "backup0")).toBe(true);
    expect(job.clusterSize).toBe(C);
    expect(e.manager.queryBlockJobs()[0]).toMatchObject({ type: "backup", device: "backup0", len: MiB });

    expect(await job.outcome).toEqual({ status: "completed" });
    expect(compact(e.events).slice(4)).toEqual([
      "backup0:waiting",
      "backup0:pending",
      "BLOCK_JOB_COMPLETED:backup0",
      "backup0:concluded",
      "backup0:null",
    ]);
    const done = e.events.find((ev) => ev.event === "BLOCK_JOB_COMPLETED");
    expect(done?.data).toEqual({ device: "backup0", len: MiB, offset: MiB, speed: 0, type: "backup" });
    expect(equalBytes(await e.tgtMem.snapshot(), await e.srcMem.snapshot())).toBe(true);
    // zero detection by block status: the unallocated source clusters became write-zeroes
    for (const i of zeroes) expect(e.tgtMem.clusterState(i * C)).toBe("zero");
    expect(e.tgtMem.counters.writeZeroes).toBeGreaterThan(0);
    expect(e.tgtMem.counters.bytesWritten).toBe(MiB - zeroes.size * C);
    // graph restored: filter gone, guest back on the source, copy bitmap released
    expect(e.guest.child).toBe(e.src);
    expect(job.filter.closed).toBe(true);
    expect(e.graph.find(job.filter.nodeName)).toBeUndefined();
    expect(e.src.bitmaps).toHaveLength(0);
    expect(e.src.parents).toEqual([e.guest]);
    expect(e.tgt.parents).toHaveLength(0);
    expect(e.graph.debugGraph().nodes.some((n) => n.type === "block-job")).toBe(false);
  });

  it("uses filter-node-name; a guest write copies its cluster first, past the held background copy", async () => {
    const e = await env();
    const before = await e.srcMem.snapshot();
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    e.tgtMem.hook = async (req) => {
      if (req.kind === "write" && req.offset === 8 * C) await gate;
    };
    const job = await backupApi.backup(
      e.manager,
      e.base({ "filter-node-name": "cbw0", "x-perf": { "max-workers": 1, "max-chunk": C } }),
    );
    expect(job.filter.nodeName).toBe("cbw0");
    expect(e.graph.find("cbw0")).toBe(job.filter);
    await settle();
    // the background copy is held at cluster 8; cluster 12 is copied by the write itself, then written
    expect(job.copyBitmap.get(12 * C)).toBe(true);
    await e.guest.write(12 * C + 100, new Uint8Array(10).fill(0xee));
    expect(job.copyBitmap.get(12 * C)).toBe(false);
    const tgt = await e.tgtMem.snapshot();
    expect(equalBytes(tgt.subarray(12 * C, 13 * C), before.subarray(12 * C, 13 * C))).toBe(true);
    expect((await e.srcMem.snapshot())[12 * C + 100]).toBe(0xee);
    release();
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(equalBytes(await e.tgtMem.snapshot(), before)).toBe(true);
    expect(e.graph.find("cbw0")).toBeUndefined();
  });

  it("job-cancel gives BLOCK_JOB_CANCELLED and restores the graph", async () => {
    const e = await env();
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    e.tgtMem.hook = () => gate;
    const job = await backupApi.backup(e.manager, e.base());
    await settle();
    e.manager.jobCancel({ id: "backup0" });
    release();
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(compact(e.events).slice(4)).toEqual([
      "backup0:aborting",
      "BLOCK_JOB_CANCELLED:backup0",
      "backup0:concluded",
      "backup0:null",
    ]);
    const ev = e.events.find((x) => x.event === "BLOCK_JOB_CANCELLED");
    expect(ev?.data).toMatchObject({ device: "backup0", type: "backup", len: MiB, speed: 0 });
    expect(e.guest.child).toBe(e.src);
    expect(e.src.bitmaps).toHaveLength(0);
  });

  it("job-pause parks at the next chunk (copies before guest writes go on), job-resume finishes", async () => {
    const e = await env();
    const before = await e.srcMem.snapshot();
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    e.tgtMem.hook = async (req) => {
      if (req.offset === 2 * C) await gate;
    };
    const job = await backupApi.backup(e.manager, e.base({ "x-perf": { "max-workers": 1, "max-chunk": C } }));
    await settle();
    e.manager.jobPause({ id: "backup0" });
    release();
    expect(await job.whenStatus("paused")).toBe(true);
    const copied = job.progress.current;
    await e.guest.write(14 * C, new Uint8Array(8).fill(3));
    expect(job.progress.current).toBe(copied + C);
    await settle();
    expect(job.status).toBe("paused");
    expect(e.manager.queryBlockJobs()[0]).toMatchObject({ status: "paused", paused: true, busy: false });
    e.manager.jobResume({ id: "backup0" });
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(compact(e.events).slice(4, 6)).toEqual(["backup0:paused", "backup0:running"]);
    expect(equalBytes(await e.tgtMem.snapshot(), before)).toBe(true);
  });

  it("auto-finalize/auto-dismiss false: PENDING, job-finalize, job-dismiss", async () => {
    const e = await env();
    const job = await backupApi.backup(e.manager, e.base({ "auto-finalize": false, "auto-dismiss": false }));
    expect(await job.whenStatus("pending")).toBe(true);
    expect(compact(e.events).slice(4)).toEqual([
      "backup0:waiting",
      "backup0:pending",
      "BLOCK_JOB_PENDING:backup0",
    ]);
    // the filter stays until finalisation
    expect(e.guest.child).toBe(job.filter);
    await e.manager.jobFinalize({ id: "backup0" });
    expect(compact(e.events).slice(7)).toEqual(["BLOCK_JOB_COMPLETED:backup0", "backup0:concluded"]);
    expect(e.guest.child).toBe(e.src);
    e.manager.jobDismiss({ id: "backup0" });
    expect(compact(e.events).at(-1)).toBe("backup0:null");
  });

  it("grouped transaction: cancelling one backup cancels both (transcript §3)", async () => {
    const e = await env();
    const t2 = await e.graph.open(memoryDriver, { size: MiB }, { nodeName: "t2" });
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let release2!: () => void;
    const gate2 = new Promise<void>((r) => (release2 = r));
    e.tgtMem.hook = () => gate;
    (t2.state as MemoryDriver).hook = () => gate2;
    const txn = new JobTxn();
    const a = await backupApi.createBackupJob(e.manager, e.base({ "job-id": "tb5", txn }));
    const b = await backupApi.createBackupJob(e.manager, {
      ...e.base({ "job-id": "tb6", txn }),
      target: "t2",
    });
    expect(a.filter.children.get("file")?.child).toBe(b.filter);
    // a transaction starts its jobs inside its drained section, as `transaction` does in QEMU
    a.holdPause();
    b.holdPause();
    a.start();
    b.start();
    b.releasePause();
    a.releasePause();
    expect(compact(e.events)).toEqual([
      "tb5:created",
      "tb6:created",
      "tb5:running",
      "tb5:paused",
      "tb6:running",
      "tb6:paused",
      "tb6:running",
      "tb5:running",
    ]);
    await settle();
    e.manager.jobCancel({ id: "tb5" });
    release();
    await settle();
    release2();
    expect(await a.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(await b.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(compact(e.events).slice(8)).toEqual([
      "tb5:aborting",
      "tb6:aborting",
      "BLOCK_JOB_CANCELLED:tb6",
      "tb6:concluded",
      "tb6:null",
      "BLOCK_JOB_CANCELLED:tb5",
      "tb5:concluded",
      "tb5:null",
    ]);
    expect(e.guest.child).toBe(e.src);
    expect(e.src.bitmaps).toHaveLength(0);
  });
});

describe("argument checks (QEMU's messages, synchronous, no job events)", () => {
  const cases: [string, Partial<BackupOptions>, string][] = [
    ["unknown device", { device: "nosuch" }, "Cannot find device='nosuch' nor node-name='nosuch'"],
    ["unknown target", { target: "nosuch" }, "Cannot find device='nosuch' nor node-name='nosuch'"],
    [
      "bitmap sync without bitmap",
      { sync: "bitmap" },
      "must provide a valid bitmap name for 'bitmap' sync mode",
    ],
    [
      "incremental without bitmap",
      { sync: "incremental" },
      "must provide a valid bitmap name for 'incremental' sync mode",
    ],
    [
      "incremental with another mode",
      { sync: "incremental", bitmap: "b0", "bitmap-mode": "always" },
      "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
    ],
    [
      "missing bitmap",
      { sync: "bitmap", bitmap: "nope", "bitmap-mode": "never" },
      "Bitmap 'nope' could not be found",
    ],
    [
      "bitmap without mode",
      { sync: "bitmap", bitmap: "b0" },
      "Bitmap sync mode must be given when providing a bitmap",
    ],
    [
      "bitmap with sync none",
      { sync: "none", bitmap: "b0", "bitmap-mode": "on-success" },
      "sync mode 'none' does not produce meaningful bitmap outputs",
    ],
    [
      "never with full",
      { sync: "full", bitmap: "b0", "bitmap-mode": "never" },
      "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'",
    ],
    [
      "mode without bitmap",
      { sync: "full", "bitmap-mode": "always" },
      "Cannot specify bitmap sync mode without a bitmap",
    ],
    ["same node", { target: "src" }, "Source and target cannot be the same"],
    ["compress", { compress: true }, "Compression is not supported for this drive "],
    ["max-workers", { "x-perf": { "max-workers": 0 } }, "max-workers must be between 1 and 2147483647"],
    [
      "negative max-chunk",
      { "x-perf": { "max-chunk": -1 } },
      "max-chunk must be zero (which means no limit) or positive",
    ],
    [
      "small max-chunk",
      { "x-perf": { "max-chunk": 4096 } },
      "Required max-chunk (4096) is less than backup cluster size (65536)",
    ],
    ["no job id", {}, "Invalid job ID ''"],
    ["bad job id", { "job-id": "1bad" }, "Invalid job ID '1bad'"],
    ["bad filter name", { "filter-node-name": "#x" }, "Invalid node-name: '#x'"],
  ];
  for (const [name, args, message] of cases) {
    it(name, async () => {
      const e = await env();
      const b0 = await e.src.createBitmap({ name: "b0" });
      await e.guest.write(0, new Uint8Array(1).fill(1));
      const opts = e.base(args);
      if (name === "no job id") delete opts["job-id"];
      const err = await backupApi.backup(e.manager, opts).then(
        () => undefined,
        (x: unknown) => x,
      );
      expect(err).toBeInstanceOf(BlkError);
      expect((err as BlkError).message).toBe(message);
      // nothing left behind: no events, no filter, the bitmap unfrozen and unchanged
      expect(e.events).toEqual([]);
      expect(e.guest.child).toBe(e.src);
      expect(e.src.parents).toEqual([e.guest]);
      expect(b0.busy).toBe(false);
      expect(b0.frozen).toBe(false);
      expect(b0.count()).toBe(C);
      expect(e.src.bitmaps).toEqual([b0]);
    });
  }

  it("size mismatch fails synchronously (transcript §7)", async () => {
    const e = await env({ tgtSize: MiB / 2 });
    const b0 = await e.src.createBitmap({ name: "b0" });
    const err = await backupApi
      .backup(e.manager, e.base({ sync: "incremental", bitmap: "b0" }))
      .catch((x: unknown) => x);
    expect((err as BlkError).message).toBe("Source and target image have different sizes");
    expect(e.events).toEqual([]);
    expect(b0.frozen).toBe(false);
    expect(b0.busy).toBe(false);
    expect(e.src.bitmaps).toEqual([b0]);
  });

  it("a busy bitmap is refused", async () => {
    const e = await env();
    const b0 = await e.src.createBitmap({ name: "b0" });
    b0.busy = true;
    const err = await backupApi
      .backup(e.manager, e.base({ sync: "incremental", bitmap: "b0" }))
      .catch((x: unknown) => x);
    expect((err as BlkError).code).toBe("EBUSY");
    expect((err as BlkError).message).toBe(
      "Bitmap 'b0' is currently in use by another operation and cannot be used",
    );
  });

  it("a negative speed early-fails the created job (created → null)", async () => {
    const e = await env();
    const err = await backupApi.backup(e.manager, e.base({ speed: -1 })).catch((x: unknown) => x);
    expect((err as BlkError).message).toBe("Parameter 'speed' expects a non-negative value");
    expect(compact(e.events)).toEqual(["backup0:created", "backup0:null"]);
    expect(e.guest.child).toBe(e.src);
    expect(e.src.bitmaps).toHaveLength(0);
  });
});

describe("cluster size (spec §3.2)", () => {
  class NoInfo extends MemoryDriver {
    fail: BlkError | undefined;
    protected override async _info(): Promise<BlockDriverInfo> {
      if (this.fail !== undefined) throw this.fail;
      return {};
    }
  }
  const noInfoDriver = (fail?: BlkError): BlockDriver<MemoryDriverOptions> => ({
    format: "x-test-noinfo",
    kind: "protocol",
    async open(o, ctx) {
      const d = new NoInfo(o, ctx.children.get("backing"));
      d.fail = fail;
      return d;
    },
  });

  it("max(64 KiB, target cluster size)", async () => {
    for (const [cs, want] of [
      [4096, C],
      [C, C],
      [MiB, MiB],
    ] as const) {
      const e = await env({ tgt: { clusterSize: cs } });
      const job = await backupApi.createBackupJob(e.manager, e.base());
      expect(job.clusterSize).toBe(want);
      expect(job.copyBitmap.granularity).toBe(want);
      job.cancel();
      await job.outcome;
    }
  });

  it("no cluster size and no backing: 64 KiB with a warning; a failing query fails the job creation", async () => {
    const e = await env();
    await e.graph.open(noInfoDriver(), { size: MiB }, { nodeName: "raw" });
    const warnings: string[] = [];
    const job = await backupApi.backup(e.manager, {
      ...e.base({ target: "raw" }),
      onWarning: (m) => warnings.push(m),
    });
    expect(job.clusterSize).toBe(C);
    expect(warnings).toHaveLength(1);
    expect(await job.outcome).toEqual({ status: "completed" });

    await e.graph.open(noInfoDriver(new BlkError("EIO", "boom")), { size: MiB }, { nodeName: "bad" });
    const err = await backupApi
      .backup(e.manager, e.base({ "job-id": "b2", target: "bad" }))
      .catch((x: unknown) => x);
    expect((err as BlkError).message).toBe(
      "Couldn't determine the cluster size of the target image, which has no backing file",
    );
    expect(e.guest.child).toBe(e.src);

    // with a backing node the failure is tolerated
    const back = await e.graph.open(memoryDriver, { size: MiB }, { nodeName: "back" });
    await e.graph.open(
      noInfoDriver(new BlkError("EIO", "boom")),
      { size: MiB },
      {
        nodeName: "bad2",
        children: { backing: back },
      },
    );
    const j3 = await backupApi.backup(e.manager, e.base({ "job-id": "b3", target: "bad2" }));
    expect(j3.clusterSize).toBe(C);
    expect(await j3.outcome).toEqual({ status: "completed" });
  });
});

describe("sync=top", () => {
  it("copies only what the source node allocates; len is the allocated size", async () => {
    const graph = new BlockGraph();
    const manager = new JobManager();
    const events = record(manager);
    const base = await graph.open(memoryDriver, { size: MiB, data: pattern(MiB) }, { nodeName: "base" });
    const top = await graph.open(
      memoryDriver,
      { size: MiB },
      { nodeName: "top", children: { backing: base } },
    );
    await top.write(2 * C, new Uint8Array(C).fill(2));
    await top.write(5 * C + 10, new Uint8Array(20).fill(5));
    await top.writeZeroes(7 * C, C);
    const tgt = await graph.open(memoryDriver, { size: MiB }, { nodeName: "tgt" });
    const job = await backupApi.backup(manager, {
      graph,
      "job-id": "top0",
      device: "top",
      target: "tgt",
      sync: "top",
    });
    expect(await job.outcome).toEqual({ status: "completed" });
    const done = events.find((ev) => ev.event === "BLOCK_JOB_COMPLETED");
    expect(done?.data).toMatchObject({ len: 3 * C, offset: 3 * C });
    const t = tgt.state as MemoryDriver;
    const want = await (top.state as MemoryDriver).snapshot();
    const got = await t.snapshot();
    for (let i = 0; i < MiB / C; i++) {
      const state = t.clusterState(i * C);
      if (i === 2 || i === 5) {
        expect(state).toBe("data");
        expect(equalBytes(got.subarray(i * C, (i + 1) * C), want.subarray(i * C, (i + 1) * C))).toBe(true);
      } else if (i === 7) {
        expect(state).toBe("zero");
      } else {
        expect(state).toBe("unallocated");
      }
    }
  });
});

describe("error policies (background copy)", () => {
  const failWrites = (mem: MemoryDriver, times: number, code: "EIO" | "ENOSPC" = "EIO"): void => {
    let left = times;
    mem.hook = (req) => {
      if (req.kind === "write" && left > 0) {
        left--;
        throw new BlkError(code, "injected");
      }
    };
  };

  it("on-target-error report: BLOCK_JOB_ERROR, then COMPLETED with the errno text", async () => {
    const e = await env();
    failWrites(e.tgtMem, 1);
    const job = await backupApi.backup(e.manager, e.base());
    const out = await job.outcome;
    expect(out.status).toBe("failed");
    expect(compact(e.events).slice(4)).toEqual([
      "BLOCK_JOB_ERROR:backup0",
      "backup0:aborting",
      "BLOCK_JOB_COMPLETED:backup0",
      "backup0:concluded",
      "backup0:null",
    ]);
    expect(e.events.find((x) => x.event === "BLOCK_JOB_ERROR")?.data).toEqual({
      device: "backup0",
      operation: "write",
      action: "report",
    });
    expect(e.events.find((x) => x.event === "BLOCK_JOB_COMPLETED")?.data).toMatchObject({
      error: "Input/output error",
    });
    expect(e.guest.child).toBe(e.src);
  });

  it("on-source-error applies to read errors (operation read)", async () => {
    const e = await env();
    let left = 1;
    e.srcMem.hook = (req) => {
      if (req.kind === "read" && left-- > 0) throw new BlkError("EIO", "injected");
    };
    const job = await backupApi.backup(e.manager, e.base({ "on-source-error": "ignore" }));
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(e.events.filter((x) => x.event === "BLOCK_JOB_ERROR").map((x) => x.data)).toEqual([
      { device: "backup0", operation: "read", action: "ignore" },
    ]);
    expect(equalBytes(await e.tgtMem.snapshot(), await e.srcMem.snapshot())).toBe(true);
  });

  it("on-target-error enospc: stop with io-status nospace, resume retries", async () => {
    const e = await env();
    failWrites(e.tgtMem, 1, "ENOSPC");
    const job = await backupApi.backup(e.manager, e.base({ "on-target-error": "enospc" }));
    expect(await job.whenStatus("paused")).toBe(true);
    await settle();
    expect(compact(e.events).slice(4)).toEqual(["BLOCK_JOB_ERROR:backup0", "backup0:paused"]);
    expect(e.manager.queryBlockJobs()[0]).toMatchObject({ "io-status": "nospace", paused: true });
    e.manager.jobResume({ id: "backup0" });
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(compact(e.events).slice(6, 7)).toEqual(["backup0:running"]);
    expect(equalBytes(await e.tgtMem.snapshot(), await e.srcMem.snapshot())).toBe(true);
    const done = e.events.find((x) => x.event === "BLOCK_JOB_COMPLETED");
    expect(done?.data).toEqual({ device: "backup0", len: MiB, offset: MiB, speed: 0, type: "backup" });
  });

  it("ignore: a new pass at once, the failed clusters are copied again", async () => {
    const e = await env();
    failWrites(e.tgtMem, 3);
    const job = await backupApi.backup(e.manager, e.base({ "on-target-error": "ignore" }));
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(e.events.filter((x) => x.event === "BLOCK_JOB_ERROR")).toHaveLength(3);
    expect(equalBytes(await e.tgtMem.snapshot(), await e.srcMem.snapshot())).toBe(true);
  });

  it("without a buffer (QEMU's behaviour): a failed copy before a guest write fails the guest write, not the job", async () => {
    const e = await env();
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    e.tgtMem.hook = async (req) => {
      if (req.kind === "write" && req.offset === 10 * C) throw new BlkError("EIO", "injected");
      if (req.kind === "write") await gate;
    };
    const job = await backupApi.backup(
      e.manager,
      e.base({ "x-perf": { "max-workers": 1, "max-chunk": C }, "x-blk-cbw-buffer-size": 0 }),
    );
    await settle();
    const err = await e.guest.write(10 * C, new Uint8Array(4).fill(9)).catch((x: unknown) => x);
    expect((err as BlkError).code).toBe("EIO");
    expect((await e.srcMem.snapshot())[10 * C]).not.toBe(9);
    e.tgtMem.hook = undefined;
    release();
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(e.events.some((x) => x.event === "BLOCK_JOB_ERROR")).toBe(false);
    expect(equalBytes(await e.tgtMem.snapshot(), await e.srcMem.snapshot())).toBe(true);
  });
});

describe("copy-before-write filter on its own", () => {
  const open = async (
    e: Env,
    options: backupApi.CopyBeforeWriteOptions = {},
  ): Promise<{ filter: BlockNode; state: backupApi.CopyBeforeWriteState }> => {
    const filter = await e.graph.openFilterAbove(backupApi.copyBeforeWriteDriver, options, e.src, {
      nodeName: "cbw",
      extraChildren: { target: { node: e.tgt, role: CHILD_ROLE.DATA } },
    });
    return { filter, state: filter.state as backupApi.CopyBeforeWriteState };
  };

  it("copies each touched cluster once, skips write-unchanged requests, reads pass through", async () => {
    const e = await env();
    const before = await e.srcMem.snapshot();
    const { filter, state } = await open(e);
    expect(e.guest.child).toBe(filter);
    expect(state.copyBitmap.count()).toBe(MiB);
    expect(e.src.bitmaps).toEqual([state.copyBitmap]);
    // the source may no longer be written around the filter
    expect(() => e.graph.attach(backendParent("other"), e.src, { name: "root", perm: PERM.WRITE })).toThrow(
      /Permission conflict/,
    );

    await Promise.all([
      e.guest.write(3 * C + 5, new Uint8Array(10).fill(1)),
      e.guest.write(3 * C + 500, new Uint8Array(10).fill(2)),
      e.guest.writeZeroes(4 * C - 10, 20),
    ]);
    expect(e.tgtMem.counters.writes).toBe(2); // clusters 3 and 4, once each
    const tgt = await e.tgtMem.snapshot();
    expect(equalBytes(tgt.subarray(3 * C, 5 * C), before.subarray(3 * C, 5 * C))).toBe(true);
    expect(state.copyBitmap.count()).toBe(MiB - 2 * C);
    expect((await e.guest.read(3 * C + 5, 1))[0]).toBe(1);

    const unchanged = graphEdge(e, PERM.WRITE_UNCHANGED);
    await unchanged.write(9 * C, (await e.guest.read(9 * C, 16)).slice(), { writeUnchanged: true });
    expect(state.copyBitmap.get(9 * C)).toBe(true);

    await e.graph.removeFilter(filter);
    expect(e.guest.child).toBe(e.src);
    expect(e.src.bitmaps).toHaveLength(0);
  });

  it("break-snapshot: a failed copy lets the guest write through and stops copying", async () => {
    const e = await env();
    e.tgtMem.hook = () => {
      throw new BlkError("EIO", "injected");
    };
    const { state } = await open(e, { onCbwError: "break-snapshot" });
    await e.guest.write(0, new Uint8Array(4).fill(1));
    expect(state.snapshotError?.code).toBe("EIO");
    expect((await e.srcMem.snapshot())[0]).toBe(1);
    e.tgtMem.hook = undefined;
    await e.guest.write(5 * C, new Uint8Array(4).fill(1));
    expect(e.tgtMem.counters.writes).toBe(0);
  });

  it("break-guest-write (default): the guest write fails and the cluster stays to copy", async () => {
    const e = await env();
    e.tgtMem.hook = () => {
      throw new BlkError("EIO", "injected");
    };
    const { state } = await open(e);
    const err = await e.guest.write(0, new Uint8Array(4).fill(1)).catch((x: unknown) => x);
    expect((err as BlkError).code).toBe("EIO");
    expect(state.copyBitmap.get(0)).toBe(true);
    expect((await e.srcMem.snapshot())[0]).not.toBe(1);
  });
});

/** A second external parent on the guest's node holding `perm`. */
function graphEdge(e: Env, perm: number): Edge {
  return e.graph.attach(backendParent("helper"), e.guest.child, { name: "root", perm });
}
