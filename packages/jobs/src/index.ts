/** Block jobs for blk: QEMU's job state machine, mirror, backup, commit and stream. */

export * from "./backup/index.ts";
export {
  BlockJob,
  type BlockJobOptions,
  type BlockJobType,
  blockJobsHolding,
  checkNodeNotBusy,
  drainedSection,
  type IgnoredError,
  UNLIMITED_BATCH_CHUNKS,
} from "./block-job.ts";
export * from "./commit/index.ts";
export { errnoError, isJobError, JobError, type JobQmpClass, strerror, verbError } from "./errors.ts";
export { isWellFormedId, Job, type JobOptions, JobTxn } from "./job.ts";
export { type JobEventListener, JobManager, type JobManagerOptions } from "./manager.ts";
export {
  MIRROR_AUTO_RATIO,
  MIRROR_AUTO_WINDOW_NS,
  MIRROR_AUTO_WINDOWS,
  MIRROR_DEFAULT_BUF_SIZE,
  MIRROR_MAX_IN_FLIGHT,
  MIRROR_MAX_IO_BYTES,
  type MirrorCopyMode,
  MirrorJob,
  type MirrorJobInit,
  type MirrorOptions,
  type MirrorSyncMode,
  type MirrorXBlkCopyMode,
  mirror,
} from "./mirror/mirror.ts";
export {
  type MirrorGuestWrite,
  type MirrorTopClient,
  MirrorTopState,
  mirrorTopDriver,
} from "./mirror/mirror-top.ts";
export { BLOCK_JOB_SLICE_NS, defaultRateLimit, type RateLimitLike } from "./ratelimit.ts";
export * from "./stream/index.ts";
export {
  type BlockdevOnError,
  type BlockErrorAction,
  type BlockJobCompletedData,
  type BlockJobErrorData,
  type BlockJobInfo,
  type BlockJobIoStatus,
  type BlockJobPendingData,
  type BlockJobProgressData,
  type IoOperationType,
  JOB_STATUSES,
  JOB_TRANSITIONS,
  JOB_VERB_TABLE,
  JOB_VERBS,
  type JobEvent,
  type JobEventName,
  type JobInfo,
  type JobInfoExtensions,
  type JobOutcome,
  type JobStatus,
  type JobStatusChangeData,
  type JobType,
  type JobVerb,
  type QueryOptions,
  transitionAllowed,
  verbAllowed,
} from "./types.ts";
