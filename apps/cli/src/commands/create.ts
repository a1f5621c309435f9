/** `blk-img create [-f fmt] [-o options] [-q] [-b backing -F fmt] [-u] filename [size]` */

import { type OpenedImage, openImage } from "@blk/drivers";
import type { Context } from "../context.ts";
import { type CreateOption, checkCreate, createImage, formattingLine } from "../create-image.ts";
import { CliError, invalidSize, messageOf, SIZE_SUFFIX_HINT, usage } from "../errors.ts";
import { checkOptionList, getopt } from "../getopt.ts";
import { splitOptions } from "../image.ts";
import { MAX_SIZE, parseSize } from "../size.ts";
import { commandHelp } from "../usage.ts";
import { resolveBacking } from "./info.ts";

/**
 * Parses a size operand of `create`/`convert -o size`.
 * @throws {CliError} qemu-img's invalid-size or out-of-range message
 */
function imageSize(text: string): number {
  if (text.startsWith("-")) throw invalidSize();
  const s = parseSize(text);
  if (!s.ok && s.error === "invalid") throw invalidSize();
  if (!s.ok || s.value > MAX_SIZE) {
    throw new CliError("Invalid image size specified. Must be between 0 and 9223372036854775807.");
  }
  return Number(s.value);
}

/** Collects `-o` arguments (several `-o` accumulate). */
export function collectOptions(values: readonly string[]): CreateOption[] {
  const out: CreateOption[] = [];
  for (const v of values) {
    for (const [k, val] of splitOptions(v)) out.push([k, val ?? "on"]);
  }
  return out;
}

/** True for `-o help` / `-o ?`. */
export function wantsOptionHelp(options: readonly CreateOption[]): boolean {
  return options.some(([k]) => k === "help" || k === "?");
}

/** The `-o help` text of a format. */
export function optionHelp(format: string): string {
  if (format !== "raw") return `Creation options of '${format}' are listed by its driver.\n`;
  return [
    "Supported raw options:",
    "  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable",
    "  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)",
    "  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)",
    "  size=<size>            - Virtual disk size",
    "",
  ].join("\n");
}

/** Runs `create`. */
export async function create(args: readonly string[], ctx: Context): Promise<number> {
  const { options, operands } = getopt(args, "F:b:f:ho:qu", [
    { name: "help", hasArg: false, key: "h" },
    { name: "object", hasArg: true },
  ]);
  let format = "raw";
  let backing: string | undefined;
  let backingFormat: string | undefined;
  let quiet = false;
  let unsafe = false;
  const oArgs: string[] = [];
  for (const o of options) {
    if (o.key === "h") {
      ctx.out(commandHelp("create"));
      return 0;
    }
    if (o.key === "f") format = o.value;
    else if (o.key === "o") {
      checkOptionList(o.value);
      oArgs.push(o.value);
    } else if (o.key === "q") quiet = true;
    else if (o.key === "b") backing = o.value;
    else if (o.key === "F") backingFormat = o.value;
    else if (o.key === "u") unsafe = true;
  }
  const filename = operands[0];
  if (filename === undefined) throw usage("Expecting image file name");
  const sizeText = operands[1];
  let size = sizeText === undefined ? undefined : imageSize(sizeText);
  if (operands[2] !== undefined) throw usage(`Unexpected argument: ${operands[2]}`);
  const given = collectOptions(oArgs);
  if (wantsOptionHelp(given)) {
    ctx.out(optionHelp(format));
    return 0;
  }
  const inFile = (e: unknown): CliError => {
    const message = messageOf(e);
    // qemu-img follows a size option it cannot parse with the suffix hint (unprefixed lines).
    const bare =
      e instanceof CliError && e.bare.length > 0
        ? e.bare
        : / expects a non-negative number below 2\^64$/.test(message)
          ? SIZE_SUFFIX_HINT
          : [];
    return new CliError(`${filename}: ${message}`, { bare });
  };
  let opts: CreateOption[];
  try {
    opts = checkCreate(format, given);
  } catch (e) {
    throw inFile(e);
  }
  if (backing !== undefined) {
    if (format === "raw") throw inFile(`Backing file not supported for file format '${format}'`);
    opts = opts.filter(([k]) => k !== "backing_file" && k !== "backing_fmt");
    opts.push(["backing_file", backing]);
    if (backingFormat !== undefined) opts.push(["backing_fmt", backingFormat]);
  }
  const sizeOpt = opts.find(([k]) => k === "size");
  if (sizeOpt !== undefined) {
    if (size !== undefined) throw inFile("The image size must be specified only once");
    size = Number(sizeOpt[1]);
  }
  const backingFile = opts.find(([k]) => k === "backing_file")?.[1];
  if (backingFile !== undefined) {
    const fmt = opts.find(([k]) => k === "backing_fmt")?.[1];
    // The backing file is named relative to the new image's directory.
    const path = resolveBacking(filename, backingFile);
    if (unsafe) {
      if (fmt === undefined) throw inFile("Backing file specified without backing format");
    } else {
      let img: OpenedImage;
      try {
        img = await openImage(path, {
          readOnly: true,
          forceShare: true,
          ...(fmt === undefined ? {} : { format: fmt }),
        });
      } catch (e) {
        throw new CliError(`${filename}: ${messageOf(e)}`, { bare: ["Could not open backing image."] });
      }
      const detected = img.format;
      const length = img.node.length;
      await img.close();
      if (fmt === undefined) {
        throw new CliError(`${filename}: Backing file specified without backing format`, {
          bare: [`Detected format of ${detected}.`],
          bareNoNewline: true,
        });
      }
      size ??= length;
    }
  }
  if (size === undefined) throw inFile("Image creation needs a size parameter");
  const rest = opts.filter(([k]) => k !== "size");
  if (!quiet) ctx.out(formattingLine(filename, format, size, rest));
  try {
    await createImage(format, filename, size, rest);
  } catch (e) {
    throw inFile(e);
  }
  return 0;
}
