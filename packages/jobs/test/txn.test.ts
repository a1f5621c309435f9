/**
 * Grouped completion (spec/jobs.md §1.6, §1.11; transcript §3 "Transactions"): members wait for each other,
 * finalize together, and one failing or cancelled member force-cancels all others.
 */
import { describe, expect, it } from "vitest";
import { JobTxn } from "../src/index.ts";
import { compact, ScriptJob, settle, setup } from "./helpers.ts";

const MiB = 1024 * 1024;

describe("grouped transactions", () => {
  it("manual finalize: pending newest first, finalizing one finalizes all (tb1/tb2)", async () => {
    const { manager, events } = setup();
    const txn = new JobTxn();
    const tb1 = new ScriptJob({ manager, id: "tb1", txn, autoFinalize: false });
    const tb2 = new ScriptJob({ manager, id: "tb2", txn, autoFinalize: false });
    tb1.start();
    tb2.start();
    for (const j of [tb1, tb2])
      j.push({ kind: "remaining", bytes: 64 * MiB }, { kind: "work", bytes: 64 * MiB });
    tb1.push({ kind: "finish" });
    await settle();
    expect(tb1.status).toBe("waiting");
    expect(tb2.status).toBe("running");
    tb2.push({ kind: "finish" });
    await settle();
    expect(compact(events).slice(4)).toEqual([
      "tb1:waiting",
      "tb2:waiting",
      "tb2:pending",
      "BLOCK_JOB_PENDING:tb2",
      "tb1:pending",
      "BLOCK_JOB_PENDING:tb1",
    ]);
    expect(manager.queryJobs().map((j) => j.id)).toEqual(["tb2", "tb1"]);
    const before = events.length;
    await manager.jobFinalize({ id: "tb2" });
    expect(compact(events.slice(before))).toEqual([
      "BLOCK_JOB_COMPLETED:tb2",
      "tb2:concluded",
      "tb2:null",
      "BLOCK_JOB_COMPLETED:tb1",
      "tb1:concluded",
      "tb1:null",
    ]);
    expect(tb1.hookLog).toEqual(["prepare", "commit", "clean"]);
    expect(await Promise.all([tb1.outcome, tb2.outcome])).toEqual([
      { status: "completed" },
      { status: "completed" },
    ]);
  });

  it("auto-finalize: nobody leaves waiting before the last member is done", async () => {
    const { manager, events } = setup();
    const txn = new JobTxn();
    const a = new ScriptJob({ manager, id: "a", txn });
    const b = new ScriptJob({ manager, id: "b", txn });
    a.start();
    b.start();
    a.push({ kind: "finish" });
    await settle();
    expect(a.status).toBe("waiting");
    expect(a.hookLog).toEqual([]);
    b.push({ kind: "finish" });
    await settle();
    expect(compact(events).slice(4)).toEqual([
      "a:waiting",
      "b:waiting",
      "b:pending",
      "a:pending",
      "BLOCK_JOB_COMPLETED:b",
      "b:concluded",
      "b:null",
      "BLOCK_JOB_COMPLETED:a",
      "a:concluded",
      "a:null",
    ]);
  });

  it("job-cancel of one member aborts both, each with BLOCK_JOB_CANCELLED (tb5/tb6)", async () => {
    const { manager, events } = setup();
    const txn = new JobTxn();
    const tb5 = new ScriptJob({ manager, id: "tb5", txn, speed: MiB });
    const tb6 = new ScriptJob({ manager, id: "tb6", txn, speed: MiB });
    tb5.start();
    tb6.start();
    for (const j of [tb5, tb6]) j.push({ kind: "remaining", bytes: 64 * MiB }, { kind: "work", bytes: MiB });
    await settle();
    events.length = 0;
    manager.jobCancel({ id: "tb5" });
    await settle();
    expect(compact(events)).toEqual([
      "tb5:aborting",
      "tb6:aborting",
      "BLOCK_JOB_CANCELLED:tb6",
      "tb6:concluded",
      "tb6:null",
      "BLOCK_JOB_CANCELLED:tb5",
      "tb5:concluded",
      "tb5:null",
    ]);
    expect(events[2]?.data).toEqual({
      device: "tb6",
      len: 67108864,
      offset: 1048576,
      speed: 1048576,
      type: "backup",
    });
    expect(await tb6.outcome).toEqual({ status: "cancelled", consistent: false });
  });

  it("a failing member aborts the others; it reports COMPLETED with its error", async () => {
    const { manager, events } = setup();
    const txn = new JobTxn();
    const a = new ScriptJob({ manager, id: "a", txn });
    const b = new ScriptJob({ manager, id: "b", txn });
    const c = new ScriptJob({ manager, id: "c", txn });
    for (const j of [a, b, c]) j.start();
    b.push({ kind: "finish" }); // b already waiting
    await settle();
    events.length = 0;
    a.push({ kind: "io-error", code: "EIO", op: "read", policy: "report" });
    await settle();
    expect(compact(events)).toEqual([
      "BLOCK_JOB_ERROR:a",
      "a:aborting",
      "c:aborting",
      "BLOCK_JOB_CANCELLED:c",
      "c:concluded",
      "c:null",
      "b:aborting",
      "BLOCK_JOB_CANCELLED:b",
      "b:concluded",
      "b:null",
      "BLOCK_JOB_COMPLETED:a",
      "a:concluded",
      "a:null",
    ]);
    expect(events[10]?.data).toMatchObject({ error: "Input/output error" });
    expect(a.hookLog).toEqual(["abort", "clean"]);
    expect(b.hookLog).toEqual(["abort", "clean"]);
    const outcomes = await Promise.all([a.outcome, b.outcome, c.outcome]);
    expect(outcomes[0].status).toBe("failed");
    expect(outcomes[1]).toEqual({ status: "cancelled", consistent: false });
    expect(outcomes[2]).toEqual({ status: "cancelled", consistent: false });
  });

  it("a failing prepare aborts the whole transaction", async () => {
    const { manager, events } = setup();
    const txn = new JobTxn();
    const a = new ScriptJob({ manager, id: "a", txn });
    const b = new ScriptJob({ manager, id: "b", txn });
    b.prepareError = new Error("Can no longer replace");
    a.start();
    b.start();
    a.push({ kind: "finish" });
    b.push({ kind: "finish" });
    await settle();
    // b (newest) prepares first and fails: a is force-cancelled, nothing is committed
    expect(compact(events).slice(4)).toEqual([
      "a:waiting",
      "b:waiting",
      "b:pending",
      "a:pending",
      "b:aborting",
      "BLOCK_JOB_COMPLETED:b",
      "b:concluded",
      "b:null",
      "a:aborting",
      "BLOCK_JOB_CANCELLED:a",
      "a:concluded",
      "a:null",
    ]);
    expect(events.find((e) => e.event === "BLOCK_JOB_COMPLETED")?.data).toMatchObject({
      error: "Can no longer replace",
    });
    expect(a.hookLog).toEqual(["abort", "clean"]);
    expect(b.hookLog).toEqual(["prepare", "abort", "clean"]);
    expect(await b.outcome).toMatchObject({ status: "failed" });
  });

  it("a private transaction per job: one job's failure touches nobody else", async () => {
    const { manager } = setup();
    const a = new ScriptJob({ manager, id: "a" });
    const b = new ScriptJob({ manager, id: "b" });
    a.start();
    b.start();
    a.push({ kind: "fail", error: new Error("x") });
    await settle();
    expect(b.status).toBe("running");
    b.push({ kind: "finish" });
    expect(await b.outcome).toEqual({ status: "completed" });
  });
});
