/**
 * The intermediate commit job (QEMU 7.2 `block/commit.c`, QMP `block-commit` with a `top` below the
 * active layer): a `commit_top` filter above the top node; the job walks the top in 512 KiB chunks and
 * copies into the base whatever the layers from the top down to (excluding) the base allocate; at the end
 * the overlay of the top is re-pointed to the base (its image header told through the driver hook), the
 * filter goes away and the dropped nodes nobody owns are deleted. Active commit (top is the active layer
 * or has a writer) is QEMU's mirror with READY: `commit()` starts an {@link ActiveCommitJob} for it
 * (`active-commit.ts`). See `spec/jobs.md` §4, §2.6.
 */
import {
  BlkError,
  type BlockGraph,
  BlockNode,
  backendParent,
  type Edge,
  PERM,
  PERM_ALL,
  toBlkError,
} from "@blk/core";
import { BlockJob, checkNodeNotBusy } from "../block-job.ts";
import { errnoError, JobError } from "../errors.ts";
import type { JobManager } from "../manager.ts";
import type { RateLimitLike } from "../ratelimit.ts";
import {
  backingFileWriter,
  chainBetween,
  chainBottom,
  chainContains,
  ensureWritable,
  findBackingImage,
  lookupNode,
  nodeFilename,
  openJobFilter,
  skipFilters,
} from "../stream/chain.ts";
import type { BlockdevOnError, IoOperationType } from "../types.ts";
import { type ActiveCommitJob, startActiveCommit } from "./active-commit.ts";
import { commitTopDriver } from "./commit-top.ts";

/** Bytes per iteration of the commit loop (QEMU's `COMMIT_BUFFER_SIZE`): 512 KiB. */
export const COMMIT_BUFFER_SIZE = 524_288;

/** `block-commit` arguments (QAPI names). */
export interface CommitOptions {
  /** The job id. Omitted: QEMU uses the device's BlockBackend name, `''` for nodes, which is refused. */
  "job-id"?: string;
  /** The root node of the chain (name or node). */
  device: string | BlockNode;
  /** File name (or node name) of the top image (deprecated in QEMU); exclusive with `top-node`. */
  top?: string;
  /** The node whose data (and that of the layers down to the base) is committed; default the device. */
  "top-node"?: string;
  /** File name (or node name) of the base image (deprecated in QEMU); exclusive with `base-node`. */
  base?: string;
  /** The node the data goes into; default the bottom-most node of the top's chain. */
  "base-node"?: string;
  /** Backing file name to write into the header of the top's overlay (default: the base's file name). */
  "backing-file"?: string;
  /** Bytes per second, 0 = unlimited (default). */
  speed?: number;
  /** Error policy (default `report`); read errors are the source's, write errors the base's. */
  "on-error"?: BlockdevOnError;
  /** Name of the `commit_top` filter node; default a generated `#blockNNN`. */
  "filter-node-name"?: string;
  /** Default true. */
  "auto-finalize"?: boolean;
  /** Default true. */
  "auto-dismiss"?: boolean;
  /** A rate limiter to use instead of the default one (tests). */
  rateLimit?: RateLimitLike;
}

/** Internal construction arguments of {@link CommitJob} (use {@link commit}). */
export interface CommitJobInit {
  manager: JobManager;
  id: string;
  device: BlockNode;
  top: BlockNode;
  base: BlockNode;
  filter: BlockNode;
  backingFile: string | undefined;
  onError: BlockdevOnError;
  speed: number;
  autoFinalize: boolean;
  autoDismiss: boolean;
  reopenedRw: boolean;
  rateLimit?: RateLimitLike;
}

class IoFailure extends Error {
  readonly operation: IoOperationType;
  readonly error: BlkError;
  constructor(operation: IoOperationType, error: BlkError) {
    super(error.message);
    this.operation = operation;
    this.error = error;
  }
}

/** A running intermediate commit (job type `commit`). Create it with {@link commit}. */
export class CommitJob extends BlockJob {
  /** The root of the chain. */
  readonly device: BlockNode;
  /** The top node whose data is committed. */
  readonly top: BlockNode;
  /** The node receiving the data; the overlay's backing once the job completed. */
  readonly base: BlockNode;
  /** The `commit_top` filter above the top while the job runs. */
  readonly filter: BlockNode;
  /** The error policy. */
  readonly onError: BlockdevOnError;
  readonly #backingFile: string | undefined;
  #reopenedRw: boolean;
  #topEdge: Edge | undefined;
  #baseEdge: Edge | undefined;
  #dropped = false;
  #bytesCopied = 0;
  #filterGone = false;
  #buf: Uint8Array | undefined;

