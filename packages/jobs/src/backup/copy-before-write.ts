/**
 * The `copy-before-write` filter (QEMU 7.2 `block/copy-before-write.c` + `block/block-copy.c` behaviour, see
 * `spec/jobs.md` §3.3–§3.4): a filter node with two children, `file` (the source it filters) and `target`.
 * Before a write, write-zeroes or discard reaches the source, the clusters it touches that are still marked
 * "to copy" in the copy bitmap are copied from the source to the target (widened to whole clusters, once
 * per cluster, ignoring any speed limit); then the request proceeds. Reads pass through. A backup job runs
 * its background copy over the same copy bitmap through the same {@link CopyEngine}, so a cluster is
 * copied exactly once, whichever side gets there first.
 *
 * Fleecing: when the source is in the target's backing chain (a temporary overlay backed by the source,
 * exported so that a client reads the point-in-time view), the copies are written to the target as
 * serialising requests, so a read of the overlay that is in flight finishes before a copy lands there
 * and the guest write that caused it reaches the source (QEMU's block-copy does the same).
 *
 * Beyond QEMU (`x-blk-`): with a buffer budget, a copy before a guest write only waits until the old data
 * is read into memory; the guest write then proceeds while the target write completes in the background
 * (see {@link CopyBeforeWriteOptions.bufferSize}); and a stall cap breaks the snapshot rather than hold
 * a guest write longer than allowed ({@link CopyBeforeWriteOptions.maxGuestStallNs}).
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
  type NodeWriteOptions,
  type NodeZeroOptions,
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
  /**
   * blk extension (`x-blk-cbw-buffer-size`): bytes of old data that copies before guest writes may hold
   * in memory while their target writes are still running. A guest write waits only until the old data
   * of its clusters is read; when the budget is used up it waits for the target write, as QEMU does.
   * 0 (default here; the backup job defaults to {@link CBW_DEFAULT_BUFFER_SIZE}) = QEMU's behaviour.
   * Ignored (0) when fleecing: the target is read by others while the job runs.
   */
  bufferSize?: number;
  /**
   * blk extension (`x-blk-max-guest-stall`, in nanoseconds here): a guest write that waited this long for
   * its copy proceeds and the snapshot is broken ({@link CopyBeforeWriteState.snapshotError} is
   * `ETIMEDOUT`; a backup job then fails). 0 (default) = no cap.
   */
  maxGuestStallNs?: number;
}

/** Callbacks a job installs on the filter's copy engine (background copy only, except `onProgress`). */
export interface CopyBeforeWriteHooks {
  /** Awaited before each background chunk: the job's pause point. */
  pausePoint?: () => void | Promise<void>;
  /** Every finished chunk, background or copy-before-write. */
  onProgress?: (p: CopyProgress) => void;
  /** A failed background chunk; default `fail`. */
  onError?: (e: CopyError) => CopyErrorAction;
  /**
   * A buffered copy's target write failed (the old data stays in memory until
   * {@link CopyBeforeWriteState.flushBuffered} writes it), or the snapshot broke: wake the job.
   */
  onBufferedEvent?: () => void;
}

/**
 * With a buffer budget, background chunks in flight while the guest is writing (a guest write in the
 * filter now or within the last {@link BLOCK_JOB_SLICE_NS}): the background copy yields the I/O queue to
 * the guest instead of keeping `max-workers` chunks ahead of every guest request.
 */
export const CBW_GUEST_ACTIVE_WORKERS = 2;

/** Default buffer budget of a backup job's copies before guest writes (`x-blk-cbw-buffer-size`): 16 MiB. */
export const CBW_DEFAULT_BUFFER_SIZE: number = 16 << 20;

/** Statistics of the buffered copy-before-write path. */
export interface CbwBufferStats {
  /** Bytes held now (old data read, target write not finished). */
  bytes: number;
  /** Most bytes held at once. */
  maxBytes: number;
  /** Guest writes released before their copies reached the target. */
  bufferedWrites: number;
  /** Guest writes that waited for the target write (budget used up, or no budget). */
  syncWrites: number;
  /** Buffered target writes that failed (and are kept for a retry). */
  failedWrites: number;
}

