/**
 * External snapshots: `blockdev-snapshot-sync` and `blockdev-snapshot` (spec/qmp.md §3.6), as
 * transactionable actions. The overlay gets the node as its `backing` child and takes over all of the
 * node's parents; on commit the node is reopened read-only (best effort, as QEMU; not qcow2 nodes until the
 * qcow2 driver state can reopen, see {@link canReopenReadOnly}); an overlay nobody uses afterwards goes away
 * again (QEMU releases it: the file stays on disk).
 *
 * The qcow2 driver state fixes its backing child when it opens, so `blockdev-snapshot` (an overlay opened
 * with `backing: null`) closes the overlay node and opens it again, same name and file node, with the
 * backing child: in-memory (non-persistent) bitmaps and the write threshold of the overlay are not kept.
 * The overlay must have no parents at all (QEMU only refuses BlockBackends).
 */
import type { BlockDriver, BlockNode, OpenNodeOptions } from "@blk/core";
import { BlockNode as BlockNodeClass, backendParent, PERM_ALL } from "@blk/core";
import { createQcow2 } from "@blk/drivers/qcow2";
import { type CommandDefinition, defineCommand, q } from "@blk/qmp";
import type { DaemonState } from "../context.ts";
import { asQmpError, generic, qmpErrors } from "../errors.ts";
import { nodeFileName, type PreparedAction, runAction } from "./actions.ts";
import { recordCreation, replaceInCreationOrder } from "./creation-order.ts";
import { lookupNode } from "./lookup.ts";

const NewImageMode = q.enum(["existing", "absolute-paths"], { name: "NewImageMode" });

/** `blockdev-snapshot-sync` arguments (`BlockdevSnapshotSync`). */
export const BlockdevSnapshotSync = q.object(
  {
    device: q.optional(q.str()),
    "node-name": q.optional(q.str()),
    "snapshot-file": q.str(),
    "snapshot-node-name": q.optional(q.str()),
    format: q.optional(q.str()),
    mode: q.optional(NewImageMode),
  },
  { name: "BlockdevSnapshotSync" },
);

/** `blockdev-snapshot` arguments (`BlockdevSnapshot`). */
export const BlockdevSnapshot = q.object({ node: q.str(), overlay: q.str() }, { name: "BlockdevSnapshot" });

type SyncArgs = ReturnType<typeof BlockdevSnapshotSync.parse>;
type SnapArgs = ReturnType<typeof BlockdevSnapshot.parse>;

const supportsBacking = (driver: BlockDriver<never>): boolean =>
  driver.childOptions?.some((c) => c.name === "backing") ?? false;

function driverOf(state: DaemonState, format: string): BlockDriver<never> | undefined {
  return state.drivers.get(format) as BlockDriver<never> | undefined;
}

async function openWith(
  state: DaemonState,
  driver: BlockDriver<never>,
  options: Record<string, unknown>,
  opts: OpenNodeOptions,
): Promise<BlockNode> {
  const parsed = driver.schema === undefined ? options : driver.schema.parse(options);
  return state.graph.open(driver, parsed as never, opts);
}

/** Flushes the node unless it is read-only (QEMU flushes before the snapshot). */
async function flushBase(base: BlockNode): Promise<void> {
  if (!base.readOnly) await qmpErrors(() => base.flush());
}

/**
 * Whether `node` may be reopened read-only here. Not qcow2 nodes whose driver state has no `reopen` hook:
 * QEMU's qcow2 reopen stores persistent bitmaps and clears the lazy-refcounts dirty bit first, which blk's
 * qcow2 state can only do when it closes read-write (a read-only base would be left dirty, its bitmaps lost).
 */
function canReopenReadOnly(node: BlockNode): boolean {
  if (node.driver.format !== "qcow2") return true;
  try {
    return typeof (node.state as { reopen?: unknown }).reopen === "function";
  } catch {
    return false;
  }
}

/** Puts `overlay` (whose backing is `base`) in `base`'s place; returns the action's finish. */
function takeOver(state: DaemonState, base: BlockNode, overlay: BlockNode, undo: () => Promise<void>) {
  const graph = state.graph;
  return {
    commit: async () => {
      // QEMU reopens the old active layer read-only (errors ignored), with its implicit file child.
      if (!canReopenReadOnly(base)) return;
      try {
        await base.reopen({ readOnly: true });
        const file = base.children.get("file")?.child;
        if (file !== undefined && !graph.isOwned(file) && file.parents.length === 1)
          await file.reopen({ readOnly: true });
      } catch (e) {
        state.log.debug("snapshot: reopening the backing node read-only failed", { error: String(e) });
      }
    },
    abort: async () => {
      try {
        graph.replaceNode(overlay, base);
      } catch (e) {
        state.log.warn("snapshot abort: could not give the parents back", { error: String(e) });
      }
      await undo().catch((e: unknown) => state.log.warn("snapshot abort failed", { error: String(e) }));
    },
  } satisfies Omit<PreparedAction, "clean">;
}

/**
 * QEMU blocks external snapshots of a node that is another node's backing child (its op blocker):
 * `Node 'X' is busy: node is used as backing hd of 'PARENT'`.
 */
function checkNotBacking(node: BlockNode): void {
  const edge = node.parents.find((e) => e.parent instanceof BlockNodeClass && e.name === "backing");
  if (edge !== undefined)
    throw generic(
      `Node '${node.nodeName}' is busy: node is used as backing hd of '${(edge.parent as BlockNode).nodeName}'`,
    );
}

