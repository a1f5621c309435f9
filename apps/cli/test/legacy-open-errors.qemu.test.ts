/**
 * Option errors in `--image-opts` and `json:` filenames, side by side with qemu-img: QEMU opens those
 * through its legacy open path, whose wording differs from QAPI validation's (`Block format 'D' does
 * not support the option 'K'`, `Block protocol 'D' doesn't support …`, `Parameter 'K' expects …`).
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { blk } from "./helpers.ts";
import { Fixtures, missing, qemu } from "./qemu.ts";

const fx = new Fixtures("blk-img-legacy-open");
afterAll(() => fx.dispose());

let raw = "";
let q2 = "";
beforeAll(async () => {
  raw = fx.path("r.img");
  q2 = fx.path("q.qcow2");
  await qemu(["create", "-q", "-f", "raw", raw, "1M"]);
  await qemu(["create", "-q", "-f", "qcow2", q2, "1M"]);
});

describe.skipIf(missing.length > 0)("legacy open-path option errors", { timeout: 60_000 }, () => {
  it.each([
    ['json:{"driver":"null-co","bogus":1}'],
    ['json:{"driver":"file","filename":"@r","bogus":1}'],
    ['json:{"driver":"qcow2","file":{"driver":"file","filename":"@q"},"bogus":1}'],
    ['json:{"driver":"qcow2","file":{"driver":"file","filename":"@q","bogus":1}}'],
    [
      'json:{"driver":"raw","file":{"driver":"blkdebug","image":{"driver":"file","filename":"@r"},"bogus":1}}',
    ],
    ['json:{"driver":"raw","file":{"driver":"blkdebug","image":{"driver":"file","filename":"@r","x":2}}}'],
    ['json:{"driver":"raw","offset":-1,"file":{"driver":"file","filename":"@r"}}'],
    ['json:{"driver":"raw","offset":"abc","bogus":1,"file":{"driver":"file","filename":"@r"}}'],
    ['json:{"driver":"raw","file":{"driver":"file"}}'],
  ])("%s", async (spec) => {
    const s = spec.replace("@r", raw).replace("@q", q2);
    const q = await qemu(["info", s]);
    const b = await blk(["info", s]);
    expect(q.code).toBe(1);
    expect({ code: b.code, stderr: b.stderr }).toEqual({
      code: q.code,
      stderr: q.stderr.replaceAll("qemu-img:", "blk-img:"),
    });
  });

  it.each([
    ["driver=raw,file.filename=@r,bogus=1"],
    ["driver=raw,file.filename=@r,file.bogus=1"],
    ["driver=raw,file.filename=@r,offset=abc"],
    ["driver=raw,file.filename=@r,size=1Q"],
  ])("--image-opts %s", async (opts) => {
    const s = opts.replace("@r", raw);
    const q = await qemu(["info", "--image-opts", s]);
    const b = await blk(["info", "--image-opts", s]);
    expect(q.code).toBe(1);
    expect({ code: b.code, stderr: b.stderr }).toEqual({
      code: q.code,
      stderr: q.stderr.replaceAll("qemu-img:", "blk-img:"),
    });
  });

  // qemu-img 7.2 aborts on these ("Unexpected error in parse_option_…"), after printing the message
  // blk-img gives as an ordinary open error.
  it.each([
    ['json:{"driver":"null-co","latency-ns":"abc"}', "Parameter 'latency-ns' expects a number"],
    ['json:{"driver":"null-co","read-zeroes":"abc"}', "Parameter 'read-zeroes' expects 'on' or 'off'"],
    ['json:{"driver":"null-co","size":"abc"}', "Parameter 'size' expects a non-negative number below 2^64"],
  ])("%s: QEMU's message, without the abort", async (spec, msg) => {
    const q = await qemu(["info", spec]);
    expect(q.stderr).toContain(`qemu-img: ${msg}\n`);
    const b = await blk(["info", spec]);
    expect(b.code).toBe(1);
    expect(b.stderr.split("\n")[0]).toBe(`blk-img: Could not open '${spec}': ${msg}`);
  });
});
