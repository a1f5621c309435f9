/**
 * `blk-img bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b
 * source_file [-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename
 * bitmap`: qemu-img 7.2's persistent bitmap command (qemu-img.md §14). The actions run in command-line
 * order on the image opened read-write, as the matching `block-dirty-bitmap-*` QMP commands: `--add`
 * makes an enabled persistent bitmap (`-g`, default the driver's), `--merge` ORs a bitmap of the same
 * image or of `-b` into it. The first failure ends the command with `Operation OP on bitmap NAME failed:
 * …`; success prints nothing. The bitmaps reach the image when it closes.
 */
import type { BlockNode, DirtyBitmap } from "@blk/core";
import type { OpenedImage } from "@blk/drivers";
import type { Context } from "../context.ts";
import { CliError, invalidSize, messageOf } from "../errors.ts";
import { getopt } from "../getopt.ts";
import { openImg } from "../image.ts";
import { parseSize } from "../size.ts";
import { commandHelp } from "../usage.ts";

type Action = { op: "add" | "remove" | "clear" | "enable" | "disable" } | { op: "merge"; source: string };

/** QMP's `block_dirty_bitmap_lookup` message. */
function lookup(node: BlockNode, name: string): DirtyBitmap {
  const b = node.getBitmap(name);
  if (b === undefined) throw new Error(`Dirty bitmap '${name}' not found`);
  return b;
}

/** One action, as the QMP command of the same name does it. */
async function apply(node: BlockNode, source: BlockNode, name: string, act: Action, granularity: number) {
  switch (act.op) {
    case "add":
      await node.createBitmap({
        name,
        persistent: true,
        ...(granularity === 0 ? {} : { granularity }),
      });
      return;
    case "remove": {
      const b = lookup(node, name);
      await b.remove();
      return;
    }
    case "clear":
      lookup(node, name).clear();
      return;
    case "enable":
      lookup(node, name).enable();
      return;
    case "disable":
      lookup(node, name).disable();
      return;
    case "merge": {
      const target = lookup(node, name);
      target.mergeAll([lookup(source, act.source)]);
      return;
    }
  }
}

/** Runs `bitmap`. */
export async function bitmap(args: readonly string[], ctx: Context): Promise<number> {
  const { options, operands } = getopt(args, "b:f:F:g:h", [
    { name: "help", hasArg: false, key: "h" },
    { name: "object", hasArg: true },
    { name: "image-opts", hasArg: false },
    { name: "add", hasArg: false },
    { name: "remove", hasArg: false },
    { name: "clear", hasArg: false },
    { name: "enable", hasArg: false },
    { name: "disable", hasArg: false },
    { name: "merge", hasArg: true },
    { name: "granularity", hasArg: true, key: "g" },
    { name: "source-file", hasArg: true, key: "b" },
    { name: "source-format", hasArg: true, key: "F" },
  ]);
  const actions: Action[] = [];
  let format: string | undefined;
  let srcFile: string | undefined;
  let srcFormat: string | undefined;
  let granularity = 0;
  let imageOpts = false;
  for (const o of options) {
    switch (o.key) {
      case "h":
        ctx.out(commandHelp("bitmap"));
        return 0;
      case "b":
        srcFile = o.value;
        break;
      case "f":
        format = o.value;
        break;
      case "F":
        srcFormat = o.value;
        break;
      case "g": {
        const r = parseSize(o.value);
        if (!r.ok || r.value > BigInt(Number.MAX_SAFE_INTEGER)) throw invalidSize("granularity");
        granularity = Number(r.value);
        break;
      }
      case "add":
      case "remove":
      case "clear":
      case "enable":
      case "disable":
        actions.push({ op: o.key });
        break;
      case "merge":
        actions.push({ op: "merge", source: o.value });
        break;
      case "image-opts":
        imageOpts = true;
        break;
    }
  }
  if (actions.length === 0) {
    throw new CliError("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
  }
  if (granularity !== 0 && !actions.some((a) => a.op === "add")) {
    throw new CliError("granularity only supported with --add");
  }
  if (srcFormat !== undefined && srcFile === undefined) throw new CliError("-F only supported with -b");
  if (srcFile !== undefined && !actions.some((a) => a.op === "merge")) {
    throw new CliError("Merge bitmap source file only supported with --merge");
  }
  if (operands.length !== 2) throw new CliError("Expecting filename and bitmap name");
  if (imageOpts && format !== undefined) {
    throw new CliError("--image-opts and --format are mutually exclusive");
  }
  const [filename = "", name = ""] = operands;
  const onWarning = (m: string): void => ctx.err(`${m}\n`);
  const img = await openImg({ filename, format, imageOpts, readOnly: false, readsData: false, onWarning });
  let src: OpenedImage | undefined;
  try {
    if (srcFile !== undefined) {
      src = await openImg({
        filename: srcFile,
        format: srcFormat,
        readOnly: true,
        readsData: false,
        onWarning,
      });
    }
    for (const act of actions) {
      try {
        await apply(img.node, (src ?? img).node, name, act, granularity);
      } catch (e) {
        const msg = messageOf(e);
        // QEMU's hint after an inconsistent bitmap's error, printed without the program prefix
        const bare = /is inconsistent and cannot be used$/.test(msg)
          ? ["Try block-dirty-bitmap-remove to delete this bitmap from disk"]
          : [];
        throw new CliError(`Operation ${act.op} on bitmap ${name} failed: ${msg}`, { bare });
      }
    }
  } finally {
    await src?.close();
    await img.close();
  }
  return 0;
}
