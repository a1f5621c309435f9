#!/usr/bin/env node
// End-to-end convert benchmark: `blk-img convert` against `qemu-img convert` on the same dense raw image,
// one run per tool per round, alternating which goes first; medians and the same-run ratio.
//
//   node tooling/bench/convert.mjs                    (after `pnpm build`; needs qemu-img)
//   BLK_BENCH_SIZE_MIB=2048 BLK_BENCH_ROUNDS=5 node tooling/bench/convert.mjs
//   BLK_BENCH_CASES=raw,offload node tooling/bench/convert.mjs     (some cases only)
//   BLK_BENCH_BASELINE=/path/to/other/apps/cli/bin/blk-img.js …   (also time another build, e.g. before a change)
//   BLK_BENCH_BASELINE=unbundled …   (also time this build from dist/ rather than its bundle: BLK_IMG_NO_BUNDLE=1)
//
//   BLK_BENCH_TARGET=existing …   (convert -n into a target made and read into the page cache beforehand)
//
// Targets (BLK_BENCH_TARGET): `fresh` (default) times `convert` creating its output, as users run it;
// `existing` times `convert -n` into an output that already exists with every page cached (raw targets
// only: dense raw → raw and its -C form). On a VM whose free memory goes back to the host (virtio-balloon
// free page reporting: `/sys/module/page_reporting` exists), a fresh 2 GiB output needs 2 GiB of page
// cache the host must fault in again, and whether a run gets such pages or recycled ones is luck: both
// tools then swing 2-10x from run to run. An existing cached target takes no new page cache, so that
// mode measures the tools, not the host; `fresh` medians on such a VM say which tool was unlucky.
//
// BLK_BENCH_HOLD_FREE_PAGES=1 (root, such a VM only) instead stops the reporting for the bench's run: it
// raises /sys/module/page_reporting/parameters/page_reporting_order above the largest page order, so
// memory freed by one run stays with the VM for the next, and puts the old value back when the bench
// ends. Fresh targets then measure the tools too (qcow2 targets included, which `existing` cannot do).
//
// Cases (keys for BLK_BENCH_CASES): `raw` dense raw → raw, `offload` the same with -C for both tools (copy
// offload: copy_file_range), `qcow2` dense raw → qcow2, `sparse` half-sparse raw → raw, `qcow2-qcow2` a
// dense qcow2 (made by qemu-img) → qcow2. Each output is checked with `qemu-img compare` before it counts.
// The page cache is warm for both tools (the source is read once before the first round). Not a test.
import { spawnSync } from "node:child_process";
import { randomFillSync } from "node:crypto";
import {
  closeSync,
  existsSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const MiB = 1024 * 1024;
const sizeMiB = Number(process.env.BLK_BENCH_SIZE_MIB ?? 2048);
const rounds = Number(process.env.BLK_BENCH_ROUNDS ?? 3);
const only = process.env.BLK_BENCH_CASES?.split(",").filter((c) => c !== "");
const blkImg = join(root, "apps/cli/bin/blk-img.js");
if (!existsSync(join(root, "apps/cli/dist/main.js"))) {
  console.error("convert bench: run `pnpm build` first");
  process.exit(2);
}
if (spawnSync("sh", ["-c", "command -v qemu-img"]).status !== 0) {
  console.error("convert bench: qemu-img is not installed");
  process.exit(2);
}

// BLK_BENCH_DIR: where the images go (default the temp dir; e.g. /dev/shm to leave the disk out).
const REPORTING_ORDER = "/sys/module/page_reporting/parameters/page_reporting_order";
if (process.env.BLK_BENCH_HOLD_FREE_PAGES === "1") {
  let old;
  try {
    old = readFileSync(REPORTING_ORDER, "utf8").trim();
    // Orders run to 10 (MAX_PAGE_ORDER on x86-64): 11 and up is never reached, so nothing is reported.
    writeFileSync(REPORTING_ORDER, "11");
  } catch (e) {
    console.error(`convert bench: cannot hold free pages (${e.message}): no free page reporting to stop?`);
    process.exit(2);
  }
  const restore = () => writeFileSync(REPORTING_ORDER, old);
  process.on("exit", restore);
  for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(130));
  console.log(`free page reporting held for the run (page_reporting_order ${old} -> 11, restored at exit)`);
}
const dir = mkdtempSync(join(process.env.BLK_BENCH_DIR ?? tmpdir(), "blk-convert-bench-"));
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

