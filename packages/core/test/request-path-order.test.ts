/**
 * The request path observed from the driver's side (QEMU's `bdrv_aligned_pwritev` order): range and
 * permission checks, request tracking, before-write notifiers, driver I/O, dirty-bitmap marking,
 * statistics — and which requests wait for which.
 */
import { describe, expect, it } from "vitest";
import {
  BlkError,
  type BlockDriver,
  BlockGraph,
  type BlockNode,
  type FlushFlags,
  MemoryDriver,
  type MemoryDriverOptions,
  type MemoryRequest,
  memoryDriver,
  openBlockdev,
} from "../src/index.ts";

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

/** Resolves once `cond()` holds, polling on the event loop; rejects after `ms` (no fixed sleeps). */
async function until(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setImmediate(r));
  }
}

/** A memory disk whose driver logs every request as it reaches the data, and can hold requests. */
async function logged(size = 1 << 20) {
  const graph = new BlockGraph();
  const node = await graph.open(memoryDriver, { size }, { nodeName: "disk" });
  const mem = node.state as MemoryDriver;
  const seen: string[] = [];
  const holds = new Map<string, Promise<void>>();
  mem.hook = async (req: MemoryRequest) => {
    const key = `${req.kind}@${req.offset}`;
    seen.push(key);
    await holds.get(key);
  };
  return { graph, node, mem, seen, holds };
}

describe("request tracking, seen by the driver", () => {
  it("a serialising write waits for an in-flight overlapping write; overlapping requests wait for it", async () => {
    const { node, seen, holds } = await logged();
    const first = deferred();
    holds.set("write@0", first.promise);
    const plain = node.write(0, new Uint8Array(4096).fill(1));
    await until(() => seen.includes("write@0"), "the plain write to reach the driver");

    const serial = node.write(2048, new Uint8Array(4096).fill(2), { serialising: true });
    // A disjoint read goes straight through while both writes are pending.
    await node.read(65536, 512);
    expect(seen).toEqual(["write@0", "read@65536"]);
    expect(node.tracker.inFlight).toBe(2);

    // The serialising write reaches the driver only after the plain one ended; hold it there.
    const second = deferred();
    holds.set("write@2048", second.promise);
    first.resolve();
    await plain;
    await until(() => seen.includes("write@2048"), "the serialising write to reach the driver");

    // A read and a plain write overlapping the serialising write wait for it; a disjoint write does not.
    const read = node.read(6000, 100);
    const over = node.write(6143, new Uint8Array(1).fill(3));
    await node.write(8192, new Uint8Array(512).fill(4));
    expect(seen).toEqual(["write@0", "read@65536", "write@2048", "write@8192"]);

    second.resolve();
    await serial;
    const [back] = await Promise.all([read, over]);
    expect(seen.slice(0, 4)).toEqual(["write@0", "read@65536", "write@2048", "write@8192"]);
    expect(seen.slice(4).sort()).toEqual(["read@6000", "write@6143"]);
    expect(back.every((b) => b === 2)).toBe(true);
    const data = await node.read(0, 8192);
    expect([data[0], data[2047], data[2048], data[6142], data[6143], data[6144]]).toEqual([1, 1, 2, 2, 3, 0]);
    expect(node.tracker.inFlight).toBe(0);
  });

  it("plain overlapping writes do not serialise with each other (QEMU tracks them without waiting)", async () => {
    const { node, seen, holds } = await logged();
    const gate = deferred();
    holds.set("write@0", gate.promise);
    const a = node.write(0, new Uint8Array(4096).fill(1));
    await until(() => seen.includes("write@0"), "the first write to reach the driver");
    await node.write(1024, new Uint8Array(1024).fill(2));
    expect(seen).toEqual(["write@0", "write@1024"]);
    gate.resolve();
    await a;
  });

  it("a serialising read waits for an overlapping write and holds overlapping writes back", async () => {
    const { node, seen, holds } = await logged();
    const w = deferred();
    holds.set("write@0", w.promise);
    const write = node.write(0, new Uint8Array(4096).fill(5));
    await until(() => seen.includes("write@0"), "the write to reach the driver");
    const r = deferred();
    holds.set("read@512", r.promise);
    const read = node.read(512, 512, { serialising: true });
    // noSerialising reads (a notifier copying old data) do not wait.
    await node.read(1024, 512, { noSerialising: true });
    expect(seen).toEqual(["write@0", "read@1024"]);
    w.resolve();
    await write;
    await until(() => seen.includes("read@512"), "the serialising read to reach the driver");
    const later = node.write(768, new Uint8Array(16).fill(6));
    await node.write(4096, new Uint8Array(16).fill(7));
    expect(seen).toEqual(["write@0", "read@1024", "read@512", "write@4096"]);
    r.resolve();
    expect((await read).every((b) => b === 5)).toBe(true);
    await later;
    expect(seen.at(-1)).toBe("write@768");
  });
});

