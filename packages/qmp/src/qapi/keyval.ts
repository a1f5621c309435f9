/**
 * QEMU's keyval syntax (`util/keyval.c` behaviour, QEMU 7.2), re-implemented from observed behaviour:
 *
 * - `key=value` pairs separated by `,`; in a value `,,` stands for one comma;
 * - dotted keys build nested objects (`file.driver=file`); a key's first fragment is a QAPI name
 *   (a letter, then letters, digits, `-`, `_`; optionally a downstream `__RFQDN_` prefix), later fragments may be
 *   list indices (`server.0.host=…`), which turn the object into a list once the whole string is read;
 * - the first element may omit `key=` when the caller names an implied key (`--blockdev null-co,…` has
 *   `driver`); the implied value ends at the first comma (no `,,` escaping there);
 * - a repeated key silently replaces the earlier value;
 * - `help` / `?` as an element asks for help.
 */

import { qapiError } from "./errors.ts";
import { isRecord, MAX_NESTING, type QapiType } from "./types.ts";

/** What keyval produces: strings at the leaves, objects and lists above them. */
export type KeyvalValue = string | KeyvalObject | KeyvalValue[];
/** An object of keyval values. */
export interface KeyvalObject {
  [key: string]: KeyvalValue;
}

/** Options of {@link parseKeyval}. */
export interface KeyvalOptions {
  /** The key of a first element written without `key=` (e.g. `driver` for `--blockdev`, `qom-type` for `--object`). */
  impliedKey?: string;
}

/** The result of {@link parseKeyvalWithHelp}. */
export interface KeyvalParseResult {
  /** The parsed object. */
  value: KeyvalObject;
  /** True when the string contained a `help` or `?` element. */
  help: boolean;
}

/** Longest key fragment QEMU accepts (its buffer holds 127 characters). */
const MAX_FRAGMENT = 127;

const isAlpha = (c: number): boolean => (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a);
const isAlnum = (c: number): boolean => isAlpha(c) || (c >= 0x30 && c <= 0x39);
const DOT = 0x2e;
const DASH = 0x2d;
const UNDERSCORE = 0x5f;

/** Length of the QAPI name at the start of `s` (QEMU's `parse_qapi_name(s, false)`), or 0. */
function qapiNameLength(s: string, from: number): number {
  let p = from;
  if (s.charCodeAt(p) === UNDERSCORE) {
    // downstream extension: __RFQDN_
    p++;
    if (s.charCodeAt(p) !== UNDERSCORE) return 0;
    p++;
    for (let c = s.charCodeAt(p); isAlnum(c) || c === DOT || c === DASH; c = s.charCodeAt(p)) p++;
    if (s.charCodeAt(p) !== UNDERSCORE) return 0;
    p++;
  }
  if (!isAlpha(s.charCodeAt(p))) return 0;
  p++;
  for (let c = s.charCodeAt(p); isAlnum(c) || c === DASH || c === UNDERSCORE; c = s.charCodeAt(p)) p++;
  return p - from;
}

/** Length of a decimal list index at `from`, or 0. */
function indexLength(s: string, from: number): number {
  let p = from;
  for (let c = s.charCodeAt(p); c >= 0x30 && c <= 0x39; c = s.charCodeAt(p)) p++;
  return p - from;
}

/** The list index a key denotes (QEMU's `key_to_index`), or -1. Huge numbers saturate to 2^31 − 1. */
function keyToIndex(key: string): number {
  if (!/^[0-9]+$/.test(key)) return -1;
  const n = Number(key);
  return Math.min(n, 2147483647);
}

const own = (o: object, k: string): boolean => Object.hasOwn(o, k);

/** Puts `value` (or, for `undefined`, an object) at `key` of `cur`; returns what is there now. */
function put(cur: KeyvalObject, key: string, value: string | undefined, shownKey: string): KeyvalValue {
  const old = own(cur, key) ? cur[key] : undefined;
  if (old !== undefined) {
    if ((typeof old === "string") !== (value !== undefined)) {
      throw qapiError(`Parameters '${shownKey}.*' used inconsistently`);
    }
    if (value === undefined) return old;
  }
  const next: KeyvalValue = value ?? {};
  Object.defineProperty(cur, key, { value: next, enumerable: true, writable: true, configurable: true });
  return next;
}

function isHelp(s: string): boolean {
  return s === "help" || s === "?";
}

