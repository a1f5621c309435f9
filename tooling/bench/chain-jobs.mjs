#!/usr/bin/env node
// Stream and commit benchmark: the same QMP script against blkd and qemu-storage-daemon on copies of the
// same qcow2 chain (base: BASE MiB dense, top: TOP MiB written over the first half), alternating rounds:
//   - block-stream device=top            (pulls base's data not shadowed by top into top)
//   - block-commit device=top base-node=base (active commit: READY, then block-job-complete)
// Time from the command to BLOCK_JOB_COMPLETED; medians and same-run ratios (blkd time ÷ qsd time; > 1 means
// blkd is slower). Both daemons run with cache.direct=off and no throttling; images live in one temp dir.
//
//   node tooling/bench/chain-jobs.mjs            (after `pnpm build`; needs qemu-img, qemu-io, qsd)
//   BLK_BENCH_BASE_MIB=1024 BLK_BENCH_TOP_MIB=512 BLK_BENCH_ROUNDS=3 node tooling/bench/chain-jobs.mjs
import { spawn, spawnSync } from "node:child_process";
import { copyFileSync, existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { QmpClient } from "@blk/qmp";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const baseMiB = Number(process.env.BLK_BENCH_BASE_MIB ?? 1024);
const topMiB = Number(process.env.BLK_BENCH_TOP_MIB ?? 512);
const rounds = Number(process.env.BLK_BENCH_ROUNDS ?? 3);
for (const tool of ["qemu-img", "qemu-io", "qemu-storage-daemon"]) {
  if (spawnSync("sh", ["-c", `command -v ${tool}`]).status !== 0) {
    console.error(`chain-jobs bench: ${tool} is not installed`);
    process.exit(2);
  }
}
if (!existsSync(join(root, "apps/daemon/dist/main.js"))) {
  console.error("chain-jobs bench: run `pnpm build` first");
  process.exit(2);
}

const dir = mkdtempSync(join(tmpdir(), "blk-chain-bench-"));
const children = new Set();
process.on("exit", () => {
  for (const c of children) c.kill("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
});
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(130));

const sh = (cmd, args) => {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")}: ${r.stderr}`);
  return r.stdout;
};

// The pristine chain, made once by QEMU's tools; every run works on fresh copies of it.
const pristineBase = join(dir, "pristine-base.qcow2");
const pristineTop = join(dir, "pristine-top.qcow2");
sh("qemu-img", ["create", "-q", "-f", "qcow2", pristineBase, `${baseMiB}M`]);
for (let off = 0; off < baseMiB; off += 64) {
  const len = Math.min(64, baseMiB - off);
  sh("qemu-io", ["-f", "qcow2", "-c", `write -P ${((off / 64) % 255) | 1} ${off}M ${len}M`, pristineBase]);
}
sh("qemu-img", ["create", "-q", "-f", "qcow2", "-b", pristineBase, "-F", "qcow2", pristineTop]);
for (let off = 0; off < topMiB; off += 64) {
  const len = Math.min(64, topMiB - off);
  sh("qemu-io", ["-f", "qcow2", "-c", `write -P 0xee ${off}M ${len}M`, pristineTop]);
}

const daemons = {
  blkd: (a) => [
    process.execPath,
    [
      ...(process.env.BLK_BENCH_NODE_ARGS?.split(" ").filter(Boolean) ?? []),
      join(root, "apps/daemon/bin/blkd.js"),
      ...a,
    ],
  ],
  qsd: (a) => ["qemu-storage-daemon", a],
};

async function waitPath(path, child) {
  const deadline = Date.now() + 20_000;
  while (!existsSync(path)) {
    if (child.exitCode !== null) throw new Error(`daemon exited with ${child.exitCode}`);
    if (Date.now() > deadline) throw new Error(`no ${path}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** One job on fresh copies of the chain; returns seconds from the command to BLOCK_JOB_COMPLETED. */
async function runJob(name, job, round) {
  const base = join(dir, `${name}-${job}-${round}-base.qcow2`);
  const top = join(dir, `${name}-${job}-${round}-top.qcow2`);
  copyFileSync(pristineBase, base);
  copyFileSync(pristineTop, top);
  sh("qemu-img", ["rebase", "-u", "-b", base, "-F", "qcow2", top]);
  const qmpPath = join(dir, `${name}-${job}-${round}.qmp`);
  const [cmd, args] = daemons[name]([
    "--chardev",
    `socket,id=m0,path=${qmpPath},server=on,wait=off`,
    "--monitor",
    "chardev=m0",
  ]);
  const child = spawn(cmd, args, { stdio: ["ignore", "ignore", "pipe"], cwd: dir });
  let log = "";
  child.stderr.on("data", (d) => {
    log = (log + d).slice(-4000);
  });
  child.on("exit", (code) => {
    if (code !== 0 && code !== null) console.error(`${name} exited with ${code}:\n${log}`);
  });
  children.add(child);
  try {
    await waitPath(qmpPath, child);
    const qmp = await QmpClient.connect({ path: qmpPath });
    try {
      await qmp.execute("blockdev-add", {
        driver: "qcow2",
        "node-name": "base",
        file: { driver: "file", filename: base },
      });
      await qmp.execute("blockdev-add", {
        driver: "qcow2",
        "node-name": "top",
        file: { driver: "file", filename: top },
        backing: "base",
      });
      const mark = qmp.eventMark();
      const t0 = performance.now();
      if (job === "stream") {
        await qmp.execute("block-stream", { "job-id": "j", device: "top" });
      } else {
        await qmp.execute("block-commit", { "job-id": "j", device: "top", "base-node": "base" });
        await qmp.waitEvent("BLOCK_JOB_READY", { since: mark, timeoutMs: 600_000 });
        await qmp.execute("block-job-complete", { device: "j" });
      }
      const done = await qmp.waitEvent("BLOCK_JOB_COMPLETED", { since: mark, timeoutMs: 600_000 });
      const seconds = (performance.now() - t0) / 1000;
      if (done.data.error !== undefined) throw new Error(`${name} ${job}: ${done.data.error}`);
      await qmp.execute("quit").catch(() => {});
      await qmp.close().catch(() => {});
      await new Promise((resolve) => (child.exitCode !== null ? resolve() : child.on("exit", resolve)));
      // The result must read as QEMU reads the pristine chain.
      const result = job === "stream" ? top : base;
      const cmp = spawnSync("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", pristineTop, result], {
        encoding: "utf8",
      });
      if (cmp.status !== 0) throw new Error(`${name} ${job}: result differs: ${cmp.stdout}${cmp.stderr}`);
      return seconds;
    } catch (e) {
      await qmp.close().catch(() => {});
      throw e;
    }
  } finally {
    await new Promise((resolve) => {
      if (child.exitCode !== null) resolve();
      else {
        const t = setTimeout(() => child.kill("SIGKILL"), 20_000);
        child.on("exit", () => {
          clearTimeout(t);
          resolve();
        });
      }
    });
    children.delete(child);
    // Free the space whatever happened; the result was verified (below) before the files go.
    rmSync(base, { force: true });
    rmSync(top, { force: true });
  }
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(`chain: base ${baseMiB} MiB dense, top ${topMiB} MiB; ${rounds} alternating rounds`);
const results = {};
for (const job of ["stream", "commit"]) {
  const times = { blkd: [], qsd: [] };
  for (let r = 0; r < rounds; r++) {
    for (const name of r % 2 === 0 ? ["blkd", "qsd"] : ["qsd", "blkd"]) {
      times[name].push(await runJob(name, job, r));
    }
  }
  const copied = job === "stream" ? baseMiB - topMiB : topMiB;
  const b = median(times.blkd);
  const q = median(times.qsd);
  results[job] = { blkd: b, qsd: q };
  console.log(
    `${job.padEnd(6)} blkd ${b.toFixed(2)} s (${(copied / b).toFixed(0)} MiB/s)  qsd ${q.toFixed(2)} s (${(copied / q).toFixed(0)} MiB/s)  throughput ratio blkd/qsd ${(q / b).toFixed(2)}x`,
  );
}
