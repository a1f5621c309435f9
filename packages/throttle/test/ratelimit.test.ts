import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { isThrottleError, ManualClock, RATELIMIT_DEFAULT_SLICE_NS, RateLimit } from "../src/index.ts";

const MiB = 1024 * 1024;

describe("RateLimit", () => {
  it("computes QEMU's slice quota with a 100 ms default slice", () => {
    expect(RATELIMIT_DEFAULT_SLICE_NS).toBe(100_000_000);
    expect(new RateLimit({ speed: MiB }).sliceQuota).toBe(104857);
    expect(new RateLimit({ speed: 1 }).sliceQuota).toBe(1); // max(0.1, 1)
    expect(new RateLimit({ speed: 25 }).sliceQuota).toBe(2); // trunc(2.5)
    expect(new RateLimit({ speed: 1000, sliceNs: 1e9 }).sliceQuota).toBe(1000);
    expect(new RateLimit().sliceQuota).toBe(0);
  });

  it("lets the quota through, then stretches the slice by the excess", () => {
    const limit = new RateLimit({ speed: MiB });
    expect(limit.calculateDelay(65536, 0)).toBe(0);
    // 131072 / 104857 slices of 100 ms from the slice start
    expect(limit.calculateDelay(65536, 0)).toBe(Math.trunc((131072 / 104857) * 1e8));
    // asking later within the stretched slice: remaining time to its end
    expect(limit.calculateDelay(0, 50_000_000)).toBe(Math.trunc((131072 / 104857) * 1e8) - 50_000_000);
  });

  it("returns 0 while dispatched < quota and waits exactly at the quota", () => {
    const limit = new RateLimit({ speed: 1000, sliceNs: 1e9 });
    expect(limit.calculateDelay(999, 10)).toBe(0);
    expect(limit.calculateDelay(1, 10)).toBe(1e9); // slice_end = start (10) + 1 slice
  });

  it("starts a new slice once the (stretched) slice has ended", () => {
    const limit = new RateLimit({ speed: 1000, sliceNs: 1e9 });
    expect(limit.calculateDelay(3000, 0)).toBe(3e9); // stretched to 3 slices
    expect(limit.calculateDelay(0, 2e9)).toBe(1e9); // still inside
    // slice_end == now is not "ended" (strict <): 3010 units carried, stretched to 3.01 slices
    expect(limit.calculateDelay(10, 3e9)).toBe(1e7);
    // strictly after the end: a fresh slice
    expect(limit.calculateDelay(10, 3.01e9 + 1)).toBe(0);
    expect(limit.calculateDelay(990, 3.01e9 + 1)).toBe(1e9);
  });

  it("speed 0 is unlimited and accounts nothing", () => {
    const limit = new RateLimit({ speed: 0 });
    expect(limit.calculateDelay(1e12, 0)).toBe(0);
    limit.setSpeed(1000, 1e9);
    expect(limit.calculateDelay(500, 0)).toBe(0); // nothing was carried over
  });

  it("a live speed change keeps the slice and what was dispatched in it", () => {
    const limit = new RateLimit({ speed: 1000, sliceNs: 1e9 });
    expect(limit.calculateDelay(500, 0)).toBe(0);
    limit.setSpeed(250, 1e9);
    expect(limit.speed).toBe(250);
    // 500 + 0 dispatched against a quota of 250: 2 slices from the slice start
    expect(limit.calculateDelay(0, 100)).toBe(2e9 - 100);
    limit.setSpeed(0);
    expect(limit.calculateDelay(1e9, 100)).toBe(0);
  });

  it("uses its clock when no time is given", () => {
    const clock = new ManualClock(5);
    const limit = new RateLimit({ speed: 10, sliceNs: 1e9, clock });
    expect(limit.calculateDelay(20)).toBe(2e9);
    clock.advance(1e9);
    expect(limit.calculateDelay(0)).toBe(1e9);
  });

  it("rejects bad speeds and slices with EINVAL", () => {
    for (const bad of [() => new RateLimit({ speed: -1 }), () => new RateLimit({ speed: Number.NaN })]) {
      expect(bad).toThrow(expect.objectContaining({ code: "EINVAL" }));
    }
    expect(() => new RateLimit({ speed: 1, sliceNs: 0 })).toThrow(
      expect.objectContaining({ code: "EINVAL" }),
    );
    try {
      new RateLimit().setSpeed(Number.POSITIVE_INFINITY);
    } catch (e) {
      expect(isThrottleError(e, "EINVAL")).toBe(true);
    }
  });

  it("property: a client that sleeps the delays runs at the quota rate, never faster", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 10_000_000 }),
        fc.array(fc.integer({ min: 1, max: 4_000_000 }), { minLength: 1, maxLength: 200 }),
        (speed, chunks) => {
          const limit = new RateLimit({ speed });
          const perNs = limit.sliceQuota / limit.sliceNs; // the effective rate (quota is at least 1)
          let now = 0;
          let total = 0;
          for (const n of chunks) {
            total += n;
            now += limit.calculateDelay(n, now);
            // a client that is always ready keeps one slice going: after sleeping, what it sent is at most
            // the effective rate times the elapsed time, plus less than one quota not yet slept for
            expect(total).toBeLessThanOrEqual(perNs * now + limit.sliceQuota + 1);
            expect(total).toBeGreaterThanOrEqual(perNs * now - 1);
          }
        },
      ),
      { numRuns: Number(process.env.BLK_FUZZ_RUNS ?? 300) },
    );
  });
});
