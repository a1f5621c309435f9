import { describe, expect, it } from "vitest";
import { isThrottleError, ManualClock, ThrottleConfig, ThrottleError, ThrottleGroup } from "../src/index.ts";
import { countIn, flush, runUntil, saturate } from "./sim.ts";

const MiB = 1024 * 1024;
const S = 1e9;
const MS = 1e6;

function group(limits: Parameters<typeof ThrottleConfig.fromLimits>[0], clock: ManualClock): ThrottleGroup {
  return new ThrottleGroup({ name: "tg0", config: ThrottleConfig.fromLimits(limits), clock });
}

/** Submits requests at the current instant and records their admission times. */
function burst(n: number, submit: () => Promise<void>, clock: ManualClock): number[] {
  const times: number[] = new Array<number>(n).fill(-1);
  for (let i = 0; i < n; i++) {
    void submit().then(() => {
      times[i] = clock.now();
    });
  }
  return times;
}

describe("ThrottleGroup: spec §8 vectors", () => {
  it("iops-total 100, 100 reads at once: 11 at t=0, the 12th at 10 ms, then one every 10 ms", async () => {
    const clock = new ManualClock();
    const m = group({ "iops-total": 100 }, clock).join();
    const times = burst(100, () => m.intercept(4096, false), clock);
    await runUntil(clock, 2 * S);
    expect(times).toEqual(times.map((_, k) => (k < 11 ? 0 : (k - 10) * 10 * MS)));
  });

  it("bps-total 1 MiB/s: a 4 MiB read at t=0 is admitted at once, the next after ≈ 3.90 s", async () => {
    const clock = new ManualClock();
    const m = group({ "bps-total": MiB }, clock).join();
    const times = burst(2, () => m.intercept(4 * MiB, false), clock);
    await runUntil(clock, 10 * S);
    expect(times[0]).toBe(0);
    expect(Math.abs((times[1] ?? 0) - 3.9 * S)).toBeLessThanOrEqual(1);
  });

  it("bps-total 1 MiB/s: eight 512 KiB reads, the last admitted at ≈ 3.4 s (measured 3.41 s)", async () => {
    const clock = new ManualClock();
    const m = group({ "bps-total": MiB }, clock).join();
    const times = burst(8, () => m.intercept(512 * 1024, false), clock);
    await runUntil(clock, 10 * S);
    expect(Math.abs((times[7] ?? 0) - 3.4 * S)).toBeLessThanOrEqual(8);
  });

  it("iops-total 100, max 200, max-length 5: ≈200 op/s for ≈ L·max/(max−avg) = 10 s, then 100 op/s", async () => {
    const clock = new ManualClock();
    const m = group({ "iops-total": 100, "iops-total-max": 200, "iops-total-max-length": 5 }, clock).join();
    const { admitted } = saturate({ member: m, clock, bytes: 4096, stopAt: 40 * S });
    await runUntil(clock, 40 * S);
    expect(Math.abs(countIn(admitted, 1 * S, 9 * S) / 8 - 200)).toBeLessThanOrEqual(2); // 1 %
    expect(Math.abs(countIn(admitted, 15 * S, 40 * S) / 25 - 100)).toBeLessThanOrEqual(1); // 1 %
    // the burst ends where the inter-admission gap switches from 5 ms to 10 ms
    const end = admitted.find((t, i) => i > 0 && t - (admitted[i - 1] ?? 0) > 7.5 * MS) ?? 0;
    expect(end / S).toBeGreaterThan(9.5);
    expect(end / S).toBeLessThan(10.5);
  });

  it("bps-write 1 MiB/s, max 4 MiB/s, max-length 3: 4 MiB/s for ≈ L·max/(max−avg) = 4 s, then 1 MiB/s", async () => {
    const clock = new ManualClock();
    const limits = { "bps-write": MiB, "bps-write-max": 4 * MiB, "bps-write-max-length": 3 };
    const m = group(limits, clock).join();
    const bytes = 64 * 1024;
    const { admitted } = saturate({ member: m, clock, bytes, isWrite: true, stopAt: 30 * S });
    await runUntil(clock, 30 * S);
    // the burst ends where the gap between admissions switches from 1/64 s (4 MiB/s) to 1/16 s (1 MiB/s)
    const end = admitted.find((t, i) => i > 0 && t - (admitted[i - 1] ?? 0) > 40 * MS) ?? 0;
    expect(end / S).toBeGreaterThan(3.8);
    expect(end / S).toBeLessThan(4.2);
    const during = countIn(admitted, 0.5 * S, end - 0.5 * S) / ((end - S) / S);
    expect(Math.abs((during * bytes) / (4 * MiB) - 1)).toBeLessThan(0.01);
    const after = countIn(admitted, end + S, 30 * S) / ((30 * S - end - S) / S);
    expect(Math.abs((after * bytes) / MiB - 1)).toBeLessThan(0.01);
  });

  it("two members with different request sizes: the sum is the group limit (±1 %), one timer at most", async () => {
    const clock = new ManualClock();
    const g = group({ "bps-total": 10 * MiB }, clock);
    const a = saturate({ member: g.join(), clock, bytes: 64 * 1024, depth: 4, stopAt: 60 * S });
    const b = saturate({ member: g.join(), clock, bytes: 16 * 1024, depth: 1, stopAt: 60 * S });
    let maxTimers = 0;
    await runUntil(clock, 60 * S, () => {
      const [r, w] = g.armedTimers;
      maxTimers = Math.max(maxTimers, r, w, clock.pendingTimers);
    });
    const aBytes = countIn(a.admitted, 0, 60 * S) * 64 * 1024;
    const bOps = countIn(b.admitted, 0, 60 * S);
    // round robin is per request (as in QEMU): the member with smaller requests gets fewer bytes, but turns
    expect(Math.abs(bOps / countIn(a.admitted, 0, 60 * S) - 1)).toBeLessThan(0.1);
    const total = aBytes + bOps * 16 * 1024;
    expect(Math.abs(total / (60 * 10 * MiB) - 1)).toBeLessThan(0.01);
    expect(maxTimers).toBeLessThanOrEqual(1);
  });

  it("two members saturating reads each get their equal share ± 10 %; the sum is the group limit (±1 %)", async () => {
    const clock = new ManualClock();
    const g = group({ "bps-read": 4 * MiB }, clock);
    const a = saturate({ member: g.join(), clock, bytes: 64 * 1024, depth: 8, stopAt: 30 * S });
    const b = saturate({ member: g.join(), clock, bytes: 64 * 1024, depth: 1, stopAt: 30 * S });
    await runUntil(clock, 30 * S, () => {
      expect(g.armedTimers[0]).toBeLessThanOrEqual(1);
    });
    const na = countIn(a.admitted, 0, 30 * S);
    const nb = countIn(b.admitted, 0, 30 * S);
    // each within 10 % of the equal share (na + nb) / 2, although a queues 8 requests and b only 1
    expect(Math.abs(na / ((na + nb) / 2) - 1)).toBeLessThan(0.1);
    expect(Math.abs(nb / ((na + nb) / 2) - 1)).toBeLessThan(0.1);
    expect(Math.abs(((na + nb) * 64 * 1024) / (30 * 4 * MiB) - 1)).toBeLessThan(0.01);
  });

  it("reconfigure while debt is accumulated: levels reset, the next request is admitted at once", async () => {
    const clock = new ManualClock();
    const g = group({ "bps-total": MiB }, clock);
    const m = g.join();
    await m.intercept(100 * MiB, true); // ~100 s of debt
    const times = burst(2, () => m.intercept(4096, true), clock);
    await runUntil(clock, 1 * S);
    expect(times).toEqual([-1, -1]);
    expect(m.queued(true)).toBe(2);
    g.setConfig(g.config); // unchanged limits: still resets
    await flush();
    expect(times).toEqual([1 * S, 1 * S]);
    expect(g.state.computeWait(true)).toBe(0);
  });
});

