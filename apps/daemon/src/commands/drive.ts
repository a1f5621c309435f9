/**
 * `drive-mirror` and `drive-backup` (spec/qmp.md §3.3, jobs.md §2.1 and §3.1): the job commands whose
 * `target` is a file name. Unless `mode` is `existing`, the target image is created first as QEMU 7.2
 * creates it (format defaulting to the source's, size the source's, and a backing file name that depends
 * on `sync`), then opened as an anonymous node that lives as long as something uses it: after the job
 * only the parents the mirror switched over keep it.
 *
 * Target backing links as QEMU leaves them:
 * - mirror `top` (and backup `top`): the target's backing is the source's backing node, from the start;
 * - mirror `none`: QEMU links the target to the source when the job completes. Here the target is opened
 *   over a zero-reading placeholder backing (the job never reads the target; copies are widened to whole
 *   target clusters) that is swapped for the source once the job concluded, if the target is still used;
 * - backup `none`: the target's backing is the source while the job runs (QEMU's fleecing setup);
 * - `full`: none; `mode=existing`: what the image header names (an open node of that file is reused).
 *
 * The placeholder (a read-only `null-co` node) shows in `query-named-block-nodes` while such a job runs.
 *
 * QEMU's drive-mirror does not pre-zero a freshly created target (`zero_target` is false for images
 * with zero-init): only allocated ranges are copied and reported as progress. `@blk/jobs`' mirror always
 * zeroes or dirties the whole target for `sync=full` unless the target node unmaps zeroes, so the new
 * target is opened with `discard=unmap` for the job (pre-zeroing a fresh image is a no-op) and gets the
 * source's `discard` back once the job concluded.
 */
import { open } from "node:fs/promises";
import { type BlockNode, CoreBlockdevOptions, type DriverTable, openBlockdev } from "@blk/core";
import { fileDriver } from "@blk/drivers";
import { createQcow2, parseHeader, QCOW2_MAGIC, resolveBackingFilename } from "@blk/drivers/qcow2";
import { type BackupJob, createBackupJob, type JobEvent, type JobTxn, mirror } from "@blk/jobs";
import { type CommandDefinition, defineCommand, q } from "@blk/qmp";
import type { DaemonState } from "../context.ts";
import { asQmpError, generic, qmpErrors } from "../errors.ts";
import { jobAction, nodeFileName, type PreparedAction, runAction } from "./actions.ts";
import {
  BACKUP_COMMON_TAIL,
  CopyMode,
  checkNotBusy,
  checkRoot,
  lookupDevice,
  OnError,
  SyncMode,
} from "./job-args.ts";

const NewImageMode = q.enum(["existing", "absolute-paths"], { name: "NewImageMode" });

/** `drive-mirror`'s arguments (`DriveMirror`). */
const DriveMirror = q.object(
  {
    "job-id": q.optional(q.str()),
    device: q.str(),
    target: q.str(),
    format: q.optional(q.str()),
    "node-name": q.optional(q.str()),
    replaces: q.optional(q.str()),
    sync: SyncMode,
    mode: q.optional(NewImageMode),
    speed: q.optional(q.int()),
    granularity: q.optional(q.uint32()),
    "buf-size": q.optional(q.int()),
    "on-source-error": q.optional(OnError),
    "on-target-error": q.optional(OnError),
    unmap: q.optional(q.bool()),
    "copy-mode": q.optional(CopyMode),
    "auto-finalize": q.optional(q.bool()),
    "auto-dismiss": q.optional(q.bool()),
  },
  { name: "DriveMirror" },
);

/** `drive-backup`'s arguments (`DriveBackup`, also a `transaction` action). */
export const DriveBackup = q.object(
  {
    "job-id": q.optional(q.str()),
    device: q.str(),
    target: q.str(),
    format: q.optional(q.str()),
    sync: SyncMode,
    mode: q.optional(NewImageMode),
    ...BACKUP_COMMON_TAIL,
  },
  { name: "DriveBackup" },
);

type DriveMirrorArgs = ReturnType<typeof DriveMirror.parse>;
type DriveBackupArgs = ReturnType<typeof DriveBackup.parse>;

/** Drops members the client did not send, so the job drivers apply QEMU's defaults. */
function given<T extends object>(args: T): { [K in keyof T]?: Exclude<T[K], undefined> } {
  return Object.fromEntries(Object.entries(args).filter(([, v]) => v !== undefined)) as {
    [K in keyof T]?: Exclude<T[K], undefined>;
  };
}

/** Skips filter nodes downwards (QEMU's `bdrv_skip_filters`). */
function skipFilters(node: BlockNode): BlockNode {
  let n = node;
  while (n.driver.kind === "filter") {
    const below = n.filteredOrBacking?.child;
    if (below === undefined) break;
    n = below;
  }
  return n;
}

