/**
 * One level of the hierarchy: an array of 32-bit words stored in lazily allocated 8 KiB pages, addressed
 * through a page directory (two-level above 2048 pages), so that an empty 2^41-bit bitmap costs about
 * 140 KiB and no single typed array ever exceeds Node's limits. Internal to `@blk/hbitmap`.
 */
import { popcount32 } from "./bits.ts";

/** log2 of the words in one page. */
const PAGE_SHIFT = 11;
/** 32-bit words per page (8 KiB, 65536 bits). */
export const PAGE_WORDS: number = 1 << PAGE_SHIFT;
/** Mask of a word's index inside its page. */
export const PAGE_MASK: number = PAGE_WORDS - 1;
const DIR_SHIFT = 11;
const DIR_SIZE = 1 << DIR_SHIFT;
const DIR_MASK = DIR_SIZE - 1;

type Chunk = (Uint32Array | undefined)[];

/** A paged array of `nWords` 32-bit words; missing pages read as zero. */
export class Level {
  /** Number of words at this level (at least 1). */
  readonly nWords: number;
  /** Number of pages (the last may be partly beyond `nWords`). */
  readonly nPages: number;
  /** Length of each allocated page: `PAGE_WORDS`, or `nWords` when the level is smaller than one page. */
  readonly pageLen: number;
  /** Two-level directory of pages (only used when there are more than `DIR_SIZE` pages). */
  private dir: (Chunk | undefined)[];
  /** One-level directory, used instead of `dir` when the level has at most `DIR_SIZE` pages. */
  private flat: Chunk | undefined;

  constructor(nWords: number) {
    this.nWords = nWords;
    this.nPages = Math.ceil(nWords / PAGE_WORDS);
    this.pageLen = Math.min(PAGE_WORDS, nWords);
    const small = this.nPages <= DIR_SIZE;
    this.dir = new Array<Chunk | undefined>(small ? 0 : Math.ceil(this.nPages / DIR_SIZE));
    this.flat = small ? new Array<Uint32Array | undefined>(this.nPages) : undefined;
  }

  #chunkFor(p: number): Chunk {
    const h = p >>> DIR_SHIFT;
    let chunk = this.dir[h];
    if (chunk === undefined) {
      chunk = new Array<Uint32Array | undefined>(Math.min(DIR_SIZE, this.nPages - h * DIR_SIZE));
      this.dir[h] = chunk;
    }
    return chunk;
  }

  /** The page `p`, or undefined when it was never allocated (all zero). */
  page(p: number): Uint32Array | undefined {
    const flat = this.flat;
    if (flat !== undefined) return flat[p];
    const chunk = this.dir[p >>> DIR_SHIFT];
    return chunk === undefined ? undefined : chunk[p & DIR_MASK];
  }

  /** The page `p`, allocating a zeroed one when missing. */
  ensure(p: number): Uint32Array {
    let pg = this.page(p);
    if (pg === undefined) {
      pg = new Uint32Array(this.pageLen);
      this.put(p, pg);
    }
    return pg;
  }

  /** Installs `pg` (of length `pageLen`) as page `p`. */
  put(p: number, pg: Uint32Array | undefined): void {
    if (this.flat !== undefined) this.flat[p] = pg;
    else this.#chunkFor(p)[p & DIR_MASK] = pg;
  }

  /** Forgets page `p` (it reads as zero afterwards). */
  drop(p: number): void {
    if (this.page(p) !== undefined) this.put(p, undefined);
  }

  /** Forgets every page. */
  clear(): void {
    if (this.flat !== undefined) this.flat = new Array<Uint32Array | undefined>(this.nPages);
    else this.dir = new Array<Chunk | undefined>(this.dir.length);
  }

  /** Word `w` (0 when its page is missing). `w` may exceed 2^32. */
  word(w: number): number {
    const pg = this.page(Math.floor(w / PAGE_WORDS));
    return pg === undefined ? 0 : (pg[w & PAGE_MASK] as number);
  }

  /** Calls `fn` for every allocated page, in ascending order. */
  forEachPage(fn: (p: number, pg: Uint32Array) => void): void {
    const flat = this.flat;
    if (flat !== undefined) {
      for (let p = 0; p < flat.length; p++) {
        const pg = flat[p];
        if (pg !== undefined) fn(p, pg);
      }
      return;
    }
    const dir = this.dir;
    for (let h = 0; h < dir.length; h++) {
      const chunk = dir[h];
      if (chunk === undefined) continue;
      for (let l = 0; l < chunk.length; l++) {
        const pg = chunk[l];
        if (pg !== undefined) fn(h * DIR_SIZE + l, pg);
      }
    }
  }

  /** A deep copy. */
  clone(): Level {
    const c = new Level(this.nWords);
    this.forEachPage((p, pg) => {
      c.put(p, pg.slice());
    });
    return c;
  }

  /** Number of set bits over all pages. */
  popcount(): number {
    let n = 0;
    this.forEachPage((_p, pg) => {
      for (let i = 0; i < pg.length; i++) n += popcount32(pg[i] as number);
    });
    return n;
  }
}

