import { isBlkError } from "@blk/core";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  type BlockdevOptionsGluster,
  formatGlusterUri,
  type GlusterServer,
  parseGlusterOptions,
  parseGlusterPort,
  parseGlusterUri,
  resolveGlusterConnection,
  validateGlusterOptions,
} from "../src/gluster/index.ts";
import { URI_EXTRA_VECTORS, URI_VECTORS } from "./gluster-vectors.ts";

/** Iterations per property: modest by default, `BLK_FUZZ_RUNS=100000` for a long run. */
const RUNS = Number(process.env.BLK_FUZZ_RUNS ?? 200);
/**
 * "Never hangs": a bound for one call on short inputs. A correct call takes well under a millisecond; the
 * bound only has to catch runaway (exponential) behaviour, so it is loose enough for a loaded 2-core machine.
 */
const MAX_MS = 2000;

/** Runs `f`, requires it to finish in time and to throw nothing but a BlkError. Returns the value or undefined. */
function guarded<T>(f: () => T): T | undefined {
  const t0 = performance.now();
  try {
    return f();
  } catch (e) {
    if (!isBlkError(e)) throw e;
    expect(e.code).toBe("EINVAL");
    return undefined;
  } finally {
    expect(performance.now() - t0).toBeLessThan(MAX_MS);
  }
}

/** What every successful URI parse must look like. */
function checkShape(o: BlockdevOptionsGluster): void {
  expect(o.volume.length).toBeGreaterThan(0);
  expect(o.volume).not.toContain("/");
  expect(o.path.length).toBeGreaterThan(0);
  expect(o.path.startsWith("/")).toBe(false);
  expect(o.server).toHaveLength(1);
  const s = o.server[0] as GlusterServer;
  if (s.type === "inet") {
    expect(s.port).toMatch(/^[1-9][0-9]*$/);
    expect(Number(s.port)).toBeLessThanOrEqual(65535);
  }
}

/** parse → format → parse is the identity (a `%00` host decoding to "" has no URL form). */
function roundTrip(o: BlockdevOptionsGluster): void {
  if (o.server[0]?.type === "inet" && o.server[0].host === "") return;
  const url = formatGlusterUri(o);
  expect(parseGlusterUri(url)).toEqual(o);
}

const TOKENS = [
  ..."/:@[]%?#&;=+.-_~!$'()*,019aAfFgsx \t\\|^`{}\"<>é",
  "%2F",
  "%2f",
  "%00",
  "%25",
  "%3A",
  "%5B",
  "%5D",
  "%20",
  "%C3%A9",
  "%FF",
  "%2",
  "%zz",
  "[::1]",
  "socket",
  "socket=",
  "?socket=/s",
  "gluster+unix:",
  "gluster+rdma://",
  ":0",
  ":65536",
  "//",
  "\uD800",
  "😀",
  "\0",
];
const token = fc.constantFrom(...TOKENS);
const bases = [...URI_VECTORS, ...URI_EXTRA_VECTORS].map((v) => v.input);

type Mutation = { op: "insert" | "delete" | "replace"; at: number; text: string };
const mutation: fc.Arbitrary<Mutation> = fc.record({
  op: fc.constantFrom("insert", "delete", "replace"),
  at: fc.nat(),
  text: token,
});

function mutate(base: string, ms: readonly Mutation[]): string {
  let s = base;
  for (const m of ms) {
    const at = s.length === 0 ? 0 : m.at % (s.length + 1);
    if (m.op === "insert") s = s.slice(0, at) + m.text + s.slice(at);
    else if (m.op === "delete") s = s.slice(0, at) + s.slice(at + 1);
    else s = s.slice(0, at) + m.text + s.slice(at + 1);
  }
  return s;
}

const mutatedUrl = fc
  .tuple(fc.constantFrom(...bases), fc.array(mutation, { minLength: 1, maxLength: 6 }))
  .map(([b, ms]) => mutate(b, ms));

function checkUri(input: string): void {
  const warnings: string[] = [];
  const o = guarded(() => parseGlusterUri(input, { onWarning: (w) => warnings.push(w) }));
  expect(warnings.length).toBeLessThanOrEqual(1);
  if (o === undefined) return;
  checkShape(o);
  roundTrip(o);
  guarded(() => resolveGlusterConnection(o, input));
  // the open-level entry agrees on plain strings
  if (!input.startsWith("json:")) expect(parseGlusterOptions(input)).toEqual(o);
}

