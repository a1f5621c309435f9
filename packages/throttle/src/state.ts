import { type Clock, systemClock } from "./clock.ts";
import { BUCKETS_COUNT, BucketType, type ThrottleConfig } from "./config.ts";
import { ThrottleError } from "./errors.ts";

const NS_PER_S = 1e9;

/** Buckets consulted and charged per direction: [bytes total, ops total, bytes dir, ops dir]. */
const READ_BUCKETS = [BucketType.BPS_TOTAL, BucketType.OPS_TOTAL, BucketType.BPS_READ, BucketType.OPS_READ];
const WRITE_BUCKETS = [
  BucketType.BPS_TOTAL,
  BucketType.OPS_TOTAL,
  BucketType.BPS_WRITE,
  BucketType.OPS_WRITE,
];

/** A snapshot of the bucket fill levels of a {@link ThrottleState}. */
export interface ThrottleLevels {
  /** Main bucket levels by bucket index, in units. */
  readonly level: readonly number[];
  /** Burst bucket levels by bucket index, in units. */
  readonly burstLevel: readonly number[];
  /** Time of the last leak, ns. */
  readonly previousLeak: number;
}

/**
 * QEMU's leaky-bucket state (`ThrottleState`, `util/throttle.c`): one configuration, the fill level of
 * each bucket and the time of the last leak.
 *
 * - {@link ThrottleState.computeWait} first leaks every bucket for the time elapsed (`avg × Δt`, and
 *   `max × Δt` from the burst bucket when the burst length is above 1), then returns the largest wait over
 *   the four buckets of the direction;
 * - {@link ThrottleState.account} charges an admitted request to the four buckets of its direction (bytes
 *   to the bps buckets, one operation — or `bytes / iops-size` when larger — to the iops buckets). Account
 *   on **submission**, right after admission, never at completion.
 *
 * The wait for one bucket: `avg = 0` → 0; bucket size `avg/10` without `max`, else `max × burstLength`
 * (burst bucket `max/10`); if `level > size` wait `(level − size)/avg` s; else if `burstLength > 1` and
 * `burstLevel > max/10` wait `(burstLevel − max/10)/max` s; else 0. Waits are truncated to whole ns.
 * @example
 * const clock = new ManualClock();
 * const ts = new ThrottleState(ThrottleConfig.fromLimits({ "iops-total": 100 }), clock);
 * for (let i = 0; i < 11; i++) ts.account(false, 4096); // 11 requests fit in the 10-op bucket
 * ts.computeWait(false); // 10_000_000 ns
 */
export class ThrottleState {
  #cfg: ThrottleConfig;
  readonly #clock: Clock;
  readonly #avg = new Float64Array(BUCKETS_COUNT);
  readonly #max = new Float64Array(BUCKETS_COUNT);
  readonly #burstLength = new Float64Array(BUCKETS_COUNT);
  readonly #level = new Float64Array(BUCKETS_COUNT);
  readonly #burstLevel = new Float64Array(BUCKETS_COUNT);
  #opSize = 0;
  #previousLeak = 0;

  /**
   * @param cfg the configuration (validated).
   * @param clock time source (default {@link systemClock}).
   * @throws {ThrottleError} EINVAL with QEMU's message when `cfg` is invalid.
   */
  constructor(cfg: ThrottleConfig, clock: Clock = systemClock) {
    this.#clock = clock;
    this.#cfg = cfg;
    this.setConfig(cfg);
  }

  /** The current configuration. */
  get config(): ThrottleConfig {
    return this.#cfg;
  }

  /** The clock this state reads. */
  get clock(): Clock {
    return this.#clock;
  }

