import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { HBitmap, type HBitmapIter, isHBitmapError } from "../src/index.ts";
import { Model } from "./model.ts";

/** Scales both properties: by default 2400 small-bitmap sequences plus 50 multi-page ones (2450 in all). */
const RUNS = Number(process.env.BLK_FUZZ_RUNS ?? 300);
const TIMEOUT = Math.max(60_000, RUNS * 200);

type Op = { kind: number; x: number; y: number; z: number; w: number };
const opArb: fc.Arbitrary<Op> = fc.record({
  kind: fc.nat({ max: 13 }),
  x: fc.nat(),
  y: fc.nat(),
  z: fc.nat(),
  w: fc.nat(),
});

function codeOf(fn: () => void): string | undefined {
  try {
    fn();
    return undefined;
  } catch (e) {
    if (isHBitmapError(e)) return e.code;
    throw e;
  }
}

/** A position that is usually inside the bitmap, sometimes just past it; aligned half the time. */
function pos(m: Model, r: number, aligned: boolean): number {
  const span = m.size + 2 * m.gran + 1;
  const p = r % span;
  return aligned ? p - (p % m.gran) : p;
}

function len(m: Model, r: number, aligned: boolean): number {
  const small = r % 4 === 0;
  const c = small ? (r >> 2) % (3 * m.gran + 1) : (r >> 2) % (m.size + 1);
  return aligned ? c - (c % m.gran) : c;
}

function serializeWhole(hb: HBitmap, chunkUnits: number): Uint8Array {
  const align = hb.serializationAlign();
  const out = new Uint8Array(hb.serializationSize(0, hb.size));
  let off = 0;
  for (let start = 0; start < hb.size; start += chunkUnits * align) {
    const count = Math.min(chunkUnits * align, hb.size - start);
    const n = hb.serializationSize(start, count);
    const buf = new Uint8Array(n);
    hb.serializePart(buf, start, count);
    out.set(buf, off);
    off += n;
  }
  return out;
}

function checkSame(hb: HBitmap, m: Model): void {
  expect(hb.size).toBe(m.size);
  expect(hb.granules).toBe(m.nbits);
  expect(hb.count()).toBe(m.count());
  expect(hb.isEmpty()).toBe(m.count() === 0);
  expect([...hb.iter()]).toEqual(m.iterate());
}

interface LiveIter {
  it: HBitmapIter;
  last: number; // last returned granule, or first granule - 1
  stable: Set<number>; // granules dirty at creation and never cleaned since
  done: boolean;
}

