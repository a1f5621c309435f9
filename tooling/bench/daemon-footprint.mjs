#!/usr/bin/env node
// Footprint benchmark: time from spawn to a QMP greeting on the monitor socket, and idle RSS after
// negotiation with one raw node and one NBD export, for blkd against qemu-storage-daemon. One start per
// daemon per round, alternating; medians and same-run ratios. A third row, "node floor", is a Node
// process that only listens on a unix socket and greets: what any Node daemon costs before its own code.
//
//   node tooling/bench/daemon-footprint.mjs           (after `pnpm build`; needs qemu-storage-daemon)
//   BLK_BENCH_ROUNDS=9 node tooling/bench/daemon-footprint.mjs
//   BLK_BENCH_BASELINE=/path/to/other/bin/blkd.js …   (adds that blkd, e.g. an older build, as a row)
//
// The "blkd" row runs bin/blkd.cjs (the package's `blkd`) as users do: the bundle `pnpm build` writes to
// dist/bundle/, with its code cache (the bench says so when the bin falls back to dist/, the bundle missing
// or stale); "blkd unbundled" runs the same bin with BLKD_NO_BUNDLE=1 (dist/, ~90 modules): what the
// bundle saves.
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const rounds = Number(process.env.BLK_BENCH_ROUNDS ?? 5);
if (!existsSync(join(root, "apps/daemon/dist/main.js"))) {
  console.error("footprint bench: run `pnpm build` first");
  process.exit(2);
}
if (spawnSync("sh", ["-c", "command -v qemu-storage-daemon"]).status !== 0) {
  console.error("footprint bench: qemu-storage-daemon is not installed");
  process.exit(2);
}
const dir = mkdtempSync(join(tmpdir(), "blk-footprint-"));
const children = new Set();
process.on("exit", () => {
  for (const c of children) c.kill("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
});
const image = join(dir, "disk.img");
writeFileSync(image, Buffer.alloc(0));
spawnSync("truncate", ["-s", "64M", image]);

const args = (qmp, nbd) => [
  "--blockdev",
  `driver=file,node-name=f0,filename=${image}`,
  "--blockdev",
  "driver=raw,node-name=disk,file=f0",
  "--nbd-server",
  `addr.type=unix,addr.path=${nbd}`,
  "--export",
  "type=nbd,id=e0,node-name=disk,name=disk",
  "--chardev",
  `socket,id=m0,path=${qmp},server=on,wait=off`,
  "--monitor",
  "chardev=m0",
];
// The floor: node starting, listening on the monitor path given last in `args`, greeting each client.
const floorScript = `
const net = require("node:net");
const path = process.argv.at(-1).replace(/^.*path=([^,]*).*$/, "$1");
net.createServer((s) => { s.write('{"QMP": {}}\\r\\n'); s.on("data", (d) => { if (String(d).includes("quit")) process.exit(0); s.write('{"return": {}}\\r\\n'); }); }).listen(path);
`;
const blkd = join(root, "apps/daemon/bin/blkd.cjs");
const daemons = {
  blkd: (a) => [process.execPath, [blkd, ...a]],
  "blkd unbundled": (a) => [process.execPath, [blkd, ...a], { BLKD_NO_BUNDLE: "1" }],
  "qemu-storage-daemon": (a) => ["qemu-storage-daemon", a],
  "node floor": (a) => [process.execPath, ["-e", floorScript, a.at(-3)]],
};
const baseline = process.env.BLK_BENCH_BASELINE;
if (baseline !== undefined && baseline !== "")
  daemons["blkd baseline"] = (a) => [process.execPath, [baseline, ...a]];
// Whether the bin runs the bundle with its code cache (it says so on stderr when asked).
const probe = spawnSync(process.execPath, [blkd, "--version"], {
  env: { ...process.env, BLKD_BUNDLE_DEBUG: "1" },
  encoding: "utf8",
});
const bundled = /code cache accepted/.test(probe.stderr);
if (!bundled)
  console.error(
    `footprint bench: bin/blkd.cjs does not run the bundle with its cache (${probe.stderr.trim()}): run \`pnpm build\``,
  );

/** Connects until the greeting arrives; resolves with the socket. */
async function greeting(path, deadline) {
  for (;;) {
    try {
      return await new Promise((resolve, reject) => {
        const s = connect(path);
        let buf = "";
        s.on("data", (d) => {
          buf += d;
          if (buf.includes('"QMP"')) resolve(s);
        });
        s.on("error", reject);
      });
    } catch {
      if (performance.now() > deadline) throw new Error(`no QMP greeting on ${path}`);
      await new Promise((r) => setTimeout(r, 2));
    }
  }
}

/** User + system CPU time of a process so far (10 ms ticks): less sensitive than wall time to a busy machine. */
function cpuTimeMs(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / 100;
}

async function measure(name, round) {
  const qmp = join(dir, `${name.replace(" ", "-")}-${round}.qmp`);
  const nbd = join(dir, `${name.replace(" ", "-")}-${round}.nbd`);
  const [cmd, a, env] = daemons[name](args(qmp, nbd));
  const t = performance.now();
  const child = spawn(cmd, a, { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, ...env } });
  children.add(child);
  let stderr = "";
  child.stderr.on("data", (d) => {
    stderr += d;
  });
  const exited = new Promise((_, reject) =>
    child.once("exit", (code, signal) =>
      reject(new Error(`${name} exited early (${code ?? signal}):\n${stderr.trim()}`)),
    ),
  );
  exited.catch(() => {});
  const sock = await Promise.race([greeting(qmp, t + 20_000), exited]);
  const startMs = performance.now() - t;
  const cpuMs = cpuTimeMs(child.pid);
  sock.write('{"execute": "qmp_capabilities"}\n');
  await Promise.race([new Promise((r) => setTimeout(r, 500)), exited]);
  const status = readFileSync(`/proc/${child.pid}/status`, "utf8");
  const rssKiB = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? Number.NaN);
  sock.write('{"execute": "quit"}\n');
  await new Promise((r) => child.once("close", r));
  children.delete(child);
  sock.destroy();
  return { startMs, cpuMs, rssMiB: rssKiB / 1024 };
}