  /**
   * Installs a new configuration (QEMU's `throttle_config`): validates it, then **zeroes every level and
   * burst level** and restarts leaking from now, so any accumulated debt is forgotten — even when the
   * configuration did not change.
   * @throws {ThrottleError} EINVAL with QEMU's message when `cfg` is invalid (the state is then unchanged).
   */
  setConfig(cfg: ThrottleConfig): void {
    cfg.validate();
    this.#cfg = cfg;
    for (let i = 0; i < BUCKETS_COUNT; i++) {
      const b = cfg.bucket(i);
      this.#avg[i] = b.avg;
      this.#max[i] = b.max;
      this.#burstLength[i] = b.burstLength;
    }
    this.#opSize = cfg.opSize;
    this.#level.fill(0);
    this.#burstLevel.fill(0);
    this.#previousLeak = this.#clock.now();
  }

  /** Leaks every bucket for the time elapsed since the previous leak (`now` defaults to the clock). */
  leak(now: number = this.#clock.now()): void {
    const delta = now - this.#previousLeak;
    this.#previousLeak = now;
    if (delta <= 0) return;
    for (let i = 0; i < BUCKETS_COUNT; i++) {
      const avg = this.#avg[i] ?? 0;
      const level = this.#level[i] ?? 0;
      this.#level[i] = Math.max(level - (avg * delta) / NS_PER_S, 0);
      if ((this.#burstLength[i] ?? 1) > 1) {
        const max = this.#max[i] ?? 0;
        const burst = this.#burstLevel[i] ?? 0;
        this.#burstLevel[i] = Math.max(burst - (max * delta) / NS_PER_S, 0);
      }
    }
  }

  /**
   * Leaks, then returns how long (ns) a request of this direction must wait before it may be admitted:
   * the maximum over the total and direction buckets of both kinds. 0: admit now.
   */
  computeWait(isWrite: boolean): number {
    this.leak();
    let wait = 0;
    for (const i of isWrite ? WRITE_BUCKETS : READ_BUCKETS) {
      const w = this.#bucketWait(i);
      if (w > wait) wait = w;
    }
    return wait;
  }

  /**
   * The wait (ns) for bucket `type` alone, without leaking first.
   * @throws {ThrottleError} EINVAL for an index outside 0…5.
   */
  bucketWait(type: number): number {
    if (!Number.isInteger(type) || type < 0 || type >= BUCKETS_COUNT) {
      throw new ThrottleError("EINVAL", `no bucket ${type}`);
    }
    return this.#bucketWait(type);
  }

  #bucketWait(i: number): number {
    const avg = this.#avg[i] ?? 0;
    if (avg === 0) return 0;
    const max = this.#max[i] ?? 0;
    const burstLength = this.#burstLength[i] ?? 1;
    const size = max === 0 ? avg / 10 : max * burstLength;
    let extra = (this.#level[i] ?? 0) - size;
    if (extra > 0) return Math.trunc((extra * NS_PER_S) / avg);
    if (burstLength > 1) {
      extra = (this.#burstLevel[i] ?? 0) - max / 10;
      if (extra > 0) return Math.trunc((extra * NS_PER_S) / max);
    }
    return 0;
  }

  /**
   * Charges an admitted request of `bytes` bytes to the buckets of its direction. Call it once per request,
   * on submission.
   * @throws {ThrottleError} EINVAL when `bytes` is negative or not finite.
   */
  account(isWrite: boolean, bytes: number): void {
    if (!(bytes >= 0) || !Number.isFinite(bytes)) {
      throw new ThrottleError("EINVAL", `invalid request size ${bytes}`);
    }
    const opSize = this.#opSize;
    const units = opSize > 0 && bytes > opSize ? bytes / opSize : 1;
    const buckets = isWrite ? WRITE_BUCKETS : READ_BUCKETS;
    for (let k = 0; k < 4; k++) {
      const i = buckets[k] ?? 0;
      const amount = k % 2 === 0 ? bytes : units;
      this.#level[i] = (this.#level[i] ?? 0) + amount;
      if ((this.#burstLength[i] ?? 1) > 1) this.#burstLevel[i] = (this.#burstLevel[i] ?? 0) + amount;
    }
  }

  /** A copy of the current levels (for diagnostics and tests). */
  levels(): ThrottleLevels {
    return {
      level: [...this.#level],
      burstLevel: [...this.#burstLevel],
      previousLeak: this.#previousLeak,
    };
  }
}
