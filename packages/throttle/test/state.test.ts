import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { BucketType, ManualClock, ThrottleConfig, ThrottleError, ThrottleState } from "../src/index.ts";

const MiB = 1024 * 1024;

describe("ThrottleState", () => {
  it("iops-total 100: 11 requests fit at once, the 12th waits 10 ms", () => {
    const clock = new ManualClock();
    const ts = new ThrottleState(ThrottleConfig.fromLimits({ "iops-total": 100 }), clock);
    for (let i = 0; i < 11; i++) {
      expect(ts.computeWait(false)).toBe(0);
      ts.account(false, 512);
    }
    expect(ts.computeWait(false)).toBe(10_000_000);
    expect(ts.computeWait(true)).toBe(10_000_000); // the total bucket is shared by both directions
    clock.advance(10_000_000);
    expect(ts.computeWait(false)).toBe(0);
  });

  it("bps-total 1 MiB/s: a 4 MiB request passes, the next waits (4 MiB − 0.1 MiB) / 1 MiB/s ≈ 3.9 s", () => {
    const clock = new ManualClock(1e12);
    const ts = new ThrottleState(ThrottleConfig.fromLimits({ "bps-total": MiB }), clock);
    expect(ts.computeWait(false)).toBe(0);
    ts.account(false, 4 * MiB);
    const wait = ts.computeWait(false);
    expect(Math.abs(wait - ((4 * MiB - MiB / 10) / MiB) * 1e9)).toBeLessThanOrEqual(1);
    clock.advance(wait - 1000);
    expect(ts.computeWait(true)).toBeGreaterThan(0);
    clock.advance(1000);
    expect(ts.computeWait(true)).toBe(0);
  });

  it("directions: reads charge read buckets only, writes write buckets only", () => {
    const clock = new ManualClock();
    const ts = new ThrottleState(ThrottleConfig.fromLimits({ "bps-read": 1000, "iops-write": 10 }), clock);
    ts.account(false, 5000);
    expect(ts.computeWait(false)).toBe(4_900_000_000);
    expect(ts.computeWait(true)).toBe(0);
    const l = ts.levels();
    expect(l.level[BucketType.BPS_READ]).toBe(5000);
    expect(l.level[BucketType.BPS_WRITE]).toBe(0);
    expect(l.level[BucketType.OPS_READ]).toBe(1);
    expect(l.level[BucketType.BPS_TOTAL]).toBe(5000); // charged even though that bucket is off (QEMU does)
  });

  it("iops-size: a request counts bytes / iops-size operations when larger, else one", () => {
    const ts = new ThrottleState(
      ThrottleConfig.fromLimits({ "iops-total": 100, "iops-size": 4096 }),
      new ManualClock(),
    );
    ts.account(true, 65536);
    expect(ts.levels().level[BucketType.OPS_TOTAL]).toBe(16);
    ts.account(true, 512);
    expect(ts.levels().level[BucketType.OPS_TOTAL]).toBe(17);
    ts.account(true, 6144);
    expect(ts.levels().level[BucketType.OPS_TOTAL]).toBe(18.5);
  });

  it("burst: max with length 1 lets `max` units through at once, then the average rate", () => {
    const clock = new ManualClock();
    const ts = new ThrottleState(
      ThrottleConfig.fromLimits({ "iops-total": 10, "iops-total-max": 50 }),
      clock,
    );
    let n = 0;
    while (ts.computeWait(false) === 0) {
      ts.account(false, 1);
      n++;
    }
    expect(n).toBe(51); // levels 0…50 are ≤ the 50-op bucket
    expect(ts.computeWait(false)).toBe(100_000_000); // 1 op over at 10 op/s
  });

  it("burst with length > 1: the burst bucket (max/10) limits the pace to `max`", () => {
    const clock = new ManualClock();
    const ts = new ThrottleState(
      ThrottleConfig.fromLimits({ "iops-total": 100, "iops-total-max": 200, "iops-total-max-length": 5 }),
      clock,
    );
    let n = 0;
    while (ts.computeWait(false) === 0) {
      ts.account(false, 1);
      n++;
    }
    expect(n).toBe(21); // burst levels 0…20 are ≤ 200/10
    expect(ts.computeWait(false)).toBe(5_000_000); // 1 op over at 200 op/s
    expect(ts.levels().burstLevel[BucketType.OPS_TOTAL]).toBe(21);
  });

  it("setConfig resets every level: accumulated debt is forgotten", () => {
    const clock = new ManualClock();
    const cfg = ThrottleConfig.fromLimits({ "bps-total": 1000 });
    const ts = new ThrottleState(cfg, clock);
    ts.account(true, 1e6);
    expect(ts.computeWait(true)).toBeGreaterThan(0);
    ts.setConfig(cfg); // even unchanged
    expect(ts.computeWait(true)).toBe(0);
    expect(ts.levels().level.every((v) => v === 0)).toBe(true);
  });

  it("setConfig validates first and leaves the state unchanged on failure", () => {
    const clock = new ManualClock();
    const ts = new ThrottleState(ThrottleConfig.fromLimits({ "bps-total": 1000 }), clock);
    ts.account(true, 1e6);
    expect(() => ts.setConfig(ThrottleConfig.fromLimits({ "bps-total": 1, "bps-read": 1 }))).toThrow(
      ThrottleError,
    );
    expect(ts.config.bucket(BucketType.BPS_TOTAL).avg).toBe(1000);
    expect(ts.computeWait(true)).toBeGreaterThan(0);
    expect(() => ts.account(true, -1)).toThrow(ThrottleError);
  });

  it("property: a client admitting only when computeWait is 0 never overshoots avg × t + bucket", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 10_000_000 }), // avg
        fc.option(fc.tuple(fc.integer({ min: 1, max: 4 }), fc.integer({ min: 1, max: 20 }))), // max factor, length
        fc.array(fc.integer({ min: 1, max: 2_000_000 }), { minLength: 1, maxLength: 100 }),
        (avg, burst, sizes) => {
          const clock = new ManualClock();
          const max = burst === null ? 0 : avg * burst[0];
          const length = burst === null ? 1 : burst[0] === 1 ? 1 : burst[1];
          const limits =
            burst === null
              ? { "bps-write": avg }
              : { "bps-write": avg, "bps-write-max": max, "bps-write-max-length": length };
          const ts = new ThrottleState(ThrottleConfig.fromLimits(limits), clock);
          const bucket = max === 0 ? avg / 10 : max * length;
          let sent = 0;
          for (const size of sizes) {
            for (let w = ts.computeWait(true); w > 0; w = ts.computeWait(true)) clock.advance(w);
            // admitted now: what was sent before fits in what leaked plus the bucket
            expect(sent).toBeLessThanOrEqual((avg * clock.now()) / 1e9 + bucket + 1e-6 * sent + 1);
            ts.account(true, size);
            sent += size;
          }
        },
      ),
      { numRuns: Number(process.env.BLK_FUZZ_RUNS ?? 300) },
    );
  });
});
