/**
 * Multi-connection: the `nbd` driver's `x-multi-conn` against blk's own NbdServer — as many connections
 * as asked when the export advertises MULTI_CONN (one when it does not, or as many as the server
 * admits), requests round-robin over them, a flush on every connection, content intact.
 */
import { join } from "node:path";
import { type BlkError, BlockGraph, type BlockNode, isBlkError, memoryDriver } from "@blk/core";
import { makeTempDir, pattern, sha256, type TempDir } from "@blk/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { NBD_MAX_MULTI_CONN, NbdServer, type NbdState, nbdDriver, nbdSchema } from "../src/nbd/index.ts";

const MiB = 1 << 20;

describe("nbd driver multi-conn", { timeout: 60_000 }, () => {
  let dir: TempDir;
  let graph: BlockGraph;
  let node: BlockNode;
  let seq = 0;
  const servers: NbdServer[] = [];

  beforeAll(async () => {
    dir = makeTempDir("blk-nbdmc-");
    graph = new BlockGraph();
    node = await graph.open(memoryDriver, { size: 8 * MiB }, { nodeName: "disk" });
  });
  afterAll(async () => {
    for (const s of servers) await s.close();
    await dir.dispose();
  });

  async function serve(multiConn: boolean, maxConnections = 0): Promise<{ server: NbdServer; sock: string }> {
    const server = new NbdServer({ maxConnections });
    servers.push(server);
    server.addExport({ name: "disk", node, writable: true, multiConn });
    const sock = join(dir.path, `mc${++seq}.sock`);
    await server.listen({ type: "unix", path: sock });
    return { server, sock };
  }

  const transmitting = (s: NbdServer): number =>
    s.connections().filter((c) => c.phase === "transmission").length;

  it("opens x-multi-conn connections, spreads requests round-robin and flushes on all", async () => {
    const { server, sock } = await serve(true);
    const g = new BlockGraph();
    const n = await g.open(
      nbdDriver,
      { server: { type: "unix", path: sock }, export: "disk", "x-multi-conn": 4 },
      { nodeName: "remote" },
    );
    const st = n.state as NbdState;
    expect(st.clients.length).toBe(4);
    expect(transmitting(server)).toBe(4);
    const chunks = Array.from({ length: 8 }, (_, i) => pattern(20 + i, i * MiB, MiB));
    await Promise.all(chunks.map((c, i) => n.write(i * MiB, c)));
    expect(server.connections().map((c) => c.requests)).toEqual([2, 2, 2, 2]);
    await n.flush();
    expect(server.connections().map((c) => c.requests)).toEqual([3, 3, 3, 3]);
    for (let i = 0; i < 8; i++)
      expect(sha256(await n.read(i * MiB, MiB))).toBe(sha256(chunks[i] as Uint8Array));
    expect(sha256(await node.read(3 * MiB, MiB))).toBe(sha256(chunks[3] as Uint8Array));
    await n.close();
  });

  it("stays at one connection when the export does not advertise MULTI_CONN", async () => {
    const { server, sock } = await serve(false);
    const g = new BlockGraph();
    const n = await g.open(
      nbdDriver,
      { server: { type: "unix", path: sock }, export: "disk", "x-multi-conn": 4 },
      { nodeName: "remote" },
    );
    expect((n.state as NbdState).clients.length).toBe(1);
    expect(transmitting(server)).toBe(1);
    await n.close();
  });

  it("does with the connections the server admits", async () => {
    const { server, sock } = await serve(true, 2);
    const g = new BlockGraph();
    const n = await g.open(
      nbdDriver,
      { server: { type: "unix", path: sock }, export: "disk", "x-multi-conn": 4 },
      { nodeName: "remote" },
    );
    expect((n.state as NbdState).clients.length).toBe(2);
    expect(transmitting(server)).toBe(2);
    const data = pattern(5, 0, 64 * 1024);
    await n.write(0, data);
    expect(sha256(await n.read(0, data.length))).toBe(sha256(data));
    await n.close();
  });

  it("validates x-multi-conn", () => {
    const server = { type: "unix", path: "/nowhere" };
    for (const bad of [0, NBD_MAX_MULTI_CONN + 1]) {
      let err: unknown;
      try {
        nbdSchema.parse({ server, "x-multi-conn": bad });
      } catch (e) {
        err = e;
      }
      expect(isBlkError(err) && (err as BlkError).message).toBe(
        `Parameter 'x-multi-conn' expects a value between 1 and ${NBD_MAX_MULTI_CONN}`,
      );
    }
    expect(nbdSchema.parse({ server, "x-multi-conn": 3 })["x-multi-conn"]).toBe(3);
  });
});
