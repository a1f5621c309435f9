// transaction: the spec §3 transcript scenarios (grouped refuses bitmap actions, bitmap-add + backup,
// grouped backups with manual finalize, cancelling one grouped job, abort, bad completion-mode) and the
// all-or-nothing rollback of every action type.
import { backendParent, PERM } from "@blk/core";
import { createQcow2 } from "@blk/drivers/qcow2";
import { expect, it } from "vitest";
import { recordEvents, until } from "./event-log.ts";
import { generic, startSession } from "./helpers.ts";

const MiB = 1 << 20;
const SIZE = 8 * MiB;

async function session() {
  const s = await startSession({ log: () => {} });
  for (const n of ["a", "t1", "t2"]) {
    await createQcow2({ filename: s.dir.join(`${n}.qcow2`), size: SIZE });
    await s.qmp.execute("blockdev-add", {
      driver: "qcow2",
      "node-name": n,
      file: { driver: "file", filename: s.dir.join(`${n}.qcow2`) },
    });
  }
  const a = s.daemon.graph.find("a");
  if (a === undefined) throw new Error("no a");
  const vm = s.daemon.graph.attach(backendParent(), a, {
    name: "root",
    perm: PERM.WRITE | PERM.CONSISTENT_READ,
  });
  await vm.write(0, new Uint8Array(2 * MiB).fill(0x5a));
  return { ...s, vm, [Symbol.asyncDispose]: s[Symbol.asyncDispose] };
}

const graphShape = async (qmp: { execute(c: string): Promise<unknown> }) =>
  JSON.stringify(await qmp.execute("x-debug-query-block-graph"));

it("grouped refuses bitmap actions; bitmap-add + backup (individual) as qsd 7.2", async () => {
  await using s = await session();
  const { qmp } = s;
  const before = await graphShape(qmp);
  expect(
    await s.error("transaction", {
      actions: [
        { type: "block-dirty-bitmap-add", data: { node: "a", name: "t-bm" } },
        { type: "blockdev-backup", data: { "job-id": "tb0", device: "a", target: "t1", sync: "full" } },
      ],
      properties: { "completion-mode": "grouped" },
    }),
  ).toEqual(
    generic(
      "Action 'block-dirty-bitmap-add' does not support Transaction property completion-mode = grouped",
    ),
  );
  expect(await graphShape(qmp)).toBe(before);
  expect(await qmp.execute("query-jobs")).toEqual([]);

  const log = recordEvents(qmp);
  expect(
    await qmp.execute("transaction", {
      actions: [
        { type: "block-dirty-bitmap-add", data: { node: "a", name: "t-bm" } },
        { type: "blockdev-backup", data: { "job-id": "tb0", device: "a", target: "t1", sync: "full" } },
      ],
    }),
  ).toEqual({});
  log.mark("return");
  await until(() => log.entries.includes("null:tb0"));
  expect(await log.settled()).toEqual([
    "created:tb0",
    "running:tb0",
    "paused:tb0",
    "running:tb0",
    "return",
    "waiting:tb0",
    "pending:tb0",
    "BLOCK_JOB_COMPLETED:tb0",
    "concluded:tb0",
    "null:tb0",
  ]);
  expect(s.daemon.graph.find("a")?.getBitmap("t-bm")).toBeDefined();
  log.stop();
});

