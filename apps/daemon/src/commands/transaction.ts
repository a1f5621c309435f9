/**
 * `transaction` (spec/qmp.md §3.5, jobs.md §1.11): actions `abort`, `block-dirty-bitmap-add/-remove/-clear/
 * -enable/-disable/-merge`, `blockdev-backup`, `drive-backup`, `blockdev-snapshot-sync`, `blockdev-snapshot`;
 * `properties.completion-mode` `individual` (default) or `grouped` (the backup jobs share one
 * {@link JobTxn}; every other action refuses it).
 *
 * All or nothing: actions are prepared in order; if one fails, the prepared ones are aborted in reverse
 * order (a bitmap added is removed, a cleared or merged one gets its bits back, an enabled or disabled one
 * its state, a removal is undone, backup jobs are cancelled before they start, snapshots give the parents
 * back and drop the overlay) and the command fails with that action's error. Otherwise all commit in order
 * (backup jobs start: `running`, then `paused` while held) and clean up in reverse order (the jobs resume).
 */
import type { BlockNode, DirtyBitmap } from "@blk/core";
import { createBackupJob, JobTxn } from "@blk/jobs";
import {
  BlockDirtyBitmap,
  BlockDirtyBitmapOrStr,
  type CommandDefinition,
  defineCommand,
  type QapiType,
  q,
} from "@blk/qmp";
import type { DaemonState } from "../context.ts";
import { asQmpError, generic, qmpErrors } from "../errors.ts";
import { jobAction, type PreparedAction } from "./actions.ts";
import { BlockdevBackup } from "./block-jobs.ts";
import { DriveBackup, prepareDriveBackup } from "./drive.ts";
import { checkBackupNodes, given } from "./job-args.ts";
import { lookupNode } from "./lookup.ts";
import { BlockdevSnapshot, BlockdevSnapshotSync, prepareSnapshot, prepareSnapshotSync } from "./snapshots.ts";

// ------------------------------------------------------------------------------------------------------
// Schemas (`blockdev-backup`'s comes from block-jobs.ts)

const BitmapAdd = q.object(
  {
    node: q.str(),
    name: q.str(),
    granularity: q.optional(q.uint32()),
    persistent: q.optional(q.bool()),
    disabled: q.optional(q.bool()),
  },
  { name: "BlockDirtyBitmapAdd" },
);
const BitmapMerge = q.object(
  { node: q.str(), target: q.str(), bitmaps: q.list(BlockDirtyBitmapOrStr) },
  { name: "BlockDirtyBitmapMerge" },
);

const ActionKind = q.enum(
  [
    "abort",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-backup",
    "blockdev-snapshot",
    "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-sync",
    "drive-backup",
  ],
  { name: "TransactionActionKind" },
);
/** A simple union's variant: the action's arguments under `data`. */
const wrap = <T, I>(t: QapiType<T, I>) => q.object({ data: t });
const TransactionAction = q.union({
  base: q.object({ type: ActionKind }),
  discriminator: "type",
  variants: {
    abort: wrap(q.object({}, { name: "Abort" })),
    "block-dirty-bitmap-add": wrap(BitmapAdd),
    "block-dirty-bitmap-remove": wrap(BlockDirtyBitmap),
    "block-dirty-bitmap-clear": wrap(BlockDirtyBitmap),
    "block-dirty-bitmap-enable": wrap(BlockDirtyBitmap),
    "block-dirty-bitmap-disable": wrap(BlockDirtyBitmap),
    "block-dirty-bitmap-merge": wrap(BitmapMerge),
    "blockdev-backup": wrap(BlockdevBackup),
    "blockdev-snapshot": wrap(BlockdevSnapshot),
    "blockdev-snapshot-sync": wrap(BlockdevSnapshotSync),
    "drive-backup": wrap(DriveBackup),
  },
  name: "TransactionAction",
});
const CompletionMode = q.enum(["individual", "grouped"], { name: "ActionCompletionMode" });
const TransactionArgs = q.object(
  {
    actions: q.list(TransactionAction),
    properties: q.optional(
      q.object({ "completion-mode": q.optional(CompletionMode) }, { name: "TransactionProperties" }),
    ),
  },
  { name: "transaction-arg" },
);

