#!/usr/bin/env node
// End-to-end convert benchmark: `blk-img convert` against `qemu-img convert` on the same dense raw image,
// one run per tool per round, alternating which goes first; medians and the same-run ratio.
//
//   node tooling/bench/convert.mjs                    (after `pnpm build`; needs qemu-img)
//   BLK_BENCH_SIZE_MIB=2048 BLK_BENCH_ROUNDS=5 node tooling/bench/convert.mjs
//
// Cases: raw → raw and raw → qcow2 of a dense image (random data), and raw → raw of a half-sparse image.
// The page cache is warm for both tools (the source is read once before the first round). Not a test.
import { spawnSync } from "node:child_process";
import { randomFillSync } from "node:crypto";
import { closeSync, existsSync, mkdtempSync, openSync, rmSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const MiB = 1024 * 1024;
const sizeMiB = Number(process.env.BLK_BENCH_SIZE_MIB ?? 2048);
const rounds = Number(process.env.BLK_BENCH_ROUNDS ?? 3);
const blkImg = join(root, "apps/cli/bin/blk-img.js");
if (!existsSync(join(root, "apps/cli/dist/main.js"))) {
  console.error("convert bench: run `pnpm build` first");
  process.exit(2);
}
if (spawnSync("sh", ["-c", "command -v qemu-img"]).status !== 0) {
  console.error("convert bench: qemu-img is not installed");
  process.exit(2);
}

const dir = mkdtempSync(join(tmpdir(), "blk-convert-bench-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));

function makeImage(name, everyOther) {
  const path = join(dir, name);
  const fd = openSync(path, "w");
  const buf = Buffer.alloc(4 * MiB);
  for (let off = 0, i = 0; off < sizeMiB * MiB; off += buf.length, i++) {
    if (everyOther && i % 2 === 1) continue;
    writeSync(fd, randomFillSync(buf), 0, buf.length, off);
  }
  closeSync(fd);
  spawnSync("truncate", ["-s", String(sizeMiB * MiB), path]);
  spawnSync("cat", [path], { stdio: ["ignore", "ignore", "ignore"], maxBuffer: 0 });
  return path;
}

const dense = makeImage("dense.raw", false);
const sparse = makeImage("sparse.raw", true);
const cases = [
  { name: "dense raw → raw", src: dense, fmt: "raw" },
  { name: "dense raw → qcow2", src: dense, fmt: "qcow2" },
  { name: "half-sparse raw → raw", src: sparse, fmt: "raw" },
];
const tools = {
  "qemu-img": (src, dst, fmt) => ["qemu-img", ["convert", "-f", "raw", "-O", fmt, src, dst]],
  "blk-img": (src, dst, fmt) => [process.execPath, [blkImg, "convert", "-f", "raw", "-O", fmt, src, dst]],
};

function run(tool, c) {
  const dst = join(dir, `out.${c.fmt}`);
  rmSync(dst, { force: true });
  const [cmd, args] = tools[tool](c.src, dst, c.fmt);
  const t = performance.now();
  const r = spawnSync(cmd, args, { stdio: ["ignore", "ignore", "pipe"] });
  const secs = (performance.now() - t) / 1000;
  if (r.status !== 0) throw new Error(`${tool} failed on ${c.name}: ${r.stderr}`);
  const cmp = spawnSync("qemu-img", ["compare", "-f", "raw", "-F", c.fmt, c.src, dst]);
  if (cmp.status !== 0) throw new Error(`${tool}'s output differs from the source on ${c.name}`);
  rmSync(dst, { force: true });
  return sizeMiB / secs;
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(
  `convert benchmark: ${sizeMiB} MiB images, ${rounds} alternating rounds, median MiB/s (virtual size / time)`,
);
console.log(
  `${"case".padEnd(24)}${"qemu-img".padStart(10)}${"blk-img".padStart(10)}${"blk/qemu".padStart(10)}`,
);
for (const c of cases) {
  const res = { "qemu-img": [], "blk-img": [] };
  for (let round = 0; round < rounds; round++) {
    const order = round % 2 === 0 ? ["qemu-img", "blk-img"] : ["blk-img", "qemu-img"];
    for (const tool of order) res[tool].push(run(tool, c));
  }
  const q = median(res["qemu-img"]);
  const b = median(res["blk-img"]);
  console.log(
    `${c.name.padEnd(24)}${q.toFixed(0).padStart(10)}${b.toFixed(0).padStart(10)}${`${(b / q).toFixed(2)}x`.padStart(10)}`,
  );
}
