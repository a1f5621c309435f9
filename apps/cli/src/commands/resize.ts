/** `blk-img resize [-f fmt] [--preallocation=mode] [--shrink] [-q] filename [+|-]size` */
import type { Context } from "../context.ts";
import { CliError, invalidSizeParameter, messageOf, usage } from "../errors.ts";
import { getopt } from "../getopt.ts";
import { openImg } from "../image.ts";
import { parseSize } from "../size.ts";
import { commandHelp } from "../usage.ts";

const PREALLOC = ["off", "metadata", "falloc", "full"] as const;
type Prealloc = (typeof PREALLOC)[number];

/** A resize size operand: absolute, or relative with a leading `+`/`-`. @throws {CliError} */
function parseResize(text: string): { sign: -1 | 0 | 1; value: number } {
  const sign = text.startsWith("+") ? 1 : text.startsWith("-") ? -1 : 0;
  const s = parseSize(sign === 0 ? text : text.slice(1));
  if (!s.ok) throw invalidSizeParameter("size");
  return { sign, value: Number(s.value) };
}

/** Runs `resize`. */
export async function resize(args: readonly string[], ctx: Context): Promise<number> {
  if (args.includes("-h") || args.includes("--help")) {
    ctx.out(commandHelp("resize"));
    return 0;
  }
  if (args.length < 2) throw usage("Not enough arguments");
  // As qemu-img: the size is always the last argument, so that `-1G` is not taken for an option.
  const sizeText = args.at(-1) ?? "";
  const { options, operands } = getopt(args.slice(0, -1), "f:hq", [
    { name: "help", hasArg: false, key: "h" },
    { name: "object", hasArg: true },
    { name: "image-opts", hasArg: false },
    { name: "preallocation", hasArg: true },
    { name: "shrink", hasArg: false },
  ]);
  let format: string | undefined;
  let quiet = false;
  let imageOpts = false;
  let shrink = false;
  let prealloc: Prealloc | undefined;
  for (const o of options) {
    if (o.key === "f") format = o.value;
    else if (o.key === "q") quiet = true;
    else if (o.key === "image-opts") imageOpts = true;
    else if (o.key === "shrink") shrink = true;
    else if (o.key === "preallocation") {
      const p = PREALLOC.find((m) => m === o.value);
      if (p === undefined) throw new CliError(`Invalid preallocation mode '${o.value}'`);
      prealloc = p;
    }
  }
  if (operands.length !== 1) throw usage("Expecting image file name and size");
  const filename = operands[0] ?? "";
  if (imageOpts && format !== undefined)
    throw new CliError("--image-opts and --format are mutually exclusive");
  const rel = parseResize(sizeText);
  const img = await openImg({
    filename,
    format,
    imageOpts,
    readOnly: false,
    resize: true,
    readsData: false,
    onWarning: (m) => ctx.err(`${m}\n`),
  });
  try {
    const current = img.node.length;
    const size = rel.sign === 0 ? rel.value : current + rel.sign * rel.value;
    if (size <= 0) throw new CliError("New image size must be positive");
    if (size < current && !shrink) {
      throw new CliError(
        "Use the --shrink option to perform a shrink operation.\n" +
          "warning: Shrinking an image will delete all data beyond the shrunken image's end. " +
          "Before performing such an operation, make sure there is no important data there.",
      );
    }
    if (size <= current && prealloc !== undefined && prealloc !== "off") {
      throw new CliError("Preallocation can only be used for growing images");
    }
    try {
      const flags = prealloc === undefined ? {} : { preallocation: prealloc };
      await img.root.truncate(size, flags);
    } catch (e) {
      throw new CliError(messageOf(e));
    }
    if (!quiet) ctx.out("Image resized.\n");
    return 0;
  } finally {
    await img.close();
  }
}
