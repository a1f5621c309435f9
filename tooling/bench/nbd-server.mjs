#!/usr/bin/env node
// End-to-end NBD server benchmark: blkd's NBD export against qemu-nbd (and nbdkit's file plugin) serving the
// same raw file, one run per server per round, alternating the order each round; medians and same-run ratios.
//
//   node tooling/bench/nbd-server.mjs            (after `pnpm build`; needs qemu-nbd, nbdkit, nbdcopy)
//   BLK_BENCH_SIZE_MIB=2048 BLK_BENCH_ROUNDS=5 BLK_BENCH_SECONDS=3 node tooling/bench/nbd-server.mjs
//   BLK_BENCH_WARMUP=0 node tooling/bench/nbd-server.mjs     (cold servers: no untimed warm-up pass)
//   BLK_BENCH_TRACE_GC=1 node tooling/bench/nbd-server.mjs   (blkd under --trace-gc: its mark-compacts per workload)
//
// Measured per server: nbdcopy sequential read (export → null:) and write (file → export) in MiB/s, and
// 4 KiB random reads and writes at queue depth 1 and 16 in IOPS, issued by one NbdClient (the same client
// code for every server, so the ratio compares the servers). Each freshly started server first gets one
// untimed pass of every workload (random ones for at most a second), the same for every server: a
// daemon serves for hours, and without it blkd's figures measure V8 compiling the request path (a
// 512 MiB nbdcopy is only ~2000 requests). The server's CPU time (user + system, from /proc) per
// workload is reported next to the rates, as CPU time per MiB or per 1000 requests: on a busy machine
// it is steadier than the rates. Not a test: nothing here gates CI.
import { spawn, spawnSync } from "node:child_process";
import { randomFillSync } from "node:crypto";
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { NbdClient } from "@blk/drivers/nbd";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const MiB = 1024 * 1024;
const sizeMiB = Number(process.env.BLK_BENCH_SIZE_MIB ?? 512);
const rounds = Number(process.env.BLK_BENCH_ROUNDS ?? 3);
const seconds = Number(process.env.BLK_BENCH_SECONDS ?? 2);
const warmup = process.env.BLK_BENCH_WARMUP !== "0";
const traceGc = process.env.BLK_BENCH_TRACE_GC === "1";
const size = sizeMiB * MiB;

for (const p of ["qemu-nbd", "nbdcopy", "nbdkit"]) {
  if (spawnSync("sh", ["-c", `command -v ${p}`]).status !== 0) {
    console.error(`nbd-server bench: ${p} is not installed`);
    process.exit(2);
  }
}
if (!existsSync(join(root, "apps/daemon/dist/main.js"))) {
  console.error("nbd-server bench: run `pnpm build` first");
  process.exit(2);
}

