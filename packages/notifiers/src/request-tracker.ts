import { NotifierError } from "./errors.ts";

/** Options for {@link RequestTracker.begin}. */
export interface BeginOptions {
  /** First byte of the request. A non-negative integer. */
  offset: number;
  /** Length in bytes. A non-negative integer. */
  bytes: number;
  /** Register the request as serialising right away (like calling `markSerialising(alignment)`). */
  serialising?: boolean;
  /** Alignment used when `serialising` is set (default 1: no widening). */
  alignment?: number;
  /** What the request does, for callers and diagnostics only (default `"other"`). */
  kind?: "read" | "write" | "zero" | "discard" | "copy" | (string & {});
}

/**
 * One in-flight request registered with a {@link RequestTracker}. See {@link RequestTracker} for the
 * waiting rules.
 */
export interface TrackedRequest {
  /** First byte of the request as begun. */
  readonly offset: number;
  /** Length of the request as begun. */
  readonly bytes: number;
  /** First byte of the range used for overlap checks (the request range, widened by `markSerialising`). */
  readonly overlapOffset: number;
  /** Length of the range used for overlap checks. */
  readonly overlapBytes: number;
  /** True once the request is serialising: overlapping requests then wait for each other. */
  readonly serialising: boolean;
  /** The `kind` given to `begin`. */
  readonly kind: string;
  /** True once {@link TrackedRequest.end} was called. */
  readonly ended: boolean;
  /** The request this one is waiting for right now, or `undefined`. */
  readonly waitingFor: TrackedRequest | undefined;
  /**
   * Makes the request serialising and widens its overlap range outwards to multiples of `alignment`
   * (default 1). Widening only grows the range; calling it again with another alignment takes the union.
   * Requests already past their wait are not affected; call {@link TrackedRequest.waitForOverlapping}
   * afterwards to wait for overlapping requests that are running.
   * @throws {NotifierError} EINVAL when `alignment` is not a positive safe integer.
   */
  markSerialising(alignment?: number): void;
  /**
   * Waits until no conflicting request is running: one that overlaps this request's overlap range, is
   * not ended, where this request or that one is serialising, and that is not (directly or transitively)
   * waiting for this one. Re-checks after every wake-up. Resolves `true` if it had to wait, `false` if it
   * did not; resolves at once once the request has ended.
   */
  waitForOverlapping(): Promise<boolean>;
  /** Ends the request (idempotent): removes it from the tracker and wakes every request waiting for it. */
  end(): void;
}

const isNonNegInt = (v: number): boolean => Number.isSafeInteger(v) && v >= 0;

class Tracked implements TrackedRequest {
  readonly offset: number;
  readonly bytes: number;
  readonly kind: string;
  overlapOffset: number;
  overlapBytes: number;
  serialising = false;
  ended = false;
  waitingFor: Tracked | undefined = undefined;
  /** Requests waiting for this one, in the order they started waiting. */
  readonly waiters: Set<Tracked> = new Set();
  /** Resolves this request's current wait. */
  wake: (() => void) | undefined = undefined;
  readonly #requests: Set<Tracked>;
  readonly #onEnd: (r: Tracked) => void;

  constructor(
    requests: Set<Tracked>,
    onEnd: (r: Tracked) => void,
    offset: number,
    bytes: number,
    kind: string,
  ) {
    this.#requests = requests;
    this.#onEnd = onEnd;
    this.offset = offset;
    this.bytes = bytes;
    this.kind = kind;
    this.overlapOffset = offset;
    this.overlapBytes = bytes;
  }

  markSerialising(alignment = 1): void {
    if (!Number.isSafeInteger(alignment) || alignment < 1) {
      throw new NotifierError("EINVAL", `alignment must be a positive integer, got ${alignment}`);
    }
    const start = Math.floor(this.offset / alignment) * alignment;
    const end = Math.ceil((this.offset + this.bytes) / alignment) * alignment;
    const newStart = Math.min(start, this.overlapOffset);
    const newEnd = Math.max(end, this.overlapOffset + this.overlapBytes);
    this.overlapOffset = newStart;
    this.overlapBytes = newEnd - newStart;
    this.serialising = true;
  }

  async waitForOverlapping(): Promise<boolean> {
    let waited = false;
    for (;;) {
      if (this.ended) return waited;
      const conflict = findConflict(this.#requests, this);
      if (conflict === undefined) return waited;
      waited = true;
      this.waitingFor = conflict;
      conflict.waiters.add(this);
      await new Promise<void>((resolve) => {
        this.wake = resolve;
      });
    }
  }

  end(): void {
    if (this.ended) return;
    this.ended = true;
    // A request ended while waiting stops waiting: its waitForOverlapping resolves.
    const target = this.waitingFor;
    if (target !== undefined) {
      target.waiters.delete(this);
      this.#resume();
    }
    this.#requests.delete(this);
    // Waiters become runnable at once (synchronously), so later checks no longer see them as waiting.
    const waiters = [...this.waiters];
    this.waiters.clear();
    for (const w of waiters) w.#resume();
    this.#onEnd(this);
  }

  #resume(): void {
    this.waitingFor = undefined;
    const wake = this.wake;
    this.wake = undefined;
    wake?.();
  }
}

