/**
 * `blk-img amend` against `qemu-img amend` 7.2 on copies of the same qcow2 images: compat upgrade and
 * downgrade (zero clusters expanded, in internal snapshots too), lazy refcounts, refcount width, size, the backing file refusal and
 * the option errors — same output and exit code, then the same content and `qemu-img info` format data,
 * and `qemu-img check` clean.
 */
import { copyFileSync, readFileSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { expectClean, expectSameContent, infoOf, qemuOk, qio } from "./chain.ts";
import { blk } from "./helpers.ts";
import { Fixtures, missing, norm, qemu } from "./qemu.ts";

const fx = new Fixtures("blk-img-amend");
afterAll(() => fx.dispose());

const img: Record<string, string> = {};

/** Runs `amend <args> <copy of src>` with both tools; output, content, info and check must agree. */
async function same(src: string, args: readonly string[]): Promise<{ code: number; stderr: string }> {
  const q = fx.path("q.qcow2");
  const b = fx.path("b.qcow2");
  copyFileSync(src, q);
  copyFileSync(src, b);
  const rq = await qemu(["amend", ...args, q]);
  const rb = await blk(["amend", ...args, b]);
  expect({ args, code: rb.code, stdout: rb.stdout, stderr: rb.stderr.replaceAll(b, "F") }).toEqual({
    args,
    code: rq.code,
    stdout: norm(rq.stdout),
    stderr: norm(rq.stderr).replaceAll(q, "F"),
  });
  const untouched = (f: string): boolean => readFileSync(f).equals(readFileSync(src));
  if (rb.code !== 0 && untouched(q) && untouched(b)) return rb;
  await Promise.all([
    expectSameContent(q, b),
    (async () => expect(await infoOf(b)).toEqual(await infoOf(q)))(),
    expectClean(b),
  ]);
  return rb;
}

describe.skipIf(missing.length > 0)("blk-img amend vs qemu-img", { timeout: 120_000 }, () => {
  beforeAll(async () => {
    img.v2 = fx.path("v2.qcow2");
    await qemuOk(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", img.v2, "64M"]);
    await qio(img.v2, ["write -P 1 0 1M", "write -P 2 3M 64k"]);
    img.v3 = fx.path("v3.qcow2");
    await qemuOk(["create", "-q", "-f", "qcow2", img.v3, "64M"]);
    await qio(img.v3, ["write -P 1 0 1M", "write -z 512k 128k", "write -z 10M 64k", "write -P 3 20M 64k"]);
    img.overlay = fx.path("ov.qcow2");
    await qemuOk(["create", "-q", "-f", "qcow2", "-b", img.v3, "-F", "qcow2", img.overlay]);
    await qio(img.overlay, ["write -z 0 64k", "write -P 5 5M 64k"]);
    img.snap = fx.path("sn.qcow2");
    copyFileSync(img.v2, img.snap);
    await qemuOk(["amend", "-o", "compat=1.1", img.snap]);
    await qio(img.snap, ["write -z 2M 64k"]);
    await qemuOk(["snapshot", "-c", "s1", img.snap]);
    await qio(img.snap, ["write -P 9 0 64k", "write -z 6M 64k"]);
    img.lazy = fx.path("lz.qcow2");
    await qemuOk(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=512", img.lazy, "1M"]);
    await qio(img.lazy, ["write -P 1 0 100k"]);
    img.extl2 = fx.path("x.qcow2");
    await qemuOk(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", img.extl2, "16M"]);
    img.zstd = fx.path("z.qcow2");
    await qemuOk(["create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", img.zstd, "16M"]);
    await qio(img.zstd, ["write -c -P 3 0 64k"]);
  });

  it("upgrades, downgrades (zero clusters expanded) and switches lazy refcounts", async () => {
    const v2 = img.v2 ?? "";
    const v3 = img.v3 ?? "";
    await same(v2, ["-o", "compat=1.1"]);
    await same(v2, ["-o", "compat=v3,lazy_refcounts=on"]);
    await same(v3, ["-o", "compat=0.10"]);
    await same(img.overlay ?? "", ["-o", "compat=0.10"]);
    await same(img.snap ?? "", ["-o", "compat=0.10"]);
    await same(img.lazy ?? "", ["-o", "lazy_refcounts=off"]);
    await same(img.lazy ?? "", ["-o", "compat=0.10"]);
    await same(v3, ["-o", "compat=1.1,compat=0.10"]);
    await same(v3, ["-p", "-q", "-o", "compat=0.10"]);
  });

  it("changes the refcount width, and the size", async () => {
    const v3 = img.v3 ?? "";
    await same(v3, ["-o", "refcount_bits=1"]);
    await same(img.lazy ?? "", ["-o", "refcount_bits=64"]);
    // A snapshot shares clusters (refcount 2): 1-bit entries cannot hold it.
    const r = await same(img.snap ?? "", ["-o", "refcount_bits=1"]);
    expect(r.stderr).toMatch(/Cannot decrease refcount entry width to 1 bits: Cluster at offset 0x/);
    await same(v3, ["-o", "size=128M"]);
    await same(v3, ["-o", "size=16M"]);
    await same(img.v2 ?? "", ["-o", "size=1G,compat=1.1"]);
  });

  it("refuses what qemu-img refuses", async () => {
    const v3 = img.v3 ?? "";
    for (const opts of [
      "cluster_size=4k",
      "foo=bar",
      "compat=2",
      "lazy_refcounts=maybe",
      "refcount_bits=abc",
      "refcount_bits=3",
      "backing_file=x.qcow2",
      "backing_fmt=raw",
      "data_file=x",
      "data_file_raw=on",
      "encrypt.format=luks",
      "encrypt.new-secret=x",
      "refcount_bits=1,compat=0.10",
      "size=abc",
    ]) {
      await same(v3, ["-o", opts]);
    }
    await same(img.v2 ?? "", ["-o", "lazy_refcounts=on"]);
    await same(img.v2 ?? "", ["-o", "refcount_bits=8"]);
    await same(img.overlay ?? "", ["-o", `backing_file=${img.v3 ?? ""},backing_fmt=qcow2`]);
    await same(img.extl2 ?? "", ["-o", "compat=0.10"]);
    await same(img.zstd ?? "", ["-o", "compat=0.10"]);
    await same(v3, ["-o", "help"]);
    await same(v3, ["-t", "bogus", "-o", "compat=1.1"]);
  });

  it("messages without an image", async () => {
    for (const args of [
      ["amend"],
      ["amend", "-o", "compat=1.1"],
      ["amend", "-o", "compat=1.1", "a", "b"],
      ["amend", "-f", "qcow2", "-o", "help"],
      ["amend", "-f", "raw", "-o", "help"],
    ]) {
      const q = await qemu(args);
      expect(await blk(args)).toEqual({ code: q.code, stdout: q.stdout, stderr: norm(q.stderr) });
    }
  });
});
