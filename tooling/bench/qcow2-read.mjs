#!/usr/bin/env node
// qcow2 read benchmark: blk's qcow2 driver against `qemu-img bench` on the same image, alternating rounds,
// medians and the same-run ratio. Two patterns, each the same for both tools:
//   sequential: 64 KiB reads from offset 0 upward over the whole image, queue depth 16;
//   scattered:  4 KiB reads with a step of 1031 × 4 KiB (wrapping), queue depth 16 — qemu-img bench has no
//               random mode, so a large prime stride stands in for random access.
//
//   node tooling/bench/qcow2-read.mjs                 (after `pnpm build`; needs qemu-img and qemu-io)
//   BLK_BENCH_SIZE_MIB=2048 BLK_BENCH_ROUNDS=5 node tooling/bench/qcow2-read.mjs
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { openQcow2 } from "@blk/drivers/qcow2";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const MiB = 1024 * 1024;
const sizeMiB = Number(process.env.BLK_BENCH_SIZE_MIB ?? 1024);
const rounds = Number(process.env.BLK_BENCH_ROUNDS ?? 3);
const size = sizeMiB * MiB;
if (!existsSync(join(root, "packages/drivers/dist/qcow2/index.js"))) {
  console.error("qcow2 bench: run `pnpm build` first");
  process.exit(2);
}
for (const p of ["qemu-img", "qemu-io"]) {
  if (spawnSync("sh", ["-c", `command -v ${p}`]).status !== 0) {
    console.error(`qcow2 bench: ${p} is not installed`);
    process.exit(2);
  }
}
const dir = mkdtempSync(join(tmpdir(), "blk-qcow2-bench-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
const image = join(dir, "disk.qcow2");
spawnSync("qemu-img", ["create", "-q", "-f", "qcow2", image, String(size)]);
// Dense: every cluster allocated with data (qemu-io writes a pattern in 64 MiB steps).
const cmds = [];
for (let off = 0; off < size; off += 64 * MiB)
  cmds.push("-c", `write -P ${(off / (64 * MiB)) % 250} ${off} 64M`);
spawnSync("qemu-io", ["-f", "qcow2", ...cmds, image], { stdio: "ignore" });

const patterns = [
  { name: "sequential 64k qd16", bs: 65536, step: 65536, count: size / 65536 },
  { name: "scattered 4k qd16", bs: 4096, step: 4096 * 1031, count: Math.min(200_000, size / 4096) },
];

function qemu(p) {
  const t = performance.now();
  const r = spawnSync(
    "qemu-img",
    [
      "bench",
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
      image,
    ],
    { encoding: "utf8" },
  );
  if (r.status !== 0) throw new Error(`qemu-img bench failed: ${r.stderr}`);
  const m = /Run completed in ([\d.]+) seconds/.exec(r.stdout);
  return m ? Number(m[1]) : (performance.now() - t) / 1000;
}

async function blk(p) {
  const img = await openQcow2(image);
  let next = 0;
  const buf = () => new Uint8Array(p.bs);
  const t = performance.now();
  const worker = async () => {
    const b = buf();
    for (;;) {
      const i = next++;
      if (i >= p.count) return;
      // qemu-img bench's sequence: offset += step, wrapped at the image size.
      await img.node.readInto((i * p.step) % size, b);
    }
  };
  try {
    await Promise.all(Array.from({ length: 16 }, worker));
    return (performance.now() - t) / 1000;
  } finally {
    await img.close();
  }
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(`qcow2 read benchmark: ${sizeMiB} MiB dense image, ${rounds} alternating rounds, median ops/s`);
console.log(
  `${"pattern".padEnd(24)}${"qemu-img bench".padStart(16)}${"blk".padStart(10)}${"blk/qemu".padStart(10)}`,
);
for (const p of patterns) {
  const res = { q: [], b: [] };
  for (let round = 0; round < rounds; round++) {
    if (round % 2 === 0) {
      res.q.push(p.count / qemu(p));
      res.b.push(p.count / (await blk(p)));
    } else {
      res.b.push(p.count / (await blk(p)));
      res.q.push(p.count / qemu(p));
    }
  }
  const q = median(res.q);
  const b = median(res.b);
  console.log(
    `${p.name.padEnd(24)}${q.toFixed(0).padStart(16)}${b.toFixed(0).padStart(10)}${`${(b / q).toFixed(2)}x`.padStart(10)}`,
  );
}
