/**
 * The backup job (QMP `blockdev-backup`, QEMU 7.2 `block/backup.c` behaviour; `spec/jobs.md` §3,
 * `spec/hbitmap.md` §7.5): a `copy-before-write` filter inserted above the source keeps the target a
 * point-in-time copy of the source as of job creation while the job copies the clusters of its copy
 * bitmap in the background (sync `full`: all; `top`: those allocated in the source node itself; `bitmap` /
 * `incremental`: those dirty in a frozen dirty bitmap; `none`: only what the guest is about to overwrite,
 * until cancelled). A sync bitmap is frozen with a successor and, at the end, abdicated or reclaimed as
 * `bitmap-mode` says. Backup never becomes READY and every cancel is forced (`BLOCK_JOB_CANCELLED`).
 */
import {
  BlkError,
  type BlockGraph,
  type BlockNode,
  CHILD_ROLE,
  type CopyError,
  type DirtyBitmap,
  toBlkError,
} from "@blk/core";
import { BlockJob, checkNodeNotBusy } from "../block-job.ts";
import { errnoError } from "../errors.ts";
import type { JobTxn } from "../job.ts";
import type { JobManager } from "../manager.ts";
import type { BlockdevOnError } from "../types.ts";
import {
  CBW_DEFAULT_BUFFER_SIZE,
  type CopyBeforeWriteState,
  copyBeforeWriteDriver,
} from "./copy-before-write.ts";

/** QEMU's `BackupSyncMode` as backup accepts it (`incremental` = `bitmap` with `on-success`). */
export type BackupSyncMode = "top" | "full" | "none" | "incremental" | "bitmap";

/** QEMU's `BitmapSyncMode`: what happens to the sync bitmap when the job ends. */
export type BitmapSyncMode = "on-success" | "never" | "always";

/** QEMU's unstable `BackupPerf` (`x-perf`). */
export interface BackupPerf {
  /** Accepted and ignored (blk has no copy offload). */
  "use-copy-range"?: boolean;
  /** Most background copy tasks in flight (default 64, in [1, 2147483647]). */
  "max-workers"?: number;
  /** Largest copy task in bytes; 0 (default) = no limit. Must not be below the cluster size. */
  "max-chunk"?: number;
}

/** The arguments of QMP `blockdev-backup` (QEMU 7.2 names and defaults). */
export interface BlockdevBackup {
  /** Job id; omitted: the device's backend name, which nodes do not have (`Invalid job ID ''`). */
  "job-id"?: string;
  /** Node name of the source. */
  device: string;
  /** Node name of the target (same length as the source). */
  target: string;
  sync: BackupSyncMode;
  /** Bytes per second for the background copy; 0 (default) = unlimited. */
  speed?: number;
  /** Name of a dirty bitmap of `device`: the input of `bitmap` sync, and/or the output per `bitmap-mode`. */
  bitmap?: string;
  "bitmap-mode"?: BitmapSyncMode;
  /** Compressed target writes: refused (`ENOTSUP`), no blk target supports them yet. */
  compress?: boolean;
  /** Policy for background read errors (default `report`). */
  "on-source-error"?: BlockdevOnError;
  /** Policy for background write errors (default `report`). */
  "on-target-error"?: BlockdevOnError;
  /** Default true. */
  "auto-finalize"?: boolean;
  /** Default true. */
  "auto-dismiss"?: boolean;
  /** Node name of the `copy-before-write` filter (default: a generated `#blockNNN`). */
  "filter-node-name"?: string;
  "x-perf"?: BackupPerf;
  /**
   * blk extension: bytes of old data copies before guest writes may hold in memory while their target
   * writes run (default {@link CBW_DEFAULT_BUFFER_SIZE}, 16 MiB; 0 = QEMU's behaviour: a guest write
   * waits until its old data is on the target). Not used when fleecing.
   */
  "x-blk-cbw-buffer-size"?: number;
  /**
   * blk extension: milliseconds a guest write may wait for its copy before the job gives up the point in
   * time instead (the write proceeds, the job fails with `ETIMEDOUT`); 0 (default) = no cap.
   */
  "x-blk-max-guest-stall"?: number;
}

/** {@link BlockdevBackup} plus what the library needs. */
export interface BackupOptions extends BlockdevBackup {
  /** The graph that holds `device` and `target`. */
  graph: BlockGraph;
  /** A transaction to join (grouped completion); default: a private one. */
  txn?: JobTxn;
  /** Receives warnings (a target without cluster size information). */
  onWarning?: (message: string) => void;
}

