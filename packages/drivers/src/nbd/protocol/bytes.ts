/**
 * A queue of received chunks read as one byte stream without concatenating: headers are read from a
 * contiguous view (copied into a small scratch buffer only when they straddle chunks), payloads are
 * returned as views of the chunk they lie in (zero-copy) or gathered once into a new buffer.
 * Views are safe because received chunks are never rewritten.
 */
export class ByteQueue {
  #chunks: Uint8Array[] = [];
  #head = 0; // offset into #chunks[0]
  #length = 0;

  /** Bytes buffered. */
  get length(): number {
    return this.#length;
  }

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#length += chunk.length;
  }

  /**
   * A contiguous view of the next `n` bytes (n ≤ length), without consuming them. When they straddle
   * chunks they are copied into `alloc(n)` (default: a new zeroed array), which must be `n` bytes long.
   */
  peek(n: number, alloc?: (n: number) => Uint8Array): Uint8Array {
    const first = this.#chunks[0];
    if (first !== undefined && first.length - this.#head >= n)
      return first.subarray(this.#head, this.#head + n);
    const out = alloc === undefined ? new Uint8Array(n) : alloc(n);
    this.#copyOut(out, n);
    return out;
  }

  /** Consumes and returns the next `n` bytes (n ≤ length): a view when contiguous, else one copy. */
  take(n: number, alloc?: (n: number) => Uint8Array): Uint8Array {
    const v = this.peek(n, alloc);
    this.skip(n);
    return v;
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
      this.#chunks.shift();
      this.#head = 0;
    }
  }

  /** Drops everything. */
  clear(): void {
    this.#chunks = [];
    this.#head = 0;
    this.#length = 0;
  }

  #copyOut(out: Uint8Array, n: number): void {
    let done = 0;
    let head = this.#head;
    for (const c of this.#chunks) {
      if (done >= n) break;
      const m = Math.min(c.length - head, n - done);
      out.set(c.subarray(head, head + m), done);
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
