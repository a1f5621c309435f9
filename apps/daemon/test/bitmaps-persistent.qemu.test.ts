/**
 * Persistent dirty bitmaps through QMP, checked with QEMU: `block-dirty-bitmap-add persistent: true`
 * asks the qcow2 driver (QEMU's messages for v2 images), the bitmap reaches the image when the daemon
 * closes or quits (qemu-img info, and qemu-storage-daemon exports the same dirty extents), a persistent
 * bitmap removed leaves the image at once, bitmaps QEMU stored are loaded. A blkd killed (SIGKILL) while
 * writing with an auto bitmap leaves it in use: blk then reports it inconsistent, refuses to use it,
 * allows its removal, and `qemu-img check` stays clean throughout.
 */
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { backendParent, PERM } from "@blk/core";
import { createQcow2 } from "@blk/drivers/qcow2";
import { QmpClient } from "@blk/qmp";
import { missingPeers, run, spawnPeer, type TempDir, waitForPath } from "@blk/testkit";
import { describe, expect, it, onTestFinished } from "vitest";
import { generic, type Session, startSession } from "./helpers.ts";

const missing = missingPeers(["qemu-img", "qemu-io", "qemu-storage-daemon", "nbdinfo"]);
if (missing.length > 0) console.log(`bitmaps-persistent.qemu.test: skipped, missing ${missing.join(", ")}`);
const binDir = fileURLToPath(new URL("../", import.meta.url));
const built = existsSync(`${binDir}dist/main.js`);
if (!built)
  console.log("bitmaps-persistent.qemu.test: crash test skipped, apps/daemon/dist not built (pnpm build)");
const KiB = 1024;
const MiB = 1024 * KiB;

/** qemu-storage-daemon runs so far (each gets its own socket and pid file). */
let qsdRuns = 0;

async function infoBitmaps(file: string): Promise<unknown> {
  const r = await run("qemu-img", ["info", "-U", "--output=json", file]);
  expect(r.code, r.stderr).toBe(0);
  const info = JSON.parse(r.stdout) as { "format-specific"?: { data?: { bitmaps?: unknown } } };
  return info["format-specific"]?.data?.bitmaps;
}

async function expectClean(file: string): Promise<void> {
  const r = await run("qemu-img", ["check", "-U", file]);
  expect(r.stdout + r.stderr).toContain("No errors were found on the image.");
  expect(r.code).toBe(0);
}

/** Dirty extents of `name` as qemu-storage-daemon exports them (read-only), from nbdinfo --map. */
async function qemuExtents(dir: TempDir, file: string, name: string): Promise<[number, number][]> {
  const n = ++qsdRuns;
  const sock = dir.join(`qsd-${n}.sock`);
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
  const args = [`--map=qemu:dirty-bitmap:${name}`, `nbd+unix:///x?socket=${sock}`];
  const r = await run("nbdinfo", args, { timeoutMs: 30_000 });
  expect(r.code, r.stderr + qsd.output()).toBe(0);
  const out: [number, number][] = [];
  for (const line of r.stdout.split("\n")) {
    const m = /^\s*(\d+)\s+(\d+)\s+(\d+)/.exec(line);
    if (m !== null && Number(m[3]) !== 0) out.push([Number(m[1]), Number(m[2])]);
  }
  return out;
}

async function addDisk(s: Session, file: string, name = "disk"): Promise<void> {
  await s.qmp.execute("blockdev-add", {
    driver: "qcow2",
    "node-name": name,
    file: { driver: "file", filename: file },
  });
}

interface DirtyInfo {
  name?: string;
  persistent: boolean;
  recording: boolean;
  count: number;
  granularity: number;
  inconsistent?: boolean;
}

async function dirtyBitmaps(s: Session, node: string): Promise<DirtyInfo[]> {
  const nodes = (await s.qmp.execute("query-named-block-nodes")) as {
    "node-name": string;
    "dirty-bitmaps"?: DirtyInfo[];
  }[];
  return nodes.find((n) => n["node-name"] === node)?.["dirty-bitmaps"] ?? [];
}

