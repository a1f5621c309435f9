import { CHILD_ROLE, PERM } from "@blk/core";
import { makeTempDir, pattern, sha256 } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { checkRawWindow, rawChildRole, rawDriver, rawSchema } from "../src/raw/index.ts";
import { openRaw, sparseFiles } from "./raw-helpers.ts";

const dir = makeTempDir("blk-raw");
afterAll(() => dir.dispose());
const sparse = sparseFiles(dir);

describe("raw driver", () => {
  it("passes I/O to the file and round-trips data", async () => {
    const p = await sparse(2 << 20);
    const r = await openRaw(p);
    const data = pattern(11, 0, 777_777);
    await r.root.write(4095, data);
    expect(sha256(await r.node.read(4095, data.length))).toBe(sha256(data));
    expect(sha256(await r.file.read(4095, data.length))).toBe(sha256(data));
    // Its file has the filtered role, but raw is a format: no filter-or-backing child (QEMU's
    // bdrv_filter_or_cow_bs of a raw node is NULL), so chains end here rather than at the file node.
    expect(r.node.children.get("file")?.child).toBe(r.file);
    expect(r.node.filteredOrBacking).toBeUndefined();
    await r.close();
  });

  it("exposes an offset/size window of the file", async () => {
    const p = await sparse(1 << 20);
    const r = await openRaw(p, { offset: 65536, size: 131072 });
    expect(r.node.length).toBe(131072);
    await r.root.write(0, pattern(1, 0, 4096));
    expect(sha256(await r.file.read(65536, 4096))).toBe(sha256(pattern(1, 0, 4096)));
    await expect(r.root.write(131072 - 10, new Uint8Array(20))).rejects.toMatchObject({ code: "EIO" });
    const map = await r.node.blockStatus(0, 131072);
    expect(map[0]).toMatchObject({ offset: 0, length: 4096, data: true, hostOffset: 65536 });
    r.root.setPerm(PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE, 0x0f);
    await expect(r.root.truncate(4096)).rejects.toMatchObject({
      code: "ENOTSUP",
      message: "Cannot resize fixed-size raw disks",
    });
    await r.close();
  });

  it("checks offset and size with QEMU's messages", () => {
    expect(() => checkRawWindow({ offset: 2000000 }, 1048576)).toThrow(
      "Offset (2000000) cannot be greater than size of the containing file (1048576)",
    );
    expect(() => checkRawWindow({ offset: 4096, size: 1048576 }, 1048576)).toThrow(
      "The sum of offset (4096) and size (1048576) has to be smaller or equal to the  actual size of the containing file (1048576)",
    );
    expect(() => checkRawWindow({ size: 1000 }, 1048576)).toThrow("Specified size is not multiple of 512");
    expect(() => rawSchema.parse({ offset: -1 })).toThrow(
      "Parameter 'offset' expects a non-negative number below 2^64",
    );
    expect(() => rawSchema.parse({ bogus: 1 })).toThrow("Parameter 'bogus' is unexpected");
  });

  it("rounds a window without size up to 512 bytes like QEMU", async () => {
    const p = await sparse(1 << 20);
    const r = await openRaw(p, { offset: 1000 });
    expect(r.node.length).toBe(1048064);
    await r.close();
  });

  it("takes QEMU's raw permissions (filter-like without a window)", () => {
    expect(rawChildRole()).toBe(CHILD_ROLE.FILTERED | CHILD_ROLE.PRIMARY);
    expect(rawChildRole({ offset: 512 })).toBe(CHILD_ROLE.DATA | CHILD_ROLE.PRIMARY);
    const cp = rawDriver.childPerm;
    if (cp === undefined) throw new Error("no childPerm");
    // Without a window: parents' permissions pass through (read-only parent: no write taken).
    expect(cp(rawChildRole(), 0x01, 0x0f, true)).toEqual({ perm: 0x01, shared: 0x0f });
    // With a window: resize is not shared; write/resize are only taken when the parents take them.
    expect(cp(rawChildRole({ offset: 512 }), 0x03, 0x0f, true)).toEqual({ perm: 0x03, shared: 0x07 });
    // The graph's default role for a format's file (data+metadata) is treated as data.
    expect(cp(CHILD_ROLE.DATA | CHILD_ROLE.METADATA | CHILD_ROLE.PRIMARY, 0x01, 0x0f, true)).toEqual({
      perm: 0x01,
      shared: 0x07,
    });
  });

  it("grows and shrinks the file on truncate", async () => {
    const p = await sparse(65536);
    const r = await openRaw(p);
    r.root.setPerm(PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE, 0x0f);
    const root = r.root;
    await root.truncate(1 << 20);
    expect(r.node.length).toBe(1 << 20);
    expect(r.file.length).toBe(1 << 20);
    await root.truncate(4096);
    expect(r.node.length).toBe(4096);
    await r.close();
  });
});
