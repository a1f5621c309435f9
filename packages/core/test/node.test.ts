import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  allocationDepth,
  type BeforeWriteEvent,
  BlkError,
  BlockGraph,
  type BlockNode,
  backendParent,
  isBlkError,
  type MemoryDriver,
  memoryDriver,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  type NodeOptions,
  nbdAllocationFlags,
  PERM,
  toMapEntries,
} from "../src/index.ts";

const RUNS = Number(process.env.BLK_FUZZ_RUNS ?? 40);

async function open(
  size = 1 << 20,
  opts: Partial<NodeOptions> & { clusterSize?: number; requestAlignment?: number } = {},
) {
  const graph = new BlockGraph();
  const { clusterSize, requestAlignment, ...nodeOpts } = opts;
  const node = await graph.open(
    memoryDriver,
    {
      size,
      ...(clusterSize === undefined ? {} : { clusterSize }),
      ...(requestAlignment === undefined ? {} : { requestAlignment }),
    },
    { nodeName: "disk", ...nodeOpts },
  );
  return { graph, node, mem: node.state as MemoryDriver };
}

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

const tick = () => new Promise((r) => setImmediate(r));

describe("request path", () => {
  it("overlapping writes wait for a serialising request; disjoint ones do not", async () => {
    const { node, mem } = await open();
    const order: string[] = [];
    const gate = deferred();
    mem.hook = async (req) => {
      if (req.kind === "write" && req.offset === 0) await gate.promise;
    };
    const serial = node
      .write(0, new Uint8Array(4096).fill(1), { serialising: true })
      .then(() => order.push("serial"));
    await tick();
    const overlapping = node.write(2048, new Uint8Array(4096).fill(2)).then(() => order.push("overlap"));
    const disjoint = node.write(65536, new Uint8Array(512).fill(3)).then(() => order.push("disjoint"));
    await disjoint;
    await tick();
    expect(order).toEqual(["disjoint"]);
    expect(node.tracker.inFlight).toBe(2);
    gate.resolve();
    await Promise.all([serial, overlapping]);
    expect(order).toEqual(["disjoint", "serial", "overlap"]);
    const data = await node.read(0, 8192);
    expect(data[0]).toBe(1);
    expect(data[2048]).toBe(2);
    expect(data[6143]).toBe(2);
    expect(data[6144]).toBe(0);
  });

  it("a before-write notifier sees the old data before it is overwritten", async () => {
    const { node } = await open();
    await node.write(0, new Uint8Array(4096).fill(0xaa));
    const seen: { kind: string; offset: number; bytes: number; old: number }[] = [];
    node.beforeWrite.add(async (ev: BeforeWriteEvent) => {
      const old = await ev.node.read(ev.offset, ev.bytes);
      seen.push({ kind: ev.kind, offset: ev.offset, bytes: ev.bytes, old: old[0] ?? -1 });
    });
    await node.write(1024, new Uint8Array(1024).fill(0xbb));
    await node.writeZeroes(0, 512);
    expect(seen).toEqual([
      { kind: "write", offset: 1024, bytes: 1024, old: 0xaa },
      { kind: "write-zeroes", offset: 0, bytes: 512, old: 0xaa },
    ]);
    expect((await node.read(1024, 1))[0]).toBe(0xbb);
  });

  it("a failing notifier fails the write and leaves the data untouched", async () => {
    const { node, mem } = await open();
    await node.write(0, new Uint8Array(512).fill(7));
    const off = node.beforeWrite.add(() => {
      throw new BlkError("EIO", "copy-before-write failed");
    });
    await expect(node.write(0, new Uint8Array(512).fill(9))).rejects.toMatchObject({ code: "EIO" });
    await expect(node.writeZeroes(0, 512)).rejects.toMatchObject({ code: "EIO" });
    expect((await node.read(0, 512)).every((b) => b === 7)).toBe(true);
    expect(mem.counters.writes).toBe(1);
    expect(node.stats.failed_wr_operations).toBe(2);
    off();
    await node.write(0, new Uint8Array(512).fill(9));
    expect((await node.read(0, 1))[0]).toBe(9);
  });

  it("dirty bitmaps mark exactly the written ranges, rounded out to granules (property)", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 9, max: 16 }),
        fc.array(
          fc.record({
            op: fc.constantFrom("write", "zero", "discard"),
            offset: fc.integer({ min: 0, max: (1 << 18) - 1 }),
            bytes: fc.integer({ min: 1, max: 20000 }),
          }),
          { maxLength: 12 },
        ),
        async (g, ops) => {
          const size = 1 << 18;
          const { node } = await open(size, { discard: "unmap" });
          const gran = 2 ** g;
          const b = node.createBitmapSync({ name: "b", granularity: gran });
          const disabled = node.createBitmapSync({ name: "off", granularity: gran, disabled: true });
          const model = new Set<number>();
          for (const { op, offset, bytes: raw } of ops) {
            const bytes = Math.min(raw, size - offset);
            if (op === "write") await node.write(offset, new Uint8Array(bytes).fill(1));
            else if (op === "zero") await node.writeZeroes(offset, bytes);
            else await node.discard(offset, bytes);
            for (let i = Math.floor(offset / gran); i <= Math.floor((offset + bytes - 1) / gran); i++)
              model.add(i);
          }
          expect(b.count()).toBe(Math.min(model.size * gran, model.size * gran));
          for (let i = 0; i < size / gran; i++) expect(b.get(i * gran)).toBe(model.has(i));
          expect(disabled.count()).toBe(0);
        },
      ),
      { numRuns: RUNS },
    );
  });

  it("a 2-byte write at 65535 dirties granules 0 and 1 at 64 KiB and 127-128 at 512 B", async () => {
    const { node } = await open();
    const big = node.createBitmapSync({ name: "big", granularity: 65536 });
    const small = node.createBitmapSync({ name: "small", granularity: 512 });
    await node.write(65535, new Uint8Array([1, 2]));
    expect(big.count()).toBe(131072);
    expect(small.count()).toBe(1024);
    expect(small.get(127 * 512) && small.get(128 * 512)).toBe(true);
  });

  it("close waits for in-flight I/O and is idempotent; later requests fail ENOMEDIUM", async () => {
    const { node, mem } = await open();
    const gate = deferred();
    mem.hook = async (req) => {
      if (req.kind === "write") await gate.promise;
    };
    const wst = { wrote: false };
    const w = node.write(0, new Uint8Array(512).fill(1)).then(() => {
      wst.wrote = true;
    });
    await tick();
    const st = { closed: false };
    const c1 = node.close().then(() => {
      st.closed = true;
    });
    const c2 = node.close();
    expect(node.close()).toBe(c2);
    await tick();
    expect(st.closed).toBe(false);
    gate.resolve();
    await Promise.all([w, c1]);
    expect([wst.wrote, st.closed]).toEqual([true, true]);
    await expect(node.read(0, 1)).rejects.toSatisfy((e) => isBlkError(e, "ENOMEDIUM"));
  });

  it("checks: read-only, beyond end, alignment; nothing touched", async () => {
    const ro = await open(1 << 16, { readOnly: true });
    await expect(ro.node.write(0, new Uint8Array(1))).rejects.toMatchObject({ code: "EPERM" });
    await expect(ro.node.discard(0, 512)).rejects.toMatchObject({ code: "EPERM" });
    const { node, mem } = await open(1 << 16, { requestAlignment: 512 });
    await expect(node.write(65536 - 512, new Uint8Array(1024))).rejects.toMatchObject({ code: "EIO" });
    await expect(node.read(100, 512)).rejects.toMatchObject({ code: "EINVAL" });
    await expect(node.read(-1, 1)).rejects.toMatchObject({ code: "EINVAL" });
    expect(mem.counters.writes + mem.counters.reads).toBe(0);
    expect(node.stats.invalid_wr_operations).toBe(1);
    expect(node.stats.invalid_rd_operations).toBe(2);
  });

  it("discard=ignore drops discards and may-unmap; discard=unmap passes them", async () => {
    const ign = await open(1 << 20);
    await ign.node.write(0, new Uint8Array(65536).fill(1));
    await ign.node.discard(0, 65536);
    expect(ign.mem.counters.discards).toBe(0);
    await ign.node.writeZeroes(0, 65536, { mayUnmap: true });
    expect(ign.mem.clusterState(0)).toBe("zero");
    const un = await open(1 << 20, { discard: "unmap" });
    await un.node.write(0, new Uint8Array(65536).fill(1));
    await un.node.writeZeroes(0, 65536, { mayUnmap: true });
    expect(un.mem.clusterState(0)).toBe("unallocated");
    await un.node.write(0, new Uint8Array(65536).fill(1));
    await un.node.discard(0, 65536);
    expect(un.mem.counters.discards).toBe(1);
    expect(un.node.stats.unmap_operations).toBe(1);
  });

  it("detect-zeroes turns zero writes into write-zeroes (unmap with discard=unmap)", async () => {
    const on = await open(1 << 20, { detectZeroes: "on" });
    await on.node.write(0, new Uint8Array(65536));
    expect(on.mem.counters.writes).toBe(0);
    expect(on.mem.counters.writeZeroes).toBe(1);
    expect(on.mem.clusterState(0)).toBe("zero");
    const un = await open(1 << 20, { detectZeroes: "unmap", discard: "unmap" });
    await un.node.write(0, new Uint8Array(65536).fill(1));
    await un.node.write(0, new Uint8Array(65536));
    expect(un.mem.clusterState(0)).toBe("unallocated");
    expect(un.node.stats.wr_operations).toBe(2);
    await expect(open(1 << 20, { detectZeroes: "unmap" })).rejects.toThrow(
      "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
    );
    await expect(open(1 << 20, { forceShare: true })).rejects.toThrow(
      "force-share=on can only be used with read-only images",
    );
  });

  it("cache.no-flush flushes without forcing stable storage; statistics count", async () => {
    const { node, mem } = await open(1 << 20, { cacheNoFlush: true });
    await node.flush();
    expect(mem.counters.flushes).toBe(1);
    await node.write(4096, new Uint8Array(100));
    await node.read(0, 10);
    expect(node.stats).toMatchObject({
      wr_bytes: 100,
      wr_operations: 1,
      rd_bytes: 10,
      rd_operations: 1,
      flush_operations: 1,
      wr_highest_offset: 4196,
    });
    const q = node.queryStats();
    expect(q).toMatchObject({ rd_merged: 0, account_invalid: true, account_failed: true, timed_stats: [] });
    expect(q.idle_time_ns).toBeGreaterThanOrEqual(0);
  });

  it("requests larger than the driver's maxTransfer are split", async () => {
    const graph = new BlockGraph();
    const node = await graph.open(memoryDriver, { size: 1 << 20, maxTransfer: 65536 }, { nodeName: "n" });
    const mem = node.state as MemoryDriver;
    const data = new Uint8Array(200000).map((_, i) => i & 0xff);
    await node.write(1000, data);
    await node.writeZeroes(300000, 140000);
    const back = await node.read(1000, 200000);
    expect(mem.counters).toMatchObject({ writes: 4, writeZeroes: 3, reads: 4 });
    expect(Buffer.compare(back, data)).toBe(0);
  });

  it("write threshold: one event when a write ends past it, then off", async () => {
    const { node } = await open();
    const events: unknown[] = [];
    node.onWriteThreshold((ev) => events.push(ev));
    node.setWriteThreshold(65536);
    await node.write(0, new Uint8Array(65536));
    expect(events).toEqual([]);
    await node.writeZeroes(65000, 1000);
    await node.write(200000, new Uint8Array(10));
    expect(events).toEqual([{ "node-name": "disk", "amount-exceeded": 464, "write-threshold": 65536 }]);
    expect(node.writeThreshold).toBe(0);
  });

  it("the node keeps no reference to a caller's buffer", async () => {
    const { node } = await open();
    const buf = new Uint8Array(512).fill(5);
    await node.write(0, buf);
    buf.fill(6);
    expect((await node.read(0, 1))[0]).toBe(5);
  });
});