/** The node below `node`'s filters' backing link (QEMU's `bdrv_cow_bs(bdrv_skip_filters(bs))`). */
const cowBackingOf = (node: BlockNode): BlockNode | undefined => skipFilters(node).backing;

/**
 * QEMU's `bdrv_img_create(filename, format, backing, backing_fmt, size)`: qcow2 through createQcow2,
 * raw and file as a plain file.
 * @throws {QmpError} `Unknown file format 'X'`, `Backing file not supported for file format 'X'`,
 *   `Format driver 'X' does not support image creation`, `Could not create 'F': …`
 */
async function createImage(
  state: DaemonState,
  filename: string,
  format: string,
  size: number,
  backing: BlockNode | undefined,
): Promise<void> {
  await state.drivers.loadFor({ driver: format });
  if (state.drivers.get(format) === undefined) throw generic(`Unknown file format '${format}'`);
  if (format === "qcow2") {
    const backingFile = backing === undefined ? undefined : (nodeFileName(backing) ?? backing.nodeName);
    await qmpErrors(() =>
      createQcow2({
        filename,
        size,
        ...(backing === undefined
          ? {}
          : { backingFile: backingFile as string, backingFormat: backing.driver.format }),
      }),
    );
    return;
  }
  if (format !== "raw" && format !== "file")
    throw generic(`Format driver '${format}' does not support image creation`);
  if (backing !== undefined) throw generic(`Backing file not supported for file format '${format}'`);
  await qmpErrors(() => fileDriver.create({ filename, size }));
}

/** The first `max` bytes of a file (fewer if it is shorter), and its size; undefined if unreadable. */
async function readHead(filename: string, max: number): Promise<{ head: Buffer; size: number } | undefined> {
  let fh: Awaited<ReturnType<typeof open>> | undefined;
  try {
    fh = await open(filename, "r");
    const size = (await fh.stat()).size;
    const head = Buffer.alloc(Math.min(max, size));
    await fh.read(head, 0, head.length, 0);
    return { head, size };
  } catch {
    return undefined;
  } finally {
    await fh?.close();
  }
}

const isQcow2Head = (head: Buffer): boolean => head.length >= 4 && head.readUInt32BE(0) === QCOW2_MAGIC;

/** The format of an existing image file: qcow2 by its magic, else raw (QEMU probes the same two). */
async function probeFormat(filename: string): Promise<string> {
  const r = await readHead(filename, 4);
  return r !== undefined && isQcow2Head(r.head) ? "qcow2" : "raw";
}

/** The backing file named in a qcow2 image's header (resolved against the image's directory), if any. */
async function headerBacking(
  filename: string,
): Promise<{ file: string; format: string | undefined } | undefined> {
  // Cluster 0 holds the header, its extensions and the backing file name: at most 2 MiB.
  const r = await readHead(filename, 2 << 20);
  if (r === undefined || !isQcow2Head(r.head)) return undefined;
  try {
    const h = parseHeader(r.head, r.size);
    if (h.backingFile === undefined) return undefined;
    return { file: resolveBackingFilename(filename, h.backingFile), format: h.backingFormat };
  } catch {
    return undefined;
  }
}

/** The open format node whose file is `filename`, if any. */
function nodeByFile(state: DaemonState, filename: string): BlockNode | undefined {
  return state.graph
    .list()
    .find((n) => n.driver.kind !== "protocol" && n.driver.kind !== "filter" && nodeFileName(n) === filename);
}

type BackingSpec = BlockNode | null | { inline: Record<string, unknown> };

/**
 * Opens the target image as QEMU's `bdrv_open(filename, {driver, node-name, …})` does: a format node over
 * an anonymous `file` node, with the given backing (a node, none, or inline options).
 */
async function openTarget(
  state: DaemonState,
  filename: string,
  format: string,
  opts: { nodeName?: string | undefined; backing: BackingSpec; common: Record<string, unknown> },
): Promise<BlockNode> {
  await state.drivers.loadFor({ driver: format, file: { driver: "file" } });
  const protocol = state.drivers.get(format)?.kind === "protocol";
  const tree: Record<string, unknown> = {
    driver: format,
    ...(opts.nodeName === undefined ? {} : { "node-name": opts.nodeName }),
    ...opts.common,
    ...(protocol ? { filename } : { file: { driver: "file", filename } }),
  };
  if (format === "qcow2") {
    const b = opts.backing;
    tree.backing =
      b === null
        ? null
        : "inline" in (b as object)
          ? (b as { inline: unknown }).inline
          : (b as BlockNode).nodeName;
  }
  return qmpErrors(() =>
    openBlockdev(state.graph, CoreBlockdevOptions.parse(tree), {
      drivers: state.drivers as unknown as DriverTable,
      validate: false,
    }),
  );
}

