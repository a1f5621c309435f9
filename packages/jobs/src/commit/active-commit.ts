/**
 * Active commit (QEMU 7.2 `commit_active_start`, QMP `block-commit` whose top is the active layer or has a
 * writer): the mirror engine with job type `commit`. A `mirror_top` filter (QEMU keeps that name for
 * active commit) takes over the top's parents and marks guest writes dirty; the job copies into the base
 * everything the layers from the top down to (excluding) the base allocate, reports READY once the base
 * caught up, keeps copying new writes, and on `complete` replaces the top by the base under all its
 * parents: the layers top..above-base leave the guest's path (those nobody owns are deleted). A soft cancel
 * when READY finishes without the switch; any other cancel stops at once. See `spec/jobs.md` §2.6, §4.
 */
import {
  BlkError,
  type BlockGraph,
  BlockNode,
  backendParent,
  type Edge,
  PERM,
  PERM_ALL,
  toBlkError,
} from "@blk/core";
import { JobError } from "../errors.ts";
import type { JobManager } from "../manager.ts";
import { insertMirrorTop, MIRROR_DEFAULT_BUF_SIZE, MirrorJob, type MirrorJobInit } from "../mirror/mirror.ts";
import type { RateLimitLike } from "../ratelimit.ts";
import { backingFileWriter, chainBetween, nodeFilename, skipFilters } from "../stream/chain.ts";
import type { BlockdevOnError } from "../types.ts";

/** Internal construction arguments of {@link ActiveCommitJob}. */
export interface ActiveCommitJobInit extends MirrorJobInit {
  base: BlockNode;
  /** The base was reopened read-write for the job (it goes back to read-only unless the job switched). */
  reopenedRw: boolean;
}

/**
 * A running active commit (job type `commit`): a {@link MirrorJob} whose source is the top and whose
 * target is the base. Create it with `commit()`; `complete()` it once READY (or `cancel()` it).
 */
export class ActiveCommitJob extends MirrorJob {
  declare readonly base: BlockNode;
  #reopenedRw: boolean;
  #dropped = false;

  /** @internal Use `commit()`. */
  constructor(init: ActiveCommitJobInit) {
    super({ ...init, type: "commit" });
    this.#reopenedRw = init.reopenedRw;
  }

  /** The top node whose chain (down to, excluding, the base) is committed: the mirror's source. */
  get top(): BlockNode {
    return this.source;
  }

  /** True once the base replaced the top under all its parents (successful `complete`). */
  get dropped(): boolean {
    return this.switched;
  }

  /** Bytes copied into the base so far (the job's progress `current`). */
  get bytesCopied(): number {
    return this.progress.current;
  }

  protected override async prepare(): Promise<void> {
    // Node parents of the filter (an overlay's backing link when the top has a writer but is not the device)
    // get the base's file name written into their header once they point to the base.
    const overlays = this.filter.parents.filter((e) => e.parent instanceof BlockNode);
    await super.prepare();
    if (!this.switched) return;
    const filename = nodeFilename(this.base);
    const format = skipFilters(this.base).driver.format;
    for (const edge of overlays) {
      if (!(edge.parent instanceof BlockNode) || edge.child !== this.base) continue;
      const writer = backingFileWriter(edge.parent);
      if (writer === undefined) continue;
      try {
        await writer.changeBackingFile(filename, format);
      } catch (e) {
        throw new JobError(
          "EPERM",
          `Could not update backing file: ${toBlkError(e).message}`,
          "GenericError",
          {
            cause: e,
          },
        );
      }
    }
  }

  protected override async clean(): Promise<void> {
    const graph = this.base.graph;
    const dropped = chainBetween(this.source, this.base);
    await super.clean();
    if (this.switched) {
      if (!this.#dropped) {
        this.#dropped = true;
        // The layers top..above-base left the guest's path: delete those nobody owns or uses (deleting a
        // node also deletes its unowned children left without parents).
        for (const n of dropped) {
          if (n.closed || graph.find(n.nodeName) !== n) continue;
          if (graph.isOwned(n) || n.parents.length > 0) continue;
          try {
            await graph.delete(n);
          } catch {
            // still in use after all: it stays
          }
        }
      }
    } else if (this.#reopenedRw) {
      this.#reopenedRw = false;
      try {
        await this.base.reopen({ readOnly: true });
      } catch {
        // someone else writes the base now; it stays read-write
      }
    }
  }
}

/** What `commit()` resolved for an active commit. */
interface ActiveCommitStart {
  device: BlockNode;
  top: BlockNode;
  base: BlockNode;
  jobId: string;
  speed: number;
  onError: BlockdevOnError;
  filterNodeName: string | undefined;
  autoFinalize: boolean;
  autoDismiss: boolean;
  /** Whether the base was reopened read-write (restored if the job cannot start). */
  reopenedRw: boolean;
  rateLimit: RateLimitLike | undefined;
}

/**
 * Starts an active commit (called by `commit()` after its argument checks, with the base already writable):
 * inserts `mirror_top` above the top, creates the job, makes it hold the filter (`main node`), the top
 * (`source`), the nodes below the top down to the base (`intermediate node`), the base (`target`), plus a
 * writer on the base (`root`, with `resize` when the base is shorter), and starts it. On failure nothing is
 * left behind (the base's read-only flag is restored by the caller).
 */
export async function startActiveCommit(
  manager: JobManager,
  graph: BlockGraph,
  a: ActiveCommitStart,
): Promise<ActiveCommitJob> {
  const { top, base } = a;
  const granularity = await base.defaultBitmapGranularity();
  const bufSize = Math.ceil(MIRROR_DEFAULT_BUF_SIZE / granularity) * granularity;
  const { filter, bitmap, remove } = await insertMirrorTop(graph, top, granularity, a.filterNodeName);
  let job: ActiveCommitJob;
  try {
    job = new ActiveCommitJob({
      manager,
      id: a.jobId,
      source: top,
      target: base,
      base,
      filter,
      bitmap,
      replaces: top,
      sync: "top",
      granularity,
      bufSize,
      copyMode: "background",
      onSourceError: a.onError,
      onTargetError: a.onError,
      unmap: true,
      speed: a.speed,
      autoFinalize: a.autoFinalize,
      autoDismiss: a.autoDismiss,
      reopenedRw: a.reopenedRw,
      ...(a.rateLimit === undefined ? {} : { rateLimit: a.rateLimit }),
    });
  } catch (e) {
    await remove();
    throw e;
  }
  let baseEdge: Edge | undefined;
  try {
    job.holdNode(filter, "main node", { perm: PERM.CONSISTENT_READ, shared: PERM_ALL & ~PERM.RESIZE });
    const src = job.holdNode(top, "source", { perm: 0, shared: PERM_ALL & ~PERM.RESIZE });
    for (const n of chainBetween(top, base).slice(1)) {
      job.holdNode(n, "intermediate node", { perm: 0, shared: PERM_ALL & ~PERM.RESIZE });
    }
    job.holdNode(base, "target", { perm: 0, shared: PERM_ALL });
    const grow = base.length < top.length ? PERM.RESIZE : 0;
    baseEdge = graph.attach(backendParent(), base, {
      name: "root",
      perm: PERM.WRITE | grow,
      shared: PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED,
    });
    if (chainBetween(top, base).length === 0) throw new BlkError("EINVAL", "nothing to commit");
    job._setEdges(src, baseEdge);
  } catch (e) {
    baseEdge?.detach();
    job.releaseNodes();
    await remove();
    job.earlyFail(toBlkError(e));
    throw e;
  }
  job.start();
  return job;
}
