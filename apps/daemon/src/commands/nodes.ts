/**
 * Node commands: `blockdev-add`, `blockdev-del`, `query-named-block-nodes`, `query-block`,
 * `x-debug-query-block-graph`, `block_resize`, `query-blockstats` (spec/qmp.md §3.2).
 */
import { open, stat } from "node:fs/promises";
import {
  type BlockNode,
  BlockNode as BlockNodeClass,
  backendParent,
  type CommonBlockdevOptions,
  CoreBlockdevOptions,
  type DriverTable,
  openBlockdev,
  PERM,
  PERM_ALL,
} from "@blk/core";
import type { parseHeader } from "@blk/drivers/qcow2";
import { type CommandDefinition, defineCommand, encodeQmpJson, q, qdictKeyOrder } from "@blk/qmp";
import type { DaemonState } from "../context.ts";
import { generic, qmpErrors } from "../errors.ts";
import { nodesNewestFirst, recordCreation } from "./creation-order.ts";
import { lookupNode } from "./lookup.ts";

/** `blockdev-add` arguments, validated with QEMU's wording (also what `--blockdev` produces). */
export const BlockdevAddArgs: typeof CoreBlockdevOptions = CoreBlockdevOptions;

/**
 * "QFI\xfb", the first four bytes of a qcow2 image. The qcow2 driver (a large module) is imported only
 * once a file has them: a command line without qcow2 images does not load it.
 */
const QCOW2_MAGIC = 0x514649fb;

/** The first cluster of a qcow2 file (up to 2 MiB), or undefined when it is not a readable qcow2 image. */
async function qcow2HeaderOf(filename: string): Promise<ReturnType<typeof parseHeader> | undefined> {
  let fh: Awaited<ReturnType<typeof open>> | undefined;
  try {
    fh = await open(filename, "r");
    const size = (await fh.stat()).size;
    const head = Buffer.alloc(4096);
    await fh.read(head, 0, head.length, 0);
    if (head.readUInt32BE(0) !== QCOW2_MAGIC) return undefined;
    const bits = head.readUInt32BE(20);
    const cluster = bits >= 9 && bits <= 21 ? 2 ** bits : 4096;
    const c0 = Buffer.alloc(Math.max(cluster, 4096));
    await fh.read(c0, 0, c0.length, 0);
    const { parseHeader } = await import("@blk/drivers/qcow2");
    return parseHeader(c0, size);
  } catch {
    return undefined;
  } finally {
    await fh?.close();
  }
}

async function isQcow2(filename: string): Promise<boolean> {
  let fh: Awaited<ReturnType<typeof open>> | undefined;
  try {
    fh = await open(filename, "r");
    const head = Buffer.alloc(8);
    await fh.read(head, 0, 8, 0);
    return head.readUInt32BE(0) === QCOW2_MAGIC;
  } catch {
    return false;
  } finally {
    await fh?.close();
  }
}

/**
 * QEMU opens the backing file named in a qcow2 header when `backing` is absent: the same here, by adding
 * an inline `backing` (`{driver: FORMAT, file: {driver: "file", filename}}`, the name resolved against the
 * overlay's directory) to every qcow2 object of the tree that has none, down the chain.
 */
