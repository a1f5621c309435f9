/**
 * The mirror job (QEMU 7.2 `block/mirror.c`, QMP `blockdev-mirror`): a `mirror_top` filter above the
 * source marks guest writes in the job's dirty bitmap; the job copies dirty areas to the target with a
 * bounded number of operations and buffer bytes in flight, zeroes where the source reads as zeroes,
 * honours the speed limit and the error policies, reports READY when the target first caught up, keeps
 * copying newly dirtied areas, and on `complete` converges with guest writes held, then replaces the
 * source by the target under all its parents. A soft cancel when READY converges the same way without the
 * switch; any other cancel stops at once. See `spec/jobs.md` §2.
 */
import {
  BlkError,
  type BlockGraph,
  BlockNode,
  type BlockStatusExtent,
  backendParent,
  CHILD_ROLE,
  type DirtyBitmap,
  type Edge,
  PERM,
  PERM_ALL,
  toBlkError,
} from "@blk/core";
import { BlockJob, checkNodeNotBusy } from "../block-job.ts";
import { errnoError, JobError } from "../errors.ts";
import type { JobManager } from "../manager.ts";
import { BLOCK_JOB_SLICE_NS, type RateLimitLike } from "../ratelimit.ts";
import type { BlockdevOnError, IoOperationType, JobInfoExtensions } from "../types.ts";
import {
  type MirrorGuestWrite,
  type MirrorTopClient,
  type MirrorTopState,
  mirrorTopDriver,
} from "./mirror-top.ts";

/** QEMU's `MirrorSyncMode` (mirror accepts `full`, `top` and `none`). */
export type MirrorSyncMode = "full" | "top" | "none" | "incremental" | "bitmap";

/** QEMU's `MirrorCopyMode`. */
export type MirrorCopyMode = "background" | "write-blocking";

/**
 * blk's `x-blk-copy-mode`: QEMU's two modes, or `auto` — start in `background` and switch to
 * `write-blocking` once the guest dirties as fast as the copy drains (see {@link MIRROR_AUTO_RATIO}).
 */
export type MirrorXBlkCopyMode = MirrorCopyMode | "auto";

/** Length of one rate-measurement window of the mirror (job clock): 1 s. */
export const MIRROR_AUTO_WINDOW_NS = 1_000_000_000;
/** Consecutive windows `auto` looks at before it switches: 3. */
export const MIRROR_AUTO_WINDOWS = 3;
/**
 * `auto` switches to write-blocking when, over the last {@link MIRROR_AUTO_WINDOWS} windows (none of
 * them paused), the bytes newly dirtied by the guest reach this fraction of the bytes copied (the backlog
 * drains at less than a tenth of the copy rate, or grows), something was newly dirtied, and the backlog
 * is not empty.
 */
export const MIRROR_AUTO_RATIO = 0.9;

/** Most background copy operations in flight (QEMU's `MAX_IN_FLIGHT`). */
export const MIRROR_MAX_IN_FLIGHT = 16;
/** Smallest cap of one copy operation (QEMU's `MAX_IO_BYTES`). */
export const MIRROR_MAX_IO_BYTES = 1_048_576;
/** Default `buf-size` (QEMU's `DEFAULT_MIRROR_BUF_SIZE`): 16 MiB. */
export const MIRROR_DEFAULT_BUF_SIZE = 16_777_216;

/** `blockdev-mirror` arguments (QAPI names), plus a few library conveniences. */
export interface MirrorOptions {
  /** The job id. Omitted: QEMU uses the device's BlockBackend name, `''` for nodes, which is refused. */
  "job-id"?: string;
  /** The source node (name or node). Must be a root node (only BlockBackends above it). */
  device: string | BlockNode;
  /** The target node (name or node); same length as the source. */
  target: string | BlockNode;
  /** `full` (everything allocated in the chain), `top` (allocated in the source itself), `none` (new writes). */
  sync: MirrorSyncMode;
  /** Bytes per dirty bit: a power of two in [512, 64 MiB]; default the target's default bitmap granularity. */
  granularity?: number;
  /** Buffer bytes in flight (default 16 MiB, rounded up to the granularity). */
  "buf-size"?: number;
  /** Bytes per second, 0 = unlimited (default). */
  speed?: number;
  /** Policy for source (read) errors; default `report`. */
  "on-source-error"?: BlockdevOnError;
  /** Policy for target (write) errors; default `report`. */
  "on-target-error"?: BlockdevOnError;
  /** Name of the `mirror_top` filter node; default a generated `#blockNNN`. */
  "filter-node-name"?: string;
  /** `background` (default) or `write-blocking` (guest writes go to both sides before they complete). */
  "copy-mode"?: MirrorCopyMode;
  /**
   * blk extension: `background`, `write-blocking` or `auto` (background that turns write-blocking when
   * it does not converge). Replaces `copy-mode`; giving both with different values is refused.
   */
  "x-blk-copy-mode"?: MirrorXBlkCopyMode;
  /** Rate window in nanoseconds of the job clock (default {@link MIRROR_AUTO_WINDOW_NS}). */
  autoWindowNs?: number;
  /** Windows `auto` looks at (default {@link MIRROR_AUTO_WINDOWS}). */
  autoWindows?: number;
  /** Default true. */
  "auto-finalize"?: boolean;
  /** Default true. */
  "auto-dismiss"?: boolean;
  /** Zero areas are written with may-unmap (default true; `blockdev-mirror` always true). */
  unmap?: boolean;
  /** The node the target replaces on completion (default the source), e.g. the node below a filter. */
  replaces?: string;
  /** A rate limiter to use instead of the default one (tests). */
  rateLimit?: RateLimitLike;
}

