import { describe, expect, it } from "vitest";
import { HBITMAP_MAX_BITS, HBitmap, HBitmapError, isHBitmapError } from "../src/index.ts";

function code(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (e) {
    if (isHBitmapError(e)) return e.code;
    throw e;
  }
  return undefined;
}

function drain(hb: HBitmap, first = 0): number[] {
  const it = hb.iter(first);
  const out: number[] = [];
  for (let v = it.next(); v >= 0; v = it.next()) out.push(v);
  return out;
}

function bitsString(hb: HBitmap): string {
  let s = "";
  for (let b = 0; b < hb.granules; b++) s += hb.get(b * 2 ** hb.granularity) ? "1" : "0";
  return s;
}

describe("alloc, size and granularity", () => {
  it("computes granules and keeps the original size", () => {
    const hb = new HBitmap(10, 2);
    expect(hb.size).toBe(10);
    expect(hb.granularity).toBe(2);
    expect(hb.granules).toBe(3);
    expect(hb.isEmpty()).toBe(true);
    expect(hb.count()).toBe(0);
    expect(new HBitmap(0, 0).granules).toBe(0);
  });

  it("rejects bad arguments with typed errors", () => {
    expect(code(() => new HBitmap(-1, 0))).toBe("EINVAL");
    expect(code(() => new HBitmap(1.5, 0))).toBe("EINVAL");
    expect(code(() => new HBitmap(Number.NaN, 0))).toBe("EINVAL");
    expect(code(() => new HBitmap(2 ** 53, 0))).toBe("EINVAL");
    expect(code(() => new HBitmap(10, 64))).toBe("EINVAL");
    expect(code(() => new HBitmap(10, -1))).toBe("EINVAL");
    expect(code(() => new HBitmap(10, 0.5))).toBe("EINVAL");
    expect(code(() => new HBitmap(HBITMAP_MAX_BITS + 1, 0))).toBe("ERANGE");
    expect(new HBitmap(HBITMAP_MAX_BITS, 0).granules).toBe(2 ** 41);
    expect(code(() => new HBitmap(2 ** 42 + 1, 1))).toBe("ERANGE");
  });

  it("errors are branded HBitmapErrors with a code", () => {
    let err: unknown;
    try {
      new HBitmap(16, 1).reset(1, 3);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(HBitmapError);
    expect(err).toBeInstanceOf(Error);
    expect(isHBitmapError(err, "EINVAL")).toBe(true);
    expect(isHBitmapError(err, "ERANGE")).toBe(false);
    // a copy from another installed version carries the same brand
    const foreign = Object.defineProperty(new Error("x"), Symbol.for("@blk/hbitmap/error"), { value: true });
    expect(foreign instanceof HBitmapError).toBe(true);
    expect(isHBitmapError(new Error("x"))).toBe(false);
  });
});

describe("the worked example of hbitmap.c (size 16, g = 1)", () => {
  it("follows the table, with the unaligned resets rejected and their aligned equivalents applied", () => {
    const hb = new HBitmap(16, 1);
    expect(bitsString(hb)).toBe("00000000");
    hb.set(0, 9);
    expect(bitsString(hb)).toBe("11111000");
    expect(drain(hb)).toEqual([0, 2, 4, 6, 8]);
    expect(hb.count()).toBe(10);

    expect(code(() => hb.reset(1, 3))).toBe("EINVAL");
    expect(bitsString(hb)).toBe("11111000"); // nothing touched
    hb.reset(0, 4);
    expect(bitsString(hb)).toBe("00111000");
    expect(drain(hb)).toEqual([4, 6, 8]);

    hb.set(9, 2);
    expect(bitsString(hb)).toBe("00111100");
    expect(drain(hb)).toEqual([4, 6, 8, 10]);

    expect(code(() => hb.reset(5, 5))).toBe("EINVAL");
    hb.reset(4, 8);
    expect(bitsString(hb)).toBe("00000000");
    expect(drain(hb)).toEqual([]);
    expect(hb.isEmpty()).toBe(true);
  });
});

describe("set, reset, get, count", () => {
  it("set rounds outward: a 2-byte write at 65535 dirties two 64 KiB granules", () => {
    const hb = new HBitmap(1 << 30, 16);
    hb.set(65535, 2);
    expect(hb.count()).toBe(131072);
    expect(drain(hb)).toEqual([0, 65536]);
    const fine = new HBitmap(1 << 30, 9);
    fine.set(65535, 2);
    expect(drain(fine).map((x) => x / 512)).toEqual([127, 128]);
  });

  it("count is set bits << g and can exceed size at a partial last granule", () => {
    const hb = new HBitmap(5, 2); // granules [0,4) [4,8)
    hb.set(4, 1);
    expect(hb.count()).toBe(4);
    hb.set(0, 1);
    expect(hb.count()).toBe(8);
    expect(hb.count()).toBeGreaterThan(hb.size);
    expect(hb.isFull()).toBe(true);
  });

  it("count == 0 is a no-op for set and reset, even with odd arguments", () => {
    const hb = new HBitmap(16, 2);
    hb.set(100, 0);
    hb.reset(3, 0);
    expect(hb.isEmpty()).toBe(true);
  });

  it("set past the last granule is ERANGE, but may run into the partial last granule", () => {
    const hb = new HBitmap(10, 2);
    hb.set(8, 4); // items 8..11 are all in granule 2
    expect(hb.count()).toBe(4);
    expect(code(() => hb.set(8, 5))).toBe("ERANGE");
    expect(code(() => hb.set(12, 1))).toBe("ERANGE");
    expect(code(() => hb.get(12))).toBe("ERANGE");
    expect(code(() => hb.set(-1, 1))).toBe("EINVAL");
    expect(code(() => hb.set(0, 0.5))).toBe("EINVAL");
  });

  it("reset requires granule alignment except for a tail that ends at size", () => {
    const hb = new HBitmap(10, 2);
    hb.set(0, 10);
    expect(code(() => hb.reset(1, 4))).toBe("EINVAL"); // unaligned start
    expect(code(() => hb.reset(4, 2))).toBe("EINVAL"); // unaligned count, not at the end
    expect(code(() => hb.reset(8, 1))).toBe("EINVAL"); // unaligned count, ends before size
    expect(code(() => hb.reset(12, 4))).toBe("ERANGE");
    expect(hb.count()).toBe(12);
    hb.reset(8, 2); // tail rule: ends exactly at size
    expect(bitsString(hb)).toBe("110");
    hb.reset(4, 4);
    expect(bitsString(hb)).toBe("100");
    hb.set(8, 1);
    hb.reset(8, 4); // aligned count running into the partial last granule
    expect(bitsString(hb)).toBe("100");
    hb.reset(0, 10);
    expect(hb.isEmpty()).toBe(true);
  });

  it("resetAll clears everything and the bitmap keeps working", () => {
    const hb = new HBitmap(1 << 22, 0);
    hb.set(0, 1 << 22);
    expect(hb.isFull()).toBe(true);
    hb.resetAll();
    expect(hb.isEmpty()).toBe(true);
    expect(hb.nextDirty(0)).toBe(-1);
    hb.set(12345, 1);
    expect(drain(hb)).toEqual([12345]);
  });

  it("full bitmaps of word- and page-boundary sizes iterate every bit and stop (the sentinel's job)", () => {
    for (const n of [1, 31, 32, 33, 63, 64, 65, 1024, 1025, 65536, 65537, 2 ** 21 + 3]) {
      const hb = new HBitmap(n, 0);
      hb.set(0, n);
      expect(hb.count()).toBe(n);
      const it = hb.iter();
      let k = 0;
      for (let v = it.next(); v >= 0; v = it.next()) {
        if (v !== k) throw new Error(`size ${n}: got ${v}, want ${k}`);
        k++;
      }
      expect(k).toBe(n);
      expect(it.next()).toBe(-1);
      expect(hb.nextZero(0)).toBe(-1);
      hb.deserializeFinish();
      expect(hb.count()).toBe(n);
      expect(hb.nextDirty(n - 1)).toBe(n - 1);
      hb.resetAll();
      expect(hb.iter().next()).toBe(-1);
    }
  });
});

describe("search", () => {
  it("nextDirty clamps to start and respects the window", () => {
    const hb = new HBitmap(100, 2);
    hb.set(40, 8); // granules 10, 11
    expect(hb.nextDirty(0)).toBe(40);
    expect(hb.nextDirty(42)).toBe(42);
    expect(hb.nextDirty(0, 40)).toBe(-1);
    expect(hb.nextDirty(0, 41)).toBe(40);
    expect(hb.nextDirty(48)).toBe(-1);
    expect(hb.nextDirty(100)).toBe(-1);
    expect(hb.nextDirty(5, 0)).toBe(-1);
    // windows and limits larger than 2^53 (QEMU callers pass INT64_MAX) are clamped, not refused
    expect(hb.nextDirty(0, 2 ** 63)).toBe(40);
    expect(hb.nextZero(40, 2 ** 63)).toBe(48);
    expect(hb.nextDirtyArea(0, 2 ** 63, 2 ** 63)).toEqual({ start: 40, count: 8 });
    expect(code(() => hb.nextDirty(0, -1))).toBe("EINVAL");
    expect(code(() => hb.nextDirty(0, 1.5))).toBe("EINVAL");
    expect(code(() => hb.nextDirtyArea(0, Number.NaN))).toBe("EINVAL");
  });

  it("nextZero clamps to start and uses QEMU's window rule", () => {
    const hb = new HBitmap(100, 2);
    hb.set(0, 48);
    expect(hb.nextZero(0)).toBe(48);
    expect(hb.nextZero(50)).toBe(50);
    expect(hb.nextZero(0, 48)).toBe(-1);
    expect(hb.nextZero(0, 49)).toBe(48);
    expect(hb.nextZero(100)).toBe(-1);
    hb.set(48, 52);
    expect(hb.nextZero(0)).toBe(-1);
  });

  it("nextDirtyArea clips by end and maxCount and ends at granule boundaries otherwise", () => {
    const hb = new HBitmap(1000, 3);
    hb.set(100, 50); // granules 12..18 → items 96..151
    expect(hb.nextDirtyArea(0, 1000)).toEqual({ start: 96, count: 56 });
    expect(hb.nextDirtyArea(99, 1000)).toEqual({ start: 99, count: 53 });
    expect(hb.nextDirtyArea(0, 120)).toEqual({ start: 96, count: 24 });
    expect(hb.nextDirtyArea(0, 1000, 10)).toEqual({ start: 96, count: 10 });
    expect(hb.nextDirtyArea(152, 1000)).toBeNull();
    expect(hb.nextDirtyArea(0, 96)).toBeNull();
    expect(hb.nextDirtyArea(500, 400)).toBeNull();
    expect(code(() => hb.nextDirtyArea(0, 1000, 0))).toBe("EINVAL");
  });

  it("status reports the state at start and the run length, capped at count", () => {
    const hb = new HBitmap(64, 2);
    hb.set(16, 16);
    expect(hb.status(0, 64)).toEqual({ dirty: false, count: 16 });
    expect(hb.status(18, 40)).toEqual({ dirty: true, count: 14 });
    expect(hb.status(18, 4)).toEqual({ dirty: true, count: 4 });
    expect(hb.status(40, 24)).toEqual({ dirty: false, count: 24 });
    expect(code(() => hb.status(0, 0))).toBe("EINVAL");
    expect(code(() => hb.status(60, 5))).toBe("ERANGE");
  });
});

describe("iterator", () => {
  it("starts at the granule of an unaligned first item", () => {
    const hb = new HBitmap(64, 3);
    hb.set(8, 24);
    expect(drain(hb, 13)).toEqual([8, 16, 24]);
    expect(drain(hb, 16)).toEqual([16, 24]);
    expect(code(() => hb.iter(64))).toBe("ERANGE");
    expect(drain(new HBitmap(0, 0))).toEqual([]);
  });

  it("is iterable with for…of and spread", () => {
    const hb = new HBitmap(1 << 16, 4);
    hb.set(100, 1);
    hb.set(5000, 40);
    expect([...hb.iter()]).toEqual([96, 4992, 5008, 5024]);
  });

  it("never returns a bit reset after creation; may miss bits set behind it", () => {
    const hb = new HBitmap(1 << 20, 0);
    for (let i = 0; i < 1 << 20; i += 1000) hb.set(i, 1);
    const it = hb.iter();
    expect(it.next()).toBe(0);
    expect(it.next()).toBe(1000);
    hb.reset(2000, 1); // next one, reset after creation
    hb.reset(500_000, 100_000); // a whole stretch ahead
    hb.set(10, 1); // behind the position: missed
    hb.set(3500, 1); // ahead: QEMU may or may not report it
    const rest: number[] = [];
    for (let v = it.next(); v >= 0; v = it.next()) rest.push(v);
    expect(rest).not.toContain(2000);
    expect(rest.some((v) => v >= 500_000 && v < 600_000)).toBe(false);
    expect(rest).not.toContain(10);
    expect([...rest].sort((x, y) => x - y)).toEqual(rest);
    expect(new Set(rest).size).toBe(rest.length);
    const expected = drain(hb).filter((v) => v > 1000);
    expect(rest.filter((v) => v !== 3500)).toEqual(expected.filter((v) => v !== 3500));
  });

  it("resetAll during iteration ends it; the restart idiom re-inits at 0", () => {
    const hb = new HBitmap(1024, 0);
    hb.set(10, 1);
    hb.set(900, 1);
    const it = hb.iter();
    expect(it.next()).toBe(10);
    hb.resetAll();
    expect(it.next()).toBe(-1);
    hb.set(5, 1);
    expect(it.next()).toBe(-1);
    expect(hb.iter().next()).toBe(5);
  });

  it("survives truncation (results are unspecified but never crash or go past the end)", () => {
    const hb = new HBitmap(1 << 18, 0);
    hb.set(0, 1 << 18);
    const it = hb.iter(100_000);
    expect(it.next()).toBe(100_000);
    hb.truncate(50_000);
    expect(it.next()).toBe(-1);
  });
});

describe("truncate", () => {
  it("shrinking keeps a partial last granule's bit and drops the rest", () => {
    const hb = new HBitmap(16, 2);
    hb.set(8, 8);
    hb.truncate(9);
    expect(hb.granules).toBe(3);
    expect(hb.count()).toBe(4);
    expect(hb.get(8)).toBe(true);
    hb.truncate(8);
    expect(hb.granules).toBe(2);
    expect(hb.isEmpty()).toBe(true);
    hb.truncate(32);
    expect(hb.isEmpty()).toBe(true);
    expect(hb.get(28)).toBe(false);
  });

  it("moves across page boundaries and back", () => {
    const hb = new HBitmap(3 << 20, 0);
    hb.set(0, 10);
    hb.set(70_000, 100);
    hb.set((3 << 20) - 5, 5);
    hb.truncate(100);
    expect(hb.count()).toBe(10);
    hb.truncate(5 << 20);
    expect(hb.count()).toBe(10);
    expect(hb.nextDirty(11)).toBe(-1);
    hb.set((5 << 20) - 1, 1);
    expect(drain(hb, 5)).toEqual([5, 6, 7, 8, 9, (5 << 20) - 1]);
    hb.truncate(70_100);
    expect(hb.count()).toBe(10);
  });

  it("crosses between one- and two-level page directories", () => {
    const hb = new HBitmap(2 ** 30, 0); // 2^25 words: 16384 pages, two-level directory
    const spots = [3, 2 ** 20 - 1, 2 ** 27 + 5, 2 ** 30 - 1];
    for (const s of spots) hb.set(s, 1);
    hb.truncate(2 ** 20); // 16 pages: one-level directory; keeps bits below 2^20
    expect([...hb.iter()]).toEqual([3, 2 ** 20 - 1]);
    hb.truncate(2 ** 31);
    expect([...hb.iter()]).toEqual([3, 2 ** 20 - 1]);
    hb.set(2 ** 31 - 1, 1);
    expect(hb.nextDirty(2 ** 20)).toBe(2 ** 31 - 1);
    expect(hb.count()).toBe(3);
  });

  it("rejects sizes beyond the limit", () => {
    const hb = new HBitmap(10, 0);
    expect(code(() => hb.truncate(HBITMAP_MAX_BITS + 1))).toBe("ERANGE");
    expect(code(() => hb.truncate(-1))).toBe("EINVAL");
    expect(hb.size).toBe(10);
  });
});

describe("merge", () => {
  it("same granularity: union into a, b or a third bitmap", () => {
    const a = new HBitmap(1 << 20, 2);
    const b = new HBitmap(1 << 20, 2);
    a.set(0, 4);
    b.set(1 << 19, 8);
    const r = new HBitmap(1 << 20, 2);
    r.set(400, 4); // overwritten: result := a ∪ b
    HBitmap.merge(a, b, r);
    expect(drain(r)).toEqual([0, 1 << 19, (1 << 19) + 4]);
    expect(r.count()).toBe(12);
    HBitmap.merge(a, b, a);
    expect(drain(a)).toEqual(drain(r));
    HBitmap.merge(a, b, b);
    expect(drain(b)).toEqual(drain(r));
  });

  it("different granularities round outward into a coarser result", () => {
    const fine = new HBitmap(1 << 16, 9);
    fine.set(65535, 1); // granule 127
    const coarse = new HBitmap(1 << 16, 12);
    HBitmap.merge(coarse, fine, coarse);
    expect(drain(coarse)).toEqual([61440]);
    const r = new HBitmap(1 << 16, 16);
    HBitmap.merge(fine, coarse, r);
    expect(r.count()).toBe(65536);
    const back = new HBitmap(1 << 16, 0);
    HBitmap.merge(back, coarse, back);
    expect(back.count()).toBe(4096);
    expect(back.nextDirty(0)).toBe(61440);
  });

  it("fast paths: empty inputs", () => {
    const a = new HBitmap(100, 0);
    const b = new HBitmap(100, 0);
    const r = new HBitmap(100, 3);
    r.set(0, 100);
    HBitmap.merge(a, b, r);
    expect(r.isEmpty()).toBe(true);
    b.set(5, 1);
    HBitmap.merge(a, b, b);
    expect(drain(b)).toEqual([5]);
  });

  it("refuses different sizes and does not mark meta bitmaps", () => {
    expect(code(() => HBitmap.merge(new HBitmap(10, 0), new HBitmap(11, 0), new HBitmap(10, 0)))).toBe(
      "EINVAL",
    );
    const a = new HBitmap(1024, 0);
    const meta = a.createMeta(8);
    const b = new HBitmap(1024, 0);
    b.set(0, 1024);
    HBitmap.merge(a, b, a);
    expect(a.count()).toBe(1024);
    expect(meta.isEmpty()).toBe(true);
  });
});

describe("serialization", () => {
  it("uses little-endian LSB-first 64-bit words", () => {
    const hb = new HBitmap(200, 0);
    for (const b of [0, 3, 9, 63, 64, 130, 199]) hb.set(b, 1);
    expect(hb.serializationAlign()).toBe(64);
    expect(hb.serializationSize(0, 200)).toBe(32);
    const buf = new Uint8Array(32);
    hb.serializePart(buf, 0, 200);
    const want = new Uint8Array(32);
    want[0] = 0b1001;
    want[1] = 0b10;
    want[7] = 0x80;
    want[8] = 1;
    want[16] = 0b100;
    want[24] = 0x80;
    expect(buf).toEqual(want);
    expect(hb.serializationSize(64, 64)).toBe(8);
    const part = new Uint8Array(8);
    hb.serializePart(part, 64, 64);
    expect([...part]).toEqual([1, 0, 0, 0, 0, 0, 0, 0]);
  });

  it("alignment is 64 << g and chunks must respect it except at the last granule", () => {
    const hb = new HBitmap(10_000, 3);
    expect(hb.serializationAlign()).toBe(512);
    expect(hb.serializationSize(0, 0)).toBe(0);
    expect(hb.serializationSize(0, 512)).toBe(8);
    expect(hb.serializationSize(0, 1024)).toBe(16);
    expect(code(() => hb.serializationSize(256, 512))).toBe("EINVAL");
    expect(code(() => hb.serializationSize(0, 600))).toBe("EINVAL");
    expect(hb.serializationSize(9728, 272)).toBe(8); // ends at the last granule
    expect(hb.serializationSize(9216, 784)).toBe(16);
    expect(code(() => hb.serializationSize(9728, 512))).toBe("ERANGE");
    expect(code(() => hb.serializePart(new Uint8Array(7), 0, 512))).toBe("ERANGE");
    expect(new HBitmap(100, 57).serializationAlign()).toBe(2 ** 63);
    expect(new HBitmap(100, 58).isSerializable()).toBe(false);
    expect(code(() => new HBitmap(100, 58).serializationAlign())).toBe("ENOTSUP");
  });

  it("deserialization masks bits past the last granule", () => {
    const hb = new HBitmap(70, 0);
    hb.deserializePart(new Uint8Array(16).fill(0xff), 0, 70, true);
    expect(hb.count()).toBe(70);
    expect(hb.isFull()).toBe(true);
    const ones = new HBitmap(70, 0);
    ones.deserializeOnes(64, 6, true);
    expect(ones.count()).toBe(6);
    ones.deserializeOnes(0, 64, false);
    expect(ones.count()).toBe(70);
    ones.deserializeZeroes(0, 64, true);
    expect(drain(ones)).toEqual([64, 65, 66, 67, 68, 69]);
    const buf = new Uint8Array(16);
    ones.serializePart(buf, 0, 70);
    expect([...buf.subarray(8)]).toEqual([0x3f, 0, 0, 0, 0, 0, 0, 0]);
  });

  it("round-trips a large sparse bitmap chunk by chunk", () => {
    const src = new HBitmap(1 << 30, 9); // 2 Mi bits
    src.set(0, 1);
    src.set(123_456_789, 10_000);
    src.set((1 << 30) - 1, 1);
    const dst = new HBitmap(1 << 30, 9);
    const chunk = src.serializationAlign() * 4096;
    for (let s = 0; s < src.size; s += chunk) {
      const n = Math.min(chunk, src.size - s);
      const buf = new Uint8Array(src.serializationSize(s, n));
      src.serializePart(buf, s, n);
      if (buf.every((x) => x === 0)) dst.deserializeZeroes(s, n, false);
      else dst.deserializePart(buf, s, n, false);
    }
    dst.deserializeFinish();
    expect(dst.count()).toBe(src.count());
    expect(drain(dst)).toEqual(drain(src));
    expect(dst.sha256()).toBe(src.sha256());
  });
});

describe("sha256", () => {
  it("matches QEMU for an empty 64 MiB bitmap at 64 KiB", () => {
    expect(new HBitmap(64 << 20, 16).sha256()).toBe(
      "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca",
    );
  });

  it("hashes the serialized stream, including for sizes that are not whole 64-bit words", async () => {
    const { createHash } = await import("node:crypto");
    for (const n of [0, 1, 32, 33, 64, 65, 100_000]) {
      const hb = new HBitmap(n, 0);
      if (n > 0) hb.set(n - 1, 1);
      const buf = new Uint8Array(Math.max(Math.ceil(n / 64), 1) * 8);
      if (n > 0) hb.serializePart(buf, 0, n);
      expect(hb.sha256()).toBe(createHash("sha256").update(buf).digest("hex"));
    }
  });
});

describe("meta bitmaps", () => {
  it("tracks every change over the caller's range, one meta bit per chunk of bits", () => {
    const hb = new HBitmap(1000, 2);
    const meta = hb.createMeta(8); // one meta bit per 8 bits = 32 items
    expect(hb.meta).toBe(meta);
    expect(meta.granularity).toBe(5);
    expect(meta.size).toBe(hb.granules * 4);
    hb.set(40, 1);
    expect(drain(meta)).toEqual([32]);
    meta.resetAll();
    hb.set(40, 1); // no change: meta untouched
    expect(meta.isEmpty()).toBe(true);
    hb.reset(64, 64); // no change
    expect(meta.isEmpty()).toBe(true);
    hb.reset(40, 4);
    expect(drain(meta)).toEqual([32]);
    meta.resetAll();
    hb.set(0, 100);
    expect(drain(meta)).toEqual([0, 32, 64, 96]);
    meta.resetAll();
    hb.resetAll();
    expect(meta.isEmpty()).toBe(true);
    hb.deserializeOnes(0, 256, true);
    expect(meta.isEmpty()).toBe(true);
  });

  it("follows truncation and refuses double creation and double free", () => {
    const hb = new HBitmap(1001, 0);
    const meta = hb.createMeta(16);
    expect(meta.size).toBe(1001);
    expect(code(() => hb.createMeta(16))).toBe("EEXIST");
    hb.set(990, 5);
    meta.resetAll();
    hb.truncate(900);
    expect(meta.size).toBe(900);
    expect(drain(meta)).toEqual([896]);
    hb.freeMeta();
    expect(hb.meta).toBeUndefined();
    expect(code(() => hb.freeMeta())).toBe("EINVAL");
    expect(code(() => hb.createMeta(3))).toBe("EINVAL");
    expect(code(() => hb.createMeta(0))).toBe("EINVAL");
    expect(code(() => new HBitmap(10, 62).createMeta(4))).toBe("EINVAL");
  });
});

describe("extremes", () => {
  it("granularity 63: one bit covers every safe integer", () => {
    const hb = new HBitmap(Number.MAX_SAFE_INTEGER, 63);
    expect(hb.granules).toBe(1);
    hb.set(2 ** 52, 1);
    expect(hb.count()).toBe(2 ** 63);
    expect(hb.get(0)).toBe(true);
    expect(hb.nextDirty(17)).toBe(17);
    expect(hb.nextZero(0)).toBe(-1);
    expect(hb.nextDirtyArea(5, Number.POSITIVE_INFINITY)).toEqual({
      start: 5,
      count: Number.MAX_SAFE_INTEGER - 5,
    });
    expect([...hb.iter(99)]).toEqual([0]);
    expect(code(() => hb.reset(0, 5))).toBe("EINVAL");
    expect(code(() => hb.reset(1, Number.MAX_SAFE_INTEGER - 1))).toBe("EINVAL");
    hb.reset(0, Number.MAX_SAFE_INTEGER);
    expect(hb.isEmpty()).toBe(true);
    expect(code(() => hb.serializationAlign())).toBe("ENOTSUP");
    expect(hb.sha256()).toBe(new HBitmap(1, 0).sha256());
  });

  it("granularity 0: every item is a bit", () => {
    const hb = new HBitmap(7, 0);
    hb.set(1, 2);
    hb.set(6, 1);
    expect(bitsString(hb)).toBe("0110001");
    expect(hb.count()).toBe(3);
    hb.reset(2, 5);
    expect(bitsString(hb)).toBe("0100000");
  });

  it("2^41 bits with sparse use stays cheap", () => {
    const before = process.memoryUsage().arrayBuffers;
    const hb = new HBitmap(2 ** 41, 0);
    const spots = [0, 2 ** 20 + 7, 2 ** 33 + 5, 2 ** 40, 2 ** 41 - 33];
    for (const s of spots) hb.set(s, 33);
    expect(hb.count()).toBe(spots.length * 33);
    expect(hb.nextDirty(1)).toBe(1);
    expect(hb.nextDirty(34)).toBe(2 ** 20 + 7);
    expect(hb.nextDirty(2 ** 33 + 38)).toBe(2 ** 40);
    expect(hb.nextZero(2 ** 41 - 33)).toBe(-1);
    expect(hb.nextZero(2 ** 41 - 34)).toBe(2 ** 41 - 34);
    expect(hb.nextDirtyArea(2 ** 34, 2 ** 41)).toEqual({ start: 2 ** 40, count: 33 });
    const it = hb.iter(2 ** 40 + 30);
    expect([it.next(), it.next(), it.next()]).toEqual([2 ** 40 + 30, 2 ** 40 + 31, ve(32)]);
    hb.reset(2 ** 40, 64);
    expect(hb.nextDirty(2 ** 34)).toBe(2 ** 41 - 33);
    const c = hb.clone();
    expect([...c.iter(2 ** 34)].length).toBe(33);
    const bytes = new Uint8Array(hb.serializationSize(2 ** 41 - 128, 128));
    hb.serializePart(bytes, 2 ** 41 - 128, 128);
    expect([...bytes]).toEqual([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0xff, 0xff, 0xff]);
    hb.truncate(2 ** 40);
    expect(hb.count()).toBe(3 * 33);
    hb.truncate(2 ** 41);
    expect(hb.nextDirty(2 ** 34)).toBe(-1);
    expect(process.memoryUsage().arrayBuffers - before).toBeLessThan(16 << 20);
  });
});

function ve(n: number): number {
  return 2 ** 40 + n;
}
