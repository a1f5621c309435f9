/**
 * `blk-img commit [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename`
 * (qemu-img.md §8): copies what the layers from the image down to (excluding) the base allocate into
 * the base — the image's backing file by default, or the chain member `-b` names — through core's copy
 * engine (zero ranges become zero writes, ranges the layers leave unallocated are skipped; a shorter base
 * is grown first). Then, unless `-d` or `-b`, the image is emptied as qemu-img does (qcow2 v3 without
 * snapshots or bitmaps: rebuilt as a fresh image with the same header; other qcow2 images: every cluster
 * unmapped, snapshots kept), so that it reads through to its backing file. Prints `Image committed.`.
 */
import { realpathSync } from "node:fs";
import { type BlockNode, backendParent, CopyEngine, type CopyError, type Edge, PERM } from "@blk/core";
import { openImage } from "@blk/drivers";
import { resolveBackingFilename } from "@blk/drivers/qcow2";
import { type EmptyPlan, emptyQcow2, qcow2EmptyPlan, unmapActiveTable } from "../amend-qcow2.ts";
import type { Context } from "../context.ts";
import { CliError, invalidSize, messageOf, usage } from "../errors.ts";
import { getopt } from "../getopt.ts";
import { checkCacheMode, layerFilename, openImg } from "../image.ts";
import { makeProgress } from "../progress.ts";
import { parseSize } from "../size.ts";
import { commandHelp } from "../usage.ts";

/** The layers below `node` (its backing node, that one's backing node, …), nearest first. */
export function backingChain(node: BlockNode): BlockNode[] {
  const out: BlockNode[] = [];
  for (let n = node.backing; n !== undefined && out.length < 256; n = n.backing) out.push(n);
  return out;
}

function real(path: string): string | undefined {
  try {
    return realpathSync(path);
  } catch {
    return undefined;
  }
}

/**
 * QEMU's `bdrv_find_backing_image`: the layer below `top` whose file is `name`, where `name` is taken
 * relative to the directory of each overlay in turn and compared by real path.
 */
function findBackingImage(top: BlockNode, name: string): BlockNode | undefined {
  let overlay = top;
  for (const below of backingChain(top)) {
    const overlayName = layerFilename(overlay);
    const belowName = layerFilename(below);
    if (overlayName !== undefined && belowName !== undefined) {
      const want = real(resolveBackingFilename(overlayName, name));
      if (want !== undefined && want === real(belowName)) return below;
    }
    overlay = below;
  }
  return undefined;
}

/**
 * Makes `node` and its own storage (`file` child) writable, as a commit job's reopen of its base does.
 * @returns a function putting them back to read-only
 */
async function reopenWritable(node: BlockNode): Promise<() => Promise<void>> {
  const done: BlockNode[] = [];
  const walk = async (n: BlockNode): Promise<void> => {
    const file = n.children.get("file")?.child;
    if (file !== undefined) await walk(file);
    if (n.readOnly) {
      await n.reopen({ readOnly: false });
      done.push(n);
    }
  };
  await walk(node);
  return async () => {
    for (const n of done.reverse()) await n.reopen({ readOnly: true }).catch(() => undefined);
  };
}

/**
 * A pause point keeping the bytes done at or below `bytesPerSecond` on average since the first call
 * (qemu-img's `-r`, the job's speed).
 */
export function rateLimiter(
  bytesPerSecond: number,
  doneBytes: () => number,
  clock: { now(): number; sleep(ms: number): Promise<void> } = {
    now: () => performance.now(),
    sleep: (ms) => new Promise((r) => setTimeout(r, ms)),
  },
): () => Promise<void> {
  let t0: number | undefined;
  return async () => {
    const now = clock.now();
    t0 ??= now;
    const ahead = (doneBytes() / bytesPerSecond) * 1000 - (now - t0);
    if (ahead > 0) await clock.sleep(ahead);
  };
}

/** Options of {@link commitChain}. */
interface CommitChainOptions {
  /** Called with the fraction done. */
  onProgress?: (fraction: number) => void;
  /** Bytes per second (0: unlimited). */
  rateLimit?: number;
}

/**
 * Copies into `base` (a node in `top`'s chain, opened read-write through `baseEdge`) what the layers
 * from `top` down to, excluding, `base` allocate.
 * @throws {CliError} qemu-img's wording for I/O errors
 */
