/**
 * Multi-connection against real servers: `nbdkit memory` advertises MULTI_CONN, so `x-multi-conn: 4`
 * opens four connections; qemu-nbd's default (`--shared=1`) does not,
 * so the driver stays at one. Content written over several connections is read back by nbdcopy.
 */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { BlockGraph } from "@blk/core";
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
import { type NbdState, nbdDriver } from "../src/nbd/index.ts";

const MiB = 1 << 20;
const missing = missingPeers(["nbdkit", "qemu-nbd", "nbdcopy"]);
if (missing.length > 0) console.warn(`skipping NBD multi-conn interop tests: missing ${missing.join(", ")}`);

describe.skipIf(missing.length > 0)("nbd driver multi-conn interop", { timeout: 60_000 }, () => {
  let dir: TempDir;
  const peers: Peer[] = [];
  beforeAll(() => {
    dir = makeTempDir("blk-nbdmcq-");
  });
  afterAll(async () => {
    for (const p of peers) await p.stop();
    await dir.dispose();
  });

  const socketReady = (sock: string) => async () => (await run("test", ["-S", sock])).code === 0;

  it("nbdkit memory: four connections, writes spread over them, nbdcopy reads them back", async () => {
    const sock = join(dir.path, "kit.sock");
    const kit = await spawnPeer("nbdkit", ["-f", "-U", sock, "memory", "8M"], {
      timeoutMs: 50_000,
      ready: socketReady(sock),
    });
    peers.push(kit);
    const g = new BlockGraph();
    const n = await g.open(
      nbdDriver,
      { server: { type: "unix", path: sock }, "x-multi-conn": 4 },
      { nodeName: "kit" },
    );
    const st = n.state as NbdState;
    expect(st.client.canMultiConn).toBe(true);
    expect(st.clients.length).toBe(4);
    const data = Array.from({ length: 8 }, (_, i) => pattern(60 + i, i * MiB, MiB));
    await Promise.all(data.map((d, i) => n.write(i * MiB, d)));
    await n.flush();
    const out = join(dir.path, "kit.raw");
    const cp = await run("nbdcopy", [`nbd+unix:///?socket=${sock}`, out], { timeoutMs: 30_000 });
    expect(cp.stderr).toBe("");
    const want = new Uint8Array(8 * MiB);
    for (const [i, d] of data.entries()) want.set(d, i * MiB);
    expect(sha256(await readFile(out))).toBe(sha256(want));
    await n.close();
  });

  it("qemu-nbd without --shared: one connection", async () => {
    const img = join(dir.path, "q.raw");
    await run("truncate", ["-s", "4M", img]);
    const sock = join(dir.path, "q.sock");
    const q = await spawnPeer("qemu-nbd", ["-f", "raw", "-t", "-k", sock, img], {
      timeoutMs: 50_000,
      ready: socketReady(sock),
    });
    peers.push(q);
    const g = new BlockGraph();
    const n = await g.open(
      nbdDriver,
      { server: { type: "unix", path: sock }, "x-multi-conn": 4 },
      { nodeName: "q" },
    );
    expect((n.state as NbdState).clients.length).toBe(1);
    await n.close();
  });
});
