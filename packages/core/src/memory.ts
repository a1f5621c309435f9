/**
 * The in-memory test driver (`x-blk-memory`): a sparse RAM disk with allocation tracking, an optional
 * `backing` child, request counters and fault/latency hooks, so tests of any package can exercise the
 * request path, block status and the copy engine without files.
 */

import {
  type ArgsSchema,
  type BlockdevRefOrNull,
  type BlockdevRefOrNullInput,
  BlockdevRefOrNull as BlockdevRefOrNullSchema,
  type ObjectType,
  q,
} from "@blk/qmp";
import {
  type BlockDriver,
  BlockDriverBase,
  type BlockDriverInfo,
  type BlockStatusExtent,
  type OpenContext,
  type TruncateFlags,
  type ZeroFlags,
} from "./driver.ts";
import { BlkError } from "./errors.ts";
import type { Edge } from "./graph.ts";

/** Options of the memory driver. */
export interface MemoryDriverOptions {
  /** Length in bytes. */
  size: number;
  /** Allocation unit and reported cluster size in bytes (power of two, default 65536). */
  clusterSize?: number;
  /** Required request alignment in bytes (default 1). */
  requestAlignment?: number;
  /** Largest request in bytes (0 = unlimited). */
  maxTransfer?: number;
  /** Initial content (copied; all-zero clusters stay unallocated). */
  data?: Uint8Array;
}

/** A request seen by the hooks of {@link MemoryDriver}. */
export interface MemoryRequest {
  kind: "read" | "write" | "write-zeroes" | "discard" | "flush" | "block-status";
  offset: number;
  bytes: number;
}

/** Counters kept by {@link MemoryDriver} (what tests assert on). */
export interface MemoryCounters {
  reads: number;
  writes: number;
  writeZeroes: number;
  discards: number;
  flushes: number;
  bytesWritten: number;
  inFlight: number;
  maxInFlight: number;
}

const ZERO = "zero" as const;
type Cluster = Uint8Array | typeof ZERO;

/**
 * The open state of the memory driver. Clusters are absent (unallocated: reads come from `backing` or
 * zeroes), `"zero"` (allocated, reads zeroes) or data.
 */
export class MemoryDriver extends BlockDriverBase {
  readonly clusterSize: number;
  readonly counters: MemoryCounters = {
    reads: 0,
    writes: 0,
    writeZeroes: 0,
    discards: 0,
    flushes: 0,
    bytesWritten: 0,
    inFlight: 0,
    maxInFlight: 0,
  };
  /**
   * Called before each request reaches the data; may await (to hold a request in flight) or throw
   * (to fail it). Set and clear freely in tests.
   */
  hook: ((req: MemoryRequest) => void | Promise<void>) | undefined;
  #clusters = new Map<number, Cluster>();
  #materialising = new Map<number, Promise<Uint8Array>>();
  #size: number;
  #backing: Edge | undefined;

  constructor(options: MemoryDriverOptions, backing?: Edge) {
    super({ requestAlignment: options.requestAlignment ?? 1, maxTransfer: options.maxTransfer ?? 0 });
    const cs = options.clusterSize ?? 65536;
    if (!Number.isSafeInteger(cs) || cs < 1 || (cs & (cs - 1)) !== 0) {
      throw new BlkError("EINVAL", "Parameter 'clusterSize' expects a power of 2");
    }
    if (!Number.isSafeInteger(options.size) || options.size < 0) {
      throw new BlkError("EINVAL", "Parameter 'size' expects a non-negative integer");
    }
    this.clusterSize = cs;
    this.#size = options.size;
    this.#backing = backing;
    if (options.data !== undefined) this.#load(options.data);
  }

  #load(data: Uint8Array): void {
    const cs = this.clusterSize;
    for (let off = 0; off < Math.min(data.length, this.#size); off += cs) {
      const chunk = data.subarray(off, Math.min(off + cs, data.length));
      if (chunk.some((b) => b !== 0)) {
        const c = new Uint8Array(cs);
        c.set(chunk);
        this.#clusters.set(off / cs, c);
      }
    }
  }

