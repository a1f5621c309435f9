/**
 * `blk-img bitmap` against `qemu-img bitmap` 7.2 on copies of the same image: messages and exit codes of
 * the failures, and after each sequence of actions the same `qemu-img info --output=json` bitmaps, the
 * same dirty extents as qemu-storage-daemon exports them (nbdinfo --map=qemu:dirty-bitmap:NAME), and
 * `qemu-img check` clean. `blk-img info` lists the bitmaps as qemu-img's does.
 */
import { copyFileSync, existsSync } from "node:fs";
import { missingPeers, run, spawnPeer } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { blk } from "./helpers.ts";
import { Fixtures, norm, qemu } from "./qemu.ts";

const missing = missingPeers(["qemu-img", "qemu-io", "qemu-storage-daemon", "nbdinfo"]);
if (missing.length > 0) console.log(`bitmap.qemu.test: skipped, missing ${missing.join(", ")}`);
const fx = new Fixtures("blk-img-bitmap");
afterAll(() => fx.dispose());

async function qio(file: string, ...cmds: string[]): Promise<void> {
  const r = await run("qemu-io", ["-f", "qcow2", ...cmds.flatMap((c) => ["-c", c]), file], {
    timeoutMs: 30_000,
  });
  if (r.code !== 0) throw new Error(`qemu-io failed: ${r.stderr}`);
}

/** A 16 MiB qcow2 image with some data. */
async function image(opts: string[] = []): Promise<string> {
  const p = fx.path("src.qcow2");
  await qemu(["create", "-q", "-f", "qcow2", ...opts, p, "16M"]);
  await qio(p, "write -P 0x11 0 128k");
  return p;
}

/** The `bitmaps` of `qemu-img info --output=json` (undefined without any). */
async function infoBitmaps(file: string): Promise<unknown> {
  const r = await qemu(["info", "--output=json", file]);
  expect(r.code, r.stderr).toBe(0);
  const info = JSON.parse(r.stdout) as { "format-specific"?: { data?: { bitmaps?: unknown } } };
  return info["format-specific"]?.data?.bitmaps;
}

/** nbdinfo's map of `name` as qemu-storage-daemon exports it from `file` (read-only). */
async function dirtyMap(file: string, name: string): Promise<string> {
  const sock = fx.path("nbd.sock");
  const pid = fx.path("qsd.pid");
  await using qsd = await spawnPeer(
    "qemu-storage-daemon",
    [
      "--blockdev",
      `driver=file,filename=${file},node-name=f,read-only=on`,
      "--blockdev",
      "driver=qcow2,file=f,node-name=d,read-only=on",
      "--nbd-server",
      `addr.type=unix,addr.path=${sock}`,
      "--export",
      `type=nbd,id=e,node-name=d,name=x,bitmaps.0=${name}`,
      "--pidfile",
      pid,
    ],
    // the pid file is written once every socket listens
    { timeoutMs: 60_000, ready: () => existsSync(pid) },
  );
  const args = [`--map=qemu:dirty-bitmap:${name}`, `nbd+unix:///x?socket=${sock}`];
  const r = await run("nbdinfo", args, { timeoutMs: 30_000 });
  expect(r.code, r.stderr + qsd.output()).toBe(0);
  return r.stdout;
}

async function expectClean(file: string): Promise<void> {
  const r = await qemu(["check", file]);
  expect(r.stdout, r.stderr).toContain("No errors were found on the image.");
  expect(r.code).toBe(0);
}

/** Two identical copies of `src`: q for qemu-img, b for blk-img. */
function pair(src: string): { q: string; b: string } {
  const q = fx.path("q.qcow2");
  const b = fx.path("b.qcow2");
  copyFileSync(src, q);
  copyFileSync(src, b);
  return { q, b };
}

/**
 * Runs `bitmap …` with both tools, `%F` in `args` standing for each tool's copy; exit code and output
 * must match (file names swapped).
 */
async function step(p: { q: string; b: string }, args: readonly string[]): Promise<void> {
  const rq = await qemu(["bitmap", ...args.map((a) => a.replaceAll("%F", p.q))]);
  const rb = await blk(["bitmap", ...args.map((a) => a.replaceAll("%F", p.b))]);
  expect(
    { code: rb.code, stdout: rb.stdout, stderr: rb.stderr.replaceAll(p.b, p.q) },
    args.join(" "),
  ).toEqual({
    code: rq.code,
    stdout: norm(rq.stdout),
    stderr: norm(rq.stderr),
  });
}

/** Both copies list the same bitmaps, with the same dirty extents each, and check clean. */
async function same(p: { q: string; b: string }): Promise<void> {
  const bq = await infoBitmaps(p.q);
  expect(await infoBitmaps(p.b)).toEqual(bq);
  for (const { name } of (bq ?? []) as { name: string }[]) {
    expect(await dirtyMap(p.b, name), name).toBe(await dirtyMap(p.q, name));
  }
  await expectClean(p.q);
  await expectClean(p.b);
}

