/**
 * Opening images as qemu-img does (format given with `-f` or probed through the driver registry, or a
 * `--image-opts` option string), with qemu-img's `Could not open 'F': …` wording, plus small helpers
 * every command needs.
 */
import type { BlockNode } from "@blk/core";
import { type BlockdevOptions, getDriver, type OpenedImage, openImage } from "@blk/drivers";
import { CliError, messageOf, SIZE_SUFFIX_HINT } from "./errors.ts";
import { parseSize } from "./size.ts";

/** How to open one image. */
export interface OpenArgs {
  /** The filename, or with `imageOpts` a `key=value,…` option string. */
  filename: string;
  format?: string | undefined;
  imageOpts?: boolean;
  readOnly: boolean;
  /** `-U`: share every permission (read-only opens only). */
  forceShare?: boolean;
  /** Take the resize permission. */
  resize?: boolean;
  /** Flushes stop at the page cache (`-t unsafe`, qemu-img convert's default for the target). */
  cacheNoFlush?: boolean;
  /** `discard=unmap` on the nodes (QEMU `BDRV_O_UNMAP`): zero writes may then free clusters. */
  discard?: "ignore" | "unmap";
  /** Called with QEMU's warnings (the probed-raw warning). */
  onWarning?: (message: string) => void;
  /** Exit code of an open failure (default 1; `compare` uses 2). */
  exitCode?: number;
  /**
   * The command reads guest data (default true): an image whose driver names a backing file that was
   * not opened below it is refused rather than read without its backing data.
   */
  readsData?: boolean;
}

/** Splits a QEMU option string (`a=1,b.c=x`, `,,` escapes a comma) into pairs. */
export function splitOptions(text: string): [string, string | undefined][] {
  const out: [string, string | undefined][] = [];
  let cur = "";
  const items: string[] = [];
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === ",") {
      if (text[i + 1] === ",") {
        cur += ",";
        i++;
        continue;
      }
      items.push(cur);
      cur = "";
      continue;
    }
    cur += c;
  }
  items.push(cur);
  for (const item of items) {
    if (item === "") continue;
    const eq = item.indexOf("=");
    out.push(eq < 0 ? [item, undefined] : [item.slice(0, eq), item.slice(eq + 1)]);
  }
  return out;
}

function scalar(key: string, v: string): unknown {
  if (v === "on" || v === "true") return true;
  if (v === "off" || v === "false") return false;
  if (/^[0-9]+$/.test(v) && !/filename|path|name|export|host|port/.test(key)) return Number(v);
  // QEMU's legacy open parses size options (QEMU_OPT_SIZE) with suffixes: `size=2G`.
  if (SIZE_OPTIONS.has(key)) {
    const size = parseSize(v);
    if (size.ok && Number.isSafeInteger(Number(size.value))) return Number(size.value);
  }
  return v;
}

/**
 * Turns an `--image-opts` string (`driver=raw,file.filename=x`, dotted keys nest) into blockdev options;
 * a nested object with a `filename` and no `driver` is a `file` node, as QEMU infers.
 * @throws {CliError} for a malformed string
 */
export function parseImageOpts(text: string): BlockdevOptions {
  const root: Record<string, unknown> = {};
  for (const [k, v] of splitOptions(text)) {
    if (v === undefined) throw new CliError(`Invalid parameter '${k}'`);
    const path = k.split(".");
    let obj = root;
    for (const p of path.slice(0, -1)) {
      const next = obj[p];
      if (typeof next === "object" && next !== null) obj = next as Record<string, unknown>;
      else {
        const created: Record<string, unknown> = {};
        obj[p] = created;
        obj = created;
      }
    }
    const leaf = path.at(-1) ?? k;
    obj[leaf] = scalar(leaf, v);
  }
  const fix = (o: Record<string, unknown>, top: boolean): void => {
    for (const [k, v] of Object.entries(o)) {
      if (typeof v !== "object" || v === null) continue;
      fix(v as Record<string, unknown>, false);
      // As QEMU's keyval: an object whose keys are 0, 1, … n-1 is a list.
      const keys = Object.keys(v);
      if (keys.length > 0 && keys.every((key, i) => key === String(i))) o[k] = Object.values(v);
    }
    if (!top && o.driver === undefined && typeof o.filename === "string") o.driver = "file";
  };
  fix(root, true);
  if (typeof root.driver !== "string") {
    if (typeof root.filename === "string") root.driver = "file";
    else throw new CliError("Parameter 'driver' is missing");
  }
  return root as BlockdevOptions;
}

