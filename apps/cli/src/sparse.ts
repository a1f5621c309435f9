/**
 * `qemu-img convert -S`: the search of data for zero runs to leave unwritten (or write as zeroes), with
 * qemu-img's alignment rules, so that blk-img's output is exactly as sparse as qemu-img's.
 */
import type { DataRun } from "@blk/core";

/** The unit of the search: a 512-byte sector. */
export const SECTOR = 512;
/** Largest piece qemu-img convert examines at once (its 2 MiB buffer), in sectors. */
const PIECE_SECTORS = 4096;

/** A run of written data: `zero` runs are left unwritten (or written as zeroes). Offsets in bytes. */
export type SparseRun = DataRun;

/**
 * Sets `zero[s]` to 1 for each all-zero sector of `buf` (the last may be short); true when any is.
 * Data nearly always shows in a sector's first word, so the loop over whole sectors looks at that word
 * alone and reads the rest only of sectors that start with zeroes: one cache line per sector, which is
 * what this costs on dense data (the buffer was just filled by another thread).
 */
function markZeroSectors(buf: Uint8Array, zero: Uint8Array): boolean {
  const whole = buf.length >>> 9;
  let anyZero = false;
  let s = 0;
  if (buf.byteOffset % 4 === 0) {
    const words = new Uint32Array(buf.buffer, buf.byteOffset, whole << 7);
    for (; s < whole; s++) {
      let w = s << 7;
      if (words[w] !== 0) continue;
      const end = w + 128;
      while (++w < end && words[w] === 0);
      if (w === end) {
        zero[s] = 1;
        anyZero = true;
      }
    }
  }
  for (; s < zero.length; s++) {
    const end = Math.min(buf.length, (s + 1) * SECTOR);
    let i = s * SECTOR;
    while (i < end && buf[i] === 0) i++;
    if (i === end) {
      zero[s] = 1;
      anyZero = true;
    }
  }
  return anyZero;
}

/**
 * Splits data written at 512-byte sector `sector` into data and zero runs the way qemu-img convert
 * does with `-S`: pieces of at most 2 MiB whose ends are aligned down to `align` sectors (the largest
 * power of two not above `-S`); in a piece, runs of equal sectors have their end aligned to `align`
 * (a data run's end up, a zero run's end down, and a zero run shorter than that tail counts as data);
 * a leading zero run is zero whatever its length; after data, zero runs shorter than `minSectors`
 * followed by more data stay part of the data.
 */
export function sparseRuns(buf: Uint8Array, sector: number, minSectors: number, align: number): SparseRun[] {
  const n = Math.ceil(buf.length / SECTOR);
  const zero = new Uint8Array(n);
  const anyZero = markZeroSectors(buf, zero);
  // No zero sector: all data, one run (what the run splitting below would find, only sooner).
  if (!anyZero) return n === 0 ? [] : [{ start: 0, end: buf.length, zero: false }];
  // One run from `p` (at most `len` sectors): is it data, and how long.
  const run = (p: number, len: number): { data: boolean; count: number } => {
    let isZero = zero[p] === 1;
    let i = 1;
    while (i < len && (zero[p + i] === 1) === isZero) i++;
    if (i === len) return { data: !isZero, count: i };
    const tail = (sector + p + i) % align;
    if (tail !== 0) {
      if (isZero && i <= tail) isZero = false;
      if (isZero) i -= tail;
      else i = Math.min(len, i + align - tail);
    }
    return { data: !isZero, count: i };
  };
  const runMin = (p: number, len: number): { data: boolean; count: number } => {
    const min = Math.min(minSectors, len);
    const first = run(p, len);
    if (!first.data) return first;
    let used = first.count;
    let checked = used;
    while (checked < len) {
      const r = run(p + checked, len - checked);
      checked += r.count;
      if (r.data) used = checked;
      else if (r.count >= min) break;
    }
    return { data: true, count: used };
  };
  const out: SparseRun[] = [];
  const push = (a: number, b: number, isZero: boolean): void => {
    const last = out.at(-1);
    if (last !== undefined && last.zero === isZero && last.end === a * SECTOR) last.end = b * SECTOR;
    else out.push({ start: a * SECTOR, end: b * SECTOR, zero: isZero });
  };
  let pos = 0;
  while (pos < n) {
    let pieceEnd = Math.min(n, pos + PIECE_SECTORS);
    const aligned = Math.floor((sector + pieceEnd) / align) * align - sector;
    if (aligned > pos) pieceEnd = aligned;
    for (let p = pos; p < pieceEnd; ) {
      const r = runMin(p, pieceEnd - p);
      push(p, p + r.count, !r.data);
      p += r.count;
    }
    pos = pieceEnd;
  }
  for (const r of out) r.end = Math.min(r.end, buf.length);
  return out;
}

/**
 * The `-S` search of data written at byte `offset` (absolute, in the target) for `minSparse` bytes:
 * qemu-img's sector count and alignment (the largest power of two not above it, in sectors).
 */
export function sparseSplitter(minSparse: number): (offset: number, data: Uint8Array) => SparseRun[] {
  const minSectors = Math.max(1, Math.floor(minSparse / SECTOR));
  let align = 1;
  while (align * 2 <= minSectors) align *= 2;
  // Runs are placed on the absolute sector grid (a write at an unaligned byte offset uses its sector).
  return (offset, data) => sparseRuns(data, Math.floor(offset / SECTOR), minSectors, align);
}
