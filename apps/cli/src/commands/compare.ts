/**
 * `blk-img compare [-f fmt] [-F fmt] [-s] [-p] [-q] [-U] filename1 filename2`: exit 0 identical,
 * 1 different, 2 open error, 3 block-status error, 4 read error.
 */
import type { BlockNode, BlockStatusExtent } from "@blk/core";
import type { OpenedImage } from "@blk/drivers";
import type { Context } from "../context.ts";
import { CliError, messageOf, usage } from "../errors.ts";
import { getopt } from "../getopt.ts";
import { checkCacheMode, openImg } from "../image.ts";
import { makeProgress, type Progress } from "../progress.ts";
import { ExtentCursor } from "../status.ts";
import { commandHelp } from "../usage.ts";

const SECTOR = 512;
/** Bytes compared per read. */
const IO_BUF = 2 << 20;

/** The first 512-byte sector at which `a` and `b` differ (its offset in the buffers), or -1. */
function firstDifferentSector(a: Uint8Array, b: Uint8Array | undefined): number {
  for (let s = 0; s < a.length; s += SECTOR) {
    const end = Math.min(s + SECTOR, a.length);
    for (let i = s; i < end; i++) {
      if (a[i] !== (b === undefined ? 0 : b[i])) return s;
    }
  }
  return -1;
}

interface Status {
  readonly node: BlockNode;
  readonly name: string;
  readonly extents: ExtentCursor;
}

async function statusAt(s: Status, offset: number): Promise<BlockStatusExtent> {
  try {
    return await s.extents.at(offset);
  } catch {
    throw new CliError(`Sector allocation test failed for ${s.name}`, { exitCode: 3 });
  }
}

async function readAt(s: Status, offset: number, bytes: number): Promise<Uint8Array> {
  try {
    return await s.node.read(offset, bytes);
  } catch (e) {
    throw new CliError(`Error while reading offset ${offset} of ${s.name}: ${messageOf(e)}`, { exitCode: 4 });
  }
}

/**
 * Same block status as QEMU compares it in strict mode: data, zero, allocated, offset validity, and
 * whether the extent reaches the end of its image (QEMU's EOF flag, part of the status word it compares).
 */
function sameStatus(a: BlockStatusExtent, sizeA: number, b: BlockStatusExtent, sizeB: number): boolean {
  return (
    a.data === b.data &&
    a.zero === b.zero &&
    a.allocated === b.allocated &&
    (a.hostOffset === undefined) === (b.hostOffset === undefined) &&
    a.offset + a.length >= sizeA === b.offset + b.length >= sizeB
  );
}

/** Offset of the first non-zero sector of `[offset, offset+bytes)` of `s`, or -1. */
async function firstNonZero(s: Status, offset: number, bytes: number): Promise<number> {
  const buf = await readAt(s, offset, bytes);
  const d = firstDifferentSector(buf, undefined);
  return d < 0 ? -1 : offset + d;
}

