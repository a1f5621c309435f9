/**
 * Side-by-side helpers for the chain commands (commit, rebase, amend): identical 3-image qcow2 chains
 * made with qemu-img and qemu-io, one per tool, and comparisons of what qemu-img sees afterwards.
 */
import { cpSync, mkdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { run } from "@blk/testkit";
import { expect } from "vitest";
import { blk, type Captured } from "./helpers.ts";
import { type Fixtures, norm, qemu } from "./qemu.ts";

/** Runs qemu-io commands on an image of format `fmt` (default qcow2). */
export async function qio(file: string, cmds: readonly string[], fmt = "qcow2"): Promise<void> {
  const r = await run("qemu-io", ["-f", fmt, ...cmds.flatMap((c) => ["-c", c]), file], { timeoutMs: 30_000 });
  if (r.code !== 0) throw new Error(`qemu-io failed: ${r.stderr}`);
}

/** Runs qemu-img and fails the test on a non-zero exit. */
export async function qemuOk(argv: readonly string[]): Promise<Captured> {
  const r = await qemu(argv);
  if (r.code !== 0) throw new Error(`qemu-img ${argv.join(" ")} failed: ${r.stderr}`);
  return r;
}

/** A directory holding `base.qcow2` ← `mid.qcow2` ← `top.qcow2` (relative backing names). */
export interface Chain {
  dir: string;
  base: string;
  mid: string;
  top: string;
  /** A path in the chain's directory. */
  at(name: string): string;
}

function chainIn(dir: string): Chain {
  const at = (name: string): string => join(dir, name);
  return { dir, base: at("base.qcow2"), mid: at("mid.qcow2"), top: at("top.qcow2"), at };
}

/**
 * A fresh 64 MiB chain with overlapping writes: base has data at 0–1M and 4M–4.25M; mid overwrites
 * 512k–1.5M and zeroes 4M–4M+64k; top overwrites 768k–832k, writes 10M–10M+100k and zeroes 0–64k.
 * `opts` are extra `-o` options of every layer.
 */
export async function makeChain(fx: Fixtures, opts = ""): Promise<Chain> {
  let byOpts = templates.get(fx);
  if (byOpts === undefined) {
    byOpts = new Map();
    templates.set(fx, byOpts);
  }
  let template = byOpts.get(opts);
  if (template === undefined) {
    template = buildChain(fx, opts);
    byOpts.set(opts, template);
  }
  return copyChain(fx, await template);
}

/** One chain per fixture set and options, copied for every use (building one takes ten tool runs). */
const templates = new WeakMap<Fixtures, Map<string, Promise<Chain>>>();

async function buildChain(fx: Fixtures, opts: string): Promise<Chain> {
  const dir = fx.path("chain");
  mkdirSync(dir);
  const c = chainIn(dir);
  const o = opts === "" ? [] : ["-o", opts];
  await qemuOk(["create", "-q", "-f", "qcow2", ...o, c.base, "64M"]);
  await qemuOk(["create", "-q", "-f", "qcow2", ...o, "-b", "base.qcow2", "-F", "qcow2", c.mid]);
  await qemuOk(["create", "-q", "-f", "qcow2", ...o, "-b", "mid.qcow2", "-F", "qcow2", c.top]);
  await qio(c.base, ["write -P 0x11 0 1M", "write -P 0x12 4M 256k"]);
  await qio(c.mid, ["write -P 0x21 512k 1M", "write -z 4M 64k"]);
  await qio(c.top, ["write -P 0x31 768k 64k", "write -P 0x32 10M 100k", "write -z 0 64k"]);
  return c;
}

/** A copy of a chain's directory (the relative backing names keep working). */
export function copyChain(fx: Fixtures, c: Chain): Chain {
  const dir = fx.path("copy");
  cpSync(c.dir, dir, { recursive: true });
  return chainIn(dir);
}

/**
 * `qemu-img map --output=json` without host offsets, adjacent equal extents merged. With `host`, each
 * extent also says whether it has a host offset, so a zero cluster that keeps its host cluster is told
 * from a plain one (the offsets themselves may differ between tools).
 */
export async function layout(
  file: string,
  opts: { host?: boolean } = {},
): Promise<Record<string, unknown>[]> {
  const r = await qemuOk(["map", "--output=json", file]);
  const keys = ["depth", "present", "zero", "data", ...(opts.host === true ? ["host"] : [])];
  const out: Record<string, unknown>[] = [];
  for (const e of JSON.parse(r.stdout) as Record<string, unknown>[]) {
    if (opts.host === true) e.host = e.offset !== undefined;
    delete e.offset;
    const last = out.at(-1);
    if (
      last !== undefined &&
      keys.every((k) => last[k] === e[k]) &&
      Number(last.start) + Number(last.length) === e.start
    ) {
      last.length = Number(last.length) + Number(e.length);
    } else {
      out.push(e);
    }
  }
  return out;
}

/** The three layers of two chains have the same {@link layout} with host-offset presence. */
export async function expectSameHostLayouts(q: Chain, b: Chain): Promise<void> {
  for (const name of ["top.qcow2", "mid.qcow2", "base.qcow2"]) {
    const [bm, qm] = [await layout(b.at(name), { host: true }), await layout(q.at(name), { host: true })];
    expect({ name, map: bm }).toEqual({ name, map: qm });
  }
}

/** The backing members of `qemu-img info --output=json` plus the size and format-specific data. */
export async function infoOf(file: string): Promise<Record<string, unknown>> {
  const r = await qemuOk(["info", "--output=json", file]);
  const i = JSON.parse(r.stdout) as Record<string, unknown>;
  const spec = (i["format-specific"] as { data?: Record<string, unknown> } | undefined)?.data ?? {};
  return {
    "virtual-size": i["virtual-size"],
    "backing-filename": i["backing-filename"],
    "backing-filename-format": i["backing-filename-format"],
    compat: spec.compat,
    "lazy-refcounts": spec["lazy-refcounts"],
    "refcount-bits": spec["refcount-bits"],
  };
}

/** `qemu-img check` finds nothing wrong. */
export async function expectClean(file: string): Promise<void> {
  const r = await qemu(["check", file]);
  expect(r.stdout).toContain("No errors were found on the image.");
  expect(r.code).toBe(0);
}

/** Same guest content (qemu-img compare, which reads through the chains). */
export async function expectSameContent(a: string, b: string): Promise<void> {
  const r = await qemu(["compare", a, b]);
  expect(r.stdout).toBe("Images are identical.\n");
  expect(r.code).toBe(0);
}

/**
 * After one tool worked on chain `q` and blk-img on chain `b`: every layer has the same content, the
 * same backing links and format data in `qemu-img info`, the same allocation (`map` without offsets),
 * and passes `qemu-img check`.
 */
export async function expectSameChains(
  q: Chain,
  b: Chain,
  options: { layout?: boolean } = {},
): Promise<void> {
  // Read-only qemu-img runs: all at once.
  await Promise.all(
    ["top.qcow2", "mid.qcow2", "base.qcow2"].flatMap((name) => [
      expectSameContent(q.at(name), b.at(name)),
      (async () => expect(await infoOf(b.at(name))).toEqual(await infoOf(q.at(name))))(),
      (async () => {
        if (options.layout ?? true) expect(await layout(b.at(name))).toEqual(await layout(q.at(name)));
      })(),
      expectClean(b.at(name)),
    ]),
  );
}

/**
 * Runs `args` (with `file` substituted for `{}`) with qemu-img in chain `q` and blk-img in chain `b`;
 * stdout, stderr (file names mapped) and exit codes must match.
 */
export async function sideBySide(
  args: readonly string[],
  q: Chain,
  b: Chain,
  options: { stdout?: boolean } = {},
): Promise<{ q: Captured; b: Captured }> {
  const rq = await qemu(args.map((a) => a.replaceAll("{}", `${q.dir}/`)));
  const rb = await blk(args.map((a) => a.replaceAll("{}", `${b.dir}/`)));
  const strip = (s: string): string => s.replaceAll(`${b.dir}/`, "{}").replaceAll(b.dir, "{}");
  const stripQ = (s: string): string => norm(s).replaceAll(`${q.dir}/`, "{}").replaceAll(q.dir, "{}");
  expect({ code: rb.code, stderr: strip(rb.stderr) }).toEqual({ code: rq.code, stderr: stripQ(rq.stderr) });
  if (options.stdout ?? true) expect(strip(rb.stdout)).toBe(stripQ(rq.stdout));
  return { q: rq, b: rb };
}

/** Size of a file in bytes. */
export const fileSize = (file: string): number => statSync(file).size;
