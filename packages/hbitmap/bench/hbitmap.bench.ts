import { afterAll, bench, describe, expect } from "vitest";
import { HBitmap } from "../src/index.ts";
import { FlatBitmap } from "./flat.ts";
import { printRatios } from "./ratios.ts";

// 1 TiB disk at 64 KiB granularity: 16 Mi bits.
const SIZE = 2 ** 40;
const G = 16;
const GRAN = 2 ** G;

/** Deterministic xorshift32, so both implementations see the same ranges. */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 2 ** 32;
  };
}

/** Granule-aligned ranges: `n` of them, each up to `maxGranules` long. */
function ranges(n: number, maxGranules: number, seed: number): [number, number][] {
  const r = rng(seed);
  const out: [number, number][] = [];
  for (let i = 0; i < n; i++) {
    const len = (1 + Math.floor(r() * maxGranules)) * GRAN;
    const start = Math.floor(r() * (SIZE / GRAN - maxGranules - 1)) * GRAN;
    out.push([start, len]);
  }
  return out;
}

const RANGES = ranges(2000, 2048, 1);
/** Fragmented bitmaps: short dirty runs (up to 1 MiB) scattered over the disk, like a guest's random writes. */
const FRAGMENTS = ranges(4000, 16, 2);
const FEW_FRAGMENTS = ranges(300, 16, 3);

function fill(b: { set(s: number, c: number): void }, rs: [number, number][]): void {
  for (const [s, c] of rs) b.set(s, c);
}

// One walker per implementation, so that neither call site is polymorphic.
function walk(b: HBitmap): number[] {
  const out: number[] = [];
  for (let p = 0, a = b.nextDirtyArea(0, SIZE); a; a = b.nextDirtyArea(p, SIZE)) {
    out.push(a.start, a.count);
    p = a.start + a.count;
  }
  return out;
}

function walkFlat(b: FlatBitmap): number[] {
  const out: number[] = [];
  for (let p = 0, a = b.nextDirtyArea(0, SIZE); a; a = b.nextDirtyArea(p, SIZE)) {
    out.push(a.start, a.count);
    p = a.start + a.count;
  }
  return out;
}

const hb = new HBitmap(SIZE, G);
const flat = new FlatBitmap(SIZE, G);
fill(hb, FRAGMENTS);
fill(flat, FRAGMENTS);
const hbFew = new HBitmap(SIZE, G);
const flatFew = new FlatBitmap(SIZE, G);
fill(hbFew, FEW_FRAGMENTS);
fill(flatFew, FEW_FRAGMENTS);

// Correctness first: the two implementations must agree before anything is timed.
{
  const h2 = new HBitmap(SIZE, G);
  const f2 = new FlatBitmap(SIZE, G);
  fill(h2, RANGES);
  fill(f2, RANGES);
  expect(h2.count()).toBe(f2.count());
  expect(walk(h2)).toEqual(walkFlat(f2));
  for (const [s, c] of RANGES.slice(0, 500)) {
    h2.reset(s, c);
    f2.reset(s, c);
  }
  expect(h2.count()).toBe(f2.count());
  expect(walk(h2)).toEqual(walkFlat(f2));
  expect(hb.count()).toBe(flat.count());
  expect(walk(hb)).toEqual(walkFlat(flat));
  expect(walk(hbFew)).toEqual(walkFlat(flatFew));
}

describe("set+reset 2000 ranges (up to 128 MiB each)", () => {
  const h = new HBitmap(SIZE, G);
  const f = new FlatBitmap(SIZE, G);
  bench("hbitmap", () => {
    for (const [s, c] of RANGES) h.set(s, c);
    for (const [s, c] of RANGES) h.reset(s, c);
  });
  bench("flat", () => {
    for (const [s, c] of RANGES) f.set(s, c);
    for (const [s, c] of RANGES) f.reset(s, c);
  });
});

describe("count", () => {
  bench("hbitmap", () => {
    hb.count();
  });
  bench("flat", () => {
    flat.count();
  });
});

describe("dirty-extent walk (4000 fragments)", () => {
  bench("hbitmap", () => {
    walk(hb);
  });
  bench("flat", () => {
    walkFlat(flat);
  });
});

describe("dirty-extent walk (300 fragments)", () => {
  bench("hbitmap", () => {
    walk(hbFew);
  });
  bench("flat", () => {
    walkFlat(flatFew);
  });
});

// Vitest passes the finished suite (with every benchmark's result) as the hook's second argument.
// biome-ignore lint/correctness/noEmptyPattern: vitest's fixture parser requires a destructuring pattern here.
afterAll(({}, suite) => {
  printRatios(suite);
});
