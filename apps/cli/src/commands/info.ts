/** `blk-img info [-f fmt] [--output=human|json] [--backing-chain] [-U] [--image-opts] filename` */
import { realpath } from "node:fs/promises";
import type { BlockNode } from "@blk/core";
import type { OpenedImage } from "@blk/drivers";
import type { Context } from "../context.ts";
import { CliError, usage } from "../errors.ts";
import { getopt } from "../getopt.ts";
import { allocatedSize, openImg, outputFormat } from "../image.ts";
import { humanSize } from "../size.ts";
import { commandHelp } from "../usage.ts";
import { snapshotTable } from "./snapshot.ts";

/** What a format driver's state may tell beyond `info()` (qcow2 does; raw has none of it). */
interface StateExtras {
  backingFilename?: unknown;
  backingFormat?: unknown;
  dirty?: unknown;
  encrypted?: unknown;
  snapshotInfo?: unknown;
}

/**
 * Resolves a stored backing name against the overlay's name as given (not normalised): absolute names
 * and `protocol:` names are kept.
 */
export function resolveBacking(overlay: string, backing: string): string {
  if (backing.startsWith("/")) return backing;
  const m = /[:/]/.exec(backing);
  if (m?.[0] === ":") return backing;
  const slash = overlay.lastIndexOf("/");
  return slash < 0 ? backing : overlay.slice(0, slash + 1) + backing;
}

/** The driver-reported extras of a node (duck-typed, so any registered format can provide them). */
function extras(node: BlockNode): {
  backing?: string;
  backingFormat?: string;
  dirty: boolean;
  encrypted: boolean;
  snapshots?: unknown[];
} {
  const s = node.state as unknown as StateExtras;
  const out: ReturnType<typeof extras> = { dirty: s.dirty === true, encrypted: s.encrypted === true };
  if (typeof s.backingFilename === "string") out.backing = s.backingFilename;
  if (typeof s.backingFormat === "string") out.backingFormat = s.backingFormat;
  if (typeof s.snapshotInfo === "function") {
    const snaps = (s.snapshotInfo as () => unknown).call(s);
    if (Array.isArray(snaps) && snaps.length > 0) out.snapshots = snaps;
  }
  return out;
}

/** QEMU's `ImageInfo` of an open image. */
async function imageInfo(
  node: BlockNode,
  filename: string,
  format: string,
): Promise<Record<string, unknown>> {
  const bdi = await node.info();
  const x = extras(node);
  const info: Record<string, unknown> = {};
  if (x.backingFormat !== undefined && x.backing !== undefined)
    info["backing-filename-format"] = x.backingFormat;
  info["virtual-size"] = node.length;
  info.filename = filename;
  if (bdi.clusterSize !== undefined) info["cluster-size"] = bdi.clusterSize;
  info.format = format;
  const actual = await allocatedSize(node);
  if (actual !== undefined) info["actual-size"] = actual;
  if (x.encrypted) info.encrypted = true;
  if (x.snapshots !== undefined) info.snapshots = x.snapshots;
  if (bdi.formatSpecific !== undefined) info["format-specific"] = { type: format, data: bdi.formatSpecific };
  if (x.backing !== undefined) {
    info["full-backing-filename"] = resolveBacking(filename, x.backing);
    info["backing-filename"] = x.backing;
  }
  // QEMU reports the dirty flag only when the driver answers bdrv_get_info (nbd does not; raw asks its
  // protocol).
  if (bdi.unsupported !== true) info["dirty-flag"] = x.dirty;
  return info;
}

function dumpValue(v: unknown, indent: number, lines: string[]): void {
  const pad = " ".repeat(indent);
  if (Array.isArray(v)) {
    v.forEach((item, i) => {
      if (typeof item === "object" && item !== null) {
        lines.push(`${pad}[${i}]:`);
        dumpValue(item, indent + 4, lines);
      } else lines.push(`${pad}[${i}]: ${String(item)}`);
    });
    return;
  }
  if (typeof v === "object" && v !== null) {
    for (const [k, val] of Object.entries(v)) {
      const key = k.replaceAll("-", " ");
      if (typeof val === "object" && val !== null) {
        lines.push(`${pad}${key}:`);
        dumpValue(val, indent + 4, lines);
      } else lines.push(`${pad}${key}: ${String(val)}`);
    }
  }
}

