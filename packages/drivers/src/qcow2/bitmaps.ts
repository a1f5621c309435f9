/**
 * qcow2 persistent dirty bitmaps, the pure part (no I/O): the bitmaps header extension, the bitmap
 * directory and bitmap tables as bytes, the serialisation of an {@link HBitmap} into bitmap data clusters
 * and back, and QEMU's limits with its messages. {@link Qcow2State} does the I/O (section "persistent
 * bitmaps" of state.ts).
 *
 * Layout (qcow2.md §12): bit k of a bitmap covers guest bytes `[k·g, (k+1)·g)`, LSB first in each byte;
 * the data is cut into cluster-sized pieces, each named by one u64 of the bitmap table. A piece with no
 * dirty bit is not stored (table entry 0); QEMU never writes the "all ones" entry (bit 0 without an
 * offset) but reads it, and so does blk.
 */
import { BlkError } from "@blk/core";
import { HBitmap } from "@blk/hbitmap";
import { BME_FLAG_AUTO, BME_FLAG_IN_USE, type Qcow2Bitmap } from "./format.ts";

/** Header extension type of the bitmaps extension. */
export const BITMAPS_EXT_MAGIC = 0x23852875;
/** QEMU's `QCOW2_MAX_BITMAPS`. */
const MAX_PERSISTENT_BITMAPS = 65535;
/** QEMU's `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`. */
const MAX_BITMAP_DIRECTORY_BYTES = 1024 * 65535;
/** Longest bitmap name, in bytes (`BME_MAX_NAME_SIZE`). */
const MAX_BITMAP_NAME_BYTES = 1023;
/** Most bitmap table entries (`BME_MAX_TABLE_SIZE`). */
const MAX_TABLE_ENTRIES = 0x8000000;
/** Most bitmap data bytes (`BME_MAX_PHYS_SIZE`). */
const MAX_DATA_BYTES = 0x20000000;
/** Granularity bounds, log2 bytes (`BME_MIN/MAX_GRANULARITY_BITS`). */
const MIN_GRANULARITY_BITS = 9;
const MAX_GRANULARITY_BITS = 31;
/** Bitmap table entry: bits 1-8 and 56-63 are reserved (as two 32-bit halves). */
const TABLE_RESERVED_HI = 0xff000000;
const TABLE_RESERVED_LO = 0x1fe;
/** Bitmap table entry: bit 0 without an offset, the piece reads as all ones. */
const TABLE_ALL_ONES = 1;
/** Directory entry type 1: dirty tracking bitmap. */
const TYPE_DIRTY_TRACKING = 1;

const utf8 = new TextEncoder();

/** Bytes of the name as stored (UTF-8; QEMU counts `strlen`). */
function bitmapNameBytes(name: string): number {
  return utf8.encode(name).length;
}

/** Size of a directory entry (24-byte header + name, padded to 8), no extra data. */
export function bitmapDirEntrySize(name: string): number {
  return Math.ceil((24 + bitmapNameBytes(name)) / 8) * 8;
}

/** Bytes of bitmap data for `size` guest bytes at `granularity` bytes per bit. */
function bitmapDataBytes(size: number, granularity: number): number {
  return Math.ceil(Math.ceil(size / granularity) / 8);
}

/** Entries of the bitmap table (one per cluster of data). */
export function bitmapTableEntries(size: number, granularity: number, clusterSize: number): number {
  return Math.ceil(bitmapDataBytes(size, granularity) / clusterSize);
}

/**
 * QEMU's `check_constraints_on_bitmap`: why a bitmap of `name` / `granularity` cannot be stored in an
 * image of `size` bytes, or undefined when it can.
 */