  /** @internal Use {@link commit}. */
  constructor(init: CommitJobInit) {
    super({
      manager: init.manager,
      id: init.id,
      type: "commit",
      speed: init.speed,
      autoFinalize: init.autoFinalize,
      autoDismiss: init.autoDismiss,
      ...(init.rateLimit === undefined ? {} : { rateLimit: init.rateLimit }),
    });
    this.device = init.device;
    this.top = init.top;
    this.base = init.base;
    this.filter = init.filter;
    this.onError = init.onError;
    this.#backingFile = init.backingFile;
    this.#reopenedRw = init.reopenedRw;
  }

  /** Bytes the job copied into the base. */
  get bytesCopied(): number {
    return this.#bytesCopied;
  }

  /** True once the top's overlay points to the base (successful completion). */
  get dropped(): boolean {
    return this.#dropped;
  }

  /** @internal Called by {@link commit} once the job holds its nodes. */
  _setEdges(top: Edge, base: Edge): void {
    this.#topEdge = top;
    this.#baseEdge = base;
  }

  #edges(): { top: Edge; base: Edge } {
    const top = this.#topEdge;
    const base = this.#baseEdge;
    if (top === undefined || base === undefined) throw new BlkError("EINVAL", "commit job holds no nodes");
    return { top, base };
  }

  protected async run(): Promise<void> {
    const { top, base } = this.#edges();
    const len = this.top.length;
    this.progressSetRemaining(len);
    if (this.base.length < len) {
      this.setPhase("resize");
      await base.truncate(len);
    }
    this.setPhase("copy");
    for (let offset = 0; offset < len; ) {
      await this.ratelimitSleep();
      if (this.isCancelled()) break;
      let n = Math.min(COMMIT_BUFFER_SIZE * this.copyBatchChunks(this.onError), len - offset);
      let copy = false;
      try {
        let first: { length: number; allocated: boolean } | undefined;
        try {
          first = (await this.top.blockStatusAbove(offset, n, { base: this.base }))[0];
        } catch (e) {
          throw new IoFailure("read", toBlkError(e));
        }
        n = first?.length ?? len - offset;
        copy = first?.allocated ?? false;
        if (copy) {
          // One buffer for the whole job (the loop copies one request at a time), as QEMU's commit does.
          if (this.#buf === undefined || this.#buf.length < n) this.#buf = new Uint8Array(n);
          const buf = this.#buf.subarray(0, n);
          try {
            await top.readInto(offset, buf);
          } catch (e) {
            throw new IoFailure("read", toBlkError(e));
          }
          try {
            await base.write(offset, buf);
          } catch (e) {
            throw new IoFailure("write", toBlkError(e));
          }
          this.#bytesCopied += n;
        }
      } catch (e) {
        const f = e instanceof IoFailure ? e : new IoFailure("read", toBlkError(e));
        const action = this.errorAction(this.onError, f.operation, f.error);
        if (action === "report") throw errnoError(f.error.code, { cause: f.error });
        // ignore and stop retry the same chunk (stop after the user resumed)
        continue;
      }
      this.progressWorkDone(n);
      if (copy) this.ratelimitProcessedBytes(n);
      offset += n;
    }
  }

  // ---------------------------------------------------------------- completion

  protected override async prepare(): Promise<void> {
    const graph = this.filter.graph;
    const moved = this.filter.parents.filter((e) => e.parent instanceof BlockNode);
    // QEMU's bdrv_drop_intermediate: every parent of commit_top (the overlay's backing link) now uses the base.
    graph.replaceNode(this.filter, this.base);
    this.#dropped = true;
    const filename = this.#backingFile ?? nodeFilename(this.base);
    const format = skipFilters(this.base).driver.format;
    for (const edge of moved) {
      if (!(edge.parent instanceof BlockNode) || edge.child !== this.base) continue;
      const writer = backingFileWriter(edge.parent);
      if (writer === undefined) continue;
      try {
        await writer.changeBackingFile(filename, format);
      } catch (e) {
        throw new JobError(
          "EPERM",
          `Could not update backing file: ${toBlkError(e).message}`,
          "GenericError",
          {
            cause: e,
          },
        );
      }
    }
  }

  protected override async clean(): Promise<void> {
    const graph = this.filter.graph;
    this.#baseEdge?.detach();
    this.releaseNodes();
    if (!this.#filterGone) {
      this.#filterGone = true;
      if (!this.#dropped) {
        try {
          graph.replaceNode(this.filter, this.top);
        } catch {
          // the filter's parents took no more than the top already offers
        }
      }
      // Deleting the filter also deletes the dropped nodes below it that nobody owns or uses.
      await graph.delete(this.filter, { force: true });
    }
    if (this.#reopenedRw) {
      this.#reopenedRw = false;
      try {
        await this.base.reopen({ readOnly: true });
      } catch {
        // someone else writes the base now; it stays read-write
      }
    }
    await super.clean();
  }
}

