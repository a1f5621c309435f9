import {
  makeTempDir,
  missingPeers,
  type Peer,
  PeerTimeoutError,
  run,
  spawnPeer,
  waitForPath,
} from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { isQmpConnectionError, isQmpError, QmpClient } from "../src/index.ts";

const PEERS = ["qemu-storage-daemon", "qemu-img", "qemu-io"];
const missing = missingPeers(PEERS);
if (missing.length > 0) console.warn(`client-qsd.test.ts skipped: ${missing.join(", ")} not installed`);

const dir = makeTempDir("qmp-qsd");
const peers: Peer[] = [];
afterAll(async () => {
  await Promise.all(peers.map((p) => p.stop()));
  await dir.dispose();
});

/** Starts qemu-storage-daemon with a QMP monitor and connects; retried once (7.2 rarely hangs at start-up). */
async function startDaemon(sock: string): Promise<{ peer: Peer; qmp: QmpClient }> {
  for (let attempt = 1; ; attempt++) {
    const peer = await spawnPeer(
      "qemu-storage-daemon",
      ["--chardev", `socket,id=m0,path=${sock},server=on,wait=off`, "--monitor", "chardev=m0"],
      { timeoutMs: 120_000 },
    );
    peers.push(peer);
    try {
      await waitForPath(sock, 5000);
      const qmp = await QmpClient.connect({ path: sock }, { timeoutMs: 5000 });
      return { peer, qmp };
    } catch (e) {
      await peer.stop(0);
      if (attempt >= 2 || !(e instanceof PeerTimeoutError || isQmpConnectionError(e))) throw e;
    }
  }
}

/** Tagged `qemu` (blkProject declares the tag, so root and package-level runs both know it). */
function qemuDescribe(name: string, body: () => void): void {
  describe.skipIf(missing.length > 0)(name, { tags: ["qemu"] }, body);
}

qemuDescribe("QmpClient against qemu-storage-daemon 7.2", () => {
  it("adds nodes, mirrors src to dst to completion, and reports QEMU's error classes", async () => {
    const src = dir.join("src.qcow2");
    const dst = dir.join("dst.qcow2");
    for (const img of [src, dst])
      expect((await run("qemu-img", ["create", "-q", "-f", "qcow2", img, "64M"])).code).toBe(0);
    expect((await run("qemu-io", ["-c", "write -P 0x11 0 1M", src])).code).toBe(0);

    const { peer, qmp } = await startDaemon(dir.join("qmp.sock"));
    try {
      expect(qmp.greeting.version.qemu.major).toBe(7);
      expect(qmp.greeting.capabilities).toEqual(["oob"]);
      const version = await qmp.execute<{ qemu: { major: number; minor: number }; package: string }>(
        "query-version",
      );
      expect(version.qemu).toMatchObject({ major: 7, minor: 2 });

      for (const [name, filename] of [
        ["src", src],
        ["dst", dst],
      ] as const) {
        expect(
          await qmp.execute("blockdev-add", {
            driver: "qcow2",
            "node-name": name,
            file: { driver: "file", filename },
          }),
        ).toEqual({});
      }
      const nodes = await qmp.execute<{ "node-name": string; drv: string }[]>("query-named-block-nodes");
      expect(
        nodes
          .filter((n) => n.drv === "qcow2")
          .map((n) => n["node-name"])
          .sort(),
      ).toEqual(["dst", "src"]);

      const mark = qmp.eventMark();
      expect(
        await qmp.execute("blockdev-mirror", {
          "job-id": "mirror0",
          device: "src",
          target: "dst",
          sync: "full",
        }),
      ).toEqual({});
      const mine = (d: Record<string, unknown>): boolean => d.device === "mirror0" || d.id === "mirror0";
      const created = await qmp.waitEvent("JOB_STATUS_CHANGE", { since: mark, where: mine, timeoutMs: 5000 });
      expect(created.data).toEqual({ status: "created", id: "mirror0" });
      const ready = await qmp.waitEvent("BLOCK_JOB_READY", { since: mark, where: mine, timeoutMs: 30_000 });
      expect(ready.data).toMatchObject({ device: "mirror0", type: "mirror", len: 67108864 });
      expect(await qmp.execute("block-job-complete", { device: "mirror0" })).toEqual({});
      const completed = await qmp.waitEvent("BLOCK_JOB_COMPLETED", {
        since: mark,
        where: mine,
        timeoutMs: 30_000,
      });
      expect(completed.data).toMatchObject({ device: "mirror0", type: "mirror", offset: 67108864 });
      expect(completed.data.error).toBeUndefined();

      const unknown = await qmp.execute("no-such-command").catch((e: unknown) => e);
      expect(isQmpError(unknown, "CommandNotFound")).toBe(true);
      expect((unknown as Error).message).toBe("The command no-such-command has not been found");
      const noSync = await qmp
        .execute("blockdev-mirror", { device: "src", target: "dst" })
        .catch((e: unknown) => e);
      expect(isQmpError(noSync, "GenericError")).toBe(true);
      expect((noSync as Error).message).toBe("Parameter 'sync' is missing");
      // the other argument errors of qmp.md §1.3, all GenericError
      for (const [args, message] of [
        [{ sync: "full", speed: "fast" }, "Invalid parameter type for 'speed', expected: integer"],
        [{ sync: "bogus" }, "Parameter 'sync' does not accept value 'bogus'"],
        [{ sync: "full", bogus: 1 }, "Parameter 'bogus' is unexpected"],
      ] as const) {
        const bad = await qmp
          .execute("blockdev-mirror", { "job-id": "m1", device: "src", target: "dst", ...args })
          .catch((e: unknown) => e);
        expect(isQmpError(bad, "GenericError")).toBe(true);
        expect((bad as Error).message).toBe(message);
      }
      const noJob = await qmp.execute("block-job-cancel", { device: "nosuch" }).catch((e: unknown) => e);
      expect(isQmpError(noJob, "DeviceNotActive")).toBe(true);

      expect(await qmp.execute("quit")).toEqual({});
      expect(await peer.exited).toBe(0);
    } finally {
      await qmp.close();
      await peer.stop();
    }
    const cmp = await run("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", src, dst]);
    expect(cmp.stdout.trim()).toBe("Images are identical.");
    expect(cmp.code).toBe(0);
  });
});
