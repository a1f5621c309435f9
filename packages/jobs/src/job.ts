/**
 * QEMU's generic job (`job.c`, 7.2): the status machine, verbs, pause points, cancel / complete / finalize /
 * dismiss, and grouped completion through transactions. See `spec/jobs.md` §1.
 *
 * Concurrency model: a job's {@link Job.run} is an async function. The job is *busy* while it awaits its own
 * work and *parked* while it waits inside {@link Job.sleep}, {@link Job.suspend} or a pause point. Waking a
 * parked job (QEMU's `job_enter`) performs the status changes QEMU's coroutine would make before yielding
 * again (entering `paused`/`standby` at a pause point, leaving it on resume) synchronously, so they are
 * visible before the verb that caused them returns, as in QEMU. The end of `run` is processed later, like
 * QEMU's `job_exit` bottom half.
 */
import { type Clock, systemClock } from "@blk/throttle";
import { errnoError, JobError, verbError } from "./errors.ts";
import type { JobManager } from "./manager.ts";
import {
  type JobInfo,
  type JobInfoExtensions,
  type JobOutcome,
  type JobStatus,
  type JobType,
  type JobVerb,
  type QueryOptions,
  transitionAllowed,
  verbAllowed,
} from "./types.ts";

/**
 * A job transaction (QEMU's `JobTxn`): every job is in one (a private one unless given). Jobs of one
 * transaction complete together: none leaves `waiting` until all have finished their work, and if one
 * fails or is cancelled, all others are force-cancelled. Members are kept newest first, as QEMU does.
 * @example
 * const txn = new JobTxn();
 * const a = new MyJob({ manager, id: "a", txn }), b = new MyJob({ manager, id: "b", txn });
 */
export class JobTxn {
  #jobs: Job[] = [];
  #aborting = false;

  /** The members that have not concluded yet, newest first. */
  get jobs(): readonly Job[] {
    return this.#jobs;
  }

  /** True once the transaction is being aborted. */
  get aborting(): boolean {
    return this.#aborting;
  }

  /** @internal Adds a job (at the head, as QEMU). */
  _add(job: Job): void {
    this.#jobs.unshift(job);
  }

  /** @internal Removes a job. */
  _remove(job: Job): void {
    const i = this.#jobs.indexOf(job);
    if (i >= 0) this.#jobs.splice(i, 1);
  }

