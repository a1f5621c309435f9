/**
 * Interop matrix: images written by qemu-img / qemu-io 7.2 are read by blk byte-identically to
 * `qemu-img convert -O raw`, block status agrees with `qemu-img map --output=json`, `check` numbers equal
 * `qemu-img check --output=json`, and `info` agrees with `qemu-img info --output=json`.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { commandRunner, makeTempDir, missingPeers, pattern, qemuTools, run, sha256 } from "@blk/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { openQcow2, type Qcow2CheckResult, qcow2ImageInfo } from "../src/qcow2/index.ts";
import { blkMap, type MapEntry, sha256Of } from "./fixtures/qcow2/helpers.ts";

const missing = missingPeers(["qemu-img", "qemu-io"]);
if (missing.length > 0) console.warn(`skipping qcow2 interop: missing ${missing.join(", ")}`);

const dir = makeTempDir("blk-q2");
afterAll(() => dir.dispose());

const runIn = commandRunner(dir.path);
const sh = async (cmd: string, args: string[]): Promise<string> => (await runIn(cmd, args)).out;
const { img, io } = qemuTools(sh);

/** A raw source with random, compressible and zero regions (for compressed images). */
function mixedRaw(name: string, size: number): string {
  const buf = new Uint8Array(size);
  buf.set(pattern(7, 0, 300_000), 0);
  const text = Buffer.from("hello qcow2 compressed world\n".repeat(20_000));
  buf.set(text.subarray(0, Math.min(text.length, size - 400_000)), 400_000);
  buf.set(pattern(9, 0, 70_000), size - 70_000);
  writeFileSync(dir.join(name), buf);
  return name;
}

