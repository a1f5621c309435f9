/**
 * The parts of QEMU's option plumbing (QDict flattening, QemuOpts absorption and value parsing) that decide
 * which error the gluster JSON form reports and with which text. Written from observed qemu-img 7.2
 * behaviour (see /work/shared/spec/gluster-url.md §4).
 *
 * @module
 */

import { GlusterError } from "./errors.ts";

/** A flattened option dictionary: dotted keys (`server.0.host`) to leaf values. */
export type FlatDict = Map<string, unknown>;

const isPlainObject = (v: unknown): v is Record<string, unknown> => {
  if (typeof v !== "object" || v === null || Array.isArray(v)) return false;
  const proto: unknown = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
};

/**
 * Flattens nested objects and arrays into dotted keys as QEMU's `qdict_flatten` does: non-empty objects and
 * arrays are descended into (`server[0].host` becomes `server.0.host`), empty ones are kept as leaves.
 * `undefined` values are dropped (JSON cannot express them). Returns `undefined` when `input` is not an object.
 */
export function flatten(input: unknown): FlatDict | undefined {
  if (!isPlainObject(input)) return undefined;
  const out: FlatDict = new Map();
  // An explicit stack (deeply nested JSON must not overflow the call stack), visited in key order.
  const stack: [string, unknown][] = Object.entries(input).reverse();
  for (let top = stack.pop(); top !== undefined; top = stack.pop()) {
    const [key, value] = top;
    if (value === undefined) continue;
    let children: [string, unknown][] | undefined;
    if (Array.isArray(value) && value.length > 0)
      children = Array.from(value, (v: unknown, i): [string, unknown] => [`${key}.${i}`, v]);
    else if (isPlainObject(value) && Object.keys(value).length > 0) {
      children = Object.entries(value).map(([k, v]) => [`${key}.${k}`, v]);
    }
    if (children === undefined) out.set(key, value);
    else for (let i = children.length - 1; i >= 0; i--) stack.push(children[i] as [string, unknown]);
  }
  return out;
}

/**
 * Formats a double as C's `printf("%.17g")` (what QEMU prints for a non-integer JSON number).
 */
function formatG17(x: number): string {
  if (Number.isNaN(x)) return "nan";
  if (!Number.isFinite(x)) return x > 0 ? "inf" : "-inf";
  if (x === 0) return Object.is(x, -0) ? "-0" : "0";
  const [mantissa = "", expText = "0"] = x.toExponential(16).split("e");
  const exp = Number(expText);
  const sign = mantissa.startsWith("-") ? "-" : "";
  const digits = mantissa.replace("-", "").replace(".", "");
  const trim = (frac: string): string => frac.replace(/0+$/, "");
  if (exp < -4 || exp >= 17) {
    const frac = trim(digits.slice(1));
    const e = Math.abs(exp).toString().padStart(2, "0");
    return `${sign}${digits[0] ?? ""}${frac ? `.${frac}` : ""}e${exp < 0 ? "-" : "+"}${e}`;
  }
  if (exp >= 0) {
    const frac = trim(digits.slice(exp + 1));
    return `${sign}${digits.slice(0, exp + 1)}${frac ? `.${frac}` : ""}`;
  }
  return `${sign}0.${trim("0".repeat(-exp - 1) + digits)}`;
}

/**
 * The string QemuOpts sees for a leaf value: strings as they are, JSON numbers as QEMU prints them (integers
 * in decimal, other numbers with `%.17g`), booleans as `on`/`off`. Anything else (null, empty object or
 * array, functions, …) is not a scalar: QEMU skips it, so the option counts as absent (`undefined`).
 */
export function scalarString(v: unknown): string | undefined {
  switch (typeof v) {
    case "string":
      return v;
    case "boolean":
      return v ? "on" : "off";
    case "bigint":
      return v.toString();
    case "number":
      if (Number.isInteger(v) && v >= -(2 ** 63) && v < 2 ** 64) return BigInt(v).toString();
      return formatG17(v);
    case "function":
    case "object":
    case "symbol":
    case "undefined":
      return undefined;
  }
}

const C_SPACE = "[\\t\\n\\v\\f\\r ]*";
const NUMBER_RE = new RegExp(`^${C_SPACE}([+-]?)(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))$`);
const U64_MAX = 2n ** 64n - 1n;

/**
 * Parses a QemuOpts NUMBER option as QEMU does (`strtoull`, base 0: decimal, `0x` hex, `0` octal, leading
 * C whitespace and a sign allowed, a `-` wraps modulo 2^64). Throws QEMU's messages.
 */
