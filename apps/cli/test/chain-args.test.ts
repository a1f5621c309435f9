/**
 * commit, rebase, measure and amend without QEMU: argument errors with qemu-img's words and exit codes,
 * and the pure parts (qcow2 size formulas, sector comparison, header layout, refcount entries, emptying
 * and refcount-width rewrites checked with blk-img's own `check`).
 */

import { openImage } from "@blk/drivers";
import { parseHeader } from "@blk/drivers/qcow2";
import { makeTempDir } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import {
  changeRefcountOrder,
  emptyQcow2,
  getRefcount,
  readHeader,
  serializeHeader,
  setRefcount,
  unmapActiveTable,
} from "../src/amend-qcow2.ts";
import { amendHelp, parseAmendOptions } from "../src/commands/amend.ts";
import { rateLimiter } from "../src/commands/commit.ts";
import {
  measureQcow2,
  parseMeasureOptions,
  qcow2BitmapsSize,
  qcow2MeasureOptions,
  qcow2PreallocSize,
  refcountMetadataSize,
} from "../src/commands/measure.ts";
import { compareSectors } from "../src/commands/rebase.ts";
import { blk } from "./helpers.ts";

const dir = makeTempDir("blk-img-chain-args");
afterAll(() => dir.dispose());
let n = 0;
const path = (name: string): string => dir.join(`${n++}-${name}`);
const TRY = "Try 'blk-img --help' for more information\n";

async function expectError(argv: string[], stderr: string, code = 1): Promise<void> {
  expect(await blk(argv)).toEqual({ code, stdout: "", stderr });
}

describe("argument errors", () => {
  it("commit", async () => {
    await expectError(["commit"], `blk-img: Expecting one image file name\n${TRY}`);
    await expectError(["commit", "a", "b"], `blk-img: Expecting one image file name\n${TRY}`);
    await expectError(
      ["commit", "-r", "fast", "x"],
      "blk-img: Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for\n" +
        "blk-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n",
    );
    await expectError(["commit", "-t", "bogus", "x"], "blk-img: Invalid cache option: bogus\n");
    await expectError(
      ["commit", "--image-opts", "-f", "qcow2", "x"],
      "blk-img: --image-opts and --format are mutually exclusive\n",
    );
    await expectError(["commit", "-x", "x"], `blk-img: unrecognized option '-x'\n${TRY}`);
    const raw = path("r.raw");
    expect((await blk(["create", "-q", "-f", "raw", raw, "1M"])).code).toBe(0);
    await expectError(["commit", "-f", "raw", raw], "blk-img: Image does not have a backing file\n");
    const q = path("q.qcow2");
    expect((await blk(["create", "-q", "-f", "qcow2", q, "1M"])).code).toBe(0);
    await expectError(
      ["commit", "-b", "other.qcow2", q],
      `blk-img: Did not find 'other.qcow2' in the backing chain of '${q}'\n`,
    );
    expect((await blk(["commit", "-h"])).stdout).toMatch(/^usage: blk-img commit /);
  });

  it("rebase", async () => {
    await expectError(
      ["rebase", "x"],
      `blk-img: Must specify backing file (-b) or use unsafe mode (-u)\n${TRY}`,
    );
    await expectError(["rebase", "-b", "y"], `blk-img: Expecting one image file name\n${TRY}`);
    await expectError(["rebase", "-u", "a", "b"], `blk-img: Expecting one image file name\n${TRY}`);
    const q = path("q.qcow2");
    expect((await blk(["create", "-q", "-f", "qcow2", q, "1M"])).code).toBe(0);
    await expectError(
      ["rebase", "-u", "-b", "b.qcow2", "-F", "nosuch", q],
      "blk-img: Invalid format name: 'nosuch'\n",
    );
    await expectError(
      ["rebase", "-u", "-b", "b.qcow2", q],
      "blk-img: Could not change the backing file to 'b.qcow2': backing format must be specified\n",
    );
    await expectError(["rebase", "-b", "", "-T", "x", q], "blk-img: Invalid source cache option: x\n");
    expect(await blk(["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", q])).toEqual({
      code: 0,
      stdout: "",
      stderr: "",
    });
    const header = async (): Promise<{
      backingFile?: string | undefined;
      backingFormat?: string | undefined;
    }> => {
      await using f = await openImage(q, { format: "file", readOnly: true });
      return (await readHeader(f.root)).header;
    };
    expect(await header()).toMatchObject({ backingFile: "b.qcow2", backingFormat: "qcow2" });
    expect(await blk(["rebase", "-u", "-b", "", q])).toEqual({ code: 0, stdout: "", stderr: "" });
    expect(await header()).toMatchObject({ backingFile: undefined, backingFormat: undefined });
  });

  it("measure", async () => {
    await expectError(["measure"], "blk-img: Either --size N or one filename must be specified.\n");
    await expectError(
      ["measure", "-f", "raw"],
      "blk-img: --image-opts, -f, and -l require a filename argument.\n",
    );
    await expectError(["measure", "a", "b"], "blk-img: At most one filename argument is allowed.\n");
    await expectError(
      ["measure", "--size", "1", "a"],
      "blk-img: --size N cannot be used together with a filename.\n",
    );
    await expectError(["measure", "--size", "1", "-O", "bogus"], "blk-img: Unknown file format 'bogus'\n");
    await expectError(
      ["measure", "--size", "1", "-O", "qcow2", "-o", "foo=1"],
      "blk-img: Invalid parameter 'foo'\nblk-img: Invalid options for file format 'qcow2'\n",
    );
    expect(await blk(["measure", "--size", "1000"])).toEqual({
      code: 0,
      stdout: "required size: 1024\nfully allocated size: 1024\n",
      stderr: "",
    });
    expect(
      JSON.parse((await blk(["measure", "--output=json", "-O", "qcow2", "--size", "1G"])).stdout),
    ).toEqual({
      required: 393216,
      "fully-allocated": 1074135040,
    });
  });

  it("amend", async () => {
    await expectError(["amend", "x"], `blk-img: Must specify options (-o)\n${TRY}`);
    await expectError(["amend", "-o", "compat=1.1"], "blk-img: Expecting one image file name\n");
    await expectError(
      ["amend", "-f", "raw", "-o", "help"],
      "blk-img: Format driver 'raw' does not support option amendment\n",
    );
    expect((await blk(["amend", "-f", "qcow2", "-o", "help"])).stdout).toBe(amendHelp("qcow2"));
    const raw = path("r.raw");
    expect((await blk(["create", "-q", "-f", "raw", raw, "1M"])).code).toBe(0);
    await expectError(
      ["amend", "-f", "raw", "-o", "size=2M", raw],
      "blk-img: Format driver 'raw' does not support option amendment\n",
    );
    expect(() => parseAmendOptions([["cluster_size", "4k"]])).toThrow("Invalid parameter 'cluster_size'");
    expect(() => parseAmendOptions([["lazy_refcounts", "maybe"]])).toThrow("expects 'on' or 'off'");
    expect(
      parseAmendOptions([
        ["size", "1M"],
        ["lazy_refcounts", "on"],
      ]),
    ).toEqual(
      new Map<string, unknown>([
        ["size", 1 << 20],
        ["lazy_refcounts", true],
      ]),
    );
  });
});

