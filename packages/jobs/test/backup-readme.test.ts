/** The README's backup example, kept runnable (only the imports differ). */
import { BlockGraph, backendParent, memoryDriver, PERM } from "@blk/core";
import { expect, it } from "vitest";
import { backup, JobManager } from "../src/index.ts";

it("README backup example", async () => {
  const log: unknown[] = [];
  const console = { log: (v: unknown) => log.push(v) };
  // --- README backup example start
  const graph = new BlockGraph();
  const disk = await graph.open(memoryDriver, { size: 4 << 20 }, { nodeName: "disk" });
  await graph.open(memoryDriver, { size: 4 << 20 }, { nodeName: "bk" });
  const vm = graph.attach(backendParent("vm0"), disk, {
    name: "root",
    perm: PERM.CONSISTENT_READ | PERM.WRITE,
  });
  await disk.createBitmap({ name: "b0" });

  const manager = new JobManager();
  const job = await backup(manager, {
    graph,
    "job-id": "full0",
    device: "disk",
    target: "bk",
    sync: "full",
    bitmap: "b0",
    "bitmap-mode": "on-success", // b0 restarts from the backup's point in time
  });
  console.log(vm.child.driver.format); // "copy-before-write": the filter took over the VM's edge
  await vm.write(0, new Uint8Array(512).fill(7)); // the old cluster is kept for bk before this write lands
  console.log(await job.outcome); // { status: "completed" }
  console.log(disk.getBitmap("b0")?.count()); // 65536: only the write made during the backup
  // --- README backup example end
  expect(log).toEqual(["copy-before-write", { status: "completed" }, 65536]);
  const bk = graph.find("bk");
  expect((await bk?.read(0, 512))?.every((b) => b === 0)).toBe(true);
});
