// block-set-write-threshold and BLOCK_WRITE_THRESHOLD: one-shot, reset to 0 after firing, shown as
// write_threshold in query-named-block-nodes.
import { backendParent, PERM } from "@blk/core";
import { expect, it } from "vitest";
import { recordEvents } from "./event-log.ts";
import { generic, startSession } from "./helpers.ts";

it("fires BLOCK_WRITE_THRESHOLD once when a write ends past the threshold, then resets it", async () => {
  await using s = await startSession({
    log: () => {},
    options: [["blockdev", "driver=null-co,node-name=n0,size=4194304"]],
  });
  const { qmp, daemon } = s;
  expect(
    await qmp.execute("block-set-write-threshold", { "node-name": "n0", "write-threshold": 1 << 20 }),
  ).toEqual({});
  const info = (await qmp.execute("query-named-block-nodes")) as { write_threshold: number }[];
  expect(info[0]?.write_threshold).toBe(1 << 20);
  const node = daemon.graph.find("n0");
  if (node === undefined) throw new Error("no node");
  const edge = daemon.graph.attach(backendParent(), node, {
    name: "root",
    perm: PERM.WRITE | PERM.CONSISTENT_READ,
  });
  const log = recordEvents(qmp);
  const mark = qmp.eventMark();
  await edge.write(0, new Uint8Array(4096)); // below: nothing
  await edge.write((1 << 20) - 512, new Uint8Array(4096)); // ends 3584 bytes past it
  const ev = await qmp.waitEvent("BLOCK_WRITE_THRESHOLD", { since: mark, timeoutMs: 5000 });
  expect(ev.data).toEqual({ "node-name": "n0", "amount-exceeded": 3584, "write-threshold": 1 << 20 });
  const after = (await qmp.execute("query-named-block-nodes")) as { write_threshold: number }[];
  expect(after[0]?.write_threshold).toBe(0);
  await edge.write(2 << 20, new Uint8Array(4096)); // threshold off: no second event
  await qmp.execute("query-named-block-nodes");
  log.stop();
  expect(log.events.filter((e) => e.event === "BLOCK_WRITE_THRESHOLD")).toHaveLength(1);
  edge.detach();
});

it("refuses an unknown node and bad values with QEMU's messages", async () => {
  await using s = await startSession({ log: () => {} });
  expect(await s.error("block-set-write-threshold", { "node-name": "nope", "write-threshold": 1 })).toEqual(
    generic("Device 'nope' not found"),
  );
  expect(await s.error("block-set-write-threshold", { "node-name": "nope" })).toEqual(
    generic("Parameter 'write-threshold' is missing"),
  );
});
