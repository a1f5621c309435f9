/**
 * The `qcow2` format driver: opens qcow2 v2 and v3 images as QEMU 7.2 writes them, with backing chains,
 * compressed clusters (deflate and zstd), extended L2 entries, internal snapshots and persistent bitmaps
 * parsed, block status for `qemu-img map`, QEMU's `info` data and a `check` without repair. Creates
 * images with qemu-img's layout ({@link createQcow2}). Opened read-write, it writes with QEMU's
 * crash-safe ordering (allocating writes, zero clusters, discard, lazy refcounts, copy on write of
 * clusters shared with internal snapshots, compressed writes for `convert -c`) and creates, applies and
 * deletes internal snapshots (`Qcow2State.createSnapshot` / `applySnapshot` / `deleteSnapshot`); images
 * with extended L2 entries or an external data file stay read-only (ENOTSUP on write).
 *
 * Children: `file` (required) holds the image; `backing` (optional) is the backing node — the driver
 * does not open it itself, because the graph attaches children before `open`. {@link openQcow2} opens a
 * whole chain the way qemu-img does (names resolved against the overlay's directory, `backing_fmt`
 * honoured, loops refused), and takes an `openBacking` hook to open backing files differently.
 *
 * Reference: /work/shared/spec/qcow2.md.
 */
import { realpath } from "node:fs/promises";
import {
  BlkError,
  type BlockDriver,
  BlockGraph,
  type BlockNode,
  backendParent,
  type Edge,
  type OpenContext,
  PERM,
  PERM_ALL,
} from "@blk/core";
import { fileDriver } from "../file/index.ts";
import { rawChildRole, rawDriver } from "../raw/index.ts";
import { expectInt, expectObject, expectString, rejectUnexpected } from "../registry/options.ts";
import { type CreateQcow2Options, createQcow2, type Qcow2CreateQapi, qcow2CreateOptions } from "./create.ts";
import {
  HEADER_PROBE_BYTES,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  MAX_L1_BYTES,
  parseBitmapDirectory,
  parseHeader,
  peekClusterBits,
  QCOW2_MAGIC,
  type Qcow2Bitmap,
  type Qcow2Header,
  type Qcow2Snapshot,
  readSnapshots,
} from "./format.ts";
import { Qcow2State } from "./state.ts";

export { CheckFailedError } from "./check.ts";
export { inflateCluster, zstdCluster } from "./compress.ts";
export { type CreateQcow2Options, createQcow2, type Qcow2CreateQapi, qcow2CreateOptions } from "./create.ts";
export {
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  COMPAT_LAZY_REFCOUNTS,
  featureNameTable,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  parseHeader,
  QCOW2_EXT,
  QCOW2_MAGIC,
  type Qcow2Bitmap,
  type Qcow2Extension,
  type Qcow2FeatureName,
  type Qcow2Header,
  type Qcow2Snapshot,
} from "./format.ts";
export { type Qcow2CheckResult, type Qcow2Run, Qcow2State, SC, type SubclusterType } from "./state.ts";

/** `BlockdevOptionsQcow2` members the driver uses (children are graph edges, not options). */
export interface Qcow2Options {
  /** L2 cache size in bytes (default: enough to cover the image, at most 32 MiB). */
  "l2-cache-size"?: number;
  /** Total metadata cache size in bytes; the L2 cache takes all of it (refcount blocks are cached apart). */
  "cache-size"?: number;
  /** `null`: do not use a backing file even if the image names one (reads of unallocated areas give zeroes). */
  backing?: null;
  /**
   * blk extension: read internal snapshot ID or name (ID tried first, as `qemu-img convert -l`) instead of
   * the current state.
   */
  "x-blk-snapshot"?: string;
  /**
   * blk extension, QEMU's `BDRV_O_CHECK` (what `qemu-img check -r` opens with): a read-write open accepts an
   * image with the corrupt bit set and leaves a dirty image unrepaired, for the check to repair.
   */
  "x-blk-check"?: boolean;
}

/** Default L2 cache budget per image (QEMU's DEFAULT_L2_CACHE_MAX_SIZE). */
export const DEFAULT_L2_CACHE_MAX: number = 32 * 1024 * 1024;

