/**
 * A GNU-style getopt for qemu-img's command lines: short options (clustered `-qf raw`, attached
 * `-fraw`), long options (`--output=json`, `--output json`, unique prefixes), operands and options in
 * any order, `--` ends the options. Errors use qemu-img's words.
 */
import { usage } from "./errors.ts";

/** A long option: its name and whether it takes an argument; `key` is what it reports (default: the name). */
export interface LongOption {
  name: string;
  hasArg: boolean;
  key?: string;
}

/** One parsed option: its key (short letter or long name) and argument. */
export interface ParsedOption {
  key: string;
  value: string;
}

/** What {@link getopt} returns. */
export interface Parsed {
  options: ParsedOption[];
  operands: string[];
}

/**
 * Parses `args` with a getopt `short` spec (`"f:hU"`: a letter followed by `:` takes an argument) and
 * long options.
 * @throws {CliError} `unrecognized option 'X'`, `missing argument for option 'X'` (usage errors)
 */
export function getopt(args: readonly string[], short: string, long: readonly LongOption[] = []): Parsed {
  const takesArg = new Map<string, boolean>();
  for (let i = 0; i < short.length; i++) {
    const c = short[i];
    if (c === undefined || c === ":") continue;
    takesArg.set(c, short[i + 1] === ":");
  }
  const options: ParsedOption[] = [];
  const operands: string[] = [];
  let i = 0;
  while (i < args.length) {
    const arg = args[i] ?? "";
    i++;
    if (arg === "--") {
      operands.push(...args.slice(i));
      break;
    }
    if (arg.startsWith("--")) {
      const eq = arg.indexOf("=");
      const name = arg.slice(2, eq < 0 ? undefined : eq);
      const exact = long.find((o) => o.name === name);
      const prefixed = long.filter((o) => o.name.startsWith(name));
      const opt = exact ?? (prefixed.length === 1 ? prefixed[0] : undefined);
      if (opt === undefined || name === "") throw usage(`unrecognized option '${arg}'`);
      const key = opt.key ?? opt.name;
      if (!opt.hasArg) {
        if (eq >= 0) throw usage(`unrecognized option '${arg}'`);
        options.push({ key, value: "" });
      } else if (eq >= 0) {
        options.push({ key, value: arg.slice(eq + 1) });
      } else {
        const v = args[i];
        if (v === undefined) throw usage(`missing argument for option '${arg}'`);
        i++;
        options.push({ key, value: v });
      }
      continue;
    }
    if (arg.startsWith("-") && arg.length > 1) {
      for (let j = 1; j < arg.length; j++) {
        const c = arg[j] ?? "";
        const hasArg = takesArg.get(c);
        if (hasArg === undefined) throw usage(`unrecognized option '${arg}'`);
        if (!hasArg) {
          options.push({ key: c, value: "" });
          continue;
        }
        if (j + 1 < arg.length) {
          options.push({ key: c, value: arg.slice(j + 1) });
        } else {
          const v = args[i];
          if (v === undefined) throw usage(`missing argument for option '${arg}'`);
          i++;
          options.push({ key: c, value: v });
        }
        break;
      }
      continue;
    }
    operands.push(arg);
  }
  return { options, operands };
}
