import { pattern } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { BlockGraph, type BlockNode, CopyEngine, type MemoryDriver, memoryDriver } from "../src/index.ts";

const CL = 65536;

async function dense(graph: BlockGraph, chunks: number): Promise<BlockNode> {
  const n = await graph.open(memoryDriver, { size: chunks * CL, clusterSize: CL }, { nodeName: "src" });
  for (let i = 0; i < chunks; i++) await n.write(i * CL, pattern(7, i * CL, CL));
  return n;
}

function work(n: BlockNode) {
  const b = n.createBitmapSync({ granularity: CL, disabled: true });
  b.setDirty(0, n.length);
  return b;
}

/** Waits (without sleeping) until `cond` holds, failing after 10 s. */
async function until(cond: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((r) => setImmediate(r));
  }
}

/** A target whose writes are held until released, recording the order in which they started. */
async function gatedTarget(graph: BlockGraph, size: number) {
  const dst = await graph.open(memoryDriver, { size, clusterSize: CL }, { nodeName: "dst" });
  const started: number[] = [];
  const gates = new Map<number, () => void>();
  (dst.state as MemoryDriver).hook = (req) => {
    if (req.kind !== "write") return undefined;
    started.push(req.offset);
    return new Promise<void>((r) => gates.set(req.offset, r));
  };
  return { dst, started, gates };
}

describe("copy engine: writePlaced", () => {
  it("starts the next chunk's write once the previous one is placed, still in order", async () => {
    const graph = new BlockGraph();
    const src = await dense(graph, 4);
    const { dst, started, gates } = await gatedTarget(graph, src.length);
    const placedAt: number[] = [];
    const engine = new CopyEngine({
      source: src,
      target: dst,
      bitmap: work(src),
      chunkSize: CL,
      maxWorkers: 4,
      status: "none",
      inOrderWrites: true,
      // Placed as soon as the target has seen the write start.
      writePlaced: async (offset, bytes, written) => {
        expect(bytes).toBe(CL);
        await Promise.race([until(() => started.includes(offset), `write at ${offset} started`), written]);
        placedAt.push(offset);
      },
    });
    const done = engine.run();
    // Every write starts although none has finished.
    await until(() => started.length === 4, "all four writes started");
    expect(started).toEqual([0, CL, 2 * CL, 3 * CL]);
    for (const off of [3 * CL, 2 * CL, CL, 0]) gates.get(off)?.();
    const r = await done;
    expect(r.copied).toBe(4 * CL);
    expect(placedAt).toEqual([0, CL, 2 * CL, 3 * CL]);
    expect(Buffer.compare(await dst.read(0, dst.length), await src.read(0, src.length))).toBe(0);
  });

  it("falls back to waiting for the write when it is never placed", async () => {
    const graph = new BlockGraph();
    const src = await dense(graph, 3);
    const { dst, started, gates } = await gatedTarget(graph, src.length);
    const engine = new CopyEngine({
      source: src,
      target: dst,
      bitmap: work(src),
      chunkSize: CL,
      maxWorkers: 3,
      status: "none",
      inOrderWrites: true,
      writePlaced: (_offset, _bytes, written) => written,
    });
    const done = engine.run();
    for (let k = 0; k < 3; k++) {
      await until(() => started.length === k + 1, `write ${k} started`);
      // The next write waits for this one: nothing more starts while it is held.
      for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
      expect(started.length).toBe(k + 1);
      gates.get(k * CL)?.();
    }
    await done;
    expect(started).toEqual([0, CL, 2 * CL]);
  });

  it("a failed write still fails the pass when its successor was already started", async () => {
    const graph = new BlockGraph();
    const src = await dense(graph, 2);
    const dst = await graph.open(memoryDriver, { size: src.length, clusterSize: CL }, { nodeName: "dst" });
    const started: number[] = [];
    let fail!: () => void;
    (dst.state as MemoryDriver).hook = (req) => {
      if (req.kind !== "write") return undefined;
      started.push(req.offset);
      if (req.offset !== 0) return undefined;
      return new Promise<void>((_, reject) => {
        fail = () => reject(new Error("injected write error"));
      });
    };
    const errors: number[] = [];
    const engine = new CopyEngine({
      source: src,
      target: dst,
      bitmap: work(src),
      chunkSize: CL,
      maxWorkers: 2,
      status: "none",
      inOrderWrites: true,
      writePlaced: async (offset, _bytes, written) => {
        await Promise.race([until(() => started.includes(offset), "write started"), written]);
      },
      onError: (e) => {
        errors.push(e.offset);
        return "fail";
      },
    });
    const done = engine.run();
    await until(() => started.length === 2, "both writes started");
    fail();
    await expect(done).rejects.toThrow("injected write error");
    expect(errors).toEqual([0]);
  });
});