  /** @internal Marks the transaction aborting; returns false if it already was. */
  _startAbort(): boolean {
    if (this.#aborting) return false;
    this.#aborting = true;
    return true;
  }
}

/** Options common to every job. */
export interface JobOptions {
  /** The manager that lists the job, emits its events and provides the clock. */
  manager: JobManager;
  /** The job id (QEMU's rules: a letter, then letters, digits, `-`, `.`, `_`). Required unless `internal`. */
  id?: string;
  /** An internal job: no id, no events, hidden from queries and lookups. */
  internal?: boolean;
  /** The transaction to join; default: a private one. */
  txn?: JobTxn;
  /** Default true; false stops the job in `pending` until `finalize` (and emits `BLOCK_JOB_PENDING`). */
  autoFinalize?: boolean;
  /** Default true; false keeps the job `concluded` (listed) until `dismiss`. */
  autoDismiss?: boolean;
}

/** True when `id` is a well-formed QEMU id (a letter, then letters, digits, `-`, `.`, `_`). */
export function isWellFormedId(id: string): boolean {
  return /^[A-Za-z][A-Za-z0-9._-]*$/.test(id);
}

interface Parked {
  wake: () => void;
  timer: { cancel(): void } | undefined;
}

const COMPLETED_STATUSES: ReadonlySet<JobStatus> = new Set([
  "waiting",
  "pending",
  "aborting",
  "concluded",
  "null",
]);

const toError = (e: unknown): Error => (e instanceof Error ? e : new Error(String(e)));

/**
 * A job: subclass it and implement {@link Job.run}; optional hooks (`prepare`, `commit`, `abort`, `clean`,
 * `onComplete`, `onCancel`, `onPause`, `onResume`, `onUserResume`) follow QEMU's `JobDriver`. Inside `run`,
 * call {@link Job.pausePoint}, {@link Job.sleep} or {@link Job.suspend} often; check
 * {@link Job.isCancelled}; report progress with {@link Job.progressWorkDone} and
 * {@link Job.progressSetRemaining}; reject to fail the job.
 *
 * The verbs exist twice: the strict ones with QEMU's refusals (`pause`, `resume`, `userCancel`,
 * `userComplete`, `finalize`, `dismiss`; the QMP commands of {@link JobManager} use them), and the
 * idempotent library ones (`cancel`, `complete`), which do nothing when the request is moot.
 * @example
 * class Sleeper extends Job {
 *   protected async run(): Promise<void> {
 *     for (let i = 0; i < 10 && !this.isCancelled(); i++) {
 *       await this.sleep(1_000_000);
 *       this.progressWorkDone(1);
 *     }
 *   }
 * }
 * const job = new Sleeper({ manager, id: "s0", type: "create" });
 * job.start();
 * console.log(await job.outcome);
 */
export abstract class Job {
  /** The job id; `null` for internal jobs. */
  readonly id: string | null;
  /** The job type. */
  readonly type: JobType;
  /** The manager the job belongs to. */
  readonly manager: JobManager;
  /** The job's transaction (a private one unless one was given). */
  readonly txn: JobTxn;
  /** When false, the job waits in `pending` for {@link Job.finalize}. */
  readonly autoFinalize: boolean;
  /** When false, the job stays `concluded` until {@link Job.dismiss}. */
  readonly autoDismiss: boolean;
  /** Resolves once the job has concluded; never rejects. */
  readonly outcome: Promise<JobOutcome>;

  #status: JobStatus = "undefined";
  #pauseCount = 1;
  #userPaused = false;
  #busy = false;
  #paused = true;
  #cancelled = false;
  #forceCancel = false;
  #started = false;
  #deferred = false;
  #completeRequested = false;
  #ret: Error | undefined;
  #parked: Parked | undefined;
  #current = 0;
  #total = 0;
  #phase: string | undefined;
  #startNs = 0;
  #runDone: Promise<void> | undefined;
  #exitPromise: Promise<void> | undefined;
  #resolveOutcome: (o: JobOutcome) => void = () => undefined;
  #statusWaiters: { status: JobStatus; resolve: (reached: boolean) => void }[] = [];

  /**
   * Creates the job (status `created`, `JOB_STATUS_CHANGE` emitted) and registers it with the manager.
   * @throws {JobError} EINVAL `Invalid job ID 'X'`, `An explicit job ID is required`,
   *   `Cannot specify job ID for internal job`; EEXIST `Job ID 'X' already in use`.
   */
  constructor(opts: JobOptions & { type: JobType }) {
    const { manager } = opts;
    if (opts.internal === true) {
      if (opts.id !== undefined) throw new JobError("EINVAL", "Cannot specify job ID for internal job");
      this.id = null;
    } else {
      const id = opts.id;
      if (id === undefined) throw new JobError("EINVAL", "An explicit job ID is required");
      if (!isWellFormedId(id)) throw new JobError("EINVAL", `Invalid job ID '${id}'`);
      if (manager.get(id) !== undefined) throw new JobError("EEXIST", `Job ID '${id}' already in use`);
      this.id = id;
    }
    this.type = opts.type;
    this.manager = manager;
    this.autoFinalize = opts.autoFinalize ?? true;
    this.autoDismiss = opts.autoDismiss ?? true;
    this.outcome = new Promise<JobOutcome>((resolve) => {
      this.#resolveOutcome = resolve;
    });
    this.txn = opts.txn ?? new JobTxn();
    this.txn._add(this);
    manager._register(this);
    this.#transition("created");
  }

  // ---------------------------------------------------------------- state

