/** Hermetic qcow2 read-path tests on images built in memory (no QEMU needed). */
import { writeFileSync } from "node:fs";
import { BlockGraph, backendParent, memoryDriver, PERM } from "@blk/core";
import { makeTempDir } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import {
  l2CacheEntries,
  openQcow2,
  parseHeader,
  probeQcow2,
  type Qcow2CheckResult,
  type Qcow2State,
  qcow2Driver,
  qcow2ImageInfo,
  qcow2Schema,
  resolveBackingFilename,
} from "../src/qcow2/index.ts";
import { type BuildOptions, buildQcow2 } from "./fixtures/qcow2/build.ts";

async function open(image: Uint8Array, opts: { readOnly?: boolean; backing?: Uint8Array } = {}) {
  const graph = new BlockGraph();
  const file = await graph.open(memoryDriver, { size: image.length, data: image }, { owned: false });
  const children: Record<string, typeof file> = { file };
  if (opts.backing !== undefined) {
    children.backing = await graph.open(
      memoryDriver,
      { size: opts.backing.length, data: opts.backing },
      {
        owned: false,
        readOnly: true,
      },
    );
  }
  const node = await graph.open(qcow2Driver, {}, { readOnly: opts.readOnly ?? true, children });
  const root = graph.attach(backendParent(), node, { name: "root", perm: PERM.CONSISTENT_READ });
  return { graph, node, root, state: node.state as Qcow2State };
}

const CS = 65536;
const build = (o: Partial<BuildOptions> = {}): Uint8Array =>
  buildQcow2({
    size: 4 << 20,
    clusters: {
      0: { kind: "data", fill: 0x11 },
      1: { kind: "data", fill: 0x12 },
      3: { kind: "zero" },
      4: { kind: "zero-alloc" },
      5: { kind: "compressed", fill: 0x55 },
      6: { kind: "compressed", fill: 0x66 },
      63: { kind: "data", fill: 0x3f },
    },
    ...o,
  });

function patch(img: Uint8Array, at: number, bytes: number[]): Uint8Array {
  const c = img.slice();
  c.set(bytes, at);
  return c;
}
const u32 = (n: number): number[] => [(n >>> 24) & 255, (n >>> 16) & 255, (n >>> 8) & 255, n & 255];

