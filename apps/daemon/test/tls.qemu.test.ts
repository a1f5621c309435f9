/**
 * TLS side by side: the same QMP script (tls-creds objects, qom-*, nbd-server-start with tls-creds,
 * object-del of credentials in use) against blkd and qemu-storage-daemon 7.2 with the same credential
 * files, then nbdinfo (libnbd/GnuTLS) against both NBD servers, with PSK and with x509, and a plaintext
 * nbdinfo refused by both alike.
 */
import { join } from "node:path";
import { QmpClient, QmpError } from "@blk/qmp";
import { makeTempDir, missingPeers, run, spawnPeer, type TempDir, waitForPath } from "@blk/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { makeTlsFixtures, type TlsFixtures } from "../../../packages/drivers/test/nbd-tls-fixtures.ts";
import { createDaemon, type Daemon } from "../src/index.ts";

const missing = missingPeers(["qemu-storage-daemon", "nbdinfo", "openssl"]);
if (missing.length > 0) console.log(`tls.qemu.test: skipped, missing ${missing.join(", ")}`);

type Step = [string, Record<string, unknown>?];

function must<T>(v: T | undefined): T {
  if (v === undefined) throw new Error("not started");
  return v;
}

async function startQsd(dir: TempDir): Promise<{ qmp: QmpClient; stop(): Promise<void> }> {
  const sock = dir.join("qsd-qmp.sock");
  const args = ["--chardev", `socket,id=m,path=${sock},server=on,wait=off`, "--monitor", "m"];
  // qemu-storage-daemon 7.2 rarely hangs at start-up: time out and retry.
  for (let attempt = 1; ; attempt++) {
    const peer = await spawnPeer("qemu-storage-daemon", args, { timeoutMs: 80_000 });
    try {
      await waitForPath(sock, 5000);
      let qmp: QmpClient | undefined;
      for (let i = 0; qmp === undefined; i++) {
        try {
          qmp = await QmpClient.connect({ path: sock }, { timeoutMs: 5000 });
        } catch (e) {
          if (i >= 50) throw e;
          await new Promise((r) => setTimeout(r, 100));
        }
      }
      const client = qmp;
      return {
        qmp: client,
        stop: async () => {
          await client.close();
          await peer.stop();
        },
      };
    } catch (e) {
      await peer.stop(0);
      if (attempt >= 3) throw new Error(`qemu-storage-daemon did not start: ${peer.output()}`, { cause: e });
    }
  }
}

async function runSteps(qmp: QmpClient, steps: Step[], nbdSock: string): Promise<unknown[]> {
  const out: unknown[] = [];
  for (const [cmd, args] of steps) {
    try {
      const r = await qmp.execute(cmd, args);
      out.push({ cmd, return: r });
    } catch (e) {
      if (!(e instanceof QmpError)) throw e;
      out.push({ cmd, error: { class: e.errorClass, desc: e.desc.replaceAll(nbdSock, "SOCK") } });
    }
  }
  return out;
}

