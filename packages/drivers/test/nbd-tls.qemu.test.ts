/**
 * TLS interop with GnuTLS peers, both ways, PSK and x509 (certificates made by openssl at test time):
 * - blk's NbdServer ↔ nbdinfo/nbdcopy (libnbd) and qemu-img/qemu-io (`--object tls-creds-*`,
 *   `--image-opts driver=nbd,…,tls-creds=`), and a plaintext nbdinfo refused exactly as qemu-nbd
 *   refuses it;
 * - blk's NbdClient and `nbd` driver ↔ qemu-nbd `--tls-creds`.
 * Unix sockets in a temp dir; every peer has a time-out and is stopped in afterAll at the latest.
 */
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { BlockGraph, type BlockNode, isBlkError, memoryDriver } from "@blk/core";
import {
  makeTempDir,
  missingPeers,
  type Peer,
  pattern,
  run,
  sha256,
  spawnPeer,
  type TempDir,
} from "@blk/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { makeNbdDriver, NbdClient, NbdServer, type NbdState, TlsCreds } from "../src/nbd/index.ts";
import { makeTlsFixtures, type TlsFixtures } from "./nbd-tls-fixtures.ts";

const MiB = 1 << 20;
const SIZE = 8 * MiB;
const missing = missingPeers(["openssl", "nbdinfo", "nbdcopy", "qemu-img", "qemu-io", "qemu-nbd"]);
if (missing.length > 0) console.warn(`skipping NBD TLS interop tests: missing ${missing.join(", ")}`);

