/**
 * qcow2 edits blk-img makes on the image file itself (through its protocol node), outside the qcow2
 * driver: rewriting the first cluster as QEMU's `qcow2_update_header` lays it out (header fields,
 * extensions, backing file name) for `amend`, and emptying an image as `qemu-img commit` does
 * (QEMU's `make_completely_empty`: same header, a new empty L1 table, refcounts for the four metadata
 * structures only, file truncated). Reference: /work/shared/spec/qcow2.md §2–§4, §8.
 */
import { BlkError, type BlockNode, type Edge } from "@blk/core";
import {
  featureNameTable,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  parseHeader,
  QCOW2_EXT,
  QCOW2_MAGIC,
  type Qcow2Header,
} from "@blk/drivers/qcow2";

/** Offset of `incompatible_features`. */
const INCOMPAT_AT = 72;

/** The first cluster and parsed header of the qcow2 image behind a protocol edge. */
export async function readHeader(file: Edge): Promise<{ header: Qcow2Header; clusterSize: number }> {
  const len = file.length;
  const first = new Uint8Array(512);
  await file.readInto(0, first.subarray(0, Math.min(512, len)));
  const v = new DataView(first.buffer);
  if (v.getUint32(0) !== QCOW2_MAGIC) throw new BlkError("EINVAL", "Image is not in qcow2 format");
  const bits = v.getUint32(20);
  if (bits < 9 || bits > 21) throw new BlkError("EINVAL", `Unsupported cluster size: 2^${bits}`);
  const cs = 2 ** bits;
  const c0 = new Uint8Array(cs);
  await file.readInto(0, c0.subarray(0, Math.min(cs, len)));
  return { header: parseHeader(c0, len), clusterSize: cs };
}

function u64(v: DataView, at: number, n: number): void {
  v.setUint32(at, Math.floor(n / 2 ** 32));
  v.setUint32(at + 4, n % 2 ** 32);
}

/**
 * The first cluster of an image with header `h`, laid out as QEMU's `qcow2_update_header`: the header
 * (72 bytes for v2, 112 for v3, then preserved unknown header bytes), the backing format, data file,
 * crypto, feature table (v3 with clusters over 4 KiB), bitmaps and preserved unknown extensions, the end
 * marker, then the backing file name.
 * @throws {BlkError} ENOSPC when it does not fit in one cluster
 */
