#!/usr/bin/env node
// The blk demo: a live mirror of a disk that a "guest" keeps writing, end to end through the real programs.
//
//   blk-img create   → the source and target images (local files, nothing to set up)
//   blkd             → a separate process: the source opened as a block node, exported over NBD on a unix
//                      socket, and a QMP monitor on another
//   guest            → this process, an NBD client writing random patterns through the export
//   QMP              → blockdev-add the target, blockdev-mirror, watch the job, block-job-complete on READY
//   blk-img compare  → proves the target equals the source
//
// Runs on built packages (the README's demo command builds first). BLK_DEMO_SHORT=1 runs a small, fast
// version (the test suite does). It leaves no process and no file behind.
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { NbdClient } from "@blk/drivers/nbd";
import { QmpClient } from "@blk/qmp";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const short = process.env.BLK_DEMO_SHORT === "1";
const MiB = 1024 * 1024;
const size = (short ? 16 : 256) * MiB;
const preload = (short ? 8 : 128) * MiB;
const blockSize = 64 * 1024;
const tty = process.stdout.isTTY === true;

const bin = (name) => join(root, "apps", name === "blkd" ? "daemon" : "cli", "bin", `${name}.js`);
const dir = mkdtempSync(join(tmpdir(), "blk-demo-"));
const children = new Set();
const cleanup = () => {
  for (const c of children) c.kill("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
};
process.on("exit", cleanup);
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(130));

const say = (s = "") => process.stdout.write(`${s}\n`);
const step = (n, s) => say(`\n[${n}] ${s}`);
const fmtMiB = (bytes) => `${(bytes / MiB).toFixed(1)} MiB`;

/** Runs one of our programs to completion; returns {code, stdout, stderr}. */
function runTool(name, args, timeoutMs = 60_000) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [bin(name), ...args], { stdio: ["ignore", "pipe", "pipe"] });
    children.add(child);
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d) => (stdout += d));
    child.stderr.on("data", (d) => (stderr += d));
    const t = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(t);
      children.delete(child);
      resolve({ code, stdout, stderr });
    });
  });
}

