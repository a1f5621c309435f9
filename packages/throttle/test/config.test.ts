import { describe, expect, it } from "vitest";
import {
  BucketType,
  isThrottleError,
  THROTTLE_LIMITS_KEYS,
  ThrottleConfig,
  ThrottleError,
  type ThrottleLimits,
} from "../src/index.ts";

/** The message `validate()` throws for these limits, or undefined when they are valid. */
function failure(limits: ThrottleLimits): string | undefined {
  try {
    ThrottleConfig.fromLimits(limits).validate();
    return undefined;
  } catch (e) {
    expect(isThrottleError(e, "EINVAL")).toBe(true);
    return (e as ThrottleError).message;
  }
}

const M1 = "bps/iops/max total values and read/write values cannot be used at the same time";
const M2 = "iops size requires an iops value to be set";
const M3a = "bps/iops/max values must be within [0, 1000000000000000]";
const M3b = "the burst length cannot be 0";
const M3c = "burst length set without burst rate";
const M3d = "burst length too high for this burst rate";
const M3e = "bps_max/iops_max require corresponding bps/iops values";
const M3f = "bps_max/iops_max cannot be lower than bps/iops";

describe("ThrottleConfig.fromLimits / toLimits", () => {
  it("maps every ThrottleLimits member to its bucket field", () => {
    const limits: ThrottleLimits = {};
    THROTTLE_LIMITS_KEYS.forEach((k, i) => {
      (limits as Record<string, number>)[k] = i + 1;
    });
    const cfg = ThrottleConfig.fromLimits(limits);
    expect(cfg.bucket(BucketType.OPS_TOTAL)).toEqual({ avg: 1, max: 2, burstLength: 3 });
    expect(cfg.bucket(BucketType.OPS_READ)).toEqual({ avg: 4, max: 5, burstLength: 6 });
    expect(cfg.bucket(BucketType.OPS_WRITE)).toEqual({ avg: 7, max: 8, burstLength: 9 });
    expect(cfg.bucket(BucketType.BPS_TOTAL)).toEqual({ avg: 10, max: 11, burstLength: 12 });
    expect(cfg.bucket(BucketType.BPS_READ)).toEqual({ avg: 13, max: 14, burstLength: 15 });
    expect(cfg.bucket(BucketType.BPS_WRITE)).toEqual({ avg: 16, max: 17, burstLength: 18 });
    expect(cfg.opSize).toBe(19);
    expect(cfg.toLimits()).toEqual(limits);
    expect(Object.keys(cfg.toLimits())).toEqual(THROTTLE_LIMITS_KEYS);
  });

  it("defaults: everything off, burst lengths 1, all 19 members reported", () => {
    const l = new ThrottleConfig().toLimits();
    expect(Object.keys(l)).toHaveLength(19);
    expect(l["bps-total-max-length"]).toBe(1);
    expect(l["iops-size"]).toBe(0);
    expect(l["bps-total"]).toBe(0);
    expect(new ThrottleConfig().isEnabled()).toBe(false);
    expect(ThrottleConfig.fromLimits({ "iops-write": 1 }).isEnabled()).toBe(true);
    expect(ThrottleConfig.fromLimits({ "iops-write-max": 1 }).isEnabled()).toBe(false);
  });

  it("merges only the members present", () => {
    const base = ThrottleConfig.fromLimits({ "bps-total": 100, "iops-total": 10, "iops-size": 4096 });
    const merged = base.merge({ "iops-total": 20 });
    expect(merged.toLimits()).toMatchObject({ "bps-total": 100, "iops-total": 20, "iops-size": 4096 });
    expect(base.bucket(BucketType.OPS_TOTAL).avg).toBe(10); // immutable
    expect(merged.equals(base)).toBe(false);
    expect(merged.equals(base.merge({ "iops-total": 20 }))).toBe(true);
  });

  it("rejects a max-length above UINT_MAX with the member's name, first in bucket order", () => {
    expect(() => ThrottleConfig.fromLimits({ "bps-total-max-length": 4294967296 })).toThrow(
      "bps-total-max-length value must be in the range [0, 4294967295]",
    );
    expect(() =>
      ThrottleConfig.fromLimits({ "iops-total-max-length": 2 ** 40, "bps-write-max-length": 2 ** 40 }),
    ).toThrow("bps-write-max-length value must be in the range [0, 4294967295]");
    expect(() => ThrottleConfig.fromLimits({ "iops-write-max-length": 2 ** 33 })).toThrow(
      "iops-write-max-length value must be in the range [0, 4294967295]",
    );
    expect(ThrottleConfig.fromLimits({ "bps-read-max-length": 4294967295 }).bucket(1).burstLength).toBe(
      4294967295,
    );
  });

  it("rejects non-integers with EINVAL", () => {
    expect(() => ThrottleConfig.fromLimits({ "bps-total": 1.5 })).toThrow(ThrottleError);
    expect(() => ThrottleConfig.fromLimits({ "iops-size": Number.NaN })).toThrow(ThrottleError);
  });
});

