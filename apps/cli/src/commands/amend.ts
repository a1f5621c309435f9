/**
 * `blk-img amend [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename`
 * (qemu-img.md §12): what qemu-img 7.2 amends on qcow2, in QEMU's order — upgrade to v3, refcount width
 * (every refcount structure rewritten), lazy refcounts, virtual size, then the downgrade to v2 (zero
 * clusters turned into data, incompatible features refused). The header is rewritten as QEMU lays it out
 * ({@link writeHeader}); data moves go through the qcow2 driver. Changing the backing file is refused as
 * in 7.2 (`rebase` does it). Prints nothing on success.
 */
import { type BlockNode, backendParent, PERM, PERM_ALL } from "@blk/core";
import { type OpenedImage, openImage } from "@blk/drivers";
import {
  COMPAT_LAZY_REFCOUNTS,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DATA_FILE,
  type Qcow2Header,
  type Qcow2Snapshot,
} from "@blk/drivers/qcow2";
import {
  assertEditable,
  changeRefcountOrder,
  expandZeroClusters,
  readHeader,
  writeHeader,
} from "../amend-qcow2.ts";
import { type Context, PROG } from "../context.ts";
import { CliError, messageOf, usage } from "../errors.ts";
import { checkOptionList, getopt } from "../getopt.ts";
import { checkCacheMode, layerFilename, openImg } from "../image.ts";
import { makeProgress } from "../progress.ts";
import { parseSize } from "../size.ts";
import { commandHelp } from "../usage.ts";
import { collectOptions } from "./create.ts";

type OptType = "str" | "bool" | "num" | "size";

/** qcow2's amend options in QEMU's declaration order, with their types and help texts. */
const AMEND_OPTS: readonly [name: string, type: OptType, help: string][] = [
  ["size", "size", "Virtual disk size"],
  ["compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"],
  ["backing_file", "str", "File name of a base image"],
  ["backing_fmt", "str", "Image format of the base image"],
  ["data_file", "str", "File name of an external data file"],
  ["data_file_raw", "bool", "The external data file must stay valid as a raw image"],
  ["lazy_refcounts", "bool", "Postpone refcount updates"],
  ["refcount_bits", "num", "Width of a reference count entry in bits"],
  ["encrypt.state", "str", "Select new state of affected keyslots (active/inactive)"],
  ["encrypt.keyslot", "num", "Select a single keyslot to modify explicitly"],
  ["encrypt.old-secret", "str", "Select all keyslots that match this password"],
  ["encrypt.new-secret", "str", "New secret to set in the matching keyslots. Empty string to erase"],
  ["encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"],
];

/** qcow2 creation-only options (accepted by `create`, refused by `amend` with a hint). */
const CREATE_ONLY: readonly [string, OptType][] = [
  ["encryption", "bool"],
  ["cluster_size", "size"],
  ["preallocation", "str"],
  ["compression_type", "str"],
  ["extended_l2", "bool"],
  ["encrypt.format", "str"],
  ["encrypt.key-secret", "str"],
  ["encrypt.cipher-alg", "str"],
  ["encrypt.cipher-mode", "str"],
  ["encrypt.ivgen-alg", "str"],
  ["encrypt.ivgen-hash-alg", "str"],
  ["encrypt.hash-alg", "str"],
  ["nocow", "bool"],
  ["extent_size_hint", "size"],
];

const SIZE_BARE = [
  "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-",
  "and exabytes, respectively.",
];

/** `-o help` of `amend` for `format`. @throws {CliError} for formats without amendment */
export function amendHelp(format: string): string {
  if (format !== "qcow2") throw new CliError(`Format driver '${format}' does not support option amendment`);
  const lines = [`Amend options for '${format}':`];
  const typeText: Record<OptType, string> = { str: "str", bool: "bool (on/off)", num: "num", size: "size" };
  const sorted = [...AMEND_OPTS].sort((a, b) => (a[0] < b[0] ? -1 : 1));
  for (const [name, type, help] of sorted) {
    lines.push(`  ${`${name}=<${typeText[type]}>`.padEnd(22)} - ${help}`);
  }
  return `${lines.join("\n")}\n`;
}