describe.skipIf(missing.length > 0)(
  "TLS: blkd and qemu-storage-daemon side by side",
  { tags: ["qemu"], timeout: 90_000 },
  () => {
    let dir: TempDir;
    let fx: TlsFixtures;
    let qsd: { qmp: QmpClient; stop(): Promise<void> } | undefined;
    let blkd: Daemon | undefined;
    let blkQmp: QmpClient | undefined;
    const qsdNbd = (): string => join(dir.path, "qsd-nbd.sock");
    const blkNbd = (): string => join(dir.path, "blk-nbd.sock");

    beforeAll(async () => {
      dir = makeTempDir("blkd-tls");
      fx = await makeTlsFixtures(dir.path);
      qsd = await startQsd(dir);
      blkd = await createDaemon();
      const sock = dir.join("blk-qmp.sock");
      await blkd.qmp.listen({ path: sock });
      blkQmp = await QmpClient.connect({ path: sock }, { timeoutMs: 10_000 });
    });

    afterAll(async () => {
      await blkQmp?.close();
      await blkd?.close();
      await qsd?.stop();
      await dir.dispose();
    });

    const nbdStart = (sock: string, creds: string): Step => [
      "nbd-server-start",
      { addr: { type: "unix", data: { path: sock } }, "tls-creds": creds },
    ];

    function objectSteps(): Step[] {
      const nowhere = join(dir.path, "nowhere");
      return [
        ["object-add", { "qom-type": "tls-creds-psk", id: "t" }],
        ["object-add", { "qom-type": "tls-creds-psk", id: "t", dir: nowhere, endpoint: "server" }],
        ["object-add", { "qom-type": "tls-creds-x509", id: "t", dir: fx.x509Anonymous, endpoint: "server" }],
        ["object-add", { "qom-type": "tls-creds-x509", id: "t", dir: fx.psk, endpoint: "client" }],
        ["object-add", { "qom-type": "tls-creds-psk", id: "t", dir: fx.psk, bogus: 1 }],
        ["object-add", { "qom-type": "tls-creds-psk", id: "t", dir: fx.psk, endpoint: "sideways" }],
        ["object-add", { "qom-type": "tls-creds-psk", id: "t", dir: 5 }],
        ["object-add", { "qom-type": "tls-creds-x509", id: "t", dir: fx.x509Server, "verify-peer": 1 }],
        ["object-add", { "qom-type": "tls-creds-psk", id: "psk0", endpoint: "server", dir: fx.psk }],
        ["object-add", { "qom-type": "tls-creds-psk", id: "pskc", dir: fx.psk, username: "alice" }],
        [
          "object-add",
          {
            "qom-type": "tls-creds-x509",
            id: "x0",
            endpoint: "server",
            dir: fx.x509Server,
            "verify-peer": true,
          },
        ],
        ["object-add", { "qom-type": "tls-creds-psk", id: "psk0", dir: fx.psk }],
        ["object-add", { "qom-type": "tls-creds-psk", id: "t", dir: fx.psk, loaded: true }],
        ["qom-list", { path: "/objects/psk0" }],
        ["qom-list", { path: "/objects/x0" }],
        ["qom-get", { path: "/objects/x0", property: "type" }],
        ["qom-get", { path: "/objects/x0", property: "endpoint" }],
        ["qom-get", { path: "/objects/x0", property: "verify-peer" }],
        ["qom-get", { path: "/objects/x0", property: "sanity-check" }],
        ["qom-get", { path: "/objects/x0", property: "priority" }],
        ["qom-get", { path: "/objects/pskc", property: "username" }],
        ["qom-get", { path: "/objects/psk0", property: "username" }],
        ["qom-get", { path: "/objects/psk0", property: "loaded" }],
        ["qom-get", { path: "/objects/psk0", property: "nope" }],
        ["qom-set", { path: "/objects/pskc", property: "priority", value: "NORMAL" }],
        ["qom-set", { path: "/objects/pskc", property: "loaded", value: false }],
        ["qom-set", { path: "/objects/pskc", property: "verify-peer", value: "x" }],
        ["qom-set", { path: "/objects/pskc", property: "nope", value: "x" }],
        ["qom-get", { path: "/objects/pskc", property: "priority" }],
        ["blockdev-add", { driver: "null-co", "node-name": "n0", size: 4194304, "read-zeroes": true }],
      ];
    }

    it("the same QMP answers for tls-creds objects and nbd-server-start", async () => {
      const steps = (sock: string): Step[] => [
        ...objectSteps(),
        nbdStart(sock, "nope"),
        nbdStart(sock, "pskc"),
        nbdStart(sock, "psk0"),
        ["block-export-add", { type: "nbd", id: "e0", "node-name": "n0", name: "disk" }],
        ["object-del", { id: "psk0" }],
        ["object-del", { id: "psk0" }],
      ];
      const expected = await runSteps(must(qsd).qmp, steps(qsdNbd()), qsdNbd());
      const actual = await runSteps(must(blkQmp), steps(blkNbd()), blkNbd());
      expect(expected.filter((r) => "error" in (r as object)).length).toBeGreaterThan(10);
      expect(actual).toHaveLength(expected.length);
      for (let i = 0; i < expected.length; i++) expect.soft(actual[i], `step ${i}`).toEqual(expected[i]);
    });

    /** nbdinfo --json output with the socket path masked. */
    async function nbdinfo(
      uri: string,
      sock: string,
    ): Promise<{ code: number | null; out: string; err: string }> {
      const r = await run("nbdinfo", ["--json", uri], { timeoutMs: 20_000 });
      return { code: r.code, out: r.stdout.replaceAll(sock, "SOCK"), err: r.stderr.replaceAll(sock, "SOCK") };
    }

    it("nbdinfo with PSK sees the same export on both; a plaintext nbdinfo is refused alike", async () => {
      const psk = (s: string): string => `nbds+unix://qemu@/disk?socket=${s}&tls-psk-file=${fx.psk}/keys.psk`;
      const q = await nbdinfo(psk(qsdNbd()), qsdNbd());
      const b = await nbdinfo(psk(blkNbd()), blkNbd());
      expect(q.code, q.err).toBe(0);
      expect(b.err).toBe(q.err);
      expect(JSON.parse(b.out)).toEqual(JSON.parse(q.out));
      expect((JSON.parse(b.out) as { TLS: boolean }).TLS).toBe(true);
      const plain = (s: string): string => `nbd+unix:///disk?socket=${s}`;
      const qp = await nbdinfo(plain(qsdNbd()), qsdNbd());
      const bp = await nbdinfo(plain(blkNbd()), blkNbd());
      expect(qp.code).not.toBe(0);
      expect(bp).toEqual(qp);
    });

    it("nbdinfo with x509 and verify-peer sees the same export on both", async () => {
      for (const [qmp, sock] of [
        [must(qsd).qmp, qsdNbd()],
        [must(blkQmp), blkNbd()],
      ] as const) {
        await qmp.execute("nbd-server-stop");
        await qmp.execute("nbd-server-start", {
          addr: { type: "unix", data: { path: sock } },
          "tls-creds": "x0",
        });
        await qmp.execute("block-export-add", { type: "nbd", id: "e1", "node-name": "n0", name: "disk" });
      }
      const x509 = (s: string, d: string): string => `nbds+unix:///disk?socket=${s}&tls-certificates=${d}`;
      const q = await nbdinfo(x509(qsdNbd(), fx.x509Client), qsdNbd());
      const b = await nbdinfo(x509(blkNbd(), fx.x509Client), blkNbd());
      expect(q.code, q.err).toBe(0);
      expect(JSON.parse(b.out)).toEqual(JSON.parse(q.out));
      // Without a client certificate both refuse (the TLS layers word it differently: only the outcome).
      const qa = await nbdinfo(x509(qsdNbd(), fx.x509Anonymous), qsdNbd());
      const ba = await nbdinfo(x509(blkNbd(), fx.x509Anonymous), blkNbd());
      expect(qa.code).not.toBe(0);
      expect(ba.code).toBe(qa.code);
    });
  },
);
