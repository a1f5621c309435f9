import { expect, it } from "vitest";
import { type BeforeWriteEvent, BlockGraph, memoryDriver } from "../src/index.ts";

it("README example", async () => {
  // A graph with one 1 MiB in-memory node (64 KiB clusters).
  const graph = new BlockGraph();
  const disk = await graph.open(memoryDriver, { size: 1 << 20 }, { nodeName: "disk" });

  // A before-write notifier sees each write before the driver runs, old data still in place.
  const log: string[] = [];
  disk.beforeWrite.add(async ({ kind, offset, bytes, node }: BeforeWriteEvent) => {
    const old = await node.read(offset, bytes, { noSerialising: true });
    log.push(`${kind} ${offset}+${bytes}, old first byte ${old[0]}`);
  });

  // A dirty bitmap (default granularity: the cluster size clamped to [4 KiB, 64 KiB]).
  const bitmap = await disk.createBitmap({ name: "bitmap0" });

  await disk.write(0, new Uint8Array(4096).fill(0xab));
  await disk.write(65535, new Uint8Array(2).fill(0xcd));
  await disk.writeZeroes(512 * 1024, 4096);

  expect(log).toEqual([
    "write 0+4096, old first byte 0",
    "write 65535+2, old first byte 0",
    "write-zeroes 524288+4096, old first byte 0",
  ]);
  expect(bitmap.info()).toEqual({
    name: "bitmap0",
    recording: true,
    busy: false,
    persistent: false,
    granularity: 65536,
    count: 196608,
  });
  const dirty: number[] = [];
  for (let off = bitmap.nextDirty(0); off !== -1; off = bitmap.nextDirty(off + bitmap.granularity))
    dirty.push(off);
  expect(dirty).toEqual([0, 65536, 524288]);
  expect(disk.stats.wr_operations).toBe(3);

  await graph.delete(disk);
});
