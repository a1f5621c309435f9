/**
 * A GNU-style getopt for qemu-img's command lines: short options (clustered `-qf raw`, attached
 * `-fraw`), long options (`--output=json`, `--output json`, unique prefixes), operands and options in
 * any order, `--` ends the options. Errors use qemu-img's words.
 */
import { CliError, usage } from "./errors.ts";

/** A long option: its name and whether it takes an argument; `key` is what it reports (default: the name). */
export interface LongOption {
  name: string;
  hasArg: boolean;
  key?: string;
}

/** One parsed option: its key (short letter or long name) and argument. */
interface ParsedOption {
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
 * long options. A `--object` argument is checked as it is parsed ({@link checkObjectDefinition}); its
 * errors exit with `settings.objectExitCode` (default 1; `compare` uses 2, as qemu-img).
 * @throws {CliError} `unrecognized option 'X'`, `missing argument for option 'X'` (usage errors)
 */
export function getopt(
  args: readonly string[],
  short: string,
  long: readonly LongOption[] = [],
  settings: { objectExitCode?: number } = {},
): Parsed {
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
        continue;
      }
      let value: string;
      if (eq >= 0) {
        value = arg.slice(eq + 1);
      } else {
        const v = args[i];
        if (v === undefined) throw usage(`missing argument for option '${arg}'`);
        i++;
        value = v;
      }
      // qemu-img creates each --object as it parses it, so a bad one fails before anything else.
      if (opt.name === "object") checkObjectDefinition(value, settings.objectExitCode);
      options.push({ key, value });
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

/** The object types qemu-img 7.2 can create with `--object` (`qemu-img info --object help`). */
const USER_CREATABLE_TYPES: readonly string[] = [
  "authz-list",
  "authz-list-file",
  "authz-simple",
  "main-loop",
  "pr-manager-helper",
  "secret",
  "secret_keyring",
  "thread-context",
  "throttle-group",
  "tls-cipher-suites",
  "tls-creds-anon",
  "tls-creds-psk",
  "tls-creds-x509",
];

/** QEMU's identifier rule (`id_wellformed`): a letter, then letters, digits, `-`, `.`, `_`. */
const IDENTIFIER = /^[A-Za-z][A-Za-z0-9._-]*$/;

/**
 * Parses a `--object` definition as QEMU's keyval does (`TYPE,key=value,…`, the first item without `=`
 * is `qom-type`, `,,` escapes a comma in values) and checks what qemu-img checks before creating it:
 * the syntax, a known `qom-type`, a well-formed `id`, and `data` or `file` for a `secret`. blk-img
 * uses no object itself, so a valid definition changes nothing.
 * @param exitCode exit code of the errors (qemu-img's `compare` exits 2, other commands 1)
 * @returns the properties by name (the last of repeated keys wins)
 * @throws {CliError} with qemu-img's messages (`Parameter 'qom-type' is missing`, `Parameter 'qom-type' does
 *   not accept value 'X'`, `Parameter 'id' is missing`, `Parameter 'id' expects an identifier`,
 *   `Expected '=' after parameter 'X'`, `Invalid parameter ''`, `Either 'file' or 'data' must be provided`)
 */
export function checkObjectDefinition(text: string, exitCode = 1): Map<string, string> {
  const fail = (message: string, bare: readonly string[] = []): CliError =>
    new CliError(message, { exitCode, bare });
  const props = new Map<string, string>();
  let i = 0;
  let first = true;
  while (i < text.length) {
    let j = i;
    while (j < text.length && text[j] !== "=" && text[j] !== ",") j++;
    const key = text.slice(i, j);
    if (key === "") throw fail("Invalid parameter ''");
    if (text[j] !== "=") {
      if (!first) throw fail(`Expected '=' after parameter '${key}'`);
      props.set("qom-type", key);
      i = j + 1;
      first = false;
      continue;
    }
    let value = "";
    j++;
    while (j < text.length) {
      if (text[j] === ",") {
        if (text[j + 1] !== ",") break;
        j++;
      }
      value += text[j];
      j++;
    }
    props.set(key, value);
    i = j + 1;
    first = false;
  }
  const type = props.get("qom-type");
  if (type === undefined) throw fail("Parameter 'qom-type' is missing");
  if (!USER_CREATABLE_TYPES.includes(type))
    throw fail(`Parameter 'qom-type' does not accept value '${type}'`);
  const id = props.get("id");
  if (id === undefined) throw fail("Parameter 'id' is missing");
  if (!IDENTIFIER.test(id)) {
    throw fail("Parameter 'id' expects an identifier", [
      "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
    ]);
  }
  if (type === "secret" && !props.has("data") && !props.has("file")) {
    throw fail("Either 'file' or 'data' must be provided");
  }
  return props;
}

/**
 * qemu-img's check of an `-o` argument: not empty, not starting with a comma, and not ending in an odd
 * number of commas (a trailing `,,` is an escaped comma).
 * @throws {CliError} `Invalid option list: TEXT`
 */
export function checkOptionList(text: string): void {
  let trailing = 0;
  while (trailing < text.length && text[text.length - 1 - trailing] === ",") trailing++;
  if (text === "" || text.startsWith(",") || trailing % 2 === 1) {
    throw new CliError(`Invalid option list: ${text}`);
  }
}
