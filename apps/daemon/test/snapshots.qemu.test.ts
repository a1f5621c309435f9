// External snapshots checked with qemu-img: the overlay blockdev-snapshot-sync creates names the old image
// as its backing file (qemu-img info --backing-chain), every image passes qemu-img check, and the data
// written before and after the snapshot reads back where it belongs.
import { backendParent, PERM } from "@blk/core";
import { createQcow2 } from "@blk/drivers/qcow2";
import { missingPeers, run } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { startSession } from "./helpers.ts";

const missing = missingPeers(["qemu-img", "qemu-io"]);
if (missing.length > 0) console.log(`snapshots.qemu.test: skipped, missing ${missing.join(", ")}`);
const MiB = 1 << 20;

describe.skipIf(missing.length > 0)("external snapshots vs qemu-img", { tags: ["qemu"] }, () => {
  it("blockdev-snapshot-sync then blockdev-snapshot: chain, check and contents", async () => {
    const s = await startSession({ log: () => {} });
    const base = s.dir.join("disk.qcow2");
    const ov1 = s.dir.join("disk-ov1.qcow2");
    const ov2 = s.dir.join("ov.qcow2");
    try {
      await createQcow2({ filename: base, size: 8 * MiB });
      await createQcow2({ filename: ov2, size: 8 * MiB });
      await s.qmp.execute("blockdev-add", {
        driver: "qcow2",
        "node-name": "disk",
        file: { driver: "file", filename: base },
      });
      const disk = s.daemon.graph.find("disk");
      if (disk === undefined) throw new Error("no disk");
      const vm = s.daemon.graph.attach(backendParent(), disk, {
        name: "root",
        perm: PERM.WRITE | PERM.CONSISTENT_READ,
      });
      await vm.write(0, new Uint8Array(65536).fill(0x11));
      await s.qmp.execute("blockdev-snapshot-sync", {
        "node-name": "disk",
        "snapshot-file": ov1,
        "snapshot-node-name": "ov1",
      });
      await vm.write(65536, new Uint8Array(65536).fill(0x22));
      await s.qmp.execute("blockdev-add", {
        driver: "qcow2",
        "node-name": "ov2",
        backing: null,
        file: { driver: "file", filename: ov2 },
      });
      await s.qmp.execute("blockdev-snapshot", { node: "ov1", overlay: "ov2" });
      await vm.write(2 * 65536, new Uint8Array(65536).fill(0x33));
      vm.detach();
    } finally {
      await s.qmp.close();
      await s.daemon.close();
    }
    try {
      const info = await run("qemu-img", ["info", "--backing-chain", "--output=json", ov1]);
      expect(info.code).toBe(0);
      const chain = JSON.parse(info.stdout) as Record<string, unknown>[];
      expect(chain.map((i) => i.filename)).toEqual([ov1, base]);
      expect(chain[0]).toMatchObject({
        format: "qcow2",
        "virtual-size": 8 * MiB,
        "backing-filename": base,
        "backing-filename-format": "qcow2",
      });
      for (const f of [base, ov1, ov2]) {
        const c = await run("qemu-img", ["check", f]);
        expect(c.code, `${f}: ${c.stdout}${c.stderr}`).toBe(0);
      }
      const io = (file: string, cmds: string[]) =>
        run("qemu-io", ["-f", "qcow2", ...cmds.flatMap((c) => ["-c", c]), file]);
      const r1 = await io(ov1, ["read -P 0x11 0 64k", "read -P 0x22 64k 64k", "read -P 0 128k 64k"]);
      expect(r1.stdout).not.toMatch(/fail|mismatch/i);
      expect(r1.code).toBe(0);
      const r0 = await io(base, ["read -P 0x11 0 64k", "read -P 0 64k 64k"]);
      expect(r0.stdout).not.toMatch(/fail|mismatch/i);
      // blockdev-snapshot leaves the overlay's header as it was (qsd 7.2): ov2 alone holds only its write.
      const r2 = await io(ov2, ["read -P 0x33 128k 64k", "read -P 0 0 128k"]);
      expect(r2.stdout).not.toMatch(/fail|mismatch/i);
    } finally {
      await s.dir.dispose();
    }
  });
  it("a lazy-refcounts base written before the snapshot is closed cleanly", async () => {
    const s = await startSession({ log: () => {} });
    const base = s.dir.join("disk.qcow2");
    try {
      await createQcow2({ filename: base, size: 8 * MiB, lazyRefcounts: true });
      await s.qmp.execute("blockdev-add", {
        driver: "qcow2",
        "node-name": "disk",
        file: { driver: "file", filename: base },
      });
      const disk = s.daemon.graph.find("disk");
      if (disk === undefined) throw new Error("no disk");
      const vm = s.daemon.graph.attach(backendParent(), disk, {
        name: "root",
        perm: PERM.WRITE | PERM.CONSISTENT_READ,
      });
      await vm.write(0, new Uint8Array(65536).fill(1));
      await s.qmp.execute("blockdev-snapshot-sync", {
        "node-name": "disk",
        "snapshot-file": s.dir.join("o.qcow2"),
        "snapshot-node-name": "o",
      });
      vm.detach();
    } finally {
      await s.qmp.close();
      await s.daemon.close();
    }
    try {
      const info = await run("qemu-img", ["info", "--output=json", base]);
      expect(JSON.parse(info.stdout)).toMatchObject({ "dirty-flag": false });
      const c = await run("qemu-img", ["check", base]);
      expect(c.code, c.stdout + c.stderr).toBe(0);
    } finally {
      await s.dir.dispose();
    }
  });
});
