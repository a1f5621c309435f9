/** The README example of qcow2 resize and repair, kept runnable (no QEMU needed). */
import { makeTempDir, pattern } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { createQcow2, openQcow2, type Qcow2CheckResult } from "../src/qcow2/index.ts";

const dir = makeTempDir("blk-q2rsreadme");
afterAll(() => dir.dispose());

describe("qcow2 resize README example", () => {
  it("runs", async () => {
    const name = dir.join("disk.qcow2");
    await createQcow2({ filename: name, size: 1 << 20 });
    {
      await using w = await openQcow2(name, { writable: true });
      await w.root.write(0, pattern(1, 0, 1 << 20));
    }
    // --- README example ---
    await using img = await openQcow2(name, { writable: true, resize: true });
    await img.root.truncate(8 << 20); // grow: a new, larger L1 table when needed
    await img.root.truncate(2 << 20); // shrink: clusters past the end freed, the file cut after its last cluster
    const report = await img.node.check({ repair: "all" }); // leaksFixed, corruptionsFixed, messages
    // --- end ---
    expect(img.node.length).toBe(2 << 20);
    expect(report).toMatchObject({ corruptions: 0, leaks: 0, leaksFixed: 0, corruptionsFixed: 0 });
    expect((report as Qcow2CheckResult).messages).toEqual([]);
    expect(Buffer.from(await img.root.read(0, 1 << 20)).equals(pattern(1, 0, 1 << 20))).toBe(true);
    expect(await img.root.read(1 << 20, 4096)).toEqual(new Uint8Array(4096));
  });

  it("refuses sizes that are not a multiple of 512, and a resize without the permission", async () => {
    const name = dir.join("odd.qcow2");
    await createQcow2({ filename: name, size: 1 << 20 });
    {
      await using img = await openQcow2(name, { writable: true, resize: true });
      await expect(img.root.truncate(1000)).rejects.toMatchObject({
        code: "EINVAL",
        message: "The new size must be a multiple of 512",
      });
    }
    await using ro = await openQcow2(name, { writable: true });
    await expect(ro.root.truncate(2 << 20)).rejects.toMatchObject({ code: "EPERM" });
  });
});
