/**
 * The mirror job as `blockdev-mirror` sees it: QEMU 7.2's event sequences and data (transcripts §1, §2,
 * §5, §7), argument errors, error policies on a failing target, the speed limit on the injected clock,
 * node holding (job edges, busy nodes, drains).
 */
import { BlockGraph, backendParent, memoryDriver, PERM } from "@blk/core";
import { describe, expect, it } from "vitest";
import { checkNodeNotBusy, drainedSection, isJobError, type JobEvent, mirror } from "../src/index.ts";
import { compact, settle, setup, thrown } from "./helpers.ts";
import { failNthWrite, KiB, MiB, mirrorEnv, pump, rng, sha, until } from "./mirror-helpers.ts";

const statusOnly = (events: JobEvent[]): JobEvent[] => events.filter((e) => e.event !== "JOB_STATUS_CHANGE");

/** The §1 images: 64 MiB, 0x11 over [0, 8M), 0x22 over [32M, 36M). */
async function transcriptEnv(): Promise<Awaited<ReturnType<typeof mirrorEnv>>> {
  const env = await mirrorEnv({ size: 64 * MiB, seed: 1 });
  return env;
}

describe("transcript §1: blockdev-mirror sync=full, READY, block-job-complete", () => {
  it("speed 4 MiB/s: offset 16 MiB, complete refused in running, set-speed 0, READY, complete", async () => {
    const { manager, events, clock } = setup();
    const graph = new BlockGraph();
    const data = new Uint8Array(64 * MiB);
    data.fill(0x11, 0, 8 * MiB);
    data.fill(0x22, 32 * MiB, 36 * MiB);
    await graph.open(memoryDriver, { size: 64 * MiB, data }, { nodeName: "src" });
    const dst = await graph.open(memoryDriver, { size: 64 * MiB }, { nodeName: "dst" });
    const job = await mirror(manager, graph, {
      "job-id": "mirror0",
      device: "src",
      target: "dst",
      sync: "full",
      speed: 4194304,
    });
    expect(compact(events)).toEqual(["mirror0:created", "mirror0:running"]);
    await until(() => job.progress.current === 16 * MiB && !job.busy);
    expect(manager.queryBlockJobs()).toEqual([
      {
        "auto-finalize": true,
        "io-status": "ok",
        device: "mirror0",
        "auto-dismiss": true,
        busy: false,
        len: 67108864,
        offset: 16777216,
        status: "running",
        paused: false,
        speed: 4194304,
        ready: false,
        type: "mirror",
      },
    ]);
    const e = thrown(() => manager.blockJobComplete({ device: "mirror0" }));
    expect((e as Error).message).toBe(
      "Job 'mirror0' in state 'running' cannot accept command verb 'complete'",
    );
    manager.blockJobSetSpeed({ device: "mirror0", speed: 0 });
    await until(() => job.status === "ready");
    expect(events.slice(2)).toEqual([
      { event: "JOB_STATUS_CHANGE", data: { status: "ready", id: "mirror0" } },
      {
        event: "BLOCK_JOB_READY",
        data: { device: "mirror0", len: 67108864, offset: 67108864, speed: 0, type: "mirror" },
      },
    ]);
    expect(manager.queryJobs()).toEqual([
      {
        "current-progress": 67108864,
        status: "ready",
        "total-progress": 67108864,
        type: "mirror",
        id: "mirror0",
      },
    ]);
    manager.blockJobComplete({ device: "mirror0" });
    await job.outcome;
    expect(events.slice(4)).toEqual([
      { event: "JOB_STATUS_CHANGE", data: { status: "waiting", id: "mirror0" } },
      { event: "JOB_STATUS_CHANGE", data: { status: "pending", id: "mirror0" } },
      {
        event: "BLOCK_JOB_COMPLETED",
        data: { device: "mirror0", len: 67108864, offset: 67108864, speed: 0, type: "mirror" },
      },
      { event: "JOB_STATUS_CHANGE", data: { status: "concluded", id: "mirror0" } },
      { event: "JOB_STATUS_CHANGE", data: { status: "null", id: "mirror0" } },
    ]);
    expect(sha(await dst.read(0, 64 * MiB))).toBe(sha(data));
    void clock;
  });
});

