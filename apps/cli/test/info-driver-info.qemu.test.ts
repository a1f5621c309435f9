/**
 * `blk-img info` fields that qemu-img takes from the driver's get_info and allocated-size answers: a
 * driver without get_info (null-co; nbd is covered by nbd-uri.qemu.test.ts) has no `dirty-flag`, and
 * null-co reports 0 bytes allocated. The `json:` filename is compared apart: QEMU re-serialises it in
 * its own key order.
 */
import { afterAll, describe, expect, it } from "vitest";
import { blk } from "./helpers.ts";
import { Fixtures, missing, qemu } from "./qemu.ts";

const fx = new Fixtures("blk-img-info-driver");
afterAll(() => fx.dispose());

describe.skipIf(missing.length > 0)("info of drivers without get_info", { timeout: 60_000 }, () => {
  it.each([
    ['json:{"driver":"null-co","size":1048576}'],
    ['json:{"driver":"null-co","size":4096,"read-zeroes":true}'],
    ['json:{"driver":"null-aio","size":65536}'],
  ])("%s: same JSON and text as qemu-img apart from the filename", async (spec) => {
    const q = await qemu(["info", "--output=json", spec]);
    const b = await blk(["info", "--output=json", spec]);
    expect(b.code).toBe(q.code);
    const qi = JSON.parse(q.stdout) as Record<string, unknown>;
    const bi = JSON.parse(b.stdout) as Record<string, unknown>;
    expect(JSON.parse(String(bi.filename).slice(5))).toEqual(JSON.parse(String(qi.filename).slice(5)));
    expect({ ...bi, filename: "" }).toEqual({ ...qi, filename: "" });
    expect(bi).not.toHaveProperty("dirty-flag");
    const qt = await qemu(["info", spec]);
    const bt = await blk(["info", spec]);
    const tail = (s: string) => s.split("\n").slice(1).join("\n");
    expect(tail(bt.stdout)).toBe(tail(qt.stdout));
  });
});
