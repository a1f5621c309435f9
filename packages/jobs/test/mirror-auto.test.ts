/**
 * Mirror `x-blk-copy-mode: auto` (blk extension): a guest that dirties faster than a speed-limited copy
 * drains makes the job switch from background to write-blocking, after which it reaches READY and
 * completes with target == source; the same load keeps a background mirror from READY. All on the
 * manual clock: the guest writes a fixed amount per 100 ms of job time, the copy is limited to 1 MiB/s.
 */
import { describe, expect, it } from "vitest";
import { MIRROR_AUTO_WINDOW_NS, MIRROR_AUTO_WINDOWS, type MirrorJob, mirror } from "../src/index.ts";
import { KiB, MiB, type MirrorEnv, mirrorEnv, rng, sha } from "./mirror-helpers.ts";

const SIZE = 8 * MiB;
const SLICE = 100_000_000;

/** `n` whole-granule writes at random granules (sequentially awaited), recorded in the model. */
async function writeBurst(env: MirrorEnv, r: () => number, n: number, g: number): Promise<void> {
  for (let i = 0; i < n; i++) {
    const off = Math.floor(r() * (SIZE / g)) * g;
    const d = new Uint8Array(g).fill(1 + Math.floor(r() * 250));
    d[0] = i & 0xff;
    await env.guest.write(off, d);
    env.model.set(d, off);
  }
}

/**
 * Runs the guest (4 granules of 64 KiB per 100 ms: 2.5 MiB/s) against the job for at most `maxSteps`
 * steps of 100 ms, until `stop` holds.
 */
async function drive(
  env: MirrorEnv,
  job: MirrorJob,
  r: () => number,
  maxSteps: number,
  stop: () => boolean,
): Promise<number> {
  for (let step = 0; step < maxSteps; step++) {
    if (stop()) return step;
    await writeBurst(env, r, 4, 64 * KiB);
    await env.clock.advance(SLICE);
    if (job.isCompleted()) throw new Error(`job ended: ${String(job.error)}`);
  }
  return maxSteps;
}

async function start(env: MirrorEnv, mode: "auto" | "background"): Promise<MirrorJob> {
  return mirror(env.manager, env.graph, {
    "job-id": "m0",
    device: "src",
    target: "dst",
    sync: "full",
    granularity: 64 * KiB,
    speed: MiB,
    "x-blk-copy-mode": mode,
  });
}

describe("x-blk-copy-mode auto", () => {
  it("switches to write-blocking when the guest outpaces the copy, reaches READY, completes equal", async () => {
    const env = await mirrorEnv({ size: SIZE, seed: 4 });
    const job = await start(env, "auto");
    expect(job.requestedCopyMode).toBe("auto");
    expect(job.copyMode).toBe("background");
    expect(env.manager.queryJobs({ extensions: true })[0]).toMatchObject({ "x-blk-copy-mode": "background" });
    const r = rng(9);
    const steps = await drive(env, job, r, 600, () => job.copyMode === "write-blocking");
    expect(job.copyMode).toBe("write-blocking");
    const switchedAt = job.autoSwitchedAt ?? -1;
    // at least the windows the rule needs went by, and it was not READY before
    expect(switchedAt).toBeGreaterThanOrEqual(MIRROR_AUTO_WINDOWS * MIRROR_AUTO_WINDOW_NS);
    expect(steps).toBeLessThan(600);
    const atSwitch = env.manager.queryJobs({ extensions: true })[0];
    expect(atSwitch).toMatchObject({ status: "running", "x-blk-copy-mode": "write-blocking" });
    // the copy ran at its speed limit; the guest dirtied at least nearly as much
    const rates = job.rates;
    expect(rates).toBeDefined();
    expect(rates?.copy).toBeGreaterThan(0.7 * MiB);
    expect(rates?.copy).toBeLessThan(1.4 * MiB);
    expect(atSwitch?.["x-blk-copy-rate"]).toBe(Math.round(rates?.copy ?? 0));
    expect(atSwitch?.["x-blk-dirty-rate"]).toBe(Math.round(rates?.dirty ?? 0));
    // the backlog now only shrinks: READY follows while the guest keeps writing at the same pace
    await drive(env, job, r, 600, () => job.status === "ready");
    expect(job.status).toBe("ready");
    const atReady = env.manager.queryJobs({ extensions: true })[0];
    expect(atReady?.["x-blk-eta-seconds"]).toBe(0);
    await writeBurst(env, r, 8, 64 * KiB);
    job.complete();
    await env.clock.advance(SLICE);
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(env.guest.child).toBe(env.dst);
    expect(sha(await env.mem(env.dst).snapshot())).toBe(sha(env.model));
  });

  it("the same guest keeps a background mirror from READY", async () => {
    const env = await mirrorEnv({ size: SIZE, seed: 4 });
    const job = await start(env, "background");
    const r = rng(9);
    // 50 s of job time: more than twice what auto needed to switch and drain (about 21 s)
    const steps = await drive(env, job, r, 500, () => job.status === "ready");
    expect(steps).toBe(500);
    expect(job.status).toBe("running");
    expect(job.copyMode).toBe("background");
    const info = env.manager.queryJobs({ extensions: true })[0];
    // the backlog stays: the dirty rate keeps up with the copy rate
    expect((info?.["total-progress"] ?? 0) - (info?.["current-progress"] ?? 0)).toBeGreaterThan(MiB);
    expect(info?.["x-blk-dirty-rate"]).toBeGreaterThan(0.5 * MiB);
    job.cancel();
    await env.clock.advance(SLICE);
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
  });

  it("a guest that converges anyway (one hot granule) does not make auto switch", async () => {
    const env = await mirrorEnv({ size: SIZE, seed: 5 });
    const job = await mirror(env.manager, env.graph, {
      "job-id": "m0",
      device: "src",
      target: "dst",
      sync: "full",
      granularity: 64 * KiB,
      speed: 4 * MiB,
      "x-blk-copy-mode": "auto",
    });
    let step = 0;
    for (; step < 400 && job.status !== "ready"; step++) {
      for (let i = 0; i < 8; i++) {
        const d = new Uint8Array(4096).fill(1 + ((step + i) % 250));
        await env.guest.write(MiB, d);
        env.model.set(d, MiB);
      }
      await env.clock.advance(SLICE);
    }
    expect(job.status).toBe("ready");
    expect(job.copyMode).toBe("background");
    job.complete();
    await env.clock.advance(SLICE);
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(sha(await env.mem(env.dst).snapshot())).toBe(sha(env.model));
  });

  it("refuses copy-mode and x-blk-copy-mode that disagree", async () => {
    const env = await mirrorEnv({});
    await expect(
      mirror(env.manager, env.graph, {
        "job-id": "m0",
        device: "src",
        target: "dst",
        sync: "full",
        "copy-mode": "background",
        "x-blk-copy-mode": "auto",
      }),
    ).rejects.toThrow("'copy-mode' and 'x-blk-copy-mode' disagree: give one of them");
    expect(env.guest.child).toBe(env.src);
  });
});
