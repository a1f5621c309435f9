/** Test helpers: a manual clock, an event recorder and scriptable jobs driven step by step. */
import type { BlkErrorCode } from "@blk/core";
import type { Clock } from "@blk/throttle";
import {
  type BlockdevOnError,
  BlockJob,
  type BlockJobOptions,
  errnoError,
  type IoOperationType,
  Job,
  type JobEvent,
  JobManager,
  type JobOptions,
} from "../src/index.ts";

/** Lets every pending microtask and immediate run. */
export const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/** Several ticks (the job framework chains a few promises per step). */
export async function settle(n = 5): Promise<void> {
  for (let i = 0; i < n; i++) await tick();
}

interface Timer {
  at: number;
  seq: number;
  cb: () => void;
  cancelled: boolean;
}

/**
 * A clock that only moves when told to. Timers fire in time order; ties in creation order. `lateNs` makes
 * every timer fire that much after its deadline, as real timers do.
 */
export class ManualClock implements Clock {
  readonly lateNs: number;
  constructor(opts?: { lateNs?: number }) {
    this.lateNs = opts?.lateNs ?? 0;
  }
  #now = 0;
  #seq = 0;
  #timers: Timer[] = [];

  now(): number {
    return this.#now;
  }

  setTimer(cb: () => void, delayNs: number): { cancel(): void } {
    const t: Timer = {
      at: this.#now + Math.max(0, delayNs) + this.lateNs,
      seq: this.#seq++,
      cb,
      cancelled: false,
    };
    this.#timers.push(t);
    return {
      cancel: () => {
        t.cancelled = true;
      },
    };
  }

  #nextDue(limit: number): Timer | undefined {
    this.#timers = this.#timers.filter((t) => !t.cancelled);
    let best: Timer | undefined;
    for (const t of this.#timers) {
      if (t.at <= limit && (best === undefined || t.at < best.at || (t.at === best.at && t.seq < best.seq))) {
        best = t;
      }
    }
    return best;
  }

  /**
   * Advances by `ns`, firing due timers one at a time and letting the jobs react after each (at most
   * `maxTimers`: an unlimited job re-arms zero-delay timers forever).
   */
  async advance(ns: number, maxTimers = Number.POSITIVE_INFINITY): Promise<void> {
    const target = this.#now + ns;
    for (let fired = 0; fired < maxTimers; fired++) {
      await settle(2);
      const t = this.#nextDue(target);
      if (t === undefined) break;
      t.cancelled = true;
      this.#now = Math.max(this.#now, t.at);
      t.cb();
    }
    this.#now = target;
    await settle(2);
  }

  /** Number of live timers. */
  get pending(): number {
    return this.#timers.filter((t) => !t.cancelled).length;
  }
}

/** Records every event of a manager. */
export function record(manager: JobManager): JobEvent[] {
  const events: JobEvent[] = [];
  manager.onEvent((e) => events.push(e));
  return events;
}

/** A compact view: status changes as `id:status`, other events as `EVENT:id`. */
export function compact(events: readonly JobEvent[]): string[] {
  return events.map((e) =>
    e.event === "JOB_STATUS_CHANGE"
      ? `${e.data.id}:${e.data.status}`
      : `${e.event}:${"device" in e.data ? e.data.device : e.data.id}`,
  );
}

/** One step a scripted job performs when it is given it. */
export type Step =
  | { kind: "work"; bytes: number }
  | { kind: "remaining"; bytes: number }
  | { kind: "ready" }
  | { kind: "finish" }
  | { kind: "fail"; error: Error }
  | { kind: "io-error"; code: BlkErrorCode; op: IoOperationType; policy: BlockdevOnError; times?: number }
  | { kind: "hold"; until: Promise<void> };

/**
 * A block job whose run performs pushed steps one at a time and, while it has none, parks (QEMU's
 * job_yield), so tests drive it step by step. Without `onComplete`/`onCancel` it behaves like backup:
 * cannot be completed, every cancel is forced.
 */
export class ScriptJob extends BlockJob {
  readonly steps: Step[] = [];
  shouldComplete = false;
  ioAttempts = 0;
  ignored = 0;
  readonly hookLog: string[] = [];
  prepareError: Error | undefined;

  constructor(opts: Omit<BlockJobOptions, "type"> & { type?: BlockJobOptions["type"] }) {
    super({ ...opts, type: opts.type ?? "backup" });
  }

  /** Queues steps and wakes the job. */
  push(...steps: Step[]): this {
    this.steps.push(...steps);
    // like QEMU drivers: a job parked at a pause point is re-entered by resume, not by new work
    if (!this.paused) this.enter();
    return this;
  }

  protected async run(): Promise<void> {
    for (;;) {
      if (this.isCancelled()) return;
      if (this.shouldComplete || (this.cancelRequested && this.isReady())) return;
      const step = this.steps.shift();
      if (step === undefined) {
        await this.suspend();
        continue;
      }
      switch (step.kind) {
        case "work":
          this.progressWorkDone(step.bytes);
          await this.pausePoint();
          break;
        case "remaining":
          this.progressSetRemaining(step.bytes);
          break;
        case "ready":
          this.transitionToReady();
          break;
        case "finish":
          return;
        case "fail":
          throw step.error;
        case "io-error": {
          let failures = step.times ?? 1;
          const r = await this.withErrorPolicy(step.policy, step.op, () => {
            this.ioAttempts++;
            if (failures-- > 0) return Promise.reject(errnoError(step.code));
            return Promise.resolve("ok");
          });
          if (r !== "ok") this.ignored++;
          break;
        }
        case "hold":
          await step.until;
          break;
      }
    }
  }

  protected override prepare(): void {
    this.hookLog.push("prepare");
    if (this.prepareError !== undefined) throw this.prepareError;
  }
  protected override commit(): void {
    this.hookLog.push("commit");
  }
  protected override abort(): void {
    this.hookLog.push("abort");
  }
  protected override clean(): void {
    this.hookLog.push("clean");
  }
}

/** A mirror-like scripted job: can be completed when READY; a soft cancel before READY is forced. */
export class MirrorJob extends ScriptJob {
  constructor(opts: Omit<BlockJobOptions, "type">) {
    super({ ...opts, type: "mirror" });
  }
  protected override onComplete(): void {
    this.shouldComplete = true;
    if (!this.paused) this.enter();
  }
  protected override onCancel(force: boolean): boolean {
    return force || !this.isReady();
  }
}

/** A non-block job (type `create`): finishes when told to. */
export class CreateJob extends Job {
  done = false;
  constructor(opts: JobOptions) {
    super({ ...opts, type: "create" });
  }
  finish(): void {
    this.done = true;
    this.enter();
  }
  protected async run(): Promise<void> {
    this.progressSetRemaining(1);
    while (!this.done && !this.isCancelled()) await this.suspend();
    this.progressWorkDone(1);
  }
}

/** A manager on a manual clock, with its event log. */
export function setup(opts?: { lateNs?: number }): {
  manager: JobManager;
  clock: ManualClock;
  events: JobEvent[];
} {
  const clock = new ManualClock(opts);
  const manager = new JobManager({ clock });
  return { manager, clock, events: record(manager) };
}

/** Runs `fn` and returns the thrown error (fails when nothing is thrown). */
export function thrown(fn: () => unknown): unknown {
  try {
    fn();
  } catch (e) {
    return e;
  }
  throw new Error("expected an exception");
}

/** Awaits `p` and returns its rejection (fails when it resolves). */
export async function rejected(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (e) {
    return e;
  }
  throw new Error("expected a rejection");
}
