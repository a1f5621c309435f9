/**
 * The vocabulary of QEMU's job framework (`qapi/job.json`, `qapi/block-core.json`, QEMU 7.2): job types,
 * statuses, verbs, the status transition table and the verb table, error policies and the event and
 * query shapes. See `spec/jobs.md` §1.
 */

/** QEMU's `JobType`. Block jobs are `commit`, `stream`, `mirror` and `backup`. */
export type JobType =
  | "commit"
  | "stream"
  | "mirror"
  | "backup"
  | "create"
  | "amend"
  | "snapshot-load"
  | "snapshot-save"
  | "snapshot-delete";

/**
 * QEMU's `JobStatus`. `undefined` is never visible; `null` is only seen in the last `JOB_STATUS_CHANGE`.
 */
export type JobStatus =
  | "undefined"
  | "created"
  | "running"
  | "paused"
  | "ready"
  | "standby"
  | "waiting"
  | "pending"
  | "aborting"
  | "concluded"
  | "null";

/** QEMU's `JobVerb` (7.2 has no `change`). */
export type JobVerb = "cancel" | "pause" | "resume" | "set-speed" | "complete" | "finalize" | "dismiss";

/** Every status, in QEMU's enum order. */
export const JOB_STATUSES: readonly JobStatus[] = [
  "undefined",
  "created",
  "running",
  "paused",
  "ready",
  "standby",
  "waiting",
  "pending",
  "aborting",
  "concluded",
  "null",
];

/** Every verb, in QEMU's enum order. */
export const JOB_VERBS: readonly JobVerb[] = [
  "cancel",
  "pause",
  "resume",
  "set-speed",
  "complete",
  "finalize",
  "dismiss",
];

/**
 * Allowed status transitions (QEMU's `JobSTT`): `JOB_TRANSITIONS[from]` lists every allowed `to`.
 * Any other transition is a programming error.
 */
export const JOB_TRANSITIONS: Readonly<Record<JobStatus, readonly JobStatus[]>> = {
  undefined: ["created"],
  created: ["running", "aborting", "null"],
  running: ["paused", "ready", "waiting", "aborting"],
  paused: ["running"],
  ready: ["standby", "waiting", "aborting"],
  standby: ["ready"],
  waiting: ["pending", "aborting"],
  pending: ["aborting", "concluded"],
  aborting: ["aborting", "concluded"],
  concluded: ["null"],
  null: [],
};

/** The statuses in which each verb is accepted (QEMU's `JobVerbTable`). */
export const JOB_VERB_TABLE: Readonly<Record<JobVerb, readonly JobStatus[]>> = {
  cancel: ["created", "running", "paused", "ready", "standby", "waiting", "pending"],
  pause: ["created", "running", "paused", "ready", "standby"],
  resume: ["created", "running", "paused", "ready", "standby"],
  "set-speed": ["created", "running", "paused", "ready", "standby"],
  complete: ["ready", "standby"],
  finalize: ["pending"],
  dismiss: ["concluded"],
};

/** True when `verb` is accepted in `status` (QEMU's verb table). */
export function verbAllowed(verb: JobVerb, status: JobStatus): boolean {
  return JOB_VERB_TABLE[verb].includes(status);
}

/** True when `from → to` is in QEMU's transition table. */
export function transitionAllowed(from: JobStatus, to: JobStatus): boolean {
  return JOB_TRANSITIONS[from].includes(to);
}

/** QEMU's `BlockdevOnError` as jobs use it (`auto` behaves as `enospc` for jobs). */
export type BlockdevOnError = "report" | "ignore" | "enospc" | "stop" | "auto";

/** QEMU's `BlockErrorAction`. */
export type BlockErrorAction = "ignore" | "report" | "stop";

/** QEMU's `IoOperationType`. */
export type IoOperationType = "read" | "write";

/** QEMU's `BlockDeviceIoStatus` as block jobs report it. */
export type BlockJobIoStatus = "ok" | "failed" | "nospace";