/** Parses `given` against `known`; returns the typed values or the first error (QEMU's option parser). */
function parseTyped(
  given: readonly (readonly [string, string])[],
  known: readonly (readonly [string, OptType])[],
): { values: Map<string, string | number | boolean>; error?: CliError } {
  const values = new Map<string, string | number | boolean>();
  for (const [k, v] of given) {
    const type = known.find(([n]) => n === k)?.[1];
    if (type === undefined) return { values, error: new CliError(`Invalid parameter '${k}'`) };
    if (type === "bool") {
      if (v !== "on" && v !== "off")
        return { values, error: new CliError(`Parameter '${k}' expects 'on' or 'off'`) };
      values.set(k, v === "on");
    } else if (type === "num") {
      if (!/^(0[xX][0-9a-fA-F]+|[0-9]+)$/.test(v)) {
        return { values, error: new CliError(`Parameter '${k}' expects a number`) };
      }
      values.set(k, Number(v));
    } else if (type === "size") {
      const s = parseSize(v);
      if (!s.ok) {
        return {
          values,
          error: new CliError(`Parameter '${k}' expects a non-negative number below 2^64`, {
            bare: SIZE_BARE,
          }),
        };
      }
      values.set(k, Number(s.value));
    } else {
      values.set(k, v);
    }
  }
  return { values };
}

/**
 * The amend options, typed, as qemu-img parses them.
 * @throws {CliError} `Invalid parameter 'k'` (plus `This option is only supported for image creation`
 *   for creation options), typed value errors
 */
export function parseAmendOptions(
  given: readonly (readonly [string, string])[],
): Map<string, string | number | boolean> {
  const amend = AMEND_OPTS.map(([n, t]) => [n, t] as const);
  const r = parseTyped(given, amend);
  if (r.error === undefined) return r.values;
  const asCreate = parseTyped(given, [...amend, ...CREATE_ONLY]);
  if (asCreate.error === undefined) {
    throw new CliError(r.error.message, {
      bare: [...r.error.bare, "This option is only supported for image creation"],
    });
  }
  throw r.error;
}

/** What amend reads of the open image (the qcow2 driver's state). */
interface Qcow2View {
  header: Qcow2Header;
  snapshots: readonly Qcow2Snapshot[];
  clusterSize: number;
}

/** Runs `amend`. */
export async function amend(args: readonly string[], ctx: Context): Promise<number> {
  const { options, operands } = getopt(args, "ho:f:t:pq", [
    { name: "help", hasArg: false, key: "h" },
    { name: "object", hasArg: true },
    { name: "image-opts", hasArg: false },
    { name: "force", hasArg: false },
  ]);
  const oArgs: string[] = [];
  let format: string | undefined;
  let cache = "writeback";
  let progress = false;
  let quiet = false;
  let imageOpts = false;
  for (const o of options) {
    switch (o.key) {
      case "h":
        ctx.out(commandHelp("amend"));
        return 0;
      case "o":
        checkOptionList(o.value);
        oArgs.push(o.value);
        break;
      case "f":
        format = o.value;
        break;
      case "t":
        cache = o.value;
        break;
      case "p":
        progress = true;
        break;
      case "q":
        quiet = true;
        break;
      case "image-opts":
        imageOpts = true;
        break;
      default:
        break;
    }
  }
  if (oArgs.length === 0) throw usage("Must specify options (-o)");
  if (quiet) progress = false;
  const given = collectOptions(oArgs);
  const wantsHelp = given.some(([k]) => k === "help" || k === "?");
  if (format !== undefined && wantsHelp) {
    ctx.out(amendHelp(format));
    return 0;
  }
  if (operands.length !== 1) throw new CliError("Expecting one image file name");
  const filename = operands[0] ?? "";
  checkCacheMode(cache);
  if (imageOpts && format !== undefined)
    throw new CliError("--image-opts and --format are mutually exclusive");
  const bar = makeProgress(ctx, progress);
  const img = await openImg({
    filename,
    format,
    imageOpts,
    readOnly: true,
    readsData: false,
    onWarning: (m) => ctx.err(`${m}\n`),
  });
  let view: Qcow2View;
  let host: string | undefined;
  let size: number;
  try {
    if (wantsHelp) {
      ctx.out(amendHelp(img.format));
      return 0;
    }
    if (img.format !== "qcow2") {
      throw new CliError(`Format driver '${img.format}' does not support option amendment`);
    }
    const st = img.node.state as unknown as Qcow2View;
    try {
      assertEditable(st.header);
    } catch (e) {
      throw new CliError(`Could not open '${filename}': ${messageOf(e)}`);
    }
    view = { header: structuredClone(st.header), snapshots: [...st.snapshots], clusterSize: st.clusterSize };
    host = layerFilename(img.node);
    size = img.node.length;
  } finally {
    await img.close();
  }
  if (host === undefined || imageOpts)
    throw new CliError("blk-img amend needs the image's file name (no --image-opts)");
  const opts = parseAmendOptions(given);
  bar.update(0);
  try {
    await amendQcow2(host, view, size, opts);
  } catch (e) {
    bar.interrupt();
    if (e instanceof CliError) throw e;
    throw new CliError(messageOf(e));
  }
  bar.update(1);
  bar.end();
  return 0;
}

