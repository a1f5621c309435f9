/**
 * The mirror job against the memory driver with a simulated guest writing through the source's parent:
 * the target equals the model at complete, soft cancel leaves a past state, cancel before READY leaves the
 * source alone, sync modes, write-blocking mode (spec/jobs.md §2).
 */
import { BlockGraph, backendParent, type MemoryDriver, memoryDriver, PERM, PERM_ALL } from "@blk/core";
import { describe, expect, it } from "vitest";
import { mirror } from "../src/index.ts";
import { compact, settle } from "./helpers.ts";
import { guestWriter, KiB, MiB, mirrorEnv, pump, rng, sha, until } from "./mirror-helpers.ts";

const ROUNDS = Number(process.env.BLK_MIRROR_ROUNDS ?? 3);

describe("mirror sync=full with a guest writing", () => {
  for (let round = 0; round < ROUNDS; round++) {
    it(`round ${round}: converges; complete switches every parent of the source to the target`, async () => {
      const env = await mirrorEnv({ size: 2 * MiB, seed: 3 + round });
      const job = await mirror(env.manager, env.graph, {
        "job-id": "m0",
        device: "src",
        target: "dst",
        sync: "full",
        granularity: 4096,
        "buf-size": 128 * KiB,
      });
      const g = guestWriter(env, { seed: 11 + round, writes: 80 });
      await pump(env.clock, () => job.status === "ready");
      const atReady = g.count();
      await until(() => g.count() >= atReady + 10 || g.count() === 80);
      job.complete();
      await g.done;
      expect(await job.outcome).toEqual({ status: "completed" });
      expect(atReady).toBeGreaterThan(0);
      expect(atReady).toBeLessThan(80);
      expect(job.switched).toBe(true);
      expect(env.guest.child).toBe(env.dst);
      expect(sha(await env.mem(env.dst).snapshot())).toBe(sha(env.model));
      expect(compact(env.events)).toEqual([
        "m0:created",
        "m0:running",
        "m0:ready",
        "BLOCK_JOB_READY:m0",
        "m0:waiting",
        "m0:pending",
        "BLOCK_JOB_COMPLETED:m0",
        "m0:concluded",
        "m0:null",
      ]);
      // mirror_top is gone, the old source is left without parents (monitor-owned, not deleted)
      expect(
        env.graph
          .list()
          .map((n) => n.nodeName)
          .sort(),
      ).toEqual(["dst", "src"]);
      expect(env.src.parents).toEqual([]);
      expect(env.dst.parents.map((e) => e.name)).toEqual(["root"]);
      expect(env.src.bitmaps).toEqual([]);
    });
  }

  for (let round = 0; round < ROUNDS; round++)
    it(`round ${round}: soft cancel after READY: no switch, the target equals a past state of the source`, async () => {
      const env = await mirrorEnv({ size: 2 * MiB, seed: 5 + round });
      const states = new Set<string>([sha(env.model)]);
      const job = await mirror(env.manager, env.graph, {
        "job-id": "m1",
        device: "src",
        target: "dst",
        sync: "full",
        granularity: 8192,
        "buf-size": 256 * KiB,
      });
      const g = guestWriter(env, { seed: 21 + round, writes: 80, states });
      await pump(env.clock, () => job.status === "ready");
      job.cancel();
      const outcome = await job.outcome;
      await g.done;
      expect(outcome).toEqual({ status: "cancelled", consistent: true });
      expect(job.switched).toBe(false);
      expect(env.guest.child).toBe(env.src);
      expect(sha(await env.mem(env.src).snapshot())).toBe(sha(env.model));
      const target = sha(await env.mem(env.dst).snapshot());
      expect(states.has(target)).toBe(true);
      expect(compact(env.events).slice(-5)).toEqual([
        "m1:waiting",
        "m1:pending",
        "BLOCK_JOB_COMPLETED:m1",
        "m1:concluded",
        "m1:null",
      ]);
      expect(env.graph.find("#block") ?? env.graph.list().length).toBe(2);
    });

  it("cancel before READY (no force) is forced: CANCELLED, source untouched, graph restored", async () => {
    const env = await mirrorEnv({ size: 4 * MiB, seed: 9 });
    const job = await mirror(env.manager, env.graph, {
      "job-id": "m3",
      device: "src",
      target: "dst",
      sync: "full",
      speed: MiB,
      "buf-size": 256 * KiB,
      "filter-node-name": "mtop",
    });
    expect(env.guest.child.nodeName).toBe("mtop");
    const g = guestWriter(env, { seed: 5, writes: 20 });
    await env.clock.advance(300_000_000);
    await g.done;
    expect(job.status).toBe("running");
    env.manager.blockJobCancel({ device: "m3" });
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(compact(env.events)).toEqual([
      "m3:created",
      "m3:running",
      "m3:aborting",
      "BLOCK_JOB_CANCELLED:m3",
      "m3:concluded",
      "m3:null",
    ]);
    expect(sha(await env.mem(env.src).snapshot())).toBe(sha(env.model));
    expect(env.guest.child).toBe(env.src);
    expect(env.graph.find("mtop")).toBeUndefined();
    expect(env.src.parents.map((e) => e.name)).toEqual(["root"]);
    expect(env.dst.parents).toEqual([]);
    // the source never saw a request from the job other than reads
    expect(env.mem(env.src).counters.writes).toBe(20 - env.mem(env.src).counters.writeZeroes);
  });

  it("force cancel in READY: CANCELLED, no switch", async () => {
    const env = await mirrorEnv({ size: MiB, seed: 2 });
    const job = await mirror(env.manager, env.graph, {
      "job-id": "m2",
      device: "src",
      target: "dst",
      sync: "full",
    });
    await pump(env.clock, () => job.status === "ready");
    env.manager.blockJobCancel({ device: "m2", force: true });
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(compact(env.events).slice(-4)).toEqual([
      "m2:aborting",
      "BLOCK_JOB_CANCELLED:m2",
      "m2:concluded",
      "m2:null",
    ]);
    expect(env.guest.child).toBe(env.src);
  });
});

