/**
 * Event sequences of QEMU 7.2 (spec/qmp-transcripts.md §1, §2, §5) reproduced with scripted jobs: the
 * ordered list of events and their data, and which events happen before a command returns.
 */
import { describe, expect, it } from "vitest";
import { isJobError } from "../src/index.ts";
import { CreateJob, compact, MirrorJob, rejected, ScriptJob, settle, setup, thrown } from "./helpers.ts";

const MiB = 1024 * 1024;

describe("transcript §1: mirror, backup", () => {
  it("mirror sync=full: complete refused in running, set-speed, READY, complete", async () => {
    const { manager, events } = setup();
    const job = new MirrorJob({ manager, id: "mirror0", speed: 4 * MiB });
    job.start();
    expect(compact(events)).toEqual(["mirror0:created", "mirror0:running"]);
    job.push({ kind: "remaining", bytes: 64 * MiB }, { kind: "work", bytes: 16 * MiB });
    await settle();
    expect(manager.queryBlockJobs()).toEqual([
      {
        "auto-finalize": true,
        "io-status": "ok",
        device: "mirror0",
        "auto-dismiss": true,
        busy: false,
        len: 64 * MiB,
        offset: 16 * MiB,
        status: "running",
        paused: false,
        speed: 4 * MiB,
        ready: false,
        type: "mirror",
      },
    ]);
    const e = thrown(() => manager.blockJobComplete({ device: "mirror0" }));
    expect(isJobError(e, "EPERM")).toBe(true);
    expect((e as Error).message).toBe(
      "Job 'mirror0' in state 'running' cannot accept command verb 'complete'",
    );
    manager.blockJobSetSpeed({ device: "mirror0", speed: 0 });
    job.push({ kind: "work", bytes: 48 * MiB }, { kind: "ready" });
    await settle();
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
    await settle();
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
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(job.hookLog).toEqual(["prepare", "commit", "clean"]);
    expect(manager.queryJobs()).toEqual([]);
  });

  it("backup: a drained section around start gives created, running, paused, running", async () => {
    const { manager, events } = setup();
    const job = new ScriptJob({ manager, id: "backup0" });
    job.holdPause(); // the command's drained section
    job.start();
    job.releasePause();
    expect(compact(events)).toEqual([
      "backup0:created",
      "backup0:running",
      "backup0:paused",
      "backup0:running",
    ]);
    job.push({ kind: "remaining", bytes: 64 * MiB }, { kind: "work", bytes: 64 * MiB }, { kind: "finish" });
    await settle();
    expect(compact(events).slice(4)).toEqual([
      "backup0:waiting",
      "backup0:pending",
      "BLOCK_JOB_COMPLETED:backup0",
      "backup0:concluded",
      "backup0:null",
    ]);
    expect(events[6]).toEqual({
      event: "BLOCK_JOB_COMPLETED",
      data: { device: "backup0", len: 67108864, offset: 67108864, speed: 0, type: "backup" },
    });
  });

  it("intermediate commit: no READY, plain success sequence", async () => {
    const { manager, events } = setup();
    const job = new ScriptJob({ manager, id: "commit0", type: "commit" });
    job.start();
    job.push({ kind: "remaining", bytes: 64 * MiB }, { kind: "work", bytes: 64 * MiB }, { kind: "finish" });
    await settle();
    expect(compact(events)).toEqual([
      "commit0:created",
      "commit0:running",
      "commit0:waiting",
      "commit0:pending",
      "BLOCK_JOB_COMPLETED:commit0",
      "commit0:concluded",
      "commit0:null",
    ]);
  });
});

