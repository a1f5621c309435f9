/**
 * The stream job (QEMU 7.2 `block/stream.c`, QMP `block-stream`): a `copy-on-read` filter above the
 * device; the job walks the device in 512 KiB chunks, skips what the device allocates itself and copies
 * through the filter what the layers between the device's backing and `bottom` allocate; at the end the
 * device's backing becomes the base (or nothing), the image header is told (driver hook), the filter goes
 * away and intermediate nodes nobody owns are deleted. See `spec/jobs.md` §5, §1.7–§1.10.
 */
import { type BlkError, type BlockGraph, type BlockNode, PERM, PERM_ALL, toBlkError } from "@blk/core";
import { BlockJob, checkNodeNotBusy } from "../block-job.ts";
import { errnoError, JobError } from "../errors.ts";
import type { JobManager } from "../manager.ts";
import type { RateLimitLike } from "../ratelimit.ts";
import type { BlockdevOnError } from "../types.ts";
import {
  backingFileWriter,
  backingOf,
  chainBetween,
  chainContains,
  ensureWritable,
  findBackingImage,
  lookupDevice,
  lookupNode,
  nodeFilename,
  openJobFilter,
  repointEdge,
  skipFilters,
} from "./chain.ts";
import { type CopyOnReadState, copyOnReadDriver } from "./copy-on-read.ts";

/** Bytes per iteration of the stream loop (QEMU's `STREAM_CHUNK`): 512 KiB. */
export const STREAM_CHUNK = 524_288;

/** `block-stream` arguments (QAPI names). */
export interface StreamOptions {
  /** The job id. Omitted: QEMU uses the device's BlockBackend name, `''` for nodes, which is refused. */
  "job-id"?: string;
  /** The node to fill (name or node): the top of the chain to stream. */
  device: string | BlockNode;
  /** File name (or node name) of the base image in the chain; exclusive with `base-node` and `bottom`. */
  base?: string;
  /** The base node: data below it stays there; it becomes the device's backing. */
  "base-node"?: string;
  /** The lowest node whose data is copied (not a filter); its backing becomes the device's backing. */
  bottom?: string;
  /** Backing file name to write into the device's image header (default: the base's file name). */
  "backing-file"?: string;
  /** Bytes per second, 0 = unlimited (default). */
  speed?: number;
  /** Error policy (default `report`); errors are always reported as `read`. */
  "on-error"?: BlockdevOnError;
  /** Name of the `copy-on-read` filter node; default a generated `#blockNNN`. */
  "filter-node-name"?: string;
  /** Default true. */
  "auto-finalize"?: boolean;
  /** Default true. */
  "auto-dismiss"?: boolean;
  /** A rate limiter to use instead of the default one (tests). */
  rateLimit?: RateLimitLike;
}

/** Internal construction arguments of {@link StreamJob} (use {@link stream}). */
export interface StreamJobInit {
  manager: JobManager;
  id: string;
  device: BlockNode;
  base: BlockNode | undefined;
  filter: BlockNode;
  backingFile: string | undefined;
  onError: BlockdevOnError;
  speed: number;
  autoFinalize: boolean;
  autoDismiss: boolean;
  reopenedRw: boolean;
  /** The nodes between the device's backing and the base (dropped from the chain on completion). */
  intermediates: BlockNode[];
  rateLimit?: RateLimitLike;
}

/** A running stream (job type `stream`). Create it with {@link stream}. */
export class StreamJob extends BlockJob {
  /** The device being filled. */
  readonly device: BlockNode;
  /** The device's backing once the job completed (undefined: no backing). */
  readonly base: BlockNode | undefined;
  /** The `copy-on-read` filter above the device while the job runs. */
  readonly filter: BlockNode;
  /** The error policy. */
  readonly onError: BlockdevOnError;
  readonly #backingFile: string | undefined;
  readonly #cor: CopyOnReadState;
  readonly #intermediates: BlockNode[];
  #reopenedRw: boolean;
  #bytesCopied = 0;
  #filterRemoved = false;

  /** @internal Use {@link stream}. */
  constructor(init: StreamJobInit) {
    super({
      manager: init.manager,
      id: init.id,
      type: "stream",
      speed: init.speed,
      autoFinalize: init.autoFinalize,
      autoDismiss: init.autoDismiss,
      ...(init.rateLimit === undefined ? {} : { rateLimit: init.rateLimit }),
    });
    this.device = init.device;
    this.base = init.base;
    this.filter = init.filter;
    this.onError = init.onError;
    this.#backingFile = init.backingFile;
    this.#cor = init.filter.state as CopyOnReadState;
    this.#reopenedRw = init.reopenedRw;
    this.#intermediates = init.intermediates;
  }

