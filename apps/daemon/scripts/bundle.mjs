#!/usr/bin/env node
// blkd's bundled bin: dist/bundle/blkd.cjs, one script with V8's code cache of a typical start, which
// bin/blkd.cjs prefers to dist/main.js (tooling/scripts/bundle-bin.mjs tells how and why).
//
//   node scripts/bundle.mjs     (the package's `build` script runs it after `tsc -b`)
import { spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import { connect } from "node:net";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { bundleBin } from "../../../tooling/scripts/bundle-bin.mjs";

await bundleBin({
  pkg: join(dirname(fileURLToPath(import.meta.url)), ".."),
  name: "blkd",
  envPrefix: "BLKD",
  shim: "bin/blkd.cjs",
  loadRolldown: () => import("rolldown"),
  // A typical start: a file node, a raw node, an NBD export and a monitor, started and quit once.
  async warmUp({ bin, tmp, env, fail }) {
    writeFileSync(join(tmp, "disk.img"), Buffer.alloc(1 << 20));
    const qmp = join(tmp, "qmp.sock");
    const child = spawn(
      process.execPath,
      [
        bin,
        "--blockdev",
        `driver=file,node-name=f,filename=${join(tmp, "disk.img")}`,
        "--blockdev",
        "driver=raw,node-name=disk,file=f",
        "--nbd-server",
        `addr.type=unix,addr.path=${join(tmp, "nbd.sock")}`,
        "--export",
        "type=nbd,id=e,node-name=disk,name=disk",
        "--chardev",
        `socket,id=m,path=${qmp},server=on,wait=off`,
        "--monitor",
        "chardev=m",
      ],
      { stdio: ["ignore", "ignore", "pipe"], env },
    );
    let stderr = "";
    child.stderr.on("data", (d) => {
      stderr += d;
    });
    const exited = new Promise((resolve) => child.once("exit", resolve));
    const deadline = Date.now() + 60_000;
    for (;;) {
      const done = await new Promise((resolve) => {
        const s = connect(qmp);
        s.on("error", () => resolve(false));
        s.on("data", (d) => {
          if (String(d).includes('"QMP"')) s.write('{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n');
        });
        s.on("close", () => resolve(true));
      });
      if (done) break;
      if (Date.now() > deadline || child.exitCode !== null) {
        child.kill("SIGKILL");
        fail(`the bundled blkd did not start:\n${stderr}`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    const code = await exited;
    if (code !== 0) fail(`the bundled blkd exited with ${code}:\n${stderr}`);
    if (!stderr.includes("blkd bundle: ") || stderr.includes("blkd bundle: not used"))
      fail(`the warm-up did not run the bundle:\n${stderr}`);
  },
});
