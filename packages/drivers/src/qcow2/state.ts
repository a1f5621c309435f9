/**
 * The open state of a qcow2 node: L1/L2 lookups through an LRU L2 cache, every cluster type (normal, zero
 * with and without allocation, unallocated, compressed, extended L2 subclusters), backing-file reads and
 * block status. Read-only: writes fail with EROFS.
 *
 * Reference: /work/shared/spec/qcow2.md §6 (cluster mapping), §7 (compressed clusters).
 */
import { stat } from "node:fs/promises";
import {
  BlkError,
  BlockDriverBase,
  type BlockDriverInfo,
  type BlockStatusExtent,
  type CheckResult,
  type Edge,
} from "@blk/core";
import { runCheck } from "./check.ts";
import { inflateCluster, zstdCluster } from "./compress.ts";
import {
  AUTOCLEAR_DATA_FILE_RAW,
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  COMPAT_LAZY_REFCOUNTS,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  type Qcow2Bitmap,
  type Qcow2Header,
  type Qcow2Snapshot,
} from "./format.ts";

// L1/L2 entry bits, as masks on the two 32-bit halves of the big-endian u64 (qcow2.txt "Cluster mapping").
/** L2 bit 63 (high half bit 31): COPIED. */
const L2E_COPIED_HI = 0x80000000;
/** L2 bit 62 (high half bit 30): COMPRESSED. */
const L2E_COMPRESSED_HI = 0x40000000;
/** L1/L2 offset bits 9-55: high half bits 0-23 ... */
const OFFSET_MASK_HI = 0x00ffffff;
/** ... and low half bits 9-31. */
const OFFSET_MASK_LO = 0xfffffe00;
/** L2 bit 0: reads as zeroes (v3, not with extended L2). */
const L2E_ZERO_LO = 0x1;

/** Kinds of a (sub)cluster, QEMU's `QCow2SubclusterType`. */
export const SC = {
  NORMAL: 0,
  COMPRESSED: 1,
  ZERO_PLAIN: 2,
  ZERO_ALLOC: 3,
  UNALLOCATED_PLAIN: 4,
  UNALLOCATED_ALLOC: 5,
  INVALID: 6,
} as const;
/** One of {@link SC}. */
export type SubclusterType = (typeof SC)[keyof typeof SC];

/** A mapped run of guest bytes of one kind. */
export interface Qcow2Run {
  type: SubclusterType;
  /** Guest bytes in the run (> 0). */
  bytes: number;
  /** Host offset of the first byte (normal / zero-alloc / unallocated-alloc). */
  host: number;
  /** Compressed: the L2 entry halves. */
  entryHi: number;
  entryLo: number;
}

const hex = (n: number): string => `0x${n.toString(16)}`;

/** Everything the state needs, produced by the driver's `open`. */
export interface Qcow2StateInit {
  header: Qcow2Header;
  file: Edge;
  backing: Edge | undefined;
  dataFile: Edge | undefined;
  /** The active L1 table (what `check` walks). */
  l1: Uint8Array;
  /** A snapshot being read instead of the active state (`x-blk-snapshot`). */
  view?: { snapshot: Qcow2Snapshot; l1: Uint8Array } | undefined;
  reftable: Uint8Array;
  snapshots: Qcow2Snapshot[];
  snapshotsSize: number;
  bitmaps: Qcow2Bitmap[];
  l2CacheEntries: number;
  readOnly: boolean;
}

/**
 * An open qcow2 image (read path). Reached through a {@link BlockNode}; public for tools (`info`,
 * `check`, `map`) that need the parsed metadata.
 */
