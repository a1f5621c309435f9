/** `sparseRuns` (convert's `-S` zero-run search): the word-at-a-time check and the no-zero fast path. */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { sparseRuns } from "../src/sparse.ts";

const RUNS = Number(process.env.BLK_FUZZ_RUNS ?? 25);

/** Sectors of data (non-zero somewhere) or zeroes, with an optional short tail. */
const layout = fc.record({
  sectors: fc.array(fc.record({ zero: fc.boolean(), at: fc.integer({ min: 0, max: 511 }) }), {
    minLength: 0,
    maxLength: 80,
  }),
  tail: fc.integer({ min: 0, max: 511 }),
  sector: fc.integer({ min: 0, max: 64 }),
  min: fc.constantFrom(1, 2, 7, 8, 16, 128),
});

function build(l: { sectors: { zero: boolean; at: number }[]; tail: number }, shift: number): Uint8Array {
  const len = l.sectors.length * 512 + l.tail;
  const backing = new Uint8Array(len + shift);
  const buf = backing.subarray(shift, shift + len);
  l.sectors.forEach((s, i) => {
    if (!s.zero) buf[i * 512 + s.at] = 1 + (s.at % 255);
  });
  if (l.tail > 0) buf[len - 1] = 7;
  return buf;
}

describe("sparseRuns", () => {
  it("finds the same runs whether the buffer is word-aligned or not (property)", () => {
    fc.assert(
      fc.property(layout, (l) => {
        let align = 1;
        while (align * 2 <= l.min) align *= 2;
        const aligned = sparseRuns(build(l, 0), l.sector, l.min, align);
        const unaligned = sparseRuns(build(l, 1), l.sector, l.min, align);
        expect(unaligned).toEqual(aligned);
        // Runs cover the buffer in order.
        let pos = 0;
        for (const r of aligned) {
          expect(r.start).toBe(pos);
          pos = r.end;
        }
        expect(pos).toBe(l.sectors.length * 512 + l.tail);
      }),
      { numRuns: RUNS * 8 },
    );
  });

  it("a buffer without a zero sector is one data run", () => {
    fc.assert(
      fc.property(layout, (l) => {
        const data = { ...l, sectors: l.sectors.map((s) => ({ ...s, zero: false })) };
        const buf = build(data, 0);
        expect(sparseRuns(buf, l.sector, l.min, 1)).toEqual(
          buf.length === 0 ? [] : [{ start: 0, end: buf.length, zero: false }],
        );
      }),
      { numRuns: RUNS * 4 },
    );
  });
});