/** Runs `fn` with the image's protocol node open read-write (no format driver on top). */
async function withFile<T>(filename: string, fn: (img: OpenedImage) => Promise<T>): Promise<T> {
  const file = await openImage(filename, { format: "file", resize: true });
  try {
    return await fn(file);
  } finally {
    await file.close();
  }
}

/** Runs `fn` with the image open read-write through the qcow2 driver (with its chain). */
async function withDriver<T>(
  filename: string,
  fn: (node: BlockNode, img: OpenedImage) => Promise<T>,
): Promise<T> {
  const img = await openImg({ filename, format: "qcow2", readOnly: false, resize: true });
  try {
    const r = await fn(img.node, img);
    await img.root.flush();
    return r;
  } finally {
    await img.close();
  }
}

/** Reads the header, lets `edit` change it, writes it back as QEMU lays it out. */
async function editHeader(filename: string, edit: (h: Qcow2Header) => void): Promise<void> {
  await withFile(filename, async (f) => {
    const { header, clusterSize } = await readHeader(f.root);
    edit(header);
    await writeHeader(f.root, header, clusterSize);
  });
}

/** QEMU's `qcow2_amend_options` over the file, step by step in its order. */
async function amendQcow2(
  filename: string,
  view: Qcow2View,
  size: number,
  opts: ReadonlyMap<string, string | number | boolean>,
): Promise<void> {
  const h = view.header;
  const oldVersion = h.version;
  let newVersion = oldVersion;
  let newSize = 0;
  let backingFile: string | undefined;
  let backingFormat: string | undefined;
  let lazy = (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0;
  const hasDataFile = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0;
  let refcountBits = 2 ** h.refcountOrder;
  for (const [name] of AMEND_OPTS) {
    if (!opts.has(name)) continue;
    const v = opts.get(name);
    if (name === "compat") {
      if (v === "0.10" || v === "v2") newVersion = 2;
      else if (v === "1.1" || v === "v3") newVersion = 3;
      else throw new CliError(`Unknown compatibility level ${String(v)}`);
    } else if (name === "size") {
      newSize = Number(v);
    } else if (name === "backing_file") {
      backingFile = String(v);
    } else if (name === "backing_fmt") {
      backingFormat = String(v);
    } else if (name.startsWith("encrypt.")) {
      if (h.cryptMethod === 0) throw new CliError("Can't amend encryption options - encryption not present");
      throw new CliError("Amending encryption options is not supported by blk-img yet");
    } else if (name === "lazy_refcounts") {
      lazy = v === true;
    } else if (name === "refcount_bits") {
      const n = Number(v);
      if (!(n > 0 && n <= 64 && (n & (n - 1)) === 0)) {
        throw new CliError("Refcount width must be a power of two and may not exceed 64 bits");
      }
      refcountBits = n;
    } else if (name === "data_file") {
      if (!hasDataFile)
        throw new CliError("data-file can only be set for images that use an external data file");
      throw new CliError("Amending the external data file is not supported by blk-img yet");
    } else if (name === "data_file_raw") {
      if (v === true) throw new CliError("data-file-raw cannot be set on existing images");
    }
  }

  // Upgrade first: some features need v3.
  if (newVersion > oldVersion) {
    if (view.snapshots.some((s) => s.extraDataSize < 16)) {
      throw new CliError(
        "Upgrading an image whose snapshots lack the v3 extra data is not supported by blk-img yet",
      );
    }
    await editHeader(filename, (x) => {
      x.version = 3;
      x.refcountOrder = 4;
      x.incompatibleFeatures = 0;
      x.incompatibleHigh = 0;
      x.compatibleFeatures = 0;
      x.autoclearFeatures = 0;
      x.compressionType = 0;
      x.unknownHeaderFields = new Uint8Array(0);
    });
  }

  if (2 ** h.refcountOrder !== refcountBits) {
    if (newVersion < 3 && refcountBits !== 16) {
      throw new CliError(
        "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
      );
    }
    await withFile(filename, async (f) => {
      try {
        await changeRefcountOrder(f.root, Math.log2(refcountBits));
      } catch (e) {
        throw new CliError(messageOf(e));
      }
    });
  }

  if (backingFile !== undefined || backingFormat !== undefined) {
    if (backingFile !== h.backingFile || backingFormat !== h.backingFormat) {
      throw new CliError("Cannot amend the backing file", {
        bare: [`You can use '${PROG} rebase' instead.`],
      });
    }
  }

  const wasLazy = (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0;
  if (lazy !== wasLazy) {
    if (lazy && newVersion < 3) {
      throw new CliError(
        "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
      );
    }
    await editHeader(filename, (x) => {
      x.compatibleFeatures = lazy
        ? (x.compatibleFeatures | COMPAT_LAZY_REFCOUNTS) >>> 0
        : (x.compatibleFeatures & ~COMPAT_LAZY_REFCOUNTS) >>> 0;
    });
  }

  if (newSize !== 0 && newSize !== size) {
    await withDriver(filename, async (node, img) => {
      // Amend sets exactly the size given: shrinking is allowed, as QEMU's exact truncate.
      const edge = img.graph.attach(backendParent("amend"), node, {
        name: "root",
        perm: PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE,
        shared: PERM_ALL,
      });
      try {
        await edge.truncate(newSize);
      } catch (e) {
        throw new CliError(messageOf(e));
      } finally {
        edge.detach();
      }
    });
  }

  // Downgrade last, once features v2 lacks are gone.
  if (newVersion < oldVersion) await downgrade(filename);
}

/** QEMU's `qcow2_downgrade` to v2: checks, zero clusters expanded, then the v2 header. */
async function downgrade(filename: string): Promise<void> {
  // The state after the earlier steps, read-only (the driver's view of header and snapshots).
  const img = await openImg({ filename, format: "qcow2", readOnly: true, readsData: false });
  let h: Qcow2Header;
  let snapshots: Qcow2Snapshot[];
  const size = img.node.length;
  try {
    const st = img.node.state as unknown as Qcow2View;
    h = structuredClone(st.header);
    snapshots = [...st.snapshots];
  } finally {
    await img.close();
  }
  if (h.refcountOrder !== 4) throw new CliError("compat=0.10 requires refcount_bits=16");
  if ((h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0) {
    throw new CliError("Cannot downgrade an image with a data file");
  }
  if (snapshots.some((s) => s.vmStateSize > 0xffffffff || s.diskSize !== size)) {
    throw new CliError("Internal snapshots prevent downgrade of image");
  }
  const incompat = h.incompatibleHigh * 2 ** 32 + (h.incompatibleFeatures & ~INCOMPAT_COMPRESSION);
  if (incompat !== 0) {
    throw new CliError(`Cannot downgrade an image with incompatible features 0x${incompat.toString(16)} set`);
  }
  // Zero clusters do not exist in v2: they become data clusters of zeroes (snapshots' tables too).
  const { compressed } = await withFile(filename, (f) =>
    expandZeroClusters(
      f.root,
      [
        { offset: h.l1TableOffset, size: h.l1Size },
        ...snapshots.map((s) => ({ offset: s.l1TableOffset, size: s.l1Size })),
      ],
      h.backingFile !== undefined,
    ),
  );
  if (h.compressionType !== 0 && compressed) {
    throw new CliError(
      "Cannot downgrade an image with zstd compression type and existing compressed clusters",
    );
  }
  await editHeader(filename, (x) => {
    x.version = 2;
    x.compatibleFeatures = 0;
    x.autoclearFeatures = 0;
    x.incompatibleFeatures = 0;
    x.incompatibleHigh = 0;
    x.compressionType = 0;
    x.refcountOrder = 4;
  });
}