export class Qcow2State extends BlockDriverBase {
  /** The parsed header and extensions. */
  readonly header: Qcow2Header;
  /** Internal snapshots. */
  readonly snapshots: readonly Qcow2Snapshot[];
  /** Persistent bitmaps (empty when the bitmaps extension is absent or inconsistent). */
  readonly bitmaps: readonly Qcow2Bitmap[];
  /** Cluster size in bytes. */
  readonly clusterSize: number;
  /** L2 cache capacity in tables. */
  readonly l2CacheEntries: number;
  readonly #file: Edge;
  readonly #backing: Edge | undefined;
  readonly #data: Edge;
  /** The snapshot being read, when opened with `x-blk-snapshot`. */
  readonly snapshot: Qcow2Snapshot | undefined;
  readonly #l1: DataView;
  readonly #activeL1: DataView;
  readonly #l1Size: number;
  readonly #size: number;
  readonly #reftable: Uint8Array;
  readonly #snapshotsSize: number;
  readonly #extL2: boolean;
  readonly #hasDataFile: boolean;
  readonly #clusterBits: number;
  readonly #l2Entries: number;
  readonly #entryBytes: number;
  readonly #perL2: number;
  readonly #scSize: number;
  readonly #csizeShift: number;
  readonly #cache = new Map<number, Promise<DataView>>();
  #lastCompressed: { hi: number; lo: number; data: Uint8Array } | undefined;
  #preallocChecked: Promise<boolean> | undefined;

  /** @internal Use the qcow2 driver's `open`. */
  constructor(init: Qcow2StateInit) {
    super({ requestAlignment: 1, maxTransfer: 0 });
    const h = init.header;
    this.header = h;
    this.snapshots = init.snapshots;
    this.bitmaps = init.bitmaps;
    this.#file = init.file;
    this.#backing = init.backing;
    this.#data = init.dataFile ?? init.file;
    this.#hasDataFile = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0;
    this.#activeL1 = new DataView(init.l1.buffer, init.l1.byteOffset, init.l1.length);
    const view = init.view;
    this.snapshot = view?.snapshot;
    const l1 = view?.l1 ?? init.l1;
    this.#l1 = new DataView(l1.buffer, l1.byteOffset, l1.length);
    this.#l1Size = view === undefined ? h.l1Size : view.snapshot.l1Size;
    this.#size = view === undefined ? h.size : view.snapshot.diskSize;
    this.#reftable = init.reftable;
    this.#snapshotsSize = init.snapshotsSize;
    this.#extL2 = (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0;
    this.#clusterBits = h.clusterBits;
    this.clusterSize = 2 ** h.clusterBits;
    this.#entryBytes = this.#extL2 ? 16 : 8;
    this.#l2Entries = this.clusterSize / this.#entryBytes;
    this.#perL2 = this.#l2Entries * this.clusterSize;
    this.#scSize = this.#extL2 ? this.clusterSize / 32 : this.clusterSize;
    this.#csizeShift = 62 - (h.clusterBits - 8);
    this.l2CacheEntries = init.l2CacheEntries;
  }

  /** Virtual size in bytes. */
  get size(): number {
    return this.#size;
  }
  /** The dirty bit (incompatible bit 0) is set: refcounts may be stale. */
  get dirty(): boolean {
    return (this.header.incompatibleFeatures & INCOMPAT_DIRTY) !== 0;
  }
  /** The corrupt bit (incompatible bit 1) is set. */
  get corrupt(): boolean {
    return (this.header.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0;
  }
  /**
   * What QEMU warns about on open: a bitmaps extension whose autoclear bit is clear (a program without
   * bitmap support wrote the image, so every bitmap is stale and ignored).
   */
  get warnings(): string[] {
    if (!this.header.bitmapsInconsistent) return [];
    return [
      this.header.version < 3
        ? "This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent"
        : "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent",
      "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.",
    ];
  }

  /** The backing file name stored in the image, if any. */
  get backingFilename(): string | undefined {
    return this.header.backingFile;
  }
  /** The backing format stored in the image (extension `0xe2792aca`), if any. */
  get backingFormat(): string | undefined {
    return this.header.backingFormat;
  }

  // ---- I/O helpers -------------------------------------------------------------------------------

  /** Reads from `edge` into `buf`; bytes past the end of the file read as zeroes. */
  async #pread(edge: Edge, offset: number, buf: Uint8Array): Promise<void> {
    if (offset + buf.length > Number.MAX_SAFE_INTEGER) {
      throw new BlkError("EIO", `Host offset ${hex(offset)} out of range`, { offset });
    }
    const len = edge.length;
    if (offset >= len) {
      buf.fill(0);
      return;
    }
    const n = Math.min(buf.length, len - offset);
    await edge.readInto(offset, n === buf.length ? buf : buf.subarray(0, n));
    if (n < buf.length) buf.fill(0, n);
  }