describe("transcript §2: cancel variants", () => {
  async function readyMirror(id: string) {
    const s = setup();
    const job = new MirrorJob({ manager: s.manager, id });
    job.start();
    job.push({ kind: "remaining", bytes: 64 * MiB }, { kind: "work", bytes: 64 * MiB }, { kind: "ready" });
    await settle();
    expect(compact(s.events)).toEqual([
      `${id}:created`,
      `${id}:running`,
      `${id}:ready`,
      `BLOCK_JOB_READY:${id}`,
    ]);
    s.events.length = 0;
    return { ...s, job };
  }

  it("soft block-job-cancel in READY completes: waiting, pending, COMPLETED (no error)", async () => {
    const { manager, events, job } = await readyMirror("m1");
    manager.blockJobCancel({ device: "m1" });
    await settle();
    expect(compact(events)).toEqual([
      "m1:waiting",
      "m1:pending",
      "BLOCK_JOB_COMPLETED:m1",
      "m1:concluded",
      "m1:null",
    ]);
    expect(events[2]?.data).toEqual({
      device: "m1",
      len: 67108864,
      offset: 67108864,
      speed: 0,
      type: "mirror",
    });
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: true });
  });

  it("forced block-job-cancel in READY: aborting, CANCELLED", async () => {
    const { manager, events, job } = await readyMirror("m2");
    manager.blockJobCancel({ device: "m2", force: true });
    expect(events).toEqual([]); // the end is processed after the command returns
    await settle();
    expect(compact(events)).toEqual(["m2:aborting", "BLOCK_JOB_CANCELLED:m2", "m2:concluded", "m2:null"]);
    expect(events[1]?.data).toEqual({
      device: "m2",
      len: 67108864,
      offset: 67108864,
      speed: 0,
      type: "mirror",
    });
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(job.hookLog).toEqual(["abort", "clean"]);
  });

  it("job-cancel is always forced, even on a READY mirror (§5)", async () => {
    const { manager, events } = await readyMirror("m");
    manager.jobCancel({ id: "m" });
    await settle();
    expect(compact(events)).toEqual(["m:aborting", "BLOCK_JOB_CANCELLED:m", "m:concluded", "m:null"]);
  });

  it("soft cancel before READY behaves as forced", async () => {
    const { manager, events } = setup();
    const job = new MirrorJob({ manager, id: "m3", speed: MiB });
    job.start();
    job.push({ kind: "remaining", bytes: 64 * MiB }, { kind: "work", bytes: 16 * MiB });
    await settle();
    manager.blockJobCancel({ device: "m3" });
    await settle();
    expect(events.slice(2)).toEqual([
      { event: "JOB_STATUS_CHANGE", data: { status: "aborting", id: "m3" } },
      {
        event: "BLOCK_JOB_CANCELLED",
        data: { device: "m3", len: 67108864, offset: 16777216, speed: 1048576, type: "mirror" },
      },
      { event: "JOB_STATUS_CHANGE", data: { status: "concluded", id: "m3" } },
      { event: "JOB_STATUS_CHANGE", data: { status: "null", id: "m3" } },
    ]);
    expect(job.error?.message).toBe("Operation canceled");
  });

  it("pause in READY → standby before the return; complete while paused acts after resume", async () => {
    const { manager, events } = await readyMirror("m4");
    manager.jobPause({ id: "m4" });
    expect(compact(events)).toEqual(["m4:standby"]);
    const again = thrown(() => manager.jobPause({ id: "m4" }));
    expect((again as Error).message).toBe("Job is already paused");
    expect(manager.queryBlockJobs()).toEqual([
      {
        "auto-finalize": true,
        "io-status": "ok",
        device: "m4",
        "auto-dismiss": true,
        busy: false,
        len: 67108864,
        offset: 67108864,
        status: "standby",
        paused: true,
        speed: 0,
        ready: true,
        type: "mirror",
      },
    ]);
    const soft = thrown(() => manager.blockJobCancel({ device: "m4" }));
    expect(isJobError(soft, "EBUSY")).toBe(true);
    expect((soft as Error).message).toBe("The block job for device 'm4' is currently paused");
    manager.jobComplete({ id: "m4" });
    await settle();
    expect(manager.queryJobs()).toEqual([
      {
        "current-progress": 67108864,
        status: "standby",
        "total-progress": 67108864,
        type: "mirror",
        id: "m4",
      },
    ]);
    manager.jobResume({ id: "m4" });
    expect(compact(events)).toEqual(["m4:standby", "m4:ready"]);
    await settle();
    expect(compact(events)).toEqual([
      "m4:standby",
      "m4:ready",
      "m4:waiting",
      "m4:pending",
      "BLOCK_JOB_COMPLETED:m4",
      "m4:concluded",
      "m4:null",
    ]);
    const nf = thrown(() => manager.jobResume({ id: "nosuchjob" }));
    expect(isJobError(nf, "ENOENT")).toBe(true);
    expect(nf).toMatchObject({ message: "Job not found", qmpClass: "GenericError" });
  });
});