describe("qcow2 read path (in-memory images)", () => {
  it("reads every cluster kind and reports block status", async () => {
    const { node, root, state } = await open(build());
    expect(node.length).toBe(4 << 20);
    const all = await root.read(0, 4 << 20);
    const at = (c: number) => all[c * CS + 100];
    expect([at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7), at(63)]).toEqual([
      0x11, 0x12, 0, 0, 0, 0x55, 0x66, 0, 0x3f,
    ]);
    // an unaligned read across a compressed/normal boundary
    const part = await root.read(5 * CS - 10, 20);
    expect([...part]).toEqual([...new Array(10).fill(0), ...new Array(10).fill(0x55)]);
    const st = await node.blockStatus(0, 8 * CS);
    expect(
      st.map((e) => [e.offset / CS, e.length / CS, e.data, e.zero, e.allocated, e.hostOffset !== undefined]),
    ).toEqual([
      [0, 2, true, false, true, true],
      [2, 1, false, true, false, false],
      [3, 1, false, true, true, false],
      [4, 1, false, true, true, true],
      [5, 2, true, false, true, false],
      [7, 1, false, true, false, false],
    ]);
    const check = (await node.check()) as Qcow2CheckResult;
    expect(check).toMatchObject({
      corruptions: 0,
      leaks: 0,
      checkErrors: 0,
      allocatedClusters: 6,
      compressedClusters: 2,
    });
    expect(state.formatSpecific()).toEqual({
      compat: "1.1",
      "compression-type": "zlib",
      "lazy-refcounts": false,
      "refcount-bits": 16,
      corrupt: false,
      "extended-l2": false,
    });
    expect(await node.info()).toMatchObject({ clusterSize: CS });
  });

  it("reads unallocated clusters from the backing node, zeroes past its end", async () => {
    const backing = new Uint8Array(3 * CS + 512).fill(0xbb);
    const img = build({ backing: { name: "base.raw", format: "raw" } });
    const { node, root, state } = await open(img, { backing });
    expect(state.backingFilename).toBe("base.raw");
    expect(state.backingFormat).toBe("raw");
    const d = await root.read(2 * CS, 2 * CS);
    expect(d[0]).toBe(0xbb); // cluster 2 from backing
    expect(d[CS]).toBe(0); // cluster 3 is a zero cluster: backing not consulted
    const tail = await root.read(7 * CS, CS);
    expect(tail[0]).toBe(0); // beyond the backing file's end
    const info = qcow2ImageInfo(state, "/x/top.qcow2");
    expect(info).toMatchObject({
      "backing-filename": "base.raw",
      "full-backing-filename": "/x/base.raw",
      "backing-filename-format": "raw",
    });
    const chain = await node.blockStatusAbove(2 * CS, CS);
    expect(chain[0]).toMatchObject({ depth: 1, data: true, allocated: true });
  });

  it("refuses writes with EROFS", async () => {
    const { state } = await open(build());
    await expect(state.write(0, new Uint8Array(512))).rejects.toMatchObject({ code: "EROFS" });
    await expect(state.writeZeroes(0, 512)).rejects.toMatchObject({ code: "EROFS" });
    await expect(state.discard(0, 512)).rejects.toMatchObject({ code: "EROFS" });
    await expect(state.check({ repair: "all" })).rejects.toMatchObject({ code: "EROFS" });
  });

  it("refuses a corrupt image read-write with QEMU's message, opens it read-only", async () => {
    const img = build({ incompatible: 0x2 });
    await expect(open(img, { readOnly: false })).rejects.toMatchObject({
      code: "EACCES",
      message: "qcow2: Image is corrupt; cannot be opened read/write",
    });
    const { state } = await open(img);
    expect(state.corrupt).toBe(true);
    expect(state.formatSpecific().corrupt).toBe(true);
  });

  it("notes the dirty bit", async () => {
    const { state } = await open(build({ incompatible: 0x1, compatible: 0x1 }));
    expect(state.dirty).toBe(true);
    expect(state.formatSpecific()["lazy-refcounts"]).toBe(true);
  });

  it("validates the header with QEMU's messages", () => {
    const img = build();
    const bad = (at: number, bytes: number[]) => () =>
      parseHeader(patch(img, at, bytes).subarray(0, CS), img.length);
    expect(bad(0, [0, 0, 0, 0])).toThrow("Image is not in qcow2 format");
    expect(bad(4, u32(4))).toThrow("Unsupported qcow2 version 4");
    expect(bad(20, u32(22))).toThrow("Unsupported cluster size: 2^22");
    expect(bad(20, u32(8))).toThrow("Unsupported cluster size: 2^8");
    expect(bad(76, u32(0x20))).toThrow("Unsupported qcow2 feature(s): Unknown incompatible feature: 20");
    expect(bad(72, u32(1))).toThrow("Unsupported qcow2 feature(s): Unknown incompatible feature: 100000000");
    expect(bad(76, u32(0x8))).toThrow("qcow2: Compression type incompatible feature bit must not be set");
    expect(bad(104, [1])).toThrow("qcow2: Compression type incompatible feature bit must be set");
    expect(bad(104, [7])).toThrow("qcow2: unknown compression type: 7");
    expect(bad(96, u32(7))).toThrow("Reference count entry width too large; may not exceed 64 bits");
    expect(bad(100, u32(100))).toThrow("qcow2 header too short");
    expect(bad(100, u32(CS + 8))).toThrow("qcow2 header exceeds cluster size");
    expect(bad(36, u32(0))).toThrow("L1 table is too small");
    expect(bad(36, u32(0x400001))).toThrow("Active L1 table too large");
    expect(bad(44, u32(0x30001))).toThrow("Active L1 table offset invalid");
    expect(bad(56, u32(0))).toThrow("Image does not contain a reference count table");
    expect(bad(56, u32(129))).toThrow("Reference count table too large");
    expect(bad(12, u32(CS + 1))).toThrow("Invalid backing file offset");
    expect(bad(76, u32(0x10))).not.toThrow();
    // a feature table names the unknown bit
    const named = patch(img, 112, [0x68, 0x03, 0xf8, 0x57, 0, 0, 0, 48, 0, 5, ...Buffer.from("future bit")]);
    expect(() => parseHeader(patch(named, 76, u32(0x20)).subarray(0, CS), img.length)).toThrow(
      "Unsupported qcow2 feature(s): future bit",
    );
    // extensions
    expect(() =>
      parseHeader(patch(img, 112, [0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 16]).subarray(0, CS), 0),
    ).toThrow("ERROR: ext_backing_format: len=16 too large (>=16)");
    expect(() => parseHeader(patch(img, 112, [0, 0, 0, 9, 0xff, 0, 0, 0]).subarray(0, CS), 0)).toThrow(
      "Header extension too large",
    );
    expect(() =>
      parseHeader(
        patch(patch(img, 92, u32(1)), 112, [0x23, 0x85, 0x28, 0x75, 0, 0, 0, 8]).subarray(0, CS),
        0,
      ),
    ).toThrow("bitmaps_ext: Invalid extension length");
    // unknown extensions are kept
    const unk = parseHeader(
      patch(img, 112, [0x12, 0x34, 0x56, 0x78, 0, 0, 0, 3, 1, 2, 3]).subarray(0, CS),
      0,
    );
    expect(unk.unknownExtensions).toMatchObject([{ type: 0x12345678, data: new Uint8Array([1, 2, 3]) }]);
  });

  it("reports misaligned L2 tables and clusters as EIO", async () => {
    const img = build();
    const l1 = 3 * CS;
    const { root } = await open(patch(img, l1 + 4, u32(0x40200))); // L2 offset not cluster aligned
    await expect(root.read(0, 512)).rejects.toMatchObject({ code: "EIO" });
    const l2 = 4 * CS;
    const { root: r2 } = await open(patch(img, l2 + 4, u32(0x50200)));
    await expect(r2.read(0, 512)).rejects.toMatchObject({ code: "EIO" });
  });

  it("counts leaks and corruptions in check", async () => {
    const img = build();
    // refblock at cluster 2: cluster 5 (data of guest 0) refcount 2, extra cluster 12 refcount 1
    const c = patch(patch(img, 2 * CS + 5 * 2, [0, 2]), 2 * CS + 12 * 2, [0, 1]);
    const big = new Uint8Array(Math.max(c.length, 13 * CS));
    big.set(c);
    const { node } = await open(big);
    const r = (await node.check()) as Qcow2CheckResult;
    expect(r.leaks).toBe(2);
    expect(r.corruptions).toBe(1); // OFLAG_COPIED with refcount 2
    expect(r.messages).toContain("Leaked cluster 12 refcount=1 reference=0");
    expect(r.imageEndOffset).toBe(13 * CS);
  });

  it("probes, resolves backing names and validates options", () => {
    expect(probeQcow2(build().subarray(0, 512))).toBe(100);
    expect(probeQcow2(new Uint8Array([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 1]))).toBe(0);
    expect(qcow2Driver.probe?.(new Uint8Array(16))).toBe(0);
    expect(resolveBackingFilename("/tmp/qi/top.qcow2", "base.qcow2")).toBe("/tmp/qi/base.qcow2");
    expect(resolveBackingFilename("sub/rel.qcow2", "../base.qcow2")).toBe("sub/../base.qcow2");
    expect(resolveBackingFilename("top.qcow2", "base.qcow2")).toBe("base.qcow2");
    expect(resolveBackingFilename("sub/top.qcow2", "/abs/base")).toBe("/abs/base");
    expect(resolveBackingFilename("sub/top.qcow2", "nbd+unix:///exp?socket=/s")).toBe(
      "nbd+unix:///exp?socket=/s",
    );
    expect(qcow2Schema.parse({ "l2-cache-size": 1048576, backing: null })).toEqual({
      "l2-cache-size": 1048576,
      backing: null,
    });
    expect(() => qcow2Schema.parse({ bogus: 1 })).toThrow("Parameter 'bogus' is unexpected");
    const h = parseHeader(build().subarray(0, CS), 0);
    expect(l2CacheEntries(h)).toBe(2);
    expect(l2CacheEntries({ ...h, size: 2 ** 50 })).toBe(512);
  });

  it("refuses backing loops, including an image that is its own backing file", async () => {
    const tmp = makeTempDir("blk-q2loop");
    try {
      writeFileSync(tmp.join("a.qcow2"), build({ backing: { name: "b.qcow2", format: "qcow2" } }));
      writeFileSync(tmp.join("b.qcow2"), build({ backing: { name: "a.qcow2", format: "qcow2" } }));
      writeFileSync(tmp.join("self.qcow2"), build({ backing: { name: "self.qcow2" } }));
      await expect(openQcow2(tmp.join("a.qcow2"))).rejects.toMatchObject({
        code: "EINVAL",
        message: `Backing file '${tmp.join("a.qcow2")}' creates an infinite loop.`,
      });
      await expect(openQcow2(tmp.join("self.qcow2"))).rejects.toMatchObject({ code: "EINVAL" });
      await expect(openQcow2(tmp.join("missing.qcow2"))).rejects.toMatchObject({ code: "ENOENT" });
      // without the backing file: `noBacking` reads zeroes where the chain would be consulted
      await using q = await openQcow2(tmp.join("a.qcow2"), { noBacking: true });
      expect((await q.root.read(2 * CS, 512)).every((x) => x === 0)).toBe(true);
    } finally {
      await tmp.dispose();
    }
  });

  it("reads through a small L2 cache", async () => {
    const graph = new BlockGraph();
    const img = buildQcow2({
      clusterBits: 9,
      size: 1 << 20,
      clusters: Object.fromEntries(
        Array.from({ length: 40 }, (_, i) => [i * 50, { kind: "data", fill: i + 1 }]),
      ),
    });
    const file = await graph.open(memoryDriver, { size: img.length, data: img }, { owned: false });
    const node = await graph.open(
      qcow2Driver,
      { "l2-cache-size": 1024 },
      { readOnly: true, children: { file } },
    );
    const st = node.state as Qcow2State;
    expect(st.l2CacheEntries).toBe(2);
    const all = await node.read(0, 1 << 20);
    for (let i = 0; i < 40; i++) expect(all[i * 50 * 512]).toBe(i + 1);
    expect(((await node.check()) as Qcow2CheckResult).corruptions).toBe(0);
  });
});
