import { pattern } from "@blk/testkit";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  BlkError,
  type BlkErrorCode,
  type BlockDriver,
  BlockGraph,
  type BlockNode,
  backendParent,
  CopyEngine,
  type CopyError,
  type CopyRangeDest,
  type CopyRangeSource,
  MemoryDriver,
  type MemoryDriverOptions,
  memoryDriver,
  PERM,
  PERM_ALL,
} from "../src/index.ts";

const RUNS = Number(process.env.BLK_FUZZ_RUNS ?? 25);
const CL = 65536;

/** A memory driver that can offload copies to another one (as two files on one file system). */
class OffloadMemory extends MemoryDriver {
  /** Bytes stored by copy offload. */
  offloaded = 0;
  /** Fail copy offload on the target side with this code. */
  fail: BlkErrorCode | undefined;

  copyRangeFrom(offset: number, bytes: number, dst: CopyRangeDest): Promise<void> {
    return this.request(() =>
      dst.node.copyRangeTo(
        { state: this, offset },
        dst.offset,
        bytes,
        dst.via === undefined ? {} : { via: dst.via },
      ),
    );
  }

  copyRangeTo(src: CopyRangeSource, offset: number, bytes: number): Promise<void> {
    return this.request(async () => {
      if (this.fail !== undefined) throw new BlkError(this.fail, "injected", { offset });
      if (!(src.state instanceof OffloadMemory))
        throw new BlkError("ENOTSUP", "Copy offloading is not supported");
      const buf = new Uint8Array(bytes);
      await src.state.read(src.offset, buf);
      await this._write(offset, buf);
      this.offloaded += bytes;
    });
  }
}

const offloadDriver: BlockDriver<MemoryDriverOptions> = {
  format: "x-test-offload",
  kind: "protocol",
  async open(options: MemoryDriverOptions): Promise<OffloadMemory> {
    return new OffloadMemory(options);
  },
};

type Kind = "unallocated" | "zero" | "data";

async function source(graph: BlockGraph, kinds: Kind[], cs: number, seed = 1): Promise<BlockNode> {
  const n = await graph.open(
    offloadDriver,
    { size: kinds.length * cs, clusterSize: cs },
    { nodeName: "src" },
  );
  for (let i = 0; i < kinds.length; i++) {
    if (kinds[i] === "zero") await n.writeZeroes(i * cs, cs);
    else if (kinds[i] === "data") await n.write(i * cs, pattern(seed, i * cs, cs));
  }
  return n;
}

const same = (a: Uint8Array, b: Uint8Array): boolean => Buffer.compare(a, b) === 0;
const contents = async (n: BlockNode): Promise<Uint8Array> => n.read(0, n.length);
const offl = (n: BlockNode): OffloadMemory => n.state as OffloadMemory;

function work(n: BlockNode, granularity: number) {
  const b = n.createBitmapSync({ granularity, disabled: true });
  b.setDirty(0, n.length);
  return b;
}

