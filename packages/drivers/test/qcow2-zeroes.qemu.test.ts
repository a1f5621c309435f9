/**
 * Write-zeroes side by side with QEMU: the same images (v3 and v2, with and without a backing file, one
 * with a snapshot) hold clusters in every state — unallocated (over backing zeroes and over backing data),
 * normal, zero without and with a host cluster, compressed, and a partial last cluster at the image's
 * end. One copy gets `qemu-io write -z [-u]`, the other the same requests through blk's qcow2 driver
 * (with and without may-unmap; whole clusters, partial pieces, an unaligned span); `qemu-img map`,
 * `qemu-img check` and `qemu-img compare` must then agree.
 */
import { copyFileSync } from "node:fs";
import { commandRunner, makeTempDir, missingPeers } from "@blk/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { openQcow2 } from "../src/qcow2/index.ts";

const missing = missingPeers(["qemu-img", "qemu-io"]);
if (missing.length > 0) console.warn(`skipping qcow2 write-zeroes tests: missing ${missing.join(", ")}`);

const K = 1024;
const CS = 64 * K;
/** Seven whole clusters and a half one at the end. */
const SIZE = 7 * CS + 32 * K;

const dir = makeTempDir("blk-q2zero");
afterAll(() => dir.dispose());

const sh = commandRunner(dir.path);

type Compat = "1.1" | "0.10";
interface Setup {
  compat: Compat;
  backing: boolean;
  snapshot: boolean;
}

const setupName = (s: Setup): string =>
  `v${s.compat === "1.1" ? 3 : 2}${s.backing ? "-backed" : ""}${s.snapshot ? "-snap" : ""}.qcow2`;

/**
 * Cluster states before the request (the same qemu-io commands on every image; on v2 the zero writes
 * leave what v2 can: nothing, zeroes written, or a discard):
 * 0 unallocated (backing: zeroes below), 1 unallocated (backing: data below), 2 normal, 3 zero (plain),
 * 4 zero with its host cluster kept, 5 compressed, 6 normal, 7 normal half cluster at the image's end.
 */
const PREP = [
  "write -P 0x11 128k 64k",
  "write -z 192k 64k",
  "write -P 0x33 256k 64k",
  "write -z 256k 64k",
  "write -c -P 0x22 320k 64k",
  "write -P 0x44 384k 64k",
  "write -P 0x55 448k 32k",
];

type Kind = "whole" | "mid" | "end" | "span";

/** The requests of one kind: per cluster (whole, inside, up to its end) or one unaligned span. */
function requests(kind: Kind): [number, number][] {
  if (kind === "span") return [[32 * K, 6 * CS + 8 * K]];
  const out: [number, number][] = [];
  for (let s = 0; s < SIZE; s += CS) {
    const len = Math.min(CS, SIZE - s);
    if (kind === "whole") out.push([s, len]);
    else if (kind === "mid") out.push([s + 4 * K, 8 * K]);
    else out.push([s + 8 * K, len - 8 * K]);
  }
  return out;
}

interface Case {
  setup: Setup;
  kind: Kind;
  unmap: boolean;
}

const cases: Case[] = [];
for (const compat of ["1.1", "0.10"] as const)
  for (const backing of [false, true])
    for (const kind of ["whole", "mid", "end", "span"] as const)
      for (const unmap of [false, true])
        cases.push({ setup: { compat, backing, snapshot: false }, kind, unmap });
for (const kind of ["whole", "mid"] as const)
  for (const unmap of [false, true])
    cases.push({ setup: { compat: "1.1", backing: false, snapshot: true }, kind, unmap });

/**
 * Over 2 GiB images (64 KiB clusters: an L2 table maps 512 MiB): data across the first L2 boundary, and
 * requests into L2 tables that do not exist yet (QEMU allocates the table even when no entry changes)
 * and across the boundary.
 */
const BIG = 2 * 1024 * 1024 * K;
const M = 1024 * K;
const BIG_PREP = [`write -P 0x66 ${512 * M - 128 * K} 256k`];
const BIG_REQS: [number, number][] = [
  [600 * M, CS],
  [1200 * M + 4 * K, 4 * K],
  [512 * M - 192 * K + 4 * K, 512 * K],
];
const bigCases: { compat: Compat; backing: boolean; unmap: boolean }[] = [];
for (const compat of ["1.1", "0.10"] as const)
  for (const backing of [false, true])
    for (const unmap of [false, true]) bigCases.push({ compat, backing, unmap });

const label = (c: Case): string =>
  `${setupName(c.setup).replace(".qcow2", "")} ${c.kind}${c.unmap ? " may-unmap" : ""}`;

