/**
 * The `copy-before-write` filter (QEMU 7.2 `block/copy-before-write.c` + `block/block-copy.c` behaviour, see
 * `spec/jobs.md` §3.3–§3.4): a filter node with two children, `file` (the source it filters) and `target`.
 * Before a write, write-zeroes or discard reaches the source, the clusters it touches that are still marked
 * "to copy" in the copy bitmap are copied from the source to the target (widened to whole clusters, once
 * per cluster, ignoring any speed limit); then the request proceeds. Reads pass through. A backup job runs
 * its background copy over the same copy bitmap through the same {@link CopyEngine}, so a cluster is
 * copied exactly once, whichever side gets there first.
 */
import {
  type BeforeWriteEvent,
  BlkError,
  type BlockDriver,
  BlockNode,
  CHILD_ROLE,
  CopyEngine,
  type CopyError,
  type CopyErrorAction,
  type CopyProgress,
  type DirtyBitmap,
  defaultChildPerm,
  type Edge,
  FilterDriverState,
  type OpenContext,
  PERM,
  PERM_ALL,
  toBlkError,
} from "@blk/core";
import { type Clock, RateLimit, systemClock } from "@blk/throttle";
import { BLOCK_JOB_SLICE_NS } from "../ratelimit.ts";

/** The smallest backup cluster (QEMU's `BLOCK_COPY_CLUSTER_SIZE_DEFAULT`): 64 KiB. */
export const BACKUP_CLUSTER_SIZE_DEFAULT = 65536;

/** What the filter does when a copy before a guest write fails (QEMU 7.1+ `on-cbw-error`). */
export type OnCbwError = "break-guest-write" | "break-snapshot";

/** Options of the `copy-before-write` driver (library form; the children are `file` and `target`). */
export interface CopyBeforeWriteOptions {
  /**
   * Copy only the clusters this bitmap of the source marks (QEMU's `bitmap` option); default: every
   * cluster. Merged at open, rounded outward to clusters.
   */
  bitmap?: DirtyBitmap;
  /** `break-guest-write` (default): a failed copy fails the guest request; `break-snapshot`: the guest request succeeds and the copy is abandoned from then on. */
  onCbwError?: OnCbwError;
  /** Skip ranges not allocated in the source node itself (backup `sync=top`). */
  skipUnallocated?: boolean;
  /** Most background copy tasks in flight (QEMU `x-perf.max-workers`, default 64). */
  maxWorkers?: number;
  /** Largest copy task in bytes (QEMU `x-perf.max-chunk`, 0 = no limit beyond the default). */
  maxChunk?: number;
  /** Clock of the background copy's speed limit (default the process clock). */
  clock?: Clock;
  /** Receives warnings (the default cluster size used for a target that reports none). */
  onWarning?: (message: string) => void;
}

/** Callbacks a job installs on the filter's copy engine (background copy only, except `onProgress`). */
export interface CopyBeforeWriteHooks {
  /** Awaited before each background chunk: the job's pause point. */
  pausePoint?: () => void | Promise<void>;
  /** Every finished chunk, background or copy-before-write. */
  onProgress?: (p: CopyProgress) => void;
  /** A failed background chunk; default `fail`. */
  onError?: (e: CopyError) => CopyErrorAction;
}

/** The filtered node below a chain of filters, then its backing node (QEMU `bdrv_backing_chain_next`). */
function backingOf(node: BlockNode): BlockNode | undefined {
  let n: BlockNode = node;
  while (n.driver.kind === "filter") {
    const f = n.filtered;
    if (f === undefined) return undefined;
    n = f;
  }
  return n.backing;
}

/**
 * The backup cluster size for `target` (QEMU's `block_copy_calculate_cluster_size`, `spec/jobs.md` §3.2):
 * `max(64 KiB, target cluster size)`; 64 KiB (with a warning) when the target reports no cluster size and
 * has no backing; 64 KiB when the query fails but the target has a backing node.
 * @throws {BlkError} the query's code, `Couldn't determine the cluster size of the target image, which has
 *   no backing file`, when it fails on a target without backing
 * @example
 * const cluster = await backupClusterSize(targetNode); // 65536 for a 4 KiB-cluster target
 */
