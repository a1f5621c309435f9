/**
 * `blk-img rebase [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file
 * [-F backing_fmt] filename` (qemu-img.md §9). Safe mode reads, for every range the image leaves to its
 * backing chain, the old chain and the new backing file (zeroes for `-b ""` and past a backing file's
 * end) and compares them in 512-byte sectors; the image's allocation units (qcow2 clusters) holding a
 * difference then get the old chain's data through core's copy engine, so the guest sees the same
 * content; then the backing file name and format in the header change. When the new backing file is in
 * the old chain, only ranges the layers above it allocate are compared. `-u` only rewrites the header
 * (the old backing file need not exist). As qemu-img 7.2, a new backing file needs `-F` (the header
 * change fails after the copy otherwise). Prints nothing on success.
 */
import { closeSync, openSync, readSync, realpathSync } from "node:fs";
import {
  BlkError,
  type BlockNode,
  CopyEngine,
  type CopyError,
  type DirtyBitmap,
  type Edge,
  strerror,
} from "@blk/core";
import { getDriver, type OpenedImage, openImage } from "@blk/drivers";
import { openQcow2, resolveBackingFilename } from "@blk/drivers/qcow2";
import type { Context } from "../context.ts";
import { CliError, messageOf, usage } from "../errors.ts";
import { getopt } from "../getopt.ts";
import { checkCacheMode, layerFilename, openImg } from "../image.ts";
import { makeProgress, type Progress } from "../progress.ts";
import { commandHelp } from "../usage.ts";
import { backingChain } from "./commit.ts";

/** Bytes compared per step (qemu-img's `IO_BUF_SIZE`). */
const IO_BUF = 2 << 20;
const SECTOR = 512;

/** What the header change needs of a format driver's state (qcow2 has it). */
interface BackingWriter {
  changeBackingFile(filename: string | undefined, format: string | undefined): Promise<void>;
}

function backingWriter(node: BlockNode): BackingWriter | undefined {
  const st = node.state as unknown as Partial<BackingWriter>;
  return typeof st.changeBackingFile === "function" ? (st as BackingWriter) : undefined;
}

function real(path: string): string | undefined {
  try {
    return realpathSync(path);
  } catch {
    return undefined;
  }
}

/** True when the file starts with the qcow2 magic. */
function looksQcow2(filename: string): boolean {
  try {
    const fd = openSync(filename, "r");
    try {
      const b = Buffer.alloc(4);
      readSync(fd, b, 0, 4, 0);
      return b.readUInt32BE(0) === 0x514649fb;
    } finally {
      closeSync(fd);
    }
  } catch {
    return false;
  }
}

/** Reads `[offset, offset+n)` of `node`, zeroes past its end (or all zeroes without a node). */
async function readPadded(node: BlockNode | undefined, offset: number, out: Uint8Array): Promise<void> {
  out.fill(0);
  if (node === undefined) return;
  const n = Math.min(out.length, node.length - offset);
  if (n > 0) await node.readInto(offset, out.subarray(0, n));
}

/** Options of {@link rebaseData}. */
interface RebaseDataOptions {
  /** The new backing node, when it is a layer of the image's own chain (only ranges above it differ). */
  prefix?: BlockNode | undefined;
  progress?: Progress;
}

/**
 * The data pass of a safe rebase: for every range `top` itself leaves unallocated, writes through
 * `edge` the sectors where `oldBacking` and `newBacking` read differently (the old data; zeroes past the
 * old backing file's end).
 * @throws {CliError} qemu-img's messages for metadata, read and write errors
 */