describe("measure formulas", () => {
  it("qcow2 metadata of a fully allocated image, as qemu-img measure reports it", () => {
    expect(qcow2PreallocSize(1 << 30, 65536, 4, false)).toBe(1074135040);
    expect(qcow2PreallocSize(64 << 20, 512, 4, false)).toBe(68446720);
    expect(qcow2PreallocSize(64 << 20, 65536, 4, false)).toBe(67436544);
    expect(refcountMetadataSize(1, 65536, 4)).toBe(2 * 65536);
    expect(refcountMetadataSize(40_000, 512, 0)).toBe(10 * 512 + 512);
  });

  it("options and sources", async () => {
    const o = qcow2MeasureOptions(
      parseMeasureOptions("qcow2", [
        ["size", "64M"],
        ["cluster_size", "512"],
      ]),
    );
    expect(await measureQcow2(o, undefined)).toEqual({ required: 1337856, "fully-allocated": 68446720 });
    const full = qcow2MeasureOptions(
      parseMeasureOptions("qcow2", [
        ["size", "64M"],
        ["preallocation", "full"],
      ]),
    );
    expect(await measureQcow2(full, undefined)).toEqual({ required: 67436544, "fully-allocated": 67436544 });
    const src = { length: 64 << 20, dataClusters: async () => 3 * 65536, bitmaps: [] };
    const d = qcow2MeasureOptions(new Map());
    expect(await measureQcow2(d, src)).toEqual({
      required: 327680 + 3 * 65536,
      "fully-allocated": 67436544,
      bitmaps: 0,
    });
    expect(() => qcow2MeasureOptions(new Map([["cluster_size", "1000"]]))).toThrow(
      "Cluster size must be a power of two between 512 and 2048k",
    );
    expect(qcow2BitmapsSize([{ name: "b", granularity: 65536 }], 64 << 20, 65536)).toBe(3 * 65536);
  });
});