describe("transcript §2/§5: cancel variants, pause, complete in standby", () => {
  it("soft cancel while READY: BLOCK_JOB_COMPLETED, no aborting", async () => {
    const env = await transcriptEnv();
    const job = await mirror(env.manager, env.graph, {
      "job-id": "m1",
      device: "src",
      target: "dst",
      sync: "full",
    });
    await pump(env.clock, () => job.status === "ready");
    env.manager.blockJobCancel({ device: "m1" });
    await job.outcome;
    const full = { device: "m1", len: 67108864, offset: 67108864, speed: 0, type: "mirror" };
    expect(statusOnly(env.events)).toEqual([
      { event: "BLOCK_JOB_READY", data: full },
      { event: "BLOCK_JOB_COMPLETED", data: full },
    ]);
    expect(compact(env.events)).toEqual([
      "m1:created",
      "m1:running",
      "m1:ready",
      "BLOCK_JOB_READY:m1",
      "m1:waiting",
      "m1:pending",
      "BLOCK_JOB_COMPLETED:m1",
      "m1:concluded",
      "m1:null",
    ]);
  });

  it("job-cancel on a READY mirror is forced: aborting, BLOCK_JOB_CANCELLED", async () => {
    const env = await mirrorEnv({ size: 8 * MiB });
    const job = await mirror(env.manager, env.graph, {
      "job-id": "m",
      device: "src",
      target: "dst",
      sync: "full",
    });
    await pump(env.clock, () => job.status === "ready");
    env.manager.jobCancel({ id: "m" });
    await job.outcome;
    expect(compact(env.events).slice(4)).toEqual([
      "m:aborting",
      "BLOCK_JOB_CANCELLED:m",
      "m:concluded",
      "m:null",
    ]);
    expect(statusOnly(env.events)[1]).toEqual({
      event: "BLOCK_JOB_CANCELLED",
      data: { device: "m", len: 8 * MiB, offset: 8 * MiB, speed: 0, type: "mirror" },
    });
  });

  it("cancel while RUNNING at 1 MiB/s: CANCELLED with offset 16 MiB", async () => {
    const env = await transcriptEnv();
    const job = await mirror(env.manager, env.graph, {
      "job-id": "m3",
      device: "src",
      target: "dst",
      sync: "full",
      speed: 1048576,
    });
    await until(() => job.progress.current === 16 * MiB && !job.busy);
    env.manager.blockJobCancel({ device: "m3" });
    await job.outcome;
    expect(env.events.slice(2)).toEqual([
      { event: "JOB_STATUS_CHANGE", data: { status: "aborting", id: "m3" } },
      {
        event: "BLOCK_JOB_CANCELLED",
        data: { device: "m3", len: 67108864, offset: 16777216, speed: 1048576, type: "mirror" },
      },
      { event: "JOB_STATUS_CHANGE", data: { status: "concluded", id: "m3" } },
      { event: "JOB_STATUS_CHANGE", data: { status: "null", id: "m3" } },
    ]);
  });

  it("job-pause in READY → standby; soft cancel refused; job-complete in standby acts after job-resume", async () => {
    const env = await mirrorEnv({ size: 4 * MiB });
    const job = await mirror(env.manager, env.graph, {
      "job-id": "m4",
      device: "src",
      target: "dst",
      sync: "full",
    });
    await pump(env.clock, () => job.status === "ready");
    env.manager.jobPause({ id: "m4" });
    await settle();
    expect(job.status).toBe("standby");
    expect(thrown(() => env.manager.jobPause({ id: "m4" }))).toHaveProperty(
      "message",
      "Job is already paused",
    );
    expect(thrown(() => env.manager.blockJobCancel({ device: "m4" }))).toHaveProperty(
      "message",
      "The block job for device 'm4' is currently paused",
    );
    env.manager.jobComplete({ id: "m4" });
    await env.clock.advance(300_000_000);
    expect(job.status).toBe("standby");
    env.manager.jobResume({ id: "m4" });
    await job.outcome;
    expect(compact(env.events).slice(4)).toEqual([
      "m4:standby",
      "m4:ready",
      "m4:waiting",
      "m4:pending",
      "BLOCK_JOB_COMPLETED:m4",
      "m4:concluded",
      "m4:null",
    ]);
    expect(env.guest.child).toBe(env.dst);
  });

  it("a filter node as device: its parents move to the target (transcript §5)", async () => {
    const env = await mirrorEnv({ size: MiB });
    const { filterDriver } = await import("@blk/core");
    env.guest.detach();
    const ta = await env.graph.openFilterAbove(filterDriver("throttle"), {}, env.src, { nodeName: "ta" });
    const guest = env.graph.attach(backendParent(), ta, {
      name: "root",
      perm: PERM.WRITE | PERM.CONSISTENT_READ,
    });
    const e = await mirror(env.manager, env.graph, {
      "job-id": "m2",
      device: "src",
      target: "dst",
      sync: "full",
    }).catch((x: unknown) => x);
    expect(e).toHaveProperty("message", "Need a root block node");
    const job = await mirror(env.manager, env.graph, {
      "job-id": "m2",
      device: "ta",
      target: "dst",
      sync: "full",
    });
    await pump(env.clock, () => job.status === "ready");
    job.complete();
    await job.outcome;
    expect(guest.child).toBe(env.dst);
    expect(env.graph.find("ta")?.parents).toEqual([]);
  });
});

