/**
 * NbdServer on bytes: the golden client conversations of qemu-nbd replayed against blk's server serving
 * the same content must get the same bytes back (except the documented EPERM deviation), plus
 * behaviour tests with the raw test client.
 */
import { join } from "node:path";
import { BlockGraph, type BlockNode, type MemoryDriver, memoryDriver } from "@blk/core";
import { makeTempDir, type TempDir } from "@blk/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  decodeBlockStatus,
  decodeErrorChunk,
  decodeOffsetData,
  decodeRepInfo,
  encodeClientFlags,
  encodeInfoRequestData,
  encodeMetaContextRequestData,
  encodeOption,
  encodeRequest,
  NBD_CMD,
  NBD_CMD_FLAG,
  NBD_INFO,
  NBD_OPT,
  NBD_REP,
  NBD_REPLY_TYPE,
  NbdServer,
} from "../src/nbd/index.ts";
import { rawConnect, rawGo } from "./fixtures/nbd/client.ts";
import { type GoldenSession, QEMU_NBD_EXPORT_NAME, QEMU_NBD_GO } from "./fixtures/nbd/golden.ts";

const MiB = 1 << 20;
const unhex = (h: string): Uint8Array => new Uint8Array(Buffer.from(h, "hex"));
const hex = (b: Uint8Array): string => Buffer.from(b).toString("hex");

let dir: TempDir;
let graph: BlockGraph;
let server: NbdServer;
let sock: string;
let exp1: BlockNode;
let rw: BlockNode;
let golden: NbdServer;
let goldenSock: string;

beforeAll(async () => {
  dir = makeTempDir("blk-nbd-srv-");
  graph = new BlockGraph();
  // What regenerate.ts built for qemu-nbd: 8 MiB, 0x5a in [0, 1 MiB), bitmap b0 recording that write.
  exp1 = await graph.open(
    memoryDriver,
    { size: 8 * MiB, data: new Uint8Array(MiB).fill(0x5a) },
    { nodeName: "exp1", readOnly: true },
  );
  const b0 = exp1.createBitmapSync({ name: "b0", granularity: 65536, disabled: true });
  b0.setDirty(0, MiB);
  rw = await graph.open(memoryDriver, { size: 8 * MiB }, { nodeName: "rw", discard: "unmap" });
  golden = new NbdServer();
  golden.addExport({
    name: "exp1",
    node: exp1,
    description: "test export",
    allocationDepth: true,
    bitmaps: ["b0"],
    // The transcripts are qemu-nbd's (default --shared=1: no MULTI_CONN).
    multiConn: false,
  });
  goldenSock = join(dir.path, "golden.sock");
  await golden.listen({ type: "unix", path: goldenSock });
  server = new NbdServer({ maxInFlight: 4 });
  server.addExport({ name: "exp1", node: exp1, description: "test export", multiConn: false });
  server.addExport({ name: "rw", node: rw, writable: true, multiConn: false });
  sock = join(dir.path, "s.sock");
  await server.listen({ type: "unix", path: sock });
});

afterAll(async () => {
  await server.close();
  await golden.close();
  await dir.dispose();
});

/** Steps whose answer differs from qemu-nbd 7.2 on purpose. */
const DEVIATIONS: Record<string, string> = {
  "WRITE 0+512 (read-only export)": "blk answers EPERM (1) as the NBD spec asks; qemu sends EINVAL (22)",
};