describe("ThrottleConfig.validate: QEMU's checks, messages and order", () => {
  it("accepts valid configurations", () => {
    expect(failure({})).toBeUndefined();
    expect(failure({ "bps-total": 1, "iops-read": 5, "iops-write": 6 })).toBeUndefined();
    expect(failure({ "iops-total": 100, "iops-total-max": 200, "iops-total-max-length": 5 })).toBeUndefined();
    expect(failure({ "iops-read": 10, "iops-size": 4096 })).toBeUndefined();
    expect(failure({ "bps-total": 1e15, "bps-total-max": 1e15 })).toBeUndefined();
    expect(failure({ "bps-total": 1, "bps-total-max": 1e6, "bps-total-max-length": 1e9 })).toBeUndefined();
    expect(
      failure({ "bps-total": 1, "bps-total-max": 1, "bps-total-max-length": 4294967295 }),
    ).toBeUndefined();
  });

  it("#1 total and read/write at the same time (avg and max, bps and iops)", () => {
    expect(failure({ "bps-total": 1, "bps-read": 1 })).toBe(M1);
    expect(failure({ "bps-total": 1, "bps-write": 1 })).toBe(M1);
    expect(failure({ "iops-total": 1, "iops-read": 1 })).toBe(M1);
    expect(failure({ "iops-total": 1, "iops-write": 1 })).toBe(M1);
    expect(failure({ "bps-total-max": 1, "bps-read-max": 1 })).toBe(M1);
    expect(failure({ "iops-total-max": 1, "iops-write-max": 1 })).toBe(M1);
    // different kinds do not clash
    expect(failure({ "bps-total": 1, "iops-read": 1 })).toBeUndefined();
  });

  it("#2 iops-size without an iops value", () => {
    expect(failure({ "iops-size": 4096 })).toBe(M2);
    expect(failure({ "iops-size": 4096, "bps-total": 10 })).toBe(M2);
    expect(failure({ "iops-size": 4096, "iops-total-max": 10 })).toBe(M2);
  });

  it("#3 per bucket: range, burst length 0, length without rate, length too high, max without avg, max < avg", () => {
    expect(failure({ "bps-total": 1e15 + 1 })).toBe(M3a);
    expect(failure({ "iops-write": 1, "iops-write-max": 1e15 + 1 })).toBe(M3a);
    expect(failure({ "bps-total": -1 })).toBe(M3a); // negative: a huge unsigned value
    expect(failure({ "iops-read-max": -5 })).toBe(M3a);
    expect(failure({ "bps-total-max-length": 0 })).toBe(M3b);
    expect(failure({ "bps-total": 10, "bps-total-max-length": 2 })).toBe(M3c);
    expect(failure({ "bps-total": 10, "bps-total-max": 1e6, "bps-total-max-length": 1e9 + 1 })).toBe(M3d);
    expect(failure({ "bps-total": 10, "bps-total-max": 1e6, "bps-total-max-length": 1e9 })).toBeUndefined();
    expect(failure({ "bps-total": 10, "bps-total-max": 20, "bps-total-max-length": -1 })).toBe(M3d);
    expect(failure({ "iops-total-max-length": -1 })).toBe(M3c); // huge length, no rate
    expect(failure({ "bps-write-max": 20 })).toBe(M3e);
    expect(failure({ "iops-total": 100, "iops-total-max": 50 })).toBe(M3f);
  });

  it("runs the checks in QEMU's order: #1 before #2 before the bucket checks, buckets in index order", () => {
    // #1 wins over #2 and #3
    expect(failure({ "bps-total": 1, "bps-read": 1, "iops-size": 1, "iops-total-max": 5 })).toBe(M1);
    // #2 wins over #3
    expect(failure({ "iops-size": 1, "bps-total-max": 5, "bps-write": 1e16 })).toBe(M2);
    // within a bucket: range before length 0 before the rest
    expect(failure({ "bps-total": 1e16, "bps-total-max-length": 0 })).toBe(M3a);
    expect(failure({ "bps-total-max-length": 0, "bps-total-max": 5 })).toBe(M3b);
    expect(failure({ "bps-total-max-length": 3, "bps-total": 5 })).toBe(M3c);
    expect(failure({ "bps-total-max": 1e7, "bps-total-max-length": 1e9 })).toBe(M3d);
    expect(failure({ "bps-total-max": 1e7, "bps-total": 2e7, "bps-total-max-length": 1e9 })).toBe(M3d);
    expect(failure({ "bps-total-max": 10 })).toBe(M3e);
    // bucket order: BPS_TOTAL(0) … OPS_WRITE(5); an earlier bucket's failure wins
    expect(failure({ "iops-total-max": 10, "bps-write": 100, "bps-write-max": 50 })).toBe(M3f); // bucket 2 < 3
    expect(failure({ "iops-write-max": 10, "bps-read": 1e16 })).toBe(M3a); // bucket 1 < 5
    expect(failure({ "bps-read-max-length": 0, "bps-total-max": 10 })).toBe(M3e); // bucket 0 < 1
  });
});