export async function backupClusterSize(
  target: BlockNode,
  onWarning?: (message: string) => void,
): Promise<number> {
  let clusterSize: number | undefined;
  let error: BlkError | undefined;
  try {
    clusterSize = (await target.info()).clusterSize;
  } catch (e) {
    error = toBlkError(e);
  }
  if (clusterSize !== undefined && clusterSize > 0) return Math.max(BACKUP_CLUSTER_SIZE_DEFAULT, clusterSize);
  const hasBacking = backingOf(target) !== undefined;
  if (error === undefined || error.code === "ENOTSUP") {
    if (!hasBacking) {
      onWarning?.(
        `Target '${target.nodeName}' reports no cluster size and has no backing file: using ` +
          `${BACKUP_CLUSTER_SIZE_DEFAULT} bytes; the backup may be unusable if its real cluster size is larger`,
      );
    }
    return BACKUP_CLUSTER_SIZE_DEFAULT;
  }
  if (hasBacking) return BACKUP_CLUSTER_SIZE_DEFAULT;
  throw new BlkError(
    error.code,
    "Couldn't determine the cluster size of the target image, which has no backing file",
    { cause: error },
  );
}

const minNonZero = (a: number, b: number): number => (a === 0 ? b : b === 0 ? a : Math.min(a, b));

/**
 * The open state of a `copy-before-write` node: a pass-through filter plus the copy bitmap (anonymous,
 * disabled, busy, on the source node, at cluster granularity) and the {@link CopyEngine} that both the
 * guest-write path and a backup job's background copy use.
 */
export class CopyBeforeWriteState extends FilterDriverState {
  /** The edge to the target. */
  readonly target: Edge;
  /** The backup cluster size (the copy bitmap's granularity). */
  readonly clusterSize: number;
  /** Clusters still to copy. */
  readonly copyBitmap: DirtyBitmap;
  /** The copy engine over {@link CopyBeforeWriteState.copyBitmap}. */
  readonly engine: CopyEngine;
  /** The background copy's speed limit (a backup job shares it as its own). */
  readonly rateLimit: RateLimit;
  /** Callbacks of the job that runs the background copy. */
  readonly hooks: CopyBeforeWriteHooks = {};
  /** What a failed copy-before-write does. */
  readonly onCbwError: OnCbwError;
  #snapshotError: BlkError | undefined;
  #unregister: () => boolean;

  constructor(file: Edge, target: Edge, clusterSize: number, options: CopyBeforeWriteOptions = {}) {
    super(file);
    this.target = target;
    this.clusterSize = clusterSize;
    this.onCbwError = options.onCbwError ?? "break-guest-write";
    const node = file.parent;
    if (!(node instanceof BlockNode)) throw new BlkError("EINVAL", "copy-before-write needs a node parent");
    const source = file.child;
    const bitmap = source.createBitmapSync({ granularity: clusterSize, disabled: true });
    try {
      if (options.bitmap === undefined) bitmap.setDirty(0, source.length);
      else bitmap.mergeUnchecked(options.bitmap);
    } catch (e) {
      bitmap.release();
      throw e;
    }
    bitmap.busy = true;
    this.copyBitmap = bitmap;
    const maxTransfer = minNonZero(source.state.limits.maxTransfer, target.child.state.limits.maxTransfer);
    let chunk =
      maxTransfer !== 0 && maxTransfer < clusterSize
        ? clusterSize
        : minNonZero(Math.max(clusterSize, 1 << 20), maxTransfer);
    if ((options.maxChunk ?? 0) > 0) chunk = Math.min(chunk, options.maxChunk ?? 0);
    chunk = Math.max(clusterSize, Math.floor(chunk / clusterSize) * clusterSize);
    const clock = options.clock ?? systemClock;
    this.rateLimit = new RateLimit({ sliceNs: BLOCK_JOB_SLICE_NS, clock });
    const skip = options.skipUnallocated ?? false;
    this.engine = new CopyEngine({
      source: file,
      target,
      bitmap,
      chunkSize: chunk,
      maxWorkers: options.maxWorkers ?? 64,
      // sync=top asks the source node alone (unallocated there is skipped); otherwise the whole chain, so
      // ranges that read as zeroes become write-zeroes on the target (block-copy does not unmap).
      status: skip ? "node" : "chain",
      skipUnallocated: skip,
      zeroes: "write-zeroes",
      rateLimit: this.rateLimit,
      clock,
      pausePoint: () => this.hooks.pausePoint?.(),
      onProgress: (p) => this.hooks.onProgress?.(p),
      onError: (e) => this.hooks.onError?.(e) ?? "fail",
    });
    this.#unregister = node.beforeWrite.add((ev) => this.#beforeWrite(ev));
  }

