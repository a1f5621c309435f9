/** The README example of qcow2 create and write, kept runnable (no QEMU needed). */
import { makeTempDir, pattern } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { createQcow2, openQcow2 } from "../src/qcow2/index.ts";

const dir = makeTempDir("blk-q2wreadme");
afterAll(() => dir.dispose());

describe("qcow2 write README example", () => {
  it("runs", async () => {
    const base = dir.join("base.qcow2");
    const top = dir.join("top.qcow2");
    await createQcow2({ filename: base, size: 1 << 20 });
    {
      await using b = await openQcow2(base, { writable: true });
      await b.root.write(0, new Uint8Array(65536).fill(0xbb));
    }
    const data = pattern(1, 0, 512);
    // --- README example ---
    await createQcow2({ filename: top, size: 1 << 20, backingFile: "base.qcow2", backingFormat: "qcow2" });
    await using img = await openQcow2(top, { writable: true, discard: "unmap" });
    await img.root.write(4096, data); // allocates a cluster; the rest of it is copied from base.qcow2
    await img.node.writeZeroes(65536, 65536); // a zero cluster (v3 zero flag), no data written
    await img.node.discard(4096, 65536); // whole clusters only: the partial one is kept
    await img.root.flush();
    // --- end ---
    const back = await img.root.read(0, 8192);
    expect(back[0]).toBe(0xbb);
    expect(back.subarray(4096, 4608)).toEqual(data);
    expect(back[8191]).toBe(0xbb);
    const report = await img.node.check();
    expect(report).toMatchObject({ corruptions: 0, leaks: 0 });
  });

  it("refuses writes to a read-only open with EROFS", async () => {
    const f = dir.join("ro.qcow2");
    await createQcow2({ filename: f, size: 1 << 20 });
    await using img = await openQcow2(f);
    await expect(img.node.state.write(0, new Uint8Array(512))).rejects.toMatchObject({ code: "EROFS" });
  });
});
