/**
 * Hostile images: mutated qcow2 files (header fields, table offsets and sizes, refcounts, extension
 * lengths, L1/L2 entries, compressed descriptors, truncation) never crash, hang or allocate without bound:
 * every outcome is a BlkError on open/read/map/check or a result. Runs: BLK_FUZZ_RUNS (default 300),
 * seed: BLK_FUZZ_SEED.
 */
import { readFileSync } from "node:fs";
import { BlockGraph, isBlkError, memoryDriver } from "@blk/core";
import { makeTempDir, missingPeers, pattern, rng, run } from "@blk/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parseHeader, type Qcow2State, qcow2Driver } from "../src/qcow2/index.ts";
import { buildQcow2 } from "./fixtures/qcow2/build.ts";

const RUNS = Number(process.env.BLK_FUZZ_RUNS ?? 300);
const SEED = Number(process.env.BLK_FUZZ_SEED ?? 0x9e3779b9);

const seeds: { name: string; data: Uint8Array }[] = [
  {
    name: "built-64k",
    data: buildQcow2({
      size: 4 << 20,
      clusters: {
        0: { kind: "data", fill: 1 },
        2: { kind: "zero" },
        3: { kind: "zero-alloc" },
        4: { kind: "compressed", fill: 4 },
        5: { kind: "compressed", fill: 5 },
      },
      backing: { name: "b.raw", format: "raw" },
    }),
  },
  {
    name: "built-512",
    data: buildQcow2({
      clusterBits: 9,
      size: 256 << 10,
      clusters: {
        0: { kind: "data", fill: 1 },
        70: { kind: "compressed", fill: 7 },
        300: { kind: "data", fill: 3 },
      },
    }),
  },
];

const dir = makeTempDir("blk-q2fuzz");
afterAll(() => dir.dispose());

beforeAll(async () => {
  if (missingPeers(["qemu-img", "qemu-io"]).length > 0) return;
  const sh = async (cmd: string, args: string[]) => {
    const r = await run(cmd, args, { cwd: dir.path, timeoutMs: 30_000 });
    if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")}: ${r.stderr}`);
  };
  const raw = new Uint8Array(1 << 20);
  raw.set(pattern(1, 0, 100_000));
  raw.fill(0x61, 300_000, 700_000);
  await import("node:fs/promises").then((fs) => fs.writeFile(dir.join("s.raw"), raw));
  await sh("qemu-img", [
    "convert",
    "-c",
    "-O",
    "qcow2",
    "-o",
    "compression_type=zstd,cluster_size=4k",
    "-f",
    "raw",
    "s.raw",
    "zstd.qcow2",
  ]);
  await sh("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    "extended_l2=on,cluster_size=16k",
    "ext.qcow2",
    "1M",
  ]);
  await sh("qemu-io", ["-f", "qcow2", "-c", "write -P 1 1k 2k", "-c", "write -z 40k 2k", "ext.qcow2"]);
  await sh("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "snap.qcow2", "1M"]);
  await sh("qemu-io", ["-f", "qcow2", "-c", "write -P 2 0 16k", "snap.qcow2"]);
  await sh("qemu-img", ["snapshot", "-c", "s1", "snap.qcow2"]);
  await sh("qemu-img", ["bitmap", "--add", "snap.qcow2", "b1"]);
  await sh("qemu-io", ["-f", "qcow2", "-c", "write -P 3 8k 16k", "snap.qcow2"]);
  for (const n of ["zstd", "ext", "snap"])
    seeds.push({ name: n, data: readFileSync(dir.join(`${n}.qcow2`)) });
}, 60_000);

const INTERESTING = [0, 1, 0x1ff, 0x200, 0xfff, 0x1000, 0xffff, 0x10000, 0x7fffffff, 0x80000000, 0xffffffff];