/**
 * Opens an image.
 * @throws {CliError} `Could not open 'F': <reason>` (exit code `exitCode`)
 */
export async function openImg(a: OpenArgs): Promise<OpenedImage> {
  let img: OpenedImage;
  try {
    const target = a.imageOpts === true ? parseImageOpts(a.filename) : a.filename;
    img = await openImage(target, {
      ...(a.format === undefined ? {} : { format: a.format }),
      readOnly: a.readOnly,
      forceShare: (a.forceShare ?? false) && a.readOnly,
      resize: a.resize ?? false,
      cacheNoFlush: a.cacheNoFlush ?? false,
      ...(a.discard === undefined ? {} : { discard: a.discard }),
      ...(a.onWarning === undefined ? {} : { onWarning: a.onWarning }),
    });
  } catch (e) {
    if (e instanceof CliError) throw e;
    const legacy = legacyOptionError(messageOf(e), a.imageOpts === true ? a.filename : undefined, a.filename);
    if (legacy !== undefined) {
      throw new CliError(`Could not open '${a.filename}': ${legacy.message}`, {
        exitCode: a.exitCode ?? 1,
        bare: legacy.bare,
      });
    }
    // An image-lock refusal carries QEMU's unprefixed second line (`Is another process using the image
    // [F]?`); read it off the error rather than import the file driver's class into every command.
    const hint = (e as { hint?: unknown } | null)?.hint;
    throw new CliError(`Could not open '${a.filename}': ${messageOf(e)}`, {
      exitCode: a.exitCode ?? 1,
      ...(typeof hint === "string" ? { bare: [hint] } : {}),
    });
  }
  if (!a.readOnly && img.node.readOnly) {
    await img.close();
    throw new CliError(
      `Could not open '${a.filename}': the ${img.format} driver of this blk version cannot write`,
      {
        exitCode: a.exitCode ?? 1,
      },
    );
  }
  const backing = (img.node.state as unknown as { backingFilename?: unknown }).backingFilename;
  if ((a.readsData ?? true) && typeof backing === "string" && img.node.backing === undefined) {
    await img.close();
    throw new CliError(
      `Could not open '${a.filename}': its backing file '${backing}' is not opened by this blk version yet`,
      { exitCode: a.exitCode ?? 1 },
    );
  }
  return img;
}

/** Options QEMU declares as sizes (`QEMU_OPT_SIZE`) in the drivers blk-img opens. */
const SIZE_OPTIONS = new Set([
  "offset",
  "size",
  "cache-size",
  "l2-cache-size",
  "l2-cache-entry-size",
  "refcount-cache-size",
]);

/**
 * qemu-img opens `--image-opts` and `json:` filenames through QEMU's legacy open path, whose option
 * errors are worded differently from QAPI validation's (which `openImage` and `blockdev-add` give):
 * `Block format 'D' does not support the option 'K'`, `Block protocol 'D' doesn't support the option
 * 'K'`, `Parameter 'K' expects …` with the plain key, and the file driver's `requires a file name`.
 * Returns that wording for a QAPI message about such options, or undefined.
 */