async function withHeaderBacking(
  state: DaemonState,
  options: Record<string, unknown>,
  depth = 0,
): Promise<Record<string, unknown>> {
  const out: Record<string, unknown> = { ...options };
  for (const key of ["file", "image", "backing"]) {
    const v = out[key];
    if (typeof v === "object" && v !== null && !Array.isArray(v) && depth < 64)
      out[key] = await withHeaderBacking(state, v as Record<string, unknown>, depth + 1);
  }
  if (out.driver !== "qcow2" || "backing" in options || depth >= 64) return out;
  const file = out.file;
  let filename: string | undefined;
  if (typeof file === "string") {
    const opts = state.graph.find(file)?.driverOptions as Record<string, unknown> | undefined;
    if (typeof opts?.filename === "string") filename = opts.filename;
  } else if (typeof file === "object" && file !== null) {
    const f = file as Record<string, unknown>;
    if (f.driver === "file" && typeof f.filename === "string") filename = f.filename;
  }
  if (filename === undefined) return out;
  const header = await qcow2HeaderOf(filename);
  if (header?.backingFile === undefined) return out;
  const { resolveBackingFilename } = await import("@blk/drivers/qcow2");
  const backingName = resolveBackingFilename(filename, header.backingFile);
  const format = header.backingFormat ?? ((await isQcow2(backingName)) ? "qcow2" : "raw");
  out.backing = await withHeaderBacking(
    state,
    { driver: format, file: { driver: "file", filename: backingName } },
    depth + 1,
  );
  return out;
}

/** Opens a node tree from (already validated) `BlockdevOptions`: the one path of `blockdev-add`/`--blockdev`. */
export async function blockdevAdd(state: DaemonState, options: unknown): Promise<BlockNode> {
  const tree = await withHeaderBacking(state, options as Record<string, unknown>);
  const node = await qmpErrors(() =>
    openBlockdev(state.graph, tree, {
      drivers: state.drivers as unknown as DriverTable,
      validate: false,
      requireNodeName: true,
    }),
  );
  recordCreation(state.graph, node);
  state.log.info("node added", { "node-name": node.nodeName, driver: node.driver.format });
  return node;
}

/** `blockdev-del` with QEMU's checks, in QEMU's order. */
async function blockdevDel(state: DaemonState, nodeName: string): Promise<void> {
  const node = state.graph.find(nodeName);
  if (node === undefined) throw generic(`Failed to find node with node-name='${nodeName}'`);
  if (node.parents.some((e) => !(e.parent instanceof BlockNodeClass) && e.parent.type === "block-backend"))
    throw generic(`Node ${nodeName} is in use`);
  if (!state.graph.isOwned(node)) throw generic(`Node ${nodeName} is not owned by the monitor`);
  if (node.parents.length > 0) throw generic(`Block device ${nodeName} is in use`);
  await qmpErrors(async () => {
    try {
      await node.flush();
    } catch (e) {
      state.log.warn("flush before close failed", { "node-name": nodeName, error: String(e) });
    }
    await state.graph.delete(node);
  });
  state.log.info("node deleted", { "node-name": nodeName });
}

// ------------------------------------------------------------------------------------------------
// query-named-block-nodes

/** An object with its keys in QEMU's QDict order, recursively (how QEMU prints `json:` filenames). */
function qdictOrdered(v: unknown): unknown {
  if (typeof v !== "object" || v === null || Array.isArray(v)) return v;
  const o = v as Record<string, unknown>;
  const out: Record<string, unknown> = {};
  for (const k of qdictKeyOrder(Object.keys(o))) out[k] = qdictOrdered(o[k]);
  return out;
}

const jsonFilename = (options: Record<string, unknown>): string =>
  `json:${encodeQmpJson(qdictOrdered(options))}`;

/** The options a node's filename must spell out when a plain filename cannot say it (QEMU's full_open_options). */
function fullOptions(node: BlockNode): Record<string, unknown> {
  const opts = (node.driverOptions ?? {}) as Record<string, unknown>;
  const fmt = node.driver.format;
  if (typeof opts.filename === "string") return { driver: fmt, filename: opts.filename };
  if (fmt === "null-co" || fmt === "null-aio") return { driver: fmt, ...nullOptions(opts) };
  const out: Record<string, unknown> = { driver: fmt };
  if (fmt === "throttle") out["throttle-group"] = opts["throttle-group"];
  for (const [name, edge] of node.children) out[name] = fullOptions(edge.child);
  return out;
}