/** Offsets of interesting regions of an image: header, L1, reftable, first refblock and L2, snapshot table. */
function regions(img: Uint8Array): [number, number][] {
  const out: [number, number][] = [[0, Math.min(img.length, 512)]];
  try {
    const h = parseHeader(img.subarray(0, Math.min(img.length, 2 ** 21)), img.length);
    const cs = 2 ** h.clusterBits;
    const v = new DataView(img.buffer, img.byteOffset, img.length);
    out.push([h.l1TableOffset, h.l1Size * 8]);
    out.push([h.refcountTableOffset, 64]);
    if (h.refcountTableOffset + 8 <= img.length)
      out.push([Number(v.getBigUint64(h.refcountTableOffset) & 0xfffffffffe00n), 256]);
    if (h.l1TableOffset + 8 <= img.length)
      out.push([Number(v.getBigUint64(h.l1TableOffset) & 0xfffffffffe00n), cs]);
    if (h.snapshotsOffset !== 0) out.push([h.snapshotsOffset, 128]);
    if (h.bitmaps !== undefined) out.push([h.bitmaps.directoryOffset, h.bitmaps.directorySize]);
  } catch {
    // a seed always parses; mutated copies are not parsed here
  }
  return out.filter(([o, n]) => n > 0 && o + n <= img.length);
}

function mutate(src: Uint8Array, r: () => number): Uint8Array {
  let img = src.slice();
  const pick = <T>(a: readonly T[]): T => a[Math.floor(r() * a.length)] as T;
  const regs = regions(src);
  const n = 1 + Math.floor(r() * 4);
  for (let i = 0; i < n; i++) {
    const [start, len] = pick(regs);
    const at = start + Math.floor((r() * len) / 4) * 4;
    const v = new DataView(img.buffer);
    const what = r();
    if (what < 0.35 && at < img.length) {
      img[at] = Math.floor(r() * 256);
    } else if (what < 0.7 && at + 4 <= img.length) {
      v.setUint32(at, pick(INTERESTING));
    } else if (what < 0.85 && at + 8 <= img.length) {
      // a whole u64: an offset somewhere in the file, misaligned, or huge
      const choice = r();
      const val =
        choice < 0.4
          ? BigInt(Math.floor(r() * img.length))
          : choice < 0.7
            ? BigInt(Math.floor(r() * img.length) & ~0x1ff) |
              (r() < 0.5 ? 1n << 63n : 0n) |
              (r() < 0.3 ? 1n << 62n : 0n)
            : BigInt.asUintN(64, BigInt(Math.floor(r() * 2 ** 32)) << BigInt(Math.floor(r() * 33)));
      v.setBigUint64(at, val);
    } else if (what < 0.93) {
      // header fields by name
      const field = pick([4, 20, 28, 36, 44, 52, 56, 60, 68, 76, 84, 92, 100, 104, 116]);
      if (field + 4 <= img.length) v.setUint32(field, pick(INTERESTING));
    } else {
      img = img.slice(0, Math.floor(r() * img.length));
    }
  }
  return img;
}

async function exercise(img: Uint8Array): Promise<string> {
  const graph = new BlockGraph();
  const file = await graph.open(memoryDriver, { size: img.length, data: img }, { owned: false });
  const backing = await graph.open(memoryDriver, { size: 1 << 20 }, { owned: false, readOnly: true });
  let node: Awaited<ReturnType<typeof graph.open>>;
  try {
    node = await graph.open(qcow2Driver, {}, { readOnly: true, children: { file, backing } });
  } catch (e) {
    if (!isBlkError(e)) throw e;
    return `open:${e.code}`;
  }
  const outcomes: string[] = ["open"];
  const step = async (name: string, fn: () => Promise<unknown>) => {
    try {
      await fn();
      outcomes.push(name);
    } catch (e) {
      if (!isBlkError(e)) throw e;
      outcomes.push(`${name}:${e.code}`);
    }
  };
  const len = node.length;
  await step("read", async () => {
    for (let off = 0; off < Math.min(len, 2 << 20); off += 256 << 10)
      await node.read(off, Math.min(256 << 10, len - off));
    if (len > 4096) await node.read(len - 4096, 4096);
  });
  await step("map", () => node.blockStatusAbove(0, Math.min(len, 64 << 20)));
  await step("check", () => (node.state as Qcow2State).check());
  await step("info", () => node.info());
  await graph.delete(node);
  return outcomes.join(",");
}

