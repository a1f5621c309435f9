/**
 * qcow2 on-disk structures: header, header extensions, snapshot table, bitmap directory.
 *
 * Reference: /work/shared/spec/qcow2.md (QEMU's docs/interop/qcow2.txt). Everything is big-endian.
 * 64-bit fields are read as two 32-bit halves; an offset is `hi * 2**32 + lo` once `hi` is known to keep
 * it below 2^53. Error strings that QEMU prints on open are matched exactly.
 */
import { BlkError } from "@blk/core";

/** "QFI\xfb" (qcow2.txt header bytes 0-3). */
export const QCOW2_MAGIC = 0x514649fb;

/** Incompatible feature bits (qcow2.txt header bytes 72-79). */
export const INCOMPAT_DIRTY = 0x01;
export const INCOMPAT_CORRUPT = 0x02;
export const INCOMPAT_DATA_FILE = 0x04;
export const INCOMPAT_COMPRESSION = 0x08;
export const INCOMPAT_EXTL2 = 0x10;
/** The incompatible bits QEMU 7.2 knows. */
const INCOMPAT_KNOWN = 0x1f;
/** Compatible bit 0: lazy refcounts. */
export const COMPAT_LAZY_REFCOUNTS = 0x01;
/** Autoclear bit 0: the bitmaps extension is consistent. */
const AUTOCLEAR_BITMAPS = 0x01;
/** Autoclear bit 1: the external data file is raw. */
export const AUTOCLEAR_DATA_FILE_RAW = 0x02;

/** Header extension types (qcow2.txt "Header extensions"). */
export const QCOW2_EXT = {
  END: 0x00000000,
  BACKING_FORMAT: 0xe2792aca,
  FEATURE_TABLE: 0x6803f857,
  BITMAPS: 0x23852875,
  CRYPTO: 0x0537be77,
  DATA_FILE: 0x44415441,
} as const;
const EXT_END = QCOW2_EXT.END;
const EXT_BACKING_FORMAT = QCOW2_EXT.BACKING_FORMAT;
const EXT_FEATURE_TABLE = QCOW2_EXT.FEATURE_TABLE;
const EXT_BITMAPS = QCOW2_EXT.BITMAPS;
const EXT_CRYPTO = QCOW2_EXT.CRYPTO;
const EXT_DATA_FILE = QCOW2_EXT.DATA_FILE;

/** QEMU's feature name table (qcow2.md §3.4), in QEMU's order: (type, bit, name). */
const FEATURES: readonly [number, number, string][] = [
  [0, 0, "dirty bit"],
  [0, 1, "corrupt bit"],
  [0, 2, "external data file"],
  [0, 3, "compression type"],
  [0, 4, "extended L2 entries"],
  [1, 0, "lazy refcounts"],
  [2, 0, "bitmaps"],
  [2, 1, "raw external data"],
];

/**
 * The payload of the feature name table extension QEMU 7.2 writes (48 bytes per feature: type, bit,
 * name padded with zeroes), which version-3 images with clusters over 4 KiB carry.
 */
export function featureNameTable(): Uint8Array {
  const t = new Uint8Array(FEATURES.length * 48);
  FEATURES.forEach(([type, bit, name], i) => {
    t[i * 48] = type;
    t[i * 48 + 1] = bit;
    t.set(Buffer.from(name, "latin1"), i * 48 + 2);
  });
  return t;
}

/** QEMU's implementation limits (block/qcow2.h). */
export const MAX_L1_BYTES: number = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES: number = 8 * 1024 * 1024;
const MAX_SNAPSHOTS = 65536;
const MAX_SNAPSHOTS_TABLE_BYTES: number = 64 * 1024 * 1024;
const MAX_SNAPSHOT_EXTRA_DATA = 1024;
const MAX_BITMAPS = 65535;
const MAX_BITMAP_DIRECTORY_SIZE: number = 1024 * 65535;
const MAX_BACKING_NAME = 1023;
/**
 * Rewrites the first cluster for a new backing file (QEMU's `change_backing_file`): every header extension
 * is kept as it is except the backing-format one, which is replaced (first, where QEMU writes it) or dropped;
 * then the end marker and the new name. Returns the bytes to write at offset 0 — as long as what they
 * replace, so no stale name survives — and the new name's offset and length for the header fields.
 * @throws {BlkError} EINVAL a name over QEMU's 1023-byte limit; ENOSPC when it all does not fit in cluster 0
 */