const res = Object.fromEntries(Object.keys(daemons).map((d) => [d, { startMs: [], cpuMs: [], rssMiB: [] }]));
for (let round = 0; round < rounds; round++) {
  const order = round % 2 === 0 ? Object.keys(daemons) : Object.keys(daemons).reverse();
  for (const d of order) {
    const m = await measure(d, round);
    res[d].startMs.push(m.startMs);
    res[d].cpuMs.push(m.cpuMs);
    res[d].rssMiB.push(m.rssMiB);
  }
}
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(
  `daemon footprint: ${rounds} alternating starts each, medians (one raw node, one NBD export, one monitor)`,
);
console.log(
  `${"".padEnd(24)}${"start→QMP ms".padStart(14)}${"CPU ms".padStart(10)}${"idle RSS MiB".padStart(14)}`,
);
for (const d of Object.keys(daemons)) {
  console.log(
    `${d.padEnd(24)}${median(res[d].startMs).toFixed(0).padStart(14)}${median(res[d].cpuMs).toFixed(0).padStart(10)}${median(res[d].rssMiB).toFixed(1).padStart(14)}`,
  );
}
const ratio = (x, y) =>
  `${(median(x.startMs) / median(y.startMs)).toFixed(2)}x`.padStart(14) +
  // CPU time is counted in 10 ms ticks: no ratio against a process that used less than two.
  (median(y.cpuMs) < 20 ? "-" : `${(median(x.cpuMs) / median(y.cpuMs)).toFixed(2)}x`).padStart(10) +
  `${(median(x.rssMiB) / median(y.rssMiB)).toFixed(2)}x`.padStart(14);
console.log(`${"blkd / qsd".padEnd(24)}${ratio(res.blkd, res["qemu-storage-daemon"])}`);
console.log(`${"blkd / node floor".padEnd(24)}${ratio(res.blkd, res["node floor"])}`);
console.log(`${"blkd / unbundled".padEnd(24)}${ratio(res.blkd, res["blkd unbundled"])}`);
if (!bundled) console.log("(blkd did not run the bundle with its code cache: see above)");
if (res["blkd baseline"] !== undefined) {
  console.log(`${"baseline / qsd".padEnd(24)}${ratio(res["blkd baseline"], res["qemu-storage-daemon"])}`);
  console.log(`${"blkd / baseline".padEnd(24)}${ratio(res.blkd, res["blkd baseline"])}`);
}