  async #enter(req: MemoryRequest): Promise<void> {
    const c = this.counters;
    c.inFlight++;
    if (c.inFlight > c.maxInFlight) c.maxInFlight = c.inFlight;
    try {
      await this.hook?.(req);
    } catch (e) {
      c.inFlight--;
      throw e;
    }
  }

  #leave(): void {
    this.counters.inFlight--;
  }

  /** Allocation state of the cluster holding `offset` (for tests). */
  clusterState(offset: number): "unallocated" | "zero" | "data" {
    const c = this.#clusters.get(Math.floor(offset / this.clusterSize));
    return c === undefined ? "unallocated" : c === ZERO ? "zero" : "data";
  }

  /** Number of clusters holding data (for tests). */
  get dataClusters(): number {
    let n = 0;
    for (const c of this.#clusters.values()) if (c !== ZERO) n++;
    return n;
  }

  /** A copy of the whole content as this layer reads it, backing included (for tests). */
  async snapshot(): Promise<Uint8Array> {
    const out = new Uint8Array(this.#size);
    await this.#readRange(0, out);
    return out;
  }

  async #readRange(offset: number, buf: Uint8Array): Promise<void> {
    const cs = this.clusterSize;
    let pos = 0;
    while (pos < buf.length) {
      const abs = offset + pos;
      const idx = Math.floor(abs / cs);
      const inner = abs - idx * cs;
      const n = Math.min(cs - inner, buf.length - pos);
      const c = this.#clusters.get(idx);
      const dst = buf.subarray(pos, pos + n);
      if (c === undefined) {
        const b = this.#backing;
        if (b !== undefined && abs < b.length) {
          const m = Math.min(n, b.length - abs);
          await b.readInto(abs, dst.subarray(0, m));
          dst.subarray(m).fill(0);
        } else {
          dst.fill(0);
        }
      } else if (c === ZERO) {
        dst.fill(0);
      } else {
        dst.set(c.subarray(inner, inner + n));
      }
      pos += n;
    }
  }

  protected override async _read(offset: number, buf: Uint8Array): Promise<void> {
    await this.#enter({ kind: "read", offset, bytes: buf.length });
    try {
      this.counters.reads++;
      await this.#readRange(offset, buf);
    } finally {
      this.#leave();
    }
  }

  /** Materialises a cluster for a partial write (copying what reads show there now). */
  async #cluster(idx: number): Promise<Uint8Array> {
    const c = this.#clusters.get(idx);
    if (c instanceof Uint8Array) return c;
    // Concurrent partial writes into one unallocated cluster share a single materialisation: each one
    // building its own buffer (after awaiting the backing read) would let the last one drop the others.
    const pending = this.#materialising.get(idx);
    if (pending !== undefined) return pending;
    const done = (async () => {
      const buf = new Uint8Array(this.clusterSize);
      if (c === undefined) await this.#readRange(idx * this.clusterSize, buf);
      this.#clusters.set(idx, buf);
      return buf;
    })().finally(() => this.#materialising.delete(idx));
    this.#materialising.set(idx, done);
    return done;
  }

  protected override async _write(offset: number, data: Uint8Array): Promise<void> {
    await this.#enter({ kind: "write", offset, bytes: data.length });
    try {
      this.counters.writes++;
      this.counters.bytesWritten += data.length;
      const cs = this.clusterSize;
      let pos = 0;
      while (pos < data.length) {
        const abs = offset + pos;
        const idx = Math.floor(abs / cs);
        const inner = abs - idx * cs;
        const n = Math.min(cs - inner, data.length - pos);
        const c = await this.#cluster(idx);
        c.set(data.subarray(pos, pos + n), inner);
        pos += n;
      }
      if (offset + data.length > this.#size) this.#size = offset + data.length;
    } finally {
      this.#leave();
    }
  }

  protected override async _writeZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    await this.#enter({ kind: "write-zeroes", offset, bytes });
    try {
      this.counters.writeZeroes++;
      const cs = this.clusterSize;
      let pos = 0;
      while (pos < bytes) {
        const abs = offset + pos;
        const idx = Math.floor(abs / cs);
        const inner = abs - idx * cs;
        const n = Math.min(cs - inner, bytes - pos);
        if (n === cs) {
          if (flags.mayUnmap === true && this.#backing === undefined) this.#clusters.delete(idx);
          else this.#clusters.set(idx, ZERO);
        } else {
          const c = this.#clusters.get(idx);
          if (c instanceof Uint8Array || (c === undefined && this.#backing !== undefined)) {
            const buf = await this.#cluster(idx);
            buf.fill(0, inner, inner + n);
            if (buf.every((b) => b === 0)) this.#clusters.set(idx, ZERO);
          }
        }
        pos += n;
      }
      if (offset + bytes > this.#size) this.#size = offset + bytes;
    } finally {
      this.#leave();
    }
  }

  protected override async _discard(offset: number, bytes: number): Promise<void> {
    await this.#enter({ kind: "discard", offset, bytes });
    try {
      this.counters.discards++;
      const cs = this.clusterSize;
      const first = Math.ceil(offset / cs);
      const end = Math.floor((offset + bytes) / cs);
      for (let i = first; i < end; i++) this.#clusters.delete(i);
    } finally {
      this.#leave();
    }
  }

  protected override async _flush(): Promise<void> {
    await this.#enter({ kind: "flush", offset: 0, bytes: 0 });
    this.counters.flushes++;
    this.#leave();
  }

  protected override async _blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    await this.#enter({ kind: "block-status", offset, bytes });
    try {
      const cs = this.clusterSize;
      const end = Math.min(offset + bytes, this.#size);
      const out: BlockStatusExtent[] = [];
      let pos = offset;
      while (pos < end) {
        const idx = Math.floor(pos / cs);
        const n = Math.min((idx + 1) * cs, end) - pos;
        const c = this.#clusters.get(idx);
        const ext: BlockStatusExtent =
          c === undefined
            ? { offset: pos, length: n, data: false, zero: false, allocated: false }
            : c === ZERO
              ? { offset: pos, length: n, data: false, zero: true, allocated: true }
              : { offset: pos, length: n, data: true, zero: false, allocated: true };
        const last = out.at(-1);
        if (
          last !== undefined &&
          last.data === ext.data &&
          last.zero === ext.zero &&
          last.allocated === ext.allocated
        ) {
          last.length += n;
        } else {
          out.push(ext);
        }
        pos += n;
      }
      return out;
    } finally {
      this.#leave();
    }
  }

  protected override async _getLength(): Promise<number> {
    return this.#size;
  }

  protected override async _truncate(length: number, _flags: TruncateFlags): Promise<void> {
    const cs = this.clusterSize;
    for (const idx of [...this.#clusters.keys()]) {
      if (idx * cs >= length) this.#clusters.delete(idx);
    }
    const tail = this.#clusters.get(Math.floor(length / cs));
    if (tail instanceof Uint8Array) tail.fill(0, length % cs);
    this.#size = length;
  }

  protected override async _info(): Promise<BlockDriverInfo> {
    return { clusterSize: this.clusterSize, zeroInit: true };
  }
}

/** Options of the memory driver as QAPI members (`blockdev-add` with `driver: "x-blk-memory"`). */
export interface BlockdevOptionsMemory {
  size: number;
  "cluster-size": number;
  /** A backing node (name or inline options). */
  backing?: BlockdevRefOrNull;
}

/** What library callers may pass for {@link BlockdevOptionsMemory} (defaults optional). */
export interface BlockdevOptionsMemoryInput {
  size: number;
  "cluster-size"?: number;
  backing?: BlockdevRefOrNullInput;
}

/** QAPI schema of the memory driver's members. */
export const BlockdevOptionsMemory: ObjectType<BlockdevOptionsMemory, BlockdevOptionsMemoryInput> = q.object(
  {
    size: q.size(),
    "cluster-size": q.optional(q.size(), 65536),
    backing: q.optional(BlockdevRefOrNullSchema),
  },
  { name: "BlockdevOptionsXBlkMemory" },
);

const memorySchema: ArgsSchema<MemoryDriverOptions> = {
  parse(value: unknown): MemoryDriverOptions {
    const o = BlockdevOptionsMemory.parse(value);
    return { size: o.size, clusterSize: o["cluster-size"] };
  },
};

/**
 * The memory driver (format name `x-blk-memory`, a protocol driver; an optional `backing` child makes it
 * a layer of a backing chain).
 * @example
 * const node = await graph.open(memoryDriver, { size: 1 << 20 });
 */
export const memoryDriver: BlockDriver<MemoryDriverOptions> = {
  format: "x-blk-memory",
  kind: "protocol",
  schema: memorySchema,
  childOptions: [{ name: "backing" }],
  async open(options: MemoryDriverOptions, ctx: OpenContext): Promise<MemoryDriver> {
    return new MemoryDriver(options, ctx.children.get("backing"));
  },
};