describe.skipIf(missing.length > 0)("persistent bitmaps over QMP vs QEMU", { tags: ["qemu"] }, () => {
  it("add persistent: stored at close, same bits in qemu-storage-daemon; remove deletes it at once", async () => {
    const s = await startSession({ log: () => {} });
    onTestFinished(() => s.dir.dispose());
    const file = s.dir.join("disk.qcow2");
    const v2 = s.dir.join("v2.qcow2");
    try {
      await createQcow2({ filename: file, size: 32 * MiB });
      await createQcow2({ filename: v2, size: 32 * MiB, compat: "0.10" });
      await addDisk(s, file);
      await addDisk(s, v2, "old");
      expect(await s.error("block-dirty-bitmap-add", { node: "old", name: "x", persistent: true })).toEqual(
        generic("Can't make bitmap 'x' persistent in 'old': Cannot store dirty bitmaps in qcow2 v2 files"),
      );
      await s.qmp.execute("block-dirty-bitmap-add", { node: "disk", name: "p", persistent: true });
      await s.qmp.execute("block-dirty-bitmap-add", {
        node: "disk",
        name: "gone",
        persistent: true,
        granularity: 4096,
      });
      await s.qmp.execute("block-dirty-bitmap-add", { node: "disk", name: "t" });
      const disk = s.daemon.graph.find("disk");
      if (disk === undefined) throw new Error("no disk");
      const vm = s.daemon.graph.attach(backendParent(), disk, {
        name: "root",
        perm: PERM.WRITE | PERM.CONSISTENT_READ,
      });
      await vm.write(MiB, new Uint8Array(100 * KiB).fill(1));
      await vm.write(20 * MiB, new Uint8Array(512).fill(2));
      vm.detach();
      expect((await dirtyBitmaps(s, "disk")).map((b) => [b.name, b.persistent, b.count])).toEqual([
        ["t", false, 192 * KiB],
        ["gone", true, 104 * KiB],
        ["p", true, 192 * KiB],
      ]);
      // nothing stored yet; a removed persistent bitmap never reaches the image
      expect(await infoBitmaps(file)).toBeUndefined();
      await s.qmp.execute("block-dirty-bitmap-remove", { node: "disk", name: "gone" });
    } finally {
      await s.qmp.close();
      await s.daemon.close();
    }
    expect(await infoBitmaps(file)).toEqual([{ flags: ["auto"], name: "p", granularity: 64 * KiB }]);
    await expectClean(file);
    expect(await qemuExtents(s.dir, file, "p")).toEqual([
      [MiB, 128 * KiB],
      [20 * MiB, 64 * KiB],
    ]);

    // loaded again; marked in use while open; removal deletes it from the image at once
    const s2 = await startSession({ log: () => {} });
    onTestFinished(() => s2.dir.dispose());
    try {
      await addDisk(s2, file);
      expect(await dirtyBitmaps(s2, "disk")).toEqual([
        { name: "p", recording: true, busy: false, persistent: true, granularity: 65536, count: 192 * KiB },
      ]);
      expect(await infoBitmaps(file)).toEqual([{ flags: ["in-use", "auto"], name: "p", granularity: 65536 }]);
      await s2.qmp.execute("block-dirty-bitmap-remove", { node: "disk", name: "p" });
      expect(await infoBitmaps(file)).toBeUndefined();
      await expectClean(file);
    } finally {
      await s2.qmp.close();
      await s2.daemon.close();
    }
  });

  it("loads what qemu-storage-daemon stored, with the same bits", async () => {
    const s = await startSession({ log: () => {} });
    onTestFinished(() => s.dir.dispose());
    const file = s.dir.join("qsd.qcow2");
    try {
      const c = await run("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", file, "8M"]);
      expect(c.code, c.stderr).toBe(0);
      const qmpSock = s.dir.join("qsd-qmp.sock");
      const nbd = s.dir.join("qsd-nbd.sock");
      await using qsd = await spawnPeer(
        "qemu-storage-daemon",
        [
          "--chardev",
          `socket,path=${qmpSock},server=on,wait=off,id=m`,
          "--monitor",
          "chardev=m",
          "--blockdev",
          `driver=file,filename=${file},node-name=f`,
          "--blockdev",
          "driver=qcow2,file=f,node-name=d",
          "--nbd-server",
          `addr.type=unix,addr.path=${nbd}`,
          "--export",
          "type=nbd,id=e,node-name=d,name=x,writable=on",
          "--pidfile",
          s.dir.join("qsd.pid"),
        ],
        // the pid file is written once every socket listens
        { timeoutMs: 60_000, ready: () => existsSync(s.dir.join("qsd.pid")) },
      );
      await using q = await QmpClient.connect({ path: qmpSock }, { timeoutMs: 10_000 });
      await q.execute("block-dirty-bitmap-add", { node: "d", name: "auto4k", persistent: true });
      await q.execute("block-dirty-bitmap-add", {
        node: "d",
        name: "g64k",
        persistent: true,
        granularity: 65536,
      });
      const io = await run("qemu-io", [
        "-f",
        "raw",
        "-c",
        "write 4097 10",
        "-c",
        "write 3M 300k",
        `nbd+unix:///x?socket=${nbd}`,
      ]);
      expect(io.code, io.stderr).toBe(0);
      await q.execute("block-dirty-bitmap-disable", { node: "d", name: "g64k" });
      await q.execute("quit").catch(() => {});
      expect(await qsd.exited).toBe(0);
      const want = {
        auto4k: await qemuExtents(s.dir, file, "auto4k"),
        g64k: await qemuExtents(s.dir, file, "g64k"),
      };
      expect(want.auto4k).toEqual([
        [4096, 4096],
        [3 * MiB, 300 * KiB],
      ]);
      await addDisk(s, file);
      const node = s.daemon.graph.find("disk");
      for (const name of ["auto4k", "g64k"] as const) {
        const b = node?.getBitmap(name);
        if (b === undefined) throw new Error(`${name} not loaded`);
        const got: [number, number][] = [];
        for (let a = b.nextDirtyArea(0, b.size); a !== null; a = b.nextDirtyArea(a.start + a.count, b.size)) {
          got.push([a.start, a.count]);
        }
        expect(got, name).toEqual(want[name]);
      }
      // loaded in directory order (QEMU stored the newer first), each put in front as QEMU does
      expect((await dirtyBitmaps(s, "disk")).map((b) => [b.name, b.recording, b.granularity])).toEqual([
        ["auto4k", true, 4096],
        ["g64k", false, 65536],
      ]);
    } finally {
      await s.qmp.close();
      await s.daemon.close();
    }
    await expectClean(file);
  });

  it.skipIf(!built)(
    "bin/blkd.js: quit stores the bitmap; SIGKILL during writes leaves it in use, then inconsistent",
    async () => {
      const s = await startSession({ log: () => {} });
      onTestFinished(() => s.dir.dispose());
      const file = s.dir.join("crash.qcow2");
      try {
        await createQcow2({ filename: file, size: 16 * MiB });
        // the clusters the guest rewrites exist beforehand: the crash cannot leak allocations
        const w = await run("qemu-io", ["-f", "qcow2", "-c", "write -P 7 0 4M", file]);
        expect(w.code, w.stderr).toBe(0);
        const spawnBlkd = async (tag: string) => {
          const sock = s.dir.join(`qmp-${tag}.sock`);
          const nbd = s.dir.join(`nbd-${tag}.sock`);
          const pid = s.dir.join(`blkd-${tag}.pid`);
          const peer = await spawnPeer(
            process.execPath,
            [
              `${binDir}bin/blkd.js`,
              "--chardev",
              `socket,path=${sock},server=on,wait=off,id=m`,
              "--monitor",
              "chardev=m",
              "--blockdev",
              `driver=file,node-name=f,filename=${file}`,
              "--blockdev",
              "driver=qcow2,node-name=disk,file=f",
              "--nbd-server",
              `addr.type=unix,addr.path=${nbd}`,
              "--export",
              "type=nbd,id=e,node-name=disk,name=disk,writable=on",
              "--pidfile",
              pid,
            ],
            // the pid file is written once the command line is applied
            { timeoutMs: 60_000, ready: () => existsSync(pid) },
          );
          await waitForPath(sock);
          const qmp = await QmpClient.connect({ path: sock }, { timeoutMs: 10_000 });
          return { peer, qmp, nbd };
        };

        // 1. a persistent bitmap made over QMP is in the image after quit
        const a = await spawnBlkd("a");
        try {
          await a.qmp.execute("block-dirty-bitmap-add", { node: "disk", name: "b1", persistent: true });
          await a.qmp.execute("quit").catch(() => {});
          expect(await a.peer.exited).toBe(0);
        } finally {
          await a.qmp.close();
          await a.peer.stop();
        }
        expect(await infoBitmaps(file)).toEqual([{ flags: ["auto"], name: "b1", granularity: 65536 }]);
        await expectClean(file);

        // 2. killed while a client writes through NBD
        const b = await spawnBlkd("b");
        const uri = `nbd+unix:///disk?socket=${b.nbd}`;
        const writes = Array.from({ length: 64 }, (_, i) => [
          "-c",
          `write -P ${i} ${(i % 64) * 64}k 64k`,
        ]).flat();
        const writer = await spawnPeer("qemu-io", ["-f", "raw", ...writes, uri], { timeoutMs: 60_000 });
        try {
          // wait until the bitmap has recorded writes, then kill the daemon
          const deadline = Date.now() + 30_000;
          for (;;) {
            const nodes = (await b.qmp.execute("query-named-block-nodes")) as {
              "node-name": string;
              "dirty-bitmaps"?: DirtyInfo[];
            }[];
            const bm = nodes.find((n) => n["node-name"] === "disk")?.["dirty-bitmaps"]?.[0];
            if ((bm?.count ?? 0) > 0) break;
            if (Date.now() > deadline) {
              throw new Error(`no write reached the bitmap: ${writer.output()} ${b.peer.output()}`);
            }
            await new Promise((r) => setTimeout(r, 20));
          }
          b.peer.child.kill("SIGKILL");
          await b.peer.exited;
        } finally {
          await b.qmp.close().catch(() => {});
          await b.peer.stop();
          await writer.stop();
        }
        expect(await infoBitmaps(file)).toEqual([
          { flags: ["in-use", "auto"], name: "b1", granularity: 65536 },
        ]);
        await expectClean(file);

        // 3. blk reports it inconsistent, refuses to use it, removes it
        await addDisk(s, file);
        expect(await dirtyBitmaps(s, "disk")).toEqual([
          {
            name: "b1",
            recording: false,
            busy: false,
            persistent: true,
            granularity: 65536,
            count: 0,
            inconsistent: true,
          },
        ]);
        for (const cmd of ["block-dirty-bitmap-clear", "block-dirty-bitmap-enable"]) {
          expect(await s.error(cmd, { node: "disk", name: "b1" })).toEqual(
            generic("Bitmap 'b1' is inconsistent and cannot be used"),
          );
        }
        await s.qmp.execute("block-dirty-bitmap-add", { node: "disk", name: "t" });
        expect(
          await s.error("block-dirty-bitmap-merge", { node: "disk", target: "t", bitmaps: ["b1"] }),
        ).toEqual(generic("Bitmap 'b1' is inconsistent and cannot be used"));
        await s.qmp.execute("block-dirty-bitmap-remove", { node: "disk", name: "b1" });
        expect(await infoBitmaps(file)).toBeUndefined();
        await expectClean(file);
        await s.qmp.close();
        await s.daemon.close();
        expect(await infoBitmaps(file)).toBeUndefined();
        await expectClean(file);
      } finally {
        await s.qmp.close();
        await s.daemon.close();
      }
    },
  );
});