describe("replaces", () => {
  it("device is a filter, replaces the node below it: the filter ends up on the target", async () => {
    const env = await mirrorEnv({ size: MiB, seed: 3 });
    const { filterDriver } = await import("@blk/core");
    env.guest.detach();
    const ta = await env.graph.openFilterAbove(filterDriver("throttle"), {}, env.src, { nodeName: "ta" });
    const guest = env.graph.attach(backendParent(), ta, {
      name: "root",
      perm: PERM.WRITE | PERM.CONSISTENT_READ,
    });
    const bad = await mirror(env.manager, env.graph, {
      "job-id": "r",
      device: "ta",
      target: "dst",
      sync: "full",
      replaces: "nosuch",
    }).catch((x: unknown) => x);
    expect(bad).toHaveProperty("message", "Failed to find node with node-name='nosuch'");
    const job = await mirror(env.manager, env.graph, {
      "job-id": "r",
      device: "ta",
      target: "dst",
      sync: "full",
      replaces: "src",
    });
    await pump(env.clock, () => job.status === "ready");
    job.complete();
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(guest.child).toBe(ta);
    expect(ta.filtered).toBe(env.dst);
    expect(env.src.parents).toEqual([]);
  });

  it("refuses a replaced node of another size", async () => {
    const env = await mirrorEnv({ size: MiB });
    await env.graph.open(memoryDriver, { size: 2 * MiB }, { nodeName: "other" });
    const e = await mirror(env.manager, env.graph, {
      "job-id": "r",
      device: "src",
      target: "dst",
      sync: "full",
      replaces: "other",
    }).catch((x: unknown) => x);
    expect(e).toHaveProperty("message", "cannot replace image with a mirror image of different size");
  });
});

