#!/usr/bin/env node
// Block-job benchmark over QMP: blkd against qemu-storage-daemon 7.2 driving the same jobs on the same
// images, one daemon start per measurement, alternating the order each round; medians and same-run ratios.
//
//   node tooling/bench/jobs-qmp.mjs           (after `pnpm build`; needs qemu-storage-daemon, qemu-img)
//   BLK_BENCH_SIZE_MIB=2048 BLK_BENCH_ROUNDS=3 BLK_BENCH_SECONDS=2 node tooling/bench/jobs-qmp.mjs
//   BLK_BENCH_METRICS=mirror,backup,ready,writer   (a subset of the four measurements; default all)
//   BLK_BENCH_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof"   (extra node options for blkd, e.g. profiling)
//
// Measured per daemon, on a dense qcow2 source (random data, BLK_BENCH_SIZE_MIB, default 2048):
// - mirror MiB/s: blockdev-mirror sync=full into an empty qcow2, from the command to BLOCK_JOB_READY;
// - backup MiB/s: blockdev-backup sync=full into an empty qcow2, from the command to BLOCK_JOB_COMPLETED;
// - time to READY (s) of the same mirror while a writer (one NbdClient, 4 KiB random writes, queue depth
//   4) writes through a writable NBD export of the source all along;
// - writer IOPS during a full backup ÷ writer IOPS without a job (same writer, same export, same run):
//   how much the copy-before-write path and the copy slow the guest down (1.0 = not at all); measured over
//   the backup (at most BLK_BENCH_SECONDS), n/a when the backup is over in less than half a second.
// The writer is the same client code for both daemons, so ratios compare the daemons. Not a test.
import { spawn, spawnSync } from "node:child_process";
import { randomFillSync } from "node:crypto";
import { closeSync, existsSync, mkdtempSync, openSync, rmSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { NbdClient } from "@blk/drivers/nbd";
import { QmpClient } from "@blk/qmp";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const MiB = 1024 * 1024;
const sizeMiB = Number(process.env.BLK_BENCH_SIZE_MIB ?? 2048);
const rounds = Number(process.env.BLK_BENCH_ROUNDS ?? 3);
const seconds = Number(process.env.BLK_BENCH_SECONDS ?? 2);
const size = sizeMiB * MiB;
const metricKeys = {
  mirror: "mirror MiB/s",
  backup: "backup MiB/s",
  ready: "READY under writer s",
  writer: "writer IOPS backup/idle",
};
const wanted = (process.env.BLK_BENCH_METRICS ?? Object.keys(metricKeys).join(","))
  .split(",")
  .filter(Boolean);
for (const w of wanted) {
  if (!(w in metricKeys)) {
    console.error(`jobs-qmp bench: unknown metric ${w} (${Object.keys(metricKeys).join(", ")})`);
    process.exit(2);
  }
}
const nodeArgs = (process.env.BLK_BENCH_NODE_ARGS ?? "").split(" ").filter(Boolean);

for (const p of ["qemu-storage-daemon", "qemu-img"]) {
  if (spawnSync("sh", ["-c", `command -v ${p}`]).status !== 0) {
    console.error(`jobs-qmp bench: ${p} is not installed`);
    process.exit(2);
  }
}
if (!existsSync(join(root, "apps/daemon/dist/main.js"))) {
  console.error("jobs-qmp bench: run `pnpm build` first");
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
  const r = spawnSync(cmd, args, { stdio: ["ignore", "ignore", "pipe"] });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed: ${r.stderr}`);
};

// A dense source: random data everywhere, as qcow2 (64 KiB clusters).
const source = join(dir, "src.qcow2");
{
  const raw = join(dir, "src.raw");
  const fd = openSync(raw, "w");
  const buf = Buffer.alloc(4 * MiB);
  for (let off = 0; off < size; off += buf.length) writeSync(fd, randomFillSync(buf), 0, buf.length, off);
  closeSync(fd);
  sh("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, source]);
  rmSync(raw);
}
const freshTarget = () => {
  const t = join(dir, "tgt.qcow2");
  rmSync(t, { force: true });
  sh("qemu-img", ["create", "-q", "-f", "qcow2", t, `${sizeMiB}M`]);
  return t;
};

const daemons = {
  blkd: (sock) => [process.execPath, [...nodeArgs, join(root, "apps/daemon/bin/blkd.js"), ...monitor(sock)]],
  "qemu-storage-daemon": (sock) => ["qemu-storage-daemon", monitor(sock)],
};
function monitor(sock) {
  return ["--chardev", `socket,id=m,path=${sock},server=on,wait=off`, "--monitor", "m"];
}

async function start(name) {
  const sock = join(dir, `${name}.qmp`);
  rmSync(sock, { force: true });
  const [cmd, args] = daemons[name](sock);
  const child = spawn(cmd, args, { stdio: "ignore" });
  children.add(child);
  let qmp;
  for (let i = 0; qmp === undefined; i++) {
    try {
      if (existsSync(sock)) qmp = await QmpClient.connect({ path: sock }, { timeoutMs: 5000 });
      else throw new Error("no socket yet");
    } catch (e) {
      if (i > 300) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  const exec = (c, a) => qmp.execute(c, a, { timeoutMs: 600_000 });
  await exec("blockdev-add", {
    driver: "qcow2",
    "node-name": "src",
    file: { driver: "file", filename: source },
  });
  await exec("blockdev-add", {
    driver: "qcow2",
    "node-name": "tgt",
    backing: null,
    file: { driver: "file", filename: freshTarget() },
  });
  return {
    qmp,
    exec,
    async exportSource() {
      const nbd = join(dir, `${name}.nbd`);
      rmSync(nbd, { force: true });
      await exec("nbd-server-start", { addr: { type: "unix", data: { path: nbd } } });
      await exec("block-export-add", {
        type: "nbd",
        id: "e0",
        "node-name": "src",
        name: "disk",
        writable: true,
      });
      return nbd;
    },
    stop: async () => {
      await exec("quit").catch(() => {});
      await qmp.close().catch(() => {});
      const closed = new Promise((r) => child.once("close", r));
      const t = setTimeout(() => child.kill("SIGKILL"), 10_000);
      await closed;
      clearTimeout(t);
      children.delete(child);
    },
  };
}

/** Runs a job command and resolves with the seconds until `event` for it. */
async function timeJob(d, cmd, args, event) {
  const mark = d.qmp.eventMark();
  const t = performance.now();
  await d.exec(cmd, args);
  await d.qmp.waitEvent(event, {
    since: mark,
    where: (x) => x.device === args["job-id"],
    timeoutMs: 600_000,
  });
  return (performance.now() - t) / 1000;
}

/** A writer: 4 KiB random writes at queue depth 4 through the export until stopped; counts its writes. */
async function startWriter(sock) {
  const client = await NbdClient.connect({
    server: { type: "unix", path: sock },
    export: "disk",
    maxInFlight: 4,
  });
  const blocks = size / 4096;
  const buf = randomFillSync(Buffer.alloc(4096));
  let ops = 0;
  let stop = false;
  const worker = async () => {
    while (!stop) {
      await client.write(Math.floor(Math.random() * blocks) * 4096, buf);
      ops++;
    }
  };
  const running = Promise.all(Array.from({ length: 4 }, worker));
  return {
    get ops() {
      return ops;
    },
    async stop() {
      stop = true;
      await running;
      await client.close();
    },
  };
}

/** Writer IOPS over the next `secs` seconds (or until `until` settles, if sooner), and the window in s. */
async function iopsOver(writer, secs, until) {
  const t = performance.now();
  const o = writer.ops;
  await Promise.race([new Promise((r) => setTimeout(r, secs * 1000)), until ?? new Promise(() => {})]);
  const window = (performance.now() - t) / 1000;
  return { iops: (writer.ops - o) / window, window };
}

/** Shortest backup window that gives a meaningful writer IOPS figure. */
const MIN_WINDOW_S = 0.5;

const metrics = wanted.map((w) => metricKeys[w]);
const names = Object.keys(daemons);
const results = Object.fromEntries(names.map((n) => [n, Object.fromEntries(metrics.map((m) => [m, []]))]));

/** One daemon start per measurement: each returns the metric's value for daemon `name`. */
const measure = {
  mirror: (name) =>
    withDaemon(name, async (d) => {
      const secs = await timeJob(
        d,
        "blockdev-mirror",
        { "job-id": "m", device: "src", target: "tgt", sync: "full" },
        "BLOCK_JOB_READY",
      );
      return sizeMiB / secs;
    }),
  backup: (name) =>
    withDaemon(name, async (d) => {
      const secs = await timeJob(
        d,
        "blockdev-backup",
        { "job-id": "b", device: "src", target: "tgt", sync: "full" },
        "BLOCK_JOB_COMPLETED",
      );
      return sizeMiB / secs;
    }),
  ready: (name) =>
    withDaemon(name, async (d) => {
      const writer = await startWriter(await d.exportSource());
      try {
        await new Promise((res) => setTimeout(res, 200));
        return await timeJob(
          d,
          "blockdev-mirror",
          { "job-id": "m", device: "src", target: "tgt", sync: "full" },
          "BLOCK_JOB_READY",
        );
      } finally {
        await writer.stop();
      }
    }),
  writer: (name) =>
    withDaemon(name, async (d) => {
      const writer = await startWriter(await d.exportSource());
      try {
        const idle = await iopsOver(writer, seconds);
        const mark = d.qmp.eventMark();
        await d.exec("blockdev-backup", { "job-id": "b", device: "src", target: "tgt", sync: "full" });
        const done = d.qmp.waitEvent("BLOCK_JOB_COMPLETED", { since: mark, timeoutMs: 600_000 });
        const busy = await iopsOver(writer, seconds, done);
        await writer.stop();
        await done;
        // A backup over in a blink says nothing about the writer: n/a (use a bigger image).
        return busy.window < MIN_WINDOW_S ? Number.NaN : busy.iops / idle.iops;
      } catch (e) {
        await writer.stop().catch(() => {});
        throw e;
      }
    }),
};

async function withDaemon(name, fn) {
  const d = await start(name);
  try {
    return await fn(d);
  } finally {
    await d.stop();
  }
}

for (let round = 0; round < rounds; round++) {
  const order = round % 2 === 0 ? names : [...names].reverse();
  for (const name of order) {
    for (const w of wanted) results[name][metricKeys[w]].push(await measure[w](name));
  }
  process.stderr.write(`round ${round + 1}/${rounds} done\n`);
}

const median = (xs) => {
  const ok = xs.filter((x) => !Number.isNaN(x)).sort((a, b) => a - b);
  return ok.length === 0 ? Number.NaN : ok[Math.floor(ok.length / 2)];
};
const fmt = (x, digits) => (Number.isNaN(x) ? "n/a" : x.toFixed(digits));
console.log(`Block jobs over QMP: ${sizeMiB} MiB dense qcow2 source, ${rounds} alternating rounds, medians`);
console.log(["metric".padEnd(26), ...names.map((n) => n.padStart(21)), "blkd/qsd".padStart(10)].join(""));
for (const m of metrics) {
  const med = Object.fromEntries(names.map((n) => [n, median(results[n][m])]));
  const digits = m.endsWith("MiB/s") ? 0 : 2;
  console.log(
    [
      m.padEnd(26),
      ...names.map((n) => fmt(med[n], digits).padStart(21)),
      `${fmt(med.blkd / med["qemu-storage-daemon"], 2)}x`.padStart(10),
    ].join(""),
  );
}
console.log("(READY under writer: lower is better; the other rows: higher is better; n/a: the backup took");
console.log(
  ` less than ${MIN_WINDOW_S} s, too short to measure the writer: use a bigger BLK_BENCH_SIZE_MIB)`,
);
process.exit(0);