/** Deletes an anonymous target node once nothing uses it (QEMU drops its last reference). */
async function releaseTarget(state: DaemonState, target: BlockNode): Promise<void> {
  if (target.closed || target.parents.length > 0 || state.graph.find(target.nodeName) !== target) return;
  await state.graph
    .delete(target)
    .catch((e: unknown) => state.log.warn("target release failed", { error: String(e) }));
}

/**
 * Runs `fn` synchronously when job `id` reaches `concluded` (before any client hears of it), and again
 * when its outcome settles (a job that never ran, or nodes the job still held at `concluded`). `fn` must
 * be idempotent.
 */
function whenConcluded(state: DaemonState, id: string, outcome: Promise<unknown>, fn: () => void): void {
  const off = state.jobs.onEvent((e: JobEvent) => {
    if (e.event === "JOB_STATUS_CHANGE" && e.data.id === id && e.data.status === "concluded") {
      off();
      fn();
    }
  });
  const last = (): void => {
    off();
    fn();
  };
  void outcome.then(last, last);
}

// ------------------------------------------------------------------------------------------------------
// drive-mirror

async function driveMirror(state: DaemonState, args: DriveMirrorArgs): Promise<void> {
  const graph = state.graph;
  const bs = lookupDevice(state, args.device);
  checkRoot(bs);
  checkNotBusy(bs);
  const mode = args.mode ?? "absolute-paths";
  const format = args.format ?? (mode === "existing" ? undefined : bs.driver.format);
  let sync = args.sync;
  let targetBacking = cowBackingOf(bs);
  if (targetBacking === undefined && sync === "top") sync = "full";
  const noneMode = sync === "none";
  if (noneMode) targetBacking = bs;
  const size = bs.length;
  if (args.replaces !== undefined && args["node-name"] === undefined)
    throw generic("a node-name must be provided when replacing a named node of the graph");
  const filename = args.target;
  if (mode !== "existing") {
    const withBacking = !(sync === "full" || targetBacking === undefined);
    await createImage(state, filename, format as string, size, withBacking ? targetBacking : undefined);
  }
  const fmt = format ?? (await probeFormat(filename));
  // zero_target: a new image reads as zeroes already (see the module comment).
  const zeroInit = sync === "full" && mode !== "existing";
  let backing: BackingSpec = null;
  let placeholder: BlockNode | undefined;
  let linkAtEnd: BlockNode | undefined;
  if (fmt === "qcow2") {
    if (mode === "existing") {
      const hb = await headerBacking(filename);
      const known = hb === undefined ? undefined : nodeByFile(state, hb.file);
      if (hb === undefined) backing = null;
      else if (known === bs) linkAtEnd = bs;
      else if (known !== undefined) backing = known;
      else
        backing = {
          inline: {
            driver: hb.format ?? (await probeFormat(hb.file)),
            "read-only": true,
            file: { driver: "file", filename: hb.file },
          },
        };
    } else if (noneMode) {
      linkAtEnd = bs;
    } else if (sync === "top" && targetBacking !== undefined) {
      backing = targetBacking;
    }
    if (linkAtEnd !== undefined) {
      await state.drivers.loadFor({ driver: "null-co" });
      placeholder = await qmpErrors(() =>
        openBlockdev(
          graph,
          CoreBlockdevOptions.parse({ driver: "null-co", size, "read-zeroes": true, "read-only": true }),
          { drivers: state.drivers as unknown as DriverTable, validate: false },
        ),
      );
      backing = placeholder;
    }
  }
  const discard = bs.options.discard;
  let target: BlockNode;
  try {
    target = await openTarget(state, filename, fmt, {
      nodeName: args["node-name"],
      backing,
      common: { discard: zeroInit ? "unmap" : discard, "detect-zeroes": bs.options.detectZeroes },
    });
  } finally {
    if (placeholder !== undefined && placeholder.parents.length === 0) await graph.delete(placeholder);
  }
  // Without its backing node open, copies must cover whole target clusters (QEMU's COW bitmap).
  let granularity = args.granularity;
  if (linkAtEnd !== undefined) {
    const cluster = (await target.info().catch(() => undefined))?.clusterSize;
    const g = granularity ?? (await target.defaultBitmapGranularity());
    if (cluster !== undefined && g < cluster && g >= 512 && (g & (g - 1)) === 0) granularity = cluster;
  }
  // The placeholder is a root node of its own: it goes when nothing uses it any more.
  const dropPlaceholder = async (): Promise<void> => {
    if (placeholder !== undefined && placeholder.parents.length === 0 && !placeholder.closed)
      await graph.delete(placeholder).catch(() => {});
  };
  let reopened = false;
  const finish = (): void => {
    if (
      placeholder !== undefined &&
      linkAtEnd !== undefined &&
      target.parents.length > 0 &&
      !linkAtEnd.closed
    ) {
      try {
        graph.replaceNode(placeholder, linkAtEnd);
      } catch (e) {
        state.log.warn("drive-mirror: linking the target to its backing failed", { error: String(e) });
      }
    }
    if (target.parents.length === 0) {
      void releaseTarget(state, target).then(dropPlaceholder);
    } else {
      void dropPlaceholder();
      if (zeroInit && discard !== "unmap" && !reopened) {
        reopened = true;
        void target.reopen({ discard }).catch(() => {});
      }
    }
  };
  let job: Awaited<ReturnType<typeof mirror>>;
  try {
    job = await mirror(state.jobs, graph, {
      ...given({
        "job-id": args["job-id"],
        replaces: args.replaces,
        speed: args.speed,
        granularity,
        "buf-size": args["buf-size"],
        "on-source-error": args["on-source-error"],
        "on-target-error": args["on-target-error"],
        unmap: args.unmap,
        "copy-mode": args["copy-mode"],
        "auto-finalize": args["auto-finalize"],
        "auto-dismiss": args["auto-dismiss"],
      }),
      device: bs,
      target,
      sync,
    });
  } catch (e) {
    await releaseTarget(state, target);
    await dropPlaceholder();
    throw asQmpError(e);
  }
  whenConcluded(state, job.id ?? "", job.outcome, finish);
}