/** One buffered copy: clusters claimed from the copy bitmap, their old data, and its target write. */
interface BufferedCopy {
  start: number;
  end: number;
  /** Budget bytes reserved (whole range until classified, then the data bytes). */
  reserved: number;
  /** True once the old data is in memory. */
  read: boolean;
  /** Resolves once the old data is in memory (or the claim was given back). */
  readDone: Promise<void>;
  /** Runs of old data: `data` kept in memory, `zero` written as zeroes, `skip` left alone. */
  runs: { offset: number; kind: "data" | "zero" | "skip"; length: number; data?: Uint8Array }[];
  /** The target write in flight, if any. */
  writing: Promise<void> | undefined;
  /** The last target write error (kept for {@link CopyBeforeWriteState.flushBuffered}). */
  error: BlkError | undefined;
}

/** True when `node` is `target` or below it through filtered / backing children (QEMU `bdrv_chain_contains`). */
function chainContains(top: BlockNode, node: BlockNode): boolean {
  for (let n: BlockNode | undefined = top; n !== undefined; n = n.filteredOrBacking?.child) {
    if (n === node) return true;
  }
  return false;
}

/**
 * The target as the copy engine sees it when fleecing: the same edge, with serialising writes.
 * (A `serialising` option of the copy engine's writes would make this unnecessary.)
 */
