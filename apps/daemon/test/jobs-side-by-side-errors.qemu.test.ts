/**
 * Error policies, commit and stream side by side with qemu-storage-daemon 7.2 (see jobs-harness.ts):
 * a mirror into an nbdkit `error` filter target with on-target-error=stop (EIO) and =enospc (a "full"
 * target), resumed after the error is switched off; block-commit intermediate and active; block-stream.
 */
import { existsSync, unlinkSync, writeFileSync } from "node:fs";
import type { TempDir } from "@blk/testkit";
import { missingPeers, run, spawnPeer } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { type Ctx, expectSame, expectSameImage, qemuImg, qemuIo, sideBySide } from "./jobs-harness.ts";

const missing = missingPeers(["qemu-storage-daemon", "qemu-img", "qemu-io", "nbdkit"]);
if (missing.length > 0) console.log(`jobs-side-by-side-errors: skipped, missing ${missing.join(", ")}`);

async function source(dir: TempDir): Promise<void> {
  await qemuImg("create", "-q", "-f", "qcow2", dir.join("src.qcow2"), "8M");
  await qemuIo("-c", "write -P 0x22 0 1M", "-c", "write -P 0x33 5M 512k", dir.join("src.qcow2"));
}

/** An nbdkit memory disk whose writes fail with `errno` while `dir/<name>.on` exists. */
async function errorDisk(dir: TempDir, name: string, errno: string) {
  const sock = dir.join(`${name}.sock`);
  const peer = await spawnPeer(
    "nbdkit",
    [
      "-f",
      "-U",
      sock,
      "--filter=error",
      "memory",
      "8M",
      `error-pwrite=${errno}`,
      "error-pwrite-rate=100%",
      `error-pwrite-file=${dir.join(`${name}.on`)}`,
    ],
    { ready: () => existsSync(sock), timeoutMs: 120_000 },
  );
  return { sock, stop: () => peer.stop() };
}

const addNbd = (ctx: Ctx, name: string, sock: string) =>
  ctx.must("blockdev-add", {
    driver: "raw",
    "node-name": name,
    file: { driver: "nbd", server: { type: "unix", path: sock } },
  });

/** Mirrors src into `target` one 64 KiB request at a time, failing until the error file goes away. */
async function stopThenResume(ctx: Ctx, id: string, target: string, policy: string): Promise<void> {
  writeFileSync(`${ctx.dir}/${target}.on`, "");
  await ctx.must("blockdev-mirror", {
    "job-id": id,
    device: "src",
    target,
    sync: "full",
    "buf-size": 65536,
    granularity: 65536,
    "on-target-error": policy,
  });
  await ctx.waitStatus(id, "paused");
  await ctx.exec("query-block-jobs");
  unlinkSync(`${ctx.dir}/${target}.on`);
  await ctx.must("block-job-resume", { device: id });
  await ctx.waitStatus(id, "ready");
  const mark = ctx.qmp.eventMark();
  await ctx.must("block-job-complete", { device: id });
  await ctx.waitStatus(id, "null", mark);
}