function nullOptions(opts: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  if (opts.size !== undefined && opts.size !== 1073741824) out.size = opts.size;
  if (opts["read-zeroes"] === true) out["read-zeroes"] = true;
  if (opts["latency-ns"] !== undefined && opts["latency-ns"] !== 0) out["latency-ns"] = opts["latency-ns"];
  return out;
}

/** The filename QEMU shows for a node (`file` of BlockDeviceInfo, `filename` of ImageInfo). */
function nodeFilename(node: BlockNode): string {
  const opts = (node.driverOptions ?? {}) as Record<string, unknown>;
  const fmt = node.driver.format;
  if (typeof opts.filename === "string") return opts.filename;
  // Protocol drivers whose filename is not an option say it themselves (nbd: its URI).
  const own = (node.state as { filename?: unknown }).filename;
  if (typeof own === "string") return own;
  if (fmt === "null-co" || fmt === "null-aio") {
    const extra = nullOptions(opts);
    return Object.keys(extra).length === 0 ? `${fmt}://` : jsonFilename({ driver: fmt, ...extra });
  }
  // Filters with options of their own (throttle's group) cannot be named by their child's filename.
  if (fmt === "throttle") return jsonFilename(fullOptions(node));
  const child = node.children.get("file") ?? node.children.get("image");
  if (child !== undefined) return nodeFilename(child.child);
  return jsonFilename(fullOptions(node));
}

async function actualSize(node: BlockNode): Promise<number | undefined> {
  const fmt = node.driver.format;
  if (fmt === "null-co" || fmt === "null-aio") return 0;
  const opts = (node.driverOptions ?? {}) as Record<string, unknown>;
  if (typeof opts.filename === "string") {
    try {
      return (await stat(opts.filename)).blocks * 512;
    } catch {
      return undefined;
    }
  }
  const child = node.children.get("file") ?? node.children.get("image");
  return child === undefined ? undefined : actualSize(child.child);
}

async function imageInfo(node: BlockNode, flat: boolean): Promise<Record<string, unknown>> {
  const fmt = node.driver.format;
  const image: Record<string, unknown> = {
    filename: nodeFilename(node),
    format: fmt,
    "virtual-size": node.length,
  };
  const actual = await actualSize(node);
  if (actual !== undefined) image["actual-size"] = actual;
  let info: Awaited<ReturnType<BlockNode["info"]>> = {};
  try {
    info = await node.info();
  } catch {
    // a driver without info
  }
  if (fmt === "qcow2" && info.clusterSize !== undefined) image["cluster-size"] = info.clusterSize;
  const specific = info.formatSpecific as Record<string, unknown> | undefined;
  if (specific !== undefined) {
    // QEMU's ImageInfoSpecific is a union: {type: FORMAT, data: {…}}.
    image["format-specific"] =
      typeof specific.type === "string" && "data" in specific ? specific : { type: fmt, data: specific };
  }
  // QEMU takes it from bdrv_get_info, which some drivers (null-co, null-aio, nbd) do not answer.
  if (info.unsupported !== true) image["dirty-flag"] = false;
  // The backing file named in the image header (qcow2), whether or not a backing node is attached.
  let header: { backingFile?: string | undefined; backingFormat?: string | undefined } | undefined;
  try {
    header = (node.state as { header?: typeof header }).header;
  } catch {
    header = undefined;
  }
  if (header?.backingFile !== undefined) {
    image["backing-filename"] = header.backingFile;
    const { resolveBackingFilename } = await import("@blk/drivers/qcow2");
    image["full-backing-filename"] = resolveBackingFilename(image.filename as string, header.backingFile);
    if (header.backingFormat !== undefined) image["backing-filename-format"] = header.backingFormat;
  }
  const backing = node.backing;
  if (backing !== undefined && !flat) image["backing-image"] = await imageInfo(backing, false);
  return image;
}

function backingDepth(node: BlockNode): number {
  let depth = 0;
  for (let b = node.backing; b !== undefined; b = b.backing) depth++;
  return depth;
}