function legacyOptionError(
  message: string,
  imageOpts: string | undefined,
  filename: string,
): { message: string; bare: readonly string[] } | undefined {
  let root: unknown;
  try {
    if (imageOpts !== undefined) root = parseImageOpts(imageOpts);
    else if (filename.startsWith("json:")) root = JSON.parse(filename.slice(5));
    else return undefined;
  } catch {
    return undefined;
  }
  const m =
    /^Parameter '([^']+)' is (unexpected|missing)$/.exec(message) ??
    /^Invalid parameter type for '([^']+)', expected: (\w+)$/.exec(message) ??
    /^Parameter '([^']+)' expects (u?int\d+|number|size|a non-negative number below 2\^64)$/.exec(message);
  if (m === null) return undefined;
  const path = (m[1] ?? "").split(".");
  const key = path.pop() ?? "";
  // The node the key belongs to: children are nested objects; a child without `driver` is a file.
  let node: Record<string, unknown> | undefined =
    typeof root === "object" && root !== null ? (root as Record<string, unknown>) : undefined;
  for (const seg of path) {
    const child: unknown = node?.[seg];
    node = typeof child === "object" && child !== null ? (child as Record<string, unknown>) : undefined;
  }
  if (node === undefined) return undefined;
  const driver = typeof node.driver === "string" ? node.driver : path.length > 0 ? "file" : undefined;
  if (driver === undefined) return undefined;
  const none: readonly string[] = [];
  const what = m[2] ?? "";
  switch (what) {
    case "unexpected": {
      // QEMU's blkdebug and blkverify are protocols too (they have a protocol name).
      const protocol =
        getDriver(driver)?.kind === "protocol" || driver === "blkdebug" || driver === "blkverify";
      return {
        message: protocol
          ? `Block protocol '${driver}' doesn't support the option '${key}'`
          : `Block format '${driver}' does not support the option '${key}'`,
        bare: none,
      };
    }
    case "missing":
      return driver === "file" && key === "filename"
        ? { message: "The 'file' block driver requires a file name", bare: none }
        : undefined;
    case "boolean":
      return { message: `Parameter '${key}' expects 'on' or 'off'`, bare: none };
    default:
      if (what === "string" || what === "object" || what === "array") return undefined;
      return SIZE_OPTIONS.has(key)
        ? { message: `Parameter '${key}' expects a non-negative number below 2^64`, bare: SIZE_SUFFIX_HINT }
        : { message: `Parameter '${key}' expects a number`, bare: none };
  }
}

/** The host filename of a layer: its protocol (`file`) node's filename, or the node's own. */
export function layerFilename(node: BlockNode): string | undefined {
  let n: BlockNode | undefined = node;
  for (let i = 0; n !== undefined && i < 8; i++) {
    const opts = n.driverOptions as { filename?: unknown } | null | undefined;
    if (typeof opts?.filename === "string") return opts.filename;
    n = n.children.get("file")?.child;
  }
  return undefined;
}

/** Bytes allocated on the host for a layer (`actual-size`), when its protocol driver can tell. */
export async function allocatedSize(node: BlockNode): Promise<number | undefined> {
  let n: BlockNode | undefined = node;
  for (let i = 0; n !== undefined && i < 8; i++) {
    const state = n.state as unknown as { allocatedSize?: unknown };
    const fn = state.allocatedSize;
    if (typeof fn === "function") return Number(await (fn as () => Promise<unknown>).call(state));
    n = n.children.get("file")?.child;
  }
  return undefined;
}

/**
 * Validates a cache mode (`-t`, or `-T` with `source`); blk accepts them all and uses the page cache.
 * @throws {CliError} `Invalid cache option: X` / `Invalid source cache option: X`
 */
export function checkCacheMode(mode: string, source = false, exitCode = 1): void {
  if (!["none", "off", "writeback", "writethrough", "directsync", "unsafe"].includes(mode)) {
    throw new CliError(`Invalid ${source ? "source " : ""}cache option: ${mode}`, { exitCode });
  }
}

/** Checks `--output`. @throws {CliError} */
export function outputFormat(value: string | undefined): "human" | "json" {
  if (value === undefined || value === "human") return "human";
  if (value === "json") return "json";
  throw new CliError("--output must be used with human or json as argument.");
}
