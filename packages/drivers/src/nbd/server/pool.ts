/**
 * Recycles the payload buffers of the data path (READ reply data, gathered WRITE payloads). Without it a
 * busy export allocates one off-heap buffer per request, and V8 answers the external-memory growth with
 * a full mark-compact every few dozen requests (a fifth of the CPU time of an nbdcopy read, profiled).
 *
 * Buffers come in power-of-two size classes from 4 KiB to 4 MiB (larger ones are not kept); at most
 * `maxIdleBytes` wait idle. A buffer is handed back with {@link BufferPool.release} once nothing refers
 * to it any more (the socket wrote it, the node finished with it); releasing a buffer the pool did not
 * hand out, or releasing one twice, does nothing. Pooled buffers are not zeroed: callers fill them whole.
 */
const MIN_SHIFT = 12;
const MAX_SHIFT = 22;

function shiftFor(n: number): number {
  if (n <= 1 << MIN_SHIFT) return MIN_SHIFT;
  return 32 - Math.clz32(n - 1);
}

/** @internal A size-classed free list of buffers (one per server, shared by its connections). */
export class BufferPool {
  readonly maxIdleBytes: number;
  #free: ArrayBuffer[][] = [];
  /** Buffers this pool handed out and has not got back. */
  #lent = new WeakSet<ArrayBuffer>();
  #idleBytes = 0;

  constructor(maxIdleBytes: number = 32 * 1024 * 1024) {
    this.maxIdleBytes = maxIdleBytes;
    for (let s = 0; s <= MAX_SHIFT; s++) this.#free.push([]);
  }

  /** Bytes held idle. */
  get idleBytes(): number {
    return this.#idleBytes;
  }

  /** A buffer of `n` bytes (uninitialised contents). */
  acquire(n: number): Buffer {
    const shift = shiftFor(n);
    if (shift > MAX_SHIFT) return Buffer.allocUnsafeSlow(n);
    let ab = this.#free[shift]?.pop();
    if (ab === undefined) ab = Buffer.allocUnsafeSlow(1 << shift).buffer as ArrayBuffer;
    else this.#idleBytes -= ab.byteLength;
    this.#lent.add(ab);
    return Buffer.from(ab, 0, n);
  }

  /** Drops every idle buffer (the pool stays usable). */
  clear(): void {
    for (const list of this.#free) list.length = 0;
    this.#idleBytes = 0;
  }

  /** Gives back a buffer from {@link BufferPool.acquire}; anything else is ignored. */
  release(b: Uint8Array): void {
    const ab = b.buffer as ArrayBuffer;
    if (!this.#lent.has(ab)) return;
    this.#lent.delete(ab);
    const size = ab.byteLength;
    if (this.#idleBytes + size > this.maxIdleBytes) return;
    this.#free[31 - Math.clz32(size)]?.push(ab);
    this.#idleBytes += size;
  }
}