const dir = mkdtempSync(join(tmpdir(), "blk-nbd-bench-"));
const children = new Set();
process.on("exit", () => {
  for (const c of children) c.kill("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
});
const image = join(dir, "disk.img");
const source = join(dir, "source.img");
for (const f of [image, source]) {
  const fd = openSync(f, "w");
  const buf = Buffer.alloc(4 * MiB);
  for (let off = 0; off < size; off += buf.length) writeSync(fd, randomFillSync(buf), 0, buf.length, off);
  closeSync(fd);
}

const waitFor = async (path) => {
  for (let i = 0; i < 500 && !existsSync(path); i++) await new Promise((r) => setTimeout(r, 20));
  if (!existsSync(path)) throw new Error(`${path} did not appear`);
};

const servers = {
  blkd: (sock) => [
    process.execPath,
    [
      ...(traceGc ? ["--trace-gc"] : []),
      join(root, "apps/daemon/bin/blkd.js"),
      "--blockdev",
      `driver=file,node-name=f0,filename=${image},cache.direct=off`,
      "--blockdev",
      "driver=raw,node-name=disk,file=f0",
      "--nbd-server",
      `addr.type=unix,addr.path=${sock}`,
      "--export",
      "type=nbd,id=e0,node-name=disk,name=disk,writable=on",
    ],
  ],
  "qemu-nbd": (sock) => [
    "qemu-nbd",
    ["-f", "raw", "-x", "disk", "-k", sock, "-t", "-e", "8", "--cache=writeback", image],
  ],
  nbdkit: (sock) => ["nbdkit", ["-f", "-U", sock, "-e", "disk", "file", image]],
};

async function start(name) {
  const sock = join(dir, `${name}.sock`);
  rmSync(sock, { force: true });
  const [cmd, args] = servers[name](sock);
  const traced = traceGc && name === "blkd";
  const child = spawn(cmd, args, { stdio: ["ignore", traced ? "pipe" : "ignore", "ignore"] });
  children.add(child);
  // --trace-gc prints one line per collection on stdout: count the full (mark-compact) ones.
  let markCompacts = 0;
  if (traced) {
    let tail = "";
    child.stdout.setEncoding("utf8");
    child.stdout.on("data", (d) => {
      const lines = (tail + d).split("\n");
      tail = lines.pop() ?? "";
      for (const l of lines) if (l.includes("Mark-Compact")) markCompacts++;
    });
  }
  await waitFor(sock);
  await new Promise((r) => setTimeout(r, 100));
  return {
    uri: `nbd+unix:///disk?socket=${sock}`,
    sock,
    pid: child.pid,
    traced,
    markCompacts: () => markCompacts,
    stop: async () => {
      child.kill("SIGTERM");
      await new Promise((r) => child.once("close", r));
      children.delete(child);
    },
  };
}

function timed(cmd, args) {
  const t = performance.now();
  const r = spawnSync(cmd, args, { stdio: ["ignore", "ignore", "pipe"] });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed: ${r.stderr}`);
  return (performance.now() - t) / 1000;
}

/** CPU time (user + system) the process has used so far, in milliseconds (Linux /proc). */
function cpuMs(pid) {
  const f = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
  return ((Number(f[11]) + Number(f[12])) * 1000) / 100; // clock ticks: USER_HZ is 100 on Linux
}

async function randomIops(sock, depth, write, duration = seconds) {
  const client = await NbdClient.connect({
    server: { type: "unix", path: sock },
    export: "disk",
    maxInFlight: depth,
  });
  const blocks = size / 4096;
  const buf = randomFillSync(Buffer.alloc(4096));
  let ops = 0;
  const deadline = performance.now() + duration * 1000;
  const worker = async () => {
    while (performance.now() < deadline) {
      const off = Math.floor(Math.random() * blocks) * 4096;
      if (write) await client.write(off, buf);
      else await client.read(off, 4096);
      ops++;
    }
  };
  const t = performance.now();
  await Promise.all(Array.from({ length: depth }, worker));
  const secs = (performance.now() - t) / 1000;
  await client.close();
  return ops / secs;
}

const metrics = [
  "seq read MiB/s",
  "seq write MiB/s",
  "4k randread qd1",
  "4k randread qd16",
  "4k randwrite qd16",
];
const results = Object.fromEntries(
  Object.keys(servers).map((s) => [s, Object.fromEntries(metrics.map((m) => [m, []]))]),
);
/** blkd's mark-compact GCs per workload (with BLK_BENCH_TRACE_GC=1). */
const fullGcs = Object.fromEntries(metrics.map((m) => [m, []]));
/** Server CPU time per workload: ms per MiB (sequential) or per 1000 requests (random). */
const cpu = Object.fromEntries(
  Object.keys(servers).map((s) => [s, Object.fromEntries(metrics.map((m) => [m, []]))]),
);
const names = Object.keys(servers);
for (let round = 0; round < rounds; round++) {
  const order = round % 2 === 0 ? names : [...names].reverse();
  for (const name of order) {
    const srv = await start(name);
    try {
      const r = results[name];
      if (warmup) {
        timed("nbdcopy", [srv.uri, "null:"]);
        timed("nbdcopy", [source, srv.uri]);
        await randomIops(srv.sock, 1, false, Math.min(1, seconds));
        await randomIops(srv.sock, 16, false, Math.min(1, seconds));
        await randomIops(srv.sock, 16, true, Math.min(1, seconds));
      }
      const measure = async (metric, run, perCpu) => {
        const c0 = cpuMs(srv.pid);
        const g0 = srv.markCompacts();
        const t0 = performance.now();
        const rate = await run();
        const used = cpuMs(srv.pid) - c0;
        // (Lines still in the pipe may land in the next workload's count: they are a few at most.)
        if (srv.traced) fullGcs[metric].push(srv.markCompacts() - g0);
        r[metric].push(rate);
        cpu[name][metric].push(used / (perCpu(rate, (performance.now() - t0) / 1000) || 1));
      };
      const perMiB = () => sizeMiB;
      const perKReq = (iops, secs) => (iops * secs) / 1000;
      await measure("seq read MiB/s", () => sizeMiB / timed("nbdcopy", [srv.uri, "null:"]), perMiB);
      await measure("seq write MiB/s", () => sizeMiB / timed("nbdcopy", [source, srv.uri]), perMiB);
      await measure("4k randread qd1", () => randomIops(srv.sock, 1, false), perKReq);
      await measure("4k randread qd16", () => randomIops(srv.sock, 16, false), perKReq);
      await measure("4k randwrite qd16", () => randomIops(srv.sock, 16, true), perKReq);
    } finally {
      await srv.stop();
    }
  }
  process.stderr.write(`round ${round + 1}/${rounds} done\n`);
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(
  `NBD server benchmark: ${sizeMiB} MiB dense raw file, ${rounds} alternating rounds, medians` +
    (warmup ? ", after an untimed warm-up pass per server" : ", cold servers"),
);
console.log(
  [
    "metric".padEnd(20),
    ...names.map((n) => n.padStart(12)),
    "blkd/qemu-nbd".padStart(15),
    "blkd/nbdkit".padStart(13),
  ].join(""),
);
for (const m of metrics) {
  const med = Object.fromEntries(names.map((n) => [n, median(results[n][m])]));
  console.log(
    [
      m.padEnd(20),
      ...names.map((n) => med[n].toFixed(0).padStart(12)),
      `${(med.blkd / med["qemu-nbd"]).toFixed(2)}x`.padStart(15),
      `${(med.blkd / med.nbdkit).toFixed(2)}x`.padStart(13),
    ].join(""),
  );
}
console.log("server CPU time (user + system): ms per MiB (sequential), per 1000 requests (random)");
for (const m of metrics) {
  console.log([m.padEnd(20), ...names.map((n) => median(cpu[n][m]).toFixed(2).padStart(12))].join(""));
}
if (traceGc) {
  console.log("blkd mark-compact GCs per workload (--trace-gc), per round");
  for (const m of metrics) console.log([m.padEnd(20), fullGcs[m].join(" ").padStart(12)].join(""));
}
