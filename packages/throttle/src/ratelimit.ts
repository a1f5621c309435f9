import { type Clock, systemClock } from "./clock.ts";
import { ThrottleError } from "./errors.ts";

/** The slice every QEMU job and block-copy uses: 100 ms. */
export const RATELIMIT_DEFAULT_SLICE_NS = 100_000_000;

/** Options for {@link RateLimit}. */
export interface RateLimitOptions {
  /** Units (bytes) per second; 0 (the default) means unlimited. */
  speed?: number;
  /** Slice length in ns (default {@link RATELIMIT_DEFAULT_SLICE_NS}). */
  sliceNs?: number;
  /** Clock used when `calculateDelay` is called without a time (default {@link systemClock}). */
  clock?: Clock;
}

function checkSpeed(speed: number, sliceNs: number): void {
  if (!Number.isFinite(speed) || speed < 0) {
    throw new ThrottleError("EINVAL", `speed must be a non-negative number, got ${speed}`);
  }
  if (!Number.isFinite(sliceNs) || sliceNs <= 0) {
    throw new ThrottleError("EINVAL", `slice length must be a positive number of ns, got ${sliceNs}`);
  }
}

/**
 * QEMU's job speed limiter (`RateLimit`, not a leaky bucket): a quota of `speed × slice` units per slice;
 * once a slice's quota is used up, the slice is stretched to carry the excess forward and the caller is
 * told how long to sleep.
 *
 * Use: account the units just submitted with `calculateDelay(n)` and sleep the returned delay before the
 * next submission (`calculateDelay(0)` only asks). The slice length is fixed for the limiter's life
 * unless `setSpeed` is given a new one.
 * @example
 * const limit = new RateLimit({ speed: 1_048_576 }); // 1 MiB/s: 104857 bytes per 100 ms slice
 * limit.calculateDelay(65536, 0);   // 0: within the quota
 * limit.calculateDelay(65536, 0);   // 125000715: sleep ~125 ms (the slice stretches to ~1.25 slices)
 */
export class RateLimit {
  #speed = 0;
  #sliceNs: number = RATELIMIT_DEFAULT_SLICE_NS;
  #quota = 0;
  #sliceStart = 0;
  /** -Infinity: the first call always starts a slice, whatever the clock's origin. */
  #sliceEnd: number = Number.NEGATIVE_INFINITY;
  #dispatched = 0;
  readonly #clock: Clock;

  /** @throws {ThrottleError} EINVAL for a negative or non-finite speed, or a slice that is not positive. */
  constructor(opts: RateLimitOptions = {}) {
    this.#clock = opts.clock ?? systemClock;
    this.setSpeed(opts.speed ?? 0, opts.sliceNs ?? RATELIMIT_DEFAULT_SLICE_NS);
  }

  /** Units per second; 0 means unlimited. */
  get speed(): number {
    return this.#speed;
  }

  /** The slice length in ns. */
  get sliceNs(): number {
    return this.#sliceNs;
  }

  /** Units allowed per slice: `max(trunc(speed × slice / 1e9), 1)`, or 0 when unlimited. */
  get sliceQuota(): number {
    return this.#quota;
  }

  /**
   * Sets the speed (and the slice length, default 100 ms). Takes effect for the next `calculateDelay`; the
   * current slice and the units dispatched in it are kept (QEMU's behaviour on a live speed change).
   * @throws {ThrottleError} EINVAL for a negative or non-finite speed, or a slice that is not positive.
   */
  setSpeed(speed: number, sliceNs: number = RATELIMIT_DEFAULT_SLICE_NS): void {
    checkSpeed(speed, sliceNs);
    this.#speed = speed;
    this.#sliceNs = sliceNs;
    this.#quota = speed === 0 ? 0 : Math.trunc(Math.max((speed * sliceNs) / 1e9, 1));
  }

  /**
   * Accounts `n` units dispatched at `nowNs` (default: the clock's time) and returns how many ns to wait
   * before dispatching more: 0 while the slice's quota is not used up, otherwise the time to the end of
   * the stretched slice. Always 0 when unlimited (nothing is accounted then).
   */
  calculateDelay(n: number, nowNs: number = this.#clock.now()): number {
    if (this.#quota === 0) return 0;
    if (this.#sliceEnd < nowNs) {
      this.#sliceStart = nowNs;
      this.#sliceEnd = nowNs + this.#sliceNs;
      this.#dispatched = 0;
    }
    this.#dispatched += n;
    if (this.#dispatched < this.#quota) return 0;
    const slices = this.#dispatched / this.#quota;
    this.#sliceEnd = this.#sliceStart + Math.trunc(slices * this.#sliceNs);
    return this.#sliceEnd - nowNs;
  }
}
