import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  BlockGraph,
  type BlockNode,
  backendParent,
  CopyEngine,
  memoryDriver,
  PERM,
  PERM_ALL,
} from "@blk/core";
import { makeTempDir, pattern } from "@blk/testkit";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import {
  alignedBuffer,
  type FileSyscalls,
  hugePageBuffer,
  makeFileDriver,
  transparentHugePageSize,
} from "../src/file/index.ts";
import { loadSyscalls } from "../src/file/sys.ts";

const dir = makeTempDir("blk-file-copy-range");
let n = 0;
const path = (base = dir.path): string => join(base, `f${n++}.img`);
const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0)) await c();
});
afterAll(() => dir.dispose());

const real = loadSyscalls();
const MiB = 1 << 20;

/** The real system calls, counting copy_file_range calls, with an optional fake result. */
function spy(fake?: () => number): FileSyscalls & { calls: number } {
  if (real === null) throw new Error("no syscalls");
  const s: FileSyscalls & { calls: number } = {
    ...real,
    calls: 0,
    lseek: (fd, offset, whence) => real.lseek(fd, offset, whence),
    fallocate: (fd, mode, offset, len) => real.fallocate(fd, mode, offset, len),
    ofdSetLock: (fd, type, start, len) => real.ofdSetLock(fd, type, start, len),
    ofdGetLock: (fd, type, start, len) => real.ofdGetLock(fd, type, start, len),
    copyFileRange: async (fdIn, offIn, fdOut, offOut, len) => {
      s.calls++;
      if (fake !== undefined) return fake();
      const f = real.copyFileRange;
      if (f === undefined) throw new Error("no copy_file_range");
      return f(fdIn, offIn, fdOut, offOut, len);
    },
  };
  return s;
}

/** The real system calls without copy_file_range (an old glibc). */
function withoutCopyRange(): FileSyscalls {
  const { copyFileRange: _, ...rest } = spy();
  return rest;
}

async function open(
  graph: BlockGraph,
  filename: string,
  syscalls: FileSyscalls | null | undefined,
  readOnly = false,
): Promise<BlockNode> {
  const drv = makeFileDriver(syscalls === undefined ? {} : { syscalls });
  const node = await graph.open(drv, { filename }, { readOnly, discard: "unmap" });
  cleanups.push(() => graph.delete(node, { force: true }));
  return node;
}

function file(data: Uint8Array | number, base?: string): string {
  const p = path(base);
  writeFileSync(p, typeof data === "number" ? new Uint8Array(0) : data);
  return p;
}

const same = (a: Uint8Array, b: Uint8Array): boolean => Buffer.compare(a, b) === 0;