const IGNORED_OPTIONS = [
  "lazy-refcounts",
  "pass-discard-request",
  "pass-discard-snapshot",
  "pass-discard-other",
  "discard-no-unref",
  "overlap-check",
  "refcount-cache-size",
  "cache-clean-interval",
  "l2-cache-entry-size",
];

/** Validates qcow2 blockdev options (without `file`/`backing`/`data-file` children) with QEMU's wording. */
export const qcow2Schema: { parse(value: unknown): Qcow2Options } = {
  parse(value: unknown): Qcow2Options {
    const o = expectObject(value ?? {});
    const out: Qcow2Options = {};
    const l2 = expectInt(o, "l2-cache-size", 0);
    if (l2 !== undefined) out["l2-cache-size"] = l2;
    const all = expectInt(o, "cache-size", 0);
    if (all !== undefined) out["cache-size"] = all;
    if (o.backing === null) out.backing = null;
    const snap = expectString(o, "x-blk-snapshot", false);
    if (snap !== undefined) out["x-blk-snapshot"] = snap;
    if (o["x-blk-check"] === true) out["x-blk-check"] = true;
    else if (o["x-blk-check"] !== undefined && o["x-blk-check"] !== false) {
      throw new BlkError("EINVAL", "Parameter 'x-blk-check' expects 'on' or 'off'");
    }
    rejectUnexpected(o, [
      "l2-cache-size",
      "cache-size",
      "backing",
      "x-blk-snapshot",
      "x-blk-check",
      ...IGNORED_OPTIONS,
    ]);
    return out;
  },
};

/** QEMU's qcow2 probe: 100 for the magic with version >= 2, else 0. */
export function probeQcow2(header: Uint8Array): number {
  if (header.length < 8) return 0;
  const v = new DataView(header.buffer, header.byteOffset, header.length);
  return v.getUint32(0) === QCOW2_MAGIC && v.getUint32(4) >= 2 ? 100 : 0;
}

async function readEdge(edge: Edge, offset: number, length: number): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  const len = edge.length;
  if (offset < len) {
    const n = Math.min(length, len - offset);
    await edge.readInto(offset, out.subarray(0, n));
  }
  return out;
}

/** Reads and validates the header of the image behind `file` (first cluster, extensions, backing name). */
export async function readQcow2Header(file: Edge | BlockNode): Promise<Qcow2Header> {
  const len = file.length;
  const readAt = async (off: number, n: number): Promise<Uint8Array> => {
    const out = new Uint8Array(n);
    if (off < len) await file.readInto(off, out.subarray(0, Math.min(n, len - off)));
    return out;
  };
  const first = await readAt(0, HEADER_PROBE_BYTES);
  const bits = peekClusterBits(first);
  const cs = bits >= 9 && bits <= 21 ? 2 ** bits : HEADER_PROBE_BYTES;
  const cluster0 = cs > HEADER_PROBE_BYTES ? await readAt(0, cs) : first;
  return parseHeader(cluster0, len);
}