describe("gluster parser fuzz", () => {
  it("random strings: only BlkError, never slow", () => {
    fc.assert(
      fc.property(
        fc.oneof(fc.string({ unit: "binary", maxLength: 60 }), fc.string({ maxLength: 60 })),
        (s) => {
          checkUri(s);
          checkUri(`gluster://${s}`);
          checkUri(`gluster+unix:///v/a?${s}`);
        },
      ),
      { numRuns: RUNS },
    );
  });

  it("random strings from the URI alphabet: only BlkError; successes round-trip", () => {
    fc.assert(
      fc.property(fc.array(token, { maxLength: 20 }), (parts) => {
        const s = parts.join("");
        checkUri(`gluster:${s}`);
        checkUri(`gluster+unix:${s}`);
      }),
      { numRuns: RUNS },
    );
  });

  it("mutated spec URLs: only BlkError; successes round-trip", () => {
    fc.assert(fc.property(mutatedUrl, checkUri), { numRuns: RUNS * 3 });
  });

  it("stays linear on long inputs", () => {
    // 400 000 characters: linear parsing takes a few ms each; anything quadratic would take minutes, far
    // beyond the loose 5 s bound (which leaves room for a loaded CI machine).
    const N = 400_000;
    const long = [
      `gluster://h/v/${"a/".repeat(N / 2)}`,
      `gluster://h/v/a?${"a;".repeat(N / 2)}`,
      `gluster://h/v/a?${"&".repeat(N)}x`,
      `gluster://h/v/a?${"a&".repeat(N / 2)}`,
      `gluster://${"%41".repeat(N / 4)}/v/a`,
      `gluster://${"a:".repeat(N / 2)}@h/v/a`,
      `gluster://[${":".repeat(N)}/v/a`,
      `gluster${"+".repeat(N)}://h/v/a`,
      `${"a".repeat(N)}`,
      `gluster://h/v/a#${"[".repeat(N)}`,
    ];
    for (const s of long) {
      const t0 = performance.now();
      guarded(() => parseGlusterUri(s));
      guarded(() => parseGlusterOptions({ filename: s }));
      expect(performance.now() - t0).toBeLessThan(5000);
    }
  });
});

const text = fc.oneof(
  fc.constantFrom("", "h", "::1", "[::1]", "a/b", "/a", "a b", "%", "24007", "0", "+5"),
  fc.string({ maxLength: 12 }),
);
const scalar = fc.oneof(text, fc.integer(), fc.double(), fc.boolean(), fc.constant(null));
const serverEntry = fc.oneof(
  fc.record(
    {
      type: fc.constantFrom("inet", "tcp", "unix", "INET", "vsock", 5),
      host: scalar,
      port: scalar,
      path: scalar,
      socket: scalar,
      to: scalar,
      ipv4: scalar,
      ipv6: scalar,
    },
    { requiredKeys: [] },
  ),
  scalar,
);
const structured = fc.record(
  {
    driver: fc.constant("gluster"),
    volume: scalar,
    path: scalar,
    server: fc.oneof(
      fc.array(serverEntry, { maxLength: 3 }),
      fc.dictionary(fc.constantFrom("0", "1", "2", "01", "x"), serverEntry, { maxKeys: 3 }),
      scalar,
    ),
    debug: scalar,
    logfile: scalar,
  },
  { requiredKeys: [] },
);

describe("gluster options fuzz", () => {
  it("structured options: only BlkError; URL-expressible results round-trip", () => {
    fc.assert(
      fc.property(structured, (options) => {
        const o = guarded(() => validateGlusterOptions(options));
        guarded(() => parseGlusterOptions(options));
        guarded(() => parseGlusterOptions(`json:${JSON.stringify(options)}`));
        if (o === undefined) return;
        guarded(() => resolveGlusterConnection(o));
        const url = guarded(() => formatGlusterUri(o));
        if (url !== undefined) expect(parseGlusterUri(url)).toEqual(o);
      }),
      { numRuns: RUNS },
    );
  });

  it("arbitrary values: only BlkError", () => {
    fc.assert(
      fc.property(fc.anything({ maxDepth: 4 }), (v) => {
        guarded(() => validateGlusterOptions(v));
        if (typeof v === "string" || (typeof v === "object" && v !== null)) {
          guarded(() => parseGlusterOptions(v as Record<string, unknown>));
        }
      }),
      { numRuns: RUNS },
    );
    fc.assert(
      fc.property(fc.string({ maxLength: 40 }), (s) => {
        guarded(() => parseGlusterOptions(`json:${s}`));
      }),
      { numRuns: RUNS },
    );
  });

  it("deeply nested JSON does not overflow the stack", () => {
    const deep = `json:{"driver":"gluster","x":${"[".repeat(20_000)}1${"]".repeat(20_000)}}`;
    expect(guarded(() => parseGlusterOptions(deep))).toBeUndefined();
  });

  it("parseGlusterPort matches a model of parse_uint_full + range", () => {
    const model = (p: string): number | undefined => {
      const m = /^[\t\n\v\f\r ]*\+?([0-9]+)$/.exec(p);
      if (!m) return undefined;
      const n = BigInt(m[1] as string);
      return n <= 65535n ? Number(n) : undefined;
    };
    fc.assert(
      fc.property(fc.array(fc.constantFrom(..." \t\n+-0123456789x\v"), { maxLength: 12 }), (parts) => {
        const p = parts.join("");
        const got = guarded(() => parseGlusterPort(p));
        expect(got).toBe(model(p));
      }),
      { numRuns: RUNS },
    );
  });
});
