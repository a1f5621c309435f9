import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { encodeQmpJson, formatDouble, type QmpJsonMessage, QmpJsonReader } from "../src/index.ts";
import { QSD_HOSTILE } from "./fixtures/qsd-hostile.ts";
import { TRANSCRIPT_EXCHANGES } from "./fixtures/transcripts.ts";

const bytes = (s: string): Buffer => Buffer.from(s, "latin1");
const readAll = (input: Uint8Array, limits = {}): QmpJsonMessage[] =>
  new QmpJsonReader(limits).pushAll(input);

/** A recorded client → server stream: every `C:` line of the transcripts, then all hostile inputs. */
const recorded = bytes(
  TRANSCRIPT_EXCHANGES.flatMap((e) => e.lines.filter((l) => l.dir === "C").map((l) => `${l.text}\n`)).join(
    "",
  ) + QSD_HOSTILE.map((c) => c.send).join(""),
);
/** The same without the two 1 KiB nesting cases, small enough to re-read once per split point. */
const recordedSmall = bytes(
  TRANSCRIPT_EXCHANGES.flatMap((e) => e.lines.filter((l) => l.dir === "C").map((l) => `${l.text}\n`)).join(
    "",
  ) +
    QSD_HOSTILE.filter((c) => c.send.length < 500)
      .map((c) => c.send)
      .join(""),
);
const digest = (ms: QmpJsonMessage[]): string =>
  ms.map((m) => (m.ok ? `V${encodeQmpJson(m.value)}` : `E${m.error}`)).join("\n");

describe("QmpJsonReader", () => {
  it("reads objects without delimiters, across chunks, in single quotes, with CRLF", () => {
    const r = new QmpJsonReader();
    expect(r.pushAll(bytes("{\"a\": 1}{'b': 'x\\'y\"'}\r\n{\"c\""))).toEqual([
      { ok: true, value: { a: 1 } },
      { ok: true, value: { b: "x'y\"" } },
    ]);
    expect(r.bufferedBytes).toBeGreaterThan(0);
    expect(r.pushAll(bytes(": [true, false, null, -1.5e2, 9007199254740993]}"))).toEqual([
      { ok: true, value: { c: [true, false, null, -150, 9007199254740993n] } },
    ]);
    expect(r.bufferedBytes).toBe(0);
  });

  it("gives QEMU's parse errors and recovers", () => {
    const texts = readAll(bytes('{"execute": }\n@@@ {"x": 1}\n[1 2]\n{"a":1,"a":2}\n')).map((m) =>
      m.ok ? m.value : m.error,
    );
    expect(texts).toEqual([
      "JSON parse error, expecting value",
      "JSON parse error, stray '@'",
      { x: 1 },
      "JSON parse error, expected separator in list",
      "JSON parse error, duplicate key",
    ]);
  });

  it("keeps __proto__ as a plain member", () => {
    const [m] = readAll(bytes('{"__proto__": {"polluted": 1}}'));
    expect(m?.ok && Object.getPrototypeOf(m.value)).toBe(Object.prototype);
    expect(m?.ok && Object.keys(m.value as object)).toEqual(["__proto__"]);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
  });

  it("enforces the size, token-count and nesting limits before storing, then goes on", () => {
    const limits = { maxMessageBytes: 1000, maxTokens: 50, maxDepth: 8 };
    const r = new QmpJsonReader(limits);
    const big = `"${"a".repeat(5000)}"`;
    const out = r.pushAll(bytes(`${big}\n{"ok": 1}`)).map((m) => (m.ok ? m.value : m.error));
    // QEMU cuts the oversized token and lexes the rest of it as new input (the tail of the 'a's is a keyword,
    // the closing quote opens a string that the newline breaks), so the next line is read normally.
    expect(out[0]).toBe("JSON token size limit exceeded");
    expect(out.at(-1)).toEqual({ ok: 1 });
    expect(r.bufferedBytes).toBe(0);
    expect(readAll(bytes(`[${"1,".repeat(60)}1]`), limits).map((m) => (m.ok ? m : m.error))[0]).toBe(
      "JSON token count limit exceeded",
    );
    const deep = readAll(bytes(`${"[".repeat(9)}${"]".repeat(9)}`), limits).map((m) => (m.ok ? m : m.error));
    expect(deep[0]).toBe("JSON nesting depth limit exceeded");
    expect(deep.slice(1).every((e) => e === "JSON parse error, expecting value")).toBe(true);
  });

  it("reads and writes back the deepest nesting it supports without exhausting the stack", () => {
    const deep = `${"[".repeat(2048)}${"]".repeat(2048)}`;
    const [m] = readAll(bytes(deep), { maxDepth: 1_000_000 });
    expect(m?.ok).toBe(true);
    expect(encodeQmpJson(m?.ok ? m.value : null)).toBe(deep);
    const [over] = readAll(bytes(`${"[".repeat(2049)}`), { maxDepth: 1_000_000 });
    expect(over).toEqual({ ok: false, error: "JSON nesting depth limit exceeded" });
  });

  it("bounds the memory an unterminated string can take", () => {
    const r = new QmpJsonReader({ maxMessageBytes: 4096 });
    const chunk = bytes(`"${"x".repeat(65535)}`);
    let errors = 0;
    for (let i = 0; i < 64; i++) {
      r.push(chunk, (m) => {
        if (!m.ok) errors++;
        return true;
      });
      expect(r.bufferedBytes).toBeLessThanOrEqual(4097);
    }
    expect(errors).toBeGreaterThan(0);
  });

  it("gives identical results for a recorded session split at every byte", { timeout: 60_000 }, () => {
    const whole = readAll(recordedSmall);
    expect(whole.length).toBeGreaterThan(150);
    const want = digest(whole);
    for (let k = 0; k <= recordedSmall.length; k += 1) {
      const r = new QmpJsonReader();
      const got = digest([
        ...r.pushAll(recordedSmall.subarray(0, k)),
        ...r.pushAll(recordedSmall.subarray(k)),
      ]);
      if (got !== want) expect.fail(`split at byte ${k} changed the result`);
    }
  });

  it("gives identical results fed one byte at a time and at random splits", () => {
    const whole = readAll(recorded);
    const r = new QmpJsonReader();
    const got: QmpJsonMessage[] = [];
    for (let i = 0; i < recorded.length; i++) got.push(...r.pushAll(recorded.subarray(i, i + 1)));
    expect(got).toEqual(whole);
    fc.assert(
      fc.property(
        fc.uniqueArray(fc.integer({ min: 1, max: recorded.length - 1 }), { maxLength: 40 }),
        (cuts) => {
          const points = [0, ...cuts.sort((a, b) => a - b), recorded.length];
          const reader = new QmpJsonReader();
          const out: QmpJsonMessage[] = [];
          for (let i = 1; i < points.length; i++)
            out.push(...reader.pushAll(recorded.subarray(points[i - 1], points[i])));
          expect(out).toEqual(whole);
        },
      ),
      { numRuns: 50 },
    );
  });

  it("stops after a message when asked and resumes at the returned offset", () => {
    const input = bytes('{"a":1}{"b":2}{"c":3}');
    const r = new QmpJsonReader();
    const seen: unknown[] = [];
    let at = 0;
    while (at < input.length) {
      at = r.push(
        input,
        (m) => {
          seen.push(m.ok ? m.value : m.error);
          return false;
        },
        at,
      );
    }
    expect(seen).toEqual([{ a: 1 }, { b: 2 }, { c: 3 }]);
  });
});

