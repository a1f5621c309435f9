/**
 * Mirror scenarios side by side with qemu-storage-daemon 7.2 (see jobs-harness.ts for what is compared):
 * blockdev-mirror full/top/none with complete, cancel before and after READY, a writer through an NBD
 * export of the source, pause/resume/set-speed, manual dismiss, and drive-mirror (target created).
 */
import type { TempDir } from "@blk/testkit";
import { missingPeers } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import {
  type Ctx,
  chain,
  expectSame,
  expectSameImage,
  nbdWrite,
  qemuImg,
  qemuIo,
  sideBySide,
} from "./jobs-harness.ts";

const missing = missingPeers(["qemu-storage-daemon", "qemu-img", "qemu-io"]);
if (missing.length > 0) console.log(`jobs-side-by-side: skipped, missing ${missing.join(", ")}`);

const emptyQcow2 = (dir: TempDir, name: string, ...extra: string[]) =>
  qemuImg("create", "-q", "-f", "qcow2", ...extra, dir.join(name), "8M");

const addQcow2 = (ctx: Ctx, name: string, file: string, extra: Record<string, unknown> = {}) =>
  ctx.must("blockdev-add", {
    driver: "qcow2",
    "node-name": name,
    file: { driver: "file", filename: `${ctx.dir}/${file}` },
    ...extra,
  });

/** Runs a job to its end (null status), after `start` returned. */
async function untilGone(ctx: Ctx, id: string, since: number): Promise<void> {
  await ctx.waitStatus(id, "null", since);
}

async function exportSource(ctx: Ctx, node = "src"): Promise<string> {
  const sock = `${ctx.dir}/nbd.sock`;
  await ctx.must("nbd-server-start", { addr: { type: "unix", data: { path: sock } } });
  await ctx.must("block-export-add", {
    type: "nbd",
    id: "e0",
    "node-name": node,
    name: "disk",
    writable: true,
  });
  return sock;
}

async function unexport(ctx: Ctx): Promise<void> {
  await ctx.must("block-export-del", { id: "e0" });
  await ctx.waitEvent("BLOCK_EXPORT_DELETED");
  await ctx.must("nbd-server-stop");
}

/** Compares two files of the same side (content through the chains) and records the verdict. */
async function noteCompare(ctx: Ctx, a: string, b: string): Promise<void> {
  const out = await qemuImg("compare", "-U", `${ctx.dir}/${a}`, `${ctx.dir}/${b}`).catch(
    (e: Error) => e.message,
  );
  ctx.note(`compare ${a} ${b}`, out.trim());
}