describe("drain and reopen", () => {
  it("drained() waits for in-flight requests and holds new ones until it is done", async () => {
    const { node, mem } = await open();
    const gate = deferred();
    mem.hook = async (req) => {
      if (req.kind === "write" && req.offset === 0) await gate.promise;
    };
    const log: string[] = [];
    const w1 = node.write(0, new Uint8Array(512)).then(() => log.push("w1"));
    await tick();
    const d = node.drained(() => {
      log.push(`drained: ${mem.counters.writes} written, ${mem.counters.inFlight} in flight`);
      expect(node.tracker.inFlight).toBe(0);
    });
    await tick();
    const w2 = node.write(4096, new Uint8Array(512)).then(() => log.push("w2"));
    await tick();
    expect(log).toEqual([]);
    gate.resolve();
    await Promise.all([w1, d, w2]);
    expect(log).toEqual(["drained: 1 written, 0 in flight", "w1", "w2"]);
    expect(mem.counters.writes).toBe(2);
  });

  it("reopen switches read-only; refused under a writer with QEMU's message", async () => {
    const { graph, node } = await open();
    await node.reopen({ readOnly: true });
    await expect(node.write(0, new Uint8Array(1))).rejects.toMatchObject({ code: "EPERM" });
    await node.reopen({ readOnly: false });
    const exp = graph.attach(backendParent(), node, {
      name: "root",
      perm: PERM.WRITE | PERM.CONSISTENT_READ,
    });
    await expect(node.reopen({ readOnly: true })).rejects.toThrow("Block node is read-only");
    expect(node.readOnly).toBe(false);
    await exp.write(0, new Uint8Array(1).fill(1));
    await expect(node.reopen({ forceShare: true })).rejects.toThrow(
      "force-share=on can only be used with read-only images",
    );
  });

  it("a notifier can read old data from under a serialising write with noSerialising", async () => {
    const { node } = await open();
    await node.write(0, new Uint8Array(512).fill(1));
    const seen: number[] = [];
    node.beforeWrite.add(async (ev) => {
      seen.push((await ev.node.read(ev.offset, 1, { noSerialising: true }))[0] ?? -1);
    });
    await node.write(0, new Uint8Array(512).fill(2), { serialising: true });
    expect(seen).toEqual([1]);
  });
});