export function rewriteBackingHeader(
  cluster0: Uint8Array,
  h: Pick<Qcow2Header, "headerLength" | "backingFileOffset" | "backingFileSize">,
  backingFile: string | undefined,
  backingFormat: string | undefined,
): Uint8Array {
  const cs = cluster0.length;
  const view = new DataView(cluster0.buffer, cluster0.byteOffset, cluster0.length);
  const extEnd = h.backingFileOffset !== 0 ? h.backingFileOffset : cs;
  const parts: Uint8Array[] = [cluster0.slice(0, h.headerLength)];
  const ext = (type: number, data: Uint8Array): Uint8Array => {
    const out = new Uint8Array(8 + Math.ceil(data.length / 8) * 8);
    const dv = new DataView(out.buffer);
    dv.setUint32(0, type);
    dv.setUint32(4, data.length);
    out.set(data, 8);
    return out;
  };
  const name = backingFile === undefined ? new Uint8Array(0) : Buffer.from(backingFile, "utf8");
  if (name.length > MAX_BACKING_NAME) throw einval("Backing file name too long");
  if (backingFile !== undefined && backingFormat !== undefined) {
    parts.push(ext(EXT_BACKING_FORMAT, Buffer.from(backingFormat, "latin1")));
  }
  for (let off = h.headerLength; off + 8 <= extEnd; ) {
    const type = view.getUint32(off);
    const len = view.getUint32(off + 4);
    if (type === EXT_END) break;
    const total = 8 + Math.ceil(len / 8) * 8;
    if (off + total > extEnd) throw einval("Header extension too large");
    if (type !== EXT_BACKING_FORMAT) parts.push(cluster0.slice(off, off + total));
    off += total;
  }
  parts.push(new Uint8Array(8));
  const extBytes = parts.reduce((n, b) => n + b.length, 0);
  if (extBytes + name.length > cs) throw new BlkError("ENOSPC", "Not enough space for the backing file name");
  const oldEnd = h.backingFileOffset !== 0 ? h.backingFileOffset + h.backingFileSize : extBytes;
  const out = new Uint8Array(Math.max(extBytes + name.length, oldEnd));
  let at = 0;
  for (const b of parts) {
    out.set(b, at);
    at += b.length;
  }
  out.set(name, at);
  const dv = new DataView(out.buffer);
  dv.setBigUint64(8, BigInt(name.length === 0 ? 0 : at));
  dv.setUint32(16, name.length);
  return out;
}

/**
 * Rewrites the first cluster with header extension `type` replaced by `data` (QEMU rewrites the whole
 * header; this keeps every other extension's bytes): an existing one is replaced where it is (removed
 * when `data` is undefined), a new one is placed after the crypto / backing-format / data-file / feature
 * table extensions, where QEMU writes them. The backing file name follows the extensions. Returns the
 * bytes to write at offset 0 (at least as long as what they replace), header fields 8-19 updated.
 * @throws {BlkError} EINVAL malformed extensions; ENOSPC when it all does not fit in cluster 0
 */
export function rewriteHeaderExtension(
  cluster0: Uint8Array,
  h: Pick<Qcow2Header, "headerLength" | "backingFileOffset" | "backingFileSize">,
  type: number,
  data: Uint8Array | undefined,
): Uint8Array {
  const cs = cluster0.length;
  const view = new DataView(cluster0.buffer, cluster0.byteOffset, cluster0.length);
  const extEnd = h.backingFileOffset !== 0 ? h.backingFileOffset : cs;
  const encoded = (): Uint8Array => {
    const d = data ?? new Uint8Array(0);
    const out = new Uint8Array(8 + Math.ceil(d.length / 8) * 8);
    const dv = new DataView(out.buffer);
    dv.setUint32(0, type);
    dv.setUint32(4, d.length);
    out.set(d, 8);
    return out;
  };
  const before = new Set<number>([EXT_CRYPTO, EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_FEATURE_TABLE]);
  const parts: Uint8Array[] = [cluster0.slice(0, h.headerLength)];
  let placed = false;
  for (let off = h.headerLength; off + 8 <= extEnd; ) {
    const t = view.getUint32(off);
    const len = view.getUint32(off + 4);
    if (t === EXT_END) break;
    const total = 8 + Math.ceil(len / 8) * 8;
    if (off + total > extEnd) throw einval("Header extension too large");
    if (t === type) {
      if (data !== undefined && !placed) parts.push(encoded());
      placed = true;
    } else {
      if (!placed && data !== undefined && !before.has(t)) {
        parts.push(encoded());
        placed = true;
      }
      parts.push(cluster0.slice(off, off + total));
    }
    off += total;
  }
  if (!placed && data !== undefined) parts.push(encoded());
  parts.push(new Uint8Array(8));
  const name =
    h.backingFileOffset !== 0
      ? cluster0.slice(h.backingFileOffset, h.backingFileOffset + h.backingFileSize)
      : new Uint8Array(0);
  const extBytes = parts.reduce((n, b) => n + b.length, 0);
  if (extBytes + name.length > cs) throw new BlkError("ENOSPC", "Not enough space for the header extensions");
  const oldEnd = h.backingFileOffset !== 0 ? h.backingFileOffset + h.backingFileSize : h.headerLength;
  // The old extensions' end (their end marker included), so that no stale extension bytes survive.
  let oldExtEnd = h.headerLength;
  while (oldExtEnd + 8 <= extEnd) {
    const t = view.getUint32(oldExtEnd);
    oldExtEnd += 8 + Math.ceil(view.getUint32(oldExtEnd + 4) / 8) * 8;
    if (t === EXT_END) break;
  }
  const out = new Uint8Array(Math.max(extBytes + name.length, oldEnd, Math.min(oldExtEnd, cs)));
  let at = 0;
  for (const b of parts) {
    out.set(b, at);
    at += b.length;
  }
  out.set(name, at);
  const dv = new DataView(out.buffer);
  dv.setBigUint64(8, BigInt(name.length === 0 ? 0 : at));
  dv.setUint32(16, name.length);
  return out;
}

