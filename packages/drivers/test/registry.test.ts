import { writeFileSync } from "node:fs";
import { truncate } from "node:fs/promises";
import { type BlockDriver, BlockGraph, isBlkError, memoryDriver } from "@blk/core";
import { makeTempDir, pattern, sha256 } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { fileDriver } from "../src/file/index.ts";
import { nullDriver } from "../src/null/index.ts";
import { probedRawWarning, rawDriver } from "../src/raw/index.ts";
import {
  DriverRegistry,
  driverRegistry,
  getDriver,
  openBlockdev,
  openImage,
  probeFormat,
} from "../src/registry/index.ts";

const dir = makeTempDir("blk-reg");
afterAll(() => dir.dispose());
let n = 0;
async function sparse(size: number): Promise<string> {
  const p = dir.join(`g${n++}.img`);
  writeFileSync(p, "");
  await truncate(p, size);
  return p;
}

/** A stand-in qcow2 driver: only its probe matters here (QEMU's rule: magic QFI\xfb, version >= 2). */
const fakeQcow2: BlockDriver<Record<string, never>> = {
  format: "qcow2",
  kind: "format",
  probe(h: Uint8Array): number {
    if (h.length < 8) return 0;
    const magic = h[0] === 0x51 && h[1] === 0x46 && h[2] === 0x49 && h[3] === 0xfb;
    const version = (h[4] ?? 0) * 2 ** 24 + (h[5] ?? 0) * 65536 + (h[6] ?? 0) * 256 + (h[7] ?? 0);
    return magic && version >= 2 ? 100 : 0;
  },
  open: () => Promise.reject(new Error("not implemented")),
};
const QCOW2_HEADER = new Uint8Array([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]);

describe("driver registry", () => {
  it("has the built-in drivers and refuses duplicates", () => {
    expect(driverRegistry.formats()).toEqual([
      "file",
      "raw",
      "qcow2",
      "nbd",
      "null-co",
      "null-aio",
      "blkdebug",
      "throttle",
    ]);
    expect(getDriver("raw")).toBe(rawDriver);
    expect(getDriver("nope")).toBeUndefined();
    const reg = new DriverRegistry([fileDriver]);
    expect(() => reg.register(fileDriver)).toThrow("Driver 'file' is already registered");
    reg.register(fileDriver, { replace: true });
    expect(() => reg.require("bogus")).toThrow("Unknown driver 'bogus'");
  });

  it("probes qcow2 only when a qcow2 driver is registered, else raw", () => {
    const header = new Uint8Array(2048);
    header.set(QCOW2_HEADER);
    // The default registry has the qcow2 driver; one without it falls back to raw.
    expect(probeFormat(header)).toBe("qcow2");
    expect(new DriverRegistry([fileDriver, rawDriver]).probe(header)).toBe("raw");
    const reg = new DriverRegistry([fileDriver, rawDriver, fakeQcow2]);
    expect(reg.probe(header)).toBe("qcow2");
    expect(reg.probe(new Uint8Array(2048))).toBe("raw");
    expect(reg.probe(new Uint8Array(0))).toBe("raw");
    // version 1 is not qcow2 (QEMU's probe)
    const v1 = header.slice();
    v1[7] = 1;
    expect(reg.probe(v1)).toBe("raw");
  });
});

