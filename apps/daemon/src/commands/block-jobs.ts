/**
 * Commands that start block jobs: `blockdev-mirror`, `blockdev-backup`, `block-commit` and `block-stream`,
 * plus `drive-mirror` and `drive-backup` from drive.ts (spec/qmp.md §3.3 argument
 * tables, 7.2 defaults). The job drivers live in `@blk/jobs`; these handlers only validate the arguments
 * with QEMU's wording and hand them over. Job events reach QMP through the daemon's JobManager listener,
 * and the handlers return after the job is running, as QEMU does.
 */
import { backup, commit, mirror, stream } from "@blk/jobs";
import { type CommandDefinition, defineCommand, q } from "@blk/qmp";
import type { DaemonState } from "../context.ts";
import { qmpErrors } from "../errors.ts";
import { driveCommands } from "./drive.ts";
import {
  BACKUP_COMMON_TAIL,
  CopyMode,
  checkBackupNodes,
  checkRoot,
  given,
  lookupDevice,
  OnError,
  SyncMode,
} from "./job-args.ts";

const BlockdevMirror = q.object(
  {
    "job-id": q.optional(q.str()),
    device: q.str(),
    target: q.str(),
    replaces: q.optional(q.str()),
    sync: SyncMode,
    speed: q.optional(q.int()),
    granularity: q.optional(q.uint32()),
    "buf-size": q.optional(q.int()),
    "on-source-error": q.optional(OnError),
    "on-target-error": q.optional(OnError),
    "filter-node-name": q.optional(q.str()),
    "copy-mode": q.optional(CopyMode),
    "auto-finalize": q.optional(q.bool()),
    "auto-dismiss": q.optional(q.bool()),
    // blk extension: `auto` switches from background to write-blocking when the guest outruns the copy.
    "x-blk-copy-mode": q.optional(
      q.enum(["background", "write-blocking", "auto"], { name: "XBlkMirrorCopyMode" }),
    ),
  },
  { name: "blockdev-mirror-arg" },
);

/** `blockdev-backup`'s arguments (also a `transaction` action). */
export const BlockdevBackup = q.object(
  {
    "job-id": q.optional(q.str()),
    device: q.str(),
    target: q.str(),
    sync: SyncMode,
    ...BACKUP_COMMON_TAIL,
    // blk extensions: old data buffered in memory so guest writes need not wait for the target (bytes;
    // 0 = QEMU's behaviour), and a cap on how long a guest write may wait for copy-before-write (ms).
    "x-blk-cbw-buffer-size": q.optional(q.int()),
    "x-blk-max-guest-stall": q.optional(q.int()),
  },
  { name: "BlockdevBackup" },
);

const BlockCommit = q.object(
  {
    "job-id": q.optional(q.str()),
    device: q.str(),
    "base-node": q.optional(q.str()),
    base: q.optional(q.str()),
    "top-node": q.optional(q.str()),
    top: q.optional(q.str()),
    "backing-file": q.optional(q.str()),
    speed: q.optional(q.int()),
    "on-error": q.optional(OnError),
    "filter-node-name": q.optional(q.str()),
    "auto-finalize": q.optional(q.bool()),
    "auto-dismiss": q.optional(q.bool()),
  },
  { name: "block-commit-arg" },
);

const BlockStream = q.object(
  {
    "job-id": q.optional(q.str()),
    device: q.str(),
    base: q.optional(q.str()),
    "base-node": q.optional(q.str()),
    "backing-file": q.optional(q.str()),
    bottom: q.optional(q.str()),
    speed: q.optional(q.int()),
    "on-error": q.optional(OnError),
    "filter-node-name": q.optional(q.str()),
    "auto-finalize": q.optional(q.bool()),
    "auto-dismiss": q.optional(q.bool()),
  },
  { name: "block-stream-arg" },
);

/** `blockdev-mirror`, `blockdev-backup`, `block-commit`, `block-stream`, `drive-mirror`, `drive-backup`. */
export function blockJobCommands(state: DaemonState): CommandDefinition<never, unknown>[] {
  return [
    defineCommand({
      name: "blockdev-mirror",
      args: BlockdevMirror,
      handler: async (args) => {
        // QEMU's qmp_get_root_bs comes first (before the job's busy checks).
        checkRoot(lookupDevice(state, args.device));
        await qmpErrors(() => mirror(state.jobs, state.graph, given(args)));
        return {};
      },
    }),
    defineCommand({
      name: "blockdev-backup",
      args: BlockdevBackup,
      handler: async (args) => {
        checkBackupNodes(state, args);
        await qmpErrors(() => backup(state.jobs, { graph: state.graph, ...given(args) }));
        return {};
      },
    }),
    defineCommand({
      name: "block-commit",
      args: BlockCommit,
      handler: async (args) => {
        await qmpErrors(() => commit(state.jobs, state.graph, given(args)));
        return {};
      },
    }),
    defineCommand({
      name: "block-stream",
      args: BlockStream,
      handler: async (args) => {
        await qmpErrors(() => stream(state.jobs, state.graph, given(args)));
        return {};
      },
    }),
    ...driveCommands(state),
  ] as unknown as CommandDefinition<never, unknown>[];
}
