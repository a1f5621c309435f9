// The README's "NBD over TLS" example is this file's code between the markers.
// --- README imports start ---
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BlockGraph, memoryDriver } from "@blk/core";
import { NbdClient, NbdServer, nbdDriver, TlsCreds, tlsCredentials } from "@blk/drivers/nbd";
// --- README imports end ---
import { describe, it } from "vitest";

describe("README example (nbd over TLS)", () => {
  it("runs", async () => {
    // --- README body start ---
    // QEMU's layout: DIR/keys.psk holds `username:hexkey` lines (x509: ca-cert.pem, server-cert.pem, …).
    const dir = mkdtempSync(join(tmpdir(), "blk-nbd-tls-"));
    mkdirSync(join(dir, "psk"));
    writeFileSync(join(dir, "psk", "keys.psk"), `qemu:${randomBytes(32).toString("hex")}\n`);
    const serverCreds = TlsCreds.load({ type: "psk", endpoint: "server", dir: join(dir, "psk") });
    const clientCreds = TlsCreds.load({ type: "psk", endpoint: "client", dir: join(dir, "psk") });

    const graph = new BlockGraph();
    const disk = await graph.open(memoryDriver, { size: 16 << 20 }, { nodeName: "disk0" });
    const server = new NbdServer({ tls: { creds: serverCreds } }); // TLS required: only STARTTLS/ABORT before it
    server.addExport({ name: "disk0", node: disk, writable: true });
    const socket = join(dir, "nbd.sock");
    await server.listen({ type: "unix", path: socket });
    // nbdinfo 'nbds+unix://qemu@/disk0?socket=SOCKET&tls-psk-file=DIR/psk/keys.psk'

    {
      await using nbd = await NbdClient.connect({
        server: { type: "unix", path: socket },
        export: "disk0",
        tls: { creds: clientCreds }, // x509 over a unix socket also needs `hostname`
      });
      assert.equal(nbd.tls, true);
    }
    // The nbd driver names credentials by id (QEMU's `tls-creds`), looked up in `tlsCredentials`.
    tlsCredentials.set("tls0", clientCreds);
    const remote = await graph.open(
      nbdDriver,
      { server: { type: "unix", path: socket }, export: "disk0", "tls-creds": "tls0", "reconnect-delay": 10 },
      { nodeName: "remote" },
    );
    await remote.write(0, new Uint8Array(4096).fill(7));
    assert.equal((await disk.read(0, 1))[0], 7);
    await remote.close();
    tlsCredentials.delete("tls0");
    await server.close();
    rmSync(dir, { recursive: true, force: true });
    // --- README body end ---
  });
});
