/**
 * The request path's cost per operation on the memory driver: the driver state alone (the reference),
 * a plain node, and a node with a dirty bitmap and a before-write notifier. Each variant first proves it
 * produces the same disk content and the bitmap marks exactly what was written.
 */
import { bench, describe, expect } from "vitest";
import { BlockGraph, type BlockNode, type MemoryDriver, memoryDriver } from "../src/index.ts";

const SIZE = 16 << 20;
const IO = 4096;
const OPS = 256;
const data = new Uint8Array(IO).fill(0x5a);
const offsetOf = (i: number): number => ((i * 7919) % (SIZE / IO)) * IO;

async function node(withHooks: boolean): Promise<BlockNode> {
  const graph = new BlockGraph();
  const n = await graph.open(memoryDriver, { size: SIZE, clusterSize: 65536 }, { nodeName: "n" });
  if (withHooks) {
    n.createBitmapSync({ name: "b", granularity: 65536 });
    let seen = 0;
    n.beforeWrite.add(() => {
      seen++;
    });
    if (seen < 0) throw new Error("unreachable");
  }
  return n;
}

async function writes(write: (off: number) => Promise<void>): Promise<void> {
  const all: Promise<void>[] = [];
  for (let i = 0; i < OPS; i++) all.push(write(offsetOf(i)));
  await Promise.all(all);
}

async function reads(read: (off: number, buf: Uint8Array) => Promise<void>): Promise<void> {
  const buf = new Uint8Array(IO);
  for (let i = 0; i < OPS; i++) await read(offsetOf(i), buf);
}

const plain = await node(false);
const hooked = await node(true);
const driver = (await node(false)).state as MemoryDriver;

describe(`request path: ${OPS} × ${IO}-byte writes`, async () => {
  // Reference check: the three paths leave the same content; the bitmap marks exactly the written clusters.
  await writes((o) => driver.write(o, data));
  await writes((o) => plain.write(o, data));
  await writes((o) => hooked.write(o, data));
  const ref = await driver.snapshot();
  expect(Buffer.compare(await plain.read(0, SIZE), ref)).toBe(0);
  expect(Buffer.compare(await hooked.read(0, SIZE), ref)).toBe(0);
  const clusters = new Set<number>();
  for (let i = 0; i < OPS; i++) clusters.add(Math.floor(offsetOf(i) / 65536));
  expect(hooked.getBitmap("b")?.count()).toBe(clusters.size * 65536);

  bench("driver state alone (reference)", () => writes((o) => driver.write(o, data)));
  bench("BlockNode", () => writes((o) => plain.write(o, data)));
  bench("BlockNode + dirty bitmap + before-write notifier", () => writes((o) => hooked.write(o, data)));
});

describe(`request path: ${OPS} × ${IO}-byte reads`, () => {
  bench("driver state alone (reference)", () => reads((o, b) => driver.read(o, b)));
  bench("BlockNode", () => reads((o, b) => plain.readInto(o, b)));
  bench("BlockNode + dirty bitmap + before-write notifier", () => reads((o, b) => hooked.readInto(o, b)));
});