  /** Bytes the job copied into the device (guest reads through the filter not included). */
  get bytesCopied(): number {
    return this.#bytesCopied;
  }

  protected async run(): Promise<void> {
    const len = this.filter.length;
    this.progressSetRemaining(len);
    this.setPhase("copy");
    const base = this.base ?? null;
    let firstError: BlkError | undefined;
    for (let offset = 0; offset < len; ) {
      // Even unlimited, yield once per request so drains and pauses get their turn.
      await this.ratelimitSleep();
      if (this.isCancelled()) break;
      let n = Math.min(STREAM_CHUNK * this.copyBatchChunks(this.onError), len - offset);
      let copy = false;
      try {
        const first = (await this.device.blockStatusAbove(offset, n, { base }))[0];
        if (first === undefined) {
          // Beyond the end of everything: nothing left to copy.
          n = len - offset;
        } else {
          n = first.length;
          copy = first.allocated && (first.depth ?? 0) > 0;
        }
        if (copy) this.#bytesCopied += await this.#cor.populate(offset, n);
      } catch (e) {
        const err = toBlkError(e);
        const action = this.errorAction(this.onError, "read", err);
        if (action === "stop") continue; // paused at the next pause point; the chunk is retried
        firstError ??= err;
        if (action === "report") break;
      }
      this.progressWorkDone(n);
      if (copy) this.ratelimitProcessedBytes(n);
      offset += n;
    }
    this.#cor.populateOnRead = false;
    // An ignored error still fails the job: the backing chain must not be cut short.
    if (firstError !== undefined) throw errnoError(firstError.code, { cause: firstError });
  }

  // ---------------------------------------------------------------- completion