async function commitChain(
  top: BlockNode,
  base: BlockNode,
  baseEdge: Edge,
  options: CommitChainOptions = {},
): Promise<void> {
  const len = top.length;
  if (base.length < len) await baseEdge.truncate(len);
  if (len === 0) return;
  const work = top.createBitmapSync({ granularity: 65536, disabled: true });
  work.setDirty(0, len);
  let failed: CopyError | undefined;
  let done = 0;
  try {
    const engine = new CopyEngine({
      source: top,
      target: baseEdge,
      bitmap: work,
      status: "chain",
      base,
      skipUnallocated: true,
      // The layers above the base do not change while blk-img holds them (only the base is written).
      staticSource: true,
      chunkSize: 512 << 10,
      maxWorkers: 8,
      zeroes: "unmap",
      ...(options.rateLimit === undefined || options.rateLimit === 0
        ? {}
        : { pausePoint: rateLimiter(options.rateLimit, () => done) }),
      onProgress: (p) => {
        done += p.bytes;
        options.onProgress?.(done / len);
      },
      onError: (e) => {
        failed ??= e;
        return "fail";
      },
    });
    await engine.run();
    await baseEdge.flush();
  } catch (e) {
    const err = failed?.error ?? e;
    throw new CliError(messageOf(err));
  } finally {
    work.release();
  }
}

/** Runs `commit`. */
export async function commit(args: readonly string[], ctx: Context): Promise<number> {
  const { options, operands } = getopt(args, "hf:t:b:dpqr:", [
    { name: "help", hasArg: false, key: "h" },
    { name: "object", hasArg: true },
    { name: "image-opts", hasArg: false },
  ]);
  let format: string | undefined;
  let cache = "writeback";
  let baseName: string | undefined;
  let drop = false;
  let progress = false;
  let quiet = false;
  let imageOpts = false;
  let rate = 0;
  for (const o of options) {
    switch (o.key) {
      case "h":
        ctx.out(commandHelp("commit"));
        return 0;
      case "f":
        format = o.value;
        break;
      case "t":
        cache = o.value;
        break;
      case "b":
        baseName = o.value;
        // -b implies -d: the layers above the base keep their data.
        drop = true;
        break;
      case "d":
        drop = true;
        break;
      case "p":
        progress = true;
        break;
      case "q":
        quiet = true;
        break;
      case "r": {
        const s = parseSize(o.value);
        if (!s.ok || o.value.trimStart().startsWith("-") || s.value > (1n << 63n) - 1n) {
          throw invalidSize("rate limit");
        }
        rate = Number(s.value);
        break;
      }
      case "image-opts":
        imageOpts = true;
        break;
      default:
        break;
    }
  }
  if (quiet) progress = false;
  if (operands.length !== 1) throw usage("Expecting one image file name");
  const filename = operands[0] ?? "";
  if (imageOpts && format !== undefined)
    throw new CliError("--image-opts and --format are mutually exclusive");
  checkCacheMode(cache);

  const img = await openImg({
    filename,
    format,
    imageOpts,
    // The image itself is only emptied afterwards, on its file, once closed.
    readOnly: true,
    discard: "unmap",
    onWarning: (m) => ctx.err(`${m}\n`),
  });
  let restore: (() => Promise<void>) | undefined;
  let emptyPlan: EmptyPlan;
  const bar = makeProgress(ctx, progress);
  try {
    const top = img.node;
    let base: BlockNode | undefined;
    if (baseName !== undefined) {
      base = findBackingImage(top, baseName);
      if (base === undefined) {
        throw new CliError(`Did not find '${baseName}' in the backing chain of '${filename}'`);
      }
    } else {
      base = top.backing;
      if (base === undefined) throw new CliError("Image does not have a backing file");
    }
    if (!drop) {
      try {
        emptyPlan = qcow2EmptyPlan(top);
      } catch (e) {
        throw new CliError(`Could not open '${filename}': ${messageOf(e)}`);
      }
    }
    bar.update(0);
    restore = await reopenWritable(base).catch((e: unknown) => {
      throw new CliError(messageOf(e));
    });
    const grow = base.length < top.length ? PERM.RESIZE : 0;
    const baseEdge = img.graph.attach(backendParent(), base, {
      name: "root",
      perm: PERM.CONSISTENT_READ | PERM.WRITE | grow,
      shared: PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED | PERM.WRITE | PERM.RESIZE,
    });
    try {
      await commitChain(top, base, baseEdge, { onProgress: (f) => bar.update(f), rateLimit: rate });
    } finally {
      baseEdge.detach();
    }
    bar.update(1);
  } catch (e) {
    bar.interrupt();
    if (e instanceof CliError) throw e;
    throw new CliError(messageOf(e));
  } finally {
    await restore?.();
    await img.close();
  }
  if (emptyPlan !== undefined) {
    // The image is closed now: rebuilt as a fresh image (qemu-img's make_completely_empty), or every
    // cluster unmapped (its full discard), on the image file itself.
    const file = await openImage(emptyPlan.filename, { format: "file", resize: true });
    try {
      if (emptyPlan.kind === "rebuild") await emptyQcow2(file.root);
      else await unmapActiveTable(file.root);
    } catch (e) {
      throw new CliError(`Could not empty ${filename}: ${messageOf(e)}`);
    } finally {
      await file.close();
    }
  }
  bar.end();
  if (!quiet) ctx.out("Image committed.\n");
  return 0;
}
