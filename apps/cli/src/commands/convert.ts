/**
 * `blk-img convert [-f fmt] [-O fmt] [-o opts] [-n] [--target-is-zero] [-S size] [-p] [-q] [-m n] [-W]
 * [-C] [-t cache] [-T cache] [-U] src... dst`: copies through core's copy engine, concatenating the
 * sources, leaving zero and unallocated ranges unwritten on a target that reads as zeroes. `-C` copies data
 * with copy offload (`copy_file_range` between two files) where source and target allow it, not searching
 * it for zero runs, and else reads and writes as without `-C`, as qemu-img does.
 */
import { CopyEngine, type CopyError, toBlkError } from "@blk/core";
import { getDriver, type OpenedImage } from "@blk/drivers";
import { hugePageBuffer } from "@blk/drivers/file";
import type { Context } from "../context.ts";
import { type CreateOption, checkCreate, createImage } from "../create-image.ts";
import { CliError, invalidSize, messageOf } from "../errors.ts";
import { getopt } from "../getopt.ts";
import { checkCacheMode, openImg } from "../image.ts";
import { makeProgress } from "../progress.ts";
import { parseSize } from "../size.ts";
import { sparseSplitter } from "../sparse.ts";
import { hasChain, statusOf } from "../status.ts";
import { commandHelp } from "../usage.ts";
import { offloadEnd, openWindow } from "../window.ts";
import { collectOptions, optionHelp, wantsOptionHelp } from "./create.ts";

/** Bytes per copy request. */
const CHUNK = 8 << 20;

/** Largest `-S` qemu-img accepts. */
const MAX_SPARSE = 16 << 20;