export function parseOptionNumber(name: string, value: string, usage: string | undefined): bigint {
  const m = NUMBER_RE.exec(value);
  const opts = usage === undefined ? {} : { usage };
  if (!m) throw new GlusterError(`Parameter '${name}' expects a number`, opts);
  const [, sign, hex, oct, dec] = m;
  const n =
    hex !== undefined ? BigInt(`0x${hex}`) : oct !== undefined ? BigInt(`0o${oct}`) : BigInt(dec ?? "0");
  if (n > U64_MAX) throw new GlusterError(`Value '${value}' is too large for parameter '${name}'`, opts);
  return sign === "-" ? (U64_MAX + 1n - n) & U64_MAX : n;
}

const BOOL_TRUE = new Set(["on", "yes", "true", "y"]);
const BOOL_FALSE = new Set(["off", "no", "false", "n"]);

/** Parses a QemuOpts BOOL option as QEMU does. Throws QEMU's message. */
function parseOptionBool(name: string, value: string, usage: string | undefined): boolean {
  if (BOOL_TRUE.has(value)) return true;
  if (BOOL_FALSE.has(value)) return false;
  throw new GlusterError(`Parameter '${name}' expects 'on' or 'off'`, usage === undefined ? {} : { usage });
}

/** The option types of QemuOpts that the gluster driver uses. */
type OptType = "string" | "number" | "bool";

const encoder = new TextEncoder();

/** QDict's bucket for `key` (QEMU's `tdb_hash` modulo 512 buckets): the order QDict iterates in. */
function qdictBucket(key: string): number {
  const bytes = encoder.encode(key);
  let value = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) value = (value + ((bytes[i] as number) << ((i * 5) % 24))) >>> 0;
  return ((Math.imul(1103515243, value) + 12345) >>> 0) % 512;
}

/**
 * Takes the options named in `desc` out of `dict` (QEMU's `qemu_opts_absorb_qdict`): visits keys in QDict
 * order, converts scalars to strings and type-checks them (first failure thrown, QEMU's message), and removes
 * every absorbed key from `dict`. Returns the absorbed string values.
 */
export function absorb(
  dict: FlatDict,
  desc: Readonly<Record<string, OptType>>,
  usage: string | undefined,
): Map<string, string> {
  const keys = [...dict.keys()].filter((k) => Object.hasOwn(desc, k));
  // QDict iterates bucket by bucket; within a bucket the newest entry comes first.
  const order = keys.map((k, i) => ({ k, b: qdictBucket(k), i })).sort((a, b) => a.b - b.b || b.i - a.i);
  const got = new Map<string, string>();
  for (const { k } of order) {
    const text = scalarString(dict.get(k));
    dict.delete(k);
    if (text === undefined) continue;
    const type = desc[k];
    if (type === "number") parseOptionNumber(k, text, usage);
    else if (type === "bool") parseOptionBool(k, text, usage);
    got.set(k, text);
  }
  return got;
}

/**
 * QEMU's `qdict_array_entries(dict, "server.")`: the number of entries `server.0` … `server.N-1`, each either a
 * single leaf or a group of `server.i.*` keys (not both), with no other `server.*` key left over.
 * Returns -1 where QEMU returns an error (which the gluster driver reports as a missing `server`).
 */
export function arrayEntries(dict: FlatDict, prefix: string): number {
  const groups = new Map<string, { leaf: boolean; sub: number }>();
  let under = 0;
  for (const key of dict.keys()) {
    if (!key.startsWith(prefix)) continue;
    under++;
    const rest = key.slice(prefix.length);
    const dot = rest.indexOf(".");
    const seg = dot < 0 ? rest : rest.slice(0, dot);
    const g = groups.get(seg) ?? { leaf: false, sub: 0 };
    if (dot < 0) g.leaf = true;
    else g.sub++;
    groups.set(seg, g);
  }
  let i = 0;
  let handled = 0;
  for (;;) {
    const g = groups.get(String(i));
    if (g === undefined) break;
    if (g.leaf && g.sub > 0) return -1;
    handled += g.leaf ? 1 : g.sub;
    i++;
  }
  return handled === under ? i : -1;
}

/** QEMU's `qdict_extract_subqdict`: moves every `prefix*` key out of `dict`, without the prefix. */
export function extractSub(dict: FlatDict, prefix: string): FlatDict {
  const sub: FlatDict = new Map();
  for (const [key, value] of dict) {
    if (key.startsWith(prefix)) {
      sub.set(key.slice(prefix.length), value);
      dict.delete(key);
    }
  }
  return sub;
}