  /** `length` bytes of the image file at `offset` (zeroes past its end). */
  async readFile(offset: number, length: number): Promise<Uint8Array> {
    const b = new Uint8Array(length);
    await this.#pread(this.#file, offset, b);
    return b;
  }

  async #l2Table(l2Offset: number): Promise<DataView> {
    const c = this.#cache;
    const hit = c.get(l2Offset);
    if (hit !== undefined) {
      c.delete(l2Offset);
      c.set(l2Offset, hit);
      return hit;
    }
    const p = (async () => {
      const b = new Uint8Array(this.clusterSize);
      await this.#pread(this.#file, l2Offset, b);
      return new DataView(b.buffer);
    })();
    c.set(l2Offset, p);
    p.catch(() => c.delete(l2Offset));
    while (c.size > this.l2CacheEntries) {
      const oldest = c.keys().next().value;
      if (oldest === undefined) break;
      c.delete(oldest);
    }
    return p;
  }

  /**
   * Maps guest `[offset, offset+max)` to a run of one kind within one L2 table (QEMU
   * `qcow2_get_host_offset`). Normal runs are host-contiguous; compressed runs are one cluster.
   * @throws {BlkError} EIO on misaligned tables or clusters (QEMU's corruption messages)
   */
  async mapRun(offset: number, max: number): Promise<Qcow2Run> {
    const perL2 = this.#perL2;
    const l1Index = Math.floor(offset / perL2);
    const inL2 = offset - l1Index * perL2;
    let bytes = Math.min(max, perL2 - inL2);
    const unalloc: Qcow2Run = { type: SC.UNALLOCATED_PLAIN, bytes, host: 0, entryHi: 0, entryLo: 0 };
    if (l1Index >= this.#l1Size) return unalloc;
    const l1Hi = this.#l1.getUint32(l1Index * 8);
    const l1Lo = this.#l1.getUint32(l1Index * 8 + 4);
    const l2Offset = (l1Hi & OFFSET_MASK_HI) * 2 ** 32 + ((l1Lo & OFFSET_MASK_LO) >>> 0);
    if (l2Offset === 0) return unalloc;
    if (l2Offset % this.clusterSize !== 0) {
      throw new BlkError(
        "EIO",
        `qcow2: Image is corrupt: L2 table offset ${hex(l2Offset)} unaligned (L1 index: ${hex(l1Index)})`,
      );
    }
    const l2 = await this.#l2Table(l2Offset);
    const cs = this.clusterSize;
    const sc = this.#scSize;
    const eb = this.#entryBytes;
    let l2Index = Math.floor(inL2 / cs);
    let inCluster = inL2 - l2Index * cs;
    let scIndex = Math.floor(inCluster / sc);
    const first = this.#classify(l2, l2Index, scIndex);
    const eHi = l2.getUint32(l2Index * eb);
    const eLo = l2.getUint32(l2Index * eb + 4);
    const clusterHost = (eHi & OFFSET_MASK_HI) * 2 ** 32 + ((eLo & OFFSET_MASK_LO) >>> 0);
    const run: Qcow2Run = { type: first, bytes: 0, host: 0, entryHi: eHi, entryLo: eLo };
    if (first === SC.NORMAL || first === SC.ZERO_ALLOC || first === SC.UNALLOCATED_ALLOC) {
      if (clusterHost % cs !== 0) {
        throw new BlkError(
          "EIO",
          `qcow2: Image is corrupt: Cluster allocation offset ${hex(clusterHost)} unaligned (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(l2Index)})`,
        );
      }
      run.host = clusterHost + inCluster;
      if (this.#hasDataFile && run.host !== offset) {
        throw new BlkError(
          "EIO",
          `qcow2: Image is corrupt: External data file host cluster offset ${hex(clusterHost)} does not match guest cluster offset: ${hex(offset - inCluster)}, L2 index: ${hex(l2Index)})`,
        );
      }
    } else if (first === SC.COMPRESSED) {
      if (this.#hasDataFile) {
        throw new BlkError(
          "EIO",
          `qcow2: Image is corrupt: Compressed cluster entry found in image with external data file (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(l2Index)})`,
        );
      }
      run.bytes = Math.min(bytes, cs - inCluster);
      return run;
    } else if (first === SC.INVALID) {
      run.bytes = Math.min(bytes, sc - (inCluster % sc));
      return run;
    }
    // Extend the run over following subclusters/clusters of the same kind.
    let done = (scIndex + 1) * sc - inCluster;
    let expectHost = clusterHost + (scIndex + 1) * sc;
    while (done < bytes) {
      scIndex++;
      if (scIndex * sc >= cs) {
        l2Index++;
        scIndex = 0;
        inCluster = 0;
        if (l2Index >= this.#l2Entries) break;
      }
      const t = this.#classify(l2, l2Index, scIndex);
      if (t !== first) break;
      if (t === SC.NORMAL || t === SC.ZERO_ALLOC || t === SC.UNALLOCATED_ALLOC) {
        const hi = l2.getUint32(l2Index * eb);
        const lo = l2.getUint32(l2Index * eb + 4);
        const host = (hi & OFFSET_MASK_HI) * 2 ** 32 + ((lo & OFFSET_MASK_LO) >>> 0) + scIndex * sc;
        if (host !== expectHost) break;
        expectHost = host + sc;
      }
      done += sc;
    }
    bytes = Math.min(bytes, done);
    run.bytes = bytes;
    return run;
  }

  #classify(l2: DataView, index: number, scIndex: number): SubclusterType {
    const at = index * this.#entryBytes;
    const hi = l2.getUint32(at);
    const lo = l2.getUint32(at + 4);
    if ((hi & L2E_COMPRESSED_HI) !== 0) return SC.COMPRESSED;
    const hasOffset = (hi & OFFSET_MASK_HI) !== 0 || (lo & OFFSET_MASK_LO) !== 0;
    const allocated = hasOffset || (this.#hasDataFile && (hi & L2E_COPIED_HI) !== 0);
    if (!this.#extL2) {
      if ((lo & L2E_ZERO_LO) !== 0) return hasOffset ? SC.ZERO_ALLOC : SC.ZERO_PLAIN;
      return allocated ? SC.NORMAL : SC.UNALLOCATED_PLAIN;
    }
    // Extended L2: bitmap bits 0-31 (low half) allocated, bits 32-63 (high half) zero.
    const zeroBits = l2.getUint32(at + 8);
    const allocBits = l2.getUint32(at + 12);
    if (allocated) {
      if ((zeroBits & allocBits) !== 0) return SC.INVALID;
      if (((zeroBits >>> scIndex) & 1) !== 0) return SC.ZERO_ALLOC;
      if (((allocBits >>> scIndex) & 1) !== 0) return SC.NORMAL;
      return SC.UNALLOCATED_ALLOC;
    }
    if (allocBits !== 0) return SC.INVALID;
    if (((zeroBits >>> scIndex) & 1) !== 0) return SC.ZERO_PLAIN;
    return SC.UNALLOCATED_PLAIN;
  }

  /** Decompresses the cluster of a compressed L2 entry (the last one is kept for sequential reads). */
  async #decompressed(hi: number, lo: number): Promise<Uint8Array> {
    const last = this.#lastCompressed;
    if (last !== undefined && last.hi === hi && last.lo === lo) return last.data;
    // Descriptor (qcow2.txt "Compressed Clusters Descriptor"): bits 0..x-1 host byte offset,
    // bits x..61 additional 512-byte sectors, x = 62 - (cluster_bits - 8).
    const x = this.#csizeShift;
    const low = BigInt(hi & 0x3fffffff) * 2n ** 32n + BigInt(lo >>> 0);
    const offBig = low & ((1n << BigInt(x)) - 1n);
    const nbSectors = Number(low >> BigInt(x)) + 1;
    if (offBig > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new BlkError("EIO", `Compressed cluster offset ${offBig.toString(16)} out of range`);
    }
    const off = Number(offBig);
    const csize = nbSectors * 512 - (off % 512);
    const src = new Uint8Array(csize);
    await this.#pread(this.#file, off, src);
    const out = new Uint8Array(this.clusterSize);
    if (this.header.compressionType === 1) zstdCluster(src, out);
    else inflateCluster(src, out);
    this.#lastCompressed = { hi, lo, data: out };
    return out;
  }

  // ---- BlockDriverBase ---------------------------------------------------------------------------

  protected override async _read(offset: number, buf: Uint8Array): Promise<void> {
    let done = 0;
    const total = buf.length;
    while (done < total) {
      const pos = offset + done;
      const run = await this.mapRun(pos, total - done);
      const n = run.bytes;
      const part = buf.subarray(done, done + n);
      switch (run.type) {
        case SC.NORMAL:
          await this.#pread(this.#data, run.host, part);
          break;
        case SC.ZERO_PLAIN:
        case SC.ZERO_ALLOC:
          part.fill(0);
          break;
        case SC.UNALLOCATED_PLAIN:
        case SC.UNALLOCATED_ALLOC:
          await this.#readBacking(pos, part);
          break;
        case SC.COMPRESSED: {
          const data = await this.#decompressed(run.entryHi, run.entryLo);
          const inCluster = pos % this.clusterSize;
          part.set(data.subarray(inCluster, inCluster + n));
          break;
        }
        case SC.INVALID:
          throw new BlkError("EIO", "Input/output error", { offset: pos });
      }
      done += n;
    }
  }

  async #readBacking(pos: number, part: Uint8Array): Promise<void> {
    const b = this.#backing;
    if (b === undefined) {
      part.fill(0);
      return;
    }
    const blen = b.length;
    const n = Math.max(0, Math.min(part.length, blen - pos));
    if (n > 0) await b.readInto(pos, n === part.length ? part : part.subarray(0, n));
    if (n < part.length) part.fill(0, n);
  }

  protected override async _write(offset: number): Promise<void> {
    throw new BlkError("EROFS", "qcow2 images are read-only in this version of blk", { offset });
  }

  protected override async _writeZeroes(offset: number): Promise<void> {
    throw new BlkError("EROFS", "qcow2 images are read-only in this version of blk", { offset });
  }

  protected override async _discard(offset: number): Promise<void> {
    throw new BlkError("EROFS", "qcow2 images are read-only in this version of blk", { offset });
  }

  protected override async _flush(): Promise<void> {}

  /**
   * QEMU's metadata-preallocation heuristic (decided once): the image counts clearly more clusters in
   * use (non-zero refcount) than the host file has allocated — at least max(real * 10/9, real + 2)
   * with real = allocated bytes / cluster size. Then data clusters are looked up in the file too, so
   * preallocated clusters that are holes report as zero (QEMU's `BDRV_BLOCK_RECURSE`).
   */
  async #metadataPreallocated(): Promise<boolean> {
    this.#preallocChecked ??= (async () => {
      const allocated = await allocatedFileSize(this.#file);
      if (allocated === undefined) return false;
      const cs = this.clusterSize;
      const real = Math.floor(allocated / cs);
      const threshold = Math.max(Math.floor((real * 10) / 9), real + 2);
      const bits = 2 ** this.header.refcountOrder;
      const perBlock = (cs * 8) / bits;
      const end = Math.ceil(this.#file.length / cs);
      const rt = new DataView(this.#reftable.buffer, this.#reftable.byteOffset, this.#reftable.length);
      let count = 0;
      let block: Uint8Array | undefined;
      let blockIdx = -1;
      for (let i = 0; i < end && count < threshold; i++) {
        const idx = Math.floor(i / perBlock);
        if (idx * 8 >= this.#reftable.length) break;
        if (idx !== blockIdx) {
          blockIdx = idx;
          const hi = rt.getUint32(idx * 8);
          const lo = rt.getUint32(idx * 8 + 4) & OFFSET_MASK_LO;
          const off = hi * 2 ** 32 + (lo >>> 0);
          block = off === 0 || hi > 0x1fffff || off % cs !== 0 ? undefined : await this.readFile(off, cs);
        }
        if (block === undefined) continue;
        const j = i % perBlock;
        const bitPos = j * bits;
        let nonzero = false;
        for (let b = bitPos >>> 3; b < (bitPos + bits + 7) >>> 3; b++) {
          const byte = block[b] ?? 0;
          const v = bits < 8 ? (byte >>> (bitPos & 7)) & ((1 << bits) - 1) : byte;
          if (v !== 0) nonzero = true;
        }
        if (nonzero) count++;
      }
      return count >= threshold;
    })();
    return this.#preallocChecked;
  }

  protected override async _blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    const out: BlockStatusExtent[] = [];
    const prealloc = await this.#metadataPreallocated();
    let done = 0;
    // A few runs per call are enough: the node asks again for the rest.
    while (done < bytes && out.length < 64) {
      const pos = offset + done;
      const run = await this.mapRun(pos, bytes - done);
      const e: BlockStatusExtent = {
        offset: pos,
        length: run.bytes,
        data: false,
        zero: false,
        allocated: true,
      };
      switch (run.type) {
        case SC.NORMAL:
          e.data = true;
          e.hostOffset = run.host;
          break;
        case SC.COMPRESSED:
          e.data = true;
          break;
        case SC.ZERO_ALLOC:
          e.zero = true;
          e.hostOffset = run.host;
          break;
        case SC.ZERO_PLAIN:
          e.zero = true;
          break;
        case SC.UNALLOCATED_PLAIN:
          e.allocated = false;
          break;
        case SC.UNALLOCATED_ALLOC:
          // Extended L2: the cluster has a host offset but this subcluster reads from below.
          e.allocated = false;
          e.hostOffset = run.host;
          break;
        case SC.INVALID:
          throw new BlkError("EIO", "Input/output error", { offset: pos });
      }
      if (prealloc && run.type === SC.NORMAL) await this.#recurse(e);
      out.push(e);
      done += e.length;
    }
    return out;
  }

  /** Asks the data file whether a preallocated data extent is a hole (QEMU's recursion into `file`). */
  async #recurse(e: BlockStatusExtent): Promise<void> {
    const host = e.hostOffset ?? 0;
    const len = this.#data.length;
    if (host >= len) {
      e.zero = true;
      return;
    }
    const fx = (await this.#data.blockStatus(host, Math.min(e.length, len - host)))[0];
    if (fx === undefined) return;
    const reachesEof = host + fx.length >= len;
    if (reachesEof && fx.zero) {
      e.zero = true;
      return;
    }
    e.length = Math.min(e.length, fx.length);
    if (fx.zero) e.zero = true;
  }

  protected override async _getLength(): Promise<number> {
    return this.#size;
  }

  protected override async _info(): Promise<BlockDriverInfo> {
    return {
      clusterSize: this.clusterSize,
      zeroInit: true,
      formatSpecific: this.formatSpecific(),
    };
  }

  /** QEMU's `ImageInfoSpecificQCow2` (the `format-specific.data` of `qemu-img info`). */
  formatSpecific(): Record<string, unknown> {
    const h = this.header;
    const compressionType = h.compressionType === 1 ? "zstd" : "zlib";
    if (h.version === 2) {
      return { compat: "0.10", "compression-type": compressionType, "refcount-bits": 2 ** h.refcountOrder };
    }
    const data: Record<string, unknown> = {
      compat: "1.1",
      "compression-type": compressionType,
      "lazy-refcounts": (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0,
      "refcount-bits": 2 ** h.refcountOrder,
      corrupt: this.corrupt,
      "extended-l2": this.#extL2,
    };
    if (this.bitmaps.length > 0) {
      data.bitmaps = this.bitmaps.map((b) => {
        const flags: string[] = [];
        if ((b.flags & BME_FLAG_IN_USE) !== 0) flags.push("in-use");
        if ((b.flags & BME_FLAG_AUTO) !== 0) flags.push("auto");
        return { flags, name: b.name, granularity: 2 ** b.granularityBits };
      });
    }
    if (h.dataFile !== undefined) data["data-file"] = h.dataFile;
    if (this.#hasDataFile) data["data-file-raw"] = (h.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0;
    return data;
  }

  /**
   * Reads the stored data of persistent bitmap `name` (qcow2.txt "Bitmap data"): bit k covers guest bytes
   * `[k * g, (k+1) * g)` with g = 2^granularity_bits, bits LSB-first within each byte. Table entries
   * without a data cluster read as all zeroes, or all ones when their bit 0 is set.
   * @throws {BlkError} ENOENT for an unknown bitmap; EIO for an invalid bitmap table
   */
  async readBitmap(name: string): Promise<{ granularity: number; bits: number; data: Uint8Array }> {
    const bm = this.bitmaps.find((b) => b.name === name);
    if (bm === undefined) throw new BlkError("ENOENT", `Bitmap '${name}' not found`);
    const granularity = 2 ** bm.granularityBits;
    const bits = Math.ceil(this.size / granularity);
    const bytes = Math.ceil(bits / 8);
    const cs = this.clusterSize;
    const need = Math.ceil(bytes / cs);
    if (need > bm.tableSize) throw new BlkError("EIO", `Bitmap '${name}' table is too small`);
    const table = await this.readFile(bm.tableOffset, need * 8);
    const tv = new DataView(table.buffer, table.byteOffset, table.length);
    const data = new Uint8Array(bytes);
    for (let i = 0; i < need; i++) {
      const hi = tv.getUint32(i * 8);
      const lo = tv.getUint32(i * 8 + 4);
      const off = (hi & OFFSET_MASK_HI) * 2 ** 32 + ((lo & OFFSET_MASK_LO) >>> 0);
      // reserved bits 1-8 and 56-63 must be clear; bit 0 ("all ones") only without a data cluster
      if (
        (hi & 0xff000000) !== 0 ||
        (lo & 0x1fe) !== 0 ||
        (off !== 0 && ((lo & 1) !== 0 || off % cs !== 0))
      ) {
        throw new BlkError("EIO", `Bitmap '${name}' has an invalid table entry`);
      }
      const part = data.subarray(i * cs, Math.min(bytes, (i + 1) * cs));
      if (off !== 0) part.set((await this.readFile(off, cs)).subarray(0, part.length));
      else if ((lo & 1) !== 0) part.fill(0xff);
    }
    // bits past the end of the image are not part of the bitmap
    if (bits % 8 !== 0 && bytes > 0) data[bytes - 1] = (data[bytes - 1] ?? 0) & ((1 << (bits % 8)) - 1);
    return { granularity, bits, data };
  }

  /** QEMU's `SnapshotInfo` list (the `snapshots` of `qemu-img info`). */
  snapshotInfo(): Record<string, unknown>[] {
    return this.snapshots.map((s) => {
      const o: Record<string, unknown> = {
        id: s.id,
        name: s.name,
        "vm-state-size": s.vmStateSize,
        "date-sec": s.dateSec,
        "date-nsec": s.dateNsec,
        "vm-clock-sec": Math.floor(s.vmClockNsec / 1e9),
        "vm-clock-nsec": s.vmClockNsec % 1e9,
      };
      if (s.icount !== undefined) o.icount = s.icount;
      return o;
    });
  }

  protected override async _check(options: { repair?: "leaks" | "all" }): Promise<Qcow2CheckResult> {
    if (options.repair !== undefined) {
      throw new BlkError("EROFS", "qcow2 repair is not supported in this version of blk");
    }
    return runCheck({
      header: this.header,
      fileLength: this.#file.length,
      l1: this.#activeL1,
      reftable: this.#reftable,
      snapshots: this.snapshots,
      snapshotsSize: this.#snapshotsSize,
      bitmaps: this.bitmaps,
      hasDataFile: this.#hasDataFile,
      read: (o, n) => this.readFile(o, n),
    });
  }

  protected override async _close(): Promise<void> {
    this.#cache.clear();
    this.#lastCompressed = undefined;
  }
}

/**
 * Bytes the host file really occupies (`st_blocks * 512`), when the `file` child is a file node;
 * undefined otherwise (no metadata-preallocation detection, as QEMU when the size is unknown).
 */
async function allocatedFileSize(file: Edge): Promise<number | undefined> {
  let state: unknown;
  try {
    state = file.child.state;
  } catch {
    return undefined;
  }
  const name = (state as { filename?: unknown }).filename;
  if (file.child.driver.format !== "file" || typeof name !== "string") return undefined;
  try {
    const st = await stat(name);
    return st.blocks * 512;
  } catch {
    return undefined;
  }
}

/** `qemu-img check` numbers for qcow2, plus the problem lines QEMU prints on stderr. */
export interface Qcow2CheckResult extends CheckResult {
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /** One line per problem, worded as qemu-img prints them. */
  messages: string[];
}
