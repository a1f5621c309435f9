// Rewriting the backing file name and format in a qcow2 header (stream and commit re-point chains this way).
import { makeTempDir, missingPeers, run } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { createQcow2, openQcow2 } from "../src/qcow2/index.ts";

const missing = missingPeers(["qemu-img"]);
describe.skipIf(missing.length > 0)("qcow2 changeBackingFile", () => {
  it("replaces, then removes the backing file; qemu-img reads the header and checks it clean", async () => {
    await using dir = makeTempDir("qcow2-backing");
    await createQcow2({ filename: dir.join("base.qcow2"), size: 1 << 20 });
    await createQcow2({ filename: dir.join("other.raw.qcow2"), size: 1 << 20 });
    const top = dir.join("top.qcow2");
    await createQcow2({ filename: top, size: 1 << 20, backingFile: "base.qcow2", backingFormat: "qcow2" });
    const info = async () =>
      JSON.parse((await run("qemu-img", ["info", "--output=json", "-U", top])).stdout) as Record<
        string,
        unknown
      >;
    expect(await info()).toMatchObject({
      "backing-filename": "base.qcow2",
      "backing-filename-format": "qcow2",
    });

    {
      await using img = await openQcow2(top, { writable: true, noBacking: true });
      await img.state.changeBackingFile("./././././other.raw.qcow2", "raw");
    }
    expect(await info()).toMatchObject({
      "backing-filename": "./././././other.raw.qcow2",
      "backing-filename-format": "raw",
    });
    expect((await run("qemu-img", ["check", top])).code).toBe(0);

    {
      await using img = await openQcow2(top, { writable: true, noBacking: true });
      await img.state.changeBackingFile("base.qcow2", undefined);
    }
    const shorter = await info();
    expect(shorter["backing-filename"]).toBe("base.qcow2");
    expect(shorter).not.toHaveProperty("backing-filename-format");

    {
      await using img = await openQcow2(top, { writable: true, noBacking: true });
      await img.state.changeBackingFile(undefined, undefined);
    }
    expect(await info()).not.toHaveProperty("backing-filename");
    expect((await run("qemu-img", ["check", top])).code).toBe(0);
  });
});
