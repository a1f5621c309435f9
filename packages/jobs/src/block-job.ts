/**
 * QEMU's block job layer (`blockjob.c`, 7.2), graph-independent part: speed limit through a rate limit on
 * the job's clock, error policies with `BLOCK_JOB_ERROR` and `io-status`, the `BLOCK_JOB_*` events and the
 * `query-block-jobs` entry. Holding nodes (drains → {@link Job.holdPause}) is added on top of this class.
 * See `spec/jobs.md` §1.7, §1.8, §1.10.
 */
import { type BlkError, type BlkErrorCode, toBlkError } from "@blk/core";
import { errnoError, JobError } from "./errors.ts";
import { Job, type JobOptions } from "./job.ts";
import { BLOCK_JOB_SLICE_NS, defaultRateLimit, type RateLimitLike } from "./ratelimit.ts";
import type {
  BlockdevOnError,
  BlockErrorAction,
  BlockJobInfo,
  BlockJobIoStatus,
  BlockJobProgressData,
  IoOperationType,
  QueryOptions,
} from "./types.ts";

/** The job types that are block jobs (listed by `query-block-jobs`, found by `block-job-*`). */
export type BlockJobType = "commit" | "stream" | "mirror" | "backup";

/** Options of a block job. */
export interface BlockJobOptions extends JobOptions {
  /** The block job type. */
  type: BlockJobType;
  /** Initial speed limit in bytes per second; 0 (default) = unlimited. */
  speed?: number;
  /** The rate limiter to use; default: `@blk/throttle`'s `RateLimit` (100 ms slice) on the manager's clock. */
  rateLimit?: RateLimitLike;
}

/** The result of {@link BlockJob.withErrorPolicy} when the error was ignored. */
export interface IgnoredError {
  ignored: true;
  error: BlkError;
}

/**
 * A block job: a {@link Job} with a speed limit, error policies, `BLOCK_JOB_*` events and a
 * `query-block-jobs` entry. Drivers call {@link BlockJob.rateLimit} after each chunk they copy and
 * {@link BlockJob.withErrorPolicy} (or {@link BlockJob.errorAction}) around I/O.
 * @example
 * class Copy extends BlockJob {
 *   protected async run(): Promise<void> {
 *     this.progressSetRemaining(1 << 20);
 *     for (let off = 0; off < 1 << 20 && !this.isCancelled(); off += 65536) {
 *       await this.withErrorPolicy("report", "write", () => writeChunk(off));
 *       this.progressWorkDone(65536);
 *       await this.rateLimit(65536);
 *     }
 *   }
 * }
 */
export abstract class BlockJob extends Job {
  declare readonly type: BlockJobType;
  #speed = 0;
  #limit: RateLimitLike;
  #ioStatus: BlockJobIoStatus = "ok";

  /**
   * Creates the block job (`created`) and applies the initial speed.
   * @throws {JobError} as {@link Job}; EINVAL `Parameter 'speed' expects a non-negative value` (the job is
   *   then destroyed: `created → null`, as QEMU does).
   */
  constructor(opts: BlockJobOptions) {
    super(opts);
    this.#limit = opts.rateLimit ?? defaultRateLimit(opts.manager.clock);
    try {
      this.setSpeed(opts.speed ?? 0);
    } catch (e) {
      this.earlyFail(toBlkError(e));
      throw e;
    }
  }

  /** The speed limit in bytes per second (0 = unlimited). */
  get speed(): number {
    return this.#speed;
  }

  /** `ok`, or `failed`/`nospace` after a STOP error until the user resumes. */
  get ioStatus(): BlockJobIoStatus {
    return this.#ioStatus;
  }

  /**
   * Changes the speed limit (`block-job-set-speed`); a job sleeping on its rate limit is woken when the new
   * limit is unlimited or higher.
   * @throws {JobError} EPERM verb refused; EINVAL `Parameter 'speed' expects a non-negative value`.
   */
  setSpeed(speed: number): void {
    const old = this.#speed;
    this.checkVerb("set-speed");
    if (!(speed >= 0)) throw new JobError("EINVAL", "Parameter 'speed' expects a non-negative value");
    this.#limit.setSpeed(speed, BLOCK_JOB_SLICE_NS);
    this.#speed = speed;
    this.onSetSpeed(speed);
    if (speed !== 0 && speed <= old) return;
    this.enter((j) => j.timerPending);
  }

  /** Called after the speed changed (backup forwards it to its copy engine). */
  protected onSetSpeed(_speed: number): void {}

