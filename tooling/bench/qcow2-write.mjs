#!/usr/bin/env node
// qcow2 write benchmark: blk's qcow2 driver against `qemu-img bench -w` on copies of the same image,
// alternating rounds, medians and the same-run ratio (blk ÷ qemu-img; < 1 means blk is slower). Patterns,
// each the same for both tools (qemu-img bench has no random mode: a large prime stride stands in for
// random access), queue depth 16, every write filled with 0xab, no flush (the final flush and close are
// not timed, as in qemu-img bench):
//   sequential 64k: 64 KiB writes from offset 0 upward over the whole image   (MB/s)
//   scattered 4k:   4 KiB writes with a step of 1031 × 4 KiB, wrapping          (IOPS)
// each on a fresh (empty) image — allocating writes — and on a dense one — rewrites in place.
//
//   node tooling/bench/qcow2-write.mjs                 (after `pnpm build`; needs qemu-img and qemu-io)
//   BLK_BENCH_SIZE_MIB=1024 BLK_BENCH_ROUNDS=5 node tooling/bench/qcow2-write.mjs
//   BLK_BENCH_BASELINE=/path/to/other/checkout …   (also time that checkout's built driver, e.g. before a
//                                                   change: its packages/drivers/dist/qcow2/index.js)
import { spawnSync } from "node:child_process";
import { copyFileSync, existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { openQcow2 } from "@blk/drivers/qcow2";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const MiB = 1024 * 1024;
const sizeMiB = Number(process.env.BLK_BENCH_SIZE_MIB ?? 1024);
const rounds = Number(process.env.BLK_BENCH_ROUNDS ?? 3);
const size = sizeMiB * MiB;
if (!existsSync(join(root, "packages/drivers/dist/qcow2/index.js"))) {
  console.error("qcow2 write bench: run `pnpm build` first");
  process.exit(2);
}
for (const p of ["qemu-img", "qemu-io"]) {
  if (spawnSync("sh", ["-c", `command -v ${p}`]).status !== 0) {
    console.error(`qcow2 write bench: ${p} is not installed`);
    process.exit(2);
  }
}
const baselineRoot = process.env.BLK_BENCH_BASELINE;
const baselineOpen =
  baselineRoot === undefined
    ? undefined
    : /** @type {typeof openQcow2} */ (
        (await import(pathToFileURL(join(baselineRoot, "packages/drivers/dist/qcow2/index.js")).href))
          .openQcow2
      );
const dir = mkdtempSync(join(tmpdir(), "blk-qcow2-wbench-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(130));

const sh = (cmd, args) => {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")}: ${r.stderr}`);
  return r.stdout;
};

// The pristine images, made once by QEMU's tools; every run writes to a fresh copy.
const empty = join(dir, "empty.qcow2");
const dense = join(dir, "dense.qcow2");
sh("qemu-img", ["create", "-q", "-f", "qcow2", empty, String(size)]);
sh("qemu-img", ["create", "-q", "-f", "qcow2", dense, String(size)]);
const cmds = [];
for (let off = 0; off < size; off += 64 * MiB) {
  cmds.push("-c", `write -P 0x11 ${off} ${Math.min(64 * MiB, size - off)}`);
}
sh("qemu-io", ["-f", "qcow2", ...cmds, dense]);

const patterns = [
  { name: "sequential 64k", bs: 65536, step: 65536, count: size / 65536, unit: "MB/s" },
  { name: "scattered 4k", bs: 4096, step: 4096 * 1031, count: Math.min(50_000, size / 4096), unit: "IOPS" },
];

/** Seconds `qemu-img bench -w` takes for pattern `p` on `image`. */
function qemu(p, image) {
  const t = performance.now();
  const out = sh("qemu-img", [
    "bench",
    "-w",
    "-f",
    "qcow2",
    "-d",
    "16",
    "-c",
    String(p.count),
    "-s",
    String(p.bs),
    "-S",
    String(p.step),
    "--pattern=171",
    image,
  ]);
  const m = /Run completed in ([\d.]+) seconds/.exec(out);
  return m ? Number(m[1]) : (performance.now() - t) / 1000;
}

/**
 * Seconds blk takes for the same writes (queue depth 16). As qemu-img bench's "Run completed" time, the
 * final flush and close are not counted.
 */
async function blk(p, image, open = openQcow2) {
  const img = await open(image, { writable: true });
  let next = 0;
  const data = new Uint8Array(p.bs).fill(0xab);
  const t = performance.now();
  const worker = async () => {
    for (;;) {
      const i = next++;
      if (i >= p.count) return;
      // qemu-img bench's sequence: offset += step, wrapped at the image size.
      await img.root.write((i * p.step) % size, data);
    }
  };
  try {
    await Promise.all(Array.from({ length: 16 }, worker));
    const secs = (performance.now() - t) / 1000;
    await img.root.flush();
    return secs;
  } finally {
    await img.close();
  }
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const rate = (p, secs) => (p.unit === "MB/s" ? (p.count * p.bs) / MiB / secs : p.count / secs);
console.log(`qcow2 write benchmark: ${sizeMiB} MiB image, ${rounds} alternating rounds, medians`);
console.log(
  `${"pattern".padEnd(32)}${"qemu-img bench".padStart(16)}${"blk".padStart(12)}${"blk/qemu".padStart(10)}${
    baselineOpen === undefined ? "" : `${"baseline".padStart(12)}${"base/qemu".padStart(10)}`
  }`,
);
for (const [label, pristine] of [
  ["empty", empty],
  ["dense", dense],
]) {
  for (const p of patterns) {
    const res = { q: [], b: [], base: [] };
    let n = 0;
    const fresh = () => {
      const f = join(dir, `run-${n++}.qcow2`);
      copyFileSync(pristine, f);
      return f;
    };
    for (let round = 0; round < rounds; round++) {
      const runQ = () => {
        const f = fresh();
        res.q.push(rate(p, qemu(p, f)));
        rmSync(f);
      };
      const runB = async () => {
        const f = fresh();
        res.b.push(rate(p, await blk(p, f)));
        rmSync(f);
      };
      const runBase = async () => {
        if (baselineOpen === undefined) return;
        const f = fresh();
        res.base.push(rate(p, await blk(p, f, baselineOpen)));
        rmSync(f);
      };
      if (round % 2 === 0) {
        runQ();
        await runB();
        await runBase();
      } else {
        await runBase();
        await runB();
        runQ();
      }
    }
    const q = median(res.q);
    const b = median(res.b);
    const name = `${p.name} (${label}) ${p.unit}`;
    const base =
      baselineOpen === undefined
        ? ""
        : `${median(res.base).toFixed(0).padStart(12)}${`${(median(res.base) / q).toFixed(2)}x`.padStart(10)}`;
    console.log(
      `${name.padEnd(32)}${q.toFixed(0).padStart(16)}${b.toFixed(0).padStart(12)}${`${(b / q).toFixed(2)}x`.padStart(10)}${base}`,
    );
  }
}
