/** `blk-img map [-f fmt] [--output=human|json] [--start-offset=N] [--max-length=N] [-U] filename` */
import type { BlockNode, BlockStatusExtent } from "@blk/core";
import type { Context } from "../context.ts";
import { CliError, invalidSize, sizeOutOfRange, usage } from "../errors.ts";
import { getopt } from "../getopt.ts";
import { layerFilename, openImg, outputFormat } from "../image.ts";
import { MAX_SIZE, parseSize } from "../size.ts";
import { statusOf } from "../status.ts";
import { commandHelp } from "../usage.ts";

/** One `map` entry (qemu-img's `MapEntry`, keys in its output order) plus the layer's filename. */
interface MapLine {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  filename?: string;
}

/** The JSON text of one entry, as qemu-img 7.2 prints it (fixed key order, `offset` only when known). */
function mapEntryJson(e: MapLine): string {
  const off = e.offset === undefined ? "" : `, "offset": ${e.offset}`;
  return `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${off}}`;
}

const hex = (n: number): string => (n === 0 ? "0" : `0x${n.toString(16)}`);

function mergeable(a: MapLine, b: MapLine): boolean {
  return (
    a.start + a.length === b.start &&
    a.depth === b.depth &&
    a.present === b.present &&
    a.zero === b.zero &&
    a.data === b.data &&
    a.filename === b.filename &&
    (a.offset === undefined) === (b.offset === undefined) &&
    (a.offset === undefined || a.offset + a.length === b.offset)
  );
}

function layerName(top: BlockNode, depth: number, topName: string): string | undefined {
  let n: BlockNode | undefined = top;
  for (let d = 0; d < depth && n !== undefined; d++) n = n.backing;
  if (n === undefined) return undefined;
  return depth === 0 ? topName : (layerFilename(n) ?? undefined);
}

/** The merged map of `[start, end)` of `node` over its backing chain. */
async function mapEntries(node: BlockNode, start: number, end: number, name: string): Promise<MapLine[]> {
  const out: MapLine[] = [];
  let pos = start;
  while (pos < end) {
    const got: BlockStatusExtent[] = await statusOf(node, pos, Math.min(end - pos, 1 << 30));
    if (got.length === 0) break;
    for (const e of got) {
      const depth = e.depth ?? 0;
      const line: MapLine = {
        start: e.offset,
        length: Math.min(e.length, end - e.offset),
        depth,
        present: e.allocated,
        zero: e.zero,
        data: e.data,
      };
      if (e.hostOffset !== undefined) line.offset = e.hostOffset;
      const fname = e.hostOffset === undefined ? undefined : layerName(node, depth, name);
      if (fname !== undefined) line.filename = fname;
      const last = out.at(-1);
      if (last !== undefined && mergeable(last, line)) last.length += line.length;
      else out.push(line);
      pos = e.offset + e.length;
    }
  }
  return out;
}

function offsetOption(text: string, what: string): number {
  if (text.trimStart().startsWith("-")) throw invalidSize(what);
  const s = parseSize(text);
  if (!s.ok && s.error === "invalid") throw invalidSize(what);
  // As qemu-img's cvtnum: a number it can read but not fit is out of range, not invalid.
  if (!s.ok || s.value > MAX_SIZE) throw sizeOutOfRange(what);
  return Number(s.value);
}

/** Runs `map`. */
export async function map(args: readonly string[], ctx: Context): Promise<number> {
  const { options, operands } = getopt(args, "f:hU", [
    { name: "help", hasArg: false, key: "h" },
    { name: "format", hasArg: true, key: "f" },
    { name: "output", hasArg: true },
    { name: "object", hasArg: true },
    { name: "image-opts", hasArg: false },
    { name: "force-share", hasArg: false, key: "U" },
    { name: "start-offset", hasArg: true, key: "s" },
    { name: "max-length", hasArg: true, key: "l" },
  ]);
  let format: string | undefined;
  let output: string | undefined;
  let imageOpts = false;
  let forceShare = false;
  let start = 0;
  let maxLength = Number.MAX_SAFE_INTEGER;
  for (const o of options) {
    if (o.key === "h") {
      ctx.out(commandHelp("map"));
      return 0;
    }
    if (o.key === "f") format = o.value;
    else if (o.key === "output") output = o.value;
    else if (o.key === "image-opts") imageOpts = true;
    else if (o.key === "U") forceShare = true;
    else if (o.key === "s") start = offsetOption(o.value, "start offset");
    else if (o.key === "l") maxLength = offsetOption(o.value, "max length");
  }
  if (operands.length !== 1) throw usage("Expecting one image file name");
  const filename = operands[0] ?? "";
  const ofmt = outputFormat(output);
  if (imageOpts && format !== undefined)
    throw new CliError("--image-opts and --format are mutually exclusive");

  const img = await openImg({ filename, format, imageOpts, readOnly: true, forceShare });
  try {
    const length = img.node.length;
    const end = Math.min(length, start + Math.min(maxLength, Number.MAX_SAFE_INTEGER - start));
    const entries = start < end ? await mapEntries(img.node, start, end, filename) : [];
    if (ofmt === "json") {
      const lines =
        entries.length === 0
          ? [mapEntryJson({ start, length: 0, depth: 0, present: false, zero: false, data: false })]
          : entries.map(mapEntryJson);
      ctx.out(`[${lines.join(",\n")}]\n`);
      return 0;
    }
    ctx.out(`${"Offset".padEnd(16)}${"Length".padEnd(16)}${"Mapped to".padEnd(16)}File\n`);
    for (const e of entries) {
      if (!e.data) continue;
      if (e.offset === undefined || e.filename === undefined) {
        throw new CliError("File contains external, encrypted or compressed clusters.");
      }
      ctx.out(
        `${hex(e.start).padEnd(16)}${hex(e.length).padEnd(16)}${hex(e.offset).padEnd(16)}${e.filename}\n`,
      );
    }
    return 0;
  } finally {
    await img.close();
  }
}