/** QEMU's `BlockDeviceInfo` of a node (what `query-named-block-nodes` lists). */
async function blockDeviceInfo(node: BlockNode, flat: boolean): Promise<Record<string, unknown>> {
  const o = node.options;
  const out: Record<string, unknown> = {
    file: nodeFilename(node),
    "node-name": node.nodeName,
    ro: node.readOnly,
    drv: node.driver.format,
    // QEMU counts the chain only while it walks it, which a flat answer does not.
    backing_file_depth: flat ? 0 : backingDepth(node),
    encrypted: false,
    detect_zeroes: o.detectZeroes,
    bps: 0,
    bps_rd: 0,
    bps_wr: 0,
    iops: 0,
    iops_rd: 0,
    iops_wr: 0,
    image: await imageInfo(node, flat),
    cache: { writeback: true, direct: o.cacheDirect, "no-flush": o.cacheNoFlush },
    write_threshold: node.writeThreshold,
  };
  const backing = node.backing;
  if (backing !== undefined) out.backing_file = nodeFilename(backing);
  if (node.bitmaps.length > 0) out["dirty-bitmaps"] = node.bitmaps.map((b) => b.info());
  return out;
}

const FlatArgs = q.object({ flat: q.optional(q.bool(), false) });
const DelArgs = q.object({ "node-name": q.str() });
const ResizeArgs = q.object({
  device: q.optional(q.str()),
  "node-name": q.optional(q.str()),
  size: q.int(),
});
const StatsArgs = q.object({ "query-nodes": q.optional(q.bool(), false) });

function nodeStats(node: BlockNode): Record<string, unknown> {
  const out: Record<string, unknown> = { "node-name": node.nodeName, stats: node.queryStats() };
  const file = node.children.get("file");
  if (file !== undefined) out.parent = nodeStats(file.child);
  const backing = node.children.get("backing");
  if (backing !== undefined) out.backing = nodeStats(backing.child);
  return out;
}

/** The node commands. */
export function nodeCommands(state: DaemonState): CommandDefinition<never, unknown>[] {
  return [
    defineCommand({
      name: "blockdev-add",
      args: BlockdevAddArgs,
      handler: async (args: unknown) => {
        await blockdevAdd(state, args as CommonBlockdevOptions);
        return {};
      },
    }),
    defineCommand({
      name: "blockdev-del",
      args: DelArgs,
      handler: async (args) => {
        await blockdevDel(state, args["node-name"]);
        return {};
      },
    }),
    defineCommand({
      name: "query-named-block-nodes",
      args: FlatArgs,
      handler: async (args) => {
        const out: Record<string, unknown>[] = [];
        for (const node of nodesNewestFirst(state.graph)) out.push(await blockDeviceInfo(node, args.flat));
        return out;
      },
    }),
    defineCommand({ name: "query-block", handler: () => [] }),
    defineCommand({ name: "x-debug-query-block-graph", handler: () => state.graph.debugGraph() }),
    defineCommand({
      name: "block_resize",
      args: ResizeArgs,
      handler: async (args) => {
        const node = lookupNode(state, args.device, args["node-name"]);
        if (args.size < 0) throw generic("Parameter 'size' expects a >0 size");
        await qmpErrors(async () => {
          const edge = state.graph.attach(backendParent(), node, {
            name: "root",
            perm: PERM.RESIZE,
            shared: PERM_ALL,
          });
          try {
            await edge.truncate(args.size);
          } finally {
            edge.detach();
          }
        });
        return {};
      },
    }),
    defineCommand({
      name: "query-blockstats",
      args: StatsArgs,
      // The storage daemon has no named BlockBackends: without query-nodes the list is empty.
      handler: (args) => (args["query-nodes"] ? state.graph.list().map(nodeStats) : []),
    }),
  ] as unknown as CommandDefinition<never, unknown>[];
}