export function serializeHeader(h: Qcow2Header, clusterSize: number): Uint8Array {
  const out = new Uint8Array(clusterSize);
  const v = new DataView(out.buffer);
  const enc = new TextEncoder();
  v.setUint32(0, QCOW2_MAGIC);
  v.setUint32(4, h.version);
  v.setUint32(20, h.clusterBits);
  u64(v, 24, h.size);
  v.setUint32(32, h.cryptMethod);
  v.setUint32(36, h.l1Size);
  u64(v, 40, h.l1TableOffset);
  u64(v, 48, h.refcountTableOffset);
  v.setUint32(56, h.refcountTableClusters);
  v.setUint32(60, h.nbSnapshots);
  u64(v, 64, h.snapshotsOffset);
  let pos = 72;
  if (h.version >= 3) {
    v.setUint32(72, h.incompatibleHigh);
    v.setUint32(76, h.incompatibleFeatures);
    v.setUint32(84, h.compatibleFeatures);
    v.setUint32(92, h.autoclearFeatures);
    v.setUint32(96, h.refcountOrder);
    v.setUint32(100, 112 + h.unknownHeaderFields.length);
    out[104] = h.compressionType;
    pos = 112;
    if (pos + h.unknownHeaderFields.length > clusterSize)
      throw new BlkError("ENOSPC", "No space left on device");
    out.set(h.unknownHeaderFields, pos);
    pos += h.unknownHeaderFields.length;
  }
  const add = (type: number, data: Uint8Array): void => {
    const padded = Math.ceil(data.length / 8) * 8;
    if (pos + 8 + padded > clusterSize) throw new BlkError("ENOSPC", "No space left on device");
    v.setUint32(pos, type);
    v.setUint32(pos + 4, data.length);
    out.set(data, pos + 8);
    pos += 8 + padded;
  };
  if (h.backingFormat !== undefined) add(QCOW2_EXT.BACKING_FORMAT, enc.encode(h.backingFormat));
  if ((h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0 && h.dataFile !== undefined) {
    add(QCOW2_EXT.DATA_FILE, enc.encode(h.dataFile));
  }
  if (h.crypto !== undefined && h.crypto.offset !== 0) {
    const c = new Uint8Array(16);
    const cv = new DataView(c.buffer);
    u64(cv, 0, h.crypto.offset);
    u64(cv, 8, h.crypto.length);
    add(QCOW2_EXT.CRYPTO, c);
  }
  if (h.version >= 3 && clusterSize > 4096) {
    add(QCOW2_EXT.FEATURE_TABLE, featureNameTable());
  }
  if (h.bitmaps !== undefined && h.bitmaps.nbBitmaps > 0) {
    const b = new Uint8Array(24);
    const bv = new DataView(b.buffer);
    bv.setUint32(0, h.bitmaps.nbBitmaps);
    u64(bv, 8, h.bitmaps.directorySize);
    u64(bv, 16, h.bitmaps.directoryOffset);
    add(QCOW2_EXT.BITMAPS, b);
  }
  for (const e of h.unknownExtensions) add(e.type, e.data);
  add(0, new Uint8Array(0));
  if (h.backingFile !== undefined) {
    const name = enc.encode(h.backingFile);
    if (pos + name.length > clusterSize) throw new BlkError("ENOSPC", "No space left on device");
    out.set(name, pos);
    u64(v, 8, pos);
    v.setUint32(16, name.length);
  }
  return out;
}

/** Writes the first cluster for `h` and flushes. */
export async function writeHeader(file: Edge, h: Qcow2Header, clusterSize: number): Promise<void> {
  await file.write(0, serializeHeader(h, clusterSize));
  await file.flush();
}

/** Sets refcount entry `i` of a refcount block to `value` (`bits` wide; packed LSB first below 8). */
export function setRefcount(block: Uint8Array, bits: number, i: number, value: number): void {
  const v = new DataView(block.buffer, block.byteOffset, block.length);
  if (bits < 8) {
    const per = 8 / bits;
    const byte = Math.floor(i / per);
    const shift = (i % per) * bits;
    const mask = ((1 << bits) - 1) << shift;
    block[byte] = ((block[byte] ?? 0) & ~mask) | ((value << shift) & mask);
  } else if (bits === 8) block[i] = value;
  else if (bits === 16) v.setUint16(i * 2, value);
  else if (bits === 32) v.setUint32(i * 4, value);
  else u64(v, i * 8, value);
}

/** Reads refcount entry `i` of a refcount block (`bits` wide). */
export function getRefcount(block: Uint8Array, bits: number, i: number): number {
  const v = new DataView(block.buffer, block.byteOffset, block.length);
  if (bits < 8) {
    const per = 8 / bits;
    return ((block[Math.floor(i / per)] ?? 0) >> ((i % per) * bits)) & ((1 << bits) - 1);
  }
  if (bits === 8) return block[i] ?? 0;
  if (bits === 16) return v.getUint16(i * 2);
  if (bits === 32) return v.getUint32(i * 4);
  return v.getUint32(i * 8) * 2 ** 32 + v.getUint32(i * 8 + 4);
}

/**
 * Refuses what a read-write open of the qcow2 driver refuses (a corrupt image; a dirty one, which QEMU
 * would repair first), for edits made on the file without the driver.
 * @throws {BlkError} EACCES / ENOTSUP with the driver's messages
 */
export function assertEditable(h: Qcow2Header): void {
  if ((h.incompatibleFeatures & 0x2) !== 0) {
    throw new BlkError("EACCES", "qcow2: Image is corrupt; cannot be opened read/write");
  }
  if ((h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0) {
    throw new BlkError(
      "ENOTSUP",
      "qcow2: the image was not closed cleanly (dirty bit set) and blk cannot repair it yet; run 'qemu-img check -r all' first",
    );
  }
}

/** How `commit` empties a qcow2 image (by host filename, once closed): rebuilt, or its active table unmapped. */
export type EmptyPlan = { kind: "rebuild" | "unmap"; filename: string } | undefined;

/**
 * How QEMU's `qcow2_make_empty` would empty `node`: a v3 image without snapshots, bitmaps, encryption
 * or data file (whose L1 table fits with the header and refcount structures in one refcount block) is
 * rebuilt ({@link emptyQcow2}); other qcow2 images have every cluster unmapped
 * ({@link unmapActiveTable}); other formats are left alone (QEMU's ENOTSUP, ignored by commit).
 * @throws {BlkError} see {@link assertEditable}
 */
export function qcow2EmptyPlan(node: BlockNode): EmptyPlan {
  if (node.driver.format !== "qcow2") return undefined;
  const st = node.state as unknown as {
    header: Qcow2Header;
    snapshots: readonly unknown[];
    clusterSize: number;
  };
  const file = node.children.get("file")?.child;
  const filename = (file?.driverOptions as { filename?: unknown } | undefined)?.filename;
  if (typeof filename !== "string" || file?.driver.format !== "file") return undefined;
  const h = st.header;
  assertEditable(h);
  const cs = st.clusterSize;
  const l1Clusters = Math.ceil((h.l1Size * 8) / cs);
  const perBlock = (cs * 8) / 2 ** h.refcountOrder;
  const simple =
    h.version === 3 &&
    st.snapshots.length === 0 &&
    (h.bitmaps?.nbBitmaps ?? 0) === 0 &&
    h.cryptMethod === 0 &&
    (h.incompatibleFeatures & INCOMPAT_DATA_FILE) === 0 &&
    3 + l1Clusters <= perBlock;
  return { kind: simple ? "rebuild" : "unmap", filename };
}

/**
 * Empties a closed qcow2 v3 image in place (QEMU's `make_completely_empty`): marks it dirty, zeroes the
 * L1 table and the clusters 1 … 3+L1, puts the refcount table at cluster 1 (its one refcount block at
 * cluster 2) and the L1 table (all unallocated) at cluster 3, counts those clusters and the header,
 * marks it clean and truncates the file after the L1 table. The header cluster (backing file name,
 * extensions) is kept.
 */
export async function emptyQcow2(file: Edge): Promise<void> {
  const { header: h, clusterSize: cs } = await readHeader(file);
  if (h.version !== 3) throw new BlkError("ENOTSUP", "only qcow2 v3 images can be rebuilt empty");
  const l1Bytes = h.l1Size * 8;
  const l1Clusters = Math.ceil(l1Bytes / cs);
  const bits = 2 ** h.refcountOrder;
  const incompat = new Uint8Array(8);
  const iv = new DataView(incompat.buffer);
  iv.setUint32(0, h.incompatibleHigh);
  iv.setUint32(4, (h.incompatibleFeatures | INCOMPAT_DIRTY) >>> 0);
  await file.write(INCOMPAT_AT, incompat);
  await file.flush();
  if (l1Clusters > 0 && h.l1TableOffset + l1Clusters * cs <= file.length) {
    await file.write(h.l1TableOffset, new Uint8Array(l1Clusters * cs));
  }
  await file.write(cs, new Uint8Array((2 + l1Clusters) * cs));
  const ptrs = new Uint8Array(20);
  const pv = new DataView(ptrs.buffer);
  u64(pv, 0, 3 * cs);
  u64(pv, 8, cs);
  pv.setUint32(16, 1);
  await file.write(40, ptrs);
  await file.flush();
  const entry = new Uint8Array(8);
  u64(new DataView(entry.buffer), 0, 2 * cs);
  await file.write(cs, entry);
  await file.flush();
  const block = new Uint8Array(cs);
  const used = Math.ceil((3 * cs + l1Bytes) / cs);
  for (let i = 0; i < used; i++) setRefcount(block, bits, i, 1);
  await file.write(2 * cs, block);
  await file.flush();
  iv.setUint32(4, (h.incompatibleFeatures & ~INCOMPAT_DIRTY) >>> 0);
  await file.write(INCOMPAT_AT, incompat);
  await file.flush();
  await file.truncate((3 + l1Clusters) * cs);
}

const OFFSET_MASK_HI = 0x00ffffff;
const OFFSET_MASK_LO = 0xfffffe00;

/** The host offset in an L1/L2/reftable entry at byte `at` of `v` (bits 9-55). */
function entryOffset(v: DataView, at: number): number {
  return (v.getUint32(at) & OFFSET_MASK_HI) * 2 ** 32 + ((v.getUint32(at + 4) & OFFSET_MASK_LO) >>> 0);
}

/** Reads `n` bytes at `offset` (zeroes past the end of the file). */
async function readAt(file: Edge, offset: number, n: number): Promise<Uint8Array> {
  const out = new Uint8Array(n);
  const len = Math.min(n, file.length - offset);
  if (len > 0) await file.readInto(offset, out.subarray(0, len));
  return out;
}

/**
 * Rewrites every refcount structure with entries `2^newOrder` bits wide (QEMU's
 * `qcow2_change_refcount_order`): reads all refcounts, checks they fit, writes new refcount blocks and
 * a new refcount table after the end of the file (the old structures are no longer counted), then
 * switches the header to them in one write. The image must be closed by its driver and clean. `extra`
 * gives refcounts of clusters about to be used (up to cluster `extra.clusters`, possibly past the end of
 * the file); the new structures go after them.
 * @throws {BlkError} EINVAL `Cannot decrease refcount entry width to N bits: Cluster at offset 0x… has a refcount of M`
 */
export async function changeRefcountOrder(
  file: Edge,
  newOrder: number,
  extra: { refcounts: ReadonlyMap<number, number>; clusters: number } = { refcounts: new Map(), clusters: 0 },
): Promise<void> {
  const { header: h, clusterSize: cs } = await readHeader(file);
  const oldBits = 2 ** h.refcountOrder;
  const newBits = 2 ** newOrder;
  const oldPer = (cs * 8) / oldBits;
  const newPer = (cs * 8) / newBits;
  const fileClusters = Math.max(Math.ceil(file.length / cs), extra.clusters);
  const refcounts: number[] = new Array<number>(fileClusters).fill(0);
  const rt = await readAt(file, h.refcountTableOffset, h.refcountTableClusters * cs);
  const rtv = new DataView(rt.buffer);
  const oldStructures: number[] = [];
  for (let c = 0; c < h.refcountTableClusters; c++) oldStructures.push(h.refcountTableOffset / cs + c);
  for (let i = 0; i < rt.length / 8; i++) {
    const off = entryOffset(rtv, i * 8);
    if (off === 0) continue;
    oldStructures.push(off / cs);
    const block = await readAt(file, off, cs);
    for (let j = 0; j < oldPer; j++) {
      const r = getRefcount(block, oldBits, j);
      if (r === 0) continue;
      const c = i * oldPer + j;
      if (newBits < 64 && r >= 2 ** newBits) {
        throw new BlkError(
          "EINVAL",
          `Cannot decrease refcount entry width to ${newBits} bits: Cluster at offset 0x${(c * cs).toString(16)} has a refcount of ${r}`,
        );
      }
      refcounts[c] = r;
    }
  }
  for (const c of oldStructures) refcounts[c] = 0;
  for (const [c, r] of extra.refcounts) refcounts[c] = r;
  // The new structures go after the end of the file: blocks, then the table; find the fixed point.
  const start = fileClusters;
  let blocks = 0;
  let table = 0;
  for (;;) {
    const total = start + blocks + table;
    const nb = Math.ceil(total / newPer);
    const nt = Math.ceil((nb * 8) / cs);
    if (nb === blocks && nt === table) break;
    blocks = nb;
    table = nt;
  }
  for (let c = start; c < start + blocks + table; c++) refcounts[c] = 1;
  const newTable = new Uint8Array(table * cs);
  const ntv = new DataView(newTable.buffer);
  for (let b = 0; b < blocks; b++) {
    const block = new Uint8Array(cs);
    for (let j = 0; j < newPer; j++) {
      const r = refcounts[b * newPer + j] ?? 0;
      if (r !== 0) setRefcount(block, newBits, j, r);
    }
    const at = (start + b) * cs;
    await file.write(at, block);
    u64(ntv, b * 8, at);
  }
  await file.write((start + blocks) * cs, newTable);
  await file.flush();
  const next: Qcow2Header = {
    ...h,
    refcountOrder: newOrder,
    refcountTableOffset: (start + blocks) * cs,
    refcountTableClusters: table,
  };
  await writeHeader(file, next, cs);
}

/**
 * Makes every guest cluster of a closed qcow2 image unallocated, so that it reads through to its backing
 * file (QEMU's fallback `qcow2_make_empty`: a full discard of every cluster, for images that cannot be
 * rebuilt — v2, internal snapshots, bitmaps, encryption, an external data file). The active L1 table is
 * zeroed first (flushed), then every reference it made drops from the refcounts: each L2 table once, and
 * each data cluster (normal, preallocated zero, compressed host clusters) once per L2 entry, as
 * reference paths are counted. Snapshots keep their tables. A crash in between leaves leaks only.
 */
export async function unmapActiveTable(file: Edge): Promise<void> {
  const { header: h, clusterSize: cs } = await readHeader(file);
  const bits = h.clusterBits;
  const entryBytes = (h.incompatibleFeatures & 0x10) !== 0 ? 16 : 8;
  const dataFile = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0;
  const dec = new Map<number, number>();
  const drop = (cluster: number): void => void dec.set(cluster, (dec.get(cluster) ?? 0) + 1);
  const l1 = await readAt(file, h.l1TableOffset, h.l1Size * 8);
  const l1v = new DataView(l1.buffer);
  const x = BigInt(62 - (bits - 8));
  for (let i = 0; i < h.l1Size; i++) {
    const l2Offset = entryOffset(l1v, i * 8);
    if (l2Offset === 0) continue;
    drop(l2Offset / cs);
    const l2 = await readAt(file, l2Offset, cs);
    const l2v = new DataView(l2.buffer);
    for (let j = 0; j + entryBytes <= cs; j += entryBytes) {
      const hi = l2v.getUint32(j);
      const lo = l2v.getUint32(j + 4);
      if ((hi & 0x40000000) !== 0) {
        const e = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo);
        const off = e & ((1n << x) - 1n);
        const sectors = ((e >> x) & ((1n << BigInt(bits - 8)) - 1n)) + 1n;
        const start = Number(off & ~511n);
        const end = start + Number(sectors) * 512;
        for (let c = Math.floor(start / cs); c <= Math.floor((end - 1) / cs); c++) drop(c);
        continue;
      }
      const off = entryOffset(l2v, j);
      if (off !== 0 && !dataFile) drop(off / cs);
    }
  }
  // References first: the L1 table reads as all unallocated before any refcount drops.
  await file.write(h.l1TableOffset, new Uint8Array(h.l1Size * 8));
  await file.flush();
  const refBits = 2 ** h.refcountOrder;
  const perBlock = (cs * 8) / refBits;
  const rt = await readAt(file, h.refcountTableOffset, h.refcountTableClusters * cs);
  const rtv = new DataView(rt.buffer);
  const blocks = new Map<number, { at: number; data: Uint8Array }>();
  for (const [cluster, d] of dec) {
    const index = Math.floor(cluster / perBlock);
    let block = blocks.get(index);
    if (block === undefined) {
      const at = index * 8 < rt.length ? entryOffset(rtv, index * 8) : 0;
      if (at === 0) continue;
      block = { at, data: await readAt(file, at, cs) };
      blocks.set(index, block);
    }
    const j = cluster % perBlock;
    setRefcount(block.data, refBits, j, Math.max(0, getRefcount(block.data, refBits, j) - d));
  }
  for (const { at, data } of blocks.values()) await file.write(at, data);
  await file.flush();
}

/** An L1 table: where it is and how many entries it has. */
export interface L1Table {
  offset: number;
  size: number;
}

/**
 * Turns every zero cluster reachable from `tables` (the active L1 table and the snapshots') into a data
 * cluster of zeroes, as QEMU's `qcow2_expand_zero_clusters` before a downgrade to v2: a preallocated zero
 * cluster keeps its host cluster (zeroed); an unallocated one becomes unallocated without a backing file,
 * else gets a new host cluster (past the end of the file) whose refcount is its L2 table's. The refcount
 * structures are rebuilt with the new clusters counted first, then the clusters are zeroed, then the L2
 * tables (each once, shared ones too) are written back. The image must be closed by its driver.
 * @returns whether any L2 entry is a compressed cluster
 */
export async function expandZeroClusters(
  file: Edge,
  tables: readonly L1Table[],
  hasBacking: boolean,
): Promise<{ compressed: boolean }> {
  const { header: h, clusterSize: cs } = await readHeader(file);
  const refBits = 2 ** h.refcountOrder;
  const perBlock = (cs * 8) / refBits;
  const rt = await readAt(file, h.refcountTableOffset, h.refcountTableClusters * cs);
  const rtv = new DataView(rt.buffer);
  const refcountOf = async (cluster: number): Promise<number> => {
    const i = Math.floor(cluster / perBlock);
    const at = i * 8 < rt.length ? entryOffset(rtv, i * 8) : 0;
    if (at === 0) return 0;
    return getRefcount(await readAt(file, at, cs), refBits, cluster % perBlock);
  };
  let next = Math.ceil(file.length / cs);
  const extra = new Map<number, number>();
  const zeroFill: number[] = [];
  const changed: { at: number; data: Uint8Array }[] = [];
  const seen = new Set<number>();
  let compressed = false;
  for (const t of tables) {
    const l1 = await readAt(file, t.offset, t.size * 8);
    const l1v = new DataView(l1.buffer);
    for (let i = 0; i < t.size; i++) {
      const l2Offset = entryOffset(l1v, i * 8);
      if (l2Offset === 0 || seen.has(l2Offset)) continue;
      seen.add(l2Offset);
      const l2 = await readAt(file, l2Offset, cs);
      const v = new DataView(l2.buffer);
      const tableRefcount = await refcountOf(l2Offset / cs);
      let dirty = false;
      for (let j = 0; j < cs; j += 8) {
        const hi = v.getUint32(j);
        const lo = v.getUint32(j + 4);
        if ((hi & 0x40000000) !== 0) {
          compressed = true;
          continue;
        }
        if ((lo & 1) === 0) continue;
        dirty = true;
        const off = entryOffset(v, j);
        if (off !== 0) {
          zeroFill.push(off);
          v.setUint32(j + 4, (lo & ~1) >>> 0);
        } else if (!hasBacking) {
          v.setUint32(j, 0);
          v.setUint32(j + 4, 0);
        } else {
          const c = next++;
          extra.set(c, tableRefcount);
          zeroFill.push(c * cs);
          u64(v, j, c * cs);
          if (tableRefcount === 1) v.setUint32(j, (v.getUint32(j) | 0x80000000) >>> 0);
        }
      }
      if (dirty) changed.push({ at: l2Offset, data: l2 });
    }
  }
  if (changed.length === 0) return { compressed };
  // The new clusters are counted before anything references them (a crash leaves leaks only).
  if (extra.size > 0) await changeRefcountOrder(file, h.refcountOrder, { refcounts: extra, clusters: next });
  for (const at of zeroFill) await file.writeZeroes(at, cs);
  await file.flush();
  for (const { at, data } of changed) await file.write(at, data);
  await file.flush();
  return { compressed };
}
