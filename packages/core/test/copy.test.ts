import { pattern } from "@blk/testkit";
import { ManualClock, RateLimit } from "@blk/throttle";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  BlkError,
  BlockGraph,
  type BlockNode,
  CopyEngine,
  type CopyError,
  type MemoryDriver,
  memoryDriver,
} from "../src/index.ts";

const RUNS = Number(process.env.BLK_FUZZ_RUNS ?? 25);
const CL = 65536;

type ClusterKind = "unallocated" | "zero" | "data";

async function sparse(
  graph: BlockGraph,
  kinds: ClusterKind[],
  seed: number,
  name: string,
): Promise<BlockNode> {
  const n = await graph.open(memoryDriver, { size: kinds.length * CL, clusterSize: CL }, { nodeName: name });
  for (let i = 0; i < kinds.length; i++) {
    if (kinds[i] === "zero") await n.writeZeroes(i * CL, CL);
    else if (kinds[i] === "data") {
      await n.write(i * CL, pattern(seed, i * CL, CL));
    }
  }
  return n;
}

/** A sparse source and a target of its size filled with 0xee (unmap allowed), in a new graph. */
async function srcAndTarget(kinds: ClusterKind[], seed: number): Promise<{ src: BlockNode; dst: BlockNode }> {
  const graph = new BlockGraph();
  const src = await sparse(graph, kinds, seed, "src");
  const dst = await graph.open(
    memoryDriver,
    { size: src.length, clusterSize: CL },
    { nodeName: "dst", discard: "unmap" },
  );
  await dst.write(0, new Uint8Array(src.length).fill(0xee));
  return { src, dst };
}

/** Byte equality without vitest's slow deep diff of large typed arrays. */
const same = (a: Uint8Array, b: Uint8Array): boolean => Buffer.compare(a, b) === 0;

const mem = (n: BlockNode): MemoryDriver => n.state as MemoryDriver;
const tick = () => new Promise((r) => setImmediate(r));

async function fullBitmap(n: BlockNode, granularity: number) {
  const b = n.createBitmapSync({ granularity, disabled: true });
  b.setDirty(0, n.length);
  return b;
}