/** The image builders: name → commands producing it (run in the temp dir). */
const images: Record<string, () => Promise<void>> = {
  "v3-64k": async () => {
    await img("create", "-q", "-f", "qcow2", "v3-64k.qcow2", "32M");
    await io(
      "v3-64k.qcow2",
      "write -P 0x11 0 192k",
      "write -P 0x22 1M 64k",
      "write -P 0x33 5000k 3k",
      "write -z 1M 64k",
      "write -P 0x44 4M 128k",
      "discard 4M 64k",
      "write -P 0x55 31M 1M",
    );
  },
  "zero-alloc": async () => {
    await img("create", "-q", "-f", "qcow2", "zero-alloc.qcow2", "8M");
    await io("zero-alloc.qcow2", "write -P 0x66 0 256k", "write -z 64k 64k", "write -z -u 128k 64k");
  },
  "v2-compat010": async () => {
    await img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2-compat010.qcow2", "16M");
    await io("v2-compat010.qcow2", "write -P 0x12 0 100k", "write -P 0x13 8M 64k", "write -z 9M 64k");
  },
  "c512-r1": async () => {
    await img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=1", "c512-r1.qcow2", "4M");
    await io(
      "c512-r1.qcow2",
      "write -P 0x21 0 10k",
      "write -P 0x22 1M 7k",
      "write -z 2M 4k",
      "write -P 9 4095k 1k",
    );
  },
  "c4k-r64": async () => {
    await img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,refcount_bits=64", "c4k-r64.qcow2", "8M");
    await io("c4k-r64.qcow2", "write -P 0x31 3k 20k", "write -P 0x32 7M 100k", "discard 7M 8k");
  },
  "c2m-r16": async () => {
    await img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "c2m-r16.qcow2", "16M");
    await io("c2m-r16.qcow2", "write -P 0x41 1M 2M", "write -P 0x42 9M 4k", "write -z 12M 2M");
  },
  chain3: async () => {
    await img("create", "-q", "-f", "qcow2", "chain-base.qcow2", "16M");
    await io("chain-base.qcow2", "write -P 0x51 0 1M", "write -P 0x52 4M 64k");
    await img("create", "-q", "-f", "qcow2", "-b", "chain-base.qcow2", "-F", "qcow2", "chain-mid.qcow2");
    await io("chain-mid.qcow2", "write -P 0x53 64k 64k", "write -z 4M 64k", "write -P 0x54 6M 8k");
    // top is larger than its backing file: the tail reads as zeroes
    await img("create", "-q", "-f", "qcow2", "-b", "chain-mid.qcow2", "-F", "qcow2", "chain3.qcow2", "20M");
    await io(
      "chain3.qcow2",
      "write -P 0x55 128k 4k",
      "write -z 0 64k",
      "discard 6M 64k",
      "write -P 0x56 18M 64k",
    );
  },
  "raw-backing": async () => {
    writeFileSync(dir.join("rb.raw"), pattern(3, 0, 3 << 20));
    await img("create", "-q", "-f", "qcow2", "-b", "rb.raw", "-F", "raw", "raw-backing.qcow2", "4M");
    await io("raw-backing.qcow2", "write -P 0x61 1M 64k");
  },
  "comp-zlib": async () => {
    const src = mixedRaw("cz.raw", 4 << 20);
    await img("convert", "-c", "-O", "qcow2", "-f", "raw", src, "comp-zlib.qcow2");
  },
  "comp-zstd": async () => {
    const src = mixedRaw("cs.raw", 4 << 20);
    await img(
      "convert",
      "-c",
      "-O",
      "qcow2",
      "-o",
      "compression_type=zstd",
      "-f",
      "raw",
      src,
      "comp-zstd.qcow2",
    );
  },
  "comp-4k": async () => {
    const src = mixedRaw("c4.raw", 2 << 20);
    await img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k", "-f", "raw", src, "comp-4k.qcow2");
  },
  "ext-l2": async () => {
    await img("create", "-q", "-f", "qcow2", "ext-base.qcow2", "8M");
    await io("ext-base.qcow2", "write -P 0x71 0 8M");
    await img(
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      "extended_l2=on",
      "-b",
      "ext-base.qcow2",
      "-F",
      "qcow2",
      "ext-l2.qcow2",
    );
    await io(
      "ext-l2.qcow2",
      "write -P 0x72 2k 2k",
      "write -P 0x73 64k 8k",
      "write -z 130k 4k",
      "write -z 1M 128k",
    );
  },
  "ext-l2-nobacking": async () => {
    await img(
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      "extended_l2=on,cluster_size=128k",
      "ext-l2-nobacking.qcow2",
      "8M",
    );
    await io("ext-l2-nobacking.qcow2", "write -P 0x74 4k 4k", "write -P 0x75 12k 4k", "write -z 300k 8k");
  },
  snapshot: async () => {
    await img("create", "-q", "-f", "qcow2", "snapshot.qcow2", "8M");
    await io("snapshot.qcow2", "write -P 0x81 0 256k");
    await img("snapshot", "-c", "s1", "snapshot.qcow2");
    await io("snapshot.qcow2", "write -P 0x82 64k 64k", "write -P 0x83 1M 64k");
    await img("snapshot", "-c", "s2", "snapshot.qcow2");
    await io("snapshot.qcow2", "write -P 0x84 0 4k");
  },
  bitmap: async () => {
    await img("create", "-q", "-f", "qcow2", "bitmap.qcow2", "8M");
    await img("bitmap", "--add", "bitmap.qcow2", "b1");
    await img("bitmap", "--add", "-g", "128k", "--disable", "bitmap.qcow2", "b2");
    await io("bitmap.qcow2", "write -P 0x91 0 64k", "write -P 0x92 3M 64k");
  },
  "bitmap-stale": async () => {
    const b = readFileSync(dir.join("bitmap.qcow2"));
    b.writeUInt32BE(0, 92); // autoclear_features low half: bit 0 (bitmaps) cleared
    writeFileSync(dir.join("bitmap-stale.qcow2"), b);
  },
  "lazy-dirty": async () => {
    await img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "lazy-dirty.qcow2", "8M");
    // qemu-io exits on `abort`: the dirty bit stays set and refcounts are stale
    await run("qemu-io", ["-f", "qcow2", "-c", "write -P 0xa1 0 64k", "-c", "abort", "lazy-dirty.qcow2"], {
      cwd: dir.path,
      timeoutMs: 30_000,
    });
  },
  "prealloc-meta": async () => {
    await img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "prealloc-meta.qcow2", "4M");
    await io("prealloc-meta.qcow2", "write -P 0xb1 64k 64k");
  },
  "data-file": async () => {
    await img("create", "-q", "-f", "qcow2", "-o", "data_file=data-file.raw", "data-file.qcow2", "4M");
    await io("data-file.qcow2", "write -P 0xd1 0 64k", "write -P 0xd2 1M 100k", "write -z 2M 64k");
  },
  "data-file-raw": async () => {
    await img(
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      "data_file=data-file-raw.raw,data_file_raw=on",
      "data-file-raw.qcow2",
      "4M",
    );
    await io("data-file-raw.qcow2", "write -P 0xd3 64k 64k");
  },
  "v2-chain-snapshot": async () => {
    await img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2-base.qcow2", "8M");
    await io("v2-base.qcow2", "write -P 0xe1 0 1M");
    await img(
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      "compat=0.10",
      "-b",
      "v2-base.qcow2",
      "-F",
      "qcow2",
      "v2-chain-snapshot.qcow2",
    );
    await io("v2-chain-snapshot.qcow2", "write -P 0xe2 64k 64k");
    await img("snapshot", "-c", "before", "v2-chain-snapshot.qcow2");
    await io("v2-chain-snapshot.qcow2", "write -P 0xe3 64k 4k", "write -z 512k 64k");
  },
  "comp-over-backing": async () => {
    await img("create", "-q", "-f", "qcow2", "cob-base.qcow2", "4M");
    await io("cob-base.qcow2", "write -P 0xf1 0 4M");
    await img("create", "-q", "-f", "qcow2", "-b", "cob-base.qcow2", "-F", "qcow2", "cob-src.qcow2");
    await io("cob-src.qcow2", "write -P 0xf2 1M 192k");
    await img(
      "convert",
      "-c",
      "-O",
      "qcow2",
      "-B",
      "cob-base.qcow2",
      "-F",
      "qcow2",
      "cob-src.qcow2",
      "comp-over-backing.qcow2",
    );
  },
  "zstd-ext-l2": async () => {
    const src = mixedRaw("zx.raw", 2 << 20);
    await img(
      "convert",
      "-c",
      "-O",
      "qcow2",
      "-o",
      "compression_type=zstd,extended_l2=on",
      "-f",
      "raw",
      src,
      "zstd-ext-l2.qcow2",
    );
    await io("zstd-ext-l2.qcow2", "write -P 0xf3 4k 4k", "write -z 1M 8k");
  },
  ...Object.fromEntries(
    [2, 4, 8, 32].map((bits) => [
      `refcount-${bits}`,
      async () => {
        const f = `refcount-${bits}.qcow2`;
        await img("create", "-q", "-f", "qcow2", "-o", `refcount_bits=${bits},cluster_size=16k`, f, "4M");
        await io(f, "write -P 0x42 0 100k", "write -P 0x43 3M 20k", "discard 16k 16k");
        await img("snapshot", "-c", "s", f);
        await io(f, "write -P 0x44 0 8k");
      },
    ]),
  ),
  "leak-and-corrupt": async () => {
    await img("create", "-q", "-f", "qcow2", "leak-and-corrupt.qcow2", "4M");
    await io("leak-and-corrupt.qcow2", "write -P 0xc1 0 64k");
    // refblock at 0x20000: cluster 5 (data) refcount 2 (COPIED now wrong), cluster 6 refcount 1 (leak)
    const p = dir.join("leak-and-corrupt.qcow2");
    const b = readFileSync(p);
    b.writeUInt16BE(2, 0x20000 + 5 * 2);
    b.writeUInt16BE(1, 0x20000 + 6 * 2);
    b.writeUInt16BE(1, 0x20000 + 7 * 2);
    writeFileSync(p, b);
  },
};

