/**
 * `Qcow2State.whenPlaced`: a write's clusters count as placed once they are allocated (before the data is
 * written) or when a write reaches them in place, so a copy can start the next write early and still
 * lay clusters out in guest order (what `blk-img convert` does into a fresh qcow2).
 */
import { BlockGraph, CopyEngine, memoryDriver } from "@blk/core";
import { makeTempDir, pattern } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { createQcow2, openQcow2, SC } from "../src/qcow2/index.ts";

const CL = 65536;
const dir = makeTempDir("blk-q2placed");
afterAll(() => dir.dispose());

const same = (a: Uint8Array, b: Uint8Array): boolean => Buffer.compare(a, b) === 0;

let n = 0;
async function fresh(size: number) {
  const filename = dir.join(`p${n++}.qcow2`);
  await createQcow2({ filename, size });
  return openQcow2(filename, { writable: true, cacheNoFlush: true });
}

describe("qcow2 whenPlaced", () => {
  it("resolves once the clusters are allocated, before the data is written", async () => {
    const img = await fresh(16 * CL);
    try {
      const events: string[] = [];
      const a = img.root.write(0, pattern(1, 0, 3 * CL));
      const placed = img.state.whenPlaced(3 * CL - 1, a).then(() => events.push("placed a"));
      void a.then(() => events.push("written a"));
      await placed;
      // Started after A was placed: its clusters go after A's.
      const b = img.root.write(3 * CL, pattern(1, 3 * CL, 3 * CL));
      await Promise.all([a, b]);
      expect(events).toEqual(["placed a", "written a"]);
      const ra = await img.state.mapRun(0, 6 * CL);
      expect(ra.type).toBe(SC.NORMAL);
      // One host-contiguous run: B's clusters right after A's.
      expect(ra.bytes).toBe(6 * CL);
      expect(same(await img.root.read(0, 6 * CL), pattern(1, 0, 6 * CL))).toBe(true);
    } finally {
      await img.close();
    }
  });

  it("resolves for an allocated cluster when a write reaches it, and when `until` settles otherwise", async () => {
    const img = await fresh(16 * CL);
    try {
      await img.root.write(0, pattern(2, 0, CL));
      const w = img.root.write(100, new Uint8Array(10).fill(9));
      await img.state.whenPlaced(200, w);
      await w;
      // Nobody writes cluster 5: only `until` ends the wait.
      let settle!: () => void;
      const until = new Promise<void>((r) => (settle = r));
      let done = false;
      const p = img.state.whenPlaced(5 * CL, until).then(() => {
        done = true;
      });
      await img.root.write(2 * CL, pattern(3, 0, CL));
      expect(done).toBe(false);
      settle();
      await p;
      expect(done).toBe(true);
    } finally {
      await img.close();
    }
  });

  it("a copy that starts each write once the previous one is placed lays clusters out in guest order", async () => {
    const chunks = 24;
    const chunk = 2 * CL;
    const graph = new BlockGraph();
    const src = await graph.open(memoryDriver, { size: chunks * chunk, clusterSize: CL }, { nodeName: "s" });
    await src.write(0, pattern(4, 0, chunks * chunk));
    const img = await fresh(chunks * chunk);
    try {
      const work = src.createBitmapSync({ granularity: CL, disabled: true });
      work.setDirty(0, src.length);
      const engine = new CopyEngine({
        source: src,
        target: img.root,
        bitmap: work,
        chunkSize: chunk,
        maxWorkers: 8,
        status: "none",
        inOrderWrites: true,
        writePlaced: (offset, bytes, written) => img.state.whenPlaced(offset + bytes - 1, written),
      });
      const r = await engine.run();
      expect(r.copied).toBe(chunks * chunk);
      const first = await img.state.mapRun(0, CL);
      for (let i = 0; i < chunks * 2; i++) {
        const run = await img.state.mapRun(i * CL, CL);
        expect({ i, host: run.host }).toEqual({ i, host: first.host + i * CL });
      }
      expect(same(await img.root.read(0, chunks * chunk), await src.read(0, chunks * chunk))).toBe(true);
    } finally {
      await img.close();
    }
  });
});
