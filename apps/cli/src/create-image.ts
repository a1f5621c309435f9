/**
 * Image creation for `create` and `convert`: `raw` creates the host file (QEMU's file creation, with
 * preallocation); any other format is created by its registered driver's `create`, so a qcow2 driver
 * that gains `create` works here without changes.
 */
import { BlkError } from "@blk/core";
import { fileDriver, getDriver, isNbdFilename, openImage, type PreallocMode } from "@blk/drivers";
import { CliError, messageOf } from "./errors.ts";
import { parseSize } from "./size.ts";

/** A `-o` option as given (`key`, value text), in command-line order. */
export type CreateOption = readonly [key: string, value: string];

const RAW_OPTIONS = ["size", "preallocation", "nocow", "extent_size_hint"];
const PREALLOC = ["off", "metadata", "falloc", "full"];
/** Image formats qemu-img can create that blk may not have (yet): a clearer message than "Unknown". */
const QEMU_FORMATS = ["qcow2", "qcow", "qed", "vmdk", "vdi", "vhdx", "vpc", "luks", "parallels"];

/** qcow2 creation options in the order qemu-img's `Formatting` line lists them. */
const QCOW2_LINE = [
  "cluster_size",
  "extended_l2",
  "preallocation",
  "compression_type",
  "size",
  "backing_file",
  "backing_fmt",
  "compat",
  "lazy_refcounts",
  "refcount_bits",
];
/** Other qcow2 creation options qemu-img knows (the driver decides whether blk supports them). */
const QCOW2_OTHER = ["encryption", "encrypt.format", "data_file", "data_file_raw"];
/** Defaults the qcow2 `Formatting` line always shows. */
const QCOW2_DEFAULTS: Record<string, string> = {
  cluster_size: "65536",
  extended_l2: "off",
  compression_type: "zlib",
  lazy_refcounts: "off",
  refcount_bits: "16",
};

/**
 * The `Formatting '…', fmt=… …` line qemu-img prints before creating: raw lists `size` then the options
 * given; qcow2 lists its options in a fixed order with their defaults.
 */
export function formattingLine(
  filename: string,
  format: string,
  size: number,
  options: readonly CreateOption[],
): string {
  const given = new Map(options);
  let fields: [string, string][];
  if (format === "qcow2") {
    const all = new Map<string, string>(Object.entries(QCOW2_DEFAULTS));
    for (const [k, v] of given) all.set(k, v);
    all.set("size", String(size));
    fields = [];
    for (const k of QCOW2_LINE) {
      const v = all.get(k);
      if (v !== undefined) fields.push([k, v]);
    }
    for (const [k, v] of given) if (!QCOW2_LINE.includes(k)) fields.push([k, v]);
  } else {
    fields = [["size", String(size)], ...[...given].filter(([k]) => k !== "size")];
  }
  return `Formatting '${filename}', fmt=${format}${fields.map(([k, v]) => ` ${k}=${v}`).join("")}\n`;
}

/** Rounds a size up to whole 512-byte sectors (qemu-img create does). */
export const roundSector = (n: number): number => Math.ceil(n / 512) * 512;

/**
 * Checks that `format` can be created and its options are known; returns the options with values
 * normalised as qemu-img prints them in the `Formatting` line.
 * @throws {CliError} `Unknown file format 'X'`, `Invalid parameter 'k'`, `Creating 'X' images is not supported by blk-img yet`
 */
export function checkCreate(format: string, options: readonly CreateOption[]): CreateOption[] {
  const driver = getDriver(format);
  if (
    driver === undefined ? QEMU_FORMATS.includes(format) : format !== "raw" && driver.create === undefined
  ) {
    throw new CliError(`Creating '${format}' images is not supported by blk-img yet`);
  }
  if (driver === undefined || driver.kind === "filter") throw new CliError(`Unknown file format '${format}'`);
  if (format === "qcow2") {
    const out: CreateOption[] = [];
    for (const [k, v] of options) {
      if (!QCOW2_LINE.includes(k) && !QCOW2_OTHER.includes(k)) throw new CliError(`Invalid parameter '${k}'`);
      if (k === "size" || k === "cluster_size") {
        const sz = parseSize(v);
        if (!sz.ok) throw new CliError(`Parameter '${k}' expects a non-negative number below 2^64`);
        out.push([k, String(sz.value)]);
      } else out.push([k, v]);
    }
    return out;
  }
  if (format !== "raw") return [...options];
  const out: CreateOption[] = [];
  for (const [k, v] of options) {
    if (!RAW_OPTIONS.includes(k)) throw new CliError(`Invalid parameter '${k}'`);
    if (k === "extent_size_hint" || k === "size") {
      const s = parseSize(v);
      if (!s.ok) throw new CliError(`Parameter '${k}' expects a non-negative number below 2^64`);
      out.push([k, String(s.value)]);
    } else if (k === "nocow") {
      if (!["on", "off", "true", "false", "yes", "no"].includes(v)) {
        throw new CliError(`Parameter '${k}' expects 'on' or 'off'`);
      }
      out.push([k, v]);
    } else {
      out.push([k, v]);
    }
  }
  return out;
}

/**
 * Creates the image (after {@link checkCreate}).
 * @throws {CliError} the driver's reason (`Could not create 'F': …`, `Unsupported preallocation mode: metadata`,
 *   `The image size is too large for file format 'raw'`)
 */
export async function createImage(
  format: string,
  filename: string,
  size: number,
  options: readonly CreateOption[],
): Promise<void> {
  const opts = new Map(options);
  if (isNbdFilename(filename)) {
    await createOverNbd(format, filename, size);
    return;
  }
  try {
    if (format === "raw") {
      const prealloc = opts.get("preallocation") ?? "off";
      if (!PREALLOC.includes(prealloc)) throw new CliError(`invalid parameter value: ${prealloc}`);
      if (!Number.isSafeInteger(size)) throw new BlkError("EFBIG", "File too large");
      await fileDriver.create({ filename, size: roundSector(size), preallocation: prealloc as PreallocMode });
      return;
    }
    const driver = getDriver(format);
    if (driver?.create === undefined) throw new CliError(`Unknown file format '${format}'`);
    // QEMU's blockdev-create shape: QAPI names use dashes where qemu-img's -o names use underscores.
    const qapi: Record<string, unknown> = { filename, size };
    for (const [k, v] of opts) if (k !== "size") qapi[k.replaceAll("_", "-")] = v;
    await driver.create(qapi);
  } catch (e) {
    if (e instanceof CliError) throw e;
    if (e instanceof BlkError && e.code === "EFBIG") {
      throw new CliError(`The image size is too large for file format '${format}'`);
    }
    throw new CliError(messageOf(e));
  }
}

/**
 * "Creating" an image on an NBD export, as QEMU's fallback for protocols that cannot create: the export
 * must open, and be at least `size` bytes (NBD nodes cannot grow). Only raw images go there with blk-img.
 * @throws {CliError} QEMU's messages (`Protocol driver 'nbd' does not support image creation, and opening
 *   the image failed: …`, `Cannot grow NBD nodes`)
 */
async function createOverNbd(format: string, filename: string, size: number): Promise<void> {
  let length: number;
  try {
    await using img = await openImage(filename, { format: "raw", readOnly: true });
    length = img.node.length;
  } catch (e) {
    throw new CliError(
      `Protocol driver 'nbd' does not support image creation, and opening the image failed: ${messageOf(e)}`,
    );
  }
  if (length < size) throw new CliError("Cannot grow NBD nodes");
  if (format !== "raw")
    throw new CliError(`Creating '${format}' images on NBD exports is not supported by blk-img yet`);
}