describe("pieces", () => {
  it("compareSectors finds runs of equal and different 512-byte sectors", () => {
    const a = new Uint8Array(2048);
    const b = new Uint8Array(2048);
    b[600] = 1;
    b[1100] = 1;
    expect(compareSectors(a, b, 0, 2048)).toEqual({ differ: false, bytes: 512 });
    expect(compareSectors(a, b, 512, 2048)).toEqual({ differ: true, bytes: 1024 });
    expect(compareSectors(a, b, 1536, 2048)).toEqual({ differ: false, bytes: 512 });
    expect(compareSectors(a, b, 1536, 1600)).toEqual({ differ: false, bytes: 64 });
  });

  it("refcount entries of every width round-trip", () => {
    for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
      const block = new Uint8Array(512);
      const max = bits >= 53 ? 2 ** 40 : 2 ** bits - 1;
      for (let i = 0; i < 20; i++) setRefcount(block, bits, i, i % 2 === 0 ? max : 1);
      for (let i = 0; i < 20; i++) expect(getRefcount(block, bits, i)).toBe(i % 2 === 0 ? max : 1);
      expect(getRefcount(block, bits, 20)).toBe(0);
    }
  });

  it("a header written as QEMU lays it out parses back the same, with the backing file name after the extensions", async () => {
    const q = path("h.qcow2");
    expect((await blk(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", q, "1M"])).code).toBe(0);
    await using f = await openImage(q, { format: "file" });
    const { header, clusterSize } = await readHeader(f.root);
    const v3 = { ...header, version: 3 as const, backingFile: "base.qcow2", backingFormat: "qcow2" };
    const bytes = serializeHeader(v3, clusterSize);
    const back = parseHeader(bytes, 1 << 20);
    expect(back).toMatchObject({
      version: 3,
      backingFile: "base.qcow2",
      backingFormat: "qcow2",
      size: 1 << 20,
    });
    expect(back.featureTable.length).toBe(8);
    expect(new DataView(bytes.buffer).getUint32(100)).toBe(112);
    const v2 = parseHeader(serializeHeader({ ...v3, version: 2 }, clusterSize), 1 << 20);
    expect(v2).toMatchObject({ version: 2, backingFile: "base.qcow2", featureTable: [] });
  });

  it("an image emptied in place and one with a new refcount width pass blk-img check", async () => {
    const q = path("e.qcow2");
    expect((await blk(["create", "-q", "-f", "qcow2", q, "4M"])).code).toBe(0);
    {
      await using img = await openImage(q, { format: "qcow2" });
      await img.root.write(0, new Uint8Array(200_000).fill(7));
      await img.root.write(3 << 20, new Uint8Array(4096).fill(8));
    }
    {
      await using f = await openImage(q, { format: "file", resize: true });
      await changeRefcountOrder(f.root, 0);
    }
    expect(await blk(["check", q])).toMatchObject({ code: 0 });
    expect(JSON.parse((await blk(["info", "--output=json", q])).stdout)).toMatchObject({
      "format-specific": { data: { "refcount-bits": 1 } },
    });
    {
      await using img = await openImage(q, { format: "qcow2", readOnly: true });
      expect((await img.root.read(0, 4))[3]).toBe(7);
    }
    {
      await using f = await openImage(q, { format: "file", resize: true });
      await emptyQcow2(f.root);
      expect(f.node.length).toBe(4 * 65536);
    }
    expect(await blk(["check", q])).toMatchObject({ code: 0 });
    await using img = await openImage(q, { format: "qcow2", readOnly: true });
    expect(await img.root.read(0, 4)).toEqual(new Uint8Array(4));
  });

  it("unmapping the active table of a v2 image keeps it consistent and reading zeroes", async () => {
    const q = path("u.qcow2");
    expect((await blk(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", q, "4M"])).code).toBe(0);
    {
      await using img = await openImage(q, { format: "qcow2" });
      await img.root.write(65536, new Uint8Array(300_000).fill(9));
    }
    {
      await using f = await openImage(q, { format: "file", resize: true });
      await unmapActiveTable(f.root);
    }
    expect(await blk(["check", q])).toMatchObject({ code: 0 });
    expect(JSON.parse((await blk(["map", "--output=json", q])).stdout)).toEqual([
      { start: 0, length: 4 << 20, depth: 0, present: false, zero: true, data: false },
    ]);
  });

  it("the rate limiter sleeps until the bytes done fit the rate", async () => {
    let done = 0;
    let now = 1000;
    const sleeps: number[] = [];
    const clock = {
      now: () => now,
      sleep: async (ms: number) => {
        sleeps.push(ms);
        now += ms;
      },
    };
    const wait = rateLimiter(1 << 20, () => done, clock);
    await wait();
    expect(sleeps).toEqual([]);
    done = 2 << 20;
    now += 500;
    await wait();
    expect(sleeps).toEqual([1500]);
    now += 5000;
    await wait();
    expect(sleeps).toEqual([1500]);
  });
});