function runOps(size: number, g: number, ops: Op[], metaShift: number): void {
  const hb = new HBitmap(size, g);
  const m = new Model(size, g);
  let mm: Model | undefined;
  if (metaShift >= 0) {
    hb.createMeta(2 ** metaShift);
    mm = new Model(m.nbits * m.gran, g + metaShift);
  }
  let live: LiveIter | undefined;
  for (const op of ops) {
    const aligned = (op.w & 1) === 0;
    switch (op.kind) {
      case 0:
      case 1: {
        const s = pos(m, op.x, false);
        const c = len(m, op.y, false);
        const valid = c === 0 || m.bit(s + c - 1) < m.nbits;
        const code = codeOf(() => hb.set(s, c));
        if (valid) {
          expect(code).toBeUndefined();
          if (m.set(s, c)) mm?.set(s, c);
        } else expect(code).toBe("ERANGE");
        break;
      }
      case 2:
      case 3: {
        const s = pos(m, op.x, aligned || op.w % 3 !== 0);
        let c = len(m, op.y, aligned || op.w % 5 !== 0);
        if (op.w % 7 === 0 && s <= m.size) c = m.size - s; // the tail rule
        const code = codeOf(() => hb.reset(s, c));
        if (m.resetAllowed(s, c)) {
          expect(code).toBeUndefined();
          if (m.reset(s, c)) mm?.set(s, c);
        } else if (c !== 0 && (s % m.gran !== 0 || (c % m.gran !== 0 && s + c !== m.size))) {
          expect(code).toBe("EINVAL");
        } else expect(code).toBe("ERANGE");
        break;
      }
      case 4:
        if (op.x % 4 === 0) {
          hb.resetAll();
          m.resetAll();
        } else {
          const newSize = op.y % (2 * m.size + 3 * m.gran + 2);
          hb.truncate(newSize);
          const newBits = Math.ceil(newSize / m.gran);
          if (newBits < m.nbits && m.reset(newBits * m.gran, (m.nbits - newBits) * m.gran) && mm) {
            mm.set(newBits * m.gran, mm.size - newBits * m.gran);
          }
          m.truncate(newSize);
          mm?.truncate(newBits * m.gran);
          live = undefined; // truncation invalidates iterators
        }
        break;
      case 5: {
        // merge with a random other bitmap of the same size; result is a, b or a third bitmap
        const og = op.x % 3 === 0 ? g : (op.x >> 2) % 7;
        const other = new HBitmap(m.size, og);
        const om = new Model(m.size, og);
        for (let i = 0; i < 3; i++) {
          const s = (op.y * (i + 1)) % (m.size + 1);
          const c = Math.min((op.z >> i) % (4 * om.gran + 1), m.size - s);
          other.set(s, c);
          om.set(s, c);
        }
        const mode = op.w % 3;
        if (mode === 0) {
          HBitmap.merge(hb, other, hb);
          m.mergeFrom(om);
        } else if (mode === 1) {
          HBitmap.merge(other, hb, hb);
          m.mergeFrom(om);
        } else {
          const rg = (op.w >> 2) % 6;
          const result = new HBitmap(m.size, rg);
          result.set(0, Math.min(m.size, 1));
          HBitmap.merge(hb, other, result);
          const rm = new Model(m.size, rg);
          rm.mergeFrom(m);
          rm.mergeFrom(om);
          checkSame(result, rm);
        }
        break;
      }
      case 6: {
        if (!hb.isSerializable()) break;
        const units = 1 + (op.x % 3);
        const bytes = serializeWhole(hb, units);
        expect(bytes).toEqual(m.serialize());
        const copy = new HBitmap(m.size, g);
        copy.set(0, Math.min(m.size, 1 + (op.y % (m.size + 1))));
        const align = copy.serializationAlign();
        let off = 0;
        for (let start = 0; start < m.size; start += units * align) {
          const count = Math.min(units * align, m.size - start);
          const n = copy.serializationSize(start, count);
          const chunk = bytes.subarray(off, off + n);
          if (op.z % 3 === 0 && chunk.every((b) => b === 0)) copy.deserializeZeroes(start, count, false);
          else if (op.z % 3 === 1 && chunk.every((b) => b === 0xff))
            copy.deserializeOnes(start, count, false);
          else copy.deserializePart(chunk, start, count, false);
          off += n;
        }
        if (op.w % 2 === 0) copy.deserializeFinish();
        checkSame(copy, m);
        expect(copy.sha256()).toBe(hb.sha256());
        break;
      }
      case 7: {
        const s = pos(m, op.x, false);
        const c = op.y % 3 === 0 ? undefined : len(m, op.z, false);
        expect(hb.nextDirty(s, c)).toBe(m.nextDirty(s, c));
        expect(hb.nextZero(s, c)).toBe(m.nextZero(s, c));
        break;
      }
      case 8: {
        const s = pos(m, op.x, false);
        const e = op.y % 4 === 0 ? Number.POSITIVE_INFINITY : pos(m, op.y, false);
        const max = op.z % 3 === 0 ? undefined : 1 + (op.z % (3 * m.gran + 2));
        expect(hb.nextDirtyArea(s, e, max)).toEqual(m.nextDirtyArea(s, e, max));
        break;
      }
      case 9: {
        if (m.size === 0) break;
        const s = op.x % m.size;
        const c = 1 + (op.y % (m.size - s));
        expect(hb.status(s, c)).toEqual(m.status(s, c));
        expect(hb.get(s)).toBe(m.get(s));
        break;
      }
      case 10: {
        if (m.size === 0) break;
        const first = op.x % m.size;
        expect([...hb.iter(first)]).toEqual(m.iterate(first));
        break;
      }
      case 11: {
        const c = hb.clone();
        checkSame(c, m);
        if (m.nbits > 0) c.set(0, 1); // the clone is independent
        break;
      }
      case 12: {
        if (live === undefined || live.done) {
          if (m.nbits === 0) break;
          const first = op.x % m.size;
          const fb = m.bit(first);
          live = { it: hb.iter(first), last: fb - 1, stable: new Set(), done: false };
          for (let b = fb; b < m.nbits; b++) if (m.bits[b] === 1) live.stable.add(b);
        }
        for (let k = 0; k <= op.y % 5; k++) {
          const v = live.it.next();
          if (v < 0) {
            live.done = true;
            for (const b of live.stable) expect(b).toBeLessThanOrEqual(live.last);
            break;
          }
          expect(v % m.gran).toBe(0);
          const b = m.bit(v);
          expect(b).toBeGreaterThan(live.last);
          expect(m.bits[b]).toBe(1); // never a clean granule
          for (const sb of live.stable)
            if (sb > live.last && sb < b) expect.fail(`iterator skipped granule ${sb}`);
          live.last = b;
        }
        break;
      }
      default: {
        // walk all dirty areas as block-copy would
        const areas: { start: number; count: number }[] = [];
        const want: { start: number; count: number }[] = [];
        for (let p = 0, a = hb.nextDirtyArea(0, m.size); a; a = hb.nextDirtyArea(p, m.size)) {
          areas.push(a);
          p = a.start + a.count;
        }
        for (let p = 0, a = m.nextDirtyArea(0, m.size); a; a = m.nextDirtyArea(p, m.size)) {
          want.push(a);
          p = a.start + a.count;
        }
        expect(areas).toEqual(want);
      }
    }
    checkSame(hb, m);
    if (mm) expect([...(hb.meta as HBitmap).iter()]).toEqual(mm.iterate());
    if (live) for (const b of live.stable) if (m.bits[b] !== 1) live.stable.delete(b);
  }
}

describe("HBitmap against a naive model", () => {
  it(
    "random operation sequences, small bitmaps",
    () => {
      fc.assert(
        fc.property(
          fc.nat({ max: 400 }),
          fc.nat({ max: 5 }),
          fc.array(opArb, { minLength: 5, maxLength: 40, size: "max" }),
          fc.integer({ min: -1, max: 4 }),
          (size, g, ops, metaShift) => runOps(size, g, ops, metaShift),
        ),
        { numRuns: RUNS * 8 },
      );
    },
    TIMEOUT,
  );

  it(
    "random operation sequences, multi-word and multi-page bitmaps",
    () => {
      fc.assert(
        fc.property(
          fc.integer({ min: 1000, max: 70_000 }),
          fc.nat({ max: 2 }),
          fc.array(opArb, { minLength: 5, maxLength: 25, size: "max" }),
          fc.integer({ min: -1, max: 4 }),
          (size, g, ops, metaShift) => runOps(size, g, ops, metaShift),
        ),
        { numRuns: Math.max(10, Math.floor(RUNS / 6)) },
      );
    },
    TIMEOUT,
  );
});
