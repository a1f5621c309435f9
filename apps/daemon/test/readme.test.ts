// The README example, kept runnable: embed blkd with createDaemon() and drive it with QmpClient.
import { writeFileSync } from "node:fs";
// README: import { QmpClient } from "@blk/qmp";
import { QmpClient } from "@blk/qmp";
import { makeTempDir } from "@blk/testkit";
import { expect, it } from "vitest";
// README: import { createDaemon } from "@blk/daemon";
import { createDaemon } from "../src/index.ts";

it("README example", async () => {
  await using dir = makeTempDir("blkd-readme");
  const disk = dir.join("disk.img");
  writeFileSync(disk, Buffer.alloc(1 << 20));
  const log: string[] = [];

  // --- README example start ---
  // Options in qemu-storage-daemon's syntax, applied in order through the QMP handlers.
  await using daemon = await createDaemon({
    log: (record) => log.push(record.msg),
    options: [
      ["blockdev", `driver=raw,node-name=disk,file.driver=file,file.filename=${disk}`],
      ["object", "throttle-group,id=tg0,x-iops-total=1000"],
      ["blockdev", '{"driver": "throttle", "node-name": "thr", "throttle-group": "tg0", "file": "disk"}'],
      ["nbd-server", `addr.type=unix,addr.path=${dir.join("nbd.sock")}`],
      ["export", "type=nbd,id=exp0,node-name=thr,name=disk,writable=on"],
    ],
  });
  await daemon.qmp.listen({ path: dir.join("qmp.sock") });

  await using qmp = await QmpClient.connect({ path: dir.join("qmp.sock") });
  await qmp.execute("block-dirty-bitmap-add", { node: "disk", name: "b0" });
  const nodes = await qmp.execute<{ "node-name": string; drv: string }[]>("query-named-block-nodes");
  // nodes, newest first: thr (throttle), disk (raw), #blockNNN (file)

  const mark = qmp.eventMark();
  await qmp.execute("block-export-del", { id: "exp0" });
  const deleted = await qmp.waitEvent("BLOCK_EXPORT_DELETED", { since: mark }); // data: { id: "exp0" }

  const failure = await qmp.execute("blockdev-del", { "node-name": "disk" }).catch((e: unknown) => e);
  // QmpError GenericError "Block device disk is in use" (thr sits on it)
  // --- README example end ---

  expect(nodes.map((n) => n.drv)).toEqual(["throttle", "raw", "file"]);
  expect(nodes.slice(0, 2).map((n) => n["node-name"])).toEqual(["thr", "disk"]);
  expect(deleted.data).toEqual({ id: "exp0" });
  expect(failure).toMatchObject({ errorClass: "GenericError", desc: "Block device disk is in use" });
  expect(log).toContain("export added");
});
