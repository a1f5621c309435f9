/**
 * QEMU's HBitmap (`util/hbitmap.c` semantics, see /work/shared/spec/hbitmap.md §1–§6), rebuilt on paged
 * 32-bit words. Level 0 here is the bottom (the real bits); each level above has one bit per word of the
 * level below, set iff that word is non-zero, up to a single-word top level. The word width is internal:
 * granularity, counts, iteration order, the 64-bit serialization layout and the sha256 are QEMU's.
 */
import { createHash } from "node:crypto";
import { ctz32, popcount32 } from "./bits.ts";
import { HBitmapError } from "./errors.ts";
import { Level, PAGE_MASK, PAGE_WORDS, resetBits, setBits, wordsFor } from "./level.ts";

/** Largest number of bits (granules) a bitmap may have: QEMU's `HBITMAP_LOG_MAX_SIZE` = 41 on 64-bit hosts. */
export const HBITMAP_MAX_BITS: number = 2 ** 41;

/** Granularities from this one up cannot be serialized (`64 << g` would not fit in 64 bits). */
export const HBITMAP_MAX_SERIALIZABLE_GRANULARITY = 57;

const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
const ZERO_PAGE = new Uint8Array(PAGE_WORDS * 4);

function checkUint(name: string, v: number): void {
  if (!Number.isSafeInteger(v) || v < 0) {
    throw new HBitmapError("EINVAL", `${name} must be a non-negative safe integer, got ${String(v)}`);
  }
}

/** A search window or limit: any non-negative integer (it is clamped to the bitmap), or Infinity. */
function checkLimit(name: string, v: number): void {
  if (!(v >= 0 && (Number.isInteger(v) || v === Number.POSITIVE_INFINITY))) {
    throw new HBitmapError("EINVAL", `${name} must be a non-negative integer or Infinity, got ${String(v)}`);
  }
}

/** A dirty area: `count` items from `start`. */
export interface HBitmapArea {
  /** First item of the area (may be unaligned: clamped to the search start). */
  start: number;
  /** Length in items. */
  count: number;
}

/** Result of {@link HBitmap.status}. */
export interface HBitmapStatus {
  /** Whether the item at the queried start is dirty. */
  dirty: boolean;
  /** Length in items of the run with that state from the queried start, capped at the queried count. */
  count: number;
}

/**
 * A hierarchical bitmap over `size` items where one bit covers `2^granularity` aligned items (a granule),
 * with QEMU's HBitmap semantics: `set` rounds outward, `reset` must be granule-aligned (the tail may stop at
 * `size`), `count()` is set bits × 2^granularity, iteration yields the start of each dirty granule.
 * Offsets are JS numbers, exact below 2^53.
 * @example
 * const hb = new HBitmap(1 << 20, 16);   // 1 MiB at 64 KiB granularity: 16 bits
 * hb.set(65535, 2);                       // touches granules 0 and 1
 * hb.count();                             // 131072
 * [...hb.iter()];                         // [0, 65536]
 */
export class HBitmap {
  /** log2 of items per bit (0..63). */
  readonly granularity: number;
  #gran: number;
  #origSize: number;
  #bits: number;
  #levels: Level[];
  #count = 0;
  #meta: HBitmap | undefined;

  /**
   * @param size size in items (`orig_size`, may be unaligned)
   * @param granularity log2 of items per bit, 0..63
   * @throws {HBitmapError} EINVAL when an argument is not an integer in range; ERANGE when the bitmap would
   * need more than 2^41 bits.
   */
  constructor(size: number, granularity: number) {
    checkUint("size", size);
    if (!Number.isInteger(granularity) || granularity < 0 || granularity > 63) {
      throw new HBitmapError("EINVAL", `granularity must be an integer in 0..63, got ${String(granularity)}`);
    }
    this.granularity = granularity;
    this.#gran = 2 ** granularity;
    this.#origSize = size;
    this.#bits = this.#bitsFor(size);
    this.#levels = buildLevels(new Level(wordsFor(this.#bits)));
  }

