/**
 * READ replies of the server's fast path: header and data in one buffer, holes still sent as holes
 * once the known-data cache has seen a window, and TRIM/WRITE_ZEROES through the export forgetting it.
 */
import { join } from "node:path";
import { BlkError, BlockGraph, type BlockNode, memoryDriver } from "@blk/core";
import { makeTempDir, type TempDir } from "@blk/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  decodeErrorChunk,
  decodeOffsetData,
  decodeOffsetHole,
  encodeRequest,
  NBD_CMD,
  NBD_CMD_FLAG,
  NBD_ERR,
  NBD_REPLY_TYPE,
  NbdServer,
} from "../src/nbd/index.ts";
import { type RawClient, rawGo } from "./fixtures/nbd/client.ts";

const MiB = 1 << 20;
const K64 = 65536;

let dir: TempDir;
let graph: BlockGraph;
let server: NbdServer;
let sock: string;
let node: BlockNode;

beforeAll(async () => {
  dir = makeTempDir("blk-nbd-read-");
  graph = new BlockGraph();
  node = await graph.open(memoryDriver, { size: 4 * MiB }, { nodeName: "sp", discard: "unmap" });
  server = new NbdServer();
  server.addExport({ name: "sp", node, writable: true });
  sock = join(dir.path, "sp.sock");
  await server.listen({ type: "unix", path: sock });
});

afterAll(async () => {
  await server.close();
  await dir.dispose();
});

type Piece =
  | { kind: "data"; offset: number; data: Uint8Array }
  | { kind: "hole"; offset: number; size: number };

/** Sends a READ and collects its reply chunks (structured) until the DONE flag. */
async function read(
  c: RawClient,
  cookie: bigint,
  offset: number,
  length: number,
  flags = 0,
): Promise<Piece[]> {
  c.send(encodeRequest({ flags, type: NBD_CMD.READ, cookie, offset, length }));
  const out: Piece[] = [];
  for (;;) {
    const m = await c.next();
    if (m.kind !== "chunk" || m.cookie !== cookie) throw new Error(`unexpected ${m.kind}`);
    if (m.type === NBD_REPLY_TYPE.OFFSET_DATA) out.push({ kind: "data", ...decodeOffsetData(m.payload) });
    else if (m.type === NBD_REPLY_TYPE.OFFSET_HOLE)
      out.push({ kind: "hole", ...decodeOffsetHole(m.payload) });
    else throw new Error(`unexpected chunk type ${m.type}`);
    if ((m.flags & 1) !== 0) return out;
  }
}

/** The bytes a reply stands for. */
function assemble(pieces: Piece[], offset: number, length: number): Uint8Array {
  const b = new Uint8Array(length).fill(0xee);
  for (const p of pieces) {
    if (p.kind === "data") b.set(p.data, p.offset - offset);
    else b.fill(0, p.offset - offset, p.offset - offset + p.size);
  }
  return b;
}

const same = (a: Uint8Array, b: Uint8Array): boolean => Buffer.from(a).equals(b);

const shape = (pieces: Piece[]): string[] =>
  pieces.map((p) => `${p.kind}@${p.offset}+${p.kind === "data" ? p.data.length : p.size}`);

