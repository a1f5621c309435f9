import { missingPeers, run, withTempDir } from "@blk/testkit";
import { describe, expect, it } from "vitest";

// The interop suite is only as good as its peers: in CI they must all be present (.ci/run installs them),
// and they must be the QEMU 7.2 generation the spec digests were written against.
const PEERS = ["qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon", "nbdkit", "nbdinfo", "nbdcopy"];

describe("interop peers", { tags: ["qemu"] }, () => {
  it.runIf(process.env.CI === "true")("are all installed in CI", () => {
    expect(missingPeers(PEERS)).toEqual([]);
  });

  it.skipIf(missingPeers(["qemu-img"]).length > 0)(
    "qemu-img is the 7.x generation the spec was checked against",
    async () => {
      const r = await run("qemu-img", ["--version"], { timeoutMs: 10_000 });
      expect(r.code).toBe(0);
      expect(r.stdout).toMatch(/qemu-img version 7\.\d+\.\d+/);
    },
  );

  it.skipIf(missingPeers(["qemu-img", "qemu-io"]).length > 0)(
    "qemu-img and qemu-io round-trip through a temp dir",
    async () => {
      await withTempDir(async (dir) => {
        const img = dir.join("a.qcow2");
        expect((await run("qemu-img", ["create", "-f", "qcow2", img, "1M"])).code).toBe(0);
        expect((await run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 0 64k", img])).code).toBe(0);
        const check = await run("qemu-io", ["-f", "qcow2", "-c", "read -P 0x5a 0 64k", img]);
        expect(check.code).toBe(0);
        expect(check.stdout).not.toMatch(/Pattern verification failed/);
      });
    },
  );
});
