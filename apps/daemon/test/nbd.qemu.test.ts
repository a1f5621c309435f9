/** NBD exports of blkd read and written by qemu-io and nbdinfo; the built bin run as a process. */
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { QmpClient } from "@blk/qmp";
import { makeTempDir, missingPeers, pattern, run, sha256, spawnPeer, waitForPath } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { createDaemon } from "../src/index.ts";

const missing = missingPeers(["qemu-io", "nbdinfo"]);
if (missing.length > 0) console.log(`nbd.qemu.test: skipped, missing ${missing.join(", ")}`);
const MiB = 1 << 20;

const binDir = fileURLToPath(new URL("../", import.meta.url));
const built = existsSync(`${binDir}dist/main.js`);
if (!built) console.log("nbd.qemu.test: bin test skipped, apps/daemon/dist/main.js not built (pnpm build)");

describe.skipIf(missing.length > 0)("NBD exports", { tags: ["qemu"] }, () => {
  it("qemu-io writes through an export, the bitmap counts 3 granules, the file has the data", async () => {
    await using dir = makeTempDir("blkd");
    const img = dir.join("a.img");
    writeFileSync(img, Buffer.alloc(64 * MiB));
    const nbd = dir.join("nbd.sock");
    await using daemon = await createDaemon({
      options: [
        ["blockdev", `driver=raw,node-name=a,file.driver=file,file.filename=${img}`],
        ["nbd-server", `addr.type=unix,addr.path=${nbd}`],
      ],
    });
    await daemon.execute("block-dirty-bitmap-add", { node: "a", name: "b0" });
    await daemon.execute("block-export-add", {
      type: "nbd",
      id: "exp0",
      "node-name": "a",
      name: "disk",
      writable: true,
    });
    const uri = `nbd+unix:///disk?socket=${nbd}`;
    const w = await run("qemu-io", [
      "-f",
      "raw",
      "-c",
      "write -P 0x77 1M 64k",
      "-c",
      "write -P 0x78 20M 100k",
      uri,
    ]);
    expect(w.code, w.stderr).toBe(0);
    const nodes = (await daemon.execute("query-named-block-nodes", { flat: true })) as {
      "node-name": string;
      "dirty-bitmaps"?: { name: string; count: number }[];
    }[];
    expect(nodes.find((n) => n["node-name"] === "a")?.["dirty-bitmaps"]).toMatchObject([
      { name: "b0", count: 196608 },
    ]);
    const info = await run("nbdinfo", ["--size", uri]);
    expect(info.stdout.trim()).toBe(String(64 * MiB));
    await daemon.execute("block-export-del", { id: "exp0" });
    await daemon.close();
    const data = readFileSync(img);
    expect(data[MiB]).toBe(0x77);
    expect(data[20 * MiB + 100 * 1024 - 1]).toBe(0x78);
    expect(data[20 * MiB + 100 * 1024]).toBe(0);
  });

  it.skipIf(!built)(
    "bin/blkd.js: configured from the command line, serves NBD, exits 0 on SIGTERM",
    async () => {
      await using dir = makeTempDir("blkd");
      const img = dir.join("disk.img");
      const content = pattern(7, 0, 4 * MiB);
      writeFileSync(img, content);
      const sock = dir.join("qmp.sock");
      const nbd = dir.join("nbd.sock");
      const pid = dir.join("blkd.pid");
      await using peer = await spawnPeer(
        process.execPath,
        [
          `${binDir}bin/blkd.js`,
          "--chardev",
          `socket,path=${sock},server=on,wait=off,id=m`,
          "--monitor",
          "chardev=m",
          "--blockdev",
          `driver=file,node-name=disk-file,filename=${img}`,
          "--blockdev",
          "driver=raw,node-name=disk,file=disk-file",
          "--object",
          "throttle-group,id=tg0,x-bps-total=104857600",
          "--blockdev",
          "driver=throttle,node-name=disk-thr,throttle-group=tg0,file=disk",
          "--nbd-server",
          `addr.type=unix,addr.path=${nbd}`,
          "--export",
          "type=nbd,id=exp0,node-name=disk-thr,name=disk",
          "--pidfile",
          pid,
        ],
        // The file appears (locked) before the pid is written in it, as QEMU's.
        { timeoutMs: 30_000, ready: () => existsSync(pid) && /^\d+\n$/.test(readFileSync(pid, "utf8")) },
      );
      expect(readFileSync(pid, "utf8").trim()).toBe(String(peer.pid));
      await waitForPath(sock);
      await using qmp = await QmpClient.connect({ path: sock });
      expect(await qmp.execute("query-block-exports")).toEqual([
        { id: "exp0", type: "nbd", "node-name": "disk-thr", "shutting-down": false },
      ]);
      const out = dir.join("copy.img");
      const r = await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        `nbd+unix:///disk?socket=${nbd}`,
        out,
      ]);
      expect(r.code, r.stderr).toBe(0);
      expect(sha256(readFileSync(out))).toBe(sha256(content));
      await qmp.close();
      peer.child.kill("SIGTERM");
      expect(await peer.exited).toBe(0);
      expect(existsSync(pid)).toBe(false);
      const logs = peer
        .output()
        .split("\n")
        .filter((l) => l.startsWith("{"))
        .map((l) => JSON.parse(l) as { msg: string });
      expect(logs.at(-1)?.msg).toBe("shut down");
    },
  );
});
