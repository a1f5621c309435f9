/**
 * BlockNode: one node of the graph and the request path every I/O takes, in this order:
 * 1. range and permission checks (typed error, nothing touched);
 * 2. request tracking (overlapping requests wait for serialising ones);
 * 3. before-write notifiers for writes, zero-writes and discards (awaited in order; may fail the request);
 * 4. driver I/O;
 * 5. dirty-bitmap marking of every enabled bitmap (QEMU marks conservatively: also when 3 or 4 failed);
 * 6. the tracked request ends; statistics update.
 */
import { NotifierList, RequestTracker, type TrackedRequest } from "@blk/notifiers";
import { DirtyBitmap, type DirtyBitmapOptions } from "./dirty-bitmap.ts";
import type {
  BlockDriver,
  BlockDriverInfo,
  BlockDriverState,
  BlockStatusExtent,
  CheckResult,
  CopyRangeDest,
  CopyRangeSource,
  TruncateFlags,
  ZeroFlags,
} from "./driver.ts";
import { BlkError, isBlkError } from "./errors.ts";
import type { BlockGraph, Edge } from "./graph.ts";
import { type NodeOptions, resolveNodeOptions } from "./node-options.ts";
import { CHILD_ROLE, PERM } from "./perm.ts";

/** What a before-write notifier sees: the request about to change the node (old data still in place). */
export interface BeforeWriteEvent {
  readonly node: BlockNode;
  readonly kind: "write" | "write-zeroes" | "discard";
  readonly offset: number;
  readonly bytes: number;
  /** The data about to be written (`write` only); do not keep it. */
  readonly data?: Uint8Array;
  /** The request only rewrites data already there (QEMU `BDRV_REQ_WRITE_UNCHANGED`). */
  readonly writeUnchanged: boolean;
}

/** `BLOCK_WRITE_THRESHOLD` data: a write went past the node's write threshold (which is then cleared). */
export interface WriteThresholdEvent {
  "node-name": string;
  "amount-exceeded": number;
  "write-threshold": number;
}

/** Per-node statistics, named as `query-blockstats` names them. */
export interface BlockStats {
  rd_bytes: number;
  wr_bytes: number;
  unmap_bytes: number;
  rd_operations: number;
  wr_operations: number;
  flush_operations: number;
  unmap_operations: number;
  rd_total_time_ns: number;
  wr_total_time_ns: number;
  flush_total_time_ns: number;
  unmap_total_time_ns: number;
  wr_highest_offset: number;
  failed_rd_operations: number;
  failed_wr_operations: number;
  failed_flush_operations: number;
  failed_unmap_operations: number;
  invalid_rd_operations: number;
  invalid_wr_operations: number;
  invalid_flush_operations: number;
  invalid_unmap_operations: number;
}

/** `BlockDeviceStats` as `query-blockstats` returns it (QEMU 7.2 members; blk never merges requests). */
export interface BlockDeviceStats extends BlockStats {
  rd_merged: number;
  wr_merged: number;
  unmap_merged: number;
  /** Time since the last request finished; absent before the first one. */
  idle_time_ns?: number;
  account_invalid: boolean;
  account_failed: boolean;
  timed_stats: never[];
}

/** Options common to every request. */
export interface RequestOptions {
  /** The request is serialising: overlapping requests wait for it, and it waits for them. */
  serialising?: boolean;
  /**
   * Reads only: do not wait for serialising requests (QEMU `BDRV_REQ_NO_SERIALISING`), for a
   * before-write notifier copying old data out from under a serialising write.
   */
  noSerialising?: boolean;
  /** @internal The edge the request comes through (set by {@link Edge} I/O). */
  via?: Edge;
}

/** Options of {@link BlockNode.write}. */
export interface NodeWriteOptions extends RequestOptions {
  fua?: boolean;
  /** Rewrites unchanged data: needs only write-unchanged permission and skips copy-before-write. */
  writeUnchanged?: boolean;
}

/** Options of {@link BlockNode.writeZeroes}. */
export interface NodeZeroOptions extends RequestOptions, ZeroFlags {}

/** Options of {@link BlockNode.blockStatusAbove}. */
export interface BlockStatusAboveOptions {
  /** Stop above this node (default: walk the whole chain). */
  base?: BlockNode | null;
  /** Also look into `base` itself. */
  includeBase?: boolean;
}

const now = (): number => performance.now() * 1e6;

const newStats = (): BlockStats => ({
  rd_bytes: 0,
  wr_bytes: 0,
  unmap_bytes: 0,
  rd_operations: 0,
  wr_operations: 0,
  flush_operations: 0,
  unmap_operations: 0,
  rd_total_time_ns: 0,
  wr_total_time_ns: 0,
  flush_total_time_ns: 0,
  unmap_total_time_ns: 0,
  wr_highest_offset: 0,
  failed_rd_operations: 0,
  failed_wr_operations: 0,
  failed_flush_operations: 0,
  failed_unmap_operations: 0,
  invalid_rd_operations: 0,
  invalid_wr_operations: 0,
  invalid_flush_operations: 0,
  invalid_unmap_operations: 0,
});

