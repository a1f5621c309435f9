/** The README example, kept runnable (only the import differs). */
import { expect, it } from "vitest";
import { BlockJob, JobManager } from "../src/index.ts";

it("README example", async () => {
  // --- README example start
  /** Fills a buffer in 64 KiB chunks: progress, pause points, a speed limit and an error policy. */
  class FillJob extends BlockJob {
    readonly data = new Uint8Array(1024 * 1024);
    protected async run(): Promise<void> {
      const chunk = 64 * 1024;
      this.progressSetRemaining(this.data.length);
      for (let off = 0; off < this.data.length && !this.isCancelled(); off += chunk) {
        await this.withErrorPolicy("report", "write", async () => {
          this.data.fill(0xab, off, off + chunk);
        });
        this.progressWorkDone(chunk);
        await this.rateLimit(chunk); // sleeps as the speed limit requires; also a pause point
      }
    }
  }

  const manager = new JobManager();
  const seen: string[] = [];
  manager.onEvent((e) => seen.push(e.event === "JOB_STATUS_CHANGE" ? e.data.status : e.event));

  const job = new FillJob({ manager, id: "fill0", type: "backup", speed: 64 * 1024 * 1024 });
  job.start();
  console.log(manager.queryBlockJobs()[0]?.status); // "running"
  const outcome = await job.outcome;
  console.log(outcome); // { status: "completed" }
  console.log(seen.join(" ")); // created running waiting pending BLOCK_JOB_COMPLETED concluded null
  // --- README example end

  expect(outcome).toEqual({ status: "completed" });
  expect(job.data.every((b) => b === 0xab)).toBe(true);
  expect(seen).toEqual([
    "created",
    "running",
    "waiting",
    "pending",
    "BLOCK_JOB_COMPLETED",
    "concluded",
    "null",
  ]);
});