/** `blockdev-snapshot-sync` as an action. */
export async function prepareSnapshotSync(state: DaemonState, args: SyncArgs): Promise<PreparedAction> {
  const graph = state.graph;
  const base = lookupNode(state, args.device, args["node-name"]);
  checkNotBacking(base);
  await flushBase(base);
  const format = args.format ?? "qcow2";
  const snapName = args["snapshot-node-name"];
  if (args["node-name"] !== undefined && snapName === undefined)
    throw generic("New overlay node-name missing");
  if (snapName !== undefined && graph.find(snapName) !== undefined)
    throw generic("New overlay node-name already in use");
  const driver = driverOf(state, format);
  const file = args["snapshot-file"];
  if ((args.mode ?? "absolute-paths") !== "existing") {
    if (driver === undefined) throw generic(`Unknown file format '${format}'`);
    if (format !== "qcow2") throw generic(`Backing file not supported for file format '${format}'`);
    const backingFile = nodeFileName(base) ?? `${base.driver.format}://`;
    await qmpErrors(() =>
      createQcow2({ filename: file, size: base.length, backingFile, backingFormat: base.driver.format }),
    );
  }
  if (driver === undefined) throw generic(`Unknown driver '${format}'`);
  const fileDriver = driverOf(state, "file");
  if (fileDriver === undefined) throw generic("Unknown driver 'file'");
  const fileNode = await qmpErrors(() => openWith(state, fileDriver, { filename: file }, { owned: false }));
  let overlay: BlockNode;
  try {
    if (!supportsBacking(driver)) throw generic("The overlay does not support backing images");
    overlay = await qmpErrors(() =>
      openWith(
        state,
        driver,
        {},
        {
          ...(snapName === undefined ? {} : { nodeName: snapName }),
          children: { file: fileNode, backing: base },
          owned: false,
        },
      ),
    );
  } catch (e) {
    if (fileNode.parents.length === 0) await graph.delete(fileNode).catch(() => {});
    throw asQmpError(e);
  }
  try {
    graph.replaceNode(base, overlay);
  } catch (e) {
    await graph.delete(overlay, { force: true }).catch(() => {});
    throw asQmpError(e);
  }
  recordCreation(graph, overlay);
  const dropOverlay = async (): Promise<void> => {
    if (!overlay.closed) await graph.delete(overlay, { force: true });
  };
  return {
    ...takeOver(state, base, overlay, dropOverlay),
    // Nothing holds an overlay without parents: QEMU releases it at the end of the command.
    clean: async () => {
      if (!overlay.closed && overlay.parents.length === 0) await dropOverlay().catch(() => {});
    },
  };
}

/**
 * Closes `node` and opens it again with the same name, options and `file` node, with `backing` as its
 * backing child (none: `backing: null`).
 */
async function reopenWithBacking(
  state: DaemonState,
  node: BlockNode,
  backing: BlockNode | undefined,
): Promise<BlockNode> {
  const graph = state.graph;
  const file = node.children.get("file")?.child;
  const extra = [...node.children.keys()].filter((k) => k !== "file" && k !== "backing");
  if (file === undefined || extra.length > 0) throw generic("The overlay does not support backing images");
  const driverOptions = { ...(node.driverOptions as Record<string, unknown>) };
  delete driverOptions.backing;
  const init = {
    ...node.options,
    nodeName: node.nodeName,
    owned: graph.isOwned(node),
  };
  const hold = graph.attach(backendParent(), file, { name: "hold", perm: 0, shared: PERM_ALL });
  try {
    await node.flush();
    await graph.delete(node, { force: true });
    const open = (b: BlockNode | undefined) =>
      graph.open(
        node.driver,
        (b === undefined ? { ...driverOptions, backing: null } : driverOptions) as never,
        {
          ...init,
          children: b === undefined ? { file } : { file, backing: b },
        },
      );
    let reopened: BlockNode;
    try {
      reopened = await open(backing);
    } catch (e) {
      if (backing !== undefined)
        await open(undefined)
          .then((n) => replaceInCreationOrder(graph, node, n))
          .catch(() => {});
      throw asQmpError(e);
    }
    replaceInCreationOrder(graph, node, reopened);
    return reopened;
  } finally {
    hold.detach();
  }
}

/** `blockdev-snapshot` as an action. */
export async function prepareSnapshot(state: DaemonState, args: SnapArgs): Promise<PreparedAction> {
  const graph = state.graph;
  const base = lookupNode(state, args.node, args.node);
  checkNotBacking(base);
  await flushBase(base);
  const old = lookupNode(state, args.overlay, args.overlay);
  if (old.parents.length > 0) throw generic("The overlay is already in use");
  if (old.backing !== undefined) throw generic("The overlay already has a backing image");
  if (!supportsBacking(old.driver)) throw generic("The overlay does not support backing images");
  if (old === base)
    throw generic(`Making '${base.nodeName}' a backing child of '${old.nodeName}' would create a cycle`);
  const overlay = await reopenWithBacking(state, old, base);
  try {
    graph.replaceNode(base, overlay);
  } catch (e) {
    await reopenWithBacking(state, overlay, undefined).catch(() => {});
    throw asQmpError(e);
  }
  return takeOver(state, base, overlay, async () => {
    await reopenWithBacking(state, overlay, undefined);
  });
}

/** `blockdev-snapshot-sync` and `blockdev-snapshot`. */
export function snapshotCommands(state: DaemonState): CommandDefinition<never, unknown>[] {
  return [
    defineCommand({
      name: "blockdev-snapshot-sync",
      args: BlockdevSnapshotSync,
      handler: async (args) => {
        await runAction(() => prepareSnapshotSync(state, args));
        return {};
      },
    }),
    defineCommand({
      name: "blockdev-snapshot",
      args: BlockdevSnapshot,
      handler: async (args) => {
        await runAction(() => prepareSnapshot(state, args));
        return {};
      },
    }),
  ] as unknown as CommandDefinition<never, unknown>[];
}
