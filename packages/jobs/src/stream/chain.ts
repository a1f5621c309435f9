/**
 * Backing-chain helpers shared by the stream and commit jobs: node lookups with QEMU's messages, walking a
 * chain through filters, the backing file name QEMU would write into an overlay's header, the optional
 * driver hook that writes it, and re-pointing one backing edge (QEMU's `bdrv_set_backing_hd`).
 */
import { type BlockDriver, type BlockGraph, type BlockNode, type Edge, toBlkError } from "@blk/core";
import { JobError } from "../errors.ts";

/**
 * An optional method of a driver's open state (`node.state`): rewrites the backing file name and format
 * stored in the image header (qcow2's backing file name and backing-format extension). Stream and commit
 * call it on the overlay whose backing link they changed, after the graph change (`undefined` filename:
 * the image no longer has a backing file). Drivers without on-disk backing names (raw, the memory driver)
 * do not implement it.
 * @example
 * class MyState extends BlockDriverBase implements BackingFileWriter {
 *   async changeBackingFile(filename: string | undefined, format: string | undefined) { … }
 * }
 */
export interface BackingFileWriter {
  changeBackingFile(filename: string | undefined, format: string | undefined): Promise<void>;
}

/** The {@link BackingFileWriter} of `node`'s driver state, if its driver offers one. */
export function backingFileWriter(node: BlockNode): BackingFileWriter | undefined {
  let state: unknown;
  try {
    state = node.state;
  } catch {
    return undefined;
  }
  const fn = (state as Partial<BackingFileWriter> | undefined)?.changeBackingFile;
  return typeof fn === "function" ? (state as BackingFileWriter) : undefined;
}

/** Looks a node up by name as `bdrv_lookup_bs(device, device)` does. @throws {JobError} ENOENT */
export function lookupDevice(graph: { find(name: string): BlockNode | undefined }, ref: string): BlockNode {
  const node = graph.find(ref);
  if (node === undefined) throw new JobError("ENOENT", `Cannot find device='${ref}' nor node-name='${ref}'`);
  return node;
}

/** Looks a node up by node name only (`bdrv_lookup_bs(NULL, name)`). @throws {JobError} ENOENT */
export function lookupNode(graph: { find(name: string): BlockNode | undefined }, ref: string): BlockNode {
  const node = graph.find(ref);
  if (node === undefined) throw new JobError("ENOENT", `Cannot find device='' nor node-name='${ref}'`);
  return node;
}

/** Skips filters downwards (QEMU's `bdrv_skip_filters`). */
export function skipFilters(node: BlockNode): BlockNode {
  let n = node;
  while (n.driver.kind === "filter") {
    const f = n.filtered;
    if (f === undefined) break;
    n = f;
  }
  return n;
}

/** The next node below `node` in its chain: the filtered child of a filter, else the backing child. */
function chainNext(node: BlockNode): BlockNode | undefined {
  return node.filteredOrBacking?.child;
}

/** The backing node of `node` after skipping filters on both sides (QEMU's `bdrv_backing_chain_next`). */
export function backingOf(node: BlockNode): BlockNode | undefined {
  const b = skipFilters(node).backing;
  return b === undefined ? undefined : skipFilters(b);
}

/** True when `node` is `top` or below it in `top`'s chain (QEMU's `bdrv_chain_contains`). */
export function chainContains(top: BlockNode, node: BlockNode): boolean {
  for (let n: BlockNode | undefined = top; n !== undefined; n = chainNext(n)) if (n === node) return true;
  return false;
}

/** The nodes from `top` down to, excluding, `base` (all of the chain when `base` is undefined). */
export function chainBetween(top: BlockNode, base: BlockNode | undefined): BlockNode[] {
  const out: BlockNode[] = [];
  for (let n: BlockNode | undefined = top; n !== undefined && n !== base; n = chainNext(n)) out.push(n);
  return out;
}

/** The bottom-most node of `top`'s chain (QEMU's `bdrv_find_base`). */
export function chainBottom(top: BlockNode): BlockNode {
  let n = top;
  for (let next = backingOf(n); next !== undefined; next = backingOf(n)) n = next;
  return n;
}

/**
 * The file name QEMU knows a node by: the `filename` option of the node or of the first node down its
 * `file` children (a qcow2 node over a `file` node has the file's name); the node name when there is none
 * (in-memory nodes).
 */
