/**
 * The keyval parser on its own: input → exact parsed value, or input → QEMU's exact message (skipped with BLK_QAPI_QEMU=0
 * replays the messages against qemu-storage-daemon's `--nbd-server`, a keyval option without implied key), plus
 * a fast-check round trip through formatKeyval.
 */
import { missingPeers, run } from "@blk/testkit";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  formatKeyval,
  isQmpError,
  type KeyvalObject,
  type KeyvalValue,
  parseKeyval,
  parseKeyvalWithHelp,
} from "../src/index.ts";

const RUNS = Number(process.env.BLK_FUZZ_RUNS ?? 300);

const PARSED: readonly (readonly [string, string | undefined, KeyvalObject])[] = [
  ["", undefined, {}],
  ["a=1", undefined, { a: "1" }],
  ["a=1,", undefined, { a: "1" }],
  ["a=", undefined, { a: "" }],
  ["a=1,b=2", undefined, { a: "1", b: "2" }],
  ["a=x,,y", undefined, { a: "x,y" }],
  ["a=x,,,b=y", undefined, { a: "x,", b: "y" }],
  ["a=,,,,", undefined, { a: ",," }],
  ["a=x=y", undefined, { a: "x=y" }],
  ["a=1,a=2", undefined, { a: "2" }],
  ["a.b=1,a.c=2", undefined, { a: { b: "1", c: "2" } }],
  ["a.b.c=1", undefined, { a: { b: { c: "1" } } }],
  ["a.0=x,a.1=y", undefined, { a: ["x", "y"] }],
  ["a.1=y,a.0=x", undefined, { a: ["x", "y"] }],
  ["a.0.b=x,a.1.b=y", undefined, { a: [{ b: "x" }, { b: "y" }] }],
  ["a.0.0=x,a.0.1=y", undefined, { a: [["x", "y"]] }],
  ["a.01=x,a.0=y", undefined, { a: ["y", "x"] }],
  ["__com.example_x=1", undefined, { "__com.example_x": "1" }],
  ["a-b_c=1", undefined, { "a-b_c": "1" }],
  ["constructor=1,toString.x=2", undefined, { constructor: "1", toString: { x: "2" } }],
  // implied key
  ["qcow2,node-name=d", "driver", { driver: "qcow2", "node-name": "d" }],
  ["qcow2", "driver", { driver: "qcow2" }],
  ["a.b", "driver", { driver: "a.b" }],
  ["driver=raw", "driver", { driver: "raw" }],
  ["m", "chardev", { chardev: "m" }],
];

const ERRORS: readonly (readonly [string, string | undefined, string])[] = [
  ["=x", undefined, "Invalid parameter ''"],
  [",", undefined, "Invalid parameter ''"],
  ["a,b=1", undefined, "Expected '=' after parameter 'a'"],
  ["a", undefined, "Expected '=' after parameter 'a'"],
  ["a.b", undefined, "Expected '=' after parameter 'a.b'"],
  ["x=1,y", "driver", "Expected '=' after parameter 'y'"],
  ["a.=1", undefined, "Invalid parameter 'a.'"],
  ["a.0x=1", undefined, "Invalid parameter 'a.0x'"],
  ["0=1", undefined, "Invalid parameter '0'"],
  ["a b=1", undefined, "Invalid parameter 'a b'"],
  ["é=1", undefined, "Invalid parameter 'é'"],
  ["__=1", undefined, "Invalid parameter '__'"],
  ["__proto__=1", undefined, "Invalid parameter '__proto__'"],
  ["a=1,a.b=2", undefined, "Parameters 'a.*' used inconsistently"],
  ["a.b=1,a=2", undefined, "Parameters 'a.*' used inconsistently"],
  ["a.0=1,a.b=2", undefined, "Parameters 'a.*' used inconsistently"],
  ["a.2=1,a.0=2", undefined, "Parameter 'a.1' missing"],
  ["a.0.1=1", undefined, "Parameter 'a.0.0' missing"],
  ["a.99999999999999=1", undefined, "Parameter 'a.0' missing"],
  ["?", undefined, "Help is not available for this option"],
  [`${"x".repeat(128)}=1`, undefined, `Parameter '${"x".repeat(128)}' is too long`],
  [`a.${"x".repeat(128)}=1`, undefined, `Parameter fragment '${"x".repeat(128)}' is too long`],
];