/**
 * Sets bits `b0..b1` (inclusive, `b0 <= b1 < nWords * 32`) of `lv`. Returns how many bits went from 0 to 1.
 */
export function setBits(lv: Level, b0: number, b1: number): number {
  const w0 = Math.floor(b0 / 32);
  const w1 = Math.floor(b1 / 32);
  const m0 = -1 << (b0 & 31);
  const m1 = -1 >>> (31 - (b1 & 31));
  if (w0 === w1) return orWord(lv, w0, m0 & m1);
  let added = orWord(lv, w0, m0) + orWord(lv, w1, m1);
  // Whole words strictly between w0 and w1, page by page.
  let w = w0 + 1;
  while (w < w1) {
    const p = Math.floor(w / PAGE_WORDS);
    const base = p * PAGE_WORDS;
    const i0 = w - base;
    const i1 = Math.min(w1 - 1 - base, PAGE_WORDS - 1);
    let pg = lv.page(p);
    if (pg === undefined) {
      pg = lv.ensure(p);
      pg.fill(0xffffffff, i0, i1 + 1);
      added += (i1 - i0 + 1) * 32;
    } else {
      for (let i = i0; i <= i1; i++) {
        const old = pg[i] as number;
        if (old === 0) added += 32;
        else if (old !== 0xffffffff) added += 32 - popcount32(old);
        else continue;
        pg[i] = 0xffffffff;
      }
    }
    w = base + i1 + 1;
  }
  return added;
}

function orWord(lv: Level, w: number, mask: number): number {
  const p = Math.floor(w / PAGE_WORDS);
  const i = w & PAGE_MASK;
  const pg = lv.page(p);
  const old = pg === undefined ? 0 : (pg[i] as number);
  const add = mask & ~old;
  if (add === 0) return 0;
  (pg ?? lv.ensure(p))[i] = old | mask;
  return popcount32(add);
}

/**
 * Clears bits `b0..b1` (inclusive) of `lv`. Returns how many bits went from 1 to 0. Pages the range covers
 * entirely are released.
 */
export function resetBits(lv: Level, b0: number, b1: number): number {
  const w0 = Math.floor(b0 / 32);
  const w1 = Math.floor(b1 / 32);
  const m0 = -1 << (b0 & 31);
  const m1 = -1 >>> (31 - (b1 & 31));
  if (w0 === w1) return andNotWord(lv, w0, m0 & m1);
  let removed = andNotWord(lv, w0, m0) + andNotWord(lv, w1, m1);
  let w = w0 + 1;
  while (w < w1) {
    const p = Math.floor(w / PAGE_WORDS);
    const base = p * PAGE_WORDS;
    const i0 = w - base;
    const i1 = Math.min(w1 - 1 - base, PAGE_WORDS - 1);
    const pg = lv.page(p);
    if (pg !== undefined) {
      for (let i = i0; i <= i1; i++) {
        const old = pg[i] as number;
        if (old === 0) continue;
        removed += old === 0xffffffff ? 32 : popcount32(old);
        pg[i] = 0;
      }
      if (i0 === 0 && i1 >= pg.length - 1) lv.drop(p);
    }
    w = base + i1 + 1;
  }
  return removed;
}

function andNotWord(lv: Level, w: number, mask: number): number {
  const pg = lv.page(Math.floor(w / PAGE_WORDS));
  if (pg === undefined) return 0;
  const i = w & PAGE_MASK;
  const old = pg[i] as number;
  const del = old & mask;
  if (del === 0) return 0;
  pg[i] = old & ~mask;
  return popcount32(del);
}

/** Words needed for `bits` bits (at least one word, as in QEMU). */
export function wordsFor(bits: number): number {
  return Math.max(Math.ceil(bits / 32), 1);
}
