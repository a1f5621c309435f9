/**
 * `blk-img snapshot` against `qemu-img snapshot` 7.2: the `-l` table byte for byte, messages and exit
 * codes of the failures, and snapshots made / applied / deleted by one tool seen identically by the other,
 * with `qemu-img check` clean after every operation.
 */
import { copyFileSync, readFileSync } from "node:fs";
import { run, sha256 } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { blk } from "./helpers.ts";
import { Fixtures, missing, norm, qemu } from "./qemu.ts";

const fx = new Fixtures("blk-img-snap");
afterAll(() => fx.dispose());

async function qio(file: string, ...cmds: string[]): Promise<void> {
  const r = await run("qemu-io", ["-f", "qcow2", ...cmds.flatMap((c) => ["-c", c]), file], {
    timeoutMs: 30_000,
  });
  if (r.code !== 0) throw new Error(`qemu-io failed: ${r.stderr}`);
}

/** A 16 MiB qcow2 image with some data (qemu-img create + qemu-io). */
async function image(name = "s.qcow2", opts: string[] = []): Promise<string> {
  const p = fx.path(name);
  await qemu(["create", "-q", "-f", "qcow2", ...opts, p, "16M"]);
  await qio(p, "write -P 0x11 0 128k", "write -P 0x12 4M 64k");
  return p;
}

/** Two identical copies of `src`, one for each tool. */
function pair(src: string): { q: string; b: string } {
  const q = fx.path("q.qcow2");
  const b = fx.path("b.qcow2");
  copyFileSync(src, q);
  copyFileSync(src, b);
  return { q, b };
}

async function expectClean(file: string): Promise<void> {
  const r = await qemu(["check", file]);
  expect(r.stdout).toContain("No errors were found on the image.");
  expect(r.code).toBe(0);
}

async function rawSha(file: string, snap?: string): Promise<string> {
  const out = fx.path("out.raw");
  const r = await qemu(["convert", ...(snap === undefined ? [] : ["-l", snap]), "-O", "raw", file, out]);
  if (r.code !== 0) throw new Error(r.stderr);
  return sha256(readFileSync(out));
}

/** Runs one command with both tools on their own copy; output compared with the file names swapped. */
async function compare(args: readonly string[], src: string): Promise<{ q: string; b: string }> {
  const { q, b } = pair(src);
  const rq = await qemu([...args, q]);
  const rb = await blk([...args, b]);
  expect({ code: rb.code, stdout: rb.stdout, stderr: rb.stderr.replaceAll(b, q) }).toEqual({
    code: rq.code,
    stdout: norm(rq.stdout),
    stderr: norm(rq.stderr),
  });
  return { q, b };
}

