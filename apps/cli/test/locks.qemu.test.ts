/**
 * Image locks between blk and QEMU, both directions, through the tools a person uses: while one side
 * holds an image writable, the other cannot open it (for writing, or without `-U`), with QEMU's message;
 * `-U` reads it anyway and gives the same answers as qemu-img.
 */
import { openImage } from "@blk/drivers";
import { run, spawnPeer } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { blk } from "./helpers.ts";
import { Fixtures, missing, qemu } from "./qemu.ts";

const fx = new Fixtures("blk-img-locks");
afterAll(() => fx.dispose());

const lockMessage = (prog: string, f: string, shared: boolean): string =>
  `${prog}: Could not open '${f}': Failed to get ${shared ? "shared " : ""}"write" lock\n` +
  `Is another process using the image [${f}]?\n`;

const blkLockMessage = (f: string, shared: boolean): string => lockMessage("blk-img", f, shared);

/** A qcow2 image (a qcow2 node does not share write on its file: a writer holds the image alone). */
async function qcow2(name: string): Promise<string> {
  const f = fx.path(name);
  await qemu(["create", "-q", "-f", "qcow2", f, "4M"]);
  const w = await run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 64k 64k", f], { timeoutMs: 20_000 });
  if (w.code !== 0) throw new Error(w.stderr);
  return f;
}

describe.skipIf(missing.length > 0)(
  "image locks with blk-img and qemu-img/qemu-io",
  { timeout: 60_000 },
  () => {
    it("while qemu-io holds an image writable: blk-img needs -U, and then reads what qemu-img -U reads", async () => {
      const f = await qcow2("held-by-qemu.qcow2");
      const peer = await spawnPeer("qemu-io", ["-f", "qcow2", f], {
        timeoutMs: 30_000,
        ready: (out) => out.includes("qemu-io>"),
      });
      try {
        for (const argv of [
          ["info", f],
          ["map", "--output=json", f],
          ["check", f],
          ["compare", f, f],
        ]) {
          const q = await qemu(argv);
          const b = await blk(argv);
          expect(q.stderr).toBe(lockMessage("qemu-img", f, true));
          expect({ argv, ...b }).toEqual({
            argv,
            code: q.code,
            stdout: "",
            stderr: blkLockMessage(f, true),
          });
        }
        // A writer is refused the exclusive lock.
        const r = await blk(["resize", f, "8M"]);
        expect(r.code).toBe(1);
        expect(r.stderr).toBe(blkLockMessage(f, false));
        for (const argv of [
          ["map", "-U", "--output=json", f],
          ["compare", "-U", f, f],
        ]) {
          const q = await qemu(argv);
          const b = await blk(argv);
          expect(q.code).toBe(0);
          expect({ argv, code: b.code, stdout: b.stdout }).toEqual({ argv, code: q.code, stdout: q.stdout });
        }
        const q = await qemu(["info", "-U", "--output=json", f]);
        const b = await blk(["info", "-U", "--output=json", f]);
        expect(b.code).toBe(0);
        expect(JSON.parse(b.stdout)).toEqual(JSON.parse(q.stdout));
      } finally {
        await peer.stop();
      }
      // Once qemu-io is gone, blk-img opens it normally.
      expect(await blk(["resize", f, "8M"])).toMatchObject({ code: 0, stderr: "" });
    });

    it("while blk holds an image writable: qemu-io cannot write, qemu-img needs -U, then reads blk's data", async () => {
      const f = await qcow2("held-by-blk.qcow2");
      const img = await openImage(f, { format: "qcow2" });
      try {
        await img.root.write(0, new Uint8Array(4096).fill(0x5a));
        await img.root.flush();
        const w = await run("qemu-io", ["-f", "qcow2", "-c", "write 0 512", f], { timeoutMs: 20_000 });
        expect(w.code).toBe(1);
        expect(w.stderr).toBe(
          `qemu-io: can't open device ${f}: Failed to get "write" lock\nIs another process using the image [${f}]?\n`,
        );
        const info = await qemu(["info", f]);
        expect(info).toMatchObject({ code: 1, stderr: lockMessage("qemu-img", f, true) });
        const u = await qemu(["info", "-U", "--output=json", f]);
        expect(u.code).toBe(0);
        expect((JSON.parse(u.stdout) as { "virtual-size": number })["virtual-size"]).toBe(4 << 20);
        const read = await run("qemu-io", ["-f", "qcow2", "-r", "-U", "-c", "read -P 0x5a 0 4k", f], {
          timeoutMs: 20_000,
        });
        expect(read.stdout).toContain("read 4096/4096 bytes at offset 0");
        expect(read.code).toBe(0);
        // blk-img (another graph, same process: the locks are per open file) is refused alike; -U reads.
        const b = await blk(["info", f]);
        expect(b).toEqual({ code: 1, stdout: "", stderr: blkLockMessage(f, true) });
        expect((await blk(["info", "-U", f])).code).toBe(0);
      } finally {
        await img.close();
      }
      const after = await run("qemu-io", ["-f", "qcow2", "-c", "write 0 512", f], { timeoutMs: 20_000 });
      expect(after.code).toBe(0);
    });
  },
);