/** What {@link BackupJob}'s constructor gets (built by {@link createBackupJob}). */
export interface BackupJobInit {
  manager: JobManager;
  id: string;
  source: BlockNode;
  target: BlockNode;
  filter: BlockNode;
  sync: "full" | "top" | "none" | "bitmap";
  syncBitmap: DirtyBitmap | undefined;
  bitmapMode: BitmapSyncMode | undefined;
  speed: number;
  onSourceError: BlockdevOnError;
  onTargetError: BlockdevOnError;
  autoFinalize: boolean;
  autoDismiss: boolean;
  txn?: JobTxn;
}

const INT_MAX = 2147483647;

const notFound = (name: string): BlkError =>
  new BlkError("ENOENT", `Cannot find device='${name}' nor node-name='${name}'`);

/**
 * A running backup. Create it with {@link backup} (or {@link createBackupJob} + `start()` for
 * transactions); follow it with `outcome`, the manager's events and `query-block-jobs`.
 * @example
 * const job = await backup(manager, { graph, "job-id": "bk0", device: "disk", target: "bk", sync: "full" });
 * console.log(await job.outcome); // { status: "completed" }
 */
export class BackupJob extends BlockJob {
  /** The source node (`device`). */
  readonly source: BlockNode;
  /** The target node. */
  readonly target: BlockNode;
  /** The `copy-before-write` node above the source (removed when the job ends). */
  readonly filter: BlockNode;
  /** The effective sync mode (`incremental` is reported as `bitmap`). */
  readonly sync: "full" | "top" | "none" | "bitmap";
  /** The frozen sync bitmap while the job runs (afterwards look it up by name). */
  readonly syncBitmap: DirtyBitmap | undefined;
  /** What happens to the sync bitmap at the end. */
  readonly bitmapMode: BitmapSyncMode | undefined;
  readonly onSourceError: BlockdevOnError;
  readonly onTargetError: BlockdevOnError;
  #cbw: CopyBeforeWriteState;
  #cleaned = false;

  /**
   * @internal Use {@link createBackupJob} or {@link backup}.
   * @throws {JobError} as {@link BlockJob}
   */
  constructor(init: BackupJobInit) {
    const cbw = init.filter.state as CopyBeforeWriteState;
    super({
      manager: init.manager,
      id: init.id,
      type: "backup",
      speed: init.speed,
      rateLimit: cbw.rateLimit,
      autoFinalize: init.autoFinalize,
      autoDismiss: init.autoDismiss,
      ...(init.txn === undefined ? {} : { txn: init.txn }),
    });
    this.#cbw = cbw;
    this.source = init.source;
    this.target = init.target;
    this.filter = init.filter;
    this.sync = init.sync;
    this.syncBitmap = init.syncBitmap;
    this.bitmapMode = init.bitmapMode;
    this.onSourceError = init.onSourceError;
    this.onTargetError = init.onTargetError;
    cbw.hooks.pausePoint = () => this.pausePoint();
    cbw.hooks.onProgress = (p) => {
      this.progressWorkDone(p.bytes - p.skipped);
      this.progressSetRemaining(this.#remaining() - p.bytes);
    };
    cbw.hooks.onBufferedEvent = () => {
      // A broken snapshot stops the background copy at once; a failed buffered write wakes a sync=none job.
      if (cbw.snapshotError !== undefined) cbw.engine.cancel();
      this.enter();
    };
    this.progressSetRemaining(cbw.copyBitmap.count());
  }

  /** The `copy-before-write` filter's state (buffer statistics, fleecing flag). */
  get cbw(): CopyBeforeWriteState {
    return this.#cbw;
  }

  /** The backup cluster size (bytes per bit of the copy bitmap). */
  get clusterSize(): number {
    return this.#cbw.clusterSize;
  }

  /** The copy bitmap: clusters not copied yet. */
  get copyBitmap(): DirtyBitmap {
    return this.#cbw.copyBitmap;
  }

  /**
   * @internal Holds the job's nodes (`main node`: the filter, and `target`), as QEMU's block job does: both
   * are busy for other jobs ({@link checkNodeNotBusy}) until the job's clean-up releases them.
   */
  _attachEdges(): void {
    this.holdNode(this.filter, "main node");
    this.holdNode(this.target, "target");
  }

  #remaining(): number {
    const cbw = this.#cbw;
    return cbw.copyBitmap.count() + cbw.engine.stats.bufferBytesInFlight + cbw.bufferedBytes;
  }