/** Hand-made worst cases: maximal tables, tables aliasing the header or each other. */
function targeted(): [string, Uint8Array][] {
  const base = seeds[0]?.data ?? new Uint8Array(0);
  const CS = 65536;
  const set32 = (img: Uint8Array, at: number, v: number) => new DataView(img.buffer).setUint32(at, v);
  const out: [string, Uint8Array][] = [];
  let img = base.slice();
  set32(img, 36, 0x400000); // 4 Mi L1 entries ...
  set32(img, 44, 0); // ... read from the header cluster on
  out.push(["max L1 over the header", img]);
  img = base.slice();
  set32(img, 36, 8192);
  for (let i = 0; i < 8192; i++) {
    set32(img, 3 * CS + i * 8, 0x80000000);
    set32(img, 3 * CS + i * 8 + 4, 4 * CS); // every L1 entry names the same L2 table
  }
  out.push(["8192 L1 entries sharing one L2 table", img]);
  img = base.slice();
  set32(img, 56, 128); // the largest reftable QEMU accepts, from offset 0
  set32(img, 52, 0);
  out.push(["max reftable over the header", img]);
  img = base.slice();
  set32(img, 60, 65536); // the most snapshots QEMU accepts, table over the data
  set32(img, 68, 5 * CS);
  out.push(["65536 snapshots over data", img]);
  img = base.slice();
  set32(img, 3 * CS + 4, 0xfffffe00); // L2 table far past the end of the file
  set32(img, 3 * CS, 0x00ffffff);
  out.push(["L2 table at 2^56", img]);
  return out;
}

describe("qcow2 hostile images", () => {
  it("hand-made worst cases finish quickly with a BlkError or a result", async () => {
    for (const [name, img] of targeted()) {
      const t0 = Date.now();
      const outcome = await exercise(img);
      if (process.env.BLK_FUZZ_VERBOSE !== undefined) console.log(name, outcome, Date.now() - t0);
      expect(Date.now() - t0, `${name}: ${outcome}`).toBeLessThan(10_000);
    }
  }, 60_000);

  it(`${RUNS} mutated images give BlkErrors or results, never crashes or hangs`, async () => {
    const r = rng(SEED);
    const stats = new Map<string, number>();
    const t0 = Date.now();
    for (let i = 0; i < RUNS; i++) {
      const seed = seeds[i % seeds.length];
      if (seed === undefined) continue;
      const img = mutate(seed.data, r);
      const start = Date.now();
      let outcome: string;
      try {
        outcome = await exercise(img);
      } catch (e) {
        throw new Error(`run ${i} (seed ${seed.name}, BLK_FUZZ_SEED=${SEED}): non-BlkError ${String(e)}`, {
          cause: e,
        });
      }
      const took = Date.now() - start;
      expect(took, `run ${i} (${seed.name}) took ${took} ms`).toBeLessThan(5000);
      const key = outcome.replace(/:.*?(,|$)/g, ":E$1");
      stats.set(key, (stats.get(key) ?? 0) + 1);
    }
    if (process.env.BLK_FUZZ_VERBOSE !== undefined) console.log([...stats].sort((a, b) => b[1] - a[1]));
    // Both refusals and successful opens must occur (the mutations are neither all fatal nor all harmless).
    expect([...stats.keys()].some((k) => k.startsWith("open:"))).toBe(true);
    expect([...stats.keys()].some((k) => k.startsWith("open,"))).toBe(true);
    expect(Date.now() - t0).toBeLessThan(60_000);
  }, 120_000);
});
