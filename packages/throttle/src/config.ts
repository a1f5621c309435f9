import { ThrottleError } from "./errors.ts";

/**
 * Bucket indexes, in QEMU's order (`BucketType`): bytes per second total/read/write, then operations per
 * second total/read/write.
 */
export const BucketType = {
  BPS_TOTAL: 0,
  BPS_READ: 1,
  BPS_WRITE: 2,
  OPS_TOTAL: 3,
  OPS_READ: 4,
  OPS_WRITE: 5,
} as const;
/** A bucket index (0…5). */
export type BucketType = (typeof BucketType)[keyof typeof BucketType];

/** Number of buckets. */
export const BUCKETS_COUNT = 6;

/** Largest accepted `avg` or `max` (QEMU's `THROTTLE_VALUE_MAX`, 1e15). */
export const THROTTLE_VALUE_MAX = 1_000_000_000_000_000;

/** Largest accepted `*-max-length` (`UINT_MAX`). */
export const THROTTLE_BURST_LENGTH_MAX = 4_294_967_295;

/**
 * QEMU's `ThrottleLimits` (QAPI `block-core.json`, also the `limits` property of a `throttle-group`
 * object): all members optional integers. Units are bytes or operations per second; `*-max` are burst
 * rates, `*-max-length` burst lengths in seconds (default 1), `iops-size` the size of one operation in
 * bytes (0: every request is one operation).
 */
export interface ThrottleLimits {
  "iops-total"?: number;
  "iops-total-max"?: number;
  "iops-total-max-length"?: number;
  "iops-read"?: number;
  "iops-read-max"?: number;
  "iops-read-max-length"?: number;
  "iops-write"?: number;
  "iops-write-max"?: number;
  "iops-write-max-length"?: number;
  "bps-total"?: number;
  "bps-total-max"?: number;
  "bps-total-max-length"?: number;
  "bps-read"?: number;
  "bps-read-max"?: number;
  "bps-read-max-length"?: number;
  "bps-write"?: number;
  "bps-write-max"?: number;
  "bps-write-max-length"?: number;
  "iops-size"?: number;
}

/** The member names of {@link ThrottleLimits}, in QAPI order (the order `qom-get limits` returns them). */
export const THROTTLE_LIMITS_KEYS: readonly (keyof ThrottleLimits)[] = [
  "iops-total",
  "iops-total-max",
  "iops-total-max-length",
  "iops-read",
  "iops-read-max",
  "iops-read-max-length",
  "iops-write",
  "iops-write-max",
  "iops-write-max-length",
  "bps-total",
  "bps-total-max",
  "bps-total-max-length",
  "bps-read",
  "bps-read-max",
  "bps-read-max-length",
  "bps-write",
  "bps-write-max",
  "bps-write-max-length",
  "iops-size",
];

/** The `ThrottleLimits` name prefix of each bucket, by bucket index. */
export const BUCKET_NAMES: readonly string[] = [
  "bps-total",
  "bps-read",
  "bps-write",
  "iops-total",
  "iops-read",
  "iops-write",
];

/** The configuration of one leaky bucket. */
export interface BucketConfig {
  /** Average rate, units per second; 0 turns the bucket off. */
  readonly avg: number;
  /** Burst rate, units per second; 0 means no burst rate. */
  readonly max: number;
  /** Burst length in seconds (default 1). */
  readonly burstLength: number;
}

/** Options for the {@link ThrottleConfig} constructor. */
export interface ThrottleConfigInit {
  /** Up to six bucket configurations by index; missing fields default to 0 (`burstLength` to 1). */
  buckets?: readonly (Partial<BucketConfig> | undefined)[];
  /** `iops-size` in bytes (default 0). */
  opSize?: number;
}

const U64 = 2 ** 64;
/** QEMU keeps these values unsigned: a negative int64 arrives as a huge uint64. */
const u64 = (v: number): number => (v < 0 ? v + U64 : v);

function checkNumber(name: string, v: number): void {
  if (!Number.isInteger(v)) {
    throw new ThrottleError("EINVAL", `Invalid parameter type for '${name}', expected: integer`);
  }
}