/** The L2 cache capacity in tables for an image (QEMU's automatic sizing within a budget). */
export function l2CacheEntries(h: Qcow2Header, budget: number = DEFAULT_L2_CACHE_MAX): number {
  const cs = 2 ** h.clusterBits;
  const entryBytes = (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0 ? 16 : 8;
  const maxNeeded = Math.ceil((Math.ceil(h.size / cs) * entryBytes) / cs);
  return Math.max(2, Math.min(maxNeeded, Math.floor(budget / cs)));
}

/**
 * The `qcow2` format driver. Children: `file` (required), `backing` and `data-file` (optional; see
 * {@link openQcow2} for opening them from the image header).
 * @example
 * const graph = new BlockGraph();
 * const file = await graph.open(fileDriver, { filename: "disk.qcow2" }, { readOnly: true, owned: false });
 * const node = await graph.open(qcow2Driver, {}, { readOnly: true, children: { file } });
 */
export const qcow2Driver: BlockDriver<Qcow2Options> & {
  create(options: CreateQcow2Options | Qcow2CreateQapi): Promise<void>;
} = {
  format: "qcow2",
  kind: "format",
  schema: qcow2Schema,
  childOptions: [{ name: "file" }, { name: "backing" }, { name: "data-file" }],
  probe(header: Uint8Array): number {
    return probeQcow2(header);
  },
  /** Creates an empty image with qemu-img's layout ({@link createQcow2}; options: {@link qcow2CreateOptions}). */
  async create(options: CreateQcow2Options | Qcow2CreateQapi): Promise<void> {
    await createQcow2(qcow2CreateOptions(options));
  },
  async open(options: Qcow2Options, ctx: OpenContext): Promise<Qcow2State> {
    const file = ctx.children.get("file");
    if (file === undefined) throw new BlkError("EINVAL", 'A block device must be specified for "file"');
    const h = await readQcow2Header(file);
    const forCheck = options["x-blk-check"] === true;
    if ((h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0 && !ctx.readOnly && !forCheck) {
      throw new BlkError("EACCES", "qcow2: Image is corrupt; cannot be opened read/write");
    }
    const cs = 2 ** h.clusterBits;
    const l1 = await readEdge(file, h.l1TableOffset, h.l1Size * 8);
    const reftable = await readEdge(file, h.refcountTableOffset, h.refcountTableClusters * cs);
    const read = (o: number, n: number): Promise<Uint8Array> => readEdge(file, o, n);
    const { snapshots, tableSize } = await readSnapshots(read, h);
    let bitmaps: Qcow2Bitmap[] = [];
    if (h.bitmaps !== undefined) {
      const dir = await readEdge(file, h.bitmaps.directoryOffset, h.bitmaps.directorySize);
      bitmaps = parseBitmapDirectory(dir, h.bitmaps.nbBitmaps, cs, h.size);
    }
    let dataFile: Edge | undefined;
    if ((h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0) {
      dataFile = ctx.children.get("data-file");
      if (dataFile === undefined) throw new BlkError("EINVAL", "'data-file' is required for this image");
    }
    const backing = options.backing === null ? undefined : ctx.children.get("backing");
    if (h.backingFile !== undefined && backing === undefined && options.backing !== null) {
      // Reading through a missing backing file would silently return zeroes: refuse instead.
      throw new BlkError(
        "ENOTSUP",
        `Image names backing file '${h.backingFile}' but no 'backing' child was given (open it with openQcow2, attach a 'backing' child, or pass backing: null)`,
      );
    }
    let view: { snapshot: Qcow2Snapshot; l1: Uint8Array } | undefined;
    const want = options["x-blk-snapshot"];
    if (want !== undefined) {
      const sn = snapshots.find((s) => s.id === want) ?? snapshots.find((s) => s.name === want);
      if (sn === undefined) throw new BlkError("ENOENT", "Can't find snapshot");
      if (sn.l1Size > MAX_L1_BYTES / 8) throw new BlkError("EFBIG", "Snapshot L1 table too large");
      if (sn.l1TableOffset % cs !== 0 || sn.l1TableOffset + sn.l1Size * 8 > Number.MAX_SAFE_INTEGER) {
        throw new BlkError("EINVAL", "Snapshot L1 table offset invalid");
      }
      view = { snapshot: sn, l1: await readEdge(file, sn.l1TableOffset, sn.l1Size * 8) };
    }
    const budget = options["l2-cache-size"] ?? options["cache-size"] ?? DEFAULT_L2_CACHE_MAX;
    const state = new Qcow2State({
      header: h,
      file,
      backing,
      dataFile,
      l1,
      view,
      reftable,
      snapshots,
      snapshotsSize: tableSize,
      bitmaps,
      l2CacheEntries: l2CacheEntries(h, budget),
      readOnly: ctx.readOnly,
    });
    // As QEMU: a dirty image (lazy refcounts, not closed cleanly) opened read-write is repaired first.
    if ((h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0 && !ctx.readOnly && !forCheck)
      await state.repairDirty();
    return state;
  },
};

/**
 * Resolves a backing file name stored in an image as QEMU does (qcow2.md §13): absolute names and names
 * with a protocol prefix (`:` before the first `/`) are kept; others are joined to the directory part of
 * the overlay's filename as given, without normalising.
 * @example resolveBackingFilename("sub/top.qcow2", "../base.qcow2") // "sub/../base.qcow2"
 */
export function resolveBackingFilename(overlay: string, backing: string): string {
  if (backing.startsWith("/")) return backing;
  const m = /[:/\\]/.exec(backing);
  if (m?.[0] === ":") return backing;
  const slash = overlay.lastIndexOf("/");
  return slash < 0 ? backing : overlay.slice(0, slash + 1) + backing;
}

/** Called to open a backing (or external data) file of an image in a chain. */
export type OpenBackingHook = (
  filename: string,
  format: string | undefined,
  graph: BlockGraph,
) => Promise<BlockNode>;

/** Options of {@link openQcow2}. */
export interface OpenQcow2Options {
  /** Graph to open the nodes in (default: a new one). */
  graph?: BlockGraph;
  /** Share every permission with other users, other processes included (`-U`). */
  forceShare?: boolean;
  /** Image locking of the `file` nodes (default `auto`). */
  locking?: "auto" | "on" | "off";
  /** `cache.no-flush=on` (QEMU's `unsafe` cache mode, qemu-img convert's default for its target). */
  cacheNoFlush?: boolean;
  /** Do not open the backing file (`backing: null`). */
  noBacking?: boolean;
  /** Driver options of the qcow2 nodes. */
  qcow2?: Qcow2Options;
  /**
   * Opens a backing file instead of the default (a `file` node, then `qcow2` or `raw` as named by
   * `backing_fmt` or probed). Must return a node of the same graph.
   */
  openBacking?: OpenBackingHook;
  /** Longest chain accepted (default 64): deeper chains fail with EINVAL. */
  maxDepth?: number;
  /** Open the top image read-write (default false); backing files stay read-only. */
  writable?: boolean;
  /** With `writable`: the user edge also holds `resize` (for `truncate`, as `qemu-img resize`). */
  resize?: boolean;
  /** The nodes' `discard` option (default `ignore`: discard requests do nothing, as in QEMU). */
  discard?: "ignore" | "unmap";
}

/** What {@link openQcow2} returns. */
export interface OpenedQcow2 extends AsyncDisposable {
  readonly graph: BlockGraph;
  /** The top qcow2 node. */
  readonly node: BlockNode;
  /** The top node's driver state (parsed metadata: header, snapshots, bitmaps). */
  readonly state: Qcow2State;
  /** The user edge on the top node (consistent-read, plus write when `writable`). */
  readonly root: Edge;
  /** Format nodes of the chain, top first. */
  readonly chain: readonly BlockNode[];
  /** Detaches the user and deletes every node opened. Idempotent. */
  close(): Promise<void>;
}

/**
 * Opens a qcow2 image with its backing chain (read-only unless `writable`; backing files always
 * read-only), as `qemu-img` does: each backing file is resolved against its overlay's directory
 * ({@link resolveBackingFilename}) and opened with the stored `backing_fmt` (probed when absent); a chain
 * that comes back to a file already in it is refused.
 * @throws {BlkError} ENOENT for a missing file (`Could not open 'F': No such file or directory`), EINVAL
 *   for a loop (qemu-img's `Backing file 'F' creates an infinite loop.`) or a bad header (QEMU's messages), ENOTSUP for
 *   unsupported features
 * @example
 * await using img = await openQcow2("top.qcow2");
 * const data = await img.root.read(0, 65536);
 */
export async function openQcow2(filename: string, options: OpenQcow2Options = {}): Promise<OpenedQcow2> {
  const graph = options.graph ?? new BlockGraph();
  const opened: BlockNode[] = [];
  const chain: BlockNode[] = [];
  const maxDepth = options.maxDepth ?? 64;
  const nodeOpts = {
    readOnly: true,
    forceShare: options.forceShare ?? false,
    cacheNoFlush: options.cacheNoFlush ?? false,
  };

  const writable = options.writable ?? false;
  const openFile = async (name: string, top = false): Promise<BlockNode> => {
    const n = await graph.open(
      fileDriver,
      { filename: name, ...(options.locking === undefined ? {} : { locking: options.locking }) },
      { ...nodeOpts, readOnly: !(top && writable), owned: false },
    );
    opened.push(n);
    return n;
  };

  const openLayer = async (
    name: string,
    format: string | undefined,
    seen: readonly string[],
    top: boolean,
  ): Promise<BlockNode> => {
    if (seen.length > maxDepth) throw new BlkError("EINVAL", `Backing chain of '${filename}' is too deep`);
    let real: string;
    try {
      real = await realpath(name);
    } catch {
      real = name;
    }
    if (seen.includes(real)) throw new BlkError("EINVAL", `Backing file '${name}' creates an infinite loop.`);
    if (!top && options.openBacking !== undefined) {
      const n = await options.openBacking(name, format, graph);
      return n;
    }
    const file = await openFile(name, top);
    let fmt = format;
    if (fmt === undefined) {
      const head = await file.read(0, Math.min(512, file.length));
      fmt = probeQcow2(head) > 0 ? "qcow2" : "raw";
    }
    if (fmt === "raw") {
      const n = await graph.open(
        rawDriver,
        {},
        {
          ...nodeOpts,
          owned: false,
          children: { file: { node: file, role: rawChildRole({}) } },
        },
      );
      opened.push(n);
      chain.push(n);
      return n;
    }
    if (fmt !== "qcow2") throw new BlkError("EINVAL", `Unknown driver '${fmt}'`);
    const h = await readQcow2Header(file);
    const children: Record<string, BlockNode> = { file };
    const self = chain.length;
    chain.push(file); // placeholder, replaced below
    if (h.backingFile !== undefined && options.noBacking !== true) {
      const bname = resolveBackingFilename(name, h.backingFile);
      children.backing = await openLayer(bname, h.backingFormat, [...seen, real], false);
    }
    if ((h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0 && h.dataFile !== undefined) {
      const dname = resolveBackingFilename(name, h.dataFile);
      children["data-file"] = await openFile(dname);
    }
    const qopts: Qcow2Options =
      children.backing === undefined && h.backingFile !== undefined
        ? { ...options.qcow2, backing: null }
        : (options.qcow2 ?? {});
    const n = await graph.open(qcow2Driver, qopts, {
      ...nodeOpts,
      // Backing files inherit it, as QEMU's backing children inherit BDRV_O_UNMAP (a commit's base).
      ...(options.discard !== undefined ? { discard: options.discard } : {}),
      readOnly: !(top && writable),
      owned: top,
      children,
    });
    opened.push(n);
    chain[self] = n;
    return n;
  };

  try {
    const node = await openLayer(filename, "qcow2", [], true);
    const root = graph.attach(backendParent(), node, {
      name: "root",
      perm:
        (writable ? PERM.CONSISTENT_READ | PERM.WRITE : PERM.CONSISTENT_READ) |
        (writable && options.resize === true ? PERM.RESIZE : 0),
      shared: PERM_ALL,
    });
    let closing: Promise<void> | undefined;
    const close = (): Promise<void> => {
      closing ??= (async () => {
        root.detach();
        await graph.delete(node, { force: true });
        for (const n of opened.reverse()) {
          if (graph.find(n.nodeName) !== undefined) await graph.delete(n, { force: true });
        }
      })();
      return closing;
    };
    return {
      graph,
      node,
      state: node.state as Qcow2State,
      root,
      chain,
      close,
      [Symbol.asyncDispose]: close,
    };
  } catch (e) {
    for (const n of opened.reverse()) await graph.delete(n, { force: true }).catch(() => {});
    throw e;
  }
}

/**
 * QEMU's `ImageInfo` for a qcow2 node as `qemu-img info --output=json` prints it (without
 * `actual-size`, which needs the host file's allocation).
 */
export function qcow2ImageInfo(state: Qcow2State, filename: string): Record<string, unknown> {
  const info: Record<string, unknown> = {
    "virtual-size": state.size,
    filename,
    "cluster-size": state.clusterSize,
    format: "qcow2",
    "format-specific": { type: "qcow2", data: state.formatSpecific() },
    "dirty-flag": state.dirty,
  };
  const b = state.backingFilename;
  if (b !== undefined) {
    info["backing-filename"] = b;
    info["full-backing-filename"] = resolveBackingFilename(filename, b);
    if (state.backingFormat !== undefined) info["backing-filename-format"] = state.backingFormat;
  }
  if (state.snapshots.length > 0) info.snapshots = state.snapshotInfo();
  return info;
}
