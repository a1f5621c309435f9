/**
 * Reconnection of the `nbd` driver (`reconnect-delay`): the server is stopped in the middle of a copy
 * (the core CopyEngine, as a job copies) and a new one comes up on the same socket; in-flight and new
 * requests wait for the new connection and the copy finishes with the right content — over one
 * connection, over several (`x-multi-conn`), and over TLS (re-negotiated). Without a server coming back,
 * requests fail with EIO once `reconnect-delay` is over.
 */
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { type BlkError, BlockGraph, type BlockNode, CopyEngine, isBlkError, memoryDriver } from "@blk/core";
import { makeTempDir, pattern, sha256, type TempDir } from "@blk/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { makeNbdDriver, NbdServer, type NbdState, TlsCreds } from "../src/nbd/index.ts";

const MiB = 1 << 20;
const SIZE = 16 * MiB;

describe("nbd driver reconnect-delay", { timeout: 60_000 }, () => {
  let dir: TempDir;
  let graph: BlockGraph;
  let source: BlockNode;
  let seq = 0;
  let serverCreds: TlsCreds;
  let clientCreds: TlsCreds;
  const live = new Set<NbdServer>();
  const content = new Uint8Array(SIZE);

  beforeAll(async () => {
    dir = makeTempDir("blk-nbdrc-");
    for (let i = 0; i < 16; i += 2) content.set(pattern(40 + i, i * MiB, MiB), i * MiB);
    graph = new BlockGraph();
    source = await graph.open(memoryDriver, { size: SIZE, data: content.slice() }, { nodeName: "src" });
    const psk = join(dir.path, "psk");
    await import("node:fs/promises").then((fs) => fs.mkdir(psk));
    writeFileSync(join(psk, "keys.psk"), `qemu:${randomBytes(32).toString("hex")}\n`);
    serverCreds = TlsCreds.load({ type: "psk", endpoint: "server", dir: psk });
    clientCreds = TlsCreds.load({ type: "psk", endpoint: "client", dir: psk });
  });
  afterAll(async () => {
    for (const s of live) await s.close();
    await dir.dispose();
  });

  async function start(sock: string, tls: boolean): Promise<NbdServer> {
    const server = new NbdServer(tls ? { tls: { creds: serverCreds } } : {});
    live.add(server);
    server.addExport({ name: "disk", node: source });
    await server.listen({ type: "unix", path: sock });
    return server;
  }

  async function stop(server: NbdServer): Promise<void> {
    live.delete(server);
    await server.close();
  }

  for (const [label, conns, tls] of [
    ["one connection", 1, false],
    ["x-multi-conn 3", 3, false],
    ["TLS (PSK)", 1, true],
  ] as const) {
    it(`a copy survives a server restart (${label})`, async () => {
      const sock = join(dir.path, `rc${++seq}.sock`);
      let server = await start(sock, tls);
      const drv = makeNbdDriver({ tlsCreds: new Map([["tls0", clientCreds]]) });
      const g = new BlockGraph();
      const remote = await g.open(
        drv,
        {
          server: { type: "unix", path: sock },
          export: "disk",
          "reconnect-delay": 20,
          "x-multi-conn": conns,
          ...(tls ? { "tls-creds": "tls0" } : {}),
        },
        { nodeName: "remote", readOnly: true },
      );
      const st = remote.state as NbdState;
      expect(st.clients.length).toBe(conns);
      const first = [...st.clients];
      const target = await g.open(memoryDriver, { size: SIZE }, { nodeName: "dst" });
      const work = target.createBitmapSync({ granularity: 65536, disabled: true });
      work.setDirty(0, SIZE);
      let chunks = 0;
      let restarted: Promise<void> | undefined;
      const engine = new CopyEngine({
        source: remote,
        target,
        bitmap: work,
        chunkSize: 256 * 1024,
        maxWorkers: 4,
        status: "none",
        pausePoint: async () => {
          if (++chunks !== 20) return;
          // A third of the way: the server goes away with requests in flight, and comes back.
          await stop(server);
          restarted = (async () => {
            await new Promise((r) => setTimeout(r, 50));
            server = await start(sock, tls);
          })();
        },
      });
      const r = await engine.run();
      await restarted;
      expect(r.errors).toEqual([]);
      expect(sha256(await target.read(0, SIZE))).toBe(sha256(content));
      // Every connection that was lost was replaced by a new one (re-haggled, TLS again if any).
      expect(st.clients.every((c, i) => c !== first[i])).toBe(true);
      expect(st.clients.every((c) => c.tls === tls)).toBe(true);
      await remote.close();
      await target.close();
      await stop(server);
    });
  }

  it("a request issued while the server is away waits for it; without a server it fails with EIO", async () => {
    const sock = join(dir.path, `rc${++seq}.sock`);
    let server = await start(sock, false);
    const g = new BlockGraph();
    const remote = await g.open(
      makeNbdDriver(),
      { server: { type: "unix", path: sock }, export: "disk", "reconnect-delay": 20 },
      { nodeName: "remote", readOnly: true },
    );
    await stop(server);
    const reading = remote.read(2 * MiB, MiB);
    server = await start(sock, false);
    expect(sha256(await reading)).toBe(sha256(content.subarray(2 * MiB, 3 * MiB)));
    await remote.close();
    await stop(server);

    const gone = await start(sock, false);
    const short = await g.open(
      makeNbdDriver(),
      { server: { type: "unix", path: sock }, export: "disk", "reconnect-delay": 1 },
      { nodeName: "short", readOnly: true },
    );
    await stop(gone);
    let err: unknown;
    try {
      await short.read(0, 4096);
    } catch (e) {
      err = e;
    }
    expect(isBlkError(err) && (err as BlkError).code).toBe("EIO");
    await short.close();
  });
});