/**
 * A throttling configuration: six {@link BucketConfig}s (index order of {@link BucketType}) and the
 * operation size. Immutable; build one with {@link ThrottleConfig.fromLimits} or the constructor, derive
 * changed copies with {@link ThrottleConfig.merge}. Values are kept as given (negative values are allowed
 * here and rejected by {@link ThrottleConfig.validate}, as QEMU rejects them after reading them as
 * unsigned).
 * @example
 * const cfg = ThrottleConfig.fromLimits({ "bps-total": 10 * 1024 * 1024, "iops-total": 1000 });
 * cfg.validate();
 * cfg.isEnabled(); // true
 */
export class ThrottleConfig {
  /** The six buckets, by {@link BucketType} index. */
  readonly buckets: readonly BucketConfig[];
  /** `iops-size` in bytes; 0: every request counts as one operation. */
  readonly opSize: number;

  /** Builds a configuration from bucket values (not validated; see {@link ThrottleConfig.validate}). */
  constructor(init: ThrottleConfigInit = {}) {
    const buckets: BucketConfig[] = [];
    for (let i = 0; i < BUCKETS_COUNT; i++) {
      const b = init.buckets?.[i];
      buckets.push(Object.freeze({ avg: b?.avg ?? 0, max: b?.max ?? 0, burstLength: b?.burstLength ?? 1 }));
    }
    this.buckets = Object.freeze(buckets);
    this.opSize = init.opSize ?? 0;
  }

  /**
   * Builds a configuration from `ThrottleLimits`, applying only the members present on top of `base`
   * (default: everything off, burst lengths 1) — QEMU's `throttle_limits_to_config`. Does not validate:
   * call {@link ThrottleConfig.validate}.
   * @throws {ThrottleError} EINVAL `bps-total-max-length value must be in the range [0, 4294967295]` (with
   * the member's name; checked in bucket order) for a burst length above `UINT_MAX`, or when a member is not
   * an integer.
   */
  static fromLimits(limits: ThrottleLimits, base: ThrottleConfig = EMPTY): ThrottleConfig {
    const lim = limits as Readonly<Record<string, number | undefined>>;
    for (const key of THROTTLE_LIMITS_KEYS) {
      const v = lim[key];
      if (v !== undefined) checkNumber(key, v);
    }
    const buckets = base.buckets.map((b) => ({ ...b }));
    for (const [i, name] of BUCKET_NAMES.entries()) {
      const v = lim[name];
      const b = buckets[i];
      if (v !== undefined && b !== undefined) b.avg = v;
    }
    for (const [i, name] of BUCKET_NAMES.entries()) {
      const v = lim[`${name}-max`];
      const b = buckets[i];
      if (v !== undefined && b !== undefined) b.max = v;
    }
    for (const [i, name] of BUCKET_NAMES.entries()) {
      const key = `${name}-max-length`;
      const v = lim[key];
      const b = buckets[i];
      if (v === undefined || b === undefined) continue;
      if (v > THROTTLE_BURST_LENGTH_MAX) {
        throw new ThrottleError(
          "EINVAL",
          `${key} value must be in the range [0, ${THROTTLE_BURST_LENGTH_MAX}]`,
        );
      }
      b.burstLength = v;
    }
    return new ThrottleConfig({ buckets, opSize: lim["iops-size"] ?? base.opSize });
  }

  /** This configuration with the members present in `limits` changed (see {@link ThrottleConfig.fromLimits}). */
  merge(limits: ThrottleLimits): ThrottleConfig {
    return ThrottleConfig.fromLimits(limits, this);
  }

  /**
   * All 19 `ThrottleLimits` members, in QAPI order (QEMU's `throttle_config_to_limits`; what
   * `qom-get limits` returns).
   */
  toLimits(): Required<ThrottleLimits> {
    const out: Record<string, number> = {};
    for (const key of THROTTLE_LIMITS_KEYS) {
      if (key === "iops-size") {
        out[key] = this.opSize;
        continue;
      }
      const m = /^(.*?)(-max)?(-length)?$/.exec(key);
      const i = BUCKET_NAMES.indexOf(m?.[1] ?? "");
      const b = this.buckets[i];
      if (b === undefined) continue;
      out[key] = m?.[3] !== undefined ? b.burstLength : m?.[2] !== undefined ? b.max : b.avg;
    }
    return out as Required<ThrottleLimits>;
  }