it("grouped backups with manual finalize: both pend, finalizing one finalizes both", async () => {
  await using s = await session();
  const { qmp } = s;
  const log = recordEvents(qmp);
  await qmp.execute("transaction", {
    actions: [
      {
        type: "blockdev-backup",
        data: { "job-id": "tb1", device: "a", target: "t1", sync: "full", "auto-finalize": false },
      },
      {
        type: "blockdev-backup",
        data: { "job-id": "tb2", device: "a", target: "t2", sync: "full", "auto-finalize": false },
      },
    ],
    properties: { "completion-mode": "grouped" },
  });
  log.mark("return");
  // The jobs may reach WAITING before this reads the log: compare up to the return only.
  const early = await log.settled();
  expect(early.slice(0, early.indexOf("return") + 1)).toEqual([
    "created:tb1",
    "created:tb2",
    "running:tb1",
    "paused:tb1",
    "running:tb2",
    "paused:tb2",
    "running:tb2",
    "running:tb1",
    "return",
  ]);
  await until(() => log.entries.filter((e) => e.startsWith("BLOCK_JOB_PENDING")).length === 2);
  expect(await qmp.execute("query-jobs")).toEqual([
    { "current-progress": SIZE, status: "pending", "total-progress": SIZE, type: "backup", id: "tb2" },
    { "current-progress": SIZE, status: "pending", "total-progress": SIZE, type: "backup", id: "tb1" },
  ]);
  log.reset();
  await qmp.execute("job-finalize", { id: "tb2" });
  log.mark("return");
  expect(await log.settled()).toEqual([
    "BLOCK_JOB_COMPLETED:tb2",
    "concluded:tb2",
    "null:tb2",
    "BLOCK_JOB_COMPLETED:tb1",
    "concluded:tb1",
    "null:tb1",
    "return",
  ]);
  log.stop();
});

it("cancelling one grouped job cancels both; abort action; bad completion-mode", async () => {
  await using s = await session();
  const { qmp } = s;
  const log = recordEvents(qmp);
  await qmp.execute("transaction", {
    actions: [
      {
        type: "blockdev-backup",
        data: { "job-id": "tb5", device: "a", target: "t1", sync: "full", speed: MiB },
      },
      {
        type: "blockdev-backup",
        data: { "job-id": "tb6", device: "a", target: "t2", sync: "full", speed: MiB },
      },
    ],
    properties: { "completion-mode": "grouped" },
  });
  log.reset();
  await qmp.execute("job-cancel", { id: "tb5" });
  await until(() => log.entries.includes("null:tb5") && log.entries.includes("null:tb6"));
  const entries = await log.settled();
  expect(entries.slice(0, 2)).toEqual(["aborting:tb5", "aborting:tb6"]);
  expect(entries).toContain("BLOCK_JOB_CANCELLED:tb5");
  expect(entries).toContain("BLOCK_JOB_CANCELLED:tb6");
  log.stop();

  expect(
    await s.error("transaction", {
      actions: [
        { type: "block-dirty-bitmap-add", data: { node: "a", name: "t-bm3" } },
        { type: "abort", data: {} },
      ],
    }),
  ).toEqual(generic("Transaction aborted using Abort action"));
  expect(s.daemon.graph.find("a")?.getBitmap("t-bm3")).toBeUndefined();
  expect(
    await s.error("transaction", {
      actions: [
        { type: "blockdev-backup", data: { "job-id": "tb4", device: "a", target: "t1", sync: "full" } },
      ],
      properties: { "completion-mode": "bogus" },
    }),
  ).toEqual(generic("Parameter 'completion-mode' does not accept value 'bogus'"));
});