async function rebaseData(
  top: BlockNode,
  edge: Edge,
  oldBacking: BlockNode | undefined,
  newBacking: BlockNode | undefined,
  options: RebaseDataOptions = {},
): Promise<void> {
  const size = top.length;
  const oldSize = oldBacking?.length ?? 0;
  const newSize = newBacking?.length ?? 0;
  const bufOld = new Uint8Array(IO_BUF);
  const bufNew = new Uint8Array(IO_BUF);
  const step = size === 0 ? 0 : 100 / (size / Math.min(size, IO_BUF));
  let shown = 0;
  const unit = allocationUnit(top);
  const limit = Math.floor(Math.min(oldSize, size) / unit) * unit;
  const work = top.createBitmapSync({ granularity: unit, disabled: true });
  try {
    const meta = async <T>(fn: () => Promise<T>): Promise<T> => {
      try {
        return await fn();
      } catch (e) {
        throw new CliError(`error while reading image metadata: ${strerrorOf(e)}`);
      }
    };
    for (let offset = 0; offset < size; ) {
      let n = Math.min(IO_BUF, size - offset);
      const own = (await meta(() => top.blockStatus(offset, n)))[0];
      if (own === undefined) break;
      n = Math.min(n, own.offset + own.length - offset);
      if (own.allocated) {
        offset += n;
        continue;
      }
      if (options.prefix !== undefined && oldBacking !== undefined) {
        const prefix = options.prefix;
        const above = (await meta(() => oldBacking.blockStatusAbove(offset, n, { base: prefix })))[0];
        if (above !== undefined) n = Math.min(n, above.offset + above.length - offset);
        if (above === undefined || !above.allocated) {
          offset += n;
          continue;
        }
      }
      if (offset >= oldSize) {
        bufOld.fill(0, 0, n);
      } else {
        n = Math.min(n, oldSize - offset);
        try {
          await readPadded(oldBacking, offset, bufOld.subarray(0, n));
        } catch {
          throw new CliError("error while reading from old backing file");
        }
      }
      if (newBacking !== undefined && offset < newSize) n = Math.min(n, newSize - offset);
      try {
        await readPadded(offset < newSize ? newBacking : undefined, offset, bufNew.subarray(0, n));
      } catch {
        throw new CliError("error while reading from new backing file");
      }
      for (let done = 0; done < n; ) {
        const { differ, bytes } = compareSectors(bufOld, bufNew, done, n);
        if (differ) {
          const start = offset + done;
          const end = start + bytes;
          // Whole allocation units below the old backing file's end: the copy engine moves them.
          if (Math.min(end, limit) > start) work.setDirty(start, Math.min(end, limit) - start);
          // The rest (the unit across its end, and past it) is written here; past the end as zeroes, as
          // qemu-img does (qcow2 makes them zero clusters, which the new backing file cannot show through).
          const from = Math.max(start, limit);
          if (end > from) {
            try {
              if (offset >= oldSize) await edge.writeZeroes(from, end - from);
              else await edge.write(from, bufOld.slice(from - offset, end - offset));
            } catch (e) {
              throw new CliError(`Error while writing to COW image: ${strerrorOf(e)}`);
            }
          }
        }
        done += bytes;
      }
      shown += step;
      options.progress?.update(Math.min(shown, 100) / 100);
      offset += n;
    }
    if (oldBacking !== undefined && work.count() > 0) await copyOld(oldBacking, edge, work);
  } finally {
    work.release();
  }
}

/**
 * Copies the units marked in `work` from the old backing chain into the image through the copy engine,
 * as data (qemu-img 7.2 writes what it read, without zero detection).
 * @throws {CliError} qemu-img's messages for read and write errors
 */
async function copyOld(oldBacking: BlockNode, edge: Edge, work: DirtyBitmap): Promise<void> {
  let failed: CopyError | undefined;
  const engine = new CopyEngine({
    source: oldBacking,
    target: edge,
    bitmap: work,
    status: "none",
    chunkSize: IO_BUF,
    maxWorkers: 8,
    onError: (e) => {
      failed ??= e;
      return "fail";
    },
  });
  try {
    await engine.run();
  } catch (e) {
    if (failed?.operation === "read") throw new CliError("error while reading from old backing file");
    throw new CliError(`Error while writing to COW image: ${strerrorOf(failed?.error ?? e)}`);
  }
}

/**
 * The unit in which the image allocates (qcow2: a cluster, or a subcluster with extended L2 entries): a
 * whole unit the image leaves to its backing chain can take the old chain's data without touching data
 * of the image's own.
 */