/** qemu-img's human `info` block for an `ImageInfo`. */
function humanInfo(info: Record<string, unknown>): string {
  const lines: string[] = [];
  const size = Number(info["virtual-size"]);
  lines.push(`image: ${String(info.filename)}`);
  lines.push(`file format: ${String(info.format)}`);
  lines.push(`virtual size: ${humanSize(size)} (${size} bytes)`);
  const actual = info["actual-size"];
  lines.push(`disk size: ${typeof actual === "number" ? humanSize(actual) : "unavailable"}`);
  if (info["cluster-size"] !== undefined) lines.push(`cluster_size: ${String(info["cluster-size"])}`);
  if (info.encrypted === true) lines.push("encrypted: yes");
  if (info["dirty-flag"] === true) lines.push("cleanly shut down: no");
  const backing = info["backing-filename"];
  if (typeof backing === "string") {
    const full = info["full-backing-filename"];
    lines.push(
      typeof full === "string" && full !== backing
        ? `backing file: ${backing} (actual path: ${full})`
        : `backing file: ${backing}`,
    );
    if (info["backing-filename-format"] !== undefined) {
      lines.push(`backing file format: ${String(info["backing-filename-format"])}`);
    }
  }
  const snaps = info.snapshots;
  if (Array.isArray(snaps) && snaps.length > 0) lines.push(...snapshotTable(snaps));
  const fs = info["format-specific"] as { data?: unknown } | undefined;
  if (fs?.data !== undefined) {
    lines.push("Format specific information:");
    dumpValue(fs.data, 4, lines);
  }
  return `${lines.join("\n")}\n`;
}

/** Runs `info`. */
export async function info(args: readonly string[], ctx: Context): Promise<number> {
  const { options, operands } = getopt(args, "f:hU", [
    { name: "help", hasArg: false, key: "h" },
    { name: "format", hasArg: true, key: "f" },
    { name: "output", hasArg: true },
    { name: "backing-chain", hasArg: false },
    { name: "object", hasArg: true },
    { name: "image-opts", hasArg: false },
    { name: "force-share", hasArg: false, key: "U" },
  ]);
  let format: string | undefined;
  let output: string | undefined;
  let chain = false;
  let imageOpts = false;
  let forceShare = false;
  for (const o of options) {
    if (o.key === "h") {
      ctx.out(commandHelp("info"));
      return 0;
    }
    if (o.key === "f") format = o.value;
    else if (o.key === "output") output = o.value;
    else if (o.key === "backing-chain") chain = true;
    else if (o.key === "image-opts") imageOpts = true;
    else if (o.key === "U") forceShare = true;
  }
  if (operands.length !== 1) throw usage("Expecting one image file name");
  const filename = operands[0] ?? "";
  const ofmt = outputFormat(output);
  if (imageOpts && format !== undefined)
    throw new CliError("--image-opts and --format are mutually exclusive");

  const opened: OpenedImage[] = [];
  try {
    const top = await openImg({ filename, format, imageOpts, readOnly: true, forceShare, readsData: false });
    opened.push(top);
    const infos = [await imageInfo(top.node, filename, top.format)];
    if (chain) {
      const seen = new Set<string>([await realpath(filename).catch(() => filename)]);
      let node: BlockNode = top.node;
      let name = filename;
      for (;;) {
        const x = extras(node);
        if (x.backing === undefined) break;
        const full = resolveBacking(name, x.backing);
        const real = await realpath(full).catch(() => full);
        if (seen.has(real)) throw new CliError(`Backing file '${full}' creates a loop`);
        seen.add(real);
        let next = node.backing;
        let fmt = x.backingFormat;
        if (next === undefined) {
          const img = await openImg({
            filename: full,
            format: x.backingFormat,
            readOnly: true,
            forceShare,
            readsData: false,
          });
          opened.push(img);
          next = img.node;
          fmt = img.format;
        }
        infos.push(await imageInfo(next, full, fmt ?? next.driver.format));
        node = next;
        name = full;
      }
    }
    if (ofmt === "json") ctx.out(`${JSON.stringify(chain ? infos : infos[0], null, 4)}\n`);
    else ctx.out(infos.map(humanInfo).join("\n"));
    return 0;
  } finally {
    for (const img of opened.reverse()) await img.close();
  }
}