function message(params: string, impliedKey: string | undefined): string {
  try {
    parseKeyval(params, impliedKey === undefined ? {} : { impliedKey });
  } catch (e) {
    if (isQmpError(e, "GenericError")) return e.desc;
    throw e;
  }
  return "(accepted)";
}

describe("parseKeyval", () => {
  it.each(PARSED)("%j (implied %s)", (params, impliedKey, expected) => {
    expect(parseKeyval(params, impliedKey === undefined ? {} : { impliedKey })).toEqual(expected);
  });

  it.each(ERRORS)("%j (implied %s) fails", (params, impliedKey, expected) => {
    expect(message(params, impliedKey)).toBe(expected);
  });

  it("accepts a 127-character key, refuses 128", () => {
    expect(parseKeyval(`${"x".repeat(127)}=1`)).toEqual({ ["x".repeat(127)]: "1" });
  });

  it("reports help instead of refusing it when asked", () => {
    expect(parseKeyvalWithHelp("help")).toEqual({ value: {}, help: true });
    expect(parseKeyvalWithHelp("throttle-group,help", { impliedKey: "qom-type" })).toEqual({
      value: { "qom-type": "throttle-group" },
      help: true,
    });
    expect(parseKeyvalWithHelp("a=1,?,b=2")).toEqual({ value: { a: "1", b: "2" }, help: true });
    expect(parseKeyvalWithHelp("help=1")).toEqual({ value: { help: "1" }, help: false });
  });

  it("never sets an object's prototype", () => {
    const v = parseKeyval("constructor.prototype.x=1,hasOwnProperty=2");
    expect(Object.getPrototypeOf(v)).toBe(Object.prototype);
    expect(v).toEqual({ constructor: { prototype: { x: "1" } }, hasOwnProperty: "2" });
    expect(({} as Record<string, unknown>).x).toBeUndefined();
  });
});

const name = fc.stringMatching(/^[A-Za-z][A-Za-z0-9_-]{0,8}$/);
const value: fc.Arbitrary<KeyvalValue> = fc.letrec<{ v: KeyvalValue }>((tie) => ({
  v: fc.oneof(
    { depthSize: "small", withCrossShrink: true },
    fc.string({ unit: "grapheme-ascii", maxLength: 12 }),
    fc.array(tie("v"), { minLength: 1, maxLength: 3 }),
    fc.dictionary(name, tie("v"), { minKeys: 1, maxKeys: 4 }),
  ),
})).v;
const object = fc.dictionary(name, value, { minKeys: 0, maxKeys: 5 });

describe("formatKeyval / parseKeyval round trip", () => {
  it("format then parse gives back the object", () => {
    fc.assert(
      fc.property(object, (o) => {
        expect(parseKeyval(formatKeyval(o))).toEqual(o);
      }),
      { numRuns: RUNS },
    );
  });

  it("formats the documented example", () => {
    expect(formatKeyval({ driver: "qcow2", file: { driver: "file", filename: "a,b" }, l: ["x", "y"] })).toBe(
      "driver=qcow2,file.driver=file,file.filename=a,,b,l.0=x,l.1=y",
    );
  });
});

const live = process.env.BLK_QAPI_QEMU !== "0" && missingPeers(["qemu-storage-daemon"]).length === 0;

describe.skipIf(!live)("parser messages against the real qemu-storage-daemon", { tags: ["qemu"] }, () => {
  it("agrees on every error row without an implied key", async () => {
    for (const [params, impliedKey, expected] of ERRORS) {
      if (impliedKey !== undefined) continue;
      const r = await run("qemu-storage-daemon", ["--nbd-server", params], { timeoutMs: 10_000 });
      expect(r.stderr.trim(), params).toBe(`qemu-storage-daemon: --nbd-server ${params}: ${expected}`);
    }
  });
});