  /** Accounts `n` bytes just submitted (QEMU's `block_job_ratelimit_processed_bytes`). */
  ratelimitProcessedBytes(n: number): void {
    this.#limit.calculateDelay(n, this.clock.now());
  }

  /**
   * Sleeps as long as the rate limit requires, at least once (QEMU's `block_job_ratelimit_sleep`); the delay
   * is recomputed after every wake-up, so a speed change takes effect at once.
   */
  async ratelimitSleep(): Promise<void> {
    let delay: number;
    do {
      delay = this.#limit.calculateDelay(0, this.clock.now());
      await this.sleep(delay);
    } while (delay !== 0 && !this.isCancelled());
  }

  /** Accounts `n` bytes, then sleeps as the rate limit requires. */
  async rateLimit(n: number): Promise<void> {
    this.ratelimitProcessedBytes(n);
    await this.ratelimitSleep();
  }

  /**
   * Applies an error policy to an I/O error (QEMU's `block_job_error_action`): emits `BLOCK_JOB_ERROR`
   * and, for `stop`, pauses the job as a user pause and sets `io-status` (`nospace` for ENOSPC).
   */
  errorAction(
    onError: BlockdevOnError,
    operation: IoOperationType,
    error: BlkError | BlkErrorCode,
  ): BlockErrorAction {
    const code = typeof error === "string" ? error : error.code;
    let action: BlockErrorAction;
    switch (onError) {
      case "enospc":
      case "auto":
        action = code === "ENOSPC" ? "stop" : "report";
        break;
      case "stop":
        action = "stop";
        break;
      case "report":
        action = "report";
        break;
      case "ignore":
        action = "ignore";
        break;
    }
    if (this.id !== null) {
      this.manager._emit({ event: "BLOCK_JOB_ERROR", data: { device: this.id, operation, action } });
    }
    if (action === "stop") {
      this.pauseAsUser();
      if (this.#ioStatus === "ok") this.#ioStatus = code === "ENOSPC" ? "nospace" : "failed";
    }
    return action;
  }

  /**
   * Runs `fn` under an error policy: `report` rethrows (the job fails), `ignore` returns
   * `{ ignored: true }`, `stop` pauses the job and retries `fn` after the user resumes (rejects with
   * ECANCELED if the job is force-cancelled meanwhile).
   */
  async withErrorPolicy<T>(
    onError: BlockdevOnError,
    operation: IoOperationType,
    fn: () => Promise<T>,
  ): Promise<T | IgnoredError> {
    for (;;) {
      try {
        return await fn();
      } catch (e) {
        const error = toBlkError(e);
        const action = this.errorAction(onError, operation, error);
        if (action === "report") throw error;
        if (action === "ignore") return { ignored: true, error };
        await this.pausePoint();
        if (this.isCancelled()) throw errnoError("ECANCELED");
      }
    }
  }

  protected override onUserResume(): void {
    this.#ioStatus = "ok";
  }

  #progressData(): BlockJobProgressData {
    const { current, total } = this.progress;
    return { type: this.type, device: String(this.id), len: total, offset: current, speed: this.#speed };
  }

  protected override notifyReady(): void {
    if (this.id === null) return;
    this.manager._emit({ event: "BLOCK_JOB_READY", data: this.#progressData() });
  }

  protected override notifyPending(): void {
    if (this.id === null) return;
    this.manager._emit({ event: "BLOCK_JOB_PENDING", data: { type: this.type, id: this.id } });
  }

  protected override notifyCompleted(): void {
    if (this.id === null) return;
    const data = this.#progressData();
    const msg = this.errorMessage;
    this.manager._emit({
      event: "BLOCK_JOB_COMPLETED",
      data: msg === undefined ? data : { ...data, error: msg },
    });
  }

  protected override notifyCancelled(): void {
    if (this.id === null) return;
    this.manager._emit({ event: "BLOCK_JOB_CANCELLED", data: this.#progressData() });
  }

  /** The `query-block-jobs` entry of this job. */
  blockJobInfo(opts?: QueryOptions): BlockJobInfo {
    const { current, total } = this.progress;
    const info: BlockJobInfo = {
      type: this.type,
      device: String(this.id),
      len: total,
      offset: current,
      busy: this.busy,
      paused: this.pauseCount > 0,
      speed: this.#speed,
      "io-status": this.#ioStatus,
      ready: this.isReady(),
      status: this.status,
      "auto-finalize": this.autoFinalize,
      "auto-dismiss": this.autoDismiss,
    };
    const msg = this.errorMessage;
    if (msg !== undefined) info.error = msg;
    if (opts?.extensions === true) Object.assign(info, this.extensionInfo());
    return info;
  }
}
