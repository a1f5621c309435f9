/**
 * Interop: blk's NBD client and `nbd` driver against real servers — qemu-nbd 7.2 (raw file),
 * nbdkit 1.32 (memory plugin, with filters that inject delays, errors, block-size limits, no structured
 * replies, oldstyle handshake flags) and qemu-storage-daemon. Content is checked against the file on disk
 * with `pattern`/`sha256`, block status against `nbdinfo --map --json` on the same export. Unix sockets
 * in a temp dir; every peer is killed in afterAll at the latest.
 */
import { existsSync } from "node:fs";
import { open, readFile, rm, writeFile } from "node:fs/promises";
import { type AddressInfo, connect, createServer } from "node:net";
import { BlockGraph, type BlockStatusExtent, isBlkError } from "@blk/core";
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
import {
  NbdClient,
  type NbdClientOptions,
  type NbdOptions,
  type NbdState,
  nbdDriver,
  parseNbdUri,
  registerNbd,
} from "../src/nbd/client/index.ts";
import { DriverRegistry, openBlockdev } from "../src/registry/index.ts";

const MiB = 1 << 20;
const SIZE = 64 * MiB;
const missing = missingPeers(["qemu-nbd", "nbdkit", "nbdinfo", "qemu-img", "qemu-io", "qemu-storage-daemon"]);
if (missing.length > 0) console.warn(`skipping NBD client interop tests: missing ${missing.join(", ")}`);

const uri = (sock: string, name: string): string => `nbd+unix:///${name}?socket=${sock}`;
const unix = (path: string): NbdClientOptions["server"] => ({ type: "unix", path });

/** Codes of a rejection (undefined for success). */
async function codeOf(p: Promise<unknown>): Promise<string | undefined> {
  try {
    await p;
    return undefined;
  } catch (e) {
    expect(isBlkError(e), String(e)).toBe(true);
    return (e as { code: string }).code;
  }
}

type MapEntry = { offset: number; length: number; type: number };

function merge(entries: MapEntry[]): MapEntry[] {
  const out: MapEntry[] = [];
  for (const e of entries) {
    const last = out.at(-1);
    if (last !== undefined && last.type === e.type && last.offset + last.length === e.offset)
      last.length += e.length;
    else out.push({ ...e });
  }
  return out;
}

/** The whole `base:allocation` map through our client, merged. */
async function clientMap(c: NbdClient): Promise<MapEntry[]> {
  const out: MapEntry[] = [];
  for (let off = 0; off < c.size; ) {
    const st = await c.blockStatus(off, c.size - off);
    const ext = st.get("base:allocation") ?? [];
    expect(ext.length).toBeGreaterThan(0);
    for (const e of ext) {
      const length = Math.min(e.offset + e.length, c.size) - e.offset;
      out.push({ offset: e.offset, length, type: e.flags });
      off = e.offset + length;
    }
  }
  return merge(out);
}

async function nbdinfoMap(u: string): Promise<MapEntry[]> {
  const r = await run("nbdinfo", ["--map", "--json", u], { timeoutMs: 15_000 });
  expect(r.code, r.stderr).toBe(0);
  return merge(
    (JSON.parse(r.stdout) as MapEntry[]).map(({ offset, length, type }) => ({ offset, length, type })),
  );
}