interface Op {
  start: number;
  end: number;
  bytes: number;
  /** `copy`: a background copy; `active`: a guest write in write-blocking mode; `reserve`: an iteration's range while its copies are being issued. */
  kind: "copy" | "active" | "reserve";
  done: Promise<void>;
}

class OpFailure extends Error {
  readonly operation: IoOperationType;
  readonly error: BlkError;
  constructor(operation: IoOperationType, error: BlkError) {
    super(error.message);
    this.operation = operation;
    this.error = error;
  }
}

type Extent = Pick<BlockStatusExtent, "offset" | "length" | "data" | "zero">;

const roundUp = (n: number, g: number): number => Math.ceil(n / g) * g;
const roundDown = (n: number, g: number): number => Math.floor(n / g) * g;

/** Internal construction arguments of {@link MirrorJob} (use {@link mirror}). */
export interface MirrorJobInit {
  manager: JobManager;
  id: string;
  source: BlockNode;
  target: BlockNode;
  filter: BlockNode;
  bitmap: DirtyBitmap;
  /** The node replaced by the target on completion (the source unless `replaces`). */
  replaces: BlockNode;
  sync: "full" | "top" | "none";
  /**
   * Active commit (QEMU's `commit_active_start`): the target is this node of the source's chain; the dirty
   * init marks what the layers from the source down to (excluding) it allocate, and a shorter target is
   * grown to the source's length first (the target edge must hold `resize` then).
   */
  base?: BlockNode;
  /** The job type: `mirror` (default) or `commit` (active commit). */
  type?: "mirror" | "commit";
  granularity: number;
  bufSize: number;
  copyMode: MirrorXBlkCopyMode;
  autoWindowNs?: number;
  autoWindows?: number;
  onSourceError: BlockdevOnError;
  onTargetError: BlockdevOnError;
  unmap: boolean;
  speed: number;
  autoFinalize: boolean;
  autoDismiss: boolean;
  rateLimit?: RateLimitLike;
}

/**
 * A running mirror (job type `mirror`). Create it with {@link mirror}; then `complete()` it once READY
 * (or `cancel()` it: soft when READY leaves a consistent target and no switch).
 */
export class MirrorJob extends BlockJob {
  /** The source (`device`). */
  readonly source: BlockNode;
  /** The target. */
  readonly target: BlockNode;
  /** The `mirror_top` filter node above the source while the job runs. */
  readonly filter: BlockNode;
  /** The node the target replaces on completion. */
  readonly replaces: BlockNode;
  /** Active commit: the base of the source's chain that is the target. */
  readonly base: BlockNode | undefined;
  /** The sync mode. */
  readonly sync: "full" | "top" | "none";
  /** Bytes per dirty bit. */
  readonly granularity: number;
  /** Buffer bytes in flight (a multiple of the granularity). */
  readonly bufSize: number;
  /** The copy mode asked for (`auto` is a blk extension). */
  readonly requestedCopyMode: MirrorXBlkCopyMode;
  /** Error policies. */
  readonly onSourceError: BlockdevOnError;
  readonly onTargetError: BlockdevOnError;
  /** Zeroes are written with may-unmap. */
  readonly unmap: boolean;
  readonly #bitmap: DirtyBitmap;
  readonly #top: MirrorTopState;
  readonly #maxIo: number;
  #sourceEdge: Edge | undefined;
  #targetEdge: Edge | undefined;
  #ops: Op[] = [];
  /** Background copy operations in flight, and their bytes. */
  #copyOps = 0;
  #copyBytes = 0;
  /** Waiting for the next background copy operation to finish. */
  #opWaiters: (() => void)[] = [];
  #bufFree: number;
  /** Copy buffers of finished operations by size, {@link MirrorJob.bufSize} bytes at most. */
  readonly #freeBuffers = new Map<number, Uint8Array[]>();
  #pooledBytes = 0;
  /** Free slots of the page-aligned copy arena (created at the first data copy; empty once released). */
  #arenaSlots: Uint8Array[] | undefined;
  #buffersReleased = false;
  #iterPos = 0;
  #shouldComplete = false;
  #failure: BlkError | undefined;
  #copying = false;
  #activelySynced = false;
  #switched = false;
  #lastYield = 0;
  #mode: MirrorCopyMode;
  readonly #windowNs: number;
  readonly #windows: number;
  #window = { start: 0, dirtied: 0, copied: 0, paused: false };
  #history: { dirtied: number; copied: number; paused: boolean }[] = [];
  #rates: { dirty: number; copy: number } | undefined;
  #switchedAt: number | undefined;

