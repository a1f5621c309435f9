import { HBitmap } from "@blk/hbitmap";
import { describe, expect, it } from "vitest";
import {
  type BlockDriver,
  BlockDriverBase,
  type BlockDriverInfo,
  BlockGraph,
  type DirtyBitmap,
  isBlkError,
  MemoryDriver,
  memoryDriver,
  PERM,
  type PersistentBitmap,
} from "../src/index.ts";

class Minimal extends BlockDriverBase {
  data = new Uint8Array(4096);
  gate: Promise<void> | undefined;
  closedCount = 0;
  protected override async _read(offset: number, buf: Uint8Array): Promise<void> {
    await this.gate;
    buf.set(this.data.subarray(offset, offset + buf.length));
  }
  protected override async _write(offset: number, data: Uint8Array): Promise<void> {
    await this.gate;
    this.data.set(data, offset);
  }
  protected override async _getLength(): Promise<number> {
    return this.data.length;
  }
  protected override async _close(): Promise<void> {
    this.closedCount++;
  }
}

const tick = () => new Promise((r) => setImmediate(r));

describe("BlockDriverBase", () => {
  it("derives capabilities from what a driver overrides", () => {
    expect(new Minimal().capabilities).toEqual({
      writeZeroes: false,
      discard: false,
      flush: false,
      blockStatus: false,
      truncate: false,
      check: false,
      fua: false,
    });
    expect(new MemoryDriver({ size: 512 }).capabilities).toEqual({
      writeZeroes: true,
      discard: true,
      flush: true,
      blockStatus: true,
      truncate: true,
      check: false,
      fua: false,
    });
  });

  it("defaults: zero-writes fall back to writing zeroes unless noFallback; everything is data; no resize", async () => {
    const d = new Minimal();
    d.data.fill(7);
    await d.writeZeroes(100, 200);
    const buf = new Uint8Array(4096);
    await d.read(0, buf);
    expect([buf[99], buf[100], buf[299], buf[300]]).toEqual([7, 0, 0, 7]);
    await expect(d.writeZeroes(0, 1, { noFallback: true })).rejects.toSatisfy((e) =>
      isBlkError(e, "ENOTSUP"),
    );
    expect(await d.blockStatus(0, 4096)).toEqual([
      { offset: 0, length: 4096, data: true, zero: false, allocated: true },
    ]);
    await expect(d.truncate(8192)).rejects.toSatisfy((e) => isBlkError(e, "ENOTSUP"));
  });

  it("close drains in-flight requests, is idempotent, and fails later requests", async () => {
    const d = new Minimal();
    let open!: () => void;
    d.gate = new Promise((r) => (open = r));
    const w = d.write(0, new Uint8Array([1]));
    await tick();
    expect(d.inFlight).toBe(1);
    const c = d.close();
    expect(d.close()).toBe(c);
    await tick();
    expect(d.closedCount).toBe(0);
    open();
    await Promise.all([w, c]);
    expect(d.closedCount).toBe(1);
    expect(d.data[0]).toBe(1);
    await expect(d.read(0, new Uint8Array(1))).rejects.toSatisfy((e) => isBlkError(e, "ENOMEDIUM"));
    await d[Symbol.asyncDispose]();
    expect(d.closedCount).toBe(1);
  });

  it("drained() holds new requests until the blocking operation is done", async () => {
    const d = new Minimal();
    const log: string[] = [];
    const blocking = d.drained(async () => {
      await tick();
      log.push("blocking");
    });
    const r = d.read(0, new Uint8Array(1)).then(() => log.push("read"));
    await Promise.all([blocking, r]);
    expect(log).toEqual(["blocking", "read"]);
  });
});

describe("node hooks for drivers", () => {
  it("persistent bitmaps are loaded at open and stored at close; flush reaches writable children", async () => {
    const stored: string[] = [];
    class WithBitmaps extends MemoryDriver {
      async loadBitmaps(): Promise<PersistentBitmap[]> {
        const bits = new HBitmap(1 << 20, 16);
        bits.set(0, 1);
        return [
          { name: "a", granularity: 65536, enabled: true, bits },
          { name: "bad", granularity: 65536, enabled: true, inconsistent: true },
        ];
      }
      async storeBitmaps(bitmaps: readonly DirtyBitmap[]): Promise<void> {
        for (const b of bitmaps) stored.push(`${b.name}:${b.count()}`);
      }
      canStoreBitmap(): void {}
    }
    const drv: BlockDriver<{ size: number }> = {
      format: "x",
      kind: "protocol",
      open: async (o) => new WithBitmaps(o),
    };
    const g = new BlockGraph();
    const n = await g.open(drv, { size: 1 << 20 }, { nodeName: "n" });
    expect(n.bitmaps.map((b) => [b.name, b.count(), b.enabled, b.inconsistent])).toEqual([
      ["bad", 0, false, true],
      ["a", 65536, true, false],
    ]);
    await n.write(65536 * 3, new Uint8Array(1));
    await n.createBitmap({ name: "c", persistent: true });
    await g.delete(n);
    expect(stored).toEqual(["c:0", "a:131072"]);
  });

  it("flush goes down to children the node may write", async () => {
    const g = new BlockGraph();
    const { memoryDriver, filterDriver } = await import("../src/index.ts");
    const file = await g.open(memoryDriver, { size: 4096 }, { nodeName: "file" });
    const f = await g.open(filterDriver(), {}, { nodeName: "f", children: { file } });
    await f.flush();
    expect((file.state as MemoryDriver).counters.flushes).toBe(0);
    g.attach({ type: "block-backend", name: "", description: "an unnamed block device" }, f, {
      name: "root",
      perm: PERM.WRITE,
    });
    await f.flush();
    expect((file.state as MemoryDriver).counters.flushes).toBe(1);
    const info: BlockDriverInfo = await f.info();
    expect(info.clusterSize).toBe(65536);
  });
});

describe("memory driver concurrency", () => {
  it("keeps every one of many concurrent sub-cluster writes into one unallocated cluster", async () => {
    const graph = new BlockGraph();
    const node = await graph.open(memoryDriver, { size: 1 << 20, clusterSize: 65536 }, { nodeName: "m" });
    await Promise.all(
      Array.from({ length: 64 }, (_, i) => node.write(i * 1024, new Uint8Array(1024).fill(i + 1))),
    );
    const data = await node.read(0, 65536);
    for (let i = 0; i < 64; i++) expect(data[i * 1024]).toBe(i + 1);
    await node.close();
  });
});