/** `JOB_STATUS_CHANGE` data. */
export interface JobStatusChangeData {
  id: string;
  status: JobStatus;
}

/** `BLOCK_JOB_READY` and `BLOCK_JOB_CANCELLED` data. */
export interface BlockJobProgressData {
  type: JobType;
  device: string;
  len: number;
  offset: number;
  speed: number;
}

/** `BLOCK_JOB_COMPLETED` data: `error` is present exactly when the job failed. */
export interface BlockJobCompletedData extends BlockJobProgressData {
  error?: string;
}

/** `BLOCK_JOB_PENDING` data. */
export interface BlockJobPendingData {
  type: JobType;
  id: string;
}

/** `BLOCK_JOB_ERROR` data. */
export interface BlockJobErrorData {
  device: string;
  operation: IoOperationType;
  action: BlockErrorAction;
}

/**
 * The events a {@link JobManager} emits, one-to-one with QEMU's QMP events (name in `event`, members in
 * `data`, exactly as in the 7.2 schema). A QMP server adds the timestamp.
 */
export type JobEvent =
  | { event: "JOB_STATUS_CHANGE"; data: JobStatusChangeData }
  | { event: "BLOCK_JOB_READY"; data: BlockJobProgressData }
  | { event: "BLOCK_JOB_PENDING"; data: BlockJobPendingData }
  | { event: "BLOCK_JOB_COMPLETED"; data: BlockJobCompletedData }
  | { event: "BLOCK_JOB_CANCELLED"; data: BlockJobProgressData }
  | { event: "BLOCK_JOB_ERROR"; data: BlockJobErrorData };

/** The name of a {@link JobEvent}. */
export type JobEventName = JobEvent["event"];

/** blk extensions to the query shapes (only with `{ extensions: true }`). */
export interface JobInfoExtensions {
  /** The phase the job reports (driver-defined, e.g. `"copy"`, `"scan"`). */
  "x-blk-phase"?: string;
  /**
   * Estimated seconds until `current-progress` reaches `total-progress`, when it can be estimated (mirror:
   * until the dirty bitmap is clean, from the copy and dirty rates; absent while it does not converge).
   */
  "x-blk-eta-seconds"?: number;
  /** Mirror: the copy mode in effect (`background` until an `x-blk-copy-mode: auto` job switched). */
  "x-blk-copy-mode"?: "background" | "write-blocking";
  /** Mirror: bytes per second newly dirtied by guest writes over the last measurement window. */
  "x-blk-dirty-rate"?: number;
  /** Mirror: bytes per second the background copy completed over the last measurement window. */
  "x-blk-copy-rate"?: number;
}

/** One entry of `query-jobs` (QEMU's `JobInfo`). */
export interface JobInfo extends JobInfoExtensions {
  id: string;
  type: JobType;
  status: JobStatus;
  "current-progress": number;
  "total-progress": number;
  error?: string;
}

/** One entry of `query-block-jobs` (QEMU 7.2's `BlockJobInfo`). */
export interface BlockJobInfo extends JobInfoExtensions {
  type: string;
  device: string;
  len: number;
  offset: number;
  busy: boolean;
  paused: boolean;
  speed: number;
  "io-status": BlockJobIoStatus;
  ready: boolean;
  status: JobStatus;
  "auto-finalize": boolean;
  "auto-dismiss": boolean;
  error?: string;
}

/** Options of the query methods. */
export interface QueryOptions {
  /** Add the `x-blk-` fields (phase, ETA). Default false, so the answer equals QEMU's. */
  extensions?: boolean;
}

/**
 * The one awaitable result of a job for library users. `cancelled` with `consistent: true` is a soft
 * cancel that finished cleanly (QEMU reports it with `BLOCK_JOB_COMPLETED`, e.g. a READY mirror).
 */
export type JobOutcome =
  | { status: "completed" }
  | { status: "cancelled"; consistent: boolean }
  | { status: "failed"; error: Error };
