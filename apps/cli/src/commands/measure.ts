/**
 * `blk-img measure [--output=human|json] [-O fmt] [-o options] [--size N | [--image-opts] [-f fmt]
 * [-l snapshot] filename]`: the sizes qemu-img 7.2 computes for a new image (qemu-img.md §11) — `raw`
 * (the virtual size, rounded to sectors without a source) and `qcow2` (its metadata for a fully
 * populated image plus the clusters the source's data needs, and the space its persistent bitmaps need).
 */
import type { BlockNode } from "@blk/core";
import { getDriver, type OpenedImage, openImage } from "@blk/drivers";
import { openQcow2 } from "@blk/drivers/qcow2";
import { type Context, PROG } from "../context.ts";
import type { CreateOption } from "../create-image.ts";
import { CliError, invalidSize, messageOf } from "../errors.ts";
import { checkOptionList, getopt } from "../getopt.ts";
import { openImg, outputFormat, splitOptions } from "../image.ts";
import { parseSize } from "../size.ts";
import { ExtentCursor } from "../status.ts";
import { commandHelp } from "../usage.ts";
import { collectOptions } from "./create.ts";

/** QEMU's `BlockMeasureInfo`. */
export interface MeasureInfo {
  required: number;
  "fully-allocated": number;
  bitmaps?: number;
}

/** qcow2 creation options as measure reads them. */
export interface Qcow2MeasureOptions {
  clusterSize: number;
  extendedL2: boolean;
  version: 2 | 3;
  refcountBits: number;
  preallocation: "off" | "metadata" | "falloc" | "full";
  hasBackingFile: boolean;
  /** `size` option (bytes; 0 when absent). */
  size: number;
}

/** What measure needs to know of the source image. */
export interface MeasureSource {
  /** Virtual size in bytes. */
  length: number;
  /** Bytes of guest clusters holding data (`cluster`-aligned count of clusters with allocated data). */
  dataClusters(clusterSize: number): Promise<number>;
  /** Persistent bitmaps (name, granularity) when the source format can store them; undefined otherwise. */
  bitmaps: readonly { name: string; granularity: number }[] | undefined;
}

const roundUp = (n: number, m: number): number => Math.ceil(n / m) * m;
const divUp = (n: number, m: number): number => Math.ceil(n / m);

/**
 * Refcount table and block bytes for `clusters` host clusters (QEMU's fixed point: the refcount
 * structures count themselves too).
 */
export function refcountMetadataSize(clusters: number, clusterSize: number, refcountOrder: number): number {
  const perTableCluster = clusterSize / 8;
  const perBlock = (clusterSize * 8) / 2 ** refcountOrder;
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last: number;
  do {
    last = n;
    blocks = divUp(clusters + table + blocks, perBlock);
    table = divUp(blocks, perTableCluster);
    n = clusters + blocks + table;
  } while (n !== last);
  return (blocks + table) * clusterSize;
}

/** Size of a fully allocated qcow2 image of `size` bytes: header, L2 tables, L1 table, refcounts, data. */
export function qcow2PreallocSize(
  size: number,
  clusterSize: number,
  refcountOrder: number,
  extendedL2: boolean,
): number {
  const aligned = roundUp(size, clusterSize);
  const l2e = extendedL2 ? 16 : 8;
  let meta = clusterSize;
  const nl2e = roundUp(aligned / clusterSize, clusterSize / l2e);
  meta += nl2e * l2e;
  const nl1e = roundUp((nl2e * l2e) / clusterSize, clusterSize / 8);
  meta += nl1e * 8;
  meta += refcountMetadataSize((meta + aligned) / clusterSize, clusterSize, refcountOrder);
  return meta + aligned;
}

/** Bytes a qcow2 image of cluster size `clusterSize` needs to store `bitmaps` of a `length`-byte disk. */
export function qcow2BitmapsSize(
  bitmaps: readonly { name: string; granularity: number }[],
  length: number,
  clusterSize: number,
): number {
  let size = 0;
  let dir = 0;
  for (const b of bitmaps) {
    const bytes = divUp(divUp(length, b.granularity), 8);
    const clusters = divUp(bytes, clusterSize);
    size += clusters * clusterSize;
    size += roundUp(clusters * 8, clusterSize);
    dir += roundUp(24 + Buffer.byteLength(b.name, "utf8"), 8);
  }
  return size + roundUp(dir, clusterSize);
}