  /** @internal Use {@link mirror}. */
  constructor(init: MirrorJobInit) {
    super({
      manager: init.manager,
      id: init.id,
      type: init.type ?? "mirror",
      speed: init.speed,
      autoFinalize: init.autoFinalize,
      autoDismiss: init.autoDismiss,
      ...(init.rateLimit === undefined ? {} : { rateLimit: init.rateLimit }),
    });
    this.source = init.source;
    this.target = init.target;
    this.filter = init.filter;
    this.replaces = init.replaces;
    this.base = init.base;
    this.sync = init.sync;
    this.granularity = init.granularity;
    this.bufSize = init.bufSize;
    this.requestedCopyMode = init.copyMode;
    this.#mode = init.copyMode === "write-blocking" ? "write-blocking" : "background";
    this.#windowNs = Math.max(1, init.autoWindowNs ?? MIRROR_AUTO_WINDOW_NS);
    this.#windows = Math.max(1, Math.floor(init.autoWindows ?? MIRROR_AUTO_WINDOWS));
    this.onSourceError = init.onSourceError;
    this.onTargetError = init.onTargetError;
    this.unmap = init.unmap;
    this.#bitmap = init.bitmap;
    this.#top = init.filter.state as MirrorTopState;
    this.#bufFree = init.bufSize;
    const g = init.granularity;
    this.#maxIo = Math.max(
      g,
      roundDown(
        Math.min(Math.max(init.bufSize / MIRROR_MAX_IN_FLIGHT, MIRROR_MAX_IO_BYTES), init.bufSize),
        g,
      ),
    );
  }

  /** The copy mode in effect: `background` until an `auto` job switched (or for write-blocking jobs). */
  get copyMode(): MirrorCopyMode {
    return this.#mode;
  }

  /** Job-clock time (ns) at which an `auto` job switched to write-blocking, if it did. */
  get autoSwitchedAt(): number | undefined {
    return this.#switchedAt;
  }

  /**
   * Rates of the last complete measurement window, in bytes per second: `dirty` = bytes newly dirtied by
   * guest writes (whole granules that were clean), `copy` = bytes the background copy completed.
   */
  get rates(): { dirty: number; copy: number } | undefined {
    return this.#rates;
  }

  /** The job's dirty bitmap (anonymous, on the filter node). */
  get dirtyBitmap(): DirtyBitmap {
    return this.#bitmap;
  }

  /** Background copy operations in flight. */
  get opsInFlight(): number {
    return this.#copyOps;
  }

  /** Write-blocking mode: READY was reached and no target write failed since. */
  get activelySynced(): boolean {
    return this.#activelySynced;
  }

  /** True once the job replaced the source by the target (successful `complete`). */
  get switched(): boolean {
    return this.#switched;
  }

  /** @internal Called by {@link mirror} once the job holds its nodes. */
  _setEdges(source: Edge, target: Edge): void {
    this.#sourceEdge = source;
    this.#targetEdge = target;
  }

  // ---------------------------------------------------------------- driver hooks

  protected override onComplete(): void {
    this.#shouldComplete = true;
    if (!this.paused) this.enter();
  }

  protected override onCancel(force: boolean): boolean {
    // Before READY every cancel is forced (the target is not a copy of anything yet).
    return force || !this.isReady();
  }

  protected override async onPause(): Promise<void> {
    this.#window.paused = true;
    await this.#waitAllOps();
  }

  // ---------------------------------------------------------------- run

  protected async run(): Promise<void> {
    const len = this.source.length;
    if (this.base !== undefined) {
      // Active commit grows a shorter base; a longer one is fine.
      if (this.target.length < len) {
        this.setPhase("resize");
        await this.#target().truncate(len);
      }
    } else if (this.target.length !== len) {
      throw new BlkError("EINVAL", "Source and target image have different sizes");
    }
    this.#copying = true;
    if (this.#mode === "write-blocking") this.#top.client = this.#activeClient();
    this.#top.onDirtied = (bytes) => {
      this.#window.dirtied += bytes;
    };
    try {
      if (this.sync !== "none") await this.#dirtyInit(len);
      if (this.isCancelled() || this.#failure !== undefined) return await this.#stop();
      await this.#loop();
    } finally {
      this.#copying = false;
      this.#top.onDirtied = undefined;
      this.#releaseBuffers();
    }
  }

  async #stop(): Promise<void> {
    await this.#waitAllOps();
    this.#copying = false;
    if (this.#failure !== undefined) throw this.#failure;
  }

  async #dirtyInit(len: number): Promise<void> {
    this.setPhase("dirty-init");
    const target = this.#target();
    // blockdev-mirror zeroes the target for sync=full: up front when it can unmap zeroes, else by copying
    // the whole disk (zero areas become write-zeroes).
    if (this.sync === "full") {
      if (this.target.options.discard === "unmap" && this.target.state.capabilities.writeZeroes) {
        for (let off = 0; off < len && !this.isCancelled(); off += 1 << 30) {
          const n = Math.min(1 << 30, len - off);
          await target.writeZeroes(off, n, { mayUnmap: true });
          await this.pausePoint();
        }
      } else {
        this.#bitmap.setDirty(0, len);
      }
    }
    const bitmapFull = this.#bitmap.count() >= len;
    if (!bitmapFull) {
      const top = this.sync === "top" && this.source.backing !== undefined;
      const base = this.base;
      const step = 1 << 30;
      for (let off = 0; off < len && !this.isCancelled(); off += step) {
        const n = Math.min(step, len - off);
        const extents =
          base !== undefined
            ? await this.source.blockStatusAbove(off, n, { base })
            : top
              ? await this.source.blockStatus(off, n)
              : await this.source.blockStatusAbove(off, n);
        for (const e of extents) if (e.allocated) this.#bitmap.setDirty(e.offset, e.length);
        await this.pausePoint();
      }
    }
    this.progressSetRemaining(this.#bitmap.count());
    this.setPhase("copy");
  }

  async #loop(): Promise<void> {
    this.#lastYield = this.clock.now();
    this.#window = { start: this.clock.now(), dirtied: 0, copied: 0, paused: false };
    for (;;) {
      await this.pausePoint();
      if (this.isCancelled() || this.#failure !== undefined) return await this.#stop();
      this.#sample();
      const cnt = this.#bitmap.count();
      this.progressSetRemaining(this.#inFlightBytes() + cnt);
      const bg = this.opsInFlight;
      if (
        (cnt > 0 && (bg >= MIRROR_MAX_IN_FLIGHT || this.#bufFree < this.granularity)) ||
        (cnt === 0 && bg > 0)
      ) {
        await this.#waitAnyOp();
        continue;
      }
      if (cnt > 0) {
        const delay = this.ratelimitDelay();
        if (delay > 0) {
          await this.sleep(delay);
          continue;
        }
        if (this.clock.now() - this.#lastYield >= BLOCK_JOB_SLICE_NS) {
          this.#lastYield = this.clock.now();
          await this.sleep(0);
          continue;
        }
        await this.#iteration();
        continue;
      }
      // Clean and nothing in flight.
      if (!this.isReady()) {
        if (!(await this.#flushTarget())) continue;
        this.setPhase("ready");
        if (this.#mode === "write-blocking") this.#activelySynced = true;
        this.transitionToReady();
      }
      if (this.#shouldComplete || this.cancelRequested) {
        if (await this.#converge()) return;
        continue;
      }
      await this.sleep(BLOCK_JOB_SLICE_NS);
      this.#lastYield = this.clock.now();
    }
  }

  /**
   * Closes the measurement window when it is over: updates the rates and, for `auto` in background mode,
   * switches to write-blocking when the last windows show no convergence ({@link MIRROR_AUTO_RATIO}).
   */
  #sample(): void {
    const now = this.clock.now();
    const w = this.#window;
    const elapsed = now - w.start;
    if (elapsed < this.#windowNs) return;
    this.#rates = { dirty: (w.dirtied * 1e9) / elapsed, copy: (w.copied * 1e9) / elapsed };
    this.#history.push({ dirtied: w.dirtied, copied: w.copied, paused: w.paused });
    if (this.#history.length > this.#windows) this.#history.shift();
    this.#window = { start: now, dirtied: 0, copied: 0, paused: false };
    if (this.requestedCopyMode !== "auto" || this.#mode !== "background") return;
    const h = this.#history;
    if (h.length < this.#windows || h.some((x) => x.paused)) return;
    let dirtied = 0;
    let copied = 0;
    for (const x of h) {
      dirtied += x.dirtied;
      copied += x.copied;
    }
    const backlog = this.#bitmap.count() + this.#inFlightBytes();
    if (dirtied > 0 && backlog > 0 && dirtied >= MIRROR_AUTO_RATIO * copied) this.#switchToWriteBlocking();
  }

  /** From now on guest writes go to both sides; what is dirty already is copied by the loop. */
  #switchToWriteBlocking(): void {
    this.#mode = "write-blocking";
    this.#switchedAt = this.clock.now();
    this.#top.client = this.#activeClient();
    this.setPhase(this.isReady() ? "ready" : "copy");
  }

  /** The `x-blk-` fields: phase, effective copy mode, rates and the ETA to a clean bitmap. */
  protected override extensionInfo(): JobInfoExtensions {
    const out: JobInfoExtensions = { ...super.extensionInfo(), "x-blk-copy-mode": this.#mode };
    delete out["x-blk-eta-seconds"];
    const r = this.#rates;
    if (r !== undefined && !this.isCompleted()) {
      out["x-blk-dirty-rate"] = Math.round(r.dirty);
      out["x-blk-copy-rate"] = Math.round(r.copy);
      const backlog = this.#bitmap.released ? 0 : this.#bitmap.count() + this.#inFlightBytes();
      // Write-blocking: guest writes no longer add to the backlog.
      const net = r.copy - (this.#mode === "write-blocking" ? 0 : r.dirty);
      if (backlog === 0) out["x-blk-eta-seconds"] = 0;
      else if (net > 0) out["x-blk-eta-seconds"] = backlog / net;
    }
    return out;
  }

  /** Holds guest writes; if still clean, flushes the target and keeps them held until the job's exit. */
  async #converge(): Promise<boolean> {
    await this.#top.quiesce();
    if (this.#bitmap.count() === 0 && this.#ops.length === 0 && !this.isCancelled()) {
      if (await this.#flushTarget()) {
        this.#copying = false;
        return true;
      }
    }
    this.#top.unquiesce();
    return false;
  }

  /** Flushes the target under the target error policy; false when it failed and the loop should go on. */
  async #flushTarget(): Promise<boolean> {
    try {
      await this.#target().flush();
      return true;
    } catch (e) {
      const err = toBlkError(e);
      if (this.errorAction(this.onTargetError, "write", err) === "report") this.#fail(err);
      await this.pausePoint();
      return false;
    }
  }

  /** One iteration: the next dirty area (≤ buf-size), bits cleared, split into operations. */
  async #iteration(): Promise<void> {
    const g = this.granularity;
    const len = this.#bitmap.size;
    let start = this.#bitmap.nextDirty(this.#iterPos);
    if (start === -1) start = this.#bitmap.nextDirty(0);
    if (start === -1) return;
    const busy = this.#overlapping(start, start + g);
    if (busy !== undefined) {
      await busy.done;
      return;
    }
    const area = this.#bitmap.nextDirtyArea(start, len, this.bufSize);
    if (area === null) return;
    let end = Math.min(len, area.start + area.count);
    for (const op of this.#ops)
      if (op.start < end && op.end > area.start) end = Math.min(end, Math.max(op.start, area.start + g));
    this.#bitmap.resetDirty(area.start, end - area.start);
    this.#iterPos = end >= len ? 0 : end;
    // Until its copies are registered, the range is reserved: overlapping guest writes in write-blocking
    // mode wait for it (and then for the copies).
    let release!: () => void;
    const reserve: Op = {
      start: area.start,
      end,
      bytes: 0,
      kind: "reserve",
      done: new Promise<void>((resolve) => (release = resolve)),
    };
    this.#ops.push(reserve);
    try {
      await this.#issue(area.start, end);
    } finally {
      this.#ops.splice(this.#ops.indexOf(reserve), 1);
      release();
    }
  }

  async #issue(start: number, end: number): Promise<void> {
    let handled = 0;
    for (let off = start; off < end; ) {
      const n = Math.min(this.#maxIo, end - off);
      let extents: Extent[];
      try {
        extents = await this.#statusFor(off, n);
      } catch (e) {
        this.#bitmap.setDirty(off, end - off);
        this.#opError(new OpFailure("read", toBlkError(e)));
        break;
      }
      const unmapZeroes = this.unmap && this.target.options.discard === "unmap";
      for (const e of extents) if (e.data || !e.zero || !unmapZeroes) handled += e.length;
      while (this.opsInFlight >= MIRROR_MAX_IN_FLIGHT || (this.#bufFree < n && this.opsInFlight > 0)) {
        await this.#waitAnyOp();
      }
      this.#startOp(off, n, extents);
      off += n;
    }
    this.ratelimitProcessedBytes(handled);
  }

  #startOp(offset: number, bytes: number, extents: Extent[]): void {
    this.#bufFree -= bytes;
    this.#copyOps++;
    this.#copyBytes += bytes;
    const op: Op = {
      start: offset,
      end: offset + bytes,
      bytes,
      kind: "copy",
      done: Promise.resolve(),
    };
    op.done = this.#copy(offset, bytes, extents).finally(() => {
      this.#bufFree += bytes;
      this.#copyOps--;
      this.#copyBytes -= bytes;
      this.#ops.splice(this.#ops.indexOf(op), 1);
      const waiters = this.#opWaiters;
      this.#opWaiters = [];
      for (const wake of waiters) wake();
    });
    this.#ops.push(op);
  }

  async #copy(offset: number, bytes: number, extents: Extent[]): Promise<void> {
    let buf: Uint8Array | undefined;
    try {
      for (const e of extents) {
        if (!e.data && e.zero) {
          await this.#targetIo(() =>
            this.#target().writeZeroes(e.offset, e.length, { mayUnmap: this.unmap }),
          );
        } else {
          buf ??= this.#takeBuffer(bytes);
          const part = buf.subarray(e.offset - offset, e.offset - offset + e.length);
          try {
            await this.#sourceIo().readInto(e.offset, part);
          } catch (err) {
            throw new OpFailure("read", toBlkError(err));
          }
          await this.#targetIo(() => this.#target().write(e.offset, part));
        }
      }
      this.progressWorkDone(bytes);
      this.#window.copied += bytes;
    } catch (e) {
      this.#bitmap.setDirty(offset, bytes);
      this.#opError(e instanceof OpFailure ? e : new OpFailure("read", toBlkError(e)));
    } finally {
      if (buf !== undefined) this.#returnBuffer(buf);
    }
  }

  /**
   * A copy buffer of at least `bytes` bytes (contents undefined). QEMU's mirror copies through one
   * page-aligned buffer of `buf-size` bytes; so does this job: a slot of a page-aligned arena when one is
   * free, else a plain buffer reused from earlier operations of that size. The kernel copies page-aligned
   * memory to and from the page cache with less system time than the 16-byte-aligned memory of a plain
   * `Uint8Array` (a 1 GiB dense qcow2 mirror into a fresh qcow2: about a fifth less system time, and
   * steadier), and allocating a fresh megabyte per operation made garbage collection a large part of a
   * mirror's time.
   */
  #takeBuffer(bytes: number): Uint8Array {
    if (bytes <= this.#maxIo) {
      this.#arenaSlots ??= arenaSlots(
        this.#maxIo,
        Math.min(MIRROR_MAX_IN_FLIGHT, Math.floor(this.bufSize / this.#maxIo)),
      );
      const slot = this.#arenaSlots.pop();
      if (slot !== undefined) return slot;
    }
    const free = this.#freeBuffers.get(bytes);
    const buf = free?.pop();
    if (buf === undefined) return new Uint8Array(bytes);
    this.#pooledBytes -= bytes;
    return buf;
  }

  /** Gives a finished operation's buffer back: its arena slot, or the pool (at most `buf-size` bytes). */
  #returnBuffer(buf: Uint8Array): void {
    if (this.#buffersReleased) return;
    if (arenaOf.has(buf.buffer)) {
      this.#arenaSlots?.push(buf);
      return;
    }
    if (this.#pooledBytes + buf.length > this.bufSize) return;
    let free = this.#freeBuffers.get(buf.length);
    if (free === undefined) {
      free = [];
      this.#freeBuffers.set(buf.length, free);
    }
    free.push(buf);
    this.#pooledBytes += buf.length;
  }

  /** Drops the copy buffers (the job copies no more): the memory goes back with the job's last reference. */
  #releaseBuffers(): void {
    this.#buffersReleased = true;
    this.#arenaSlots = [];
    this.#freeBuffers.clear();
    this.#pooledBytes = 0;
  }

  #opError(f: OpFailure): void {
    const policy = f.operation === "read" ? this.onSourceError : this.onTargetError;
    if (this.errorAction(policy, f.operation, f.error) === "report") this.#fail(f.error);
  }

  /** Records the job's failure as QEMU reports it: the errno's `strerror` text. */
  #fail(error: BlkError): void {
    this.#failure ??= errnoError(error.code, { cause: error });
  }

  /** Block status of the source's whole chain over one operation (gaps are copied as data). */
  async #statusFor(offset: number, bytes: number): Promise<Extent[]> {
    const ext: Extent[] = await this.source.blockStatusAbove(offset, bytes);
    let covered = offset;
    for (const e of ext) covered = Math.max(covered, e.offset + e.length);
    if (covered < offset + bytes) {
      ext.push({ offset: covered, length: offset + bytes - covered, data: true, zero: false });
    }
    return ext;
  }

  async #targetIo(fn: () => Promise<void>): Promise<void> {
    try {
      await fn();
    } catch (e) {
      throw new OpFailure("write", toBlkError(e));
    }
  }

  #target(): Edge {
    const e = this.#targetEdge;
    if (e === undefined) throw new BlkError("EINVAL", "mirror job holds no target");
    return e;
  }

  #sourceIo(): Edge {
    const e = this.#sourceEdge;
    if (e === undefined) throw new BlkError("EINVAL", "mirror job holds no source");
    return e;
  }

  #inFlightBytes(): number {
    return this.#copyBytes;
  }

  #overlapping(start: number, end: number): Op | undefined {
    return this.#ops.find((o) => o.start < end && start < o.end);
  }

  /** Resolves when the next background copy operation finishes (at once when none is in flight). */
  async #waitAnyOp(): Promise<void> {
    if (this.#copyOps === 0) return;
    await new Promise<void>((resolve) => this.#opWaiters.push(resolve));
  }

  async #waitAllOps(): Promise<void> {
    for (;;) {
      const bg = this.#ops.filter((o) => o.kind !== "active");
      if (bg.length === 0) return;
      await Promise.all(bg.map((o) => o.done));
    }
  }

  // ---------------------------------------------------------------- write-blocking mode

  #activeClient(): MirrorTopClient {
    return {
      activeWrite: (req, forward) => {
        if (!this.#copying || this.isCancelled() || this.#failure !== undefined) return undefined;
        if (req.kind === "discard") return undefined;
        return this.#activeWrite(req, forward);
      },
    };
  }

  async #activeWrite(req: MirrorGuestWrite, forward: () => Promise<void>): Promise<void> {
    const g = this.granularity;
    const start = roundDown(req.offset, g);
    const end = Math.min(this.#bitmap.size, roundUp(req.offset + req.bytes, g));
    for (let o = this.#overlapping(start, end); o !== undefined; o = this.#overlapping(start, end)) {
      await o.done;
    }
    let finish!: () => void;
    const op: Op = {
      start,
      end,
      bytes: req.bytes,
      kind: "active",
      done: new Promise<void>((resolve) => (finish = resolve)),
    };
    this.#ops.push(op);
    try {
      try {
        await forward();
      } catch (e) {
        this.#bitmap.setDirty(req.offset, req.bytes);
        throw e;
      }
      try {
        const t = this.#target();
        if (req.kind === "write" && req.data !== undefined) await t.write(req.offset, req.data);
        else
          await t.writeZeroes(req.offset, req.bytes, {
            mayUnmap: (req.flags?.mayUnmap ?? false) && this.unmap,
          });
        const cs = roundUp(req.offset, g);
        const ce =
          req.offset + req.bytes >= this.#bitmap.size
            ? this.#bitmap.size
            : roundDown(req.offset + req.bytes, g);
        if (ce > cs) this.#bitmap.resetDirty(cs, ce - cs);
        this.progressIncreaseRemaining(req.bytes);
        this.progressWorkDone(req.bytes);
      } catch (e) {
        const err = toBlkError(e);
        this.#bitmap.setDirty(req.offset, req.bytes);
        this.#activelySynced = false;
        if (this.errorAction(this.onTargetError, "write", err) === "report") {
          this.#fail(err);
          if (!this.paused) this.enter();
        }
      }
    } finally {
      this.#ops.splice(this.#ops.indexOf(op), 1);
      finish();
    }
  }

  // ---------------------------------------------------------------- completion

  protected override async prepare(): Promise<void> {
    await this.#exitCommon(this.#shouldComplete);
  }

  protected override async abort(): Promise<void> {
    await this.#exitCommon(false);
  }

  protected override async clean(): Promise<void> {
    try {
      await this.#exitCommon(false);
    } catch {
      // Already reported by prepare (the job failed with it); the exit path released what it could.
    }
    await super.clean();
  }

  #exitDone: Promise<void> | undefined;

  /** QEMU's `mirror_exit_common`: optional graph switch, then the filter goes away. Runs once. */
  #exitCommon(doSwitch: boolean): Promise<void> {
    this.#exitDone ??= this.#exit(doSwitch);
    return this.#exitDone;
  }

  async #exit(doSwitch: boolean): Promise<void> {
    this.#copying = false;
    const top = this.#top;
    const graph = this.filter.graph;
    // Guest writes are held at the filter from here until its parents have moved.
    await top.quiesce();
    top.client = undefined;
    if (!this.#bitmap.released) this.#bitmap.release();
    top.bitmap = undefined;
    let error: unknown;
    if (doSwitch) {
      try {
        // The job's own write access to the target goes first, so the source's parents can take it over.
        this.#targetEdge?.detach();
        graph.replaceNode(this.replaces, this.target);
        this.#switched = true;
      } catch (e) {
        error = e;
      }
    }
    const below = this.filter.filteredOrBacking?.child ?? this.source;
    try {
      graph.replaceNode(this.filter, below);
    } catch (e) {
      error ??= e;
    }
    top.redirect = below;
    top.unquiesce();
    this.#targetEdge?.detach();
    this.releaseNodes();
    await graph.delete(this.filter, { force: true });
    if (error !== undefined) throw toBlkError(error);
  }
}

