/**
 * NBD export bitmaps found down the exported node's chain (QEMU 7.2's rules, observed with
 * qemu-storage-daemon): a name is looked up on the node, then through filters and backing children (never
 * a format's `file`); `{node, name}` names any node. The checks come in QEMU's order with its messages,
 * and the `qemu:dirty-bitmap:NAME` context reads the bitmap where it was found.
 */
import { BlockGraph, type BlockNode, filterDriver, memoryDriver } from "@blk/core";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { NBD_STATE_DIRTY } from "../src/nbd/protocol/constants.ts";
import { findChainBitmap, type NbdExport } from "../src/nbd/server/export.ts";
import { NbdServer } from "../src/nbd/server/server.ts";
import { rawChildRole, rawDriver } from "../src/raw/index.ts";

const MiB = 1 << 20;
const K = 1024;

let graph: BlockGraph;
let server: NbdServer;
/** base (4 MiB, read-write) ← top (8 MiB, its backing). */
let base: BlockNode;
let top: BlockNode;

beforeEach(async () => {
  graph = new BlockGraph();
  server = new NbdServer();
  base = await graph.open(memoryDriver, { size: 4 * MiB }, { nodeName: "base" });
  top = await graph.open(memoryDriver, { size: 8 * MiB }, { nodeName: "top", children: { backing: base } });
});

afterEach(async () => {
  await server.close();
});

/** The extents one context reports over the whole export, as `[length, dirty]` pairs. */
async function dirtyMap(exp: NbdExport, name: string): Promise<[number, boolean][]> {
  const ctx = exp.contexts.find((c) => c.name === `qemu:dirty-bitmap:${name}`);
  if (ctx === undefined) throw new Error(`no context for ${name}`);
  const [extents] = await exp.blockStatus([ctx], 0, exp.size, false);
  return (extents ?? []).map((e) => [e.length, (e.flags & NBD_STATE_DIRTY) !== 0]);
}

