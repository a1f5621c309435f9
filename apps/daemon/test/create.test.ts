// blockdev-create as a `create` job: the event sequence of qsd 7.2 (spec §3 transcript), manual dismiss,
// query-jobs progress 1/1, a qcow2 image laid out over an open file node and then opened, and errors.
import { statSync } from "node:fs";
import { expect, it } from "vitest";
import { recordEvents, until } from "./event-log.ts";
import { generic, startSession } from "./helpers.ts";

it("creates a file, formats it as qcow2 over a file node, and the image opens (qsd 7.2 sequence)", async () => {
  await using s = await startSession({ log: () => {} });
  const { qmp } = s;
  const file = s.dir.join("new.qcow2");
  const log = recordEvents(qmp);
  expect(
    await qmp.execute("blockdev-create", {
      "job-id": "cr0",
      options: { driver: "file", filename: file, size: 0 },
    }),
  ).toEqual({});
  log.mark("return");
  await until(() => log.entries.includes("concluded:cr0"));
  expect(await qmp.execute("job-dismiss", { id: "cr0" })).toEqual({});
  log.mark("return");
  expect(await log.settled()).toEqual([
    "created:cr0",
    "running:cr0",
    "return",
    "waiting:cr0",
    "pending:cr0",
    "concluded:cr0",
    "null:cr0",
    "return",
  ]);
  expect(statSync(file).size).toBe(0);

  await qmp.execute("blockdev-add", { driver: "file", "node-name": "newfile", filename: file });
  log.reset();
  await qmp.execute("blockdev-create", {
    "job-id": "cr1",
    options: { driver: "qcow2", file: "newfile", size: 67108864, "cluster-size": 65536 },
  });
  log.mark("return");
  await until(() => log.entries.includes("concluded:cr1"));
  expect(await qmp.execute("query-jobs")).toEqual([
    { "current-progress": 1, status: "concluded", "total-progress": 1, type: "create", id: "cr1" },
  ]);
  expect(await qmp.execute("query-block-jobs")).toEqual([]);
  await qmp.execute("job-dismiss", { id: "cr1" });
  expect(await log.settled()).toEqual([
    "created:cr1",
    "running:cr1",
    "return",
    "waiting:cr1",
    "pending:cr1",
    "concluded:cr1",
    "null:cr1",
  ]);
  log.stop();
  expect(statSync(file).size).toBe(3 * 65536 + 8);
  await qmp.execute("blockdev-add", { driver: "qcow2", "node-name": "new", file: "newfile" });
  const nodes = (await qmp.execute("query-named-block-nodes", { flat: true })) as {
    "node-name": string;
    image: Record<string, unknown>;
  }[];
  expect(nodes.find((n) => n["node-name"] === "new")?.image).toMatchObject({
    format: "qcow2",
    "virtual-size": 67108864,
    "cluster-size": 65536,
  });
});

it("qcow2 options reach the header; inline file refs; failures conclude with an error", async () => {
  await using s = await startSession({ log: () => {} });
  const { qmp } = s;
  const file = s.dir.join("b.qcow2");
  await qmp.execute("blockdev-create", {
    "job-id": "f",
    options: { driver: "file", filename: file, size: 0 },
  });
  await until(() => JSON.stringify(s.daemon.jobs.queryJobs()).includes("concluded"));
  await qmp.execute("job-dismiss", { id: "f" });
  await qmp.execute("blockdev-create", {
    "job-id": "q",
    options: {
      driver: "qcow2",
      file: { driver: "file", filename: file },
      size: 1 << 20,
      "cluster-size": 4096,
      "refcount-bits": 8,
      "lazy-refcounts": true,
      "backing-file": "base.img",
      "backing-fmt": "raw",
    },
  });
  await until(() => JSON.stringify(s.daemon.jobs.queryJobs()).includes("concluded"));
  await qmp.execute("job-dismiss", { id: "q" });
  await qmp.execute("blockdev-add", {
    driver: "qcow2",
    "node-name": "b",
    backing: null,
    file: { driver: "file", filename: file },
  });
  const nodes = (await qmp.execute("query-named-block-nodes", { flat: true })) as {
    "node-name": string;
    image: Record<string, unknown>;
  }[];
  expect(nodes.find((n) => n["node-name"] === "b")?.image).toMatchObject({
    "cluster-size": 4096,
    "backing-filename": "base.img",
    "backing-filename-format": "raw",
    "format-specific": { type: "qcow2", data: { "lazy-refcounts": true, "refcount-bits": 8 } },
  });

  // A failing job concludes with its error (qemu: aborting, concluded).
  await qmp
    .execute("blockdev-create", {
      "job-id": "bad",
      options: { driver: "qcow2", file: "b", size: 1 << 20, "cluster-size": 1000 },
    })
    .catch(() => {});
  await until(() => JSON.stringify(s.daemon.jobs.queryJobs()).includes("concluded"));
  expect(await qmp.execute("query-jobs")).toEqual([
    {
      id: "bad",
      type: "create",
      status: "concluded",
      "current-progress": 0,
      "total-progress": 1,
      error: "Cluster size must be a power of two between 512 and 2048k",
    },
  ]);
  await qmp.execute("job-dismiss", { id: "bad" });

  await qmp.execute("blockdev-create", {
    "job-id": "x",
    options: { driver: "qcow2", file: "nope", size: 0 },
  });
  expect(
    await s.error("blockdev-create", { "job-id": "x", options: { driver: "file", filename: file, size: 0 } }),
  ).toEqual(generic("Job ID 'x' already in use"));
  await until(() => JSON.stringify(s.daemon.jobs.queryJobs()).includes("concluded"));
  expect(await qmp.execute("query-jobs")).toMatchObject([
    { id: "x", status: "concluded", error: "Cannot find device='nope' nor node-name='nope'" },
  ]);
});

it("refuses bad arguments with QEMU's messages", async () => {
  await using s = await startSession({ log: () => {} });
  expect(await s.error("blockdev-create", { options: { driver: "file", filename: "/x", size: 0 } })).toEqual(
    generic("Parameter 'job-id' is missing"),
  );
  expect(await s.error("blockdev-create", { "job-id": "a", options: { driver: "file", size: 0 } })).toEqual(
    generic("Parameter 'options.filename' is missing"),
  );
  // QEMU names only the member in enum errors.
  expect(await s.error("blockdev-create", { "job-id": "a", options: { driver: "bogus" } })).toEqual(
    generic("Parameter 'driver' does not accept value 'bogus'"),
  );
  expect(await s.error("blockdev-create", { "job-id": "a", options: { driver: "raw" } })).toEqual(
    generic("Driver does not support blockdev-create"),
  );
  expect(
    await s.error("blockdev-create", {
      "job-id": "1a",
      options: { driver: "file", filename: s.dir.join("z"), size: 0 },
    }),
  ).toEqual(generic("Invalid job ID '1a'"));
});