describe("sync modes", () => {
  it("sync=none: READY before mirror() resolves, len 0; only new writes are copied", async () => {
    const env = await mirrorEnv({ size: MiB, seed: 4 });
    const job = await mirror(env.manager, env.graph, {
      "job-id": "mt3",
      device: "src",
      target: "dst",
      sync: "none",
    });
    expect(env.events.slice(2)).toEqual([
      { event: "JOB_STATUS_CHANGE", data: { status: "ready", id: "mt3" } },
      { event: "BLOCK_JOB_READY", data: { device: "mt3", len: 0, offset: 0, speed: 0, type: "mirror" } },
    ]);
    const written = new Uint8Array(env.model.length);
    const g = guestWriter(env, { seed: 8, writes: 30, onWrite: (o, n) => written.fill(1, o, o + n) });
    await g.done;
    await pump(env.clock, () => job.dirtyBitmap.count() === 0 && job.opsInFlight === 0, 20);
    job.complete();
    expect(await job.outcome).toEqual({ status: "completed" });
    // written bytes are the guest's; the rest of a written granule is the source's; the rest stays zero
    const dst = await env.mem(env.dst).snapshot();
    const g64 = job.granularity;
    let bad = 0;
    for (let gs = 0; gs < dst.length; gs += g64) {
      const touched = written.subarray(gs, gs + g64).includes(1);
      const want = touched ? env.model.subarray(gs, gs + g64) : new Uint8Array(g64);
      if (sha(dst.subarray(gs, gs + g64)) !== sha(want)) bad++;
    }
    expect(bad).toBe(0);
    expect(written.includes(0)).toBe(true);
    expect(env.guest.child).toBe(env.dst);
  });

  it("sync=top copies what the source itself allocates; the target shares the backing", async () => {
    const graph = new BlockGraph({ random: rng(1) });
    const { setup } = await import("./helpers.ts");
    const { manager, clock, events } = setup();
    const size = MiB;
    const baseData = new Uint8Array(size).fill(0xaa);
    const base = await graph.open(memoryDriver, { size, data: baseData }, { nodeName: "base" });
    const top = await graph.open(memoryDriver, { size }, { nodeName: "top", children: { backing: base } });
    await top.write(128 * KiB, new Uint8Array(64 * KiB).fill(0xdd));
    await top.write(512 * KiB, new Uint8Array(128 * KiB).fill(0xee));
    const dst = await graph.open(memoryDriver, { size }, { nodeName: "dst", children: { backing: base } });
    const guest = graph.attach(backendParent(), top, {
      name: "root",
      perm: PERM.WRITE | PERM.CONSISTENT_READ,
    });
    const job = await mirror(manager, graph, { "job-id": "t", device: "top", target: "dst", sync: "top" });
    await pump(clock, () => job.status === "ready");
    const ready = events.find((e) => e.event === "BLOCK_JOB_READY");
    expect(ready?.data).toEqual({ device: "t", len: 192 * KiB, offset: 192 * KiB, speed: 0, type: "mirror" });
    job.complete();
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(guest.child).toBe(dst);
    const want = await (top.state as MemoryDriver).snapshot();
    expect(sha(await (dst.state as MemoryDriver).snapshot())).toBe(sha(want));
    // only top's clusters were written to the target; the rest still comes from base
    expect((dst.state as MemoryDriver).dataClusters).toBe(3);
    void PERM_ALL;
  });

  it("full with a discard=unmap target: pre-zeroed, len counts allocated data only (transcript §3)", async () => {
    const env = await mirrorEnv({ size: 4 * MiB, seed: 6, dstDiscard: "unmap" });
    await env.dst.write(0, new Uint8Array(4 * MiB).fill(0x55)); // stale content that must disappear
    const allocated = env.mem(env.src).dataClusters * 64 * KiB;
    const job = await mirror(env.manager, env.graph, {
      "job-id": "mt2",
      device: "src",
      target: "dst",
      sync: "full",
    });
    await pump(env.clock, () => job.status === "ready");
    expect(job.progress).toEqual({ current: allocated, total: allocated });
    job.cancel();
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: true });
    expect(sha(await env.mem(env.dst).snapshot())).toBe(sha(env.model));
  });
});

