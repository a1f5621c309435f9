#!/usr/bin/env node
// Footprint benchmark: time from spawn to a QMP greeting on the monitor socket, and idle RSS after
// negotiation with one raw node and one NBD export, for blkd against qemu-storage-daemon. One start per
// daemon per round, alternating; medians and same-run ratios.
//
//   node tooling/bench/daemon-footprint.mjs           (after `pnpm build`; needs qemu-storage-daemon)
//   BLK_BENCH_ROUNDS=9 node tooling/bench/daemon-footprint.mjs
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
const daemons = {
  blkd: (a) => [process.execPath, [join(root, "apps/daemon/bin/blkd.js"), ...a]],
  "qemu-storage-daemon": (a) => ["qemu-storage-daemon", a],
};

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

async function measure(name, round) {
  const qmp = join(dir, `${name}-${round}.qmp`);
  const nbd = join(dir, `${name}-${round}.nbd`);
  const [cmd, a] = daemons[name](args(qmp, nbd));
  const t = performance.now();
  const child = spawn(cmd, a, { stdio: "ignore" });
  children.add(child);
  const sock = await greeting(qmp, t + 20_000);
  const startMs = performance.now() - t;
  sock.write('{"execute": "qmp_capabilities"}\n');
  await new Promise((r) => setTimeout(r, 500));
  const status = readFileSync(`/proc/${child.pid}/status`, "utf8");
  const rssKiB = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? Number.NaN);
  sock.write('{"execute": "quit"}\n');
  await new Promise((r) => child.once("close", r));
  children.delete(child);
  sock.destroy();
  return { startMs, rssMiB: rssKiB / 1024 };
}

const res = Object.fromEntries(Object.keys(daemons).map((d) => [d, { startMs: [], rssMiB: [] }]));
for (let round = 0; round < rounds; round++) {
  const order = round % 2 === 0 ? Object.keys(daemons) : Object.keys(daemons).reverse();
  for (const d of order) {
    const m = await measure(d, round);
    res[d].startMs.push(m.startMs);
    res[d].rssMiB.push(m.rssMiB);
  }
}
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(
  `daemon footprint: ${rounds} alternating starts each, medians (one raw node, one NBD export, one monitor)`,
);
console.log(`${"".padEnd(24)}${"start→QMP ms".padStart(14)}${"idle RSS MiB".padStart(14)}`);
for (const d of Object.keys(daemons)) {
  console.log(
    `${d.padEnd(24)}${median(res[d].startMs).toFixed(0).padStart(14)}${median(res[d].rssMiB).toFixed(1).padStart(14)}`,
  );
}
const b = res.blkd;
const q = res["qemu-storage-daemon"];
console.log(
  `${"blkd / qsd".padEnd(24)}${`${(median(b.startMs) / median(q.startMs)).toFixed(2)}x`.padStart(14)}${`${(median(b.rssMiB) / median(q.rssMiB)).toFixed(2)}x`.padStart(14)}`,
);