describe("block status", () => {
  async function chain() {
    const graph = new BlockGraph();
    const base = await graph.open(memoryDriver, { size: 4 << 16, clusterSize: 65536 }, { nodeName: "base" });
    const mid = await graph.open(
      memoryDriver,
      { size: 4 << 16, clusterSize: 65536 },
      { nodeName: "mid", children: { backing: base } },
    );
    const top = await graph.open(
      memoryDriver,
      { size: 4 << 16, clusterSize: 65536 },
      { nodeName: "top", children: { backing: mid } },
    );
    await base.write(0, new Uint8Array(65536).fill(1));
    await mid.write(65536, new Uint8Array(65536).fill(2));
    await top.writeZeroes(2 * 65536, 65536);
    return { graph, base, mid, top };
  }

  it("blockStatus of one layer; unallocated reads through backing", async () => {
    const { top, base } = await chain();
    expect(await top.blockStatus(0, 4 << 16)).toEqual([
      { offset: 0, length: 131072, data: false, zero: false, allocated: false },
      { offset: 131072, length: 65536, data: false, zero: true, allocated: true },
      { offset: 196608, length: 65536, data: false, zero: false, allocated: false },
    ]);
    expect(await base.blockStatus(65536, 65536)).toEqual([
      { offset: 65536, length: 65536, data: false, zero: true, allocated: false },
    ]);
    const d = await top.read(0, 4 << 16);
    expect([d[0], d[65536], d[131072], d[196608]]).toEqual([1, 2, 0, 0]);
  });

  it("blockStatusAbove walks the chain with depth (qemu-img map semantics)", async () => {
    const { top, mid, base } = await chain();
    const ext = await top.blockStatusAbove(0, 4 << 16);
    expect(ext.map((e) => [e.offset, e.length, e.depth, e.allocated, e.zero, e.data])).toEqual([
      [0, 65536, 2, true, false, true],
      [65536, 65536, 1, true, false, true],
      [131072, 65536, 0, true, true, false],
      [196608, 65536, 2, false, true, false],
    ]);
    const above = await top.blockStatusAbove(0, 4 << 16, { base: mid });
    expect(above.map((e) => [e.offset, e.length, e.depth, e.allocated])).toEqual([
      [0, 131072, 0, false],
      [131072, 65536, 0, true],
      [196608, 65536, 0, false],
    ]);
    expect(toMapEntries(ext)).toEqual([
      { start: 0, length: 65536, depth: 2, present: true, zero: false, data: true },
      { start: 65536, length: 65536, depth: 1, present: true, zero: false, data: true },
      { start: 131072, length: 65536, depth: 0, present: true, zero: true, data: false },
      { start: 196608, length: 65536, depth: 2, present: false, zero: true, data: false },
    ]);
    expect(ext.map(nbdAllocationFlags)).toEqual([
      0,
      0,
      NBD_STATE_HOLE | NBD_STATE_ZERO,
      NBD_STATE_HOLE | NBD_STATE_ZERO,
    ]);
    expect(ext.map(allocationDepth)).toEqual([3, 2, 1, 0]);
    const incl = await top.blockStatusAbove(0, 65536, { base, includeBase: true });
    expect(incl[0]).toMatchObject({ depth: 2, allocated: true });
  });

  it("blockStatusAbove asks each layer once for a fragmented range (linear, not quadratic)", async () => {
    const CL = 4096;
    const clusters = 2048;
    const graph = new BlockGraph();
    const base = await graph.open(memoryDriver, { size: clusters * CL, clusterSize: CL }, { nodeName: "b" });
    const top = await graph.open(
      memoryDriver,
      { size: clusters * CL, clusterSize: CL },
      { nodeName: "t", children: { backing: base } },
    );
    // Every other cluster allocated in the top, every fourth in the base: 1024 + 512 extents.
    for (let c = 0; c < clusters; c += 2) await top.write(c * CL, new Uint8Array(CL).fill(1));
    for (let c = 1; c < clusters; c += 4) await base.write(c * CL, new Uint8Array(CL).fill(2));
    const asked = new Map<string, number>();
    for (const n of [top, base]) {
      const state = n.state as { blockStatus: (o: number, b: number, x: unknown) => Promise<unknown> };
      const orig = state.blockStatus.bind(state);
      state.blockStatus = (o, b, x) => {
        asked.set(n.nodeName, (asked.get(n.nodeName) ?? 0) + b);
        return orig(o, b, x);
      };
    }
    const ext = await top.blockStatusAbove(0, clusters * CL);
    expect(ext.length).toBe(clusters);
    expect(ext.slice(0, 4).map((e) => [e.offset, e.depth, e.allocated, e.data])).toEqual([
      [0, 0, true, true],
      [CL, 1, true, true],
      [2 * CL, 0, true, true],
      [3 * CL, 1, false, false],
    ]);
    // The top is asked for the range once; the base only for the top's holes. Asking again from every
    // extent to the end of the range would sum to about clusters² / 2 clusters' worth of bytes.
    expect(asked.get("t")).toBe(clusters * CL);
    expect(asked.get("b")).toBe((clusters / 2) * CL);
  });
});

