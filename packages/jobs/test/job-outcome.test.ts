/**
 * The framework's promises beyond QEMU (issue #7): one awaitable outcome per job (completed, cancelled
 * with or without a consistent target, failed with its reason; it never rejects); library `cancel` and
 * `complete` idempotent (repeated calls change nothing and emit nothing more); a concluded job that is
 * not dismissed yet holds no node, so it never blocks the next job on the same node.
 */
import { BlkError, BlockGraph, memoryDriver } from "@blk/core";
import { describe, expect, it } from "vitest";
import {
  BlockJob,
  type BlockJobOptions,
  blockJobsHolding,
  checkNodeNotBusy,
  type JobOutcome,
} from "../src/index.ts";
import { compact, MirrorJob, ScriptJob, settle, setup } from "./helpers.ts";

/** A block job that holds `node` and runs until `finish()` (or fails with `fail(e)`). */
class HolderJob extends BlockJob {
  #done = false;
  #error: Error | undefined;
  constructor(opts: Omit<BlockJobOptions, "type">) {
    super({ ...opts, type: "stream" });
  }
  finish(error?: Error): void {
    this.#done = true;
    this.#error = error;
    this.enter();
  }
  protected async run(): Promise<void> {
    while (!this.#done && !this.isCancelled()) await this.suspend();
    if (this.#error !== undefined) throw this.#error;
  }
}

describe("one awaitable outcome per job", () => {
  it("completed, cancelled (consistent or not), failed with its reason; never a rejection", async () => {
    const { manager } = setup();
    const outcomes: Record<string, Promise<JobOutcome>> = {};

    const ok = new ScriptJob({ manager, id: "ok" });
    ok.start();
    ok.push({ kind: "finish" });
    outcomes.ok = ok.outcome;

    // a soft cancel of a READY mirror-like job leaves a consistent target
    const soft = new MirrorJob({ manager, id: "soft" });
    soft.start();
    soft.push({ kind: "ready" });
    await settle();
    soft.cancel();
    outcomes.soft = soft.outcome;

    const forced = new MirrorJob({ manager, id: "forced" });
    forced.start();
    forced.push({ kind: "ready" });
    await settle();
    forced.cancel({ force: true });
    outcomes.forced = forced.outcome;

    const io = new ScriptJob({ manager, id: "io" });
    io.start();
    io.push({ kind: "io-error", code: "EIO", op: "write", policy: "report" });
    outcomes.io = io.outcome;

    const own = new ScriptJob({ manager, id: "own" });
    own.start();
    own.push({ kind: "fail", error: new Error("target vanished") });
    outcomes.own = own.outcome;

    // destroyed before it ran (a negative speed at creation)
    let early: unknown;
    try {
      new ScriptJob({ manager, id: "early", speed: -5 });
    } catch (e) {
      early = e;
    }
    expect(early).toBeDefined();

    const got = Object.fromEntries(
      await Promise.all(Object.entries(outcomes).map(async ([k, p]) => [k, await p] as const)),
    );
    expect(got.ok).toEqual({ status: "completed" });
    expect(got.soft).toEqual({ status: "cancelled", consistent: true });
    expect(got.forced).toEqual({ status: "cancelled", consistent: false });
    expect(got.io?.status).toBe("failed");
    const ioErr = got.io?.status === "failed" ? got.io.error : undefined;
    // the reason is a typed error with QEMU's message (what BLOCK_JOB_COMPLETED's `error` says)
    expect(ioErr).toBeInstanceOf(BlkError);
    expect(ioErr).toMatchObject({ code: "EIO", message: "Input/output error" });
    expect(got.own).toMatchObject({ status: "failed", error: { message: "target vanished" } });
    // the outcome is the same object however often it is awaited
    expect(await ok.outcome).toBe(got.ok);
  });

  it("a job cancelled before it started resolves cancelled; a failed prepare resolves failed", async () => {
    const { manager } = setup();
    const a = new ScriptJob({ manager, id: "a" });
    a.cancel();
    expect(await a.outcome).toEqual({ status: "cancelled", consistent: false });
    const b = new ScriptJob({ manager, id: "b" });
    b.prepareError = new Error("Can no longer replace");
    b.start();
    b.push({ kind: "finish" });
    expect(await b.outcome).toMatchObject({ status: "failed", error: { message: "Can no longer replace" } });
  });
});

describe("idempotent library verbs", () => {
  it("cancel, repeated: one aborting, one BLOCK_JOB_CANCELLED; nothing after the end", async () => {
    const { manager, events } = setup();
    const job = new ScriptJob({ manager, id: "c" });
    job.start();
    await settle();
    job.cancel();
    job.cancel();
    job.cancel({ force: true });
    await settle();
    job.cancel();
    job.cancel({ force: true });
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(compact(events)).toEqual([
      "c:created",
      "c:running",
      "c:aborting",
      "BLOCK_JOB_CANCELLED:c",
      "c:concluded",
      "c:null",
    ]);
  });

  it("complete, repeated (and after a soft cancel): one completion", async () => {
    const { manager, events } = setup();
    const job = new MirrorJob({ manager, id: "m" });
    job.start();
    job.push({ kind: "ready" });
    await settle();
    events.length = 0;
    job.complete();
    job.complete();
    await settle();
    job.complete();
    job.cancel();
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(compact(events)).toEqual([
      "m:waiting",
      "m:pending",
      "BLOCK_JOB_COMPLETED:m",
      "m:concluded",
      "m:null",
    ]);

    // a soft cancel in READY, then complete: the cancel stands, complete does nothing
    const s = setup();
    const k = new MirrorJob({ manager: s.manager, id: "k" });
    k.start();
    k.push({ kind: "ready" });
    await settle();
    k.cancel();
    k.complete();
    k.cancel();
    expect(await k.outcome).toEqual({ status: "cancelled", consistent: true });
    expect(compact(s.events).filter((e) => e.startsWith("BLOCK_JOB_"))).toEqual([
      "BLOCK_JOB_READY:k",
      "BLOCK_JOB_COMPLETED:k",
    ]);
  });

  it("the QMP verbs stay strict where the library ones are idempotent", async () => {
    const { manager } = setup();
    const job = new MirrorJob({ manager, id: "q" });
    job.start();
    // complete before READY: refused by both (there is nothing to complete yet)
    expect(() => job.complete()).toThrow("Job 'q' in state 'running' cannot accept command verb 'complete'");
    job.pause();
    expect(() => manager.jobPause({ id: "q" })).toThrow("Job is already paused");
    job.cancel();
    job.cancel();
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(() => manager.jobCancel({ id: "q" })).toThrow("Job not found");
  });
});

describe("a concluded job never blocks the next job on the same node", () => {
  for (const end of ["completed", "failed", "cancelled"] as const) {
    it(`${end}, auto-dismiss off: the node is free before the job is dismissed`, async () => {
      const { manager } = setup();
      const graph = new BlockGraph();
      const node = await graph.open(memoryDriver, { size: 1 << 20 }, { nodeName: "disk" });
      const first = new HolderJob({ manager, id: "first", autoDismiss: false });
      first.holdNode(node, "main node");
      first.start();
      expect(() => checkNodeNotBusy(node)).toThrow(
        "Node 'disk' is busy: block device is in use by block job: stream",
      );
      if (end === "cancelled") first.cancel();
      else first.finish(end === "failed" ? new Error("boom") : undefined);
      expect((await first.outcome).status).toBe(end);
      expect(first.status).toBe("concluded");
      expect(manager.queryJobs().map((j) => j.id)).toEqual(["first"]);
      expect(blockJobsHolding(node)).toEqual([]);
      expect(() => checkNodeNotBusy(node)).not.toThrow();
      // the next job takes the node, runs and ends while the first one is still listed
      const next = new HolderJob({ manager, id: "next" });
      next.holdNode(node, "main node");
      next.start();
      expect(blockJobsHolding(node)).toEqual([next]);
      next.finish();
      expect(await next.outcome).toEqual({ status: "completed" });
      manager.jobDismiss({ id: "first" });
      expect(manager.queryJobs()).toEqual([]);
    });
  }
});