function isAllZero(data: Uint8Array): boolean {
  const n = data.length;
  let i = 0;
  if (data.byteOffset % 4 === 0) {
    const words = new Uint32Array(data.buffer, data.byteOffset, n >>> 2);
    for (const w of words) if (w !== 0) return false;
    i = words.length * 4;
  }
  for (; i < n; i++) if (data[i] !== 0) return false;
  return true;
}

/** Copy offload refused: the caller copies with read and write instead. */
function offloadRefused(offset: number): BlkError {
  return new BlkError("ENOTSUP", "Copy offloading is not supported", { offset });
}

/** True for an error that only says copy offload is impossible ({@link BlockNode.copyRange}). */
function isOffloadRefusal(e: unknown): boolean {
  return isBlkError(e, "ENOTSUP");
}

type Kind = "rd" | "wr" | "unmap" | "flush";

/** Runs `fn` over `[offset, offset+bytes)` in pieces of at most `max` bytes (0 = one piece). */
async function split(
  max: number,
  offset: number,
  bytes: number,
  fn: (o: number, n: number) => Promise<void>,
): Promise<void> {
  if (max <= 0 || bytes <= max) return fn(offset, bytes);
  for (let p = 0; p < bytes; p += max) await fn(offset + p, Math.min(max, bytes - p));
}

/**
 * A node of a {@link BlockGraph}: an open driver state plus the request path. Created by
 * {@link BlockGraph.open}; closed by {@link BlockGraph.delete} (or {@link BlockNode.close} on a node
 * nobody uses).
 * @example
 * const graph = new BlockGraph();
 * const node = await graph.open(memoryDriver, { size: 1 << 20 }, { nodeName: "disk" });
 * await node.write(0, new Uint8Array(512).fill(1));
 */
/** Appends an extent to a status list, merging it into the last one when they say the same. */
function pushExtent(out: BlockStatusExtent[], ext: BlockStatusExtent): void {
  const last = out.at(-1);
  if (
    last !== undefined &&
    last.data === ext.data &&
    last.zero === ext.zero &&
    last.allocated === ext.allocated &&
    last.depth === ext.depth &&
    last.hostOffset === undefined &&
    ext.hostOffset === undefined
  ) {
    last.length += ext.length;
  } else {
    out.push(ext);
  }
}

export class BlockNode {
  readonly graph: BlockGraph;
  readonly driver: BlockDriver<never>;
  /** The driver-specific options the node was opened with. */
  readonly driverOptions: unknown;
  /** Parents' edges, newest first (QEMU's order). */
  readonly parents: Edge[] = [];
  /** Child edges by name. */
  readonly children: Map<string, Edge> = new Map();
  /** Registered requests; serialising requests make overlapping ones wait. */
  readonly tracker: RequestTracker = new RequestTracker();
  /** Before-write notifiers: called for writes, zero-writes and discards before the driver runs. */
  readonly beforeWrite: NotifierList<BeforeWriteEvent> = new NotifierList<BeforeWriteEvent>();
  /** Statistics (`query-blockstats` names). */
  readonly stats: BlockStats = newStats();
  #name: string;
  #options: Readonly<NodeOptions>;
  #gate: Promise<void> | undefined;
  #state: BlockDriverState | undefined;
  #length = 0;
  #bitmaps: DirtyBitmap[] = [];
  #closing: Promise<void> | undefined;
  #info: BlockDriverInfo | undefined;
  #writeThreshold = 0;
  #lastIoEnd: number | undefined;
  #thresholdListeners = new Set<(ev: WriteThresholdEvent) => void>();

  /** @internal Use {@link BlockGraph.open}. */
  constructor(init: {
    graph: BlockGraph;
    name: string;
    driver: BlockDriver<never>;
    options: NodeOptions;
    driverOptions: unknown;
  }) {
    this.graph = init.graph;
    this.#name = init.name;
    this.driver = init.driver;
    this.#options = Object.freeze({ ...init.options });
    this.driverOptions = init.driverOptions;
  }

  /** @internal Called by the graph once the driver is open. */
  async _attachState(state: BlockDriverState): Promise<void> {
    this.#state = state;
    this.#length = await state.getLength();
    for (const p of (await state.loadBitmaps?.()) ?? []) {
      const b = this.createBitmapSync({ name: p.name, granularity: p.granularity, disabled: !p.enabled });
      b.persistent = true;
      if (p.bits !== undefined) b._load(p.bits);
      b.inconsistent = p.inconsistent ?? false;
      if (b.inconsistent) b.disabled = true;
      b.readonly = this.options.readOnly;
    }
  }

  /** The common node options in effect (change them with {@link BlockNode.reopen}). */
  get options(): Readonly<NodeOptions> {
    return this.#options;
  }