// ------------------------------------------------------------------------------------------------------
// Actions

interface Ctx {
  state: DaemonState;
  /** The shared job transaction in `grouped` mode. */
  txn: JobTxn | undefined;
  type: string;
}

/** QEMU's `action_check_completion_mode`. */
function checkCompletionMode(ctx: Ctx): void {
  if (ctx.txn !== undefined)
    throw generic(`Action '${ctx.type}' does not support Transaction property completion-mode = grouped`);
}

/** QEMU's `block_dirty_bitmap_lookup`. */
function lookupBitmap(state: DaemonState, node: string, name: string): DirtyBitmap {
  const bs = state.graph.find(node);
  if (bs === undefined) throw generic(`Node '${node}' not found`);
  const bitmap = bs.getBitmap(name);
  if (bitmap === undefined) throw generic(`Dirty bitmap '${name}' not found`);
  return bitmap;
}

const noop = (): void => {};

type Data = Record<string, unknown>;

async function prepareBitmapAdd(ctx: Ctx, d: ReturnType<typeof BitmapAdd.parse>): Promise<PreparedAction> {
  checkCompletionMode(ctx);
  if (d.name === "") throw generic("Bitmap name cannot be empty");
  const node: BlockNode = lookupNode(ctx.state, d.node, d.node);
  const bitmap = await qmpErrors(() =>
    node.createBitmap({
      name: d.name,
      ...(d.granularity === undefined ? {} : { granularity: d.granularity }),
      persistent: d.persistent ?? false,
      disabled: d.disabled ?? false,
    }),
  );
  return {
    commit: noop,
    abort: async () => {
      bitmap.busy = false;
      await bitmap.remove().catch(() => {});
    },
  };
}

function prepareBitmapState(ctx: Ctx, d: { node: string; name: string }, enable: boolean): PreparedAction {
  checkCompletionMode(ctx);
  const bitmap = lookupBitmap(ctx.state, d.node, d.name);
  const was = bitmap.disabled;
  qmpErrorsSync(() => (enable ? bitmap.enable() : bitmap.disable()));
  return {
    commit: noop,
    abort: () => {
      bitmap.disabled = was;
    },
  };
}

type SavedBits = ReturnType<DirtyBitmap["clear"]>;

function restoring(bitmap: DirtyBitmap, saved: SavedBits): PreparedAction {
  return { commit: noop, abort: () => bitmap.restore(saved) };
}

function prepareBitmapClear(ctx: Ctx, d: { node: string; name: string }): PreparedAction {
  checkCompletionMode(ctx);
  const bitmap = lookupBitmap(ctx.state, d.node, d.name);
  return restoring(
    bitmap,
    qmpErrorsSync(() => bitmap.clear()),
  );
}

function prepareBitmapMerge(ctx: Ctx, d: ReturnType<typeof BitmapMerge.parse>): PreparedAction {
  checkCompletionMode(ctx);
  const target = lookupBitmap(ctx.state, d.node, d.target);
  const sources = d.bitmaps.map((src) =>
    typeof src === "string"
      ? lookupBitmap(ctx.state, d.node, src)
      : lookupBitmap(ctx.state, src.node, src.name),
  );
  return restoring(
    target,
    qmpErrorsSync(() => target.mergeAll(sources)),
  );
}

function prepareBitmapRemove(ctx: Ctx, d: { node: string; name: string }): PreparedAction {
  checkCompletionMode(ctx);
  const bitmap = lookupBitmap(ctx.state, d.node, d.name);
  qmpErrorsSync(() => {
    if (bitmap.busy) bitmap.check("allow-ro");
    if (bitmap.readonly) bitmap.check("default");
  });
  // Hidden from other operations until the transaction ends.
  bitmap.busy = true;
  return {
    commit: async () => {
      bitmap.busy = false;
      await bitmap
        .remove()
        .catch((e: unknown) => ctx.state.log.warn("bitmap removal failed", { error: String(e) }));
    },
    abort: () => {
      bitmap.busy = false;
    },
  };
}

