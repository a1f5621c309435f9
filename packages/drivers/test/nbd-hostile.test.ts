/**
 * Hostile clients: garbage, truncation, wrong magics, floods, oversized lengths, abrupt disconnects,
 * clients that never read. The server answers with protocol errors or drops the offender, keeps serving
 * the others, and keeps its buffers bounded. Counts: BLK_FLOOD_CONNECTIONS (default 300),
 * BLK_FUZZ_RUNS (default 60).
 */
import { connect, type Socket } from "node:net";
import { join } from "node:path";
import { BlockGraph, type BlockNode, memoryDriver } from "@blk/core";
import { makeTempDir, type TempDir } from "@blk/testkit";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  decodeErrorChunk,
  encodeClientFlags,
  encodeInfoRequestData,
  encodeOption,
  encodeRequest,
  NBD_CMD,
  NBD_OPT,
  NBD_REP,
  NbdServer,
} from "../src/nbd/index.ts";
import { rawConnect, rawGo } from "./fixtures/nbd/client.ts";

const MiB = 1 << 20;
const FLOOD = Number(process.env.BLK_FLOOD_CONNECTIONS ?? 300);
const FUZZ = Number(process.env.BLK_FUZZ_RUNS ?? 60);

let dir: TempDir;
let graph: BlockGraph;
let node: BlockNode;
let server: NbdServer;
let sock: string;
const logs: string[] = [];

beforeAll(async () => {
  dir = makeTempDir("blk-nbd-hostile-");
  graph = new BlockGraph();
  node = await graph.open(
    memoryDriver,
    { size: 16 * MiB, data: new Uint8Array(MiB).fill(0x42) },
    { nodeName: "disk" },
  );
  server = new NbdServer({
    maxInFlight: 4,
    maxOptions: 64,
    handshakeTimeoutMs: 1000,
    log: (m) => logs.push(m),
  });
  server.addExport({ name: "disk", node, writable: true });
  sock = join(dir.path, "h.sock");
  await server.listen({ type: "unix", path: sock });
});

afterAll(async () => {
  await server.close();
  await dir.dispose();
});

const settle = async (): Promise<void> => {
  for (let i = 0; i < 300 && server.connections().length > 0; i++)
    await new Promise((r) => setTimeout(r, 10));
};

/** A well-behaved client still gets correct data. */
async function healthy(): Promise<void> {
  const c = await rawGo(sock, "disk");
  c.send(encodeRequest({ flags: 0, type: NBD_CMD.READ, cookie: 99n, offset: 0, length: 4096 }));
  const m = await c.next();
  expect(m.kind === "chunk" && m.cookie).toBe(99n);
  if (m.kind === "chunk") expect(m.payload.subarray(8).every((b) => b === 0x42)).toBe(true);
  c.close();
}

async function rawSocket(): Promise<Socket> {
  const s = connect(sock);
  s.on("error", () => {});
  await new Promise<void>((r) => s.once("connect", () => r()));
  return s;
}

const closedWithin = (s: Socket, ms = 3000): Promise<boolean> =>
  new Promise((resolve) => {
    if (s.destroyed) return resolve(true);
    const t = setTimeout(() => resolve(false), ms);
    s.once("close", () => {
      clearTimeout(t);
      resolve(true);
    });
  });

