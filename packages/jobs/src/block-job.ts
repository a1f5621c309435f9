/**
 * QEMU's block job layer (`blockjob.c`, 7.2): speed limit through a rate limit on the job's clock, error
 * policies with `BLOCK_JOB_ERROR` and `io-status`, the `BLOCK_JOB_*` events, the `query-block-jobs` entry,
 * and node holding: a job is a parent of the nodes it works on (job edges with their permissions, QEMU's
 * `block_job_add_bdrv`), those nodes are busy for other operations, and drains of them pause the job.
 * See `spec/jobs.md` §1.5, §1.7, §1.8, §1.10.
 */
import {
  type BlkError,
  type BlkErrorCode,
  type BlockNode,
  type Edge,
  type ExternalParent,
  jobParent,
  PERM_ALL,
  toBlkError,
} from "@blk/core";
import { systemClock } from "@blk/throttle";
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

/**
 * Chunks an unlimited stream or commit copies per request on the process clock: 8 (4 MiB). Each request
 * costs an I/O round trip or two and, on a qcow2 target, a metadata flush; copying consecutive chunks of the
 * same allocation together divides that by eight. The loop still yields between requests and reports
 * progress at offsets QEMU's one-chunk loop passes through too; a failed request fails the job at its
 * first chunk (QEMU: at the chunk that failed, which may be a later one of the eight).
 */
export const UNLIMITED_BATCH_CHUNKS = 8;

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
  #parent: ExternalParent | undefined;
  #held: Edge[] = [];

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

  // ---------------------------------------------------------------- node holding

  /** The job as a graph parent (`block-job` in `x-debug-query-block-graph`, `TYPE job 'ID'` in messages). */
  get graphParent(): ExternalParent {
    this.#parent ??= jobParent(this.type, this.id ?? "");
    return this.#parent;
  }

  /** The edges through which the job holds nodes, oldest first. */
  get heldEdges(): readonly Edge[] {
    return this.#held;
  }

  /** The nodes the job holds. */
  get heldNodes(): BlockNode[] {
    return [...new Set(this.#held.filter((e) => e.attached).map((e) => e.child))];
  }

  /**
   * Holds `node` (QEMU's `block_job_add_bdrv`): attaches a job edge named `name` (`main node`, `source`,
   * `target`, …) with the permissions the job needs (`perm`, default none) and shares (`shared`, default
   * all). While held, the node is busy for other operations ({@link checkNodeNotBusy}) and drains of it
   * ({@link drainedSection}) pause the job. Edges stay at their node when the node is replaced.
   * @throws {BlkError} EPERM with QEMU's permission-conflict message (nothing changes)
   */
  holdNode(node: BlockNode, name: string, opts: { perm?: number; shared?: number } = {}): Edge {
    const edge = node.graph.attach(this.graphParent, node, {
      name,
      perm: opts.perm ?? 0,
      shared: opts.shared ?? PERM_ALL,
    });
    this.#held.push(edge);
    const set = holders.get(node) ?? new Set<BlockJob>();
    holders.set(node, set);
    set.add(this);
    return edge;
  }

  /** Detaches every job edge (QEMU's `block_job_remove_all_bdrv`); idempotent. Called by `clean()`. */
  releaseNodes(): void {
    const edges = this.#held;
    this.#held = [];
    for (const edge of edges) {
      holders.get(edge.child)?.delete(this);
      edge.detach();
    }
  }

  /** Releases the held nodes. Subclasses overriding `clean` call `super.clean()` last. */
  protected override clean(): void | Promise<void> {
    this.releaseNodes();
  }

  /**
   * How many of its chunks a serial copy loop (stream, commit) copies in one request:
   * {@link UNLIMITED_BATCH_CHUNKS} when the job is unlimited, runs on the process clock and reports errors
   * (`on-error: report`), else 1 — QEMU's one chunk per iteration, which rate limits, the other error
   * policies and the tests' manual clocks see exactly. See {@link UNLIMITED_BATCH_CHUNKS}.
   */
  protected copyBatchChunks(onError: BlockdevOnError): number {
    return this.#speed === 0 && onError === "report" && this.clock === systemClock
      ? UNLIMITED_BATCH_CHUNKS
      : 1;
  }

  /** Nanoseconds the rate limit asks to wait before the next submission (0 = go), without accounting. */
  ratelimitDelay(): number {
    return this.#limit.calculateDelay(0, this.clock.now());
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

const holders = new WeakMap<BlockNode, Set<BlockJob>>();

/** The live block jobs holding `node` (through a job edge). */
export function blockJobsHolding(node: BlockNode): BlockJob[] {
  return [...(holders.get(node) ?? [])].filter((j) =>
    j.heldEdges.some((e) => e.attached && e.child === node),
  );
}

/**
 * QEMU's op blocker of block jobs: refuses an operation on a node some block job holds.
 * @throws {JobError} EBUSY `Node 'NAME' is busy: block device is in use by block job: TYPE`
 */
export function checkNodeNotBusy(node: BlockNode): void {
  const job = blockJobsHolding(node)[0];
  if (job !== undefined) {
    throw new JobError(
      "EBUSY",
      `Node '${node.nodeName}' is busy: block device is in use by block job: ${job.type}`,
    );
  }
}

/**
 * Runs `fn` in a drained section of `nodes` (QEMU's `bdrv_drained_begin/end`): every job holding one of
 * them has its pause counter raised for the duration (it pauses at its next pause point, and
 * `query-block-jobs` shows `paused: true`), and the nodes have no request in flight while `fn` runs.
 * @example
 * await drainedSection([src], () => graph.replaceNode(src, dst));
 */
export async function drainedSection<T>(nodes: readonly BlockNode[], fn: () => Promise<T> | T): Promise<T> {
  const jobs = new Set<BlockJob>();
  for (const n of nodes) for (const j of blockJobsHolding(n)) jobs.add(j);
  for (const j of jobs) j.holdPause();
  const drain = (i: number): Promise<T> => {
    const node = nodes[i];
    return node === undefined ? Promise.resolve(fn()) : node.drained(() => drain(i + 1));
  };
  try {
    return await drain(0);
  } finally {
    for (const j of jobs) j.releasePause();
  }
}