function serialisingTarget(edge: Edge): Edge {
  return new Proxy(edge, {
    get(t, prop) {
      if (prop === "write") {
        return (o: number, d: Uint8Array, opts: NodeWriteOptions = {}) =>
          t.write(o, d, { ...opts, serialising: true });
      }
      if (prop === "writeZeroes") {
        return (o: number, n: number, opts: NodeZeroOptions = {}) =>
          t.writeZeroes(o, n, { ...opts, serialising: true });
      }
      const v: unknown = Reflect.get(t, prop, t);
      return typeof v === "function" ? (v as (...a: unknown[]) => unknown).bind(t) : v;
    },
  });
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
  /** The source is in the target's backing chain (fleecing): target writes are serialising. */
  readonly fleecing: boolean;
  /** The buffer budget in bytes (0 = copies before guest writes wait for the target write). */
  readonly bufferSize: number;
  /** The guest stall cap in nanoseconds (0 = none). */
  readonly maxGuestStallNs: number;
  /** Statistics of the buffered path. */
  readonly bufferStats: CbwBufferStats = {
    bytes: 0,
    maxBytes: 0,
    bufferedWrites: 0,
    syncWrites: 0,
    failedWrites: 0,
  };
  #snapshotError: BlkError | undefined;
  #unregister: () => boolean;
  #buffered = new Set<BufferedCopy>();
  #clock: Clock;
  #closing = false;
  #guestInFlight = 0;
  #claimedBytes = 0;
  #lastGuestNs: number | undefined;
  #chunkWaiters: (() => void)[] = [];

  constructor(file: Edge, target: Edge, clusterSize: number, options: CopyBeforeWriteOptions = {}) {
    super(file);
    this.target = target;
    this.clusterSize = clusterSize;
    this.onCbwError = options.onCbwError ?? "break-guest-write";
    const node = file.parent;
    if (!(node instanceof BlockNode)) throw new BlkError("EINVAL", "copy-before-write needs a node parent");
    const source = file.child;
    this.fleecing = chainContains(target.child, source);
    this.bufferSize = this.fleecing ? 0 : Math.max(0, options.bufferSize ?? 0);
    this.maxGuestStallNs = Math.max(0, options.maxGuestStallNs ?? 0);
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
    this.#clock = clock;
    this.rateLimit = new RateLimit({ sliceNs: BLOCK_JOB_SLICE_NS, clock });
    const skip = options.skipUnallocated ?? false;
    this.engine = new CopyEngine({
      source: file,
      target: this.fleecing ? serialisingTarget(target) : target,
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
      pausePoint: () => this.#backgroundGate(),
      onProgress: (p) => {
        this.#chunkDone();
        this.hooks.onProgress?.(p);
      },
      onError: (e) => {
        this.#chunkDone();
        return this.hooks.onError?.(e) ?? "fail";
      },
    });
    this.#unregister = node.beforeWrite.add((ev) => this.#beforeWrite(ev));
    // The filter took over a node the guest may be writing to: start as if it were, so the background
    // copy ramps up only once the guest has been quiet for a slice.
    this.#lastGuestNs = clock.now();
  }

  /** With `break-snapshot` or a stall cap: the error that broke the snapshot (copies stopped), if any. */
  get snapshotError(): BlkError | undefined {
    return this.#snapshotError;
  }

  /** Bytes claimed by buffered copies and not on the target yet (work still to do, not memory). */
  get bufferedBytes(): number {
    return this.#claimedBytes;
  }

  /** Buffered copies whose target write is still to do (in flight or failed). */
  get bufferedCopies(): number {
    return this.#buffered.size;
  }

  /** True while the guest writes: a write in the filter, or one within the last slice. */
  get guestActive(): boolean {
    if (this.#guestInFlight > 0) return true;
    const last = this.#lastGuestNs;
    return last !== undefined && this.#clock.now() - last < BLOCK_JOB_SLICE_NS;
  }

  /**
   * Before each background chunk: the job's pause point, then (with a buffer budget) at most
   * {@link CBW_GUEST_ACTIVE_WORKERS} chunks in flight while the guest is active.
   */
  async #backgroundGate(): Promise<void> {
    await this.hooks.pausePoint?.();
    if (this.bufferSize === 0) return;
    while (
      this.engine.stats.inFlight >= CBW_GUEST_ACTIVE_WORKERS &&
      this.guestActive &&
      !this.engine.cancelled &&
      !this.#closing
    ) {
      // Woken by a finished chunk, or re-checked when the guest may have gone quiet.
      let timer: { cancel(): void } | undefined;
      await new Promise<void>((resolve) => {
        this.#chunkWaiters.push(resolve);
        timer = this.#clock.setTimer(resolve, BLOCK_JOB_SLICE_NS);
      });
      timer?.cancel();
    }
  }

  /** A chunk finished: wake the gate once the engine has updated its counters (after this turn). */
  #chunkDone(): void {
    if (this.#chunkWaiters.length === 0) return;
    const waiters = this.#chunkWaiters;
    this.#chunkWaiters = [];
    setImmediate(() => {
      for (const w of waiters) w();
    });
  }

  #breakSnapshot(error: BlkError): void {
    if (this.#snapshotError !== undefined) return;
    this.#snapshotError = error;
    this.hooks.onBufferedEvent?.();
  }

  async #beforeWrite(ev: BeforeWriteEvent): Promise<void> {
    if (ev.writeUnchanged || this.#snapshotError !== undefined || ev.bytes === 0) return;
    this.#lastGuestNs = this.#clock.now();
    this.#guestInFlight++;
    try {
      await this.#guarded(ev);
    } finally {
      this.#guestInFlight--;
      this.#lastGuestNs = this.#clock.now();
    }
  }

  async #guarded(ev: BeforeWriteEvent): Promise<void> {
    const copy = this.#copyBefore(ev.offset, ev.bytes);
    const cap = this.maxGuestStallNs;
    try {
      if (cap === 0) {
        await copy;
        return;
      }
      let timer: { cancel(): void } | undefined;
      const timedOut = new Promise<boolean>((resolve) => {
        timer = this.#clock.setTimer(() => resolve(true), cap);
      });
      try {
        if (await Promise.race([copy.then(() => false), timedOut])) {
          // The copy goes on and may now read new data: the snapshot is no longer a point in time.
          copy.catch(() => undefined);
          this.#breakSnapshot(
            new BlkError("ETIMEDOUT", "copy-before-write took longer than x-blk-max-guest-stall"),
          );
        }
      } finally {
        timer?.cancel();
      }
    } catch (e) {
      if (this.onCbwError === "break-guest-write") throw e;
      this.#breakSnapshot(toBlkError(e));
    }
  }

  /** Copies the old data of `[offset, offset+bytes)` out of the guest write's way. */
  async #copyBefore(offset: number, bytes: number): Promise<void> {
    const cs = this.clusterSize;
    const bm = this.copyBitmap;
    const start = Math.floor(offset / cs) * cs;
    const end = Math.min(bm.size, Math.ceil((offset + bytes) / cs) * cs);
    // Buffered copies over the range: their old data must be in memory before the guest overwrites it.
    for (;;) {
      const reading = [...this.#buffered].filter((c) => !c.read && c.start < end && start < c.end);
      if (reading.length === 0) break;
      await Promise.all(reading.map((c) => c.readDone));
    }
    const dirty = this.bufferSize > 0 ? this.#dirtyBytes(start, end) : 0;
    if (dirty > 0 && this.bufferStats.bytes + dirty <= this.bufferSize) {
      await this.#buffer(start, end, dirty);
    } else if (dirty > 0 || this.bufferSize === 0) {
      this.bufferStats.syncWrites++;
    }
    // Waits for background chunks over the range and copies whatever is still marked (all of it without
    // a budget; what the buffered path could not claim otherwise).
    await this.engine.copyRange(offset, bytes);
  }

  #dirtyBytes(start: number, end: number): number {
    const bm = this.copyBitmap;
    let n = 0;
    for (let pos = start; pos < end; ) {
      const area = bm.nextDirtyArea(pos, end, end - pos);
      if (area === null) break;
      n += area.count;
      pos = area.start + area.count;
    }
    return n;
  }

  /** Claims the dirty clusters of `[start, end)`, reads their old data, and starts the target write. */
  async #buffer(start: number, end: number, dirty: number): Promise<void> {
    const bm = this.copyBitmap;
    const claimed: { start: number; count: number }[] = [];
    for (let pos = start; pos < end; ) {
      const area = bm.nextDirtyArea(pos, end, end - pos);
      if (area === null) break;
      claimed.push(area);
      pos = area.start + area.count;
    }
    for (const a of claimed) bm.resetDirty(a.start, a.count);
    let readDone!: () => void;
    const entry: BufferedCopy = {
      start,
      end,
      reserved: dirty,
      read: false,
      readDone: new Promise<void>((resolve) => (readDone = resolve)),
      runs: [],
      writing: undefined,
      error: undefined,
    };
    this.#buffered.add(entry);
    this.#claimedBytes += dirty;
    this.#reserve(dirty);
    this.bufferStats.bufferedWrites++;
    try {
      const runs: BufferedCopy["runs"] = [];
      for (const a of claimed) runs.push(...(await this.#classify(a.start, a.count)));
      for (const r of runs) {
        if (r.kind !== "data") continue;
        r.data = new Uint8Array(r.length);
        await this.child.readInto(r.offset, r.data);
      }
      const held = runs.reduce((n, r) => n + (r.data?.length ?? 0), 0);
      this.#reserve(held - entry.reserved);
      entry.reserved = held;
      entry.runs = runs;
      entry.read = true;
    } catch (e) {
      // Nothing read: give the clusters back; the synchronous path copies them (and fails the guest write).
      for (const a of claimed) bm.setDirty(a.start, a.count);
      this.#buffered.delete(entry);
      this.#claimedBytes -= dirty;
      this.#reserve(-entry.reserved);
      readDone();
      throw e;
    }
    readDone();
    entry.writing = this.#writeBuffered(entry).then(() => undefined);
  }

  #reserve(delta: number): void {
    const s = this.bufferStats;
    s.bytes += delta;
    if (s.bytes > s.maxBytes) s.maxBytes = s.bytes;
  }

  /** Data / zero / skip runs of whole clusters, as the copy engine classifies them. */
  async #classify(offset: number, bytes: number): Promise<BufferedCopy["runs"]> {
    const skip = this.engine.options.skipUnallocated ?? false;
    const src = this.child.child;
    const extents = skip ? await src.blockStatus(offset, bytes) : await src.blockStatusAbove(offset, bytes);
    const cs = this.clusterSize;
    const out: BufferedCopy["runs"] = [];
    const end = offset + bytes;
    for (let c = offset; c < end; c += cs) {
      const ce = Math.min(c + cs, end);
      let kind: "data" | "zero" | "skip" | undefined;
      let covered = c;
      for (const e of extents) {
        if (e.offset + e.length <= c || e.offset >= ce) continue;
        const k = skip && !e.allocated ? "skip" : e.zero ? "zero" : "data";
        kind = kind === undefined || kind === k ? k : "data";
        covered = Math.max(covered, e.offset + e.length);
      }
      if (kind === undefined || covered < ce) kind = "data";
      const last = out.at(-1);
      if (last !== undefined && last.kind === kind && last.offset + last.length === c) last.length += ce - c;
      else out.push({ offset: c, kind, length: ce - c });
    }
    return out;
  }

  /** Writes a buffered copy to the target; on failure keeps it (and its memory) for a retry. */
  async #writeBuffered(entry: BufferedCopy): Promise<BlkError | undefined> {
    const p: CopyProgress = { offset: entry.start, bytes: 0, copied: 0, zeroed: 0, skipped: 0 };
    try {
      for (const r of entry.runs) {
        p.bytes += r.length;
        if (r.kind === "skip") p.skipped += r.length;
        else if (r.kind === "zero") {
          await this.target.writeZeroes(r.offset, r.length, { mayUnmap: false });
          p.zeroed += r.length;
        } else {
          await this.target.write(r.offset, r.data ?? new Uint8Array(r.length));
          p.copied += r.length;
        }
      }
    } catch (e) {
      const err = toBlkError(e);
      entry.error = err;
      entry.writing = undefined;
      this.bufferStats.failedWrites++;
      if (!this.#closing) this.hooks.onBufferedEvent?.();
      return err;
    }
    // Reported while still counted, as the engine reports its chunks.
    this.hooks.onProgress?.(p);
    this.#buffered.delete(entry);
    this.#claimedBytes -= p.bytes;
    this.#reserve(-entry.reserved);
    return undefined;
  }

  /**
   * Waits for every buffered copy to reach the target, retrying the failed ones once each from their
   * memory (never from the source, which the guest has overwritten since).
   * @throws {BlkError} the first target write error (those copies stay buffered for the next call)
   */
  async flushBuffered(): Promise<void> {
    let first: BlkError | undefined;
    for (const entry of [...this.#buffered]) {
      await entry.readDone;
      if (entry.writing !== undefined) await entry.writing;
      if (!this.#buffered.has(entry)) continue;
      if (entry.error !== undefined) {
        entry.error = undefined;
        const retry = this.#writeBuffered(entry);
        entry.writing = retry.then(() => undefined);
        const err = await retry;
        if (err !== undefined) first ??= err;
      }
    }
    if (first !== undefined) throw first;
  }

  /** The first buffered copy whose target write failed, if any. */
  get bufferedError(): BlkError | undefined {
    for (const e of this.#buffered) if (e.error !== undefined) return e.error;
    return undefined;
  }

  protected override async _close(): Promise<void> {
    this.#closing = true;
    this.#unregister();
    this.engine.cancel();
    for (const w of this.#chunkWaiters.splice(0)) w();
    // Buffered target writes still running finish (or fail) before the target can go away.
    await Promise.allSettled([...this.#buffered].map((e) => e.writing ?? Promise.resolve()));
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