/** Parses one element starting at `pos`; returns the position after it. */
function parseOne(
  root: KeyvalObject,
  params: string,
  pos: number,
  impliedKey: string | undefined,
  state: { help: boolean },
): number {
  // The key ends at the first '=' or ','.
  let len = 0;
  while (pos + len < params.length && params[pos + len] !== "=" && params[pos + len] !== ",") len++;
  let key = params;
  let keyStart = pos;
  let keyEnd = pos + len;
  let impliedValueEnd = -1;
  if (len > 0 && params[pos + len] !== "=") {
    if (isHelp(params.slice(pos, pos + len))) {
      state.help = true;
      let s = pos + len;
      if (params[s] === ",") s++;
      return s;
    }
    if (impliedKey !== undefined) {
      key = impliedKey;
      keyStart = 0;
      keyEnd = impliedKey.length;
      impliedValueEnd = pos + len;
    }
  }
  const shownKey = (): string => key.slice(keyStart, keyEnd);

  let cur = root;
  let s = keyStart;
  let fragment = "";
  for (;;) {
    let flen = s !== keyStart ? indexLength(key, s) : 0;
    if (flen === 0) flen = qapiNameLength(key, s);
    if (flen === 0 || (s + flen < keyEnd && key[s + flen] !== ".") || s + flen > keyEnd) {
      throw qapiError(`Invalid parameter '${shownKey()}'`);
    }
    if (flen > MAX_FRAGMENT) {
      const whole = s === keyStart && s + flen === keyEnd;
      throw qapiError(`Parameter${whole ? "" : " fragment"} '${key.slice(s, s + flen)}' is too long`);
    }
    if (s !== keyStart) {
      const next = put(cur, fragment, undefined, key.slice(keyStart, s - 1));
      cur = next as KeyvalObject;
    }
    fragment = key.slice(s, s + flen);
    s += flen;
    if (key[s] !== "." || s >= keyEnd) break;
    s++;
  }

  let value: string;
  let next: number;
  if (impliedValueEnd >= 0) {
    value = params.slice(pos, impliedValueEnd);
    next = impliedValueEnd;
    if (params[next] === ",") next++;
  } else {
    if (params[s] !== "=") {
      throw qapiError(`Expected '=' after parameter '${params.slice(keyStart, s)}'`);
    }
    s++;
    // The value runs to the first single comma; ",," stands for ",".
    let v = "";
    for (;;) {
      const comma = params.indexOf(",", s);
      if (comma < 0) {
        v += params.slice(s);
        s = params.length;
        break;
      }
      v += params.slice(s, comma);
      if (params[comma + 1] !== ",") {
        s = comma + 1;
        break;
      }
      v += ",";
      s = comma + 2;
    }
    value = v;
    next = s;
  }
  put(cur, fragment, value, shownKey());
  return next;
}

/** Turns objects whose keys are all list indices into lists, innermost first (QEMU's `keyval_listify`). */
function listify(root: KeyvalObject): KeyvalObject {
  // Pre-order walk with an explicit stack (keys may nest tens of thousands deep), then convert in reverse so
  // that every object is converted after all objects below it.
  interface Item {
    obj: KeyvalObject;
    prefix: string;
    parent: KeyvalObject | undefined;
    key: string;
  }
  const order: Item[] = [];
  const stack: Item[] = [{ obj: root, prefix: "", parent: undefined, key: "" }];
  for (let item = stack.pop(); item !== undefined; item = stack.pop()) {
    order.push(item);
    for (const k of Object.keys(item.obj)) {
      const v = item.obj[k];
      if (isRecord(v))
        stack.push({ obj: v as KeyvalObject, prefix: `${item.prefix}${k}.`, parent: item.obj, key: k });
    }
  }
  for (let i = order.length - 1; i >= 0; i--) {
    const item = order[i];
    if (item === undefined) continue;
    const converted = toList(item.obj, item.prefix);
    if (converted !== item.obj && item.parent !== undefined) item.parent[item.key] = converted;
  }
  return root;
}

/** `cur` as a list when all its keys are indices, else `cur` itself. */
function toList(cur: KeyvalObject, keyOfCur: string): KeyvalValue {
  let hasIndex = false;
  let hasMember = false;
  for (const k of Object.keys(cur)) {
    if (keyToIndex(k) >= 0) hasIndex = true;
    else hasMember = true;
  }
  if (hasIndex && hasMember) throw qapiError(`Parameters '${keyOfCur}*' used inconsistently`);
  if (!hasIndex) return cur;
  const elements = new Map<number, KeyvalValue>();
  for (const k of Object.keys(cur)) {
    const v = cur[k];
    if (v !== undefined) elements.set(keyToIndex(k), v);
  }
  const list: KeyvalValue[] = [];
  for (let i = 0; i < elements.size; i++) {
    const v = elements.get(i);
    if (v === undefined) throw qapiError(`Parameter '${keyOfCur}${i}' missing`);
    list.push(v);
  }
  return list;
}

/**
 * Parses a keyval string like QEMU's `keyval_parse`, reporting `help`/`?` elements instead of refusing them.
 * @throws {QmpError} GenericError with QEMU's message (`Invalid parameter 'a..b'`, `Expected '=' after parameter 'a'`,
 * `Parameters 'a.*' used inconsistently`, `Parameter 'a.0' missing`, `Parameter 'x' is too long`, …)
 */
