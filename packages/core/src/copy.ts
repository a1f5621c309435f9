/**
 * The copy engine (QEMU's block-copy, shared by convert, commit, rebase and every job): walks a dirty
 * bitmap of work, copies chunks with a bounded number of requests and bounded buffer memory in flight,
 * writes zeroes (or unmaps) where block status says the source reads as zeroes, skips unallocated ranges
 * when asked, honours a {@link RateLimit}, offers pause points, progress and cancellation, and reports
 * each failed chunk so callers can apply their error policy.
 */
import { type Clock, type RateLimit, systemClock } from "@blk/throttle";
import type { DirtyBitmap } from "./dirty-bitmap.ts";
import type { BlockStatusExtent, CopyRangeDest } from "./driver.ts";
import { BlkError, isBlkError, toBlkError } from "./errors.ts";
import type { Edge } from "./graph.ts";
import { BlockNode } from "./node.ts";

/** Where the engine reads or writes: a node, or an edge (permission-checked I/O). */
export type CopyEndpoint = BlockNode | Edge;

/** A chunk that failed. Its bits were set again in the work bitmap. */
export interface CopyError {
  /** First byte of the chunk. */
  offset: number;
  /** Length of the chunk. */
  bytes: number;
  /** Which side failed: `read` (source errors) or `write` (target errors). */
  operation: "read" | "write";
  error: BlkError;
  /**
   * First byte of the request that failed, when the chunk read in pieces (`readSize`) and it was not the
   * first: the lowest-placed piece that failed.
   */
  requestOffset?: number;
}

/** What to do after a failed chunk: `fail` stops the pass (it rejects); `continue` goes on. */
export type CopyErrorAction = "fail" | "continue";

/** Progress of one finished chunk. */
export interface CopyProgress {
  offset: number;
  bytes: number;
  /** Bytes read and written as data. */
  copied: number;
  /** Bytes written as zeroes. */
  zeroed: number;
  /** Bytes skipped as unallocated. */
  skipped: number;
  /** Bytes of `copied` that copy offload copied (absent: none). */
  offloaded?: number;
}

