/**
 * Hostile input: random strings and JSON values never make the parser or the visitors throw anything but a
 * QmpError of class GenericError, never pollute prototypes, and finish in bounded time (including input nested
 * far deeper than any real option). BLK_FUZZ_RUNS raises the iteration counts.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  BlockdevOptions,
  BlockExportOptions,
  isQmpError,
  NbdServerOptions,
  parseKeyval,
  parseKeyvalWithHelp,
  parseOptionArgument,
  type QapiType,
  SocketAddressLegacy,
} from "../src/index.ts";

const RUNS = Number(process.env.BLK_FUZZ_RUNS ?? 500);

/** Runs `f`; anything thrown must be a GenericError QmpError. */
function onlyQmpErrors(f: () => unknown): void {
  try {
    f();
  } catch (e) {
    if (!isQmpError(e, "GenericError")) throw e;
    expect(e.desc.length).toBeGreaterThan(0);
  }
}

const SCHEMAS: readonly QapiType<unknown>[] = [
  BlockdevOptions,
  BlockExportOptions,
  NbdServerOptions,
  SocketAddressLegacy,
];

// Strings built from keyval's own vocabulary hit the interesting paths far more often than uniform noise.
const token = fc.constantFrom(
  "driver",
  "node-name",
  "file",
  "server",
  "inject-error",
  "cache",
  "direct",
  "type",
  "addr",
  "path",
  "qcow2",
  "null-co",
  "raw",
  "blkdebug",
  "nbd",
  "unix",
  "inet",
  "0",
  "1",
  "01",
  "99999999999",
  ".",
  ",",
  ",,",
  "=",
  "on",
  "help",
  "?",
  "{",
  "}",
  "[",
  "]",
  '"',
  "__proto__",
  "constructor",
  "toString",
  "-",
  "_",
  "é",
  "\u0000",
  "1k",
  "0x",
  "-1",
);
const keyvalish = fc.array(token, { maxLength: 24 }).map((t) => t.join(""));
const anyString = fc.oneof(keyvalish, fc.string({ unit: "binary", maxLength: 64 }));

const hostileKey = fc.oneof(
  fc.constantFrom(
    "__proto__",
    "constructor",
    "prototype",
    "driver",
    "file",
    "server",
    "type",
    "data",
    "cache",
  ),
  fc.string({ maxLength: 6 }),
);
const hostileJson: fc.Arbitrary<unknown> = fc.letrec<{ v: unknown }>((tie) => ({
  v: fc.oneof(
    { depthSize: "small" },
    fc.constantFrom(
      null,
      true,
      false,
      0,
      -1,
      1.5,
      2 ** 64,
      -(2 ** 63),
      "",
      "qcow2",
      "null-co",
      "unix",
      "inet",
    ),
    fc.string({ maxLength: 8 }),
    fc.bigInt(),
    fc.array(tie("v"), { maxLength: 3 }),
    fc.dictionary(hostileKey, tie("v"), { maxKeys: 5 }),
  ),
})).v;

describe("fuzz: only QmpError, no pollution, bounded time", () => {
  it("keyval strings through the parser and every schema", () => {
    fc.assert(
      fc.property(anyString, (s) => {
        onlyQmpErrors(() => parseKeyval(s));
        onlyQmpErrors(() => parseKeyvalWithHelp(s, { impliedKey: "driver" }));
        onlyQmpErrors(() => parseOptionArgument(BlockdevOptions, s, { impliedKey: "driver" }));
        onlyQmpErrors(() => parseOptionArgument(BlockExportOptions, s, { impliedKey: "type" }));
        onlyQmpErrors(() => parseOptionArgument(NbdServerOptions, s));
      }),
      { numRuns: RUNS },
    );
  });

  it("JSON values through both visitors", () => {
    fc.assert(
      fc.property(hostileJson, (v) => {
        for (const schema of SCHEMAS) {
          onlyQmpErrors(() => schema.parse(v));
          onlyQmpErrors(() => schema.parseKeyval(v));
        }
      }),
      { numRuns: RUNS },
    );
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
  });

  it("JSON text through the option parser", () => {
    fc.assert(
      fc.property(
        fc.oneof(
          fc.json(),
          hostileJson.map((v) => JSON.stringify(v, (_, x) => (typeof x === "bigint" ? String(x) : x))),
        ),
        (text) => {
          onlyQmpErrors(() => parseOptionArgument(BlockdevOptions, `{${text.slice(1)}`));
          onlyQmpErrors(() => parseOptionArgument(BlockdevOptions, text));
        },
      ),
      { numRuns: RUNS },
    );
  });

  it("refuses __proto__ members without touching prototypes", () => {
    const polluting = JSON.parse('{"driver":"null-co","__proto__":{"polluted":1}}') as unknown;
    expect(() => BlockdevOptions.parse(polluting)).toThrow("Parameter '__proto__' is unexpected");
    const v = parseKeyval("constructor.prototype.polluted=1");
    expect(Object.getPrototypeOf(v)).toBe(Object.prototype);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
  });

  it("handles absurd nesting without overflowing the stack", () => {
    const depth = 60_000;
    // keyval: QEMU accepts any depth; the member is simply unexpected
    expect(() => parseOptionArgument(BlockdevOptions, `driver=null-co,${"x.".repeat(depth)}y=1`)).toThrow(
      "Parameter 'x' is unexpected",
    );
    // a schema path that really goes that deep stops at QEMU's JSON limit
    const chain = `driver=raw,${Array.from({ length: 1030 }, (_, i) => `${"file.".repeat(i + 1)}driver=raw`).join(",")}`;
    expect(() => parseOptionArgument(BlockdevOptions, chain)).toThrow("JSON nesting depth limit exceeded");
    // JSON text nested deeper than 1024 levels is refused up front, as QEMU's parser does
    const deep = `{"driver":"null-co","x":${"[".repeat(1024)}${"]".repeat(1024)}}`;
    expect(() => parseOptionArgument(BlockdevOptions, deep)).toThrow("JSON nesting depth limit exceeded");
    const ok = `{"driver":"null-co","x":${"[".repeat(1023)}${"]".repeat(1023)}}`;
    expect(() => parseOptionArgument(BlockdevOptions, ok)).toThrow("Parameter 'x' is unexpected");
    // long values and many members stay linear
    const many = Array.from({ length: 20_000 }, (_, i) => `k${i}=${"v,,".repeat(5)}`).join(",");
    expect(Object.keys(parseKeyval(many))).toHaveLength(20_000);
  });
});