describe.skipIf(real === null || real.copyFileRange === undefined)("file driver: copy offload", () => {
  it("copies between two files with copy_file_range, growing the target", async () => {
    const graph = new BlockGraph();
    const sys = spy();
    const data = pattern(3, 0, 3 * MiB);
    const src = await open(graph, file(data), sys, true);
    const dst = await open(graph, file(0), sys);
    // Through an edge holding resize, the copy may grow the target.
    const via = graph.attach(backendParent(), dst, {
      name: "root",
      perm: PERM.WRITE | PERM.RESIZE,
      shared: PERM_ALL,
    });
    await src.copyRange(4096, 2 * MiB, { node: dst, offset: 512, via });
    via.detach();
    expect(sys.calls).toBeGreaterThanOrEqual(1);
    expect(dst.length).toBe(512 + 2 * MiB);
    expect(same(await dst.read(512, 2 * MiB), data.subarray(4096, 4096 + 2 * MiB))).toBe(true);
    expect(dst.stats.wr_bytes).toBe(2 * MiB);
    expect(src.stats.rd_bytes).toBe(2 * MiB);
  });

  it("past the end of the source file the range reads as zeroes and is written so", async () => {
    const graph = new BlockGraph();
    const src = await open(graph, file(new Uint8Array(1000).fill(0xaa)), spy(), true);
    const dstPath = file(new Uint8Array(4096).fill(0x55));
    const dst = await open(graph, dstPath, spy());
    expect(src.length).toBe(1024);
    await src.copyRange(0, 1024, { node: dst, offset: 1024 });
    const got = await dst.read(1024, 1024);
    expect(got.subarray(0, 1000).every((b) => b === 0xaa)).toBe(true);
    expect(got.subarray(1000).every((b) => b === 0)).toBe(true);
    expect((await dst.read(2048, 512)).every((b) => b === 0x55)).toBe(true);
  });

  it("refuses (ENOTSUP) what it cannot offload, and fails on real errors", async () => {
    const graph = new BlockGraph();
    const data = pattern(4, 0, 65536);
    const cases: [string, FileSyscalls | null, string][] = [
      ["no FFI", null, "ENOTSUP"],
      ["no copy_file_range", withoutCopyRange(), "ENOTSUP"],
      ["EXDEV", spy(() => -18), "ENOTSUP"],
      ["EOPNOTSUPP", spy(() => -95), "ENOTSUP"],
      ["ENOSYS", spy(() => -38), "ENOTSUP"],
      ["EINVAL", spy(() => -22), "ENOTSUP"],
      ["EIO", spy(() => -5), "EIO"],
      ["ENOSPC", spy(() => -28), "ENOSPC"],
    ];
    for (const [what, sys, code] of cases) {
      const src = await open(graph, file(data), sys, true);
      const dst = await open(graph, file(new Uint8Array(65536)), sys);
      const err = await src.copyRange(0, 65536, { node: dst, offset: 0 }).catch((e: unknown) => e);
      expect({ what, code: (err as { code?: string }).code }).toEqual({ what, code });
    }
    // A source that is no file: the target refuses.
    const mem = await graph.open(memoryDriver, { size: 65536 }, { nodeName: "mem" });
    const src = await open(graph, file(data), spy(), true);
    await expect(mem.copyRange(0, 512, { node: src, offset: 0 })).rejects.toMatchObject({ code: "ENOTSUP" });
    const dst = await open(graph, file(data), spy());
    await expect(src.copyRange(0, 512, { node: mem, offset: 0 })).rejects.toMatchObject({ code: "ENOTSUP" });
    // A read-only target is no refusal: EPERM.
    const ro = await open(graph, file(data), spy(), true);
    await expect(dst.copyRange(0, 512, { node: ro, offset: 0 })).rejects.toMatchObject({ code: "EPERM" });
  });

  it("the copy engine offloads data and keeps holes as holes", async () => {
    const graph = new BlockGraph();
    const p = file(0);
    // 8 MiB: data at 0–1 MiB, 3–3.5 MiB and the last 64 KiB; holes elsewhere.
    const fill = await open(graph, p, undefined);
    await fill.truncate(8 * MiB);
    await fill.write(0, pattern(1, 0, MiB));
    await fill.write(3 * MiB, pattern(1, 3 * MiB, MiB / 2));
    await fill.write(8 * MiB - 65536, pattern(1, 8 * MiB - 65536, 65536));
    await graph.delete(fill, { force: true });
    const sys = spy();
    const src = await open(graph, p, sys, true);
    const dstPath = file(0);
    const dst = await open(graph, dstPath, sys);
    await dst.truncate(8 * MiB);
    const work = src.createBitmapSync({ granularity: 65536, disabled: true });
    work.setDirty(0, src.length);
    const engine = new CopyEngine({
      source: src,
      target: dst,
      bitmap: work,
      chunkSize: 2 * MiB,
      maxWorkers: 4,
      status: "node",
      copyOffload: true,
    });
    const r = await engine.run();
    const data = MiB + MiB / 2 + 65536;
    expect({ offloaded: r.offloaded, copied: r.copied }).toEqual({ offloaded: data, copied: data });
    expect(same(await dst.read(0, 8 * MiB), await src.read(0, 8 * MiB))).toBe(true);
    const map = (await dst.blockStatus(0, 8 * MiB)).map((e) => [e.offset, e.length, e.data]);
    expect(map).toEqual((await src.blockStatus(0, 8 * MiB)).map((e) => [e.offset, e.length, e.data]));
    expect(statSync(dstPath).blocks * 512).toBeLessThan(4 * MiB);
  });

  it("alignedBuffer: page-aligned memory of the asked size", () => {
    const addressOf = real?.addressOf;
    if (addressOf === undefined) throw new Error("no addressOf");
    for (const n of [1, 4096, 2 * MiB + 512]) {
      const b = alignedBuffer(n);
      expect({ n, length: b.length, mod: addressOf(b) % 4096 }).toEqual({ n, length: n, mod: 0 });
      expect(addressOf(alignedBuffer(n, 65536)) % 65536).toBe(0);
    }
  });

  /** The `/proc/self/smaps` fields of the mapping that holds `address`. */
  function mappingOf(address: number): Record<string, string> {
    const fields: Record<string, string> = {};
    let inside = false;
    for (const line of readFileSync("/proc/self/smaps", "utf8").split("\n")) {
      const range = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
      if (range !== null) {
        if (inside) break;
        inside =
          Number.parseInt(range[1] ?? "", 16) <= address && address < Number.parseInt(range[2] ?? "", 16);
        continue;
      }
      const kv = /^(\w+):\s+(.*)$/.exec(line);
      if (inside && kv !== null) fields[kv[1] ?? ""] = kv[2] ?? "";
    }
    return fields;
  }

  it("hugePageBuffer: huge-page-aligned memory the kernel may back with huge pages", () => {
    const addressOf = real?.addressOf;
    if (addressOf === undefined) throw new Error("no addressOf");
    const huge = transparentHugePageSize();
    // Smaller than a huge page (or no THP): a page-aligned buffer.
    const small = hugePageBuffer(4096 + 512);
    expect({ length: small.length, mod: addressOf(small) % 4096 }).toEqual({ length: 4608, mod: 0 });
    if (huge === null) return;
    for (const n of [huge, 4 * huge + 4096]) {
      const b = hugePageBuffer(n);
      expect({ n, length: b.length, mod: addressOf(b) % huge }).toEqual({ n, length: n, mod: 0 });
      // madvise(MADV_HUGEPAGE) marked the mapping: it may take huge pages (whether it gets them depends
      // on free memory), which plain memory under THP `madvise` mode may not.
      const enabled = readFileSync("/sys/kernel/mm/transparent_hugepage/enabled", "utf8");
      if (enabled.includes("[madvise]")) {
        expect(mappingOf(addressOf(b)).THPeligible).toBe("1");
        b.fill(1);
        expect(b.every((x) => x === 1)).toBe(true);
      }
    }
  });

  const shm = "/dev/shm";
  const crossFs = existsSync(shm) && statSync(shm).dev !== statSync(dir.path).dev;
  it.skipIf(!crossFs)("between two file systems the engine falls back to read and write", async () => {
    const other = mkdtempSync(join(shm, "blk-copy-range-"));
    try {
      const graph = new BlockGraph();
      const data = pattern(8, 0, 3 * MiB);
      const src = await open(graph, file(data, other), undefined, true);
      const dst = await open(graph, file(0), undefined);
      await dst.truncate(3 * MiB);
      const work = src.createBitmapSync({ granularity: 65536, disabled: true });
      work.setDirty(0, src.length);
      const engine = new CopyEngine({
        source: src,
        target: dst,
        bitmap: work,
        chunkSize: MiB,
        copyOffload: true,
      });
      const r = await engine.run();
      expect({ copied: r.copied, offloaded: r.offloaded }).toEqual({ copied: 3 * MiB, offloaded: 0 });
      expect(engine.offloading).toBe(false);
      expect(same(await dst.read(0, 3 * MiB), data)).toBe(true);
      await graph.delete(src, { force: true });
    } finally {
      for (const c of cleanups.splice(0)) await c();
      rmSync(other, { recursive: true, force: true });
    }
  });
});
