/**
 * The BlockDriver contract: a driver opens a state (one per node) that does the I/O. Drivers usually
 * extend {@link BlockDriverBase}, which queues requests, drains them before blocking operations and
 * derives capability flags from the methods a driver overrides.
 */

import type { HBitmap } from "@blk/hbitmap";
import type { ArgsSchema } from "@blk/qmp";
import type { DirtyBitmap } from "./dirty-bitmap.ts";
import { BlkError } from "./errors.ts";
import type { Edge } from "./graph.ts";
import type { BlockNode } from "./node.ts";
import type { NodeOptions } from "./node-options.ts";

/** One extent of block status, shaped so `qemu-img map` JSON and NBD `base:allocation` derive from it. */
export interface BlockStatusExtent {
  /** Guest offset in bytes. */
  offset: number;
  /** Length in bytes (> 0). */
  length: number;
  /** Reads return data stored here (QEMU `BDRV_BLOCK_DATA`). */
  data: boolean;
  /** Reads return zeroes (QEMU `BDRV_BLOCK_ZERO`). */
  zero: boolean;
  /** Allocated in this layer (QEMU `BDRV_BLOCK_ALLOCATED`); for `blockStatusAbove`: in some layer above the base. */
  allocated: boolean;
  /** Offset in the protocol node (`qemu-img map` `offset`), when known. */
  hostOffset?: number;
  /** For `blockStatusAbove`: the layer the data comes from (0 = top); the chain depth when unallocated. */
  depth?: number;
}

/** Flags of a read. */
export interface ReadFlags {
  /** A prefetch whose data the caller discards (copy-on-read). */
  prefetch?: boolean;
}

/** Flags of a write. */
export interface WriteFlags {
  /** Force unit access: the data is stable when the promise resolves. */
  fua?: boolean;
}

/** Flags of a write-zeroes request. */
export interface ZeroFlags {
  /** The range may be deallocated if it then reads as zeroes (QEMU `BDRV_REQ_MAY_UNMAP`). */
  mayUnmap?: boolean;
  /** Fail with `ENOTSUP` rather than writing a zero-filled buffer (QEMU `BDRV_REQ_NO_FALLBACK`). */
  noFallback?: boolean;
  /** Force unit access. */
  fua?: boolean;
}

/** Flags of a flush. */
export interface FlushFlags {
  /** False with `cache.no-flush=on`: write caches down to the layer below but do not force stable storage. */
  toDisk: boolean;
}

/** Options of a block-status query. */
export interface BlockStatusFlags {
  /** The caller wants zero ranges told apart from data precisely (may cost more). */
  wantZero?: boolean;
}

/** Options of a truncate. */
export interface TruncateFlags {
  /** Fail rather than round the length to what the driver supports. */
  exact?: boolean;
  /** QEMU's `PreallocMode` for the new area. */
  preallocation?: "off" | "metadata" | "falloc" | "full";
}

/** Request limits a driver announces. */
export interface BlockLimits {
  /** Requests must be aligned to this many bytes (offset and length); 1 = any. */
  requestAlignment: number;
  /** Largest single request in bytes, 0 = unlimited. */
  maxTransfer: number;
}

/** What `info()` returns (QEMU `BlockDriverInfo`). */
export interface BlockDriverInfo {
  /** Cluster size in bytes, when the format has clusters (drives the default bitmap granularity). */
  clusterSize?: number;
  /** Unallocated areas read as zero after creation. */
  zeroInit?: boolean;
  /** Driver-specific fields for `format-specific`. */
  formatSpecific?: Record<string, unknown>;
  /**
   * The driver has no information to give at all (QEMU's `bdrv_get_info` fails with ENOTSUP, as for
   * `nbd`): `qemu-img info` then leaves out `dirty-flag`, which it takes from that answer.
   */
  unsupported?: true;
}

/** Outcome of a consistency check (`qemu-img check` fields). */
export interface CheckResult {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed?: number;
  leaksFixed?: number;
  imageEndOffset?: number;
  totalClusters?: number;
  allocatedClusters?: number;
  fragmentedClusters?: number;
}

/**
 * Copy offload, as the target's driver sees the source: the driver state that holds the data (the bottom
 * of the source's pass-through nodes, e.g. a `file` state) and where the data starts in it.
 */
export interface CopyRangeSource {
  readonly state: BlockDriverState;
  readonly offset: number;
}

/** Copy offload, as the source's driver sees the target: the node to store into and where. */
export interface CopyRangeDest {
  readonly node: BlockNode;
  readonly offset: number;
  /** The edge the copy writes through (permission-checked), if any. */
  readonly via?: Edge;
}

