// Persistent dirty bitmaps against QEMU: what blk stores, qemu-img info lists and qemu-storage-daemon
// exports over NBD (qemu:dirty-bitmap:NAME, read with nbdinfo --map) with the same dirty extents; what
// qemu-img bitmap / qemu-io store, blk loads with the same bits; refcounts stay exact (qemu-img check)
// after every change; in-use on disk while blk holds the image read-write.
import { existsSync } from "node:fs";
import { copyFile, open } from "node:fs/promises";
import type { DirtyBitmap } from "@blk/core";
import { makeTempDir, missingPeers, run, spawnPeer, type TempDir } from "@blk/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createQcow2, openQcow2 } from "../src/qcow2/index.ts";

const missing = missingPeers(["qemu-img", "qemu-io", "qemu-storage-daemon", "nbdinfo"]);
if (missing.length > 0) console.log(`qcow2-bitmaps.qemu.test: skipped, missing ${missing.join(", ")}`);
const KiB = 1024;
const MiB = 1024 * KiB;

/** qemu-storage-daemon runs so far (each gets its own socket and pid file). */
let qsdRuns = 0;

type Extent = [offset: number, length: number];

/** Dirty extents of a bitmap, merged. */
function blkExtents(b: DirtyBitmap): Extent[] {
  const out: Extent[] = [];
  for (let a = b.nextDirtyArea(0, b.size); a !== null; a = b.nextDirtyArea(a.start + a.count, b.size)) {
    const last = out.at(-1);
    if (last !== undefined && last[0] + last[1] === a.start) last[1] += a.count;
    else out.push([a.start, a.count]);
  }
  return out;
}

async function qemuInfo(file: string): Promise<Record<string, unknown>> {
  const r = await run("qemu-img", ["info", "-U", "--output=json", file]);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as Record<string, unknown>;
}

async function qemuBitmaps(file: string): Promise<unknown> {
  const info = (await qemuInfo(file)) as { "format-specific"?: { data?: { bitmaps?: unknown } } };
  return info["format-specific"]?.data?.bitmaps;
}

async function expectClean(file: string): Promise<void> {
  const r = await run("qemu-img", ["check", "-U", "--output=json", file]);
  expect(r.code, r.stdout + r.stderr).toBe(0);
  const c = JSON.parse(r.stdout) as Record<string, unknown>;
  expect(c.corruptions ?? 0).toBe(0);
  expect(c.leaks ?? 0).toBe(0);
}

/** Dirty extents of `name` as qemu-storage-daemon exports them (read-only) and nbdinfo maps them. */
async function qemuExtents(dir: TempDir, file: string, name: string): Promise<Extent[]> {
  const n = ++qsdRuns;
  const sock = dir.join(`nbd-${n}.sock`);
  const pid = dir.join(`qsd-${n}.pid`);
  await using qsd = await spawnPeer(
    "qemu-storage-daemon",
    [
      "--blockdev",
      `driver=file,filename=${file},node-name=f,read-only=on`,
      "--blockdev",
      "driver=qcow2,file=f,node-name=d,read-only=on",
      "--nbd-server",
      `addr.type=unix,addr.path=${sock}`,
      "--export",
      `type=nbd,id=e,node-name=d,name=x,bitmaps.0=${name}`,
      "--pidfile",
      pid,
    ],
    // the pid file is written once every socket listens
    { timeoutMs: 60_000, ready: () => existsSync(pid) },
  );
  const r = await run("nbdinfo", [`--map=qemu:dirty-bitmap:${name}`, `nbd+unix:///x?socket=${sock}`], {
    timeoutMs: 30_000,
  });
  expect(r.code, r.stderr + qsd.output()).toBe(0);
  const out: Extent[] = [];
  for (const line of r.stdout.split("\n")) {
    const m = /^\s*(\d+)\s+(\d+)\s+(\d+)/.exec(line);
    if (m === null || Number(m[3]) === 0) continue;
    out.push([Number(m[1]), Number(m[2])]);
  }
  return out;
}