describe("block status over random chains (property)", () => {
  it("blockStatusAbove agrees with a per-cluster model of the chain", async () => {
    const CL = 65536;
    type K = "u" | "z" | "d";
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.array(fc.constantFrom<K>("u", "z", "d"), { minLength: 6, maxLength: 6 }), {
          minLength: 1,
          maxLength: 3,
        }),
        async (layers) => {
          // layers[0] is the base, the last one the top.
          const graph = new BlockGraph();
          let below: BlockNode | undefined;
          const nodes: BlockNode[] = [];
          for (const [li, kinds] of layers.entries()) {
            const n: BlockNode = await graph.open(
              memoryDriver,
              { size: 6 * CL, clusterSize: CL },
              {
                nodeName: `l${li}`,
                ...(below === undefined ? {} : { children: { backing: below } }),
              },
            );
            for (const [ci, k] of kinds.entries()) {
              if (k === "z") await n.writeZeroes(ci * CL, CL);
              if (k === "d") await n.write(ci * CL, new Uint8Array(CL).fill(li + 1));
            }
            nodes.push(n);
            below = n;
          }
          const top = nodes.at(-1) as BlockNode;
          const ext = await top.blockStatusAbove(0, 6 * CL);
          const perCluster: { depth: number; allocated: boolean; zero: boolean; data: boolean }[] = [];
          for (const e of ext) {
            for (let o = e.offset; o < e.offset + e.length; o += CL) {
              perCluster.push({ depth: e.depth ?? -1, allocated: e.allocated, zero: e.zero, data: e.data });
            }
          }
          const content = await top.read(0, 6 * CL);
          for (let ci = 0; ci < 6; ci++) {
            let want = { depth: layers.length - 1, allocated: false, zero: true, data: false };
            let byte = 0;
            for (let d = 0; d < layers.length; d++) {
              const li = layers.length - 1 - d;
              const k = layers[li]?.[ci];
              if (k !== "u") {
                want = { depth: d, allocated: true, zero: k === "z", data: k === "d" };
                byte = k === "d" ? li + 1 : 0;
                break;
              }
            }
            expect(perCluster[ci]).toEqual(want);
            expect(content[ci * CL]).toBe(byte);
          }
        },
      ),
      { numRuns: RUNS },
    );
  });
});
