/**
 * The open state of a qcow2 node: L1/L2 lookups through an LRU L2 cache, every cluster type (normal, zero
 * with and without allocation, unallocated, compressed, extended L2 subclusters), backing-file reads and
 * block status. Opened read-write, it also writes (write path: see the "write path" section below):
 * allocating writes with QEMU's crash-safe ordering, zero clusters, discard, copy on write of clusters
 * and L2 tables shared with internal snapshots (COPIED clear), compressed writes; and it creates,
 * applies and deletes internal snapshots (section "internal snapshots").
 *
 * Reference: /work/shared/spec/qcow2.md §6 (cluster mapping), §7 (compressed clusters), §8 (refcounts),
 * §9 (crash-safe ordering), §10 (dirty bit, lazy refcounts), §11 (internal snapshots).
 */
import { stat } from "node:fs/promises";
import { deflateRawSync } from "node:zlib";
import {
  BlkError,
  BlockDriverBase,
  type BlockDriverInfo,
  type BlockStatusExtent,
  type CheckResult,
  type DirtyBitmap,
  type Edge,
  PERM,
  type PersistentBitmap,
  strerror,
  type TruncateFlags,
  type WriteFlags,
  type ZeroFlags,
} from "@blk/core";
import {
  BITMAPS_EXT_MAGIC,
  bitmapConstraintError,
  bitmapDataClusters,
  bitmapTableEntries,
  checkCanStoreBitmap,
  decodeBitmapTable,
  encodeBitmapDirectory,
  encodeBitmapsExtension,
  encodeBitmapTable,
  readBitmapData,
} from "./bitmaps.ts";
import { type CheckFixer, type CheckInput, runCheck } from "./check.ts";
import { inflateCluster, zstdCluster } from "./compress.ts";
import { setRefcount } from "./create.ts";
import {
  AUTOCLEAR_DATA_FILE_RAW,
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  COMPAT_LAZY_REFCOUNTS,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  MAX_L1_BYTES,
  MAX_REFTABLE_BYTES,
  type Qcow2Bitmap,
  type Qcow2Header,
  type Qcow2Snapshot,
  rewriteBackingHeader,
  rewriteHeaderExtension,
  serializeSnapshots,
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
/** L1 bit 63 (high half bit 31): COPIED (refcount exactly 1). */
const L1E_COPIED_HI = 0x80000000;
/** Offset of `incompatible_features` in the header. */
const HEADER_INCOMPAT_AT = 72;
/** Most clusters one allocating write request allocates at once (bounds one refcount flush's work). */
const MAX_BATCH_CLUSTERS = 1024;
/**
 * Most L2 entries linked in memory before they are written out (with their refcounts and one flush first):
 * bounds what a crash can leave leaked and the memory the pending maps take.
 */
const MAX_PENDING_ENTRIES = 65536;
/** Most bytes of cluster buffers kept for reuse by allocating writes (#clusterBuffer). */
const BUFFER_POOL_BYTES = 4 << 20;
/** Offset of `autoclear_features` in the header. */
const HEADER_AUTOCLEAR_AT = 88;
/** Autoclear bit 0: the bitmaps extension is consistent. */
const AUTOCLEAR_BITMAPS = 0x1;

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

/** C's `%#x`: `0x`-prefixed hex, except 0 (as QEMU's messages print it). */
const hex = (n: number): string => (n === 0 ? "0" : `0x${n.toString(16)}`);
const asError = (e: unknown): Error => (e instanceof Error ? e : new Error(String(e)));

/** An allocating write waiting for the metadata lock: the group leader sets `bytes` or `error`. */
interface AllocRequest {
  pos: number;
  data: Uint8Array;
  bytes: number | undefined;
  error: Error | undefined;
  /** Set when the request's batch was committed: settles once its data is written and its entries linked. */
  done?: Promise<void>;
}

/**
 * The pending (linked in memory, not written yet) L2 entries of one table: the entries' bytes as they go
 * to the file at their place in a table-sized buffer, which indexes are set, and their span.
 */
interface PendingTable {
  bytes: Uint8Array;
  view: DataView;
  set: Uint8Array;
  count: number;
  min: number;
  max: number;
}

/** A guest cluster an allocating batch writes. */
interface BatchCluster {
  l2Offset: number;
  l2Index: number;
  /** The cluster's bytes from `at` on: the whole cluster, or (`at` > 0 or shorter) only the bytes written. */
  buf: Uint8Array;
  /** Where `buf` starts in the cluster; with a partial `buf`, every other byte of the cluster is zero. */
  at: number;
  /** `buf` is the batch's own copy (else a view of a request's data). */
  owned: boolean;
}

/** Guest clusters one group commit allocates, by guest offset. */
interface AllocBatch {
  clusters: Map<number, BatchCluster>;
  requests: AllocRequest[];
}

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
 * An open qcow2 image (reads; writes when opened read-write). Reached through a {@link BlockNode};
 * public for tools (`info`, `check`, `map`) that need the parsed metadata.
 */
export class Qcow2State extends BlockDriverBase {
  /** The parsed header and extensions. */
  readonly header: Qcow2Header;
  #snapshots: Qcow2Snapshot[];
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
  /** The L1 table reads go through (the active one, or a snapshot's); replaced when it grows. */
  #l1: DataView;
  /** The active L1 table (replaced when it grows). */
  #activeL1: DataView;
  #l1Size: number;
  #size: number;
  /** The reftable (replaced when it grows). */
  #reftable: Uint8Array;
  #snapshotsSize: number;
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
  #readOnly: boolean;
  /** Refcount blocks read or written so far, by reftable index (write path; kept in sync with the file). */
  readonly #refblocks = new Map<number, Uint8Array>();
  readonly #refBits: number;
  readonly #perRefblock: number;
  /** Lowest cluster index that may be free (QEMU's first-fit hint). */
  #freeHint = 0;
  /** Tail of the metadata lock: allocation, L1/L2 and refcount updates are serialised on it. */
  #lockTail: Promise<void> = Promise.resolve();
  /** This state set the dirty bit (lazy refcounts) and must clear it on clean close. */
  #markedDirty = false;
  /** In-place data writes in flight: a discard waits for those started before it frees a cluster. */
  readonly #inPlace = new Set<Promise<void>>();
  /** Snapshot operations running or waiting (each settles when it ends): in-place writes wait for them. */
  readonly #snapshotOps = new Set<Promise<void>>();
  /** Allocating writes waiting for the metadata lock (group commit). */
  readonly #allocQueue: AllocRequest[] = [];
  /**
   * L2 entries of newly allocated clusters linked in memory but not written yet, by table then index: they
   * reach the file after a flush made their refcounts and data stable (see #flushPending).
   */
  readonly #pendingL2 = new Map<number, PendingTable>();
  #pendingCount = 0;
  /**
   * Guest clusters of committed batches whose data writes are still running (they run outside the metadata
   * lock): each promise settles once the cluster's entry is linked (or the batch failed).
   */
  readonly #inflight = new Map<number, Promise<void>>();
  /** {@link Qcow2State.whenPlaced} callers waiting for a guest cluster to get its host cluster. */
  readonly #placeWaiters = new Map<number, (() => void)[]>();
  /**
   * Refcount increments of the pending entries' clusters made in memory but not written yet: byte range
   * `[from, to)` of each refcount block (by reftable index). #flushPending writes them before its flush.
   */
  readonly #pendingRefs = new Map<number, [number, number]>();
  /** Something was written to the file since its last flush. */
  #unflushed = false;
  /** Counts file writes starting and ending (a flush clears #unflushed only when none did meanwhile). */
  #writeEvents = 0;
  /**
   * End of the furthest write issued to the file (#fileWrite) so far: no byte at or past
   * max(this, the file's length) was ever written, so a cluster allocated there reads as zeroes.
   */
  #writeEnd = 0;
  /** Cluster-sized buffers of ended batch writes, for #clusterBuffer. */
  readonly #bufferPool: Uint8Array[] = [];
  /** Whole-cluster writes into unallocated clusters are stored compressed (`qemu-img convert -c`). */
  #compress = false;
  /** Where the next compressed cluster may go (QEMU's `free_byte_offset`; 0: a new host cluster). */
  #freeByteOffset = 0;
  /** The first modifying request's header update (unknown autoclear bits cleared), once. */
  #prepared: Promise<void> | undefined;
  /** #prepared has succeeded (requests skip awaiting it). */
  #isPrepared = false;

  /** @internal Use the qcow2 driver's `open`. */
  constructor(init: Qcow2StateInit) {
    super({ requestAlignment: 1, maxTransfer: 0 });
    const h = init.header;
    this.header = h;
    this.#snapshots = init.snapshots;
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
    this.#readOnly = init.readOnly;
    this.#refBits = 2 ** h.refcountOrder;
    this.#perRefblock = (this.clusterSize * 8) / this.#refBits;
  }

  /** Internal snapshots. */
  get snapshots(): readonly Qcow2Snapshot[] {
    return this.#snapshots;
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

  /** The L2 table at `l2Offset` through the cache (a plain function: a hit costs no extra promise). */
  #l2Table(l2Offset: number): Promise<DataView> {
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
      const v = new DataView(b.buffer);
      // Entries linked but not written yet (group commit) are part of the table.
      const pt = this.#pendingL2.get(l2Offset);
      if (pt !== undefined) {
        for (let i = pt.min; i <= pt.max; i++) {
          if (pt.set[i] !== 0) b.set(pt.bytes.subarray(i * 8, i * 8 + 8), i * 8);
        }
      }
      return v;
    })();
    c.set(l2Offset, p);
    p.catch(() => c.delete(l2Offset));
    while (c.size > this.l2CacheEntries) {
      // The least recently used table without pending entries (those stay until written).
      let victim: number | undefined;
      for (const k of c.keys()) {
        if (!this.#pendingL2.has(k)) {
          victim = k;
          break;
        }
      }
      if (victim === undefined) break;
      c.delete(victim);
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
      throw await this.#corruption(`L2 table offset ${hex(l2Offset)} unaligned (L1 index: ${hex(l1Index)})`);
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
        throw await this.#corruption(
          `Cluster allocation offset ${hex(clusterHost)} unaligned (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(l2Index)})`,
        );
      }
      run.host = clusterHost + inCluster;
      if (this.#hasDataFile && run.host !== offset) {
        throw await this.#corruption(
          `External data file host cluster offset ${hex(clusterHost)} does not match guest cluster offset: ${hex(offset - inCluster)}, L2 index: ${hex(l2Index)})`,
        );
      }
    } else if (first === SC.COMPRESSED) {
      if (this.#hasDataFile) {
        throw await this.#corruption(
          `Compressed cluster entry found in image with external data file (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(l2Index)})`,
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

  /**
   * Called when metadata is found inconsistent at run time (QEMU's `BLOCK_IMAGE_CORRUPTED` event: `fatal`
   * when the image was writable and is now marked corrupt).
   */
  onCorruption: ((e: { message: string; fatal: boolean }) => void) | undefined;
  /** A fatal corruption was signalled: every later request fails (QEMU drops the driver). */
  #gone = false;
  #corruptionSignalled = false;

  /**
   * QEMU's `qcow2_signal_corruption`: on a writable image the corrupt bit is set (write + flush) and the
   * node stops serving requests; on a read-only one only this request fails. Returns the request's error.
   */
  async #corruption(message: string): Promise<BlkError> {
    if (this.#readOnly) {
      if (!this.#corruptionSignalled) this.onCorruption?.({ message, fatal: false });
      this.#corruptionSignalled = true;
      return new BlkError(
        "EIO",
        `qcow2: Image is corrupt: ${message}; further non-fatal corruption events will be suppressed`,
      );
    }
    if (!this.#gone) {
      this.#gone = true;
      this.onCorruption?.({ message, fatal: true });
      if (!this.corrupt) {
        this.header.incompatibleFeatures = (this.header.incompatibleFeatures | INCOMPAT_CORRUPT) >>> 0;
        try {
          await this.#writeIncompat();
        } catch {
          // The image is unusable either way; the bit is best effort, as in QEMU.
        }
      }
    }
    return new BlkError(
      "EIO",
      `qcow2: Marking image as corrupt: ${message}; further corruption events will be suppressed`,
    );
  }

  /** After a fatal corruption: QEMU's "No medium found" for every request. */
  #checkMedium(offset: number): void {
    if (this.#gone) throw new BlkError("ENOMEDIUM", "No medium found", { offset });
  }

  // ---- BlockDriverBase ---------------------------------------------------------------------------

  protected override async _read(offset: number, buf: Uint8Array): Promise<void> {
    this.#checkMedium(offset);
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

  // ---- write path --------------------------------------------------------------------------------
  //
  // Metadata is written through, except for allocating writes into unallocated or plain zero clusters:
  // every ordering rule of qcow2.md §9 becomes an explicit write followed by a flush of the file.
  // Allocation, L1/L2 entry and refcount updates run one at a time under #locked, and the mapping is
  // looked up again under the lock (after any batch still writing the same clusters has linked them), so
  // two requests touching the same unallocated cluster never allocate it twice (the second one writes in
  // place). Allocating writes are written back (group commit, below): their refcounts and L2 entries stay
  // in memory until a flush, a close, a reopen to read-only, another metadata change or a size limit;
  // then one flush covers all of their refcounts and data before any of their L2 entries is written.

  /** Runs `fn` with the metadata lock held. */
  async #locked<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.#lockTail;
    let release: () => void = () => {};
    this.#lockTail = new Promise<void>((r) => {
      release = r;
    });
    await prev;
    try {
      return await fn();
    } finally {
      release();
    }
  }

  /**
   * Refuses writes this version cannot do safely.
   * @throws {BlkError} EROFS read-only or snapshot view; ENOTSUP for extended L2, external data files
   *   and persistent bitmaps
   */
  #checkWritable(offset: number): void {
    this.#checkMedium(offset);
    if (this.#readOnly || this.snapshot !== undefined) {
      throw new BlkError("EROFS", "qcow2: the image is open read-only", { offset });
    }
    const no = (what: string): BlkError =>
      new BlkError(
        "ENOTSUP",
        `qcow2: writing to images with ${what} is not supported in this version of blk`,
        {
          offset,
        },
      );
    if (this.#extL2) throw no("extended L2 entries");
    if (this.#hasDataFile) throw no("an external data file");
    if (this.#bmUnmarked()) throw no("persistent bitmaps that no node loaded");
  }

  /**
   * Before the first change: clears autoclear bits blk does not know (qcow2.md §3.3: a writer must), with
   * a write + flush of the 8-byte field.
   */
  #prepare(): Promise<void> {
    this.#prepared ??= (async () => {
      const h = this.header;
      const known = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;
      if ((h.autoclearFeatures & ~known) === 0) return;
      h.autoclearFeatures = (h.autoclearFeatures & known) >>> 0;
      const b = new Uint8Array(8);
      new DataView(b.buffer).setUint32(4, h.autoclearFeatures);
      await this.#fileWrite(HEADER_AUTOCLEAR_AT, b);
      await this.#fileFlush();
    })();
    void this.#prepared.then(
      () => {
        this.#isPrepared = true;
      },
      () => {},
    );
    return this.#prepared;
  }

  async #fileWrite(offset: number, data: Uint8Array): Promise<void> {
    this.#unflushed = true;
    this.#writeEvents++;
    if (offset + data.length > this.#writeEnd) this.#writeEnd = offset + data.length;
    try {
      await this.#file.write(offset, data);
    } finally {
      // A flush running meanwhile may not cover this write (data writes run outside the metadata lock).
      this.#writeEvents++;
    }
  }

  async #fileFlush(): Promise<void> {
    const mark = this.#writeEvents;
    await this.#file.flush();
    // Stable now, unless a write started or ended while the flush ran.
    if (this.#writeEvents === mark) this.#unflushed = false;
  }

  /** Writes `incompatible_features` (8 bytes at 72) with a flush. */
  async #writeIncompat(): Promise<void> {
    const b = new Uint8Array(8);
    const v = new DataView(b.buffer);
    v.setUint32(0, this.header.incompatibleHigh);
    v.setUint32(4, this.header.incompatibleFeatures);
    await this.#fileWrite(HEADER_INCOMPAT_AT, b);
    await this.#fileFlush();
  }

  /** Lazy refcounts: sets the dirty bit (write + flush) before the first allocating change. */
  async #markDirty(): Promise<void> {
    if ((this.header.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) === 0 || this.dirty) return;
    this.header.incompatibleFeatures = (this.header.incompatibleFeatures | INCOMPAT_DIRTY) >>> 0;
    await this.#writeIncompat();
    this.#markedDirty = true;
  }

  /** Refcount block `index` of the reftable, or undefined when the entry is 0 (all refcounts 0). */
  async #refblock(index: number): Promise<Uint8Array | undefined> {
    const hit = this.#refblocks.get(index);
    if (hit !== undefined) return hit;
    const rt = new DataView(this.#reftable.buffer, this.#reftable.byteOffset, this.#reftable.length);
    const hi = rt.getUint32(index * 8);
    const lo = rt.getUint32(index * 8 + 4) & OFFSET_MASK_LO;
    const off = hi * 2 ** 32 + (lo >>> 0);
    if (off === 0) return undefined;
    if (hi > 0x1fffff || off % this.clusterSize !== 0) {
      throw await this.#corruption(`Refblock offset ${hex(off)} unaligned (reftable index: ${hex(index)})`);
    }
    const block = await this.readFile(off, this.clusterSize);
    this.#refblocks.set(index, block);
    return block;
  }

  #refcountIn(block: Uint8Array, i: number): number {
    const bits = this.#refBits;
    if (bits < 8) return ((block[(i * bits) >>> 3] ?? 0) >>> ((i * bits) & 7)) & ((1 << bits) - 1);
    const bytes = bits / 8;
    let n = 0;
    for (let k = 0; k < bytes; k++) n = n * 256 + (block[i * bytes + k] ?? 0);
    return n;
  }

  /** Writes the bytes of refcount entry `i` of block `index` (already changed in memory) to the file. */
  async #writeRefEntry(index: number, block: Uint8Array, i: number): Promise<void> {
    const rt = new DataView(this.#reftable.buffer, this.#reftable.byteOffset, this.#reftable.length);
    const off = rt.getUint32(index * 8) * 2 ** 32 + ((rt.getUint32(index * 8 + 4) & OFFSET_MASK_LO) >>> 0);
    const bits = this.#refBits;
    const first = bits < 8 ? (i * bits) >>> 3 : (i * bits) / 8;
    const n = bits < 8 ? 1 : bits / 8;
    await this.#fileWrite(off + first, block.slice(first, first + n));
  }

  /**
   * First cluster index at or after the hint with refcount 0 (the reftable grows when every cluster it
   * covers is in use). @throws {BlkError} EFBIG when the reftable would exceed QEMU's 8 MiB limit
   */
  async #findFree(): Promise<number> {
    const per = this.#perRefblock;
    let c = this.#freeHint;
    for (;;) {
      const index = Math.floor(c / per);
      if (index >= this.#reftable.length / 8) await this.#growReftable();
      const block = await this.#refblock(index);
      if (block === undefined) return c;
      for (let i = c - index * per; i < per; i++, c++) if (this.#refcountIn(block, i) === 0) return c;
    }
  }

  /**
   * Allocates one cluster (first fit) and returns its host offset. Its refcount is 1 on disk (flushed,
   * unless lazy refcounts are in use or `flush` is false) before the caller makes anything point to it
   * (rule R1).
   */
  async #allocCluster(flush = true): Promise<number> {
    const per = this.#perRefblock;
    const c = await this.#findRun(1);
    const index = Math.floor(c / per);
    const block = await this.#refblock(index);
    if (block === undefined) throw new BlkError("EIO", `qcow2: no refcount block for cluster ${hex(c)}`);
    setRefcount(block, this.#refBits, c - index * per, 1);
    await this.#writeRefEntry(index, block, c - index * per);
    if (flush && !this.dirty) await this.#fileFlush();
    return c * this.clusterSize;
  }

  /**
   * Allocates `count` clusters (first fit, one by one as #allocCluster would) for pending L2 entries: their
   * refcounts become 1 in memory only; #flushPending writes each touched range of a refcount block once,
   * and flushes, before it writes any L2 entry (R1). Returns their host offsets.
   */
  async #allocPending(count: number): Promise<number[]> {
    const per = this.#perRefblock;
    const bits = this.#refBits;
    const hosts: number[] = [];
    // The pending range of the refcount block the last cluster was in (the next one usually is too).
    let rIndex = -1;
    let r: [number, number] | undefined;
    for (let k = 0; k < count; k++) {
      // Usually the hint is free and its refcount block loaded: no search.
      let c = this.#freeHint;
      let index = Math.floor(c / per);
      let block = index < this.#reftable.length / 8 ? this.#refblocks.get(index) : undefined;
      if (block !== undefined && this.#refcountIn(block, c - index * per) === 0) {
        this.#freeHint = c + 1;
      } else {
        c = await this.#findRun(1);
        index = Math.floor(c / per);
        block = this.#refblocks.get(index) ?? (await this.#refblock(index));
        rIndex = -1;
      }
      if (block === undefined) throw new BlkError("EIO", `qcow2: no refcount block for cluster ${hex(c)}`);
      const i = c - index * per;
      setRefcount(block, bits, i, 1);
      const from = bits < 8 ? (i * bits) >>> 3 : (i * bits) / 8;
      const to = from + (bits < 8 ? 1 : bits / 8);
      if (index !== rIndex || r === undefined) {
        r = this.#pendingRefs.get(index);
        rIndex = index;
        if (r === undefined) {
          r = [from, to];
          this.#pendingRefs.set(index, r);
        }
      }
      if (from < r[0]) r[0] = from;
      if (to > r[1]) r[1] = to;
      hosts.push(c * this.clusterSize);
    }
    return hosts;
  }

  /** Writes the refcount ranges #allocPending changed in memory (no flush). */
  async #writePendingRefs(): Promise<void> {
    if (this.#pendingRefs.size === 0) return;
    const rt = new DataView(this.#reftable.buffer, this.#reftable.byteOffset, this.#reftable.length);
    const ranges = [...this.#pendingRefs].sort((a, b) => a[0] - b[0]);
    const results = await Promise.allSettled(
      ranges.map(async ([index, [from, to]]) => {
        const block = this.#refblocks.get(index);
        if (block === undefined) return;
        const off =
          rt.getUint32(index * 8) * 2 ** 32 + ((rt.getUint32(index * 8 + 4) & OFFSET_MASK_LO) >>> 0);
        await this.#fileWrite(off + from, block.slice(from, to));
      }),
    );
    // A range whose write failed stays pending (its L2 entries are not written before it is).
    for (const [k, r] of results.entries()) {
      const index = ranges[k]?.[0];
      if (r.status === "fulfilled" && index !== undefined) this.#pendingRefs.delete(index);
    }
    for (const r of results) if (r.status === "rejected") throw r.reason;
  }

  /**
   * The first run of `n` free clusters at or after the hint (QEMU's first fit: the hint then moves past
   * the run, skipping holes too small for it). Ranges of the run without a refcount block get one, placed
   * as QEMU places them: at the first free cluster after the run when that cluster is in the range
   * (self-describing), else at the range's first cluster in the run (and the search goes on after it);
   * each block written and flushed before the reftable entry that points to it. The reftable grows when
   * the run reaches past what it covers.
   */
  async #findRun(n: number): Promise<number> {
    const per = this.#perRefblock;
    let c = await this.#findFree();
    for (;;) {
      const missing: number[] = [];
      let k = 0;
      let grown = false;
      for (; k < n; k++) {
        const index = Math.floor((c + k) / per);
        if (index >= this.#reftable.length / 8) {
          // The new refcount structures take the first uncovered clusters: look again from c.
          await this.#growReftable();
          grown = true;
          break;
        }
        const block = await this.#refblock(index);
        if (block === undefined) {
          if (!missing.includes(index)) missing.push(index);
          continue;
        }
        if (this.#refcountIn(block, c + k - index * per) !== 0) break;
      }
      if (grown) continue;
      if (k < n) {
        c += k + 1;
        continue;
      }
      let next = c + n;
      let placed = true;
      for (const index of missing) {
        const at = await this.#firstFreeFrom(next);
        if (Math.floor(at / per) !== index) {
          placed = false;
          break;
        }
        await this.#newRefblock(at);
        next = at + 1;
      }
      if (placed) {
        this.#freeHint = Math.max(c + n, next);
        return c;
      }
      for (k = 0; k < n; k++) if ((await this.#refblock(Math.floor((c + k) / per))) === undefined) break;
      await this.#newRefblock(c + k);
      c += k + 1;
    }
  }

  /** First cluster at or after `c` with refcount 0 (no refcount block or past the reftable: 0). */
  async #firstFreeFrom(c: number): Promise<number> {
    const per = this.#perRefblock;
    for (;;) {
      const index = Math.floor(c / per);
      if (index >= this.#reftable.length / 8) return c;
      const block = await this.#refblock(index);
      if (block === undefined) return c;
      for (let i = c - index * per; i < per; i++, c++) if (this.#refcountIn(block, i) === 0) return c;
    }
  }

  /**
   * Places a new refcount block for the range of cluster `c` at `c` itself (self-describing, refcount 1),
   * written and flushed before the reftable entry that points to it.
   */
  async #newRefblock(c: number): Promise<void> {
    const cs = this.clusterSize;
    const index = Math.floor(c / this.#perRefblock);
    const fresh = new Uint8Array(cs);
    setRefcount(fresh, this.#refBits, c - index * this.#perRefblock, 1);
    await this.#fileWrite(c * cs, fresh);
    await this.#fileFlush();
    const e = new Uint8Array(8);
    const ev = new DataView(e.buffer);
    ev.setUint32(0, Math.floor((c * cs) / 2 ** 32));
    ev.setUint32(4, (c * cs) >>> 0);
    await this.#fileWrite(this.header.refcountTableOffset + index * 8, e);
    await this.#fileFlush();
    this.#reftable.set(e, index * 8);
    this.#refblocks.set(index, fresh);
  }

  /**
   * Grows the reftable (QEMU `qcow2_refcount_area`, rule R6). Every cluster the current table can describe
   * is in use, so the new structures go right after them, at the first uncovered cluster S: k refcount
   * blocks (describing S onwards, themselves included) then the new, larger table (old entries + the new
   * blocks), written and flushed; then `refcount_table_offset` + `refcount_table_clusters` switch in one
   * 12-byte header write + flush; only then the old table's clusters are freed. A crash before the switch
   * leaves unreferenced clusters past the old coverage (not even leaks); after it, at most a leaked table.
   * @throws {BlkError} EFBIG when the table would exceed QEMU's 8 MiB limit
   */
  async #growReftable(): Promise<void> {
    const cs = this.clusterSize;
    const per = this.#perRefblock;
    const oldEntries = this.#reftable.length / 8;
    const oldClusters = this.header.refcountTableClusters;
    const start = oldEntries * per;
    // Fixed point: k blocks must describe themselves and the table; the table holds old + k entries and
    // grows by at least half its size (fewer growths for a growing image).
    let k = 1;
    let t = 0;
    for (;;) {
      t = Math.max(Math.ceil(((oldEntries + k) * 8) / cs), oldClusters + Math.ceil(oldClusters / 2));
      const need = Math.ceil((k + t) / per);
      if (need <= k) break;
      k = need;
    }
    if (t * cs > MAX_REFTABLE_BYTES) {
      throw new BlkError("EFBIG", "qcow2: the refcount table would exceed its maximum size", {
        offset: start * cs,
      });
    }
    const blocks: Uint8Array[] = [];
    for (let j = 0; j < k; j++) blocks.push(new Uint8Array(cs));
    for (let c = start; c < start + k + t; c++) {
      const j = Math.floor((c - start) / per);
      const block = blocks[j];
      if (block !== undefined) setRefcount(block, this.#refBits, c - start - j * per, 1);
    }
    const table = new Uint8Array(t * cs);
    table.set(this.#reftable);
    const tv = new DataView(table.buffer);
    for (let j = 0; j < k; j++) {
      const off = (start + j) * cs;
      tv.setUint32((oldEntries + j) * 8, Math.floor(off / 2 ** 32));
      tv.setUint32((oldEntries + j) * 8 + 4, off >>> 0);
    }
    const area = new Uint8Array((k + t) * cs);
    for (const [j, b] of blocks.entries()) area.set(b, j * cs);
    area.set(table, k * cs);
    await this.#fileWrite(start * cs, area);
    await this.#fileFlush();
    const tableOff = (start + k) * cs;
    const hb = new Uint8Array(12);
    const hv = new DataView(hb.buffer);
    hv.setUint32(0, Math.floor(tableOff / 2 ** 32));
    hv.setUint32(4, tableOff >>> 0);
    hv.setUint32(8, t);
    await this.#fileWrite(48, hb);
    await this.#fileFlush();
    const oldOff = this.header.refcountTableOffset;
    this.header.refcountTableOffset = tableOff;
    this.header.refcountTableClusters = t;
    this.#reftable = table;
    for (const [j, b] of blocks.entries()) this.#refblocks.set(oldEntries + j, b);
    const m = new Map<number, number>();
    for (let j = 0; j < oldClusters; j++) m.set(oldOff / cs + j, -1);
    await this.#updateRefcounts(m);
  }

  /** Refcount of cluster index `c` (0 without a refcount block or past the reftable). */
  async #refcountAt(c: number): Promise<number> {
    const index = Math.floor(c / this.#perRefblock);
    if (index >= this.#reftable.length / 8) return 0;
    const block = await this.#refblock(index);
    return block === undefined ? 0 : this.#refcountIn(block, c - index * this.#perRefblock);
  }

  /**
   * Applies refcount changes (cluster index → delta): all validated first (no change is written when one
   * would leave 0..refcount_max), then the changed entries written (a whole refcount block when many
   * changed), then a flush when a refcount went up. A cluster whose refcount drops to 0 becomes
   * allocatable again (and leaves the L2 cache).
   * @throws {BlkError} EINVAL past refcount_max; EIO for a refcount going below 0
   */
  async #updateRefcounts(deltas: ReadonlyMap<number, number>): Promise<void> {
    const per = this.#perRefblock;
    const max = 2 ** this.#refBits - 1;
    const next = new Map<number, number>();
    for (const [c, d] of deltas) {
      if (d === 0) continue;
      const cur = await this.#refcountAt(c);
      const v = cur + d;
      if (v > max) {
        // EINVAL, as QEMU's update_refcount (qemu-img: "-22 (Invalid argument)").
        throw new BlkError(
          "EINVAL",
          `qcow2: refcount of cluster ${hex(c * this.clusterSize)} would exceed ${max} (refcount_bits=${this.#refBits})`,
        );
      }
      if (v < 0 || (await this.#refblock(Math.floor(c / per))) === undefined) {
        throw new BlkError(
          "EIO",
          `qcow2: Image is corrupt: refcount of cluster ${hex(c * this.clusterSize)} would drop below 0`,
        );
      }
      next.set(c, v);
    }
    const touched = new Map<number, number[]>();
    for (const [c, v] of next) {
      const index = Math.floor(c / per);
      const block = await this.#refblock(index);
      if (block === undefined) continue;
      setRefcount(block, this.#refBits, c - index * per, v);
      const entries = touched.get(index) ?? [];
      entries.push(c - index * per);
      touched.set(index, entries);
      if (v === 0) {
        this.#freeHint = Math.min(this.#freeHint, c);
        if (Math.floor(this.#freeByteOffset / this.clusterSize) === c) this.#freeByteOffset = 0;
        this.#cache.delete(c * this.clusterSize);
      }
    }
    if (touched.size === 0) return;
    const rt = new DataView(this.#reftable.buffer, this.#reftable.byteOffset, this.#reftable.length);
    for (const index of [...touched.keys()].sort((a, b) => a - b)) {
      const block = this.#refblocks.get(index);
      const entries = touched.get(index) ?? [];
      if (block === undefined) continue;
      if (entries.length <= 16) {
        // A few entries: written one by one (a discard or a copy on write changes one).
        for (const i of entries) await this.#writeRefEntry(index, block, i);
        continue;
      }
      const off = rt.getUint32(index * 8) * 2 ** 32 + ((rt.getUint32(index * 8 + 4) & OFFSET_MASK_LO) >>> 0);
      await this.#fileWrite(off, block);
    }
    // Increments must be stable before anything references the clusters (R1); a lost decrement is a leak.
    if ([...deltas.values()].some((d) => d > 0)) await this.#fileFlush();
  }

  /** Allocates `n` contiguous clusters (first fit; refcounts 1, flushed) and returns the host offset. */
  async #allocRun(n: number): Promise<number> {
    if (n <= 1) return this.#allocCluster();
    const c = await this.#findRun(n);
    const deltas = new Map<number, number>();
    for (let k = 0; k < n; k++) deltas.set(c + k, 1);
    await this.#updateRefcounts(deltas);
    return c * this.clusterSize;
  }

  // used by bitmaps.ts
  /**
   * Allocates `n` contiguous clusters (first fit) and returns the host offset of the first; their
   * refcounts are 1 and flushed (unless lazy refcounts hold the dirty bit) before this returns, so the
   * caller may then write them and make metadata point to them (rule R1). The caller holds the metadata
   * lock (`#locked`) or runs when nothing else changes the image.
   * @throws {BlkError} ENOSPC when the refcount table cannot grow any more
   */
  async allocateClusters(n: number): Promise<number> {
    return this.#allocRun(Math.max(1, n));
  }

  // used by bitmaps.ts
  /**
   * Drops the refcounts of the `n` clusters at `hostOffset` by one (freeing them when that reaches 0).
   * Call it only after whatever pointed to them has stopped doing so on disk (written and flushed: R4).
   * Same locking rule as {@link allocateClusters}.
   * @throws {BlkError} EIO when a refcount would go below 0
   */
  async freeClusters(hostOffset: number, n: number): Promise<void> {
    const cs = this.clusterSize;
    const m = new Map<number, number>();
    for (let c = Math.floor(hostOffset / cs), k = 0; k < n; k++, c++) m.set(c, -1);
    await this.#updateRefcounts(m);
  }

  // used by bitmaps.ts
  /**
   * Rewrites the header with extension `type` (e.g. 0x23852875, bitmaps) replaced by `data`, added when
   * absent, removed when undefined; `autoclear`, when given, becomes the `autoclear_features` field. One
   * write of cluster 0 then a flush (the extension and the autoclear bit change atomically with respect to
   * the sector). Updates `header.backingFileOffset`; the caller updates the parsed fields it changed.
   * Same locking rule as {@link allocateClusters}.
   * @throws {BlkError} ENOSPC when the extensions and the backing name do not fit in cluster 0
   */
  async writeHeaderExtension(type: number, data: Uint8Array | undefined, autoclear?: number): Promise<void> {
    const h = this.header;
    const c0 = await this.readFile(0, this.clusterSize);
    const bytes = rewriteHeaderExtension(c0, h, type, data);
    const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
    if (autoclear !== undefined) v.setBigUint64(HEADER_AUTOCLEAR_AT, BigInt(autoclear >>> 0));
    await this.#fileWrite(0, bytes);
    await this.#fileFlush();
    h.backingFileOffset = Number(v.getBigUint64(8));
    if (autoclear !== undefined) h.autoclearFeatures = autoclear >>> 0;
  }

  /** Host cluster indexes an L2 entry references (compressed: every host cluster its sectors touch). */
  #entryClusters(hi: number, lo: number): number[] {
    const cs = this.clusterSize;
    if ((hi & L2E_COMPRESSED_HI) !== 0) {
      const x = this.#csizeShift;
      const low = BigInt(hi & 0x3fffffff) * 2n ** 32n + BigInt(lo >>> 0);
      const off = Number(low & ((1n << BigInt(x)) - 1n));
      const nb = Number(low >> BigInt(x)) + 1;
      const start = off - (off % 512);
      const out: number[] = [];
      for (let c = Math.floor(start / cs); c * cs < start + nb * 512; c++) out.push(c);
      return out;
    }
    const host = (hi & OFFSET_MASK_HI) * 2 ** 32 + ((lo & OFFSET_MASK_LO) >>> 0);
    return host === 0 ? [] : [host / cs];
  }

  /** Decrements the refcounts of what an L2 entry referenced (after the entry's change is stable: R4). */
  async #unrefEntry(hi: number, lo: number): Promise<void> {
    const m = new Map<number, number>();
    for (const c of this.#entryClusters(hi, lo)) m.set(c, (m.get(c) ?? 0) - 1);
    await this.#updateRefcounts(m);
  }

  /** The L2 table of active L1 entry `l1Index` when it exists and is not shared (COPIED set), else 0. */
  #ownedL2(l1Index: number): number {
    const l1 = this.#activeL1;
    if ((l1Index + 1) * 8 > l1.byteLength) return 0;
    const hi = l1.getUint32(l1Index * 8);
    if ((hi & L1E_COPIED_HI) === 0) return 0;
    return (hi & OFFSET_MASK_HI) * 2 ** 32 + ((l1.getUint32(l1Index * 8 + 4) & OFFSET_MASK_LO) >>> 0);
  }

  /**
   * The L2 table of L1 entry `l1Index`, allocated when absent (rule R2: refcount flushed, table written
   * and flushed, then the L1 entry written and flushed).
   */
  async #ensureL2(l1Index: number): Promise<number> {
    const l1 = this.#activeL1;
    if ((l1Index + 1) * 8 > l1.byteLength) {
      throw new BlkError("EIO", `qcow2: L1 index ${hex(l1Index)} beyond the L1 table`);
    }
    const hi = l1.getUint32(l1Index * 8);
    const lo = l1.getUint32(l1Index * 8 + 4);
    const cur = (hi & OFFSET_MASK_HI) * 2 ** 32 + ((lo & OFFSET_MASK_LO) >>> 0);
    if (cur !== 0 && (hi & L1E_COPIED_HI) !== 0) return cur;
    // Absent: a zeroed table. Shared with a snapshot (COPIED clear): a copy, then the old one unreferenced.
    const table = cur === 0 ? new Uint8Array(this.clusterSize) : await this.readFile(cur, this.clusterSize);
    const off = await this.#allocCluster();
    await this.#fileWrite(off, table);
    await this.#fileFlush();
    await this.#writeL1Entry(l1Index, off);
    if (cur !== 0) await this.#updateRefcounts(new Map([[cur / this.clusterSize, -1]]));
    return off;
  }

  /** Writes active L1 entry `l1Index` as `off | COPIED` (write + flush), then the in-memory table. */
  async #writeL1Entry(l1Index: number, off: number): Promise<void> {
    const l1 = this.#activeL1;
    const e = new Uint8Array(8);
    const ev = new DataView(e.buffer);
    ev.setUint32(0, (L1E_COPIED_HI | Math.floor(off / 2 ** 32)) >>> 0);
    ev.setUint32(4, off >>> 0);
    await this.#fileWrite(this.header.l1TableOffset + l1Index * 8, e);
    await this.#fileFlush();
    l1.setUint32(l1Index * 8, ev.getUint32(0));
    l1.setUint32(l1Index * 8 + 4, ev.getUint32(4));
  }

  /** Writes L2 entry `index` of the table at `l2Offset` to the file, then to the cached table if any. */
  async #setL2Entry(l2Offset: number, index: number, hi: number, lo: number): Promise<void> {
    const e = new Uint8Array(8);
    const ev = new DataView(e.buffer);
    ev.setUint32(0, hi >>> 0);
    ev.setUint32(4, lo >>> 0);
    await this.#setL2Entries(l2Offset, index, e);
  }

  /**
   * Writes consecutive L2 entries from `index` (8 bytes each) to the file, then to the cached table if
   * any (patched after the write, so a table loaded meanwhile gets them too).
   */
  async #setL2Entries(l2Offset: number, index: number, entries: Uint8Array): Promise<void> {
    await this.#fileWrite(l2Offset + index * 8, entries);
    const cached = this.#cache.get(l2Offset);
    if (cached !== undefined) {
      const t = await cached.catch(() => undefined);
      if (t !== undefined) new Uint8Array(t.buffer, t.byteOffset, t.byteLength).set(entries, index * 8);
    }
  }

  /** L1 index, L2 index and cluster start of guest offset `pos`. */
  #where(pos: number): { l1Index: number; l2Index: number; start: number } {
    const l1Index = Math.floor(pos / this.#perL2);
    const l2Index = Math.floor((pos - l1Index * this.#perL2) / this.clusterSize);
    return { l1Index, l2Index, start: l1Index * this.#perL2 + l2Index * this.clusterSize };
  }

  /**
   * Writes the start of `data` (at guest `pos`) where the clusters are not normal ones, and returns how
   * many bytes it wrote. Runs under the metadata lock, after looking the mapping up again.
   *
   * Whole unallocated / plain zero clusters (up to the end of the L2 table) are allocated together:
   * refcounts written and flushed once (R1), the data written, then their L2 entries in one write.
   * Otherwise one cluster: a new cluster receives the whole cluster — the bytes around the request
   * copied from the backing file (or zeroes) — written and flushed (R3) before the L2 entry points to it;
   * an allocated zero cluster is reused in place the same way.
   */
  async #allocatingWrite(pos: number, data: Uint8Array): Promise<number> {
    const cs = this.clusterSize;
    let run = await this.mapRun(pos, data.length);
    if (run.type === SC.NORMAL && (run.entryHi & L2E_COPIED_HI) !== 0) {
      // Allocated meanwhile (and perhaps still pending): in place, as #plainWrite.
      this.#placedRange(pos, run.bytes);
      await this.#fileWrite(run.host, data.subarray(0, run.bytes));
      return run.bytes;
    }
    await this.#flushPending();
    run = await this.mapRun(pos, data.length);
    const copied = (run.entryHi & L2E_COPIED_HI) !== 0;
    if (run.type === SC.NORMAL && copied) {
      this.#placedRange(pos, run.bytes);
      await this.#fileWrite(run.host, data.subarray(0, run.bytes));
      return run.bytes;
    }
    if (run.type === SC.NORMAL || run.type === SC.COMPRESSED || (run.type === SC.ZERO_ALLOC && !copied)) {
      return this.#cowWrite(pos, data, run);
    }
    if (run.type === SC.INVALID || run.type === SC.UNALLOCATED_ALLOC) {
      throw new BlkError("EIO", "Input/output error", { offset: pos });
    }
    await this.#markDirty();
    const { l1Index, l2Index, start } = this.#where(pos);
    const l2Offset = await this.#ensureL2(l1Index);
    const fresh = run.type === SC.UNALLOCATED_PLAIN || run.type === SC.ZERO_PLAIN;
    const count = Math.min(Math.floor(run.bytes / cs), Math.floor(data.length / cs), MAX_BATCH_CLUSTERS);
    if (fresh && pos === start && count >= 1) {
      const hosts: number[] = [];
      for (let i = 0; i < count; i++) hosts.push(await this.#allocCluster(false));
      this.#placedRange(pos, count * cs);
      if (!this.dirty) await this.#fileFlush();
      // Data, one write per host-contiguous stretch.
      let i = 0;
      while (i < count) {
        let j = i + 1;
        while (j < count && hosts[j] === (hosts[j - 1] ?? 0) + cs) j++;
        await this.#fileWrite(hosts[i] ?? 0, data.subarray(i * cs, j * cs));
        i = j;
      }
      const entries = new Uint8Array(count * 8);
      const ev = new DataView(entries.buffer);
      hosts.forEach((h, k) => {
        ev.setUint32(k * 8, (L2E_COPIED_HI | Math.floor(h / 2 ** 32)) >>> 0);
        ev.setUint32(k * 8 + 4, h >>> 0);
      });
      await this.#setL2Entries(l2Offset, l2Index, entries);
      return count * cs;
    }
    const n = Math.min(data.length, start + cs - pos);
    const part = data.subarray(0, n);
    const whole = n === cs;
    const buf = whole ? part : new Uint8Array(cs);
    if (!whole) {
      if (run.type === SC.UNALLOCATED_PLAIN) await this.#readBacking(start, buf);
      buf.set(part, pos - start);
    }
    let host: number;
    const reuse = run.type === SC.ZERO_ALLOC;
    if (reuse) {
      host = run.host - (pos - start);
    } else {
      host = await this.#allocCluster();
    }
    this.#placedRange(pos, n);
    await this.#fileWrite(host, buf);
    if (!whole || reuse) await this.#fileFlush();
    await this.#setL2Entry(l2Offset, l2Index, L2E_COPIED_HI | Math.floor(host / 2 ** 32), host >>> 0);
    return n;
  }

  /**
   * Copy-on-write of one cluster that is shared (COPIED clear: a snapshot references it), compressed, or
   * an allocated zero cluster not owned alone: the whole new cluster (old contents around the request) is
   * written to a new cluster and flushed (R3), the L2 entry switched to it and flushed, and only then the
   * old cluster's refcounts drop (R4). Returns the bytes written (up to the end of the cluster).
   */
  async #cowWrite(pos: number, data: Uint8Array, run: Qcow2Run): Promise<number> {
    const cs = this.clusterSize;
    await this.#markDirty();
    const { l1Index, l2Index, start } = this.#where(pos);
    const l2Offset = await this.#ensureL2(l1Index);
    const n = Math.min(data.length, start + cs - pos);
    const buf = new Uint8Array(cs);
    if (n < cs) {
      if (run.type === SC.NORMAL) await this.#pread(this.#data, run.host - (pos - start), buf);
      else if (run.type === SC.COMPRESSED) buf.set(await this.#decompressed(run.entryHi, run.entryLo));
    }
    buf.set(data.subarray(0, n), pos - start);
    const host = await this.#allocCluster();
    this.#placedRange(pos, n);
    await this.#fileWrite(host, buf);
    await this.#fileFlush();
    await this.#setL2Entry(l2Offset, l2Index, L2E_COPIED_HI | Math.floor(host / 2 ** 32), host >>> 0);
    await this.#fileFlush();
    this.#lastCompressed = undefined;
    await this.#unrefEntry(run.entryHi, run.entryLo);
    return n;
  }

  protected override async _write(offset: number, data: Uint8Array, _flags: WriteFlags): Promise<void> {
    this.#checkWritable(offset);
    if (!this.#isPrepared) await this.#prepare();
    if (this.#compress) await this.#compressedWrite(offset, data);
    else await this.#plainWrite(offset, data);
  }

  async #plainWrite(offset: number, data: Uint8Array): Promise<void> {
    let done = 0;
    const total = data.length;
    while (done < total) {
      const pos = offset + done;
      // Registered before the lookup, so that a discard freeing this cluster waits for the write.
      let finish: () => void = () => {};
      const tracked = new Promise<void>((r) => {
        finish = r;
      });
      // A snapshot operation changes which clusters may be written in place: wait for it to end.
      while (this.#snapshotOps.size > 0) await Promise.all([...this.#snapshotOps]);
      this.#inPlace.add(tracked);
      try {
        const run = await this.mapRun(pos, total - done);
        if (run.type === SC.NORMAL && (run.entryHi & L2E_COPIED_HI) !== 0) {
          // Already allocated and not shared: in place, as long a run as the mapping is contiguous.
          if (this.#placeWaiters.size > 0) this.#placedRange(pos, run.bytes);
          await this.#fileWrite(run.host, data.subarray(done, done + run.bytes));
          done += run.bytes;
          continue;
        }
      } finally {
        this.#inPlace.delete(tracked);
        finish();
      }
      done += await this.#queuedAllocatingWrite(pos, data.subarray(done));
    }
  }

  // Group commit: allocating writes queue up while one of them holds the metadata lock; the next to get
  // the lock writes every queued one it can in one batch: the new clusters' refcounts go up in memory,
  // all the data is written, and the L2 entries are linked in memory (pending). #flushPending later writes
  // the refcounts, flushes (making them, R1, and the data, R3, stable), then writes the L2 entries — so
  // that many allocating writes share one flush, as QEMU's write-back metadata caches do.

  /** Writes the start of `data` at `pos` where its clusters are not normal ones; returns the bytes done. */
  async #queuedAllocatingWrite(pos: number, data: Uint8Array): Promise<number> {
    const req: AllocRequest = { pos, data, bytes: undefined, error: undefined };
    this.#allocQueue.push(req);
    await this.#locked(async () => {
      if (req.bytes === undefined && req.error === undefined)
        await this.#allocGroup(this.#allocQueue.splice(0));
    });
    // The batch's data goes out without the lock, so that the next group can start meanwhile.
    if (req.done !== undefined) await req.done;
    if (req.error !== undefined) throw req.error;
    return req.bytes ?? 0;
  }

  /**
   * What to wait for until no cluster of `[pos, end)` is being allocated by a committed batch (undefined:
   * nothing).
   */
  #waitInflight(pos: number, end: number): Promise<unknown> | undefined {
    if (this.#inflight.size === 0) return undefined;
    const cs = this.clusterSize;
    const waits: Promise<void>[] = [];
    for (let c = Math.floor(pos / cs) * cs; c < end; c += cs) {
      const p = this.#inflight.get(c);
      if (p !== undefined) waits.push(p);
    }
    return waits.length > 0 ? Promise.allSettled(waits) : undefined;
  }

  /** Waits until every committed batch has written its data and linked its entries. */
  async #drainInflight(): Promise<void> {
    while (this.#inflight.size > 0) await Promise.allSettled([...new Set(this.#inflight.values())]);
  }

  /**
   * Runs queued allocating writes in order (under the metadata lock): consecutive ones into unallocated or
   * plain zero clusters go into one batch; any other (copy on write of a shared or compressed cluster, an
   * allocated zero cluster, a cluster allocated meanwhile) commits the batch first and runs on its own.
   */
  async #allocGroup(group: AllocRequest[]): Promise<void> {
    const cs = this.clusterSize;
    let batch: AllocBatch = { clusters: new Map(), requests: [] };
    const commit = async (): Promise<void> => {
      const b = batch;
      batch = { clusters: new Map(), requests: [] };
      try {
        await this.#commitBatch(b);
      } catch (e) {
        for (const r of b.requests) r.error = asError(e);
      }
    };
    for (const req of group) {
      try {
        if (batch.clusters.size >= 4 * MAX_BATCH_CLUSTERS) await commit();
        // A cluster another batch is still writing is allocated already: let that batch link it first.
        const busy = this.#waitInflight(
          req.pos,
          Math.min(req.pos + req.data.length, req.pos + MAX_BATCH_CLUSTERS * cs),
        );
        if (busy !== undefined) await busy;
        const n = await this.#addToBatch(batch, req);
        if (n > 0) {
          req.bytes = n;
          batch.requests.push(req);
          continue;
        }
        await commit();
        req.bytes = await this.#allocatingWrite(req.pos, req.data);
      } catch (e) {
        req.error = asError(e);
      }
    }
    await commit();
    // The linked entries stay pending (reads see them) until a flush, a close, a reopen to read-only, any
    // operation that reads or changes L2 tables on disk, or until there are many of them.
    if (this.#pendingCount >= MAX_PENDING_ENTRIES) {
      try {
        await this.#flushPending();
      } catch (e) {
        for (const r of group) r.error ??= asError(e);
      }
    }
  }

  /**
   * Adds the start of a request to the batch when it lies in unallocated or plain zero clusters (or in
   * clusters the batch already allocates): each cluster gets a whole-cluster buffer — the request's bytes,
   * with the rest copied from the backing file — or, when the rest reads as zeroes, just the request's
   * bytes (#commitBatch pads them where the new cluster needs it). Returns the bytes taken (0: not such
   * clusters).
   */
  async #addToBatch(batch: AllocBatch, req: AllocRequest): Promise<number> {
    const cs = this.clusterSize;
    const { pos, data } = req;
    const run = await this.mapRun(pos, data.length);
    if (run.type !== SC.UNALLOCATED_PLAIN && run.type !== SC.ZERO_PLAIN) return 0;
    if ((this.header.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0) await this.#markDirty();
    const { l1Index, l2Index, start } = this.#where(pos);
    // The table is usually there and owned (no await then).
    const l2Offset = this.#ownedL2(l1Index) || (await this.#ensureL2(l1Index));
    const end = Math.min(pos + Math.min(run.bytes, data.length), start + MAX_BATCH_CLUSTERS * cs);
    for (let c = start, i = l2Index; c < end; c += cs, i++) {
      const from = Math.max(pos, c);
      const to = Math.min(end, c + cs);
      const part = data.subarray(from - pos, to - pos);
      let e = batch.clusters.get(c);
      if (e === undefined) {
        if ((from === c && to === c + cs) || run.type === SC.ZERO_PLAIN || this.#backing === undefined) {
          e = { l2Offset, l2Index: i, buf: part, at: from - c, owned: false };
        } else {
          // Every byte of it is set (#readBacking zeroes what the backing file does not cover).
          const buf = this.#clusterBuffer();
          await this.#readBacking(c, buf);
          buf.set(part, from - c);
          e = { l2Offset, l2Index: i, buf, at: 0, owned: true };
        }
        batch.clusters.set(c, e);
        continue;
      }
      // Written twice in one batch: the later request's bytes over the earlier ones.
      if (e.at !== 0 || e.buf.length !== cs) this.#padCluster(e, cs);
      else if (!e.owned) {
        const buf = this.#clusterBuffer();
        buf.set(e.buf);
        e.buf = buf;
        e.owned = true;
      }
      e.buf.set(part, from - c);
    }
    return end - pos;
  }

  /**
   * A cluster-sized buffer with undefined contents for a batch's own copy of a cluster: a recycled one
   * when there is one (allocating and collecting 64 KiB per small allocating write costs more main-thread
   * time than the rest of the request).
   */
  #clusterBuffer(): Uint8Array {
    return this.#bufferPool.pop() ?? new Uint8Array(this.clusterSize);
  }

  /** Gives a buffer from #clusterBuffer back once its write has ended (nothing else holds it). */
  #recycle(buf: Uint8Array): void {
    if (this.#bufferPool.length * this.clusterSize < BUFFER_POOL_BYTES) this.#bufferPool.push(buf);
  }

  /** Makes `e.buf` the whole cluster (its own copy): the bytes it had at `e.at`, zeroes around them. */
  #padCluster(e: BatchCluster, cs: number): void {
    const buf = this.#clusterBuffer();
    const end = e.at + e.buf.length;
    buf.fill(0, 0, e.at);
    buf.set(e.buf, e.at);
    buf.fill(0, end, cs);
    e.buf = buf;
    e.at = 0;
    e.owned = true;
  }

  /**
   * Allocates the batch's clusters (under the metadata lock), then starts their data writes without
   * waiting: one write per run of host-contiguous clusters whose buffers are consecutive pieces of one
   * caller buffer (a view of it, never a copy), after which the run's L2 entries are linked. Each request
   * gets the completion of its own runs as `done`; the guest clusters are in #inflight meanwhile.
   *
   * A cluster holding only part of a request (the rest zeroes) is written whole when its host cluster may
   * hold old bytes; past everything ever written to the file, only its bytes are written (what lies before
   * them in the file reads as zeroes: a hole) — except in the batch's last host cluster, written whole, so
   * that the file ends at a cluster boundary once the batch is written.
   */
  async #commitBatch(batch: AllocBatch): Promise<void> {
    if (batch.clusters.size === 0) return;
    const cs = this.clusterSize;
    const entries = [...batch.clusters];
    const hosts = await this.#allocPending(entries.length);
    if (this.#placeWaiters.size > 0) for (const [guest] of entries) this.#placed(guest);
    const order = entries
      .map(([guest, e], k) => ({ guest, e, host: hosts[k] ?? 0 }))
      .sort((a, b) => a.host - b.host);
    // After #allocPending (which may have written refcount structures).
    const untouched = Math.max(this.#file.length, this.#writeEnd);
    const top = order[order.length - 1]?.host ?? 0;
    for (const { e, host } of order) {
      if ((e.at !== 0 || e.buf.length !== cs) && (host < untouched || host === top)) this.#padCluster(e, cs);
    }
    const runOf = new Map<number, Promise<void>>();
    let only: Promise<void> | undefined;
    for (let i = 0; i < order.length; ) {
      const head = order[i];
      const first = head?.e.buf ?? new Uint8Array(0);
      let end = first.byteOffset + first.length;
      let j = i + 1;
      for (; j < order.length; j++) {
        const o = order[j];
        const prev = order[j - 1];
        if (o === undefined || prev === undefined || o.host !== prev.host + cs) break;
        if (prev.e.at + prev.e.buf.length !== cs || o.e.at !== 0) break;
        if (o.e.buf.buffer !== first.buffer || o.e.buf.byteOffset !== end) break;
        end += o.e.buf.length;
      }
      const members = order.slice(i, j);
      const view =
        j === i + 1 ? first : new Uint8Array(first.buffer, first.byteOffset, end - first.byteOffset);
      const host = (head?.host ?? 0) + (head?.e.at ?? 0);
      // A batch's own copy of a cluster is a run of its own: recycled once written.
      const own = j === i + 1 && head?.e.owned === true && first.length === cs ? first : undefined;
      const done = (async () => {
        try {
          await this.#fileWrite(host, view);
        } finally {
          if (own !== undefined) this.#recycle(own);
        }
        // The L2 entries wait (in memory, where reads see them) for the flush that makes the refcounts
        // (R1) and the copied-on-write bytes (R3) stable: #flushPending.
        await this.#linkPendingAll(members);
      })();
      // Rejections reach the requests through `done`; the clusters leave #inflight before `settled` does.
      const leave = (): void => {
        for (const m of members) if (this.#inflight.get(m.guest) === settled) this.#inflight.delete(m.guest);
      };
      const settled: Promise<void> = done.then(leave, leave);
      for (const m of members) {
        runOf.set(m.guest, done);
        this.#inflight.set(m.guest, settled);
      }
      only = i === 0 && j === order.length ? done : undefined;
      i = j;
    }
    if (only !== undefined) {
      // One run: every request waits for it.
      for (const r of batch.requests) r.done = only;
      return;
    }
    for (const r of batch.requests) {
      const waits: Promise<void>[] = [];
      for (let c = Math.floor(r.pos / cs) * cs; c < r.pos + (r.bytes ?? 0); c += cs) {
        const p = runOf.get(c);
        if (p !== undefined && !waits.includes(p)) waits.push(p);
      }
      r.done = waits.length === 1 ? (waits[0] as Promise<void>) : Promise.all(waits).then(() => {});
    }
  }

  /** Links the L2 entries of a batch write's clusters in memory (one table lookup per table). */
  async #linkPendingAll(
    members: readonly { host: number; e: { l2Offset: number; l2Index: number } }[],
  ): Promise<void> {
    let table = -1;
    let view: DataView | undefined;
    let pt: PendingTable | undefined;
    for (const m of members) {
      const { l2Offset, l2Index } = m.e;
      const hi = (L2E_COPIED_HI | Math.floor(m.host / 2 ** 32)) >>> 0;
      const lo = m.host >>> 0;
      if (table !== l2Offset || view === undefined || pt === undefined) {
        pt = this.#pendingTable(l2Offset);
        // The table stays cached (never evicted while it has pending entries), so that no load of it
        // from the file can race with #flushPending's writes.
        view = await this.#l2Table(l2Offset);
        table = l2Offset;
      }
      if (pt.set[l2Index] === 0) {
        pt.set[l2Index] = 1;
        pt.count++;
        this.#pendingCount++;
        if (l2Index < pt.min) pt.min = l2Index;
        if (l2Index > pt.max) pt.max = l2Index;
      }
      pt.view.setUint32(l2Index * 8, hi);
      pt.view.setUint32(l2Index * 8 + 4, lo);
      view.setUint32(l2Index * 8, hi);
      view.setUint32(l2Index * 8 + 4, lo);
    }
  }

  /** The pending entries of the table at `l2Offset` (created empty when it has none). */
  #pendingTable(l2Offset: number): PendingTable {
    let pt = this.#pendingL2.get(l2Offset);
    if (pt === undefined) {
      const bytes = new Uint8Array(this.#l2Entries * 8);
      pt = {
        bytes,
        view: new DataView(bytes.buffer),
        set: new Uint8Array(this.#l2Entries),
        count: 0,
        min: this.#l2Entries,
        max: -1,
      };
      this.#pendingL2.set(l2Offset, pt);
    }
    return pt;
  }

  /**
   * Resolves once guest offset `offset` has its host cluster decided by a write that started before —
   * the write's clusters were allocated (the data may still be on its way), or it writes in place — or
   * when `until` settles, whichever comes first. A write started after it resolved is placed after it:
   * what lets `convert` start the next chunk's write early and still lay clusters out in guest order.
   */
  whenPlaced(offset: number, until: Promise<unknown>): Promise<void> {
    const c = offset - (offset % this.clusterSize);
    if (this.#inflight.has(c)) return Promise.resolve();
    return new Promise<void>((resolve) => {
      let list = this.#placeWaiters.get(c);
      if (list === undefined) {
        list = [];
        this.#placeWaiters.set(c, list);
      }
      list.push(resolve);
      const drop = (): void => {
        const l = this.#placeWaiters.get(c);
        const k = l?.indexOf(resolve) ?? -1;
        if (l !== undefined && k >= 0) {
          l.splice(k, 1);
          if (l.length === 0) this.#placeWaiters.delete(c);
        }
        resolve();
      };
      until.then(drop, drop);
    });
  }

  /** Wakes the {@link Qcow2State.whenPlaced} callers of guest cluster `c` (its host cluster is decided). */
  #placed(c: number): void {
    const list = this.#placeWaiters.get(c);
    if (list === undefined) return;
    this.#placeWaiters.delete(c);
    for (const r of list) r();
  }

  /** {@link Qcow2State.#placed} for every guest cluster `[pos, pos+bytes)` touches. */
  #placedRange(pos: number, bytes: number): void {
    if (this.#placeWaiters.size === 0) return;
    const cs = this.clusterSize;
    for (let c = pos - (pos % cs); c < pos + bytes; c += cs) this.#placed(c);
  }

  /**
   * Writes the pending L2 entries (under the metadata lock): once every batch still writing data has
   * linked its entries, the refcount ranges raised in memory are written, then a flush when anything was
   * written since the last one — those refcounts (R1) and the data of the new clusters (R3) — then the
   * entries, one write per run of consecutive entries. Every operation that reads L2 tables from the file
   * or changes entries write-through calls it first (and a flush, close or reopen to read-only).
   */
  async #flushPending(): Promise<void> {
    await this.#drainInflight();
    if (this.#pendingCount === 0 && this.#pendingRefs.size === 0) return;
    await this.#writePendingRefs();
    if (this.#unflushed) await this.#fileFlush();
    const tables = [...this.#pendingL2].sort((a, b) => a[0] - b[0]);
    for (const [l2Offset, pt] of tables) {
      // One write per run of consecutive entries (nothing links entries while the lock is held).
      const { set, bytes } = pt;
      for (let i = pt.min; i <= pt.max; ) {
        if (set[i] === 0) {
          i++;
          continue;
        }
        let j = i + 1;
        while (j <= pt.max && set[j] !== 0) j++;
        await this.#fileWrite(l2Offset + i * 8, bytes.slice(i * 8, j * 8));
        i = j;
      }
      // Only now may the table leave the cache (a load from the file sees the entries).
      this.#pendingL2.delete(l2Offset);
      this.#pendingCount -= pt.count;
    }
  }

  // ---- compressed writes ----------------------------------------------------------------------------

  /**
   * Turns compressed writes on or off (what `qemu-img convert -c` asks of its target). While on, a write
   * stores each whole guest cluster (or the image's last, partial one, padded with zeroes) that is not
   * allocated yet as raw deflate data (window bits -12) when that is smaller than a cluster, packed
   * byte by byte into host clusters (QEMU `qcow2_alloc_bytes`: a host cluster holding parts of N
   * compressed clusters has refcount N); other clusters are written as usual. A request that is all
   * zeroes over clusters that already read as zeroes writes nothing.
   * @throws {BlkError} EROFS read-only; ENOTSUP for zstd images, extended L2 or an external data file
   */
  setCompressedWrites(on: boolean): void {
    this.#checkWritable(0);
    if (on && this.header.compressionType === 1) {
      throw new BlkError(
        "ENOTSUP",
        "qcow2: writing zstd compressed clusters is not supported in this version of blk",
      );
    }
    this.#compress = on;
  }

  async #compressedWrite(offset: number, data: Uint8Array): Promise<void> {
    const cs = this.clusterSize;
    if (await this.#zeroOverZeroes(offset, data)) return;
    let done = 0;
    while (done < data.length) {
      const pos = offset + done;
      const inCluster = pos % cs;
      const n = Math.min(data.length - done, cs - inCluster);
      const part = data.subarray(done, done + n);
      done += n;
      if (inCluster === 0 && (n === cs || pos + n === this.#size)) {
        let buf = part;
        if (n < cs) {
          buf = new Uint8Array(cs);
          buf.set(part);
        }
        const z = deflateRawSync(buf, { windowBits: 12, memLevel: 9 });
        if (z.length < cs && (await this.#locked(() => this.#storeCompressed(pos, z)))) continue;
      }
      await this.#plainWrite(pos, part);
    }
  }

  /** The request is all zeroes and every cluster it touches already reads as zeroes. */
  async #zeroOverZeroes(offset: number, data: Uint8Array): Promise<boolean> {
    for (const b of data) if (b !== 0) return false;
    for (let done = 0; done < data.length; ) {
      const run = await this.mapRun(offset + done, data.length - done);
      const zero =
        run.type === SC.ZERO_PLAIN ||
        run.type === SC.ZERO_ALLOC ||
        (run.type === SC.UNALLOCATED_PLAIN && this.#backing === undefined);
      if (!zero) return false;
      done += run.bytes;
    }
    return true;
  }

  /**
   * Stores compressed cluster data for guest cluster `pos` (under the metadata lock) when the cluster is
   * still unallocated; returns false (nothing done) otherwise. Refcounts are stable before the L2 entry
   * names the bytes (R1).
   */
  async #storeCompressed(pos: number, z: Uint8Array): Promise<boolean> {
    const run = await this.mapRun(pos, this.clusterSize);
    if (run.type !== SC.UNALLOCATED_PLAIN && run.type !== SC.ZERO_PLAIN) return false;
    await this.#markDirty();
    const { l1Index, l2Index } = this.#where(pos);
    const l2Offset = await this.#ensureL2(l1Index);
    const off = await this.#allocBytes(z.length);
    this.#placedRange(pos, 1);
    await this.#fileWrite(off, z);
    const sectors = Math.floor((off + z.length - 1) / 512) - Math.floor(off / 512);
    const d = (1n << 62n) | (BigInt(sectors) << BigInt(this.#csizeShift)) | BigInt(off);
    await this.#setL2Entry(l2Offset, l2Index, Number(d >> 32n), Number(d & 0xffffffffn));
    return true;
  }

  /**
   * Allocates `size` (< cluster size) bytes for compressed data, right after the previous ones when they
   * fit (continuing into the next host cluster when that one is free and contiguous, else starting a new
   * host cluster); the refcount of every host cluster the bytes touch goes up by one (written, flushed).
   */
  async #allocBytes(size: number): Promise<number> {
    const cs = this.clusterSize;
    let offset = this.#freeByteOffset;
    if (offset !== 0) {
      const rc = await this.#refcountAt(Math.floor(offset / cs));
      if (rc === 0 || rc >= 2 ** this.#refBits - 1) offset = 0;
    }
    const free = offset === 0 ? 0 : cs - (offset % cs);
    if (offset === 0 || free < size) {
      const c = await this.#findRun(1);
      if (offset === 0 || Math.ceil(offset / cs) !== c) offset = c * cs;
    }
    const deltas = new Map<number, number>();
    for (let k = Math.floor(offset / cs); k * cs < offset + size; k++) deltas.set(k, 1);
    await this.#updateRefcounts(deltas);
    this.#freeByteOffset = (offset + size) % cs === 0 ? 0 : offset + size;
    return offset;
  }

  /**
   * QEMU's qcow2 write-zeroes, piece by piece as its block layer splits a request: a cluster-aligned body
   * and unaligned head and tail pieces (a piece reaching the image's end has no tail).
   * - v3, whole cluster: the zero flag is set on every cluster, allocated or not, with or without backing
   *   file (an allocated cluster keeps its host cluster, even one shared with a snapshot); with `mayUnmap`
   *   an allocated cluster is freed instead (plain zero cluster), and a compressed one always is.
   * - v2 (no zero flag), whole cluster: without backing file the cluster is discarded (allocated ones,
   *   compressed included, become unallocated and are freed); over a backing file zeroes are written.
   * - A partial piece is treated as its whole cluster when that cluster is unallocated or a zero cluster
   *   and the rest of it reads as zeroes (through the backing chain); otherwise zeroes are written.
   * @throws {BlkError} ENOTSUP with `noFallback` where zeroes would have to be written (any v2 image)
   */
  protected override async _writeZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    this.#checkWritable(offset);
    const noFallback = flags.noFallback === true;
    if (noFallback && this.header.version < 3) {
      throw new BlkError("ENOTSUP", "Operation not supported", { offset });
    }
    await this.#prepare();
    const cs = this.clusterSize;
    const unmap = flags.mayUnmap === true;
    const end = offset + bytes;
    let pos = offset;
    while (pos < end) {
      let n = Math.min(end - pos, cs - (pos % cs));
      const start = pos - (pos % cs);
      const at = pos;
      let done = false;
      if (pos === start && (n === cs || pos + n >= this.#size)) {
        // Whole clusters, up to the end of their L2 table at most (a last partial one counts as whole).
        const stop = Math.min(end, (Math.floor(pos / this.#perL2) + 1) * this.#perL2);
        const count = stop >= this.#size ? Math.ceil((stop - pos) / cs) : Math.floor((stop - pos) / cs);
        n = Math.min(count * cs, end - pos);
        done = await this.#locked(() => this.#zeroClusters(at, count, true, unmap));
      } else if (await this.#restReadsZero(start, pos, pos + n)) {
        done = await this.#locked(() => this.#zeroClusters(start, 1, false, unmap));
      }
      if (!done) {
        if (noFallback) throw new BlkError("ENOTSUP", "Operation not supported", { offset: at });
        const zero = new Uint8Array(Math.min(n, 1 << 20));
        for (let d = 0; d < n; d += zero.length) {
          await this._write(at + d, n - d < zero.length ? zero.subarray(0, n - d) : zero, {});
        }
      }
      pos += n;
    }
  }

  /**
   * Whether the parts of the cluster at `start` outside `[from, to)` (up to the image's end) read as
   * zeroes, checked the way QEMU's qcow2 does before it zeroes a whole cluster for a partial request.
   */
  async #restReadsZero(start: number, from: number, to: number): Promise<boolean> {
    const run = await this.mapRun(start, this.clusterSize);
    if (run.type === SC.ZERO_PLAIN || run.type === SC.ZERO_ALLOC) return true;
    if (run.type !== SC.UNALLOCATED_PLAIN) return false;
    const b = this.#backing;
    if (b === undefined) return true;
    const stop = Math.min(start + this.clusterSize, this.#size);
    for (const [p, q] of [
      [start, from],
      [to, stop],
    ] as const) {
      const e = Math.min(q, b.length);
      if (p >= e) continue;
      let at = p;
      for (const x of await b.blockStatusAbove(p, e - p)) {
        if (!x.zero) return false;
        at = x.offset + x.length;
      }
      if (at < e) return false;
    }
    return true;
  }

  /**
   * Zeroes `count` guest clusters from `pos` (within one L2 table) without writing data, under the
   * metadata lock, as QEMU's qcow2 does: the L2 table is allocated (or unshared) whatever changes, the new
   * entries are written in one go, flushed, and only then the refcounts of the clusters they stop using
   * drop (rule R4). False (nothing done) when zeroes have to be written instead: v2 over a backing file,
   * or for a partial request (`whole` false, one cluster) a cluster no longer unallocated or zero.
   */
  async #zeroClusters(pos: number, count: number, whole: boolean, unmap: boolean): Promise<boolean> {
    const v3 = this.header.version === 3;
    if (!v3 && this.#backing !== undefined) return false;
    await this.#flushPending();
    const cs = this.clusterSize;
    for (let i = 0; i < count; ) {
      const at = pos + i * cs;
      const run = await this.mapRun(at, Math.min((count - i) * cs, this.#size - at));
      if (run.type === SC.INVALID) throw new BlkError("EIO", "Input/output error", { offset: at });
      if (
        !whole &&
        run.type !== SC.UNALLOCATED_PLAIN &&
        run.type !== SC.ZERO_PLAIN &&
        run.type !== SC.ZERO_ALLOC
      ) {
        return false;
      }
      i += Math.max(1, Math.ceil(run.bytes / cs));
    }
    const { l1Index, l2Index } = this.#where(pos);
    if (this.#ownedL2(l1Index) === 0) await this.#markDirty();
    const l2Offset = await this.#ensureL2(l1Index);
    const table = await this.#l2Table(l2Offset);
    const entries = new Uint8Array(count * 8);
    const ev = new DataView(entries.buffer);
    const dec = new Map<number, number>();
    let changed = false;
    let compressed = false;
    for (let i = 0; i < count; i++) {
      const hi = table.getUint32((l2Index + i) * 8);
      const lo = table.getUint32((l2Index + i) * 8 + 4);
      const type = this.#classify(table, l2Index + i, 0);
      const allocated = type === SC.NORMAL || type === SC.ZERO_ALLOC || type === SC.COMPRESSED;
      // v3: the zero flag (an allocated cluster freed only with unmap, a compressed one always); v2
      // without backing file: a discard (allocated clusters become unallocated).
      const free = v3 ? type === SC.COMPRESSED || (unmap && allocated) : allocated;
      const nhi = free ? 0 : hi;
      const nlo = v3 ? ((free ? 0 : lo) | L2E_ZERO_LO) >>> 0 : free ? 0 : lo;
      ev.setUint32(i * 8, nhi);
      ev.setUint32(i * 8 + 4, nlo);
      if (nhi !== hi || nlo !== lo) changed = true;
      if (free) {
        if (type === SC.COMPRESSED) compressed = true;
        for (const c of this.#entryClusters(hi, lo)) dec.set(c, (dec.get(c) ?? 0) - 1);
      }
    }
    if (!changed) return true;
    await this.#markDirty();
    await this.#setL2Entries(l2Offset, l2Index, entries);
    if (dec.size > 0) {
      await this.#fileFlush();
      if (compressed) this.#lastCompressed = undefined;
      // A write that mapped a cluster before the change may still be writing into it.
      await Promise.all([...this.#inPlace]);
      await this.#updateRefcounts(dec);
    }
    return true;
  }

  /**
   * Points L2 entry `l2Index` somewhere else (`hi`/`lo`), flushes, and only then drops the refcounts of
   * what the old entry `run` referenced (rule R4).
   */
  async #unlinkCluster(
    l2Offset: number,
    l2Index: number,
    hi: number,
    lo: number,
    run: Qcow2Run,
  ): Promise<void> {
    await this.#setL2Entry(l2Offset, l2Index, hi, lo);
    await this.#fileFlush();
    if (run.type === SC.COMPRESSED) this.#lastCompressed = undefined;
    // A write that mapped the cluster before the change may still be writing into it.
    await Promise.all([...this.#inPlace]);
    await this.#unrefEntry(run.entryHi, run.entryLo);
  }

  /**
   * Discards whole clusters (unaligned parts are ignored): an allocated cluster's L2 entry (compressed
   * ones too, as QEMU) becomes a zero cluster (v3) or unallocated (v2), the change is flushed, and only
   * then its refcount drops (rule R4).
   */
  protected override async _discard(offset: number, bytes: number): Promise<void> {
    this.#checkWritable(offset);
    await this.#prepare();
    const cs = this.clusterSize;
    let pos = Math.ceil(offset / cs) * cs;
    const end = Math.min(Math.floor((offset + bytes) / cs) * cs, Math.ceil(this.#size / cs) * cs);
    for (; pos < end; pos += cs) {
      const at = pos;
      await this.#locked(() => this.#discardCluster(at));
    }
  }

  async #discardCluster(pos: number): Promise<void> {
    await this.#flushPending();
    const run = await this.mapRun(pos, this.clusterSize);
    const v3 = this.header.version === 3;
    const allocated = run.type === SC.NORMAL || run.type === SC.ZERO_ALLOC || run.type === SC.COMPRESSED;
    if (!allocated) {
      // v3: an unallocated cluster over a backing file reads zeroes after a discard, as in QEMU.
      if (v3 && run.type === SC.UNALLOCATED_PLAIN && this.#backing !== undefined)
        await this.#zeroClusters(pos, 1, true, false);
      return;
    }
    await this.#markDirty();
    const { l1Index, l2Index } = this.#where(pos);
    await this.#unlinkCluster(await this.#ensureL2(l1Index), l2Index, 0, v3 ? L2E_ZERO_LO : 0, run);
  }

  // ---- resize ------------------------------------------------------------------------------------

  /**
   * Changes the virtual size (QEMU `qcow2_co_truncate` as `qemu-img resize` uses it). The size must be a
   * multiple of 512. Growing: a larger L1 table when needed (rule R5), then the `size` field (R7); when a
   * backing file reaches past the old end, the new area is made to read as zeroes (as the block layer asks
   * QEMU to). Shrinking: the clusters past the new end are freed (L2 entries, then L1 entries past the
   * new end, cleared and flushed before the refcounts drop; `l1_size` stays, as in QEMU), refcount blocks
   * left describing only themselves are dropped, the `size` field written, and the file cut after its last
   * used cluster.
   * @throws {BlkError} EINVAL size not a multiple of 512; ENOTSUP v2 image with snapshots, preallocation
   *   other than off; EFBIG L1 table too large; EROFS read-only
   */
  protected override async _truncate(length: number, flags: TruncateFlags): Promise<void> {
    this.#checkWritable(length);
    if (length % 512 !== 0) throw new BlkError("EINVAL", "The new size must be a multiple of 512");
    if (this.#snapshots.length > 0 && this.header.version < 3) {
      throw new BlkError("ENOTSUP", "Can't resize a v2 image which has snapshots");
    }
    const prealloc = flags.preallocation ?? "off";
    if (prealloc !== "off") {
      if (length < this.#size) {
        throw new BlkError("ENOTSUP", "Preallocation can't be used for shrinking an image");
      }
    }
    if (prealloc === "falloc" || prealloc === "full") {
      throw new BlkError(
        "ENOTSUP",
        `qcow2: resize with preallocation=${prealloc} is not supported in this version of blk`,
      );
    }
    await this.#prepare();
    const old = this.#size;
    if (length === old) return;
    await this.#locked(async () => {
      await this.#flushPending();
      if (length > old) await this.#grow(length, prealloc === "metadata");
      else await this.#shrink(length);
    });
    const b = this.#backing;
    if (length > old && b !== undefined && b.length > old) {
      // v3: zero clusters over the whole new area, as QEMU; v2 writes zeroes, so only where the backing
      // file would show through.
      const cs = this.clusterSize;
      const end = this.header.version === 3 ? length : Math.min(length, Math.ceil(b.length / cs) * cs);
      // The unaligned head is written as zeroes whatever lies around it, as QEMU's qcow2 truncate does.
      const head = Math.min(Math.ceil(old / cs) * cs, end) - old;
      if (head > 0) await this._write(old, new Uint8Array(head), {});
      if (end > old + head) await this._writeZeroes(old + head, end - old - head, {});
    }
  }

  /** L1 entries a virtual size of `size` bytes needs (QEMU `size_to_l1`). */
  #l1Entries(size: number): number {
    return Math.ceil(size / this.#perL2);
  }

  /** Writes the 8-byte `size` header field (write + flush). */
  async #writeSizeField(size: number): Promise<void> {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt(size));
    await this.#fileWrite(24, b);
    await this.#fileFlush();
    this.#size = size;
    this.header.size = size;
  }

  async #grow(length: number, metadata: boolean): Promise<void> {
    const need = this.#l1Entries(length);
    if (need > this.header.l1Size) await this.#growL1(need);
    if (metadata) await this.#preallocate(this.#size, length);
    await this.#writeSizeField(length);
  }

  /**
   * `preallocation=metadata` for guest bytes `[from, to)` (QEMU `preallocate_co`): per L2 table, the table
   * first, then one host run for its unallocated clusters (refcounts flushed before the L2 entries name
   * them); the file then reaches the end of the last one, so they read as zeroes. The runs go past every
   * used cluster, never into freed ones (whose old bytes they would show).
   */
  async #preallocate(from: number, to: number): Promise<void> {
    const cs = this.clusterSize;
    const hint = this.#freeHint;
    let tail = (await this.#lastUsedCluster()) + 1;
    let end = 0;
    for (let pos = Math.floor(from / cs) * cs; pos < to; ) {
      const { l1Index, l2Index } = this.#where(pos);
      const stop = Math.min(Math.ceil(to / cs) * cs, (l1Index + 1) * this.#perL2);
      const l2Offset = await this.#ensureL2(l1Index);
      const table = new DataView((await this.readFile(l2Offset, cs)).buffer);
      // Runs of consecutive clusters without a host cluster.
      for (let i = l2Index, c = pos; c < stop; ) {
        const hi = table.getUint32(i * 8);
        const lo = table.getUint32(i * 8 + 4);
        if ((hi & OFFSET_MASK_HI) !== 0 || (lo & OFFSET_MASK_LO) !== 0 || (hi & L2E_COMPRESSED_HI) !== 0) {
          i++;
          c += cs;
          continue;
        }
        let n = 1;
        while (c + n * cs < stop) {
          const h2 = table.getUint32((i + n) * 8);
          const l2 = table.getUint32((i + n) * 8 + 4);
          if ((h2 & OFFSET_MASK_HI) !== 0 || (l2 & OFFSET_MASK_LO) !== 0 || (h2 & L2E_COMPRESSED_HI) !== 0)
            break;
          n++;
        }
        this.#freeHint = Math.max(this.#freeHint, tail);
        const host = await this.#allocRun(n);
        tail = host / cs + n;
        const entries = new Uint8Array(n * 8);
        const ev = new DataView(entries.buffer);
        for (let k = 0; k < n; k++) {
          const h = host + k * cs;
          ev.setUint32(k * 8, (L2E_COPIED_HI | Math.floor(h / 2 ** 32)) >>> 0);
          ev.setUint32(k * 8 + 4, h >>> 0);
        }
        await this.#setL2Entries(l2Offset, i, entries);
        end = Math.max(end, host + n * cs);
        i += n;
        c += n * cs;
      }
      pos = stop;
    }
    this.#freeHint = Math.min(this.#freeHint, hint);
    await this.#fileFlush();
    if (end > this.#file.length) await this.#file.truncate(end);
  }

  /**
   * Moves the active L1 table to `entries` entries (QEMU `qcow2_grow_l1_table`, rule R5): new clusters
   * allocated (refcounts flushed), the table written there and flushed, then `l1_size` + `l1_table_offset`
   * (12 bytes at 36) switched with one write + flush, then the old table's clusters freed.
   */
  async #growL1(entries: number): Promise<void> {
    const cs = this.clusterSize;
    if (entries * 8 > MAX_L1_BYTES) throw new BlkError("EFBIG", "L1 table is too large");
    const oldSize = this.header.l1Size;
    const oldOff = this.header.l1TableOffset;
    const table = new Uint8Array(Math.ceil((entries * 8) / cs) * cs);
    const l1 = this.#activeL1;
    table.set(new Uint8Array(l1.buffer, l1.byteOffset, oldSize * 8));
    const off = await this.#allocRun(table.length / cs);
    // The entries only, as QEMU (the rest of the last cluster stays a hole at the file's end).
    await this.#fileWrite(off, table.subarray(0, entries * 8));
    await this.#fileFlush();
    const hb = new Uint8Array(12);
    const hv = new DataView(hb.buffer);
    hv.setUint32(0, entries);
    hv.setUint32(4, Math.floor(off / 2 ** 32));
    hv.setUint32(8, off >>> 0);
    await this.#fileWrite(36, hb);
    await this.#fileFlush();
    this.header.l1Size = entries;
    this.header.l1TableOffset = off;
    this.#activeL1 = new DataView(table.buffer, 0, entries * 8);
    this.#l1 = this.#activeL1;
    this.#l1Size = entries;
    if (oldSize > 0) {
      const m = new Map<number, number>();
      const n = Math.ceil((oldSize * 8) / cs);
      for (let k = 0; k < n; k++) m.set(oldOff / cs + k, -1);
      await this.#updateRefcounts(m);
    }
  }

  async #shrink(length: number): Promise<void> {
    const cs = this.clusterSize;
    const keep = this.#l1Entries(length);
    const l1Size = this.header.l1Size;
    // 1. Clusters past the new end inside L2 tables that stay.
    const cropEnd = Math.min(this.#size, keep * this.#perL2);
    for (let pos = Math.ceil(length / cs) * cs; pos < cropEnd; ) {
      const { l1Index, l2Index } = this.#where(pos);
      const stop = Math.min(cropEnd, (l1Index + 1) * this.#perL2);
      await this.#cropEntries(l1Index, l2Index, Math.ceil((stop - pos) / cs));
      pos = (l1Index + 1) * this.#perL2;
    }
    // 2. L1 entries past the new end cleared (write + flush; `l1_size` stays, as QEMU leaves it), then
    //    the L2 tables and what they reach lose the active L1's reference.
    const l1 = this.#activeL1;
    if (l1Size > keep) {
      const old = new Uint8Array(l1.buffer, l1.byteOffset + keep * 8, (l1Size - keep) * 8).slice();
      if (old.some((b) => b !== 0)) {
        await this.#fileWrite(this.header.l1TableOffset + keep * 8, new Uint8Array(old.length));
        await this.#fileFlush();
        new Uint8Array(l1.buffer, l1.byteOffset + keep * 8, old.length).fill(0);
        this.#cache.clear();
        this.#lastCompressed = undefined;
        const dec = new Map<number, number>();
        await this.#paths(new DataView(old.buffer), l1Size - keep, dec, -1);
        await this.#updateRefcounts(dec);
      }
    }
    // 3. Refcount blocks that now describe nothing but themselves, the new size (R7), the file's tail.
    await this.#shrinkReftable();
    await this.#writeSizeField(length);
    const end = ((await this.#lastUsedCluster()) + 1) * cs;
    if (end < this.#file.length) {
      try {
        await this.#file.truncate(end);
      } catch {
        // As QEMU: a file that cannot be cut keeps unused bytes at its end (not an error).
      }
    }
  }

  /**
   * Clears `count` L2 entries from `l2Index` of L1 entry `l1Index` (a full discard: unallocated, not
   * zero): the entries written and flushed, then the refcounts of what they referenced decremented (R4).
   */
  async #cropEntries(l1Index: number, l2Index: number, count: number): Promise<void> {
    const l1 = this.#activeL1;
    const hi = l1.getUint32(l1Index * 8);
    const lo = l1.getUint32(l1Index * 8 + 4);
    if ((hi & OFFSET_MASK_HI) === 0 && (lo & OFFSET_MASK_LO) === 0) return;
    const l2Offset = await this.#ensureL2(l1Index);
    const t = await this.readFile(l2Offset + l2Index * 8, count * 8);
    const tv = new DataView(t.buffer);
    const dec = new Map<number, number>();
    let any = false;
    for (let i = 0; i < count; i++) {
      const ehi = tv.getUint32(i * 8);
      const elo = tv.getUint32(i * 8 + 4);
      if (ehi === 0 && elo === 0) continue;
      any = true;
      for (const c of this.#entryClusters(ehi, elo)) dec.set(c, (dec.get(c) ?? 0) - 1);
    }
    if (!any) return;
    await this.#setL2Entries(l2Offset, l2Index, new Uint8Array(count * 8));
    await this.#fileFlush();
    this.#lastCompressed = undefined;
    await this.#updateRefcounts(dec);
  }

  /**
   * Drops refcount blocks whose only used cluster is themselves (QEMU `qcow2_shrink_reftable`): the
   * reftable entries cleared with one write + flush; a block described by another one is then freed.
   */
  async #shrinkReftable(): Promise<void> {
    const cs = this.clusterSize;
    const per = this.#perRefblock;
    const rt = new DataView(this.#reftable.buffer, this.#reftable.byteOffset, this.#reftable.length);
    const freed: number[] = [];
    for (let index = 0; index < this.#reftable.length / 8; index++) {
      const block = await this.#refblock(index);
      if (block === undefined) continue;
      const off = rt.getUint32(index * 8) * 2 ** 32 + ((rt.getUint32(index * 8 + 4) & OFFSET_MASK_LO) >>> 0);
      const self = off / cs - index * per;
      let used = false;
      for (let i = 0; i < per && !used; i++) if (i !== self && this.#refcountIn(block, i) !== 0) used = true;
      if (used) continue;
      if (self >= 0 && self < per && this.#refcountIn(block, self) !== 1) continue;
      freed.push(index);
    }
    if (freed.length === 0) return;
    const table = this.#reftable.slice();
    const tv = new DataView(table.buffer);
    const outside: number[] = [];
    for (const index of freed) {
      const off = tv.getUint32(index * 8) * 2 ** 32 + ((tv.getUint32(index * 8 + 4) & OFFSET_MASK_LO) >>> 0);
      if (Math.floor(off / cs / per) !== index) outside.push(off / cs);
      tv.setBigUint64(index * 8, 0n);
    }
    await this.#fileWrite(this.header.refcountTableOffset, table);
    await this.#fileFlush();
    this.#reftable.set(table);
    for (const index of freed) this.#refblocks.delete(index);
    const m = new Map<number, number>();
    for (const c of outside) m.set(c, -1);
    // A block described by a block just dropped is already free.
    for (const c of outside) if ((await this.#refblock(Math.floor(c / per))) === undefined) m.delete(c);
    await this.#updateRefcounts(m);
  }

  /** Index of the highest cluster with a non-zero refcount (QEMU `qcow2_get_last_cluster`). */
  async #lastUsedCluster(): Promise<number> {
    const per = this.#perRefblock;
    for (let index = this.#reftable.length / 8 - 1; index >= 0; index--) {
      const block = await this.#refblock(index);
      if (block === undefined) continue;
      for (let i = per - 1; i >= 0; i--) if (this.#refcountIn(block, i) !== 0) return index * per + i;
    }
    return 0;
  }

  // ---- internal snapshots -------------------------------------------------------------------------
  //
  // Refcounts count reference paths (qcow2.md §11, as `qemu-img check` counts them): an L2 table once per
  // L1 table (active or snapshot) naming it, a data cluster once per (L1 table, L2 entry) reaching it.
  // Every step makes refcounts stable before references appear and references go away before refcounts
  // drop, so a crash at any point leaves at most leaked clusters.

  /** Adds `sign` per reference path from the first `entries` entries of an L1 table to `into`. */
  async #paths(l1: DataView, entries: number, into: Map<number, number>, sign: 1 | -1): Promise<void> {
    const cs = this.clusterSize;
    const add = (c: number): void => {
      into.set(c, (into.get(c) ?? 0) + sign);
    };
    for (let i = 0; i < entries; i++) {
      const hi = l1.getUint32(i * 8);
      const lo = l1.getUint32(i * 8 + 4);
      const l2 = (hi & OFFSET_MASK_HI) * 2 ** 32 + ((lo & OFFSET_MASK_LO) >>> 0);
      if (l2 === 0) continue;
      if (l2 % cs !== 0) {
        throw new BlkError(
          "EIO",
          `qcow2: Image is corrupt: L2 table offset ${hex(l2)} unaligned (L1 index: ${hex(i)})`,
        );
      }
      add(l2 / cs);
      const t = await this.readFile(l2, cs);
      const tv = new DataView(t.buffer);
      for (let j = 0; j < this.#l2Entries; j++) {
        for (const c of this.#entryClusters(tv.getUint32(j * 8), tv.getUint32(j * 8 + 4))) add(c);
      }
    }
  }

  /**
   * Recomputes the COPIED flags of the active L1 and the L2 tables it names from the refcounts (set
   * exactly when the refcount is 1), writing the tables that change, then the L1 table, with flushes.
   */
  async #refreshCopied(): Promise<void> {
    const cs = this.clusterSize;
    const l1 = this.#activeL1;
    let l1Changed = false;
    for (let i = 0; i < this.header.l1Size; i++) {
      const hi = l1.getUint32(i * 8);
      const lo = l1.getUint32(i * 8 + 4);
      const l2 = (hi & OFFSET_MASK_HI) * 2 ** 32 + ((lo & OFFSET_MASK_LO) >>> 0);
      if (l2 === 0) continue;
      const nhi = ((await this.#refcountAt(l2 / cs)) === 1 ? hi | L1E_COPIED_HI : hi & ~L1E_COPIED_HI) >>> 0;
      if (nhi !== hi) {
        l1.setUint32(i * 8, nhi);
        l1Changed = true;
      }
      const t = await this.readFile(l2, cs);
      const tv = new DataView(t.buffer);
      let changed = false;
      for (let j = 0; j < this.#l2Entries; j++) {
        const ehi = tv.getUint32(j * 8);
        if ((ehi & L2E_COMPRESSED_HI) !== 0) continue;
        const host = (ehi & OFFSET_MASK_HI) * 2 ** 32 + ((tv.getUint32(j * 8 + 4) & OFFSET_MASK_LO) >>> 0);
        if (host === 0) continue;
        const one = (await this.#refcountAt(host / cs)) === 1;
        const n = (one ? ehi | L2E_COPIED_HI : ehi & ~L2E_COPIED_HI) >>> 0;
        if (n !== ehi) {
          tv.setUint32(j * 8, n);
          changed = true;
        }
      }
      if (changed) await this.#fileWrite(l2, t);
    }
    await this.#fileFlush();
    if (l1Changed) {
      await this.#fileWrite(
        this.header.l1TableOffset,
        new Uint8Array(l1.buffer, l1.byteOffset, this.header.l1Size * 8).slice(),
      );
      await this.#fileFlush();
    }
    this.#cache.clear();
  }

  /**
   * Writes a new snapshot table to newly allocated clusters (flushed), switches the header's
   * `nb_snapshots` + `snapshots_offset` (12 bytes at 60, write + flush), then frees the old table.
   */
  async #writeSnapshotTable(list: Qcow2Snapshot[]): Promise<void> {
    const cs = this.clusterSize;
    const bytes = serializeSnapshots(list);
    let off = 0;
    if (list.length > 0) {
      off = await this.#allocRun(Math.ceil(bytes.length / cs));
      await this.#fileWrite(off, bytes);
      await this.#fileFlush();
    }
    const oldOff = this.header.snapshotsOffset;
    const oldSize = this.#snapshotsSize;
    const hb = new Uint8Array(12);
    const hv = new DataView(hb.buffer);
    hv.setUint32(0, list.length);
    hv.setUint32(4, Math.floor(off / 2 ** 32));
    hv.setUint32(8, off >>> 0);
    await this.#fileWrite(60, hb);
    await this.#fileFlush();
    this.header.nbSnapshots = list.length;
    this.header.snapshotsOffset = off;
    this.#snapshots = list;
    this.#snapshotsSize = bytes.length;
    if (oldSize > 0) {
      const m = new Map<number, number>();
      for (let c = Math.floor(oldOff / cs); c * cs < oldOff + oldSize; c++) m.set(c, -1);
      await this.#updateRefcounts(m);
    }
  }

  /** Runs a snapshot operation: writable checks, then under the metadata lock once in-place writes ended. */
  async #snapshotOp<T>(fn: () => Promise<T>): Promise<T> {
    this.#checkWritable(0);
    let open: () => void = () => {};
    const gate = new Promise<void>((r) => {
      open = r;
    });
    this.#snapshotOps.add(gate);
    try {
      await this.#prepare();
      return await this.#locked(async () => {
        await Promise.all([...this.#inPlace]);
        await this.#flushPending();
        return fn();
      });
    } finally {
      this.#snapshotOps.delete(gate);
      open();
    }
  }

  /**
   * Creates internal snapshot `name` of the current state (QEMU `qcow2_snapshot_create`; duplicate
   * names allowed, ID = highest numeric ID + 1): refcounts of everything the active L1 reaches
   * incremented, COPIED flags cleared (so later writes copy on write), the active L1 copied to new
   * clusters, and the snapshot table rewritten.
   * @throws {BlkError} EROFS / ENOTSUP as writes; EINVAL when a refcount would exceed refcount_max
   */
  async createSnapshot(name: string, options: { date?: Date } = {}): Promise<Qcow2Snapshot> {
    return this.#snapshotOp(async () => {
      const cs = this.clusterSize;
      const l1Size = this.header.l1Size;
      const inc = new Map<number, number>();
      await this.#paths(this.#activeL1, l1Size, inc, 1);
      await this.#updateRefcounts(inc);
      await this.#refreshCopied();
      const l1 = this.#activeL1;
      const copy = new Uint8Array(l1.buffer, l1.byteOffset, l1Size * 8).slice();
      const l1Off = await this.#allocRun(Math.max(1, Math.ceil((l1Size * 8) / cs)));
      await this.#fileWrite(l1Off, copy);
      await this.#fileFlush();
      let maxId = 0;
      for (const s of this.#snapshots) {
        const n = /^\d+/.exec(s.id);
        if (n !== null) maxId = Math.max(maxId, Number(n[0]));
      }
      const ms = (options.date ?? new Date()).getTime();
      const sn: Qcow2Snapshot = {
        id: String(maxId + 1),
        name,
        l1TableOffset: l1Off,
        l1Size,
        dateSec: Math.floor(ms / 1000),
        dateNsec: (ms % 1000) * 1e6,
        vmClockNsec: 0,
        vmStateSize: 0,
        diskSize: this.#size,
        icount: 0,
        extraDataSize: 24,
        unknownExtraData: new Uint8Array(0),
      };
      await this.#writeSnapshotTable([...this.#snapshots, sn]);
      return sn;
    });
  }

  /** The snapshot with ID `idOrName`, else the first with that name (QEMU's lookup for `-a` / `-l`). */
  findSnapshot(idOrName: string): Qcow2Snapshot | undefined {
    return this.#snapshots.find((s) => s.id === idOrName) ?? this.#snapshots.find((s) => s.name === idOrName);
  }

  /**
   * Reverts the active state to a snapshot (QEMU `qcow2_snapshot_goto`): refcounts of what the snapshot
   * reaches incremented, its L1 written over the active L1 (flushed), the old state's refcounts
   * decremented, COPIED flags recomputed.
   * @throws {BlkError} ENOENT for an unknown snapshot; ENOTSUP when its disk size differs
   */
  async applySnapshot(idOrName: string): Promise<void> {
    return this.#snapshotOp(async () => {
      const sn = this.findSnapshot(idOrName);
      if (sn === undefined) throw new BlkError("ENOENT", "No such file or directory");
      const l1Size = this.header.l1Size;
      if (sn.diskSize !== this.#size || sn.l1Size > l1Size) {
        throw new BlkError(
          "ENOTSUP",
          "qcow2: reverting to a snapshot of another disk size is not supported in this version of blk",
        );
      }
      const next = new Uint8Array(l1Size * 8);
      next.set(await this.readFile(sn.l1TableOffset, sn.l1Size * 8));
      const nv = new DataView(next.buffer);
      for (let i = 0; i < l1Size; i++) nv.setUint32(i * 8, (nv.getUint32(i * 8) & ~L1E_COPIED_HI) >>> 0);
      const l1 = this.#activeL1;
      const old = new Uint8Array(l1.buffer, l1.byteOffset, l1Size * 8).slice();
      const inc = new Map<number, number>();
      await this.#paths(nv, l1Size, inc, 1);
      const dec = new Map<number, number>();
      await this.#paths(new DataView(old.buffer), l1Size, dec, -1);
      await this.#updateRefcounts(inc);
      await this.#fileWrite(this.header.l1TableOffset, next);
      await this.#fileFlush();
      new Uint8Array(l1.buffer, l1.byteOffset, l1Size * 8).set(next);
      this.#cache.clear();
      this.#lastCompressed = undefined;
      await this.#updateRefcounts(dec);
      await this.#refreshCopied();
    });
  }

  /**
   * Deletes the first snapshot named `name` (QEMU `qcow2_snapshot_delete` as `qemu-img snapshot -d`
   * calls it: by name only): the table rewritten without it, then the refcounts of what it reached and
   * of its L1 table decremented, COPIED flags recomputed.
   * @throws {BlkError} ENOENT "snapshot not found"
   */
  async deleteSnapshot(name: string): Promise<void> {
    return this.#snapshotOp(async () => {
      const cs = this.clusterSize;
      const index = this.#snapshots.findIndex((s) => s.name === name);
      const sn = this.#snapshots[index];
      if (sn === undefined) throw new BlkError("ENOENT", "snapshot not found");
      const l1 = await this.readFile(sn.l1TableOffset, sn.l1Size * 8);
      const dec = new Map<number, number>();
      await this.#paths(new DataView(l1.buffer), sn.l1Size, dec, -1);
      const l1Clusters = Math.max(1, Math.ceil((sn.l1Size * 8) / cs));
      for (let k = 0; k < l1Clusters; k++) {
        const c = sn.l1TableOffset / cs + k;
        dec.set(c, (dec.get(c) ?? 0) - 1);
      }
      await this.#writeSnapshotTable(this.#snapshots.filter((_, i) => i !== index));
      await this.#updateRefcounts(dec);
      this.#lastCompressed = undefined;
      await this.#refreshCopied();
    });
  }

  protected override async _flush(): Promise<void> {
    if (this.#readOnly) return;
    await this.#locked(() => this.#flushPending());
    await this.#fileFlush();
  }

  /**
   * Writes a new backing file name and format into the header (QEMU's `change_backing_file`), as stream and
   * commit do when they re-point a chain; `undefined` removes the backing file. Only the header changes:
   * the node's backing child is the graph's business.
   * @throws {BlkError} EROFS read-only; EINVAL/ENOSPC when the name does not fit
   */
  async changeBackingFile(filename: string | undefined, format: string | undefined): Promise<void> {
    if (this.#readOnly) throw new BlkError("EROFS", "qcow2: the image is open read-only");
    await this.#locked(async () => {
      const h = this.header;
      const c0 = await this.readFile(0, this.clusterSize);
      const bytes = rewriteBackingHeader(c0, h, filename, format);
      await this.#fileWrite(0, bytes);
      await this.#fileFlush();
      const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
      h.backingFileOffset = Number(v.getBigUint64(8));
      h.backingFileSize = v.getUint32(16);
      h.backingFile = filename;
      h.backingFormat = filename === undefined ? undefined : format;
    });
  }

  /**
   * QEMU's reopen between read-only and read-write (a job making a backing image its target). Going
   * read-write refuses what a read-write open refuses (a corrupt image, a snapshot view) and repairs a dirty
   * image as such an open does; going read-only first writes back as a clean close does and clears the
   * dirty bit this state set.
   * @throws {BlkError} EACCES corrupt image; EIO a dirty image that cannot be repaired; EROFS snapshot view
   */
  async reopen(changes: { readOnly: boolean }): Promise<void> {
    if (changes.readOnly === this.#readOnly) return;
    if (changes.readOnly) {
      await this.#bmReopenReadOnly();
      await this.#closeWritable();
      this.#readOnly = true;
      return;
    }
    if (this.snapshot !== undefined) throw new BlkError("EROFS", "qcow2: a snapshot view is read-only");
    if ((this.header.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0) {
      throw new BlkError("EACCES", "qcow2: Image is corrupt; cannot be opened read/write");
    }
    if (this.dirty) {
      // As a read-write open: a dirty image is repaired first.
      this.#readOnly = false;
      try {
        await this.repairDirty();
      } finally {
        this.#readOnly = true;
      }
    }
    await this.#bmReopenWritable();
    this.#readOnly = false;
  }

  /** Clean close: flushes, then clears the dirty bit this state set (lazy refcounts). */
  async #closeWritable(): Promise<void> {
    // After a fatal corruption nothing more is written (QEMU has dropped the driver).
    if (this.#readOnly || this.#gone) return;
    await this.#locked(async () => {
      await this.#flushPending();
      const end = this.#freeByteOffset;
      if (end % 512 !== 0) {
        // As qemu-img after compressed writes: the file (when they end it) ends on a 512-byte boundary.
        // The rest of that sector is unused: compressed data is appended in order within a host cluster.
        await this.#fileWrite(end, new Uint8Array(512 - (end % 512)));
      }
      await this.#fileFlush();
      if (this.#markedDirty) {
        this.header.incompatibleFeatures = (this.header.incompatibleFeatures & ~INCOMPAT_DIRTY) >>> 0;
        await this.#writeIncompat();
        this.#markedDirty = false;
      }
    });
  }

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
    this.#checkMedium(offset);
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

  /** What {@link runCheck} walks, as the image is now. */
  #checkInput(): CheckInput {
    return {
      header: this.header,
      fileLength: this.#file.length,
      l1: this.#activeL1,
      reftable: this.#reftable,
      snapshots: this.#snapshots,
      snapshotsSize: this.#snapshotsSize,
      bitmaps: this.bitmaps,
      hasDataFile: this.#hasDataFile,
      read: (o, n) => this.readFile(o, n),
    };
  }

  /**
   * `qemu-img check`, and with `repair` its `-r leaks` / `-r all` (see {@link runCheck}): every change is
   * written and flushed as made. A repair that leaves no corruption and no check error clears the dirty
   * and corrupt bits (QEMU `qcow2_mark_clean`, `qcow2_mark_consistent`).
   * @throws {BlkError} EROFS repair on a read-only image; {@link CheckFailedError} (EIO) when `-r leaks`
   *   finds a referenced cluster with refcount 0 (only a rebuild, `-r all`, helps)
   */
  protected override async _check(options: { repair?: "leaks" | "all" }): Promise<Qcow2CheckResult> {
    const mode = options.repair;
    if (mode === undefined) {
      // The file must hold every L2 entry linked so far.
      if (!this.#readOnly) await this.#locked(() => this.#flushPending());
      return runCheck(this.#checkInput());
    }
    if (this.#readOnly || this.snapshot !== undefined) {
      throw new BlkError("EROFS", "qcow2: the image is open read-only");
    }
    return this.#locked(() => this.#repair(mode));
  }

  async #repair(mode: "leaks" | "all"): Promise<Qcow2CheckResult> {
    await this.#flushPending();
    const fixer: CheckFixer = {
      mode,
      setRefcount: (k, from, to) => this.#updateRefcounts(new Map([[k, to - from]])),
      rebuild: (refs, clusters) => this.#rebuildRefcounts(refs, clusters),
      setL1Entry: async (i, hi, lo) => {
        const e = new Uint8Array(8);
        const ev = new DataView(e.buffer);
        ev.setUint32(0, hi);
        ev.setUint32(4, lo);
        await this.#fileWrite(this.header.l1TableOffset + i * 8, e);
        await this.#fileFlush();
        this.#activeL1.setUint32(i * 8, hi);
        this.#activeL1.setUint32(i * 8 + 4, lo);
      },
      setL2Entry: async (l2Offset, j, hi, lo) => {
        await this.#setL2Entry(l2Offset, j, hi, lo);
        await this.#fileFlush();
      },
      reload: () => this.#checkInput(),
    };
    const r = await runCheck(this.#checkInput(), fixer);
    await this.#fileFlush();
    if (r.checkErrors === 0 && r.corruptions === 0) {
      const bits = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
      if ((this.header.incompatibleFeatures & bits) !== 0) {
        this.header.incompatibleFeatures = (this.header.incompatibleFeatures & ~bits) >>> 0;
        await this.#writeIncompat();
      }
      this.#markedDirty = false;
    }
    return r;
  }

  /**
   * Replaces the refcount structure with one holding `refs` (QEMU `rebuild_refcount_structure`): new
   * refcount blocks for every range with a used cluster, then the reftable, placed first-fit among the
   * clusters `refs` leaves free (themselves counted), written and flushed; then the header switches to the
   * new table (12 bytes at 48, write + flush). The old structures become leaks the caller frees.
   */
  async #rebuildRefcounts(refs: (k: number) => number, clusters: number): Promise<void> {
    const cs = this.clusterSize;
    const per = this.#perRefblock;
    const used: number[] = [];
    for (let k = 0; k < clusters; k++) used.push(refs(k));
    let hint = 0;
    const alloc = (count: number): number => {
      let c = hint;
      for (;;) {
        let k = 0;
        while (k < count && (used[c + k] ?? 0) === 0) k++;
        if (k === count) break;
        c += k + 1;
      }
      for (let k = 0; k < count; k++) used[c + k] = 1;
      while ((used[hint] ?? 0) !== 0) hint++;
      return c;
    };
    const blocks = new Map<number, number>();
    const ranges = (): number[] => {
      const out: number[] = [];
      for (let r = 0; r * per < used.length; r++) {
        if (blocks.has(r)) continue;
        for (let k = r * per; k < Math.min(used.length, (r + 1) * per); k++) {
          if ((used[k] ?? 0) !== 0) {
            out.push(r);
            break;
          }
        }
      }
      return out;
    };
    let table = 0;
    let tableClusters = 0;
    for (;;) {
      for (let missing = ranges(); missing.length > 0; missing = ranges()) {
        for (const r of missing) blocks.set(r, alloc(1));
      }
      const entries = Math.max(...blocks.keys()) + 1;
      const need = Math.max(1, Math.ceil((entries * 8) / cs));
      if (tableClusters >= need) break;
      for (let k = 0; k < tableClusters; k++) used[table + k] = 0;
      hint = Math.min(hint, table);
      tableClusters = need;
      table = alloc(need);
    }
    if (tableClusters * cs > MAX_REFTABLE_BYTES) {
      throw new BlkError("EFBIG", "qcow2: the refcount table would exceed its maximum size");
    }
    const rt = new Uint8Array(tableClusters * cs);
    const rv = new DataView(rt.buffer);
    const max = 2 ** this.#refBits - 1;
    for (const [r, c] of [...blocks].sort((a, b) => a[0] - b[0])) {
      const block = new Uint8Array(cs);
      for (let i = 0; i < per && r * per + i < used.length; i++) {
        const v = Math.min(used[r * per + i] ?? 0, max);
        if (v !== 0) setRefcount(block, this.#refBits, i, v);
      }
      await this.#fileWrite(c * cs, block);
      rv.setUint32(r * 8, Math.floor((c * cs) / 2 ** 32));
      rv.setUint32(r * 8 + 4, (c * cs) >>> 0);
    }
    await this.#fileWrite(table * cs, rt);
    await this.#fileFlush();
    const hb = new Uint8Array(12);
    const hv = new DataView(hb.buffer);
    hv.setUint32(0, Math.floor((table * cs) / 2 ** 32));
    hv.setUint32(4, (table * cs) >>> 0);
    hv.setUint32(8, tableClusters);
    await this.#fileWrite(48, hb);
    await this.#fileFlush();
    this.header.refcountTableOffset = table * cs;
    this.header.refcountTableClusters = tableClusters;
    this.#reftable = rt;
    this.#refblocks.clear();
    this.#freeHint = 0;
    this.#freeByteOffset = 0;
  }

  /**
   * QEMU's repair of a dirty image on a read-write open (lazy refcounts after a crash): `check -r all`,
   * which clears the dirty bit when it leaves no corruption.
   * @throws {BlkError} `Could not repair dirty image: <reason>` (EIO, or the failure's code) when the repair
   *   cannot complete
   */
  async repairDirty(): Promise<void> {
    if (!this.dirty || this.#readOnly) return;
    // QEMU's wording: "Could not repair dirty image: <strerror>".
    const fail = (code: BlkError["code"], cause?: unknown): BlkError =>
      new BlkError(code, `Could not repair dirty image: ${strerror(code)}`, { cause });
    let r: Qcow2CheckResult;
    try {
      r = await this.#locked(() => this.#repair("all"));
    } catch (e) {
      throw fail(e instanceof BlkError ? e.code : "EIO", e);
    }
    const still = (this.header.incompatibleFeatures & INCOMPAT_DIRTY) !== 0;
    if (r.checkErrors > 0 || still) throw fail("EIO");
  }

  protected override async _close(): Promise<void> {
    await this.#closeWritable();
    this.#cache.clear();
    this.#lastCompressed = undefined;
  }

  // --- persistent bitmaps ---
  // qcow2.md §12 (bytes in bitmaps.ts). Lifecycle as QEMU: at open every bitmap is loaded, those found
  // in use are reported inconsistent (no bits); a writable open marks the others in use on disk before
  // any guest write (autoclear bit off, directory rewritten in place, autoclear bit on, each flushed). At
  // close the node hands its persistent bitmaps to storeBitmaps: new data clusters and tables, a new
  // directory, one header write switching to it (in-use cleared), then the old clusters are freed.

  /** Names accepted by canStoreBitmap and not stored yet (they count towards QEMU's limits). */
  readonly #bmPending = new Set<string>();

  #bmWritable(): boolean {
    return !this.#readOnly && this.snapshot === undefined;
  }

  /** The parsed directory, replaced in place when it changes (`bitmaps` is read-only for users). */
  #bmList(): Qcow2Bitmap[] {
    return this.bitmaps as Qcow2Bitmap[];
  }

  /**
   * Some bitmap is stored as up to date (in-use clear): writing would make it silently wrong, so writes
   * wait until {@link loadBitmaps} (a node opening the image) has marked it in use.
   */
  #bmUnmarked(): boolean {
    return this.bitmaps.some((b) => (b.flags & BME_FLAG_IN_USE) === 0);
  }

  /** The node this state belongs to, by name (QEMU's messages name it). */
  #bmNodeName(): string {
    const p = this.#file.parent as { nodeName?: unknown };
    return typeof p.nodeName === "string" ? p.nodeName : "";
  }

  /**
   * The bitmaps stored in the image (core's `loadBitmaps`, called when the node opens); opened writable,
   * it marks them in use on disk first (and drops an extension left stale by a program without bitmap
   * support, as QEMU: its clusters leak).
   * @throws {BlkError} EINVAL (EIO) when a bitmap's table or data is invalid (cannot be read), with
   *   QEMU's messages
   */
  async loadBitmaps(): Promise<PersistentBitmap[]> {
    // a snapshot view is not the state the bitmaps describe
    if (this.snapshot !== undefined) return [];
    const cs = this.clusterSize;
    const out: PersistentBitmap[] = [];
    for (const b of this.bitmaps) {
      const p: PersistentBitmap = {
        name: b.name,
        granularity: 2 ** b.granularityBits,
        enabled: (b.flags & BME_FLAG_AUTO) !== 0,
        inconsistent: (b.flags & BME_FLAG_IN_USE) !== 0,
      };
      if (p.inconsistent !== true) {
        // QEMU's messages (the image does not open)
        const fail = (what: string, e: unknown): BlkError => {
          const code = e instanceof BlkError ? e.code : "EIO";
          return new BlkError(code, `${what}: ${strerror(code)}`, { cause: e });
        };
        let table: ReturnType<typeof decodeBitmapTable>;
        try {
          table = decodeBitmapTable(await this.readFile(b.tableOffset, b.tableSize * 8), cs);
        } catch (e) {
          throw fail(`Could not read bitmap_table table from image for bitmap '${b.name}'`, e);
        }
        try {
          p.bits = await readBitmapData({
            size: this.#size,
            granularityBits: b.granularityBits,
            clusterSize: cs,
            table,
            readCluster: (o) => this.readFile(o, cs),
          });
        } catch (e) {
          throw fail(`Could not read bitmap '${b.name}' from image`, e);
        }
      }
      out.push(p);
    }
    if (this.#bmWritable()) await this.#locked(() => this.#bmMarkInUse());
    return out;
  }

  /** The node's own bitmaps (the node is the parent of the `file` edge). */
  #bmNodeBitmaps(): readonly DirtyBitmap[] {
    const p = this.#file.parent as { bitmaps?: readonly DirtyBitmap[] };
    return p.bitmaps ?? [];
  }

  /**
   * Reopen read-write (QEMU's `reopen_bitmaps_rw`): the bitmaps are marked in use on disk, and the node's
   * persistent bitmaps stop being read-only.
   */
  async #bmReopenWritable(): Promise<void> {
    await this.#locked(() => this.#bmMarkInUse());
    for (const b of this.#bmNodeBitmaps()) if (b.persistent && !b.inconsistent) b.readonly = false;
  }

  /**
   * Reopen read-only (QEMU's `reopen_bitmaps_ro`): the node's persistent bitmaps are stored as at close
   * (in-use cleared) and become read-only. Only while the `file` edge still holds the write permission:
   * when the node dropped it first, the bitmaps stay in use on disk (reported inconsistent next time).
   */
  async #bmReopenReadOnly(): Promise<void> {
    const list = this.#bmNodeBitmaps().filter((b) => b.persistent && !b.inconsistent && b.name !== undefined);
    if (list.length === 0) return;
    if (this.#bmWritable() && (this.#file.perm & PERM.WRITE) !== 0) await this.storeBitmaps(list);
    for (const b of list) b.readonly = true;
  }

  /** Writable open / reopen: every consistent bitmap gets the in-use flag on disk (flushed). */
  async #bmMarkInUse(): Promise<void> {
    const h = this.header;
    if (h.bitmaps === undefined && !h.bitmapsInconsistent) return;
    await this.#prepare();
    if (h.bitmapsInconsistent) {
      await this.writeHeaderExtension(BITMAPS_EXT_MAGIC, undefined);
      h.bitmapsInconsistent = false;
      return;
    }
    const list = this.#bmList();
    const dir = h.bitmaps;
    if (dir === undefined || list.every((b) => (b.flags & BME_FLAG_IN_USE) !== 0)) return;
    const next = list.map((b) => ({ ...b, flags: b.flags | BME_FLAG_IN_USE }));
    const bytes = encodeBitmapDirectory(next);
    if (bytes.length !== dir.directorySize) throw new BlkError("EIO", "Can't update bitmap directory");
    // While the directory is rewritten the extension is off: a torn write loses the bitmaps, never
    // passes stale ones as good.
    await this.#bmWriteAutoclear(h.autoclearFeatures & ~AUTOCLEAR_BITMAPS);
    await this.#fileWrite(dir.directoryOffset, bytes);
    await this.#fileFlush();
    await this.#bmWriteAutoclear(h.autoclearFeatures | AUTOCLEAR_BITMAPS);
    list.splice(0, list.length, ...next);
  }

  /** Writes `autoclear_features` (write + flush). */
  async #bmWriteAutoclear(value: number): Promise<void> {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setUint32(4, value >>> 0);
    await this.#fileWrite(HEADER_AUTOCLEAR_AT, b);
    await this.#fileFlush();
    this.header.autoclearFeatures = value >>> 0;
  }

  /**
   * QEMU's `can_store_new_dirty_bitmap` (core calls it for `persistent: true`).
   * @throws {BlkError} ENOTSUP on a v2 image; EINVAL past QEMU's limits (messages prefixed with
   *   `Can't make bitmap 'NAME' persistent in 'NODE': `)
   */
  canStoreBitmap(name: string, granularity: number): void {
    const existing = new Set([...this.bitmaps.map((b) => b.name), ...this.#bmPending]);
    existing.delete(name);
    checkCanStoreBitmap({
      name,
      granularity,
      nodeName: this.#bmNodeName(),
      version: this.header.version,
      size: this.#size,
      clusterSize: this.clusterSize,
      existing,
    });
    this.#bmPending.add(name);
  }

  /**
   * Stores the node's persistent bitmaps (core calls it from `close`): each gets new data clusters (only
   * the pieces with a dirty bit) and a new table, flags `auto` when enabled, in-use clear; bitmaps of the
   * image that are not given (inconsistent ones) stay as they are.
   * @throws {BlkError} EROFS read-only; EINVAL past QEMU's limits; EEXIST for a name the image holds and
   *   this state did not load
   */
  async storeBitmaps(bitmaps: readonly DirtyBitmap[]): Promise<void> {
    if (!this.#bmWritable()) throw new BlkError("EROFS", "No write access");
    await this.#locked(async () => {
      const cs = this.clusterSize;
      const next = this.bitmaps.map((b) => ({ ...b }));
      const replaced: Qcow2Bitmap[] = [];
      const work: { entry: Qcow2Bitmap; bitmap: DirtyBitmap }[] = [];
      for (const d of bitmaps) {
        const name = d.name;
        if (name === undefined || !d.persistent || d.inconsistent) continue;
        const why = bitmapConstraintError(name, d.granularity, this.#size, cs);
        if (why !== undefined) {
          throw new BlkError("EINVAL", `Bitmap '${name}' doesn't satisfy the constraints: ${why}`);
        }
        let entry = next.find((b) => b.name === name);
        if (entry === undefined) {
          entry = {
            name,
            tableOffset: 0,
            tableSize: 0,
            flags: 0,
            type: 1,
            granularityBits: 0,
            extraDataSize: 0,
          };
          next.push(entry);
        } else {
          if ((entry.flags & BME_FLAG_IN_USE) === 0) {
            throw new BlkError("EEXIST", `Bitmap '${name}' already exists in the image`);
          }
          replaced.push({ ...entry });
        }
        entry.flags = d.enabled ? BME_FLAG_AUTO : 0;
        entry.granularityBits = Math.log2(d.granularity);
        work.push({ entry, bitmap: d });
      }
      if (work.length === 0) return;
      await this.#prepare();
      const allocated: [number, number][] = [];
      let oldDir: { offset: number; size: number } | undefined;
      try {
        for (const { entry, bitmap } of work) {
          // the bitmap's own length (the node's): the table must cover every bit it serialises
          const n = bitmapTableEntries(bitmap.size, bitmap.granularity, cs);
          if (n === 0) throw new BlkError("EINVAL", "Failed to update bitmap extension: Invalid argument");
          const table = new Array<number>(n).fill(0);
          for (const piece of bitmapDataClusters(bitmap.hbitmap, cs)) {
            const off = await this.allocateClusters(1);
            allocated.push([off, 1]);
            await this.#fileWrite(off, piece.data);
            table[piece.index] = off;
          }
          const bytes = encodeBitmapTable(table);
          const clusters = Math.ceil(bytes.length / cs);
          const off = await this.allocateClusters(clusters);
          allocated.push([off, clusters]);
          const padded = new Uint8Array(clusters * cs);
          padded.set(bytes);
          await this.#fileWrite(off, padded);
          entry.tableOffset = off;
          entry.tableSize = n;
        }
        await this.#fileFlush();
        oldDir = await this.#bmSwitchDirectory(next, allocated);
      } catch (e) {
        for (const [off, n] of allocated) await this.freeClusters(off, n).catch(() => {});
        throw e;
      }
      this.#bmPending.clear();
      if (oldDir !== undefined) await this.freeClusters(oldDir.offset, Math.ceil(oldDir.size / cs));
      for (const b of replaced) await this.#bmFreeTable(b);
    });
  }

  /**
   * Deletes bitmap `name` from the image now (core calls it for `block-dirty-bitmap-remove` of a
   * persistent bitmap): a new directory without it (or no extension), then its clusters are freed.
   * Absent: nothing to do (as QEMU).
   * @throws {BlkError} EROFS read-only
   */
  async removePersistentBitmap(name: string): Promise<void> {
    this.#bmPending.delete(name);
    const gone = this.bitmaps.find((b) => b.name === name);
    if (gone === undefined) return;
    if (!this.#bmWritable()) throw new BlkError("EROFS", "No write access");
    await this.#locked(async () => {
      await this.#prepare();
      const next = this.bitmaps.filter((b) => b.name !== name).map((b) => ({ ...b }));
      const allocated: [number, number][] = [];
      let oldDir: { offset: number; size: number } | undefined;
      try {
        oldDir = await this.#bmSwitchDirectory(next, allocated);
      } catch (e) {
        for (const [off, n] of allocated) await this.freeClusters(off, n).catch(() => {});
        throw e;
      }
      if (oldDir !== undefined) {
        await this.freeClusters(oldDir.offset, Math.ceil(oldDir.size / this.clusterSize));
      }
      await this.#bmFreeTable(gone);
    });
  }

  /**
   * Writes `next` as a new directory (allocated clusters appended to `allocated`, flushed) and switches
   * the header to it with one write (no bitmaps: the extension and autoclear bit 0 go). Returns where the
   * old directory was, for the caller to free once nothing can fail any more.
   */
  async #bmSwitchDirectory(
    next: Qcow2Bitmap[],
    allocated: [number, number][],
  ): Promise<{ offset: number; size: number } | undefined> {
    const h = this.header;
    const cs = this.clusterSize;
    let ext: Uint8Array | undefined;
    let where: Qcow2Header["bitmaps"];
    let autoclear = h.autoclearFeatures & ~AUTOCLEAR_BITMAPS;
    if (next.length > 0) {
      const dir = encodeBitmapDirectory(next);
      const clusters = Math.ceil(dir.length / cs);
      const off = await this.allocateClusters(clusters);
      allocated.push([off, clusters]);
      await this.#fileWrite(off, dir);
      await this.#fileFlush();
      ext = encodeBitmapsExtension(next.length, dir.length, off);
      where = { nbBitmaps: next.length, directorySize: dir.length, directoryOffset: off };
      autoclear |= AUTOCLEAR_BITMAPS;
    }
    const old = h.bitmaps;
    await this.writeHeaderExtension(BITMAPS_EXT_MAGIC, ext, autoclear);
    allocated.length = 0;
    h.bitmaps = where;
    const list = this.#bmList();
    list.splice(0, list.length, ...next);
    return old === undefined ? undefined : { offset: old.directoryOffset, size: old.directorySize };
  }

  /**
   * Frees the clusters of a bitmap no longer in the directory: its data clusters, then its table. A table
   * that does not parse is left alone (a leak `check -r leaks` repairs, never a double free).
   */
  async #bmFreeTable(b: Qcow2Bitmap): Promise<void> {
    const cs = this.clusterSize;
    if (b.tableOffset === 0 || b.tableSize === 0) return;
    let table: ReturnType<typeof decodeBitmapTable>;
    try {
      table = decodeBitmapTable(await this.readFile(b.tableOffset, b.tableSize * 8), cs);
    } catch {
      return;
    }
    for (const e of table) if (e.offset !== 0) await this.freeClusters(e.offset, 1);
    await this.freeClusters(b.tableOffset, Math.ceil((b.tableSize * 8) / cs));
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
