/**
 * Formats come from the driver registry, not from command code: a test format registered here is
 * probed, created, inspected, mapped, checked and converted by the unchanged commands (as qcow2 will be).
 */
import { readFileSync, writeFileSync } from "node:fs";
import {
  BlkError,
  type BlockDriver,
  BlockDriverBase,
  type BlockDriverInfo,
  type BlockStatusExtent,
  type CheckResult,
  type Edge,
  type OpenContext,
} from "@blk/core";
import { registerDriver } from "@blk/drivers";
import { makeTempDir, pattern } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { blk } from "./helpers.ts";

const MAGIC = "BLKTEST\0";
const HDR = 512;

/** A toy format: a 512-byte header (magic, check outcome, dirty flag), then the guest data. */
class TestState extends BlockDriverBase {
  readonly #file: Edge;
  readonly #hdr: Uint8Array;
  readonly dirty: boolean;
  readonly backingFilename: string | undefined;
  readonly backingFormat = "raw";
  constructor(file: Edge, hdr: Uint8Array) {
    super();
    this.#file = file;
    this.#hdr = hdr;
    this.dirty = hdr[9] === 1;
    this.backingFilename = hdr[10] === 1 ? "base.img" : undefined;
  }
  protected override _read(o: number, buf: Uint8Array): Promise<void> {
    return this.#file.readInto(o + HDR, buf);
  }
  protected override _write(o: number, d: Uint8Array): Promise<void> {
    return this.#file.write(o + HDR, d);
  }
  protected override async _getLength(): Promise<number> {
    return this.#file.length - HDR;
  }
  protected override async _blockStatus(o: number, n: number): Promise<BlockStatusExtent[]> {
    const got = await this.#file.blockStatus(o + HDR, n);
    return got.map((e) => ({ ...e, offset: e.offset - HDR, hostOffset: e.offset }));
  }
  protected override async _info(): Promise<BlockDriverInfo> {
    return {
      clusterSize: 65536,
      formatSpecific: { version: 1, "lazy-refcounts": false, bitmaps: [{ flags: ["auto"], name: "b1" }] },
    };
  }
  protected override async _check(): Promise<CheckResult> {
    const kind = this.#hdr[8];
    return {
      corruptions: kind === 2 ? 1 : 0,
      leaks: kind === 1 ? 2 : 0,
      checkErrors: 0,
      imageEndOffset: 4096,
      totalClusters: 16,
      allocatedClusters: 4,
      fragmentedClusters: 1,
    };
  }
}

const testDriver: BlockDriver = {
  format: "x-blk-test",
  kind: "format",
  probe: (h) => (new TextDecoder().decode(h.subarray(0, 8)) === MAGIC ? 100 : 0),
  async open(_o: Record<string, unknown>, ctx: OpenContext) {
    const file = ctx.children.get("file");
    if (file === undefined) throw new BlkError("EINVAL", "no file");
    return new TestState(file, await file.read(0, HDR));
  },
  async create(o: Record<string, unknown>) {
    const hdr = new Uint8Array(HDR);
    hdr.set(new TextEncoder().encode(MAGIC));
    if (o["check-result"] === "leaks") hdr[8] = 1;
    if (o["check-result"] === "corrupt") hdr[8] = 2;
    if (o["with-backing"] === "on") hdr[10] = 1;
    const data = new Uint8Array(Number(o.size));
    writeFileSync(String(o.filename), Buffer.concat([hdr, data]));
  },
};
registerDriver(testDriver);

const dir = makeTempDir("blk-img-reg");
afterAll(() => dir.dispose());