/** Runs `compare`. */
export async function compare(args: readonly string[], ctx: Context): Promise<number> {
  const { options, operands } = getopt(
    args,
    "hf:F:T:pqsU",
    [
      { name: "help", hasArg: false, key: "h" },
      { name: "object", hasArg: true },
      { name: "image-opts", hasArg: false },
      { name: "force-share", hasArg: false, key: "U" },
    ],
    { objectExitCode: 2 },
  );
  let fmt1: string | undefined;
  let fmt2: string | undefined;
  let progress = false;
  let quiet = false;
  let strict = false;
  let imageOpts = false;
  let forceShare = false;
  for (const o of options) {
    if (o.key === "h") {
      ctx.out(commandHelp("compare"));
      return 0;
    }
    if (o.key === "f") fmt1 = o.value;
    else if (o.key === "F") fmt2 = o.value;
    else if (o.key === "T") checkCacheMode(o.value, true, 2);
    else if (o.key === "p") progress = true;
    else if (o.key === "q") quiet = true;
    else if (o.key === "s") strict = true;
    else if (o.key === "image-opts") imageOpts = true;
    else if (o.key === "U") forceShare = true;
  }
  if (quiet) progress = false;
  if (operands.length !== 2) throw usage("Expecting two image file names");
  const [name1 = "", name2 = ""] = operands;
  if (imageOpts && (fmt1 !== undefined || fmt2 !== undefined)) {
    throw new CliError("--image-opts and -f/-F are mutually exclusive", { exitCode: 2 });
  }
  const bar = makeProgress(ctx, progress);
  const say = (line: string): void => {
    bar.interrupt();
    if (!quiet) ctx.out(`${line}\n`);
  };
  const opened: OpenedImage[] = [];
  try {
    const a = await openImg({
      filename: name1,
      format: fmt1,
      imageOpts,
      readOnly: true,
      forceShare,
      exitCode: 2,
    });
    opened.push(a);
    const b = await openImg({
      filename: name2,
      format: fmt2,
      imageOpts,
      readOnly: true,
      forceShare,
      exitCode: 2,
    });
    opened.push(b);
    const s1: Status = { node: a.node, name: name1, extents: new ExtentCursor(a.node, a.node.length) };
    const s2: Status = { node: b.node, name: name2, extents: new ExtentCursor(b.node, b.node.length) };
    const size1 = a.node.length;
    const size2 = b.node.length;
    bar.update(0);
    try {
      if (size1 !== size2 && strict) {
        say("Strict mode: Image size mismatch!");
        return 1;
      }
      return await compareData(s1, s2, size1, size2, strict, bar, say);
    } finally {
      bar.end();
    }
  } finally {
    for (const img of opened.reverse()) await img.close();
  }
}

async function compareData(
  s1: Status,
  s2: Status,
  size1: number,
  size2: number,
  strict: boolean,
  bar: Progress,
  say: (line: string) => void,
): Promise<number> {
  const common = Math.min(size1, size2);
  const total = Math.max(size1, size2);
  const mismatch = (offset: number): number => {
    say(`Content mismatch at offset ${offset}!`);
    return 1;
  };
  let pos = 0;
  while (pos < common) {
    const e1 = await statusAt(s1, pos);
    const e2 = await statusAt(s2, pos);
    let chunk = Math.min(e1.length, e2.length);
    if (strict && !sameStatus(e1, size1, e2, size2)) {
      say(`Strict mode: Offset ${pos} block status mismatch!`);
      return 1;
    }
    if (e1.zero && e2.zero) {
      // Both read as zeroes.
    } else if (e1.allocated === e2.allocated) {
      if (e1.allocated) {
        chunk = Math.min(chunk, IO_BUF);
        const buf1 = await readAt(s1, pos, chunk);
        const buf2 = await readAt(s2, pos, chunk);
        const d = firstDifferentSector(buf1, buf2);
        if (d >= 0) return mismatch(pos + d);
      }
    } else {
      chunk = Math.min(chunk, IO_BUF);
      const nz = await firstNonZero(e1.allocated ? s1 : s2, pos, chunk);
      if (nz >= 0) return mismatch(nz);
    }
    pos += chunk;
    bar.update(pos / total);
  }
  if (size1 !== size2) {
    // Only once the common part matched, as qemu-img.
    say("Warning: Image size mismatch!");
    const big = size1 > size2 ? s1 : s2;
    while (pos < total) {
      const e = await statusAt(big, pos);
      let chunk = e.length;
      if (e.allocated && !e.zero) {
        chunk = Math.min(chunk, IO_BUF);
        const nz = await firstNonZero(big, pos, chunk);
        if (nz >= 0) return mismatch(nz);
      }
      pos += chunk;
      bar.update(pos / total);
    }
  }
  bar.update(1);
  say("Images are identical.");
  return 0;
}