/** A snapshot table entry's fixed part. */
const SNAPSHOT_HEADER_SIZE = 40;

/** 2^53 expressed as a high half bound: `hi` must be at most this for an exact JS number. */
const HI_SAFE = 0x1fffff;

/**
 * Reads a big-endian u64 as a number.
 * @throws {BlkError} EFBIG when the value is 2^53 or more
 */
function u64(view: DataView, at: number, what: string): number {
  const hi = view.getUint32(at);
  const lo = view.getUint32(at + 4);
  if (hi > HI_SAFE) throw new BlkError("EFBIG", `${what} is too large`);
  return hi * 2 ** 32 + lo;
}

/** A header extension kept as read (unknown ones are preserved for a later header rewrite). */
export interface Qcow2Extension {
  type: number;
  /** Offset of the extension's data in the file. */
  offset: number;
  data: Uint8Array;
}

/** One entry of the feature name table. */
export interface Qcow2FeatureName {
  type: "incompatible" | "compatible" | "autoclear";
  bit: number;
  name: string;
}

/** The parsed header (qcow2.txt "Header") plus what the extensions add. */
export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  /** Low 32 bits; bits above 31 are refused (QEMU knows only bits 0-4). */
  incompatibleFeatures: number;
  /** Any bit at or above 32 is set. */
  incompatibleHigh: number;
  compatibleFeatures: number;
  autoclearFeatures: number;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Header bytes between QEMU's struct end and `header_length` (preserved on rewrite). */
  unknownHeaderFields: Uint8Array;
  backingFile: string | undefined;
  backingFormat: string | undefined;
  dataFile: string | undefined;
  featureTable: Qcow2FeatureName[];
  /** Bitmaps extension (only when autoclear bit 0 is set, as QEMU). */
  bitmaps: { nbBitmaps: number; directorySize: number; directoryOffset: number } | undefined;
  /** The bitmaps extension is there but autoclear bit 0 is clear: the bitmaps are stale. */
  bitmapsInconsistent: boolean;
  crypto: { offset: number; length: number } | undefined;
  /** Extensions QEMU does not know, in file order. */
  unknownExtensions: Qcow2Extension[];
}

const einval = (msg: string): BlkError => new BlkError("EINVAL", msg);
const latin1 = (b: Uint8Array): string => Buffer.from(b.buffer, b.byteOffset, b.length).toString("latin1");

/** Bytes QEMU needs to see before it knows the cluster size. */
export const HEADER_PROBE_BYTES = 112;

/** Cluster bits from the first bytes (the caller then reads the whole first cluster). */
export function peekClusterBits(first: Uint8Array): number {
  if (first.length < 24) return 16;
  return new DataView(first.buffer, first.byteOffset, first.length).getUint32(20);
}

/** Builds QEMU's "Unsupported qcow2 feature(s)" message. */
function unsupportedFeatureMessage(table: readonly Qcow2FeatureName[], lo: number, hi: number): string {
  const names: string[] = [];
  let maskLo = lo;
  let maskHi = hi;
  for (const f of table) {
    if (f.type !== "incompatible" || f.name === "") continue;
    const set = f.bit < 32 ? (maskLo >>> f.bit) & 1 : (maskHi >>> (f.bit - 32)) & 1;
    if (set === 0) continue;
    names.push(f.name);
    if (f.bit < 32) maskLo = (maskLo & ~(1 << f.bit)) >>> 0;
    else maskHi = (maskHi & ~(1 << (f.bit - 32))) >>> 0;
  }
  if (maskLo !== 0 || maskHi !== 0) {
    const hex =
      maskHi !== 0 ? maskHi.toString(16) + maskLo.toString(16).padStart(8, "0") : maskLo.toString(16);
    names.push(`Unknown incompatible feature: ${hex}`);
  }
  return `Unsupported qcow2 feature(s): ${names.join(", ")}`;
}

