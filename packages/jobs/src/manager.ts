/**
 * The job registry: lists jobs, emits their events, and implements the QMP job commands with QEMU's exact
 * lookups, checks and messages (`job-qmp.c`, `blockdev.c`, 7.2). See `spec/jobs.md` §1.4, §1.6, §1.9.
 */
import { type Clock, systemClock } from "@blk/throttle";
import { BlockJob } from "./block-job.ts";
import { JobError } from "./errors.ts";
import type { Job } from "./job.ts";
import type { BlockJobInfo, JobEvent, JobInfo, QueryOptions } from "./types.ts";

/** Options of a {@link JobManager}. */
export interface JobManagerOptions {
  /** The clock for sleeps, rate limits and ETAs (nanoseconds); default: the process clock. */
  clock?: Clock;
}

/** A listener of {@link JobEvent}s. */
export type JobEventListener = (event: JobEvent) => void;

/**
 * Owns the jobs of one daemon or program: lookups by id, events, queries and QMP commands.
 *
 * The `job*`/`blockJob*` methods are the QMP commands with QEMU's argument names: they throw
 * {@link JobError} with QEMU's message and class (`block-job-*` lookups: DeviceNotActive
 * `Block job 'ID' not found`; `job-*`: GenericError `Job not found`).
 * @example
 * const manager = new JobManager();
 * const off = manager.onEvent((e) => console.log(e.event, e.data));
 * manager.jobPause({ id: "job0" });
 */
export class JobManager {
  /** The clock jobs of this manager use. */
  readonly clock: Clock;
  #jobs: Job[] = [];
  #listeners = new Set<JobEventListener>();

  constructor(opts?: JobManagerOptions) {
    this.clock = opts?.clock ?? systemClock;
  }

  /** Subscribes to events (emitted synchronously, in QEMU's order); returns the unsubscribe function. */
  onEvent(listener: JobEventListener): () => void {
    this.#listeners.add(listener);
    return () => {
      this.#listeners.delete(listener);
    };
  }

  /** The job with this id (not internal, not yet dismissed). */
  get(id: string): Job | undefined {
    return this.#jobs.find((j) => j.id === id);
  }

  /** Every live job, internal ones included, newest first. */
  get jobs(): readonly Job[] {
    return [...this.#jobs].reverse();
  }

  /** @internal Called by the Job constructor. */
  _register(job: Job): void {
    this.#jobs.push(job);
  }

  /** @internal Called when a job reaches `null`. */
  _unregister(job: Job): void {
    const i = this.#jobs.indexOf(job);
    if (i >= 0) this.#jobs.splice(i, 1);
  }

  /** @internal Emits an event to every listener; a throwing listener does not disturb the job. */
  _emit(event: JobEvent): void {
    for (const l of this.#listeners) {
      try {
        l(event);
      } catch (e) {
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }

  /**
   * Force-cancels every job, waits for all of them to conclude and dismisses them (QEMU's
   * `job_cancel_sync_all`, used at daemon shutdown). Concluded jobs are dismissed at once.
   */
  async cancelAll(): Promise<void> {
    for (;;) {
      const live = this.jobs;
      if (live.length === 0) return;
      for (const job of live) {
        if (job.status === "concluded") job.dismiss();
        else job.cancel({ force: true });
      }
      await Promise.all(live.map((j) => j.outcome));
      // a job that was `pending` when the cancel came concludes through its transaction's abort
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  }

  // ---------------------------------------------------------------- lookups

  /** @throws {JobError} ENOENT GenericError `Job not found` */
  findJob(id: string): Job {
    const job = this.get(id);
    if (job === undefined) throw new JobError("ENOENT", "Job not found");
    return job;
  }

  /** @throws {JobError} ENOENT DeviceNotActive `Block job 'ID' not found` (also for non-block jobs) */
  findBlockJob(id: string): BlockJob {
    const job = this.get(id);
    if (!(job instanceof BlockJob)) {
      throw new JobError("ENOENT", `Block job '${id}' not found`, "DeviceNotActive");
    }
    return job;
  }

  // ---------------------------------------------------------------- queries

  /** `query-jobs`: every non-internal job, newest first. */
  queryJobs(opts?: QueryOptions): JobInfo[] {
    return this.jobs.filter((j) => j.id !== null).map((j) => j.info(opts));
  }

  /** `query-block-jobs`: every non-internal block job, newest first. */
  queryBlockJobs(opts?: QueryOptions): BlockJobInfo[] {
    return this.jobs
      .filter((j): j is BlockJob => j.id !== null && j instanceof BlockJob)
      .map((j) => j.blockJobInfo(opts));
  }

  // ---------------------------------------------------------------- job-* commands

  /** `job-pause {id}`. @throws {JobError} */
  jobPause(args: { id: string }): void {
    this.findJob(args.id).pause();
  }
  /** `job-resume {id}`. @throws {JobError} */
  jobResume(args: { id: string }): void {
    this.findJob(args.id).resume();
  }
  /** `job-cancel {id}`: always a forced cancel. @throws {JobError} */
  jobCancel(args: { id: string }): void {
    this.findJob(args.id).userCancel(true);
  }
  /** `job-complete {id}`. @throws {JobError} */
  jobComplete(args: { id: string }): void {
    this.findJob(args.id).userComplete();
  }
  /** `job-finalize {id}`: finalizes the job's whole transaction. @throws {JobError} */
  async jobFinalize(args: { id: string }): Promise<void> {
    await this.findJob(args.id).finalize();
  }
  /** `job-dismiss {id}`. @throws {JobError} */
  jobDismiss(args: { id: string }): void {
    this.findJob(args.id).dismiss();
  }

  // ---------------------------------------------------------------- block-job-* commands

  /** `block-job-pause {device}`. @throws {JobError} */
  blockJobPause(args: { device: string }): void {
    this.findBlockJob(args.device).pause();
  }
  /** `block-job-resume {device}`. @throws {JobError} */
  blockJobResume(args: { device: string }): void {
    this.findBlockJob(args.device).resume();
  }
  /**
   * `block-job-cancel {device, force?}`; a soft cancel of a user-paused job is refused.
   * @throws {JobError} EBUSY `The block job for device 'ID' is currently paused`; EPERM verb refused.
   */
  blockJobCancel(args: { device: string; force?: boolean }): void {
    const job = this.findBlockJob(args.device);
    const force = args.force ?? false;
    if (job.userPaused && !force) {
      throw new JobError("EBUSY", `The block job for device '${args.device}' is currently paused`);
    }
    job.userCancel(force);
  }
  /** `block-job-complete {device}`. @throws {JobError} */
  blockJobComplete(args: { device: string }): void {
    this.findBlockJob(args.device).userComplete();
  }
  /** `block-job-finalize {id}`. @throws {JobError} */
  async blockJobFinalize(args: { id: string }): Promise<void> {
    await this.findBlockJob(args.id).finalize();
  }
  /** `block-job-dismiss {id}`. @throws {JobError} */
  blockJobDismiss(args: { id: string }): void {
    this.findBlockJob(args.id).dismiss();
  }
  /** `block-job-set-speed {device, speed}`. @throws {JobError} */
  blockJobSetSpeed(args: { device: string; speed: number }): void {
    this.findBlockJob(args.device).setSpeed(args.speed);
  }
}
