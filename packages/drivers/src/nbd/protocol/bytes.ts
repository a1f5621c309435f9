/**
 * A queue of received chunks read as one byte stream without concatenating: headers are read from a
 * contiguous view (copied into a small scratch buffer only when they straddle chunks), payloads are
 * returned as views of the chunk they lie in (zero-copy) or gathered once into a new buffer.
 * Views are safe because received chunks are never rewritten.
 *
 * A chunk pushed with {@link ByteQueue.pushTransient} is only lent: its memory is reused once the caller
 * regains control (a socket's reusable read buffer). Nothing is taken from it as a view, and
 * {@link ByteQueue.settle} copies whatever is left of it into memory the queue owns before it is reused.
 */
export class ByteQueue {
  #chunks: Uint8Array[] = [];
  /** Per chunk: false for the lent chunk and the copies settle() made of it (never handed out as views). */
  #lendable: boolean[] = [];
  #head = 0; // offset into #chunks[0]
  #length = 0;
  #transient: Uint8Array | undefined;
  #release: ((b: Uint8Array) => void) | undefined;

  /** `release` gets back each copy made by {@link ByteQueue.settle} once it has been consumed. */
  constructor(options: { release?: (b: Uint8Array) => void } = {}) {
    this.#release = options.release;
  }

  /** Bytes buffered. */
  get length(): number {
    return this.#length;
  }

  push(chunk: Uint8Array): void {
    if (this.#transient !== undefined) throw new Error("ByteQueue: settle() the transient chunk first");
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#lendable.push(true);
    this.#length += chunk.length;
  }

  /**
   * Queues bytes whose memory the caller reuses after {@link ByteQueue.settle}: until then they may be
   * read and taken (as copies); settle() copies what is left. One transient chunk at a time.
   */
  pushTransient(chunk: Uint8Array): void {
    if (this.#transient !== undefined)
      throw new Error("ByteQueue: settle() the previous transient chunk first");
    if (chunk.length === 0) return;
    this.push(chunk);
    this.#lendable[this.#lendable.length - 1] = false;
    this.#transient = chunk;
  }

  /**
   * Copies the unconsumed rest of the transient chunk into `alloc(n)` (default: a new array; it must be
   * `n` bytes long), which the queue then owns; the caller may reuse the transient chunk's memory after.
   */
  settle(alloc?: (n: number) => Uint8Array): void {
    const t = this.#transient;
    if (t === undefined) return;
    this.#transient = undefined;
    const i = this.#chunks.length - 1;
    if (i < 0 || this.#chunks[i] !== t) return; // consumed whole
    const start = i === 0 ? this.#head : 0;
    const n = t.length - start;
    const copy = alloc === undefined ? new Uint8Array(n) : alloc(n);
    copy.set(t.subarray(start));
    this.#chunks[i] = copy;
    if (i === 0) this.#head = 0;
  }

  /**
   * A contiguous view of the next `n` bytes (n ≤ length), without consuming them. When they straddle
   * chunks they are copied into `alloc(n)` (default: a new zeroed array), which must be `n` bytes long.
   * A view into the transient chunk is valid until {@link ByteQueue.settle}.
   */
  peek(n: number, alloc?: (n: number) => Uint8Array): Uint8Array {
    const first = this.#chunks[0];
    if (first !== undefined && first.length - this.#head >= n)
      return first.subarray(this.#head, this.#head + n);
    const out = alloc === undefined ? new Uint8Array(n) : alloc(n);
    this.#copyOut(out, 0, n);
    return out;
  }

  /**
   * Consumes and returns the next `n` bytes (n ≤ length): a view when contiguous in a chunk the queue
   * may lend out, else one copy into `alloc(n)` (default: a new zeroed array).
   */
  take(n: number, alloc?: (n: number) => Uint8Array): Uint8Array {
    const first = this.#chunks[0];
    let v: Uint8Array;
    if (first !== undefined && this.#lendable[0] === false) {
      v = alloc === undefined ? new Uint8Array(n) : alloc(n);
      this.#copyOut(v, 0, n);
    } else {
      v = this.peek(n, alloc);
    }
    this.skip(n);
    return v;
  }

  /** Consumes the next `n` bytes (n ≤ length), copying them into `out` at `offset`. */
  read(out: Uint8Array, offset: number, n: number): void {
    this.#copyOut(out, offset, n);
    this.skip(n);
  }

  /** Drops the next `n` bytes (n ≤ length). */
  skip(n: number): void {
    this.#length -= n;
    while (n > 0) {
      const first = this.#chunks[0];
      if (first === undefined) break;
      const avail = first.length - this.#head;
      if (avail > n) {
        this.#head += n;
        return;
      }
      n -= avail;
      this.#drop(this.#chunks.shift() as Uint8Array, this.#lendable.shift() as boolean);
      this.#head = 0;
    }
  }

  /** Drops everything. */
  clear(): void {
    for (const [i, c] of this.#chunks.entries()) this.#drop(c, this.#lendable[i] as boolean);
    this.#chunks = [];
    this.#lendable = [];
    this.#head = 0;
    this.#length = 0;
  }

  /** A chunk left the queue: a copy made by settle() goes back to its owner. */
  #drop(c: Uint8Array, lendable: boolean): void {
    if (!lendable && c !== this.#transient) this.#release?.(c);
  }

  #copyOut(out: Uint8Array, offset: number, n: number): void {
    let done = 0;
    let head = this.#head;
    for (const c of this.#chunks) {
      if (done >= n) break;
      const m = Math.min(c.length - head, n - done);
      out.set(c.subarray(head, head + m), offset + done);
      done += m;
      head = 0;
    }
  }
}

/** Big-endian u16 at `off`. */
export const rd16 = (b: Uint8Array, off: number): number => ((b[off] ?? 0) << 8) | (b[off + 1] ?? 0);

/** Big-endian u32 at `off`. */
export const rd32 = (b: Uint8Array, off: number): number =>
  (((b[off] ?? 0) << 24) | ((b[off + 1] ?? 0) << 16) | ((b[off + 2] ?? 0) << 8) | (b[off + 3] ?? 0)) >>> 0;

/** Big-endian u64 at `off` as a number: exact below 2^53, inexact (and not a safe integer) above. */
export const rd64 = (b: Uint8Array, off: number): number => rd32(b, off) * 0x100000000 + rd32(b, off + 4);

/** Big-endian u64 at `off` as a BigInt (opaque values: cookies, magics). */
export const rd64n = (b: Uint8Array, off: number): bigint =>
  (BigInt(rd32(b, off)) << 32n) | BigInt(rd32(b, off + 4));
