/** The README example of the qcow2 driver, kept runnable; plus concurrency of the read path. */
import { writeFileSync } from "node:fs";
import { BlockGraph, memoryDriver } from "@blk/core";
import { makeTempDir } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { openQcow2, type Qcow2CheckResult, qcow2Driver, qcow2ImageInfo } from "../src/qcow2/index.ts";
import { buildQcow2 } from "./fixtures/qcow2/build.ts";

const dir = makeTempDir("blk-q2readme");
afterAll(() => dir.dispose());

describe("qcow2 README example", () => {
  it("runs", async () => {
    const path = dir.join("disk.qcow2");
    writeFileSync(
      path,
      buildQcow2({
        size: 1 << 20,
        clusters: { 0: { kind: "data", fill: 0xab }, 3: { kind: "compressed", fill: 7 } },
      }),
    );
    // --- README example ---
    await using img = await openQcow2(path, { forceShare: true });
    const first = await img.root.read(0, 512); // guest bytes (backing chain and compression resolved)
    const map = await img.node.blockStatusAbove(0, img.node.length); // qemu-img map extents (depth, data, zero)
    const report = (await img.node.check()) as Qcow2CheckResult; // qemu-img check numbers
    const info = qcow2ImageInfo(img.state, "disk.qcow2"); // qemu-img info --output=json (minus actual-size)
    // --- end ---
    expect(first[0]).toBe(0xab);
    expect(map[0]).toMatchObject({ offset: 0, length: 65536, data: true, depth: 0 });
    expect(report).toMatchObject({ corruptions: 0, leaks: 0, allocatedClusters: 2, compressedClusters: 1 });
    expect(info).toMatchObject({ format: "qcow2", "virtual-size": 1 << 20, "cluster-size": 65536 });
  });

  it("serves concurrent reads sharing L2 tables and compressed clusters", async () => {
    const clusters: Parameters<typeof buildQcow2>[0]["clusters"] = {};
    for (let i = 0; i < 64; i++)
      clusters[i] = i % 3 === 0 ? { kind: "compressed", fill: i } : { kind: "data", fill: i };
    const img = buildQcow2({ clusterBits: 12, size: 1 << 20, clusters });
    const graph = new BlockGraph();
    const file = await graph.open(memoryDriver, { size: img.length, data: img }, { owned: false });
    const node = await graph.open(
      qcow2Driver,
      { "l2-cache-size": 8192 },
      { readOnly: true, children: { file } },
    );
    const reads = Array.from({ length: 200 }, (_, k) => {
      const c = (k * 37) % 64;
      const off = c * 4096 + ((k * 97) % 4000);
      return node.read(off, 96).then((b) => [c, b] as const);
    });
    for (const [c, b] of await Promise.all(reads)) expect(b.every((x) => x === c)).toBe(true);
  });
});