  /** The current status. */
  get status(): JobStatus {
    return this.#status;
  }
  /** QEMU's pause counter: ≥ 1 means the job should pause (user pauses, drains, STOP errors; 1 before start). */
  get pauseCount(): number {
    return this.#pauseCount;
  }
  /** Paused by the user (or by a STOP error); only such a pause can be undone by `resume`. */
  get userPaused(): boolean {
    return this.#userPaused;
  }
  /** True while the job is working (not parked at a sleep, a yield or a pause point). */
  get busy(): boolean {
    return this.#busy;
  }
  /** True while the job is parked at a pause point. */
  get paused(): boolean {
    return this.#paused;
  }
  /** True once a cancel (soft or forced) was requested. */
  get cancelRequested(): boolean {
    return this.#cancelled;
  }
  /** True once `start` was called. */
  get started(): boolean {
    return this.#started;
  }
  /** True while a timer-bounded sleep is pending (QEMU's `job_timer_pending`). */
  get timerPending(): boolean {
    return this.#parked?.timer !== undefined;
  }
  /** The error the job failed with (`Operation canceled` when cancelled), once known. */
  get error(): Error | undefined {
    return this.#ret;
  }
  /** Progress: `current` only grows; `total = current + remaining`. */
  get progress(): { current: number; total: number } {
    return { current: this.#current, total: this.#total };
  }
  /** The phase the job reported with {@link Job.setPhase}. */
  get phase(): string | undefined {
    return this.#phase;
  }
  /** The manager's clock. */
  get clock(): Clock {
    return this.manager.clock;
  }
  /** True when a *forced* cancel was requested (QEMU's `job_is_cancelled`). The run should stop. */
  isCancelled(): boolean {
    return this.#forceCancel;
  }
  /** True in `ready` or `standby`. */
  isReady(): boolean {
    return this.#status === "ready" || this.#status === "standby";
  }
  /** True once the job's work is over (`waiting`, `pending`, `aborting`, `concluded`, `null`). */
  isCompleted(): boolean {
    return COMPLETED_STATUSES.has(this.#status);
  }

  /**
   * Resolves `true` when the job enters `status` (at once if it is there now), or `false` once the job is
   * gone (`null`) without having entered it. Handy to `complete` a mirror on READY.
   * @example
   * if (await job.whenStatus("ready")) job.complete();
   */
  whenStatus(status: JobStatus): Promise<boolean> {
    if (this.#status === status) return Promise.resolve(true);
    if (this.#status === "null") return Promise.resolve(false);
    return new Promise<boolean>((resolve) => this.#statusWaiters.push({ status, resolve }));
  }

  // ---------------------------------------------------------------- driver hooks

  /** The job's work. Resolve for success; reject to fail (use `errnoError("EIO")` for a bare errno). */
  protected abstract run(): Promise<void>;
  /** First finalisation step of every transaction member (graph changes); a rejection aborts the txn. */
  protected prepare(): void | Promise<void> {}
  /** Success finalisation (after every member prepared). Must not throw. */
  protected commit(): void | Promise<void> {}
  /** Failure / cancel finalisation. Must not throw. */
  protected abort(): void | Promise<void> {}
  /** Runs after `commit` or `abort`. Must not throw. */
  protected clean(): void | Promise<void> {}
  /** `complete` for jobs that reach READY (mirror): ask the run to finish. Absent: cannot be completed. */
  protected onComplete?(): void;
  /** Decides whether a cancel is forced (mirror: soft only when READY). Absent: every cancel is forced. */
  protected onCancel?(force: boolean): boolean;
  /** Called at a pause point before the job parks (mirror waits for its in-flight I/O). */
  protected onPause?(): void | Promise<void>;
  /** Called after the job leaves a pause point. */
  protected onResume?(): void | Promise<void>;
  /** Called when a user pause is undone (`resume`, or a cancel of a user-paused job). */
  protected onUserResume(): void {}
  /** Called when the job becomes READY (block jobs emit `BLOCK_JOB_READY`). */
  protected notifyReady(): void {}
  /** Called when the job becomes PENDING with manual finalize (block jobs emit `BLOCK_JOB_PENDING`). */
  protected notifyPending(): void {}
  /** Called at finalisation of a job that was not force-cancelled (`BLOCK_JOB_COMPLETED`). */
  protected notifyCompleted(): void {}
  /** Called at finalisation of a force-cancelled job (`BLOCK_JOB_CANCELLED`). */
  protected notifyCancelled(): void {}

  // ---------------------------------------------------------------- inside run()

  /**
   * A pause point: if the job should pause (and is not force-cancelled), it parks in `paused` (or
   * `standby` when READY) until resumed. Call it between units of work.
   */
  pausePoint(): Promise<void> {
    if (!this.#shouldPause() || this.isCancelled()) return Promise.resolve();
    const hook = this.onPause?.();
    if (hook !== undefined) return hook.then(() => this.#pauseTail());
    return this.#pauseTail();
  }

  #pauseTail(): Promise<void> {
    if (this.#shouldPause() && !this.isCancelled()) {
      const prev = this.#status;
      this.#transition(prev === "ready" ? "standby" : "paused");
      this.#paused = true;
      return this.#park(undefined, () => {
        this.#paused = false;
        this.#transition(prev);
      }).then(() => this.onResume?.());
    }
    return Promise.resolve(this.onResume?.());
  }

  /**
   * Sleeps `ns` nanoseconds on the job's clock (QEMU's `job_sleep_ns`), then passes a pause point. Returns
   * at once when force-cancelled; may return early when woken (set-speed, cancel).
   */
  sleep(ns: number): Promise<void> {
    if (this.isCancelled()) return Promise.resolve();
    if (!this.#shouldPause()) return this.#park(ns, () => this.pausePoint());
    return this.pausePoint();
  }

  /** Parks until {@link Job.enter} wakes the job (QEMU's `job_yield`), then passes a pause point. */
  suspend(): Promise<void> {
    if (this.isCancelled()) return Promise.resolve();
    if (!this.#shouldPause()) return this.#park(undefined, () => this.pausePoint());
    return this.pausePoint();
  }

  /** Moves the job to READY (mirror "in sync"); block jobs then emit `BLOCK_JOB_READY`. */
  protected transitionToReady(): void {
    this.#transition("ready");
    this.notifyReady();
  }

  /** Adds `n` to `current` progress (`total` is left alone: keep it right with `progressSetRemaining`). */
  progressWorkDone(n: number): void {
    this.#current += n;
  }
  /** Sets `total = current + remaining`. */
  progressSetRemaining(remaining: number): void {
    this.#total = this.#current + remaining;
  }
  /** Adds `delta` to `total`. */
  progressIncreaseRemaining(delta: number): void {
    this.#total += delta;
  }
  /** Sets the phase shown as `x-blk-phase`. */
  setPhase(phase: string): void {
    this.#phase = phase;
  }

  // ---------------------------------------------------------------- lifecycle

  /** Starts the run (`created → running`); the run executes synchronously up to its first wait. */
  start(): void {
    if (this.#status !== "created" || this.#started)
      throw new Error(`job ${String(this.id)}: cannot start in ${this.#status}`);
    this.#started = true;
    this.#startNs = this.clock.now();
    this.#pauseCount--;
    this.#busy = true;
    this.#paused = false;
    this.#transition("running");
    this.#runDone = this.#entry();
  }

  /**
   * Destroys a job that was created but cannot be started (`created → null`, QEMU's `job_early_fail`);
   * its outcome becomes `failed` with `error`.
   */
  earlyFail(error: Error): void {
    if (this.#status !== "created" || this.#started) {
      throw new Error(`job ${String(this.id)}: early fail in ${this.#status}`);
    }
    this.#ret = error;
    this.#doDismiss();
    this.#resolveOutcome({ status: "failed", error });
  }

  async #entry(): Promise<void> {
    let error: Error | undefined;
    try {
      if (this.#shouldPause()) await this.pausePoint();
      await this.run();
    } catch (e) {
      error = toError(e);
    }
    this.#ret = error;
    this.#deferred = true;
    this.#busy = true;
    queueMicrotask(() => this.#background(this.#exit()));
  }

  #exit(): Promise<void> {
    this.#exitPromise ??= (async () => {
      this.#busy = false;
      await this.#completed();
    })();
    return this.#exitPromise;
  }

  /** Wakes a parked job (QEMU's `job_enter_cond`): no-op if not started, finished, busy or `cond` fails. */
  enter(cond?: (job: Job) => boolean): void {
    if (!this.#started || this.#deferred || this.#busy) return;
    if (cond !== undefined && !cond(this)) return;
    const p = this.#parked;
    if (p === undefined) return;
    p.timer?.cancel();
    this.#parked = undefined;
    this.#busy = true;
    p.wake();
  }

  /** Increments the pause counter (a drain, QEMU's `job_pause`); the job pauses at its next pause point. */
  holdPause(): void {
    this.#pauseCount++;
    if (!this.#paused) this.enter();
  }

  /** Undoes {@link Job.holdPause} (QEMU's `job_resume`); at zero the job is woken unless a timer is pending. */
  releasePause(): void {
    if (this.#pauseCount <= 0) throw new Error(`job ${String(this.id)}: releasePause without holdPause`);
    this.#pauseCount--;
    if (this.#pauseCount > 0) return;
    this.enter((j) => !j.timerPending);
  }

  /** Pauses as a user pause without the verb checks (a STOP error action). */
  protected pauseAsUser(): void {
    if (this.#userPaused) return;
    this.#userPaused = true;
    this.holdPause();
  }

  /** @throws {JobError} EPERM `Job 'ID' in state 'S' cannot accept command verb 'V'` */
  checkVerb(verb: JobVerb): void {
    if (!verbAllowed(verb, this.#status)) throw verbError(String(this.id), this.#status, verb);
  }

  // ---------------------------------------------------------------- verbs (strict, QEMU's refusals)

  /**
   * User pause (`job-pause`).
   * @throws {JobError} EPERM verb refused, or `Job is already paused`.
   */
  pause(): void {
    this.checkVerb("pause");
    if (this.#userPaused) throw new JobError("EPERM", "Job is already paused");
    this.#userPaused = true;
    this.holdPause();
  }

  /**
   * User resume (`job-resume`); block jobs also reset `io-status`.
   * @throws {JobError} EPERM `Can't resume a job that was not paused` (checked first), or verb refused.
   */
  resume(): void {
    if (!this.#userPaused || this.#pauseCount <= 0) {
      throw new JobError("EPERM", "Can't resume a job that was not paused");
    }
    this.checkVerb("resume");
    this.onUserResume();
    this.#userPaused = false;
    this.releasePause();
  }

  /**
   * Strict cancel (`job-cancel` passes `force: true`; `block-job-cancel` its `force`).
   * @throws {JobError} EPERM verb refused.
   */
  userCancel(force: boolean): void {
    this.checkVerb("cancel");
    this.#cancel(force);
  }

  /**
   * Strict complete (`job-complete`).
   * @throws {JobError} EPERM verb refused, or `The active block job 'ID' cannot be completed`.
   */
  userComplete(): void {
    this.checkVerb("complete");
    if (this.#cancelled || this.onComplete === undefined) {
      throw new JobError("EPERM", `The active block job '${String(this.id)}' cannot be completed`);
    }
    this.onComplete();
    this.#completeRequested = true;
  }

  /**
   * Finalizes the whole transaction (`job-finalize`, only in `pending`): prepare, commit/abort, clean,
   * events, `concluded` (and `null` with auto-dismiss), for every member.
   * @throws {JobError} EPERM verb refused.
   */
  async finalize(): Promise<void> {
    this.checkVerb("finalize");
    await this.#doFinalize();
  }

  /**
   * Removes a concluded job (`job-dismiss`): `concluded → null`; the id is free again.
   * @throws {JobError} EPERM verb refused.
   */
  dismiss(): void {
    this.checkVerb("dismiss");
    this.#doDismiss();
  }

  // ---------------------------------------------------------------- verbs (library, idempotent)

  /**
   * Cancels the job; does nothing if it is already over or the same (or a stronger) cancel was requested.
   * Unlike `block-job-cancel`, a user-paused job is cancelled too. Drivers may upgrade a soft cancel.
   */
  cancel(opts?: { force?: boolean }): void {
    if (!verbAllowed("cancel", this.#status)) return;
    const force = opts?.force ?? false;
    if (this.#cancelled && (this.#forceCancel || !force)) return;
    this.#cancel(force);
  }

  /**
   * Completes a READY job; does nothing if completion or cancellation was already requested or the work is
   * over. @throws {JobError} EPERM when the job is not READY (or cannot be completed at all).
   */
  complete(): void {
    if (this.#completeRequested || this.#cancelled || this.#deferred || this.isCompleted()) return;
    this.userComplete();
  }

  // ---------------------------------------------------------------- queries

  /** The `query-jobs` entry of this job. */
  info(opts?: QueryOptions): JobInfo {
    const info: JobInfo = {
      id: String(this.id),
      type: this.type,
      status: this.#status,
      "current-progress": this.#current,
      "total-progress": this.#total,
    };
    if (this.#ret !== undefined) info.error = this.#ret.message;
    if (opts?.extensions === true) Object.assign(info, this.extensionInfo());
    return info;
  }

  /** The `x-blk-` fields (phase, ETA in seconds). */
  protected extensionInfo(): JobInfoExtensions {
    const out: JobInfoExtensions = {};
    if (this.#phase !== undefined) out["x-blk-phase"] = this.#phase;
    const remaining = this.#total - this.#current;
    if (this.#started && !this.isCompleted()) {
      const elapsed = this.clock.now() - this.#startNs;
      if (remaining <= 0) out["x-blk-eta-seconds"] = 0;
      else if (this.#current > 0 && elapsed > 0) {
        out["x-blk-eta-seconds"] = (remaining * elapsed) / this.#current / 1e9;
      }
    }
    return out;
  }

  // ---------------------------------------------------------------- internals

  #shouldPause(): boolean {
    return this.#pauseCount > 0;
  }

  #transition(to: JobStatus): void {
    const from = this.#status;
    if (!transitionAllowed(from, to)) {
      throw new Error(`job ${String(this.id)}: invalid status transition ${from} -> ${to}`);
    }
    this.#status = to;
    if (this.id !== null && from !== to) {
      this.manager._emit({ event: "JOB_STATUS_CHANGE", data: { id: this.id, status: to } });
    }
    if (to === "null") this.manager._unregister(this);
    if (this.#statusWaiters.length > 0) {
      const waiters = this.#statusWaiters;
      this.#statusWaiters = waiters.filter((w) => w.status !== to && to !== "null");
      for (const w of waiters) if (w.status === to || to === "null") w.resolve(w.status === to);
    }
  }

  #park(timeoutNs: number | undefined, onWake: () => Promise<void> | void): Promise<void> {
    this.#busy = false;
    return new Promise<void>((resolve) => {
      const parked: Parked = {
        wake: () => resolve(onWake()),
        timer: undefined,
      };
      this.#parked = parked;
      if (timeoutNs !== undefined) parked.timer = this.#armTimer(timeoutNs);
    });
  }

  /**
   * The wake-up timer of a sleep. On the process clock a zero-delay sleep (the yield of an unlimited job
   * after each chunk, QEMU's `job_sleep_ns(0)`) waits for one event-loop turn: `setTimeout` would wait at
   * least 1 ms, which alone capped stream and commit at 512 KiB per millisecond. Other clocks (tests) get
   * the timer as asked.
   */
  #armTimer(ns: number): { cancel(): void } {
    if (ns <= 0 && this.clock === systemClock) {
      const h = setImmediate(() => this.enter());
      return { cancel: () => clearImmediate(h) };
    }
    return this.clock.setTimer(() => this.enter(), Math.max(0, ns));
  }

  #background(p: Promise<void>): void {
    p.catch((e: unknown) => {
      queueMicrotask(() => {
        throw e;
      });
    });
  }

  #cancelAsync(force: boolean): void {
    const effective = this.onCancel === undefined ? true : this.onCancel(force);
    if (this.#userPaused) {
      this.onUserResume();
      this.#userPaused = false;
      this.#pauseCount--;
    }
    if (effective || !this.#deferred) {
      this.#cancelled = true;
      this.#forceCancel ||= effective;
    }
  }

  #cancel(force: boolean): void {
    if (this.#status === "concluded") {
      this.#doDismiss();
      return;
    }
    this.#cancelAsync(force);
    if (!this.#started) {
      this.#background(this.#completed());
    } else if (this.#deferred) {
      if (this.isCancelled()) this.#background(this.#txnAbort());
    } else {
      this.enter();
    }
  }

  #updateRc(): void {
    if (this.#ret === undefined && this.isCancelled()) this.#ret = errnoError("ECANCELED");
    if (this.#ret !== undefined) this.#transition("aborting");
  }

  async #completed(): Promise<void> {
    this.#updateRc();
    if (this.#ret !== undefined) await this.#txnAbort();
    else await this.#txnSuccess();
  }

  async #txnSuccess(): Promise<void> {
    const txn = this.txn;
    this.#transition("waiting");
    for (const other of txn.jobs) if (!other.isCompleted()) return;
    for (const other of [...txn.jobs]) {
      other.#transition("pending");
      if (!other.autoFinalize) other.notifyPending();
    }
    if (txn.jobs.every((j) => j.autoFinalize)) await this.#doFinalize();
  }

  async #doFinalize(): Promise<void> {
    let failed = false;
    for (const other of [...this.txn.jobs]) {
      if (other.#ret === undefined) {
        try {
          await other.prepare();
        } catch (e) {
          other.#ret = toError(e);
        }
        other.#updateRc();
      }
      if (other.#ret !== undefined) {
        failed = true;
        break;
      }
    }
    if (failed) {
      await this.#txnAbort();
      return;
    }
    for (const other of [...this.txn.jobs]) await other.#finalizeSingle();
  }

  async #txnAbort(): Promise<void> {
    const txn = this.txn;
    if (!txn._startAbort()) return;
    for (const other of [...txn.jobs]) if (other !== this) other.#cancelAsync(true);
    for (let other = txn.jobs[0]; other !== undefined; other = txn.jobs[0]) {
      if (!other.isCompleted()) {
        if (other.#started) {
          other.enter();
          await other.#runDone;
          await other.#exit();
        } else {
          await other.#completed();
        }
      }
      await other.#finalizeSingle();
    }
  }

  async #finalizeSingle(): Promise<void> {
    this.#updateRc();
    const failed = this.#ret !== undefined;
    try {
      await (failed ? this.abort() : this.commit());
    } catch {
      // commit/abort must not fail (QEMU's are void); nothing sensible to do with an error here
    }
    try {
      await this.clean();
    } catch {
      // as above
    }
    if (this.#started) {
      if (this.isCancelled()) this.notifyCancelled();
      else this.notifyCompleted();
    }
    this.txn._remove(this);
    this.#transition("concluded");
    this.#resolveOutcome(this.#computeOutcome());
    if (this.autoDismiss || !this.#started) this.#doDismiss();
  }

  #computeOutcome(): JobOutcome {
    if (this.#forceCancel) return { status: "cancelled", consistent: false };
    if (this.#ret !== undefined) return { status: "failed", error: this.#ret };
    if (this.#cancelled) return { status: "cancelled", consistent: true };
    return { status: "completed" };
  }

  #doDismiss(): void {
    this.#busy = false;
    this.#paused = false;
    this.#deferred = true;
    this.txn._remove(this);
    this.#transition("null");
  }

  /** @internal The error message QEMU would report (`error` members), if the job failed. */
  protected get errorMessage(): string | undefined {
    return this.#ret?.message;
  }
}