describe("copy engine", () => {
  it("copies random sparse sources: equal content, zeroes as zeroes, bounds hold (property)", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.constantFrom<ClusterKind>("unallocated", "zero", "data"), {
          minLength: 1,
          maxLength: 24,
        }),
        fc.integer({ min: 12, max: 16 }),
        fc.integer({ min: 1, max: 6 }),
        fc.integer({ min: 1, max: 4 }),
        fc.integer({ min: 1, max: 8 }),
        fc.integer(),
        async (kinds, g, chunkGranules, workers, bufferChunks, seed) => {
          const { src, dst } = await srcAndTarget(kinds, seed);
          const dstMem = mem(dst);
          const before = dstMem.counters.bytesWritten;
          mem(src).hook = async () => {
            await tick();
          };
          const granularity = 2 ** g;
          const chunkSize = granularity * chunkGranules;
          const maxBufferBytes = chunkSize * bufferChunks;
          const work = await fullBitmap(src, granularity);
          const engine = new CopyEngine({
            source: src,
            target: dst,
            bitmap: work,
            chunkSize,
            maxWorkers: workers,
            maxBufferBytes,
          });
          const res = await engine.run();
          const dataBytes = kinds.filter((k) => k === "data").length * CL;
          expect(same(await dst.read(0, dst.length), await src.read(0, src.length))).toBe(true);
          expect(res.copied).toBe(dataBytes);
          expect(res.zeroed).toBe(src.length - dataBytes);
          expect(dstMem.counters.bytesWritten - before).toBe(dataBytes);
          for (let i = 0; i < kinds.length; i++) {
            if (kinds[i] !== "data") expect(dstMem.clusterState(i * CL)).not.toBe("data");
          }
          expect(work.count()).toBe(0);
          expect(engine.stats.maxInFlight).toBeLessThanOrEqual(workers);
          expect(engine.stats.maxBufferBytesInFlight).toBeLessThanOrEqual(maxBufferBytes);
          expect(mem(src).counters.maxInFlight).toBeLessThanOrEqual(workers);
          expect(engine.stats.inFlight).toBe(0);
        },
      ),
      { numRuns: RUNS },
    );
  });

  it("honours the rate limit with an injected clock (property)", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 16 }),
        fc.integer({ min: 64 << 10, max: 8 << 20 }),
        async (clusters, speed) => {
          const graph = new BlockGraph();
          const src = await sparse(graph, new Array<ClusterKind>(clusters).fill("data"), 1, "src");
          const dst = await graph.open(memoryDriver, { size: src.length }, { nodeName: "dst" });
          const clock = new ManualClock();
          const rateLimit = new RateLimit({ speed, clock });
          const starts: [number, number][] = [];
          mem(src).hook = (req) => {
            if (req.kind === "read") starts.push([clock.now(), req.bytes]);
          };
          const engine = new CopyEngine({
            source: src,
            target: dst,
            bitmap: await fullBitmap(src, CL),
            chunkSize: CL,
            rateLimit,
            clock,
            status: "none",
          });
          const st = { done: false };
          const p = engine.run().finally(() => {
            st.done = true;
          });
          while (!st.done) {
            await tick();
            const due = clock.nextDue();
            if (due !== undefined) clock.set(due);
          }
          await p;
          const quota = rateLimit.sliceQuota;
          // Bytes started by time t never exceed speed × t plus one slice's quota plus one chunk.
          let total = 0;
          for (const [t, bytes] of starts) {
            total += bytes;
            expect(total).toBeLessThanOrEqual((speed * t) / 1e9 + quota + CL);
          }
          expect(total).toBe(src.length);
          // …and the engine does not sleep needlessly: done within one slice of the ideal time.
          expect(clock.now()).toBeLessThanOrEqual(((src.length - CL) / speed) * 1e9 + 100e6 + 1e6);
        },
      ),
      { numRuns: Math.max(5, Math.floor(RUNS / 2)) },
    );
  });

  it("skips what block status says is unallocated when asked (sync=top over a backing chain)", async () => {
    const graph = new BlockGraph();
    const base = await sparse(graph, ["data", "data", "data", "data"], 3, "base");
    const top = await graph.open(
      memoryDriver,
      { size: base.length, clusterSize: CL },
      { nodeName: "top", children: { backing: base } },
    );
    await top.write(CL, new Uint8Array(CL).fill(9));
    await top.writeZeroes(3 * CL, CL);
    const dst = await graph.open(memoryDriver, { size: base.length, clusterSize: CL }, { nodeName: "dst" });
    const engine = new CopyEngine({
      source: top,
      target: dst,
      bitmap: await fullBitmap(top, CL),
      status: "node",
      skipUnallocated: true,
    });
    const res = await engine.run();
    expect(res).toMatchObject({ copied: CL, zeroed: CL, skipped: 2 * CL });
    expect(mem(dst).clusterState(0)).toBe("unallocated");
    expect(mem(dst).clusterState(CL)).toBe("data");
    // Without skipping, the chain status copies the backing data too.
    const full = await graph.open(memoryDriver, { size: base.length, clusterSize: CL }, { nodeName: "full" });
    const r2 = await new CopyEngine({ source: top, target: full, bitmap: await fullBitmap(top, CL) }).run();
    expect(r2).toMatchObject({ copied: 3 * CL, zeroed: CL, skipped: 0 });
    expect(same(await full.read(0, full.length), await top.read(0, top.length))).toBe(true);
  });

  it("skipped ranges cost nothing against the rate limit", async () => {
    const graph = new BlockGraph();
    const src = await sparse(graph, ["data", "unallocated", "unallocated", "unallocated", "data"], 2, "src");
    const dst = await graph.open(memoryDriver, { size: src.length }, { nodeName: "dst" });
    const clock = new ManualClock();
    const rateLimit = new RateLimit({ speed: 30 * CL, clock });
    const engine = new CopyEngine({
      source: src,
      target: dst,
      bitmap: await fullBitmap(src, CL),
      chunkSize: CL,
      rateLimit,
      clock,
      status: "node",
      skipUnallocated: true,
    });
    const st = { done: false };
    const p = engine.run().finally(() => {
      st.done = true;
    });
    while (!st.done) {
      await tick();
      const due = clock.nextDue();
      if (due !== undefined) clock.set(due);
    }
    expect(await p).toMatchObject({ copied: 2 * CL, skipped: 3 * CL });
    // Two copied chunks fit in one 100 ms slice (quota 3 clusters); counting the skipped ones would not.
    expect(clock.now()).toBe(0);
  });

  it("reports errors per chunk; `continue` re-dirties and goes on, `fail` rejects", async () => {
    const graph = new BlockGraph();
    const src = await sparse(graph, ["data", "data", "data", "data"], 5, "src");
    const dst = await graph.open(memoryDriver, { size: src.length }, { nodeName: "dst" });
    let fail = true;
    mem(dst).hook = (req) => {
      if (fail && req.kind === "write" && req.offset === 2 * CL)
        throw new BlkError("ENOSPC", "No space left on device");
    };
    const seen: CopyError[] = [];
    const work = await fullBitmap(src, CL);
    const engine = new CopyEngine({
      source: src,
      target: dst,
      bitmap: work,
      chunkSize: CL,
      onError: (e) => {
        seen.push(e);
        return "continue";
      },
    });
    const res = await engine.run();
    expect(seen.map((e) => [e.offset, e.bytes, e.operation, e.error.code])).toEqual([
      [2 * CL, CL, "write", "ENOSPC"],
    ]);
    expect(res.errors.length).toBe(1);
    expect(res.copied).toBe(3 * CL);
    expect(work.count()).toBe(CL);
    fail = false;
    await engine.run();
    expect(work.count()).toBe(0);
    expect(same(await dst.read(0, dst.length), await src.read(0, src.length))).toBe(true);

    mem(src).hook = (req) => {
      if (req.kind === "read" && req.offset === CL) throw new BlkError("EIO", "Input/output error");
    };
    const w2 = await fullBitmap(src, CL);
    const failing = new CopyEngine({ source: src, target: dst, bitmap: w2, chunkSize: CL, maxWorkers: 1 });
    await expect(failing.run()).rejects.toMatchObject({ code: "EIO" });
    expect(w2.get(CL)).toBe(true);
  });

  it("cancellation stops starting chunks, waits for in-flight ones, keeps the rest dirty; pause points run", async () => {
    const graph = new BlockGraph();
    const src = await sparse(graph, new Array<ClusterKind>(16).fill("data"), 7, "src");
    const dst = await graph.open(memoryDriver, { size: src.length }, { nodeName: "dst" });
    const ac = new AbortController();
    let pauses = 0;
    let copied = 0;
    const work = await fullBitmap(src, CL);
    const engine = new CopyEngine({
      source: src,
      target: dst,
      bitmap: work,
      chunkSize: CL,
      maxWorkers: 2,
      signal: ac.signal,
      pausePoint: () => {
        pauses++;
        if (pauses === 5) ac.abort();
      },
      onProgress: (p) => {
        copied += p.copied;
      },
    });
    await expect(engine.run()).rejects.toMatchObject({ code: "ECANCELED" });
    expect(engine.stats.inFlight).toBe(0);
    expect(copied + work.count()).toBe(src.length);
    expect(copied).toBe(4 * CL);
  });

  it("copyRange from a before-write notifier keeps a point-in-time copy under guest writes (property)", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.record({
            offset: fc.integer({ min: 0, max: 8 * CL - 1 }),
            bytes: fc.integer({ min: 1, max: 2 * CL }),
            value: fc.integer({ min: 1, max: 255 }),
            delay: fc.integer({ min: 0, max: 6 }),
          }),
          { maxLength: 10 },
        ),
        fc.integer({ min: 1, max: 4 }),
        async (writes, workers) => {
          const graph = new BlockGraph();
          const src = await sparse(
            graph,
            ["data", "unallocated", "data", "zero", "data", "data", "unallocated", "data"],
            11,
            "src",
          );
          const dst = await graph.open(
            memoryDriver,
            { size: src.length, clusterSize: CL },
            { nodeName: "dst" },
          );
          const before = await src.read(0, src.length);
          mem(src).hook = async (req) => {
            if (req.kind === "read") await tick();
          };
          const work = await fullBitmap(src, CL);
          const engine = new CopyEngine({
            source: src,
            target: dst,
            bitmap: work,
            chunkSize: CL,
            maxWorkers: workers,
          });
          src.beforeWrite.add(async (ev) => {
            await engine.copyRange(ev.offset, ev.bytes);
          });
          const expected = Uint8Array.from(before);
          const guest = (async () => {
            for (const w of writes) {
              for (let i = 0; i < w.delay; i++) await tick();
              const bytes = Math.min(w.bytes, src.length - w.offset);
              await src.write(w.offset, new Uint8Array(bytes).fill(w.value));
              expected.fill(w.value, w.offset, w.offset + bytes);
            }
          })();
          await Promise.all([engine.run(), guest]);
          expect(same(await dst.read(0, dst.length), before)).toBe(true);
          expect(same(await src.read(0, src.length), expected)).toBe(true);
          expect(work.count()).toBe(0);
        },
      ),
      { numRuns: RUNS },
    );
  });

  it("detectZeroBuffers writes zero-filled data as zeroes", async () => {
    const graph = new BlockGraph();
    const src = await graph.open(memoryDriver, { size: 4 * CL }, { nodeName: "src" });
    await src.write(0, new Uint8Array(2 * CL));
    await src.write(2 * CL, new Uint8Array(CL).fill(1));
    const dst = await graph.open(memoryDriver, { size: 4 * CL }, { nodeName: "dst", discard: "unmap" });
    const res = await new CopyEngine({
      source: src,
      target: dst,
      bitmap: await fullBitmap(src, CL),
      detectZeroBuffers: true,
    }).run();
    expect(res).toMatchObject({ copied: CL, zeroed: 3 * CL });
    expect(mem(dst).dataClusters).toBe(1);
  });
});