/** The ArrayBuffers of copy arenas (their slots go back to the free list, other buffers to the pool). */
const arenaOf = new WeakSet<ArrayBufferLike>();

/** The `WebAssembly.Memory` constructor, where the runtime has one (not in this package's type libs). */
const WasmMemory = (
  globalThis as {
    WebAssembly?: { Memory: new (d: { initial: number; maximum?: number }) => { buffer: ArrayBuffer } };
  }
).WebAssembly?.Memory;

/** Largest copy arena taken from WebAssembly memory (bigger `buf-size`s copy through plain buffers). */
const MAX_ARENA_BYTES = 1 << 30;

/**
 * `count` page-aligned buffers of `size` bytes each, carved from one arena, or none when the runtime cannot
 * give page-aligned memory. JavaScript has no aligned allocation; a WebAssembly memory is one (its base is
 * mapped on a 64 KiB boundary), zero-filled and never detached unless grown, which this one never is.
 */
function arenaSlots(size: number, count: number): Uint8Array[] {
  const stride = Math.ceil(size / 4096) * 4096;
  const bytes = stride * count;
  if (WasmMemory === undefined || count < 1 || bytes > MAX_ARENA_BYTES) return [];
  let buffer: ArrayBuffer;
  try {
    const pages = Math.ceil(bytes / 65536);
    buffer = new WasmMemory({ initial: pages, maximum: pages }).buffer;
  } catch {
    // Out of address space for another memory (many concurrent jobs): plain buffers.
    return [];
  }
  arenaOf.add(buffer);
  return Array.from({ length: count }, (_, i) => new Uint8Array(buffer, i * stride, size));
}

