/**
 * `qemu-img check` for qcow2 (qcow2.md §15): count every reference to every host cluster (header, active
 * and snapshot L1/L2 tables and their data, snapshot table, reftable, refblocks, bitmap
 * directory/tables/data), compare with the on-disk refcounts (leaks vs corruptions), check the COPIED
 * flags of the active tables, and report the image end offset and allocation statistics. With a
 * {@link CheckFixer} it also repairs as `qemu-img check -r leaks|all` does (QEMU `qcow2_check_refcounts`):
 * refcounts set to the references found (leaks with `leaks`, too-low refcounts with `all`), the whole
 * refcount structure rebuilt (`all`) when a referenced cluster has refcount 0, and COPIED flags fixed.
 */
import { BlkError } from "@blk/core";
import type { Qcow2Bitmap, Qcow2Header, Qcow2Snapshot, ReadAt } from "./format.ts";
import { INCOMPAT_EXTL2, MAX_L1_BYTES } from "./format.ts";
import type { Qcow2CheckResult } from "./state.ts";

/** Inputs of {@link runCheck}. */
export interface CheckInput {
  header: Qcow2Header;
  fileLength: number;
  l1: DataView;
  reftable: Uint8Array;
  snapshots: readonly Qcow2Snapshot[];
  snapshotsSize: number;
  bitmaps: readonly Qcow2Bitmap[];
  hasDataFile: boolean;
  read: ReadAt;
}

const hex = (n: number): string => n.toString(16);
/** Loop iterations a check may take before giving up on hostile metadata. */
const WORK_BUDGET = 1 << 28;
/** Referenced clusters past the end of the file a check keeps track of. */
const MAX_SPARSE = 1 << 20;
const TWO32 = 2 ** 32;

/** What a repairing check asks of the open image (every change written and flushed). */
export interface CheckFixer {
  /** `leaks`: decrement refcounts above the references; `all`: also raise too-low ones and rebuild. */
  mode: "leaks" | "all";
  /** Sets the refcount of cluster `k` (currently `from`, non-zero) to `to`. */
  setRefcount(k: number, from: number, to: number): Promise<void>;
  /**
   * Writes a new refcount structure holding `refs(k)` for clusters `0..clusters-1` (plus its own
   * clusters) and switches the header to it.
   */
  rebuild(refs: (k: number) => number, clusters: number): Promise<void>;
  /** Rewrites active L1 entry `i` as `hi:lo` (COPIED flag changed). */
  setL1Entry(i: number, hi: number, lo: number): Promise<void>;
  /** Rewrites entry `j` of the L2 table at `l2Offset` as `hi:lo` (COPIED flag changed). */
  setL2Entry(l2Offset: number, j: number, hi: number, lo: number): Promise<void>;
  /** The inputs as they are now (after a rebuild: the new reftable, file length). */
  reload(): CheckInput;
}

/** A repairing check that had to stop; `messages` are the lines printed before (QEMU prints them). */
export class CheckFailedError extends BlkError {
  readonly messages: readonly string[];
  constructor(messages: readonly string[]) {
    super("EIO", "Input/output error");
    this.messages = messages;
  }
}