  protected async run(): Promise<void> {
    if (this.sync === "top") {
      try {
        await this.#skipUnallocated();
      } catch (e) {
        const err = toBlkError(e);
        throw errnoError(err.code, { cause: err });
      }
      if (this.isCancelled()) return;
    }
    if (this.sync === "none") {
      // Nothing to copy in the background: the filter keeps the point in time until the job is cancelled
      // (retrying buffered copies whose target write failed, under the target error policy).
      while (!this.isCancelled()) {
        this.#checkSnapshot();
        if (this.#cbw.bufferedError !== undefined) {
          await this.#flushBuffered();
          continue;
        }
        await this.suspend();
      }
      return;
    }
    await this.#copyLoop();
  }

  /** Fails the job once a stall cap broke the point in time. */
  #checkSnapshot(): void {
    const err = this.#cbw.snapshotError;
    if (err !== undefined) throw errnoError(err.code, { cause: err });
  }

  /**
   * Writes the buffered copies to the target (QEMU has none: see `x-blk-cbw-buffer-size`). A failed
   * target write goes through `on-target-error` like a background one: `report` fails the job, `ignore`
   * retries it from memory at once, `stop` pauses the job and retries on resume.
   */
  async #flushBuffered(): Promise<void> {
    const cbw = this.#cbw;
    for (;;) {
      if (this.isCancelled()) return;
      const err = cbw.bufferedError;
      if (err !== undefined) {
        const action = this.errorAction(this.onTargetError, "write", err);
        if (action === "report") throw errnoError(err.code, { cause: err });
        if (action === "stop") await this.pausePoint();
        if (this.isCancelled()) return;
      }
      try {
        await cbw.flushBuffered();
        return;
      } catch {
        // recorded on the copy again: the next round applies the policy to it
      }
    }
  }

  /** sync=top: clear the clusters the source node itself does not allocate (pause points in between). */
  async #skipUnallocated(): Promise<void> {
    this.setPhase("scan");
    const cbw = this.#cbw;
    const bitmap = cbw.copyBitmap;
    const cs = cbw.clusterSize;
    const len = this.source.length;
    const step = Math.max(cs, 16 << 20);
    for (let off = 0; off < len; off += step) {
      await this.pausePoint();
      if (this.isCancelled()) return;
      const exts = await cbw.child.blockStatus(off, Math.min(step, len - off));
      for (const e of exts) {
        if (e.allocated) continue;
        const end = e.offset + e.length;
        const a = Math.ceil(e.offset / cs) * cs;
        const b = end >= len ? len : Math.floor(end / cs) * cs;
        if (b > a) bitmap.resetDirty(a, b - a);
      }
    }
    this.progressSetRemaining(this.#remaining());
  }

  async #copyLoop(): Promise<void> {
    this.setPhase("copy");
    const cbw = this.#cbw;
    const { engine, copyBitmap } = cbw;
    let failed: CopyError | undefined;
    cbw.hooks.onError = (e) => {
      failed ??= e;
      return "fail";
    };
    for (;;) {
      if (this.isCancelled()) return;
      this.#checkSnapshot();
      failed = undefined;
      try {
        await engine.run();
      } catch (e) {
        if (this.isCancelled()) return;
        const err = toBlkError(e);
        const f = failed as CopyError | undefined;
        if (f === undefined) {
          if (err.code === "ECANCELED") continue;
          throw errnoError(err.code, { cause: err });
        }
        const policy = f.operation === "read" ? this.onSourceError : this.onTargetError;
        const action = this.errorAction(policy, f.operation, err);
        if (action === "report") throw errnoError(err.code, { cause: err });
        // stop: park here until resumed (or cancelled), then a new pass; ignore: a new pass at once.
        if (action === "stop") await this.pausePoint();
        continue;
      }
      this.progressSetRemaining(this.#remaining());
      if (this.isCancelled()) return;
      this.#checkSnapshot();
      if (copyBitmap.count() > 0) continue;
      if (engine.stats.inFlight === 0) {
        // Copies before guest writes may still hold old data in memory: the target is complete once
        // they have all landed.
        if (cbw.bufferedCopies === 0) return;
        await this.#flushBuffered();
        continue;
      }
      // Copies before guest writes are still running: wait for them (one that failed set its bits again,
      // and the next pass copies them).
      try {
        await engine.copyRange(0, this.source.length);
      } catch {
        // retried by the next pass, which applies the error policy
      }
    }
  }

  protected override onSetSpeed(_speed: number): void {
    // Called from the BlockJob constructor too, before this class's fields exist.
    if (#cbw in this) this.#cbw.engine.wake();
  }

  protected override onCancel(_force: boolean): boolean {
    this.#cbw.engine.cancel();
    return true;
  }

  protected override commit(): void {
    this.#finishBitmap(true);
  }

  protected override abort(): void {
    this.#finishBitmap(false);
  }

  protected override async clean(): Promise<void> {
    await this._teardown();
    await super.clean();
  }

  /** The three `bitmap-mode` outcomes (`spec/hbitmap.md` §7.5). */
  #finishBitmap(ok: boolean): void {
    const bm = this.syncBitmap;
    if (bm === undefined || !bm.frozen) return;
    const mode = this.bitmapMode;
    const adopt = (ok || mode === "always") && mode !== "never";
    const result = adopt ? bm.abdicate() : bm.reclaim();
    // A failed job with `always`: the bitmap also keeps what was not copied.
    if (!ok && mode === "always") result.mergeUnchecked(this.#cbw.copyBitmap);
  }

  /** @internal Releases the job's nodes and removes the filter (idempotent). */
  async _teardown(): Promise<void> {
    if (this.#cleaned) return;
    this.#cleaned = true;
    this.releaseNodes();
    if (!this.filter.closed) await this.filter.graph.removeFilter(this.filter);
  }
}

interface Plan {
  sync: "full" | "top" | "none" | "bitmap";
  bitmap: DirtyBitmap | undefined;
  mode: BitmapSyncMode | undefined;
}

/** QEMU's `do_backup_common` checks of the sync / bitmap arguments, in QEMU's order. */
function checkSyncArgs(args: BlockdevBackup, source: BlockNode): Plan {
  let sync = args.sync;
  let mode = args["bitmap-mode"];
  if ((sync === "bitmap" || sync === "incremental") && args.bitmap === undefined) {
    throw new BlkError("EINVAL", `must provide a valid bitmap name for '${sync}' sync mode`);
  }
  if (sync === "incremental") {
    if (mode !== undefined && mode !== "on-success") {
      throw new BlkError(
        "EINVAL",
        "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
      );
    }
    sync = "bitmap";
    mode = "on-success";
  }
  let bitmap: DirtyBitmap | undefined;
  if (args.bitmap !== undefined) {
    bitmap = source.getBitmap(args.bitmap);
    if (bitmap === undefined) throw new BlkError("ENOENT", `Bitmap '${args.bitmap}' could not be found`);
    if (mode === undefined)
      throw new BlkError("EINVAL", "Bitmap sync mode must be given when providing a bitmap");
    bitmap.check("allow-ro");
    if (sync === "none") {
      throw new BlkError("EINVAL", "sync mode 'none' does not produce meaningful bitmap outputs");
    }
    if (mode === "never" && sync !== "bitmap") {
      throw new BlkError(
        "EINVAL",
        `Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '${sync}'`,
      );
    }
  } else if (mode !== undefined) {
    throw new BlkError("EINVAL", "Cannot specify bitmap sync mode without a bitmap");
  }
  return { sync, bitmap, mode };
}

/**
 * Creates a backup job without starting it (QMP `blockdev-backup` up to the job's creation: a
 * transaction starts its jobs together with `start()`). Checks the arguments with QEMU's messages,
 * freezes the sync bitmap, inserts the `copy-before-write` filter above the source (all of the source's
 * parents now use it) and creates the job (`created`). Any failure undoes all of it.
 * @example
 * const job = await createBackupJob(manager, { graph, "job-id": "bk0", device: "disk", target: "bk", sync: "full" });
 * job.start();
 * @throws {BlkError} ENOENT `Cannot find device='X' nor node-name='X'`, `Bitmap 'X' could not be found`;
 *   EINVAL for bad sync / bitmap / x-perf combinations, `Source and target cannot be the same`,
 *   `Source and target image have different sizes`, `Required max-chunk (A) is less than backup cluster
 *   size (B)`; ENOTSUP `Compression is not supported for this drive ` (blk targets cannot compress yet);
 *   EBUSY / EPERM from the bitmap checks; {@link JobError} EBUSY `Node 'X' is busy: block device is in use
 *   by block job: TYPE` when another job holds the source or the target, or for a bad job id or speed
 */
export async function createBackupJob(manager: JobManager, options: BackupOptions): Promise<BackupJob> {
  const { graph } = options;
  const source = graph.find(options.device);
  if (source === undefined) throw notFound(options.device);
  const target = graph.find(options.target);
  if (target === undefined) throw notFound(options.target);
  const perf = options["x-perf"] ?? {};
  const plan = checkSyncArgs(options, source);
  if (source === target) throw new BlkError("EINVAL", "Source and target cannot be the same");
  if (options.compress === true) {
    // QEMU names the target's BlockBackend here; nodes added with blockdev-add have none.
    throw new BlkError("ENOTSUP", "Compression is not supported for this drive ");
  }
  // QEMU's op blockers: another block job holding the source or the target refuses the backup.
  checkNodeNotBusy(source);
  checkNodeNotBusy(target);
  const maxWorkers = perf["max-workers"] ?? 64;
  if (!Number.isSafeInteger(maxWorkers) || maxWorkers < 1 || maxWorkers > INT_MAX) {
    throw new BlkError("EINVAL", `max-workers must be between 1 and ${INT_MAX}`);
  }
  const maxChunk = perf["max-chunk"] ?? 0;
  if (!(maxChunk >= 0)) {
    throw new BlkError("EINVAL", "max-chunk must be zero (which means no limit) or positive");
  }
  const bufferSize = options["x-blk-cbw-buffer-size"] ?? CBW_DEFAULT_BUFFER_SIZE;
  if (!(Number.isSafeInteger(bufferSize) && bufferSize >= 0)) {
    throw new BlkError("EINVAL", "x-blk-cbw-buffer-size must be zero (which means no buffering) or positive");
  }
  const maxStallMs = options["x-blk-max-guest-stall"] ?? 0;
  if (!(Number.isFinite(maxStallMs) && maxStallMs >= 0)) {
    throw new BlkError("EINVAL", "x-blk-max-guest-stall must be zero (which means no limit) or positive");
  }
  const { bitmap, mode } = plan;
  return source.drained(async () => {
    if (bitmap !== undefined && mode !== "never") bitmap.check("default");
    bitmap?.createSuccessor();
    try {
      if (source.length !== target.length) {
        throw new BlkError("EINVAL", "Source and target image have different sizes");
      }
      const filterName = options["filter-node-name"];
      const filter = await graph.openFilterAbove(
        copyBeforeWriteDriver,
        {
          ...(bitmap !== undefined && plan.sync === "bitmap" ? { bitmap } : {}),
          skipUnallocated: plan.sync === "top",
          maxWorkers,
          maxChunk,
          bufferSize,
          maxGuestStallNs: Math.round(maxStallMs * 1e6),
          clock: manager.clock,
          ...(options.onWarning === undefined ? {} : { onWarning: options.onWarning }),
        },
        source,
        {
          ...(filterName === undefined ? {} : { nodeName: filterName }),
          extraChildren: { target: { node: target, role: CHILD_ROLE.DATA } },
        },
      );
      try {
        const cluster = (filter.state as CopyBeforeWriteState).clusterSize;
        if (maxChunk > 0 && maxChunk < cluster) {
          throw new BlkError(
            "EINVAL",
            `Required max-chunk (${maxChunk}) is less than backup cluster size (${cluster})`,
          );
        }
        const job = new BackupJob({
          manager,
          id: options["job-id"] ?? "",
          source,
          target,
          filter,
          sync: plan.sync,
          syncBitmap: bitmap,
          bitmapMode: mode,
          speed: options.speed ?? 0,
          onSourceError: options["on-source-error"] ?? "report",
          onTargetError: options["on-target-error"] ?? "report",
          autoFinalize: options["auto-finalize"] ?? true,
          autoDismiss: options["auto-dismiss"] ?? true,
          ...(options.txn === undefined ? {} : { txn: options.txn }),
        });
        job._attachEdges();
        return job;
      } catch (e) {
        if (!filter.closed) await graph.removeFilter(filter);
        throw e;
      }
    } catch (e) {
      if (bitmap?.frozen === true) bitmap.reclaim();
      throw e;
    }
  });
}

/**
 * QMP `blockdev-backup`: creates the job and starts it, showing QEMU's transient `paused` → `running`
 * after `running` (the command's drained section ends after the start). Events: `created`, `running`,
 * `paused`, `running`; then `waiting`, `pending`, `BLOCK_JOB_COMPLETED`, `concluded`, `null` on success,
 * or `aborting`, `BLOCK_JOB_CANCELLED`, `concluded`, `null` when cancelled.
 * @example
 * const job = await backup(manager, { graph, "job-id": "bk0", device: "disk", target: "bk", sync: "full" });
 * await job.outcome;
 * @throws {BlkError} as {@link createBackupJob}
 */
export async function backup(manager: JobManager, options: BackupOptions): Promise<BackupJob> {
  const job = await createBackupJob(manager, options);
  job.holdPause();
  job.start();
  job.releasePause();
  return job;
}
