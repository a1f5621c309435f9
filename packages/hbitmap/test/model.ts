/** A naive reference: one byte per granule, every operation written straight from the spec's wording. */
export class Model {
  size: number;
  readonly g: number;
  readonly gran: number;
  bits: Uint8Array;

  constructor(size: number, g: number) {
    this.size = size;
    this.g = g;
    this.gran = 2 ** g;
    this.bits = new Uint8Array(Math.ceil(size / this.gran));
  }

  get nbits(): number {
    return this.bits.length;
  }

  bit(item: number): number {
    return Math.floor(item / this.gran);
  }

  set(start: number, count: number): boolean {
    if (count === 0) return false;
    let changed = false;
    for (let b = this.bit(start); b <= this.bit(start + count - 1); b++) {
      if (this.bits[b] === 0) changed = true;
      this.bits[b] = 1;
    }
    return changed;
  }

  /** True when the arguments satisfy QEMU's reset assertions. */
  resetAllowed(start: number, count: number): boolean {
    if (count === 0) return true;
    return (
      start % this.gran === 0 &&
      (count % this.gran === 0 || start + count === this.size) &&
      this.bit(start + count - 1) < this.nbits
    );
  }

  reset(start: number, count: number): boolean {
    if (count === 0) return false;
    let changed = false;
    for (let b = this.bit(start); b <= this.bit(start + count - 1); b++) {
      if (this.bits[b] === 1) changed = true;
      this.bits[b] = 0;
    }
    return changed;
  }

  resetAll(): void {
    this.bits.fill(0);
  }

  get(item: number): boolean {
    return this.bits[this.bit(item)] === 1;
  }

  count(): number {
    let n = 0;
    for (const v of this.bits) n += v;
    return n * this.gran;
  }

  nextDirty(start: number, count = Number.POSITIVE_INFINITY): number {
    if (start >= this.size || count === 0) return -1;
    const end = Math.min(start + count, this.size);
    for (let item = start; item < end; ) {
      if (this.get(item)) return item;
      item = (this.bit(item) + 1) * this.gran;
    }
    return -1;
  }

  nextZero(start: number, count = Number.POSITIVE_INFINITY): number {
    if (start >= this.size || count === 0) return -1;
    const lastBit = count > this.size - start ? this.nbits - 1 : this.bit(start + count - 1);
    for (let b = this.bit(start); b <= lastBit; b++) {
      if (this.bits[b] === 0) return Math.max(start, b * this.gran);
    }
    return -1;
  }

  /** Independent definition: first dirty granule run from `start`, clipped by `end` and `max`. */
  nextDirtyArea(
    start: number,
    end: number,
    max = Number.POSITIVE_INFINITY,
  ): { start: number; count: number } | null {
    const stop = Math.min(end, this.size);
    if (start >= stop) return null;
    let b = this.bit(start);
    while (b < this.nbits && b * this.gran < stop && this.bits[b] === 0) b++;
    if (b >= this.nbits || b * this.gran >= stop) return null;
    const ds = Math.max(start, b * this.gran);
    let e = b;
    while (e < this.nbits && this.bits[e] === 1) e++;
    const runEnd = e * this.gran;
    const areaEnd = Math.min(runEnd, stop, ds + max);
    return { start: ds, count: areaEnd - ds };
  }

  status(start: number, count: number): { dirty: boolean; count: number } {
    const dirty = this.get(start);
    let item = start;
    while (item < start + count && this.get(item) === dirty) item = (this.bit(item) + 1) * this.gran;
    return { dirty, count: Math.min(item, start + count) - start };
  }

  iterate(first = 0): number[] {
    const out: number[] = [];
    for (let b = this.bit(first); b < this.nbits; b++) if (this.bits[b] === 1) out.push(b * this.gran);
    return out;
  }

  truncate(size: number): void {
    const next = new Uint8Array(Math.ceil(size / this.gran));
    next.set(this.bits.subarray(0, next.length));
    this.bits = next;
    this.size = size;
  }

  /** Bytes of the whole bitmap in QEMU's layout: LSB-first bits, padded to 64-bit words. */
  serialize(): Uint8Array {
    const out = new Uint8Array(Math.ceil(this.nbits / 64) * 8);
    for (let b = 0; b < this.nbits; b++)
      if (this.bits[b] === 1) out[b >> 3] = (out[b >> 3] as number) | (1 << (b & 7));
    return out;
  }

  clone(): Model {
    const m = new Model(this.size, this.g);
    m.bits.set(this.bits);
    return m;
  }

  /** Marks in `this` every granule that a dirty granule of `src` (clipped to size) touches. */
  mergeFrom(src: Model): void {
    for (let b = 0; b < src.nbits; b++) {
      if (src.bits[b] !== 1) continue;
      const s = b * src.gran;
      const e = Math.min((b + 1) * src.gran, this.size);
      this.set(s, e - s);
    }
  }
}