/** Capabilities derived from what a driver state implements. */
export interface DriverCapabilities {
  writeZeroes: boolean;
  discard: boolean;
  flush: boolean;
  blockStatus: boolean;
  truncate: boolean;
  check: boolean;
  /** Honours `fua` natively (else the node flushes after the write). */
  fua: boolean;
}

/**
 * An open driver state: what a {@link BlockNode} calls. Buffers passed in are never kept after the
 * returned promise settles.
 */
export interface BlockDriverState {
  readonly capabilities: DriverCapabilities;
  readonly limits: BlockLimits;
  /** Fills `buf` with the data at `offset` (the whole buffer: short reads are looped over). */
  read(offset: number, buf: Uint8Array, flags?: ReadFlags): Promise<void>;
  write(offset: number, data: Uint8Array, flags?: WriteFlags): Promise<void>;
  writeZeroes(offset: number, bytes: number, flags?: ZeroFlags): Promise<void>;
  discard(offset: number, bytes: number): Promise<void>;
  /** Writes this driver's own caches down (and forces stable storage if `toDisk`); the node then flushes its children. */
  flush(flags?: FlushFlags): Promise<void>;
  /** Extents covering a non-empty prefix of `[offset, offset+bytes)`, in order. */
  blockStatus(offset: number, bytes: number, flags?: BlockStatusFlags): Promise<BlockStatusExtent[]>;
  getLength(): Promise<number>;
  truncate(length: number, flags?: TruncateFlags): Promise<void>;
  info(): Promise<BlockDriverInfo>;
  check(options?: { repair?: "leaks" | "all" }): Promise<CheckResult>;
  /**
   * Copy offload, source side (QEMU's `copy_range_from`): copies `bytes` bytes at `offset` to `dst` without
   * reading them into a buffer, by passing the request down to the state holding the data, which calls
   * `dst.node.copyRangeTo`. Absent: this node cannot be a copy-offload source.
   * @throws {BlkError} ENOTSUP when this pair cannot offload (the caller then reads and writes)
   */
  copyRangeFrom?(offset: number, bytes: number, dst: CopyRangeDest): Promise<void>;
  /**
   * Copy offload, target side (QEMU's `copy_range_to`): stores `bytes` bytes of `src` at `offset`.
   * Absent: this node cannot be a copy-offload target.
   * @throws {BlkError} ENOTSUP when this pair cannot offload (the caller then reads and writes)
   */
  copyRangeTo?(src: CopyRangeSource, offset: number, bytes: number): Promise<void>;
  /** Runs `fn` with no request in flight; requests issued meanwhile wait (QEMU's drained section). */
  drained<T>(fn: () => Promise<T> | T): Promise<T>;
  /** Drains, then closes. Idempotent: every call returns the same promise. */
  close(): Promise<void>;
  /** Image locks: refuse `perm`/`shared` (throw a {@link BlkError}) before they are applied. */
  checkPerm?(perm: number, shared: number): void;
  /** Image locks: apply the permissions checked last. */
  setPerm?(perm: number, shared: number): void;
  /** Image locks: forget the permissions checked last. */
  abortPerm?(): void;
  /** Switches between read-only and read-write (`reopen`); absent: the switch needs nothing from the driver. */
  reopen?(options: { readOnly: boolean }): Promise<void>;
  /** Persistent bitmaps: the bitmaps stored in the image, loaded into the node when it opens. */
  loadBitmaps?(): Promise<PersistentBitmap[]>;
  /** Persistent bitmaps: store these (named, persistent, consistent) bitmaps; called by close() before `close`. */
  storeBitmaps?(bitmaps: readonly DirtyBitmap[]): Promise<void>;
  /** Persistent bitmaps: throw a {@link BlkError} if a bitmap `name` cannot be stored in the image. */
  canStoreBitmap?(name: string, granularity: number): void;
  /** Persistent bitmaps: delete bitmap `name` from the image now. */
  removePersistentBitmap?(name: string): Promise<void>;
}

/** A bitmap stored in an image (qcow2 bitmaps extension), as `loadBitmaps` returns it. */
export interface PersistentBitmap {
  name: string;
  /** Bytes per bit. */
  granularity: number;
  /** The `auto` flag: the bitmap records writes. */
  enabled: boolean;
  /** The `in-use` flag was set at open (unclean shutdown): only removal is allowed. */
  inconsistent?: boolean;
  /** The bits, over the node's length with the bitmap's granularity (absent: all clean). */
  bits?: HBitmap;
}

/** Kind of driver, as QEMU classifies them. */
export type DriverKind = "protocol" | "format" | "filter";