describe.skipIf(missing.length > 0)("qcow2 persistent bitmaps vs QEMU", { tags: ["qemu"] }, () => {
  let dir: TempDir;
  beforeAll(() => {
    dir = makeTempDir("qcow2-bitmaps");
  });
  afterAll(() => dir.dispose());

  it("blk stores bitmaps: qemu-img info lists them, qsd exports the same bits, check is clean", async () => {
    const file = dir.join("blk.qcow2");
    await createQcow2({ filename: file, size: 64 * MiB });
    {
      await using img = await openQcow2(file, { writable: true });
      await img.node.createBitmap({ name: "b1", granularity: 64 * KiB, persistent: true });
      await img.node.createBitmap({ name: "b2", granularity: 4 * KiB, persistent: true, disabled: true });
      await img.node.createBitmap({ name: "clean", granularity: 512, persistent: true });
      await img.node.createBitmap({ name: "temp", granularity: 64 * KiB });
      await img.root.write(0, new Uint8Array(64 * KiB).fill(1));
      await img.root.write(10 * MiB + 100, new Uint8Array(MiB).fill(2));
      await img.root.write(40 * MiB, new Uint8Array(3 * MiB).fill(3));
      const b2 = img.node.getBitmap("b2");
      b2?.setDirty(5 * MiB, 12 * KiB);
      const clean = img.node.getBitmap("clean");
      clean?.resetDirty(0, 64 * MiB);
      // while open read-write, the stored bitmaps are marked in use (none stored yet: no extension)
      expect(await qemuBitmaps(file)).toBeUndefined();
    }
    // newest first, as QEMU stores the bitmaps it created in one session
    expect(await qemuBitmaps(file)).toEqual([
      { flags: ["auto"], name: "clean", granularity: 512 },
      { flags: [], name: "b2", granularity: 4 * KiB },
      { flags: ["auto"], name: "b1", granularity: 64 * KiB },
    ]);
    await expectClean(file);
    expect(await qemuExtents(dir, file, "b1")).toEqual([
      [0, 64 * KiB],
      [10 * MiB, MiB + 64 * KiB],
      [40 * MiB, 3 * MiB],
    ]);
    expect(await qemuExtents(dir, file, "b2")).toEqual([[5 * MiB, 12 * KiB]]);
    expect(await qemuExtents(dir, file, "clean")).toEqual([]);

    // reopened read-write: in use on disk; closed again: same bits, new writes added, still clean
    {
      await using img = await openQcow2(file, { writable: true });
      expect(await qemuBitmaps(file)).toEqual([
        { flags: ["in-use", "auto"], name: "clean", granularity: 512 },
        { flags: ["in-use"], name: "b2", granularity: 4 * KiB },
        { flags: ["in-use", "auto"], name: "b1", granularity: 64 * KiB },
      ]);
      const b1 = img.node.getBitmap("b1");
      if (b1 === undefined) throw new Error("b1 not loaded");
      expect(b1.persistent).toBe(true);
      expect(b1.inconsistent).toBe(false);
      expect(blkExtents(b1)).toEqual([
        [0, 64 * KiB],
        [10 * MiB, MiB + 64 * KiB],
        [40 * MiB, 3 * MiB],
      ]);
      expect(img.node.getBitmap("b2")?.enabled).toBe(false);
      expect(img.node.getBitmap("temp")).toBeUndefined();
      await img.root.write(63 * MiB, new Uint8Array(512).fill(4));
    }
    expect(await qemuExtents(dir, file, "b1")).toEqual([
      [0, 64 * KiB],
      [10 * MiB, MiB + 64 * KiB],
      [40 * MiB, 3 * MiB],
      [63 * MiB, 64 * KiB],
    ]);
    expect(await qemuExtents(dir, file, "clean")).toEqual([[63 * MiB, 512]]);
    expect(await qemuExtents(dir, file, "b2")).toEqual([[5 * MiB, 12 * KiB]]);
    await expectClean(file);

    // removal frees the clusters; removing the last one drops the extension
    {
      await using img = await openQcow2(file, { writable: true });
      await img.node.getBitmap("b1")?.remove();
      await expectClean(file);
      await img.node.getBitmap("b2")?.remove();
      await img.node.getBitmap("clean")?.remove();
      expect(await qemuBitmaps(file)).toBeUndefined();
      await expectClean(file);
    }
    expect(await qemuBitmaps(file)).toBeUndefined();
    await expectClean(file);
  });

  it("512-byte clusters: a bitmap table over several clusters, sparse data clusters, read back by QEMU", async () => {
    const file = dir.join("small-clusters.qcow2");
    // 160 MiB at 512 B per bit: 40 KiB of bitmap data in 80 clusters, a 640-byte (2-cluster) table
    await createQcow2({ filename: file, size: 160 * MiB, clusterSize: 512 });
    const extents: Extent[] = [
      [0, 512],
      [3 * MiB + 512, 1536],
      [77 * MiB, 2 * MiB],
      [160 * MiB - 1024, 1024],
    ];
    {
      await using img = await openQcow2(file, { writable: true });
      const b = await img.node.createBitmap({ name: "fine", granularity: 512, persistent: true });
      for (const [o, n] of extents) b.setDirty(o, n);
    }
    expect(await qemuBitmaps(file)).toEqual([{ flags: ["auto"], name: "fine", granularity: 512 }]);
    await expectClean(file);
    expect(await qemuExtents(dir, file, "fine")).toEqual(extents);
    await using img = await openQcow2(file);
    const fine = img.node.getBitmap("fine");
    expect(fine === undefined ? [] : blkExtents(fine)).toEqual(extents);
    expect(img.state.bitmaps[0]?.tableSize).toBe(80);
  });

  it("blk loads what qemu-img bitmap and qemu-io stored, and leaves it usable for QEMU", async () => {
    const file = dir.join("qemu.qcow2");
    const ok = async (cmd: string, args: string[]) => {
      const r = await run(cmd, args);
      expect(r.code, r.stderr).toBe(0);
    };
    await ok("qemu-img", ["create", "-q", "-f", "qcow2", file, "32M"]);
    await ok("qemu-img", ["bitmap", "--add", file, "a"]);
    await ok("qemu-img", ["bitmap", "--add", "-g", "8192", file, "d"]);
    await ok("qemu-io", ["-c", "write 0 100k", "-c", "write 20M 8k", file]);
    await ok("qemu-img", ["bitmap", "--disable", file, "d"]);
    await ok("qemu-io", ["-c", "write 30M 1M", file]);
    const before = { a: await qemuExtents(dir, file, "a"), d: await qemuExtents(dir, file, "d") };
    expect(before.a).toEqual([
      [0, 128 * KiB],
      [20 * MiB, 64 * KiB],
      [30 * MiB, MiB],
    ]);
    {
      await using img = await openQcow2(file);
      const a = img.node.getBitmap("a");
      const d = img.node.getBitmap("d");
      if (a === undefined || d === undefined) throw new Error("bitmaps not loaded");
      expect([a.granularity, a.enabled, a.persistent, a.inconsistent]).toEqual([64 * KiB, true, true, false]);
      expect([d.granularity, d.enabled]).toEqual([8 * KiB, false]);
      expect(blkExtents(a)).toEqual(before.a);
      expect(blkExtents(d)).toEqual(before.d);
      // read-only: nothing changes on disk
      expect(await qemuBitmaps(file)).toEqual([
        { flags: ["auto"], name: "a", granularity: 64 * KiB },
        { flags: [], name: "d", granularity: 8 * KiB },
      ]);
    }
    {
      await using img = await openQcow2(file, { writable: true });
      await img.root.write(16 * MiB, new Uint8Array(4096).fill(9));
    }
    expect(await qemuExtents(dir, file, "a")).toEqual([
      [0, 128 * KiB],
      [16 * MiB, 64 * KiB],
      [20 * MiB, 64 * KiB],
      [30 * MiB, MiB],
    ]);
    expect(await qemuExtents(dir, file, "d")).toEqual(before.d);
    await expectClean(file);
    // QEMU keeps using them
    await ok("qemu-io", ["-c", "write 31M 64k", file]);
    await ok("qemu-img", ["bitmap", "--clear", file, "d"]);
    expect(await qemuExtents(dir, file, "d")).toEqual([]);
    await expectClean(file);
  });

  it("reopen read-write marks the bitmaps in use; back to read-only they are stored, as QEMU", async () => {
    const file = dir.join("reopen.qcow2");
    await createQcow2({ filename: file, size: 8 * MiB });
    {
      await using img = await openQcow2(file, { writable: true });
      await img.node.createBitmap({ name: "r", granularity: 64 * KiB, persistent: true });
    }
    {
      await using img = await openQcow2(file);
      expect(img.node.getBitmap("r")?.readonly).toBe(true);
      await img.node.children.get("file")?.child.reopen({ readOnly: false });
      await img.node.reopen({ readOnly: false });
      expect(img.node.getBitmap("r")?.readonly).toBe(false);
      expect(await qemuBitmaps(file)).toEqual([
        { flags: ["in-use", "auto"], name: "r", granularity: 64 * KiB },
      ]);
      await img.node.write(2 * MiB, new Uint8Array(4096).fill(7));
      // BlockNode.reopen lets the driver finish its writes (bitmaps stored, in-use cleared) before the
      // file edge loses its write permission, as QEMU's reopen prepare step does.
      await img.node.reopen({ readOnly: true });
      expect(img.node.getBitmap("r")?.readonly).toBe(true);
    }
    expect(await qemuBitmaps(file)).toEqual([{ flags: ["auto"], name: "r", granularity: 64 * KiB }]);
    await expectClean(file);
    await using img = await openQcow2(file);
    expect(img.node.getBitmap("r")?.inconsistent).toBe(false);
    expect(img.node.getBitmap("r")?.count()).toBe(64 * KiB);
  });

  it("drops a bitmaps extension whose autoclear bit a program without bitmap support cleared, as QEMU", async () => {
    const q = dir.join("stale-q.qcow2");
    const b = dir.join("stale-b.qcow2");
    expect((await run("qemu-img", ["create", "-q", "-f", "qcow2", q, "8M"])).code).toBe(0);
    expect((await run("qemu-img", ["bitmap", "--add", q, "x"])).code).toBe(0);
    // autoclear_features (header offset 88): bit 0 cleared
    const fh = await open(q, "r+");
    await fh.write(new Uint8Array(8), 0, 8, 88);
    await fh.close();
    await copyFile(q, b);
    expect((await run("qemu-io", ["-c", "write 0 4k", q])).code).toBe(0);
    {
      await using img = await openQcow2(b, { writable: true });
      expect(img.state.bitmaps).toEqual([]);
      expect(img.node.bitmaps).toEqual([]);
      await img.root.write(0, new Uint8Array(4096).fill(1));
    }
    const check = async (f: string) => {
      const r = await run("qemu-img", ["check", "--output=json", f]);
      const j = JSON.parse(r.stdout) as Record<string, unknown>;
      return { code: r.code, leaks: j.leaks, corruptions: j.corruptions ?? 0, bitmaps: await qemuBitmaps(f) };
    };
    expect(await check(b)).toEqual(await check(q));
    expect((await check(b)).leaks).toBe(2);
  });

  it("refuses to open an image whose bitmap table is invalid, with QEMU's message", async () => {
    const file = dir.join("badtable.qcow2");
    expect((await run("qemu-img", ["create", "-q", "-f", "qcow2", file, "8M"])).code).toBe(0);
    expect((await run("qemu-img", ["bitmap", "--add", file, "b"])).code).toBe(0);
    expect((await run("qemu-io", ["-c", "write 0 64k", file])).code).toBe(0);
    let tableOffset = 0;
    {
      await using img = await openQcow2(file);
      tableOffset = img.state.bitmaps[0]?.tableOffset ?? 0;
    }
    const fh = await open(file, "r+");
    await fh.write(Buffer.from("0000000000000002", "hex"), 0, 8, tableOffset); // a reserved bit
    await fh.close();
    const q = await run("qemu-img", ["info", file]);
    const message = "Could not read bitmap_table table from image for bitmap 'b': Invalid argument";
    expect(q.stderr).toContain(message);
    await expect(openQcow2(file)).rejects.toThrow(message);
  });

  it("refuses persistent bitmaps on v2 images and past QEMU's limits, with its messages", async () => {
    const v2 = dir.join("v2.qcow2");
    await createQcow2({ filename: v2, size: 8 * MiB, compat: "0.10" });
    {
      await using img = await openQcow2(v2, { writable: true });
      const node = img.node.nodeName;
      await expect(img.node.createBitmap({ name: "x", persistent: true })).rejects.toThrow(
        `Can't make bitmap 'x' persistent in '${node}': Cannot store dirty bitmaps in qcow2 v2 files`,
      );
    }
    const v3 = dir.join("v3.qcow2");
    await createQcow2({ filename: v3, size: 8 * MiB });
    await using img = await openQcow2(v3, { writable: true });
    const node = img.node.nodeName;
    await expect(
      img.node.createBitmap({ name: "g", persistent: true, granularity: 2 ** 32 }),
    ).rejects.toThrow(
      `Can't make bitmap 'g' persistent in '${node}': Granularity exceeds maximum (2147483648 bytes)`,
    );
    await img.node.createBitmap({ name: "ok", persistent: true });
    await expect(img.node.createBitmap({ name: "ok", persistent: true })).rejects.toThrow(
      "Bitmap already exists: ok",
    );
  });
});
