import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { HBitmap } from "../src/index.ts";

const RUNS = Number(process.env.BLK_FUZZ_RUNS ?? 300);
const TIMEOUT = Math.max(20_000, RUNS * 50);

/** Positions near the boundaries of words, pages and directory chunks of every level. */
function posArb(nbits: number): fc.Arbitrary<number> {
  const edges = [5, 11, 16, 21, 26, 27, 31, 32, 36, 37, 40].map((k) => 2 ** k).filter((e) => e < nbits);
  return fc.oneof(
    fc.integer({ min: 0, max: nbits - 1 }),
    fc
      .tuple(fc.constantFrom(...edges, nbits), fc.integer({ min: -70, max: 70 }))
      .map(([e, d]) => Math.min(Math.max(e + d, 0), nbits - 1)),
  );
}

type SparseOp = { kind: "set" | "reset" | "query"; at: number; len: number };

describe("huge sparse bitmaps against a set-of-bits model", () => {
  it(
    "set/reset/search/iterate agree at up to 2^41 bits",
    () => {
      const arb = fc.constantFrom(2 ** 22 + 13, 2 ** 27 + 1, 2 ** 33, 2 ** 41).chain((nbits) =>
        fc.tuple(
          fc.constant(nbits),
          fc.array(
            fc.record({
              kind: fc.constantFrom<SparseOp["kind"]>("set", "set", "reset", "query"),
              at: posArb(nbits),
              len: fc.integer({ min: 1, max: 100 }),
            }),
            { minLength: 1, maxLength: 30 },
          ),
        ),
      );
      fc.assert(
        fc.property(arb, ([nbits, ops]) => {
          const hb = new HBitmap(nbits, 0);
          const model = new Set<number>();
          for (const op of ops) {
            const len = Math.min(op.len, nbits - op.at);
            if (op.kind === "set") {
              hb.set(op.at, len);
              for (let i = 0; i < len; i++) model.add(op.at + i);
            } else if (op.kind === "reset") {
              hb.reset(op.at, len);
              for (let i = 0; i < len; i++) model.delete(op.at + i);
            } else {
              const sorted = [...model].sort((a, b) => a - b);
              const nd = sorted.find((b) => b >= op.at) ?? -1;
              expect(hb.nextDirty(op.at)).toBe(nd);
              expect(hb.nextDirty(op.at, len)).toBe(nd >= 0 && nd < op.at + len ? nd : -1);
              let nz = op.at;
              while (model.has(nz)) nz++;
              expect(hb.nextZero(op.at)).toBe(nz < nbits ? nz : -1);
              const area = hb.nextDirtyArea(op.at, nbits);
              if (nd < 0) expect(area).toBeNull();
              else {
                let e = nd;
                while (model.has(e)) e++;
                expect(area).toEqual({ start: nd, count: e - nd });
              }
              const it = hb.iter(op.at);
              const got: number[] = [];
              for (let i = 0; i < 5; i++) got.push(it.next());
              const want = sorted.filter((b) => b >= op.at).slice(0, 5);
              while (want.length < 5) want.push(-1);
              expect(got).toEqual(want);
            }
            expect(hb.count()).toBe(model.size);
          }
          const all = [...hb.iter()];
          expect(all).toEqual([...model].sort((a, b) => a - b));
        }),
        { numRuns: RUNS },
      );
    },
    TIMEOUT,
  );
});
