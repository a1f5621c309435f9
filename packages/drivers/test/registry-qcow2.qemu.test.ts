import { makeTempDir, missingPeers, run, type TempDir } from "@blk/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { openImage } from "../src/index.ts";

// openImage on a qcow2 overlay opens its whole backing chain: unallocated clusters of the top layer read
// from the backing file, never as zeroes.
const missing = missingPeers(["qemu-img", "qemu-io"]);
describe.skipIf(missing.length > 0)("openImage on qcow2 chains", () => {
  let dir: TempDir;
  beforeAll(async () => {
    dir = makeTempDir("reg-qcow2");
    const ok = async (cmd: string, args: string[]) => expect((await run(cmd, args)).code).toBe(0);
    await ok("qemu-img", ["create", "-f", "qcow2", dir.join("base.qcow2"), "1M"]);
    await ok("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 64k", dir.join("base.qcow2")]);
    await ok("qemu-img", ["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", dir.join("top.qcow2")]);
    await ok("qemu-io", ["-f", "qcow2", "-c", "write -P 0x22 64k 64k", dir.join("top.qcow2")]);
  });
  afterAll(() => dir.dispose());

  it("probes qcow2 and reads through the backing file", async () => {
    await using img = await openImage(dir.join("top.qcow2"), { readOnly: true });
    expect(img.format).toBe("qcow2");
    expect(img.probed).toBe(true);
    const data = await img.root.read(0, 128 * 1024);
    expect(data[0]).toBe(0x11);
    expect(data[65536]).toBe(0x22);
  });
});