// ------------------------------------------------------------------------------------------------------
// drive-backup

/** `drive-backup` as an action: creates and opens the target, creates the job (started on commit). */
export async function prepareDriveBackup(
  state: DaemonState,
  args: DriveBackupArgs,
  txn: JobTxn | undefined,
): Promise<PreparedAction> {
  const mode = args.mode ?? "absolute-paths";
  const bs = lookupDevice(state, args.device);
  const format = args.format ?? (mode === "existing" ? undefined : bs.driver.format);
  // QEMU checks this before creating the target.
  checkNotBusy(bs);
  let sync = args.sync;
  let source: BlockNode | undefined;
  if (sync === "top") {
    source = cowBackingOf(bs);
    if (source === undefined) sync = "full";
  }
  const noneMode = sync === "none";
  if (noneMode) source = bs;
  const size = bs.length;
  const filename = args.target;
  if (mode !== "existing") await createImage(state, filename, format as string, size, source);
  const fmt = format ?? (await probeFormat(filename));
  let backing: BackingSpec = null;
  if (fmt === "qcow2") {
    if (noneMode) backing = bs;
    else {
      const hb = await headerBacking(filename);
      const known = hb === undefined ? undefined : nodeByFile(state, hb.file);
      if (hb === undefined) backing = null;
      else if (known !== undefined) backing = known;
      else
        backing = {
          inline: {
            driver: hb.format ?? (await probeFormat(hb.file)),
            "read-only": true,
            file: { driver: "file", filename: hb.file },
          },
        };
    }
  }
  const target = await openTarget(state, filename, fmt, {
    backing,
    common: { discard: "unmap", "detect-zeroes": "unmap" },
  });
  let job: BackupJob;
  try {
    job = await qmpErrors(() =>
      createBackupJob(state.jobs, {
        graph: state.graph,
        device: args.device,
        target: target.nodeName,
        sync,
        ...given({
          "job-id": args["job-id"],
          speed: args.speed,
          bitmap: args.bitmap,
          "bitmap-mode": args["bitmap-mode"],
          compress: args.compress,
          "on-source-error": args["on-source-error"],
          "on-target-error": args["on-target-error"],
          "auto-finalize": args["auto-finalize"],
          "auto-dismiss": args["auto-dismiss"],
          "filter-node-name": args["filter-node-name"],
          "x-perf": args["x-perf"],
        }),
        ...(txn === undefined ? {} : { txn }),
      }),
    );
  } catch (e) {
    await releaseTarget(state, target);
    throw asQmpError(e);
  }
  whenConcluded(state, job.id ?? "", job.outcome, () => void releaseTarget(state, target));
  return jobAction(job, () => releaseTarget(state, target));
}

/** `drive-mirror` and `drive-backup`. */
export function driveCommands(state: DaemonState): CommandDefinition<never, unknown>[] {
  return [
    defineCommand({
      name: "drive-mirror",
      args: DriveMirror,
      handler: async (args) => {
        await driveMirror(state, args);
        return {};
      },
    }),
    defineCommand({
      name: "drive-backup",
      args: DriveBackup,
      handler: async (args) => {
        await runAction(() => prepareDriveBackup(state, args, undefined));
        return {};
      },
    }),
  ] as unknown as CommandDefinition<never, unknown>[];
}