it("a failing action rolls back every prepared one", async () => {
  await using s = await session();
  const { qmp, daemon, vm } = s;
  const a = daemon.graph.find("a");
  if (a === undefined) throw new Error("no a");
  await qmp.execute("block-dirty-bitmap-add", { node: "a", name: "dirty" });
  await qmp.execute("block-dirty-bitmap-add", { node: "a", name: "off", disabled: true });
  await qmp.execute("block-dirty-bitmap-add", { node: "a", name: "on" });
  await qmp.execute("block-dirty-bitmap-add", { node: "a", name: "gone" });
  await qmp.execute("block-dirty-bitmap-add", { node: "a", name: "m" });
  await vm.write(0, new Uint8Array(65536).fill(1));
  const sums = async () =>
    Promise.all(
      ["dirty", "m", "gone"].map((name) =>
        qmp.execute("x-debug-block-dirty-bitmap-sha256", { node: "a", name }),
      ),
    );
  const beforeSums = await sums();
  await qmp.execute("block-dirty-bitmap-clear", { node: "a", name: "m" });
  const mSum = await qmp.execute("x-debug-block-dirty-bitmap-sha256", { node: "a", name: "m" });
  const beforeGraph = await graphShape(qmp);
  const log = recordEvents(qmp);
  expect(
    await s.error("transaction", {
      actions: [
        { type: "block-dirty-bitmap-add", data: { node: "a", name: "new" } },
        { type: "block-dirty-bitmap-clear", data: { node: "a", name: "dirty" } },
        { type: "block-dirty-bitmap-enable", data: { node: "a", name: "off" } },
        { type: "block-dirty-bitmap-disable", data: { node: "a", name: "on" } },
        { type: "block-dirty-bitmap-remove", data: { node: "a", name: "gone" } },
        { type: "block-dirty-bitmap-merge", data: { node: "a", target: "m", bitmaps: ["dirty"] } },
        { type: "blockdev-backup", data: { "job-id": "j1", device: "a", target: "t1", sync: "full" } },
        {
          type: "blockdev-snapshot-sync",
          data: { "node-name": "a", "snapshot-file": s.dir.join("ov.qcow2"), "snapshot-node-name": "ov" },
        },
        { type: "block-dirty-bitmap-add", data: { node: "a", name: "dirty" } },
      ],
    }),
  ).toEqual(generic("Bitmap already exists: dirty"));
  expect(await log.settled()).toEqual(["created:j1", "aborting:j1", "concluded:j1", "null:j1"]);
  log.stop();
  expect(await graphShape(qmp)).toBe(beforeGraph);
  expect(vm.child.nodeName).toBe("a");
  expect(a.getBitmap("new")).toBeUndefined();
  expect(await sums()).toEqual([beforeSums[0], mSum, beforeSums[2]]);
  const info = (await qmp.execute("query-named-block-nodes", { flat: true })) as {
    "node-name": string;
    "dirty-bitmaps"?: { name: string; recording: boolean; busy: boolean }[];
  }[];
  const bitmaps = info.find((n) => n["node-name"] === "a")?.["dirty-bitmaps"] ?? [];
  expect(Object.fromEntries(bitmaps.map((b) => [b.name, [b.recording, b.busy]]))).toEqual({
    dirty: [true, false],
    off: [false, false],
    on: [true, false],
    gone: [true, false],
    m: [true, false],
  });
  expect(await qmp.execute("query-jobs")).toEqual([]);
  expect(daemon.graph.find("ov")).toBeUndefined();

  // The same actions without the failing one all take effect.
  await qmp.execute("transaction", {
    actions: [
      { type: "block-dirty-bitmap-add", data: { node: "a", name: "new" } },
      { type: "block-dirty-bitmap-clear", data: { node: "a", name: "dirty" } },
      { type: "block-dirty-bitmap-enable", data: { node: "a", name: "off" } },
      { type: "block-dirty-bitmap-disable", data: { node: "a", name: "on" } },
      { type: "block-dirty-bitmap-remove", data: { node: "a", name: "gone" } },
      {
        type: "blockdev-snapshot-sync",
        data: { "node-name": "a", "snapshot-file": s.dir.join("ov.qcow2"), "snapshot-node-name": "ov" },
      },
    ],
  });
  expect(a.getBitmap("gone")).toBeUndefined();
  expect(a.getBitmap("new")).toBeDefined();
  expect(a.getBitmap("dirty")?.count()).toBe(0);
  expect(a.getBitmap("off")?.enabled).toBe(true);
  expect(a.getBitmap("on")?.enabled).toBe(false);
  expect(vm.child.nodeName).toBe("ov");
  vm.detach();
});

it("refuses unknown action types and bitmap lookups with QEMU's messages", async () => {
  await using s = await session();
  expect(await s.error("transaction", { actions: [{ type: "bogus", data: {} }] })).toEqual(
    // QEMU names only the member in enum errors (as `completion-mode` inside `properties`).
    generic("Parameter 'type' does not accept value 'bogus'"),
  );
  expect(
    await s.error("transaction", {
      actions: [{ type: "block-dirty-bitmap-clear", data: { node: "nope", name: "x" } }],
    }),
  ).toEqual(generic("Node 'nope' not found"));
  expect(
    await s.error("transaction", {
      actions: [{ type: "block-dirty-bitmap-remove", data: { node: "a", name: "x" } }],
    }),
  ).toEqual(generic("Dirty bitmap 'x' not found"));
  s.vm.detach();
});
