import { writeFileSync } from "node:fs";
import { truncate } from "node:fs/promises";
import type { BlockNode, BlockStatusExtent } from "@blk/core";
import { makeTempDir, missingPeers, pattern, run } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { fileDriver } from "../src/file/index.ts";
import { openRaw, sparseFiles } from "./raw-helpers.ts";

const dir = makeTempDir("blk-raw");
afterAll(() => dir.dispose());
const sparse = sparseFiles(dir);
let n = 0;

/** `qemu-img map --output=json` text from blk's block status (QEMU 7.2 format, merged as qemu-img merges). */
async function mapJson(node: BlockNode): Promise<string> {
  const ext = await node.blockStatus(0, node.length, { wantZero: true });
  const merged: BlockStatusExtent[] = [];
  for (const e of ext) {
    const last = merged.at(-1);
    if (
      last !== undefined &&
      last.data === e.data &&
      last.zero === e.zero &&
      last.allocated === e.allocated &&
      (last.hostOffset === undefined) === (e.hostOffset === undefined) &&
      (last.hostOffset === undefined || last.hostOffset + last.length === e.hostOffset)
    ) {
      last.length += e.length;
    } else {
      merged.push({ ...e });
    }
  }
  const lines = merged.map((e) => {
    const off = e.hostOffset === undefined ? "" : `, "offset": ${e.hostOffset}`;
    return `{ "start": ${e.offset}, "length": ${e.length}, "depth": 0, "present": ${e.allocated}, "zero": ${e.zero}, "data": ${e.data}${off}}`;
  });
  return `[${lines.join(",\n")}]\n`;
}

const missing = missingPeers(["qemu-img", "qemu-io"]);
// `pnpm test:fast` leaves this file out by its name (`*.qemu.test.ts`); it skips itself when a peer is missing.
describe.skipIf(missing.length > 0)("raw/file map against qemu-img map -f raw", () => {
  it("sparse files map exactly as qemu-img prints them", async () => {
    const p = await sparse(4 << 20);
    const r = await openRaw(p, {}, "unmap");
    await r.root.write(0, pattern(1, 0, 8192));
    await r.root.write(100_000, pattern(2, 100_000, 70_000));
    await r.root.write(1 << 20, pattern(3, 1 << 20, 1 << 20));
    await r.root.discard((1 << 20) + 65536, 131072);
    await r.root.writeZeroes((1 << 20) + 512 * 1024, 65536, { mayUnmap: true });
    await r.root.write((4 << 20) - 4096, pattern(4, 0, 4096));
    const mine = await mapJson(r.node);
    await r.close();
    const q = await run("qemu-img", ["map", "-f", "raw", "--output=json", p]);
    expect(q.code).toBe(0);
    expect(mine).toBe(q.stdout);
  });

  it("an odd-sized file maps with QEMU's rounded zero tail", async () => {
    const p = dir.join(`odd${n++}.img`);
    writeFileSync(p, "");
    await truncate(p, 100_000);
    const r = await openRaw(p);
    await r.root.write(99_990, new Uint8Array([1, 2, 3]));
    const mine = await mapJson(r.node);
    await r.close();
    const q = await run("qemu-img", ["map", "-f", "raw", "--output=json", p]);
    expect(mine).toBe(q.stdout);
  });

  it("a file created by blk maps like one created by qemu-img", async () => {
    const a = dir.join(`c${n++}.img`);
    const b = dir.join(`c${n++}.img`);
    await fileDriver.create({ filename: a, size: 3 << 20 });
    expect((await run("qemu-img", ["create", "-q", "-f", "raw", b, "3M"])).code).toBe(0);
    const qa = await run("qemu-img", ["map", "-f", "raw", "--output=json", a]);
    const qb = await run("qemu-img", ["map", "-f", "raw", "--output=json", b]);
    expect(qa.stdout).toBe(qb.stdout);
  });

  it("data written by blk reads back through qemu-io and vice versa", async () => {
    const p = await sparse(1 << 20);
    const r = await openRaw(p);
    await r.root.write(65536, new Uint8Array(65536).fill(0x5a));
    await r.node.flush();
    await r.close();
    const v = await run("qemu-io", ["-f", "raw", "-c", "read -P 0x5a 65536 65536", p]);
    expect(v.stdout).not.toContain("Pattern verification failed");
    expect(v.code).toBe(0);
    const w = await run("qemu-io", ["-f", "raw", "-c", "write -P 0x33 131072 4096", p]);
    expect(w.code).toBe(0);
    const r2 = await openRaw(p);
    expect((await r2.node.read(131072, 4096)).every((x) => x === 0x33)).toBe(true);
    await r2.close();
  });
});
