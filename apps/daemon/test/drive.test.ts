// drive-mirror and drive-backup without QEMU peers: the target image is created (qcow2 with the backing
// file name QEMU writes, or raw), the job copies into it, the anonymous target node goes away with the job,
// and the argument errors carry QEMU's text. jobs-side-by-side*.qemu.test.ts compare all of it with qsd.
import { readFileSync, writeFileSync } from "node:fs";
import { createQcow2, parseHeader } from "@blk/drivers/qcow2";
import { QmpClient } from "@blk/qmp";
import { makeTempDir, pattern, sha256 } from "@blk/testkit";
import { expect, it } from "vitest";
import { createDaemon } from "../src/index.ts";

const SIZE = 4 << 20;

async function setup(dir: ReturnType<typeof makeTempDir>) {
  writeFileSync(dir.join("src.img"), pattern(3, 0, SIZE));
  await createQcow2({ filename: dir.join("base.qcow2"), size: SIZE });
  await createQcow2({
    filename: dir.join("top.qcow2"),
    size: SIZE,
    backingFile: dir.join("base.qcow2"),
    backingFormat: "qcow2",
  });
  const daemon = await createDaemon({
    log: () => {},
    options: [
      ["blockdev", `driver=raw,node-name=src,file.driver=file,file.filename=${dir.join("src.img")}`],
      ["blockdev", `driver=qcow2,node-name=top,file.driver=file,file.filename=${dir.join("top.qcow2")}`],
    ],
  });
  await daemon.qmp.listen({ path: dir.join("qmp.sock") });
  const qmp = await QmpClient.connect({ path: dir.join("qmp.sock") });
  const names = async () =>
    (await qmp.execute<{ "node-name": string; file: string }[]>("query-named-block-nodes")).map(
      (n) => n.file,
    );
  return { daemon, qmp, names };
}

const header = (file: string) => {
  const buf = readFileSync(file);
  return parseHeader(buf, buf.length);
};

it("drive-backup into a new raw image copies the source; the target node goes away", async () => {
  await using dir = makeTempDir("blkd-drive");
  const { daemon, qmp, names } = await setup(dir);
  await using _d = daemon;
  await using _q = qmp;
  const before = await names();
  const mark = qmp.eventMark();
  await qmp.execute("drive-backup", {
    "job-id": "b0",
    device: "src",
    target: dir.join("b0.raw"),
    sync: "full",
  });
  const done = await qmp.waitEvent("BLOCK_JOB_COMPLETED", { since: mark, timeoutMs: 20_000 });
  expect(done.data).toMatchObject({ type: "backup", device: "b0", len: SIZE, offset: SIZE });
  await qmp.waitEvent("JOB_STATUS_CHANGE", {
    since: mark,
    where: (d) => d.status === "null",
    timeoutMs: 20_000,
  });
  await expect.poll(names).toEqual(before);
  expect(sha256(readFileSync(dir.join("b0.raw")))).toBe(sha256(readFileSync(dir.join("src.img"))));
});

it("drive-mirror sync=top creates a qcow2 over the source's backing file; completes", async () => {
  await using dir = makeTempDir("blkd-drive");
  const { daemon, qmp, names } = await setup(dir);
  await using _d = daemon;
  await using _q = qmp;
  const before = await names();
  const mark = qmp.eventMark();
  await qmp.execute("drive-mirror", {
    "job-id": "m0",
    device: "top",
    target: dir.join("m0.qcow2"),
    sync: "top",
  });
  const h = header(dir.join("m0.qcow2"));
  expect(h.backingFile).toBe(dir.join("base.qcow2"));
  expect(h.backingFormat).toBe("qcow2");
  await qmp.waitEvent("BLOCK_JOB_READY", { since: mark, timeoutMs: 20_000 });
  await qmp.execute("block-job-complete", { device: "m0" });
  await qmp.waitEvent("JOB_STATUS_CHANGE", {
    since: mark,
    where: (d) => d.status === "null",
    timeoutMs: 20_000,
  });
  // Nothing used the source: the target is released at once, as QEMU does.
  await expect.poll(names).toEqual(before);
  // sync=full: a new image without backing file; none: the source is the backing file.
  await qmp.execute("drive-mirror", {
    "job-id": "m1",
    device: "top",
    target: dir.join("m1.qcow2"),
    sync: "full",
  });
  expect(header(dir.join("m1.qcow2")).backingFile).toBeUndefined();
  const gone = (id: string, since: number) =>
    qmp.waitEvent("JOB_STATUS_CHANGE", {
      since,
      where: (d) => d.id === id && d.status === "null",
      timeoutMs: 20_000,
    });
  let m = qmp.eventMark();
  await qmp.execute("block-job-cancel", { device: "m1", force: true });
  await gone("m1", m);
  await qmp.execute("drive-mirror", {
    "job-id": "m2",
    device: "top",
    target: dir.join("m2.qcow2"),
    sync: "none",
  });
  expect(header(dir.join("m2.qcow2")).backingFile).toBe(dir.join("top.qcow2"));
  m = qmp.eventMark();
  await qmp.execute("block-job-cancel", { device: "m2", force: true });
  await gone("m2", m);
  await expect.poll(names).toEqual(before);
});

it("drive-mirror and drive-backup refuse bad arguments with QEMU's messages", async () => {
  await using dir = makeTempDir("blkd-drive");
  const { daemon, qmp } = await setup(dir);
  await using _d = daemon;
  await using _q = qmp;
  const err = (cmd: string, args: Record<string, unknown>) =>
    qmp.execute(cmd, args).then(
      () => ({ ok: true }),
      (e: { errorClass: string; desc: string }) => ({ class: e.errorClass, desc: e.desc }),
    );
  const t = dir.join("x.img");
  expect(await err("drive-mirror", { device: "src", target: t, sync: "full", format: "bogus" })).toEqual({
    class: "GenericError",
    desc: "Unknown file format 'bogus'",
  });
  expect(await err("drive-mirror", { device: "top", target: t, sync: "top", format: "raw" })).toEqual({
    class: "GenericError",
    desc: "Backing file not supported for file format 'raw'",
  });
  expect(await err("drive-mirror", { device: "src", target: t, sync: "full", replaces: "src" })).toEqual({
    class: "GenericError",
    desc: "a node-name must be provided when replacing a named node of the graph",
  });
  expect(await err("drive-backup", { device: "src", target: dir.join("no/x.img"), sync: "full" })).toEqual({
    class: "GenericError",
    desc: `Could not create '${dir.join("no/x.img")}': No such file or directory`,
  });
  expect(await err("drive-backup", { device: "src", target: t, sync: "full" })).toEqual({
    class: "GenericError",
    desc: "Invalid job ID ''",
  });
  expect(await qmp.execute("query-block-jobs")).toEqual([]);
});