/** `Device 'X' not found` with QEMU's class `DeviceNotFound` (kept by `block-commit` for libvirt). */
function deviceNotFound(name: string): JobError {
  return new JobError("ENOENT", `Device '${name}' not found`, "DeviceNotFound");
}

/**
 * Starts a commit job (QMP `block-commit`) with QEMU's checks and messages.
 *
 * Active commit, when the top (after filters) is the device or someone holds write permission on it:
 * returns an {@link ActiveCommitJob} (the mirror engine, job type `commit`): a `mirror_top` filter
 * (`filter-node-name`, else generated) takes over the top's parents; the job copies into the base what the
 * layers from the top down to (excluding) the base allocate (a shorter base is grown first, a read-only
 * base reopened read-write), becomes READY, tracks guest writes, and on `complete` replaces the top by
 * the base under all its parents (the dropped layers nobody owns are deleted). A soft cancel when READY
 * ends with `BLOCK_JOB_COMPLETED` without the switch; a cancel before READY is forced.
 *
 * Intermediate commit otherwise: inserts `commit_top`
 * above the top (named `filter-node-name`, else generated), makes the job hold the device, the nodes from
 * the top down to the base and a writer on the base, and starts it. Events up to `running` are emitted
 * before the promise resolves. On completion the overlay of the top uses the base as backing; if the
 * overlay's driver state has `changeBackingFile(filename, format)` ({@link BackingFileWriter}) it is
 * called with `backing-file` (default the base's file name) and the base's format.
 * @throws {JobError} DeviceNotFound `Device 'X' not found`; `Need a root block node`,
 *   `'top-node' and 'top' are mutually exclusive`, `'base-node' and 'base' are mutually exclusive`,
 *   `Cannot find device='' nor node-name='X'`, `'X' is not in this backing file chain`,
 *   `Top image file X not found`, `Can't find 'X' in the backing chain`, `cannot commit an image into
 *   itself`, `'backing-file' specified, but 'top' is the active layer` (or `… has a writer on it`),
 *   `Node 'X' is busy: …`; the job id and speed errors of
 *   {@link BlockJob}; {@link BlkError} from the graph (duplicate filter name, permission conflicts).
 * @example
 * const job = await commit(manager, graph, { "job-id": "commit0", device: "top", "top-node": "sn2", "base-node": "sn1" });
 * await job.outcome; // { status: "completed" }: sn2's overlay now uses sn1
 * const active = await commit(manager, graph, { "job-id": "commit1", device: "top", "base-node": "base" });
 * if (await active.whenStatus("ready")) active.complete(); // then every parent of top uses base
 */
