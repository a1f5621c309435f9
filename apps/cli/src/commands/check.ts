/**
 * `blk-img check [-f fmt] [-r leaks|all] [--output=human|json] [-q] [-U] filename`: exit 0 consistent,
 * 1 not checked, 2 corruptions, 3 leaks only, 63 the format has no check. The problem lines (`Leaked
 * cluster …`, `ERROR …`, `Repairing …`) go to stderr as qemu-img prints them; after a repair that fixed
 * something the image is checked again ("Double checking the fixed image now...") and that check's numbers
 * are the result.
 */
import type { CheckResult } from "@blk/core";
import type { OpenedImage } from "@blk/drivers";
import { openQcow2 } from "@blk/drivers/qcow2";
import type { Context } from "../context.ts";
import { CliError, messageOf, usage } from "../errors.ts";
import { getopt } from "../getopt.ts";
import { checkCacheMode, openImg, outputFormat } from "../image.ts";
import { commandHelp } from "../usage.ts";

/** Exit code of a format without consistency checks. */
const EXIT_UNSUPPORTED = 63;

/**
 * The order qemu-img prints `ImageCheck` members in: its JSON comes from a QDict, iterated by hash bucket
 * (QEMU's tdb hash of the key, 512 buckets), which for these keys is this fixed order.
 */
const CHECK_KEY_ORDER = [
  "image-end-offset",
  "compressed-clusters",
  "total-clusters",
  "corruptions",
  "corruptions-fixed",
  "check-errors",
  "leaks",
  "leaks-fixed",
  "allocated-clusters",
  "filename",
  "format",
  "fragmented-clusters",
];

/** QEMU's `ImageCheck` object (zero optional counters omitted), members in qemu-img's order. */
function checkJson(filename: string, format: string, r: CheckResult): Record<string, unknown> {
  const out: Record<string, unknown> = { filename, format, "check-errors": r.checkErrors };
  if (r.imageEndOffset !== undefined) out["image-end-offset"] = r.imageEndOffset;
  if (r.corruptions > 0) out.corruptions = r.corruptions;
  if (r.leaks > 0) out.leaks = r.leaks;
  if ((r.corruptionsFixed ?? 0) > 0) out["corruptions-fixed"] = r.corruptionsFixed;
  if ((r.leaksFixed ?? 0) > 0) out["leaks-fixed"] = r.leaksFixed;
  if (r.totalClusters !== undefined) out["total-clusters"] = r.totalClusters;
  if (r.allocatedClusters !== undefined) out["allocated-clusters"] = r.allocatedClusters;
  if ((r.fragmentedClusters ?? 0) > 0) out["fragmented-clusters"] = r.fragmentedClusters;
  const compressed = (r as { compressedClusters?: number }).compressedClusters ?? 0;
  if (compressed > 0) out["compressed-clusters"] = compressed;
  const ordered: Record<string, unknown> = {};
  for (const k of CHECK_KEY_ORDER) if (k in out) ordered[k] = out[k];
  return ordered;
}

/** Prints the problem lines of a check result (or of a check that failed) to stderr. */
function printMessages(ctx: Context, r: unknown): void {
  const m = (r as { messages?: unknown } | null)?.messages;
  if (!Array.isArray(m)) return;
  for (const line of m) if (typeof line === "string") ctx.err(`${line}\n`);
}

/**
 * Opens a qcow2 image again for `check -r` as qemu-img does (`BDRV_O_CHECK`): read-write even with the
 * corrupt bit set, and a dirty image left for the check to repair rather than repaired on open.
 */
async function reopenForRepair(img: OpenedImage, filename: string): Promise<OpenedImage> {
  await img.close();
  let q: Awaited<ReturnType<typeof openQcow2>>;
  try {
    q = await openQcow2(filename, { writable: true, noBacking: true, qcow2: { "x-blk-check": true } });
  } catch (e) {
    throw new CliError(`Could not open '${filename}': ${messageOf(e)}`);
  }
  const close = (): Promise<void> => q.close();
  return {
    graph: q.graph,
    node: q.node,
    file: q.node.children.get("file")?.child,
    format: "qcow2",
    probed: true,
    root: q.root,
    warnings: [],
    close,
    [Symbol.asyncDispose]: close,
  };
}