export function bitmapConstraintError(
  name: string,
  granularity: number,
  size: number,
  clusterSize: number,
): string | undefined {
  const bits = Math.log2(granularity);
  if (bits > MAX_GRANULARITY_BITS) return `Granularity exceeds maximum (${2 ** MAX_GRANULARITY_BITS} bytes)`;
  if (bits < MIN_GRANULARITY_BITS) return `Granularity is under minimum (${2 ** MIN_GRANULARITY_BITS} bytes)`;
  const bytes = bitmapDataBytes(size, granularity);
  if (bytes > MAX_DATA_BYTES || bytes > MAX_TABLE_ENTRIES * clusterSize) {
    return "Too much space will be occupied by the bitmap. Use larger granularity";
  }
  if (bitmapNameBytes(name) > MAX_BITMAP_NAME_BYTES) {
    return `Name length exceeds maximum (${MAX_BITMAP_NAME_BYTES} characters)`;
  }
  return undefined;
}

/**
 * The checks of QEMU's `can_store_new_dirty_bitmap` for qcow2, with its messages (prefixed with
 * `Can't make bitmap 'NAME' persistent in 'NODE': `).
 * @throws {BlkError} ENOTSUP for a v2 image; EINVAL for a bad granularity, size or name, or when the
 *   image already holds as many bitmaps (or as large a directory) as QEMU allows
 */
export function checkCanStoreBitmap(input: {
  name: string;
  granularity: number;
  nodeName: string;
  version: number;
  size: number;
  clusterSize: number;
  /** Names of the persistent bitmaps the image has or will have (without `name`). */
  existing: Iterable<string>;
}): void {
  const fail = (code: "ENOTSUP" | "EINVAL", why: string): never => {
    throw new BlkError(code, `Can't make bitmap '${input.name}' persistent in '${input.nodeName}': ${why}`);
  };
  if (input.version < 3) fail("ENOTSUP", "Cannot store dirty bitmaps in qcow2 v2 files");
  const why = bitmapConstraintError(input.name, input.granularity, input.size, input.clusterSize);
  if (why !== undefined) fail("EINVAL", why);
  let count = 1;
  let dirBytes = bitmapDirEntrySize(input.name);
  for (const n of input.existing) {
    count++;
    dirBytes += bitmapDirEntrySize(n);
  }
  if (count > MAX_PERSISTENT_BITMAPS)
    fail("EINVAL", "Maximum number of persistent bitmaps is already reached");
  if (dirBytes > MAX_BITMAP_DIRECTORY_BYTES) fail("EINVAL", "Not enough space in the bitmap directory");
}

/** The 24 data bytes of the bitmaps header extension. */
export function encodeBitmapsExtension(
  count: number,
  directorySize: number,
  directoryOffset: number,
): Uint8Array {
  const out = new Uint8Array(24);
  const v = new DataView(out.buffer);
  v.setUint32(0, count);
  v.setBigUint64(8, BigInt(directorySize));
  v.setBigUint64(16, BigInt(directoryOffset));
  return out;
}

/**
 * The bitmap directory for `list`, in order (what {@link parseBitmapDirectory} reads back): no extra
 * data, type 1, each entry padded to 8 bytes.
 * @throws {BlkError} EINVAL past QEMU's count or directory size limits
 */
export function encodeBitmapDirectory(list: readonly Qcow2Bitmap[]): Uint8Array {
  if (list.length > MAX_PERSISTENT_BITMAPS) throw new BlkError("EINVAL", "Too many persistent bitmaps");
  const size = list.reduce((n, b) => n + bitmapDirEntrySize(b.name), 0);
  if (size > MAX_BITMAP_DIRECTORY_BYTES) throw new BlkError("EINVAL", "Bitmap directory is too large");
  const out = new Uint8Array(size);
  const v = new DataView(out.buffer);
  let off = 0;
  for (const b of list) {
    const name = utf8.encode(b.name);
    v.setBigUint64(off, BigInt(b.tableOffset));
    v.setUint32(off + 8, b.tableSize);
    v.setUint32(off + 12, b.flags & (BME_FLAG_IN_USE | BME_FLAG_AUTO));
    v.setUint8(off + 16, TYPE_DIRTY_TRACKING);
    v.setUint8(off + 17, b.granularityBits);
    v.setUint16(off + 18, name.length);
    v.setUint32(off + 20, 0);
    out.set(name, off + 24);
    off += bitmapDirEntrySize(b.name);
  }
  return out;
}