/** True once something accepts connections on the unix socket (the file appears before listen()). */
function accepting(sock: string): Promise<boolean> {
  if (!existsSync(sock)) return Promise.resolve(false);
  return new Promise((resolve) => {
    const s = connect(sock);
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

/** Peers run with -t (persistent), so the readiness probe does not use up their only client. */
function peerOn(cmd: string, args: readonly string[], sock: string): Promise<Peer> {
  return spawnPeer(cmd, args, { ready: () => accepting(sock), timeoutMs: 120_000 });
}

describe.skipIf(missing.length > 0)("NbdClient interop", { timeout: 60_000 }, () => {
  let dir: TempDir;
  const peers: Peer[] = [];
  let rawFile: string;
  let qsock: string;
  const expected = new Uint8Array(SIZE);

  beforeAll(async () => {
    dir = makeTempDir("blk-nbdc");
    rawFile = dir.join("disk.raw");
    expected.set(pattern(1, 0, MiB), 0);
    expected.set(pattern(2, 4 * MiB, 256 * 1024), 4 * MiB);
    expected.set(pattern(3, 40 * MiB, 3 * MiB), 40 * MiB);
    await writeFile(rawFile, new Uint8Array(0));
    const fh = await open(rawFile, "r+");
    await fh.truncate(SIZE);
    await fh.write(expected, 0, MiB, 0);
    await fh.write(expected, 4 * MiB, 256 * 1024, 4 * MiB);
    await fh.write(expected, 40 * MiB, 3 * MiB, 40 * MiB);
    await fh.close();
    qsock = dir.join("q.sock");
    peers.push(
      await peerOn(
        "qemu-nbd",
        [
          "-f",
          "raw",
          "-x",
          "exp",
          "-k",
          qsock,
          "-t",
          "-e",
          "8",
          "--discard=unmap",
          "--cache=writeback",
          rawFile,
        ],
        qsock,
      ),
    );
  });

  afterAll(async () => {
    for (const p of peers) await p.stop();
    await dir.dispose();
  });

  const nbdkit = async (name: string, args: readonly string[]): Promise<{ sock: string; peer: Peer }> => {
    const sock = dir.join(`${name}.sock`);
    const peer = await peerOn("nbdkit", ["-f", "-U", sock, ...args], sock);
    peers.push(peer);
    return { sock, peer };
  };

  it("negotiates GO, structured replies, base:allocation and block sizes with qemu-nbd", async () => {
    await using c = await NbdClient.connect({ server: unix(qsock), export: "exp" });
    expect(c.size).toBe(SIZE);
    expect(c.usedGo).toBe(true);
    expect(c.structuredReplies).toBe(true);
    expect([...c.contexts.keys()]).toEqual(["base:allocation"]);
    expect([c.minimumBlockSize, c.preferredBlockSize, c.maximumBlockSize]).toEqual([1, 4096, 32 * MiB]);
    expect(c.maxPayload).toBe(32 * MiB);
    expect({
      ro: c.readOnly,
      flush: c.canFlush,
      fua: c.canFua,
      trim: c.canTrim,
      zero: c.canZero,
      df: c.canDf,
    }).toEqual({ ro: false, flush: true, fua: true, trim: true, zero: true, df: true });
  });

  it("reads data and holes, across chunks and split above 32 MiB", async () => {
    await using c = await NbdClient.connect({ server: unix(qsock), export: "exp" });
    expect(sha256(await c.read(0, MiB))).toBe(sha256(pattern(1, 0, MiB)));
    const across = await c.read(4 * MiB - 4096, 8192);
    expect(across.subarray(0, 4096).every((b) => b === 0)).toBe(true);
    expect(sha256(across.subarray(4096))).toBe(sha256(pattern(2, 4 * MiB, 4096)));
    expect(sha256(await c.read(1, 12345))).toBe(sha256(expected.subarray(1, 12346)));
    expect(sha256(await c.read(2 * MiB, 128 * 1024, { df: true }))).toBe(sha256(new Uint8Array(128 * 1024)));
    // 48 MiB: two requests (32 MiB + 16 MiB) in flight together.
    expect(sha256(await c.read(0, 48 * MiB))).toBe(sha256(expected.subarray(0, 48 * MiB)));
  });

  it("block status equals nbdinfo --map --json for the same export", async () => {
    await using c = await NbdClient.connect({ server: unix(qsock), export: "exp" });
    const ours = await clientMap(c);
    expect(ours).toEqual(await nbdinfoMap(uri(qsock, "exp")));
    expect(ours[0]).toEqual({ offset: 0, length: MiB, type: 0 });
    expect(ours[1]).toEqual({ offset: MiB, length: 3 * MiB, type: 3 });
    const one = await c.blockStatus(0, SIZE, { reqOne: true });
    expect(one.get("base:allocation")).toEqual([{ offset: 0, length: MiB, flags: 0 }]);
  });

  it("writes (FUA), writes zeroes, trims and flushes; the file on disk matches", async () => {
    await using c = await NbdClient.connect({ server: unix(qsock), export: "exp" });
    const model = expected.slice(0, 16 * MiB);
    const a = pattern(10, 8 * MiB + 512, 100_000);
    await c.write(8 * MiB + 512, a, { fua: true });
    model.set(a, 8 * MiB + 512);
    const b = pattern(11, 12 * MiB, 2 * MiB);
    await c.write(12 * MiB, b);
    model.set(b, 12 * MiB);
    await c.writeZeroes(12 * MiB + 64 * 1024, 64 * 1024, { noHole: true });
    model.fill(0, 12 * MiB + 64 * 1024, 12 * MiB + 128 * 1024);
    await c.writeZeroes(13 * MiB, MiB);
    model.fill(0, 13 * MiB, 14 * MiB);
    await c.trim(0, 512 * 1024);
    await c.writeZeroes(0, 512 * 1024);
    model.fill(0, 0, 512 * 1024);
    await c.flush();
    const disk = (await readFile(rawFile)).subarray(0, 16 * MiB);
    expect(sha256(disk)).toBe(sha256(model));
    expect(sha256(await c.read(0, 16 * MiB))).toBe(sha256(model));
    expect(await clientMap(c)).toEqual(await nbdinfoMap(uri(qsock, "exp")));
    // Restore the first MiB for the other tests.
    await c.write(0, expected.subarray(0, MiB));
  });

  it("pipelines 200 writes and 200 reads over one connection with up to 128 in flight", async () => {
    await using c = await NbdClient.connect({ server: unix(qsock), export: "exp", maxInFlight: 128 });
    let peak = 0;
    const sample = setInterval(() => {
      peak = Math.max(peak, c.inFlight);
    }, 1);
    const base = 20 * MiB;
    await Promise.all(
      Array.from({ length: 200 }, (_, i) =>
        c.write(base + i * 16384, pattern(100 + i, base + i * 16384, 16384)),
      ),
    );
    const reads = await Promise.all(Array.from({ length: 200 }, (_, i) => c.read(base + i * 16384, 16384)));
    clearInterval(sample);
    for (const [i, r] of reads.entries())
      expect(sha256(r)).toBe(sha256(pattern(100 + i, base + i * 16384, 16384)));
    expect(peak).toBeLessThanOrEqual(128);
    await c.flush();
    const disk = await readFile(rawFile);
    expect(sha256(disk.subarray(base, base + 200 * 16384))).toBe(
      sha256(Array.from({ length: 200 }, (_, i) => pattern(100 + i, base + i * 16384, 16384))),
    );
  });

  it("keeps 128 requests in flight against a slow server (nbdkit delay filter)", async () => {
    const { sock } = await nbdkit("slow", ["-t", "128", "--filter=delay", "memory", "16M", "rdelay=200ms"]);
    await using c = await NbdClient.connect({ server: unix(sock), maxInFlight: 128 });
    let peak = 0;
    const t0 = Date.now();
    const all = Promise.all(Array.from({ length: 256 }, (_, i) => c.read(i * 4096, 4096)));
    const sample = setInterval(() => {
      peak = Math.max(peak, c.inFlight);
    }, 5);
    const res = await all;
    clearInterval(sample);
    expect(res.every((r) => r.every((b) => b === 0))).toBe(true);
    expect(peak).toBe(128);
    // 256 reads of 200 ms each: serially 51 s, pipelined about 0.4 s.
    expect(Date.now() - t0).toBeLessThan(10_000);
  });

  it("fails every pending and later request with BlkError EIO when the server is killed", async () => {
    const { sock, peer } = await nbdkit("killed", [
      "-t",
      "64",
      "--filter=delay",
      "memory",
      "16M",
      "rdelay=10",
    ]);
    const c = await NbdClient.connect({ server: unix(sock), maxInFlight: 32 });
    const reqs = Array.from({ length: 40 }, (_, i) => codeOf(c.read(i * 4096, 4096)));
    for (let i = 0; i < 200 && c.inFlight < 32; i++) await new Promise((r) => setTimeout(r, 10));
    expect(c.inFlight).toBe(32);
    peer.child.kill("SIGKILL");
    expect(await Promise.all(reqs)).toEqual(Array.from({ length: 40 }, () => "EIO"));
    expect(c.error?.code).toBe("EIO");
    expect(await codeOf(c.read(0, 512))).toBe("EIO");
    await c.close();
    await c.close();
  });

  it("reports per-request server errors as BlkErrors and keeps the connection", async () => {
    const flag = dir.join("errors-on");
    const { sock } = await nbdkit("err", [
      "--filter=error",
      "memory",
      "16M",
      "error=EIO",
      "error-pread-rate=100%",
      `error-file=${flag}`,
    ]);
    await using c = await NbdClient.connect({ server: unix(sock) });
    await writeFile(flag, "");
    expect(await codeOf(c.read(0, 4096))).toBe("EIO");
    await rm(flag);
    expect(await codeOf(c.read(0, 4096))).toBeUndefined();
    expect(c.error).toBeUndefined();

    const full = await nbdkit("full", ["full", "1M"]);
    await using f = await NbdClient.connect({ server: unix(full.sock) });
    expect(await codeOf(f.write(0, new Uint8Array(4096)))).toBe("ENOSPC");
    expect(sha256(await f.read(0, 4096))).toBe(sha256(new Uint8Array(4096)));

    const ro = await nbdkit("ro", ["-r", "memory", "1M"]);
    await using r = await NbdClient.connect({ server: unix(ro.sock) });
    expect(r.readOnly).toBe(true);
    expect(await codeOf(r.write(0, new Uint8Array(512)))).toBe("EPERM");
    expect(await codeOf(r.read(MiB - 512, 1024))).toBe("EINVAL");
  });

  it("obeys the server's block sizes (nbdkit blocksize-policy)", async () => {
    const { sock } = await nbdkit("bs", [
      "--filter=blocksize-policy",
      "memory",
      "16M",
      "blocksize-minimum=512",
      "blocksize-preferred=4096",
      "blocksize-maximum=65536",
      "blocksize-error-policy=error",
    ]);
    await using c = await NbdClient.connect({ server: unix(sock) });
    expect([c.minimumBlockSize, c.preferredBlockSize, c.maximumBlockSize, c.maxPayload]).toEqual([
      512, 4096, 65536, 65536,
    ]);
    const data = pattern(7, 512, MiB);
    await c.write(512, data);
    expect(sha256(await c.read(512, MiB))).toBe(sha256(data));
    expect(await codeOf(c.read(100, 512))).toBe("EINVAL");
  });

  it("works with simple replies (nbdkit --no-sr) and the EXPORT_NAME handshake (no fixed newstyle)", async () => {
    const nosr = await nbdkit("nosr", ["--no-sr", "memory", "4M"]);
    await using a = await NbdClient.connect({ server: unix(nosr.sock) });
    expect([a.usedGo, a.structuredReplies, a.canBlockStatus]).toEqual([true, false, false]);
    const d = pattern(8, 0, 256 * 1024);
    await a.write(0, d);
    expect(sha256(await a.read(0, 256 * 1024))).toBe(sha256(d));
    expect(await codeOf(a.blockStatus(0, 4096))).toBe("ENOTSUP");

    const old = await nbdkit("old", ["--mask-handshake=0", "memory", "4M"]);
    await using b = await NbdClient.connect({ server: unix(old.sock) });
    expect([b.usedGo, b.structuredReplies, b.size]).toEqual([false, false, 4 * MiB]);
    await b.write(4096, d);
    expect(sha256(await b.read(4096, 256 * 1024))).toBe(sha256(d));
  });

  it("refuses an unknown export with ENOENT and a dead socket with EIO", async () => {
    expect(await codeOf(NbdClient.connect({ server: unix(qsock), export: "nope" }))).toBe("ENOENT");
    expect(await codeOf(NbdClient.connect({ server: unix(dir.join("none.sock")) }))).toBe("EIO");
    await expect(NbdClient.connect({ server: unix(dir.join("none.sock")) })).rejects.toThrow(
      /^Failed to connect to '.*none\.sock': No such file or directory$/,
    );
  });

  describe("nbd driver", () => {
    const ctx = { readOnly: false, autoReadOnly: false, nodeName: "n", children: new Map() };

    it("opens through blockdev options and serves reads, writes and block status", async () => {
      const registry = new DriverRegistry();
      registerNbd(registry);
      const graph = new BlockGraph();
      const node = await openBlockdev(
        graph,
        { driver: "nbd", "node-name": "remote", server: { type: "unix", path: qsock }, export: "exp" },
        { registry },
      );
      expect(node.length).toBe(SIZE);
      expect(sha256(await node.read(4 * MiB, 256 * 1024))).toBe(sha256(pattern(2, 4 * MiB, 256 * 1024)));
      const w = pattern(20, 30 * MiB + 7, 5000);
      await node.write(30 * MiB + 7, w, { fua: true });
      expect(sha256(await node.read(30 * MiB + 7, 5000))).toBe(sha256(w));
      await node.flush();
      const ext: BlockStatusExtent[] = await node.blockStatus(0, 2 * MiB);
      expect(ext[0]).toMatchObject({ offset: 0, length: MiB, data: true, zero: false });
      await graph.delete(node);
    });

    it("maps base:allocation to extents like nbdinfo", async () => {
      const s = (await nbdDriver.open(
        { server: { type: "unix", path: qsock }, export: "exp" },
        ctx,
      )) as NbdState;
      try {
        const map: MapEntry[] = [];
        for (let off = 0; off < SIZE; ) {
          for (const e of await s.blockStatus(off, SIZE - off)) {
            map.push({ offset: e.offset, length: e.length, type: (e.data ? 0 : 1) | (e.zero ? 2 : 0) });
            off = e.offset + e.length;
          }
        }
        expect(merge(map)).toEqual(await nbdinfoMap(uri(qsock, "exp")));
      } finally {
        await s.close();
      }
    });

    it("reads a dirty bitmap with x-dirty-bitmap (qemu-nbd -B)", async () => {
      const img = dir.join("bm.qcow2");
      const sock = dir.join("bm.sock");
      expect((await run("qemu-img", ["create", "-f", "qcow2", img, "16M"])).code).toBe(0);
      expect((await run("qemu-img", ["bitmap", "--add", img, "b0"])).code).toBe(0);
      const w = await run("qemu-io", ["-f", "qcow2", "-c", "write -P 7 1M 64k", img]);
      expect(w.code, w.stderr).toBe(0);
      peers.push(await peerOn("qemu-nbd", ["-f", "qcow2", "-r", "-B", "b0", "-k", sock, "-t", img], sock));
      const o: NbdOptions = {
        server: { type: "unix", path: sock },
        "x-dirty-bitmap": "qemu:dirty-bitmap:b0",
      };
      const s = (await nbdDriver.open(o, { ...ctx, readOnly: true })) as NbdState;
      try {
        const ext = await s.blockStatus(0, 4 * MiB);
        expect(ext.map((e) => [e.offset, e.length, e.data])).toEqual([
          [0, MiB, true],
          [MiB, 64 * 1024, false],
          [MiB + 64 * 1024, 3 * MiB - 64 * 1024, true],
        ]);
      } finally {
        await s.close();
      }
      const bad = { ...o, "x-dirty-bitmap": "qemu:dirty-bitmap:nope" };
      expect(await codeOf(nbdDriver.open(bad, { ...ctx, readOnly: true }))).toBe("EINVAL");
    });

    it("refuses unknown tls-creds with EINVAL and a read-only export opened read-write with EPERM", async () => {
      const server = { type: "unix", path: qsock } as const;
      expect(await codeOf(nbdDriver.open({ server, "tls-creds": "tls0" }, ctx))).toBe("EINVAL");
      const ro = await nbdkit("ro2", ["-r", "memory", "1M"]);
      expect(await codeOf(nbdDriver.open({ server: { type: "unix", path: ro.sock } }, ctx))).toBe("EPERM");
    });

    it("retries the connection for open-timeout seconds", async () => {
      const sock = dir.join("late.sock");
      const opening = nbdDriver.open({ server: { type: "unix", path: sock }, "open-timeout": 10 }, ctx);
      await new Promise((r) => setTimeout(r, 500));
      await nbdkit("late", ["memory", "1M"]).catch(() => undefined);
      const s = await opening;
      expect(await s.getLength()).toBe(MiB);
      await s.close();
    });

    it("reconnects within reconnect-delay after the server restarts", async () => {
      const img = dir.join("rc.raw");
      const sock = dir.join("rc.sock");
      await writeFile(img, new Uint8Array(MiB));
      const args = ["-f", "raw", "-k", sock, "-t", img];
      const first = await peerOn("qemu-nbd", args, sock);
      peers.push(first);
      const s = (await nbdDriver.open(
        { server: { type: "unix", path: sock }, "reconnect-delay": 10 },
        ctx,
      )) as NbdState;
      try {
        const d = pattern(30, 0, 4096);
        await s.write(0, d);
        await s.flush();
        await first.stop();
        await rm(sock, { force: true });
        const later = s.read(0, new Uint8Array(4096));
        await new Promise((r) => setTimeout(r, 300));
        peers.push(await peerOn("qemu-nbd", args, sock));
        await later;
        const buf = new Uint8Array(4096);
        await s.read(0, buf);
        expect(sha256(buf)).toBe(sha256(d));
      } finally {
        await s.close();
      }
    });
  });

  it("connects over TCP to what parseNbdUri returns (nbdkit -p, nbd:// URI)", async () => {
    const port = await new Promise<number>((resolve) => {
      const srv = createServer().listen(0, "127.0.0.1", () => {
        const a = srv.address() as AddressInfo;
        srv.close(() => resolve(a.port));
      });
    });
    const peer = await spawnPeer("nbdkit", ["-f", "-i", "127.0.0.1", "-p", String(port), "memory", "2M"], {
      ready: async () =>
        (await run("nbdinfo", ["--size", `nbd://127.0.0.1:${port}`], { timeoutMs: 5000 })).code === 0,
      timeoutMs: 60_000,
    });
    peers.push(peer);
    const opts = parseNbdUri(`nbd://127.0.0.1:${port}`);
    expect(opts).toEqual({ server: { type: "inet", host: "127.0.0.1", port: String(port) } });
    await using c = await NbdClient.connect(opts);
    expect(c.size).toBe(2 * MiB);
    const s = await nbdDriver.open(parseNbdUri(`nbd+tcp://127.0.0.1:${port}/`), {
      readOnly: false,
      autoReadOnly: false,
      nodeName: "tcp",
      children: new Map(),
    });
    const d = pattern(50, 0, 65536);
    await s.write(0, d);
    expect(sha256(await c.read(0, 65536))).toBe(sha256(d));
    await s.close();
    expect(await codeOf(NbdClient.connect(parseNbdUri("nbd://127.0.0.1:1/x")))).toBe("EIO");
  });

  it("talks to a qemu-storage-daemon NBD export", async () => {
    const img = dir.join("qsd.raw");
    const sock = dir.join("qsd.sock");
    await writeFile(img, new Uint8Array(0));
    const fh = await open(img, "r+");
    await fh.truncate(8 * MiB);
    await fh.close();
    peers.push(
      await peerOn(
        "qemu-storage-daemon",
        [
          "--blockdev",
          `driver=file,node-name=f,filename=${img}`,
          "--nbd-server",
          `addr.type=unix,addr.path=${sock}`,
          "--export",
          "type=nbd,id=e0,node-name=f,name=disk,writable=on",
        ],
        sock,
      ),
    );
    await using c = await NbdClient.connect({ server: unix(sock), export: "disk" });
    expect(c.size).toBe(8 * MiB);
    const d = pattern(40, MiB, 3 * MiB);
    await c.write(MiB, d, { fua: true });
    await c.writeZeroes(2 * MiB, MiB);
    d.fill(0, MiB, 2 * MiB);
    await c.flush();
    expect(sha256(await c.read(MiB, 3 * MiB))).toBe(sha256(d));
    expect(sha256((await readFile(img)).subarray(MiB, 4 * MiB))).toBe(sha256(d));
    expect(await clientMap(c)).toEqual(await nbdinfoMap(uri(sock, "disk")));
  });
});
