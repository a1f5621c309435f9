// blockdev-create's qcow2 (over an open file node) is byte-identical to `qemu-img create -f qcow2` and
// passes qemu-img check.
import { readFileSync } from "node:fs";
import { missingPeers, run } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { until } from "./event-log.ts";
import { startSession } from "./helpers.ts";

const missing = missingPeers(["qemu-img"]);
if (missing.length > 0) console.log(`create.qemu.test: skipped, missing ${missing.join(", ")}`);

describe.skipIf(missing.length > 0)("blockdev-create vs qemu-img", { tags: ["qemu"] }, () => {
  it("file + qcow2 over the file node equals qemu-img create, and checks clean", async () => {
    const s = await startSession({ log: () => {} });
    const mine = s.dir.join("new.qcow2");
    const theirs = s.dir.join("ref.qcow2");
    try {
      const done = (id: string) =>
        until(() => s.daemon.jobs.queryJobs().some((j) => j.id === id && j.status === "concluded"));
      await s.qmp.execute("blockdev-create", {
        "job-id": "c0",
        options: { driver: "file", filename: mine, size: 0 },
      });
      await done("c0");
      await s.qmp.execute("job-dismiss", { id: "c0" });
      await s.qmp.execute("blockdev-add", { driver: "file", "node-name": "f", filename: mine });
      await s.qmp.execute("blockdev-create", {
        "job-id": "c1",
        options: {
          driver: "qcow2",
          file: "f",
          size: 64 << 20,
          "cluster-size": 65536,
          "lazy-refcounts": true,
        },
      });
      await done("c1");
      expect(s.daemon.jobs.queryJobs()[0]).not.toHaveProperty("error");
      await s.qmp.execute("job-dismiss", { id: "c1" });
    } finally {
      await s.qmp.close();
      await s.daemon.close();
    }
    try {
      const r = await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        theirs,
        "64M",
      ]);
      expect(r.code).toBe(0);
      expect(Buffer.compare(readFileSync(mine), readFileSync(theirs))).toBe(0);
      const c = await run("qemu-img", ["check", mine]);
      expect(c.code, c.stdout + c.stderr).toBe(0);
    } finally {
      await s.dir.dispose();
    }
  });
});