/** Computes the check report; with `fixer`, repairs as `qemu-img check -r` does. */
export async function runCheck(first: CheckInput, fixer?: CheckFixer): Promise<Qcow2CheckResult> {
  const messages: string[] = [];
  const res = { corruptions: 0, leaks: 0, checkErrors: 0, corruptionsFixed: 0, leaksFixed: 0 };
  let w = await calculate(first, messages, res);
  let input = first;
  const cmp = await compare(w, messages, res, undefined);
  if (fixer !== undefined) {
    if (cmp.rebuild && fixer.mode === "all") {
      const old = { corruptions: res.corruptions, leaks: res.leaks };
      messages.push("Rebuilding refcount structure");
      await fixer.rebuild(w.getRef, w.tableSize);
      res.corruptions = 0;
      res.leaks = 0;
      input = fixer.reload();
      w = await calculate(input, messages, res);
      // The old structures are leaked now: freed here, and only what cannot be freed counts.
      const saved = { ...res };
      res.leaks = 0;
      res.corruptions = 0;
      await compare(w, messages, res, fixer, "leaks");
      const fresh = res.leaks;
      Object.assign(res, saved);
      if (res.corruptions < old.corruptions) res.corruptionsFixed += old.corruptions - res.corruptions;
      if (res.leaks < old.leaks) res.leaksFixed += old.leaks - res.leaks;
      res.leaks += fresh;
    } else if (cmp.rebuild) {
      messages.push("ERROR need to rebuild refcount structures");
      throw new CheckFailedError(messages);
    } else if (res.leaks > 0 || res.corruptions > 0) {
      res.leaks = cmp.before.leaks;
      res.corruptions = cmp.before.corruptions;
      res.checkErrors = cmp.before.checkErrors;
      await compare(w, messages, res, fixer);
    }
  }
  const repairCopied =
    fixer !== undefined &&
    (fixer.mode === "all" || (res.checkErrors === 0 && res.corruptions === 0 && res.leaks === 0));
  await checkCopied(w, input, messages, res, repairCopied ? fixer : undefined);
  return {
    corruptions: res.corruptions,
    leaks: res.leaks,
    checkErrors: res.checkErrors,
    ...(fixer === undefined ? {} : { corruptionsFixed: res.corruptionsFixed, leaksFixed: res.leaksFixed }),
    imageEndOffset: (cmp.highest + 1) * w.cs,
    totalClusters: Math.ceil(input.header.size / w.cs),
    allocatedClusters: w.allocated,
    fragmentedClusters: w.fragmented,
    compressedClusters: w.compressed,
    messages,
  };
}

interface Counters {
  corruptions: number;
  leaks: number;
  checkErrors: number;
}

/** The computed references of one walk, and how to read on-disk refcounts. */
interface Walk {
  cs: number;
  fileClusters: number;
  tableSize: number;
  sparse: Map<number, number>;
  getRef(k: number): number;
  /** On-disk refcount (undefined: the refcount block cannot be read). */
  refcountOf(k: number): Promise<number | undefined>;
  /** Drops cached refcount blocks (after a repair changed them). */
  forget(): void;
  allocated: number;
  fragmented: number;
  compressed: number;
  entryBytes: number;
  l2Entries: number;
  /** A reftable entry is unusable: only a rebuild helps. */
  rebuild: boolean;
}