export async function commit(
  manager: JobManager,
  graph: BlockGraph,
  options: CommitOptions,
): Promise<CommitJob | ActiveCommitJob> {
  let device: BlockNode;
  if (typeof options.device === "string") {
    const found = graph.find(options.device);
    if (found === undefined) throw deviceNotFound(options.device);
    device = found;
  } else {
    device = options.device;
  }
  if (!device.parents.every((e) => !(e.parent instanceof BlockNode) && e.parent.type === "block-backend")) {
    throw new JobError("EINVAL", "Need a root block node");
  }
  if (options.top !== undefined && options["top-node"] !== undefined) {
    throw new JobError("EINVAL", "'top-node' and 'top' are mutually exclusive");
  }
  if (options.base !== undefined && options["base-node"] !== undefined) {
    throw new JobError("EINVAL", "'base-node' and 'base' are mutually exclusive");
  }
  let top = device;
  const topNode = options["top-node"];
  if (topNode !== undefined) {
    top = lookupNode(graph, topNode);
    if (!chainContains(device, top))
      throw new JobError("EINVAL", `'${topNode}' is not in this backing file chain`);
  } else if (options.top !== undefined) {
    const found =
      findBackingImage(device, options.top) ?? (device.nodeName === options.top ? device : undefined);
    if (found === undefined) throw new JobError("ENOENT", `Top image file ${options.top} not found`);
    top = found;
  }
  let base: BlockNode;
  const baseNode = options["base-node"];
  if (baseNode !== undefined) {
    base = lookupNode(graph, baseNode);
    if (!chainContains(top, base))
      throw new JobError("EINVAL", `'${baseNode}' is not in this backing file chain`);
  } else if (options.base !== undefined) {
    const found = findBackingImage(top, options.base);
    if (found === undefined)
      throw new JobError("ENOENT", `Can't find '${options.base}' in the backing chain`);
    base = found;
  } else {
    base = chainBottom(top);
  }
  const intermediates = chainBetween(top, base);
  for (const n of intermediates) checkNodeNotBusy(n);
  checkNodeNotBusy(base);
  if (skipFilters(top) === skipFilters(base))
    throw new JobError("EINVAL", "cannot commit an image into itself");
  const isActiveLayer = skipFilters(top) === skipFilters(device);
  const hasWriter = (top.cumulativePerm.perm & PERM.WRITE) !== 0;
  if (isActiveLayer || hasWriter) {
    if (options["backing-file"] !== undefined) {
      throw new JobError(
        "EINVAL",
        isActiveLayer
          ? "'backing-file' specified, but 'top' is the active layer"
          : "'backing-file' specified, but 'top' has a writer on it",
      );
    }
    checkNodeNotBusy(device);
    // Active commit: the mirror engine with job type `commit` (spec/jobs.md §2.6).
    const reopened = await ensureWritable(base);
    try {
      return await startActiveCommit(manager, graph, {
        device,
        top,
        base,
        jobId: options["job-id"] ?? "",
        speed: options.speed ?? 0,
        onError: options["on-error"] ?? "report",
        filterNodeName: options["filter-node-name"],
        autoFinalize: options["auto-finalize"] ?? true,
        autoDismiss: options["auto-dismiss"] ?? true,
        reopenedRw: reopened,
        rateLimit: options.rateLimit,
      });
    } catch (e) {
      if (reopened) await base.reopen({ readOnly: true }).catch(() => undefined);
      throw e;
    }
  }
  checkNodeNotBusy(device);

  const reopenedRw = await ensureWritable(base);
  const { filter, remove: removeFilter } = await openJobFilter(graph, commitTopDriver, {}, top, {
    childName: "backing",
    nodeName: options["filter-node-name"],
    reopenedRw: reopenedRw ? base : undefined,
  });
  let job: CommitJob;
  try {
    job = new CommitJob({
      manager,
      id: options["job-id"] ?? "",
      device,
      top,
      base,
      filter,
      backingFile: options["backing-file"],
      onError: options["on-error"] ?? "report",
      speed: options.speed ?? 0,
      autoFinalize: options["auto-finalize"] ?? true,
      autoDismiss: options["auto-dismiss"] ?? true,
      reopenedRw,
      ...(options.rateLimit === undefined ? {} : { rateLimit: options.rateLimit }),
    });
  } catch (e) {
    await removeFilter();
    throw e;
  }
  let baseEdge: Edge | undefined;
  try {
    job.holdNode(device, "main node", { perm: 0, shared: PERM_ALL });
    let topEdge: Edge | undefined;
    for (const n of intermediates) {
      const e = job.holdNode(n, "intermediate node", { perm: 0, shared: PERM_ALL & ~PERM.RESIZE });
      topEdge ??= e;
    }
    const grow = base.length < top.length ? PERM.RESIZE : 0;
    baseEdge = graph.attach(backendParent(), base, {
      name: "root",
      perm: PERM.CONSISTENT_READ | PERM.WRITE | grow,
      shared: PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED,
    });
    if (topEdge === undefined) throw new BlkError("EINVAL", "nothing to commit");
    job._setEdges(topEdge, baseEdge);
  } catch (e) {
    baseEdge?.detach();
    job.releaseNodes();
    await removeFilter();
    job.earlyFail(toBlkError(e));
    throw e;
  }
  job.start();
  return job;
}
