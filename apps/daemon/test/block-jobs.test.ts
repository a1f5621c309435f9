// blockdev-mirror and blockdev-backup over QMP, on raw files: the job drivers of @blk/jobs behind QEMU's
// argument schemas, with the event sequence a QMP client sees and the resulting images checked byte for byte.
import { readFileSync, writeFileSync } from "node:fs";
import { QmpClient } from "@blk/qmp";
import { makeTempDir, pattern, sha256 } from "@blk/testkit";
import { expect, it } from "vitest";
import { createDaemon } from "../src/index.ts";

const SIZE = 4 << 20;

async function setup(dir: ReturnType<typeof makeTempDir>) {
  writeFileSync(dir.join("src.img"), pattern(7, 0, SIZE));
  writeFileSync(dir.join("dst.img"), Buffer.alloc(SIZE));
  const daemon = await createDaemon({
    log: () => {},
    options: [
      ["blockdev", `driver=raw,node-name=src,file.driver=file,file.filename=${dir.join("src.img")}`],
      ["blockdev", `driver=raw,node-name=dst,file.driver=file,file.filename=${dir.join("dst.img")}`],
    ],
  });
  await daemon.qmp.listen({ path: dir.join("qmp.sock") });
  const qmp = await QmpClient.connect({ path: dir.join("qmp.sock") });
  return { daemon, qmp };
}

it("blockdev-mirror runs to READY, completes on block-job-complete, and the target equals the source", async () => {
  await using dir = makeTempDir("blkd-mirror");
  const { daemon, qmp } = await setup(dir);
  await using _d = daemon;
  await using _q = qmp;
  const mark = qmp.eventMark();
  await qmp.execute("blockdev-mirror", { "job-id": "m0", device: "src", target: "dst", sync: "full" });
  const ready = await qmp.waitEvent("BLOCK_JOB_READY", { since: mark, timeoutMs: 20_000 });
  expect(ready.data).toMatchObject({ type: "mirror", device: "m0", len: SIZE, offset: SIZE, speed: 0 });
  await qmp.execute("block-job-complete", { device: "m0" });
  const done = await qmp.waitEvent("BLOCK_JOB_COMPLETED", { since: mark, timeoutMs: 20_000 });
  expect(done.data).toMatchObject({ type: "mirror", device: "m0", len: SIZE, offset: SIZE });
  expect(done.data).not.toHaveProperty("error");
  await qmp.close();
  await daemon.close(); // flushes and closes the images
  expect(sha256(readFileSync(dir.join("dst.img")))).toBe(sha256(readFileSync(dir.join("src.img"))));
});

it("blockdev-mirror and blockdev-backup refuse bad arguments with QEMU's messages", async () => {
  await using dir = makeTempDir("blkd-jobargs");
  const { daemon, qmp } = await setup(dir);
  await using _d = daemon;
  await using _q = qmp;
  await expect(qmp.execute("blockdev-mirror", { device: "src", target: "dst" })).rejects.toMatchObject({
    errorClass: "GenericError",
    desc: "Parameter 'sync' is missing",
  });
  await expect(
    qmp.execute("blockdev-mirror", { "job-id": "m1", device: "src", target: "dst", sync: "fast" }),
  ).rejects.toMatchObject({
    errorClass: "GenericError",
    desc: "Parameter 'sync' does not accept value 'fast'",
  });
  await expect(
    qmp.execute("blockdev-backup", { "job-id": "b1", device: "nope", target: "dst", sync: "full" }),
  ).rejects.toMatchObject({
    errorClass: "GenericError",
    desc: "Cannot find device='nope' nor node-name='nope'",
  });
  expect(await qmp.execute("query-block-jobs")).toEqual([]);
});

it("blockdev-backup copies the point in time and concludes", async () => {
  await using dir = makeTempDir("blkd-backup");
  const { daemon, qmp } = await setup(dir);
  await using _d = daemon;
  await using _q = qmp;
  const mark = qmp.eventMark();
  await qmp.execute("blockdev-backup", { "job-id": "b0", device: "src", target: "dst", sync: "full" });
  const done = await qmp.waitEvent("BLOCK_JOB_COMPLETED", { since: mark, timeoutMs: 20_000 });
  expect(done.data).toMatchObject({ type: "backup", device: "b0", len: SIZE, offset: SIZE });
  await qmp.close();
  await daemon.close(); // flushes and closes the images
  expect(sha256(readFileSync(dir.join("dst.img")))).toBe(sha256(readFileSync(dir.join("src.img"))));
});
