/**
 * Copy-engine bounds measured from outside the engine (not from its own `stats`): bytes read from the
 * source and not yet written to the target never exceed `maxBufferBytes`, and neither side ever sees more
 * than `maxWorkers` requests at once — on random sparse sources, with random request latencies.
 */
import { pattern } from "@blk/testkit";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  type BlockDriver,
  BlockGraph,
  type BlockNode,
  CopyEngine,
  MemoryDriver,
  type MemoryDriverOptions,
  memoryDriver,
  type ZeroFlags,
} from "../src/index.ts";

const RUNS = Number(process.env.BLK_FUZZ_RUNS ?? 25);
const CL = 65536;

/** What crosses the engine's buffer: reads started at the source, writes finished at the target. */
interface Meter {
  readStarted: number;
  written: number;
  maxHeld: number;
  targetInFlight: number;
  maxTargetInFlight: number;
}

class MeteredTarget extends MemoryDriver {
  readonly meter: Meter;
  readonly delays: () => number;
  constructor(o: MemoryDriverOptions, meter: Meter, delays: () => number) {
    super(o);
    this.meter = meter;
    this.delays = delays;
  }
  async #step<T>(bytes: number, buffered: boolean, fn: () => Promise<T>): Promise<T> {
    const m = this.meter;
    m.targetInFlight++;
    m.maxTargetInFlight = Math.max(m.maxTargetInFlight, m.targetInFlight);
    try {
      for (let i = this.delays(); i > 0; i--) await new Promise((r) => setImmediate(r));
      return await fn();
    } finally {
      m.targetInFlight--;
      // Only data written from a buffer frees buffer space; zero writes never held any.
      if (buffered) m.written += bytes;
    }
  }
  protected override _write(offset: number, data: Uint8Array): Promise<void> {
    return this.#step(data.length, true, () => super._write(offset, data));
  }
  protected override _writeZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    return this.#step(bytes, false, () => super._writeZeroes(offset, bytes, flags));
  }
}

type Kind = "unallocated" | "zero" | "data";

describe("copy engine bounds, measured outside the engine (property)", () => {
  it("bytes held between source read and target write stay within maxBufferBytes; requests within maxWorkers", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.constantFrom<Kind>("unallocated", "zero", "data", "data"), {
          minLength: 1,
          maxLength: 20,
        }),
        fc.integer({ min: 12, max: 16 }),
        fc.integer({ min: 1, max: 4 }),
        fc.integer({ min: 1, max: 4 }),
        fc.integer({ min: 1, max: 3 }),
        fc.array(fc.integer({ min: 0, max: 3 }), { minLength: 1, maxLength: 16 }),
        fc.boolean(),
        async (kinds, g, chunkGranules, workers, bufferChunks, latencies, detectZeroBuffers) => {
          const graph = new BlockGraph();
          const size = kinds.length * CL;
          const src: BlockNode = await graph.open(
            memoryDriver,
            { size, clusterSize: CL },
            { nodeName: "src" },
          );
          for (const [i, k] of kinds.entries()) {
            if (k === "zero") await src.writeZeroes(i * CL, CL);
            if (k === "data") await src.write(i * CL, pattern(i, 0, CL));
          }
          const meter: Meter = {
            readStarted: 0,
            written: 0,
            maxHeld: 0,
            targetInFlight: 0,
            maxTargetInFlight: 0,
          };
          let li = 0;
          const delay = (): number => latencies[li++ % latencies.length] ?? 0;
          const target: BlockDriver<MemoryDriverOptions> = {
            format: "x-metered",
            kind: "protocol",
            open: async (o) => new MeteredTarget(o, meter, delay),
          };
          const dst = await graph.open(
            target,
            { size, clusterSize: CL },
            { nodeName: "dst", discard: "unmap" },
          );
          const srcMem = src.state as MemoryDriver;
          srcMem.hook = async (req) => {
            if (req.kind !== "read") return;
            meter.readStarted += req.bytes;
            meter.maxHeld = Math.max(meter.maxHeld, meter.readStarted - meter.written);
            for (let i = delay(); i > 0; i--) await new Promise((r) => setImmediate(r));
          };
          const granularity = 2 ** g;
          const chunkSize = granularity * chunkGranules;
          const maxBufferBytes = chunkSize * bufferChunks;
          const work = src.createBitmapSync({ granularity, disabled: true });
          work.setDirty(0, size);
          const res = await new CopyEngine({
            source: src,
            target: dst,
            bitmap: work,
            chunkSize,
            maxWorkers: workers,
            maxBufferBytes,
            detectZeroBuffers,
          }).run();
          srcMem.hook = undefined;
          expect(Buffer.compare(await dst.read(0, size), await src.read(0, size))).toBe(0);
          expect(res.copied + res.zeroed).toBe(size);
          expect(meter.maxHeld).toBeLessThanOrEqual(maxBufferBytes);
          expect(srcMem.counters.maxInFlight).toBeLessThanOrEqual(workers);
          expect(meter.maxTargetInFlight).toBeLessThanOrEqual(workers);
          // Every byte read was either written as data or found to be zeroes.
          expect(meter.readStarted).toBeGreaterThanOrEqual(meter.written);
          expect(meter.written).toBe(res.copied);
        },
      ),
      { numRuns: RUNS },
    );
  });
});
