/**
 * NBD over TLS between blk's own server and client (Node's TLS on both ends), and the server's
 * FORCEDTLS rules seen on raw bytes: credentials loading with QEMU's messages, PSK and x509 (with and
 * without peer verification), refusals (plaintext client, wrong key, unknown CA, wrong host name).
 * Needs `openssl` to make the certificates.
 */
import { once } from "node:events";
import { connect as netConnect, type Socket } from "node:net";
import { join } from "node:path";
import { type BlkError, BlockGraph, type BlockNode, isBlkError, memoryDriver } from "@blk/core";
import { makeTempDir, missingPeers, pattern, sha256, type TempDir } from "@blk/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  encodeClientFlags,
  encodeOption,
  makeNbdDriver,
  NBD_FLAG_C,
  NBD_OPT,
  NBD_REP,
  NbdClient,
  type NbdClientOptions,
  NbdServer,
  type NbdState,
  TlsCreds,
} from "../src/nbd/index.ts";
import { makeTlsFixtures, type TlsFixtures } from "./nbd-tls-fixtures.ts";

const MiB = 1 << 20;
const missing = missingPeers(["openssl"]);

async function errorOf(p: Promise<unknown>): Promise<BlkError> {
  try {
    await p;
  } catch (e) {
    expect(isBlkError(e), String(e)).toBe(true);
    return e as BlkError;
  }
  throw new Error("expected a failure");
}

/** Reads exactly `n` bytes (or fewer when the peer closes first). */
async function readBytes(s: Socket, n: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  let have = 0;
  while (have < n) {
    const chunk = s.read(Math.min(n - have, s.readableLength)) as Buffer | null;
    if (chunk !== null && chunk.length > 0) {
      parts.push(chunk);
      have += chunk.length;
      continue;
    }
    if (s.readableEnded || s.destroyed) break;
    await new Promise<void>((resolve) => {
      const done = (): void => {
        s.off("readable", done);
        s.off("end", done);
        s.off("close", done);
        resolve();
      };
      s.on("readable", done);
      s.on("end", done);
      s.on("close", done);
    });
  }
  return Buffer.concat(parts);
}