/** The `mirror_top` filter of a job being started, inserted above its source. */
interface InsertedMirrorTop {
  filter: BlockNode;
  bitmap: DirtyBitmap;
  /** Undoes the insertion (parents back to the source, filter deleted). */
  remove(): Promise<void>;
}

/**
 * Opens a `mirror_top` filter (named `nodeName`, else generated) on `source` with a disabled dirty bitmap of
 * `granularity` and inserts it above `source` (it takes over all of the source's parents). Shared by
 * {@link mirror} and active commit. On failure nothing is left behind.
 * @throws {BlkError} from the graph (duplicate name, permission conflicts)
 */
export async function insertMirrorTop(
  graph: BlockGraph,
  source: BlockNode,
  granularity: number,
  nodeName: string | undefined,
): Promise<InsertedMirrorTop> {
  const filter = await graph.open(
    mirrorTopDriver,
    {},
    {
      ...(nodeName === undefined ? {} : { nodeName }),
      owned: false,
      discard: source.options.discard,
      children: { backing: { node: source, role: CHILD_ROLE.FILTERED | CHILD_ROLE.PRIMARY } },
    },
  );
  const top = filter.state as MirrorTopState;
  const bitmap = filter.createBitmapSync({ granularity, disabled: true });
  top.bitmap = bitmap;
  const remove = async (): Promise<void> => {
    if (!bitmap.released) bitmap.release();
    top.bitmap = undefined;
    graph.replaceNode(filter, source);
    await graph.delete(filter, { force: true });
  };
  try {
    graph.insertFilter(filter, source);
  } catch (e) {
    await remove();
    throw e;
  }
  await settleRequestsInFlight(source);
  return { filter, bitmap, remove };
}