/** Options of {@link CopyEngine}. */
export interface CopyEngineOptions {
  source: CopyEndpoint;
  target: CopyEndpoint;
  /** The work: set bits are copied (cleared when a chunk starts, set again if it fails). */
  bitmap: DirtyBitmap;
  /** Largest chunk in bytes (rounded down to the bitmap granularity, at least one granule). Default max(granularity, 1 MiB). */
  chunkSize?: number;
  /**
   * Largest read request: a chunk's data reads in pieces of this many bytes, all started at once, so that a
   * failure names the piece it was in (`CopyError.requestOffset`; `qemu-img convert` reads and reports
   * 2 MiB at a time) while writes stay whole chunks. Default: one read per chunk.
   */
  readSize?: number;
  /** Most chunks in flight (default 64). */
  maxWorkers?: number;
  /** Most buffer bytes in flight (default 128 MiB; a chunk never exceeds it). */
  maxBufferBytes?: number;
  /**
   * How to find zeroes and unallocated ranges: `chain` (default) asks the source's block status over its
   * backing chain down to `base`; `node` asks the source node alone; `none` copies everything as data.
   */
  status?: "chain" | "node" | "none";
  /** For `status: "chain"`: stop above this node. */
  base?: BlockNode | null;
  /**
   * The source does not change while a pass runs (`qemu-img convert`): block status is asked for up to
   * {@link STATUS_LOOKAHEAD} bytes at a time and the answer serves the chunks it covers, as qemu-img asks
   * once per extent rather than once per chunk. Never for a source a guest writes (jobs): a kept answer
   * would go stale.
   */
  staticSource?: boolean;
  /** Skip ranges block status reports unallocated (sync=top, commit, stream). */
  skipUnallocated?: boolean;
  /** Zero ranges become write-zeroes with may-unmap (`unmap`, default) or without (`write-zeroes`). */
  zeroes?: "unmap" | "write-zeroes";
  /** Also write zeroes when data read turns out all zero (`qemu-img convert` does; block-copy does not). */
  detectZeroBuffers?: boolean;
  /**
   * Splits the data a chunk read at `offset` into runs to write and runs to write as zeroes (`qemu-img
   * convert -S`); replaces `detectZeroBuffers`. Called as soon as the chunk has read, before it waits for
   * its turn to write (`inOrderWrites`), so the search is off the path the writes take one after another.
   * The runs cover `data` in order, without gaps.
   */
  splitZeroes?: (offset: number, data: Uint8Array) => readonly DataRun[];
  /**
   * Copy data ranges with copy offload ({@link BlockNode.copyRange}: no buffer, the data is not looked at,
   * so `detectZeroBuffers` does not apply to them) where the source and target support it together. The
   * first refusal (`ENOTSUP`) turns it off for the engine and that range is read and written instead.
   */
  copyOffload?: boolean;
  /**
   * Chunks write in the order they started: each reads at once but waits for the chunks before it to
   * finish writing (as `qemu-img convert` does without `-W`), so a target that allocates as it is written
   * (qcow2) lays the data out in guest order. Default: each chunk writes as soon as it has read.
   */
  inOrderWrites?: boolean;
  /**
   * With `inOrderWrites`: lets the next chunk start writing before this one's write has finished, once the
   * target has placed it. Called with a chunk's range right after its write (one data write covering the
   * whole chunk) was started and that write's promise; resolves once the target has decided where the
   * range goes, so that a write started afterwards cannot be placed before it (a qcow2 target: host
   * clusters assigned, `Qcow2State.whenPlaced`), or when `written` settles. Without it (or for chunks of
   * several writes), the next chunk waits for this one to finish writing.
   */
  writePlaced?: (offset: number, bytes: number, written: Promise<void>) => Promise<void>;
  /**
   * Allocates the chunk buffers (each `chunkSize` bytes, reused from chunk to chunk): e.g. page-aligned
   * ones, which the kernel copies to and from files faster (the file driver's `alignedBuffer`). Default
   * `new Uint8Array`.
   */
  allocBuffer?: (bytes: number) => Uint8Array;
  /** Speed limit on bytes started (data and zeroes; skipped ranges are free). */
  rateLimit?: RateLimit;
  /** Clock for the rate-limit sleeps (default the system clock). */
  clock?: Clock;
  /** Cancels the pass (it rejects with `ECANCELED` once in-flight chunks are done). */
  signal?: AbortSignal;
  /** Awaited before each chunk starts: a job's pause point. */
  pausePoint?: () => void | Promise<void>;
  /** Called when a chunk finished. */
  onProgress?: (p: CopyProgress) => void;
  /** Called when a chunk failed (default action `fail`). */
  onError?: (e: CopyError) => CopyErrorAction | Promise<CopyErrorAction>;
}

/** What a finished pass did. */
export interface CopyResult {
  copied: number;
  zeroed: number;
  skipped: number;
  /** Bytes of `copied` that copy offload copied. */
  offloaded: number;
  /** Chunks that failed with action `continue` (their bits are set again). */
  errors: CopyError[];
}

/** Counters of an engine (for tests and statistics). */
export interface CopyEngineStats {
  inFlight: number;
  bufferBytesInFlight: number;
  maxInFlight: number;
  maxBufferBytesInFlight: number;
}

/** A run of a chunk's data, `[start, end)` in the chunk's buffer: `zero` runs are written as zeroes. */
export interface DataRun {
  start: number;
  end: number;
  zero: boolean;
}

type Kind = "data" | "zero" | "skip";
interface Segment {
  offset: number;
  length: number;
  kind: Kind;
}

/**
 * A chunk's place in the write order (`inOrderWrites`): `turn` settles when the chunks before it wrote (or
 * were placed, see `writePlaced`); `release` gives the next chunk its turn.
 */
interface WriteTurn {
  readonly turn: Promise<void>;
  readonly release: () => void;
  taken: boolean;
}

class ChunkFailure extends Error {
  readonly operation: "read" | "write";
  readonly error: BlkError;
  readonly requestOffset: number | undefined;
  constructor(operation: "read" | "write", error: BlkError, requestOffset?: number) {
    super(error.message);
    this.operation = operation;
    this.error = error;
    this.requestOffset = requestOffset;
  }
}