describe("transcript §2: manual finalize and dismiss", () => {
  it("auto-finalize=false, auto-dismiss=false", async () => {
    const { manager, events } = setup();
    const job = new ScriptJob({ manager, id: "bk1", autoFinalize: false, autoDismiss: false });
    job.start();
    job.push({ kind: "remaining", bytes: 64 * MiB }, { kind: "work", bytes: 64 * MiB }, { kind: "finish" });
    await settle();
    expect(events.slice(2)).toEqual([
      { event: "JOB_STATUS_CHANGE", data: { status: "waiting", id: "bk1" } },
      { event: "JOB_STATUS_CHANGE", data: { status: "pending", id: "bk1" } },
      { event: "BLOCK_JOB_PENDING", data: { type: "backup", id: "bk1" } },
    ]);
    expect(manager.queryJobs()).toEqual([
      {
        "current-progress": 67108864,
        status: "pending",
        "total-progress": 67108864,
        type: "backup",
        id: "bk1",
      },
    ]);
    const e = thrown(() => manager.jobDismiss({ id: "bk1" }));
    expect((e as Error).message).toBe("Job 'bk1' in state 'pending' cannot accept command verb 'dismiss'");
    const before = events.length;
    await manager.jobFinalize({ id: "bk1" });
    expect(compact(events.slice(before))).toEqual(["BLOCK_JOB_COMPLETED:bk1", "bk1:concluded"]);
    expect(manager.queryBlockJobs()).toEqual([
      {
        "auto-finalize": false,
        "io-status": "ok",
        device: "bk1",
        "auto-dismiss": false,
        busy: false,
        len: 67108864,
        offset: 67108864,
        status: "concluded",
        paused: false,
        speed: 0,
        ready: false,
        type: "backup",
      },
    ]);
    manager.jobDismiss({ id: "bk1" });
    expect(compact(events).at(-1)).toBe("bk1:null");
    expect(manager.queryJobs()).toEqual([]);
    // the id is free again
    const next = new ScriptJob({ manager, id: "bk1" });
    expect(next.status).toBe("created");
  });
});