describe("copy engine: copy offload", () => {
  it("offloads data ranges; zero and unallocated ranges still go by block status", async () => {
    const graph = new BlockGraph();
    const kinds: Kind[] = ["data", "zero", "unallocated", "data", "data", "zero", "data"];
    const src = await source(graph, kinds, CL);
    const dst = await graph.open(offloadDriver, { size: src.length, clusterSize: CL }, { nodeName: "dst" });
    const engine = new CopyEngine({
      source: src,
      target: dst,
      bitmap: work(src, CL),
      chunkSize: 2 * CL,
      maxWorkers: 3,
      copyOffload: true,
      skipUnallocated: true,
    });
    const r = await engine.run();
    const data = kinds.filter((k) => k === "data").length * CL;
    expect(r).toMatchObject({ copied: data, offloaded: data, zeroed: 2 * CL, skipped: CL });
    expect(offl(dst).offloaded).toBe(data);
    expect(engine.offloading).toBe(true);
    expect(same(await contents(dst), await contents(src))).toBe(true);
    // Offloaded copies are writes of the target node: statistics count them.
    expect(dst.stats.wr_bytes).toBe(data + 2 * CL);
  });

  it("falls back to read and write when the target cannot offload, and stops trying", async () => {
    const graph = new BlockGraph();
    const src = await source(graph, ["data", "data", "data", "data"], CL, 7);
    const dst = await graph.open(memoryDriver, { size: src.length, clusterSize: CL }, { nodeName: "dst" });
    const engine = new CopyEngine({
      source: src,
      target: dst,
      bitmap: work(src, CL),
      chunkSize: CL,
      maxWorkers: 1,
      copyOffload: true,
    });
    const r = await engine.run();
    expect(r).toMatchObject({ copied: 4 * CL, offloaded: 0 });
    expect(engine.offloading).toBe(false);
    expect(same(await contents(dst), await contents(src))).toBe(true);
    // The refusal is no failed request on either node.
    expect(src.stats.failed_rd_operations).toBe(0);
    expect(dst.stats.failed_wr_operations).toBe(0);
  });

  it("is refused while before-write notifiers or detect-zeroes must see the data", async () => {
    for (const setup of ["notifier", "detect-zeroes"] as const) {
      const graph = new BlockGraph();
      const src = await source(graph, ["data", "data"], CL, 3);
      const dst = await graph.open(
        offloadDriver,
        { size: src.length, clusterSize: CL },
        { nodeName: "dst", ...(setup === "detect-zeroes" ? { detectZeroes: "on" as const } : {}) },
      );
      const seen: number[] = [];
      if (setup === "notifier") {
        dst.beforeWrite.add((ev) => {
          if (ev.data !== undefined) seen.push(ev.bytes);
        });
      }
      const engine = new CopyEngine({ source: src, target: dst, bitmap: work(src, CL), copyOffload: true });
      const r = await engine.run();
      expect({ setup, offloaded: r.offloaded, copied: r.copied }).toEqual({
        setup,
        offloaded: 0,
        copied: 2 * CL,
      });
      expect(offl(dst).offloaded).toBe(0);
      if (setup === "notifier") expect(seen.reduce((a, b) => a + b, 0)).toBe(2 * CL);
      expect(same(await contents(dst), await contents(src))).toBe(true);
    }
  });

  it("marks the target's dirty bitmaps and honours the target edge's permissions", async () => {
    const graph = new BlockGraph();
    const src = await source(graph, ["data", "unallocated", "data"], CL, 5);
    const dst = await graph.open(offloadDriver, { size: src.length, clusterSize: CL }, { nodeName: "dst" });
    const dirty = dst.createBitmapSync({ granularity: CL });
    const writer = graph.attach(backendParent("w"), dst, {
      name: "root",
      perm: PERM.WRITE,
      shared: PERM_ALL,
    });
    const r = await new CopyEngine({
      source: src,
      target: writer,
      bitmap: work(src, CL),
      copyOffload: true,
      skipUnallocated: true,
    }).run();
    expect(r.offloaded).toBe(2 * CL);
    expect(dirty.get(0)).toBe(true);
    expect(dirty.get(CL)).toBe(false);
    expect(dirty.get(2 * CL)).toBe(true);

    const reader = graph.attach(backendParent("r"), dst, {
      name: "root",
      perm: PERM.CONSISTENT_READ,
      shared: PERM_ALL,
    });
    const errors: CopyError[] = [];
    const engine = new CopyEngine({
      source: src,
      target: reader,
      bitmap: work(src, CL),
      copyOffload: true,
      onError: (e) => {
        errors.push(e);
        return "fail";
      },
    });
    await expect(engine.run()).rejects.toMatchObject({ code: "EPERM" });
    expect(errors[0]?.operation).toBe("write");
  });

  it("a copy offload that fails (not a refusal) fails the chunk and sets its bits again", async () => {
    const graph = new BlockGraph();
    const src = await source(graph, ["data", "data"], CL, 9);
    const dst = await graph.open(offloadDriver, { size: src.length, clusterSize: CL }, { nodeName: "dst" });
    offl(dst).fail = "EIO";
    const bitmap = work(src, CL);
    const errors: CopyError[] = [];
    const engine = new CopyEngine({
      source: src,
      target: dst,
      bitmap,
      chunkSize: CL,
      maxWorkers: 1,
      copyOffload: true,
      onError: (e) => {
        errors.push(e);
        return "continue";
      },
    });
    const r = await engine.run();
    expect(r.errors.map((e) => [e.offset, e.operation, e.error.code])).toEqual([
      [0, "write", "EIO"],
      [CL, "write", "EIO"],
    ]);
    expect(engine.offloading).toBe(true);
    expect(bitmap.count()).toBe(2 * CL);
    offl(dst).fail = undefined;
    const again = await engine.run();
    expect(again.offloaded).toBe(2 * CL);
    expect(same(await contents(dst), await contents(src))).toBe(true);
  });

  it("BlockNode.copyRange checks the range and refuses nodes without copy offload", async () => {
    const graph = new BlockGraph();
    const src = await source(graph, ["data"], CL);
    const plain = await graph.open(memoryDriver, { size: CL }, { nodeName: "plain" });
    const dst = await graph.open(offloadDriver, { size: CL }, { nodeName: "dst" });
    await expect(src.copyRange(CL - 512, 1024, { node: dst, offset: 0 })).rejects.toMatchObject({
      code: "EIO",
    });
    await expect(plain.copyRange(0, 512, { node: dst, offset: 0 })).rejects.toMatchObject({
      code: "ENOTSUP",
    });
    await expect(src.copyRange(0, 512, { node: plain, offset: 0 })).rejects.toMatchObject({
      code: "ENOTSUP",
    });
    await src.copyRange(512, 1024, { node: dst, offset: 4096 });
    expect(same(await dst.read(4096, 1024), await src.read(512, 1024))).toBe(true);
    expect(src.stats.rd_bytes).toBeGreaterThanOrEqual(1024);
  });
});

