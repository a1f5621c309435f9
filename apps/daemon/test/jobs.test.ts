import { BlockJob } from "@blk/jobs";
import { describe, expect, it } from "vitest";
import { generic, startSession } from "./helpers.ts";

/** A job that waits at pause points until completed or cancelled (no real job drivers exist yet). */
class WaitJob extends BlockJob {
  protected async run(): Promise<void> {
    this.progressSetRemaining(1024);
    while (!this.isCancelled()) {
      this.progressWorkDone(0);
      await this.sleep(1_000_000);
      await this.pausePoint();
      if (this.done) return;
    }
  }
  done = false;
  protected override onComplete(): void {
    this.done = true;
  }
}

describe("job commands", () => {
  it("lookups and schema errors with QEMU's classes (transcripts §2, §8)", async () => {
    await using s = await startSession();
    expect(await s.qmp.execute("query-jobs")).toEqual([]);
    expect(await s.qmp.execute("query-block-jobs")).toEqual([]);
    const notActive = { class: "DeviceNotActive", desc: "Block job 'nosuch' not found" };
    expect(await s.error("block-job-set-speed", { device: "nosuch", speed: 1 })).toEqual(notActive);
    expect(await s.error("block-job-cancel", { device: "nosuch" })).toEqual(notActive);
    expect(await s.error("block-job-pause", { device: "nosuch" })).toEqual(notActive);
    expect(await s.error("block-job-resume", { device: "nosuch" })).toEqual(notActive);
    expect(await s.error("block-job-complete", { device: "nosuch" })).toEqual(notActive);
    expect(await s.error("block-job-finalize", { id: "nosuch" })).toEqual(notActive);
    expect(await s.error("block-job-dismiss", { id: "nosuch" })).toEqual(notActive);
    for (const c of ["job-cancel", "job-pause", "job-resume", "job-complete", "job-finalize", "job-dismiss"])
      expect(await s.error(c, { id: "nosuch" })).toEqual(generic("Job not found"));
    expect(await s.error("block-job-set-speed", { device: "j", speed: "fast" })).toEqual(
      generic("Invalid parameter type for 'speed', expected: integer"),
    );
    expect(await s.error("block-job-cancel", { device: "j", force: "yes" })).toEqual(
      generic("Invalid parameter type for 'force', expected: boolean"),
    );
    expect(await s.error("block-job-cancel", { device: 7 })).toEqual(
      generic("Invalid parameter type for 'device', expected: string"),
    );
    expect(await s.error("job-cancel", {})).toEqual(generic("Parameter 'id' is missing"));
  });

  it("verbs reach JobManager and job events reach the monitor", async () => {
    await using s = await startSession();
    const mark = s.qmp.eventMark();
    const job = new WaitJob({ manager: s.daemon.jobs, id: "j0", type: "mirror" });
    job.start();
    await s.qmp.waitEvent("JOB_STATUS_CHANGE", { since: mark, where: (d) => d.status === "running" });
    expect(await s.qmp.execute("query-jobs")).toMatchObject([
      { id: "j0", type: "mirror", status: "running" },
    ]);
    expect(await s.qmp.execute("query-block-jobs")).toMatchObject([
      { device: "j0", type: "mirror", status: "running", paused: false, speed: 0 },
    ]);
    await s.qmp.execute("block-job-set-speed", { device: "j0", speed: 1024 });
    expect(await s.error("block-job-complete", { device: "j0" })).toEqual(
      generic("Job 'j0' in state 'running' cannot accept command verb 'complete'"),
    );
    await s.qmp.execute("job-pause", { id: "j0" });
    await s.qmp.waitEvent("JOB_STATUS_CHANGE", { since: mark, where: (d) => d.status === "paused" });
    expect(await s.error("block-job-cancel", { device: "j0" })).toEqual(
      generic("The block job for device 'j0' is currently paused"),
    );
    await s.qmp.execute("block-job-resume", { device: "j0" });
    const m2 = s.qmp.eventMark();
    await s.qmp.execute("job-cancel", { id: "j0" });
    await s.qmp.waitEvent("BLOCK_JOB_CANCELLED", { since: m2 });
    await s.qmp.waitEvent("JOB_STATUS_CHANGE", { since: m2, where: (d) => d.status === "null" });
    expect(await s.qmp.execute("query-jobs")).toEqual([]);
  });

  it("shutdown cancels running jobs", async () => {
    await using s = await startSession();
    const job = new WaitJob({ manager: s.daemon.jobs, id: "j1", type: "backup" });
    job.start();
    await s.daemon.close();
    expect((await job.outcome).status).toBe("cancelled");
  });
});
