// The pure part of qcow2 persistent bitmaps (src/qcow2/bitmaps.ts): directory and table bytes, the data
// layout QEMU uses (qcow2.md §12.3, observed bytes), the "all ones" table entry, QEMU's limits and messages.
import { HBitmap } from "@blk/hbitmap";
import { describe, expect, it } from "vitest";
import {
  bitmapConstraintError,
  bitmapDataClusters,
  bitmapDirEntrySize,
  bitmapTableEntries,
  checkCanStoreBitmap,
  decodeBitmapTable,
  encodeBitmapDirectory,
  encodeBitmapsExtension,
  encodeBitmapTable,
  readBitmapData,
} from "../src/qcow2/bitmaps.ts";
import { parseBitmapDirectory, type Qcow2Bitmap } from "../src/qcow2/format.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const CS = 64 * KiB;

const entry = (name: string, tableOffset: number, flags = 2, granularityBits = 16): Qcow2Bitmap => ({
  name,
  tableOffset,
  tableSize: 1,
  flags,
  type: 1,
  granularityBits,
  extraDataSize: 0,
});

describe("qcow2 bitmap directory and table", () => {
  it("encodes the directory entry QEMU writes (qcow2.md §12.3) and parses it back", () => {
    const dir = encodeBitmapDirectory([entry("b1", 0x1b0000)]);
    expect(Buffer.from(dir).toString("hex")).toBe(
      "00000000001b0000" +
        "00000001" +
        "00000002" +
        "01" +
        "10" +
        "0002" +
        "00000000" +
        "6231" +
        "000000000000",
    );
    const list = [
      entry("b1", 0x1b0000),
      entry("ünïcode-name", 0x20000, 1, 9),
      entry("x".repeat(1023), CS, 0, 31),
    ];
    const bytes = encodeBitmapDirectory(list);
    expect(bytes.length).toBe(list.reduce((n, b) => n + bitmapDirEntrySize(b.name), 0));
    expect(bitmapDirEntrySize("ünïcode-name")).toBe(40); // 24 + 14 UTF-8 bytes, padded to 8
    expect(parseBitmapDirectory(bytes, 3, CS, 64 * MiB)).toEqual(list);
  });

  it("encodes the extension and the table; decodes the all-ones entry and refuses reserved bits", () => {
    expect(Buffer.from(encodeBitmapsExtension(2, 56, 0x30000)).toString("hex")).toBe(
      "00000002" + "00000000" + "0000000000000038" + "0000000000030000",
    );
    const t = encodeBitmapTable([0x1a0000, 0, 2 ** 40]);
    expect(decodeBitmapTable(t, CS)).toEqual([
      { offset: 0x1a0000, allOnes: false },
      { offset: 0, allOnes: false },
      { offset: 2 ** 40, allOnes: false },
    ]);
    const ones = new Uint8Array(8);
    ones[7] = 1;
    expect(decodeBitmapTable(ones, CS)).toEqual([{ offset: 0, allOnes: true }]);
    for (const bad of ["0000000000010001", "0100000000000000", "0000000000000002", "0000000000000200"]) {
      expect(() => decodeBitmapTable(Buffer.from(bad, "hex"), CS), bad).toThrow("Invalid bitmap table entry");
    }
  });

  it("lays the bits out as QEMU does: LSB first, only the clusters with a dirty bit", () => {
    // qcow2.md §12.3: 64 MiB, 64 KiB granularity, writes at 0-64 KiB and 10-11 MiB
    const hb = new HBitmap(64 * MiB, 16);
    hb.set(0, 64 * KiB);
    hb.set(10 * MiB, MiB);
    const pieces = [...bitmapDataClusters(hb, CS)];
    expect(pieces.map((p) => p.index)).toEqual([0]);
    const data = pieces[0]?.data ?? new Uint8Array();
    expect(data.length).toBe(CS);
    expect([data[0], data[1], data[19], data[20], data[21], data[22]]).toEqual([1, 0, 0, 0xff, 0xff, 0]);
    expect(data.subarray(23).every((b) => b === 0)).toBe(true);

    // several data clusters (512-byte clusters: 4096 bits each); an empty bitmap stores none
    const g = 512;
    const size = 20 * 4096 * g + 3 * g;
    const big = new HBitmap(size, 9);
    big.set(5 * 4096 * g + 7 * g, g);
    big.set(size - g, g);
    expect(bitmapTableEntries(size, g, 512)).toBe(21);
    expect([...bitmapDataClusters(big, 512)].map((p) => p.index)).toEqual([5, 20]);
    expect([...bitmapDataClusters(new HBitmap(size, 9), 512)]).toEqual([]);
  });

  it("reads data clusters, zero entries and all-ones entries back into the same bits", async () => {
    const g = 512;
    const size = 3 * 4096 * g + 100 * g + 17; // partial last granule and cluster
    const hb = new HBitmap(size, 9);
    hb.set(0, 1);
    hb.set(4096 * g - g, 3 * g);
    hb.set(size - 1, 1);
    const clusters = new Map<number, Uint8Array>();
    const table = Array.from({ length: bitmapTableEntries(size, g, 512) }, () => ({
      offset: 0,
      allOnes: false,
    }));
    for (const p of bitmapDataClusters(hb, 512)) {
      clusters.set((p.index + 1) * 512, p.data);
      (table[p.index] as { offset: number }).offset = (p.index + 1) * 512;
    }
    const read = (o: number): Promise<Uint8Array> => Promise.resolve(clusters.get(o) ?? new Uint8Array(512));
    const back = await readBitmapData({
      size,
      granularityBits: 9,
      clusterSize: 512,
      table,
      readCluster: read,
    });
    expect(back.count()).toBe(hb.count());
    expect(back.sha256()).toBe(hb.sha256());

    // an all-ones entry for the (partial) last piece: every granule of it, none past the end
    const ones = table.map((e, i) =>
      i === table.length - 1 ? { offset: 0, allOnes: true } : { ...e, offset: 0 },
    );
    const full = await readBitmapData({
      size,
      granularityBits: 9,
      clusterSize: 512,
      table: ones,
      readCluster: read,
    });
    expect(full.count()).toBe((100 + 1) * g);
    await expect(
      readBitmapData({
        size,
        granularityBits: 9,
        clusterSize: 512,
        table: table.slice(1),
        readCluster: read,
      }),
    ).rejects.toThrow("Bitmap table size does not match the image size");
  });
});