const names = Object.keys(images);

/** Removes `offset` from ranges that are not present (extended-L2 unallocated subclusters), re-merging. */
function dropUnallocatedOffsets(map: MapEntry[]): MapEntry[] {
  const out: MapEntry[] = [];
  for (const e of map) {
    const m = { ...e };
    if (!m.present) delete m.offset;
    const last = out.at(-1);
    if (
      last !== undefined &&
      !m.present &&
      !last.present &&
      last.offset === undefined &&
      last.depth === m.depth &&
      last.zero === m.zero &&
      last.data === m.data
    ) {
      last.length += m.length;
    } else {
      out.push(m);
    }
  }
  return out;
}

interface Expected {
  sha: string;
  size: number;
  map: MapEntry[];
  check: Record<string, number | string>;
  info: Record<string, unknown>;
}
const expected = new Map<string, Expected>();

describe.skipIf(missing.length > 0)("qcow2 interop with qemu-img 7.2", { tags: ["qemu"] }, () => {
  beforeAll(async () => {
    for (const name of names) {
      const build = images[name];
      if (build === undefined) continue;
      await build();
      const file = `${name}.qcow2`;
      await img("convert", "-U", "-O", "raw", file, `${name}.out.raw`);
      const raw = readFileSync(dir.join(`${name}.out.raw`));
      const info = JSON.parse(await img("info", "-U", "--output=json", file)) as Record<string, unknown>;
      const map = JSON.parse(await img("map", "-U", "--output=json", file)) as MapEntry[];
      const c = await run("qemu-img", ["check", "-U", "--output=json", file], {
        cwd: dir.path,
        timeoutMs: 60_000,
      });
      const check = JSON.parse(c.stdout) as Record<string, number | string>;
      expected.set(name, { sha: sha256(raw), size: raw.length, map, check, info });
    }
  }, 180_000);

  for (const name of names) {
    it(`${name}: content, map, check and info match qemu-img`, async () => {
      const exp = expected.get(name);
      if (exp === undefined) throw new Error("fixture missing");
      const file = dir.join(`${name}.qcow2`);
      await using q = await openQcow2(file, { forceShare: true });
      expect(q.node.length).toBe(exp.size);
      // Map before reading: on ext4, SEEK_DATA reports cached pages of unwritten extents (QEMU's zeroed
      // COW areas) as data, so reading first would change what a preallocated image's map says.
      const map = await blkMap(q.node);
      // core's blockStatusAbove drops the host offset of unallocated ranges at the bottom of a chain.
      expect(map).toEqual(dropUnallocatedOffsets(exp.map));
      expect(await sha256Of(q.root, q.node.length)).toBe(exp.sha);
      const r = (await q.node.check()) as Qcow2CheckResult;
      const c = exp.check;
      expect({
        "check-errors": r.checkErrors,
        corruptions: r.corruptions,
        leaks: r.leaks,
        "image-end-offset": r.imageEndOffset,
        "total-clusters": r.totalClusters,
        "allocated-clusters": r.allocatedClusters,
        "fragmented-clusters": r.fragmentedClusters,
        "compressed-clusters": r.compressedClusters,
      }).toEqual({
        "check-errors": c["check-errors"] ?? 0,
        corruptions: c.corruptions ?? 0,
        leaks: c.leaks ?? 0,
        "image-end-offset": c["image-end-offset"],
        "total-clusters": c["total-clusters"],
        "allocated-clusters": c["allocated-clusters"] ?? 0,
        "fragmented-clusters": c["fragmented-clusters"] ?? 0,
        "compressed-clusters": c["compressed-clusters"] ?? 0,
      });
      const info = qcow2ImageInfo(q.state, `${name}.qcow2`);
      const want = { ...exp.info };
      delete want["actual-size"];
      want.filename = `${name}.qcow2`;
      expect(info).toEqual(want);
    });
  }

  it("reads persistent bitmap data as QEMU stored it", async () => {
    await using q = await openQcow2(dir.join("bitmap.qcow2"));
    expect(q.state.bitmaps.map((b) => b.name)).toEqual(["b1", "b2"]);
    const b1 = await q.state.readBitmap("b1");
    expect(b1.granularity).toBe(65536);
    expect(b1.bits).toBe(128);
    const set: number[] = [];
    for (let k = 0; k < b1.bits; k++) if (((b1.data[k >> 3] ?? 0) >> (k & 7)) & 1) set.push(k);
    expect(set).toEqual([0, 48]); // writes at 0 and 3 MiB (64 KiB granularity)
    const b2 = await q.state.readBitmap("b2"); // disabled: tracked nothing
    expect(b2.granularity).toBe(131072);
    expect(b2.data.every((x) => x === 0)).toBe(true);
    await expect(q.state.readBitmap("nope")).rejects.toMatchObject({ code: "ENOENT" });
  });

  it("ignores bitmaps whose autoclear bit is clear, with QEMU's warning", async () => {
    const r = await run("qemu-img", ["info", "-U", "bitmap-stale.qcow2"], { cwd: dir.path });
    expect(r.stderr).toContain("a program lacking bitmap support modified this file");
    await using q = await openQcow2(dir.join("bitmap-stale.qcow2"));
    expect(q.state.bitmaps).toEqual([]);
    expect(q.state.formatSpecific().bitmaps).toBeUndefined();
    expect(q.state.warnings[0]).toBe(
      "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent",
    );
    expect(r.stderr).toContain(q.state.warnings[1]);
  });

  it("exposes the snapshot table and reads snapshots as qemu-img convert -l does", async () => {
    await using q = await openQcow2(dir.join("snapshot.qcow2"));
    expect(q.state.snapshots.map((s) => [s.id, s.name, s.diskSize, s.icount])).toEqual([
      ["1", "s1", 8 << 20, 0],
      ["2", "s2", 8 << 20, 0],
    ]);
    for (const [sel, want] of [
      ["s1", "snapshot.name=s1"],
      ["2", "snapshot.id=2"],
    ] as const) {
      await img("convert", "-U", "-l", want, "-O", "raw", "snapshot.qcow2", `snap-${sel}.raw`);
      const expected = sha256(readFileSync(dir.join(`snap-${sel}.raw`)));
      await using s = await openQcow2(dir.join("snapshot.qcow2"), { qcow2: { "x-blk-snapshot": sel } });
      expect(s.state.snapshot?.id).toBe(sel === "s1" ? "1" : "2");
      expect(await sha256Of(s.root, s.node.length)).toBe(expected);
    }
    await expect(
      openQcow2(dir.join("snapshot.qcow2"), { qcow2: { "x-blk-snapshot": "nope" } }),
    ).rejects.toMatchObject({ code: "ENOENT", message: "Can't find snapshot" });
  });

  it("refuses a backing loop", async () => {
    await img("create", "-q", "-f", "qcow2", "loop-a.qcow2", "1M");
    await img("create", "-q", "-f", "qcow2", "-b", "loop-a.qcow2", "-F", "qcow2", "loop-b.qcow2");
    await img("rebase", "-u", "-b", "loop-b.qcow2", "-F", "qcow2", "loop-a.qcow2");
    await expect(openQcow2(dir.join("loop-b.qcow2"))).rejects.toMatchObject({
      code: "EINVAL",
      message: `Backing file '${dir.join("loop-b.qcow2")}' creates an infinite loop.`,
    });
  });

  it("resolves relative backing names against the overlay's directory", async () => {
    await sh("mkdir", ["-p", "sub"]);
    await img("create", "-q", "-f", "qcow2", "-b", "../chain-base.qcow2", "-F", "qcow2", "sub/rel.qcow2");
    await using q = await openQcow2(dir.join("sub/rel.qcow2"));
    expect(q.chain.length).toBe(2);
    const base = await openQcow2(dir.join("chain-base.qcow2"));
    expect(await sha256Of(q.root, q.node.length)).toBe(await sha256Of(base.root, base.node.length));
    await base.close();
    const info = qcow2ImageInfo(q.state, "sub/rel.qcow2");
    expect(info["full-backing-filename"]).toBe("sub/../chain-base.qcow2");
  });
});