/**
 * Tracks the in-flight requests of one node by byte range: QEMU's tracked requests, with serialising
 * requests (a copy-before-write, a COW) that overlapping requests wait for.
 *
 * Rules:
 * - {@link RequestTracker.begin} registers a request synchronously; it counts as running until it calls
 *   {@link TrackedRequest.waitForOverlapping} and has to wait.
 * - Two requests conflict when their overlap ranges intersect (`a.start < b.end && b.start < a.end`) and
 *   at least one of them is serialising. Two non-serialising requests never wait for each other.
 * - `waitForOverlapping` waits for a conflicting request unless that one is itself waiting, directly or
 *   through a chain of waits, for the caller; that exception makes waiting deadlock-free (the wait-for
 *   graph stays acyclic). After every wake-up the check runs again.
 * - `end` wakes the waiters synchronously (they stop counting as waiting at once) and their promises
 *   resolve in wait order.
 *
 * QEMU 7.2 (`bdrv_find_conflicting_request`) skips every conflicting request that is waiting for
 * anything; this tracker only skips those that wait (transitively) for the caller, so a later request does
 * not overtake an earlier serialising request that is still waiting — both are deadlock-free and never let
 * two conflicting requests run at once.
 * @example
 * const tracker = new RequestTracker();
 * const copy = tracker.begin({ offset: 0, bytes: 4096, serialising: true, alignment: 65536, kind: "copy" });
 * const write = tracker.begin({ offset: 512, bytes: 512, kind: "write" });
 * const admitted = write.waitForOverlapping(); // waits until copy.end()
 * copy.end();
 * await admitted;
 * write.end();
 */
export class RequestTracker {
  readonly #requests: Set<Tracked> = new Set();
  #idleWaiters: (() => void)[] = [];
  readonly #onEnd = (): void => {
    if (this.#requests.size === 0 && this.#idleWaiters.length > 0) {
      const waiters = this.#idleWaiters;
      this.#idleWaiters = [];
      for (const w of waiters) w();
    }
  };

  /**
   * Registers a request (synchronously). Call `end()` on the result when the request completes, whether
   * it succeeded or not.
   * @throws {NotifierError} EINVAL when `offset` or `bytes` is not a non-negative safe integer, their sum is
   * not a safe integer, or `alignment` is not a positive integer.
   */
  begin(opts: BeginOptions): TrackedRequest {
    const { offset, bytes } = opts;
    if (!isNonNegInt(offset) || !isNonNegInt(bytes) || !Number.isSafeInteger(offset + bytes)) {
      throw new NotifierError("EINVAL", `invalid request range: offset ${offset}, bytes ${bytes}`);
    }
    const req = new Tracked(this.#requests, this.#onEnd, offset, bytes, opts.kind ?? "other");
    if (opts.serialising === true) req.markSerialising(opts.alignment ?? 1);
    this.#requests.add(req);
    return req;
  }

  /** The number of requests begun and not ended. */
  get inFlight(): number {
    return this.#requests.size;
  }

  /** The in-flight requests, in the order they were begun. */
  requests(): TrackedRequest[] {
    return [...this.#requests];
  }

  /** The in-flight requests whose overlap range intersects `[offset, offset + bytes)`, in begin order. */
  overlapping(offset: number, bytes: number): TrackedRequest[] {
    const out: TrackedRequest[] = [];
    for (const r of this.#requests) {
      if (overlaps(r, offset, bytes)) out.push(r);
    }
    return out;
  }

  /**
   * Resolves once no request is in flight, including requests begun while it waits. Resolves at once when
   * the tracker is idle.
   */
  async drain(): Promise<void> {
    while (this.#requests.size > 0) {
      await new Promise<void>((resolve) => this.#idleWaiters.push(resolve));
    }
  }
}

/** The first in-flight request `self` must wait for, if any. */
function findConflict(requests: Set<Tracked>, self: Tracked): Tracked | undefined {
  for (const r of requests) {
    if (r === self || (!r.serialising && !self.serialising)) continue;
    if (!overlaps(r, self.overlapOffset, self.overlapBytes)) continue;
    if (waitsFor(r, self)) continue;
    return r;
  }
  return undefined;
}

function overlaps(r: Tracked, offset: number, bytes: number): boolean {
  return offset < r.overlapOffset + r.overlapBytes && r.overlapOffset < offset + bytes;
}

/** True when `r` waits for `target`, directly or through a chain of waits. */
function waitsFor(r: Tracked, target: Tracked): boolean {
  for (let x = r.waitingFor; x !== undefined; x = x.waitingFor) {
    if (x === target) return true;
    if (x === r) return false; // cannot happen (the graph is acyclic); guards against a loop
  }
  return false;
}