async function prepareBackup(ctx: Ctx, d: ReturnType<typeof BlockdevBackup.parse>): Promise<PreparedAction> {
  const { state } = ctx;
  checkBackupNodes(state, d);
  const job = await qmpErrors(() =>
    createBackupJob(state.jobs, {
      graph: state.graph,
      ...given(d),
      ...(ctx.txn === undefined ? {} : { txn: ctx.txn }),
    }),
  );
  return jobAction(job);
}

function qmpErrorsSync<T>(fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    throw asQmpError(e);
  }
}

function prepare(ctx: Ctx, data: Data): Promise<PreparedAction> | PreparedAction {
  const { state } = ctx;
  const bm = data as { node: string; name: string };
  switch (ctx.type) {
    case "abort":
      throw generic("Transaction aborted using Abort action");
    case "block-dirty-bitmap-add":
      return prepareBitmapAdd(ctx, data as ReturnType<typeof BitmapAdd.parse>);
    case "block-dirty-bitmap-remove":
      return prepareBitmapRemove(ctx, bm);
    case "block-dirty-bitmap-clear":
      return prepareBitmapClear(ctx, bm);
    case "block-dirty-bitmap-enable":
      return prepareBitmapState(ctx, bm, true);
    case "block-dirty-bitmap-disable":
      return prepareBitmapState(ctx, bm, false);
    case "block-dirty-bitmap-merge":
      return prepareBitmapMerge(ctx, data as ReturnType<typeof BitmapMerge.parse>);
    case "blockdev-backup":
      return prepareBackup(ctx, data as ReturnType<typeof BlockdevBackup.parse>);
    case "drive-backup":
      return prepareDriveBackup(state, data as ReturnType<typeof DriveBackup.parse>, ctx.txn);
    case "blockdev-snapshot-sync":
      checkCompletionMode(ctx);
      return prepareSnapshotSync(state, data as ReturnType<typeof BlockdevSnapshotSync.parse>);
    case "blockdev-snapshot":
      checkCompletionMode(ctx);
      return prepareSnapshot(state, data as ReturnType<typeof BlockdevSnapshot.parse>);
    default:
      checkCompletionMode(ctx);
      throw generic(`Action '${ctx.type}' is not supported by blkd yet`);
  }
}

/**
 * Runs a transaction: prepares every action in order; on the first failure aborts the prepared ones in
 * reverse order and throws that failure; otherwise commits all in order and cleans up in reverse order.
 * @throws {QmpError} the failing action's error, with QEMU's text
 */
async function runTransaction(
  state: DaemonState,
  actions: readonly { type: string; data: Data }[],
  grouped: boolean,
): Promise<void> {
  const txn = grouped ? new JobTxn() : undefined;
  const prepared: PreparedAction[] = [];
  try {
    for (const a of actions) prepared.push(await prepare({ state, txn, type: a.type }, a.data));
  } catch (e) {
    for (const p of [...prepared].reverse()) {
      try {
        await p.abort();
        await p.clean?.();
      } catch (err) {
        state.log.warn("transaction rollback failed", { error: String(err) });
      }
    }
    throw asQmpError(e);
  }
  for (const p of prepared) await p.commit();
  for (const p of [...prepared].reverse()) await p.clean?.();
}

/** `transaction`. */
export function transactionCommands(state: DaemonState): CommandDefinition<never, unknown>[] {
  return [
    defineCommand({
      name: "transaction",
      args: TransactionArgs,
      handler: async (args) => {
        const grouped = args.properties?.["completion-mode"] === "grouped";
        await runTransaction(state, args.actions as unknown as { type: string; data: Data }[], grouped);
        return {};
      },
    }),
  ] as unknown as CommandDefinition<never, unknown>[];
}