  /** The node name (`node-name`, or a generated `#blockNNN`). */
  get nodeName(): string {
    return this.#name;
  }

  /** The open driver state. @throws {BlkError} ENOMEDIUM once closed */
  get state(): BlockDriverState {
    if (this.#state === undefined || this.#closing !== undefined) {
      throw new BlkError("ENOMEDIUM", "No medium found");
    }
    return this.#state;
  }

  /** True once `close()` was called. */
  get closed(): boolean {
    return this.#closing !== undefined;
  }

  /** The node is read-only (`read-only=on`). */
  get readOnly(): boolean {
    return this.options.readOnly;
  }

  /** Length in bytes (cached; refreshed after truncate and growing writes). */
  get length(): number {
    return this.#length;
  }

  /** The backing (copy-on-write) child, if any. */
  get backing(): BlockNode | undefined {
    for (const e of this.children.values()) if ((e.role & CHILD_ROLE.COW) !== 0) return e.child;
    return undefined;
  }

  /**
   * For filters: the filtered child; for other nodes: the backing child (QEMU `bdrv_filter_or_cow_bs`).
   * A raw node's `file` has the filtered role too, but raw is a format, not a filter: QEMU does not
   * follow it, and neither does this.
   */
  get filteredOrBacking(): Edge | undefined {
    const mask = this.driver.kind === "filter" ? CHILD_ROLE.FILTERED | CHILD_ROLE.COW : CHILD_ROLE.COW;
    for (const e of this.children.values()) if ((e.role & mask) !== 0) return e;
    return undefined;
  }

  /** The filtered child if this node is a filter. */
  get filtered(): BlockNode | undefined {
    for (const e of this.children.values()) if ((e.role & CHILD_ROLE.FILTERED) !== 0) return e.child;
    return undefined;
  }

  /** Cumulative permissions of all parents (`perm`, `shared`). */
  get cumulativePerm(): { perm: number; shared: number } {
    let perm = 0;
    let shared = 0x0f;
    for (const e of this.parents) {
      perm |= e.perm;
      shared &= e.shared;
    }
    return { perm, shared };
  }

  // ---- write threshold (`block-set-write-threshold`) ----------------------------------------------------

  /** The write threshold in bytes; 0 = off. */
  get writeThreshold(): number {
    return this.#writeThreshold;
  }

  /** Sets the write threshold (`block-set-write-threshold`); 0 turns it off. */
  setWriteThreshold(bytes: number): void {
    if (!Number.isSafeInteger(bytes) || bytes < 0)
      throw new BlkError("EINVAL", `Invalid write threshold ${bytes}`);
    this.#writeThreshold = bytes;
  }

  /** Calls `fn` (synchronously) when a write or zero-write ends past the threshold. @returns a remover */
  onWriteThreshold(fn: (ev: WriteThresholdEvent) => void): () => void {
    this.#thresholdListeners.add(fn);
    return () => this.#thresholdListeners.delete(fn);
  }

  #checkThreshold(offset: number, bytes: number): void {
    const t = this.#writeThreshold;
    const end = offset + bytes;
    if (t === 0 || end <= t) return;
    this.#writeThreshold = 0;
    const ev: WriteThresholdEvent = {
      "node-name": this.#name,
      "amount-exceeded": end - t,
      "write-threshold": t,
    };
    for (const fn of this.#thresholdListeners) fn(ev);
  }

  // ---- checks ---------------------------------------------------------------------------------------

