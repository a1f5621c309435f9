/**
 * Recycles the payload buffers of the data path (READ replies, gathered WRITE payloads). Without it a
 * busy export allocates one off-heap buffer per request, and V8 answers the external-memory growth with
 * a full mark-compact every few dozen requests (a fifth of the CPU time of an nbdcopy read, profiled).
 *
 * Buffers come in power-of-two size classes from 4 KiB to 4 MiB (larger ones are not kept); at most
 * `maxIdleBytes` wait idle. A buffer is handed back with {@link BufferPool.release} once nothing refers
 * to it any more (the socket wrote it, the node finished with it); releasing a buffer the pool did not
 * hand out, or releasing one twice, does nothing. Pooled buffers are not zeroed: callers fill them whole.
 *
 * The data of a pooled buffer starts on a 64-byte boundary in memory (when the FFI can tell addresses):
 * the kernel copies between the page cache or a socket and cache-line-aligned user memory markedly
 * faster than to the 16-byte-aligned memory a plain allocation gets (measured: about 1.5× for 256 KiB
 * preads). A caller may ask for `headroom` bytes in front of the data (a reply header), so that header
 * and data leave in one socket write while the data stays aligned.
 */
import { alignedBuffer } from "../../file/index.ts";

const MIN_SHIFT = 12;
const MAX_SHIFT = 22;
/** Bytes reserved in front of the data of every pooled buffer (the largest `headroom`), and its alignment. */
export const POOL_HEADROOM = 64;

function shiftFor(n: number): number {
  if (n <= 1 << MIN_SHIFT) return MIN_SHIFT;
  return 32 - Math.clz32(n - 1);
}

/** @internal A size-classed free list of buffers (one per server, shared by its connections). */
export class BufferPool {
  readonly maxIdleBytes: number;
  /** Idle slabs per size class: the backing store and the offset of its aligned data start. */
  #free: { ab: ArrayBuffer; data: number }[][] = [];
  /** Slabs this pool handed out and has not got back, with their aligned data start. */
  #lent = new WeakMap<ArrayBuffer, number>();
  #idleBytes = 0;

  constructor(maxIdleBytes: number = 32 * 1024 * 1024) {
    this.maxIdleBytes = maxIdleBytes;
    for (let s = 0; s <= MAX_SHIFT; s++) this.#free.push([]);
  }

  /** Bytes held idle (counted by size class). */
  get idleBytes(): number {
    return this.#idleBytes;
  }

  /**
   * A buffer of `headroom + n` bytes (uninitialised contents) whose byte `headroom` is aligned; `headroom`
   * is at most {@link POOL_HEADROOM}.
   */
  acquire(n: number, headroom = 0): Buffer {
    const shift = shiftFor(n);
    if (shift > MAX_SHIFT) return Buffer.allocUnsafeSlow(headroom + n);
    let slab = this.#free[shift]?.pop();
    if (slab === undefined) {
      const v = alignedBuffer(POOL_HEADROOM + (1 << shift), POOL_HEADROOM);
      slab = { ab: v.buffer as ArrayBuffer, data: v.byteOffset + POOL_HEADROOM };
    } else {
      this.#idleBytes -= 1 << shift;
    }
    this.#lent.set(slab.ab, slab.data);
    return Buffer.from(slab.ab, slab.data - headroom, headroom + n);
  }

  /** Drops every idle buffer (the pool stays usable). */
  clear(): void {
    for (const list of this.#free) list.length = 0;
    this.#idleBytes = 0;
  }

  /** Gives back a buffer from {@link BufferPool.acquire} (or a view of one); anything else is ignored. */
  release(b: Uint8Array): void {
    const ab = b.buffer as ArrayBuffer;
    const data = this.#lent.get(ab);
    if (data === undefined) return;
    this.#lent.delete(ab);
    const size = 1 << (31 - Math.clz32(ab.byteLength - POOL_HEADROOM));
    if (this.#idleBytes + size > this.maxIdleBytes) return;
    this.#free[31 - Math.clz32(size)]?.push({ ab, data });
    this.#idleBytes += size;
  }
}