  /** True when any bucket has an average rate (QEMU's `throttle_enabled`). */
  isEnabled(): boolean {
    return this.buckets.some((b) => b.avg > 0);
  }

  /**
   * The bucket of `type`.
   * @throws {ThrottleError} EINVAL for an index outside 0…5.
   */
  bucket(type: number): BucketConfig {
    const b = this.buckets[type];
    if (b === undefined) throw new ThrottleError("EINVAL", `no bucket ${type}`);
    return b;
  }

  /**
   * Checks the configuration as QEMU's `throttle_is_valid` does, in QEMU's order, and throws the first
   * failure with QEMU's exact message:
   * 1. `bps/iops/max total values and read/write values cannot be used at the same time`
   * 2. `iops size requires an iops value to be set`
   * 3. then per bucket in index order: `bps/iops/max values must be within [0, 1000000000000000]`,
   *    `the burst length cannot be 0`, `burst length set without burst rate`,
   *    `burst length too high for this burst rate`,
   *    `bps_max/iops_max require corresponding bps/iops values`,
   *    `bps_max/iops_max cannot be lower than bps/iops`.
   *
   * Negative values are read as unsigned 64-bit numbers, as QEMU reads them.
   * @throws {ThrottleError} EINVAL with QEMU's message.
   */
  validate(): void {
    const avg = (t: number): number => u64(this.bucket(t).avg);
    const max = (t: number): number => u64(this.bucket(t).max);
    const { BPS_TOTAL, BPS_READ, BPS_WRITE, OPS_TOTAL, OPS_READ, OPS_WRITE } = BucketType;
    const bps = avg(BPS_TOTAL) !== 0 && (avg(BPS_READ) !== 0 || avg(BPS_WRITE) !== 0);
    const ops = avg(OPS_TOTAL) !== 0 && (avg(OPS_READ) !== 0 || avg(OPS_WRITE) !== 0);
    const bpsMax = max(BPS_TOTAL) !== 0 && (max(BPS_READ) !== 0 || max(BPS_WRITE) !== 0);
    const opsMax = max(OPS_TOTAL) !== 0 && (max(OPS_READ) !== 0 || max(OPS_WRITE) !== 0);
    if (bps || ops || bpsMax || opsMax) {
      throw new ThrottleError(
        "EINVAL",
        "bps/iops/max total values and read/write values cannot be used at the same time",
      );
    }
    if (u64(this.opSize) !== 0 && avg(OPS_TOTAL) === 0 && avg(OPS_READ) === 0 && avg(OPS_WRITE) === 0) {
      throw new ThrottleError("EINVAL", "iops size requires an iops value to be set");
    }
    for (const b of this.buckets) {
      const bAvg = u64(b.avg);
      const bMax = u64(b.max);
      const len = u64(b.burstLength);
      if (bAvg > THROTTLE_VALUE_MAX || bMax > THROTTLE_VALUE_MAX) {
        throw new ThrottleError("EINVAL", `bps/iops/max values must be within [0, ${THROTTLE_VALUE_MAX}]`);
      }
      if (len === 0) throw new ThrottleError("EINVAL", "the burst length cannot be 0");
      if (len > 1 && bMax === 0) throw new ThrottleError("EINVAL", "burst length set without burst rate");
      if (bMax !== 0 && len > Math.floor(THROTTLE_VALUE_MAX / bMax)) {
        throw new ThrottleError("EINVAL", "burst length too high for this burst rate");
      }
      if (bMax !== 0 && bAvg === 0) {
        throw new ThrottleError("EINVAL", "bps_max/iops_max require corresponding bps/iops values");
      }
      if (bMax !== 0 && bMax < bAvg) {
        throw new ThrottleError("EINVAL", "bps_max/iops_max cannot be lower than bps/iops");
      }
    }
  }

  /** True when both configurations have the same buckets and operation size. */
  equals(other: ThrottleConfig): boolean {
    return (
      this.opSize === other.opSize &&
      this.buckets.every((b, i) => {
        const o = other.buckets[i];
        return o !== undefined && b.avg === o.avg && b.max === o.max && b.burstLength === o.burstLength;
      })
    );
  }
}

const EMPTY = new ThrottleConfig();