async function waitFor(path, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  while (!existsSync(path)) {
    if (Date.now() > deadline) throw new Error(`${what} did not appear within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function pattern(seed, len) {
  const b = Buffer.allocUnsafe(len);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < len; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b.writeUInt32LE(x >>> 0, i);
  }
  return b;
}

async function main() {
  for (const name of ["blkd", "blk-img"]) {
    const dist = join(root, "apps", name === "blkd" ? "daemon" : "cli", "dist", "main.js");
    if (!existsSync(dist))
      throw new Error(`${name} is not built (${dist} missing): run the README's demo command`);
  }
  const src = join(dir, "src.qcow2");
  const dst = join(dir, "dst.qcow2");
  const qmpSock = join(dir, "qmp.sock");
  const nbdSock = join(dir, "nbd.sock");
  const t0 = performance.now();

  say("blk demo: mirror a live disk while a guest writes to it");
  say(`work directory ${dir}${short ? " (short mode)" : ""}`);

  step(1, `blk-img create: a ${fmtMiB(size)} qcow2 source and an empty qcow2 target of the same size`);
  for (const f of [src, dst]) {
    const r = await runTool("blk-img", ["create", "-f", "qcow2", f, String(size)]);
    if (r.code !== 0) throw new Error(`blk-img create failed: ${r.stderr.trim()}`);
    say(`  ${r.stdout.trim()}`);
  }

  step(2, "start blkd: the source as a block node, an NBD export of it, a QMP monitor");
  const daemonArgs = [
    "--blockdev",
    `driver=file,node-name=src-file,filename=${src}`,
    "--blockdev",
    "driver=qcow2,node-name=src,file=src-file",
    "--nbd-server",
    `addr.type=unix,addr.path=${nbdSock}`,
    "--export",
    "type=nbd,id=exp0,node-name=src,name=disk,writable=on",
    "--chardev",
    `socket,id=mon0,path=${qmpSock},server=on,wait=off`,
    "--monitor",
    "chardev=mon0",
  ];
  say(`  blkd ${daemonArgs.join(" ")}`);
  const daemon = spawn(process.execPath, [bin("blkd"), ...daemonArgs], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  children.add(daemon);
  let daemonLog = "";
  daemon.stderr.on("data", (d) => (daemonLog += d));
  const daemonExit = new Promise((resolve) => daemon.on("close", (code) => resolve(code)));
  daemonExit.then(() => children.delete(daemon));
  await Promise.race([
    Promise.all([waitFor(qmpSock, 15_000, "the QMP socket"), waitFor(nbdSock, 15_000, "the NBD socket")]),
    daemonExit.then((code) => {
      throw new Error(`blkd exited (${code}) before it was ready:\n${daemonLog}`);
    }),
  ]);
  const qmp = await QmpClient.connect({ path: qmpSock });
  const version = await qmp.execute("query-version");
  say(
    `  QMP ready: qemu ${version.qemu.major}.${version.qemu.minor}.${version.qemu.micro} compatible, ${version.package}`,
  );

  step(3, `guest: an NBD client fills ${fmtMiB(preload)}, then keeps writing random 64 KiB blocks`);
  const guest = await NbdClient.connect({ server: { type: "unix", path: nbdSock }, export: "disk" });
  say(`  connected to export 'disk' (${fmtMiB(guest.size)}, structured replies: ${guest.structuredReplies})`);
  const chunk = 4 * MiB;
  for (let off = 0; off < preload; off += chunk) await guest.write(off, pattern(off / chunk + 1, chunk));
  await guest.flush();
  let guestBytes = 0;
  let guestOps = 0;
  let guestRunning = true;
  let seed = 1000;
  const guestLoop = (async () => {
    const blocks = size / blockSize;
    while (guestRunning) {
      const inflight = [];
      for (let i = 0; i < 4; i++) {
        const off = Math.floor(Math.random() * blocks) * blockSize;
        inflight.push(guest.write(off, pattern(seed++, blockSize)));
      }
      await Promise.all(inflight);
      guestBytes += 4 * blockSize;
      guestOps += 4;
      // A guest, not a flood: leave the mirror room to converge.
      await new Promise((r) => setTimeout(r, short ? 2 : 5));
    }
  })();

  step(4, "QMP: blockdev-add the target, blockdev-mirror the source onto it");
  await qmp.execute("blockdev-add", { driver: "file", "node-name": "dst-file", filename: dst });
  await qmp.execute("blockdev-add", { driver: "qcow2", "node-name": "dst", file: "dst-file" });
  const mark = qmp.eventMark();
  try {
    await qmp.execute("blockdev-mirror", { "job-id": "mirror0", device: "src", target: "dst", sync: "full" });
  } catch (e) {
    if (e?.errorClass === "CommandNotFound") {
      guestRunning = false;
      await guestLoop;
      say("  blkd has no mirror job yet: the demo stops here, before the mirror, as it says it would.");
      await guest.close();
      await qmp.execute("quit").catch(() => {});
      await qmp.close();
      await daemonExit;
      return;
    }
    throw e;
  }
  const mirrorStart = performance.now();
  const ready = qmp.waitEvent("BLOCK_JOB_READY", { since: mark, timeoutMs: 300_000 });
  let readyAt;
  ready.then(() => (readyAt = performance.now())).catch(() => {});
  const progress = async () => {
    while (readyAt === undefined) {
      const jobs = await qmp.execute("query-block-jobs");
      const j = jobs.find((x) => x.device === "mirror0");
      if (j) {
        const pct = j.len > 0 ? (100 * j.offset) / j.len : 0;
        const bar = "#".repeat(Math.round(pct / 5)).padEnd(20, ".");
        const line = `  mirror [${bar}] ${pct.toFixed(1).padStart(5)}%  ${fmtMiB(j.offset)} / ${fmtMiB(j.len)}  guest ${guestOps} writes`;
        if (tty) process.stdout.write(`\r${line}`);
        else say(line);
      }
      await new Promise((r) => setTimeout(r, tty ? 100 : 500));
    }
    if (tty) process.stdout.write("\n");
  };
  await Promise.all([ready, progress()]);
  say(
    `  BLOCK_JOB_READY after ${((readyAt - mirrorStart) / 1000).toFixed(2)} s: the target is in sync and stays in sync`,
  );

  step(5, "the guest stops; block-job-complete switches the export to the target");
  guestRunning = false;
  await guestLoop;
  await guest.flush();
  const mark2 = qmp.eventMark();
  await qmp.execute("block-job-complete", { device: "mirror0" });
  const done = await qmp.waitEvent("BLOCK_JOB_COMPLETED", { since: mark2, timeoutMs: 120_000 });
  const mirrorSecs = (performance.now() - mirrorStart) / 1000;
  if (done.data.error) throw new Error(`mirror failed: ${done.data.error}`);
  say(`  BLOCK_JOB_COMPLETED: ${fmtMiB(done.data.len)} mirrored in ${mirrorSecs.toFixed(2)} s`);
  await guest.close();

  step(6, "quit blkd (images flushed and closed), then blk-img compare source and target");
  await qmp.execute("quit");
  await qmp.close();
  const code = await daemonExit;
  if (code !== 0) throw new Error(`blkd exited with ${code}:\n${daemonLog}`);
  const cmp = await runTool("blk-img", ["compare", "-f", "qcow2", "-F", "qcow2", src, dst]);
  say(`  blk-img compare: ${cmp.stdout.trim() || cmp.stderr.trim()} (exit ${cmp.code})`);
  if (cmp.code !== 0) throw new Error("the target differs from the source");
  if (spawnSync("sh", ["-c", "command -v qemu-img"]).status === 0) {
    for (const f of [src, dst]) {
      const r = spawnSync("qemu-img", ["check", f], { encoding: "utf8" });
      say(
        `  qemu-img check ${f.slice(dir.length + 1)}: ${(r.stdout.trim().split("\n")[0] ?? "").trim()} (exit ${r.status})`,
      );
      if (r.status !== 0) throw new Error(`qemu-img check found problems in ${f}:\n${r.stdout}${r.stderr}`);
    }
  }

  const used = (f) => statSync(f).blocks * 512;
  say("\nSummary");
  say(
    `  the guest wrote ${guestOps} random blocks (${fmtMiB(guestBytes)}) through NBD while the mirror was set up and ran`,
  );
  say(
    `  mirror: ${fmtMiB(done.data.len)} in ${mirrorSecs.toFixed(2)} s = ${(done.data.len / MiB / mirrorSecs).toFixed(1)} MiB/s`,
  );
  say(
    `  on disk: source ${fmtMiB(used(src))}, target ${fmtMiB(used(dst))} allocated for ${fmtMiB(size)} virtual`,
  );
  say(`  whole demo ${((performance.now() - t0) / 1000).toFixed(2)} s; no process left behind`);
}

main().then(
  () => process.exit(0),
  (e) => {
    process.stderr.write(`demo failed: ${e?.stack ?? e}\n`);
    process.exit(1);
  },
);
