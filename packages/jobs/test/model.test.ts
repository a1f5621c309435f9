/**
 * Random command sequences on grouped and single jobs: whatever the order of verbs, work, errors and
 * drains, every status change is in QEMU's transition table, events sit where QEMU puts them, refusals are
 * JobErrors, and every job ends (outcome resolved, `null` reached once dismissed).
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { isJobError, type JobEvent, type JobStatus, JobTxn, transitionAllowed } from "../src/index.ts";
import { MirrorJob, ScriptJob, settle, setup } from "./helpers.ts";

type Op =
  | { op: "verb"; job: number; verb: string; force: boolean }
  | { op: "step"; job: number; step: "work" | "ready" | "finish" | "fail" | "stop" | "ignore" }
  | { op: "drain"; job: number }
  | { op: "tick" };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  fc.record({
    op: fc.constant("verb" as const),
    job: fc.integer({ min: 0, max: 2 }),
    verb: fc.constantFrom("cancel", "pause", "resume", "complete", "finalize", "dismiss", "set-speed"),
    force: fc.boolean(),
  }),
  fc.record({
    op: fc.constant("step" as const),
    job: fc.integer({ min: 0, max: 2 }),
    step: fc.constantFrom("work", "ready", "finish", "fail", "stop", "ignore"),
  }),
  fc.record({ op: fc.constant("drain" as const), job: fc.integer({ min: 0, max: 2 }) }),
  fc.constant({ op: "tick" as const }),
);

function checkEvents(events: readonly JobEvent[]): void {
  const status = new Map<string, JobStatus>();
  events.forEach((e, i) => {
    const prev = events[i - 1];
    const next = events[i + 1];
    switch (e.event) {
      case "JOB_STATUS_CHANGE": {
        const from = status.get(e.data.id) ?? "undefined";
        expect(transitionAllowed(from, e.data.status), `${e.data.id}: ${from} -> ${e.data.status}`).toBe(
          true,
        );
        expect(from).not.toBe(e.data.status);
        status.set(e.data.id, e.data.status);
        break;
      }
      case "BLOCK_JOB_READY":
        expect(prev).toEqual({ event: "JOB_STATUS_CHANGE", data: { id: e.data.device, status: "ready" } });
        break;
      case "BLOCK_JOB_PENDING":
        expect(prev).toEqual({ event: "JOB_STATUS_CHANGE", data: { id: e.data.id, status: "pending" } });
        break;
      case "BLOCK_JOB_COMPLETED":
      case "BLOCK_JOB_CANCELLED":
        expect(["pending", "aborting"]).toContain(status.get(e.data.device));
        expect(next).toEqual({
          event: "JOB_STATUS_CHANGE",
          data: { id: e.data.device, status: "concluded" },
        });
        break;
      case "BLOCK_JOB_ERROR":
        break;
    }
  });
}

describe("random command sequences", () => {
  it("keep QEMU's invariants", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(opArb, { maxLength: 40 }),
        fc.boolean(),
        fc.array(fc.boolean(), { minLength: 6, maxLength: 6 }),
        async (ops, grouped, flags) => {
          const { manager, events } = setup();
          const txn = grouped ? new JobTxn() : undefined;
          const jobs: ScriptJob[] = [0, 1, 2].map((i) => {
            const opts = {
              manager,
              id: `j${i}`,
              autoFinalize: flags[i] === true,
              autoDismiss: flags[i + 3] === true,
              ...(txn === undefined ? {} : { txn }),
            };
            return i === 0 ? new MirrorJob(opts) : new ScriptJob(opts);
          });
          const drains = [0, 0, 0];
          for (const j of jobs) j.start();
          for (const o of ops) {
            if (o.op === "tick") {
              await settle(3);
              continue;
            }
            const job = jobs[o.job];
            if (job === undefined) continue;
            if (o.op === "drain") {
              if ((drains[o.job] ?? 0) > 0) {
                drains[o.job] = (drains[o.job] ?? 1) - 1;
                job.releasePause();
              } else if (job.status !== "null") {
                drains[o.job] = 1;
                job.holdPause();
              }
              continue;
            }
            if (o.op === "step") {
              if (o.step === "work") job.push({ kind: "work", bytes: 4096 });
              else if (o.step === "ready") job.push({ kind: "ready" });
              else if (o.step === "finish") job.push({ kind: "finish" });
              else if (o.step === "fail") job.push({ kind: "fail", error: new Error("boom") });
              else job.push({ kind: "io-error", code: "EIO", op: "write", policy: o.step });
              continue;
            }
            try {
              const id = { id: job.id ?? "" };
              const device = { device: job.id ?? "" };
              switch (o.verb) {
                case "cancel":
                  if (o.force) manager.jobCancel(id);
                  else manager.blockJobCancel(device);
                  break;
                case "pause":
                  manager.jobPause(id);
                  break;
                case "resume":
                  manager.blockJobResume(device);
                  break;
                case "complete":
                  manager.jobComplete(id);
                  break;
                case "finalize":
                  await manager.jobFinalize(id);
                  break;
                case "dismiss":
                  manager.blockJobDismiss(id);
                  break;
                default:
                  manager.blockJobSetSpeed({ device: job.id ?? "", speed: o.force ? 0 : 1 << 30 });
              }
            } catch (e) {
              expect(isJobError(e), String(e)).toBe(true);
            }
          }
          // wind down: release drains, force-cancel, finalize and dismiss what is left
          jobs.forEach((j, i) => {
            if ((drains[i] ?? 0) > 0) j.releasePause();
          });
          for (const j of jobs) j.cancel({ force: true });
          await settle(10);
          for (const j of jobs) if (j.status === "pending") await j.finalize();
          await settle(5);
          for (const j of jobs) if (j.status === "concluded") j.dismiss();
          for (const j of jobs) expect(j.status).toBe("null");
          const outcomes = await Promise.all(jobs.map((j) => j.outcome));
          for (const o of outcomes) expect(["completed", "cancelled", "failed"]).toContain(o.status);
          checkEvents(events);
          expect(manager.queryJobs()).toEqual([]);
        },
      ),
      { numRuns: 150 },
    );
  });
});