describe("request path order", () => {
  it("checks come first: a refused request reaches no notifier, no driver, no bitmap", async () => {
    const graph = new BlockGraph();
    const node = await graph.open(memoryDriver, { size: 65536, requestAlignment: 512 }, { nodeName: "n" });
    const mem = node.state as MemoryDriver;
    const bitmap = node.createBitmapSync({ name: "b", granularity: 512 });
    let notified = 0;
    node.beforeWrite.add(() => {
      notified++;
    });
    await expect(node.write(65024, new Uint8Array(1024))).rejects.toMatchObject({ code: "EIO" });
    await expect(node.write(100, new Uint8Array(512))).rejects.toMatchObject({ code: "EINVAL" });
    await expect(node.writeZeroes(-512, 512)).rejects.toMatchObject({ code: "EINVAL" });
    await expect(node.discard(0, 100)).rejects.toMatchObject({ code: "EINVAL" });
    await node.reopen({ readOnly: true });
    await expect(node.write(0, new Uint8Array(512))).rejects.toMatchObject({ code: "EPERM" });
    expect(notified).toBe(0);
    expect(mem.counters.writes + mem.counters.writeZeroes + mem.counters.discards).toBe(0);
    expect(bitmap.count()).toBe(0);
    expect(node.stats.invalid_wr_operations).toBe(4);
    expect(node.stats.invalid_unmap_operations).toBe(1);
    expect(node.stats.failed_wr_operations + node.stats.wr_operations).toBe(0);
    expect(node.tracker.inFlight).toBe(0);
  });

  it("notifiers run before the driver; bitmaps are marked after it, before the request ends", async () => {
    const { node, mem } = await logged();
    const b = node.createBitmapSync({ name: "b", granularity: 4096 });
    const log: string[] = [];
    node.beforeWrite.add((ev) => {
      log.push(`notify ${ev.kind} dirty=${b.get(ev.offset)} writes=${mem.counters.writes}`);
    });
    mem.hook = (req) => {
      log.push(`driver ${req.kind} dirty=${b.get(req.offset)}`);
    };
    const w = node.write(8192, new Uint8Array(100).fill(1));
    // A serialising read of the same range waits for the write's end: by then the bitmap is marked.
    const r = node.read(8192, 100, { serialising: true }).then(() => log.push(`read dirty=${b.get(8192)}`));
    await Promise.all([w, r]);
    expect(log).toEqual([
      "notify write dirty=false writes=0",
      "driver write dirty=false",
      "driver read dirty=true",
      "read dirty=true",
    ]);
    expect(node.stats).toMatchObject({ wr_operations: 1, wr_bytes: 100, rd_operations: 1, rd_bytes: 100 });
  });

  it("a failed write still marks its range dirty (QEMU's write_req_finish marks on any result)", async () => {
    const { node, mem } = await logged();
    const b = node.createBitmapSync({ name: "b", granularity: 4096 });
    await node.write(0, new Uint8Array(4096).fill(7));
    b.clear();
    mem.hook = (req) => {
      if (req.kind === "write") throw new BlkError("ENOSPC", "No space left on device");
    };
    await expect(node.write(4096 * 3, new Uint8Array(10).fill(1))).rejects.toMatchObject({ code: "ENOSPC" });
    expect(b.count()).toBe(4096);
    expect(b.get(4096 * 3)).toBe(true);
    mem.hook = undefined;
    // A notifier refusal: data untouched, the range marked all the same (the write was started).
    const off = node.beforeWrite.add(() => {
      throw new BlkError("EIO", "copy-before-write failed");
    });
    await expect(node.write(0, new Uint8Array(10).fill(9))).rejects.toMatchObject({ code: "EIO" });
    off();
    expect((await node.read(0, 4096)).every((x) => x === 7)).toBe(true);
    expect(b.get(0)).toBe(true);
    expect(node.stats).toMatchObject({ failed_wr_operations: 2, wr_operations: 1, wr_bytes: 4096 });
    expect(node.stats.wr_highest_offset).toBe(4096 * 3 + 10);
  });
});