describe("transcript §7 and argument errors", () => {
  it("size mismatch fails asynchronously: aborting, COMPLETED with error, len 0", async () => {
    const env = await mirrorEnv({ size: 2 * MiB, dstSize: MiB });
    const job = await mirror(env.manager, env.graph, {
      "job-id": "mm",
      device: "src",
      target: "dst",
      sync: "full",
    });
    const outcome = await job.outcome;
    expect(outcome.status).toBe("failed");
    expect(env.events).toEqual([
      { event: "JOB_STATUS_CHANGE", data: { status: "created", id: "mm" } },
      { event: "JOB_STATUS_CHANGE", data: { status: "running", id: "mm" } },
      { event: "JOB_STATUS_CHANGE", data: { status: "aborting", id: "mm" } },
      {
        event: "BLOCK_JOB_COMPLETED",
        data: {
          device: "mm",
          len: 0,
          offset: 0,
          speed: 0,
          type: "mirror",
          error: "Source and target image have different sizes",
        },
      },
      { event: "JOB_STATUS_CHANGE", data: { status: "concluded", id: "mm" } },
      { event: "JOB_STATUS_CHANGE", data: { status: "null", id: "mm" } },
    ]);
    expect(env.guest.child).toBe(env.src);
    expect(env.graph.list()).toHaveLength(2);
  });

  it("refuses bad arguments with QEMU's messages and leaves the graph alone", async () => {
    const env = await mirrorEnv({ size: MiB });
    const base = { "job-id": "bad", device: "src", target: "dst", sync: "full" } as const;
    const cases: [Parameters<typeof mirror>[2], string][] = [
      [{ ...base, granularity: 1000 }, "Parameter 'granularity' expects a power of 2"],
      [{ ...base, granularity: 256 }, "Parameter 'granularity' expects a value in range [512B, 64MB]"],
      [{ ...base, "buf-size": -1 }, "Invalid parameter 'buf-size'"],
      [{ ...base, sync: "incremental" }, "Sync mode 'incremental' not supported"],
      [{ ...base, target: "src" }, "Can't mirror node into itself"],
      [{ ...base, "job-id": "1bad" }, "Invalid job ID '1bad'"],
      [{ device: "src", target: "dst", sync: "full", speed: -1 }, "Invalid job ID ''"],
      [{ ...base, device: "nosuch" }, "Cannot find device='nosuch' nor node-name='nosuch'"],
      [{ ...base, "filter-node-name": "1x" }, "Invalid node-name: '1x'"],
      [{ ...base, "filter-node-name": "dst" }, "Duplicate nodes with node-name='dst'"],
    ];
    for (const [args, message] of cases) {
      const e = await mirror(env.manager, env.graph, args).catch((x: unknown) => x);
      expect(e, message).toHaveProperty("message", message);
      expect(env.graph.list()).toHaveLength(2);
      expect(env.guest.child).toBe(env.src);
    }
    // negative speed: QEMU creates the job, then destroys it (created, null)
    const e = await mirror(env.manager, env.graph, { ...base, speed: -1 }).catch((x: unknown) => x);
    expect(e).toHaveProperty("message", "Parameter 'speed' expects a non-negative value");
    expect(compact(env.events)).toEqual(["bad:created", "bad:null"]);
    expect(env.graph.list()).toHaveLength(2);
    expect(env.manager.queryJobs()).toEqual([]);
  });
});