/** Most bytes of idle chunk buffers an engine keeps for reuse (and never more buffers than workers). */
const POOL_BYTES = 64 << 20;

/** Most bytes one block status query covers with {@link CopyEngineOptions.staticSource}. */
export const STATUS_LOOKAHEAD: number = 128 << 20;

/** Copy offload of `[offset, offset+bytes)` between the same offsets of two endpoints. */
function offload(source: CopyEndpoint, target: CopyEndpoint, offset: number, bytes: number): Promise<void> {
  const dst: CopyRangeDest =
    target instanceof BlockNode ? { node: target, offset } : { node: target.child, offset, via: target };
  return source instanceof BlockNode
    ? source.copyRange(offset, bytes, dst)
    : source.child.copyRange(offset, bytes, dst, { via: source });
}

function allZero(buf: Uint8Array): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

/** Splits a buffer into runs of all-zero and other granules. */
function zeroRuns(buf: Uint8Array, granule: number): DataRun[] {
  const out: DataRun[] = [];
  for (let start = 0; start < buf.length; start += granule) {
    const end = Math.min(start + granule, buf.length);
    const zero = allZero(buf.subarray(start, end));
    const last = out.at(-1);
    if (last !== undefined && last.zero === zero) last.end = end;
    else out.push({ start, end, zero });
  }
  return out;
}

/**
 * Copies what a bitmap marks from a source to a target.
 * @example
 * const work = src.createBitmapSync({ granularity: 65536, disabled: true });
 * work.setDirty(0, src.length);
 * const engine = new CopyEngine({ source: src, target: dst, bitmap: work, maxWorkers: 8 });
 * await engine.run();
 */
export class CopyEngine {
  readonly options: Readonly<CopyEngineOptions>;
  readonly chunkSize: number;
  readonly maxWorkers: number;
  readonly maxBufferBytes: number;
  readonly stats: CopyEngineStats = {
    inFlight: 0,
    bufferBytesInFlight: 0,
    maxInFlight: 0,
    maxBufferBytesInFlight: 0,
  };
  #cancelled = false;
  #wake: (() => void) | undefined;
  #clock: Clock;
  #running = false;
  #offload: boolean;
  /** Idle chunk buffers (each `chunkSize` bytes), reused so a pass allocates only what runs at once. */
  #pool: Uint8Array[] = [];
  /** The memory of the chunk buffers this engine allocated (what may go back to the pool). */
  #own = new WeakSet<ArrayBufferLike>();
  /** With `staticSource`: the last block status answer, `[start, end)`, kept for the chunks it covers. */
  #status: { start: number; end: number; extents: Promise<BlockStatusExtent[]> } | undefined;

  constructor(options: CopyEngineOptions) {
    this.options = options;
    const g = options.bitmap.granularity;
    this.maxWorkers = Math.max(1, Math.floor(options.maxWorkers ?? 64));
    this.maxBufferBytes = Math.max(g, options.maxBufferBytes ?? 128 << 20);
    const want = Math.min(options.chunkSize ?? Math.max(g, 1 << 20), this.maxBufferBytes);
    this.chunkSize = Math.max(g, Math.floor(want / g) * g);
    this.#clock = options.clock ?? systemClock;
    this.#offload = options.copyOffload ?? false;
    options.signal?.addEventListener("abort", () => this.cancel(), { once: true });
  }

  /**
   * Stops starting chunks: the running pass rejects with `ECANCELED` after in-flight chunks finish. A later
   * `run()` starts afresh (unless the `signal` is aborted).
   */
  cancel(): void {
    this.#cancelled = true;
    this.wake();
  }

  /** True while copy offload is asked for and no pair has refused it yet. */
  get offloading(): boolean {
    return this.#offload;
  }

  /** True once cancelled. */
  get cancelled(): boolean {
    return this.#cancelled;
  }

  /** Ends a rate-limit sleep now (call after raising the speed). */
  wake(): void {
    const w = this.#wake;
    this.#wake = undefined;
    w?.();
  }

