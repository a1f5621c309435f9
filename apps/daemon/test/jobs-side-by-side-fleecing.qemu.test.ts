/**
 * Fleecing (pull-mode backup) side by side with qemu-storage-daemon 7.2 (see jobs-harness.ts): a qcow2
 * overlay whose backing is the live source node, `blockdev-backup sync=none` into it, and an NBD export of
 * the overlay (with the source's bitmap merged into it) that a backup client reads while a guest writes to
 * the source through another export. Both daemons must answer the same, the export must show the source as
 * it was when the job started, and the images left behind must match.
 */
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import type { TempDir } from "@blk/testkit";
import { missingPeers, run } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import {
  type Ctx,
  expectSame,
  expectSameImage,
  nbdWrite,
  qemuImg,
  qemuIo,
  sideBySide,
} from "./jobs-harness.ts";

const missing = missingPeers(["qemu-storage-daemon", "qemu-img", "qemu-io", "nbdinfo"]);
if (missing.length > 0) console.log(`jobs-side-by-side-fleecing: skipped, missing ${missing.join(", ")}`);

/** src.qcow2 (0x22 at 2 MiB, 1 MiB; 0x33 at 6 MiB, 512 KiB), 8 MiB, and an empty 8 MiB fleecing overlay. */
async function images(dir: TempDir): Promise<void> {
  await qemuImg("create", "-q", "-f", "qcow2", dir.join("src.qcow2"), "8M");
  await qemuIo("-c", "write -P 0x22 2M 1M", "-c", "write -P 0x33 6M 512k", dir.join("src.qcow2"));
  await qemuImg("create", "-q", "-f", "qcow2", dir.join("fleece.qcow2"), "8M");
}

const add = (ctx: Ctx, name: string, file: string, extra: Record<string, unknown>) =>
  ctx.must("blockdev-add", {
    driver: "qcow2",
    "node-name": name,
    file: { driver: "file", filename: `${ctx.dir}/${file}` },
    ...extra,
  });

describe.skipIf(missing.length > 0)("jobs side by side: fleecing", { tags: ["qemu"] }, () => {
  it("backup sync=none into an overlay backed by the source, exported over NBD with a bitmap", {
    timeout: 60_000,
  }, async () => {
    await using r = await sideBySide({
      setup: images,
      scenario: async (ctx) => {
        await add(ctx, "src", "src.qcow2", { backing: null });
        await ctx.must("block-dirty-bitmap-add", { node: "src", name: "b0" });
        await add(ctx, "fleece", "fleece.qcow2", { backing: "src" });
        // The guest's export exists before the job, so the copy-before-write filter takes it over.
        const sock = `${ctx.dir}/nbd.sock`;
        await ctx.must("nbd-server-start", { addr: { type: "unix", data: { path: sock } } });
        await ctx.must("block-export-add", {
          type: "nbd",
          id: "guest",
          "node-name": "src",
          name: "disk",
          writable: true,
        });
        // Written before the point in time: in the view and in the exported bitmap.
        await nbdWrite(sock, "disk", "write -P 0x55 4M 64k");
        // The point in time: the job starts, and the bitmap of what changed so far goes to the overlay.
        await ctx.must("transaction", {
          actions: [
            { type: "block-dirty-bitmap-add", data: { node: "fleece", name: "b0", disabled: true } },
            {
              type: "block-dirty-bitmap-merge",
              data: { node: "fleece", target: "b0", bitmaps: [{ node: "src", name: "b0" }] },
            },
            {
              type: "blockdev-backup",
              data: { "job-id": "f0", device: "src", target: "fleece", sync: "none" },
            },
          ],
        });
        await ctx.must("block-export-add", {
          type: "nbd",
          id: "pull",
          "node-name": "fleece",
          name: "fleece",
          bitmaps: ["b0"],
        });
        // The guest overwrites old data, writes where there was none, and zeroes some of it.
        await nbdWrite(
          sock,
          "disk",
          "write -P 0x66 2M 64k",
          "write -P 0x67 6400k 100k",
          "write -P 0x68 0 64k",
          "write -z 2560k 64k",
        );
        // The backup client sees the source as it was at the start.
        // (qemu-io's timing figures masked)
        ctx.note(
          "fleece reads",
          (
            await qemuIo(
              "-r",
              "-f",
              "raw",
              "-c",
              "read -P 0x22 2M 1M",
              "-c",
              "read -P 0x33 6M 512k",
              "-c",
              "read -P 0 0 2M",
              "-c",
              "read -P 0 3M 1M",
              "-c",
              "read -P 0x55 4M 64k",
              "-c",
              "read -P 0 4160k 1984k",
              `nbd+unix:///fleece?socket=${sock}`,
            )
          ).replace(/; [\d:.]+ sec \(.*\)/g, ""),
        );
        const pulled = `${ctx.dir}/pulled.raw`;
        await qemuImg("convert", "-f", "raw", "-O", "raw", `nbd+unix:///fleece?socket=${sock}`, pulled);
        ctx.note("pulled sha256", createHash("sha256").update(readFileSync(pulled)).digest("hex"));
        const map = await run("nbdinfo", ["--map=qemu:dirty-bitmap:b0", `nbd+unix:///fleece?socket=${sock}`]);
        ctx.note("bitmap map", map.stdout);
        await ctx.must("job-cancel", { id: "f0" });
        await ctx.waitStatus("f0", "null");
        for (const id of ["pull", "guest"]) {
          await ctx.must("block-export-del", { id });
          await ctx.waitEvent("BLOCK_EXPORT_DELETED", (d) => d.id === id);
        }
        await ctx.must("nbd-server-stop");
        for (const n of ["fleece", "src"]) await ctx.exec("blockdev-del", { "node-name": n });
      },
    });
    expectSame(r);
    // Read-only checks of the fleece reads' output: no pattern failed on either side.
    expect(JSON.stringify(r.blkd.transcript)).not.toMatch(/Pattern verification failed/);
    await expectSameImage(r, "src.qcow2");
    await expectSameImage(r, "pulled.raw", { format: "raw" });
  });
});