/** QEMU's qcow2 measure. @throws {CliError} the size limit */
export async function measureQcow2(
  o: Qcow2MeasureOptions,
  src: MeasureSource | undefined,
): Promise<MeasureInfo> {
  const cs = o.clusterSize;
  let virtual = roundUp(o.size, cs);
  const l2e = o.extendedL2 ? 16 : 8;
  const l2Tables = divUp(virtual / cs, cs / l2e);
  if (l2Tables * 8 > 32 * 1024 * 1024) {
    throw new CliError("The image size is too large (try using a larger cluster size)");
  }
  let required = 0;
  if (src !== undefined) {
    virtual = roundUp(src.length, cs);
    required = o.hasBackingFile ? virtual : await src.dataClusters(cs);
  }
  if (o.preallocation === "full" || o.preallocation === "falloc") required = virtual;
  const full = qcow2PreallocSize(virtual, cs, Math.log2(o.refcountBits), o.extendedL2);
  const info: MeasureInfo = { required: full - virtual + required, "fully-allocated": full };
  if (o.version >= 3 && src?.bitmaps !== undefined)
    info.bitmaps = qcow2BitmapsSize(src.bitmaps, src.length, cs);
  return info;
}

const invalidOptions = (format: string, why: string, bare: string[] = []): CliError =>
  new CliError(why, { bare: [...bare, `${PROG}: Invalid options for file format '${format}'`] });

const QCOW2_KEYS = [
  "size",
  "compat",
  "backing_file",
  "backing_fmt",
  "encryption",
  "encrypt.format",
  "cluster_size",
  "preallocation",
  "lazy_refcounts",
  "refcount_bits",
  "data_file",
  "data_file_raw",
  "compression_type",
  "extended_l2",
];
const FILE_KEYS = ["size", "preallocation", "nocow", "extent_size_hint"];
const SIZE_KEYS = ["size", "cluster_size", "extent_size_hint"];
const BOOL_KEYS = ["extended_l2", "lazy_refcounts", "data_file_raw", "nocow", "encryption"];
const NUMBER_KEYS = ["refcount_bits"];
const SIZE_BARE = [
  "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-",
  "and exabytes, respectively.",
];

/**
 * Parses `-o` for `format` as QEMU's option parser does (known names, typed values), last value wins.
 * @throws {CliError} `Invalid parameter 'k'` / `Parameter 'k' expects …` + `Invalid options for file format 'F'`
 */
export function parseMeasureOptions(format: string, given: readonly CreateOption[]): Map<string, string> {
  const known = format === "qcow2" ? [...QCOW2_KEYS, ...FILE_KEYS] : FILE_KEYS;
  const out = new Map<string, string>();
  for (const [k, v] of given) {
    if (!known.includes(k) && !(format === "qcow2" && k.startsWith("encrypt."))) {
      throw invalidOptions(format, `Invalid parameter '${k}'`);
    }
    if (SIZE_KEYS.includes(k)) {
      const s = parseSize(v);
      if (!s.ok)
        throw invalidOptions(format, `Parameter '${k}' expects a non-negative number below 2^64`, SIZE_BARE);
      out.set(k, String(s.value));
    } else if (BOOL_KEYS.includes(k)) {
      if (v !== "on" && v !== "off") throw invalidOptions(format, `Parameter '${k}' expects 'on' or 'off'`);
      out.set(k, v);
    } else if (NUMBER_KEYS.includes(k)) {
      if (!/^(0[xX][0-9a-fA-F]+|[0-9]+)$/.test(v))
        throw invalidOptions(format, `Parameter '${k}' expects a number`);
      out.set(k, String(Number(v)));
    } else {
      out.set(k, v);
    }
  }
  return out;
}

/**
 * The qcow2 options measure uses, checked with QEMU's messages.
 * @throws {CliError} cluster size, compat level, refcount width, preallocation errors
 */