describe("transcript §2: error policies", () => {
  it("on-target-error=stop: ERROR{stop}, paused, io-status failed; resume retries", async () => {
    const { manager, events } = setup();
    const job = new MirrorJob({ manager, id: "m5" });
    job.start();
    job.push(
      { kind: "remaining", bytes: 64 * MiB },
      { kind: "work", bytes: 63 * MiB },
      { kind: "io-error", code: "EIO", op: "write", policy: "stop" },
    );
    await settle();
    expect(events.slice(2)).toEqual([
      { event: "BLOCK_JOB_ERROR", data: { device: "m5", operation: "write", action: "stop" } },
      { event: "JOB_STATUS_CHANGE", data: { status: "paused", id: "m5" } },
    ]);
    expect(manager.queryBlockJobs()[0]).toMatchObject({
      "io-status": "failed",
      busy: false,
      status: "paused",
      paused: true,
      ready: false,
      offset: 63 * MiB,
    });
    expect(job.userPaused).toBe(true);
    manager.blockJobResume({ device: "m5" });
    expect(compact(events).at(-1)).toBe("m5:running");
    expect(job.ioStatus).toBe("ok");
    job.push({ kind: "work", bytes: MiB }, { kind: "ready" });
    await settle();
    expect(job.ioAttempts).toBe(2);
    expect(compact(events).slice(5)).toEqual(["m5:ready", "BLOCK_JOB_READY:m5"]);
    manager.blockJobCancel({ device: "m5", force: true });
    await settle();
    expect(compact(events).slice(7)).toEqual([
      "m5:aborting",
      "BLOCK_JOB_CANCELLED:m5",
      "m5:concluded",
      "m5:null",
    ]);
  });

  it("on-target-error=report: ERROR{report}, aborting, COMPLETED with error", async () => {
    const { manager, events } = setup();
    const job = new ScriptJob({ manager, id: "bk2", autoDismiss: false });
    job.start();
    job.push(
      { kind: "remaining", bytes: 64 * MiB },
      { kind: "work", bytes: 63 * MiB },
      { kind: "io-error", code: "EIO", op: "write", policy: "report" },
    );
    await settle();
    expect(events.slice(2)).toEqual([
      { event: "BLOCK_JOB_ERROR", data: { device: "bk2", operation: "write", action: "report" } },
      { event: "JOB_STATUS_CHANGE", data: { status: "aborting", id: "bk2" } },
      {
        event: "BLOCK_JOB_COMPLETED",
        data: {
          device: "bk2",
          len: 67108864,
          offset: 66060288,
          speed: 0,
          type: "backup",
          error: "Input/output error",
        },
      },
      { event: "JOB_STATUS_CHANGE", data: { status: "concluded", id: "bk2" } },
    ]);
    expect(manager.queryJobs()).toEqual([
      {
        "current-progress": 66060288,
        status: "concluded",
        "total-progress": 67108864,
        type: "backup",
        id: "bk2",
        error: "Input/output error",
      },
    ]);
    manager.jobDismiss({ id: "bk2" });
    expect(compact(events).at(-1)).toBe("bk2:null");
    const outcome = await job.outcome;
    expect(outcome.status).toBe("failed");
  });

  it("on-target-error=enospc with ENOSPC: stop, io-status nospace; soft cancel refused, force wakes it", async () => {
    const { manager, events } = setup();
    const job = new MirrorJob({ manager, id: "m6" });
    job.start();
    job.push(
      { kind: "remaining", bytes: 64 * MiB },
      { kind: "work", bytes: 15 * MiB },
      { kind: "io-error", code: "ENOSPC", op: "write", policy: "enospc" },
    );
    await settle();
    expect(compact(events).slice(2)).toEqual(["BLOCK_JOB_ERROR:m6", "m6:paused"]);
    expect(events[2]?.data).toEqual({ device: "m6", operation: "write", action: "stop" });
    expect(manager.queryBlockJobs()[0]).toMatchObject({
      "io-status": "nospace",
      paused: true,
      status: "paused",
    });
    const soft = thrown(() => manager.blockJobCancel({ device: "m6" }));
    expect((soft as Error).message).toBe("The block job for device 'm6' is currently paused");
    manager.blockJobCancel({ device: "m6", force: true });
    expect(compact(events).at(-1)).toBe("m6:running"); // before the return, as observed
    await settle();
    expect(events.slice(5)).toEqual([
      { event: "JOB_STATUS_CHANGE", data: { status: "aborting", id: "m6" } },
      {
        event: "BLOCK_JOB_CANCELLED",
        data: { device: "m6", len: 67108864, offset: 15728640, speed: 0, type: "mirror" },
      },
      { event: "JOB_STATUS_CHANGE", data: { status: "concluded", id: "m6" } },
      { event: "JOB_STATUS_CHANGE", data: { status: "null", id: "m6" } },
    ]);
  });

  it("enospc policy with EIO reports; ignore emits ERROR{ignore} and goes on", async () => {
    const { manager, events } = setup();
    const job = new ScriptJob({ manager, id: "i0" });
    job.start();
    job.push({ kind: "io-error", code: "EIO", op: "read", policy: "ignore", times: 2 });
    job.push({ kind: "io-error", code: "EIO", op: "read", policy: "ignore" });
    await settle();
    expect(events.slice(2)).toEqual([
      { event: "BLOCK_JOB_ERROR", data: { device: "i0", operation: "read", action: "ignore" } },
      { event: "BLOCK_JOB_ERROR", data: { device: "i0", operation: "read", action: "ignore" } },
    ]);
    expect(job.ignored).toBe(2);
    job.push({ kind: "io-error", code: "EIO", op: "write", policy: "enospc" });
    await settle();
    expect(compact(events).slice(4)).toEqual([
      "BLOCK_JOB_ERROR:i0",
      "i0:aborting",
      "BLOCK_JOB_COMPLETED:i0",
      "i0:concluded",
      "i0:null",
    ]);
    expect(events[4]?.data).toEqual({ device: "i0", operation: "write", action: "report" });
  });
});