describe.skipIf(missing.length > 0)("jobs side by side: mirror", { tags: ["qemu"] }, () => {
  it("mirror full and top to completion; the targets equal the source", { timeout: 60_000 }, async () => {
    await using r = await sideBySide({
      exactProgress: true,
      setup: async (dir) => {
        await chain(dir);
        await emptyQcow2(dir, "tf.qcow2");
        await emptyQcow2(dir, "tt.qcow2", "-b", dir.join("base.qcow2"), "-F", "qcow2");
      },
      scenario: async (ctx) => {
        await addQcow2(ctx, "src", "src.qcow2");
        await addQcow2(ctx, "tf", "tf.qcow2", { backing: null });
        await ctx.must("blockdev-mirror", { "job-id": "m1", device: "src", target: "tf", sync: "full" });
        await ctx.waitStatus("m1", "ready");
        await ctx.exec("query-block-jobs");
        let mark = ctx.qmp.eventMark();
        await ctx.must("block-job-complete", { device: "m1" });
        await untilGone(ctx, "m1", mark);
        await addQcow2(ctx, "tt", "tt.qcow2");
        await ctx.must("blockdev-mirror", { "job-id": "m2", device: "src", target: "tt", sync: "top" });
        await ctx.waitStatus("m2", "ready");
        await ctx.exec("query-jobs");
        mark = ctx.qmp.eventMark();
        await ctx.must("block-job-complete", { device: "m2" });
        await untilGone(ctx, "m2", mark);
        await ctx.exec("query-block-jobs");
        await ctx.exec("blockdev-del", { "node-name": "tf" });
        await ctx.exec("blockdev-del", { "node-name": "tt" });
        await ctx.exec("blockdev-del", { "node-name": "src" });
        await noteCompare(ctx, "src.qcow2", "tf.qcow2");
        await noteCompare(ctx, "src.qcow2", "tt.qcow2");
      },
    });
    expectSame(r);
    expect(r.qsd.jobs.m1).toContain("s:ready");
    await expectSameImage(r, "tf.qcow2");
    await expectSameImage(r, "tt.qcow2");
  });

  it("cancel before READY, soft cancel and forced cancel after READY", { timeout: 60_000 }, async () => {
    await using r = await sideBySide({
      setup: async (dir) => {
        await chain(dir);
        await emptyQcow2(dir, "tc.qcow2");
      },
      scenario: async (ctx) => {
        await addQcow2(ctx, "src", "src.qcow2");
        await addQcow2(ctx, "tc", "tc.qcow2", { backing: null });
        // 64 KiB/s, one 64 KiB request at a time: READY is minutes away. (QEMU's rate limit sleeps after the
        // requests it issued: with the default 16 MiB buffer an 8 MiB disk is copied in one burst.)
        await ctx.must("blockdev-mirror", {
          "job-id": "m3",
          device: "src",
          target: "tc",
          sync: "full",
          speed: 65536,
          "buf-size": 65536,
        });
        await ctx.exec("block-job-complete", { device: "m3" });
        // the source of a running mirror (paused by the user, so that the drained sections QEMU enters for
        // these commands do not show as paused/running flickers)
        await ctx.must("block-job-pause", { device: "m3" });
        await ctx.waitStatus("m3", "paused");
        const busy = { "job-id": "y", device: "src", sync: "full" };
        await ctx.exec("drive-mirror", { ...busy, target: `${ctx.dir}/y1.qcow2` });
        await ctx.exec("drive-backup", { ...busy, target: `${ctx.dir}/y2.qcow2` });
        await ctx.exec("blockdev-backup", { ...busy, target: "tc" });
        await ctx.exec("blockdev-mirror", { ...busy, target: "tc" });
        await ctx.exec("block-job-cancel", { device: "m3" });
        await ctx.must("block-job-resume", { device: "m3" });
        let mark = ctx.qmp.eventMark();
        await ctx.must("block-job-cancel", { device: "m3" });
        await untilGone(ctx, "m3", mark);
        await ctx.must("blockdev-mirror", { "job-id": "m4", device: "src", target: "tc", sync: "full" });
        await ctx.waitStatus("m4", "ready");
        mark = ctx.qmp.eventMark();
        await ctx.must("block-job-cancel", { device: "m4" });
        await untilGone(ctx, "m4", mark);
        await ctx.must("blockdev-mirror", { "job-id": "m5", device: "src", target: "tc", sync: "full" });
        await ctx.waitStatus("m5", "ready");
        mark = ctx.qmp.eventMark();
        await ctx.must("block-job-cancel", { device: "m5", force: true });
        await untilGone(ctx, "m5", mark);
        await ctx.exec("query-named-block-nodes", undefined, (v) =>
          (v as { "node-name": string; drv: string }[]).map((n) => `${n["node-name"]}:${n.drv}`).sort(),
        );
        await ctx.exec("blockdev-del", { "node-name": "tc" });
        await ctx.exec("blockdev-del", { "node-name": "src" });
        await noteCompare(ctx, "src.qcow2", "tc.qcow2");
      },
    });
    expectSame(r);
    expect(r.qsd.jobs.m4).toContain(
      'BLOCK_JOB_COMPLETED {"len":"<progress>","offset":"<progress>","speed":0,"type":"mirror"}',
    );
    await expectSameImage(r, "tc.qcow2");
  });

  it("mirror full and none while qemu-io writes through an NBD export of the source", {
    timeout: 60_000,
  }, async () => {
    await using r = await sideBySide({
      setup: async (dir) => {
        await chain(dir);
        await emptyQcow2(dir, "tf.qcow2");
        await emptyQcow2(dir, "tn.qcow2");
      },
      scenario: async (ctx) => {
        await addQcow2(ctx, "src", "src.qcow2");
        await addQcow2(ctx, "tf", "tf.qcow2", { backing: null });
        const sock = await exportSource(ctx);
        // READY may come before set-speed on a slow machine: wait for it counting from the start.
        const start = ctx.qmp.eventMark();
        await ctx.must("blockdev-mirror", {
          "job-id": "m1",
          device: "src",
          target: "tf",
          sync: "full",
          // 256 KiB/s one 64 KiB request at a time: the writes below land while the job copies
          speed: 1 << 18,
          "buf-size": 65536,
        });
        await nbdWrite(sock, "disk", "write -P 0x77 1M 64k", "write -P 0x78 5M 192k", "write -z 2M 64k");
        await ctx.must("block-job-set-speed", { device: "m1", speed: 0 });
        await ctx.waitStatus("m1", "ready", start);
        await nbdWrite(sock, "disk", "write -P 0x79 7M 64k");
        let mark = ctx.qmp.eventMark();
        await ctx.must("block-job-complete", { device: "m1" });
        await ctx.waitStatus("m1", "null", mark);
        // The export now writes to the target.
        await nbdWrite(sock, "disk", "write -P 0x7a 0 64k");
        // The export now names the target, as in QEMU.
        await ctx.exec("query-block-exports");
        await unexport(ctx);
        // sync=none: only what is written during the job reaches the target.
        const sock2 = await exportSource(ctx, "tf");
        await addQcow2(ctx, "tn", "tn.qcow2", { backing: null });
        await ctx.must("blockdev-mirror", { "job-id": "m2", device: "tf", target: "tn", sync: "none" });
        await nbdWrite(sock2, "disk", "write -P 0x5a 3M 128k", "write -P 0x5b 4092k 8k");
        mark = ctx.qmp.eventMark();
        await ctx.must("block-job-complete", { device: "m2" });
        await ctx.waitStatus("m2", "null", mark);
        await unexport(ctx);
        for (const n of ["tn", "tf", "src"]) await ctx.exec("blockdev-del", { "node-name": n });
        ctx.note(
          "tf patterns",
          await qemuIo(
            "-r",
            "-U",
            "-c",
            "read -P 0x7a 0 64k",
            "-c",
            "read -P 0x77 1M 64k",
            "-c",
            "read -P 0 2M 64k",
            "-c",
            "read -P 0x78 5M 192k",
            "-c",
            "read -P 0x79 7M 64k",
            `${ctx.dir}/tf.qcow2`,
          ).then((o) => o.includes("Pattern verification failed")),
        );
      },
    });
    expectSame(r);
    expect(r.qsd.transcript).toContainEqual({ note: "tf patterns", value: false });
    await expectSameImage(r, "tf.qcow2");
    await expectSameImage(r, "tn.qcow2");
  });

  it("pause, resume, set-speed; standby; manual dismiss", { timeout: 60_000 }, async () => {
    await using r = await sideBySide({
      setup: async (dir) => {
        await chain(dir);
        await emptyQcow2(dir, "tp.qcow2");
      },
      scenario: async (ctx) => {
        await addQcow2(ctx, "src", "src.qcow2");
        await addQcow2(ctx, "tp", "tp.qcow2", { backing: null });
        // argument errors (transcripts §2)
        const m = { "job-id": "bad", device: "src", target: "tp", sync: "full" };
        for (const args of [
          { ...m, granularity: 1000 },
          { ...m, granularity: 256 },
          { ...m, "buf-size": -1 },
          { ...m, sync: "incremental" },
          { ...m, target: "src" },
          { ...m, "job-id": "1bad" },
          { device: "src", target: "tp", sync: "full", speed: -1 },
          { ...m, device: "nosuch" },
          { ...m, replaces: "nosuch" },
          { device: "src", target: "tp" },
          { ...m, bogus: 1 },
        ])
          await ctx.exec("blockdev-mirror", args);
        await ctx.exec("blockdev-backup", { device: "src", target: "tp", sync: "bitmap" });
        await ctx.exec("blockdev-backup", {
          device: "src",
          target: "tp",
          sync: "full",
          "bitmap-mode": "always",
        });
        await ctx.exec("blockdev-backup", {
          "job-id": "b",
          device: "src",
          target: "tp",
          sync: "full",
          bitmap: "x",
        });
        await ctx.exec("blockdev-backup", { "job-id": "b", device: "src", target: "src", sync: "full" });
        await ctx.exec("block-stream", { device: "src", "base-node": "tp" });
        await ctx.exec("block-commit", { device: "src" });
        await ctx.exec("block-commit", { device: "nosuch" });
        await ctx.exec("block-job-set-speed", { device: "nosuch", speed: 1 });
        await ctx.exec("block-job-cancel", { device: "nosuch" });
        await ctx.exec("job-cancel", { id: "nosuch" });
        await ctx.must("blockdev-mirror", {
          "job-id": "m1",
          device: "src",
          target: "tp",
          sync: "full",
          speed: 65536,
          "buf-size": 65536,
          "auto-dismiss": false,
        });
        await ctx.must("block-job-pause", { device: "m1" });
        await ctx.waitStatus("m1", "paused");
        await ctx.exec("block-job-pause", { device: "m1" });
        await ctx.exec("query-block-jobs");
        await ctx.exec("block-job-set-speed", { device: "m1", speed: -1 });
        await ctx.must("block-job-set-speed", { device: "m1", speed: 0 });
        await ctx.must("block-job-resume", { device: "m1" });
        await ctx.waitStatus("m1", "ready");
        await ctx.exec("block-job-resume", { device: "m1" });
        await ctx.must("job-pause", { id: "m1" });
        await ctx.waitStatus("m1", "standby");
        await ctx.exec("query-jobs");
        await ctx.exec("job-complete", { id: "m1" });
        const mark = ctx.qmp.eventMark();
        await ctx.must("job-resume", { id: "m1" });
        await ctx.waitStatus("m1", "concluded", mark);
        await ctx.exec("query-block-jobs");
        await ctx.exec("job-finalize", { id: "m1" });
        await ctx.must("job-dismiss", { id: "m1" });
        await ctx.exec("query-jobs");
        await ctx.exec("blockdev-del", { "node-name": "tp" });
        await ctx.exec("blockdev-del", { "node-name": "src" });
      },
    });
    expectSame(r);
    await expectSameImage(r, "tp.qcow2");
  });

  it("drive-mirror creates the target as QEMU does, with QEMU's errors", { timeout: 60_000 }, async () => {
    await using r = await sideBySide({
      exactProgress: true,
      setup: async (dir) => {
        await chain(dir);
        await emptyQcow2(dir, "x1.qcow2", "-b", dir.join("base.qcow2"), "-F", "qcow2");
        await emptyQcow2(dir, "x2.qcow2");
      },
      scenario: async (ctx) => {
        const d = ctx.dir;
        await addQcow2(ctx, "src", "src.qcow2");
        // argument errors, in QEMU's order (some after the image was created)
        await ctx.exec("drive-mirror", { device: "nosuch", target: `${d}/x.qcow2`, sync: "full" });
        await ctx.exec("drive-mirror", {
          device: "src",
          target: `${d}/x.qcow2`,
          sync: "full",
          format: "bogus",
        });
        await ctx.exec("drive-mirror", {
          device: "src",
          target: `${d}/no/x.qcow2`,
          sync: "full",
          "job-id": "e",
        });
        await ctx.exec("drive-mirror", {
          device: "src",
          target: `${d}/x.qcow2`,
          sync: "full",
          replaces: "src",
        });
        await ctx.exec("drive-mirror", { device: "src", target: `${d}/e1.raw`, sync: "top", format: "raw" });
        await ctx.exec("drive-mirror", {
          device: "src",
          target: `${d}/e2.qcow2`,
          sync: "full",
          "node-name": "src",
        });
        await ctx.exec("drive-mirror", {
          device: "src",
          target: `${d}/e3.qcow2`,
          sync: "incremental",
          "job-id": "e",
        });
        await ctx.exec("drive-mirror", { device: "src", target: `${d}/e4.qcow2`, sync: "none" });
        await ctx.exec("drive-mirror", {
          device: "src",
          target: `${d}/e5.qcow2`,
          sync: "full",
          "job-id": "e",
          granularity: 1000,
        });
        // top: a new image over the source's backing file
        await ctx.must("drive-mirror", {
          "job-id": "d1",
          device: "src",
          target: `${d}/t1.qcow2`,
          sync: "top",
        });
        await ctx.waitStatus("d1", "ready");
        await ctx.exec("query-block-jobs");
        let mark = ctx.qmp.eventMark();
        await ctx.must("block-job-complete", { device: "d1" });
        await ctx.waitStatus("d1", "null", mark);
        // full into raw: only allocated data is copied (a new image reads as zeroes)
        await ctx.must("drive-mirror", {
          "job-id": "d2",
          device: "src",
          target: `${d}/t2.raw`,
          sync: "full",
          format: "raw",
        });
        await ctx.waitStatus("d2", "ready");
        await ctx.exec("query-block-jobs");
        mark = ctx.qmp.eventMark();
        await ctx.must("block-job-cancel", { device: "d2" });
        await ctx.waitStatus("d2", "null", mark);
        // full into qcow2 with a node name, completed: the target replaces nothing visible (no parents)
        await ctx.must("drive-mirror", {
          "job-id": "d3",
          device: "src",
          target: `${d}/t3.qcow2`,
          sync: "full",
          "node-name": "t3",
        });
        await ctx.waitStatus("d3", "ready");
        await ctx.exec("blockdev-del", { "node-name": "t3" });
        mark = ctx.qmp.eventMark();
        await ctx.must("block-job-complete", { device: "d3" });
        await ctx.waitStatus("d3", "null", mark);
        await ctx.exec("query-named-block-nodes", undefined, (v) =>
          (v as { "node-name": string }[]).map((n) => n["node-name"]).filter((n) => !n.startsWith("#")),
        );
        // mode=existing: the image is opened as it is (format probed, backing from its header)
        for (const [id, file, sync] of [
          ["x1", "x1.qcow2", "top"],
          ["x2", "x2.qcow2", "full"],
        ] as const) {
          await ctx.must("drive-mirror", {
            "job-id": id,
            device: "src",
            target: `${d}/${file}`,
            sync,
            mode: "existing",
          });
          await ctx.waitStatus(id, "ready");
          mark = ctx.qmp.eventMark();
          await ctx.must("block-job-complete", { device: id });
          await ctx.waitStatus(id, "null", mark);
        }
        await ctx.settled("query-named-block-nodes", undefined, (v) =>
          (v as { drv: string; file: string }[]).map((n) => `${n.drv} ${n.file}`).sort(),
        );
        await ctx.exec("blockdev-del", { "node-name": "src" });
        await noteCompare(ctx, "src.qcow2", "x1.qcow2");
        await noteCompare(ctx, "src.qcow2", "x2.qcow2");
        await noteCompare(ctx, "src.qcow2", "t1.qcow2");
        await noteCompare(ctx, "src.qcow2", "t2.raw");
        await noteCompare(ctx, "src.qcow2", "t3.qcow2");
      },
    });
    expectSame(r);
    await expectSameImage(r, "t1.qcow2");
    await expectSameImage(r, "t2.raw", { format: "raw" });
    await expectSameImage(r, "t3.qcow2");
    for (const f of ["e2.qcow2", "e3.qcow2", "e4.qcow2", "e5.qcow2", "x1.qcow2", "x2.qcow2"])
      await expectSameImage(r, f);
  });

  it("drive-mirror under an export: none links the target to the source; then top and full", {
    timeout: 60_000,
  }, async () => {
    await using r = await sideBySide({
      setup: chain,
      scenario: async (ctx) => {
        await addQcow2(ctx, "src", "src.qcow2");
        const sock = await exportSource(ctx);
        await ctx.must("drive-mirror", {
          "job-id": "d5",
          device: "src",
          target: `${ctx.dir}/t5.qcow2`,
          sync: "none",
          "node-name": "t5",
        });
        await nbdWrite(sock, "disk", "write -P 0x44 1M 64k", "write -P 0x45 3000k 10k");
        const mark = ctx.qmp.eventMark();
        await ctx.must("block-job-complete", { device: "d5" });
        await ctx.waitStatus("d5", "null", mark);
        // reads through the export now see the target over its backing (the source)
        ctx.note(
          "patterns via export",
          await nbdWrite(
            sock,
            "disk",
            "read -P 0x11 0 64k",
            "read -P 0x44 1M 64k",
            "read -P 0x22 2M 64k",
            "read -P 0x45 3000k 10k",
            "read -P 0x33 6M 64k",
          ).then((o) => o.includes("Pattern verification failed")),
        );
        await ctx.exec("drive-mirror", {
          "job-id": "x",
          device: "src",
          target: `${ctx.dir}/x.qcow2`,
          sync: "full",
        });
        // sync=top from the new active layer, under the export and a writer: the target's backing is src
        const start6 = ctx.qmp.eventMark();
        await ctx.must("drive-mirror", {
          "job-id": "d6",
          device: "t5",
          target: `${ctx.dir}/t6.qcow2`,
          sync: "top",
          "node-name": "t6",
        });
        await nbdWrite(sock, "disk", "write -P 0x46 1M 4k", "write -P 0x47 7M 64k");
        await ctx.waitStatus("d6", "ready", start6);
        const mark6 = ctx.qmp.eventMark();
        await ctx.must("block-job-complete", { device: "d6" });
        await ctx.waitStatus("d6", "null", mark6);
        await nbdWrite(sock, "disk", "write -P 0x48 5M 64k");
        // sync=full into a new image under the export: only allocated data is copied (len), no backing
        const start7 = ctx.qmp.eventMark();
        await ctx.must("drive-mirror", {
          "job-id": "d7",
          device: "t6",
          target: `${ctx.dir}/t7.qcow2`,
          sync: "full",
        });
        await ctx.waitStatus("d7", "ready", start7);
        await ctx.exec("query-block-jobs", undefined, (v) =>
          (v as { len: number; offset: number }[]).map((j) => ({ len: j.len, offset: j.offset })),
        );
        const mark7 = ctx.qmp.eventMark();
        await ctx.must("block-job-complete", { device: "d7" });
        await ctx.waitStatus("d7", "null", mark7);
        await nbdWrite(sock, "disk", "write -P 0x4a 6M 64k");
        // (Read back through the export, blkd answers from the node the export was created on: the NBD
        // server's sparse-read block status does not follow the switch. The image is checked below.)
        await unexport(ctx);
      },
    });
    expectSame(r);
    expect(r.qsd.transcript).toContainEqual({ note: "patterns via export", value: false });
    await expectSameImage(r, "t5.qcow2");
    await expectSameImage(r, "t6.qcow2");
    await expectSameImage(r, "t7.qcow2");
    for (const side of [r.qsd, r.blkd]) {
      const reads = [
        "0x11 0 64k",
        "0x46 1M 4k",
        "0x44 1028k 60k",
        "0x45 3000k 10k",
        "0x48 5M 64k",
        "0x47 7M 64k",
      ];
      await qemuIo("-r", "-U", ...reads.flatMap((x) => ["-c", `read -P ${x}`]), side.dir.join("t6.qcow2"));
      const reads7 = [...reads, "0x4a 6M 64k"];
      await qemuIo("-r", "-U", ...reads7.flatMap((x) => ["-c", `read -P ${x}`]), side.dir.join("t7.qcow2"));
    }
    await expectSameImage(r, "t5.qcow2");
  });
});