describe.skipIf(missing.length > 0)("NBD TLS interop", { timeout: 90_000 }, () => {
  let dir: TempDir;
  let fx: TlsFixtures;
  let graph: BlockGraph;
  let node: BlockNode;
  let image: string;
  let seq = 0;
  const peers: Peer[] = [];
  const servers: NbdServer[] = [];
  const content = new Uint8Array(SIZE);

  beforeAll(async () => {
    dir = makeTempDir("blk-nbdtlsq-");
    fx = await makeTlsFixtures(dir.path);
    content.set(pattern(3, 0, 2 * MiB), 0);
    content.set(pattern(4, 5 * MiB, MiB), 5 * MiB);
    graph = new BlockGraph();
    node = await graph.open(memoryDriver, { size: SIZE, data: content.slice() }, { nodeName: "disk" });
    image = join(dir.path, "image.raw");
    await writeFile(image, content);
  });

  afterAll(async () => {
    for (const p of peers) await p.stop();
    for (const s of servers) await s.close();
    await dir.dispose();
  });

  async function blkServer(creds: TlsCreds): Promise<string> {
    const server = new NbdServer({ tls: { creds } });
    servers.push(server);
    server.addExport({ name: "disk", node, writable: true });
    const sock = join(dir.path, `blk${++seq}.sock`);
    await server.listen({ type: "unix", path: sock });
    return sock;
  }

  async function qemuNbd(object: string, extra: string[] = []): Promise<string> {
    const sock = join(dir.path, `qn${++seq}.sock`);
    const p = await spawnPeer(
      "qemu-nbd",
      [
        "--object",
        object,
        "--tls-creds",
        "tls0",
        "-f",
        "raw",
        "-t",
        "-k",
        sock,
        "-x",
        "disk",
        ...extra,
        image,
      ],
      { timeoutMs: 80_000, ready: async () => (await run("test", ["-S", sock])).code === 0 },
    );
    peers.push(p);
    return sock;
  }

  const pskUri = (sock: string): string =>
    `nbds+unix://qemu@/disk?socket=${sock}&tls-psk-file=${fx.psk}/keys.psk`;
  const x509Uri = (sock: string): string =>
    `nbds+unix:///disk?socket=${sock}&tls-certificates=${fx.x509Client}`;

  describe("nbdinfo, nbdcopy, qemu-img, qemu-io → blk server", () => {
    it("PSK: nbdinfo sees TLS, nbdcopy copies the content", async () => {
      const sock = await blkServer(TlsCreds.load({ type: "psk", endpoint: "server", dir: fx.psk }));
      const info = await run("nbdinfo", ["--json", pskUri(sock)], { timeoutMs: 20_000 });
      expect(info.stderr).toBe("");
      const j = JSON.parse(info.stdout) as {
        protocol: string;
        TLS: boolean;
        exports: { "export-size": number }[];
      };
      expect(j.TLS).toBe(true);
      expect(j.exports[0]?.["export-size"]).toBe(SIZE);
      const out = join(dir.path, "copy-psk.raw");
      const cp = await run("nbdcopy", [pskUri(sock), out], { timeoutMs: 30_000 });
      expect(cp.stderr).toBe("");
      expect(sha256(await readFile(out))).toBe(sha256(await node.read(0, SIZE)));
    });

    it("PSK: qemu-io writes and qemu-img reads back over TLS", async () => {
      const sock = await blkServer(TlsCreds.load({ type: "psk", endpoint: "server", dir: fx.psk }));
      const object = `tls-creds-psk,id=tls0,endpoint=client,dir=${fx.psk}`;
      const opts = `driver=nbd,server.type=unix,server.path=${sock},export=disk,tls-creds=tls0`;
      const w = await run(
        "qemu-io",
        [
          "--object",
          object,
          "--image-opts",
          opts,
          "-c",
          "write -P 0x5a 3M 512k",
          "-c",
          "read -P 0x5a 3M 512k",
        ],
        { timeoutMs: 20_000 },
      );
      expect(w.stderr).toBe("");
      expect(w.stdout).toContain("read 524288/524288 bytes");
      expect(w.stdout).not.toContain("Pattern verification failed");
      const got = await node.read(3 * MiB, 512 * 1024);
      expect(got.every((b) => b === 0x5a)).toBe(true);
      const info = await run("qemu-img", ["info", "--object", object, "--image-opts", opts], {
        timeoutMs: 20_000,
      });
      expect(info.stderr).toBe("");
      expect(info.stdout).toContain(`virtual size: 8 MiB (${SIZE} bytes)`);
    });

    it("x509 with verify-peer: nbdinfo and qemu-img with client certificates; no certificate, no entry", async () => {
      const sock = await blkServer(TlsCreds.load({ type: "x509", endpoint: "server", dir: fx.x509Server }));
      const info = await run("nbdinfo", ["--size", x509Uri(sock)], { timeoutMs: 20_000 });
      expect(info.stderr).toBe("");
      expect(info.stdout.trim()).toBe(String(SIZE));
      const object = `tls-creds-x509,id=tls0,endpoint=client,dir=${fx.x509Client}`;
      const opts = `driver=nbd,server.type=unix,server.path=${sock},export=disk,tls-creds=tls0,tls-hostname=localhost`;
      const img = await run("qemu-img", ["info", "--object", object, "--image-opts", opts], {
        timeoutMs: 20_000,
      });
      expect(img.stderr).toBe("");
      expect(img.stdout).toContain(`virtual size: 8 MiB (${SIZE} bytes)`);
      const anon = await run(
        "qemu-img",
        [
          "info",
          "--object",
          `tls-creds-x509,id=tls0,endpoint=client,dir=${fx.x509Anonymous}`,
          "--image-opts",
          opts,
        ],
        { timeoutMs: 20_000 },
      );
      expect(anon.code).not.toBe(0);
      expect(anon.stderr).toContain("Could not open");
    });

    it("a plaintext nbdinfo is refused as qemu-nbd refuses it", async () => {
      const blk = await blkServer(TlsCreds.load({ type: "psk", endpoint: "server", dir: fx.psk }));
      const qemu = await qemuNbd(`tls-creds-psk,id=tls0,endpoint=server,dir=${fx.psk}`);
      for (const args of [["--size"], ["--list"]]) {
        const a = await run("nbdinfo", [...args, `nbd+unix:///disk?socket=${blk}`], { timeoutMs: 20_000 });
        const b = await run("nbdinfo", [...args, `nbd+unix:///disk?socket=${qemu}`], { timeoutMs: 20_000 });
        expect(a.code).not.toBe(0);
        expect(a.code).toBe(b.code);
        expect(a.stderr.replaceAll(blk, "SOCK")).toBe(b.stderr.replaceAll(qemu, "SOCK"));
      }
      // qemu-img without credentials: QEMU's own client reports the server's refusal.
      const img = await run("qemu-img", ["info", `nbd+unix:///disk?socket=${blk}`], { timeoutMs: 20_000 });
      expect(img.stderr).toContain("TLS negotiation required before option");
      expect(img.stderr).toContain("not permitted before TLS");
    });
  });

  describe("blk client → qemu-nbd", () => {
    it("PSK: reads, writes and block status over TLS", async () => {
      const sock = await qemuNbd(`tls-creds-psk,id=tls0,endpoint=server,dir=${fx.psk}`);
      const creds = TlsCreds.load({ type: "psk", endpoint: "client", dir: fx.psk });
      await using c = await NbdClient.connect({
        server: { type: "unix", path: sock },
        export: "disk",
        tls: { creds },
      });
      expect(c.tls).toBe(true);
      expect(c.size).toBe(SIZE);
      expect(sha256(await c.read(0, 2 * MiB))).toBe(sha256(content.subarray(0, 2 * MiB)));
      const data = pattern(11, 0, MiB);
      await c.write(6 * MiB, data, { fua: true });
      expect(sha256(await c.read(6 * MiB, MiB))).toBe(sha256(data));
      const status = await c.blockStatus(0, SIZE);
      expect(status.get("base:allocation")?.length).toBeGreaterThan(0);
      const onDisk = await readFile(image);
      expect(sha256(onDisk.subarray(6 * MiB, 7 * MiB))).toBe(sha256(data));
    });

    it("PSK: a plaintext client gets QEMU's refusal; a wrong key fails the handshake", async () => {
      const sock = await qemuNbd(`tls-creds-psk,id=tls0,endpoint=server,dir=${fx.psk}`);
      const server = { type: "unix", path: sock } as const;
      const plain = await NbdClient.connect({ server, export: "disk" }).catch((e: unknown) => e);
      expect(isBlkError(plain) && plain.code).toBe("EPERM");
      expect((plain as Error).message).toContain("server reported: Option 0x8 not permitted before TLS");
      const wrong = TlsCreds.load({ type: "psk", endpoint: "client", dir: fx.pskWrong });
      const e = await NbdClient.connect({ server, export: "disk", tls: { creds: wrong } }).catch(
        (x: unknown) => x,
      );
      expect((e as Error).message).toMatch(/^TLS handshake failed: /);
    });

    it("x509 with verify-peer: the nbd driver over tls-creds; an unknown client certificate is refused", async () => {
      const sock = await qemuNbd(
        `tls-creds-x509,id=tls0,endpoint=server,dir=${fx.x509Server},verify-peer=on`,
      );
      const creds = TlsCreds.load({ type: "x509", endpoint: "client", dir: fx.x509Client });
      const stranger = TlsCreds.load({ type: "x509", endpoint: "client", dir: fx.x509Stranger });
      const drv = makeNbdDriver({
        tlsCreds: new Map([
          ["tls0", creds],
          ["bad", stranger],
        ]),
      });
      const g = new BlockGraph();
      const server = { type: "unix", path: sock } as const;
      const n = await g.open(
        drv,
        { server, export: "disk", "tls-creds": "tls0", "tls-hostname": "localhost" },
        { nodeName: "remote" },
      );
      expect((n.state as NbdState).client.tls).toBe(true);
      expect(sha256(await n.read(5 * MiB, MiB))).toBe(sha256(content.subarray(5 * MiB, 6 * MiB)));
      await n.close();
      const refused = await g
        .open(
          drv,
          { server, export: "disk", "tls-creds": "bad", "tls-hostname": "localhost" },
          { nodeName: "r2" },
        )
        .catch((e: unknown) => e);
      expect(isBlkError(refused)).toBe(true);
    });
  });
});