describe("lookups, ids, speed argument", () => {
  it("block-job-* vs job-* lookup errors", () => {
    const { manager } = setup();
    expect(thrown(() => manager.blockJobSetSpeed({ device: "nosuch", speed: 1 }))).toMatchObject({
      qmpClass: "DeviceNotActive",
      message: "Block job 'nosuch' not found",
      code: "ENOENT",
    });
    expect(thrown(() => manager.blockJobCancel({ device: "nosuch" }))).toMatchObject({
      qmpClass: "DeviceNotActive",
      message: "Block job 'nosuch' not found",
    });
    expect(thrown(() => manager.jobCancel({ id: "nosuch" }))).toMatchObject({
      qmpClass: "GenericError",
      message: "Job not found",
    });
  });

  it("a create job: job-* only, no BLOCK_JOB_* events, not in query-block-jobs", async () => {
    const { manager, events } = setup();
    const job = new CreateJob({ manager, id: "c0", autoDismiss: false });
    job.start();
    expect(manager.queryBlockJobs()).toEqual([]);
    expect(thrown(() => manager.blockJobPause({ device: "c0" }))).toMatchObject({
      qmpClass: "DeviceNotActive",
      message: "Block job 'c0' not found",
    });
    expect(manager.queryJobs()).toEqual([
      { id: "c0", type: "create", status: "running", "current-progress": 0, "total-progress": 1 },
    ]);
    job.finish();
    await settle();
    expect(compact(events)).toEqual(["c0:created", "c0:running", "c0:waiting", "c0:pending", "c0:concluded"]);
    expect(manager.queryJobs()[0]).toMatchObject({ "current-progress": 1, "total-progress": 1 });
    manager.jobDismiss({ id: "c0" });
    expect(compact(events).at(-1)).toBe("c0:null");
  });

  it("job ids: QEMU's well-formedness and uniqueness", () => {
    const { manager } = setup();
    expect(thrown(() => new ScriptJob({ manager, id: "1bad" }))).toMatchObject({
      code: "EINVAL",
      message: "Invalid job ID '1bad'",
    });
    expect(thrown(() => new ScriptJob({ manager, id: "" }))).toMatchObject({ message: "Invalid job ID ''" });
    expect(thrown(() => new ScriptJob({ manager }))).toMatchObject({
      message: "An explicit job ID is required",
    });
    expect(thrown(() => new ScriptJob({ manager, internal: true, id: "x" }))).toMatchObject({
      message: "Cannot specify job ID for internal job",
    });
    new ScriptJob({ manager, id: "a-1.b_c" });
    expect(thrown(() => new ScriptJob({ manager, id: "a-1.b_c" }))).toMatchObject({
      code: "EEXIST",
      message: "Job ID 'a-1.b_c' already in use",
    });
  });

  it("negative speed: refused live; at creation the job is destroyed (created, null)", () => {
    const { manager, events } = setup();
    const e = thrown(() => new ScriptJob({ manager, id: "s0", speed: -1 }));
    expect(e).toMatchObject({ code: "EINVAL", message: "Parameter 'speed' expects a non-negative value" });
    expect(compact(events)).toEqual(["s0:created", "s0:null"]);
    expect(manager.get("s0")).toBeUndefined();
    const job = new ScriptJob({ manager, id: "s1" });
    job.start();
    expect(thrown(() => manager.blockJobSetSpeed({ device: "s1", speed: -1 }))).toMatchObject({
      message: "Parameter 'speed' expects a non-negative value",
      qmpClass: "GenericError",
    });
  });

  it("internal jobs emit nothing and are hidden", async () => {
    const { manager, events } = setup();
    const job = new ScriptJob({ manager, internal: true });
    job.start();
    expect(manager.queryJobs()).toEqual([]);
    expect(manager.queryBlockJobs()).toEqual([]);
    expect(manager.jobs).toContain(job);
    job.push({ kind: "io-error", code: "EIO", op: "read", policy: "ignore" }, { kind: "finish" });
    await settle();
    expect(events).toEqual([]);
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(manager.jobs).not.toContain(job);
  });

  it("cancelling a created job: aborting, concluded, null, no BLOCK_JOB_CANCELLED", async () => {
    const { manager, events } = setup();
    const job = new ScriptJob({ manager, id: "c", autoDismiss: false });
    manager.jobCancel({ id: "c" });
    await settle();
    expect(compact(events)).toEqual(["c:created", "c:aborting", "c:concluded", "c:null"]);
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
  });

  it("finalize rejects with the verb error", async () => {
    const { manager } = setup();
    new ScriptJob({ manager, id: "f" }).start();
    const e = await rejected(manager.blockJobFinalize({ id: "f" }));
    expect((e as Error).message).toBe("Job 'f' in state 'running' cannot accept command verb 'finalize'");
  });
});