export function qcow2MeasureOptions(opts: ReadonlyMap<string, string>): Qcow2MeasureOptions {
  const extendedL2 = opts.get("extended_l2") === "on";
  const cs = Number(opts.get("cluster_size") ?? 65536);
  if (!(cs >= 512 && cs <= 2 << 20 && (cs & (cs - 1)) === 0)) {
    throw new CliError("Cluster size must be a power of two between 512 and 2048k");
  }
  if (extendedL2 && cs < 16384) {
    throw new CliError("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
  }
  const compat = opts.get("compat");
  let version: 2 | 3 = 3;
  if (compat === "0.10") version = 2;
  else if (compat !== undefined && compat !== "1.1")
    throw new CliError(`Invalid compatibility level: '${compat}'`);
  const refcountBits = Number(opts.get("refcount_bits") ?? 16);
  if (!(refcountBits > 0 && refcountBits <= 64 && (refcountBits & (refcountBits - 1)) === 0)) {
    throw new CliError("Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (version < 3 && refcountBits !== 16) {
    throw new CliError(
      "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
    );
  }
  const p = opts.get("preallocation") ?? "off";
  if (p !== "off" && p !== "metadata" && p !== "falloc" && p !== "full") {
    throw new CliError(`invalid parameter value: ${p}`);
  }
  if (opts.get("encrypt.format") === "luks") {
    throw new CliError("Measuring LUKS-encrypted qcow2 images is not supported by blk-img yet");
  }
  return {
    clusterSize: cs,
    extendedL2,
    version,
    refcountBits,
    preallocation: p,
    hasBackingFile: opts.has("backing_file"),
    size: Number(opts.get("size") ?? 0),
  };
}

/** Bytes of the `clusterSize` clusters holding data in `node` (over its whole chain), as QEMU counts them. */
async function dataClusterBytes(node: BlockNode, clusterSize: number): Promise<number> {
  const len = node.length;
  const cursor = new ExtentCursor(node, len);
  let required = 0;
  for (let pos = 0; pos < len; ) {
    const e = await cursor.at(pos);
    if (e.length <= 0) break;
    if (!e.zero && e.data && e.allocated) {
      const end = roundUp(e.offset + e.length, clusterSize);
      required += (e.offset % clusterSize) + (end - e.offset);
      pos = end;
    } else {
      pos = e.offset + e.length;
    }
  }
  return required;
}

/** Persistent bitmaps of a qcow2 v3 node; undefined when the node cannot store any (other formats, v2). */
function persistentBitmaps(node: BlockNode): { name: string; granularity: number }[] | undefined {
  if (node.driver.format !== "qcow2") return undefined;
  const st = node.state as unknown as {
    header?: { version?: number };
    bitmaps?: readonly { name: string; granularityBits: number }[];
  };
  if (st.header?.version !== 3) return undefined;
  return (st.bitmaps ?? []).map((b) => ({ name: b.name, granularity: 2 ** b.granularityBits }));
}

/** `-l ID_OR_NAME` or `-l snapshot.id=I,snapshot.name=N`: the snapshot's ID or name to look up. */
function snapshotParam(text: string): string {
  if (!text.startsWith("snapshot.")) return text;
  const kv = new Map(splitOptions(text));
  const id = kv.get("snapshot.id");
  const name = kv.get("snapshot.name");
  for (const k of kv.keys()) {
    if (k !== "snapshot.id" && k !== "snapshot.name") {
      throw new CliError(`Invalid parameter '${k}'`, {
        bare: [`${PROG}: Failed in parsing snapshot param '${text}'`],
      });
    }
  }
  return id ?? name ?? "";
}

/**
 * Re-opens `img` (closed here) as the read-only view of one of its internal snapshots (qemu-img's
 * `bdrv_snapshot_load_tmp`).
 * @throws {CliError} `Failed to load snapshot: …`
 */
async function openSnapshot(
  img: OpenedImage,
  filename: string,
  param: string,
  forceShare: boolean,
): Promise<OpenedImage> {
  const format = img.format;
  await img.close();
  const want = snapshotParam(param);
  if (format !== "qcow2") {
    throw new CliError(
      `Failed to load snapshot: Block format '${format}' used by device '' does not support temporarily loading internal snapshots`,
    );
  }
  // Only the top layer shows the snapshot: its backing files are opened as they are.
  const below: OpenedImage[] = [];
  const closeBelow = async (): Promise<void> => {
    for (const b of below.reverse()) await b.close();
  };
  try {
    const q = await openQcow2(filename, {
      forceShare,
      qcow2: { "x-blk-snapshot": want },
      openBacking: async (name, fmt, graph) => {
        const b = await openImage(name, {
          graph,
          readOnly: true,
          forceShare,
          ...(fmt === undefined ? {} : { format: fmt }),
        });
        below.push(b);
        return b.node;
      },
    });
    const close = async (): Promise<void> => {
      await q.close();
      await closeBelow();
    };
    return {
      graph: q.graph,
      node: q.node,
      file: q.node.children.get("file")?.child,
      format,
      probed: false,
      root: q.root,
      warnings: [],
      close,
      [Symbol.asyncDispose]: close,
    };
  } catch (e) {
    await closeBelow();
    throw new CliError(`Failed to load snapshot: ${messageOf(e)}`);
  }
}

/** Formats QEMU knows that have no size measurement. */
const QEMU_NO_MEASURE = ["vmdk", "vdi", "vhdx", "vpc", "qed", "qcow", "parallels", "luks", "file", "nbd"];

/** Runs `measure`. */
export async function measure(args: readonly string[], ctx: Context): Promise<number> {
  const { options, operands } = getopt(args, "hf:o:O:l:U", [
    { name: "help", hasArg: false, key: "h" },
    { name: "image-opts", hasArg: false },
    { name: "object", hasArg: true },
    { name: "output", hasArg: true },
    { name: "size", hasArg: true },
    { name: "force-share", hasArg: false, key: "U" },
  ]);
  let format: string | undefined;
  let outFormat = "raw";
  const oArgs: string[] = [];
  let snapshot: string | undefined;
  let imageOpts = false;
  let output: string | undefined;
  let size: number | undefined;
  let forceShare = false;
  for (const o of options) {
    switch (o.key) {
      case "h":
        ctx.out(commandHelp("measure"));
        return 0;
      case "f":
        format = o.value;
        break;
      case "O":
        outFormat = o.value;
        break;
      case "o":
        checkOptionList(o.value);
        oArgs.push(o.value);
        break;
      case "l":
        snapshot = o.value;
        break;
      case "image-opts":
        imageOpts = true;
        break;
      case "output":
        output = o.value;
        break;
      case "U":
        forceShare = true;
        break;
      case "size": {
        const s = parseSize(o.value);
        if (!s.ok || o.value.trimStart().startsWith("-") || s.value > (1n << 63n) - 1n) {
          throw invalidSize("image size");
        }
        size = Number(s.value);
        break;
      }
      default:
        break;
    }
  }
  const ofmt = outputFormat(output);
  if (operands.length > 1) throw new CliError("At most one filename argument is allowed.");
  const filename = operands[0];
  if (filename === undefined && (imageOpts || format !== undefined || snapshot !== undefined)) {
    throw new CliError("--image-opts, -f, and -l require a filename argument.");
  }
  if (filename !== undefined && size !== undefined) {
    throw new CliError("--size N cannot be used together with a filename.");
  }
  if (filename === undefined && size === undefined) {
    throw new CliError("Either --size N or one filename must be specified.");
  }
  if (imageOpts && format !== undefined)
    throw new CliError("--image-opts and --format are mutually exclusive");

  let img: OpenedImage | undefined;
  try {
    if (filename !== undefined) {
      img = await openImg({ filename, format, imageOpts, readOnly: true, forceShare });
      if (snapshot !== undefined) {
        const opened = img;
        img = undefined;
        img = await openSnapshot(opened, filename, snapshot, forceShare);
      }
    }
    if (outFormat !== "raw" && outFormat !== "qcow2") {
      if (getDriver(outFormat) !== undefined || QEMU_NO_MEASURE.includes(outFormat)) {
        throw new CliError(`Block driver '${outFormat}' does not support size measurement`);
      }
      throw new CliError(`Unknown file format '${outFormat}'`);
    }
    const opts = parseMeasureOptions(outFormat, collectOptions(oArgs));
    if (size !== undefined) opts.set("size", String(size));
    const node = img?.node;
    let info: MeasureInfo;
    if (outFormat === "raw") {
      const n = node === undefined ? roundUp(Number(opts.get("size") ?? 0), 512) : node.length;
      info = { required: n, "fully-allocated": n };
    } else {
      const q = qcow2MeasureOptions(opts);
      const src: MeasureSource | undefined =
        node === undefined
          ? undefined
          : {
              length: node.length,
              dataClusters: (cs) => dataClusterBytes(node, cs),
              bitmaps: persistentBitmaps(node),
            };
      try {
        info = await measureQcow2(q, src);
      } catch (e) {
        if (e instanceof CliError) throw e;
        throw new CliError(`Unable to get block status: ${messageOf(e)}`);
      }
    }
    if (ofmt === "json") {
      const out: Record<string, number> = {};
      if (info.bitmaps !== undefined) out.bitmaps = info.bitmaps;
      out.required = info.required;
      out["fully-allocated"] = info["fully-allocated"];
      ctx.out(`${JSON.stringify(out, null, 4)}\n`);
    } else {
      ctx.out(`required size: ${info.required}\nfully allocated size: ${info["fully-allocated"]}\n`);
      if (info.bitmaps !== undefined) ctx.out(`bitmaps size: ${info.bitmaps}\n`);
    }
    return 0;
  } finally {
    await img?.close();
  }
}
