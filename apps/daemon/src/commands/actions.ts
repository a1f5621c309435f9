/**
 * Transactionable actions: each `prepare` does the work (or fails with QEMU's message, leaving nothing
 * behind) and returns how to finish it. `transaction` prepares its actions in order, then commits all and
 * cleans up in order, or aborts the prepared ones in reverse order; the plain commands run one action
 * the same way.
 */
import type { BlockNode } from "@blk/core";

/** A prepared action (QEMU's `TransactionActionDrv` after `prepare`). */
export interface PreparedAction {
  /** Makes the action final; must not fail. */
  commit(): void | Promise<void>;
  /** Undoes `prepare`; must not fail. */
  abort(): void | Promise<void>;
  /** Runs after `commit` or `abort`; must not fail. */
  clean?(): void | Promise<void>;
}

/** What {@link jobAction} needs of a created job. */
interface PausableJob {
  holdPause(): void;
  releasePause(): void;
  start(): void;
  cancel(options: { force: boolean }): void;
  readonly outcome: Promise<unknown>;
}

/**
 * The action of a job created by `prepare`: held paused until the transaction commits, which starts it;
 * an abort cancels it, waits for it to end, then runs `afterAbort` (e.g. dropping a target it created).
 */
export function jobAction(job: PausableJob, afterAbort?: () => Promise<void>): PreparedAction {
  job.holdPause();
  let released = false;
  const release = (): void => {
    if (released) return;
    released = true;
    try {
      job.releasePause();
    } catch {
      // the job is gone
    }
  };
  return {
    commit: () => job.start(),
    abort: async () => {
      release();
      job.cancel({ force: true });
      await job.outcome;
      await afterAbort?.();
    },
    clean: release,
  };
}

/** Runs one action outside a transaction: prepare, then commit (or abort on a prepare failure) and clean. */
export async function runAction(prepare: () => Promise<PreparedAction>): Promise<void> {
  const action = await prepare();
  await action.commit();
  await action.clean?.();
}

/**
 * The file name a node is known by: its `filename` option or the first one down its `file` children (a
 * qcow2 node over a `file` node has the file's name).
 */
export function nodeFileName(node: BlockNode): string | undefined {
  for (let n: BlockNode | undefined = node; n !== undefined; n = n.children.get("file")?.child) {
    const opts = n.driverOptions as { filename?: unknown } | null | undefined;
    if (typeof opts?.filename === "string") return opts.filename;
  }
  return undefined;
}