/** A memory driver that records the flags of each flush. */
class FlushRecorder extends MemoryDriver {
  readonly flushes: (boolean | undefined)[] = [];
  // MemoryDriver's _flush ignores its flags; the base class passes them all the same.
  protected override async _flush(flags?: FlushFlags): Promise<void> {
    this.flushes.push(flags?.toDisk);
    await super._flush();
  }
}
const recorder: BlockDriver<MemoryDriverOptions> = {
  format: "x-flush-recorder",
  kind: "format",
  async open(o, ctx) {
    return new FlushRecorder(o, ctx.children.get("backing"));
  },
};

describe("node options reach the driver", () => {
  it("cache.no-flush: the driver's flush does not force stable storage; children flush by their own option", async () => {
    const graph = new BlockGraph();
    const child = await graph.open(recorder, { size: 65536 }, { nodeName: "c" });
    const top = await graph.open(recorder, { size: 65536 }, { nodeName: "t", cacheNoFlush: true });
    const plain = await graph.open(recorder, { size: 65536 }, { nodeName: "p" });
    await top.flush();
    await plain.flush();
    await child.flush();
    expect((top.state as FlushRecorder).flushes).toEqual([false]);
    expect((plain.state as FlushRecorder).flushes).toEqual([true]);
    expect((child.state as FlushRecorder).flushes).toEqual([true]);
    expect(top.stats.flush_operations).toBe(1);
  });

  it("auto-read-only reaches the driver; inline children inherit it, backing children get read-only without it", async () => {
    const contexts = new Map<string, { readOnly: boolean; autoReadOnly: boolean }>();
    const spy: BlockDriver<{ size?: number }> = {
      format: "x-spy",
      kind: "format",
      childOptions: [{ name: "file" }, { name: "backing" }],
      async open(o, ctx) {
        contexts.set(ctx.nodeName, { readOnly: ctx.readOnly, autoReadOnly: ctx.autoReadOnly });
        return new MemoryDriver({ size: o.size ?? 4096 });
      },
    };
    // Registered under QAPI driver names whose schemas have the members used here.
    const drivers = new Map<string, BlockDriver<never>>([
      ["qcow2", spy as BlockDriver<never>],
      ["null-co", spy as BlockDriver<never>],
    ]);
    const g = new BlockGraph();
    const top: BlockNode = await openBlockdev(
      g,
      {
        driver: "qcow2",
        "node-name": "top",
        "auto-read-only": true,
        file: { driver: "null-co", "node-name": "file", size: 4096 },
        backing: { driver: "null-co", "node-name": "base", size: 4096 },
      },
      { drivers },
    );
    expect(Object.fromEntries(contexts)).toEqual({
      file: { readOnly: false, autoReadOnly: true },
      base: { readOnly: true, autoReadOnly: false },
      top: { readOnly: false, autoReadOnly: true },
    });
    expect(top.options.autoReadOnly).toBe(true);
    expect(g.find("base")?.options).toMatchObject({ readOnly: true, autoReadOnly: false });
    // An explicit child value wins over the inherited one.
    const g2 = new BlockGraph();
    contexts.clear();
    await openBlockdev(
      g2,
      {
        driver: "qcow2",
        "node-name": "t2",
        "auto-read-only": true,
        file: { driver: "null-co", "node-name": "f2", size: 4096, "auto-read-only": false },
      },
      { drivers },
    );
    expect(contexts.get("f2")).toEqual({ readOnly: false, autoReadOnly: false });
  });
});