/** What `open` gets besides its options. */
export interface OpenContext {
  /** The node is opened read-only. */
  readOnly: boolean;
  /** The node's name in its graph. */
  nodeName: string;
  /** The node's child edges by name (`file`, `backing`, …), attached before `open`. */
  children: ReadonlyMap<string, Edge>;
  /** `auto-read-only`: a protocol driver may fall back to read-only (and report it). */
  autoReadOnly: boolean;
  /**
   * All common node options (`cache.direct`, `force-share`, `discard`, …) as the node has them; always set
   * by {@link BlockGraph.open} (optional only so tests can build a context by hand).
   */
  options?: Readonly<NodeOptions>;
}

/** One child-naming option of a driver (see {@link BlockDriver.childOptions}). */
export interface ChildOptionDecl {
  /** Option member and edge name. */
  name: string;
  /** {@link CHILD_ROLE} bits; default from the name and the driver kind. */
  role?: number;
}

/** A block driver: QEMU's `BlockDriver` (format name, open/create/probe, option schema). */
export interface BlockDriver<O = Record<string, unknown>> {
  /** QEMU's `format_name` (`raw`, `qcow2`, `file`, `mirror_top`, …). */
  readonly format: string;
  readonly kind: DriverKind;
  /** The driver's options (without the common node options), with QEMU's validation wording. */
  readonly schema?: ArgsSchema<O>;
  open(options: O, ctx: OpenContext): Promise<BlockDriverState>;
  /** Creates an image (`blockdev-create`, `qemu-img create`). */
  create?(options: O): Promise<void>;
  /**
   * The driver's option members that name children (`file`, `backing`, `image`, `target`…): what
   * {@link openBlockdev} opens or looks up before `open`, and the role of each edge (default from the
   * name: `backing` is copy-on-write, a format's `file` holds data and metadata, a filter's is filtered).
   */
  readonly childOptions?: readonly ChildOptionDecl[];
  /** Score 0–100 of how likely `header` (the first bytes of a file) is this format. */
  probe?(header: Uint8Array, filename?: string): number;
  /**
   * Permissions this driver's node takes on a child; the default follows {@link defaultChildPerm}
   * for the edge's role.
   */
  childPerm?(
    role: number,
    parentPerm: number,
    parentShared: number,
    writable: boolean,
  ): { perm: number; shared: number };
}

const closedError = (): BlkError => new BlkError("ENOMEDIUM", "No medium found");

/**
 * Template base class for driver states: public methods track requests and call the protected `_x`
 * methods drivers override. `drained()` and `close()` wait for in-flight requests; requests issued while a
 * blocking operation runs wait for it. Capability flags say which `_x` methods a subclass overrides.
 *
 * Defaults: `_writeZeroes` writes a zero buffer (or fails `ENOTSUP` with `noFallback`); `_discard` is a
 * no-op (discard is advisory); `_flush` does nothing; `_blockStatus` reports everything as allocated
 * data; `_truncate` fails `ENOTSUP`; `_info` returns `{}`; `_check` reports no problem.
 * @example
 * class Zero extends BlockDriverBase {
 *   protected override async _read(_o: number, buf: Uint8Array) { buf.fill(0); }
 *   protected override async _write() {}
 *   protected override async _getLength() { return 1 << 20; }
 * }
 */
export abstract class BlockDriverBase implements BlockDriverState {
  #inFlight = 0;
  #idle: (() => void)[] = [];
  #gate: Promise<void> | undefined;
  #closing: Promise<void> | undefined;
  #closed = false;
  readonly capabilities: DriverCapabilities;
  readonly limits: BlockLimits;

  constructor(limits?: Partial<BlockLimits>) {
    this.limits = { requestAlignment: limits?.requestAlignment ?? 1, maxTransfer: limits?.maxTransfer ?? 0 };
    const proto = BlockDriverBase.prototype;
    const self = this as unknown as Record<string, unknown>;
    const own = (k: string): boolean => self[k] !== (proto as unknown as Record<string, unknown>)[k];
    this.capabilities = {
      writeZeroes: own("_writeZeroes"),
      discard: own("_discard"),
      flush: own("_flush"),
      blockStatus: own("_blockStatus"),
      truncate: own("_truncate"),
      check: own("_check"),
      fua: this.supportsFua(),
    };
  }

  /** Override to return true when `_write` honours `fua` itself. */
  protected supportsFua(): boolean {
    return false;
  }

  /** True once `close()` has been called. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Number of requests in flight. */
  get inFlight(): number {
    return this.#inFlight;
  }

