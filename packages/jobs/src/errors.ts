/**
 * Job errors. A refused verb or a failed job lookup carries QEMU's exact message and the QMP error class
 * QEMU answers with, so a QMP server can forward it as `{"error": {"class": qmpClass, "desc": message}}`.
 */
import { BlkError, type BlkErrorCode, type BlkErrorOptions, strerror } from "@blk/core";

/** The Linux `strerror` text of a code (from `@blk/core`, re-exported for existing users). */
export { strerror };

import type { JobStatus, JobVerb } from "./types.ts";

/** The QMP error classes job commands answer with. */
export type JobQmpClass = "GenericError" | "DeviceNotActive" | "DeviceNotFound";

const kJobError = Symbol.for("@blk/job-error");

/**
 * A {@link BlkError} raised by the job framework for a refused command (wrong state, lookup failure,
 * bad argument). `message` is QEMU's exact `desc`; `qmpClass` is QEMU's error class.
 *
 * Codes: `EPERM` verb refused in this state / already paused / not paused / cannot be completed;
 * `EBUSY` soft `block-job-cancel` of a user-paused job; `ENOENT` job not found; `EINVAL` bad job id or
 * speed; `EEXIST` job id in use.
 * @example
 * try { manager.blockJobComplete({ device: "m0" }); }
 * catch (e) { if (isJobError(e)) reply({ class: e.qmpClass, desc: e.message }); }
 */
export class JobError extends BlkError {
  /** QEMU's QMP error class for this failure. */
  readonly qmpClass: JobQmpClass;
  constructor(
    code: BlkErrorCode,
    message: string,
    qmpClass: JobQmpClass = "GenericError",
    options?: BlkErrorOptions,
  ) {
    super(code, message, options);
    this.qmpClass = qmpClass;
    Object.defineProperty(this, kJobError, { value: true });
  }
  static override [Symbol.hasInstance](v: unknown): boolean {
    return typeof v === "object" && v !== null && kJobError in v;
  }
}

/** True when `v` is a {@link JobError} (of `code`, when given). */
export const isJobError = (v: unknown, code?: BlkErrorCode): v is JobError =>
  v instanceof JobError && (code === undefined || v.code === code);

/** `Job 'ID' in state 'S' cannot accept command verb 'V'` (GenericError, EPERM). */
export function verbError(id: string, status: JobStatus, verb: JobVerb): JobError {
  return new JobError("EPERM", `Job '${id}' in state '${status}' cannot accept command verb '${verb}'`);
}

/**
 * A {@link BlkError} whose message is the plain `strerror` text, as QEMU reports a job that failed with a
 * bare errno (e.g. `BLOCK_JOB_COMPLETED {error: "Input/output error"}`).
 */
export function errnoError(code: BlkErrorCode, options?: BlkErrorOptions): BlkError {
  return new BlkError(code, strerror(code), options);
}