describe("error policies on a failing target", () => {
  it("on-target-error=stop: BLOCK_JOB_ERROR, paused, io-status failed; resume → READY; target correct", async () => {
    const env = await mirrorEnv({ size: 8 * MiB, seed: 4 });
    failNthWrite(env.mem(env.dst), 3);
    const job = await mirror(env.manager, env.graph, {
      "job-id": "m5",
      device: "src",
      target: "dst",
      sync: "full",
      "on-target-error": "stop",
    });
    await until(() => job.status === "paused");
    expect(statusOnly(env.events)).toEqual([
      { event: "BLOCK_JOB_ERROR", data: { device: "m5", operation: "write", action: "stop" } },
    ]);
    expect(compact(env.events)).toEqual(["m5:created", "m5:running", "BLOCK_JOB_ERROR:m5", "m5:paused"]);
    const info = env.manager.queryBlockJobs()[0];
    expect(info).toMatchObject({ "io-status": "failed", paused: true, status: "paused", ready: false });
    expect(info?.offset).toBeLessThan(8 * MiB);
    expect(job.opsInFlight).toBe(0);
    env.manager.blockJobResume({ device: "m5" });
    expect(env.manager.queryBlockJobs()[0]?.["io-status"]).toBe("ok");
    await pump(env.clock, () => job.status === "ready");
    expect(compact(env.events).slice(4)).toEqual(["m5:running", "m5:ready", "BLOCK_JOB_READY:m5"]);
    job.complete();
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(sha(await env.mem(env.dst).snapshot())).toBe(sha(env.model));
  });

  it("on-target-error=report (default): the job fails with Input/output error", async () => {
    const env = await mirrorEnv({ size: 8 * MiB, seed: 4 });
    failNthWrite(env.mem(env.dst), 2);
    const job = await mirror(env.manager, env.graph, {
      "job-id": "m7",
      device: "src",
      target: "dst",
      sync: "full",
    });
    const outcome = await job.outcome;
    expect(outcome.status).toBe("failed");
    const done = statusOnly(env.events);
    expect(done[0]).toEqual({
      event: "BLOCK_JOB_ERROR",
      data: { device: "m7", operation: "write", action: "report" },
    });
    expect(done[1]).toMatchObject({
      event: "BLOCK_JOB_COMPLETED",
      data: { device: "m7", len: 8 * MiB, type: "mirror", error: "Input/output error" },
    });
    expect(compact(env.events).slice(2)).toEqual([
      "BLOCK_JOB_ERROR:m7",
      "m7:aborting",
      "BLOCK_JOB_COMPLETED:m7",
      "m7:concluded",
      "m7:null",
    ]);
    expect(env.guest.child).toBe(env.src);
  });

  it("on-target-error=enospc: ENOSPC stops with io-status nospace; force cancel ends it", async () => {
    const env = await mirrorEnv({ size: 4 * MiB, seed: 4 });
    failNthWrite(env.mem(env.dst), 2, "ENOSPC");
    const job = await mirror(env.manager, env.graph, {
      "job-id": "m6",
      device: "src",
      target: "dst",
      sync: "full",
      "on-target-error": "enospc",
    });
    await until(() => job.status === "paused");
    expect(env.manager.queryBlockJobs()[0]?.["io-status"]).toBe("nospace");
    env.manager.blockJobCancel({ device: "m6", force: true });
    await job.outcome;
    expect(compact(env.events).slice(2)).toEqual([
      "BLOCK_JOB_ERROR:m6",
      "m6:paused",
      "m6:running",
      "m6:aborting",
      "BLOCK_JOB_CANCELLED:m6",
      "m6:concluded",
      "m6:null",
    ]);
  });

  it("on-target-error=ignore: the range is copied again later", async () => {
    const env = await mirrorEnv({ size: 2 * MiB, seed: 4 });
    failNthWrite(env.mem(env.dst), 2, "EIO", 3);
    const job = await mirror(env.manager, env.graph, {
      "job-id": "mi",
      device: "src",
      target: "dst",
      sync: "full",
      "on-target-error": "ignore",
      "buf-size": 256 * KiB,
    });
    await pump(env.clock, () => job.status === "ready");
    expect(statusOnly(env.events).filter((e) => e.event === "BLOCK_JOB_ERROR")).toHaveLength(3);
    job.complete();
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(sha(await env.mem(env.dst).snapshot())).toBe(sha(env.model));
  });
});

describe("source errors", () => {
  it("on-source-error=ignore: BLOCK_JOB_ERROR operation read, copied again, target correct", async () => {
    const env = await mirrorEnv({ size: 2 * MiB, seed: 8 });
    let reads = 0;
    env.mem(env.src).hook = (req) => {
      if (req.kind === "read" && ++reads === 2) throw new Error("boom");
    };
    const job = await mirror(env.manager, env.graph, {
      "job-id": "ms",
      device: "src",
      target: "dst",
      sync: "full",
      "on-source-error": "ignore",
      "on-target-error": "stop",
    });
    await pump(env.clock, () => job.status === "ready");
    expect(statusOnly(env.events)[0]).toEqual({
      event: "BLOCK_JOB_ERROR",
      data: { device: "ms", operation: "read", action: "ignore" },
    });
    job.complete();
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(sha(await env.mem(env.dst).snapshot())).toBe(sha(env.model));
  });
});

