/**
 * Property tests driven by the schemas themselves: random valid option objects (derived from the schema) must
 * pass the JSON visitor unchanged but for defaults, and written as a keyval string they must parse back to the
 * same value through the keyval visitor — so `--blockdev k=v,…`, `blockdev-add` and library calls agree.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  AlternateType,
  BlockdevOptions,
  BlockExportOptions,
  BuiltinType,
  EnumType,
  formatKeyval,
  type KeyvalObject,
  type KeyvalValue,
  LazyType,
  ListType,
  NbdServerOptions,
  ObjectType,
  Optional,
  parseKeyval,
  type QapiType,
  q,
  UnionType,
} from "../src/index.ts";

const RUNS = Number(process.env.BLK_FUZZ_RUNS ?? 200);

const INT_LIMITS: Record<string, [number, number]> = {
  int8: [-128, 127],
  int16: [-32768, 32767],
  int32: [-(2 ** 31), 2 ** 31 - 1],
  uint8: [0, 255],
  uint16: [0, 65535],
  uint32: [0, 2 ** 32 - 1],
  int: [Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER],
  int64: [Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER],
  uint64: [0, Number.MAX_SAFE_INTEGER],
  size: [0, Number.MAX_SAFE_INTEGER],
};

/** Values of `t` that both visitors accept; `keyval` restricts to what a keyval string can express. */
function arb(t: QapiType<unknown>, keyval: boolean, depth: number): fc.Arbitrary<unknown> {
  if (t instanceof LazyType) return arb(t.target, keyval, depth);
  if (t instanceof BuiltinType) {
    const name = t.name;
    const limits = INT_LIMITS[name];
    if (limits !== undefined) return fc.integer({ min: limits[0], max: limits[1] });
    if (name === "bool") return fc.boolean();
    if (name === "null") return fc.constant(null);
    if (name === "number") {
      return fc.double({ noNaN: true, noDefaultInfinity: true }).filter((d) => !Object.is(d, -0));
    }
    return fc.string({ maxLength: 10 });
  }
  if (t instanceof EnumType) return fc.constantFrom(...t.values);
  if (t instanceof ListType)
    return fc.array(arb(t.element, keyval, depth), { minLength: keyval ? 1 : 0, maxLength: 3 });
  if (t instanceof ObjectType) return record(t.members, keyval, depth);
  if (t instanceof UnionType) {
    const tags = t.tag.values;
    return fc.constantFrom(...tags).chain((tag) => {
      const variant = t.variant(tag);
      const members = { ...t.base.members, ...(variant?.members ?? {}) };
      delete (members as Record<string, unknown>)[t.discriminator];
      return record(members, keyval, depth + 1).map((o) => ({ [t.discriminator]: tag, ...o }));
    });
  }
  if (t instanceof AlternateType) {
    const branches = Object.values(t.branches as Record<string, QapiType<unknown>>).filter((b) => {
      const kinds = b.jsonKinds();
      if (depth > 2 && kinds.includes("object")) return false; // bound the recursion
      return !keyval || kinds.includes("string") || kinds.includes("object") || kinds.includes("array");
    });
    return fc.oneof(...branches.map((b) => arb(b, keyval, depth + 1)));
  }
  throw new Error(`no arbitrary for ${t.kind}`);
}

function record(
  members: Readonly<Record<string, QapiType<unknown> | Optional<unknown>>>,
  keyval: boolean,
  depth: number,
): fc.Arbitrary<Record<string, unknown>> {
  const model: Record<string, fc.Arbitrary<unknown>> = {};
  const requiredKeys: string[] = [];
  for (const [k, m] of Object.entries(members)) {
    if (m instanceof Optional) model[k] = arb(m.type, keyval, depth);
    else {
      model[k] = arb(m, keyval, depth);
      requiredKeys.push(k);
    }
  }
  const r = fc.record(model, { requiredKeys });
  // keyval cannot write an empty object
  return keyval ? r.filter((o) => Object.keys(o).length > 0) : r;
}

const BOOL_WORDS = [
  ["on", "yes", "true", "y"],
  ["off", "no", "false", "n"],
] as const;

/** The keyval spelling of a typed value (booleans in any of QEMU's words, numbers in decimal). */
function toKeyval(v: unknown, pick: number): KeyvalValue {
  if (typeof v === "boolean") return BOOL_WORDS[v ? 0 : 1][pick % 4] ?? "on";
  if (typeof v === "number") return String(v);
  if (typeof v === "string") return v;
  if (Array.isArray(v)) return v.map((e) => toKeyval(e, pick + 1));
  if (typeof v === "object" && v !== null) {
    const out: KeyvalObject = {};
    for (const [k, e] of Object.entries(v)) out[k] = toKeyval(e, pick + 1);
    return out;
  }
  throw new Error(`no keyval form for ${String(v)}`);
}

const AllScalars = q.object({
  s: q.str(),
  b: q.bool(),
  i: q.int(),
  i8: q.optional(q.int8()),
  i16: q.optional(q.int16()),
  i32: q.optional(q.int32()),
  u8: q.optional(q.uint8()),
  u16: q.optional(q.uint16()),
  u32: q.optional(q.uint32()),
  u64: q.optional(q.uint64()),
  sz: q.optional(q.size()),
  n: q.optional(q.number()),
  l: q.optional(q.list(q.int())),
  e: q.optional(q.enum(["a", "b"]), "a"),
});

const SCHEMAS: readonly (readonly [string, QapiType<unknown>])[] = [
  ["BlockdevOptions", BlockdevOptions],
  ["BlockExportOptions", BlockExportOptions],
  ["NbdServerOptions", NbdServerOptions],
  ["all scalar types", AllScalars],
];

describe("schema-driven round trips", () => {
  it("generates nested inline children and lists", () => {
    const texts = fc
      .sample(arb(BlockdevOptions, true, 0), { numRuns: 300, seed: 42 })
      .map((v) => formatKeyval(toKeyval(v, 0) as KeyvalObject));
    if (process.env.BLK_QAPI_SHOW === "1") console.log(texts.slice(0, 8).join("\n"));
    expect(texts.some((t) => /(^|,)file\.driver=/.test(t))).toBe(true);
    expect(texts.some((t) => /file\.inject-error\.0\.event=|inject-error\.1\.event=/.test(t))).toBe(true);
    expect(texts.some((t) => /server\.type=/.test(t))).toBe(true);
  });

  it.each(SCHEMAS)(
    "%s: JSON input is accepted, defaults only add members, and parsing is idempotent",
    (_, schema) => {
      fc.assert(
        fc.property(arb(schema, false, 0), (v) => {
          const parsed = schema.parse(v);
          expect(parsed).toMatchObject(v as object);
          expect(schema.parse(parsed)).toEqual(parsed);
          expect(schema.parse(v, { defaults: false })).toEqual(v);
        }),
        { numRuns: RUNS },
      );
    },
  );

  it.each(SCHEMAS)("%s: value → keyval string → parse → the same value", (_, schema) => {
    fc.assert(
      fc.property(arb(schema, true, 0), fc.nat(3), (v, pick) => {
        const text = formatKeyval(toKeyval(v, pick) as KeyvalObject);
        expect(schema.parseKeyval(parseKeyval(text))).toEqual(schema.parse(v));
      }),
      { numRuns: RUNS },
    );
  });
});