  #bitsFor(size: number): number {
    const bits = Math.ceil(size / this.#gran);
    if (bits > HBITMAP_MAX_BITS) {
      throw new HBitmapError("ERANGE", `size ${size} needs ${bits} bits, more than the limit of 2^41`);
    }
    return bits;
  }

  /** Size in items (`orig_size`). */
  get size(): number {
    return this.#origSize;
  }

  /** Number of bits (granules): `ceil(size / 2^granularity)`. */
  get granules(): number {
    return this.#bits;
  }

  /** The meta bitmap, if {@link createMeta} made one. */
  get meta(): HBitmap | undefined {
    return this.#meta;
  }

  #bitOf(item: number): number {
    return Math.floor(item / this.#gran);
  }

  /**
   * Whether the granule containing `item` is dirty.
   * @throws {HBitmapError} ERANGE when the granule is past the end.
   */
  get(item: number): boolean {
    checkUint("item", item);
    const bit = this.#bitOf(item);
    if (bit >= this.#bits)
      throw new HBitmapError("ERANGE", `item ${item} is past the end (${this.#bits} granules)`);
    return ((this.#levels[0] as Level).word(Math.floor(bit / 32)) & (1 << (bit & 31))) !== 0;
  }

  /** Validates an item range and returns its inclusive bit range, or undefined for `count == 0`. */
  #range(start: number, count: number): [number, number] | undefined {
    checkUint("start", start);
    checkUint("count", count);
    if (count === 0) return undefined;
    if (start + count > Number.MAX_SAFE_INTEGER) {
      throw new HBitmapError("ERANGE", `range ${start}+${count} exceeds 2^53`);
    }
    const first = this.#bitOf(start);
    const last = this.#bitOf(start + count - 1);
    if (last >= this.#bits) {
      throw new HBitmapError("ERANGE", `range ${start}+${count} is past the end (${this.#bits} granules)`);
    }
    return [first, last];
  }

  /**
   * Marks every granule that `[start, start+count)` touches (outward rounding). `count == 0` is a no-op.
   * When a bit changed and a meta bitmap exists, marks the meta over the same item range.
   * @throws {HBitmapError} EINVAL for bad arguments; ERANGE when the last granule is past the end.
   */
  set(start: number, count: number): void {
    const r = this.#range(start, count);
    if (r === undefined) return;
    const added = this.#setBits(r[0], r[1]);
    if (added > 0 && this.#meta !== undefined) this.#meta.set(start, count);
  }

  /**
   * Clears the granules of `[start, start+count)`. `start` must be granule-aligned, and so must `count`
   * unless the range ends exactly at `size` (the tail rule). `count == 0` is a no-op. When a bit changed and
   * a meta bitmap exists, marks the meta over the same item range.
   * @throws {HBitmapError} EINVAL for a misaligned range (QEMU asserts); ERANGE past the end.
   */
  reset(start: number, count: number): void {
    checkUint("start", start);
    checkUint("count", count);
    if (count === 0) return;
    if (!Number.isInteger(start / this.#gran)) {
      throw new HBitmapError("EINVAL", `reset start ${start} is not aligned to the granule of ${this.#gran}`);
    }
    if (!Number.isInteger(count / this.#gran) && start + count !== this.#origSize) {
      throw new HBitmapError(
        "EINVAL",
        `reset count ${count} is not aligned to the granule of ${this.#gran} and does not end at size ${this.#origSize}`,
      );
    }
    const r = this.#range(start, count);
    if (r === undefined) return;
    const removed = this.#resetBits(r[0], r[1]);
    if (removed > 0 && this.#meta !== undefined) this.#meta.set(start, count);
  }

  /** Clears every bit. Does not touch the meta bitmap. */
  resetAll(): void {
    for (const lv of this.#levels) lv.clear();
    this.#count = 0;
  }

  #setBits(b0: number, b1: number): number {
    const levels = this.#levels;
    const added = setBits(levels[0] as Level, b0, b1);
    if (added === 0) return 0;
    this.#count += added;
    let lo = b0;
    let hi = b1;
    for (let l = 1; l < levels.length; l++) {
      lo = Math.floor(lo / 32);
      hi = Math.floor(hi / 32);
      if (setBits(levels[l] as Level, lo, hi) === 0) break;
    }
    return added;
  }

  #resetBits(b0: number, b1: number): number {
    const levels = this.#levels;
    const removed = resetBits(levels[0] as Level, b0, b1);
    if (removed === 0) return 0;
    this.#count -= removed;
    let lo = b0;
    let hi = b1;
    for (let l = 1; l < levels.length; l++) {
      const below = levels[l - 1] as Level;
      let w0 = Math.floor(lo / 32);
      let w1 = Math.floor(hi / 32);
      // Only words that became entirely zero clear their bit above.
      if (below.word(w0) !== 0) w0++;
      if (w1 >= w0 && below.word(w1) !== 0) w1--;
      if (w0 > w1) break;
      if (resetBits(levels[l] as Level, w0, w1) === 0) break;
      lo = w0;
      hi = w1;
    }
    return removed;
  }

  /** QEMU's `hbitmap_count`: set bits × 2^granularity (a multiple of the granule; may exceed `size`). */
  count(): number {
    return this.#count * this.#gran;
  }

  /** Whether no bit is set. */
  isEmpty(): boolean {
    return this.#count === 0;
  }

  /** Whether every bit is set (QEMU has no such call; defined as set bits == granules). */
  isFull(): boolean {
    return this.#count === this.#bits;
  }

  /** First set bit in `[from, last]`, or -1. */
  #nextSetBit(from: number, last: number): number {
    if (from > last) return -1;
    const levels = this.#levels;
    const top = levels.length;
    let l = 0;
    let pos = from;
    let lim = last;
    for (;;) {
      const w = Math.floor(pos / 32);
      const word = (levels[l] as Level).word(w) & (-1 << (pos & 31));
      if (word !== 0) {
        let bit = w * 32 + ctz32(word);
        if (bit > lim) return -1;
        while (l > 0) {
          l--;
          bit = bit * 32 + ctz32((levels[l] as Level).word(bit));
        }
        return bit > last ? -1 : bit;
      }
      l++;
      if (l === top) return -1;
      pos = w + 1;
      lim = Math.floor(lim / 32);
      if (pos > lim) return -1;
    }
  }

  /** First clear bit in `[from, last]`, or -1. */
  #nextZeroBit(from: number, last: number): number {
    if (from > last) return -1;
    const lv = this.#levels[0] as Level;
    const wl = Math.floor(last / 32);
    let w = Math.floor(from / 32);
    let skip = -1 << (from & 31); // bits below `from` count as set
    for (;;) {
      const p = Math.floor(w / PAGE_WORDS);
      const base = p * PAGE_WORDS;
      const pg = lv.page(p);
      const end = Math.min(wl - base, PAGE_WORDS - 1);
      if (pg === undefined) {
        const bit = w * 32 + ctz32(skip);
        return bit > last ? -1 : bit;
      }
      for (let i = w - base; i <= end; i++) {
        const z = ~(pg[i] as number) & skip;
        if (z !== 0) {
          const bit = (base + i) * 32 + ctz32(z);
          return bit > last ? -1 : bit;
        }
        skip = -1;
      }
      w = base + end + 1;
      if (w > wl) return -1;
      skip = -1;
    }
  }

  /**
   * QEMU's `hbitmap_next_dirty`: the first dirty item in `[start, start+count)` clamped up to `start`
   * (so `start` itself when it lies in a dirty granule), or -1. Returns -1 when `start >= size` or
   * `count == 0`.
   * @param count defaults to the rest of the bitmap
   */
  nextDirty(start: number, count: number = Number.POSITIVE_INFINITY): number {
    checkUint("start", start);
    checkLimit("count", count);
    return this.#nextDirty(start, count);
  }

  #nextDirty(start: number, count: number): number {
    const size = this.#origSize;
    if (start >= size || count === 0) return -1;
    const end = count >= size - start ? size : start + count;
    const bit = this.#nextSetBit(this.#bitOf(start), this.#bitOf(end - 1));
    return bit < 0 ? -1 : Math.max(start, bit * this.#gran);
  }

  /**
   * QEMU's `hbitmap_next_zero`: the first item in the window whose granule is clean, clamped up to `start`,
   * or -1. The window runs to the end of the bitmap when `count > size - start`, else to the granule of
   * `start + count - 1`. Returns -1 when `start >= size` or `count == 0`.
   * @param count defaults to the rest of the bitmap
   */
  nextZero(start: number, count: number = Number.POSITIVE_INFINITY): number {
    checkUint("start", start);
    checkLimit("count", count);
    return this.#nextZero(start, count);
  }

  #nextZero(start: number, count: number): number {
    const size = this.#origSize;
    if (start >= size || count === 0) return -1;
    const lastBit = count > size - start ? this.#bits - 1 : this.#bitOf(start + count - 1);
    const bit = this.#nextZeroBit(this.#bitOf(start), lastBit);
    return bit < 0 ? -1 : Math.max(start, bit * this.#gran);
  }

  /**
   * QEMU's `hbitmap_next_dirty_area` (5.2+ form): the first dirty area in `[start, min(end, size))`, at most
   * `maxCount` items long, or null. The area's start is clamped to `start`; its end is a granule boundary
   * unless clipped by `end` or `maxCount`.
   * @param maxCount defaults to unlimited; must be positive
   * @throws {HBitmapError} EINVAL for bad arguments (QEMU asserts `max > 0`).
   */
  nextDirtyArea(start: number, end: number, maxCount: number = Number.POSITIVE_INFINITY): HBitmapArea | null {
    checkUint("start", start);
    checkLimit("end", end);
    checkLimit("maxCount", maxCount);
    if (maxCount === 0) throw new HBitmapError("EINVAL", "maxCount must be positive");
    const stop = Math.min(end, this.#origSize);
    if (start >= stop) return null;
    const ds = this.#nextDirty(start, stop - start);
    if (ds < 0) return null;
    let e = ds + Math.min(stop - ds, maxCount);
    const z = this.#nextZero(ds, e - ds);
    if (z >= 0) e = z;
    return { start: ds, count: e - ds };
  }

  /**
   * QEMU's `hbitmap_status`: whether `start` is dirty and how many items from `start` share that state,
   * capped at `count`.
   * @throws {HBitmapError} EINVAL when `count == 0`; ERANGE when `start + count > size`.
   */
  status(start: number, count: number): HBitmapStatus {
    checkUint("start", start);
    checkUint("count", count);
    if (count === 0) throw new HBitmapError("EINVAL", "status count must be positive");
    if (start + count > this.#origSize) {
      throw new HBitmapError("ERANGE", `status range ${start}+${count} is past size ${this.#origSize}`);
    }
    const nd = this.#nextDirty(start, count);
    if (nd < 0) return { dirty: false, count };
    if (nd > start) return { dirty: false, count: nd - start };
    const nz = this.#nextZero(start, count);
    return { dirty: true, count: nz < 0 ? count : nz - start };
  }

  /**
   * An iterator over dirty granules from the granule containing `first`. Each `next()` returns the start
   * item of the next dirty granule, or -1 at the end. It reads the live bitmap: a bit reset after creation is
   * never returned; a bit set after creation ahead of the position is found, one behind it is not (QEMU
   * allows either). `truncate` and deserialization do not break it but make its results unspecified.
   * @throws {HBitmapError} ERANGE when `first` is past the end (QEMU asserts); `first == 0` is always accepted.
   */
  iter(first = 0): HBitmapIter {
    checkUint("first", first);
    const bit = this.#bitOf(first);
    if (first !== 0 && bit >= this.#bits) {
      throw new HBitmapError("ERANGE", `iterator start ${first} is past the end (${this.#bits} granules)`);
    }
    // Cursor: the bottom word being consumed and the mask of its bits not yet passed. Every step ANDs the
    // mask with the live word (as QEMU does), so a bit reset after creation is never returned.
    let w = Math.floor(bit / 32);
    let mask = -1 << (bit & 31);
    let done = false;
    const gran = this.#gran;
    return new HBitmapIter(() => {
      if (done) return -1;
      for (;;) {
        const cur = mask & (this.#levels[0] as Level).word(w);
        if (cur !== 0) {
          const b = ctz32(cur);
          mask = b === 31 ? 0 : -1 << (b + 1);
          return (w * 32 + b) * gran;
        }
        const next = this.#nextSetBit((w + 1) * 32, this.#bits - 1);
        if (next < 0) {
          done = true;
          return -1;
        }
        w = Math.floor(next / 32);
        mask = -1 << (next & 31);
      }
    });
  }

  /**
   * `result := a ∪ b` (QEMU's `hbitmap_merge`). All three must have the same `size`; granularities may
   * differ (then the sources' dirty areas are set into `result`, rounding outward). `result` may be `a` or
   * `b`. Meta bitmaps are not updated.
   * @throws {HBitmapError} EINVAL when the sizes differ.
   */
  static merge(a: HBitmap, b: HBitmap, result: HBitmap): void {
    if (a.#origSize !== result.#origSize || b.#origSize !== result.#origSize) {
      throw new HBitmapError(
        "EINVAL",
        `cannot merge bitmaps of different sizes (${a.#origSize}, ${b.#origSize} into ${result.#origSize})`,
      );
    }
    if (a.#count === 0 && result === b) return;
    if (b.#count === 0 && result === a) return;
    if (a.#count === 0 && b.#count === 0) {
      result.resetAll();
      return;
    }
    if (a.granularity !== b.granularity || a.granularity !== result.granularity) {
      if (result !== a && result !== b) result.resetAll();
      for (const src of a === b ? [a] : [a, b]) {
        if (src === result) continue;
        const size = src.#origSize;
        let pos = 0;
        for (;;) {
          const area = src.nextDirtyArea(pos, size);
          if (area === null) break;
          const r = result.#range(area.start, area.count);
          if (r !== undefined) result.#setBits(r[0], r[1]);
          pos = area.start + area.count;
        }
      }
      return;
    }
    // Same granularity: word-wise OR on every level, then recount.
    for (let l = 0; l < result.#levels.length; l++) {
      const la = a.#levels[l] as Level;
      const lb = b.#levels[l] as Level;
      let into: Level;
      let from: Level;
      if (result === a) {
        into = la;
        from = lb;
      } else if (result === b) {
        into = lb;
        from = la;
      } else {
        into = la.clone();
        from = lb;
        result.#levels[l] = into;
      }
      if (into === from) continue;
      from.forEachPage((p, src) => {
        const dst = into.ensure(p);
        for (let i = 0; i < src.length; i++) dst[i] = (dst[i] as number) | (src[i] as number);
      });
    }
    result.#count = (result.#levels[0] as Level).popcount();
  }

  /**
   * Changes `size` (QEMU's `hbitmap_truncate`). Shrinking clears the granules past the new last one first
   * (a partial last granule keeps its bit, and the meta bitmap is marked if bits changed); growing adds clean
   * granules. The meta bitmap is truncated to match.
   * @throws {HBitmapError} EINVAL for a bad size; ERANGE when it needs more than 2^41 bits.
   */
  truncate(newSize: number): void {
    checkUint("size", newSize);
    const newBits = this.#bitsFor(newSize);
    const oldBits = this.#bits;
    if (newBits < oldBits) {
      const removed = this.#resetBits(newBits, oldBits - 1);
      const meta = this.#meta;
      if (removed > 0 && meta !== undefined) {
        const from = newBits * this.#gran;
        if (from < meta.size) meta.set(from, meta.size - from);
      }
    }
    this.#origSize = newSize;
    this.#bits = newBits;
    const old = this.#levels[0] as Level;
    const bottom = new Level(wordsFor(newBits));
    if (old.pageLen === PAGE_WORDS && bottom.pageLen === PAGE_WORDS) {
      old.forEachPage((p, pg) => {
        if (p < bottom.nPages) bottom.put(p, pg);
      });
    } else {
      const pg = old.page(0);
      if (pg !== undefined) bottom.ensure(0).set(pg.subarray(0, Math.min(pg.length, bottom.pageLen)));
    }
    this.#levels = buildLevels(bottom);
    this.#count = bottom.popcount();
    if (this.#meta !== undefined) this.#meta.truncate(this.#metaSize());
  }

  /** A deep copy (without the meta bitmap). */
  clone(): HBitmap {
    const c = new HBitmap(0, this.granularity);
    c.#origSize = this.#origSize;
    c.#bits = this.#bits;
    c.#levels = this.#levels.map((lv) => lv.clone());
    c.#count = this.#count;
    return c;
  }

  /** Whether the bitmap can be serialized (granularity < 58). */
  isSerializable(): boolean {
    return this.granularity <= HBITMAP_MAX_SERIALIZABLE_GRANULARITY;
  }

  /**
   * Items per serialization unit: `64 << granularity`. Chunks start at multiples of it and are multiples
   * of it long, except a chunk that ends at the last granule.
   * @throws {HBitmapError} ENOTSUP when granularity >= 58.
   */
  serializationAlign(): number {
    if (!this.isSerializable()) {
      throw new HBitmapError("ENOTSUP", `granularity ${this.granularity} is too large to serialize`);
    }
    return 64 * this.#gran;
  }

  /** Validates a serialization chunk; returns the range of 64-bit words it spans, or undefined when empty. */
  #chunk(start: number, count: number): [number, number] | undefined {
    const align = this.serializationAlign();
    const r = this.#range(start, count);
    if (r === undefined) return undefined;
    if (start % align !== 0) {
      throw new HBitmapError("EINVAL", `serialization start ${start} is not a multiple of ${align}`);
    }
    if (r[1] !== this.#bits - 1 && count % align !== 0) {
      throw new HBitmapError(
        "EINVAL",
        `serialization count ${count} is not a multiple of ${align} and the chunk does not end at the last granule`,
      );
    }
    return [Math.floor(r[0] / 64), Math.floor(r[1] / 64)];
  }

  /** Bytes {@link serializePart} writes for the chunk: 8 × the 64-bit words it spans (0 for `count == 0`). */
  serializationSize(start: number, count: number): number {
    const c = this.#chunk(start, count);
    return c === undefined ? 0 : (c[1] - c[0] + 1) * 8;
  }

  #checkBuf(buf: Uint8Array, need: number): void {
    if (buf.length < need) {
      throw new HBitmapError(
        "ERANGE",
        `buffer of ${buf.length} bytes is smaller than the ${need} bytes needed`,
      );
    }
  }

  /**
   * Writes the chunk's bottom-level words into `buf` as little-endian 64-bit words: granule `i` of the chunk
   * is bit `i % 8` of byte `i / 8`.
   * @throws {HBitmapError} EINVAL for a misaligned chunk; ERANGE past the end or for a short buffer;
   * ENOTSUP when not serializable.
   */
  serializePart(buf: Uint8Array, start: number, count: number): void {
    const c = this.#chunk(start, count);
    if (c === undefined) return;
    const bytes = (c[1] - c[0] + 1) * 8;
    this.#checkBuf(buf, bytes);
    const lv = this.#levels[0] as Level;
    const w0 = c[0] * 2;
    const wEnd = Math.min(c[1] * 2 + 2, lv.nWords); // exclusive; a missing odd word stays zero
    buf.fill(0, 0, bytes);
    let w = w0;
    while (w < wEnd) {
      const p = Math.floor(w / PAGE_WORDS);
      const base = p * PAGE_WORDS;
      const i0 = w - base;
      const i1 = Math.min(wEnd - base, PAGE_WORDS); // exclusive
      const pg = lv.page(p);
      if (pg !== undefined) {
        const off = (w - w0) * 4;
        if (LITTLE_ENDIAN) {
          buf.set(new Uint8Array(pg.buffer, pg.byteOffset + i0 * 4, (i1 - i0) * 4), off);
        } else {
          const dv = new DataView(buf.buffer, buf.byteOffset + off, (i1 - i0) * 4);
          for (let i = i0; i < i1; i++) dv.setUint32((i - i0) * 4, pg[i] as number, true);
        }
      }
      w = base + i1;
    }
  }

  /**
   * Reads the chunk from `buf` (the layout {@link serializePart} writes). Bits past the last granule are
   * ignored. Upper levels and the count stay consistent at every step here; `finish` (or
   * {@link deserializeFinish}) is accepted for QEMU parity and compacts storage. Does not mark the meta.
   * @throws {HBitmapError} as {@link serializePart}.
   */
  deserializePart(buf: Uint8Array, start: number, count: number, finish: boolean): void {
    const c = this.#chunk(start, count);
    if (c !== undefined) {
      const bytes = (c[1] - c[0] + 1) * 8;
      this.#checkBuf(buf, bytes);
      const lv = this.#levels[0] as Level;
      const dv = new DataView(buf.buffer, buf.byteOffset, bytes);
      const w0 = c[0] * 2;
      const wEnd = Math.min(c[1] * 2 + 2, lv.nWords);
      const lastWord = lv.nWords - 1;
      const tail = this.#bits & 31;
      const tailMask = tail === 0 ? -1 : (1 << tail) - 1;
      for (let w = w0; w < wEnd; w++) {
        let v = dv.getUint32((w - w0) * 4, true);
        if (w === lastWord) v &= tailMask;
        const p = Math.floor(w / PAGE_WORDS);
        const i = w & PAGE_MASK;
        const pg = lv.page(p);
        const old = pg === undefined ? 0 : (pg[i] as number);
        if (old === v >>> 0) continue;
        (pg ?? lv.ensure(p))[i] = v;
        this.#count += popcount32(v) - popcount32(old);
      }
      this.#refreshUp(w0, wEnd - 1);
    }
    if (finish) this.deserializeFinish();
  }

  /** Recomputes the upper-level bits for bottom words `wa..wb`. */
  #refreshUp(wa: number, wb: number): void {
    const levels = this.#levels;
    for (let l = 0; l + 1 < levels.length; l++) {
      const lv = levels[l] as Level;
      const up = levels[l + 1] as Level;
      for (let w = wa; w <= wb; w++) {
        const uw = Math.floor(w / 32);
        const p = Math.floor(uw / PAGE_WORDS);
        const i = uw & PAGE_MASK;
        const bit = 1 << (w & 31);
        if (lv.word(w) !== 0) up.ensure(p)[i] = ((up.page(p) as Uint32Array)[i] as number) | bit;
        else {
          const pg = up.page(p);
          if (pg !== undefined) pg[i] = (pg[i] as number) & ~bit;
        }
      }
      wa = Math.floor(wa / 32);
      wb = Math.floor(wb / 32);
    }
  }

  /**
   * Clears the 64-bit words the chunk spans. Does not mark the meta.
   * @throws {HBitmapError} as {@link serializePart}.
   */
  deserializeZeroes(start: number, count: number, finish: boolean): void {
    const c = this.#chunk(start, count);
    if (c !== undefined) this.#resetBits(c[0] * 64, Math.min(c[1] * 64 + 63, this.#bits - 1));
    if (finish) this.deserializeFinish();
  }

  /**
   * Sets the 64-bit words the chunk spans (bits past the last granule stay clear). Does not mark the meta.
   * @throws {HBitmapError} as {@link serializePart}.
   */
  deserializeOnes(start: number, count: number, finish: boolean): void {
    const c = this.#chunk(start, count);
    if (c !== undefined) this.#setBits(c[0] * 64, Math.min(c[1] * 64 + 63, this.#bits - 1));
    if (finish) this.deserializeFinish();
  }

  /** Rebuilds the upper levels from the bottom one, recounts, and releases all-zero pages. */
  deserializeFinish(): void {
    this.#levels = buildLevels(this.#levels[0] as Level);
    this.#count = (this.#levels[0] as Level).popcount();
  }

  /**
   * Creates the meta bitmap: one bit per `chunkSize` bits of this one (granularity `g + log2(chunkSize)`),
   * over `granules << g` items as QEMU sizes it. Every later `set`/`reset` that changes a bit marks the meta
   * over the caller's item range; `resetAll`, `merge` and deserialization do not.
   * @throws {HBitmapError} EINVAL when `chunkSize` is not a power of two or the meta granularity would
   * exceed 63; EEXIST when a meta bitmap exists.
   */
  createMeta(chunkSize: number): HBitmap {
    if (
      !Number.isSafeInteger(chunkSize) ||
      chunkSize < 1 ||
      2 ** Math.round(Math.log2(chunkSize)) !== chunkSize
    ) {
      throw new HBitmapError("EINVAL", `chunk size must be a power of two, got ${String(chunkSize)}`);
    }
    if (this.#meta !== undefined) throw new HBitmapError("EEXIST", "this bitmap already has a meta bitmap");
    const g = this.granularity + Math.round(Math.log2(chunkSize));
    if (g > 63) throw new HBitmapError("EINVAL", `meta granularity ${g} exceeds 63`);
    this.#meta = new HBitmap(this.#metaSize(), g);
    return this.#meta;
  }

  #metaSize(): number {
    const s = this.#bits * this.#gran;
    return s <= Number.MAX_SAFE_INTEGER ? s : this.#origSize;
  }

  /**
   * Releases the meta bitmap.
   * @throws {HBitmapError} EINVAL when there is none (QEMU asserts).
   */
  freeMeta(): void {
    if (this.#meta === undefined) throw new HBitmapError("EINVAL", "this bitmap has no meta bitmap");
    this.#meta = undefined;
  }

  /**
   * SHA-256 (hex) of the raw bottom level as QEMU hashes it: `max(ceil(granules/64), 1)` 64-bit words,
   * little-endian — the same bytes as serializing the whole bitmap.
   */
  sha256(): string {
    const h = createHash("sha256");
    const lv = this.#levels[0] as Level;
    for (let p = 0; p < lv.nPages; p++) {
      const words = Math.min(PAGE_WORDS, lv.nWords - p * PAGE_WORDS);
      const pg = lv.page(p);
      if (pg === undefined) h.update(ZERO_PAGE.subarray(0, words * 4));
      else if (LITTLE_ENDIAN) h.update(new Uint8Array(pg.buffer, pg.byteOffset, words * 4));
      else {
        const b = new Uint8Array(words * 4);
        const dv = new DataView(b.buffer);
        for (let i = 0; i < words; i++) dv.setUint32(i * 4, pg[i] as number, true);
        h.update(b);
      }
    }
    const total = Math.max(Math.ceil(this.#bits / 64), 1) * 8;
    const pad = total - lv.nWords * 4;
    if (pad > 0) h.update(ZERO_PAGE.subarray(0, pad));
    return h.digest("hex");
  }
}

/** Builds the upper levels over `bottom` (dropping its all-zero pages) up to a single-word top. */
function buildLevels(bottom: Level): Level[] {
  const levels = [bottom];
  let lv = bottom;
  while (lv.nWords > 1) {
    const up = new Level(wordsFor(lv.nWords));
    const cur = lv;
    cur.forEachPage((p, pg) => {
      const base = p * PAGE_WORDS; // multiple of 32
      let any = false;
      for (let j = 0; j < pg.length; j += 32) {
        let m = 0;
        const n = Math.min(32, pg.length - j);
        for (let k = 0; k < n; k++) if (pg[j + k] !== 0) m |= 1 << k;
        if (m !== 0) {
          any = true;
          const uw = (base + j) / 32;
          const upg = up.ensure(Math.floor(uw / PAGE_WORDS));
          const i = uw & PAGE_MASK;
          upg[i] = (upg[i] as number) | m;
        }
      }
      if (!any) cur.drop(p);
    });
    levels.push(up);
    lv = up;
  }
  return levels;
}

/**
 * Iterator over the dirty granules of an {@link HBitmap} (QEMU's `HBitmapIter`), made by
 * {@link HBitmap.iter}. Use `next()` (returns the start item of the next dirty granule, or -1) or `for … of`.
 */
export class HBitmapIter {
  #step: () => number;

  /** Use {@link HBitmap.iter}; `step` is the cursor it creates. */
  constructor(step: () => number) {
    this.#step = step;
  }

  /** The start item of the next dirty granule (strictly increasing), or -1 at the end (and ever after). */
  next(): number {
    return this.#step();
  }

  /** Yields what `next()` returns until the end. */
  *[Symbol.iterator](): Generator<number, void, undefined> {
    for (let v = this.next(); v >= 0; v = this.next()) yield v;
  }
}
