/**
 * `blk-img measure` against `qemu-img measure` 7.2: the same numbers (human and JSON) for many sizes and
 * qcow2 options, for sparse and dense raw sources, a 3-image qcow2 chain, v2 and bitmap-carrying images,
 * an internal snapshot (`-l`), and the same failures.
 */
import { copyFileSync } from "node:fs";
import { afterAll, describe, expect, it } from "vitest";
import { makeChain, qemuOk, qio } from "./chain.ts";
import { blk } from "./helpers.ts";
import { Fixtures, missing, norm, qemu } from "./qemu.ts";

const fx = new Fixtures("blk-img-measure");
afterAll(() => fx.dispose());

/** Runs both tools; everything must match. */
async function same(args: readonly string[]): Promise<string> {
  const q = await qemu(args);
  const b = await blk(args);
  expect({ args, code: b.code, stdout: b.stdout, stderr: b.stderr }).toEqual({
    args,
    code: q.code,
    stdout: norm(q.stdout),
    stderr: norm(q.stderr),
  });
  return b.stdout;
}

describe.skipIf(missing.length > 0)("blk-img measure vs qemu-img", { timeout: 120_000 }, () => {
  it("--size: the numbers of qemu-img over sizes and qcow2 options", async () => {
    const sizes = ["0", "1", "1000", "64M", "1G", "1000G", "3T"];
    const options = [
      "",
      "cluster_size=512",
      "cluster_size=4k,refcount_bits=1",
      "cluster_size=2M,refcount_bits=64",
      "cluster_size=16k,extended_l2=on",
      "extended_l2=on",
      "preallocation=full",
      "preallocation=metadata",
      "compat=0.10",
      "refcount_bits=8,lazy_refcounts=on",
    ];
    for (const size of sizes) {
      await same(["measure", "--size", size]);
      for (const o of options) {
        const args = ["measure", "--output=json", "-O", "qcow2", "--size", size];
        await same(o === "" ? args : [...args, "-o", o]);
      }
    }
    await same(["measure", "-O", "qcow2", "--size", "1G", "-o", "cluster_size=4k", "-o", "refcount_bits=2"]);
  });

  it("sources: sparse and dense raw files, a qcow2 chain, v2, bitmaps, a snapshot", async () => {
    const sparse = fx.path("sparse.raw");
    await qemuOk(["create", "-q", "-f", "raw", sparse, "100M"]);
    await qio(sparse, ["write -P 1 1000 5000", "write -P 2 50M 1M", "write -P 3 99M 4k"], "raw");
    const dense = fx.dense(7, (3 << 20) + 4096);
    const c = await makeChain(fx);
    const v2 = fx.path("v2.qcow2");
    await qemuOk(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "10M"]);
    await qio(v2, ["write -P 5 0 1M"]);
    const bm = fx.path("bm.qcow2");
    copyFileSync(c.base, bm);
    await qemuOk(["bitmap", "--add", bm, "b1"]);
    await qemuOk(["bitmap", "--add", "-g", "512", bm, "a-longer-bitmap-name"]);
    const sn = fx.path("sn.qcow2");
    copyFileSync(c.base, sn);
    await qemuOk(["snapshot", "-c", "s1", sn]);
    await qio(sn, ["write -P 9 20M 3M"]);
    for (const src of [sparse, dense, c.top, c.mid, c.base, v2, bm]) {
      await same(["measure", src]);
      await same(["measure", "-O", "qcow2", src]);
      await same(["measure", "--output=json", "-O", "qcow2", "-o", "cluster_size=4k", src]);
      await same(["measure", "-O", "qcow2", "-o", "cluster_size=2M,extended_l2=on,compat=0.10", src]);
    }
    await same(["measure", "-O", "qcow2", "-o", "backing_file=x", c.top]);
    await same(["measure", "-O", "qcow2", "-o", "preallocation=falloc", sparse]);
    const current = await same(["measure", "-O", "qcow2", sn]);
    const old = await same(["measure", "-O", "qcow2", "-l", "s1", sn]);
    expect(old).not.toBe(current);
    await same(["measure", "-O", "qcow2", "-l", "snapshot.id=1", sn]);
    await same(["measure", "-O", "qcow2", "-l", "nosuch", sn]);
  });

  it("fails as qemu-img does", async () => {
    const img = fx.path("i.qcow2");
    await qemuOk(["create", "-q", "-f", "qcow2", img, "1M"]);
    for (const args of [
      [],
      ["-f", "qcow2"],
      ["a", "b"],
      ["--size", "1M", img],
      ["--size", "abc"],
      ["--size", "-1"],
      ["--output=xml", "--size", "1"],
      ["-O", "bogus", "--size", "1"],
      ["-O", "vmdk", "--size", "1"],
      ["-O", "qcow2", "-o", "help"],
      ["-O", "qcow2", "--size", "1", "-o", "foo=bar"],
      ["-O", "raw", "--size", "1", "-o", "cluster_size=4k"],
      ["-O", "qcow2", "--size", "1", "-o", "cluster_size=1000"],
      ["-O", "qcow2", "--size", "1", "-o", "cluster_size=abc"],
      ["-O", "qcow2", "--size", "1", "-o", "extended_l2=maybe"],
      ["-O", "qcow2", "--size", "1", "-o", "extended_l2=on,cluster_size=4k"],
      ["-O", "qcow2", "--size", "1", "-o", "refcount_bits=3"],
      ["-O", "qcow2", "--size", "1", "-o", "refcount_bits=abc"],
      ["-O", "qcow2", "--size", "1", "-o", "compat=0.10,refcount_bits=8"],
      ["-O", "qcow2", "--size", "1", "-o", "compat=v3"],
      ["-O", "qcow2", "--size", "1", "-o", "preallocation=bogus"],
      ["-O", "qcow2", "--size", "1P", "-o", "cluster_size=512"],
      ["-O", "qcow2", fx.path("missing.qcow2")],
    ]) {
      await same(["measure", ...args]);
    }
  });
});