describe.skipIf(missing.length > 0)("blk-img bitmap vs qemu-img", { timeout: 120_000 }, () => {
  it.each([
    [[]],
    [["--add", "%F"]],
    [["-g", "64k", "--clear", "%F", "x"]],
    [["-F", "qcow2", "--add", "%F", "x"]],
    [["-b", "%F", "--add", "%F", "x"]],
    [["--add", "-g", "1.5k", "%F", "x"]],
    [["--add", "-g", "abc", "%F", "x"]],
    [["--clear", "%F", "nope"]],
    [["--remove", "%F", "nope"]],
    [["--enable", "%F", "nope"]],
    [["--merge", "nope", "%F", "nope2"]],
    [["--merge"]],
    [["--frobnicate", "%F", "x"]],
    [["--add", "%F", "x", "extra"]],
  ])("fails as qemu-img: %j", async (args) => {
    await step(pair(await image()), args);
  });

  it("add, clear, enable, disable, merge and remove give the same images", async () => {
    const p = pair(await image());
    await step(p, ["--add", "%F", "b1"]);
    await step(p, ["--add", "-g", "4k", "--disable", "%F", "d"]);
    await step(p, ["--add", "%F", "b1"]); // already exists
    await same(p);
    for (const f of [p.q, p.b]) await qio(f, "write 1M 64k", "write 3M 4k");
    await same(p);
    await step(p, ["--add", "-g", "512", "--merge", "b1", "%F", "m"]);
    await step(p, ["--enable", "%F", "d"]);
    await step(p, ["--disable", "%F", "b1"]);
    for (const f of [p.q, p.b]) await qio(f, "write 7M 8k");
    await same(p);
    await step(p, ["--clear", "%F", "b1"]);
    await step(p, ["--merge", "m", "%F", "d"]);
    await same(p);
    await step(p, ["--remove", "%F", "m"]);
    await step(p, ["--remove", "--add", "%F", "b1"]);
    await same(p);
    await step(p, ["--remove", "%F", "b1"]);
    await step(p, ["--remove", "%F", "d"]);
    expect(await infoBitmaps(p.b)).toBeUndefined();
    await same(p);
  });

  it("merges from another image with -b / -F", async () => {
    const other = await image();
    await qemu(["bitmap", "--add", other, "src"]);
    await qio(other, "write 5M 100k");
    const p = pair(await image());
    await step(p, ["--add", "%F", "t"]);
    await step(p, ["--merge", "src", "-b", other, "-F", "qcow2", "%F", "t"]);
    await step(p, ["--merge", "nope", "-b", other, "%F", "t"]);
    await same(p);
  });

  it("refuses what qemu-img refuses: v2 images, inconsistent bitmaps", async () => {
    const p = pair(await image(["-o", "compat=0.10"]));
    // the node name in the message differs (#blockNNN): compare the rest
    const rq = await qemu(["bitmap", "--add", p.q, "x"]);
    const rb = await blk(["bitmap", "--add", p.b, "x"]);
    expect(rb.code).toBe(rq.code);
    const strip = (s: string): string => s.replace(/in '[^']*'/, "in 'NODE'");
    expect(strip(rb.stderr)).toBe(strip(norm(rq.stderr)));

    // a bitmap left in use by a crash of its writer (qemu-io abort)
    const crashed = await image();
    await qemu(["bitmap", "--add", crashed, "b1"]);
    await run("qemu-io", ["-f", "qcow2", "-c", "write 0 64k", "-c", "abort", crashed], { timeoutMs: 30_000 });
    const c = pair(crashed);
    expect(await infoBitmaps(c.b)).toEqual([{ flags: ["in-use", "auto"], name: "b1", granularity: 65536 }]);
    await step(c, ["--clear", "%F", "b1"]);
    await step(c, ["--enable", "%F", "b1"]);
    await step(c, ["--remove", "%F", "b1"]);
    await same(c);
  });

  it("info lists the bitmaps as qemu-img info", async () => {
    const src = await image();
    await qemu(["bitmap", "--add", src, "b1"]);
    await qemu(["bitmap", "--add", "-g", "8k", "--disable", src, "b2"]);
    const rq = await qemu(["info", "--output=json", src]);
    const rb = await blk(["info", "--output=json", src]);
    const fs = (s: string): unknown => (JSON.parse(s) as Record<string, unknown>)["format-specific"];
    expect(fs(rb.stdout)).toEqual(fs(rq.stdout));
    const human = (s: string): string[] => s.split("\n").filter((l) => /^ {8,}/.test(l));
    expect(human((await blk(["info", src])).stdout)).toEqual(human((await qemu(["info", src])).stdout));
  });
});
