/**
 * Job commands over {@link JobManager}: `query-jobs`, `query-block-jobs`, `job-*` and `block-job-*`
 * (spec/qmp.md §3.3). The verbs work on any job in the manager: the block jobs that block-jobs.ts, drive.ts
 * and `transaction` start, `create` jobs, and jobs other code adds to `daemon.jobs`.
 */
import { type CommandDefinition, defineCommand, q } from "@blk/qmp";
import type { DaemonState } from "../context.ts";
import { qmpErrors } from "../errors.ts";

const IdArgs = q.object({ id: q.str() });
const DeviceArgs = q.object({ device: q.str() });
const CancelArgs = q.object({ device: q.str(), force: q.optional(q.bool(), false) });
const SpeedArgs = q.object({ device: q.str(), speed: q.int() });
/** blk extension of `query-jobs` / `query-block-jobs`: add the jobs' `x-blk-` fields (rates, ETA, mode). */
const QueryArgs = q.object({ "x-blk-extensions": q.optional(q.bool(), false) });

/** The job commands. */
export function jobCommands(state: DaemonState): CommandDefinition<never, unknown>[] {
  const jobs = state.jobs;
  const byId = (name: string, fn: (a: { id: string }) => void | Promise<void>) =>
    defineCommand({
      name,
      args: IdArgs,
      handler: async (args) => {
        await qmpErrors(() => fn(args));
        return {};
      },
    });
  const byDevice = (name: string, fn: (a: { device: string }) => void) =>
    defineCommand({
      name,
      args: DeviceArgs,
      handler: async (args) => {
        await qmpErrors(() => fn(args));
        return {};
      },
    });
  return [
    defineCommand({
      name: "query-jobs",
      args: QueryArgs,
      handler: (args) => jobs.queryJobs({ extensions: args["x-blk-extensions"] }),
    }),
    defineCommand({
      name: "query-block-jobs",
      args: QueryArgs,
      handler: (args) => jobs.queryBlockJobs({ extensions: args["x-blk-extensions"] }),
    }),
    byId("job-pause", (a) => jobs.jobPause(a)),
    byId("job-resume", (a) => jobs.jobResume(a)),
    byId("job-cancel", (a) => jobs.jobCancel(a)),
    byId("job-complete", (a) => jobs.jobComplete(a)),
    byId("job-finalize", (a) => jobs.jobFinalize(a)),
    byId("job-dismiss", (a) => jobs.jobDismiss(a)),
    defineCommand({
      name: "block-job-set-speed",
      args: SpeedArgs,
      handler: async (args) => {
        await qmpErrors(() => jobs.blockJobSetSpeed(args));
        return {};
      },
    }),
    defineCommand({
      name: "block-job-cancel",
      args: CancelArgs,
      handler: async (args) => {
        await qmpErrors(() => jobs.blockJobCancel(args));
        return {};
      },
    }),
    byDevice("block-job-pause", (a) => jobs.blockJobPause(a)),
    byDevice("block-job-resume", (a) => jobs.blockJobResume(a)),
    byDevice("block-job-complete", (a) => jobs.blockJobComplete(a)),
    byId("block-job-finalize", (a) => jobs.blockJobFinalize(a)),
    byId("block-job-dismiss", (a) => jobs.blockJobDismiss(a)),
  ] as unknown as CommandDefinition<never, unknown>[];
}
