/**
 * The QAPI type model: every schema node is a {@link QapiType} that validates input the way QEMU 7.2's two input
 * visitors do — the QObject visitor for QMP JSON (`parse`) and the keyval visitor for the command line
 * (`parseKeyval`, where every scalar arrives as a string) — with QEMU's exact messages, quirks included:
 *
 * - `Parameter 'X' is missing` / `is unexpected` and `Invalid parameter type for 'X', expected: T` name the full
 *   path (`file.filename`; list elements `server[0]` in JSON, `server.0` in keyval);
 * - `Parameter 'X' does not accept value 'V'` (enums), the alternates' `expected: <AlternateName>` and the range
 *   errors of sized integers (`expects uint32_t`) name the member alone, and `null` for a list element;
 * - unsigned integers accept negative JSON integers (they wrap modulo 2^64), and JSON `size` is checked as `uint64`;
 * - members are checked in declaration order (a union's base first, then its variant), unexpected members only
 *   after all declared ones.
 *
 * Integers are JavaScript numbers: exact below 2^53, rounded above (QEMU's int64/uint64 extremes included).
 */
import { QAPI_MESSAGES as M, qapiError } from "./errors.ts";
import { parseBool, parseInt64, parseNumber, parseSize, parseUint64 } from "./numbers.ts";

/** Which of QEMU's two input visitors is running. */
export type VisitMode = "json" | "keyval";

/** How a visit runs. */
export interface VisitContext {
  /** Which input visitor. */
  readonly mode: VisitMode;
  /** Whether absent optional members with a default get it. */
  readonly defaults: boolean;
}

/** Options of {@link QapiType.parse} and {@link QapiType.parseKeyval}. */
export interface ParseOptions {
  /**
   * Fill absent optional members that declare a default (default true). With false, the output holds exactly
   * what the input gave — e.g. to print QEMU's `json:{…}` filenames; the output type still claims the defaults.
   */
  defaults?: boolean;
}

/** The meta-type of a schema node (QEMU's SchemaInfo `meta-type`, with `builtin` split by name). */
export type QapiKind = "builtin" | "enum" | "object" | "union" | "alternate" | "list";

/**
 * Where a value sits in the input, as a linked list of member names (strings) and list indices (numbers); used
 * to word error messages. `undefined` is the root.
 */
export interface QapiPath {
  readonly parent: QapiPath | undefined;
  readonly segment: string | number;
  /** Number of segments (1 for a member of the root). */
  readonly depth: number;
}

/** Extends `path` by one member name or list index. */
export const childPath = (parent: QapiPath | undefined, segment: string | number): QapiPath => ({
  parent,
  segment,
  depth: parent === undefined ? 1 : parent.depth + 1,
});

/** QEMU's JSON parser limit on nested objects and arrays; blk applies it to keyval input as well. */
export const MAX_NESTING = 1024;

/** Refuses a container nested deeper than {@link MAX_NESTING}, with QEMU's JSON parser message. */
function checkNesting(path: QapiPath | undefined): void {
  if (path !== undefined && path.depth >= MAX_NESTING) throw qapiError("JSON nesting depth limit exceeded");
}

/** QEMU's `full_name`: `a.b[0].c` (JSON) or `a.b.0.c` (keyval); `<anonymous>` for the root. */
export function fullName(path: QapiPath | undefined, mode: VisitMode): string {
  if (path === undefined) return "<anonymous>";
  let out = "";
  for (let p: QapiPath | undefined = path; p !== undefined; p = p.parent) {
    const s = p.segment;
    if (typeof s === "number") out = (mode === "json" ? `[${s}]` : `.${s}`) + out;
    else out = (p.parent === undefined ? s : `.${s}`) + out;
  }
  return out;
}

/** The member name alone, as QEMU's enum, alternate and integer-range errors print it (`null` in a list). */
export function shortName(path: QapiPath | undefined): string {
  return path === undefined || typeof path.segment === "number" ? "null" : path.segment;
}