describe("ThrottleGroup: behaviour", () => {
  it("the long-run rate matches the limit within 1 % (bytes, ops, reads, writes)", async () => {
    for (const [limits, bytes, isWrite, perSecond] of [
      [{ "bps-total": 3 * MiB }, 64 * 1024, false, 48],
      [{ "bps-write": 5 * MiB }, 4096, true, 1280],
      [{ "iops-read": 250 }, 512, false, 250],
      [{ "iops-total": 1000, "iops-size": 8192 }, 32768, true, 250],
    ] as const) {
      const clock = new ManualClock();
      const m = group(limits, clock).join();
      const { admitted } = saturate({ member: m, clock, bytes, isWrite, depth: 3, stopAt: 100 * S });
      await runUntil(clock, 100 * S);
      const rate = countIn(admitted, 0, 100 * S) / 100;
      expect(Math.abs(rate / perSecond - 1)).toBeLessThan(0.01);
    }
  });

  it("reads and writes are throttled independently (read bucket spent, writes pass)", async () => {
    const clock = new ManualClock();
    const m = group({ "bps-read": MiB, "bps-write": MiB }, clock).join();
    await m.intercept(10 * MiB, false);
    const reads = burst(1, () => m.intercept(1, false), clock);
    const writes = burst(3, () => m.intercept(1000, true), clock);
    await flush();
    expect(writes).toEqual([0, 0, 0]);
    expect(reads).toEqual([-1]);
  });

  it("a request submitted when the budget is spent waits instead of overshooting", async () => {
    const clock = new ManualClock();
    const g = group({ "bps-total": MiB }, clock);
    const m = g.join();
    await m.intercept(MiB / 10, false); // exactly the bucket: level 0.1 MiB, no debt
    const times = burst(1, () => m.intercept(MiB, false), clock);
    await flush();
    expect(times).toEqual([0]); // level ≤ bucket: admitted
    const next = burst(1, () => m.intercept(1, false), clock);
    await runUntil(clock, 999 * MS);
    expect(next).toEqual([-1]); // level 1.1 MiB: must leak 1 MiB first
    await runUntil(clock, 1001 * MS);
    expect(Math.abs((next[0] ?? 0) - 1 * S)).toBeLessThanOrEqual(1);
  });

  it("keeps per-member FIFO order and accounts each request at admission", async () => {
    const clock = new ManualClock();
    const g = group({ "iops-write": 10 }, clock);
    const m = g.join();
    const order: number[] = [];
    for (let i = 0; i < 5; i++) {
      void m.intercept(1, true).then(() => order.push(i));
    }
    await flush();
    expect(order).toEqual([0, 1]); // a bucket of 1 op: levels 0 and 1 are ≤ 1
    expect(g.state.levels().level[5]).toBe(2); // OPS_WRITE: both accounted when admitted
    await runUntil(clock, 350 * MS);
    expect(order).toEqual([0, 1, 2, 3, 4]);
  });

  it("round robin: a member with one request is not stuck behind another member's long queue", async () => {
    const clock = new ManualClock();
    const g = group({ "iops-total": 10 }, clock);
    const busy = g.join();
    const quiet = g.join();
    const busyTimes = burst(20, () => busy.intercept(1, false), clock);
    await flush();
    const quietTimes = burst(2, () => quiet.intercept(1, false), clock);
    await runUntil(clock, 5 * S);
    // after the 2 immediate ones, turns alternate: busy (100 ms), quiet (200 ms), busy (300 ms), quiet (400 ms)
    expect(busyTimes.slice(0, 4)).toEqual([0, 0, 100 * MS, 300 * MS]);
    expect(quietTimes).toEqual([200 * MS, 400 * MS]);
    expect(busyTimes[19]).toBe(2000 * MS);
  });

  it("disableLimits admits queued requests at once and bypasses the limits until undone", async () => {
    const clock = new ManualClock();
    const g = group({ "iops-total": 10 }, clock);
    const m = g.join();
    const other = g.join();
    const times = burst(10, () => m.intercept(1, false), clock);
    const otherTimes = burst(1, () => other.intercept(1, false), clock);
    await flush();
    expect(times.filter((t) => t === 0)).toHaveLength(2);
    const undo = m.disableLimits();
    await flush();
    expect(times.every((t) => t === 0)).toBe(true);
    expect(m.queued(false)).toBe(0);
    await m.intercept(1, false); // bypasses
    expect(otherTimes).toEqual([-1]); // the other member still waits for its turn
    expect(() => m.leave()).not.toThrow();
    undo();
    undo();
    await runUntil(clock, 5 * S);
    expect(otherTimes[0]).toBeGreaterThan(0);
  });

  it("leave: EBUSY with queued requests; passes the turn on; rejects later intercepts", async () => {
    const clock = new ManualClock();
    const g = group({ "iops-total": 10 }, clock);
    const a = g.join();
    const b = g.join();
    expect(g.size).toBe(2);
    burst(5, () => a.intercept(1, false), clock);
    await flush();
    try {
      a.leave();
      expect.unreachable();
    } catch (e) {
      expect(isThrottleError(e, "EBUSY")).toBe(true);
    }
    await runUntil(clock, 2 * S);
    a.leave();
    a.leave(); // idempotent
    expect(a.left).toBe(true);
    expect(g.size).toBe(1);
    await expect(a.intercept(1, false)).rejects.toThrow(ThrottleError);
    await expect(b.intercept(-1, false)).rejects.toMatchObject({ code: "EINVAL" });
    const times = burst(3, () => b.intercept(1, false), clock);
    await runUntil(clock, 3 * S);
    expect(times.every((t) => t >= 2 * S)).toBe(true);
  });

  it("setConfig validates and changes nothing on failure", () => {
    const clock = new ManualClock();
    const g = group({ "iops-total": 10 }, clock);
    expect(() => g.setConfig(ThrottleConfig.fromLimits({ "iops-size": 1 }))).toThrow(
      "iops size requires an iops value to be set",
    );
    expect(g.config.toLimits()["iops-total"]).toBe(10);
    expect(
      () => new ThrottleGroup({ name: "x", config: ThrottleConfig.fromLimits({ "bps-read-max": 1 }) }),
    ).toThrow("bps_max/iops_max require corresponding bps/iops values");
  });

  it("a group without limits admits everything at once", async () => {
    const g = new ThrottleGroup({ name: "none" });
    const m = g.join();
    for (let i = 0; i < 1000; i++) await m.intercept(1 << 20, i % 2 === 0);
    expect(g.armedTimers).toEqual([0, 0]);
  });
});

describe("ThrottleGroup on the system clock", () => {
  it("delays with real timers: iops-total 100, the 12th of 12 requests after ≈ 10 ms", async () => {
    const g = new ThrottleGroup({ name: "real", config: ThrottleConfig.fromLimits({ "iops-total": 100 }) });
    const m = g.join();
    const t0 = performance.now();
    const all = Array.from({ length: 12 }, () => m.intercept(1, true));
    await Promise.all(all.slice(0, 11));
    expect(m.queued(true)).toBe(1);
    await all[11];
    expect(performance.now() - t0).toBeGreaterThanOrEqual(9);
    m.leave();
  });
});