  #checkRange(offset: number, bytes: number, kind: Kind, allowGrow: boolean): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || bytes < 0) {
      this.stats[`invalid_${kind}_operations`]++;
      throw new BlkError("EINVAL", `Invalid request: offset ${offset}, length ${bytes}`, { offset });
    }
    if (!Number.isSafeInteger(offset + bytes)) {
      this.stats[`invalid_${kind}_operations`]++;
      throw new BlkError("EOVERFLOW", `Request beyond 2^53: offset ${offset}, length ${bytes}`, { offset });
    }
    if (!allowGrow && offset + bytes > this.#length) {
      this.stats[`invalid_${kind}_operations`]++;
      throw new BlkError("EIO", `Request beyond end of node '${this.#name}' (${this.#length} bytes)`, {
        offset,
      });
    }
    const align = this.state.limits.requestAlignment;
    if (align > 1 && (offset % align !== 0 || bytes % align !== 0)) {
      this.stats[`invalid_${kind}_operations`]++;
      throw new BlkError("EINVAL", `Request not aligned to ${align} bytes`, { offset });
    }
  }

  #checkWritable(kind: Kind, via: Edge | undefined, writeUnchanged: boolean): void {
    if (this.options.readOnly) {
      this.stats[`invalid_${kind}_operations`]++;
      throw new BlkError("EPERM", `Node '${this.#name}' is read-only`);
    }
    if (via !== undefined) {
      const need = writeUnchanged ? PERM.WRITE | PERM.WRITE_UNCHANGED : PERM.WRITE;
      if ((via.perm & need) === 0) {
        this.stats[`invalid_${kind}_operations`]++;
        throw new BlkError(
          "EPERM",
          `Edge '${via.name}' does not hold the write permission on '${this.#name}'`,
        );
      }
    }
    for (const b of this.#bitmaps) {
      if (b.readonly) {
        this.stats[`invalid_${kind}_operations`]++;
        throw new BlkError("EPERM", `Node '${this.#name}' has read-only bitmaps`);
      }
    }
  }

  #allowGrow(via: Edge | undefined): boolean {
    return via !== undefined && (via.perm & PERM.RESIZE) !== 0;
  }

  // ---- the request path -------------------------------------------------------------------------------

  /** Reads `bytes` bytes at `offset` into a new buffer. @throws {BlkError} EIO beyond the end */
  async read(offset: number, bytes: number, opts: RequestOptions = {}): Promise<Uint8Array> {
    const buf = new Uint8Array(bytes);
    await this.readInto(offset, buf, opts);
    return buf;
  }

  /** Reads into `buf` (its whole length) at `offset`. */
  async readInto(offset: number, buf: Uint8Array, opts: RequestOptions = {}): Promise<void> {
    if (this.#gate !== undefined && (await this.#heldAndMoved(opts.via))) {
      return (opts.via as Edge).readInto(offset, buf, opts);
    }
    const state = this.state;
    this.#checkRange(offset, buf.length, "rd", false);
    const req = this.tracker.begin({
      offset,
      bytes: buf.length,
      serialising: opts.serialising ?? false,
      kind: "read",
    });
    const t0 = now();
    let ok = false;
    try {
      if (opts.noSerialising !== true) await req.waitForOverlapping();
      const max = state.limits.maxTransfer;
      if (max <= 0 || buf.length <= max) await state.read(offset, buf);
      else
        for (let p = 0; p < buf.length; p += max)
          await state.read(offset + p, buf.subarray(p, Math.min(p + max, buf.length)));
      ok = true;
    } finally {
      req.end();
      this.#account("rd", buf.length, t0, ok);
    }
  }

  /** Writes `data` at `offset`. */
  async write(offset: number, data: Uint8Array, opts: NodeWriteOptions = {}): Promise<void> {
    if (this.#gate !== undefined && (await this.#heldAndMoved(opts.via))) {
      return (opts.via as Edge).write(offset, data, opts);
    }
    const state = this.state;
    const bytes = data.length;
    const writeUnchanged = opts.writeUnchanged ?? false;
    this.#checkWritable("wr", opts.via, writeUnchanged);
    this.#checkRange(offset, bytes, "wr", this.#allowGrow(opts.via));
    const req = this.tracker.begin({ offset, bytes, serialising: opts.serialising ?? false, kind: "write" });
    const t0 = now();
    let ok = false;
    try {
      await req.waitForOverlapping();
      this.#checkThreshold(offset, bytes);
      if (this.beforeWrite.size > 0)
        await this.beforeWrite.notify({ node: this, kind: "write", offset, bytes, data, writeUnchanged });
      if (this.options.detectZeroes !== "off" && bytes > 0 && isAllZero(data)) {
        const mayUnmap = this.options.detectZeroes === "unmap" && this.options.discard === "unmap";
        await split(state.limits.maxTransfer, offset, bytes, (o, n) =>
          state.writeZeroes(o, n, { mayUnmap, fua: opts.fua ?? false }),
        );
      } else {
        await split(state.limits.maxTransfer, offset, bytes, (o, n) =>
          state.write(o, n === bytes ? data : data.subarray(o - offset, o - offset + n), {
            fua: opts.fua ?? false,
          }),
        );
      }
      ok = true;
    } finally {
      await this.#afterWrite(req, offset, bytes, ok, false);
      this.#account("wr", bytes, t0, ok);
    }
  }

  /** Writes zeroes; `mayUnmap` is dropped unless the node was opened with `discard=unmap`. */
  async writeZeroes(offset: number, bytes: number, opts: NodeZeroOptions = {}): Promise<void> {
    if (this.#gate !== undefined && (await this.#heldAndMoved(opts.via))) {
      return (opts.via as Edge).writeZeroes(offset, bytes, opts);
    }
    const state = this.state;
    this.#checkWritable("wr", opts.via, false);
    this.#checkRange(offset, bytes, "wr", this.#allowGrow(opts.via));
    const req = this.tracker.begin({ offset, bytes, serialising: opts.serialising ?? false, kind: "zero" });
    const t0 = now();
    let ok = false;
    try {
      await req.waitForOverlapping();
      this.#checkThreshold(offset, bytes);
      if (this.beforeWrite.size > 0)
        await this.beforeWrite.notify({
          node: this,
          kind: "write-zeroes",
          offset,
          bytes,
          writeUnchanged: false,
        });
      const mayUnmap = (opts.mayUnmap ?? false) && this.options.discard === "unmap";
      await split(state.limits.maxTransfer, offset, bytes, (o, n) =>
        state.writeZeroes(o, n, { mayUnmap, noFallback: opts.noFallback ?? false, fua: opts.fua ?? false }),
      );
      ok = true;
    } finally {
      await this.#afterWrite(req, offset, bytes, ok, false);
      this.#account("wr", bytes, t0, ok);
    }
  }

  /**
   * Copy offload, source side (QEMU's `bdrv_co_copy_range`): copies `bytes` bytes at `offset` to `dst`
   * without a buffer, as a read of this node (range check, request tracking, statistics).
   * @throws {BlkError} ENOTSUP when the pair cannot offload: the caller then reads and writes
   */
  async copyRange(
    offset: number,
    bytes: number,
    dst: CopyRangeDest,
    opts: RequestOptions = {},
  ): Promise<void> {
    if (this.#gate !== undefined) await this.#waitGate();
    const state = this.state;
    this.#checkRange(offset, bytes, "rd", false);
    const from = state.copyRangeFrom?.bind(state);
    if (from === undefined) throw offloadRefused(offset);
    const req = this.tracker.begin({ offset, bytes, serialising: opts.serialising ?? false, kind: "read" });
    const t0 = now();
    let ok = false;
    let refused = false;
    try {
      if (opts.noSerialising !== true) await req.waitForOverlapping();
      await split(state.limits.maxTransfer, offset, bytes, (o, n) =>
        from(o, n, { ...dst, offset: dst.offset + (o - offset) }),
      );
      ok = true;
    } catch (e) {
      refused = isOffloadRefusal(e);
      throw e;
    } finally {
      req.end();
      // A refusal is no failed read: the caller reads the data next.
      if (!refused) this.#account("rd", bytes, t0, ok);
    }
  }

  /**
   * Copy offload, target side: stores `bytes` bytes of `src` at `offset` as a write of this node
   * (permissions, range, request tracking, write threshold, dirty bitmaps, statistics). Refused while
   * before-write notifiers or `detect-zeroes` need to see the data.
   * @throws {BlkError} ENOTSUP when the pair cannot offload: the caller then reads and writes
   */
  async copyRangeTo(
    src: CopyRangeSource,
    offset: number,
    bytes: number,
    opts: RequestOptions = {},
  ): Promise<void> {
    if (this.#gate !== undefined) await this.#waitGate();
    const state = this.state;
    this.#checkWritable("wr", opts.via, false);
    this.#checkRange(offset, bytes, "wr", this.#allowGrow(opts.via));
    const to = state.copyRangeTo?.bind(state);
    if (to === undefined || this.options.detectZeroes !== "off") throw offloadRefused(offset);
    const req = this.tracker.begin({ offset, bytes, serialising: opts.serialising ?? false, kind: "write" });
    const t0 = now();
    let ok = false;
    let refused = false;
    try {
      await req.waitForOverlapping();
      if (this.beforeWrite.size > 0) throw offloadRefused(offset);
      this.#checkThreshold(offset, bytes);
      await split(state.limits.maxTransfer, offset, bytes, (o, n) =>
        to({ state: src.state, offset: src.offset + (o - offset) }, o, n),
      );
      ok = true;
    } catch (e) {
      refused = isOffloadRefusal(e);
      throw e;
    } finally {
      await this.#afterWrite(req, offset, bytes, ok, false);
      if (!refused) this.#account("wr", bytes, t0, ok);
    }
  }

  /** Discards a range; a no-op (success) unless the node was opened with `discard=unmap`. */
  async discard(offset: number, bytes: number, opts: RequestOptions = {}): Promise<void> {
    if (this.#gate !== undefined && (await this.#heldAndMoved(opts.via))) {
      return (opts.via as Edge).discard(offset, bytes, opts);
    }
    const state = this.state;
    this.#checkWritable("unmap", opts.via, false);
    this.#checkRange(offset, bytes, "unmap", false);
    if (this.options.discard !== "unmap") return;
    const req = this.tracker.begin({
      offset,
      bytes,
      serialising: opts.serialising ?? false,
      kind: "discard",
    });
    const t0 = now();
    let ok = false;
    try {
      await req.waitForOverlapping();
      if (this.beforeWrite.size > 0)
        await this.beforeWrite.notify({ node: this, kind: "discard", offset, bytes, writeUnchanged: false });
      await state.discard(offset, bytes);
      ok = true;
    } finally {
      await this.#afterWrite(req, offset, bytes, ok, true);
      this.#account("unmap", bytes, t0, ok);
    }
  }

  /** Flushes (to stable storage unless `cache.no-flush`). */
  async flush(): Promise<void> {
    if (this.#gate !== undefined) await this.#waitGate();
    const state = this.state;
    const t0 = now();
    let ok = false;
    try {
      await state.flush({ toDisk: !this.options.cacheNoFlush });
      // Then the children this node may have written to (QEMU flushes down the graph).
      for (const e of this.children.values()) {
        if ((e.perm & (PERM.WRITE | PERM.WRITE_UNCHANGED)) !== 0) await e.child.flush();
      }
      ok = true;
    } finally {
      this.#account("flush", 0, t0, ok);
    }
  }

  /**
   * Block status of this node alone, as extents covering `[offset, min(offset+bytes, length))`.
   * Filters without their own block status report their filtered child's. Unallocated ranges of a node
   * without a backing child read as zeroes and say so.
   */
  async blockStatus(
    offset: number,
    bytes: number,
    opts: { wantZero?: boolean } = {},
  ): Promise<BlockStatusExtent[]> {
    const state = this.state;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || bytes < 0) {
      throw new BlkError("EINVAL", `Invalid request: offset ${offset}, length ${bytes}`, { offset });
    }
    const end = Math.min(offset + bytes, this.#length);
    const out: BlockStatusExtent[] = [];
    const filtered =
      this.driver.kind === "filter" && !state.capabilities.blockStatus ? this.filtered : undefined;
    const hasBacking = this.backing !== undefined;
    let pos = offset;
    while (pos < end) {
      const got =
        filtered !== undefined
          ? await filtered.blockStatus(pos, end - pos, opts)
          : await state.blockStatus(pos, end - pos, { wantZero: opts.wantZero ?? false });
      if (got.length === 0)
        throw new BlkError("EIO", `Driver returned no block status at ${pos}`, { offset: pos });
      for (const e of got) {
        if (e.offset !== pos || e.length <= 0) {
          throw new BlkError("EIO", `Driver returned bad block status at ${pos}`, { offset: pos });
        }
        const length = Math.min(e.length, end - pos);
        const ext: BlockStatusExtent = { ...e, length };
        if (!ext.allocated && !hasBacking && !ext.data) ext.zero = true;
        pushExtent(out, ext);
        pos += length;
        if (pos >= end) break;
      }
    }
    return out;
  }

  /**
   * Block status over the backing chain (QEMU `bdrv_block_status_above`): each extent says whether some
   * layer from this node down to (excluding, unless `includeBase`) `base` allocates it, and `depth` is that
   * layer (0 = this node; filters are passed through without counting). For ranges no layer allocates,
   * `depth` is the bottom-most layer searched and `zero` is true when nothing lies below it.
   * `qemu-img map` JSON: `present` = `allocated`; NBD `qemu:allocation-depth` = allocated ? depth + 1 : 0.
   */
  async blockStatusAbove(
    offset: number,
    bytes: number,
    opts: BlockStatusAboveOptions = {},
  ): Promise<BlockStatusExtent[]> {
    const end = Math.min(offset + bytes, this.#length);
    const out: BlockStatusExtent[] = [];
    if (offset < end) {
      await this.#statusAboveRange(
        offset,
        end - offset,
        opts.base ?? null,
        opts.includeBase ?? false,
        0,
        out,
      );
    }
    return out;
  }

  /**
   * Appends the status of `[pos, pos+n)` as seen from this layer down to `base` to `out`. Each layer is
   * asked once for the whole range it has to answer, and only its unallocated parts go one layer down,
   * so the work is linear in the number of extents (asking again for every extent would be quadratic
   * over long, fragmented ranges).
   */
  async #statusAboveRange(
    pos: number,
    n: number,
    base: BlockNode | null,
    includeBase: boolean,
    depth: number,
    out: BlockStatusExtent[],
  ): Promise<void> {
    const end = pos + n;
    let p = pos;
    for (const e of await this.#ownStatus(pos, n)) {
      if (p >= end) break;
      if (e.offset !== p) throw new BlkError("EIO", `No block status at ${p}`, { offset: p });
      const len = Math.min(e.length, end - p);
      if (e.allocated) {
        pushExtent(out, { ...e, length: len, depth });
      } else {
        const down = this.#cowChild();
        const hole = (zero: boolean, at: number, length: number): void =>
          pushExtent(out, { offset: at, length, data: false, zero, allocated: false, depth });
        if (down === undefined) hole(true, p, len);
        else if (down === base && !includeBase) hole(false, p, len);
        else if (p >= down.length)
          hole(true, p, len); // beyond the end of a shorter backing file
        else {
          const inDown = Math.min(len, down.length - p);
          if (down === base) {
            let q = p;
            for (const s of await down.#ownStatus(p, inDown)) {
              const l = Math.min(s.length, p + inDown - q);
              if (l <= 0) break;
              pushExtent(out, { ...s, offset: q, length: l, depth: depth + 1 });
              q += l;
            }
          } else {
            await down.#statusAboveRange(p, inDown, base, includeBase, depth + 1, out);
          }
          if (inDown < len) hole(true, p + inDown, len - inDown);
        }
      }
      p += len;
    }
    if (p < end) throw new BlkError("EIO", `No block status at ${p}`, { offset: p });
  }

  /** Status of this layer, looking through filters (which do not count as layers). */
  async #ownStatus(pos: number, n: number): Promise<BlockStatusExtent[]> {
    let node: BlockNode = this;
    while (node.driver.kind === "filter" && !node.state.capabilities.blockStatus) {
      const f = node.filtered;
      if (f === undefined) break;
      node = f;
    }
    return node.blockStatus(pos, n);
  }

  #cowChild(): BlockNode | undefined {
    let node: BlockNode = this;
    while (node.driver.kind === "filter") {
      const f = node.filtered;
      if (f === undefined) return undefined;
      node = f;
    }
    return node.backing;
  }

  /** Changes the length (needs the node writable; bitmaps follow). */
  async truncate(length: number, flags: TruncateFlags = {}, opts: RequestOptions = {}): Promise<void> {
    const state = this.state;
    this.#checkWritable("wr", undefined, false);
    if (opts.via !== undefined && (opts.via.perm & PERM.RESIZE) === 0) {
      throw new BlkError(
        "EPERM",
        `Edge '${opts.via.name}' does not hold the resize permission on '${this.#name}'`,
      );
    }
    if (!Number.isSafeInteger(length) || length < 0) throw new BlkError("EINVAL", `Invalid length ${length}`);
    for (const b of this.#bitmaps) b.assertTruncatable();
    await this.tracker.drain();
    await state.truncate(length, flags);
    this.#length = await state.getLength();
    for (const b of this.#bitmaps) b._truncate(this.#length);
  }

  /** Consistency check of the image (`qemu-img check`). */
  check(options: { repair?: "leaks" | "all" } = {}): Promise<CheckResult> {
    return this.state.check(options);
  }

  /** Driver information (cluster size, …). */
  async info(): Promise<BlockDriverInfo> {
    this.#info ??= await this.state.info();
    return this.#info;
  }

  /**
   * QEMU's write-request finish: a successful write past the end grows the node (and its bitmaps) first;
   * then, success or not, writes raise `wr_highest_offset` and writes and discards mark every enabled
   * bitmap (clipped to the node's length).
   */
  async #afterWrite(
    req: TrackedRequest,
    offset: number,
    bytes: number,
    ok: boolean,
    discard: boolean,
  ): Promise<void> {
    try {
      const end = offset + bytes;
      const state = this.#state;
      if (ok && !discard && end > this.#length) {
        const driverLength = state === undefined ? end : await state.getLength();
        this.#length = Math.max(end, driverLength);
        for (const b of this.#bitmaps) b._truncate(this.#length);
      }
      if (bytes > 0) {
        if (!discard && end > this.stats.wr_highest_offset) this.stats.wr_highest_offset = end;
        const n = Math.min(end, this.#length) - offset;
        if (n > 0) for (const b of this.#bitmaps) b._markWrite(offset, n);
      }
    } finally {
      req.end();
    }
  }

  #account(kind: Kind, bytes: number, t0: number, ok: boolean): void {
    const s = this.stats;
    this.#lastIoEnd = now();
    if (!ok) {
      s[`failed_${kind}_operations`]++;
      return;
    }
    s[`${kind}_operations`]++;
    if (kind !== "flush") s[`${kind}_bytes`] += bytes;
    s[`${kind}_total_time_ns`] += Math.round(now() - t0);
  }

  /** The `query-blockstats` `stats` object of this node. */
  queryStats(): BlockDeviceStats {
    const out: BlockDeviceStats = {
      ...this.stats,
      rd_merged: 0,
      wr_merged: 0,
      unmap_merged: 0,
      account_invalid: true,
      account_failed: true,
      timed_stats: [],
    };
    if (this.#lastIoEnd !== undefined) out.idle_time_ns = Math.max(0, Math.round(now() - this.#lastIoEnd));
    return out;
  }

  // ---- dirty bitmaps -----------------------------------------------------------------------------------

  /** The node's dirty bitmaps, newest first (named and anonymous). */
  get bitmaps(): readonly DirtyBitmap[] {
    return this.#bitmaps;
  }

  /** The named bitmap, or undefined. */
  getBitmap(name: string): DirtyBitmap | undefined {
    return this.#bitmaps.find((b) => b.name === name);
  }

  /**
   * The default bitmap granularity (QEMU's rule): the cluster size clamped to [4 KiB, 64 KiB] when the
   * driver reports one, else 64 KiB.
   */
  async defaultBitmapGranularity(): Promise<number> {
    const info = await this.info();
    if (info.clusterSize === undefined || info.clusterSize <= 0) return 65536;
    return Math.min(Math.max(info.clusterSize, 4096), 65536);
  }

  /**
   * Creates a dirty bitmap (`block-dirty-bitmap-add` checks and messages).
   * @throws {BlkError} EEXIST `Bitmap already exists: NAME`; EINVAL for a bad name or granularity
   */
  async createBitmap(options: DirtyBitmapOptions = {}): Promise<DirtyBitmap> {
    const granularity = options.granularity ?? (await this.defaultBitmapGranularity());
    return this.createBitmapSync({ ...options, granularity });
  }

  /** {@link BlockNode.createBitmap} with an explicit granularity (no driver query). */
  createBitmapSync(options: DirtyBitmapOptions & { granularity: number }): DirtyBitmap {
    const name = options.name;
    if (name !== undefined) {
      if (name === "") throw new BlkError("EINVAL", "Bitmap name cannot be empty");
      if (name.length > 1023) throw new BlkError("EINVAL", `Bitmap name too long: ${name}`);
      if (this.getBitmap(name) !== undefined) throw new BlkError("EEXIST", `Bitmap already exists: ${name}`);
    }
    const b = new DirtyBitmap(this, { ...options, size: this.#length });
    this.#bitmaps.unshift(b);
    return b;
  }

  /** @internal Removes a bitmap object from the node (no checks: {@link DirtyBitmap.release} checks). */
  _dropBitmap(b: DirtyBitmap): void {
    const i = this.#bitmaps.indexOf(b);
    if (i >= 0) this.#bitmaps.splice(i, 1);
  }

  /** @internal Inserts a bitmap object (successors). */
  _addBitmap(b: DirtyBitmap): void {
    this.#bitmaps.unshift(b);
  }

  async #waitGate(): Promise<void> {
    while (this.#gate !== undefined) await this.#gate;
  }

  /**
   * Waits at the gate of a drained section; true when the request came through an edge that no longer
   * points here once it opens (a filter went in above this node, or the node was replaced, meanwhile).
   * Such a request must go where its edge points now: in QEMU it would have waited above the graph, in
   * its BlockBackend, and a copy-before-write filter inserted in the drained section must see it.
   */
  async #heldAndMoved(via: Edge | undefined): Promise<boolean> {
    await this.#waitGate();
    return via !== undefined && via.child !== this;
  }

  /**
   * Runs `fn` with no request of this node in flight; requests issued meanwhile wait until it is done
   * (QEMU's drained section). `fn` must not do I/O on this node itself.
   */
  async drained<T>(fn: () => Promise<T> | T): Promise<T> {
    await this.#waitGate();
    let open!: () => void;
    this.#gate = new Promise<void>((r) => (open = r));
    try {
      await this.tracker.drain();
      return await fn();
    } finally {
      this.#gate = undefined;
      open();
    }
  }

  /**
   * Changes common options (QEMU's `blockdev-reopen` of the common members): drains, checks the new
   * combination and the permissions it implies (going read-only under a writer fails with
   * `Block node is read-only`), then lets the driver reopen. On failure nothing changes.
   * @throws {BlkError} EINVAL for invalid combinations; EPERM for permission conflicts
   */
  async reopen(changes: Partial<NodeOptions>): Promise<void> {
    await this.drained(async () => {
      const old = this.#options;
      const next = Object.freeze(resolveNodeOptions({ ...old, ...changes }));
      // As QEMU's reopen: a driver going read-only finishes its writes (flush, metadata, persistent
      // bitmaps, dirty bit) while it still holds write permission on its children, and only then are the
      // permissions dropped; going read-write, the permissions come first.
      const toReadOnly = next.readOnly && !old.readOnly;
      if (toReadOnly) await this.state.reopen?.({ readOnly: true });
      this.#options = next;
      try {
        this.graph.refreshPerms([this]);
        if (next.readOnly !== old.readOnly && !toReadOnly)
          await this.state.reopen?.({ readOnly: next.readOnly });
      } catch (e) {
        this.#options = old;
        try {
          this.graph.refreshPerms([this]);
        } catch {
          // The old permissions held before; restoring them cannot conflict.
        }
        if (toReadOnly) await this.state.reopen?.({ readOnly: false }).catch(() => {});
        throw e;
      }
    });
  }

  // ---- lifecycle --------------------------------------------------------------------------------------

  /** @internal Renames (graph only). */
  _rename(name: string): void {
    this.#name = name;
  }

  /**
   * Waits for in-flight requests, then closes the driver. Idempotent (same promise). Does not detach the
   * node from the graph: use {@link BlockGraph.delete} for that.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      await this.tracker.drain();
      const state = this.#state;
      if (state === undefined) return;
      try {
        const persistent = this.#bitmaps.filter(
          (b) => b.persistent && !b.inconsistent && b.name !== undefined,
        );
        if (state.storeBitmaps !== undefined && persistent.length > 0 && !this.options.readOnly) {
          await state.storeBitmaps(persistent);
        }
      } finally {
        await state.close();
      }
    })();
    return this.#closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
