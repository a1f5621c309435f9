/**
 * `blk-img convert -c -O qcow2` against qemu-img 7.2: the target reads back byte-identically through
 * qemu-img, `qemu-img check` is clean with the same number of compressed clusters, and `map` / `info`
 * show what they show for qemu-img's own compressed image.
 */
import { readFileSync, statSync, writeFileSync } from "node:fs";
import { pattern, run, sha256 } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { blk } from "./helpers.ts";
import { Fixtures, missing, norm, qemu } from "./qemu.ts";

const fx = new Fixtures("blk-img-comp");
afterAll(() => fx.dispose());

async function rawSha(file: string): Promise<string> {
  const out = fx.path("out.raw");
  const r = await qemu(["convert", "-O", "raw", file, out]);
  if (r.code !== 0) throw new Error(r.stderr);
  return sha256(readFileSync(out));
}

interface Check {
  corruptions?: number;
  leaks?: number;
  "compressed-clusters"?: number;
  "allocated-clusters"?: number;
}

async function check(file: string): Promise<Check & { code: number }> {
  const r = await qemu(["check", "--output=json", file]);
  return { code: r.code, corruptions: 0, leaks: 0, ...(JSON.parse(r.stdout) as Check) };
}

/** A qcow2 source: compressible data, a zero cluster, incompressible data, a partial last cluster. */
async function qcow2Source(clusterSize = "64k"): Promise<string> {
  const p = fx.path("src.qcow2");
  await qemu(["create", "-q", "-f", "qcow2", "-o", `cluster_size=${clusterSize}`, p, "3148800"]);
  const io = [
    "write -P 0x61 0 64k",
    "write -P 0x62 64k 64k",
    "write -z 128k 64k",
    "write -P 0x63 1M 4k",
    "write -P 0x64 3145728 3072",
  ];
  const r = await run("qemu-io", ["-f", "qcow2", ...io.flatMap((c) => ["-c", c]), p], { timeoutMs: 30_000 });
  if (r.code !== 0) throw new Error(r.stderr + r.stdout);
  // incompressible data at 2M (written through a raw copy)
  const raw = fx.path("tmp.raw");
  await qemu(["convert", "-O", "raw", p, raw]);
  const buf = readFileSync(raw);
  buf.set(pattern(3, 0, 131072), 2 << 20);
  writeFileSync(raw, buf);
  await qemu(["convert", "-O", "qcow2", "-o", `cluster_size=${clusterSize}`, raw, p]);
  return p;
}

describe.skipIf(missing.length > 0)("blk-img convert -c vs qemu-img", { timeout: 120_000 }, () => {
  it.each([["64k"], ["4k"]])("qcow2 source, cluster_size=%s: same data, check, map and info", async (cs) => {
    const src = await qcow2Source(cs);
    const q = fx.path("q.qcow2");
    const b = fx.path("b.qcow2");
    const rq = await qemu(["convert", "-c", "-O", "qcow2", "-o", `cluster_size=${cs}`, src, q]);
    const rb = await blk(["convert", "-c", "-O", "qcow2", "-o", `cluster_size=${cs}`, src, b]);
    expect(rb).toEqual({ ...rq, stderr: norm(rq.stderr) });
    expect(await rawSha(b)).toBe(await rawSha(src));
    const cq = await check(q);
    const cb = await check(b);
    expect(cb).toMatchObject({ code: 0, corruptions: 0, leaks: 0 });
    expect(cb["compressed-clusters"]).toBe(cq["compressed-clusters"]);
    expect(cb["compressed-clusters"]).toBeGreaterThan(0);
    expect(statSync(b).size % 512).toBe(0);
    const hq = await qemu(["check", b]);
    expect(await blk(["check", b])).toEqual({ ...hq, stderr: norm(hq.stderr) });
    const jq = await qemu(["check", "--output=json", b]);
    const jb = await blk(["check", "--output=json", b]);
    expect(JSON.parse(jb.stdout)).toEqual(JSON.parse(jq.stdout));
    // qemu-img shows both images the same way
    const mq = await qemu(["map", "--output=json", q]);
    const mb = await qemu(["map", "--output=json", b]);
    expect(mb.stdout).toBe(mq.stdout);
    // and blk-img shows blk's image as qemu-img shows qemu-img's
    for (const argv of [["map", "--output=json"], ["map"]]) {
      const a = await qemu([...argv, q]);
      const c = await blk([...argv, b]);
      expect({ ...c, stderr: c.stderr.replaceAll(b, q) }).toEqual({ ...a, stderr: norm(a.stderr) });
    }
    const iq = JSON.parse((await qemu(["info", "--output=json", q])).stdout) as Record<string, unknown>;
    const ib = JSON.parse((await blk(["info", "--output=json", b])).stdout) as Record<string, unknown>;
    for (const k of ["virtual-size", "cluster-size", "format-specific", "dirty-flag"])
      expect(ib[k]).toEqual(iq[k]);
  });

  it("raw source with holes and an image size that is not a multiple of the cluster size", async () => {
    const src = fx.path("src.raw");
    await qemu(["create", "-q", "-f", "raw", src, "1000000"]);
    const io = ["write -P 0x11 4k 8k", "write -P 0x12 200k 100k", "write -P 0x13 999000 1000"];
    const r = await run("qemu-io", ["-f", "raw", ...io.flatMap((c) => ["-c", c]), src], {
      timeoutMs: 30_000,
    });
    expect(r.code).toBe(0);
    const q = fx.path("q.qcow2");
    const b = fx.path("b.qcow2");
    await qemu(["convert", "-c", "-f", "raw", "-O", "qcow2", src, q]);
    expect((await blk(["convert", "-c", "-f", "raw", "-O", "qcow2", src, b])).code).toBe(0);
    expect(await rawSha(b)).toBe(sha256(readFileSync(src)));
    const cq = await check(q);
    const cb = await check(b);
    expect(cb).toMatchObject({ code: 0, corruptions: 0, leaks: 0 });
    expect(cb["compressed-clusters"]).toBe(cq["compressed-clusters"]);
    expect((await qemu(["map", "--output=json", b])).stdout).toBe(
      (await qemu(["map", "--output=json", q])).stdout,
    );
  });

  it("refuses -c for raw targets as qemu-img does", async () => {
    const src = fx.path("s.raw");
    await qemu(["create", "-q", "-f", "raw", src, "1M"]);
    const q = await qemu(["convert", "-c", "-O", "raw", src, fx.path("o.raw")]);
    const b = await blk(["convert", "-c", "-O", "raw", src, fx.path("o2.raw")]);
    expect(b).toEqual({ ...q, stderr: norm(q.stderr) });
  });
});