const all = [
  { key: "raw", name: "dense raw → raw", src: "dense", fmt: "raw" },
  { key: "offload", name: "dense raw → raw -C", src: "dense", fmt: "raw", flags: ["-C"] },
  { key: "qcow2", name: "dense raw → qcow2", src: "dense", fmt: "qcow2" },
  { key: "sparse", name: "half-sparse raw → raw", src: "sparse", fmt: "raw" },
  { key: "qcow2-qcow2", name: "dense qcow2 → qcow2", src: "denseQcow2", srcFmt: "qcow2", fmt: "qcow2" },
];
const target = process.env.BLK_BENCH_TARGET ?? "fresh";
if (target !== "fresh" && target !== "existing") {
  console.error(`convert bench: BLK_BENCH_TARGET is fresh or existing, not ${target}`);
  process.exit(2);
}
const cases = all.filter(
  (c) =>
    (only === undefined || only.includes(c.key)) &&
    (target === "fresh" || (c.src === "dense" && c.fmt === "raw")),
);
if (cases.length === 0) {
  console.error(`convert bench: no case among ${only}; cases: ${all.map((c) => c.key).join(", ")}`);
  process.exit(2);
}
const images = {};
const need = new Set(cases.map((c) => c.src));
if (need.has("dense") || need.has("denseQcow2")) images.dense = makeImage("dense.raw", false);
if (need.has("sparse")) images.sparse = makeImage("sparse.raw", true);
if (need.has("denseQcow2")) {
  images.denseQcow2 = join(dir, "dense.qcow2");
  const r = spawnSync("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", images.dense, images.denseQcow2]);
  if (r.status !== 0) throw new Error(`qemu-img could not make the qcow2 source: ${r.stderr}`);
  spawnSync("cat", [images.denseQcow2], { stdio: ["ignore", "ignore", "ignore"], maxBuffer: 0 });
}
const baseline = process.env.BLK_BENCH_BASELINE;
const unbundled = { ...process.env, BLK_IMG_NO_BUNDLE: "1" };
const tools = {
  "qemu-img": (argv) => ["qemu-img", argv],
  "blk-img": (argv) => [process.execPath, [blkImg, ...argv]],
  ...(baseline === undefined
    ? {}
    : baseline === "unbundled"
      ? { baseline: (argv) => [process.execPath, [blkImg, ...argv], unbundled] }
      : { baseline: (argv) => [process.execPath, [baseline, ...argv]] }),
};
// bin/blk-img.js runs the bundle `pnpm build` writes unless it is stale: say so when it does not.
const probe = spawnSync(process.execPath, [blkImg, "--version"], {
  env: { ...process.env, BLK_IMG_BUNDLE_DEBUG: "1" },
  encoding: "utf8",
});
if (!/code cache accepted/.test(probe.stderr))
  console.warn(
    `convert bench: bin/blk-img.js does not run the bundle with its cache (${probe.stderr.trim()}): run \`pnpm build\``,
  );
const names = Object.keys(tools);

/** The existing target (BLK_BENCH_TARGET=existing): a full copy of nothing in particular, cached. */
function existingTarget() {
  const dst = join(dir, "existing.raw");
  if (!existsSync(dst)) {
    const fd = openSync(dst, "w");
    const buf = Buffer.alloc(4 * MiB, 0x5a);
    for (let off = 0; off < sizeMiB * MiB; off += buf.length) writeSync(fd, buf, 0, buf.length, off);
    closeSync(fd);
  }
  spawnSync("cat", [dst], { stdio: ["ignore", "ignore", "ignore"], maxBuffer: 0 });
  return dst;
}

