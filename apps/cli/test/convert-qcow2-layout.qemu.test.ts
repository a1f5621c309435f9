/**
 * `convert -O qcow2` keeps several writes in flight (each chunk's write starts once the previous one's
 * clusters are placed) and must still lay the image out as qemu-img 7.2 does: on sources made of data,
 * allocated zeroes and holes at 512-byte boundaries (seeded), the output file is byte-for-byte qemu-img's.
 */
import { closeSync, openSync, readFileSync, truncateSync, writeSync } from "node:fs";
import { pattern, rng } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { blk } from "./helpers.ts";
import { Fixtures, missing, qemu } from "./qemu.ts";

const fx = new Fixtures("blk-img-q2layout");
afterAll(() => fx.dispose());
const MiB = 1 << 20;
/** Sources per option set (BLK_CONVERT_LAYOUT_SEEDS raises it). */
const SEEDS = Number(process.env.BLK_CONVERT_LAYOUT_SEEDS ?? 4);

/** 4–10 MiB of data, zero and hole runs of assorted lengths (multiples of 512), ending anywhere. */
function source(seed: number): string {
  const r = rng(seed);
  const p = fx.path(`src-${seed}.raw`);
  const size = (4 * MiB + Math.floor(r() * 6 * MiB)) & ~511;
  const lengths = [512, 4096, 65536, 300 * 1024, MiB, 2 * MiB, 3 * MiB];
  const fd = openSync(p, "w");
  try {
    for (let pos = 0; pos < size; ) {
      const len = Math.min(size - pos, lengths[Math.floor(r() * lengths.length)] ?? 512);
      const k = r();
      if (k < 0.5) writeSync(fd, pattern(seed, pos, len), 0, len, pos);
      else if (k < 0.7) writeSync(fd, new Uint8Array(len), 0, len, pos);
      pos += len;
    }
  } finally {
    closeSync(fd);
  }
  truncateSync(p, size);
  return p;
}

describe.skipIf(missing.length > 0)("convert -O qcow2: qemu-img's layout", { timeout: 120_000 }, () => {
  it.each([[[]], [["-m", "16"]], [["-o", "cluster_size=4096"]], [["-S", "0", "-o", "cluster_size=2M"]]])(
    "%j: the output file is qemu-img's, byte for byte",
    async (flags) => {
      for (let seed = 1; seed <= SEEDS; seed++) {
        const src = source(seed);
        const qo = fx.path("q.qcow2");
        const bo = fx.path("b.qcow2");
        expect((await qemu(["convert", "-f", "raw", "-O", "qcow2", ...flags, src, qo])).code).toBe(0);
        expect((await blk(["convert", "-f", "raw", "-O", "qcow2", ...flags, src, bo])).code).toBe(0);
        const same = Buffer.compare(readFileSync(bo), readFileSync(qo)) === 0;
        expect({ seed, same }).toEqual({ seed, same: true });
      }
    },
  );

  it("several sources concatenated: the output file is qemu-img's", async () => {
    const srcs = [source(11), source(12), source(13)];
    const qo = fx.path("qc.qcow2");
    const bo = fx.path("bc.qcow2");
    expect((await qemu(["convert", "-f", "raw", "-O", "qcow2", ...srcs, qo])).code).toBe(0);
    expect((await blk(["convert", "-f", "raw", "-O", "qcow2", ...srcs, bo])).code).toBe(0);
    expect(Buffer.compare(readFileSync(bo), readFileSync(qo))).toBe(0);
  });
});
