import { writeFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { generic, startSession } from "./helpers.ts";

const MiB = 1 << 20;

describe("dirty bitmaps (transcripts §3)", () => {
  it("add/enable/disable/merge/clear/remove and QEMU's messages", async () => {
    await using s = await startSession();
    const a = s.dir.join("a.img");
    writeFileSync(a, Buffer.alloc(4 * MiB));
    await s.qmp.execute("blockdev-add", {
      driver: "raw",
      "node-name": "a",
      file: { driver: "file", filename: a },
    });
    await s.qmp.execute("blockdev-add", { driver: "null-co", "node-name": "n", size: MiB });
    await s.qmp.execute("block-dirty-bitmap-add", { node: "a", name: "b0" });
    await s.qmp.execute("block-dirty-bitmap-add", {
      node: "a",
      name: "b1",
      granularity: 4096,
      disabled: true,
    });
    expect(await s.error("block-dirty-bitmap-add", { node: "a", name: "b0" })).toEqual(
      generic("Bitmap already exists: b0"),
    );
    for (const g of [1000, 256])
      expect(await s.error("block-dirty-bitmap-add", { node: "a", name: "bx", granularity: g })).toEqual(
        generic("Granularity must be power of 2 and at least 512"),
      );
    expect(await s.error("block-dirty-bitmap-add", { node: "a", name: "" })).toEqual(
      generic("Bitmap name cannot be empty"),
    );
    expect(await s.error("block-dirty-bitmap-add", { node: "nosuch", name: "" })).toEqual(
      generic("Bitmap name cannot be empty"),
    );
    expect(await s.error("block-dirty-bitmap-add", { node: "nosuch", name: "b" })).toEqual(
      generic("Cannot find device='nosuch' nor node-name='nosuch'"),
    );
    expect(await s.error("block-dirty-bitmap-add", { node: "a", name: "p", persistent: true })).toEqual(
      generic("Can't store persistent bitmaps to a: Operation not supported"),
    );
    await s.qmp.execute("block-dirty-bitmap-disable", { node: "a", name: "b0" });
    await s.qmp.execute("block-dirty-bitmap-enable", { node: "a", name: "b0" });
    await s.qmp.execute("block-dirty-bitmap-add", { node: "a", name: "b2" });
    s.daemon.graph.find("a")?.getBitmap("b0")?.setDirty(0, 65536);
    await s.qmp.execute("block-dirty-bitmap-merge", {
      node: "a",
      target: "b1",
      bitmaps: ["b0", { node: "a", name: "b2" }],
    });
    expect(
      await s.error("block-dirty-bitmap-merge", { node: "a", target: "b1", bitmaps: ["nosuch"] }),
    ).toEqual(generic("Dirty bitmap 'nosuch' not found"));
    expect(
      await s.error("block-dirty-bitmap-merge", {
        node: "a",
        target: "b1",
        bitmaps: [{ node: "nosuch", name: "x" }],
      }),
    ).toEqual(generic("Node 'nosuch' not found"));
    await s.qmp.execute("block-dirty-bitmap-add", { node: "n", name: "c" });
    expect(
      await s.error("block-dirty-bitmap-merge", {
        node: "a",
        target: "b1",
        bitmaps: [{ node: "n", name: "c" }],
      }),
    ).toEqual(
      generic(
        "Bitmaps are of different sizes (destination size is 4194304, source size is 1048576) and can't be merged",
      ),
    );
    expect(await s.error("block-dirty-bitmap-merge", { node: "a", target: "b1", bitmaps: [7] })).toEqual(
      generic("Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    );

    const info = await s.qmp.execute<{ "node-name": string; "dirty-bitmaps"?: unknown[] }[]>(
      "query-named-block-nodes",
      { flat: true },
    );
    expect(info.find((n) => n["node-name"] === "a")?.["dirty-bitmaps"]).toEqual([
      { name: "b2", recording: true, persistent: false, busy: false, granularity: 65536, count: 0 },
      { name: "b1", recording: false, persistent: false, busy: false, granularity: 4096, count: 65536 },
      { name: "b0", recording: true, persistent: false, busy: false, granularity: 65536, count: 65536 },
    ]);
    const sha = await s.qmp.execute<{ sha256: string }>("x-debug-block-dirty-bitmap-sha256", {
      node: "a",
      name: "b1",
    });
    expect(sha.sha256).toMatch(/^[0-9a-f]{64}$/);

    await s.qmp.execute("block-dirty-bitmap-clear", { node: "a", name: "b1" });
    expect(s.daemon.graph.find("a")?.getBitmap("b1")?.count()).toBe(0);
    await s.qmp.execute("block-dirty-bitmap-remove", { node: "a", name: "b2" });
    expect(await s.error("block-dirty-bitmap-remove", { node: "a", name: "nosuch" })).toEqual(
      generic("Dirty bitmap 'nosuch' not found"),
    );
    expect(await s.error("block-dirty-bitmap-remove", { node: "nosuch", name: "b0" })).toEqual(
      generic("Node 'nosuch' not found"),
    );
    expect(await s.error("block-dirty-bitmap-enable", { node: "nosuch", name: "b0" })).toEqual(
      generic("Node 'nosuch' not found"),
    );
    expect(await s.error("block-dirty-bitmap-clear", { node: "a", name: "nosuch" })).toEqual(
      generic("Dirty bitmap 'nosuch' not found"),
    );
    // a busy bitmap (exported over NBD) refuses changes with QEMU's message
    const b0 = s.daemon.graph.find("a")?.getBitmap("b0");
    if (b0 === undefined) throw new Error("no b0");
    b0.busy = true;
    expect(await s.error("block-dirty-bitmap-clear", { node: "a", name: "b0" })).toEqual(
      generic("Bitmap 'b0' is currently in use by another operation and cannot be used"),
    );
    expect(await s.error("block-dirty-bitmap-remove", { node: "a", name: "b0" })).toEqual(
      generic("Bitmap 'b0' is currently in use by another operation and cannot be used"),
    );
  });

  it("writes to the node dirty the bitmaps (3 granules, as transcripts §3)", async () => {
    await using s = await startSession();
    await s.qmp.execute("blockdev-add", { driver: "null-co", "node-name": "n", size: 64 * MiB });
    await s.qmp.execute("block-dirty-bitmap-add", { node: "n", name: "b0" });
    const node = s.daemon.graph.find("n");
    await node?.write(MiB, new Uint8Array(65536));
    await node?.write(20 * MiB, new Uint8Array(100 * 1024));
    const info = await s.qmp.execute<{ "dirty-bitmaps": { count: number }[] }[]>("query-named-block-nodes");
    expect(info[0]?.["dirty-bitmaps"][0]?.count).toBe(196608);
  });
});