/** qemu-img's human check summary. */
function checkHuman(r: CheckResult): string {
  const lines: string[] = [];
  const fixedLeaks = r.leaksFixed ?? 0;
  const fixedCorr = r.corruptionsFixed ?? 0;
  if (fixedLeaks > 0 || fixedCorr > 0) {
    lines.push("The following inconsistencies were found and repaired:", "");
    lines.push(`    ${fixedLeaks} leaked clusters`, `    ${fixedCorr} corruptions`, "");
    lines.push("Double checking the fixed image now...");
  }
  if (r.corruptions === 0 && r.leaks === 0 && r.checkErrors === 0) {
    lines.push("No errors were found on the image.");
  } else {
    if (r.corruptions > 0) {
      lines.push(
        "",
        `${r.corruptions} errors were found on the image.`,
        "Data may be corrupted, or further writes to the image may corrupt it.",
      );
    }
    if (r.leaks > 0) {
      lines.push(
        "",
        `${r.leaks} leaked clusters were found on the image.`,
        "This means waste of disk space, but no harm to data.",
      );
    }
    if (r.checkErrors > 0) {
      lines.push("", `${r.checkErrors} internal errors have occurred during the check.`);
    }
  }
  const total = r.totalClusters ?? 0;
  if (total > 0 && r.allocatedClusters !== undefined) {
    const alloc = r.allocatedClusters;
    const pct = (n: number, d: number): string => (d === 0 ? 0 : (n * 100) / d).toFixed(2);
    const compressed = (r as { compressedClusters?: number }).compressedClusters ?? 0;
    lines.push(
      `${alloc}/${total} = ${pct(alloc, total)}% allocated, ${pct(r.fragmentedClusters ?? 0, alloc)}% fragmented, ${pct(compressed, alloc)}% compressed clusters`,
    );
  }
  if (r.imageEndOffset !== undefined) lines.push(`Image end offset: ${r.imageEndOffset}`);
  return `${lines.join("\n")}\n`;
}

/** Runs `check`. */
export async function check(args: readonly string[], ctx: Context): Promise<number> {
  const { options, operands } = getopt(args, "hf:r:T:qU", [
    { name: "help", hasArg: false, key: "h" },
    { name: "format", hasArg: true, key: "f" },
    { name: "repair", hasArg: true, key: "r" },
    { name: "output", hasArg: true },
    { name: "object", hasArg: true },
    { name: "image-opts", hasArg: false },
    { name: "force-share", hasArg: false, key: "U" },
  ]);
  let format: string | undefined;
  let output: string | undefined;
  let repair: "leaks" | "all" | undefined;
  let quiet = false;
  let imageOpts = false;
  let forceShare = false;
  for (const o of options) {
    if (o.key === "h") {
      ctx.out(commandHelp("check"));
      return 0;
    }
    if (o.key === "f") format = o.value;
    else if (o.key === "output") output = o.value;
    else if (o.key === "r") {
      if (o.value === "leaks" || o.value === "all") repair = o.value;
      else throw usage(`Unknown option value for -r (expecting 'leaks' or 'all'): ${o.value}`);
    } else if (o.key === "T") checkCacheMode(o.value, true);
    else if (o.key === "q") quiet = true;
    else if (o.key === "image-opts") imageOpts = true;
    else if (o.key === "U") forceShare = true;
  }
  if (operands.length !== 1) throw usage("Expecting one image file name");
  const filename = operands[0] ?? "";
  const ofmt = outputFormat(output);
  if (imageOpts && format !== undefined)
    throw new CliError("--image-opts and --format are mutually exclusive");
  // Opened read-write (a repair), a probed raw image gets QEMU's warning, as in qemu-img.
  const open = (readOnly: boolean): Promise<OpenedImage> =>
    openImg({
      filename,
      format,
      imageOpts,
      readOnly,
      forceShare: forceShare && readOnly,
      readsData: false,
      ...(readOnly ? {} : { onWarning: (m: string) => ctx.err(`${m}\n`) }),
    });
  // A repair opens read-only first to learn the format: a qcow2 image must not be opened read-write the
  // usual way, which would repair a dirty image on open (and refuse a corrupt one).
  let img = await open(repair === undefined || !imageOpts);
  if (repair !== undefined && !imageOpts) {
    if (img.format === "qcow2") img = await reopenForRepair(img, filename);
    else {
      await img.close();
      img = await open(false);
    }
  }
  try {
    if (!img.node.state.capabilities.check) {
      throw new CliError("This image format does not support checks", { exitCode: EXIT_UNSUPPORTED });
    }
    let r: CheckResult;
    const run = async (o: { repair?: "leaks" | "all" }): Promise<CheckResult> => {
      try {
        const res = await img.node.check(o);
        printMessages(ctx, res);
        return res;
      } catch (e) {
        printMessages(ctx, e);
        throw new CliError(`Check failed: ${messageOf(e)}`);
      }
    };
    r = await run(repair === undefined ? {} : { repair });
    const leaksFixed = r.leaksFixed ?? 0;
    const corruptionsFixed = r.corruptionsFixed ?? 0;
    if (leaksFixed > 0 || corruptionsFixed > 0) {
      if (ofmt === "human" && !quiet) {
        ctx.out(
          "The following inconsistencies were found and repaired:\n\n" +
            `    ${leaksFixed} leaked clusters\n    ${corruptionsFixed} corruptions\n\n` +
            "Double checking the fixed image now...\n",
        );
      }
      r = { ...(await run({})), leaksFixed, corruptionsFixed };
    }
    if (ofmt === "json") ctx.out(`${JSON.stringify(checkJson(filename, img.format, r), null, 4)}\n`);
    else if (!quiet) ctx.out(checkHuman({ ...r, leaksFixed: 0, corruptionsFixed: 0 }));
    if (r.checkErrors > 0) return 1;
    if (r.corruptions > 0) return 2;
    if (r.leaks > 0) return 3;
    return 0;
  } finally {
    await img.close();
  }
}