describe("hostile handshakes", () => {
  it("drops garbage, wrong option magic and unknown client flags; keeps serving others", async () => {
    for (const bytes of [
      Buffer.from("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
      Buffer.concat([encodeClientFlags(3), Buffer.alloc(16, 0x41)]),
      encodeClientFlags(0x80000003),
    ]) {
      const s = await rawSocket();
      s.on("data", () => {});
      s.write(bytes);
      expect(await closedWithin(s)).toBe(true);
    }
    await healthy();
  });

  it("cleans up truncated handshakes and silent clients (handshake time-out)", async () => {
    const a = await rawSocket();
    a.write(Buffer.from([0, 0]));
    a.destroy();
    const b = await rawSocket();
    b.on("data", () => {});
    b.write(
      Buffer.concat([
        encodeClientFlags(3),
        encodeOption(NBD_OPT.GO, encodeInfoRequestData("disk")).subarray(0, 9),
      ]),
    );
    expect(await closedWithin(b, 5000)).toBe(true);
    await settle();
    expect(server.connections()).toEqual([]);
  });

  it("answers unsupported and malformed options with errors and keeps negotiating", async () => {
    const c = await rawConnect(sock);
    await c.next();
    c.send(encodeClientFlags(3));
    c.send(encodeOption(1234));
    expect(await c.next()).toMatchObject({ type: NBD_REP.ERR_UNSUP });
    c.send(encodeOption(NBD_OPT.GO, new Uint8Array([0, 0, 0, 200, 1, 2])));
    expect(await c.next()).toMatchObject({ type: NBD_REP.ERR_INVALID });
    c.send(encodeOption(NBD_OPT.SET_META_CONTEXT, new Uint8Array([0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])));
    expect(await c.next()).toMatchObject({ type: NBD_REP.ERR_INVALID });
    c.send(encodeOption(NBD_OPT.STRUCTURED_REPLY));
    expect(await c.next()).toMatchObject({ type: NBD_REP.ACK });
    c.send(encodeOption(NBD_OPT.STRUCTURED_REPLY));
    expect(await c.next()).toMatchObject({ type: NBD_REP.ERR_INVALID });
    c.send(encodeOption(NBD_OPT.ABORT));
    expect(await c.next()).toMatchObject({ type: NBD_REP.ACK });
    await c.closed;
  });

  it("skips an over-long option without allocating it and answers ERR_TOO_BIG", async () => {
    const c = await rawConnect(sock);
    await c.next();
    c.send(encodeClientFlags(3));
    const header = encodeOption(NBD_OPT.LIST).slice(0, 16);
    header.set([0x00, 0x10, 0x00, 0x00], 12); // 1 MiB of option data claimed
    c.send(header);
    c.send(new Uint8Array(512 * 1024));
    await new Promise((r) => setTimeout(r, 50));
    const info = server.connections().find((x) => x.phase === "handshake");
    expect(info?.readBuffered ?? 0).toBeLessThan(64 * 1024);
    c.send(new Uint8Array(512 * 1024));
    expect(await c.next()).toMatchObject({ type: NBD_REP.ERR_TOO_BIG });
    c.close();
  });

  it("drops an option flood beyond maxOptions, with bounded buffers even when the client never reads", async () => {
    const c = await rawConnect(sock);
    await c.next();
    c.socket.pause();
    c.send(encodeClientFlags(3));
    const one = encodeOption(NBD_OPT.LIST);
    c.send(Buffer.concat(Array.from({ length: 5000 }, () => one)));
    c.socket.resume();
    await c.closed;
    expect(c.received()).toBeLessThan(65 * 100);
    await healthy();
  });

  it(`survives ${FLOOD} connections opened and dropped at every stage`, async () => {
    const hello = Buffer.concat([encodeClientFlags(3), encodeOption(NBD_OPT.STRUCTURED_REPLY)]);
    const go = encodeOption(NBD_OPT.GO, encodeInfoRequestData("disk"));
    const batch = 50;
    for (let i = 0; i < FLOOD; i += batch) {
      await Promise.all(
        Array.from({ length: Math.min(batch, FLOOD - i) }, async (_, j) => {
          const s = connect(sock);
          s.on("error", () => {});
          s.on("data", () => {});
          await new Promise<void>((r) => {
            s.once("connect", () => r());
            s.once("error", () => r());
          });
          const k = (i + j) % 4;
          if (k >= 1) s.write(hello.subarray(0, k === 1 ? 3 : hello.length));
          if (k >= 3) {
            s.write(go);
            s.write(encodeRequest({ flags: 0, type: NBD_CMD.READ, cookie: 1n, offset: 0, length: 65536 }));
          }
          s.destroy();
        }),
      );
    }
    await settle();
    expect(server.connections()).toEqual([]);
    await healthy();
  });

  it("refuses connections beyond maxConnections", async () => {
    const s2 = new NbdServer({ maxConnections: 2 });
    const p = join(dir.path, "max.sock");
    await s2.listen({ type: "unix", path: p });
    try {
      const a = await rawConnect(p);
      const b = await rawConnect(p);
      await a.next();
      await b.next();
      const c = await rawConnect(p);
      await c.closed;
      expect(c.received()).toBe(0);
      a.close();
      b.close();
    } finally {
      await s2.close();
    }
  });
});

describe("hostile transmission", () => {
  it("drops a wrong request magic and an oversized WRITE before reading its payload", async () => {
    let c = await rawGo(sock, "disk");
    const bad = encodeRequest({ flags: 0, type: NBD_CMD.READ, cookie: 1n, offset: 0, length: 512 });
    bad[0] = 0x99;
    c.send(bad);
    await c.closed;
    c = await rawGo(sock, "disk");
    c.send(encodeRequest({ flags: 0, type: NBD_CMD.WRITE, cookie: 2n, offset: 0, length: 0xffffffff }));
    await c.closed;
    expect(logs.some((l) => /exceeds the limit/.test(l))).toBe(true);
    await healthy();
  });

  it("answers out-of-range offsets, unknown commands and flags with EINVAL and keeps the connection", async () => {
    const c = await rawGo(sock, "disk");
    const cases = [
      { flags: 0, type: NBD_CMD.READ, offset: 16 * MiB, length: 1 },
      { flags: 0, type: NBD_CMD.READ, offset: 16 * MiB - 1, length: 2 },
      { flags: 0, type: 200, offset: 0, length: 0 },
      { flags: 0x4000, type: NBD_CMD.WRITE_ZEROES, offset: 0, length: 512 },
      { flags: 0, type: NBD_CMD.CACHE, offset: 0, length: 32 * MiB },
    ];
    for (const [i, r] of cases.entries()) {
      c.send(encodeRequest({ ...r, cookie: BigInt(i + 1) }));
      const m = await c.next();
      expect(m.kind === "chunk" && decodeErrorChunk(m.type, m.payload).error, JSON.stringify(r)).toBe(22);
    }
    c.send(encodeRequest({ flags: 0, type: NBD_CMD.READ, cookie: 50n, offset: 0, length: 512 }));
    expect(await c.next()).toMatchObject({ kind: "chunk", cookie: 50n });
    c.close();
  });

  it("an abrupt disconnect in the middle of a WRITE payload changes nothing", async () => {
    const before = Buffer.from(await node.read(2 * MiB, 65536));
    const c = await rawGo(sock, "disk");
    c.send(encodeRequest({ flags: 0, type: NBD_CMD.WRITE, cookie: 1n, offset: 2 * MiB, length: 65536 }));
    c.send(new Uint8Array(30000).fill(0xee));
    await new Promise((r) => setTimeout(r, 20));
    c.close();
    await settle();
    expect(Buffer.from(await node.read(2 * MiB, 65536)).equals(before)).toBe(true);
    await healthy();
  });

  it("a client that never reads its replies is throttled: bounded server buffers, others still served", async () => {
    const c = await rawGo(sock, "disk");
    c.socket.pause();
    const reqs = Array.from({ length: 200 }, (_, i) =>
      encodeRequest({ flags: 0, type: NBD_CMD.READ, cookie: BigInt(i), offset: (i % 15) * MiB, length: MiB }),
    );
    c.send(Buffer.concat(reqs));
    await new Promise((r) => setTimeout(r, 300));
    const info = server.connections().find((x) => x.phase === "transmission");
    expect(info).toBeDefined();
    // At most maxInFlight replies beyond the point where the socket asked us to wait.
    expect(info?.writeBuffered ?? 0).toBeLessThanOrEqual(5 * (MiB + 4096));
    expect(info?.requests ?? 0).toBeLessThan(200);
    await healthy();
    c.close();
    await settle();
  });

  it("random bytes after the handshake never crash the server", async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ minLength: 1, maxLength: 200 }), fc.boolean(), async (junk, valid) => {
        const c = await rawGo(sock, "disk");
        if (valid) c.send(encodeRequest({ flags: 0, type: NBD_CMD.FLUSH, cookie: 1n, offset: 0, length: 0 }));
        c.send(junk);
        await new Promise((r) => setTimeout(r, 5));
        c.close();
      }),
      { numRuns: FUZZ },
    );
    await settle();
    await healthy();
    await settle();
    expect(server.connections()).toEqual([]);
  });

  it("DISC waits for in-flight requests, then closes without a reply", async () => {
    const c = await rawGo(sock, "disk");
    c.send(encodeRequest({ flags: 0, type: NBD_CMD.READ, cookie: 1n, offset: 0, length: 65536 }));
    c.send(encodeRequest({ flags: 0, type: NBD_CMD.DISC, cookie: 2n, offset: 0, length: 0 }));
    expect(await c.next()).toMatchObject({ kind: "chunk", cookie: 1n });
    await c.closed;
  });

  it("server.close() drops every client", async () => {
    const s2 = new NbdServer();
    const p = join(dir.path, "close.sock");
    const n2 = await graph.open(memoryDriver, { size: MiB }, { nodeName: "n2" });
    s2.addExport({ name: "", node: n2 });
    await s2.listen({ type: "unix", path: p });
    const a = await rawGo(p, "");
    const b = await rawConnect(p);
    await s2.close();
    await a.closed;
    await b.closed;
    expect(n2.parents.length).toBe(0);
    await graph.delete(n2);
  });
});