describe("pause counter", () => {
  it("drains count, user pause counts once, STOP counts once", async () => {
    const { manager, events } = setup();
    const job = new ScriptJob({ manager, id: "p" });
    job.start();
    expect(job.pauseCount).toBe(0);
    job.holdPause();
    expect(job.status).toBe("paused");
    expect(manager.queryBlockJobs()[0]?.paused).toBe(true);
    expect(thrown(() => job.resume())).toMatchObject({ message: "Can't resume a job that was not paused" });
    job.pause();
    expect(job.pauseCount).toBe(2);
    job.releasePause(); // drain ends: still user-paused
    expect(job.status).toBe("paused");
    job.resume();
    expect(job.status).toBe("running");
    expect(job.pauseCount).toBe(0);
    // a busy job pauses at its next pause point, not at once
    let release!: () => void;
    job.push({ kind: "hold", until: new Promise<void>((r) => (release = r)) }, { kind: "work", bytes: 1 });
    await settle();
    expect(job.busy).toBe(true);
    job.pause();
    expect(job.status).toBe("running");
    release();
    await settle();
    expect(job.status).toBe("paused");
    expect(compact(events)).toEqual(["p:created", "p:running", "p:paused", "p:running", "p:paused"]);
  });

  it("a job paused before start parks at its first pause point", () => {
    const { manager, events } = setup();
    const job = new ScriptJob({ manager, id: "q" });
    job.pause();
    expect(job.pauseCount).toBe(2);
    job.start();
    expect(compact(events)).toEqual(["q:created", "q:running", "q:paused"]);
    job.resume();
    expect(compact(events).at(-1)).toBe("q:running");
  });
});