  async #run<T>(fn: () => Promise<T>): Promise<T> {
    while (this.#gate !== undefined) await this.#gate;
    if (this.#closed) throw closedError();
    this.#inFlight++;
    try {
      return await fn();
    } finally {
      this.#inFlight--;
      if (this.#inFlight === 0) for (const w of this.#idle.splice(0)) w();
    }
  }

  #waitIdle(): Promise<void> {
    if (this.#inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idle.push(resolve));
  }

  /**
   * Runs `fn` as a queued request, drained and closed around like reads and writes: for the optional
   * request methods a subclass adds (copy offload).
   */
  protected request<T>(fn: () => Promise<T>): Promise<T> {
    return this.#run(fn);
  }

  /** Queued {@link BlockDriverBase._read}. */
  read(offset: number, buf: Uint8Array, flags: ReadFlags = {}): Promise<void> {
    return this.#run(() => this._read(offset, buf, flags));
  }
  /** Queued `_write`; emulates FUA with a flush when the driver does not honour it. */
  write(offset: number, data: Uint8Array, flags: WriteFlags = {}): Promise<void> {
    return this.#run(async () => {
      await this._write(offset, data, flags);
      if (flags.fua === true && !this.capabilities.fua) await this._flush({ toDisk: true });
    });
  }
  /** Queued `_writeZeroes`. */
  writeZeroes(offset: number, bytes: number, flags: ZeroFlags = {}): Promise<void> {
    return this.#run(() => this._writeZeroes(offset, bytes, flags));
  }
  /** Queued `_discard`. */
  discard(offset: number, bytes: number): Promise<void> {
    return this.#run(() => this._discard(offset, bytes));
  }
  /** Queued `_flush`. */
  flush(flags: FlushFlags = { toDisk: true }): Promise<void> {
    return this.#run(() => this._flush(flags));
  }
  blockStatus(offset: number, bytes: number, flags: BlockStatusFlags = {}): Promise<BlockStatusExtent[]> {
    return this.#run(() => this._blockStatus(offset, bytes, flags));
  }
  /** `_getLength`. */
  getLength(): Promise<number> {
    if (this.#closed) return Promise.reject(closedError());
    return this._getLength();
  }
  /** `_truncate` with no request in flight. */
  truncate(length: number, flags: TruncateFlags = {}): Promise<void> {
    return this.drained(() => this._truncate(length, flags));
  }
  /** `_info`. */
  info(): Promise<BlockDriverInfo> {
    if (this.#closed) return Promise.reject(closedError());
    return this._info();
  }
  /** `_check` with no request in flight. */
  check(options: { repair?: "leaks" | "all" } = {}): Promise<CheckResult> {
    return this.drained(() => this._check(options));
  }

  /** Runs `fn` with no request in flight; new requests wait until it is done. */
  async drained<T>(fn: () => Promise<T> | T): Promise<T> {
    while (this.#gate !== undefined) await this.#gate;
    if (this.#closed) throw closedError();
    let open!: () => void;
    this.#gate = new Promise((r) => (open = r));
    try {
      await this.#waitIdle();
      return await fn();
    } finally {
      this.#gate = undefined;
      open();
    }
  }

  /** Waits for in-flight requests, then `_close`. Idempotent: the same promise every time. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      while (this.#gate !== undefined) await this.#gate;
      this.#closed = true;
      await this.#waitIdle();
      await this._close();
    })();
    return this.#closing;
  }

  /** `close()`. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  protected abstract _read(offset: number, buf: Uint8Array, flags: ReadFlags): Promise<void>;
  protected abstract _write(offset: number, data: Uint8Array, flags: WriteFlags): Promise<void>;
  protected abstract _getLength(): Promise<number>;

  protected async _writeZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    if (flags.noFallback === true) throw new BlkError("ENOTSUP", "Operation not supported", { offset });
    const chunk = 1 << 20;
    const zero = new Uint8Array(Math.min(bytes, chunk));
    for (let done = 0; done < bytes; done += chunk) {
      const n = Math.min(chunk, bytes - done);
      await this._write(offset + done, n === zero.length ? zero : zero.subarray(0, n), {
        fua: flags.fua ?? false,
      });
    }
  }
  protected async _discard(_offset: number, _bytes: number): Promise<void> {}
  protected async _flush(_flags: FlushFlags): Promise<void> {}
  protected async _blockStatus(
    offset: number,
    bytes: number,
    _flags: BlockStatusFlags,
  ): Promise<BlockStatusExtent[]> {
    return [{ offset, length: bytes, data: true, zero: false, allocated: true }];
  }
  protected async _truncate(_length: number, _flags: TruncateFlags): Promise<void> {
    throw new BlkError("ENOTSUP", "Image format driver does not support resize");
  }
  protected async _info(): Promise<BlockDriverInfo> {
    return {};
  }
  protected async _check(_options: { repair?: "leaks" | "all" }): Promise<CheckResult> {
    return { corruptions: 0, leaks: 0, checkErrors: 0 };
  }
  protected async _close(): Promise<void> {}
}