describe("speed limit on the injected clock", () => {
  it("copies at most speed × time (+ one iteration), reaches READY after len / speed", async () => {
    const env = await mirrorEnv({ size: 4 * MiB, seed: 2 });
    const speed = MiB;
    const buf = 256 * KiB;
    const job = await mirror(env.manager, env.graph, {
      "job-id": "s",
      device: "src",
      target: "dst",
      sync: "full",
      speed,
      "buf-size": buf,
      granularity: 65536,
    });
    let t = 0;
    while (job.status !== "ready" && t < 10e9) {
      await env.clock.advance(50_000_000);
      t += 50_000_000;
      expect(job.progress.current).toBeLessThanOrEqual((speed * t) / 1e9 + buf);
    }
    expect(job.status).toBe("ready");
    // 4 MiB at 1 MiB/s: the last 256 KiB iteration starts at 3.75 s
    expect(t).toBeGreaterThanOrEqual(3.7e9);
    expect(t).toBeLessThanOrEqual(4.3e9);
    job.cancel({ force: true });
    await job.outcome;
  });
});

describe("node holding", () => {
  it("job edges as QEMU shows them; held nodes are busy; drains pause the job", async () => {
    const env = await mirrorEnv({ size: MiB });
    const job = await mirror(env.manager, env.graph, {
      "job-id": "mt4",
      device: "src",
      target: "dst",
      sync: "full",
      "filter-node-name": "mtop",
    });
    await pump(env.clock, () => job.status === "ready");
    const g = env.graph.debugGraph();
    const name = (id: number): string => g.nodes.find((n) => n.id === id)?.name ?? "?";
    const edges = g.edges.map(
      (e) =>
        `${name(e.parent)} -${e.name}-> ${name(e.child)} [${e.perm.join(",")}|${e["shared-perm"].join(",")}]`,
    );
    expect(edges.sort()).toEqual(
      [
        "guest -root-> mtop [write,consistent-read|resize,write-unchanged,write,consistent-read]",
        " -root-> dst [write|write-unchanged]",
        "mt4 -main node-> mtop [consistent-read|write-unchanged,write,consistent-read]",
        "mt4 -source-> src [|write-unchanged,write,consistent-read]",
        "mt4 -target-> dst [|resize,write-unchanged,write,consistent-read]",
        "mtop -backing-> src [write,consistent-read|write-unchanged,write,consistent-read]",
      ].sort(),
    );
    expect(g.nodes.find((n) => n.name === "mt4")?.type).toBe("block-job");
    const busy = thrown(() => checkNodeNotBusy(env.dst));
    expect(isJobError(busy, "EBUSY")).toBe(true);
    expect((busy as Error).message).toBe("Node 'dst' is busy: block device is in use by block job: mirror");
    const second = await mirror(env.manager, env.graph, {
      "job-id": "x",
      device: "src",
      target: "dst",
      sync: "full",
    }).catch((x: unknown) => x);
    expect(second).toHaveProperty(
      "message",
      "Node 'src' is busy: block device is in use by block job: mirror",
    );
    let pausedInside = false;
    await drainedSection([env.src], async () => {
      await env.clock.advance(200_000_000);
      pausedInside = env.manager.queryBlockJobs()[0]?.paused === true && job.status === "standby";
    });
    expect(pausedInside).toBe(true);
    await settle();
    expect(job.status).toBe("ready");
    job.complete();
    await job.outcome;
    expect(job.heldEdges.every((e) => !e.attached)).toBe(true);
    expect(() => checkNodeNotBusy(env.dst)).not.toThrow();
    expect(env.graph.debugGraph().edges.map((e) => e.name)).toEqual(["root"]);
    void rng;
  });
});
