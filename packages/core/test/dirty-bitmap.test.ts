import { describe, expect, it } from "vitest";
import { BlockGraph, type BlockNode, type DirtyBitmap, isBlkError, memoryDriver } from "../src/index.ts";

const G = 65536;

async function node(clusterSize = 65536, size = 16 * G): Promise<BlockNode> {
  const g = new BlockGraph();
  return g.open(memoryDriver, { size, clusterSize }, { nodeName: "n" });
}

const dirtyGranules = (b: DirtyBitmap): number[] => {
  const out: number[] = [];
  for (let i = 0; i < b.size / b.granularity; i++) if (b.get(i * b.granularity)) out.push(i);
  return out;
};

const w = (n: BlockNode, granule: number) => n.write(granule * G, new Uint8Array(512).fill(1));

describe("DirtyBitmap", () => {
  it("default granularity: cluster size clamped to [4 KiB, 64 KiB]", async () => {
    expect((await (await node(4096)).createBitmap({ name: "a" })).granularity).toBe(4096);
    expect((await (await node(512)).createBitmap({ name: "a" })).granularity).toBe(4096);
    expect((await (await node(1 << 21, 1 << 22)).createBitmap({ name: "a" })).granularity).toBe(65536);
  });

  it("add checks with QEMU's messages", async () => {
    const n = await node();
    await n.createBitmap({ name: "b0" });
    await expect(n.createBitmap({ name: "b0" })).rejects.toThrow("Bitmap already exists: b0");
    await expect(n.createBitmap({ name: "" })).rejects.toThrow("Bitmap name cannot be empty");
    const long = "x".repeat(1024);
    await expect(n.createBitmap({ name: long })).rejects.toThrow(`Bitmap name too long: ${long}`);
    await expect(n.createBitmap({ name: "g", granularity: 256 })).rejects.toThrow(
      "Granularity must be power of 2 and at least 512",
    );
    await expect(n.createBitmap({ name: "g", granularity: 3000 })).rejects.toThrow(
      "Granularity must be power of 2 and at least 512",
    );
    await expect(n.createBitmap({ name: "p", persistent: true })).rejects.toThrow(
      "Can't store persistent bitmaps to n: Operation not supported",
    );
    expect(n.bitmaps.map((b) => b.name)).toEqual(["b0"]);
  });

  it("busy / readonly / inconsistent checks and which operations they refuse", async () => {
    const n = await node();
    const b = await n.createBitmap({ name: "b" });
    b.busy = true;
    expect(() => b.clear()).toThrow("Bitmap 'b' is currently in use by another operation and cannot be used");
    expect(() => b.enable()).toThrow(
      "Bitmap 'b' is currently in use by another operation and cannot be used",
    );
    await expect(b.remove()).rejects.toThrow(
      "Bitmap 'b' is currently in use by another operation and cannot be used",
    );
    b.busy = false;
    b.readonly = true;
    expect(() => b.clear()).toThrow("Bitmap 'b' is readonly and cannot be modified");
    b.disable();
    b.enable();
    await expect(n.write(0, new Uint8Array(1))).rejects.toMatchObject({ code: "EPERM" });
    await expect(b.remove()).rejects.toThrow("Bitmap 'b' is readonly and cannot be modified");
    b.readonly = false;
    b.inconsistent = true;
    expect(() => b.enable()).toThrow("Bitmap 'b' is inconsistent and cannot be used");
    expect(b.info()).toEqual({
      name: "b",
      recording: true,
      busy: false,
      persistent: false,
      granularity: G,
      count: 0,
      inconsistent: true,
    });
    await b.remove();
    expect(n.getBitmap("b")).toBeUndefined();
  });

  it("clear, enable/disable, merge across granularities, size mismatch message", async () => {
    const n = await node();
    const a = await n.createBitmap({ name: "a" });
    const small = await n.createBitmap({ name: "s", granularity: 512 });
    await n.write(G + 10, new Uint8Array(10));
    a.disable();
    await w(n, 3);
    expect(dirtyGranules(a)).toEqual([1]);
    const before = a.clear();
    expect(a.count()).toBe(0);
    a.restore(before);
    expect(dirtyGranules(a)).toEqual([1]);
    a.clear();
    const saved = a.merge(small);
    expect(dirtyGranules(a)).toEqual([1, 3]);
    a.restore(saved);
    expect(a.count()).toBe(0);
    const other = await (await node(65536, 8 * G)).createBitmap({ name: "o" });
    expect(() => a.merge(other)).toThrow(
      `Bitmaps are of different sizes (destination size is ${16 * G}, source size is ${8 * G}) and can't be merged`,
    );
    small.readonly = true;
    a.merge(small);
    expect(() => small.merge(a)).toThrow("Bitmap 's' is readonly and cannot be modified");
  });

  it("mergeAll leaves the target untouched when any source fails", async () => {
    const n = await node();
    const t = await n.createBitmap({ name: "t" });
    const a = await n.createBitmap({ name: "a", granularity: 4096 });
    const busy = await n.createBitmap({ name: "busy" });
    await w(n, 2);
    t.clear();
    a.disable();
    await w(n, 5);
    busy.busy = true;
    expect(() => t.mergeAll([a, busy])).toThrow(
      "Bitmap 'busy' is currently in use by another operation and cannot be used",
    );
    expect(t.count()).toBe(G);
    const saved = t.mergeAll([a]);
    expect(dirtyGranules(t)).toEqual([2, 5]);
    t.restore(saved);
    expect(dirtyGranules(t)).toEqual([5]);
  });

  it("truncate follows the node", async () => {
    const n = await node();
    const b = await n.createBitmap({ name: "b" });
    await n.truncate(32 * G);
    expect(b.size).toBe(32 * G);
    await w(n, 20);
    expect(dirtyGranules(b)).toEqual([20]);
  });
});