describe("openImage", () => {
  it("opens a raw image with the format given: no warning, I/O through the root edge", async () => {
    const p = await sparse(1 << 20);
    await using img = await openImage(p, { format: "raw" });
    expect(img.format).toBe("raw");
    expect(img.probed).toBe(false);
    expect(img.warnings).toEqual([]);
    const data = pattern(9, 0, 65536);
    await img.root.write(4096, data);
    expect(sha256(await img.root.read(4096, 65536))).toBe(sha256(data));
    expect(img.file?.driver.format).toBe("file");
  });

  it("probes raw with QEMU's warning and restricts writes of block 0 that would look like another format", async () => {
    const p = await sparse(1 << 20);
    const warned: string[] = [];
    const registry = new DriverRegistry([fileDriver, rawDriver, fakeQcow2]);
    const img = await openImage(p, { registry, onWarning: (m) => warned.push(m) });
    expect(img.probed).toBe(true);
    expect(img.format).toBe("raw");
    expect(warned).toEqual([probedRawWarning(p)]);
    expect(warned[0]).toBe(
      `WARNING: Image format was not specified for '${p}' and probing guessed raw.\n` +
        "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
        "         Specify the 'raw' format explicitly to remove the restrictions.",
    );
    await expect(img.root.write(0, QCOW2_HEADER)).rejects.toMatchObject({ code: "EPERM" });
    await img.root.write(0, new Uint8Array(512).fill(1));
    await img.root.write(4096, QCOW2_HEADER);
    await img.close();
    // Read-only: no warning.
    const ro = await openImage(p, { registry, readOnly: true });
    expect(ro.warnings).toEqual([]);
    await expect(ro.root.write(0, new Uint8Array(1))).rejects.toMatchObject({ code: "EPERM" });
    await ro.close();
  });

  it("never probes when the format is given (a backing file whose format is known)", async () => {
    const p = await sparse(65536);
    writeFileSync(p, QCOW2_HEADER);
    const registry = new DriverRegistry([fileDriver, rawDriver, fakeQcow2]);
    const img = await openImage(p, { registry, format: "raw", readOnly: true });
    expect(img.format).toBe("raw");
    expect(img.probed).toBe(false);
    await img.close();
    await expect(openImage(p, { registry, readOnly: true })).rejects.toThrow("not implemented");
  });

  it("opens blockdev option trees and json: filenames", async () => {
    const p = await sparse(1 << 20);
    const img = await openImage({
      driver: "raw",
      offset: 65536,
      size: 65536,
      file: { driver: "file", filename: p },
    });
    expect(img.format).toBe("raw");
    expect(img.node.length).toBe(65536);
    await img.root.write(0, new Uint8Array(512).fill(3));
    await img.close();
    const j = await openImage(
      `json:${JSON.stringify({ driver: "raw", file: { driver: "file", filename: p } })}`,
      {
        readOnly: true,
      },
    );
    expect((await j.root.read(65536, 512)).every((b) => b === 3)).toBe(true);
    await j.close();
    expect(j.graph.nodes.size).toBe(0);
  });

  it("reports QEMU's messages for unknown drivers and missing files", async () => {
    await expect(openImage(dir.join("nope.img"), { format: "raw" })).rejects.toMatchObject({
      code: "ENOENT",
      message: `Could not open '${dir.join("nope.img")}': No such file or directory`,
    });
    const p = await sparse(4096);
    const err = await openImage(p, { format: "bogus" }).catch((e: unknown) => e);
    expect(isBlkError(err, "EINVAL")).toBe(true);
    expect((err as Error).message).toBe("Unknown driver 'bogus'");
  });

  it("openBlockdev builds children inline or by node name", async () => {
    const graph = new BlockGraph();
    const registry = new DriverRegistry([nullDriver, rawDriver, memoryDriver]);
    await openBlockdev(graph, { driver: "null-co", "node-name": "base", "read-zeroes": true }, { registry });
    const top = await openBlockdev(graph, { driver: "raw", "node-name": "top", file: "base" }, { registry });
    expect(top.children.get("file")?.child.nodeName).toBe("base");
    await expect(openBlockdev(graph, { driver: "raw", file: "nosuch" }, { registry })).rejects.toThrow(
      "Cannot find device='nosuch' nor node-name='nosuch'",
    );
    await expect(openBlockdev(graph, { driver: "null-co", bogus: 1 }, { registry })).rejects.toThrow(
      "Parameter 'bogus' is unexpected",
    );
    await graph.delete(top);
  });
});
