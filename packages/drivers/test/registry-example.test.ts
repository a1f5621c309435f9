// The example of the DRIVERS.md section (to be merged into README.md and test/readme.test.ts): the code
// between the markers is the example, verbatim.
// --- DRIVERS example imports start ---
import assert from "node:assert/strict";
import type { BlkdebugState } from "@blk/drivers/blkdebug";
import { fileDriver } from "@blk/drivers/file";
import { makeTempDir } from "@blk/testkit";
import { afterAll, describe, it } from "vitest";
// --- DRIVERS example imports end ---
// In the README this is `import { openImage } from "@blk/drivers";` (src/index.ts re-exports src/drivers.ts once merged).
import { openImage } from "../src/drivers.ts";

const dir = makeTempDir("blk-example");
afterAll(() => dir.dispose());

describe("DRIVERS.md example", () => {
  it("runs", async () => {
    const path = dir.join("disk.raw");
    // --- DRIVERS example body start ---
    // Create a 1 MiB raw image as qemu-img does, then open it: a `file` node, a `raw` node on top, and a
    // user edge holding consistent-read + write (and the matching OFD image locks QEMU respects).
    await fileDriver.create({ filename: path, size: 1 << 20 });
    await using img = await openImage(path, { format: "raw" });
    await img.root.write(65536, new Uint8Array(4096).fill(0xab));
    assert.equal((await img.root.read(65536, 4096))[0], 0xab);

    // Sparse map from SEEK_DATA/SEEK_HOLE, as `qemu-img map -f raw` reports it.
    const map = await img.node.blockStatus(0, img.node.length);
    assert.deepEqual(
      map.map((e) => [e.offset, e.length, e.data]),
      [
        [0, 4096, true], // allocated at creation, as QEMU does
        [4096, 61440, false],
        [65536, 4096, true],
        [69632, 978944, false],
      ],
    );

    // Fault injection: the same image under a blkdebug filter (blockdev options, as `--blockdev` takes them)
    // fails the second write with ENOSPC, and nothing else.
    await img.close();
    await using dbg = await openImage({
      driver: "blkdebug",
      image: { driver: "raw", file: { driver: "file", filename: path } },
    });
    (dbg.node.state as BlkdebugState).inject({ on: "write", nth: 2, errno: "ENOSPC" });
    await dbg.root.write(0, new Uint8Array(512));
    await assert.rejects(dbg.root.write(512, new Uint8Array(512)), { code: "ENOSPC" });
    await dbg.root.write(1024, new Uint8Array(512));
    // --- DRIVERS example body end ---
  });
});
