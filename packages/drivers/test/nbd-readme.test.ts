// The example proposed for the README's `nbd` section is this file's code between the markers; the lead
// engineer pastes it into packages/drivers/README.md (owned elsewhere).
// --- README imports start ---
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BlockGraph, memoryDriver } from "@blk/core";
import { NbdServer } from "@blk/drivers/nbd";
// --- README imports end ---
import { missingPeers, run } from "@blk/testkit";
import { describe, it } from "vitest";

describe("README example (nbd)", () => {
  it.skipIf(missingPeers(["nbdinfo"]).length > 0)("runs", async () => {
    // --- README body start ---
    // Export a 64 MiB in-memory node, writable, on a unix socket.
    const dir = mkdtempSync(join(tmpdir(), "blk-nbd-"));
    const socket = join(dir, "nbd.sock");
    const graph = new BlockGraph();
    const disk = await graph.open(memoryDriver, { size: 64 << 20 }, { nodeName: "disk0" });
    const server = new NbdServer({ maxConnections: 16 });
    server.addExport({ name: "disk0", node: disk, writable: true, description: "scratch disk" });
    await server.listen({ type: "unix", path: socket });

    // Any NBD client can use it now: nbdinfo, nbdcopy, qemu-img, qemu-io, the kernel's nbd-client…
    const info = await run("nbdinfo", ["--json", `nbd+unix:///disk0?socket=${socket}`]);
    const [exp] = JSON.parse(info.stdout).exports;
    assert.equal(exp["export-size"], 64 << 20);
    assert.equal(exp.description, "scratch disk");

    await server.close(); // drops clients, releases the node
    rmSync(dir, { recursive: true, force: true });
    // --- README body end ---
  });
});