function allocationUnit(node: BlockNode): number {
  const st = node.state as unknown as { clusterSize?: unknown; header?: { incompatibleFeatures?: number } };
  if (node.driver.format !== "qcow2" || typeof st.clusterSize !== "number") return SECTOR;
  const extL2 = ((st.header?.incompatibleFeatures ?? 0) & 0x10) !== 0;
  return Math.max(SECTOR, extL2 ? st.clusterSize / 32 : st.clusterSize);
}

/**
 * From `start`, the length of the run of 512-byte sectors (up to `end`) that all differ, or all match,
 * between `a` and `b` (as the first one does).
 */
export function compareSectors(
  a: Uint8Array,
  b: Uint8Array,
  start: number,
  end: number,
): { differ: boolean; bytes: number } {
  const same = (from: number, to: number): boolean => {
    for (let i = from; i < to; i++) if (a[i] !== b[i]) return false;
    return true;
  };
  let i = Math.min(end - start, SECTOR);
  const differ = !same(start, start + i);
  while (start + i < end) {
    const len = Math.min(end - start - i, SECTOR);
    if (!same(start + i, start + i + len) !== differ) break;
    i += len;
  }
  return { differ, bytes: i };
}

function strerrorOf(e: unknown): string {
  return e instanceof BlkError ? strerror(e.code) : messageOf(e);
}

/** Runs `rebase`. */
export async function rebase(args: readonly string[], ctx: Context): Promise<number> {
  const { options, operands } = getopt(args, "hf:F:b:upt:T:qU", [
    { name: "help", hasArg: false, key: "h" },
    { name: "object", hasArg: true },
    { name: "image-opts", hasArg: false },
    { name: "force-share", hasArg: false, key: "U" },
  ]);
  let format: string | undefined;
  let backingFormat: string | undefined;
  let backing: string | undefined;
  let unsafe = false;
  let progress = false;
  let cache = "writeback";
  let srcCache = "writeback";
  let quiet = false;
  let imageOpts = false;
  let forceShare = false;
  for (const o of options) {
    switch (o.key) {
      case "h":
        ctx.out(commandHelp("rebase"));
        return 0;
      case "f":
        format = o.value;
        break;
      case "F":
        backingFormat = o.value;
        break;
      case "b":
        backing = o.value;
        break;
      case "u":
        unsafe = true;
        break;
      case "p":
        progress = true;
        break;
      case "t":
        cache = o.value;
        break;
      case "T":
        srcCache = o.value;
        break;
      case "q":
        quiet = true;
        break;
      case "image-opts":
        imageOpts = true;
        break;
      case "U":
        forceShare = true;
        break;
      default:
        break;
    }
  }
  if (quiet) progress = false;
  if (operands.length !== 1) throw usage("Expecting one image file name");
  if (!unsafe && backing === undefined) throw usage("Must specify backing file (-b) or use unsafe mode (-u)");
  const filename = operands[0] ?? "";
  const bar = makeProgress(ctx, progress, 2);
  bar.update(0);
  try {
    checkCacheMode(cache);
    checkCacheMode(srcCache, true);
    if (imageOpts && format !== undefined) {
      throw new CliError("--image-opts and --format are mutually exclusive");
    }
    await (unsafe
      ? rebaseUnsafe(filename, format, imageOpts, backing, backingFormat, ctx)
      : rebaseSafe(filename, format, imageOpts, backing ?? "", backingFormat, forceShare, bar, ctx));
  } catch (e) {
    bar.interrupt();
    throw e;
  }
  bar.update(1);
  bar.end();
  return 0;
}

/** Image formats qemu-img 7.2 knows besides the ones blk has drivers for (a backing format may name them). */
const QEMU_FORMATS = [
  "bochs",
  "cloop",
  "dmg",
  "luks",
  "parallels",
  "qcow",
  "qed",
  "vdi",
  "vhdx",
  "vmdk",
  "vpc",
  "vvfat",
  "host_device",
  "host_cdrom",
  "http",
  "https",
  "ftp",
  "ftps",
  "iscsi",
  "ssh",
  "rbd",
  "nfs",
  "compress",
  "copy-on-read",
  "preallocate",
  "quorum",
  "blkverify",
  "blklogwrites",
  "null-aio",
  "nvme",
];

