#!/usr/bin/env node
// Mirror convergence under a writer that writes as fast as it can: does the mirror reach READY, and how
// long does it take? blk's mirror (library, in this process) in `background`, `write-blocking` and
// `x-blk-copy-mode: auto`, and qemu-storage-daemon 7.2 in its two modes, on the same dense raw source
// (file nodes) and an empty raw target. The writer is bench/nbd-writer.mjs in a child process (4 KiB
// random writes of BLK_BENCH_BS bytes, default 4096, queue depth BLK_BENCH_QD, default 4) on a writable NBD export of the source, started a
// second before the mirror and running until READY or the cap (BLK_BENCH_CAP_S, default 30 s).
//
//   cd packages/jobs && npx tsc -b && node bench/mirror-convergence.mjs     (needs qemu-storage-daemon)
//   BLK_BENCH_SIZE_MIB=2048 BLK_BENCH_CAP_S=120 node bench/mirror-convergence.mjs
//
// Printed per daemon and mode: seconds to READY (or "no READY within the cap" with the remaining
// backlog), the writer's IOPS meanwhile, and for auto the second at which it switched. Not a test.
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
  console.error("mirror-convergence: build @blk/jobs first (cd packages/jobs && npx tsc -b)");
  process.exit(2);
}
const { mirror, JobManager } = await import(distIndex);
const haveQsd = spawnSync("sh", ["-c", "command -v qemu-storage-daemon"]).status === 0;

const MiB = 1024 * 1024;
const sizeMiB = Number(process.env.BLK_BENCH_SIZE_MIB ?? 512);
const capS = Number(process.env.BLK_BENCH_CAP_S ?? 30);
const qd = Number(process.env.BLK_BENCH_QD ?? 4);
const bs = Number(process.env.BLK_BENCH_BS ?? 4096);
const size = sizeMiB * MiB;

const {
  dir,
  children,
  source,
  freshTarget,
  startWriter: startGuest,
} = guestWorkspace("blk-mirror-conv-", size);
/** Starts the guest writer on the export at `sock`; `stop()` resolves with its statistics. */
const startWriter = (sock) => startGuest(sock, bs, qd);

async function blk(mode) {
  const graph = new BlockGraph();
  const manager = new JobManager();
  await graph.open(fileDriver, { filename: source }, { nodeName: "src" });
  await graph.open(fileDriver, { filename: freshTarget() }, { nodeName: "tgt" });
  const server = new NbdServer();
  server.addExport({ name: "disk", node: graph.find("src"), writable: true });
  const sock = join(dir, "blk.nbd");
  rmSync(sock, { force: true });
  await server.listen({ type: "unix", path: sock });
  let job;
  return {
    sock,
    async start() {
      job = await mirror(manager, graph, {
        "job-id": "m",
        device: "src",
        target: "tgt",
        sync: "full",
        "x-blk-copy-mode": mode,
      });
      return job.whenStatus("ready");
    },
    backlog: () => job.progress.total - job.progress.current,
    switchedAt: () => job.autoSwitchedAt,
    async stop() {
      job.cancel({ force: true });
      await job.outcome;
      await server.close();
      for (const n of graph.list()) if (!n.closed && n.parents.length === 0) await graph.delete(n);
    },
  };
}

async function qsd(mode) {
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
  let last = { len: 0, offset: 0 };
  return {
    sock,
    async start() {
      const mark = qmp.eventMark();
      await qmp.execute("blockdev-mirror", {
        "job-id": "m",
        device: "src",
        target: "tgt",
        sync: "full",
        "copy-mode": mode,
      });
      return qmp
        .waitEvent("BLOCK_JOB_READY", { since: mark, timeoutMs: capS * 1000 + 60_000 })
        .then(() => true);
    },
    async refresh() {
      const jobs = await qmp.execute("query-block-jobs");
      if (jobs[0] !== undefined) last = jobs[0];
    },
    backlog: () => last.len - last.offset,
    switchedAt: () => undefined,
    async stop() {
      await qmp.execute("block-job-cancel", { device: "m", force: true }).catch(() => {});
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
    const w = await startWriter(d.sock);
    await sleep(1000);
    const t = performance.now();
    const ready = d.start();
    ready.catch(() => {});
    const reached = await Promise.race([ready, sleep(capS * 1000).then(() => false)]);
    const secs = (performance.now() - t) / 1000;
    await d.refresh?.();
    const backlog = d.backlog();
    const writer = await w.stop();
    return { reached, secs, backlog, switchedAt: d.switchedAt(), writer };
  } finally {
    await d.stop();
  }
}

const cases = [
  ["blk background", () => blk("background")],
  ["blk write-blocking", () => blk("write-blocking")],
  ["blk x-blk-copy-mode auto", () => blk("auto")],
];
if (haveQsd) {
  cases.push(["qemu background", () => qsd("background")]);
  cases.push(["qemu write-blocking", () => qsd("write-blocking")]);
}
console.log(
  `mirror sync=full of a dense ${sizeMiB} MiB raw image; writer ${bs / 1024} KiB random, QD ${qd}, as fast as it can; cap ${capS} s`,
);
for (const [name, make] of cases) {
  const r = await measure(make);
  const when = r.reached
    ? `READY after ${r.secs.toFixed(2)} s`
    : `no READY within ${capS} s (backlog ${(r.backlog / MiB).toFixed(1)} MiB)`;
  const sw =
    r.switchedAt === undefined
      ? ""
      : `; switched to write-blocking at ${(r.switchedAt / 1e9).toFixed(2)} s of job time`;
  console.log(
    `${name.padEnd(26)} ${when}; writer ${r.writer.iops.toFixed(0)} IOPS (p99 ${r.writer.p99.toFixed(2)} ms)${sw}`,
  );
}