describe("library verbs", () => {
  it("cancel and complete are idempotent; outcome resolves once", async () => {
    const { manager } = setup();
    const job = new MirrorJob({ manager, id: "l" });
    job.start();
    job.push({ kind: "ready" });
    await settle();
    job.complete();
    job.complete();
    await settle();
    job.cancel();
    job.complete();
    job.cancel({ force: true });
    expect(await job.outcome).toEqual({ status: "completed" });
    // the QMP path still reports QEMU's error
    expect(thrown(() => manager.jobCancel({ id: "l" }))).toMatchObject({ message: "Job not found" });
  });

  it("cancel of a user-paused job works through the library path", async () => {
    const { manager } = setup();
    const job = new ScriptJob({ manager, id: "u" });
    job.start();
    job.pause();
    job.cancel();
    job.cancel();
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
  });

  it("x-blk extensions: phase and ETA only on request", async () => {
    const { manager, clock } = setup();
    const job = new ScriptJob({ manager, id: "x" });
    job.start();
    job.setPhase("copy");
    job.push({ kind: "remaining", bytes: 400 }, { kind: "work", bytes: 100 });
    await clock.advance(1e9);
    expect(manager.queryJobs()[0]).not.toHaveProperty("x-blk-phase");
    expect(manager.queryJobs({ extensions: true })[0]).toMatchObject({
      "x-blk-phase": "copy",
      "x-blk-eta-seconds": 3,
    });
    expect(manager.queryBlockJobs({ extensions: true })[0]).toMatchObject({ "x-blk-eta-seconds": 3 });
  });
});

describe("shutdown", () => {
  it("cancelAll force-cancels, waits and dismisses everything", async () => {
    const { manager } = setup();
    const a = new MirrorJob({ manager, id: "a" });
    const b = new ScriptJob({ manager, id: "b", autoDismiss: false });
    const c = new ScriptJob({ manager, id: "c", autoFinalize: false });
    const d = new ScriptJob({ manager, id: "d" }); // never started
    for (const j of [a, b, c]) j.start();
    a.push({ kind: "ready" });
    a.pause();
    b.push({ kind: "finish" });
    c.push({ kind: "finish" });
    await settle();
    expect([a.status, b.status, c.status, d.status]).toEqual(["standby", "concluded", "pending", "created"]);
    await manager.cancelAll();
    expect(manager.jobs).toEqual([]);
    expect(await a.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(await b.outcome).toEqual({ status: "completed" });
    expect(await c.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(await d.outcome).toEqual({ status: "cancelled", consistent: false });
  });
});

describe("whenStatus", () => {
  it("resolves true on the status, false when the job ends without it", async () => {
    const { manager } = setup();
    const m = new MirrorJob({ manager, id: "m" });
    m.start();
    const ready = m.whenStatus("ready");
    const standby = m.whenStatus("standby");
    m.push({ kind: "ready" });
    expect(await ready).toBe(true);
    expect(await m.whenStatus("ready")).toBe(true);
    m.complete();
    expect(await standby).toBe(false);
    expect(await m.whenStatus("ready")).toBe(false);
    expect(await m.outcome).toEqual({ status: "completed" });
  });
});

describe("error action table (spec §1.8)", () => {
  const table = {
    report: ["report", "report"],
    ignore: ["ignore", "ignore"],
    stop: ["stop", "stop"],
    enospc: ["report", "stop"],
    auto: ["report", "stop"],
  } as const;
  it.each(Object.entries(table))("on-error=%s → EIO %s", (policy, [eio, enospc]) => {
    const { manager, events } = setup();
    const job = new ScriptJob({ manager, id: "e" });
    job.start();
    const p = policy as keyof typeof table;
    expect(job.errorAction(p, "read", "EIO")).toBe(eio);
    expect(job.errorAction(p, "write", "ENOSPC")).toBe(enospc);
    expect(events.filter((e) => e.event === "BLOCK_JOB_ERROR").map((e) => e.data)).toEqual([
      { device: "e", operation: "read", action: eio },
      { device: "e", operation: "write", action: enospc },
    ]);
    // STOP counts once in the pause counter however often it happens; io-status keeps the first cause
    const stops = [eio, enospc].filter((a) => a === "stop").length;
    expect(job.pauseCount).toBe(stops > 0 ? 1 : 0);
    expect(job.userPaused).toBe(stops > 0);
    expect(job.ioStatus).toBe(eio === "stop" ? "failed" : enospc === "stop" ? "nospace" : "ok");
  });
});
