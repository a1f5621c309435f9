/**
 * Speed limits (spec/jobs.md §1.7) on a manual clock: the copied rate stays within 5 % of the limit, set at
 * start or changed live, and raising the limit wakes a job sleeping on its rate limit at once.
 */
import { describe, expect, it } from "vitest";
import { BlockJob, type BlockJobOptions, defaultRateLimit } from "../src/index.ts";
import { setup } from "./helpers.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const SEC = 1e9;

/** Copies `chunk` bytes at a time forever, paying the rate limit after each chunk (like mirror/commit). */
class Copier extends BlockJob {
  copied = 0;
  readonly chunk: number;
  constructor(opts: Omit<BlockJobOptions, "type"> & { chunk: number }) {
    super({ ...opts, type: "commit" });
    this.chunk = opts.chunk;
  }
  protected async run(): Promise<void> {
    while (!this.isCancelled()) {
      this.copied += this.chunk;
      this.progressWorkDone(this.chunk);
      await this.rateLimit(this.chunk);
    }
  }
}

const within5 = (actual: number, target: number): void => {
  expect(Math.abs(actual - target) / target).toBeLessThan(0.05);
};

describe("speed limit", () => {
  it.each([
    [MiB, 64 * KiB],
    [4 * MiB, 64 * KiB],
    [10 * MiB, MiB],
    [100 * KiB, 4 * KiB],
  ])("holds %d B/s with %d-byte chunks over 10 s", async (speed, chunk) => {
    const { manager, clock } = setup();
    const job = new Copier({ manager, id: "c", speed, chunk });
    job.start();
    await clock.advance(10 * SEC);
    within5(job.copied / 10, speed);
    job.cancel();
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
  });

  it("a live change applies from then on", async () => {
    // timers fire 1 µs late, as real ones do: with exact wake-ups QEMU's slice would never restart and the
    // excess carried at the old speed would stall the job after lowering the limit
    const { manager, clock } = setup({ lateNs: 1000 });
    const job = new Copier({ manager, id: "c", speed: MiB, chunk: 64 * KiB });
    job.start();
    await clock.advance(5 * SEC);
    within5(job.copied / 5, MiB);
    manager.blockJobSetSpeed({ device: "c", speed: 4 * MiB });
    const mark = job.copied;
    await clock.advance(5 * SEC);
    within5((job.copied - mark) / 5, 4 * MiB);
    manager.blockJobSetSpeed({ device: "c", speed: 512 * KiB });
    const mark2 = job.copied;
    await clock.advance(10 * SEC);
    within5((job.copied - mark2) / 10, 512 * KiB);
    job.cancel({ force: true });
    await clock.advance(0);
    expect(job.status).toBe("null");
  });

  it("raising the limit wakes a job sleeping on its rate limit; lowering it does not", async () => {
    const { manager, clock } = setup();
    const job = new Copier({ manager, id: "c", speed: 1000, chunk: 10_000 });
    job.start(); // 10 s worth of quota dispatched: the job now sleeps ~10 s
    await clock.advance(0);
    expect(job.timerPending).toBe(true);
    const before = job.copied;
    manager.blockJobSetSpeed({ device: "c", speed: 500 });
    await clock.advance(0);
    expect(job.copied).toBe(before);
    manager.blockJobSetSpeed({ device: "c", speed: 0 });
    // woken at once; it still sleeps once (0 ns) per chunk: let a few such timers fire
    await clock.advance(0, 10);
    expect(job.copied).toBeGreaterThan(before);
    job.cancel();
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
  });

  it("paused jobs copy nothing; resume continues at the limit", async () => {
    const { manager, clock } = setup();
    const job = new Copier({ manager, id: "c", speed: MiB, chunk: 64 * KiB });
    job.start();
    await clock.advance(SEC);
    manager.jobPause({ id: "c" });
    await clock.advance(SEC); // reaches its pause point after the current sleep
    expect(job.status).toBe("paused");
    const mark = job.copied;
    await clock.advance(5 * SEC);
    expect(job.copied).toBe(mark);
    manager.jobResume({ id: "c" });
    await clock.advance(5 * SEC);
    within5((job.copied - mark) / 5, MiB);
    job.cancel();
    await clock.advance(0);
  });
});

describe("rate limiter", () => {
  it("the default is QEMU's slice limiter on the manager's clock; another one can be injected", async () => {
    const { manager, clock } = setup();
    const calls: [number, number][] = [];
    const rateLimit = {
      speed: 0,
      setSpeed(speed: number): void {
        this.speed = speed;
      },
      calculateDelay(n: number, now: number): number {
        calls.push([n, now]);
        return n === 0 ? 5e8 : 0;
      },
    };
    const job = new Copier({ manager, id: "c", speed: 1, chunk: 10, rateLimit });
    job.start();
    await clock.advance(0);
    expect(calls).toEqual([
      [10, 0],
      [0, 0],
    ]);
    job.cancel();
    await clock.advance(0);
    const d = defaultRateLimit(clock);
    d.setSpeed(1_048_576);
    expect(d.calculateDelay(65536, 0)).toBe(0);
    expect(d.calculateDelay(65536, 0)).toBeGreaterThan(0);
  });
});