describe.skipIf(missing.length > 0)("blk-img snapshot vs qemu-img", { timeout: 120_000 }, () => {
  it("lists nothing without snapshots, and qemu-img's table with them", async () => {
    const src = await image();
    await compare(["snapshot", "-l"], src);
    await compare(["snapshot"], src);
    await qemu(["snapshot", "-c", "s1", src]);
    await qemu(["snapshot", "-c", "a-rather-long-snapshot-name-xyz", src]);
    await qemu(["snapshot", "-c", "", src]);
    await qemu(["snapshot", "-c", "s1", src]);
    await qemu(["snapshot", "-d", "a-rather-long-snapshot-name-xyz", src]);
    await compare(["snapshot", "-l"], src);
    await compare(["snapshot", "-U", "-q", "-l"], src);
    await compare(["snapshot", "-U"], src); // listing by default opens read-write
    const b = await blk(["snapshot", "-l", src]);
    expect(b.stdout.split("\n")[2]).toMatch(
      /^1 {9}s1 {20}0 B \d{4}-\d\d-\d\d \d\d:\d\d:\d\d 00:00:00\.000 {10}0$/,
    );
  });

  it.each([
    [["snapshot", "-l", "-c", "x"]],
    [["snapshot", "-c", "x", "-d", "y"]],
    [["snapshot", "-l", "-l"]],
    [["snapshot", "-x"]],
    [["snapshot", "-f", "qcow2", "-l"]],
    [["snapshot", "-a", "nosuch"]],
    [["snapshot", "-d", "nosuch"]],
    [["snapshot", "-d", "1"]],
    [["snapshot", "-U", "-c", "z"]],
    [["snapshot", "-l", "extra-operand"]],
  ])("%j: same messages and exit code", async (args) => {
    const src = await image();
    await qemu(["snapshot", "-c", "s1", src]);
    await compare(args, src);
  });

  it("fails like qemu-img on a missing file, without a file name, and past refcount_bits=1", async () => {
    const none = fx.path("none.qcow2");
    const q = await qemu(["snapshot", "-l", none]);
    const b = await blk(["snapshot", "-l", none]);
    expect({ code: b.code, stderr: b.stderr }).toEqual({ code: q.code, stderr: norm(q.stderr) });
    const q2 = await qemu(["snapshot", "-c", "x"]);
    const b2 = await blk(["snapshot", "-c", "x"]);
    expect(b2).toEqual({ ...q2, stderr: norm(q2.stderr) });
    const src = await image("r1.qcow2", ["-o", "refcount_bits=1"]);
    const { b: bf } = await compare(["snapshot", "-c", "x"], src);
    await expectClean(bf);
  });

  it("raw images: -l prints nothing, -c/-a/-d fail as in qemu-img", async () => {
    const p = fx.path("r.raw");
    await qemu(["create", "-q", "-f", "raw", p, "1M"]);
    for (const args of [["-l"], ["-c", "x"], ["-a", "x"], ["-d", "x"]]) {
      const q = await qemu(["snapshot", ...args, p]);
      const b = await blk(["snapshot", ...args, p]);
      expect({ code: b.code, stdout: b.stdout, last: b.stderr.trim().split("\n").at(-1) }).toEqual({
        code: q.code,
        stdout: q.stdout,
        last: norm(q.stderr).trim().split("\n").at(-1),
      });
    }
  });

  it("create / apply / delete interoperate, check clean after each step", async () => {
    const f = await image();
    const v1 = await rawSha(f);
    expect(await blk(["snapshot", "-c", "one", f])).toEqual({ code: 0, stdout: "", stderr: "" });
    await expectClean(f);
    await qio(f, "write -P 0x21 64k 64k", "write -P 0x22 8M 4k");
    const v2 = await rawSha(f);
    await qemu(["snapshot", "-c", "two", f]);
    await qio(f, "write -P 0x31 0 4k");
    const v3 = await rawSha(f);
    // both tools list the same table
    const lq = await qemu(["snapshot", "-l", f]);
    const lb = await blk(["snapshot", "-l", f]);
    expect(lb.stdout).toBe(lq.stdout);
    expect(lb.stdout).toMatch(/\n1 +one .*\n2 +two /);
    expect(await rawSha(f, "one")).toBe(v1);
    expect(await rawSha(f, "two")).toBe(v2);
    // info (JSON snapshots) and check agree
    const cq = await qemu(["check", f]);
    expect(await blk(["check", f])).toEqual({ ...cq, stderr: norm(cq.stderr) });
    const jq = await qemu(["check", "--output=json", f]);
    const jb = await blk(["check", "--output=json", f]);
    expect(JSON.parse(jb.stdout)).toEqual(JSON.parse(jq.stdout));
    const snaps = async (r: Promise<{ stdout: string }>): Promise<unknown> =>
      (JSON.parse((await r).stdout) as { snapshots?: unknown }).snapshots;
    expect(await snaps(blk(["info", "--output=json", f]))).toEqual(
      await snaps(qemu(["info", "--output=json", f])),
    );
    // blk applies by ID and by name
    expect((await blk(["snapshot", "-a", "1", f])).code).toBe(0);
    await expectClean(f);
    expect(await rawSha(f)).toBe(v1);
    expect((await blk(["snapshot", "-a", "two", f])).code).toBe(0);
    await expectClean(f);
    expect(await rawSha(f)).toBe(v2);
    await qio(f, "write -P 0x41 32k 4k");
    expect(await rawSha(f, "two")).toBe(v2);
    // qemu-img applies blk's snapshot
    expect((await qemu(["snapshot", "-a", "one", f])).code).toBe(0);
    await expectClean(f);
    expect(await rawSha(f)).toBe(v1);
    // blk deletes by name only; IDs keep growing
    expect((await blk(["snapshot", "-d", "one", f])).code).toBe(0);
    await expectClean(f);
    expect((await blk(["snapshot", "-c", "three", f])).code).toBe(0);
    await expectClean(f);
    const j = JSON.parse((await qemu(["info", "--output=json", f])).stdout) as {
      snapshots: { id: string; name: string }[];
    };
    expect(j.snapshots.map((s) => `${s.id}:${s.name}`)).toEqual(["2:two", "3:three"]);
    expect(await rawSha(f, "two")).toBe(v2);
    expect(await rawSha(f, "three")).toBe(v1);
    expect(v3).not.toBe(v1);
    expect((await qemu(["snapshot", "-d", "three", f])).code).toBe(0);
    expect((await blk(["snapshot", "-d", "two", f])).code).toBe(0);
    await expectClean(f);
    expect((await blk(["snapshot", "-l", f])).stdout).toBe("");
    expect(await rawSha(f)).toBe(v1);
  });
});