function checkBackingFormat(fmt: string | undefined): void {
  if (fmt !== undefined && getDriver(fmt) === undefined && !QEMU_FORMATS.includes(fmt)) {
    throw new CliError(`Invalid format name: '${fmt}'`);
  }
}

/** The header change, with qemu-img's messages. */
async function changeBacking(
  node: BlockNode,
  backing: string | undefined,
  fmt: string | undefined,
): Promise<void> {
  const name = backing === undefined || backing === "" ? undefined : backing;
  const shown = backing ?? "(null)";
  const writer = backingWriter(node);
  if (writer === undefined) {
    throw new CliError(`Could not change the backing file to '${shown}': ${strerror("ENOTSUP")}`);
  }
  if (name !== undefined && fmt === undefined) {
    throw new CliError(`Could not change the backing file to '${shown}': backing format must be specified`);
  }
  try {
    await writer.changeBackingFile(name, name === undefined ? undefined : fmt);
  } catch (e) {
    if (e instanceof BlkError && e.code === "ENOSPC") {
      throw new CliError(
        `Could not change the backing file to '${shown}': No space left in the backing file header`,
      );
    }
    throw new CliError(`Could not change the backing file to '${shown}': ${strerrorOf(e)}`);
  }
}

/** `-u`: only the header changes; the image is opened without its backing chain. */
async function rebaseUnsafe(
  filename: string,
  format: string | undefined,
  imageOpts: boolean,
  backing: string | undefined,
  backingFormat: string | undefined,
  ctx: Context,
): Promise<void> {
  let close: () => Promise<void>;
  let node: BlockNode;
  if (!imageOpts && (format === "qcow2" || (format === undefined && looksQcow2(filename)))) {
    try {
      const q = await openQcow2(filename, { writable: true, noBacking: true });
      node = q.node;
      close = () => q.close();
    } catch (e) {
      throw new CliError(`Could not open '${filename}': ${messageOf(e)}`);
    }
  } else {
    const img = await openImg({
      filename,
      format,
      imageOpts,
      readOnly: false,
      readsData: false,
      onWarning: (m) => ctx.err(`${m}\n`),
    });
    node = img.node;
    close = () => img.close();
  }
  try {
    checkBackingFormat(backingFormat);
    await changeBacking(node, backing, backingFormat);
  } finally {
    await close();
  }
}

/** Safe mode: the data pass, then the header change. */
async function rebaseSafe(
  filename: string,
  format: string | undefined,
  imageOpts: boolean,
  backing: string,
  backingFormat: string | undefined,
  forceShare: boolean,
  bar: Progress,
  ctx: Context,
): Promise<void> {
  const img = await openImg({
    filename,
    format,
    imageOpts,
    readOnly: false,
    onWarning: (m) => ctx.err(`${m}\n`),
  });
  let opened: OpenedImage | undefined;
  try {
    checkBackingFormat(backingFormat);
    const top = img.node;
    const oldBacking = top.backing;
    let newBacking: BlockNode | undefined;
    let prefix: BlockNode | undefined;
    if (backing !== "") {
      const overlay = layerFilename(top) ?? filename;
      const path = resolveBackingFilename(overlay, backing);
      const want = real(path);
      prefix =
        want === undefined
          ? undefined
          : backingChain(top).find((n) => {
              const f = layerFilename(n);
              return f !== undefined && real(f) === want;
            });
      if (prefix !== undefined) {
        newBacking = prefix;
      } else {
        try {
          opened = await openImage(path, {
            readOnly: true,
            forceShare,
            ...(backingFormat === undefined ? {} : { format: backingFormat }),
          });
        } catch (e) {
          throw new CliError(`Could not open new backing file '${backing}': ${messageOf(e)}`);
        }
        newBacking = opened.node;
      }
    }
    await rebaseData(top, img.root, oldBacking, newBacking, { prefix, progress: bar });
    await img.root.flush();
    await changeBacking(top, backing, backingFormat);
  } finally {
    await opened?.close();
    await img.close();
  }
}
