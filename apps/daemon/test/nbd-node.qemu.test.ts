// blockdev-add driver=nbd: blkd reaches an export of qemu-nbd (plain and with a tls-creds-psk object) and
// reads what qemu-io wrote; an unknown tls-creds id is refused with QEMU's message.
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { missingPeers, run, spawnPeer } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { startSession } from "./helpers.ts";

const missing = missingPeers(["qemu-img", "qemu-io", "qemu-nbd"]);
const MiB = 1 << 20;

describe.skipIf(missing.length > 0)("nbd nodes", () => {
  it("opens a qemu-nbd export (plain and PSK) and reads what qemu-io wrote", async () => {
    await using s = await startSession({ log: () => {} });
    const img = s.dir.join("remote.qcow2");
    expect((await run("qemu-img", ["create", "-q", "-f", "qcow2", img, "4M"])).code).toBe(0);
    expect((await run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x6b 1M 64k", img])).code).toBe(0);
    const pskDir = s.dir.join("psk");
    mkdirSync(pskDir);
    writeFileSync(`${pskDir}/keys.psk`, "qemu:0123456789abcdef0123456789abcdef\n", { mode: 0o600 });

    for (const tls of [false, true]) {
      const sock = s.dir.join(`nbd-${tls}.sock`);
      const args = ["-f", "qcow2", "-k", sock, "-x", "disk", "-t", img];
      if (tls)
        args.unshift(
          "--object",
          `tls-creds-psk,id=tls0,endpoint=server,dir=${pskDir}`,
          "--tls-creds",
          "tls0",
        );
      await using server = await spawnPeer("qemu-nbd", args, { ready: () => existsSync(sock) });
      const node = `remote${tls ? "-tls" : ""}`;
      if (tls) {
        await s.qmp.execute("object-add", {
          "qom-type": "tls-creds-psk",
          id: "ctls",
          endpoint: "client",
          dir: pskDir,
        });
      }
      await s.qmp.execute("blockdev-add", {
        driver: "nbd",
        "node-name": node,
        server: { type: "unix", path: sock },
        export: "disk",
        ...(tls ? { "tls-creds": "ctls" } : {}),
      });
      const n = s.daemon.graph.find(node);
      if (n === undefined) throw new Error("no node");
      const got = await n.read(MiB, 64 * 1024);
      expect(got.every((b) => b === 0x6b)).toBe(true);
      expect(n.length).toBe(4 * MiB);
      // As qemu-storage-daemon lists an nbd node: its URI as the filename, and no dirty-flag or
      // actual-size (the nbd driver answers neither get_info nor the allocated size).
      const listed = (await s.qmp.execute("query-named-block-nodes", { flat: true })) as {
        "node-name": string;
        file: string;
        image: Record<string, unknown>;
      }[];
      const entry = listed.find((e) => e["node-name"] === node);
      const uri = `nbd+unix:///disk?socket=${sock}`;
      expect(entry?.file).toBe(uri);
      expect(entry?.image).toEqual({ "virtual-size": 4 * MiB, filename: uri, format: "nbd" });
      await s.qmp.execute("blockdev-del", { "node-name": node });
      if (tls) await s.qmp.execute("object-del", { id: "ctls" });
      await server.stop();
    }
  });

  it("refuses a tls-creds id that names no object, as QEMU", async () => {
    await using s = await startSession({ log: () => {} });
    const e = await s.error("blockdev-add", {
      driver: "nbd",
      "node-name": "x",
      server: { type: "unix", path: s.dir.join("none.sock") },
      export: "disk",
      "tls-creds": "nosuch",
    });
    expect(e).toEqual({ class: "GenericError", desc: "No TLS credentials with id 'nosuch'" });
  });
});
