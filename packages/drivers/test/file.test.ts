import { writeFileSync } from "node:fs";
import { stat, truncate } from "node:fs/promises";
import { BlockGraph, isBlkError, PERM } from "@blk/core";
import { makeTempDir, pattern, sha256 } from "@blk/testkit";
import { afterEach, describe, expect, it } from "vitest";
import { type FileState, fileDriver, fileSchema, makeFileDriver } from "../src/file/index.ts";

const dir = makeTempDir("blk-file");
let n = 0;
const path = (): string => dir.join(`f${n++}.img`);
const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0)) await c();
});

async function openNode(filename: string, opts: { discard?: "unmap" | "ignore"; readOnly?: boolean } = {}) {
  const graph = new BlockGraph();
  const node = await graph.open(
    fileDriver,
    { filename },
    { discard: opts.discard ?? "ignore", readOnly: opts.readOnly ?? false },
  );
  cleanups.push(() => graph.delete(node, { force: true }));
  return { graph, node, state: node.state as FileState };
}

async function sparse(size: number): Promise<string> {
  const p = path();
  writeFileSync(p, "");
  await truncate(p, size);
  return p;
}

describe("file driver", () => {
  it("round-trips data with pattern/sha256", async () => {
    const p = await sparse(4 << 20);
    const { node } = await openNode(p);
    const data = pattern(7, 12345, 300_000);
    await node.write(12345, data);
    await node.flush();
    expect(sha256(await node.read(12345, data.length))).toBe(sha256(data));
    // unaligned single bytes
    await node.write(3, new Uint8Array([9]));
    expect((await node.read(0, 5))[3]).toBe(9);
  });

  it("reads past the end of the file return zeroes and the length is rounded up to 512", async () => {
    const p = path();
    writeFileSync(p, new Uint8Array(1000).fill(0xaa));
    const { node, state } = await openNode(p);
    expect(node.length).toBe(1024);
    expect(state.fileSize).toBe(1000);
    const got = await node.read(900, 124);
    expect(got.subarray(0, 100).every((b) => b === 0xaa)).toBe(true);
    expect(got.subarray(100).every((b) => b === 0)).toBe(true);
    // Driver state directly: entirely beyond EOF
    const buf = new Uint8Array(4096).fill(1);
    await state.read(1 << 20, buf);
    expect(buf.every((b) => b === 0)).toBe(true);
  });

  it("maps holes and data from SEEK_DATA/SEEK_HOLE", async () => {
    const p = await sparse(1 << 20);
    const { node } = await openNode(p);
    await node.write(65536, pattern(1, 0, 8192));
    const map = await node.blockStatus(0, node.length, { wantZero: true });
    expect(map.map((e) => [e.offset, e.length, e.data, e.zero, e.hostOffset])).toEqual([
      [0, 65536, false, true, 0],
      [65536, 8192, true, false, 65536],
      [73728, (1 << 20) - 73728, false, true, 73728],
    ]);
  });

  it("discard punches holes: the range reads zero and maps as zero", async () => {
    const p = await sparse(1 << 20);
    const { node } = await openNode(p, { discard: "unmap" });
    await node.write(0, pattern(2, 0, 1 << 20));
    const before = (await stat(p)).blocks;
    await node.discard(65536, 131072);
    expect((await node.read(65536, 131072)).every((b) => b === 0)).toBe(true);
    expect(sha256(await node.read(0, 65536))).toBe(sha256(pattern(2, 0, 65536)));
    expect(sha256(await node.read(196608, 65536))).toBe(sha256(pattern(2, 196608, 65536)));
    const map = await node.blockStatus(0, node.length);
    expect(map.map((e) => [e.offset, e.length, e.data])).toEqual([
      [0, 65536, true],
      [65536, 131072, false],
      [196608, (1 << 20) - 196608, true],
    ]);
    expect((await stat(p)).blocks).toBeLessThan(before);
  });

  it("write-zeroes uses ZERO_RANGE (or punch with may-unmap) and reads zero", async () => {
    const p = await sparse(1 << 20);
    const { node } = await openNode(p, { discard: "unmap" });
    await node.write(0, pattern(3, 0, 1 << 20));
    await node.writeZeroes(4096, 8192);
    await node.writeZeroes(65536, 65536, { mayUnmap: true });
    expect((await node.read(4096, 8192)).every((b) => b === 0)).toBe(true);
    expect((await node.read(65536, 65536)).every((b) => b === 0)).toBe(true);
    expect((await node.read(0, 4096)).every((b, i) => b === pattern(3, 0, 4096)[i])).toBe(true);
    const map = await node.blockStatus(65536, 65536);
    expect(map[0]).toMatchObject({ offset: 65536, length: 65536, data: false, zero: true });
    // unaligned zeroes still read zero
    await node.writeZeroes(200_001, 333);
    expect((await node.read(200_000, 335)).subarray(1, 334).every((b) => b === 0)).toBe(true);
  });

  it("truncate grows and shrinks, with preallocation off/falloc/full", async () => {
    const p = await sparse(0);
    const { node, state } = await openNode(p);
    await node.truncate(1 << 20);
    expect(node.length).toBe(1 << 20);
    // Grown from empty: the first 4 KiB are allocated (as QEMU), the rest is a hole.
    expect((await node.blockStatus(0, 1 << 20)).map((e) => [e.offset, e.length, e.data])).toEqual([
      [0, 4096, true],
      [4096, (1 << 20) - 4096, false],
    ]);
    await node.truncate(2 << 20, { preallocation: "falloc" });
    expect(await state.allocatedSize()).toBeGreaterThanOrEqual(1 << 20);
    await node.truncate(3 << 20, { preallocation: "full" });
    expect((await stat(p)).size).toBe(3 << 20);
    expect(await state.allocatedSize()).toBeGreaterThanOrEqual(2 << 20);
    expect((await node.read((3 << 20) - 4096, 4096)).every((b) => b === 0)).toBe(true);
    await node.write(100, pattern(4, 0, 1000));
    await node.truncate(4096);
    expect((await stat(p)).size).toBe(4096);
    expect(sha256(await node.read(100, 1000))).toBe(sha256(pattern(4, 0, 1000)));
    await expect(node.truncate(2048, { preallocation: "full" })).rejects.toMatchObject({ code: "ENOTSUP" });
    await expect(node.truncate(8192, { preallocation: "metadata" })).rejects.toMatchObject({
      code: "ENOTSUP",
      message: "Unsupported preallocation mode: metadata",
    });
  });

  it("creates images as QEMU does (first block allocated)", async () => {
    const p = path();
    await fileDriver.create({ filename: p, size: 1 << 20 });
    expect((await stat(p)).size).toBe(1 << 20);
    const { node } = await openNode(p);
    expect((await node.blockStatus(0, 1 << 20)).map((e) => [e.length, e.data])).toEqual([
      [4096, true],
      [(1 << 20) - 4096, false],
    ]);
  });

  it("fails with QEMU's message for a missing file, and refuses writes read-only", async () => {
    const graph = new BlockGraph();
    const missing = dir.join("nope.img");
    const err = await graph.open(fileDriver, { filename: missing }).catch((e: unknown) => e);
    expect(isBlkError(err, "ENOENT")).toBe(true);
    expect((err as Error).message).toBe(`Could not open '${missing}': No such file or directory`);
    const p = await sparse(4096);
    const { node } = await openNode(p, { readOnly: true });
    await expect(node.write(0, new Uint8Array(1))).rejects.toMatchObject({ code: "EPERM" });
  });

  it("refuses cache.direct and pr-manager with ENOTSUP", async () => {
    const p = await sparse(4096);
    await expect(
      fileDriver.open({ filename: p }, {
        readOnly: false,
        autoReadOnly: false,
        nodeName: "x",
        children: new Map(),
        cacheDirect: true,
      } as never),
    ).rejects.toMatchObject({ code: "ENOTSUP" });
    await expect(
      fileDriver.open(
        { filename: p, "pr-manager": "pr0" },
        { readOnly: false, autoReadOnly: false, nodeName: "x", children: new Map() },
      ),
    ).rejects.toMatchObject({ code: "ENOTSUP" });
  });

  it("validates options with QEMU's wording", () => {
    expect(() => fileSchema.parse({})).toThrow("Parameter 'filename' is missing");
    expect(() => fileSchema.parse({ filename: 1 })).toThrow(
      "Invalid parameter type for 'filename', expected: string",
    );
    expect(() => fileSchema.parse({ filename: "a", locking: "maybe" })).toThrow(
      "Parameter 'locking' does not accept value 'maybe'",
    );
    expect(() => fileSchema.parse({ filename: "a", bogus: 1 })).toThrow("Parameter 'bogus' is unexpected");
    expect(fileSchema.parse({ filename: "a", locking: "off" })).toEqual({ filename: "a", locking: "off" });
  });

  it("falls back without the FFI: all data, discard writes zeroes, no locks", async () => {
    const drv = makeFileDriver({ syscalls: null });
    const p = await sparse(1 << 20);
    const graph = new BlockGraph();
    const node = await graph.open(drv, { filename: p }, { discard: "unmap" });
    cleanups.push(() => graph.delete(node, { force: true }));
    expect((node.state as FileState).locking).toBe(false);
    expect(await node.blockStatus(0, 1 << 20)).toMatchObject([{ offset: 0, length: 1 << 20, data: true }]);
    await node.write(0, pattern(5, 0, 65536));
    await node.discard(0, 4096);
    expect((await node.read(0, 4096)).every((b) => b === 0)).toBe(true);
    await node.writeZeroes(8192, 4096, { mayUnmap: true });
    expect((await node.read(8192, 4096)).every((b) => b === 0)).toBe(true);
    await expect(node.writeZeroes(0, 4096, { noFallback: true })).rejects.toMatchObject({ code: "ENOTSUP" });
  });

  it("writes zeroes beyond the end through a resize edge by growing the file", async () => {
    const p = await sparse(4096);
    const { graph, node } = await openNode(p);
    const { backendParent } = await import("@blk/core");
    const edge = graph.attach(backendParent(), node, {
      name: "root",
      perm: PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE,
    });
    await edge.writeZeroes(4096, 8192);
    expect((await stat(p)).size).toBe(12288);
    edge.detach();
  });
});
