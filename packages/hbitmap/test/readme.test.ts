import { expect, it } from "vitest";
import { HBitmap, isHBitmapError } from "../src/index.ts";

it("README example", () => {
  // A dirty bitmap for a 1 GiB disk at 64 KiB granularity (16384 bits).
  const hb = new HBitmap(1 << 30, 16);

  // A 2-byte guest write at 65535 dirties granules 0 and 1 (set rounds outward).
  hb.set(65535, 2);
  hb.set(10 << 20, 4096);
  expect(hb.count()).toBe(3 * 65536);

  // Walk the dirty extents, as a backup job would.
  const extents: [number, number][] = [];
  for (let pos = 0, a = hb.nextDirtyArea(0, hb.size); a; a = hb.nextDirtyArea(pos, hb.size)) {
    extents.push([a.start, a.count]);
    pos = a.start + a.count;
  }
  expect(extents).toEqual([
    [0, 131072],
    [10 << 20, 65536],
  ]);

  // Or iterate the dirty granules one by one.
  expect([...hb.iter()]).toEqual([0, 65536, 10 << 20]);

  // reset must be granule-aligned; a misaligned range is refused with a typed error.
  let code: string | undefined;
  try {
    hb.reset(1, 65536);
  } catch (e) {
    if (isHBitmapError(e)) code = e.code;
  }
  expect(code).toBe("EINVAL");
  hb.reset(0, 131072);

  // Serialize in QEMU's layout (little-endian 64-bit words) and restore elsewhere.
  const buf = new Uint8Array(hb.serializationSize(0, hb.size));
  hb.serializePart(buf, 0, hb.size);
  const copy = new HBitmap(1 << 30, 16);
  copy.deserializePart(buf, 0, copy.size, true);
  expect(copy.sha256()).toBe(hb.sha256());
  expect(copy.nextDirty(0)).toBe(10 << 20);
});