/** The JSON kind of a value, QEMU's QType. */
export type JsonKind = "string" | "number" | "boolean" | "object" | "array" | "null" | "none";

/** Classifies a JavaScript value as QEMU would classify the JSON it came from. */
export function jsonKind(value: unknown): JsonKind {
  if (value === null) return "null";
  const t = typeof value;
  if (t === "string") return "string";
  if (t === "number" || t === "bigint") return "number";
  if (t === "boolean") return "boolean";
  if (t === "object") return Array.isArray(value) ? "array" : "object";
  return "none";
}

/** Plain-object check (not an array, not null). */
export const isRecord = (v: unknown): v is Record<string, unknown> =>
  typeof v === "object" && v !== null && !Array.isArray(v);

/** One member of `query-qmp-schema`-like output (see {@link QapiType.describe}). */
export interface SchemaInfo {
  name: string;
  "meta-type": string;
  [key: string]: unknown;
}

/**
 * A schema node: validates untrusted input and returns it typed, with defaults applied.
 * Implements the registry's `ArgsSchema<T>` contract through {@link QapiType.parse}.
 */
export abstract class QapiType<T, I = T> {
  /** Phantom member carrying the output type for {@link Infer}; never set at run time. */
  declare readonly __output: T;
  /** Phantom member carrying the accepted input type for {@link InferInput}; never set at run time. */
  declare readonly __input: I;
  /** The node's meta-type. */
  abstract readonly kind: QapiKind;
  /** The QAPI type name (`str`, `BlockdevRef`, …); anonymous objects have none. */
  readonly name: string | undefined;

  constructor(name: string | undefined) {
    this.name = name;
  }

  /**
   * Validates QMP JSON input (QEMU's QObject input visitor) and returns it typed, with defaults applied. A member
   * set to `undefined` (impossible in JSON, common in library calls) counts as absent.
   * @example BlockdevOptions.parse({ driver: "null-co", "node-name": "n" })
   * @throws {QmpError} GenericError with QEMU's message
   */
  parse(value: unknown, options?: ParseOptions): T {
    return this.visit(value, undefined, { mode: "json", defaults: options?.defaults ?? true });
  }

  /**
   * Validates command-line input already split by {@link parseKeyval} (strings, objects of them, arrays)
   * the way QEMU's keyval input visitor does: scalars are converted from strings per type.
   * @throws {QmpError} GenericError with QEMU's message
   */
  parseKeyval(value: unknown, options?: ParseOptions): T {
    return this.visit(value, undefined, { mode: "keyval", defaults: options?.defaults ?? true });
  }

  /**
   * Visits `value` at `path`. Exposed for composite types and custom nodes; most callers want
   * {@link QapiType.parse} or {@link QapiType.parseKeyval}.
   * @throws {QmpError} GenericError with QEMU's message
   */
  abstract visit(value: unknown, path: QapiPath | undefined, ctx: VisitContext): T;

  /** This node's entry for introspection (`SchemaCatalog` lists each named type once). */
  abstract describe(ref: (t: QapiType<unknown>) => string): SchemaInfo;

  /** The JSON kinds an alternate dispatches to this node. */
  abstract jsonKinds(): readonly JsonKind[];
}

/** The TypeScript type a schema node produces. */
export type Infer<S> = S extends QapiType<infer T, unknown> ? T : never;

/**
 * The TypeScript type a schema accepts from library callers: like {@link Infer}, but members with a default
 * are optional. (QMP and the command line are checked at run time whatever their static type.)
 */
export type InferInput<S> = S extends QapiType<unknown, infer I> ? I : never;

// ---------------------------------------------------------------------------------------------------------
// Built-in scalars