  #sleep(ns: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = this.#clock.setTimer(() => {
        this.#wake = undefined;
        resolve();
      }, ns);
      this.#wake = () => {
        timer.cancel();
        resolve();
      };
    });
  }

  async #throttle(): Promise<void> {
    const rl = this.options.rateLimit;
    if (rl === undefined) return;
    for (;;) {
      if (this.#cancelled) return;
      const d = rl.calculateDelay(0, this.#clock.now());
      if (d <= 0) return;
      await this.#sleep(d);
    }
  }

  /**
   * One pass over the bitmap within `[offset, offset+bytes)` (default: all of it). Bits set behind the
   * pass meanwhile are left for the next pass.
   * @throws {BlkError} the first chunk error whose action is `fail`; ECANCELED when cancelled
   */
  async run(range: { offset?: number; bytes?: number } = {}): Promise<CopyResult> {
    if (this.#running) throw new BlkError("EBUSY", "A copy pass is already running");
    this.#running = true;
    this.#cancelled = this.options.signal?.aborted ?? false;
    try {
      return await this.#run(range);
    } finally {
      this.#running = false;
      this.#pool.length = 0;
      this.#status = undefined;
    }
  }

  async #run(range: { offset?: number; bytes?: number }): Promise<CopyResult> {
    const { bitmap } = this.options;
    const g = bitmap.granularity;
    const result: CopyResult = { copied: 0, zeroed: 0, skipped: 0, offloaded: 0, errors: [] };
    const start = Math.floor((range.offset ?? 0) / g) * g;
    const end = Math.min(
      bitmap.size,
      range.bytes === undefined ? bitmap.size : (range.offset ?? 0) + range.bytes,
    );
    const running = new Set<Promise<void>>();
    const st: { failure: BlkError | undefined } = { failure: undefined };
    let pos = start;
    let writesBefore: Promise<void> = Promise.resolve();
    // Functions, not expressions: both change while this loop awaits.
    const stopped = (): boolean => this.#cancelled || st.failure !== undefined;
    const fits = (bytes: number): boolean =>
      running.size === 0 ||
      (running.size < this.maxWorkers && this.stats.bufferBytesInFlight + bytes <= this.maxBufferBytes);
    while (!stopped() && pos < end) {
      let area = bitmap.nextDirtyArea(pos, end, this.chunkSize);
      if (area === null) break;
      if (!fits(area.count)) {
        await Promise.race(running);
        continue;
      }
      await this.options.pausePoint?.();
      if (stopped()) break;
      await this.#throttle();
      if (stopped()) break;
      // A copyRange() call may have taken bits while this loop waited.
      area = bitmap.nextDirtyArea(pos, end, this.chunkSize);
      if (area === null) break;
      if (!fits(area.count)) continue;
      bitmap.resetDirty(area.start, area.count);
      // The rate limit accounts what the chunk will copy or zero (skipped ranges are free), known once
      // block status has classified it; the I/O then runs in the background.
      let planned!: (bytes: number) => void;
      const plan = new Promise<number>((r) => (planned = r));
      let order: WriteTurn | undefined;
      if (this.options.inOrderWrites === true) {
        let release!: () => void;
        order = { turn: writesBefore, release: () => release(), taken: false };
        writesBefore = new Promise<void>((r) => (release = r));
      }
      const task: Promise<void> = this.#task(area.start, area.count, result, true, planned, order).then(
        (f) => {
          if (f !== undefined) st.failure ??= f;
        },
        (e: unknown) => {
          st.failure ??= toBlkError(e);
        },
      );
      const tracked = task.finally(() => running.delete(tracked));
      running.add(tracked);
      pos = area.start + area.count;
      const work = await plan;
      if (work > 0) this.options.rateLimit?.calculateDelay(work, this.#clock.now());
    }
    await Promise.all(running);
    if (st.failure !== undefined) throw st.failure;
    if (this.#cancelled) throw new BlkError("ECANCELED", "Operation canceled");
    return result;
  }

  /**
   * Copies what is still to copy in `[offset, offset+bytes)` (widened to granules) now, ignoring the rate
   * limit, after any chunk in flight over that range has finished: the copy-before-write path. When it
   * resolves, the range's old data is on the target. Errors are not passed to `onError`: they reject (and
   * the bits stay set), so the guest write that triggered the copy fails.
   * @throws {BlkError} the chunk's error
   */
  async copyRange(offset: number, bytes: number): Promise<CopyResult> {
    const { bitmap } = this.options;
    const g = bitmap.granularity;
    const start = Math.floor(offset / g) * g;
    const end = Math.min(bitmap.size, Math.ceil((offset + bytes) / g) * g);
    const result: CopyResult = { copied: 0, zeroed: 0, skipped: 0, offloaded: 0, errors: [] };
    for (;;) {
      const busy = [...this.#tasks].filter((t) => t.start < end && start < t.end);
      if (busy.length > 0) {
        await Promise.all(busy.map((t) => t.done));
        continue;
      }
      const area = bitmap.nextDirtyArea(start, end, this.chunkSize);
      if (area === null) return result;
      bitmap.resetDirty(area.start, area.count);
      const failure = await this.#task(area.start, area.count, result, false);
      if (failure !== undefined) throw failure;
    }
  }

  #tasks = new Set<{ start: number; end: number; done: Promise<unknown> }>();

  #task(
    offset: number,
    bytes: number,
    result: CopyResult,
    background: boolean,
    planned?: (bytes: number) => void,
    order?: WriteTurn,
  ): Promise<BlkError | undefined> {
    const done = this.#chunk(offset, bytes, result, background, planned, order);
    const entry = { start: offset, end: offset + bytes, done };
    this.#tasks.add(entry);
    return done.finally(() => this.#tasks.delete(entry));
  }

  async #chunk(
    offset: number,
    bytes: number,
    result: CopyResult,
    background: boolean,
    planned?: (bytes: number) => void,
    order?: WriteTurn,
  ): Promise<BlkError | undefined> {
    const s = this.stats;
    s.inFlight++;
    s.bufferBytesInFlight += bytes;
    if (s.inFlight > s.maxInFlight) s.maxInFlight = s.inFlight;
    if (s.bufferBytesInFlight > s.maxBufferBytesInFlight) s.maxBufferBytesInFlight = s.bufferBytesInFlight;
    const p: CopyProgress = { offset, bytes, copied: 0, zeroed: 0, skipped: 0 };
    try {
      const segments = await this.#classify(offset, bytes);
      let work = 0;
      for (const seg of segments) if (seg.kind !== "skip") work += seg.length;
      planned?.(work);
      planned = undefined;
      for (const seg of segments) await this.#segment(seg, p, order, segments.length === 1);
      result.copied += p.copied;
      result.zeroed += p.zeroed;
      result.skipped += p.skipped;
      result.offloaded += p.offloaded ?? 0;
      this.options.onProgress?.(p);
      return undefined;
    } catch (e) {
      planned?.(0);
      planned = undefined;
      const f = e instanceof ChunkFailure ? e : new ChunkFailure("read", toBlkError(e));
      this.options.bitmap.setDirty(offset, bytes);
      const err: CopyError = { offset, bytes, operation: f.operation, error: f.error };
      if (f.requestOffset !== undefined && f.requestOffset !== offset) err.requestOffset = f.requestOffset;
      const action = background ? ((await this.options.onError?.(err)) ?? "fail") : "fail";
      if (action === "fail") return f.error;
      result.errors.push(err);
      return undefined;
    } finally {
      planned?.(0);
      s.inFlight--;
      s.bufferBytesInFlight -= bytes;
      // The next chunk's turn comes once this one and every one before it are done.
      if (order !== undefined) void order.turn.then(order.release);
    }
  }

  /** Does one segment of a chunk; `whole`: it is the chunk's only segment. */
  async #segment(seg: Segment, p: CopyProgress, order: WriteTurn | undefined, whole: boolean): Promise<void> {
    const { source, target } = this.options;
    if (seg.kind === "skip") {
      p.skipped += seg.length;
      return;
    }
    const myTurn = async (): Promise<void> => {
      if (order === undefined || order.taken) return;
      await order.turn;
      order.taken = true;
    };
    const mayUnmap = (this.options.zeroes ?? "unmap") === "unmap";
    if (seg.kind === "data") {
      if (this.#offload) {
        await myTurn();
        try {
          await offload(source, target, seg.offset, seg.length);
          p.copied += seg.length;
          p.offloaded = (p.offloaded ?? 0) + seg.length;
          return;
        } catch (e) {
          // Refused (this pair cannot offload): read and write from now on. Anything else failed the copy.
          if (!isBlkError(e, "ENOTSUP")) throw new ChunkFailure("write", toBlkError(e));
          this.#offload = false;
        }
      }
      const buf = this.#takeBuffer(seg.length);
      // Not reused after a failure: a driver may still be filling it from a request that failed early.
      await this.#read(seg.offset, buf);
      const split = this.options.splitZeroes;
      const runs =
        split !== undefined
          ? split(seg.offset, buf)
          : this.options.detectZeroBuffers === true
            ? zeroRuns(buf, this.options.bitmap.granularity)
            : [{ start: 0, end: buf.length, zero: false }];
      await myTurn();
      const placed = this.options.writePlaced;
      if (
        order !== undefined &&
        placed !== undefined &&
        whole &&
        runs.length === 1 &&
        runs[0]?.zero === false
      ) {
        // One write for the whole chunk: the next chunk's turn comes once the target has placed it.
        const written = target.write(seg.offset, buf);
        // Awaited below; handled now so that a failure while waiting for the placement is not unhandled.
        written.catch(() => {});
        try {
          await placed(seg.offset, seg.length, written);
        } catch {
          // Placement unknown: the next chunk waits for this write, as without the hook.
          await written.catch(() => {});
        }
        order.release();
        try {
          await written;
        } catch (e) {
          throw new ChunkFailure("write", toBlkError(e));
        }
        p.copied += seg.length;
        this.#giveBuffer(buf);
        return;
      }
      for (const r of runs) {
        try {
          if (r.zero) await target.writeZeroes(seg.offset + r.start, r.end - r.start, { mayUnmap });
          else await target.write(seg.offset + r.start, buf.subarray(r.start, r.end));
        } catch (e) {
          throw new ChunkFailure("write", toBlkError(e));
        }
        if (r.zero) p.zeroed += r.end - r.start;
        else p.copied += r.end - r.start;
      }
      this.#giveBuffer(buf);
      return;
    }
    await myTurn();
    try {
      await target.writeZeroes(seg.offset, seg.length, { mayUnmap });
    } catch (e) {
      throw new ChunkFailure("write", toBlkError(e));
    }
    p.zeroed += seg.length;
  }

  /** Reads `buf.length` bytes at `offset` from the source, in `readSize` pieces. @throws {ChunkFailure} */
  async #read(offset: number, buf: Uint8Array): Promise<void> {
    const { source } = this.options;
    const piece = this.options.readSize ?? 0;
    if (piece <= 0 || buf.length <= piece) {
      try {
        await source.readInto(offset, buf);
      } catch (e) {
        throw new ChunkFailure("read", toBlkError(e));
      }
      return;
    }
    const reads: Promise<void>[] = [];
    for (let p = 0; p < buf.length; p += piece) {
      reads.push(source.readInto(offset + p, buf.subarray(p, Math.min(p + piece, buf.length))));
    }
    const settled = await Promise.allSettled(reads);
    const i = settled.findIndex((r) => r.status === "rejected");
    const failed = settled[i];
    if (failed?.status === "rejected") {
      throw new ChunkFailure("read", toBlkError(failed.reason), offset + i * piece);
    }
  }

  /** A buffer of `bytes` bytes (at most `chunkSize`), from the pool when one is idle; contents undefined. */
  #takeBuffer(bytes: number): Uint8Array {
    if (bytes > this.chunkSize) return new Uint8Array(bytes);
    let whole = this.#pool.pop();
    if (whole === undefined) {
      whole = this.options.allocBuffer?.(this.chunkSize) ?? new Uint8Array(this.chunkSize);
      this.#own.add(whole.buffer);
    }
    return whole.subarray(0, bytes);
  }

  /** Returns a buffer of {@link CopyEngine.#takeBuffer} once no request uses it any more. */
  #giveBuffer(buf: Uint8Array): void {
    const max = Math.min(this.maxWorkers, Math.max(1, Math.floor(POOL_BYTES / this.chunkSize)));
    if (!this.#own.has(buf.buffer) || this.#pool.length >= max) return;
    this.#pool.push(new Uint8Array(buf.buffer, buf.byteOffset, this.chunkSize));
  }

  /** The source's block status over `[offset, offset+bytes)` (extents may reach beyond it). */
  async #blockStatus(mode: "chain" | "node", offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    const { source } = this.options;
    const ask = (o: number, n: number): Promise<BlockStatusExtent[]> =>
      mode === "chain"
        ? source.blockStatusAbove(o, n, this.options.base === undefined ? {} : { base: this.options.base })
        : source.blockStatus(o, n);
    if (this.options.staticSource !== true) return ask(offset, bytes);
    let kept = this.#status;
    if (kept === undefined || offset < kept.start || offset + bytes > kept.end) {
      const end = Math.max(offset + bytes, Math.min(this.options.bitmap.size, offset + STATUS_LOOKAHEAD));
      kept = { start: offset, end, extents: ask(offset, end - offset) };
      this.#status = kept;
      // A failed query is not kept: the next chunk asks again.
      const failed = kept;
      kept.extents.catch(() => {
        if (this.#status === failed) this.#status = undefined;
      });
    }
    const all = await kept.extents;
    // The extents from the one holding `offset` (binary search: a query may return many).
    let lo = 0;
    let hi = all.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const e = all[mid] as BlockStatusExtent;
      if (e.offset + e.length <= offset) lo = mid + 1;
      else hi = mid;
    }
    const out: BlockStatusExtent[] = [];
    for (let i = lo; i < all.length; i++) {
      const e = all[i] as BlockStatusExtent;
      if (e.offset >= offset + bytes) break;
      out.push(e);
    }
    return out;
  }

  /** Splits a chunk by block status into data/zero/skip runs of whole granules. */
  async #classify(offset: number, bytes: number): Promise<Segment[]> {
    const mode = this.options.status ?? "chain";
    if (mode === "none") return [{ offset, length: bytes, kind: "data" }];
    let extents: BlockStatusExtent[];
    try {
      extents = await this.#blockStatus(mode, offset, bytes);
    } catch (e) {
      throw new ChunkFailure("read", toBlkError(e));
    }
    const skip = this.options.skipUnallocated ?? false;
    const kindOf = (e: BlockStatusExtent): Kind => (skip && !e.allocated ? "skip" : e.zero ? "zero" : "data");
    const g = this.options.bitmap.granularity;
    const end = offset + bytes;
    const add = (list: Segment[], s: number, e: number, kind: Kind): void => {
      if (e <= s) return;
      const last = list.at(-1);
      if (last !== undefined && last.kind === kind && last.offset + last.length === s) last.length += e - s;
      else list.push({ offset: s, length: e - s, kind });
    };
    // The extents as runs of one kind over [offset, end); what no extent covers is data.
    const runs: Segment[] = [];
    let pos = offset;
    for (const e of extents) {
      if (e.offset >= end) break;
      const s = Math.max(e.offset, pos);
      const t = Math.min(e.offset + e.length, end);
      if (t <= s) continue;
      add(runs, pos, s, "data");
      add(runs, s, t, kindOf(e));
      pos = t;
    }
    add(runs, pos, end, "data");
    // Whole granules only: a granule a zero or skip run covers in part is data (the last granule of the
    // chunk may be short).
    const out: Segment[] = [];
    for (const r of runs) {
      const s = r.offset;
      const e = r.offset + r.length;
      if (r.kind === "data") {
        add(out, s, e, "data");
        continue;
      }
      const inner = Math.min(e, offset + Math.ceil((s - offset) / g) * g);
      const innerEnd = e === end ? end : Math.max(inner, offset + Math.floor((e - offset) / g) * g);
      add(out, s, inner, "data");
      add(out, inner, innerEnd, r.kind);
      add(out, innerEnd, e, "data");
    }
    return out;
  }
}
