/**
 * The schema DSL: declare a QAPI type once, get its TypeScript type (`Infer<typeof T>`), QMP validation
 * (`T.parse`) and command-line validation (`T.parseKeyval`) with QEMU's messages.
 */
import {
  AlternateType,
  type Branches,
  BuiltinType,
  EnumType,
  type InferInputMembers,
  type InferMembers,
  LazyType,
  ListType,
  type Members,
  ObjectType,
  Optional,
  type QapiType,
  UnionType,
  type Variants,
} from "./types.ts";

/** The builders behind {@link q}. */
export interface QapiDsl {
  /** QAPI `str`. */
  str(): BuiltinType<string>;
  /** QAPI `bool` (keyval: `on`/`off`/`yes`/`no`/`true`/`false`/`y`/`n`). */
  bool(): BuiltinType<boolean>;
  /** QAPI `int` (= `int64`). */
  int(): BuiltinType<number>;
  /** QAPI `int8`. */
  int8(): BuiltinType<number>;
  /** QAPI `int16`. */
  int16(): BuiltinType<number>;
  /** QAPI `int32`. */
  int32(): BuiltinType<number>;
  /** QAPI `int64`. */
  int64(): BuiltinType<number>;
  /** QAPI `uint8`. */
  uint8(): BuiltinType<number>;
  /** QAPI `uint16`. */
  uint16(): BuiltinType<number>;
  /** QAPI `uint32`. */
  uint32(): BuiltinType<number>;
  /** QAPI `uint64` (values above 2^53 are rounded). */
  uint64(): BuiltinType<number>;
  /** QAPI `size`: a byte count; keyval accepts suffixes `k`, `M`, `G`, `T`, `P`, `E`. */
  size(): BuiltinType<number>;
  /** QAPI `number` (a double). */
  number(): BuiltinType<number>;
  /** QAPI `any`: any JSON value, unchecked. */
  any(): BuiltinType<unknown>;
  /** QAPI `null`. */
  null(): BuiltinType<null>;
  /**
   * An enum.
   * @example const Sync = q.enum(["top", "full", "none", "incremental", "bitmap"], { name: "MirrorSyncMode" });
   */
  enum<const V extends string>(values: readonly V[], options?: { name?: string }): EnumType<V>;
  /** A list of `element`. */
  list<T, I>(element: QapiType<T, I>): ListType<T, I>;
  /**
   * An optional member; with `defaultValue`, the member is always present in the output.
   * @example q.object({ force: q.optional(q.bool(), false), "job-id": q.optional(q.str()) })
   */
  optional<T, I>(type: QapiType<T, I>): Optional<T, false, I>;
  optional<T, I>(type: QapiType<T, I>, defaultValue: NoInfer<T>): Optional<T, true, I>;
  /**
   * A struct; `base` members come first (QAPI's `base`).
   * @example const Cache = q.object({ direct: q.optional(q.bool(), false) }, { name: "BlockdevCacheOptions" });
   */
  object<const M extends Members>(
    members: M,
    options?: { name?: string },
  ): ObjectType<InferMembers<M>, InferInputMembers<M>>;
  object<const M extends Members, B, BI>(
    members: M,
    options: { name?: string; base: ObjectType<B, BI> },
  ): ObjectType<B & InferMembers<M>, BI & InferInputMembers<M>>;
  /**
   * A flat union: `base` members (with the enum-typed `discriminator`) plus the selected variant's members.
   * @example q.union({ base: Base, discriminator: "driver", variants: { file: FileOptions }, name: "BlockdevOptions" })
   */
  union<B, BI, const D extends keyof B & keyof BI & string, const V extends Variants>(options: {
    base: ObjectType<B, BI>;
    discriminator: D;
    variants: V;
    name?: string;
  }): UnionType<B, D, V, BI>;
  /**
   * An alternate: chosen by the input's JSON kind. `name` is QEMU's type name; its type errors print it.
   * @example const Ref = q.alternate("BlockdevRef", { definition: BlockdevOptions, reference: q.str() });
   */
  alternate<const V extends Branches>(name: string, branches: V): AlternateType<V>;
  /**
   * A forward reference, for recursive types.
   * @example const Ref: QapiType<BlockdevRef> = q.alternate("BlockdevRef", { definition: q.lazy(() => BlockdevOptions), reference: q.str() });
   */
  lazy<T, I = T>(thunk: () => QapiType<T, I>): LazyType<T, I>;
}

const STR = new BuiltinType<string>("str");
const BOOL = new BuiltinType<boolean>("bool");
const builtin = <T>(name: ConstructorParameters<typeof BuiltinType>[0]): BuiltinType<T> =>
  new BuiltinType<T>(name);

/**
 * The schema builders.
 * @example
 * const Args = q.object({ device: q.str(), speed: q.int() });
 * type Args = Infer<typeof Args>;        // { device: string; speed: number }
 * Args.parse({ device: "j", speed: "x" }); // QmpError: Invalid parameter type for 'speed', expected: integer
 */
export const q: QapiDsl = {
  str: () => STR,
  bool: () => BOOL,
  int: () => builtin("int"),
  int8: () => builtin("int8"),
  int16: () => builtin("int16"),
  int32: () => builtin("int32"),
  int64: () => builtin("int64"),
  uint8: () => builtin("uint8"),
  uint16: () => builtin("uint16"),
  uint32: () => builtin("uint32"),
  uint64: () => builtin("uint64"),
  size: () => builtin("size"),
  number: () => builtin("number"),
  any: () => builtin("any"),
  null: () => builtin("null"),
  enum: (values, options) => new EnumType(values, options?.name),
  list: (element) => new ListType(element),
  optional: <T, I>(type: QapiType<T, I>, ...rest: [] | [T]) =>
    rest.length === 0 ? new Optional(type, false, undefined) : new Optional(type, true, rest[0]),
  object: (members: Members, options?: { name?: string; base?: ObjectType<unknown> }) => {
    const all = options?.base === undefined ? members : { ...options.base.members, ...members };
    if (options?.base !== undefined) {
      for (const k of Object.keys(members)) {
        if (Object.hasOwn(options.base.members, k))
          throw new TypeError(`member '${k}' is already in the base`);
      }
    }
    return new ObjectType(all, options?.name);
  },
  union: (options) =>
    new UnionType({
      base: options.base,
      discriminator: options.discriminator,
      variants: options.variants,
      name: options.name,
    }),
  alternate: (name, branches) => new AlternateType(name, branches),
  lazy: (thunk) => new LazyType(thunk),
} as QapiDsl;