export function parseKeyvalWithHelp(params: string, options?: KeyvalOptions): KeyvalParseResult {
  const root: KeyvalObject = {};
  const state = { help: false };
  let implied = options?.impliedKey;
  let pos = 0;
  while (pos < params.length) {
    pos = parseOne(root, params, pos, implied, state);
    implied = undefined;
  }
  const value = listify(root);
  return { value, help: state.help };
}

/**
 * Parses a keyval string like QEMU's `keyval_parse` (see the module notes for the syntax).
 * @example parseKeyval("driver=qcow2,file.driver=file,file.filename=a,,b.qcow2")
 * // { driver: "qcow2", file: { driver: "file", filename: "a,b.qcow2" } }
 * @throws {QmpError} GenericError with QEMU's message; `Help is not available for this option` for `help`
 */
export function parseKeyval(params: string, options?: KeyvalOptions): KeyvalObject {
  const r = parseKeyvalWithHelp(params, options);
  if (r.help) throw qapiError("Help is not available for this option");
  return r.value;
}

/**
 * Writes `value` as a keyval string that {@link parseKeyval} reads back to an equal object: dotted keys for
 * nesting, numeric indices for lists, `,,` for commas in values. Empty objects and lists have no keyval form
 * and are left out; keys must be QAPI names (list indices below them).
 * @example formatKeyval({ driver: "file", filename: "a,b" }) // "driver=file,filename=a,,b"
 */
export function formatKeyval(value: KeyvalObject): string {
  const parts: string[] = [];
  const walk = (v: KeyvalValue, prefix: string): void => {
    if (typeof v === "string") {
      parts.push(`${prefix}=${v.replaceAll(",", ",,")}`);
    } else if (Array.isArray(v)) {
      v.forEach((e, i) => {
        walk(e, `${prefix}.${i}`);
      });
    } else {
      for (const k of Object.keys(v)) {
        const e = v[k];
        if (e !== undefined) walk(e, prefix === "" ? k : `${prefix}.${k}`);
      }
    }
  };
  walk(value, "");
  return parts.join(",");
}

/** Options of {@link parseOptionArgument}. */
export interface OptionArgumentOptions extends KeyvalOptions {}

/**
 * Validates one command-line option argument against `schema` as qemu-storage-daemon does: an argument starting
 * with `{` is JSON (checked by the QMP visitor), anything else keyval (checked by the keyval visitor).
 * @example parseOptionArgument(BlockdevOptions, "null-co,node-name=n", { impliedKey: "driver" })
 * @throws {QmpError} GenericError with QEMU's message
 */
export function parseOptionArgument<T>(schema: QapiType<T>, arg: string, options?: OptionArgumentOptions): T {
  if (arg.startsWith("{")) {
    if (jsonNesting(arg) > MAX_NESTING) throw qapiError("JSON nesting depth limit exceeded");
    let value: unknown;
    try {
      value = JSON.parse(arg);
    } catch (cause) {
      throw qapiError(jsonErrorMessage(arg), cause);
    }
    return schema.parse(value);
  }
  return schema.parseKeyval(parseKeyval(arg, options));
}

/** The deepest nesting of objects and arrays in JSON text (strings skipped). */
function jsonNesting(text: string): number {
  let depth = 0;
  let max = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (c === "\\") i++;
      else if (c === '"') inString = false;
    } else if (c === '"') inString = true;
    else if (c === "{" || c === "[") max = Math.max(max, ++depth);
    else if (c === "}" || c === "]") depth--;
  }
  return max;
}

/** QEMU's wording for the two JSON failures most seen on a command line (others: `JSON parse error, …`). */
function jsonErrorMessage(arg: string): string {
  // A prefix that is itself valid JSON followed by more text → "Expecting at most one JSON value".
  let tries = 0;
  for (let i = arg.length - 2; i > 0 && tries < 8; i--) {
    if (arg[i] !== "}") continue;
    tries++;
    try {
      JSON.parse(arg.slice(0, i + 1));
      return "Expecting at most one JSON value";
    } catch {
      // keep looking
    }
  }
  return "JSON parse error, premature EOI";
}

/**
 * The implied key of each qemu-storage-daemon 7.2 option parsed with keyval (verified against the binary):
 * `--blockdev null-co,…` means `driver=null-co`, `--export nbd,…` `type=nbd`, `--object throttle-group,…`
 * `qom-type=throttle-group`, `--monitor m` `chardev=m`; `--nbd-server` has none. (`--chardev` is not keyval in
 * QEMU: it uses the older QemuOpts parser, whose implied key is `backend`.)
 */
export const QSD_IMPLIED_KEYS: {
  readonly blockdev: "driver";
  readonly export: "type";
  readonly object: "qom-type";
  readonly monitor: "chardev";
  readonly "nbd-server": undefined;
} = { blockdev: "driver", export: "type", object: "qom-type", monitor: "chardev", "nbd-server": undefined };
