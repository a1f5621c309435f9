/**
 * Clean shutdown of a real blkd process: SIGTERM (or SIGINT) while a mirror job runs and an NBD client
 * is connected and has written. The job is cancelled, the export closed, the persistent bitmap stored,
 * and the qcow2 (lazy refcounts, so dirty-flagged while in use) is left clean: `qemu-img check` finds
 * nothing and `qemu-img info` shows no dirty flag and a bitmap not in use.
 */
import { existsSync } from "node:fs";
import { QmpClient } from "@blk/qmp";
import { makeTempDir, missingPeers, run, spawnPeer } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { BLKD, BUILT } from "./daemonize-helpers.ts";

const missing = missingPeers(["qemu-img", "qemu-io"]);
if (missing.length > 0) console.log(`shutdown.qemu.test: skipped, missing ${missing.join(", ")}`);
if (!BUILT) console.log("shutdown.qemu.test: skipped, apps/daemon/dist/main.js not built (pnpm build)");

interface ImageInfo {
  "dirty-flag"?: boolean;
  "format-specific"?: {
    data?: { "lazy-refcounts"?: boolean; bitmaps?: { name: string; flags: string[] }[] };
  };
}

async function info(img: string): Promise<ImageInfo> {
  const r = await run("qemu-img", ["info", "-U", "--output=json", img]);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as ImageInfo;
}

describe.skipIf(missing.length > 0 || !BUILT)("blkd shutdown on a signal", { tags: ["qemu"] }, () => {
  it.each(["SIGTERM", "SIGINT"] as const)(
    "%s with a running job and a connected NBD client leaves a clean image",
    async (signal) => {
      await using dir = makeTempDir("blkd-shutdown");
      const img = dir.join("disk.qcow2");
      const c = await run("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "64M"]);
      expect(c.code, c.stderr).toBe(0);
      const w = await run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 4M", img]);
      expect(w.code, w.stderr).toBe(0);
      const qmpSock = dir.join("qmp.sock");
      const nbdSock = dir.join("nbd.sock");
      await using daemon = await spawnPeer(
        process.execPath,
        [
          BLKD,
          "--blockdev",
          `driver=file,node-name=disk-file,filename=${img}`,
          "--blockdev",
          "driver=qcow2,node-name=disk,file=disk-file",
          "--blockdev",
          "driver=null-co,node-name=target,size=67108864",
          "--nbd-server",
          `addr.type=unix,addr.path=${nbdSock}`,
          "--export",
          "type=nbd,id=e0,node-name=disk,name=disk,writable=on",
          "--chardev",
          `socket,id=m0,path=${qmpSock},server=on,wait=off`,
          "--monitor",
          "chardev=m0",
        ],
        { timeoutMs: 60_000, ready: () => existsSync(qmpSock) && existsSync(nbdSock) },
      );
      const qmp = await QmpClient.connect({ path: qmpSock }, { timeoutMs: 10_000 });
      await qmp.execute("block-dirty-bitmap-add", { node: "disk", name: "b0", persistent: true });
      // Slow enough (64 KiB/s over 4 MiB of data) to be running whenever the signal comes.
      await qmp.execute("blockdev-mirror", {
        "job-id": "m0",
        device: "disk",
        target: "target",
        sync: "full",
        speed: 65536,
      });
      await waitJob(qmp, "m0", "running");

      // A client that writes, then stays connected.
      await using client = await spawnPeer(
        "qemu-io",
        [
          "-f",
          "raw",
          "-c",
          "write -P 0x5a 8M 64k",
          "-c",
          "sleep 600000",
          `nbd+unix:///disk?socket=${nbdSock}`,
        ],
        { timeoutMs: 120_000 },
      );
      await waitFor(async () => {
        const nodes =
          await qmp.execute<{ "node-name": string; "dirty-bitmaps"?: { count: number }[] }[]>(
            "query-named-block-nodes",
          );
        return (nodes.find((n) => n["node-name"] === "disk")?.["dirty-bitmaps"]?.[0]?.count ?? 0) > 0;
      }, "the client's write");
      // In use: the allocating write set the dirty flag (lazy refcounts); the new persistent bitmap is
      // only written when the node closes, as QEMU does.
      const during = await info(img);
      expect(during["dirty-flag"]).toBe(true);
      expect(during["format-specific"]?.data?.bitmaps).toBeUndefined();
      expect((await qmp.execute<{ id: string; status: string }[]>("query-jobs"))[0]?.status).toBe("running");

      const mark = qmp.eventMark();
      daemon.child.kill(signal);
      expect(await daemon.exited).toBe(0);
      // The monitor stays open until the end of the shutdown: it saw the export go and the job cancelled.
      expect((await qmp.waitEvent("BLOCK_EXPORT_DELETED", { since: mark, timeoutMs: 1000 })).data).toEqual({
        id: "e0",
      });
      expect(
        (await qmp.waitEvent("BLOCK_JOB_CANCELLED", { since: mark, timeoutMs: 1000 })).data,
      ).toMatchObject({
        device: "m0",
        type: "mirror",
      });
      await qmp.close().catch(() => {});
      const logs = daemon
        .output()
        .split("\n")
        .filter((l) => l.startsWith("{"))
        .map((l) => JSON.parse(l) as { msg: string; reason?: string });
      expect(logs.find((l) => l.msg === "shutdown requested")?.reason).toBe(signal);
      expect(logs.map((l) => l.msg)).toContain("export deleted");
      expect(logs.at(-1)?.msg).toBe("shut down");
      await client.stop();

      const check = await run("qemu-img", ["check", "-f", "qcow2", img]);
      expect(check.code, check.stdout + check.stderr).toBe(0);
      expect(check.stdout).toContain("No errors were found on the image.");
      const after = await info(img);
      expect(after["dirty-flag"]).toBe(false);
      expect(after["format-specific"]?.data?.["lazy-refcounts"]).toBe(true);
      expect(after["format-specific"]?.data?.bitmaps).toEqual([
        { name: "b0", granularity: 65536, flags: ["auto"] },
      ]);
      const read = await run("qemu-io", [
        "-f",
        "qcow2",
        "-c",
        "read -P 0x11 0 4M",
        "-c",
        "read -P 0x5a 8M 64k",
        img,
      ]);
      expect(read.code, read.stderr).toBe(0);
      expect(read.stdout).not.toContain("Pattern verification failed");
    },
  );
});

async function waitFor(cond: () => Promise<boolean>, what: string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function waitJob(qmp: QmpClient, id: string, status: string): Promise<void> {
  return waitFor(async () => {
    const jobs = await qmp.execute<{ id: string; status: string }[]>("query-jobs");
    return jobs.some((j) => j.id === id && j.status === status);
  }, `job ${id} ${status}`);
}
