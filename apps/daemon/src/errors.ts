/**
 * Error helpers: every failure a handler raises becomes a {@link QmpError} with QEMU's class and text.
 * `BlkError`s, `ThrottleError`s and plain errors carry QEMU's message already and become GenericError;
 * `JobError`s keep their class (`DeviceNotActive` for `block-job-*` lookups).
 */
import { QmpError, type QmpErrorClass, toQmpError } from "@blk/qmp";

/**
 * `@blk/jobs`' brand of its `JobError`s (what its `isJobError` tests), read here so that the error path
 * does not load the jobs package in a daemon that has run no job.
 */
const kJobError = Symbol.for("@blk/job-error");

const isJobError = (e: unknown): e is Error & { qmpClass: QmpErrorClass } =>
  e instanceof Error && kJobError in e && typeof (e as { qmpClass?: unknown }).qmpClass === "string";

/** A GenericError with `desc`. */
export const generic = (desc: string, cause?: unknown): QmpError =>
  new QmpError("GenericError", desc, cause === undefined ? undefined : { cause });

/** Any thrown value as the QmpError a client sees. */
export function asQmpError(e: unknown): QmpError {
  if (e instanceof QmpError) return e;
  if (isJobError(e)) return new QmpError(e.qmpClass, e.message, { cause: e });
  return toQmpError(e);
}

/** Runs `fn`, rethrowing failures as {@link asQmpError} does. */
export async function qmpErrors<T>(fn: () => Promise<T> | T): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    throw asQmpError(e);
  }
}