describe("copy engine: write order", () => {
  it("inOrderWrites: chunks read at once but write in the order they started", async () => {
    const graph = new BlockGraph();
    const src = await source(graph, ["data", "data", "data", "data"], CL, 13);
    const dst = await graph.open(memoryDriver, { size: src.length, clusterSize: CL }, { nodeName: "dst" });
    const gates = new Map<number, () => void>();
    (src.state as MemoryDriver).hook = (req) =>
      req.kind === "read" ? new Promise<void>((r) => gates.set(req.offset, r)) : undefined;
    const writes: number[] = [];
    (dst.state as MemoryDriver).hook = (req) => {
      if (req.kind === "write") writes.push(req.offset);
    };
    const engine = new CopyEngine({
      source: src,
      target: dst,
      bitmap: work(src, CL),
      chunkSize: CL,
      maxWorkers: 4,
      status: "none",
      inOrderWrites: true,
    });
    const done = engine.run();
    // All four reads are in flight at once; they then finish last chunk first.
    const deadline = Date.now() + 10_000;
    while (gates.size < 4) {
      if (Date.now() > deadline) throw new Error("reads did not all start");
      await new Promise((r) => setImmediate(r));
    }
    for (const off of [3 * CL, 2 * CL, CL, 0]) {
      gates.get(off)?.();
      await new Promise((r) => setImmediate(r));
    }
    await done;
    (src.state as MemoryDriver).hook = undefined;
    expect(writes).toEqual([0, CL, 2 * CL, 3 * CL]);
    expect(same(await contents(dst), await contents(src))).toBe(true);
  });
});

describe("copy engine: chunk buffers", () => {
  it("allocates chunk buffers with allocBuffer, at most one per worker, and reuses them", async () => {
    const graph = new BlockGraph();
    const kinds: Kind[] = Array.from({ length: 24 }, (_, i) => (i % 5 === 3 ? "zero" : "data"));
    const src = await source(graph, kinds, CL, 17);
    const dst = await graph.open(memoryDriver, { size: src.length, clusterSize: CL }, { nodeName: "dst" });
    const sizes: number[] = [];
    const r = await new CopyEngine({
      source: src,
      target: dst,
      bitmap: work(src, CL),
      chunkSize: 2 * CL,
      maxWorkers: 3,
      allocBuffer: (n) => {
        sizes.push(n);
        // Not at the start of its memory, as an aligned buffer usually is not.
        return new Uint8Array(n + 100).subarray(100, 100 + n);
      },
    }).run();
    expect(r.copied).toBe(kinds.filter((k) => k === "data").length * CL);
    expect(sizes.length).toBeGreaterThan(0);
    expect(sizes.length).toBeLessThanOrEqual(3);
    expect(sizes.every((n) => n === 2 * CL)).toBe(true);
    expect(same(await contents(dst), await contents(src))).toBe(true);
  });
});

describe("copy engine: chunk classification", () => {
  it("a granule is zero or skipped only when block status says so for all of it (property)", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.constantFrom<Kind>("unallocated", "zero", "data"), { minLength: 1, maxLength: 64 }),
        fc.constantFrom(512, 1024, 4096),
        fc.integer({ min: 1, max: 4 }),
        fc.boolean(),
        fc.integer({ min: 0, max: 3 }),
        async (kinds, granularity, chunkGranules, skipUnallocated, tail) => {
          // Source clusters of 512 bytes, so block status changes inside granules; `tail` 512-byte
          // clusters past the last whole granule make the last granule short.
          const cs = 512;
          const all = [...kinds, ...kinds.slice(0, tail)];
          const graph = new BlockGraph();
          const src = await source(graph, all, cs, 11);
          const dst = await graph.open(
            memoryDriver,
            { size: src.length, clusterSize: cs },
            { nodeName: "dst" },
          );
          const r = await new CopyEngine({
            source: src,
            target: dst,
            bitmap: work(src, granularity),
            chunkSize: chunkGranules * granularity,
            status: "node",
            skipUnallocated,
          }).run();
          // Reference: granule by granule over the clusters.
          const expected = { copied: 0, zeroed: 0, skipped: 0 };
          const per = granularity / cs;
          for (let gi = 0; gi * per < all.length; gi++) {
            const inG = all.slice(gi * per, (gi + 1) * per);
            const kindOf = (k: Kind) =>
              k === "data" ? "copied" : k === "zero" || !skipUnallocated ? "zeroed" : "skipped";
            const ks = new Set(inG.map(kindOf));
            const k = ks.size === 1 ? ([...ks][0] ?? "copied") : "copied";
            expected[k] += inG.length * cs;
          }
          expect({ copied: r.copied, zeroed: r.zeroed, skipped: r.skipped }).toEqual(expected);
          expect(same(await contents(dst), await contents(src))).toBe(true);
        },
      ),
      { numRuns: RUNS },
    );
  });
});