describe("copy engine: staticSource", () => {
  it("asks block status once per lookahead, not per chunk, with the same result (property)", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.constantFrom<ClusterKind>("unallocated", "zero", "data"), {
          minLength: 1,
          maxLength: 40,
        }),
        fc.constantFrom<"node" | "chain">("node", "chain"),
        fc.integer({ min: 1, max: 4 }),
        fc.integer({ min: 1, max: 8 }),
        fc.boolean(),
        fc.integer(),
        async (kinds, status, chunkClusters, workers, skipUnallocated, seed) => {
          const results = [];
          for (const staticSource of [false, true]) {
            const { src, dst } = await srcAndTarget(kinds, seed);
            const asked: [number, number][] = [];
            mem(src).hook = async (req) => {
              if (req.kind === "block-status") asked.push([req.offset, req.bytes]);
              await tick();
            };
            const res = await new CopyEngine({
              source: src,
              target: dst,
              bitmap: await fullBitmap(src, CL),
              chunkSize: chunkClusters * CL,
              maxWorkers: workers,
              status,
              skipUnallocated,
              staticSource,
            }).run();
            const chunks = Math.ceil(kinds.length / chunkClusters);
            if (staticSource) {
              // The whole image is within one lookahead: one query from offset 0 over all of it.
              expect(asked).toEqual([[0, src.length]]);
            } else {
              expect(asked.length).toBe(chunks);
            }
            results.push({
              res,
              data: await dst.read(0, dst.length),
              map: await dst.blockStatus(0, dst.length),
            });
          }
          const [perChunk, kept] = results;
          expect(kept?.res).toEqual(perChunk?.res);
          expect(same(kept?.data ?? new Uint8Array(), perChunk?.data ?? new Uint8Array(1))).toBe(true);
          expect(kept?.map).toEqual(perChunk?.map);
        },
      ),
      { numRuns: RUNS },
    );
  });

  it("asks again past the lookahead and after a failed query", async () => {
    const { STATUS_LOOKAHEAD } = await import("../src/copy.ts");
    const graph = new BlockGraph();
    const size = STATUS_LOOKAHEAD * 2 + 4 * CL;
    const src = await graph.open(memoryDriver, { size, clusterSize: CL }, { nodeName: "src" });
    await src.write(STATUS_LOOKAHEAD - CL, pattern(3, 0, 2 * CL));
    const dst = await graph.open(memoryDriver, { size, clusterSize: CL }, { nodeName: "dst" });
    const asked: number[] = [];
    let failOnce = true;
    mem(src).hook = (req) => {
      if (req.kind !== "block-status") return;
      asked.push(req.offset);
      if (req.offset === STATUS_LOOKAHEAD && failOnce) {
        failOnce = false;
        throw new BlkError("EIO", "injected");
      }
    };
    const errors: CopyError[] = [];
    const engine = new CopyEngine({
      source: src,
      target: dst,
      bitmap: await fullBitmap(src, CL),
      chunkSize: 1 << 20,
      maxWorkers: 1,
      status: "node",
      staticSource: true,
      onError: (e) => {
        errors.push(e);
        return "continue";
      },
    });
    const first = await engine.run();
    // The failed chunk's bits stay set; the next chunk asked again from its own offset.
    expect(first.errors.map((e) => e.offset)).toEqual([STATUS_LOOKAHEAD]);
    expect(asked).toEqual([0, STATUS_LOOKAHEAD, STATUS_LOOKAHEAD + (1 << 20)]);
    asked.length = 0;
    const second = await engine.run();
    expect(second.errors).toEqual([]);
    expect(asked).toEqual([STATUS_LOOKAHEAD]);
    expect(same(await dst.read(0, size), await src.read(0, size))).toBe(true);
  });
});

