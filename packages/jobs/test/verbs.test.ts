/**
 * Every verb in every reachable status, through the QMP commands (`job-*` and `block-job-*`), against
 * QEMU 7.2's verb table and extra checks as written in spec/jobs.md §1.4 (the table is restated here as a
 * literal, independently of the source's).
 */
import { describe, expect, it } from "vitest";
import { type JobManager, type JobStatus, JobTxn } from "../src/index.ts";
import { MirrorJob, ScriptJob, settle, setup } from "./helpers.ts";

type Verb = "cancel" | "pause" | "resume" | "set-speed" | "complete" | "finalize" | "dismiss";
type State = Exclude<JobStatus, "undefined" | "null">;

// rows: verb; columns: created running paused ready standby waiting pending aborting concluded
const COLUMNS: State[] = [
  "created",
  "running",
  "paused",
  "ready",
  "standby",
  "waiting",
  "pending",
  "aborting",
  "concluded",
];
const TABLE: Record<Verb, string> = {
  cancel: "✔✔✔✔✔✔✔··",
  pause: "✔✔✔✔✔····",
  resume: "✔✔✔✔✔····",
  "set-speed": "✔✔✔✔✔····",
  complete: "···✔✔····",
  finalize: "······✔··",
  dismiss: "········✔",
};
const allowed = (verb: Verb, s: State): boolean => [...TABLE[verb]][COLUMNS.indexOf(s)] === "✔";

/** Brings a fresh mirror-like job "j" into `state`; paused/standby are reached by a user pause. */
async function reach(state: State): Promise<{ manager: JobManager; job: MirrorJob }> {
  const { manager } = setup();
  const opts = { manager, id: "j", autoFinalize: state !== "pending", autoDismiss: state !== "concluded" };
  switch (state) {
    case "created":
      return { manager, job: new MirrorJob(opts) };
    case "running":
    case "paused": {
      const job = new MirrorJob(opts);
      job.start();
      if (state === "paused") job.pause();
      return { manager, job };
    }
    case "ready":
    case "standby": {
      const job = new MirrorJob(opts);
      job.start();
      job.push({ kind: "ready" });
      await settle();
      if (state === "standby") job.pause();
      return { manager, job };
    }
    case "waiting": {
      const txn = new JobTxn();
      const job = new MirrorJob({ ...opts, txn });
      const peer = new ScriptJob({ manager, id: "peer", txn });
      job.start();
      peer.start();
      job.push({ kind: "finish" });
      await settle();
      return { manager, job };
    }
    case "aborting": {
      // j fails; its peer is force-cancelled but stays busy, so j waits in `aborting`
      const txn = new JobTxn();
      const job = new MirrorJob({ ...opts, txn });
      const peer = new ScriptJob({ manager, id: "peer", txn });
      job.start();
      peer.start();
      peer.push({ kind: "hold", until: new Promise<void>(() => undefined) });
      await settle();
      job.push({ kind: "fail", error: new Error("boom") });
      await settle();
      return { manager, job };
    }
    case "pending":
    case "concluded": {
      const job = new MirrorJob(opts);
      job.start();
      job.push({ kind: "finish" });
      await settle();
      return { manager, job };
    }
  }
}

/** The result QEMU gives for `verb` through `api` on job "j" in `state` (spec/jobs.md §1.4). */
function expected(api: "job" | "block-job", verb: Verb, state: State): string {
  const userPaused = state === "paused" || state === "standby";
  if (verb === "resume" && !userPaused) return "Can't resume a job that was not paused";
  if (verb === "cancel" && api === "block-job" && userPaused) {
    return "The block job for device 'j' is currently paused";
  }
  if (!allowed(verb, state)) return `Job 'j' in state '${state}' cannot accept command verb '${verb}'`;
  if (verb === "pause" && userPaused) return "Job is already paused";
  return "ok";
}

async function apply(manager: JobManager, api: "job" | "block-job", verb: Verb): Promise<void> {
  const id = { id: "j" };
  const device = { device: "j" };
  if (api === "job") {
    switch (verb) {
      case "cancel":
        return manager.jobCancel(id);
      case "pause":
        return manager.jobPause(id);
      case "resume":
        return manager.jobResume(id);
      case "set-speed": // 7.2 has no job-set-speed
        return manager.blockJobSetSpeed({ device: "j", speed: 1 });
      case "complete":
        return manager.jobComplete(id);
      case "finalize":
        return manager.jobFinalize(id);
      case "dismiss":
        return manager.jobDismiss(id);
    }
  }
  switch (verb) {
    case "cancel":
      return manager.blockJobCancel(device);
    case "pause":
      return manager.blockJobPause(device);
    case "resume":
      return manager.blockJobResume(device);
    case "set-speed":
      return manager.blockJobSetSpeed({ device: "j", speed: 1 });
    case "complete":
      return manager.blockJobComplete(device);
    case "finalize":
      return manager.blockJobFinalize(id);
    case "dismiss":
      return manager.blockJobDismiss(id);
  }
}

const VERBS = Object.keys(TABLE) as Verb[];

describe.each(["job", "block-job"] as const)("%s-* verbs in every state", (api) => {
  describe.each(COLUMNS)("state %s", (state) => {
    it.each(VERBS)(`${api} %s`, async (verb) => {
      const { manager, job } = await reach(state);
      expect(job.status).toBe(state);
      let result = "ok";
      try {
        await apply(manager, api, verb);
      } catch (e) {
        result = (e as Error).message;
        expect(e).toMatchObject({ qmpClass: "GenericError" });
      }
      expect(result).toBe(expected(api, verb, state));
    });
  });
});

describe("accepted verbs take effect", () => {
  it("complete on a job without a complete hook, or after a cancel request", async () => {
    const { manager } = setup();
    const b = new ScriptJob({ manager, id: "b" });
    b.start();
    b.push({ kind: "ready" });
    await settle();
    expect(() => manager.jobComplete({ id: "b" })).toThrow("The active block job 'b' cannot be completed");
  });

  it("dismissing a concluded job frees its id; a concluded job blocks it until then", async () => {
    const { manager, job } = await reach("concluded");
    expect(() => new MirrorJob({ manager, id: "j" })).toThrow("Job ID 'j' already in use");
    manager.jobDismiss({ id: "j" });
    expect(job.status).toBe("null");
    expect(new MirrorJob({ manager, id: "j" }).status).toBe("created");
  });

  it("set-speed in created is kept for the run", async () => {
    const { manager, job } = await reach("created");
    manager.blockJobSetSpeed({ device: "j", speed: 1000 });
    job.start();
    expect(manager.queryBlockJobs()[0]?.speed).toBe(1000);
  });
});