/**
 * Parses and validates the header in `cluster0` (the first cluster of the file, or all of it if the file is
 * shorter; bytes past the end read as zero), with QEMU's open-time checks and messages.
 * @throws {BlkError} EINVAL / ENOTSUP / EFBIG with QEMU's message
 */
export function parseHeader(cluster0: Uint8Array, fileLength: number): Qcow2Header {
  const buf = cluster0;
  if (buf.length < 72) {
    // A file shorter than a v2 header: QEMU's read fails or the magic does not match.
    if (buf.length < 4 || new DataView(buf.buffer, buf.byteOffset, buf.length).getUint32(0) !== QCOW2_MAGIC) {
      throw einval("Image is not in qcow2 format");
    }
  }
  const padded =
    buf.length >= 112
      ? buf
      : (() => {
          const p = new Uint8Array(112);
          p.set(buf);
          return p;
        })();
  const v = new DataView(padded.buffer, padded.byteOffset, padded.length);
  if (v.getUint32(0) !== QCOW2_MAGIC) throw einval("Image is not in qcow2 format");
  const version = v.getUint32(4);
  if (version < 2 || version > 3) throw new BlkError("ENOTSUP", `Unsupported qcow2 version ${version}`);
  const clusterBits = v.getUint32(20);
  if (clusterBits < 9 || clusterBits > 21) {
    throw einval(`Unsupported cluster size: 2^${clusterBits}`);
  }
  const clusterSize = 2 ** clusterBits;
  const h: Qcow2Header = {
    version: version as 2 | 3,
    backingFileOffset: 0,
    backingFileSize: v.getUint32(16),
    clusterBits,
    size: 0,
    cryptMethod: v.getUint32(32),
    l1Size: v.getUint32(36),
    l1TableOffset: 0,
    refcountTableOffset: 0,
    refcountTableClusters: v.getUint32(56),
    nbSnapshots: v.getUint32(60),
    snapshotsOffset: 0,
    incompatibleFeatures: 0,
    incompatibleHigh: 0,
    compatibleFeatures: 0,
    autoclearFeatures: 0,
    refcountOrder: 4,
    headerLength: 72,
    compressionType: 0,
    unknownHeaderFields: new Uint8Array(0),
    backingFile: undefined,
    backingFormat: undefined,
    dataFile: undefined,
    featureTable: [],
    bitmaps: undefined,
    bitmapsInconsistent: false,
    crypto: undefined,
    unknownExtensions: [],
  };
  if (version === 3) {
    h.incompatibleHigh = v.getUint32(72);
    h.incompatibleFeatures = v.getUint32(76);
    h.compatibleFeatures = v.getUint32(84);
    h.autoclearFeatures = v.getUint32(92);
    h.refcountOrder = v.getUint32(96);
    h.headerLength = v.getUint32(100);
    if (h.headerLength < 104) throw einval("qcow2 header too short");
    if (h.headerLength > clusterSize) throw einval("qcow2 header exceeds cluster size");
    if (h.headerLength > 104) h.compressionType = padded[104] ?? 0;
    if (h.headerLength > 112 && buf.length >= h.headerLength) {
      h.unknownHeaderFields = buf.slice(112, h.headerLength);
    }
  }
  // Offsets: a u64 that does not fit below 2^53 cannot be a valid offset in any file blk can read.
  const bfoHi = v.getUint32(8);
  const bfoLo = v.getUint32(12);
  if (bfoHi !== 0 || bfoLo > clusterSize) throw einval("Invalid backing file offset");
  h.backingFileOffset = bfoLo;
  const sizeBig = v.getBigUint64(24);
  h.size = Number(sizeBig);
  h.l1TableOffset = tableOffset(v, 40, "Active L1 table");
  h.refcountTableOffset = tableOffset(v, 48, "Reference count table");
  h.snapshotsOffset = tableOffset(v, 64, "Snapshot table");

  // Header extensions: from header_length to the backing file name or the end of cluster 0.
  const extEnd = h.backingFileOffset !== 0 ? h.backingFileOffset : clusterSize;
  const featureTable: Qcow2FeatureName[] = [];
  readExtensions(buf, h, extEnd, featureTable);
  h.featureTable = featureTable;

  // Compression type (checked before the feature bits, as QEMU does).
  if (h.compressionType > 1) {
    throw new BlkError("ENOTSUP", `qcow2: unknown compression type: ${h.compressionType}`);
  }
  if (h.compressionType === 0 && (h.incompatibleFeatures & INCOMPAT_COMPRESSION) !== 0) {
    throw einval("qcow2: Compression type incompatible feature bit must not be set");
  }
  if (h.compressionType !== 0 && (h.incompatibleFeatures & INCOMPAT_COMPRESSION) === 0) {
    throw einval("qcow2: Compression type incompatible feature bit must be set");
  }
  const unknownLo = (h.incompatibleFeatures & ~INCOMPAT_KNOWN) >>> 0;
  if (unknownLo !== 0 || h.incompatibleHigh !== 0) {
    throw new BlkError("ENOTSUP", unsupportedFeatureMessage(featureTable, unknownLo, h.incompatibleHigh));
  }
  if (h.refcountOrder > 6) {
    throw einval("Reference count entry width too large; may not exceed 64 bits");
  }
  if (h.cryptMethod !== 0) {
    throw new BlkError("ENOTSUP", "Encrypted qcow2 images are not supported by blk");
  }
  if ((h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0 && clusterSize / 32 < 512) {
    throw einval(`Unsupported subcluster size: ${clusterSize / 32}`);
  }
  if (h.refcountTableClusters === 0) {
    throw einval("Image does not contain a reference count table");
  }
  validateTable(
    h.refcountTableOffset,
    h.refcountTableClusters,
    clusterSize,
    MAX_REFTABLE_BYTES,
    clusterSize,
    "Reference count table",
  );
  validateTable(
    h.snapshotsOffset,
    h.nbSnapshots,
    SNAPSHOT_HEADER_SIZE,
    SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS,
    clusterSize,
    "Snapshot table",
  );
  validateTable(h.l1TableOffset, h.l1Size, 8, MAX_L1_BYTES, clusterSize, "Active L1 table");
  const l2Bits = clusterBits - ((h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0 ? 4 : 3);
  const perL1 = 2n ** BigInt(clusterBits + l2Bits);
  const needL1 = (sizeBig + perL1 - 1n) / perL1;
  if (needL1 > 0x7fffffffn) throw new BlkError("EFBIG", "Image is too big");
  if (BigInt(h.l1Size) < needL1) throw einval("L1 table is too small");
  // QEMU goes on; blk's offsets are exact numbers below 2^53.
  if (sizeBig >= 2n ** 53n) throw new BlkError("EFBIG", "Image is too big");

  if (h.backingFileOffset !== 0) {
    const len = h.backingFileSize;
    if (len > Math.min(MAX_BACKING_NAME, clusterSize - h.backingFileOffset)) {
      throw einval("Backing file name too long");
    }
    const name = new Uint8Array(len);
    name.set(buf.subarray(h.backingFileOffset, Math.min(buf.length, h.backingFileOffset + len)));
    h.backingFile = latin1(name);
  }
  if (
    (h.incompatibleFeatures & INCOMPAT_DATA_FILE) === 0 &&
    (h.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0
  ) {
    // QEMU drops the bit on a writable open; read-only it is just ignored.
    h.autoclearFeatures &= ~AUTOCLEAR_DATA_FILE_RAW;
  }
  void fileLength;
  return h;
}

function tableOffset(v: DataView, at: number, name: string): number {
  const hi = v.getUint32(at);
  if (hi > HI_SAFE) throw einval(`${name} offset invalid`);
  return hi * 2 ** 32 + v.getUint32(at + 4);
}

/** QEMU's `qcow2_validate_table`: entry count limit, then offset alignment and range. */
function validateTable(
  offset: number,
  entries: number,
  entryLen: number,
  maxBytes: number,
  clusterSize: number,
  name: string,
): void {
  if (entries > Math.floor(maxBytes / entryLen)) throw new BlkError("EFBIG", `${name} too large`);
  if (offset % clusterSize !== 0 || offset + entries * entryLen > Number.MAX_SAFE_INTEGER) {
    throw einval(`${name} offset invalid`);
  }
}

function readExtensions(buf: Uint8Array, h: Qcow2Header, end: number, features: Qcow2FeatureName[]): void {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.length);
  const byteAt = (i: number): number => (i < buf.length ? (buf[i] ?? 0) : 0);
  const u32At = (i: number): number =>
    i + 4 <= buf.length
      ? view.getUint32(i)
      : ((byteAt(i) << 24) | (byteAt(i + 1) << 16) | (byteAt(i + 2) << 8) | byteAt(i + 3)) >>> 0;
  const slice = (from: number, len: number): Uint8Array => {
    const out = new Uint8Array(len);
    if (from < buf.length) out.set(buf.subarray(from, Math.min(buf.length, from + len)));
    return out;
  };
  let off = h.headerLength;
  while (off < end) {
    const type = u32At(off);
    const len = u32At(off + 4);
    off += 8;
    if (off > end || len > end - off) throw einval("Header extension too large");
    if (type === EXT_END) return;
    const data = slice(off, len);
    const dv = new DataView(data.buffer, data.byteOffset, data.length);
    switch (type) {
      case EXT_BACKING_FORMAT:
        if (len >= 16) throw einval(`ERROR: ext_backing_format: len=${len} too large (>=16)`);
        h.backingFormat = latin1(data).replace(/\0.*$/s, "");
        break;
      case EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= len; i += 48) {
          const t = data[i] ?? 0;
          const nameBytes = data.subarray(i + 2, i + 48);
          const nul = nameBytes.indexOf(0);
          const name = latin1(nul >= 0 ? nameBytes.subarray(0, nul) : nameBytes);
          if (name === "") break;
          features.push({
            type: t === 0 ? "incompatible" : t === 1 ? "compatible" : "autoclear",
            bit: data[i + 1] ?? 0,
            name,
          });
        }
        break;
      case EXT_CRYPTO:
        if (h.cryptMethod !== 2) {
          throw einval("CRYPTO header extension only expected with LUKS encryption method");
        }
        if (len !== 16) throw einval(`CRYPTO header extension size ${len}, but expected size 16`);
        h.crypto = { offset: u64(dv, 0, "Crypto header offset"), length: u64(dv, 8, "Crypto header length") };
        break;
      case EXT_BITMAPS: {
        if (len !== 24) throw einval("bitmaps_ext: Invalid extension length");
        if ((h.autoclearFeatures & AUTOCLEAR_BITMAPS) === 0) {
          h.bitmapsInconsistent = true;
          break;
        }
        if (dv.getUint32(4) !== 0) throw einval("bitmaps_ext: Reserved field is not zero");
        const nb = dv.getUint32(0);
        if (nb > MAX_BITMAPS) {
          throw einval(
            `bitmaps_ext: Image has ${nb} bitmaps, exceeding the QEMU supported maximum of ${MAX_BITMAPS}`,
          );
        }
        if (nb === 0) throw einval("found bitmaps extension with zero bitmaps");
        const dirOffHi = dv.getUint32(16);
        const dirOff = dirOffHi * 2 ** 32 + dv.getUint32(20);
        if (dirOffHi > HI_SAFE || dirOff % 2 ** h.clusterBits !== 0) {
          throw einval("bitmaps_ext: invalid bitmap directory offset");
        }
        const sizeHi = dv.getUint32(8);
        const dirSize = sizeHi * 2 ** 32 + dv.getUint32(12);
        if (sizeHi !== 0 || dirSize > MAX_BITMAP_DIRECTORY_SIZE) {
          throw einval(
            `bitmaps_ext: bitmap directory size (${BigInt(sizeHi) * 2n ** 32n + BigInt(dv.getUint32(12))}) exceeds the maximum supported size (${MAX_BITMAP_DIRECTORY_SIZE})`,
          );
        }
        h.bitmaps = { nbBitmaps: nb, directorySize: dirSize, directoryOffset: dirOff };
        break;
      }
      case EXT_DATA_FILE:
        h.dataFile = latin1(data);
        break;
      default:
        h.unknownExtensions.push({ type, offset: off, data });
    }
    off += (len + 7) & ~7;
  }
}

/** One internal snapshot (qcow2.txt "Snapshot table"). */
export interface Qcow2Snapshot {
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
  dateSec: number;
  dateNsec: number;
  /** VM clock in nanoseconds (exact below 2^53). */
  vmClockNsec: number;
  vmStateSize: number;
  /** Virtual disk size at snapshot time (the image size when the extra data lacks it). */
  diskSize: number;
  /** Instruction count, absent when the extra data lacks it. */
  icount: number | undefined;
  extraDataSize: number;
  /** Extra data beyond what QEMU knows (preserved). */
  unknownExtraData: Uint8Array;
}

/** A reader of the image file: `length` bytes at `offset`, zeroes past the end of the file. */
export type ReadAt = (offset: number, length: number) => Promise<Uint8Array>;

/**
 * Reads the snapshot table (QEMU `qcow2_read_snapshots`). Returns the snapshots and the table's byte
 * length (what `check` counts as referenced).
 * @throws {BlkError} EFBIG / EINVAL with QEMU's messages
 */
export async function readSnapshots(
  readAt: ReadAt,
  h: Qcow2Header,
): Promise<{ snapshots: Qcow2Snapshot[]; tableSize: number }> {
  const out: Qcow2Snapshot[] = [];
  if (h.nbSnapshots === 0) return { snapshots: out, tableSize: 0 };
  const read = windowed(readAt);
  const start = h.snapshotsOffset;
  let off = start;
  for (let i = 0; i < h.nbSnapshots; i++) {
    if (Math.ceil((off - start) / 8) * 8 > MAX_SNAPSHOTS_TABLE_BYTES) {
      throw new BlkError("EFBIG", "Snapshot table exceeds the maximum size");
    }
    off = Math.ceil(off / 8) * 8;
    const hb = await read(off, SNAPSHOT_HEADER_SIZE);
    const v = new DataView(hb.buffer, hb.byteOffset, hb.length);
    off += SNAPSHOT_HEADER_SIZE;
    const l1Hi = v.getUint32(0);
    const l1TableOffset = l1Hi > HI_SAFE ? Number.MAX_SAFE_INTEGER : l1Hi * 2 ** 32 + v.getUint32(4);
    const idLen = v.getUint16(12);
    const nameLen = v.getUint16(14);
    const extra = v.getUint32(36);
    if (extra > MAX_SNAPSHOT_EXTRA_DATA) {
      throw new BlkError("EFBIG", `Too much extra metadata in snapshot table entry ${i}`);
    }
    const clockHi = v.getUint32(24);
    const sn: Qcow2Snapshot = {
      id: "",
      name: "",
      l1TableOffset,
      l1Size: v.getUint32(8),
      dateSec: v.getUint32(16),
      dateNsec: v.getUint32(20),
      vmClockNsec: clockHi * 2 ** 32 + v.getUint32(28),
      vmStateSize: v.getUint32(32),
      diskSize: h.size,
      icount: undefined,
      extraDataSize: extra,
      unknownExtraData: new Uint8Array(0),
    };
    if (extra > 0) {
      const eb = await read(off, extra);
      const ev = new DataView(eb.buffer, eb.byteOffset, eb.length);
      if (extra >= 8) sn.vmStateSize = ev.getUint32(0) * 2 ** 32 + ev.getUint32(4);
      if (extra >= 16) sn.diskSize = ev.getUint32(8) * 2 ** 32 + ev.getUint32(12);
      if (extra >= 24) {
        const hi = ev.getUint32(16);
        const lo = ev.getUint32(20);
        sn.icount = hi === 0xffffffff && lo === 0xffffffff ? undefined : hi * 2 ** 32 + lo;
      }
      if (extra > 24) sn.unknownExtraData = eb.slice(24);
      off += extra;
    }
    sn.id = latin1(await read(off, idLen));
    off += idLen;
    sn.name = latin1(await read(off, nameLen));
    off += nameLen;
    if (off - start > MAX_SNAPSHOTS_TABLE_BYTES) {
      throw new BlkError("EFBIG", "Snapshot table exceeds the maximum size");
    }
    out.push(sn);
  }
  return { snapshots: out, tableSize: off - start };
}

/**
 * Encodes a snapshot table as QEMU 7.2 writes it (`qcow2_write_snapshots`): each entry a 40-byte header,
 * 24 bytes of extra data (64-bit VM state size, disk size, icount — all ones when unknown) followed by
 * preserved unknown extra data, the ID and the name, padded to 8 bytes.
 */
export function serializeSnapshots(snapshots: readonly Qcow2Snapshot[]): Uint8Array {
  const parts: Uint8Array[] = [];
  for (const sn of snapshots) {
    // Bytes as they were read (latin1), so names round-trip unchanged.
    const id = Buffer.from(sn.id, "latin1");
    const name = Buffer.from(sn.name, "latin1");
    const extra = 24 + sn.unknownExtraData.length;
    const len = Math.ceil((SNAPSHOT_HEADER_SIZE + extra + id.length + name.length) / 8) * 8;
    const b = new Uint8Array(len);
    const v = new DataView(b.buffer);
    const u64 = (at: number, n: number): void => {
      v.setUint32(at, Math.floor(n / 2 ** 32));
      v.setUint32(at + 4, n >>> 0);
    };
    u64(0, sn.l1TableOffset);
    v.setUint32(8, sn.l1Size);
    v.setUint16(12, id.length);
    v.setUint16(14, name.length);
    v.setUint32(16, sn.dateSec);
    v.setUint32(20, sn.dateNsec);
    u64(24, sn.vmClockNsec);
    v.setUint32(32, sn.vmStateSize > 0xffffffff ? 0 : sn.vmStateSize);
    v.setUint32(36, extra);
    u64(40, sn.vmStateSize);
    u64(48, sn.diskSize);
    if (sn.icount === undefined) {
      v.setUint32(56, 0xffffffff);
      v.setUint32(60, 0xffffffff);
    } else u64(56, sn.icount);
    b.set(sn.unknownExtraData, 64);
    b.set(id, 40 + extra);
    b.set(name, 40 + extra + id.length);
    parts.push(b);
  }
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** A reader that fetches 1 MiB windows, so many small reads of a table cost few I/O requests. */
function windowed(readAt: ReadAt): ReadAt {
  const WIN = 1 << 20;
  let start = -1;
  let buf: Uint8Array = new Uint8Array(0);
  return async (offset: number, length: number): Promise<Uint8Array> => {
    if (length > WIN) return readAt(offset, length);
    if (start < 0 || offset < start || offset + length > start + buf.length) {
      start = offset;
      buf = await readAt(offset, WIN);
    }
    return buf.slice(offset - start, offset - start + length);
  };
}

/** One persistent dirty bitmap (qcow2.txt "Bitmap directory"). */
export interface Qcow2Bitmap {
  name: string;
  tableOffset: number;
  tableSize: number;
  /** Raw flags: bit 0 in_use, bit 1 auto. */
  flags: number;
  type: number;
  granularityBits: number;
  extraDataSize: number;
}

/** Bitmap flag: the stored data is stale. */
export const BME_FLAG_IN_USE = 1;
/** Bitmap flag: the bitmap is enabled (tracks writes). */
export const BME_FLAG_AUTO = 2;
const BME_RESERVED_FLAGS = 0xfffffffc;
const BME_MAX_TABLE_SIZE = 0x8000000;
const BME_MAX_PHYS_SIZE = 0x20000000;

/**
 * Parses the bitmap directory (QEMU `bitmap_list_load` checks and messages).
 * @throws {BlkError} EINVAL
 */
export function parseBitmapDirectory(
  dir: Uint8Array,
  nbBitmaps: number,
  clusterSize: number,
  virtualSize: number,
): Qcow2Bitmap[] {
  if (dir.length === 0) throw einval("Requested bitmap directory size is zero");
  const v = new DataView(dir.buffer, dir.byteOffset, dir.length);
  const out: Qcow2Bitmap[] = [];
  let off = 0;
  const broken = (): BlkError => einval("Broken bitmap directory");
  while (off < dir.length) {
    if (off + 24 > dir.length) throw broken();
    if (out.length + 1 > nbBitmaps) throw einval("More bitmaps found than specified in header extension");
    const tHi = v.getUint32(off);
    const tableOffset = tHi > HI_SAFE ? Number.MAX_SAFE_INTEGER : tHi * 2 ** 32 + v.getUint32(off + 4);
    const tableSize = v.getUint32(off + 8);
    const flags = v.getUint32(off + 12);
    const type = v.getUint8(off + 16);
    const granularityBits = v.getUint8(off + 17);
    const nameSize = v.getUint16(off + 18);
    const extra = v.getUint32(off + 20);
    const entrySize = Math.ceil((24 + extra + nameSize) / 8) * 8;
    if (off + entrySize > dir.length) throw broken();
    const name = new TextDecoder().decode(dir.subarray(off + 24 + extra, off + 24 + extra + nameSize));
    if (extra !== 0) throw einval("Bitmap extra data is not supported");
    const phys = tableSize * clusterSize;
    const bad =
      tableSize === 0 ||
      tableOffset === 0 ||
      tableOffset % clusterSize !== 0 ||
      tableSize > BME_MAX_TABLE_SIZE ||
      granularityBits > 31 ||
      granularityBits < 9 ||
      (flags & BME_RESERVED_FLAGS) !== 0 ||
      nameSize > 1023 ||
      type !== 1 ||
      phys > BME_MAX_PHYS_SIZE ||
      ((flags & BME_FLAG_IN_USE) === 0 && virtualSize > phys * 8 * 2 ** granularityBits);
    if (bad) throw einval(`Bitmap '${name}' doesn't satisfy the constraints`);
    out.push({ name, tableOffset, tableSize, flags, type, granularityBits, extraDataSize: extra });
    off += entrySize;
  }
  if (out.length !== nbBitmaps) throw einval("Less bitmaps found than specified in header extension");
  return out;
}
