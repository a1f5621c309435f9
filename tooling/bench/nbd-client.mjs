#!/usr/bin/env node
// NBD client benchmark: blk's `nbd` driver copying an export into a sink (null-co) with the core
// CopyEngine, against `nbdcopy EXPORT null:` over the same export, with one connection and with several
// (multi-conn). qemu-nbd serves a dense random raw file (`-e 8`, so it advertises MULTI_CONN). Runs
// alternate their order every round; medians and same-run ratios are printed.
//
//   node tooling/bench/nbd-client.mjs          (after `pnpm build`; needs qemu-nbd and nbdcopy)
//   BLK_BENCH_SIZE_MIB=2048 BLK_BENCH_ROUNDS=5 BLK_BENCH_CONNS=4 node tooling/bench/nbd-client.mjs
//
// blk: 1 MiB chunks, 16 requests in flight per connection (QEMU's per-connection limit), status `none`
// (the file is all data). nbdcopy: its defaults (256 KiB requests, 64 in flight per connection) with
// --connections=1 or N. Every run is done once untimed first (JIT warm-up). Not a test: nothing here gates
// CI; on a loaded machine only same-run ratios mean anything.
import { spawn, spawnSync } from "node:child_process";
import { randomFillSync } from "node:crypto";
import { closeSync, existsSync, mkdtempSync, openSync, rmSync, writeSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { nbdDriver } from "@blk/drivers/nbd";
import { nullDriver } from "@blk/drivers/null";

// @blk/core is not a root dependency: take the copy @blk/drivers uses.
const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const fromDrivers = createRequire(join(root, "packages/drivers/package.json"));
const { BlockGraph, CopyEngine } = await import(pathToFileURL(fromDrivers.resolve("@blk/core")).href);

const MiB = 1024 * 1024;
const sizeMiB = Number(process.env.BLK_BENCH_SIZE_MIB ?? 512);
const rounds = Number(process.env.BLK_BENCH_ROUNDS ?? 3);
const conns = Number(process.env.BLK_BENCH_CONNS ?? 4);
const size = sizeMiB * MiB;

for (const p of ["qemu-nbd", "nbdcopy"]) {
  if (spawnSync("sh", ["-c", `command -v ${p}`]).status !== 0) {
    console.error(`nbd-client bench: ${p} is not installed`);
    process.exit(2);
  }
}

const dir = mkdtempSync(join(tmpdir(), "blk-nbdc-bench-"));
let server;
process.on("exit", () => {
  server?.kill("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
});
const image = join(dir, "disk.img");
{
  const fd = openSync(image, "w");
  const buf = Buffer.alloc(4 * MiB);
  for (let off = 0; off < size; off += buf.length) writeSync(fd, randomFillSync(buf), 0, buf.length, off);
  closeSync(fd);
}
const sock = join(dir, "qemu-nbd.sock");
server = spawn("qemu-nbd", ["-r", "-f", "raw", "-x", "disk", "-k", sock, "-t", "-e", "8", image], {
  stdio: "ignore",
});
for (let i = 0; i < 500 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 20));
if (!existsSync(sock)) throw new Error("qemu-nbd did not start");
await new Promise((r) => setTimeout(r, 100));
const uri = `nbd+unix:///disk?socket=${sock}`;

/** Seconds for blk to copy the export into null-co over `n` connections. */
async function blkCopy(n) {
  const g = new BlockGraph();
  const src = await g.open(
    nbdDriver,
    { server: { type: "unix", path: sock }, export: "disk", "x-multi-conn": n },
    { nodeName: "src", readOnly: true },
  );
  if (src.state.clients.length !== n)
    throw new Error(`asked for ${n} connections, got ${src.state.clients.length}`);
  const dst = await g.open(nullDriver, { size }, { nodeName: "dst" });
  const work = dst.createBitmapSync({ granularity: 65536, disabled: true });
  work.setDirty(0, size);
  const t = performance.now();
  const r = await new CopyEngine({
    source: src,
    target: dst,
    bitmap: work,
    chunkSize: MiB,
    maxWorkers: 16 * n,
    status: "none",
  }).run();
  const secs = (performance.now() - t) / 1000;
  if (r.copied !== size) throw new Error(`copied ${r.copied} of ${size} bytes`);
  await src.close();
  await dst.close();
  return secs;
}

/** Seconds for nbdcopy to copy the export to `null:` over `n` connections. */
function nbdcopy(n) {
  const t = performance.now();
  const r = spawnSync("nbdcopy", [`--connections=${n}`, uri, "null:"], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  if (r.status !== 0) throw new Error(`nbdcopy failed: ${r.stderr}`);
  return (performance.now() - t) / 1000;
}

const runs = {
  "blk 1 conn": () => blkCopy(1),
  "nbdcopy 1 conn": async () => nbdcopy(1),
  [`blk ${conns} conns`]: () => blkCopy(conns),
  [`nbdcopy ${conns} conns`]: async () => nbdcopy(conns),
};
const names = Object.keys(runs);
const mibs = Object.fromEntries(names.map((n) => [n, []]));
// One untimed pass of each first: blk's copy path is JIT-compiled, nbdcopy is native.
for (const name of names) await runs[name]();
for (let round = 0; round < rounds; round++) {
  const order = round % 2 === 0 ? names : [...names].reverse();
  for (const name of order) mibs[name].push(sizeMiB / (await runs[name]()));
  process.stderr.write(`round ${round + 1}/${rounds} done\n`);
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const med = Object.fromEntries(names.map((n) => [n, median(mibs[n])]));
console.log(`NBD client benchmark: ${sizeMiB} MiB export (qemu-nbd), ${rounds} alternating rounds, medians`);
for (const n of names) console.log(`${n.padEnd(20)}${med[n].toFixed(0).padStart(8)} MiB/s`);
const ratio = (a, b) => `${(med[a] / med[b]).toFixed(2)}x`;
console.log(`blk/nbdcopy, 1 connection:        ${ratio("blk 1 conn", "nbdcopy 1 conn")}`);
console.log(
  `blk/nbdcopy, ${conns} connections:       ${ratio(`blk ${conns} conns`, `nbdcopy ${conns} conns`)}`,
);
console.log(`blk multi-conn on/off (${conns} vs 1):  ${ratio(`blk ${conns} conns`, "blk 1 conn")}`);
server.kill("SIGTERM");