/** Names of QEMU's built-in types supported here. */
export type BuiltinName =
  | "str"
  | "bool"
  | "int"
  | "int8"
  | "int16"
  | "int32"
  | "int64"
  | "uint8"
  | "uint16"
  | "uint32"
  | "uint64"
  | "size"
  | "number"
  | "any"
  | "null";

const INT_RANGES: Readonly<Record<string, readonly [number, number, string]>> = {
  int8: [-128, 127, "int8_t"],
  int16: [-32768, 32767, "int16_t"],
  int32: [-2147483648, 2147483647, "int32_t"],
  uint8: [0, 255, "uint8_t"],
  uint16: [0, 65535, "uint16_t"],
  uint32: [0, 4294967295, "uint32_t"],
};

const TWO_63 = 2 ** 63;
const TWO_64 = 2 ** 64;

/** JSON integer as QEMU's `qnum_get_try_int`: an integer-valued number in the int64 range. */
function jsonInt64(value: unknown): number | undefined {
  if (typeof value === "bigint") {
    return value >= -(1n << 63n) && value < 1n << 63n ? Number(value) : undefined;
  }
  if (typeof value !== "number" || !Number.isInteger(value)) return undefined;
  return value >= -TWO_63 && value < TWO_63 ? value : undefined;
}

/** JSON unsigned as QEMU's uint64 visitor: 0 … 2^64−1, or a negative int64 wrapped modulo 2^64. */
function jsonUint64(value: unknown): number | undefined {
  if (typeof value === "bigint") {
    if (value >= 0n && value < 1n << 64n) return Number(value);
    return value < 0n && value >= -(1n << 63n) ? Number((1n << 64n) + value) : undefined;
  }
  if (typeof value !== "number" || !Number.isInteger(value)) return undefined;
  if (value >= 0 && value < TWO_64) return value;
  return value < 0 && value >= -TWO_63 ? TWO_64 + value : undefined;
}

/** A keyval scalar: a string, else QEMU's complaint about a dotted group or a non-string. */
function keyvalScalar(value: unknown, path: QapiPath | undefined): string {
  if (typeof value === "string") return value;
  const name = fullName(path, "keyval");
  if (typeof value === "object" && value !== null) throw qapiError(M.keyvalNotScalar(name));
  throw qapiError(`Internal error: parameter ${name} invalid`);
}

/** One of QEMU's built-in scalar types (`str`, `bool`, `int`, …, `any`, `null`). */
export class BuiltinType<T> extends QapiType<T> {
  readonly kind: "builtin" = "builtin";
  declare readonly name: BuiltinName;

  constructor(name: BuiltinName) {
    super(name);
  }

  visit(value: unknown, path: QapiPath | undefined, ctx: VisitContext): T {
    return this.convert(value, path, ctx) as T;
  }