export function nodeFilename(node: BlockNode): string {
  for (let n: BlockNode | undefined = node; n !== undefined; n = n.children.get("file")?.child) {
    const opts = n.driverOptions as { filename?: unknown } | null | undefined;
    if (typeof opts?.filename === "string") return opts.filename;
  }
  return node.nodeName;
}

/** Finds a node of `top`'s chain (below `top`) by its file name or node name (`bdrv_find_backing_image`). */
export function findBackingImage(top: BlockNode, name: string): BlockNode | undefined {
  for (let n = chainNext(top); n !== undefined; n = chainNext(n)) {
    if (n.driver.kind === "filter") continue;
    if (nodeFilename(n) === name || n.nodeName === name) return n;
  }
  return undefined;
}

/**
 * Re-points one edge to `to` (QEMU's `bdrv_replace_child`): the edge object stays (drivers keep their
 * child edges), its old child loses it as a parent. When the edge is its old child's only movable parent
 * this is {@link BlockGraph.replaceNode}. On a permission conflict nothing changes.
 * @throws {BlkError} EPERM with QEMU's permission-conflict message
 */
export function repointEdge(edge: Edge, to: BlockNode): void {
  const from = edge.child;
  if (from === to) return;
  const graph = edge.graph;
  const movable = from.parents.filter((e) => !isStaying(e));
  if (movable.length === 1 && movable[0] === edge) {
    graph.replaceNode(from, to);
    return;
  }
  // Core has no public single-edge move yet: do what replaceNode does, for this edge only.
  const move = (a: BlockNode, b: BlockNode): void => {
    const i = a.parents.indexOf(edge);
    if (i >= 0) a.parents.splice(i, 1);
    edge._setChild(b);
    b.parents.unshift(edge);
  };
  move(from, to);
  try {
    graph.refreshPerms([to, from]);
  } catch (e) {
    move(to, from);
    try {
      graph.refreshPerms([from, to]);
    } catch {
      // the old permissions held before
    }
    throw toBlkError(e);
  }
}

function isStaying(e: Edge): boolean {
  const p = e.parent as { stayAtNode?: boolean };
  return p.stayAtNode === true;
}

/** Reopens `node` read-write if it is read-only; returns whether it did (to restore it later). */
export async function ensureWritable(node: BlockNode): Promise<boolean> {
  if (!node.readOnly) return false;
  // As QEMU's reopen does, the node's own storage (its `file` / `data-file` children, not its backing
  // chain) becomes writable first: a format node writes through it.
  for (const name of ["file", "data-file"]) {
    const child = node.children.get(name)?.child;
    if (child !== undefined) await ensureWritable(child);
  }
  await node.reopen({ readOnly: false });
  return true;
}

/** A job's filter node while the job starts: {@link JobFilter.remove} undoes everything the start did. */
export interface JobFilter {
  readonly filter: BlockNode;
  /** Puts `below` back under the filter's parents, deletes the filter, and undoes the read-write reopen. */
  remove(): Promise<void>;
}

/**
 * Opens a job's filter (`copy-on-read`, `commit_top`) above `below`, taking over its parents. `reopenedRw`
 * is a node the caller made writable for the job (see {@link ensureWritable}): it goes back to read-only
 * when opening the filter fails and when the filter is removed.
 */
export async function openJobFilter<O>(
  graph: BlockGraph,
  driver: BlockDriver<O>,
  driverOptions: O,
  below: BlockNode,
  opts: { childName?: string; nodeName?: string | undefined; reopenedRw?: BlockNode | undefined },
): Promise<JobFilter> {
  const restoreRo = async (): Promise<void> => {
    await opts.reopenedRw?.reopen({ readOnly: true }).catch(() => undefined);
  };
  let filter: BlockNode;
  try {
    filter = await graph.openFilterAbove(driver, driverOptions, below, {
      ...(opts.childName === undefined ? {} : { childName: opts.childName }),
      ...(opts.nodeName === undefined ? {} : { nodeName: opts.nodeName }),
    });
  } catch (e) {
    await restoreRo();
    throw e;
  }
  return {
    filter,
    remove: async () => {
      graph.replaceNode(filter, below);
      await graph.delete(filter, { force: true });
      await restoreRo();
    },
  };
}
