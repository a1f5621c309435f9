/** QAPI types and checks shared by the job commands (block-jobs.ts, drive.ts) and `transaction`. */
import { BlockNode } from "@blk/core";
import { checkNodeNotBusy } from "@blk/jobs";
import { q } from "@blk/qmp";
import type { DaemonState } from "../context.ts";
import { asQmpError, generic } from "../errors.ts";

/** `MirrorSyncMode` (mirror and backup). */
export const SyncMode = q.enum(["top", "full", "none", "incremental", "bitmap"], { name: "MirrorSyncMode" });
/** `BlockdevOnError`. */
export const OnError = q.enum(["report", "ignore", "enospc", "stop", "auto"], { name: "BlockdevOnError" });
/** `MirrorCopyMode`. */
export const CopyMode = q.enum(["background", "write-blocking"], { name: "MirrorCopyMode" });
/** `BitmapSyncMode`. */
export const BitmapMode = q.enum(["on-success", "never", "always"], { name: "BitmapSyncMode" });

/** `x-perf` of the backup commands (`BackupPerf`). */
export const BackupPerf = q.object(
  {
    "use-copy-range": q.optional(q.bool()),
    "max-workers": q.optional(q.int()),
    "max-chunk": q.optional(q.int64()),
  },
  { name: "BackupPerf" },
);

/**
 * The members of QEMU's `BackupCommon` after `sync`, in its order, which `blockdev-backup` and
 * `drive-backup` share.
 */
export const BACKUP_COMMON_TAIL = {
  speed: q.optional(q.int()),
  bitmap: q.optional(q.str()),
  "bitmap-mode": q.optional(BitmapMode),
  compress: q.optional(q.bool()),
  "on-source-error": q.optional(OnError),
  "on-target-error": q.optional(OnError),
  "auto-finalize": q.optional(q.bool()),
  "auto-dismiss": q.optional(q.bool()),
  "filter-node-name": q.optional(q.str()),
  "x-perf": q.optional(BackupPerf),
} as const;

/** QEMU's `bdrv_lookup_bs(device, device)`. @throws {QmpError} `Cannot find device='X' nor node-name='X'` */
export function lookupDevice(state: DaemonState, device: string): BlockNode {
  const node = state.graph.find(device);
  if (node === undefined) throw generic(`Cannot find device='${device}' nor node-name='${device}'`);
  return node;
}

/** QEMU's `qmp_get_root_bs`: only BlockBackends (exports) may sit above the node. */
export function checkRoot(node: BlockNode): void {
  if (!node.parents.every((e) => !(e.parent instanceof BlockNode) && e.parent.type === "block-backend"))
    throw generic("Need a root block node");
}

/**
 * QEMU's `bdrv_op_is_blocked` for a job's source or target: a node a block job holds.
 * @throws {QmpError} `Node 'X' is busy: block device is in use by block job: TYPE`
 */
export function checkNotBusy(node: BlockNode): void {
  try {
    checkNodeNotBusy(node);
  } catch (e) {
    throw asQmpError(e);
  }
}

/**
 * The op-blocker checks of QEMU's `backup_job_create` (source, then target), which `@blk/jobs`' backup does
 * not make: a node held by another job (a mirror's source or target) is refused.
 */
export function checkBackupNodes(
  state: DaemonState,
  args: { device: string; target: string; compress?: boolean | undefined },
): void {
  const source = state.graph.find(args.device);
  const target = state.graph.find(args.target);
  // QEMU reports these first; the job driver has the same checks with QEMU's messages.
  if (source === undefined || target === undefined || source === target || args.compress === true) return;
  checkNotBusy(source);
  checkNotBusy(target);
}

/** Drops members the client did not send, so the job drivers apply QEMU's defaults themselves. */
export function given<T extends object>(args: T): T {
  return Object.fromEntries(Object.entries(args).filter(([, v]) => v !== undefined)) as T;
}