describe.skipIf(missing.length > 0)("jobs side by side: errors, commit, stream", { tags: ["qemu"] }, () => {
  it("on-target-error=stop (EIO) and =enospc (full target): pause, then resume once cleared", {
    timeout: 60_000,
  }, async () => {
    await using r = await sideBySide({
      setup: async (dir) => {
        await source(dir);
        const eio = await errorDisk(dir, "eio", "EIO");
        const full = await errorDisk(dir, "full", "ENOSPC");
        return async () => {
          await eio.stop();
          await full.stop();
        };
      },
      scenario: async (ctx) => {
        await ctx.must("blockdev-add", {
          driver: "qcow2",
          "node-name": "src",
          file: { driver: "file", filename: `${ctx.dir}/src.qcow2` },
        });
        await addNbd(ctx, "eio", `${ctx.dir}/eio.sock`);
        await addNbd(ctx, "full", `${ctx.dir}/full.sock`);
        await stopThenResume(ctx, "m1", "eio", "stop");
        await stopThenResume(ctx, "m2", "full", "enospc");
        // report: the job fails with the error
        writeFileSync(`${ctx.dir}/full.on`, "");
        await ctx.must("blockdev-mirror", { "job-id": "m3", device: "src", target: "full", sync: "full" });
        await ctx.waitStatus("m3", "null");
        unlinkSync(`${ctx.dir}/full.on`);
        for (const [node, sock] of [
          ["eio", "eio.sock"],
          ["full", "full.sock"],
        ] as const) {
          const cmp = await run("qemu-img", [
            "compare",
            "-U",
            "-f",
            "qcow2",
            "-F",
            "raw",
            `${ctx.dir}/src.qcow2`,
            `nbd+unix:///?socket=${ctx.dir}/${sock}`,
          ]);
          ctx.note(`${node} equals src`, cmp.code);
        }
      },
    });
    expectSame(r);
    expect(r.qsd.jobs.m1).toContain('BLOCK_JOB_ERROR {"action":"stop","operation":"write"}');
    expect(r.qsd.transcript).toContainEqual({ note: "eio equals src", value: 0 });
  });

  it("block-commit intermediate and active, block-stream", { timeout: 60_000 }, async () => {
    const chain = async (dir: TempDir): Promise<void> => {
      const img = (name: string, backing?: string) =>
        qemuImg(
          "create",
          "-q",
          "-f",
          "qcow2",
          ...(backing === undefined ? [] : ["-b", dir.join(backing), "-F", "qcow2"]),
          dir.join(name),
          "8M",
        );
      await img("base.qcow2");
      await qemuIo("-c", "write -P 0xaa 0 1M", dir.join("base.qcow2"));
      await img("sn1.qcow2", "base.qcow2");
      await qemuIo("-c", "write -P 0xbb 1M 1M", dir.join("sn1.qcow2"));
      await img("sn2.qcow2", "sn1.qcow2");
      await qemuIo("-c", "write -P 0xcc 2M 1M", dir.join("sn2.qcow2"));
      await img("top.qcow2", "sn2.qcow2");
      await qemuIo("-c", "write -P 0xdd 3M 1M", dir.join("top.qcow2"));
    };
    await using r = await sideBySide({
      exactProgress: true,
      setup: chain,
      scenario: async (ctx) => {
        const add = (name: string, backing: string | null) =>
          ctx.must("blockdev-add", {
            driver: "qcow2",
            "node-name": name,
            backing,
            file: { driver: "file", filename: `${ctx.dir}/${name}.qcow2` },
          });
        await add("base", null);
        await add("sn1", "base");
        await add("sn2", "sn1");
        await add("top", "sn2");
        await ctx.exec("block-commit", { device: "nosuch" });
        await ctx.exec("block-commit", {
          device: "top",
          "top-node": "sn1",
          "base-node": "sn2",
          "job-id": "x",
        });
        await ctx.exec("block-stream", { device: "sn1", "base-node": "top", "job-id": "x" });
        await ctx.must("block-commit", {
          "job-id": "c1",
          device: "top",
          "top-node": "sn2",
          "base-node": "sn1",
        });
        await ctx.waitStatus("c1", "null");
        await ctx.must("block-stream", { "job-id": "s1", device: "top", "base-node": "base" });
        await ctx.waitStatus("s1", "null");
        await ctx.must("block-commit", { "job-id": "c2", device: "top", "base-node": "base" });
        await ctx.waitStatus("c2", "ready");
        const mark = ctx.qmp.eventMark();
        await ctx.must("job-complete", { id: "c2" });
        await ctx.waitStatus("c2", "null", mark);
        await ctx.exec("query-named-block-nodes", undefined, (v) =>
          (v as { "node-name": string; backing_file_depth: number; ro: boolean }[])
            .map((n) => `${n["node-name"]} depth=${n.backing_file_depth} ro=${n.ro}`)
            .filter((n) => !n.startsWith("#"))
            .sort(),
        );
        for (const n of ["top", "sn2", "sn1", "base"]) await ctx.exec("blockdev-del", { "node-name": n });
      },
    });
    expectSame(r);
    expect(r.qsd.jobs.c2).toContain("s:ready");
    for (const f of ["base.qcow2", "sn1.qcow2", "sn2.qcow2", "top.qcow2"]) await expectSameImage(r, f);
  });
});