async function replay(session: GoldenSession): Promise<void> {
  const c = await rawConnect(goldenSock);
  let got = Buffer.alloc(0);
  c.socket.on("data", (d: Buffer) => {
    got = Buffer.concat([got, d]);
  });
  try {
    for (const step of session.steps) {
      got = Buffer.alloc(0);
      c.send(unhex(step.client));
      const want = unhex(step.server);
      const deadline = Date.now() + 3000;
      while (got.length < want.length && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
      if (step.note === "DISC") {
        await c.closed;
        expect(got.length).toBe(0);
        continue;
      }
      if (step.note in DEVIATIONS) {
        expect(got.length, step.note).toBe(want.length);
        continue;
      }
      if (step.note === "two pipelined READs") {
        // Replies may come in any order: compare as a set of chunks (qemu answered the second first).
        const chunks = (b: Uint8Array): string[] => {
          const out: string[] = [];
          for (let off = 0; off < b.length; ) {
            const len = 20 + Buffer.from(b).readUInt32BE(off + 16);
            out.push(hex(b.subarray(off, off + len)));
            off += len;
          }
          return out.sort();
        };
        expect(chunks(got)).toEqual(chunks(want));
        continue;
      }
      expect(hex(got), step.note).toBe(step.server);
    }
  } finally {
    c.close();
  }
}

describe("byte-for-byte against qemu-nbd's golden conversations", () => {
  it("GO session (structured replies, contexts, reads, block status, errors)", async () => {
    await replay(QEMU_NBD_GO);
  });
  it("EXPORT_NAME session (no zeroes negotiated, simple replies)", async () => {
    await replay(QEMU_NBD_EXPORT_NAME);
  });
});

describe("NbdServer behaviour", () => {
  it("answers a write to a read-only export with EPERM, past-EOF writes with ENOSPC", async () => {
    const c = await rawGo(sock, "exp1");
    c.send(encodeRequest({ flags: 0, type: NBD_CMD.WRITE, cookie: 1n, offset: 0, length: 4 }));
    c.send(new Uint8Array(4));
    let m = await c.next();
    expect(m.kind === "chunk" && decodeErrorChunk(m.type, m.payload)).toMatchObject({ error: 1 });
    c.close();
    const w = await rawGo(sock, "rw");
    w.send(encodeRequest({ flags: 0, type: NBD_CMD.WRITE, cookie: 2n, offset: 8 * MiB - 2, length: 4 }));
    w.send(new Uint8Array(4));
    m = await w.next();
    expect(m.kind === "chunk" && decodeErrorChunk(m.type, m.payload)).toMatchObject({ error: 28 });
    w.send(encodeRequest({ flags: 0, type: NBD_CMD.WRITE_ZEROES, cookie: 3n, offset: 8 * MiB, length: 512 }));
    m = await w.next();
    expect(m.kind === "chunk" && decodeErrorChunk(m.type, m.payload)).toMatchObject({ error: 28 });
    w.send(encodeRequest({ flags: 0, type: NBD_CMD.TRIM, cookie: 4n, offset: 8 * MiB, length: 512 }));
    m = await w.next();
    expect(m.kind === "chunk" && decodeErrorChunk(m.type, m.payload)).toMatchObject({ error: 22 });
    w.close();
  });

  it("writes (FUA), zeroes (NO_HOLE / may unmap), trims and flushes reach the node", async () => {
    const c = await rawGo(sock, "rw", { contexts: ["base:allocation"] });
    const data = new Uint8Array(131072).fill(9);
    c.send(
      encodeRequest({
        flags: NBD_CMD_FLAG.FUA,
        type: NBD_CMD.WRITE,
        cookie: 1n,
        offset: 0,
        length: data.length,
      }),
    );
    c.send(data);
    expect(await c.next()).toMatchObject({ kind: "simple-reply", error: 0, cookie: 1n });
    expect((await rw.read(0, 131072)).every((b) => b === 9)).toBe(true);
    const st = rw.state as MemoryDriver;
    const flushes = st.counters.flushes;
    c.send(
      encodeRequest({
        flags: NBD_CMD_FLAG.NO_HOLE,
        type: NBD_CMD.WRITE_ZEROES,
        cookie: 2n,
        offset: 0,
        length: 65536,
      }),
    );
    expect(await c.next()).toMatchObject({ kind: "simple-reply", error: 0 });
    expect(st.clusterState(0)).toBe("zero");
    c.send(encodeRequest({ flags: 0, type: NBD_CMD.WRITE_ZEROES, cookie: 3n, offset: 65536, length: 65536 }));
    expect(await c.next()).toMatchObject({ kind: "simple-reply", error: 0 });
    expect(st.clusterState(65536)).toBe("unallocated");
    c.send(encodeRequest({ flags: 0, type: NBD_CMD.FLUSH, cookie: 4n, offset: 0, length: 0 }));
    expect(await c.next()).toMatchObject({ kind: "simple-reply", error: 0 });
    expect(st.counters.flushes).toBeGreaterThan(flushes);
    await rw.write(MiB, new Uint8Array(65536).fill(1));
    c.send(encodeRequest({ flags: 0, type: NBD_CMD.TRIM, cookie: 5n, offset: MiB, length: 65536 }));
    expect(await c.next()).toMatchObject({ kind: "simple-reply", error: 0 });
    expect(st.clusterState(MiB)).toBe("unallocated");
    c.send(
      encodeRequest({
        flags: NBD_CMD_FLAG.REQ_ONE,
        type: NBD_CMD.BLOCK_STATUS,
        cookie: 6n,
        offset: 0,
        length: 2 * MiB,
      }),
    );
    const m = await c.next();
    // Zeroed and trimmed clusters read as zeroes: hole,zero (3) as qemu reports qcow2 zero clusters.
    expect(m.kind === "chunk" && decodeBlockStatus(m.payload)).toEqual({
      contextId: 0,
      extents: [{ length: 2 * MiB, flags: 3 }],
    });
    c.close();
  });

  it("refuses bad flags, unknown commands, DF without structured replies, block status without contexts", async () => {
    const c = await rawGo(sock, "rw");
    const err = async (): Promise<number> => {
      const m = await c.next();
      if (m.kind !== "chunk") throw new Error("expected a chunk");
      expect(m.flags & 1).toBe(1);
      return decodeErrorChunk(m.type, m.payload).error;
    };
    c.send(
      encodeRequest({ flags: NBD_CMD_FLAG.NO_HOLE, type: NBD_CMD.READ, cookie: 1n, offset: 0, length: 512 }),
    );
    expect(await err()).toBe(22);
    c.send(encodeRequest({ flags: 0x8000, type: NBD_CMD.FLUSH, cookie: 2n, offset: 0, length: 0 }));
    expect(await err()).toBe(22);
    c.send(encodeRequest({ flags: 0, type: 0x7777, cookie: 3n, offset: 0, length: 0 }));
    expect(await err()).toBe(22);
    c.send(encodeRequest({ flags: 0, type: NBD_CMD.BLOCK_STATUS, cookie: 4n, offset: 0, length: 512 }));
    expect(await err()).toBe(22);
    const far = encodeRequest({ flags: 0, type: NBD_CMD.READ, cookie: 5n, offset: 0, length: 512 });
    far.set([0x10, 0, 0, 0, 0, 0, 0, 0], 16); // offset 2^60: not below 2^53
    c.send(far);
    expect(await err()).toBe(22);
    c.send(encodeRequest({ flags: 0, type: NBD_CMD.READ, cookie: 6n, offset: 0, length: 32 * MiB + 512 }));
    expect(await err()).toBe(22);
    c.close();
    const s = await rawGo(sock, "rw", { structured: false });
    s.send(encodeRequest({ flags: NBD_CMD_FLAG.DF, type: NBD_CMD.READ, cookie: 7n, offset: 0, length: 512 }));
    expect(await s.next()).toMatchObject({ kind: "simple-reply", error: 22, cookie: 7n, data: undefined });
    s.close();
  });

  it("GO reports NAME, DESCRIPTION, BLOCK_SIZE, EXPORT; unknown exports get ERR_UNKNOWN; SET before SR is invalid", async () => {
    const c = await rawConnect(sock);
    await c.next();
    c.send(encodeClientFlags(3));
    c.send(encodeOption(NBD_OPT.SET_META_CONTEXT, encodeMetaContextRequestData("exp1", ["base:allocation"])));
    expect(await c.next()).toMatchObject({ type: NBD_REP.ERR_INVALID });
    c.send(encodeOption(NBD_OPT.GO, encodeInfoRequestData("nope", [])));
    expect(await c.next()).toMatchObject({ type: NBD_REP.ERR_UNKNOWN });
    c.send(encodeOption(NBD_OPT.GO, encodeInfoRequestData("exp1", [NBD_INFO.NAME, NBD_INFO.BLOCK_SIZE])));
    const infos = [];
    for (;;) {
      const m = await c.next();
      if (m.kind !== "option-reply") throw new Error("unexpected");
      if (m.type === NBD_REP.ACK) break;
      infos.push(decodeRepInfo(m.data));
    }
    expect(infos).toEqual([
      { type: 1, name: "exp1" },
      { type: 2, description: "test export" },
      { type: 3, minimum: 1, preferred: 4096, maximum: 33554432 },
      { type: 0, size: 8 * MiB, transmissionFlags: 0x040f },
    ]);
    c.close();
  });

  it("answers pipelined requests out of order, with at most maxInFlight executing", async () => {
    const st = rw.state as MemoryDriver;
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    st.hook = async (req) => {
      if (req.kind === "read" && req.offset === 0) await gate;
    };
    try {
      const c = await rawGo(sock, "rw");
      const before = st.counters.maxInFlight;
      st.counters.maxInFlight = 0;
      c.send(
        encodeRequest({ flags: NBD_CMD_FLAG.DF, type: NBD_CMD.READ, cookie: 1n, offset: 0, length: 512 }),
      );
      for (let i = 2; i <= 10; i++) {
        c.send(
          encodeRequest({
            flags: NBD_CMD_FLAG.DF,
            type: NBD_CMD.READ,
            cookie: BigInt(i),
            offset: i * 4096,
            length: 512,
          }),
        );
      }
      const first = await c.next();
      expect(first.kind === "chunk" && first.cookie).not.toBe(1n);
      await new Promise((r) => setTimeout(r, 50));
      expect(server.connections().find((x) => x.export === "rw")?.inFlight).toBeLessThanOrEqual(4);
      release();
      const seen = new Set<bigint>([first.kind === "chunk" ? first.cookie : 0n]);
      while (seen.size < 10) {
        const m = await c.next();
        if (m.kind === "chunk") {
          seen.add(m.cookie);
          expect(decodeOffsetData(m.payload).data.length).toBe(512);
          expect(m.type).toBe(NBD_REPLY_TYPE.OFFSET_DATA);
        }
      }
      expect(st.counters.maxInFlight).toBeLessThanOrEqual(4);
      st.counters.maxInFlight = Math.max(before, st.counters.maxInFlight);
      c.close();
    } finally {
      st.hook = undefined;
      release();
    }
  });

  it("removeExport: safe mode refuses while a client uses it, hard mode drops the client", async () => {
    const node = await graph.open(memoryDriver, { size: MiB }, { nodeName: "tmp" });
    server.addExport({ name: "tmp", node, writable: true });
    expect(() => server.addExport({ name: "tmp", node })).toThrow(/already has export/);
    const c = await rawGo(sock, "tmp");
    await expect(server.removeExport("tmp")).rejects.toMatchObject({ code: "EBUSY" });
    await server.removeExport("tmp", { mode: "hard" });
    await c.closed;
    expect(node.parents.length).toBe(0);
    await expect(server.removeExport("tmp")).rejects.toMatchObject({ code: "ENOENT" });
    await graph.delete(node);
  });

  it("refuses a writable export of a read-only node and an unknown bitmap", () => {
    expect(() => server.addExport({ name: "x", node: exp1, writable: true })).toThrow();
    expect(() => server.addExport({ name: "y", node: rw, bitmaps: ["nope"] })).toThrow(/not found/);
    expect(server.exports.map((e) => e.name)).toEqual(["exp1", "rw"]);
  });

  it("serves an old (non-fixed) newstyle client through EXPORT_NAME, drops it on any other option", async () => {
    const c = await rawConnect(sock);
    await c.next();
    c.send(encodeClientFlags(0));
    c.send(encodeOption(NBD_OPT.EXPORT_NAME, new TextEncoder().encode("rw")));
    c.parser.expectExportNameReply(false);
    expect(await c.next()).toEqual({ kind: "export-name-reply", size: 8 * MiB, transmissionFlags: 0x0c6d });
    c.close();
    const d = await rawConnect(sock);
    await d.next();
    d.send(encodeClientFlags(0));
    d.send(encodeOption(NBD_OPT.LIST));
    await d.closed;
    const e = await rawConnect(sock);
    await e.next();
    e.send(encodeClientFlags(3));
    e.send(encodeOption(NBD_OPT.EXPORT_NAME, new TextEncoder().encode("unknown")));
    await e.closed;
  });

  it("removeExport waits for requests of a client that already went away", async () => {
    const node = await graph.open(memoryDriver, { size: MiB }, { nodeName: "slow" });
    const st = node.state as MemoryDriver;
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    st.hook = () => gate;
    server.addExport({ name: "slow", node, writable: true });
    const c = await rawGo(sock, "slow");
    c.send(encodeRequest({ flags: 0, type: NBD_CMD.WRITE, cookie: 1n, offset: 0, length: 512 }));
    c.send(new Uint8Array(512).fill(3));
    for (let i = 0; i < 100 && st.counters.inFlight === 0; i++) await new Promise((r) => setTimeout(r, 5));
    c.close();
    await c.closed;
    await new Promise((r) => setTimeout(r, 20));
    let removed = false;
    const p = server.removeExport("slow").then(() => (removed = true));
    await new Promise((r) => setTimeout(r, 20));
    expect(removed).toBe(false);
    release();
    await p;
    expect(node.parents.length).toBe(0);
    expect((await node.read(0, 1))[0]).toBe(3);
    st.hook = undefined;
    await graph.delete(node);
  });

  it("listens on TCP 127.0.0.1 too", async () => {
    const s2 = new NbdServer();
    const node = await graph.open(memoryDriver, { size: MiB }, { nodeName: "tcp" });
    s2.addExport({ name: "", node });
    try {
      const addr = await s2.listen({ type: "inet", host: "127.0.0.1", port: 0 });
      expect(addr.type === "inet" && addr.port).toBeGreaterThan(0);
      const { connect } = await import("node:net");
      const sock2 = connect(addr.type === "inet" ? addr.port : 0, "127.0.0.1");
      const first = await new Promise<Buffer>((r) => sock2.once("data", r));
      expect(hex(first)).toBe("4e42444d4147494349484156454f50540003");
      sock2.destroy();
    } finally {
      await s2.close();
      await graph.delete(node);
    }
  });
});
