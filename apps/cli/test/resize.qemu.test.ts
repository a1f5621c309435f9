/**
 * `blk-img resize` on qcow2 against `qemu-img resize` 7.2, each on its own copy of the same image: growing
 * (with L1 table growth), `--shrink` (clusters past the end freed, L1 and file cut), relative sizes,
 * snapshots, a backing file longer than the image, and the refusals. After each pair: the same messages
 * and exit code, `qemu-img info` and `qemu-img check --output=json` equal, the guest content equal.
 */
import { copyFileSync, statSync } from "node:fs";
import { run } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { blk } from "./helpers.ts";
import { Fixtures, missing, norm, qemu } from "./qemu.ts";

const fx = new Fixtures("blk-img-resize");
afterAll(() => fx.dispose());

async function qio(file: string, ...cmds: string[]): Promise<void> {
  const r = await run("qemu-io", ["-f", "qcow2", ...cmds.flatMap((c) => ["-c", c]), file], {
    timeoutMs: 30_000,
  });
  if (r.code !== 0) throw new Error(`qemu-io failed: ${r.stderr}`);
}

/** A qcow2 image made by qemu-img create with `opts`, then `writes` by qemu-io. */
async function image(size: string, opts: string[], writes: string[], backing?: string): Promise<string> {
  const p = fx.path("src.qcow2");
  const b = backing === undefined ? [] : ["-b", backing, "-F", "raw"];
  const r = await qemu(["create", "-q", "-f", "qcow2", ...opts, ...b, p, size]);
  if (r.code !== 0) throw new Error(r.stderr);
  if (writes.length > 0) await qio(p, ...writes);
  return p;
}

/** `qemu-img info` without the fields that name the file or its allocation on the host. */
async function info(file: string): Promise<Record<string, unknown>> {
  const r = await qemu(["info", "--output=json", file]);
  const j = JSON.parse(r.stdout) as Record<string, unknown>;
  delete j.filename;
  delete j["actual-size"];
  delete j["backing-filename"];
  delete j["full-backing-filename"];
  return j;
}

async function check(file: string): Promise<{ code: number; json: Record<string, unknown> }> {
  const r = await qemu(["check", "--output=json", file]);
  const json = JSON.parse(r.stdout) as Record<string, unknown>;
  delete json.filename;
  return { code: r.code, json };
}

/** Runs resize with `args` on a copy of `src` through each tool and compares everything. */
async function compare(src: string, args: string[]): Promise<{ code: number; stderr: string }> {
  const q = fx.path("q.qcow2");
  const b = fx.path("b.qcow2");
  copyFileSync(src, q);
  copyFileSync(src, b);
  const size = args.at(-1) ?? "";
  const opts = args.slice(0, -1);
  const rq = await qemu(["resize", ...opts, q, size]);
  const rb = await blk(["resize", ...opts, b, size]);
  expect(rb.stderr).toBe(norm(rq.stderr).replaceAll(q, b));
  expect(rb.stdout).toBe(rq.stdout);
  expect(rb.code).toBe(rq.code);
  expect(await info(b)).toEqual(await info(q));
  const [cq, cb] = [await check(q), await check(b)];
  expect(cb).toEqual(cq);
  expect(cb.code).toBe(0);
  const same = await qemu(["compare", "-f", "qcow2", "-F", "qcow2", q, b]);
  expect(same.stdout).toBe("Images are identical.\n");
  if (rq.code === 0) expect(statSync(b).size).toBe(statSync(q).size);
  return { code: rb.code, stderr: rb.stderr };
}