describe("NBD export bitmaps looked up through the chain", () => {
  it("finds a bitmap of the backing node and reports it with its own granularity and size", async () => {
    const b = base.createBitmapSync({ name: "b", granularity: 128 * K, disabled: true });
    b.setDirty(0, 1);
    b.setDirty(MiB, 300 * K);
    b.setDirty(4000 * K, 96 * K);
    expect(findChainBitmap(top, "b")).toBe(b);
    const exp = server.addExport({ name: "e", node: top, bitmaps: ["b"] });
    expect(exp.contexts.map((c) => [c.id, c.name])).toEqual([
      [0, "base:allocation"],
      [2, "qemu:dirty-bitmap:b"],
    ]);
    expect(exp.contexts[1]?.bitmap).toBe(b);
    expect(b.busy).toBe(true);
    // 128 KiB granules of the 4 MiB base bitmap; past its end the 8 MiB export is clean (what qsd said).
    expect(await dirtyMap(exp, "b")).toEqual([
      [131072, true],
      [917504, false],
      [393216, true],
      [2621440, false],
      [131072, true],
      [4194304, false],
    ]);
    await server.removeExport("e");
    expect(b.busy).toBe(false);
  });

  it("prefers the exported node's own bitmap, and goes through filters", async () => {
    const low = base.createBitmapSync({ name: "b", granularity: 65536, disabled: true });
    const own = top.createBitmapSync({ name: "b", granularity: 65536, disabled: true });
    expect(findChainBitmap(top, "b")).toBe(own);
    expect(findChainBitmap(base, "b")).toBe(low);
    const flt = await graph.open(filterDriver(), {}, { nodeName: "flt", children: { file: top } });
    expect(findChainBitmap(flt, "b")).toBe(own);
    const d = base.createBitmapSync({ name: "d", granularity: 65536, disabled: true });
    const exp = server.addExport({ name: "f", node: flt, bitmaps: ["d", "b"] });
    expect(exp.contexts.map((c) => c.bitmap)).toEqual([undefined, d, own]);
    expect([d.busy, own.busy, low.busy]).toEqual([true, true, false]);
  });

  it("does not follow a format's file child (not even raw's)", async () => {
    const mem = await graph.open(memoryDriver, { size: MiB }, { nodeName: "mem" });
    const raw = await graph.open(
      rawDriver,
      {},
      { nodeName: "raw", children: { file: { node: mem, role: rawChildRole({}) } } },
    );
    mem.createBitmapSync({ name: "m", granularity: 65536, disabled: true });
    expect(findChainBitmap(raw, "m")).toBeUndefined();
    expect(() => server.addExport({ name: "r", node: raw, bitmaps: ["m"] })).toThrow(
      "Bitmap 'm' is not found",
    );
    expect(raw.parents.length).toBe(0);
  });

  it("refuses an enabled bitmap on a writable node of a read-only export only", async () => {
    const en = base.createBitmapSync({ name: "en", granularity: 65536 });
    expect(() => server.addExport({ name: "e", node: top, bitmaps: ["en"] })).toThrow(
      "Enabled bitmap 'en' incompatible with readonly export",
    );
    expect(en.busy).toBe(false);
    // A writable export takes it.
    const w = server.addExport({ name: "w", node: top, writable: true, bitmaps: ["en"] });
    expect(w.contexts[1]?.bitmap).toBe(en);
    await server.removeExport("w");
    // So does `{node, name}`, which skips that check.
    const x = server.addExport({ name: "x", node: top, bitmaps: [{ node: "base", name: "en" }] });
    expect(x.contexts[1]).toMatchObject({ name: "qemu:dirty-bitmap:en", bitmap: en });
    await server.removeExport("x");
    // Enabled on a read-only node: accepted (the node it was found on decides, not the exported one).
    const roBase = await graph.open(memoryDriver, { size: MiB }, { nodeName: "rob", readOnly: true });
    const roTop = await graph.open(
      memoryDriver,
      { size: MiB },
      { nodeName: "rot", children: { backing: roBase } },
    );
    const ren = roBase.createBitmapSync({ name: "ren", granularity: 65536 });
    expect(ren.enabled).toBe(true);
    const r = server.addExport({ name: "r", node: roTop, bitmaps: ["ren"] });
    expect(r.contexts[1]?.bitmap).toBe(ren);
  });

  it("checks enabled before busy, then busy, then inconsistent, and rolls nothing half-way", async () => {
    const en = base.createBitmapSync({ name: "en", granularity: 65536 });
    const d = base.createBitmapSync({ name: "d", granularity: 65536, disabled: true });
    server.addExport({ name: "w", node: top, writable: true, bitmaps: ["en", "d"] });
    expect([en.busy, d.busy]).toEqual([true, true]);
    // en is busy and enabled: the enabled check speaks first (as qsd 7.2 answers).
    expect(() => server.addExport({ name: "a", node: top, bitmaps: ["en"] })).toThrow(
      "Enabled bitmap 'en' incompatible with readonly export",
    );
    expect(() => server.addExport({ name: "a", node: top, bitmaps: ["d"] })).toThrow(
      "Bitmap 'd' is currently in use by another operation and cannot be used",
    );
    await server.removeExport("w");
    const bad = base.createBitmapSync({ name: "bad", granularity: 65536, disabled: true });
    bad.inconsistent = true;
    const ok = top.createBitmapSync({ name: "ok", granularity: 65536, disabled: true });
    expect(() => server.addExport({ name: "a", node: top, bitmaps: ["ok", "bad"] })).toThrow(
      "Bitmap 'bad' is inconsistent and cannot be used",
    );
    expect(() => server.addExport({ name: "a", node: top, bitmaps: ["ok", "zz"] })).toThrow(
      "Bitmap 'zz' is not found",
    );
    expect([ok.busy, bad.busy, en.busy, d.busy]).toEqual([false, false, false, false]);
    expect(top.parents.length).toBe(0);
    expect(server.exports.length).toBe(0);
  });

  it("looks `{node, name}` up by node name with QEMU's messages", () => {
    top.createBitmapSync({ name: "t", granularity: 65536, disabled: true });
    expect(() => server.addExport({ name: "a", node: top, bitmaps: [{ node: "zz", name: "t" }] })).toThrow(
      "Node 'zz' not found",
    );
    expect(() => server.addExport({ name: "a", node: top, bitmaps: [{ node: "base", name: "t" }] })).toThrow(
      "Dirty bitmap 't' not found",
    );
    // Any node of the graph, even one outside the exported chain.
    const other = base.createBitmapSync({ name: "o", granularity: 65536, disabled: true });
    const exp = server.addExport({ name: "a", node: top, bitmaps: [{ node: "base", name: "o" }] });
    expect(exp.contexts[1]?.bitmap).toBe(other);
  });

  it("exports a bitmap listed twice as two contexts of the same name", async () => {
    const d = base.createBitmapSync({ name: "d", granularity: 65536, disabled: true });
    const t = top.createBitmapSync({ name: "t", granularity: 65536, disabled: true });
    const exp = server.addExport({ name: "e", node: top, bitmaps: ["d", "t", { node: "base", name: "d" }] });
    expect(exp.contexts.map((c) => [c.id, c.name])).toEqual([
      [0, "base:allocation"],
      [2, "qemu:dirty-bitmap:d"],
      [3, "qemu:dirty-bitmap:t"],
      [4, "qemu:dirty-bitmap:d"],
    ]);
    // A full name picks the first (LIST and SET alike); the LIST wildcard lists every one (qsd 7.2).
    expect(exp.matchContexts("qemu:dirty-bitmap:d", false).map((c) => c.id)).toEqual([2]);
    expect(exp.matchContexts("qemu:dirty-bitmap:d", true).map((c) => c.id)).toEqual([2]);
    expect(exp.matchContexts("qemu:dirty-bitmap:", true).map((c) => c.id)).toEqual([2, 3, 4]);
    expect([d.busy, t.busy]).toEqual([true, true]);
    await server.removeExport("e");
    expect([d.busy, t.busy]).toEqual([false, false]);
  });

  it("refuses a writable export of a read-only node before looking at its other options", async () => {
    const ro = await graph.open(memoryDriver, { size: MiB }, { nodeName: "ro", readOnly: true });
    const description = "x".repeat(5000);
    expect(() =>
      server.addExport({ name: "x", node: ro, writable: true, description, bitmaps: ["zz"] }),
    ).toThrow("Cannot export read-only node as writable");
  });
});