/** Walks every reference (QEMU `calculate_refcounts`); problems go to `messages` and `res`. */
async function calculate(input: CheckInput, messages: string[], out: Counters): Promise<Walk> {
  const h = input.header;
  const cs = 2 ** h.clusterBits;
  const bits = 2 ** h.refcountOrder;
  const refcountMax = bits === 64 ? 2 ** 64 - 1 : 2 ** bits - 1;
  const extL2 = (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0;
  const entryBytes = extL2 ? 16 : 8;
  const l2Entries = cs / entryBytes;
  const csizeShift = 62 - (h.clusterBits - 8);
  const res = {
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    allocated: 0,
    fragmented: 0,
    compressed: 0,
  };
  let rebuild = false;
  const fileClusters = Math.ceil(input.fileLength / cs);
  // Computed references: dense over the file, sparse beyond it (hostile offsets far past the end).
  const dense = new Float64Array(fileClusters);
  const sparse = new Map<number, number>();
  let tableSize = fileClusters;
  const getRef = (k: number): number => (k < fileClusters ? (dense[k] ?? 0) : (sparse.get(k) ?? 0));

  // Hostile metadata could make the walk practically endless; QEMU would run out of memory instead.
  let work = 0;
  const spend = (n: number): void => {
    work += n;
    if (work > WORK_BUDGET || sparse.size > MAX_SPARSE) {
      throw new BlkError("EFBIG", "Image metadata is too large to check");
    }
  };
  const inc = (offset: number, size: number, times = 1): void => {
    if (size <= 0) return;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + size - 1) / cs);
    spend(last - first + 1);
    for (let k = first; k <= last; k++) {
      if (k >= tableSize) tableSize = k + 1;
      const r = getRef(k);
      let add = times;
      if (r + add > refcountMax) {
        const over = r + add - refcountMax;
        for (let i = 0; i < Math.min(over, 16); i++)
          messages.push(`ERROR: overflow cluster offset=0x${hex(k * cs)}`);
        res.corruptions += over;
        add -= over;
      }
      if (k < fileClusters) dense[k] = r + add;
      else sparse.set(k, r + add);
    }
  };

  const entry = (v: DataView, at: number): [number, number] => [v.getUint32(at), v.getUint32(at + 4)];
  const offsetOf = (hi: number, lo: number): number => (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0);

  const checkL2 = async (l2Offset: number, fragInfo: boolean, times: number): Promise<void> => {
    // A table entirely past the end of the file reads as zeroes: nothing to count.
    if (l2Offset >= input.fileLength) return;
    spend(l2Entries);
    const t = await input.read(l2Offset, cs);
    const v = new DataView(t.buffer, t.byteOffset, t.length);
    let nextContiguous = 0;
    for (let i = 0; i < l2Entries; i++) {
      const at = i * entryBytes;
      const [hi, lo] = entry(v, at);
      const bmZero = extL2 ? v.getUint32(at + 8) : 0;
      const bmAlloc = extL2 ? v.getUint32(at + 12) : 0;
      const compressed = (hi & 0x40000000) !== 0;
      const off = offsetOf(hi, lo);
      if (!compressed && ((hi & 0x3f000000) !== 0 || (lo & 0x1fe) !== 0)) {
        messages.push(`ERROR found l2 entry with reserved bits set: ${l2Hex(hi, lo)}`);
        res.corruptions += times;
      }
      if (compressed) {
        const low = BigInt(hi & 0x3fffffff) * 2n ** 32n + BigInt(lo >>> 0);
        const coff = low & ((1n << BigInt(csizeShift)) - 1n);
        if ((hi & 0x80000000) !== 0) {
          messages.push(
            `ERROR: coffset=0x${coff.toString(16)}: copied flag must never be set for compressed clusters`,
          );
          res.corruptions += times;
        }
        if (input.hasDataFile) {
          messages.push(`ERROR compressed cluster ${i} with data file, entry=0x${l2Hex(hi, lo)}`);
          res.corruptions += times;
          continue;
        }
        if (bmZero !== 0 || bmAlloc !== 0) {
          messages.push(
            `ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${l2Hex(hi, lo)}`,
          );
          res.corruptions += times;
          continue;
        }
        const nb = Number(low >> BigInt(csizeShift)) + 1;
        if (coff <= BigInt(Number.MAX_SAFE_INTEGER)) {
          const c = Number(coff);
          inc(c, nb * 512 - (c % 512), times);
        } else {
          res.checkErrors += times;
        }
        if (fragInfo) {
          res.allocated += times;
          res.compressed += times;
          res.fragmented += times;
        }
        continue;
      }
      const zeroFlag = !extL2 && (lo & 1) !== 0;
      const allocated = off !== 0 || (input.hasDataFile && (hi & 0x80000000) !== 0);
      if (allocated) {
        // NORMAL or ZERO_ALLOC
        if ((bmZero & bmAlloc) !== 0) {
          res.corruptions += times;
          messages.push(
            `ERROR offset=${hex(off)}: Allocated cluster has corrupted subcluster allocation bitmap`,
          );
        }
        if (off % cs !== 0) {
          res.corruptions += times;
          const containsData = extL2 ? bmAlloc !== 0 : !zeroFlag;
          messages.push(
            containsData
              ? `ERROR offset=${hex(off)}: Data cluster is not properly aligned; L2 entry corrupted.`
              : `ERROR offset=${hex(off)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`,
          );
        }
        if (fragInfo) {
          res.allocated += times;
          if (nextContiguous !== 0 && off !== nextContiguous) res.fragmented += times;
          nextContiguous = off + cs;
        }
        if (!input.hasDataFile) inc(off, cs, times);
      } else if (!zeroFlag && bmAlloc !== 0) {
        res.corruptions += times;
        messages.push("ERROR: Unallocated cluster has non-zero subcluster allocation map");
      }
    }
  };

  const checkL1 = async (
    l1Offset: number,
    l1Size: number,
    fragInfo: boolean,
    table?: DataView,
  ): Promise<void> => {
    if (l1Size === 0) return;
    inc(l1Offset, l1Size * 8);
    // Entries past the end of the file read as zero: only the part inside the file matters.
    const inFile = Math.max(0, Math.min(l1Size, Math.ceil((input.fileLength - l1Offset) / 8)));
    let v = table;
    if (v === undefined) {
      const b = await input.read(l1Offset, inFile * 8);
      v = new DataView(b.buffer, b.byteOffset, b.length);
    }
    const n = Math.min(inFile, v.byteLength / 8);
    spend(n);
    // Each distinct L2 table is walked once, its references counted as often as L1 entries name it.
    const tables = new Map<number, number>();
    for (let i = 0; i < n; i++) {
      const [hi, lo] = entry(v, i * 8);
      if (hi === 0 && lo === 0) continue;
      if ((hi & 0x7f000000) !== 0 || (lo & 0x1ff) !== 0) {
        messages.push(`ERROR found L1 entry with reserved bits set: ${l2Hex(hi, lo)}`);
        res.corruptions++;
      }
      const l2Offset = offsetOf(hi, lo);
      inc(l2Offset, cs);
      if (l2Offset % cs !== 0) {
        messages.push(`ERROR l2_offset=${hex(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
        res.corruptions++;
      }
      tables.set(l2Offset, (tables.get(l2Offset) ?? 0) + 1);
    }
    for (const [l2Offset, times] of tables) await checkL2(l2Offset, fragInfo, times);
  };

  // 1. header, active L1/L2 and data
  inc(0, cs);
  await checkL1(h.l1TableOffset, h.l1Size, true, input.l1);
  // 2. snapshots
  if (input.hasDataFile && input.snapshots.length > 0) {
    messages.push(`ERROR ${input.snapshots.length} snapshots in image with data file`);
    res.corruptions++;
  }
  for (const sn of input.snapshots) {
    if (sn.l1TableOffset % cs !== 0) {
      messages.push(
        `ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${hex(sn.l1TableOffset)}: L1 table is not cluster aligned; snapshot table entry corrupted`,
      );
      res.corruptions++;
      continue;
    }
    if (sn.l1Size > MAX_L1_BYTES / 8) {
      messages.push(
        `ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${hex(sn.l1Size)}: L1 table is too large; snapshot table entry corrupted`,
      );
      res.corruptions++;
      continue;
    }
    await checkL1(sn.l1TableOffset, sn.l1Size, false);
  }
  inc(h.snapshotsOffset, input.snapshotsSize);
  // 3. reftable
  inc(h.refcountTableOffset, h.refcountTableClusters * cs);
  // 4. bitmaps
  if (h.bitmaps !== undefined && input.bitmaps.length > 0) {
    inc(h.bitmaps.directoryOffset, h.bitmaps.directorySize);
    for (const bm of input.bitmaps) {
      inc(bm.tableOffset, bm.tableSize * 8);
      const inFile = Math.max(0, Math.min(bm.tableSize, Math.ceil((input.fileLength - bm.tableOffset) / 8)));
      spend(inFile);
      const t = await input.read(bm.tableOffset, inFile * 8);
      const v = new DataView(t.buffer, t.byteOffset, t.length);
      for (let i = 0; i < inFile; i++) {
        const [hi, lo] = entry(v, i * 8);
        const off = offsetOf(hi, lo);
        const reserved = (hi & 0xff000000) !== 0 || (lo & 0x1fe) !== 0;
        if (reserved || (off !== 0 && ((lo & 1) !== 0 || off % cs !== 0))) {
          res.corruptions++;
          continue;
        }
        if (off !== 0) inc(off, cs);
      }
    }
  }
  // 5. refblocks
  const rt = new DataView(input.reftable.buffer, input.reftable.byteOffset, input.reftable.length);
  const rtEntries = input.reftable.length / 8;
  for (let i = 0; i < rtEntries; i++) {
    const hi = rt.getUint32(i * 8);
    const lo = rt.getUint32(i * 8 + 4);
    if ((lo & 0x1ff) !== 0) {
      messages.push(`ERROR refcount table entry ${i} has reserved bits set`);
      res.corruptions++;
      rebuild = true;
      continue;
    }
    const off = hi * TWO32 + lo;
    const cluster = Math.floor(off / cs);
    if (cluster >= tableSize) {
      res.corruptions++;
      messages.push(`ERROR refcount block ${i} is outside image`);
      rebuild = true;
      continue;
    }
    if (off !== 0) {
      inc(off, cs);
      const r = getRef(cluster);
      if (r !== 1) {
        messages.push(`ERROR refcount block ${i} refcount=${r}`);
        res.corruptions++;
      }
    }
  }

  // On-disk refcounts, with a small refblock cache.
  const blockEntries = (cs * 8) / bits;
  const blockCache = new Map<number, DataView>();
  const refcountOf = async (k: number): Promise<number | undefined> => {
    const idx = Math.floor(k / blockEntries);
    if (idx >= rtEntries) return 0;
    const hi = rt.getUint32(idx * 8);
    const lo = rt.getUint32(idx * 8 + 4);
    if (hi > 0x1fffff) return undefined;
    const off = hi * TWO32 + ((lo & 0xfffffe00) >>> 0);
    if (off === 0) return 0;
    if (off % cs !== 0) return undefined;
    let b = blockCache.get(off);
    if (b === undefined) {
      const raw = await input.read(off, cs);
      b = new DataView(raw.buffer, raw.byteOffset, raw.length);
      if (blockCache.size >= 8) {
        const first = blockCache.keys().next().value;
        if (first !== undefined) blockCache.delete(first);
      }
      blockCache.set(off, b);
    }
    const j = k % blockEntries;
    switch (bits) {
      case 1:
      case 2:
      case 4: {
        const bitPos = j * bits;
        return (b.getUint8(bitPos >>> 3) >>> (bitPos & 7)) & ((1 << bits) - 1);
      }
      case 8:
        return b.getUint8(j);
      case 16:
        return b.getUint16(j * 2);
      case 32:
        return b.getUint32(j * 4);
      default:
        return b.getUint32(j * 8) * TWO32 + b.getUint32(j * 8 + 4);
    }
  };

  out.corruptions += res.corruptions;
  out.leaks += res.leaks;
  out.checkErrors += res.checkErrors;
  return {
    cs,
    fileClusters,
    tableSize,
    sparse,
    getRef,
    refcountOf,
    forget: () => blockCache.clear(),
    allocated: res.allocated,
    fragmented: res.fragmented,
    compressed: res.compressed,
    entryBytes,
    l2Entries,
    rebuild,
  };
}

/**
 * Compares references with on-disk refcounts (QEMU `compare_refcounts`). With `fixer`, mismatches it may
 * fix (`mode`: leaks, plus too-low non-zero refcounts with `all`) are repaired and counted as fixed.
 * A referenced cluster with refcount 0 asks for a rebuild instead.
 */
async function compare(
  w: Walk,
  messages: string[],
  res: Counters & { corruptionsFixed?: number; leaksFixed?: number },
  fixer: CheckFixer | undefined,
  mode: "leaks" | "all" | undefined = fixer?.mode,
): Promise<{ rebuild: boolean; highest: number; before: Counters }> {
  const before = { corruptions: res.corruptions, leaks: res.leaks, checkErrors: res.checkErrors };
  const { getRef, refcountOf } = w;
  let rebuild = w.rebuild;
  let highest = -1;
  const one = async (k: number): Promise<void> => {
    const onDisk = await refcountOf(k);
    if (onDisk === undefined) {
      res.checkErrors++;
      return;
    }
    const computed = getRef(k);
    if (onDisk > 0 || computed > 0) highest = k;
    if (onDisk === computed) return;
    let fix: "leaksFixed" | "corruptionsFixed" | undefined;
    if (onDisk === 0) rebuild = true;
    else if (onDisk > computed && mode !== undefined) fix = "leaksFixed";
    else if (onDisk < computed && mode === "all") fix = "corruptionsFixed";
    const what = fix !== undefined ? "Repairing" : onDisk < computed ? "ERROR" : "Leaked";
    messages.push(`${what} cluster ${k} refcount=${onDisk} reference=${computed}`);
    if (fix !== undefined && fixer !== undefined) {
      await fixer.setRefcount(k, onDisk, computed);
      res[fix] = (res[fix] ?? 0) + 1;
      if (computed === 0 && highest === k) highest = -2;
      return;
    }
    if (onDisk < computed) res.corruptions++;
    else res.leaks++;
  };
  for (let k = 0; k < w.fileClusters; k++) {
    await one(k);
    if (highest === -2) highest = k - 1;
  }
  for (const k of [...w.sparse.keys()].sort((a, b) => a - b)) await one(k);
  if (fixer !== undefined) w.forget();
  return { rebuild, highest, before };
}

/** Checks (and with `fixer`, repairs) the COPIED flags of the active L1 and L2 tables. */
async function checkCopied(
  w: Walk,
  input: CheckInput,
  messages: string[],
  res: Counters & { corruptionsFixed: number },
  fixer: CheckFixer | undefined,
): Promise<void> {
  const h = input.header;
  const { cs, refcountOf, entryBytes, l2Entries } = w;
  const entry = (v: DataView, at: number): [number, number] => [v.getUint32(at), v.getUint32(at + 4)];
  const offsetOf = (hi: number, lo: number): number => (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0);
  const what = fixer !== undefined ? "Repairing" : "ERROR";
  const found = (): void => {
    if (fixer !== undefined) res.corruptionsFixed++;
    else res.corruptions++;
  };
  const activeInFile = Math.min(h.l1Size, input.l1.byteLength / 8);
  const copiedFindings = new Map<number, number>();
  for (let i = 0; i < activeInFile; i++) {
    const [hi, lo] = entry(input.l1, i * 8);
    const l2Offset = offsetOf(hi, lo);
    if (l2Offset === 0) continue;
    const rc = await refcountOf(Math.floor(l2Offset / cs));
    if (rc === undefined) continue;
    if ((rc === 1) !== ((hi & 0x80000000) !== 0)) {
      found();
      messages.push(
        `${what} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${l2Hex(hi, lo)} refcount=${rc}`,
      );
      if (fixer !== undefined) await fixer.setL1Entry(i, (hi ^ 0x80000000) >>> 0, lo);
    }
    if (l2Offset >= input.fileLength) continue;
    // The data entries of a table give the same findings each time an L1 entry names it.
    const seen = copiedFindings.get(l2Offset);
    if (seen !== undefined) {
      if (fixer === undefined) res.corruptions += seen;
      continue;
    }
    const before = res.corruptions;
    const t = await input.read(l2Offset, cs);
    const v = new DataView(t.buffer, t.byteOffset, t.length);
    for (let j = 0; j < l2Entries; j++) {
      const [ehi, elo] = entry(v, j * entryBytes);
      if ((ehi & 0x40000000) !== 0) continue;
      const off = offsetOf(ehi, elo);
      const allocated = off !== 0 || (input.hasDataFile && (ehi & 0x80000000) !== 0);
      if (!allocated) continue;
      let r: number | undefined = 1;
      if (!input.hasDataFile) r = await refcountOf(Math.floor(off / cs));
      if (r === undefined) continue;
      if ((r === 1) !== ((ehi & 0x80000000) !== 0)) {
        found();
        messages.push(`${what} OFLAG_COPIED data cluster: l2_entry=${l2Hex(ehi, elo)} refcount=${r}`);
        if (fixer !== undefined) await fixer.setL2Entry(l2Offset, j, (ehi ^ 0x80000000) >>> 0, elo);
      }
    }
    copiedFindings.set(l2Offset, res.corruptions - before);
  }
}

function l2Hex(hi: number, lo: number): string {
  return hi === 0 ? lo.toString(16) : hi.toString(16) + lo.toString(16).padStart(8, "0");
}
