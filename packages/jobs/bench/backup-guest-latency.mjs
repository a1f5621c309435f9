#!/usr/bin/env node
// Guest write latency during a full backup, library level: blk's backup job with its copy-before-write
// buffer (`x-blk-cbw-buffer-size`, default 16 MiB), blk without it (0: QEMU's algorithm), and
// qemu-storage-daemon 7.2, on the same dense raw source and an empty raw target (file nodes). The guest is
// bench/nbd-writer.mjs in a child process (4 KiB random writes, queue depth BLK_BENCH_QD, default 1) on a
// writable NBD export of the source, the same client code for every daemon.
//
//   cd packages/jobs && npx tsc -b && node bench/backup-guest-latency.mjs     (needs qemu-storage-daemon)
//   BLK_BENCH_SIZE_MIB=2048 BLK_BENCH_SECONDS=3 BLK_BENCH_ROUNDS=3 node bench/backup-guest-latency.mjs
//
// Per daemon and round: the writer alone for BLK_BENCH_SECONDS (idle), then the writer while the backup
// runs (until it completes, at most BLK_BENCH_SECONDS), then the rest of the backup. Printed per daemon:
// medians of idle and during-backup IOPS, p50 / p99 / max write latency (ms), the backup time, and the
// ratios during ÷ idle; the summary divides blk's ratios by QEMU's (same run). Not a test.
// BLK_BENCH_WORKERS sets blk's x-perf.max-workers (default 64, as QEMU).
import { spawn, spawnSync } from "node:child_process";
import { existsSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { BlockGraph } from "@blk/core";
import { fileDriver } from "@blk/drivers/file";
import { NbdServer } from "@blk/drivers/nbd";
import { QmpClient } from "@blk/qmp";
import { guestWorkspace, sleep } from "./guest-bench.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const distIndex = join(here, "..", "dist", "index.js");
if (!existsSync(distIndex)) {
  console.error("backup-guest-latency: build @blk/jobs first (cd packages/jobs && npx tsc -b)");
  process.exit(2);
}
const { backup, JobManager } = await import(distIndex);
const haveQsd = spawnSync("sh", ["-c", "command -v qemu-storage-daemon"]).status === 0;
if (!haveQsd) console.warn("backup-guest-latency: qemu-storage-daemon missing, blk only (no ratios)");

const MiB = 1024 * 1024;
const sizeMiB = Number(process.env.BLK_BENCH_SIZE_MIB ?? 512);
const seconds = Number(process.env.BLK_BENCH_SECONDS ?? 2);
const rounds = Number(process.env.BLK_BENCH_ROUNDS ?? 2);
const qd = Number(process.env.BLK_BENCH_QD ?? 1);
const size = sizeMiB * MiB;

const {
  dir,
  children,
  source,
  freshTarget,
  startWriter: startGuest,
} = guestWorkspace("blk-backup-lat-", size);
/** Starts the guest writer on the export at `sock`; `stop()` resolves with its statistics. */
const startWriter = (sock) => startGuest(sock, 4096, qd);

/** blk in this process: file nodes, an NBD export of the source, backup() on demand. */
async function blk(bufferSize) {
  const graph = new BlockGraph();
  const manager = new JobManager();
  await graph.open(fileDriver, { filename: source }, { nodeName: "src" });
  await graph.open(fileDriver, { filename: freshTarget() }, { nodeName: "tgt" });
  const server = new NbdServer();
  server.addExport({ name: "disk", node: graph.find("src"), writable: true });
  const sock = join(dir, "blk.nbd");
  rmSync(sock, { force: true });
  await server.listen({ type: "unix", path: sock });
  return {
    sock,
    async backup() {
      const job = await backup(manager, {
        graph,
        "job-id": "b",
        device: "src",
        target: "tgt",
        sync: "full",
        "x-blk-cbw-buffer-size": bufferSize,
        ...(process.env.BLK_BENCH_WORKERS
          ? { "x-perf": { "max-workers": Number(process.env.BLK_BENCH_WORKERS) } }
          : {}),
      });
      return job.outcome.then((o) => {
        if (o.status !== "completed") throw new Error(`backup: ${JSON.stringify(o)}`);
        return { maxBuffered: job.cbw.bufferStats.maxBytes, buffered: job.cbw.bufferStats.bufferedWrites };
      });
    },
    async stop() {
      await server.close();
      for (const n of graph.list()) if (!n.closed && n.parents.length === 0) await graph.delete(n);
    },
  };
}

/** qemu-storage-daemon with the same nodes and export; backup over QMP. */
async function qsd() {
  const qmpSock = join(dir, "qsd.qmp");
  const sock = join(dir, "qsd.nbd");
  rmSync(qmpSock, { force: true });
  rmSync(sock, { force: true });
  const child = spawn(
    "qemu-storage-daemon",
    [
      "--blockdev",
      `file,node-name=src,filename=${source}`,
      "--blockdev",
      `file,node-name=tgt,filename=${freshTarget()}`,
      "--nbd-server",
      `addr.type=unix,addr.path=${sock}`,
      "--export",
      "nbd,id=e0,node-name=src,name=disk,writable=on",
      "--chardev",
      `socket,id=m,path=${qmpSock},server=on,wait=off`,
      "--monitor",
      "m",
    ],
    { stdio: "ignore" },
  );
  children.add(child);
  let qmp;
  for (let i = 0; qmp === undefined; i++) {
    try {
      if (!existsSync(qmpSock) || !existsSync(sock)) throw new Error("not up yet");
      qmp = await QmpClient.connect({ path: qmpSock }, { timeoutMs: 5000 });
    } catch (e) {
      if (i > 500) throw e;
      await sleep(20);
    }
  }
  return {
    sock,
    async backup() {
      const mark = qmp.eventMark();
      await qmp.execute("blockdev-backup", { "job-id": "b", device: "src", target: "tgt", sync: "full" });
      const ev = await qmp.waitEvent("BLOCK_JOB_COMPLETED", { since: mark, timeoutMs: 1_800_000 });
      if (ev.data?.error !== undefined) throw new Error(`qsd backup: ${ev.data.error}`);
      return {};
    },
    async stop() {
      await qmp.execute("quit").catch(() => {});
      await qmp.close().catch(() => {});
      await new Promise((r) => (child.exitCode !== null ? r() : child.once("close", r)));
      children.delete(child);
    },
  };
}

async function measure(make) {
  const d = await make();
  try {
    const w1 = await startWriter(d.sock);
    await sleep(seconds * 1000);
    const idle = await w1.stop();
    const w2 = await startWriter(d.sock);
    const t = performance.now();
    let finished = false;
    const job = d.backup().finally(() => {
      finished = true;
    });
    job.catch(() => {});
    await Promise.race([sleep(seconds * 1000), job]);
    const during = await w2.stop();
    const extra = await job;
    const backupSecs = (performance.now() - t) / 1000;
    return { idle, during, backupSecs, wholeOverlap: !finished, ...extra };
  } finally {
    await d.stop();
  }
}

const variants = { "blk cbw-buffer 16M": () => blk(16 * MiB), "blk cbw-buffer 0": () => blk(0) };
if (haveQsd) variants["qemu-storage-daemon"] = qsd;
const names = Object.keys(variants);
const results = Object.fromEntries(names.map((n) => [n, []]));
for (let r = 0; r < rounds; r++) {
  const order = r % 2 === 0 ? names : [...names].reverse();
  for (const n of order) results[n].push(await measure(variants[n]));
}
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
};
const f = (x, d = 2) => x.toFixed(d);
console.log(
  `backup sync=full of a dense ${sizeMiB} MiB raw image; writer 4 KiB random, QD ${qd}; ${rounds} round(s)`,
);
const summary = {};
for (const n of names) {
  const rs = results[n];
  const m = (k, s) => median(rs.map((x) => x[s][k]));
  const row = {
    idleIops: m("iops", "idle"),
    iops: m("iops", "during"),
    p50: m("p50", "during"),
    p99: m("p99", "during"),
    max: m("max", "during"),
    idleP99: m("p99", "idle"),
    backup: median(rs.map((x) => x.backupSecs)),
  };
  summary[n] = row;
  console.log(
    `${n.padEnd(22)} IOPS idle ${f(row.idleIops, 0)} during ${f(row.iops, 0)} (×${f(row.iops / row.idleIops)}); ` +
      `latency ms p50 ${f(row.p50)} p99 ${f(row.p99)} max ${f(row.max)} (idle p99 ${f(row.idleP99)}); backup ${f(row.backup)} s` +
      (rs[0].maxBuffered === undefined
        ? ""
        : `; max buffered ${f(median(rs.map((x) => x.maxBuffered)) / MiB, 1)} MiB`),
  );
}
const q = summary["qemu-storage-daemon"];
if (q !== undefined) {
  for (const n of names.filter((x) => x !== "qemu-storage-daemon")) {
    const b = summary[n];
    console.log(
      `${n} ÷ qemu: writer IOPS ratio (during/idle) ×${f(b.iops / b.idleIops / (q.iops / q.idleIops))}, ` +
        `p99 during ×${f(b.p99 / q.p99)}, backup time ×${f(b.backup / q.backup)}`,
    );
  }
}
