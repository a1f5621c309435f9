#!/usr/bin/env node
// Every block job type against qemu-storage-daemon, the same QMP script on copies of the same qcow2 chain
// (base: BASE MiB dense; mid: MID MiB written at BASE/2; top: TOP MiB written at 0), alternating rounds:
//   stream        block-stream device=top                        (base's and mid's data into top)
//   commit        block-commit device=top top-node=mid base-node=base   (intermediate: mid into base)
//   active-commit block-commit device=top base-node=base         (READY, then block-job-complete)
//   mirror-raw    blockdev-mirror sync=full top → empty raw file (time to READY, then complete)
//   mirror-qcow2  blockdev-mirror sync=full top → empty qcow2 image
//   backup-raw    blockdev-backup sync=full top → empty raw file
//   backup-qcow2  blockdev-backup sync=full top → empty qcow2 image
// Time from the command to BLOCK_JOB_COMPLETED (mirror and active commit: also to READY); medians and
// same-run ratios (qsd time ÷ blkd time: the throughput ratio, 1 = parity). Every result is checked with
// `qemu-img compare` against the pristine chain. Both daemons use cache.direct=off and no throttling.
//
//   cd apps/daemon && npx tsc -b && cd ../../packages/jobs && node bench/jobs-vs-qsd.mjs
//   BLK_BENCH_BASE_MIB=256 BLK_BENCH_ROUNDS=3 BLK_BENCH_JOBS=stream,mirror-raw node bench/jobs-vs-qsd.mjs
//   BLK_BENCH_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" ...   (profiles blkd)
//   BLK_BENCH_STRACE=1 ...    (prints `strace -f -c` of blkd's fsync/write calls per job; needs strace)
// Not a test.
import { spawn, spawnSync } from "node:child_process";
import {
  closeSync,
  copyFileSync,
  existsSync,
  ftruncateSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { QmpClient } from "@blk/qmp";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const baseMiB = Number(process.env.BLK_BENCH_BASE_MIB ?? 256);
const midMiB = Number(process.env.BLK_BENCH_MID_MIB ?? Math.floor(baseMiB / 4));
const topMiB = Number(process.env.BLK_BENCH_TOP_MIB ?? Math.floor(baseMiB / 4));
const rounds = Number(process.env.BLK_BENCH_ROUNDS ?? 3);
const strace = process.env.BLK_BENCH_STRACE === "1";
const allJobs = [
  "stream",
  "commit",
  "active-commit",
  "mirror-raw",
  "mirror-qcow2",
  "backup-raw",
  "backup-qcow2",
];
const jobs = process.env.BLK_BENCH_JOBS?.split(",").filter(Boolean) ?? allJobs;
for (const j of jobs) {
  if (!allJobs.includes(j)) {
    console.error(`jobs-vs-qsd: unknown job ${j} (${allJobs.join(", ")})`);
    process.exit(2);
  }
}
for (const tool of ["qemu-img", "qemu-io", "qemu-storage-daemon", ...(strace ? ["strace"] : [])]) {
  if (spawnSync("sh", ["-c", `command -v ${tool}`]).status !== 0) {
    console.error(`jobs-vs-qsd: ${tool} is not installed`);
    process.exit(2);
  }
}
if (!existsSync(join(root, "apps/daemon/dist/main.js"))) {
  console.error("jobs-vs-qsd: build the daemon first (cd apps/daemon && npx tsc -b)");
  process.exit(2);
}
if (midMiB > baseMiB / 2 || topMiB > baseMiB / 2) {
  console.error("jobs-vs-qsd: MID and TOP must each fit in half of BASE");
  process.exit(2);
}

const dir = mkdtempSync(join(tmpdir(), "blk-jobs-bench-"));
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
const writeRange = (file, pattern, fromMiB, lenMiB) => {
  for (let off = fromMiB; off < fromMiB + lenMiB; off += 64) {
    const len = Math.min(64, fromMiB + lenMiB - off);
    sh("qemu-io", ["-f", "qcow2", "-c", `write -P ${pattern} ${off}M ${len}M`, file]);
  }
};

// The pristine chain, made once by QEMU's tools; every run works on fresh copies of it.
const pristine = {
  base: join(dir, "p-base.qcow2"),
  mid: join(dir, "p-mid.qcow2"),
  top: join(dir, "p-top.qcow2"),
};
sh("qemu-img", ["create", "-q", "-f", "qcow2", pristine.base, `${baseMiB}M`]);
for (let off = 0; off < baseMiB; off += 64)
  writeRange(pristine.base, ((off / 64) % 255) | 1, off, Math.min(64, baseMiB - off));
sh("qemu-img", ["create", "-q", "-f", "qcow2", "-b", pristine.base, "-F", "qcow2", pristine.mid]);
writeRange(pristine.mid, 0xdd, baseMiB / 2, midMiB);
sh("qemu-img", ["create", "-q", "-f", "qcow2", "-b", pristine.mid, "-F", "qcow2", pristine.top]);
writeRange(pristine.top, 0xee, 0, topMiB);

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

const fileNode = (filename) => ({ driver: "file", filename });
const qcow2Node = (name, filename, backing) => ({
  driver: "qcow2",
  "node-name": name,
  file: fileNode(filename),
  ...(backing === undefined ? {} : { backing }),
});

/** One job on fresh copies of the chain; returns { ready, total } seconds from the command. */
async function runJob(name, job, round) {
  const p = (what) => join(dir, `${name}-${job}-${round}-${what}`);
  const f = { base: p("base.qcow2"), mid: p("mid.qcow2"), top: p("top.qcow2") };
  copyFileSync(pristine.base, f.base);
  copyFileSync(pristine.mid, f.mid);
  copyFileSync(pristine.top, f.top);
  sh("qemu-img", ["rebase", "-u", "-b", f.base, "-F", "qcow2", f.mid]);
  sh("qemu-img", ["rebase", "-u", "-b", f.mid, "-F", "qcow2", f.top]);
  const targetKind = job.endsWith("-raw") ? "raw" : job.endsWith("-qcow2") ? "qcow2" : undefined;
  const target = targetKind === undefined ? undefined : p(`target.${targetKind}`);
  if (targetKind === "raw") {
    const fd = openSync(target, "w");
    ftruncateSync(fd, baseMiB * 1024 * 1024);
    closeSync(fd);
  } else if (targetKind === "qcow2") {
    sh("qemu-img", ["create", "-q", "-f", "qcow2", target, `${baseMiB}M`]);
  }
  const qmpPath = p("qmp");
  const straceOut = p("strace");
  let [cmd, args] = daemons[name]([
    "--chardev",
    `socket,id=m0,path=${qmpPath},server=on,wait=off`,
    "--monitor",
    "chardev=m0",
  ]);
  if (strace) {
    args = [
      "-f",
      "-c",
      "-o",
      straceOut,
      "-e",
      "trace=fdatasync,fsync,pwrite64,pwritev,pwritev2,pread64,preadv,preadv2",
      cmd,
      ...args,
    ];
    cmd = "strace";
  }
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
    let qmp;
    for (let i = 0; qmp === undefined; i++) {
      try {
        qmp = await QmpClient.connect({ path: qmpPath });
      } catch (e) {
        // the socket exists from bind(), connections are refused until listen()
        if (i > 200) throw e;
        await new Promise((r) => setTimeout(r, 10));
      }
    }
    try {
      await qmp.execute("blockdev-add", qcow2Node("base", f.base));
      await qmp.execute("blockdev-add", qcow2Node("mid", f.mid, "base"));
      await qmp.execute("blockdev-add", qcow2Node("top", f.top, "mid"));
      if (targetKind === "raw") {
        await qmp.execute("blockdev-add", { driver: "raw", "node-name": "tgt", file: fileNode(target) });
      } else if (targetKind === "qcow2") {
        await qmp.execute("blockdev-add", qcow2Node("tgt", target, null));
      }
      const mark = qmp.eventMark();
      const t0 = performance.now();
      let ready;
      const waitReadyComplete = async () => {
        await qmp.waitEvent("BLOCK_JOB_READY", { since: mark, timeoutMs: 600_000 });
        ready = (performance.now() - t0) / 1000;
        await qmp.execute("block-job-complete", { device: "j" });
      };
      if (job === "stream") {
        await qmp.execute("block-stream", { "job-id": "j", device: "top" });
      } else if (job === "commit") {
        await qmp.execute("block-commit", {
          "job-id": "j",
          device: "top",
          "top-node": "mid",
          "base-node": "base",
        });
      } else if (job === "active-commit") {
        await qmp.execute("block-commit", { "job-id": "j", device: "top", "base-node": "base" });
        await waitReadyComplete();
      } else if (job.startsWith("mirror")) {
        await qmp.execute("blockdev-mirror", { "job-id": "j", device: "top", target: "tgt", sync: "full" });
        await waitReadyComplete();
      } else {
        await qmp.execute("blockdev-backup", { "job-id": "j", device: "top", target: "tgt", sync: "full" });
      }
      const done = await qmp.waitEvent("BLOCK_JOB_COMPLETED", { since: mark, timeoutMs: 600_000 });
      const total = (performance.now() - t0) / 1000;
      if (done.data.error !== undefined) throw new Error(`${name} ${job}: ${done.data.error}`);
      await qmp.execute("quit").catch(() => {});
      await qmp.close().catch(() => {});
      await new Promise((resolve) => (child.exitCode !== null ? resolve() : child.on("exit", resolve)));
      // The result must read as QEMU reads the pristine chain.
      const [result, fmt] =
        job === "stream" || job === "commit"
          ? [f.top, "qcow2"]
          : job === "active-commit"
            ? [f.base, "qcow2"]
            : [target, targetKind];
      const cmp = spawnSync("qemu-img", ["compare", "-f", "qcow2", "-F", fmt, pristine.top, result], {
        encoding: "utf8",
      });
      if (cmp.status !== 0) throw new Error(`${name} ${job}: result differs: ${cmp.stdout}${cmp.stderr}`);
      if (strace && round === 0) {
        const lines = readFileSync(straceOut, "utf8")
          .split("\n")
          .filter((l) => /fdatasync|fsync|pwrite|pread/.test(l))
          .map((l) => l.trim().split(/\s+/))
          .map((c) => `${c.at(-1)} ${c[3]}`);
        console.log(`  strace ${name} ${job}: ${lines.join(", ")}`);
      }
      return { ready, total };
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
    for (const x of [f.base, f.mid, f.top, target, straceOut])
      if (x !== undefined) rmSync(x, { force: true });
  }
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const copiedMiB = {
  stream: baseMiB - topMiB,
  commit: midMiB,
  "active-commit": midMiB + topMiB,
  "mirror-raw": baseMiB,
  "mirror-qcow2": baseMiB,
  "backup-raw": baseMiB,
  "backup-qcow2": baseMiB,
};
console.log(
  `chain: base ${baseMiB} MiB dense, mid ${midMiB} MiB, top ${topMiB} MiB; ${rounds} alternating rounds`,
);
for (const job of jobs) {
  const t = { blkd: [], qsd: [] };
  for (let r = 0; r < rounds; r++) {
    for (const name of r % 2 === 0 ? ["blkd", "qsd"] : ["qsd", "blkd"])
      t[name].push(await runJob(name, job, r));
  }
  const b = median(t.blkd.map((x) => x.total));
  const q = median(t.qsd.map((x) => x.total));
  const mib = copiedMiB[job];
  let line = `${job.padEnd(13)} blkd ${b.toFixed(2)} s (${(mib / b).toFixed(0)} MiB/s)  qsd ${q.toFixed(2)} s (${(mib / q).toFixed(0)} MiB/s)  ratio ${(q / b).toFixed(2)}x`;
  if (t.blkd[0].ready !== undefined) {
    const br = median(t.blkd.map((x) => x.ready));
    const qr = median(t.qsd.map((x) => x.ready));
    line += `  [READY blkd ${br.toFixed(2)} s, qsd ${qr.toFixed(2)} s, ratio ${(qr / br).toFixed(2)}x]`;
  }
  console.log(line);
}