/**
 * Waits for the requests that were in flight on `node` when the filter went in above it: they did not pass
 * through the filter, so their writes are not marked, and the job must not look at the ranges they write
 * before they landed (a write allocating a cluster would read as zeroes and be copied as such, then land
 * on the source only). QEMU inserts `mirror_top` in a drained section for the same reason. A serialising
 * request over the whole node waits for every request running, while requests begun after it (through the
 * filter now) wait for it.
 */
async function settleRequestsInFlight(node: BlockNode): Promise<void> {
  if (node.tracker.inFlight === 0) return;
  const barrier = node.tracker.begin({
    offset: 0,
    bytes: Number.MAX_SAFE_INTEGER,
    serialising: true,
    kind: "drain",
  });
  try {
    await barrier.waitForOverlapping();
  } finally {
    barrier.end();
  }
}

/** Looks a node up by name as `blockdev-mirror` does. */
function lookup(graph: BlockGraph, ref: string | BlockNode): BlockNode {
  if (typeof ref !== "string") return ref;
  const node = graph.find(ref);
  if (node === undefined) throw new JobError("ENOENT", `Cannot find device='${ref}' nor node-name='${ref}'`);
  return node;
}

/**
 * Starts a mirror job (QMP `blockdev-mirror`) with QEMU's checks, messages and defaults: inserts the
 * `mirror_top` filter above `device` (named `filter-node-name`, else generated), creates the job, makes it
 * hold the filter (`main node`), the source and the target (plus a write-only user of the target), and
 * starts it. Events up to `running` (for `sync: "none"` up to `BLOCK_JOB_READY`) are emitted before the
 * promise resolves, as QEMU does before the command returns.
 * @throws {JobError} `Cannot find device='X' nor node-name='X'`, `Node 'X' is busy: …`,
 *   `Sync mode 'X' not supported`, `Parameter 'granularity' expects a value in range [512B, 64MB]`,
 *   `Parameter 'granularity' expects a power of 2`, `Invalid parameter 'buf-size'`,
 *   `Need a root block node`, `Can't mirror node into itself`, `Failed to find node with node-name='X'`,
 *   `cannot replace image with a mirror image of different size`, the job id and speed errors of
 *   {@link BlockJob}; {@link BlkError} from the graph (duplicate filter name, permission conflicts).
 * @example
 * const job = await mirror(manager, graph, { "job-id": "m0", device: "src", target: "dst", sync: "full" });
 * if (await job.whenStatus("ready")) job.complete();
 * await job.outcome; // { status: "completed" }: parents of src now use dst
 */