/** A bitmap table as bytes: `entries[i]` is the host offset of piece i, or 0 (all clean). */
export function encodeBitmapTable(entries: readonly number[]): Uint8Array {
  const out = new Uint8Array(entries.length * 8);
  const v = new DataView(out.buffer);
  for (let i = 0; i < entries.length; i++) v.setBigUint64(i * 8, BigInt(entries[i] ?? 0));
  return out;
}

/** One entry of a bitmap table read from the image. */
export interface BitmapTableEntry {
  /** Host offset of the data cluster; 0 when the piece is not stored. */
  offset: number;
  /** No data cluster and the "all ones" bit set. */
  allOnes: boolean;
}

/**
 * Parses a bitmap table (QEMU's `check_table_entry` rules).
 * @throws {BlkError} EINVAL for a reserved bit, an unaligned offset or "all ones" with an offset
 */
export function decodeBitmapTable(bytes: Uint8Array, clusterSize: number): BitmapTableEntry[] {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const out: BitmapTableEntry[] = [];
  for (let i = 0; i + 8 <= bytes.length; i += 8) {
    const hi = v.getUint32(i);
    const lo = v.getUint32(i + 4);
    if ((hi & TABLE_RESERVED_HI) !== 0 || (lo & TABLE_RESERVED_LO) !== 0) {
      throw new BlkError("EINVAL", "Invalid bitmap table entry");
    }
    const offset = hi * 2 ** 32 + ((lo & ~0x1ff) >>> 0);
    const allOnes = (lo & TABLE_ALL_ONES) !== 0;
    if (offset !== 0 && (allOnes || offset % clusterSize !== 0)) {
      throw new BlkError("EINVAL", "Invalid bitmap table entry");
    }
    out.push({ offset, allOnes: offset === 0 && allOnes });
  }
  return out;
}

/** Guest bytes one cluster of bitmap data covers (QEMU's `serialization_coverage`). */
function coverage(granularity: number, clusterSize: number): number {
  return granularity * clusterSize * 8;
}

/**
 * Cuts `hb` into cluster-sized pieces of bitmap data as QEMU stores them: only the pieces holding a
 * dirty bit, each a whole cluster (zero padded).
 */
export function* bitmapDataClusters(
  hb: HBitmap,
  clusterSize: number,
): Generator<{ index: number; data: Uint8Array }> {
  const g = 2 ** hb.granularity;
  const limit = coverage(g, clusterSize);
  const size = hb.size;
  for (let start = hb.nextDirty(0); start >= 0; ) {
    const index = Math.floor(start / limit);
    const from = index * limit;
    const count = Math.min(size - from, limit);
    const data = new Uint8Array(clusterSize);
    hb.serializePart(data, from, count);
    yield { index, data };
    start = from + count >= size ? -1 : hb.nextDirty(from + count);
  }
}

/**
 * Rebuilds a bitmap of `size` guest bytes from its table and a reader of data clusters.
 * @throws {BlkError} EINVAL when the table does not have exactly the entries the size needs
 */
export async function readBitmapData(input: {
  size: number;
  granularityBits: number;
  clusterSize: number;
  table: readonly BitmapTableEntry[];
  readCluster: (offset: number) => Promise<Uint8Array>;
}): Promise<HBitmap> {
  const { size, clusterSize, table } = input;
  const g = 2 ** input.granularityBits;
  const hb = new HBitmap(size, input.granularityBits);
  if (table.length !== bitmapTableEntries(size, g, clusterSize)) {
    throw new BlkError("EINVAL", "Bitmap table size does not match the image size");
  }
  const limit = coverage(g, clusterSize);
  for (let i = 0; i < table.length; i++) {
    const e = table[i] as BitmapTableEntry;
    const from = i * limit;
    const count = Math.min(size - from, limit);
    if (e.offset !== 0) hb.deserializePart(await input.readCluster(e.offset), from, count, false);
    else if (e.allOnes) hb.deserializeOnes(from, count, false);
  }
  hb.deserializeFinish();
  return hb;
}