const checkReport = async (file: string) => {
  const { out } = await sh("qemu-img", ["check", "--output=json", file]);
  const j = JSON.parse(out) as Record<string, unknown>;
  delete j.filename;
  return j;
};

const map = async (file: string) =>
  JSON.parse((await sh("qemu-img", ["map", "--output=json", "-f", "qcow2", file])).out) as unknown[];

describe.skipIf(missing.length > 0)("qcow2 write-zeroes matches QEMU", { tags: ["qemu"] }, () => {
  beforeAll(async () => {
    await sh("qemu-img", ["create", "-q", "-f", "qcow2", "base.qcow2", String(SIZE)]);
    await sh("qemu-io", ["-c", "write -P 0xba 64k 64k", "-c", "write -P 0xbb 256k 192k", "base.qcow2"]);
    for (const compat of ["1.1", "0.10"] as const)
      for (const backing of [false, true]) await prepare({ compat, backing, snapshot: false });
    await prepare({ compat: "1.1", backing: false, snapshot: true });
    await sh("qemu-img", ["create", "-q", "-f", "qcow2", "bigbase.qcow2", String(BIG)]);
    await sh("qemu-io", ["-c", `write -P 0xbc ${512 * M - 64 * K} 64k`, "bigbase.qcow2"]);
  });

  async function prepare(s: Setup): Promise<void> {
    const name = setupName(s);
    const args = ["create", "-q", "-f", "qcow2", "-o", `compat=${s.compat}`];
    if (s.backing) args.push("-b", "base.qcow2", "-F", "qcow2");
    await sh("qemu-img", [...args, name, String(SIZE)]);
    await sh("qemu-io", [...PREP.flatMap((c) => ["-c", c]), name]);
    if (s.snapshot) await sh("qemu-img", ["snapshot", "-c", "s1", name]);
  }

  /** The same zero writes through qemu-io on `viaQemu` and through blk on `viaBlk`; then compared. */
  async function sideBySide(viaQemu: string, viaBlk: string, reqs: [number, number][], unmap: boolean) {
    const flag = unmap ? "-z -u" : "-z";
    await sh("qemu-io", [...reqs.flatMap(([o, n]) => ["-c", `write ${flag} ${o} ${n}`]), viaQemu]);
    {
      await using img = await openQcow2(viaBlk, { writable: true, discard: "unmap" });
      for (const [o, n] of reqs) await img.root.writeZeroes(o, n, { mayUnmap: unmap });
    }
    const [mq, mb] = await Promise.all([map(viaQemu), map(viaBlk)]);
    expect(mb).toEqual(mq);
    const [cq, cb] = await Promise.all([checkReport(viaQemu), checkReport(viaBlk)]);
    expect(cb).toEqual(cq);
    expect(cb["check-errors"]).toBe(0);
    expect(cb.leaks ?? 0).toBe(0);
    expect(cb.corruptions ?? 0).toBe(0);
    await sh("qemu-img", ["compare", "-q", "-f", "qcow2", "-F", "qcow2", viaQemu, viaBlk]);
  }

  it.each(cases.map((c) => [label(c), c] as const))("%s", async (name, c) => {
    const stem = name.replace(/[^a-z0-9]+/gi, "-");
    const viaQemu = dir.join(`${stem}-qemu.qcow2`);
    const viaBlk = dir.join(`${stem}-blk.qcow2`);
    copyFileSync(dir.join(setupName(c.setup)), viaQemu);
    copyFileSync(dir.join(setupName(c.setup)), viaBlk);
    await sideBySide(viaQemu, viaBlk, requests(c.kind), c.unmap);
  });

  it.each(
    bigCases.map(
      (c) =>
        [
          `2 GiB v${c.compat === "1.1" ? 3 : 2}${c.backing ? "-backed" : ""}${c.unmap ? " may-unmap" : ""}`,
          c,
        ] as const,
    ),
  )("%s: new L2 tables, across an L2 boundary", async (name, c) => {
    const stem = name.replace(/[^a-z0-9]+/gi, "-");
    const files = [dir.join(`${stem}-qemu.qcow2`), dir.join(`${stem}-blk.qcow2`)] as const;
    for (const f of files) {
      const args = ["create", "-q", "-f", "qcow2", "-o", `compat=${c.compat}`];
      if (c.backing) args.push("-b", "bigbase.qcow2", "-F", "qcow2");
      await sh("qemu-img", [...args, f, String(BIG)]);
      await sh("qemu-io", [...BIG_PREP.flatMap((p) => ["-c", p]), f]);
    }
    await sideBySide(files[0], files[1], BIG_REQS, c.unmap);
  });
});