describe("qcow2 bitmap limits (QEMU's messages)", () => {
  it("constraints", () => {
    expect(bitmapConstraintError("a", 2 ** 32, MiB, CS)).toBe(
      "Granularity exceeds maximum (2147483648 bytes)",
    );
    expect(bitmapConstraintError("a", 256, MiB, CS)).toBe("Granularity is under minimum (512 bytes)");
    expect(bitmapConstraintError("a", 512, 2 ** 53, CS)).toBe(
      "Too much space will be occupied by the bitmap. Use larger granularity",
    );
    expect(bitmapConstraintError("é".repeat(512), 512, MiB, CS)).toBe(
      "Name length exceeds maximum (1023 characters)",
    );
    expect(bitmapConstraintError("é".repeat(511), 512, MiB, CS)).toBeUndefined();
  });

  it("can-store checks: v2, count and directory size", () => {
    const base = { name: "n", granularity: 65536, nodeName: "disk", version: 3, size: MiB, clusterSize: CS };
    expect(() => checkCanStoreBitmap({ ...base, version: 2, existing: [] })).toThrow(
      "Can't make bitmap 'n' persistent in 'disk': Cannot store dirty bitmaps in qcow2 v2 files",
    );
    expect(() => checkCanStoreBitmap({ ...base, granularity: 128, existing: [] })).toThrow(
      "Can't make bitmap 'n' persistent in 'disk': Granularity is under minimum (512 bytes)",
    );
    const names = (n: number, len: number) =>
      Array.from({ length: n }, (_, i) => String(i).padStart(len, "x"));
    expect(() => checkCanStoreBitmap({ ...base, existing: names(65534, 6) })).not.toThrow();
    expect(() => checkCanStoreBitmap({ ...base, existing: names(65535, 6) })).toThrow(
      "Can't make bitmap 'n' persistent in 'disk': Maximum number of persistent bitmaps is already reached",
    );
    // 64100 entries of 1048 bytes (1023-byte names) exceed the 1024 * 65535-byte directory
    const long = "y".repeat(1023);
    function* many(n: number): Generator<string> {
      for (let i = 0; i < n; i++) yield long;
    }
    expect(() => checkCanStoreBitmap({ ...base, existing: many(64000) })).not.toThrow();
    expect(() => checkCanStoreBitmap({ ...base, existing: many(64100) })).toThrow(
      "Can't make bitmap 'n' persistent in 'disk': Not enough space in the bitmap directory",
    );
  });
});
