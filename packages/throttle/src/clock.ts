import { ThrottleError } from "./errors.ts";

/** A timer armed with {@link Clock.setTimer}. */
export interface TimerHandle {
  /** Disarms the timer (idempotent; harmless after it fired). */
  cancel(): void;
}

/** A monotonic nanosecond clock with one-shot timers. All time-based code of this package takes one. */
export interface Clock {
  /** The current time in nanoseconds (monotonic; any origin). */
  now(): number;
  /** Calls `cb` once, no earlier than `delayNs` nanoseconds from now. Never calls it synchronously. */
  setTimer(cb: () => void, delayNs: number): TimerHandle;
}

/**
 * The real clock: `performance.now()` in nanoseconds, timers on `setTimeout` (rounded up to whole
 * milliseconds, so a timer never fires early).
 */
export const systemClock: Clock = {
  now: (): number => Math.floor(performance.now() * 1e6),
  setTimer(cb: () => void, delayNs: number): TimerHandle {
    const t = setTimeout(cb, Math.max(0, Math.ceil(delayNs / 1e6)));
    return { cancel: () => clearTimeout(t) };
  },
};

interface ManualTimer {
  due: number;
  seq: number;
  cb: () => void;
  live: boolean;
}

/**
 * A clock for tests: time moves only through {@link ManualClock.advance} and {@link ManualClock.set},
 * which fire every due timer in order of due time (then arming order), with `now()` equal to the timer's
 * due time during its callback. Timers armed by a callback fire in the same call if they are due.
 * @example
 * const clock = new ManualClock();
 * clock.setTimer(() => console.log(clock.now()), 5_000_000);
 * clock.advance(10_000_000); // prints 5000000
 */
export class ManualClock implements Clock {
  #now: number;
  #seq = 0;
  #timers: ManualTimer[] = [];

  /** @param startNs the initial time (default 0). */
  constructor(startNs = 0) {
    this.#now = startNs;
  }

  /** The current (manual) time in ns. */
  now(): number {
    return this.#now;
  }

  /** Arms a timer due `delayNs` (clamped to ≥ 0) from now; it fires during a later `advance`/`set`. */
  setTimer(cb: () => void, delayNs: number): TimerHandle {
    const timer: ManualTimer = { due: this.#now + Math.max(0, delayNs), seq: this.#seq++, cb, live: true };
    this.#timers.push(timer);
    return {
      cancel: () => {
        if (!timer.live) return;
        timer.live = false;
        this.#timers = this.#timers.filter((t) => t !== timer);
      },
    };
  }

  /** The number of armed timers. */
  get pendingTimers(): number {
    return this.#timers.length;
  }

  /** The due time of the earliest armed timer, or `undefined` when none is armed. */
  nextDue(): number | undefined {
    return this.#next()?.due;
  }

  /**
   * Moves time forward by `ns`, firing due timers on the way.
   * @throws {ThrottleError} EINVAL when `ns` is negative or not finite.
   */
  advance(ns: number): void {
    if (!(ns >= 0) || !Number.isFinite(ns)) throw new ThrottleError("EINVAL", `cannot advance by ${ns} ns`);
    this.set(this.#now + ns);
  }

  /**
   * Moves time forward to `ns`, firing due timers on the way.
   * @throws {ThrottleError} EINVAL when `ns` is earlier than now (the clock is monotonic).
   */
  set(ns: number): void {
    if (!(ns >= this.#now) || !Number.isFinite(ns)) {
      throw new ThrottleError("EINVAL", `cannot move the clock from ${this.#now} to ${ns}`);
    }
    for (;;) {
      const t = this.#next();
      if (t === undefined || t.due > ns) break;
      t.live = false;
      this.#timers = this.#timers.filter((x) => x !== t);
      this.#now = Math.max(this.#now, t.due);
      t.cb();
    }
    this.#now = ns;
  }

  #next(): ManualTimer | undefined {
    let best: ManualTimer | undefined;
    for (const t of this.#timers) {
      if (best === undefined || t.due < best.due || (t.due === best.due && t.seq < best.seq)) best = t;
    }
    return best;
  }
}