export async function mirror(
  manager: JobManager,
  graph: BlockGraph,
  options: MirrorOptions,
): Promise<MirrorJob> {
  const source = lookup(graph, options.device);
  const target = lookup(graph, options.target);
  checkNodeNotBusy(source);
  checkNodeNotBusy(target);
  const sync = options.sync;
  if (sync !== "full" && sync !== "top" && sync !== "none") {
    throw new JobError("EINVAL", `Sync mode '${sync}' not supported`);
  }
  let granularity = options.granularity;
  if (granularity !== undefined && granularity !== 0) {
    if (!(granularity >= 512 && granularity <= 64 << 20)) {
      throw new JobError("EINVAL", "Parameter 'granularity' expects a value in range [512B, 64MB]");
    }
    if ((granularity & (granularity - 1)) !== 0) {
      throw new JobError("EINVAL", "Parameter 'granularity' expects a power of 2");
    }
  } else {
    granularity = await target.defaultBitmapGranularity();
  }
  const xMode = options["x-blk-copy-mode"];
  if (xMode !== undefined && !["background", "write-blocking", "auto"].includes(xMode)) {
    throw new JobError("EINVAL", `Parameter 'x-blk-copy-mode' does not accept value '${String(xMode)}'`);
  }
  if (xMode !== undefined && options["copy-mode"] !== undefined && options["copy-mode"] !== xMode) {
    throw new JobError("EINVAL", "'copy-mode' and 'x-blk-copy-mode' disagree: give one of them");
  }
  const copyMode: MirrorXBlkCopyMode = xMode ?? options["copy-mode"] ?? "background";
  const requestedBuf = options["buf-size"] ?? 0;
  if (requestedBuf < 0 || !Number.isSafeInteger(requestedBuf))
    throw new JobError("EINVAL", "Invalid parameter 'buf-size'");
  const bufSize = roundUp(requestedBuf === 0 ? MIRROR_DEFAULT_BUF_SIZE : requestedBuf, granularity);
  if (!source.parents.every((e) => !(e.parent instanceof BlockNode) && e.parent.type === "block-backend")) {
    throw new JobError("EINVAL", "Need a root block node");
  }
  if (source === target) throw new JobError("EINVAL", "Can't mirror node into itself");
  let replaces = source;
  if (options.replaces !== undefined) {
    const found = graph.find(options.replaces);
    if (found === undefined) {
      throw new JobError("ENOENT", `Failed to find node with node-name='${options.replaces}'`);
    }
    checkNodeNotBusy(found);
    if (found.length !== source.length) {
      throw new JobError("EINVAL", "cannot replace image with a mirror image of different size");
    }
    replaces = found;
  }

  const {
    filter,
    bitmap,
    remove: removeFilter,
  } = await insertMirrorTop(graph, source, granularity, options["filter-node-name"]);
  let job: MirrorJob;
  try {
    job = new MirrorJob({
      manager,
      id: options["job-id"] ?? "",
      source,
      target,
      filter,
      bitmap,
      replaces,
      sync,
      granularity,
      bufSize,
      copyMode,
      ...(options.autoWindowNs === undefined ? {} : { autoWindowNs: options.autoWindowNs }),
      ...(options.autoWindows === undefined ? {} : { autoWindows: options.autoWindows }),
      onSourceError: options["on-source-error"] ?? "report",
      onTargetError: options["on-target-error"] ?? "report",
      unmap: options.unmap ?? true,
      speed: options.speed ?? 0,
      autoFinalize: options["auto-finalize"] ?? true,
      autoDismiss: options["auto-dismiss"] ?? true,
      ...(options.rateLimit === undefined ? {} : { rateLimit: options.rateLimit }),
    });
  } catch (e) {
    await removeFilter();
    throw e;
  }
  try {
    job.holdNode(filter, "main node", { perm: PERM.CONSISTENT_READ, shared: PERM_ALL & ~PERM.RESIZE });
    const src = job.holdNode(source, "source", { perm: 0, shared: PERM_ALL & ~PERM.RESIZE });
    job.holdNode(target, "target", { perm: 0, shared: PERM_ALL });
    const tgt = graph.attach(backendParent(), target, {
      name: "root",
      perm: PERM.WRITE,
      shared: PERM.WRITE_UNCHANGED,
    });
    job._setEdges(src, tgt);
  } catch (e) {
    job.releaseNodes();
    await removeFilter();
    job.earlyFail(toBlkError(e));
    throw e;
  }
  job.start();
  if (sync === "none") {
    // QEMU reports READY of an empty mirror before the command returns.
    await Promise.race([job.whenStatus("ready"), job.whenStatus("paused"), job.outcome]);
  }
  return job;
}