describe("successors (hbitmap.md §7.5)", () => {
  /**
   * A backup job in miniature: freeze bitmap `b`, copy some of its granules (the copy bitmap), let the
   * guest write meanwhile, then apply the bitmap-mode outcome of the job.
   */
  async function backup(mode: "on-success" | "never" | "always", succeed: boolean) {
    const n = await node();
    const b = await n.createBitmap({ name: "b" });
    await w(n, 1);
    await w(n, 2);
    await w(n, 3);
    const succ = b.createSuccessor();
    expect(b.busy && b.frozen && !b.enabled && b.recording).toBe(true);
    expect(b.info()).toMatchObject({ busy: true, recording: true });
    // The copy bitmap starts as the frozen bits; the job copies granule 1 (and 2 if it succeeds).
    const copy = n.createBitmapSync({ granularity: G, disabled: true });
    copy.mergeUnchecked(b);
    copy.resetDirty(1 * G, G);
    if (succeed) copy.resetDirty(2 * G, 2 * G);
    // Guest writes during the job go to the successor only.
    await w(n, 7);
    expect(dirtyGranules(b)).toEqual([1, 2, 3]);
    expect(dirtyGranules(succ)).toEqual([7]);
    let result: DirtyBitmap;
    if (mode === "never" || (mode === "on-success" && !succeed)) {
      result = b.reclaim();
    } else {
      result = b.abdicate();
      if (mode === "always" && !succeed) result.mergeUnchecked(copy);
    }
    copy.release();
    expect(n.getBitmap("b")).toBe(result);
    expect(result.busy || result.frozen).toBe(false);
    expect(n.bitmaps).toEqual([result]);
    await w(n, 9);
    return dirtyGranules(result);
  }

  it("on-success: success → only writes during the job; failure → original ∪ writes", async () => {
    expect(await backup("on-success", true)).toEqual([7, 9]);
    expect(await backup("on-success", false)).toEqual([1, 2, 3, 7, 9]);
  });

  it("never: reclaim either way", async () => {
    expect(await backup("never", true)).toEqual([1, 2, 3, 7, 9]);
    expect(await backup("never", false)).toEqual([1, 2, 3, 7, 9]);
  });

  it("always: abdicate; on failure plus the not-yet-copied bits", async () => {
    expect(await backup("always", true)).toEqual([7, 9]);
    expect(await backup("always", false)).toEqual([2, 3, 7, 9]);
  });

  it("abdicate keeps persistence and name; disabled state follows the successor", async () => {
    const n = await node();
    const b = await n.createBitmap({ name: "b", disabled: true });
    b.persistent = true;
    const s = b.createSuccessor();
    expect(s.enabled).toBe(false);
    const r = b.abdicate();
    expect(r).toBe(s);
    expect(r.name).toBe("b");
    expect(r.persistent).toBe(true);
    expect(b.released).toBe(true);
  });

  it("errors with QEMU's messages", async () => {
    const n = await node();
    const b = await n.createBitmap({ name: "b" });
    expect(() => b.abdicate()).toThrow("Cannot relinquish control if there's no successor present");
    expect(() => b.reclaim()).toThrow("Cannot reclaim a successor when none is present");
    b.createSuccessor();
    let err: unknown;
    try {
      b.createSuccessor();
    } catch (e) {
      err = e;
    }
    expect(isBlkError(err, "EBUSY")).toBe(true);
    expect((err as Error).message).toBe(
      "Bitmap 'b' is currently in use by another operation and cannot be used",
    );
    await expect(n.truncate(32 * G)).rejects.toMatchObject({ code: "EBUSY" });
  });
});