/** Runs `convert`. */
export async function convert(args: readonly string[], ctx: Context): Promise<number> {
  const { options, operands } = getopt(args, "hf:O:B:Cco:l:S:pt:T:qnm:WUr:", [
    { name: "help", hasArg: false, key: "h" },
    { name: "object", hasArg: true },
    { name: "image-opts", hasArg: false },
    { name: "target-image-opts", hasArg: false },
    { name: "salvage", hasArg: false },
    { name: "target-is-zero", hasArg: false },
    { name: "bitmaps", hasArg: false },
    { name: "skip-broken-bitmaps", hasArg: false },
    { name: "force-share", hasArg: false, key: "U" },
  ]);
  let srcFormat: string | undefined;
  let outFormat: string | undefined;
  let backing: string | undefined;
  let compress = false;
  const oArgs: string[] = [];
  let snapshot: string | undefined;
  let sparse = 4096;
  let sparseGiven = false;
  let copyRange = false;
  let outOfOrder = false;
  let progress = false;
  let quiet = false;
  let noCreate = false;
  let workers = 8;
  let imageOpts = false;
  let targetCache = "unsafe";
  let targetImageOpts = false;
  let targetIsZero = false;
  let forceShare = false;
  for (const o of options) {
    switch (o.key) {
      case "h":
        ctx.out(commandHelp("convert"));
        return 0;
      case "f":
        srcFormat = o.value;
        break;
      case "O":
        outFormat = o.value;
        break;
      case "B":
        backing = o.value;
        break;
      case "c":
        compress = true;
        break;
      case "o":
        oArgs.push(o.value);
        break;
      case "l":
        snapshot = o.value;
        break;
      case "S": {
        const s = parseSize(o.value);
        if (!s.ok || o.value.trimStart().startsWith("-")) throw invalidSize("buffer size for sparse output");
        const v = Number(s.value);
        if (v % 512 !== 0 || v > MAX_SPARSE) {
          throw new CliError(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. " +
              "Select 0 to disable sparse detection (fully allocates output).",
          );
        }
        sparse = v;
        sparseGiven = true;
        break;
      }
      case "C":
        copyRange = true;
        break;
      case "W":
        outOfOrder = true;
        break;
      case "p":
        progress = true;
        break;
      case "q":
        quiet = true;
        break;
      case "n":
        noCreate = true;
        break;
      case "m": {
        const n = /^[0-9]+$/.test(o.value) ? Number(o.value) : Number.NaN;
        if (!(n >= 1 && n <= 16)) {
          throw new CliError(
            "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16",
          );
        }
        workers = n;
        break;
      }
      case "r": {
        const s = parseSize(o.value);
        if (!s.ok || o.value.trimStart().startsWith("-")) throw invalidSize("rate limit");
        break;
      }
      case "t":
        checkCacheMode(o.value);
        targetCache = o.value;
        break;
      case "T":
        checkCacheMode(o.value, true);
        break;
      case "image-opts":
        imageOpts = true;
        break;
      case "target-image-opts":
        targetImageOpts = true;
        break;
      case "target-is-zero":
        targetIsZero = true;
        break;
      case "U":
        forceShare = true;
        break;
      default:
        // --object, --salvage, --bitmaps, --skip-broken-bitmaps: accepted.
        break;
    }
  }
  if (copyRange && compress) throw new CliError("Cannot enable copy offloading when -c is used");
  if (copyRange && sparseGiven) throw new CliError("Cannot enable copy offloading when -S is used");
  if (targetImageOpts && !noCreate) throw new CliError("--target-image-opts requires use of -n flag");
  if (quiet) progress = false;
  if (imageOpts && srcFormat !== undefined)
    throw new CliError("--image-opts and --format are mutually exclusive");
  if (targetImageOpts && outFormat !== undefined) {
    throw new CliError("--target-image-opts and -O are mutually exclusive");
  }
  const format = outFormat ?? "raw";
  const given = collectOptions(oArgs);
  if (wantsOptionHelp(given)) {
    ctx.out(optionHelp(format));
    return 0;
  }
  if (targetIsZero && !noCreate) throw new CliError("--target-is-zero requires use of -n flag");
  if (operands.length < 2) throw new CliError("Must specify image file name");
  const sources = operands.slice(0, -1);
  const target = operands.at(-1) ?? "";
  if (noCreate && given.length > 0) throw new CliError("-o has no effect when skipping image creation");
  if (getDriver(format) === undefined && !noCreate) checkCreate(format, []);
  if (getDriver(format) === undefined) throw new CliError(`Unknown file format '${format}'`);
  if (backing !== undefined && format === "raw") {
    throw new CliError(`Backing file not supported for file format '${format}'`);
  }
  if (compress && !targetImageOpts && format !== "qcow2")
    throw new CliError("Compression not supported for this file format");
  if (backing !== undefined) {
    throw new CliError(`-B is not supported by blk-img convert for format '${format}' yet`);
  }
  let createOpts: CreateOption[] = [];
  if (!noCreate && !targetImageOpts) createOpts = checkCreate(format, given);

  const opened: OpenedImage[] = [];
  try {
    for (const name of sources) {
      opened.push(
        await openImg({ filename: name, format: srcFormat, imageOpts, readOnly: true, forceShare }),
      );
    }
    if (snapshot !== undefined) {
      throw new CliError(
        `Failed to load snapshot: Block format '${opened[0]?.format ?? "raw"}' used by device '' does not support temporarily loading internal snapshots`,
      );
    }
    const srcs = opened.slice();
    const total = srcs.reduce((n, s) => n + s.node.length, 0);
    if (!noCreate) {
      try {
        await createImage(format, target, total, createOpts);
      } catch (e) {
        throw new CliError(`${target}: error while converting ${format}: ${messageOf(e)}`);
      }
    }
    const dst = await openImg({
      filename: target,
      format: targetImageOpts ? undefined : format,
      imageOpts: targetImageOpts,
      readOnly: false,
      // qemu-img convert writes its target with cache=unsafe unless -t says otherwise: no flushes.
      cacheNoFlush: targetCache === "unsafe",
    });
    opened.push(dst);
    if (noCreate && dst.node.length < total) throw new CliError("output file is smaller than input file");
    // -c: the target stores whole clusters compressed; the copy then works on whole target clusters.
    let clusterGranule = 0;
    if (compress) {
      const st = dst.node.state as { setCompressedWrites?: (on: boolean) => void; clusterSize?: number };
      if (typeof st.setCompressedWrites !== "function") {
        throw new CliError("Compression not supported for this file format");
      }
      try {
        st.setCompressedWrites(true);
      } catch (e) {
        throw new CliError(messageOf(e));
      }
      clusterGranule = st.clusterSize ?? 65536;
    }
    const zeroInit = !noCreate || targetIsZero;
    const findZeroes = sparseSplitter(sparse);
    const bar = makeProgress(ctx, progress);
    bar.update(0);
    let done = 0;
    let base = 0;
    for (const src of srcs) {
      const len = src.node.length;
      if (len > 0) {
        const win = await openWindow(dst.graph, dst.node, {
          base,
          length: len,
          dropZeroes: zeroInit,
        });
        const granule = compress ? clusterGranule : sparse === 0 ? 65536 : 512;
        const work = src.node.createBitmapSync({ granularity: granule, disabled: true });
        let failed: CopyError | undefined;
        try {
          if (zeroInit && sparse !== 0) {
            // The target reads as zeroes: only ranges that do not read as zeroes need any work.
            for (let pos = 0; pos < len; ) {
              const at = pos;
              const got = await statusOf(src.node, pos, Math.min(len - pos, 1 << 30)).catch((e: unknown) => {
                failed = { offset: at, bytes: 0, operation: "read", error: toBlkError(e) };
                throw e;
              });
              if (got.length === 0) break;
              for (const e of got) {
                if (e.zero) done += e.length;
                else work.setDirty(e.offset, e.length);
                pos = e.offset + e.length;
              }
            }
            bar.update(total === 0 ? 1 : done / total);
          } else {
            work.setDirty(0, len);
          }
          // Offload starts below a plain raw node, at its file (reads and block status are the same there).
          const from = copyRange ? offloadEnd(src.node) : { node: src.node };
          // A qcow2 target decides where a write's clusters go before its data is written: the next
          // chunk's write may start then and still land after it (guest order, as without -W).
          const placer = dst.node.state as {
            whenPlaced?: (offset: number, until: Promise<unknown>) => Promise<void>;
          };
          const at = base;
          const writePlaced =
            typeof placer.whenPlaced === "function"
              ? (offset: number, bytes: number, written: Promise<void>): Promise<void> =>
                  placer.whenPlaced?.(at + offset + bytes - 1, written) ?? written
              : undefined;
          const engine = new CopyEngine({
            source: from.via ?? from.node,
            target: win.edge,
            bitmap: work,
            maxWorkers: workers,
            // 8 MiB chunks (qemu-img copies 2 MiB at a time): a quarter of the requests, each of which costs
            // the event loop and the thread pool a round trip, for the same -S result (searched in qemu-img's
            // 2 MiB pieces whatever the chunk size).
            chunkSize: CHUNK,
            // Three chunks in flight (one writing, two reading ahead, each read in four pieces): more
            // buffer memory only costs fresh pages to fault in (measured slower at 64 MiB than at 24).
            maxBufferBytes: 3 * CHUNK,
            // …read as qemu-img reads, 2 MiB at a time: a read error names the same byte as qemu-img's.
            readSize: 2 << 20,
            // With a target that reads as zeroes, block status was asked above: what is left is data.
            status: zeroInit || sparse === 0 || compress ? "none" : hasChain(src.node) ? "chain" : "node",
            // Nothing else writes the sources while blk-img holds them: one status answer serves many chunks.
            staticSource: true,
            // -S: zero runs in the data read are written as zeroes (left unwritten on a target that reads
            // as zeroes), searched on the target's sector grid. Offloaded data is not looked at (qemu-img
            // -C); what is read and written is searched as usual.
            ...(compress || sparse === 0
              ? {}
              : { splitZeroes: (offset, data) => findZeroes(at + offset, data) }),
            copyOffload: copyRange,
            // Without -W, chunks write in guest order (a qcow2 target then lays its clusters out so).
            inOrderWrites: !outOfOrder,
            ...(writePlaced === undefined ? {} : { writePlaced }),
            // Chunk buffers on transparent huge pages: the kernel copies them to and from files with less CPU.
            allocBuffer: (n) => hugePageBuffer(n),
            zeroes: "unmap",
            onProgress: (p) => {
              done += p.bytes;
              bar.update(total === 0 ? 1 : done / total);
            },
            onError: (e) => {
              failed ??= e;
              return "fail";
            },
          });
          await engine.run();
        } catch (e) {
          // qemu-img's wording: the side that failed and the target byte offset of the failed request.
          const f = failed;
          const what = f?.operation === "read" ? "reading" : "writing";
          throw new CliError(
            `error while ${what} at byte ${base + (f?.requestOffset ?? f?.offset ?? 0)}: ${messageOf(f?.error ?? e)}`,
          );
        } finally {
          work.release();
          await win.close();
        }
      }
      base += len;
    }
    await dst.node.flush();
    bar.update(1);
    bar.end();
    return 0;
  } finally {
    for (const img of opened.reverse()) await img.close();
  }
}
