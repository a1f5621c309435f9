// The example proposed for the README's NBD client section is this file's code between the markers; the
// lead engineer pastes it into packages/drivers/README.md (owned elsewhere). Once `src/nbd/index.ts`
// re-exports the client, the README imports `NbdClient`, `nbdDriver` and `parseNbdUri` from
// "@blk/drivers/nbd" (this test imports them from source until then).
// --- README imports start ---
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BlockGraph, memoryDriver } from "@blk/core";
import { NbdServer } from "@blk/drivers/nbd";
// --- README imports end ---
import { describe, it } from "vitest";
import { NbdClient, nbdDriver, parseNbdUri } from "../src/nbd/client/index.ts";

describe("README example (nbd client)", () => {
  it("runs", async () => {
    // --- README body start ---
    // Something to connect to: blk's own server here; qemu-nbd, nbdkit or qemu-storage-daemon work the same.
    const dir = mkdtempSync(join(tmpdir(), "blk-nbd-"));
    const socket = join(dir, "nbd.sock");
    const graph = new BlockGraph();
    const disk = await graph.open(memoryDriver, { size: 16 << 20 }, { nodeName: "disk0" });
    const server = new NbdServer();
    server.addExport({ name: "disk0", node: disk, writable: true });
    await server.listen({ type: "unix", path: socket });

    {
      // One connection; requests are pipelined (up to maxInFlight on the wire) and matched by cookie.
      await using nbd = await NbdClient.connect({
        ...parseNbdUri(`nbd+unix:///disk0?socket=${socket}`),
        maxInFlight: 64,
      });
      await nbd.write(0, new Uint8Array(65536).fill(0xab), { fua: true });
      const [head, tail] = await Promise.all([nbd.read(0, 4096), nbd.read(8 << 20, 4096)]);
      assert.equal(head[0], 0xab);
      assert.equal(tail[0], 0);
      // base:allocation: flags 0 = data, 3 = hole + zero.
      const map = await nbd.blockStatus(0, nbd.size);
      assert.deepEqual(map.get("base:allocation")?.slice(0, 2), [
        { offset: 0, length: 65536, flags: 0 },
        { offset: 65536, length: (16 << 20) - 65536, flags: 3 },
      ]);
    } // `await using` closes: waits for pending requests, sends NBD_CMD_DISC

    // The `nbd` driver: a block node over an export, with QEMU's blockdev options.
    const remote = await graph.open(
      nbdDriver,
      { server: { type: "unix", path: socket }, export: "disk0" },
      { nodeName: "remote" },
    );
    assert.equal((await remote.read(0, 1))[0], 0xab);
    await graph.delete(remote);

    await server.close();
    rmSync(dir, { recursive: true, force: true });
    // --- README body end ---
  });
});