describe.skipIf(missing.length > 0)("NBD over TLS (blk ↔ blk)", { timeout: 60_000 }, () => {
  let dir: TempDir;
  let fx: TlsFixtures;
  let graph: BlockGraph;
  let node: BlockNode;
  let seq = 0;
  const content = new Uint8Array(4 * MiB);
  const servers: NbdServer[] = [];
  const logs: string[] = [];

  beforeAll(async () => {
    dir = makeTempDir("blk-nbdtls-");
    fx = await makeTlsFixtures(dir.path);
    content.set(pattern(7, 0, MiB), 0);
    graph = new BlockGraph();
    node = await graph.open(memoryDriver, { size: 4 * MiB, data: content }, { nodeName: "disk" });
  });

  afterAll(async () => {
    for (const s of servers) await s.close();
    await dir.dispose();
  });

  async function serve(tls: ConstructorParameters<typeof NbdServer>[0]): Promise<string> {
    const server = new NbdServer({ ...tls, log: (m) => logs.push(m) });
    servers.push(server);
    server.addExport({ name: "disk", node, writable: true });
    const sock = join(dir.path, `s${++seq}.sock`);
    await server.listen({ type: "unix", path: sock });
    return sock;
  }

  const client = (sock: string, extra: Partial<NbdClientOptions> = {}): Promise<NbdClient> =>
    NbdClient.connect({ server: { type: "unix", path: sock }, export: "disk", ...extra });

  it("loads credentials with QEMU's messages", () => {
    expect(() => TlsCreds.load({ type: "psk", endpoint: "server", dir: "" })).toThrow(
      "Missing 'dir' property value",
    );
    const nowhere = join(dir.path, "nowhere");
    expect(() => TlsCreds.load({ type: "psk", endpoint: "server", dir: nowhere })).toThrow(
      `Unable to access credentials ${nowhere}/keys.psk: No such file or directory`,
    );
    expect(() => TlsCreds.load({ type: "x509", endpoint: "server", dir: fx.x509Anonymous })).toThrow(
      `Unable to access credentials ${fx.x509Anonymous}/server-cert.pem: No such file or directory`,
    );
    expect(() => TlsCreds.load({ type: "x509", endpoint: "client", dir: fx.psk })).toThrow(
      `Unable to access credentials ${fx.psk}/ca-cert.pem: No such file or directory`,
    );
    // A client without a certificate is fine (client-cert.pem is optional).
    expect(TlsCreds.load({ type: "x509", endpoint: "client", dir: fx.x509Anonymous }).verifyPeer).toBe(true);
    const bob = TlsCreds.load({ type: "psk", endpoint: "client", dir: fx.psk, username: "bob" });
    expect(() => bob.clientOptions(undefined)).toThrow(
      `Username bob not found in PSK file ${fx.psk}/keys.psk`,
    );
    const server = TlsCreds.load({ type: "psk", endpoint: "server", dir: fx.psk });
    expect(() => server.clientOptions(undefined)).toThrow("Expected TLS credentials for a client endpoint");
    expect(() => new NbdServer({ tls: { creds: bob } })).toThrow(
      "Expected TLS credentials for a server endpoint",
    );
  });

  it("PSK: reads and writes over TLS; the server refuses a plaintext client", async () => {
    const serverCreds = TlsCreds.load({ type: "psk", endpoint: "server", dir: fx.psk });
    const sock = await serve({ tls: { creds: serverCreds } });
    expect(serverCreds.users).toBe(1);
    const creds = TlsCreds.load({ type: "psk", endpoint: "client", dir: fx.psk });
    await using c = await client(sock, { tls: { creds } });
    expect(c.tls).toBe(true);
    expect(c.structuredReplies).toBe(true);
    expect(c.contexts.has("base:allocation")).toBe(true);
    expect(sha256(await c.read(0, MiB))).toBe(sha256(content.subarray(0, MiB)));
    const data = pattern(9, 0, 256 * 1024);
    await c.write(MiB, data, { fua: true });
    expect(sha256(await c.read(MiB, data.length))).toBe(sha256(data));
    const status = await c.blockStatus(0, 4 * MiB);
    expect(status.get("base:allocation")?.length).toBeGreaterThan(0);

    const plain = await errorOf(client(sock));
    expect(plain.code).toBe("EPERM");
    expect(plain.message).toContain("TLS negotiation required before option 8");
    expect(plain.message).toContain("server reported: Option 0x8 not permitted before TLS");
    // Another user of the same file works too (the server accepts any identity it lists).
    const alice = TlsCreds.load({ type: "psk", endpoint: "client", dir: fx.psk, username: "alice" });
    await using c2 = await client(sock, { tls: { creds: alice } });
    expect(c2.tls).toBe(true);
  });

  it("PSK: a wrong key fails the handshake; TLS towards a plaintext server is denied", async () => {
    const sock = await serve({
      tls: { creds: TlsCreds.load({ type: "psk", endpoint: "server", dir: fx.psk }) },
    });
    const wrong = TlsCreds.load({ type: "psk", endpoint: "client", dir: fx.pskWrong });
    const e = await errorOf(client(sock, { tls: { creds: wrong } }));
    expect(e.message).toMatch(/^TLS handshake failed: /);
    const plainSock = await serve({});
    const creds = TlsCreds.load({ type: "psk", endpoint: "client", dir: fx.psk });
    const denied = await errorOf(client(plainSock, { tls: { creds } }));
    expect(denied.code).toBe("EPERM");
    expect(denied.message).toContain("TLS not configured");
  });

  it("FORCEDTLS on the wire: options before STARTTLS get ERR_TLS_REQD, EXPORT_NAME is dropped", async () => {
    const sock = await serve({
      tls: { creds: TlsCreds.load({ type: "psk", endpoint: "server", dir: fx.psk }) },
    });
    const s = netConnect(sock);
    s.on("error", () => {});
    await once(s, "connect");
    expect((await readBytes(s, 18)).length).toBe(18);
    s.write(encodeClientFlags(NBD_FLAG_C.FIXED_NEWSTYLE | NBD_FLAG_C.NO_ZEROES));
    for (const opt of [NBD_OPT.LIST, NBD_OPT.STRUCTURED_REPLY, NBD_OPT.INFO, 99]) {
      s.write(encodeOption(opt, opt === NBD_OPT.INFO ? new Uint8Array(6) : undefined));
      const head = await readBytes(s, 20);
      expect(head.readUInt32BE(8)).toBe(opt);
      expect(head.readUInt32BE(12)).toBe(NBD_REP.ERR_TLS_REQD);
      const msg = await readBytes(s, head.readUInt32BE(16));
      expect(msg.toString()).toBe(`Option 0x${opt.toString(16)} not permitted before TLS`);
    }
    s.write(encodeOption(NBD_OPT.EXPORT_NAME, new TextEncoder().encode("disk")));
    const rest = await readBytes(s, 1);
    expect(rest.length).toBe(0);
    s.destroy();
    // STARTTLS with data: ERR_INVALID, then the server hangs up (as qemu-nbd does).
    const t = netConnect(sock);
    t.on("error", () => {});
    await once(t, "connect");
    await readBytes(t, 18);
    t.write(encodeClientFlags(NBD_FLAG_C.FIXED_NEWSTYLE | NBD_FLAG_C.NO_ZEROES));
    t.write(encodeOption(NBD_OPT.STARTTLS, new Uint8Array(1)));
    const head = await readBytes(t, 20);
    expect(head.readUInt32BE(12)).toBe(NBD_REP.ERR_INVALID);
    expect((await readBytes(t, head.readUInt32BE(16))).toString()).toBe(
      "option 'starttls' has unexpected length",
    );
    expect((await readBytes(t, 1)).length).toBe(0);
    t.destroy();
  });

  it("garbage or silence instead of a TLS handshake drops that client only", async () => {
    const server = new NbdServer({
      tls: { creds: TlsCreds.load({ type: "psk", endpoint: "server", dir: fx.psk }) },
      handshakeTimeoutMs: 500,
      log: (m) => logs.push(m),
    });
    servers.push(server);
    server.addExport({ name: "disk", node });
    const sock = join(dir.path, `s${++seq}.sock`);
    await server.listen({ type: "unix", path: sock });
    const starttls = async (): Promise<Socket> => {
      const s = netConnect(sock);
      s.on("error", () => {});
      await once(s, "connect");
      await readBytes(s, 18);
      s.write(encodeClientFlags(NBD_FLAG_C.FIXED_NEWSTYLE | NBD_FLAG_C.NO_ZEROES));
      s.write(encodeOption(NBD_OPT.STARTTLS));
      const head = await readBytes(s, 20);
      expect(head.readUInt32BE(12)).toBe(NBD_REP.ACK);
      return s;
    };
    const garbage = await starttls();
    garbage.write(Buffer.alloc(64, 0x41));
    expect((await readBytes(garbage, 4096)).length).toBeLessThan(4096);
    const silent = await starttls();
    // The handshake time-out covers the TLS handshake: the server hangs up.
    expect((await readBytes(silent, 1)).length).toBe(0);
    garbage.destroy();
    silent.destroy();
    for (let i = 0; i < 200 && server.connections().length > 0; i++)
      await new Promise((r) => setTimeout(r, 10));
    expect(server.connections()).toEqual([]);
    const creds = TlsCreds.load({ type: "psk", endpoint: "client", dir: fx.psk });
    await using c = await client(sock, { tls: { creds } });
    expect(c.tls).toBe(true);
  });

  it("optional TLS: plaintext and TLS clients are both served", async () => {
    const sock = await serve({
      tls: { creds: TlsCreds.load({ type: "psk", endpoint: "server", dir: fx.psk }), required: false },
    });
    await using plain = await client(sock);
    expect(plain.tls).toBe(false);
    const creds = TlsCreds.load({ type: "psk", endpoint: "client", dir: fx.psk });
    await using secure = await client(sock, { tls: { creds } });
    expect(secure.tls).toBe(true);
    expect(sha256(await secure.read(0, 4096))).toBe(sha256(await plain.read(0, 4096)));
  });

  it("x509 with verify-peer: certificate and host name checked both ways", async () => {
    const serverCreds = TlsCreds.load({ type: "x509", endpoint: "server", dir: fx.x509Server });
    const sock = await serve({ tls: { creds: serverCreds } });
    const creds = TlsCreds.load({ type: "x509", endpoint: "client", dir: fx.x509Client });
    {
      await using c = await client(sock, { tls: { creds, hostname: "localhost" } });
      expect(c.tls).toBe(true);
      expect(sha256(await c.read(0, MiB))).toBe(sha256(content.subarray(0, MiB)));
    }
    expect((await errorOf(client(sock, { tls: { creds } }))).message).toBe(
      "No hostname for certificate validation",
    );
    expect((await errorOf(client(sock, { tls: { creds, hostname: "wronghost" } }))).message).toBe(
      "Certificate does not match the hostname wronghost",
    );
    // The server wants a client certificate from its CA.
    for (const d of [fx.x509Anonymous, fx.x509Stranger]) {
      const other = TlsCreds.load({ type: "x509", endpoint: "client", dir: d });
      const e = await errorOf(client(sock, { tls: { creds: other, hostname: "localhost" } }));
      expect(e.code).toBe("EIO");
    }
    // Over TCP the host name defaults to the address (the certificate names 127.0.0.1).
    const tcp = new NbdServer({ tls: { creds: serverCreds } });
    servers.push(tcp);
    tcp.addExport({ name: "disk", node });
    const addr = await tcp.listen({ type: "inet", host: "127.0.0.1", port: 0 });
    if (addr.type !== "inet") throw new Error("inet expected");
    await using c = await NbdClient.connect({
      server: { type: "inet", host: "127.0.0.1", port: addr.port },
      export: "disk",
      tls: { creds },
    });
    expect(c.tls).toBe(true);
  });

  it("x509 without verify-peer: an anonymous client gets in", async () => {
    const serverCreds = TlsCreds.load({
      type: "x509",
      endpoint: "server",
      dir: fx.x509Server,
      verifyPeer: false,
    });
    const sock = await serve({ tls: { creds: serverCreds } });
    const anon = TlsCreds.load({
      type: "x509",
      endpoint: "client",
      dir: fx.x509Anonymous,
      verifyPeer: false,
    });
    await using c = await client(sock, { tls: { creds: anon } });
    expect(c.tls).toBe(true);
  });

  it("the nbd driver resolves tls-creds and holds the credentials while open", async () => {
    const sock = await serve({
      tls: { creds: TlsCreds.load({ type: "psk", endpoint: "server", dir: fx.psk }) },
    });
    const creds = TlsCreds.load({ type: "psk", endpoint: "client", dir: fx.psk });
    const serverSide = TlsCreds.load({ type: "psk", endpoint: "server", dir: fx.psk });
    const drv = makeNbdDriver({
      tlsCreds: new Map([
        ["tls0", creds],
        ["srv", serverSide],
      ]),
    });
    const ctx = { readOnly: false, autoReadOnly: false, nodeName: "n", children: new Map() };
    const server = { type: "unix", path: sock } as const;
    expect((await errorOf(drv.open({ server, export: "disk", "tls-creds": "nope" }, ctx))).message).toBe(
      "No TLS credentials with id 'nope'",
    );
    expect((await errorOf(drv.open({ server, export: "disk", "tls-creds": "srv" }, ctx))).message).toBe(
      "Expected TLS credentials for a client endpoint",
    );
    const g = new BlockGraph();
    const n = await g.open(drv, { server, export: "disk", "tls-creds": "tls0" }, { nodeName: "remote" });
    expect(creds.users).toBe(1);
    expect((n.state as NbdState).client.tls).toBe(true);
    expect(sha256(await n.read(0, 65536))).toBe(sha256(content.subarray(0, 65536)));
    await n.close();
    expect(creds.users).toBe(0);
  });
});