  protected override async prepare(): Promise<void> {
    const device = skipFilters(this.device);
    const edge = device.children.get("backing");
    const base = this.base;
    if (edge !== undefined && edge.child !== base) {
      if (base === undefined) {
        // Drivers keep their backing edge from open: the old chain stays readable (nothing reads it:
        // the device now allocates all it showed), and is therefore not deleted below.
        edge.detach();
      } else {
        repointEdge(edge, base);
      }
    }
    const writer = backingFileWriter(device);
    if (writer !== undefined) {
      const filename = base === undefined ? undefined : (this.#backingFile ?? nodeFilename(base));
      const format = base === undefined ? undefined : skipFilters(base).driver.format;
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
    this.#cor.populateOnRead = false;
    const graph = this.filter.graph;
    if (!this.#filterRemoved) {
      this.#filterRemoved = true;
      try {
        graph.replaceNode(this.filter, this.device);
      } catch {
        // the filter's parents took no more than the device already offers
      }
    }
    this.releaseNodes();
    await graph.delete(this.filter, { force: true });
    if (this.#reopenedRw) {
      this.#reopenedRw = false;
      try {
        await this.device.reopen({ readOnly: true });
      } catch {
        // a new writer appeared meanwhile; the device stays read-write
      }
    }
    if (this.base !== undefined && skipFilters(this.device).backing === this.base) {
      // Intermediate nodes nobody owns and nobody uses any more go away (monitor-owned ones stay).
      for (const n of this.#intermediates) {
        if (!n.closed && n.parents.length === 0 && !graph.isOwned(n)) await graph.delete(n);
      }
    }
    await super.clean();
  }
}

/**
 * Starts a stream job (QMP `block-stream`) with QEMU's checks, messages and defaults: inserts a
 * `copy-on-read` filter above `device` (named `filter-node-name`, else generated; it takes over the
 * device's parents), creates the job holding the filter and the intermediate nodes, and starts it. Events
 * up to `running` are emitted before the promise resolves, as QEMU does before the command returns.
 *
 * On completion the device's backing is `base-node` / `base` / the backing of `bottom`, or nothing when
 * none is given; if the device's driver state has a `changeBackingFile(filename, format)` method
 * ({@link BackingFileWriter}) it is called with `backing-file` (default the base's file name) and the
 * base's format.
 * @throws {JobError} `Cannot find device='X' nor node-name='X'`, `'base' and 'base-node' cannot be specified
 *   at the same time` (and the `bottom` pairs), `Base 'X' not found`, `Node 'X' is not a backing image of
 *   'Y'`, `Node 'X' is a filter, use a non-filter node as 'bottom'`, `Node 'X' is not in a chain starting
 *   from 'Y'`, `backing file specified, but streaming the entire chain`, `Node 'X' is busy: …`, the job id
 *   and speed errors of {@link BlockJob}; {@link BlkError} from the graph (duplicate filter name,
 *   permission conflicts).
 * @example
 * const job = await stream(manager, graph, { "job-id": "stream0", device: "top", "base-node": "base" });
 * await job.outcome; // { status: "completed" }: top's backing is now base
 */
export async function stream(
  manager: JobManager,
  graph: BlockGraph,
  options: StreamOptions,
): Promise<StreamJob> {
  const device = typeof options.device === "string" ? lookupDevice(graph, options.device) : options.device;
  const hasBase = options.base !== undefined;
  const hasBaseNode = options["base-node"] !== undefined;
  const hasBottom = options.bottom !== undefined;
  if (hasBase && hasBaseNode) {
    throw new JobError("EINVAL", "'base' and 'base-node' cannot be specified at the same time");
  }
  if (hasBase && hasBottom) {
    throw new JobError("EINVAL", "'base' and 'bottom' cannot be specified at the same time");
  }
  if (hasBottom && hasBaseNode) {
    throw new JobError("EINVAL", "'bottom' and 'base-node' cannot be specified at the same time");
  }
  let base: BlockNode | undefined;
  if (options.base !== undefined) {
    base = findBackingImage(device, options.base);
    if (base === undefined) throw new JobError("ENOENT", `Base '${options.base}' not found`);
  }
  const baseNode = options["base-node"];
  if (baseNode !== undefined) {
    base = lookupNode(graph, baseNode);
    if (base === device || !chainContains(device, base)) {
      throw new JobError("EINVAL", `Node '${baseNode}' is not a backing image of '${device.nodeName}'`);
    }
  }
  let bottom: BlockNode | undefined;
  if (options.bottom !== undefined) {
    bottom = lookupNode(graph, options.bottom);
    if (bottom.driver.kind === "filter") {
      throw new JobError("EINVAL", `Node '${options.bottom}' is a filter, use a non-filter node as 'bottom'`);
    }
    if (bottom === device || !chainContains(device, bottom)) {
      throw new JobError(
        "EINVAL",
        `Node '${options.bottom}' is not in a chain starting from '${device.nodeName}'`,
      );
    }
    base = backingOf(bottom);
  }
  if (base === undefined && !hasBottom && options["backing-file"] !== undefined) {
    throw new JobError("EINVAL", "backing file specified, but streaming the entire chain");
  }
  // Every node whose data is copied must be free (no other job on it).
  checkNodeNotBusy(device);
  const below = skipFilters(device).backing;
  const intermediates = below === undefined ? [] : chainBetween(below, base);
  for (const n of intermediates) checkNodeNotBusy(n);
  // The copy-on-read filter copies from the layers down to `bottom`; the device itself when nothing lies
  // between it and the base (then nothing is copied).
  bottom ??= intermediates.filter((n) => n.driver.kind !== "filter").at(-1) ?? skipFilters(device);

  const reopenedRw = await ensureWritable(device);
  const { filter, remove: removeFilter } = await openJobFilter(
    graph,
    copyOnReadDriver,
    { bottom: bottom.nodeName },
    device,
    { nodeName: options["filter-node-name"], reopenedRw: reopenedRw ? device : undefined },
  );
  let job: StreamJob;
  try {
    job = new StreamJob({
      manager,
      id: options["job-id"] ?? "",
      device,
      base,
      filter,
      backingFile: options["backing-file"],
      onError: options["on-error"] ?? "report",
      speed: options.speed ?? 0,
      autoFinalize: options["auto-finalize"] ?? true,
      autoDismiss: options["auto-dismiss"] ?? true,
      reopenedRw,
      intermediates,
      ...(options.rateLimit === undefined ? {} : { rateLimit: options.rateLimit }),
    });
  } catch (e) {
    await removeFilter();
    throw e;
  }
  try {
    job.holdNode(filter, "main node", { perm: 0, shared: PERM_ALL });
    for (const n of intermediates) {
      job.holdNode(n, "intermediate node", { perm: 0, shared: PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED });
    }
  } catch (e) {
    job.releaseNodes();
    await removeFilter();
    job.earlyFail(toBlkError(e));
    throw e;
  }
  job.start();
  return job;
}