describe("copy-mode write-blocking", () => {
  it("guest writes after READY reach the target before they complete; complete converges", async () => {
    const env = await mirrorEnv({ size: 2 * MiB, seed: 12 });
    const job = await mirror(env.manager, env.graph, {
      "job-id": "mt4",
      device: "src",
      target: "dst",
      sync: "full",
      granularity: 65536,
      "buf-size": MiB,
      "copy-mode": "write-blocking",
      "filter-node-name": "mtop",
    });
    const g = guestWriter(env, { seed: 3, writes: 40 });
    await pump(env.clock, () => job.status === "ready");
    await g.done;
    await settle();
    expect(job.activelySynced).toBe(true);
    // the job sleeps (manual clock): what the guest writes now is on the target when the write returns
    const data = new Uint8Array(3000).fill(0x77);
    await env.guest.write(12345, data);
    env.model.set(data, 12345);
    expect(await env.dst.read(12345, 3000)).toEqual(data);
    const before = job.progress.current;
    expect(before).toBeGreaterThanOrEqual(2 * MiB + 3000);
    job.complete();
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(sha(await env.mem(env.dst).snapshot())).toBe(sha(env.model));
  });

  for (let round = 0; round < ROUNDS; round++)
    it(`round ${round}: converges while the guest keeps writing`, async () => {
      const env = await mirrorEnv({ size: MiB, seed: 13 + round });
      const job = await mirror(env.manager, env.graph, {
        "job-id": "wb",
        device: "src",
        target: "dst",
        sync: "full",
        granularity: 4096,
        "copy-mode": "write-blocking",
      });
      const g = guestWriter(env, { seed: 9 + round, writes: 150, maxLen: 20 * KiB });
      await pump(env.clock, () => job.status === "ready");
      job.complete();
      expect(await job.outcome).toEqual({ status: "completed" });
      await g.done;
      expect(sha(await env.mem(env.dst).snapshot())).toBe(sha(env.model));
    });
});

describe("manual finalize", () => {
  it("auto-finalize false: PENDING with BLOCK_JOB_PENDING, guest writes held until job-finalize", async () => {
    const env = await mirrorEnv({ size: MiB, seed: 1 });
    const job = await mirror(env.manager, env.graph, {
      "job-id": "mf",
      device: "src",
      target: "dst",
      sync: "full",
      "auto-finalize": false,
      "auto-dismiss": false,
    });
    await pump(env.clock, () => job.status === "ready");
    job.complete();
    await until(() => job.status === "pending");
    let landed = false;
    const write = env.guest.write(0, new Uint8Array(512).fill(9)).then(() => {
      landed = true;
    });
    await settle();
    expect(landed).toBe(false);
    await env.manager.jobFinalize({ id: "mf" });
    await write;
    expect(await env.dst.read(0, 512)).toEqual(new Uint8Array(512).fill(9));
    expect(env.guest.child).toBe(env.dst);
    env.manager.jobDismiss({ id: "mf" });
    expect(compact(env.events).slice(4)).toEqual([
      "mf:waiting",
      "mf:pending",
      "BLOCK_JOB_PENDING:mf",
      "BLOCK_JOB_COMPLETED:mf",
      "mf:concluded",
      "mf:null",
    ]);
  });
});

describe("README", () => {
  it("mirror example", async () => {
    const { BlockGraph: Graph } = await import("@blk/core");
    const { JobManager } = await import("../src/index.ts");
    const graph = new Graph();
    const src = await graph.open(memoryDriver, { size: 1 << 20 }, { nodeName: "src" });
    await graph.open(memoryDriver, { size: 1 << 20 }, { nodeName: "dst" });
    const disk = graph.attach(backendParent("vda"), src, {
      name: "root",
      perm: PERM.WRITE | PERM.CONSISTENT_READ,
    });
    const manager = new JobManager();
    const job = await mirror(manager, graph, { "job-id": "m0", device: "src", target: "dst", sync: "full" });
    if (await job.whenStatus("ready")) job.complete();
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(disk.child.nodeName).toBe("dst");
  });
});