describe("encodeQmpJson", () => {
  it("writes QEMU's separators, ASCII only, and skips undefined members", () => {
    expect(encodeQmpJson({ return: {}, id: 1 })).toBe('{"return": {}, "id": 1}');
    expect(encodeQmpJson({ a: [1, "x", null, true, []], b: undefined, c: 12345678901234567890n })).toBe(
      '{"a": [1, "x", null, true, []], "c": 12345678901234567890}',
    );
    expect(encodeQmpJson("é😀\u0001/\b\f\n\r\t\u007f'\"\\")).toBe(
      '"\\u00E9\\uD83D\\uDE00\\u0001/\\b\\f\\n\\r\\t\\u007F\'\\"\\\\"',
    );
  });

  it("formats doubles as C's %.17g", () => {
    expect(
      [0.1, 1e-5, 0.0015, 1e16, 1e17, 123.456, -1e300, 5e-324, -0, Number.POSITIVE_INFINITY, 1500].map((d) =>
        formatDouble(d),
      ),
    ).toEqual([
      "0.10000000000000001",
      "1.0000000000000001e-05",
      "0.0015",
      "10000000000000000",
      "1e+17",
      "123.456",
      "-1.0000000000000001e+300",
      "4.9406564584124654e-324",
      "-0",
      "inf",
      "1500",
    ]);
  });

  it("round-trips arbitrary JSON through the reader", () => {
    fc.assert(
      fc.property(fc.jsonValue(), (v) => {
        const text = encodeQmpJson(v);
        expect(/^[\x20-\x7e]*$/.test(text)).toBe(true);
        const [m] = readAll(Buffer.from(`[${text}]`));
        // integers beyond ±(2^53 - 1) come back as bigint
        const unbig = (x: unknown): unknown =>
          typeof x === "bigint"
            ? Number(x)
            : Array.isArray(x)
              ? x.map(unbig)
              : typeof x === "object" && x !== null
                ? Object.fromEntries(Object.entries(x).map(([k, y]) => [k, unbig(y)]))
                : x;
        const normal = JSON.parse(JSON.stringify(v)) as unknown;
        expect(m?.ok).toBe(true);
        expect(unbig(m?.ok ? m.value : undefined)).toEqual([normal]);
      }),
      { numRuns: 300 },
    );
  });
});