  /** With `break-snapshot`: the error that broke the snapshot (copies stopped), if any. */
  get snapshotError(): BlkError | undefined {
    return this.#snapshotError;
  }

  async #beforeWrite(ev: BeforeWriteEvent): Promise<void> {
    if (ev.writeUnchanged || this.#snapshotError !== undefined || ev.bytes === 0) return;
    try {
      await this.engine.copyRange(ev.offset, ev.bytes);
    } catch (e) {
      if (this.onCbwError === "break-guest-write") throw e;
      this.#snapshotError = toBlkError(e);
    }
  }

  protected override async _close(): Promise<void> {
    this.#unregister();
    this.engine.cancel();
    const b = this.copyBitmap;
    if (!b.released) {
      b.busy = false;
      b.release();
    }
  }
}

/**
 * Permissions of the filter's children (QEMU's rules for copy-before-write): the target is written
 * (shares everything but resize: its length was checked once); the source passes its parents' needs
 * through and, once the filter has users, needs consistent reads when they write and lets nobody else
 * write or resize it (every write must come through the filter). "Has users" is approximated by "its
 * users need some permission", so the filter can be opened under a node that still has writers.
 */
function cbwChildPerm(
  role: number,
  parentPerm: number,
  parentShared: number,
  writable: boolean,
): { perm: number; shared: number } {
  if ((role & CHILD_ROLE.FILTERED) === 0) return { perm: PERM.WRITE, shared: PERM_ALL & ~PERM.RESIZE };
  const p = defaultChildPerm(role, parentPerm, parentShared, writable);
  if (parentPerm === 0) return p;
  const perm = (parentPerm & PERM.WRITE) !== 0 ? p.perm | PERM.CONSISTENT_READ : p.perm;
  return { perm, shared: p.shared & ~(PERM.WRITE | PERM.RESIZE) };
}

/**
 * The `copy-before-write` filter driver (format name `copy-before-write`). Open it above a source with
 * {@link BlockGraph.openFilterAbove}, passing the target as the `target` child.
 * @example
 * const cbw = await graph.openFilterAbove(copyBeforeWriteDriver, {}, source, {
 *   extraChildren: { target: { node: target, role: CHILD_ROLE.DATA } },
 * });
 * @throws {BlkError} EINVAL when `file` or `target` is missing; the cluster-size query's error
 */
export const copyBeforeWriteDriver: BlockDriver<CopyBeforeWriteOptions> = {
  format: "copy-before-write",
  kind: "filter",
  childOptions: [{ name: "file" }, { name: "target", role: CHILD_ROLE.DATA }],
  childPerm: cbwChildPerm,
  async open(options: CopyBeforeWriteOptions, ctx: OpenContext): Promise<CopyBeforeWriteState> {
    const file = ctx.children.get("file");
    if (file === undefined) throw new BlkError("EINVAL", "Parameter 'file' is missing");
    const target = ctx.children.get("target");
    if (target === undefined) throw new BlkError("EINVAL", "Parameter 'target' is missing");
    const clusterSize = await backupClusterSize(target.child, options.onWarning);
    return new CopyBeforeWriteState(file, target, clusterSize, options);
  },
};