describe.skipIf(missing.length > 0)("blk-img resize vs qemu-img resize (qcow2)", { tags: ["qemu"] }, () => {
  it("grows, moving the L1 table to a larger one", async () => {
    const src = await image("64M", [], ["write -P 0x11 0 1M", "write -P 0x12 60M 1M"]);
    expect((await compare(src, ["100G"])).code).toBe(0);
    expect((await compare(src, ["+1G"])).code).toBe(0);
    expect((await compare(src, ["+512"])).code).toBe(0);
  });

  it("grows an image with 512-byte clusters over many L1 clusters", async () => {
    const src = await image(
      "1M",
      ["-o", "cluster_size=512"],
      ["write -P 0x21 0 64k", "write -P 0x22 1000k 24k"],
    );
    expect((await compare(src, ["200M"])).code).toBe(0);
  });

  it("shrinks with --shrink: clusters past the end freed, the file cut", async () => {
    const src = await image(
      "64M",
      [],
      ["write -P 0x11 0 1M", "write -P 0x12 60M 1M", "write -P 0x13 31M 2M"],
    );
    expect((await compare(src, ["--shrink", "32M"])).code).toBe(0);
    expect((await compare(src, ["--shrink", "-40M"])).code).toBe(0);
    expect((await compare(src, ["--shrink", "31M"])).code).toBe(0);
    expect((await compare(src, ["--shrink", String(31 * 2 ** 20 + 4096)])).code).toBe(0);
  });

  it("shrinks and grows across L2 tables with 4 KiB clusters", async () => {
    const src = await image(
      "64M",
      ["-o", "cluster_size=4k"],
      ["write -P 0x31 0 64k", "write -P 0x32 3M 64k", "write -P 0x33 40M 512k", "write -z 50M 1M"],
    );
    expect((await compare(src, ["--shrink", "3M"])).code).toBe(0);
    expect((await compare(src, ["--shrink", "2M"])).code).toBe(0);
    expect((await compare(src, ["1G"])).code).toBe(0);
  });

  it("grows with --preallocation=metadata", async () => {
    const src = await image("3M", ["-o", "cluster_size=4k"], ["write -P 0x71 0 5k", "write -P 0x72 2M 64k"]);
    expect((await compare(src, ["--preallocation=metadata", "6M"])).code).toBe(0);
    expect((await compare(src, ["--preallocation=metadata", "+5000192"])).code).toBe(0);
    const big = await image("64M", [], ["write -P 0x73 0 1M"]);
    expect((await compare(big, ["--preallocation=metadata", "1G"])).code).toBe(0);
  });

  it("shrinks an image with compressed clusters", async () => {
    const raw = fx.path("c.raw");
    await qemu(["create", "-q", "-f", "raw", raw, "8M"]);
    const w = await run("qemu-io", ["-f", "raw", "-c", "write -P 0x61 0 8M", raw], { timeoutMs: 30_000 });
    expect(w.code).toBe(0);
    const src = fx.path("c.qcow2");
    expect((await qemu(["convert", "-c", "-O", "qcow2", raw, src])).code).toBe(0);
    expect((await compare(src, ["--shrink", "3M"])).code).toBe(0);
    expect((await compare(src, ["--shrink", String(3 * 2 ** 20 + 512)])).code).toBe(0);
  });

  it("resizes a v3 image with internal snapshots", async () => {
    const src = await image("16M", [], ["write -P 0x41 0 256k", "write -P 0x42 12M 1M"]);
    const r = await qemu(["snapshot", "-c", "s1", src]);
    expect(r.code).toBe(0);
    await qio(src, "write -P 0x43 12M 64k");
    expect((await compare(src, ["--shrink", "8M"])).code).toBe(0);
    expect((await compare(src, ["4G"])).code).toBe(0);
  });

  it("makes the new area read zeroes over a longer backing file", async () => {
    const base = fx.path("base.raw");
    await qemu(["create", "-q", "-f", "raw", base, "8M"]);
    const w = await run("qemu-io", ["-f", "raw", "-c", "write -P 0x55 0 8M", base], { timeoutMs: 30_000 });
    expect(w.code).toBe(0);
    const src = await image("4000256", [], ["write -P 0x56 0 64k"], base);
    expect((await compare(src, ["6000128"])).code).toBe(0);
    expect((await compare(src, ["16M"])).code).toBe(0);
  });

  it("refuses what qemu-img refuses, with its messages", async () => {
    const src = await image("16M", [], ["write -P 0x11 0 64k"]);
    expect((await compare(src, ["8M"])).code).toBe(1);
    expect((await compare(src, ["20000001"])).stderr).toContain("The new size must be a multiple of 512");
    expect((await compare(src, ["--shrink", "--preallocation=full", "8M"])).code).toBe(1);
    const v2 = await image("16M", ["-o", "compat=0.10"], ["write -P 0x11 0 64k"]);
    expect((await qemu(["snapshot", "-c", "s1", v2])).code).toBe(0);
    expect((await compare(v2, ["32M"])).stderr).toContain("Can't resize a v2 image which has snapshots");
  });
});