  private convert(value: unknown, path: QapiPath | undefined, ctx: VisitContext): unknown {
    const name = this.name;
    switch (name) {
      case "any":
        return value;
      case "str":
        if (ctx.mode === "keyval") return keyvalScalar(value, path);
        if (typeof value !== "string") throw qapiError(M.invalidType(fullName(path, ctx.mode), "string"));
        return value;
      case "null":
        if (value !== null) throw qapiError(M.invalidType(fullName(path, ctx.mode), "null"));
        return null;
      case "bool": {
        if (ctx.mode === "json") {
          if (typeof value !== "boolean") throw qapiError(M.invalidType(fullName(path, ctx.mode), "boolean"));
          return value;
        }
        const b = parseBool(keyvalScalar(value, path));
        if (b === undefined) throw qapiError(M.expects(fullName(path, ctx.mode), "'on' or 'off'"));
        return b;
      }
      case "number": {
        if (ctx.mode === "json") {
          if (typeof value === "bigint") return Number(value);
          if (typeof value !== "number") throw qapiError(M.invalidType(fullName(path, ctx.mode), "number"));
          return value;
        }
        const n = parseNumber(keyvalScalar(value, path));
        if (n === undefined) throw qapiError(M.expects(fullName(path, ctx.mode), "number"));
        return n;
      }
      case "int":
      case "int64":
      case "int8":
      case "int16":
      case "int32": {
        let n: number | undefined;
        if (ctx.mode === "json") {
          n = jsonInt64(value);
          if (n === undefined) throw qapiError(M.invalidType(fullName(path, ctx.mode), "integer"));
        } else {
          n = parseInt64(keyvalScalar(value, path));
          if (n === undefined) throw qapiError(M.expects(fullName(path, ctx.mode), "integer"));
        }
        return checkRange(n, name, path);
      }
      case "uint8":
      case "uint16":
      case "uint32":
      case "uint64":
      case "size": {
        let n: number | undefined;
        if (ctx.mode === "json") {
          n = jsonUint64(value);
          if (n === undefined) throw qapiError(M.expects(fullName(path, ctx.mode), "uint64"));
        } else if (name === "size") {
          n = parseSize(keyvalScalar(value, path));
          if (n === undefined) throw qapiError(M.expects(fullName(path, ctx.mode), "size"));
        } else {
          n = parseUint64(keyvalScalar(value, path));
          if (n === undefined) throw qapiError(M.expects(fullName(path, ctx.mode), "integer"));
        }
        return checkRange(n, name, path);
      }
    }
  }

  describe(): SchemaInfo {
    const jsonType: Record<BuiltinName, string> = {
      str: "string",
      bool: "boolean",
      number: "number",
      any: "value",
      null: "null",
      int: "int",
      int8: "int",
      int16: "int",
      int32: "int",
      int64: "int",
      uint8: "int",
      uint16: "int",
      uint32: "int",
      uint64: "int",
      size: "int",
    };
    return { name: this.name, "meta-type": "builtin", "json-type": jsonType[this.name] };
  }

  jsonKinds(): readonly JsonKind[] {
    switch (this.name) {
      case "str":
        return ["string"];
      case "bool":
        return ["boolean"];
      case "null":
        return ["null"];
      case "any":
        return ["string", "number", "boolean", "object", "array", "null"];
      case "number":
      case "int":
      case "int8":
      case "int16":
      case "int32":
      case "int64":
      case "uint8":
      case "uint16":
      case "uint32":
      case "uint64":
      case "size":
        return ["number"];
    }
  }
}

function checkRange(n: number, name: BuiltinName, path: QapiPath | undefined): number {
  const range = INT_RANGES[name];
  if (range !== undefined && (n < range[0] || n > range[1])) {
    throw qapiError(M.expects(shortName(path), range[2]));
  }
  return n;
}

// ---------------------------------------------------------------------------------------------------------
// Enums

/** An enum: a string from a fixed set. */
export class EnumType<V extends string> extends QapiType<V> {
  readonly kind: "enum" = "enum";
  /** The accepted values, in declaration order. */
  readonly values: readonly V[];
  private readonly set: ReadonlySet<string>;

  constructor(values: readonly V[], name: string | undefined) {
    super(name);
    this.values = [...values];
    this.set = new Set(values);
  }

  visit(value: unknown, path: QapiPath | undefined, ctx: VisitContext): V {
    const s = ctx.mode === "keyval" ? keyvalScalar(value, path) : value;
    if (typeof s !== "string") throw qapiError(M.invalidType(fullName(path, ctx.mode), "string"));
    if (!this.set.has(s)) throw qapiError(M.badEnumValue(shortName(path), s));
    return s as V;
  }

  /** True when `v` is one of the values. */
  has(v: string): v is V {
    return this.set.has(v);
  }

  describe(ref: (t: QapiType<unknown>) => string): SchemaInfo {
    return {
      name: ref(this),
      "meta-type": "enum",
      members: this.values.map((name) => ({ name })),
      values: [...this.values],
    };
  }