function run(tool, c) {
  const existing = target === "existing";
  const dst = existing ? existingTarget() : join(dir, `out.${c.fmt}`);
  if (!existing) rmSync(dst, { force: true });
  const src = images[c.src];
  const srcFmt = c.srcFmt ?? "raw";
  const argv = [
    "convert",
    ...(existing ? ["-n"] : []),
    ...(c.flags ?? []),
    "-f",
    srcFmt,
    "-O",
    c.fmt,
    src,
    dst,
  ];
  const [cmd, args, env] = tools[tool](argv);
  // Start each run with no dirty pages left by the previous one: otherwise whichever tool runs while the
  // kernel writes back the other's output is throttled, and the figures swing by 2-3x between runs.
  spawnSync("sync");
  const t = performance.now();
  const r = spawnSync(cmd, args, { stdio: ["ignore", "ignore", "pipe"], env });
  const secs = (performance.now() - t) / 1000;
  if (r.status !== 0) throw new Error(`${tool} failed on ${c.name}: ${r.stderr}`);
  const cmp = spawnSync("qemu-img", ["compare", "-f", srcFmt, "-F", c.fmt, src, dst]);
  if (cmp.status !== 0) throw new Error(`${tool}'s output differs from the source on ${c.name}`);
  if (!existing) rmSync(dst, { force: true });
  return sizeMiB / secs;
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(
  `convert benchmark: ${sizeMiB} MiB images, ${target} targets, ${rounds} alternating rounds, median MiB/s (virtual size / time)`,
);
// Fixed costs apart from the copy: each tool converting a 1 MiB image, and a bare Node start (Node's own
// floor; NODE_EXTRA_CA_CERTS, set on some machines, adds its certificate parsing to every Node start).
{
  const tiny = join(dir, "tiny.raw");
  spawnSync("truncate", ["-s", "1M", tiny]);
  const startMs = (argv) => {
    const times = [];
    for (let i = 0; i < 7; i++) {
      rmSync(`${tiny}.out`, { force: true });
      const t = performance.now();
      spawnSync(argv[0], argv.slice(1), { stdio: "ignore" });
      times.push(performance.now() - t);
    }
    return median(times).toFixed(0);
  };
  const conv = ["convert", "-f", "raw", "-O", "raw", tiny, `${tiny}.out`];
  console.log(
    `start-up (1 MiB convert, median ms): qemu-img ${startMs(["qemu-img", ...conv])}, blk-img ${startMs([process.execPath, blkImg, ...conv])}, bare node ${startMs([process.execPath, "-e", "0"])}${process.env.NODE_EXTRA_CA_CERTS ? " (NODE_EXTRA_CA_CERTS is set)" : ""}`,
  );
}
const col = (t) => t.padStart(10);
console.log(
  `${"case".padEnd(26)}${names.map(col).join("")}${col("blk/qemu")}${baseline === undefined ? "" : col("base/qemu")}`,
);
const best = {};
for (const c of cases) {
  const res = Object.fromEntries(names.map((t) => [t, []]));
  for (let round = 0; round < rounds; round++) {
    // Alternate which tool goes first.
    const order = round % 2 === 0 ? names : [...names].reverse();
    for (const tool of order) res[tool].push(run(tool, c));
  }
  const med = Object.fromEntries(names.map((t) => [t, median(res[t])]));
  const q = med["qemu-img"];
  const ratio = (t) => col(`${(med[t] / q).toFixed(2)}x`);
  console.log(
    `${c.name.padEnd(26)}${names.map((t) => col(med[t].toFixed(0))).join("")}${ratio("blk-img")}${baseline === undefined ? "" : ratio("baseline")}`,
  );
  best[c.name] = Object.fromEntries(names.map((t) => [t, Math.max(...res[t])]));
}
// On some VMs a run falls at random into a mode where the kernel's copy into the page cache costs several
// times more (both tools, and a plain read/write loop): the medians then say which tool was unlucky. The
// best run of each tool shows what each does when it is not hit; it is printed apart, never as the result.
console.log("best run of each tool (MiB/s), for judging the medians on a noisy machine:");
for (const [name, b] of Object.entries(best)) {
  const q = b["qemu-img"];
  console.log(
    `${name.padEnd(26)}${names.map((t) => col(b[t].toFixed(0))).join("")}${col(`${(b["blk-img"] / q).toFixed(2)}x`)}`,
  );
}