describe("NbdServer READ fast path", () => {
  it("sends holes as holes after a window was seen as all data and then trimmed or zeroed", async () => {
    const content = new Uint8Array(2 * MiB);
    for (let i = 0; i < content.length; i++) content[i] = (i * 7 + 3) & 0xff || 1;
    await node.write(0, content);
    const c = await rawGo(sock, "sp");
    try {
      // All data: one chunk, read twice (the second from the known-data cache).
      for (const cookie of [1n, 2n]) {
        const r = await read(c, cookie, 4096, 2 * K64);
        expect(shape(r)).toEqual([`data@4096+${2 * K64}`]);
        expect(same(assemble(r, 4096, 2 * K64), content.subarray(4096, 4096 + 2 * K64))).toBe(true);
      }
      c.send(encodeRequest({ flags: 0, type: NBD_CMD.TRIM, cookie: 3n, offset: K64, length: K64 }));
      expect(await c.next()).toMatchObject({ kind: "simple-reply", error: 0, cookie: 3n });
      let r = await read(c, 4n, 0, 3 * K64);
      expect(shape(r)).toEqual([`data@0+${K64}`, `hole@${K64}+${K64}`, `data@${2 * K64}+${K64}`]);
      const want = content.slice(0, 3 * K64);
      want.fill(0, K64, 2 * K64);
      expect(same(assemble(r, 0, 3 * K64), want)).toBe(true);
      // The second window: cached as data, then zeroed (may unmap) through the export.
      expect(shape(await read(c, 5n, MiB, K64))).toEqual([`data@${MiB}+${K64}`]);
      c.send(encodeRequest({ flags: 0, type: NBD_CMD.WRITE_ZEROES, cookie: 6n, offset: MiB, length: K64 }));
      expect(await c.next()).toMatchObject({ kind: "simple-reply", error: 0, cookie: 6n });
      r = await read(c, 7n, MiB - K64, 3 * K64);
      expect(shape(r)).toEqual([
        `data@${MiB - K64}+${K64}`,
        `hole@${MiB}+${K64}`,
        `data@${MiB + K64}+${K64}`,
      ]);
      // DF: one data chunk whatever the holes.
      r = await read(c, 8n, 0, 3 * K64, NBD_CMD_FLAG.DF);
      expect(shape(r)).toEqual([`data@0+${3 * K64}`]);
      expect(same(assemble(r, 0, 3 * K64), want)).toBe(true);
      // Never written: a hole.
      expect(shape(await read(c, 9n, 3 * MiB, 4096))).toEqual([`hole@${3 * MiB}+4096`]);
    } finally {
      c.close();
    }
  });

  it("a READ whose block status fails gets QEMU's error, not data guessed from nothing", async () => {
    const bad = await graph.open(memoryDriver, { size: MiB }, { nodeName: "bad" });
    await bad.write(0, new Uint8Array(4096).fill(9));
    const state = bad.state as { blockStatus: (...a: unknown[]) => Promise<unknown> };
    state.blockStatus = async () => {
      throw new BlkError("EIO", "metadata is corrupt");
    };
    server.addExport({ name: "bad", node: bad });
    const c = await rawGo(sock, "bad");
    try {
      c.send(encodeRequest({ flags: 0, type: NBD_CMD.READ, cookie: 1n, offset: 0, length: 4096 }));
      const m = await c.next();
      if (m.kind !== "chunk") throw new Error(`unexpected ${m.kind}`);
      expect(m.type).toBe(NBD_REPLY_TYPE.ERROR);
      expect(decodeErrorChunk(m.type, m.payload)).toEqual({
        error: NBD_ERR.EIO,
        message: "unable to check for holes: Input/output error",
      });
      // DF needs no block status: the data is read.
      c.send(
        encodeRequest({ flags: NBD_CMD_FLAG.DF, type: NBD_CMD.READ, cookie: 2n, offset: 0, length: 4096 }),
      );
      const r = await c.next();
      expect(r).toMatchObject({ kind: "chunk", type: NBD_REPLY_TYPE.OFFSET_DATA });
    } finally {
      c.close();
      await server.removeExport("bad", { mode: "hard" });
    }
  });

  it("answers simple-reply reads with header and data together, many in flight", async () => {
    const c = await rawGo(sock, "sp", { structured: false });
    try {
      const lengths = [1, 512, 4096, 5000, K64, K64 + 1, 300 * 1024];
      const reads = new Map<bigint, number>();
      lengths.forEach((len, i) => {
        const cookie = BigInt(100 + i);
        reads.set(cookie, len);
        c.send(encodeRequest({ flags: 0, type: NBD_CMD.READ, cookie, offset: 777 * i, length: len }));
      });
      c.parser.readLength = (cookie) => reads.get(cookie);
      const content = await node.read(0, 2 * MiB);
      for (let n = 0; n < lengths.length; n++) {
        const m = await c.next();
        if (m.kind !== "simple-reply" || m.data === undefined) throw new Error("expected data");
        const i = Number(m.cookie - 100n);
        expect(m.error).toBe(0);
        const want = content.subarray(777 * i, 777 * i + (lengths[i] ?? 0));
        expect(Buffer.from(m.data).equals(want)).toBe(true);
      }
    } finally {
      c.close();
    }
  });

  it("serves the node its edge points to after a node replacement (mirror complete), holes included", async () => {
    const g = new BlockGraph();
    const src = await g.open(memoryDriver, { size: 2 * MiB }, { nodeName: "src" });
    const dst = await g.open(memoryDriver, { size: 2 * MiB }, { nodeName: "dst" });
    await src.write(0, new Uint8Array(2 * MiB).fill(0x11));
    await dst.write(K64, new Uint8Array(K64).fill(0x22));
    const srv = new NbdServer();
    const exp = srv.addExport({ name: "m", node: src });
    const path = join(dir.path, "m.sock");
    await srv.listen({ type: "unix", path });
    const c = await rawGo(path, "m");
    try {
      // Window 0 seen as all data on src.
      expect(shape(await read(c, 1n, 0, K64))).toEqual([`data@0+${K64}`]);
      g.replaceNode(src, dst);
      expect(exp.node).toBe(dst);
      const r = await read(c, 2n, 0, 3 * K64);
      expect(shape(r)).toEqual([`hole@0+${K64}`, `data@${K64}+${K64}`, `hole@${2 * K64}+${K64}`]);
      const want = new Uint8Array(3 * K64);
      want.fill(0x22, K64, 2 * K64);
      expect(same(assemble(r, 0, 3 * K64), want)).toBe(true);
    } finally {
      c.close();
      await srv.close();
    }
  });
});