describe("copy engine: readSize", () => {
  it("reads chunks in pieces, writes them whole, and names the lowest failed piece", async () => {
    const graph = new BlockGraph();
    const src = await sparse(graph, new Array<ClusterKind>(16).fill("data"), 5, "src");
    const dst = await graph.open(memoryDriver, { size: src.length, clusterSize: CL }, { nodeName: "dst" });
    const reads: [number, number][] = [];
    const writes: [number, number][] = [];
    let fail = new Set<number>();
    mem(src).hook = async (req) => {
      if (req.kind !== "read") return;
      reads.push([req.offset, req.bytes]);
      await tick();
      if (fail.has(req.offset)) throw new BlkError("EIO", "injected");
    };
    mem(dst).hook = (req) => {
      if (req.kind === "write") writes.push([req.offset, req.bytes]);
    };
    const run = (work: Awaited<ReturnType<typeof fullBitmap>>) =>
      new CopyEngine({
        source: src,
        target: dst,
        bitmap: work,
        chunkSize: 8 * CL,
        readSize: 2 * CL,
        maxWorkers: 1,
        status: "none",
        onError: (e) => {
          errors.push(e);
          return "continue";
        },
      }).run();
    const errors: CopyError[] = [];
    await run(await fullBitmap(src, CL));
    expect(reads).toEqual(Array.from({ length: 8 }, (_, i) => [i * 2 * CL, 2 * CL]));
    expect(writes).toEqual([
      [0, 8 * CL],
      [8 * CL, 8 * CL],
    ]);
    expect(same(await dst.read(0, dst.length), await src.read(0, src.length))).toBe(true);
    // Pieces 3 and 1 of the second chunk fail: the error names piece 1; its chunk is not written.
    fail = new Set([14 * CL, 10 * CL]);
    writes.length = 0;
    const work = await fullBitmap(src, CL);
    const res = await run(work);
    expect(errors.map((e) => [e.offset, e.bytes, e.requestOffset])).toEqual([[8 * CL, 8 * CL, 10 * CL]]);
    expect(res.errors).toHaveLength(1);
    expect(writes).toEqual([[0, 8 * CL]]);
    expect(work.count()).toBe(8 * CL);
    // A failure in a chunk's first piece has no requestOffset: the chunk's offset names it.
    fail = new Set([0]);
    errors.length = 0;
    await run(await fullBitmap(src, CL));
    expect(errors.map((e) => [e.offset, e.requestOffset])).toEqual([[0, undefined]]);
  });
});
