/**
 * Interop: blk's NBD server against real peers (nbdinfo, nbdcopy, qemu-img, qemu-io, qemu-nbd for
 * reference output). Everything runs on unix sockets in a temp dir; peers always have time-outs.
 */
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { BlockGraph, type BlockNode, type MemoryDriver, memoryDriver } from "@blk/core";
import {
  makeTempDir,
  missingPeers,
  type Peer,
  pattern,
  run,
  sha256,
  spawnPeer,
  type TempDir,
  waitForPath,
} from "@blk/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { fileDriver } from "../src/file/index.ts";
import { NbdServer } from "../src/nbd/index.ts";

const MiB = 1 << 20;
const missing = missingPeers(["nbdinfo", "nbdcopy", "qemu-img", "qemu-io", "qemu-nbd"]);
if (missing.length > 0) console.warn(`skipping NBD interop tests: missing ${missing.join(", ")}`);

const uri = (sock: string, name: string): string => `nbd+unix:///${name}?socket=${sock}`;

// `pnpm test:fast` leaves this file out by its name (`*.qemu.test.ts`); it skips itself when a peer is missing.
describe.skipIf(missing.length > 0)("NbdServer interop", { timeout: 60_000 }, () => {
  let dir: TempDir;
  let graph: BlockGraph;
  let server: NbdServer;
  let sock: string;
  let mem: BlockNode;
  let ro: BlockNode;
  const peers: Peer[] = [];
  const content = new Uint8Array(16 * MiB);

  beforeAll(async () => {
    dir = makeTempDir("blk-nbd-");
    graph = new BlockGraph();
    content.set(pattern(1, 0, MiB), 0);
    content.set(pattern(2, 4 * MiB, 256 * 1024), 4 * MiB);
    mem = await graph.open(memoryDriver, { size: 16 * MiB, data: content }, { nodeName: "mem" });
    ro = await graph.open(
      memoryDriver,
      { size: 16 * MiB, data: content },
      { nodeName: "ro", readOnly: true },
    );
    server = new NbdServer();
    server.addExport({ name: "mem", node: mem, writable: true, description: "memory disk" });
    server.addExport({ name: "ro", node: ro });
    sock = join(dir.path, "blk.sock");
    await server.listen({ type: "unix", path: sock });
  });

  /** Waits until the peer that just exited is gone from the server too. */
  const settled = async (): Promise<void> => {
    for (let i = 0; i < 200 && server.connections().some((c) => c.phase !== "closed"); i++) {
      await new Promise((r) => setTimeout(r, 10));
    }
  };

  afterAll(async () => {
    for (const p of peers) await p.stop();
    await server.close();
    await dir.dispose();
  });

  it("nbdinfo --json describes a writable export", async () => {
    const r = await run("nbdinfo", ["--json", uri(sock, "mem")], { timeoutMs: 15_000 });
    expect(r.stderr).toBe("");
    const info = JSON.parse(r.stdout) as {
      protocol: string;
      structured: boolean;
      exports: Record<string, unknown>[];
    };
    expect(info.protocol).toBe("newstyle-fixed");
    expect(info.structured).toBe(true);
    expect(info.exports[0]).toMatchObject({
      "export-name": "mem",
      description: "memory disk",
      contexts: ["base:allocation"],
      is_rotational: false,
      is_read_only: false,
      can_cache: true,
      can_df: true,
      can_fast_zero: true,
      can_flush: true,
      can_fua: true,
      can_multi_conn: true,
      can_trim: true,
      can_zero: true,
      block_size_minimum: 1,
      block_size_preferred: 4096,
      block_size_maximum: 33554432,
      "export-size": 16 * MiB,
    });
  });

  it("nbdinfo --json describes a read-only export like qemu-nbd -r", async () => {
    const r = await run("nbdinfo", ["--json", uri(sock, "ro")], { timeoutMs: 15_000 });
    const e = (JSON.parse(r.stdout) as { exports: Record<string, unknown>[] }).exports[0];
    expect(e).toMatchObject({
      is_read_only: true,
      can_trim: false,
      can_zero: false,
      can_fast_zero: false,
      can_flush: true,
      can_fua: true,
      can_cache: true,
      can_df: true,
    });
  });

  it("nbdinfo --list lists every export with its description", async () => {
    const r = await run("nbdinfo", ["--list", "--json", `nbd+unix:///?socket=${sock}`], {
      timeoutMs: 15_000,
    });
    const info = JSON.parse(r.stdout) as { exports: { "export-name": string; description?: string }[] };
    expect(info.exports.map((e) => e["export-name"]).sort()).toEqual(["mem", "ro"]);
    expect(info.exports.find((e) => e["export-name"] === "mem")?.description).toBe("memory disk");
  });

  it("nbdinfo --map shows holes and data", async () => {
    const r = await run("nbdinfo", ["--map", uri(sock, "ro")], { timeoutMs: 15_000 });
    const lines = r.stdout
      .trim()
      .split("\n")
      .map((l) => l.trim().split(/\s+/).slice(0, 3).join(" "));
    expect(lines).toEqual([
      `0 ${MiB} 0`,
      `${MiB} ${3 * MiB} 3`,
      `${4 * MiB} ${256 * 1024} 0`,
      `${4 * MiB + 256 * 1024} ${12 * MiB - 256 * 1024} 3`,
    ]);
  });

  it("nbdcopy copies the export out (checksum) and a file in", async () => {
    const out = join(dir.path, "out.raw");
    let r = await run("nbdcopy", [uri(sock, "ro"), out], { timeoutMs: 30_000 });
    expect(r.code, r.stderr).toBe(0);
    expect(sha256(await readFile(out))).toBe(sha256(content));

    const src = join(dir.path, "in.raw");
    const data = pattern(7, 0, 16 * MiB);
    data.fill(0, 8 * MiB, 12 * MiB);
    await writeFile(src, data);
    r = await run("nbdcopy", [src, uri(sock, "mem")], { timeoutMs: 30_000 });
    expect(r.code, r.stderr).toBe(0);
    expect(sha256(await mem.read(0, 16 * MiB))).toBe(sha256(data));
  });

  it("qemu-img convert, compare and map over nbd+unix", async () => {
    const out = join(dir.path, "conv.qcow2");
    let r = await run("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", uri(sock, "ro"), out], {
      timeoutMs: 30_000,
    });
    expect(r.code, r.stderr).toBe(0);
    r = await run("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", uri(sock, "ro"), out], {
      timeoutMs: 30_000,
    });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    r = await run("qemu-img", ["map", "--output=json", "-f", "raw", uri(sock, "ro")], { timeoutMs: 30_000 });
    expect(r.code, r.stderr).toBe(0);
    const map = (
      JSON.parse(r.stdout) as { start: number; length: number; data: boolean; zero: boolean }[]
    ).map((e) => [e.start, e.length, e.data, e.zero]);
    expect(map).toEqual([
      [0, MiB, true, false],
      [MiB, 3 * MiB, false, true],
      [4 * MiB, 256 * 1024, true, false],
      [4 * MiB + 256 * 1024, 12 * MiB - 256 * 1024, false, true],
    ]);
  });

  it("qemu-img convert -n writes into the export (zero detection, fast zero), nbdcopy with 4 connections reads it", async () => {
    const node = await graph.open(memoryDriver, { size: 8 * MiB }, { nodeName: "mc" });
    await node.write(0, new Uint8Array(8 * MiB).fill(0xff));
    server.addExport({ name: "mc", node, writable: true, multiConn: true });
    try {
      const src = join(dir.path, "src.qcow2");
      let r = await run("qemu-img", ["create", "-f", "qcow2", src, "8M"], { timeoutMs: 15_000 });
      expect(r.code, r.stderr).toBe(0);
      r = await run("qemu-io", ["-f", "qcow2", "-c", `write -P 0x77 ${MiB} ${2 * MiB}`, src], {
        timeoutMs: 15_000,
      });
      expect(r.code, r.stderr).toBe(0);
      r = await run("qemu-img", ["convert", "-n", "-f", "qcow2", "-O", "raw", src, uri(sock, "mc")], {
        timeoutMs: 30_000,
      });
      expect(r.code, r.stderr).toBe(0);
      const want = new Uint8Array(8 * MiB);
      want.fill(0x77, MiB, 3 * MiB);
      expect(sha256(await node.read(0, 8 * MiB))).toBe(sha256(want));
      const out = join(dir.path, "mc.raw");
      r = await run("nbdcopy", ["--connections=4", "--requests=16", uri(sock, "mc"), out], {
        timeoutMs: 30_000,
      });
      expect(r.code, r.stderr).toBe(0);
      expect(sha256(await readFile(out))).toBe(sha256(want));
    } finally {
      await settled();
      await server.removeExport("mc");
      await graph.delete(node);
    }
  });

  it("qemu-io writes through the export and reads them back", async () => {
    const u = uri(sock, "mem");
    let r = await run(
      "qemu-io",
      [
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 4096 8192",
        "-c",
        "write -z 65536 65536",
        "-c",
        "write -f -P 0x33 1048576 512",
        u,
      ],
      { timeoutMs: 15_000 },
    );
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).not.toMatch(/error|fail/i);
    expect((await mem.read(4096, 8192)).every((b) => b === 0x5a)).toBe(true);
    expect((await mem.read(65536, 65536)).every((b) => b === 0)).toBe(true);
    expect((await mem.read(MiB, 512)).every((b) => b === 0x33)).toBe(true);
    r = await run(
      "qemu-io",
      ["-f", "raw", "-r", "-c", "read -P 0x5a 4096 8192", "-c", "read -P 0 65536 65536", u],
      {
        timeoutMs: 15_000,
      },
    );
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).not.toMatch(/Pattern verification failed|error/i);
  });

  it("qemu-io: writes to a read-only export fail", async () => {
    const r = await run("qemu-io", ["-f", "raw", "-c", "write -P 1 0 512", uri(sock, "ro")], {
      timeoutMs: 15_000,
    });
    expect(r.stdout + r.stderr).toMatch(/read-only|Operation not permitted|Permission denied/i);
  });

  it("nbdinfo --map equals qemu-nbd's for the same raw file", async () => {
    const file = join(dir.path, "same.raw");
    const data = new Uint8Array(8 * MiB);
    data.set(pattern(3, 0, 192 * 1024), 0);
    data.set(pattern(4, 3 * MiB, 64 * 1024), 3 * MiB);
    await writeFile(file, data.subarray(0, 0));
    const { open } = await import("node:fs/promises");
    const fh = await open(file, "r+");
    await fh.truncate(8 * MiB);
    await fh.write(data, 0, 192 * 1024, 0);
    await fh.write(data, 3 * MiB, 64 * 1024, 3 * MiB);
    await fh.close();
    const qsock = join(dir.path, "q.sock");
    const q = await spawnPeer("qemu-nbd", ["-f", "raw", "-r", "-x", "same", "-k", qsock, "-t", file], {
      ready: async () => {
        try {
          await waitForPath(qsock, 50);
          return true;
        } catch {
          return false;
        }
      },
      timeoutMs: 60_000,
    });
    peers.push(q);
    const node = await graph.open(fileDriver, { filename: file }, { nodeName: "same", readOnly: true });
    server.addExport({ name: "same", node, multiConn: false });
    try {
      const theirs = await run("nbdinfo", ["--map", uri(qsock, "same")], { timeoutMs: 15_000 });
      const ours = await run("nbdinfo", ["--map", uri(sock, "same")], { timeoutMs: 15_000 });
      expect(theirs.code, theirs.stderr).toBe(0);
      expect(ours.stdout).toBe(theirs.stdout);
    } finally {
      await settled();
      await server.removeExport("same");
      await graph.delete(node);
      await q.stop();
    }
  });

  it("--map of base:allocation, qemu:allocation-depth and a dirty bitmap equal qemu-nbd's for the same chain", async () => {
    const base = join(dir.path, "base.qcow2");
    const top = join(dir.path, "top.qcow2");
    const img = async (args: string[]): Promise<void> => {
      const r = await run("qemu-img", args, { timeoutMs: 15_000 });
      expect(r.code, r.stderr).toBe(0);
    };
    const io = async (file: string, cmds: string[]): Promise<void> => {
      const r = await run("qemu-io", ["-f", "qcow2", ...cmds.flatMap((c) => ["-c", c]), file], {
        timeoutMs: 15_000,
      });
      expect(r.code, r.stdout + r.stderr).toBe(0);
    };
    await img(["create", "-f", "qcow2", base, "8M"]);
    await io(base, [`write -P 0x11 0 ${MiB}`, `write -P 0x12 ${6 * MiB} ${MiB}`]);
    await img(["create", "-f", "qcow2", "-b", base, "-F", "qcow2", top]);
    await img(["bitmap", "--add", top, "b0"]);
    await io(top, [
      `write -P 0x21 ${2 * MiB} ${MiB}`,
      `write -z ${4 * MiB} ${MiB}`,
      `write -P 0x22 ${6 * MiB} 65536`,
    ]);
    const qsock = join(dir.path, "chain.sock");
    const q = await spawnPeer(
      "qemu-nbd",
      ["-f", "qcow2", "-r", "-A", "-B", "b0", "-x", "chain", "-k", qsock, "-t", top],
      {
        ready: async () => {
          try {
            await waitForPath(qsock, 50);
            return true;
          } catch {
            return false;
          }
        },
        timeoutMs: 60_000,
      },
    );
    peers.push(q);

    // The same layout in memory nodes (64 KiB clusters, as the qcow2 images).
    const mbase = await graph.open(memoryDriver, { size: 8 * MiB }, { nodeName: "mbase" });
    const mtop = await graph.open(
      memoryDriver,
      { size: 8 * MiB },
      { nodeName: "mtop", children: { backing: mbase } },
    );
    const b0 = mtop.createBitmapSync({ name: "b0", granularity: 65536 });
    await mbase.write(0, new Uint8Array(MiB).fill(0x11));
    await mbase.write(6 * MiB, new Uint8Array(MiB).fill(0x12));
    await mtop.write(2 * MiB, new Uint8Array(MiB).fill(0x21));
    await mtop.writeZeroes(4 * MiB, MiB);
    await mtop.write(6 * MiB, new Uint8Array(65536).fill(0x22));
    b0.disable();
    server.addExport({ name: "chain", node: mtop, allocationDepth: true, bitmaps: ["b0"], multiConn: false });
    try {
      for (const ctx of ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]) {
        const theirs = await run("nbdinfo", [`--map=${ctx}`, uri(qsock, "chain")], { timeoutMs: 15_000 });
        const ours = await run("nbdinfo", [`--map=${ctx}`, uri(sock, "chain")], { timeoutMs: 15_000 });
        expect(theirs.code, theirs.stderr).toBe(0);
        expect(ours.stdout, ctx).toBe(theirs.stdout);
      }
      const theirs = await run("nbdinfo", ["--json", uri(qsock, "chain")], { timeoutMs: 15_000 });
      const ours = await run("nbdinfo", ["--json", uri(sock, "chain")], { timeoutMs: 15_000 });
      const pick = (out: string): unknown => {
        const e = (JSON.parse(out) as { exports: Record<string, unknown>[] }).exports[0] ?? {};
        const { uri: _u, ...rest } = e;
        return rest;
      };
      expect(pick(ours.stdout)).toEqual(pick(theirs.stdout));
      const flat = join(dir.path, "chain.raw");
      const r = await run("qemu-img", ["convert", "-O", "raw", top, flat], { timeoutMs: 15_000 });
      expect(r.code, r.stderr).toBe(0);
      expect(sha256(await mtop.read(0, 8 * MiB))).toBe(sha256(await readFile(flat)));
    } finally {
      await settled();
      await server.removeExport("chain");
      expect(b0.busy).toBe(false);
      await q.stop();
    }
  });

  it("serves a node with requestAlignment 512 with minimum block 512", async () => {
    const node = await graph.open(memoryDriver, { size: MiB, requestAlignment: 512 }, { nodeName: "al" });
    (node.state as MemoryDriver).hook = undefined;
    server.addExport({ name: "al", node, writable: true });
    try {
      const r = await run("nbdinfo", ["--json", uri(sock, "al")], { timeoutMs: 15_000 });
      expect((JSON.parse(r.stdout) as { exports: Record<string, unknown>[] }).exports[0]).toMatchObject({
        block_size_minimum: 512,
        block_size_preferred: 4096,
      });
    } finally {
      await settled();
      await server.removeExport("al");
    }
  });
});
