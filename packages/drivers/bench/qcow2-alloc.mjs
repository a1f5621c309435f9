#!/usr/bin/env node
// CPU cost of qcow2 allocating writes, straight through the driver (no daemon, no job): a fresh qcow2
// image (made by `createQcow2`) written by queue-depth workers, as a mirror job into a qcow2 target
// writes it. Prints wall time, the process's user+system CPU time per GiB written and GC counts, for the
// built driver and, with BLK_BENCH_BASELINE, another checkout's built driver in the same run (alternating
// rounds, medians). Run it under `node --cpu-prof` to profile one driver alone (BLK_BENCH_ONLY=blk).
//
//   node packages/drivers/bench/qcow2-alloc.mjs                       (after `pnpm build`)
//   BLK_BENCH_PATTERN=mirror|seq64k|scatter4k|alloc4k BLK_BENCH_SIZE_MIB=1024 BLK_BENCH_ROUNDS=3 …
//   BLK_BENCH_BASELINE=/path/to/other/checkout …  (its packages/drivers/dist/qcow2/index.js)
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { PerformanceObserver } from "node:perf_hooks";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const MiB = 1024 * 1024;
const sizeMiB = Number(process.env.BLK_BENCH_SIZE_MIB ?? 1024);
const rounds = Number(process.env.BLK_BENCH_ROUNDS ?? 3);
const only = process.env.BLK_BENCH_ONLY;
const size = sizeMiB * MiB;
const all = {
  // A mirror job's copy loop: 1 MiB chunks, 16 in flight, in order.
  mirror: { bs: MiB, step: MiB, count: size / MiB, depth: 16 },
  // pnpm bench:qcow2-write's patterns on an empty image.
  seq64k: { bs: 65536, step: 65536, count: size / 65536, depth: 16 },
  scatter4k: { bs: 4096, step: 4096 * 1031, count: Math.min(50_000, size / 4096), depth: 16 },
  // Small allocating writes only: 4 KiB into a new 64 KiB cluster each time, at varying places in it.
  alloc4k: { bs: 4096, step: 65536 + 4096, count: Math.floor(size / (65536 + 4096)), depth: 16 },
};
const names = (process.env.BLK_BENCH_PATTERN ?? "mirror,seq64k,scatter4k").split(",");

const load = async (root) => import(pathToFileURL(join(root, "packages/drivers/dist/qcow2/index.js")).href);
const drivers = [];
if (only !== "base") drivers.push({ name: "blk", mod: await load(join(here, "..", "..", "..")) });
if (process.env.BLK_BENCH_BASELINE !== undefined && only !== "blk") {
  drivers.push({ name: "baseline", mod: await load(process.env.BLK_BENCH_BASELINE) });
}
const dir = mkdtempSync(join(tmpdir(), "blk-qcow2-alloc-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(130));

let gcs = 0;
new PerformanceObserver((l) => {
  gcs += l.getEntries().length;
}).observe({ entryTypes: ["gc"] });

/** CPU seconds of the main (JS) thread so far (Linux: /proc; 0 elsewhere), in clock ticks of 10 ms. */
function mainCpu() {
  try {
    const f = readFileSync(`/proc/self/task/${process.pid}/stat`, "utf8");
    const fields = f.slice(f.lastIndexOf(")") + 2).split(" ");
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {
    return 0;
  }
}

/** One run: wall seconds, CPU seconds (user + system: all threads; main thread) of the writes and flush. */
async function run(mod, p) {
  const file = join(dir, "t.qcow2");
  await mod.createQcow2({ filename: file, size });
  const img = await mod.openQcow2(file, { writable: true });
  const data = new Uint8Array(p.bs).fill(0xab);
  let next = 0;
  const g0 = gcs;
  const c0 = process.cpuUsage();
  const m0 = mainCpu();
  const t0 = performance.now();
  const worker = async () => {
    for (;;) {
      const i = next++;
      if (i >= p.count) return;
      await img.root.write((i * p.step) % size, data);
    }
  };
  try {
    await Promise.all(Array.from({ length: p.depth }, worker));
    await img.root.flush();
  } finally {
    await img.close();
  }
  const wall = (performance.now() - t0) / 1000;
  const c = process.cpuUsage(c0);
  const main = mainCpu() - m0;
  rmSync(file);
  return { wall, cpu: (c.user + c.system) / 1e6, main, gc: gcs - g0 };
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(`qcow2 allocating writes: ${sizeMiB} MiB fresh image, ${rounds} rounds, medians`);
for (const name of names) {
  const p = all[name];
  if (p === undefined) throw new Error(`unknown pattern ${name}`);
  const gib = (p.count * p.bs) / (1024 * MiB);
  const res = new Map(drivers.map((d) => [d.name, []]));
  for (let r = 0; r < rounds; r++) {
    const order = r % 2 === 0 ? drivers : [...drivers].reverse();
    for (const d of order) res.get(d.name).push(await run(d.mod, p));
  }
  const line = [name.padEnd(10)];
  const main = {};
  for (const d of drivers) {
    const xs = res.get(d.name);
    main[d.name] = median(xs.map((x) => x.main)) / gib;
    line.push(
      `${d.name}: ${median(xs.map((x) => x.wall)).toFixed(2)} s wall, CPU/GiB ${(median(xs.map((x) => x.cpu)) / gib).toFixed(3)} s all, ${main[d.name].toFixed(3)} s main thread, ${median(xs.map((x) => x.gc))} GCs`,
    );
  }
  if (main.baseline !== undefined)
    line.push(`main CPU blk/baseline ${(main.blk / main.baseline).toFixed(2)}x`);
  console.log(line.join("  |  "));
}
