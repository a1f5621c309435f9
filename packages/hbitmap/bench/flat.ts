/**
 * The reference for the benchmarks: a flat bitset (one Uint32Array, no hierarchy, no paging) with the same
 * item-level semantics as HBitmap for the operations measured. Searches scan word by word; `count()`
 * recounts with popcount.
 */
export class FlatBitmap {
  readonly size: number;
  readonly gran: number;
  readonly nbits: number;
  readonly words: Uint32Array;

  constructor(size: number, granularity: number) {
    this.size = size;
    this.gran = 2 ** granularity;
    this.nbits = Math.ceil(size / this.gran);
    this.words = new Uint32Array(Math.max(Math.ceil(this.nbits / 32), 1));
  }

  setBits(b0: number, b1: number): void {
    const w = this.words;
    for (let b = b0; b <= b1; ) {
      if ((b & 31) === 0 && b + 31 <= b1) {
        w[b >>> 5] = 0xffffffff;
        b += 32;
      } else {
        w[b >>> 5] = (w[b >>> 5] as number) | (1 << (b & 31));
        b++;
      }
    }
  }

  resetBits(b0: number, b1: number): void {
    const w = this.words;
    for (let b = b0; b <= b1; ) {
      if ((b & 31) === 0 && b + 31 <= b1) {
        w[b >>> 5] = 0;
        b += 32;
      } else {
        w[b >>> 5] = (w[b >>> 5] as number) & ~(1 << (b & 31));
        b++;
      }
    }
  }

  set(start: number, count: number): void {
    if (count > 0) this.setBits(Math.floor(start / this.gran), Math.floor((start + count - 1) / this.gran));
  }

  reset(start: number, count: number): void {
    if (count > 0) this.resetBits(Math.floor(start / this.gran), Math.floor((start + count - 1) / this.gran));
  }

  count(): number {
    let n = 0;
    for (const x of this.words) {
      let v = x - ((x >>> 1) & 0x55555555);
      v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
      n += (Math.imul((v + (v >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24) as number;
    }
    return n * this.gran;
  }

  #bit(b: number): boolean {
    return ((this.words[b >>> 5] as number) & (1 << (b & 31))) !== 0;
  }

  /** First bit in [from, nbits) whose state is `want`, or -1. Word-at-a-time scan. */
  #scan(from: number, want: boolean): number {
    const w = this.words;
    let i = from >>> 5;
    let x = (want ? (w[i] as number) : ~(w[i] as number)) & (-1 << (from & 31));
    while (x === 0) {
      i++;
      if (i >= w.length) return -1;
      x = want ? (w[i] as number) : ~(w[i] as number);
    }
    const b = i * 32 + (31 - Math.clz32(x & -x));
    return b < this.nbits ? b : -1;
  }

  get(item: number): boolean {
    return this.#bit(Math.floor(item / this.gran));
  }

  /** Same contract as HBitmap.nextDirtyArea with no max. */
  nextDirtyArea(start: number, end: number): { start: number; count: number } | null {
    const stop = Math.min(end, this.size);
    if (start >= stop) return null;
    const d = this.#scan(Math.floor(start / this.gran), true);
    if (d < 0 || d * this.gran >= stop) return null;
    const ds = Math.max(start, d * this.gran);
    const z = this.#scan(d, false);
    const e = z < 0 ? stop : Math.min(z * this.gran, stop);
    return { start: ds, count: e - ds };
  }
}