describe("a registered format works through every command", () => {
  it("create calls the driver's create; info probes it and shows its data", async () => {
    const f = dir.join("t.img");
    const c = await blk(["create", "-f", "x-blk-test", "-o", "check-result=leaks,with-backing=on", f, "64k"]);
    expect(c).toEqual({
      code: 0,
      stdout: `Formatting '${f}', fmt=x-blk-test size=65536 check-result=leaks with-backing=on\n`,
      stderr: "",
    });
    expect(readFileSync(f).length).toBe(HDR + 65536);
    const j = JSON.parse((await blk(["info", "--output=json", f])).stdout) as Record<string, unknown>;
    expect(j).toEqual({
      "backing-filename-format": "raw",
      "virtual-size": 65536,
      filename: f,
      "cluster-size": 65536,
      format: "x-blk-test",
      "actual-size": expect.any(Number),
      "format-specific": {
        type: "x-blk-test",
        data: { version: 1, "lazy-refcounts": false, bitmaps: [{ flags: ["auto"], name: "b1" }] },
      },
      "full-backing-filename": dir.join("base.img"),
      "backing-filename": "base.img",
      "dirty-flag": false,
    });
    const h = await blk(["info", f]);
    expect(h.stdout).toContain("file format: x-blk-test\n");
    expect(h.stdout).toContain("cluster_size: 65536\n");
    expect(h.stdout).toContain(
      `backing file: base.img (actual path: ${dir.join("base.img")})\nbacking file format: raw\n`,
    );
    expect(h.stdout).toContain(
      "Format specific information:\n    version: 1\n    lazy refcounts: false\n    bitmaps:\n        [0]:\n            flags:\n                [0]: auto\n            name: b1\n",
    );
    // --backing-chain opens the backing file the driver names.
    writeFileSync(dir.join("base.img"), pattern(1, 0, 4096));
    const chain = JSON.parse(
      (await blk(["info", "--backing-chain", "--output=json", f])).stdout,
    ) as unknown[];
    expect(chain).toHaveLength(2);
    expect(chain[1]).toMatchObject({ filename: dir.join("base.img"), format: "raw", "virtual-size": 4096 });
    // Commands that read guest data refuse an image whose backing file was not opened below it.
    for (const argv of [
      ["map", f],
      ["compare", f, f],
      ["convert", f, dir.join("out.raw")],
    ]) {
      const r = await blk(argv);
      expect(r.code).toBe(argv[0] === "compare" ? 2 : 1);
      expect(r.stderr).toBe(
        `blk-img: Could not open '${f}': its backing file 'base.img' is not opened by this blk version yet\n`,
      );
    }
  });

  it("check reports the driver's result with qemu-img's exit codes, text and JSON", async () => {
    const mk = async (kind: string): Promise<string> => {
      const f = dir.join(`c-${kind}.img`);
      await blk(["create", "-q", "-f", "x-blk-test", "-o", `check-result=${kind}`, f, "64k"]);
      return f;
    };
    const clean = await blk(["check", await mk("clean")]);
    expect(clean).toEqual({
      code: 0,
      stdout:
        "No errors were found on the image.\n4/16 = 25.00% allocated, 25.00% fragmented, 0.00% compressed clusters\nImage end offset: 4096\n",
      stderr: "",
    });
    const leaks = await blk(["check", await mk("leaks")]);
    expect(leaks.code).toBe(3);
    expect(leaks.stdout).toContain(
      "\n2 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
    );
    const corrupt = await blk(["check", "--output=json", await mk("corrupt")]);
    expect(corrupt.code).toBe(2);
    expect(JSON.parse(corrupt.stdout)).toEqual({
      filename: dir.join("c-corrupt.img"),
      format: "x-blk-test",
      "check-errors": 0,
      "image-end-offset": 4096,
      corruptions: 1,
      "total-clusters": 16,
      "allocated-clusters": 4,
      "fragmented-clusters": 1,
    });
  });

  it("map and convert read through the driver", async () => {
    const f = dir.join("m.img");
    await blk(["create", "-q", "-f", "x-blk-test", f, "128k"]);
    const raw = dir.join("m.raw");
    expect((await blk(["convert", "-O", "raw", f, raw])).code).toBe(0);
    expect(readFileSync(raw).length).toBe(131072);
    const back = dir.join("m2.img");
    expect((await blk(["convert", "-O", "x-blk-test", raw, back])).code).toBe(0);
    expect((await blk(["compare", f, back])).stdout).toBe("Images are identical.\n");
    const m = await blk(["map", "--output=json", f]);
    expect(m.code).toBe(0);
    expect(m.stdout).toContain('"depth": 0');
  });
});