  jsonKinds(): readonly JsonKind[] {
    return ["string"];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Lists

/** A list of one element type. */
export class ListType<T, I = T> extends QapiType<T[], I[]> {
  readonly kind: "list" = "list";
  /** The element type. */
  readonly element: QapiType<T, I>;

  constructor(element: QapiType<T, I>) {
    super(element.name === undefined ? undefined : `${element.name}List`);
    this.element = element;
  }

  visit(value: unknown, path: QapiPath | undefined, ctx: VisitContext): T[] {
    if (!Array.isArray(value)) throw qapiError(M.invalidType(fullName(path, ctx.mode), "array"));
    checkNesting(path);
    const out: T[] = [];
    for (let i = 0; i < value.length; i++) {
      out.push(this.element.visit(value[i], childPath(path, i), ctx));
    }
    return out;
  }

  describe(ref: (t: QapiType<unknown>) => string): SchemaInfo {
    return { name: ref(this), "meta-type": "array", "element-type": ref(this.element) };
  }

  jsonKinds(): readonly JsonKind[] {
    return ["array"];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Objects

/** An optional object member, with or without a default (a member with a default is always present in the output). */
export class Optional<T, HasDefault extends boolean = boolean, I = T> {
  /** Phantom member carrying the input type; never set at run time. */
  declare readonly __input: I;
  /** The member's type. */
  readonly type: QapiType<T, I>;
  /** Whether {@link Optional.defaultValue} is set. */
  readonly hasDefault: HasDefault;
  /** The value used when the member is absent (when {@link Optional.hasDefault}). */
  readonly defaultValue: T | undefined;

  constructor(type: QapiType<T, I>, hasDefault: HasDefault, defaultValue: T | undefined) {
    this.type = type;
    this.hasDefault = hasDefault;
    this.defaultValue = defaultValue;
  }
}

/** A member declaration: a required type, or an {@link Optional}. */
export type Member = QapiType<unknown> | Optional<unknown, boolean, unknown>;
/** Member declarations by wire name, in visiting order. */
export type Members = Readonly<Record<string, Member>>;

type Simplify<T> = { [K in keyof T]: T[K] } & {};
type RequiredKeys<M> = {
  [K in keyof M]: M[K] extends Optional<unknown, false, unknown> ? never : K;
}[keyof M];
type OptionalKeys<M> = {
  [K in keyof M]: M[K] extends Optional<unknown, false, unknown> ? K : never;
}[keyof M];
type MemberOutput<X> =
  X extends Optional<infer T, boolean, unknown> ? T : X extends QapiType<infer T, unknown> ? T : never;
type MemberInput<X> =
  X extends Optional<unknown, boolean, infer I> ? I : X extends QapiType<unknown, infer I> ? I : never;
type InputRequiredKeys<M> = {
  [K in keyof M]: M[K] extends Optional<unknown, boolean, unknown> ? never : K;
}[keyof M];
type InputOptionalKeys<M> = {
  [K in keyof M]: M[K] extends Optional<unknown, boolean, unknown> ? K : never;
}[keyof M];

/**
 * `T` with the members `K` optional: the input side of a hand-written output interface whose members `K` have a
 * default. @example type FileInput = WithDefaults<BlockdevOptionsFile, "locking" | "aio">;
 */
export type WithDefaults<T, K extends keyof T> = Simplify<Omit<T, K> & Partial<Pick<T, K>>>;

/** The output type of a member declaration record. */
export type InferMembers<M> = Simplify<
  { [K in RequiredKeys<M>]: MemberOutput<M[K]> } & { [K in OptionalKeys<M>]?: MemberOutput<M[K]> }
>;

/** The input type of a member declaration record (every optional member optional, defaults or not). */
export type InferInputMembers<M> = Simplify<
  { [K in InputRequiredKeys<M>]: MemberInput<M[K]> } & { [K in InputOptionalKeys<M>]?: MemberInput<M[K]> }
>;

/** Visits the declared members of `input`, writing them to `out`; returns nothing, throws QEMU's first error. */
function visitMembers(
  members: Members,
  input: Record<string, unknown>,
  out: Record<string, unknown>,
  path: QapiPath | undefined,
  ctx: VisitContext,
): void {
  for (const key of Object.keys(members)) {
    const m = members[key];
    if (m === undefined) continue;
    const here = childPath(path, key);
    if (Object.hasOwn(input, key) && input[key] !== undefined) {
      const t = m instanceof Optional ? m.type : m;
      out[key] = t.visit(input[key], here, ctx);
    } else if (m instanceof Optional) {
      if (m.hasDefault && ctx.defaults) out[key] = m.defaultValue;
    } else {
      throw qapiError(M.missing(fullName(here, ctx.mode)));
    }
  }
}

function checkUnexpected(
  input: Record<string, unknown>,
  allowed: (key: string) => boolean,
  path: QapiPath | undefined,
  ctx: VisitContext,
): void {
  for (const key of Object.keys(input)) {
    // `undefined` (never in JSON, common in library calls) counts as absent
    if (!allowed(key) && input[key] !== undefined) {
      throw qapiError(M.unexpected(fullName(childPath(path, key), ctx.mode)));
    }
  }
}

function describeMembers(members: Members, ref: (t: QapiType<unknown>) => string): unknown[] {
  return Object.entries(members).map(([name, m]) =>
    m instanceof Optional ? { name, default: null, type: ref(m.type) } : { name, type: ref(m) },
  );
}

function asObject(value: unknown, path: QapiPath | undefined, ctx: VisitContext): Record<string, unknown> {
  if (!isRecord(value)) throw qapiError(M.invalidType(fullName(path, ctx.mode), "object"));
  checkNesting(path);
  return value;
}

/** A struct: named members, some optional, some with defaults. */
export class ObjectType<T, I = T> extends QapiType<T, I> {
  readonly kind: "object" = "object";
  /** All members, the base's first. */
  readonly members: Members;

  constructor(members: Members, name: string | undefined) {
    super(name);
    this.members = members;
  }

  visit(value: unknown, path: QapiPath | undefined, ctx: VisitContext): T {
    const input = asObject(value, path, ctx);
    const out: Record<string, unknown> = {};
    visitMembers(this.members, input, out, path, ctx);
    checkUnexpected(input, (k) => Object.hasOwn(this.members, k), path, ctx);
    return out as T;
  }

  /**
   * A new struct with this one's members followed by `members` (QAPI's `base`).
   * @example const Child = Base.extend({ extra: q.optional(q.str()) }, { name: "Child" });
   */
  extend<const M2 extends Members>(
    members: M2,
    options?: { name?: string },
  ): ObjectType<Simplify<T & InferMembers<M2>>, Simplify<I & InferInputMembers<M2>>> {
    for (const k of Object.keys(members)) {
      if (Object.hasOwn(this.members, k)) throw new TypeError(`member '${k}' is already declared`);
    }
    return new ObjectType({ ...this.members, ...members }, options?.name);
  }

  describe(ref: (t: QapiType<unknown>) => string): SchemaInfo {
    return { name: ref(this), "meta-type": "object", members: describeMembers(this.members, ref) };
  }

  jsonKinds(): readonly JsonKind[] {
    return ["object"];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Flat unions

/** Variant structs by discriminator value. */
export type Variants = Readonly<Record<string, ObjectType<unknown, unknown>>>;

/** The output of a flat union: the base (with the discriminator narrowed) and the variant's members. */
export type InferUnion<B, D extends keyof B, V> = {
  [K in B[D] & string]: Simplify<
    Omit<B, D> & { [P in D]: K } & (K extends keyof V ? Infer<V[K]> : Record<never, never>)
  >;
}[B[D] & string];

/** The input type of a flat union: {@link InferUnion} over the base's and the variants' input types. */
export type InferUnionInput<BI, D extends keyof BI, V> = {
  [K in BI[D] & string]: Simplify<
    Omit<BI, D> & { [P in D]: K } & (K extends keyof V ? InferInput<V[K]> : Record<never, never>)
  >;
}[BI[D] & string];

/**
 * A flat union (QEMU's `BlockdevOptions` style): the base's members, among them the enum-typed discriminator,
 * then the members of the variant the discriminator selects. Discriminator values without a variant add no
 * members.
 */
export class UnionType<B, D extends keyof B & keyof BI & string, V extends Variants, BI = B> extends QapiType<
  InferUnion<B, D, V>,
  InferUnionInput<BI, D, V>
> {
  readonly kind: "union" = "union";
  /** The common members. */
  readonly base: ObjectType<B, BI>;
  /** The base member whose value selects the variant. */
  readonly discriminator: D;
  /** Variant structs by discriminator value. */
  readonly variants: V;
  /** The discriminator's enum. */
  readonly tag: EnumType<B[D] & string>;

  constructor(options: { base: ObjectType<B, BI>; discriminator: D; variants: V; name: string | undefined }) {
    super(options.name);
    this.base = options.base;
    this.discriminator = options.discriminator;
    this.variants = options.variants;
    const d = this.base.members[this.discriminator];
    if (!(d instanceof EnumType)) {
      throw new TypeError(`discriminator '${this.discriminator}' must be a required enum member of the base`);
    }
    this.tag = d as EnumType<B[D] & string>;
    for (const k of Object.keys(this.variants)) {
      if (!this.tag.has(k)) throw new TypeError(`variant '${k}' is not a value of the discriminator enum`);
      for (const m of Object.keys(this.variants[k]?.members ?? {})) {
        if (Object.hasOwn(this.base.members, m)) throw new TypeError(`variant '${k}' redeclares '${m}'`);
      }
    }
  }

  visit(value: unknown, path: QapiPath | undefined, ctx: VisitContext): InferUnion<B, D, V> {
    const input = asObject(value, path, ctx);
    const out: Record<string, unknown> = {};
    visitMembers(this.base.members, input, out, path, ctx);
    const variant = Object.hasOwn(this.variants, out[this.discriminator] as string)
      ? this.variants[out[this.discriminator] as string]
      : undefined;
    if (variant !== undefined) visitMembers(variant.members, input, out, path, ctx);
    checkUnexpected(
      input,
      (k) =>
        Object.hasOwn(this.base.members, k) || (variant !== undefined && Object.hasOwn(variant.members, k)),
      path,
      ctx,
    );
    return out as InferUnion<B, D, V>;
  }

  /** The variant struct for discriminator value `tag`, if it has one. */
  variant(tag: string): ObjectType<unknown, unknown> | undefined {
    return Object.hasOwn(this.variants, tag) ? this.variants[tag] : undefined;
  }

  /**
   * A new union with more variants; their keys join the discriminator enum (QEMU adds drivers this way).
   * @example const Opts = BlockdevOptions.extend({ variants: { vmdk: VmdkOptions } });
   */
  extend<const V2 extends Variants>(options: {
    variants: V2;
    name?: string;
  }): UnionType<
    Simplify<Omit<B, D> & { [P in D]: B[D] | (keyof V2 & string) }>,
    D,
    Simplify<V & V2>,
    Simplify<Omit<BI, D> & { [P in D]: BI[D] | (keyof V2 & string) }>
  > {
    const values = [...this.tag.values] as string[];
    for (const k of Object.keys(options.variants)) {
      if (Object.hasOwn(this.variants, k)) throw new TypeError(`variant '${k}' is already declared`);
      if (!values.includes(k)) values.push(k);
    }
    const tag = new EnumType(values, this.tag.name);
    const baseMembers: Record<string, Member> = { ...this.base.members, [this.discriminator]: tag };
    return new UnionType<Record<string, unknown>, string, Variants>({
      base: new ObjectType<Record<string, unknown>>(baseMembers, this.base.name),
      discriminator: this.discriminator,
      variants: { ...this.variants, ...options.variants },
      name: options.name ?? this.name,
    }) as never;
  }

  describe(ref: (t: QapiType<unknown>) => string): SchemaInfo {
    return {
      name: ref(this),
      "meta-type": "object",
      members: describeMembers(this.base.members, ref),
      tag: this.discriminator,
      variants: Object.entries(this.variants).map(([c, t]) => ({ case: c, type: ref(t) })),
    };
  }

  jsonKinds(): readonly JsonKind[] {
    return ["object"];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Alternates

/** Alternate branches by name (QAPI's member names, e.g. `definition`, `reference`). */
export type Branches = Readonly<Record<string, QapiType<unknown>>>;

/**
 * An alternate: one of several types, chosen by the JSON kind of the input (string, number, boolean, object,
 * array, null). In keyval input every scalar is a string, so only a string-typed branch can take it.
 */
export class AlternateType<V extends Branches> extends QapiType<Infer<V[keyof V]>, InferInput<V[keyof V]>> {
  readonly kind: "alternate" = "alternate";
  declare readonly name: string;
  /** The branches. */
  readonly branches: V;
  private byKindCache: ReadonlyMap<JsonKind, QapiType<unknown>> | undefined;

  constructor(name: string, branches: V) {
    super(name);
    this.branches = branches;
  }

  /** Branch by JSON kind, computed on first use so that branches may be {@link LazyType}s not yet resolvable. */
  private get byKind(): ReadonlyMap<JsonKind, QapiType<unknown>> {
    if (this.byKindCache !== undefined) return this.byKindCache;
    const byKind = new Map<JsonKind, QapiType<unknown>>();
    for (const [b, t] of Object.entries(this.branches)) {
      for (const k of t.jsonKinds()) {
        if (byKind.has(k)) throw new TypeError(`alternate ${this.name}: branch '${b}' clashes on JSON ${k}`);
        byKind.set(k, t);
      }
    }
    this.byKindCache = byKind;
    return byKind;
  }

  visit(value: unknown, path: QapiPath | undefined, ctx: VisitContext): Infer<V[keyof V]> {
    const branch = this.byKind.get(jsonKind(value));
    if (branch === undefined) throw qapiError(M.invalidType(shortName(path), this.name));
    return branch.visit(value, path, ctx) as Infer<V[keyof V]>;
  }

  describe(ref: (t: QapiType<unknown>) => string): SchemaInfo {
    return {
      name: ref(this),
      "meta-type": "alternate",
      members: Object.values(this.branches).map((t) => ({ type: ref(t) })),
    };
  }

  jsonKinds(): readonly JsonKind[] {
    return [...this.byKind.keys()];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Recursion

/**
 * A reference to a type declared later (QAPI types may be recursive: `BlockdevOptions` → `BlockdevRef` →
 * `BlockdevOptions`). The thunk runs on first use.
 */
export class LazyType<T, I = T> extends QapiType<T, I> {
  private readonly thunk: () => QapiType<T, I>;
  private resolved: QapiType<T, I> | undefined;

  constructor(thunk: () => QapiType<T, I>) {
    super(undefined);
    this.thunk = thunk;
  }

  /** The referenced type. */
  get target(): QapiType<T, I> {
    this.resolved ??= this.thunk();
    return this.resolved;
  }

  get kind(): QapiKind {
    return this.target.kind;
  }

  visit(value: unknown, path: QapiPath | undefined, ctx: VisitContext): T {
    return this.target.visit(value, path, ctx);
  }

  describe(ref: (t: QapiType<unknown>) => string): SchemaInfo {
    return this.target.describe(ref);
  }

  jsonKinds(): readonly JsonKind[] {
    return this.target.jsonKinds();
  }
}
