/**
 * Clock and rate-limit contracts of the job framework. Jobs use `@blk/throttle`'s `Clock` and, by default,
 * its `RateLimit` (QEMU's `include/qemu/ratelimit.h`); any object of the {@link RateLimitLike} shape can be
 * injected instead.
 */
import { type Clock, RateLimit } from "@blk/throttle";

/** A byte-rate limiter (the shape of `@blk/throttle`'s `RateLimit`). */
export interface RateLimitLike {
  /** Current limit in bytes per second; 0 = unlimited. */
  readonly speed: number;
  /** Sets the limit; `sliceNs` is the accounting slice (jobs use 100 ms). */
  setSpeed(speed: number, sliceNs?: number): void;
  /** Accounts `n` bytes at `nowNs`; returns the nanoseconds to wait before the next submission (0 = none). */
  calculateDelay(n: number, nowNs: number): number;
}

/** QEMU's `BLOCK_JOB_SLICE_TIME`: 100 ms, fixed (never adapted). */
export const BLOCK_JOB_SLICE_NS = 100_000_000;

/** The default limiter of a block job: `@blk/throttle`'s `RateLimit` with a 100 ms slice on `clock`. */
export function defaultRateLimit(clock: Clock): RateLimitLike {
  return new RateLimit({ sliceNs: BLOCK_JOB_SLICE_NS, clock });
}
