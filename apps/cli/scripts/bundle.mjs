#!/usr/bin/env node
// blk-img's bundled bin: dist/bundle/blk-img.cjs, one script with V8's code cache of typical runs, which
// bin/blk-img.js prefers to dist/main.js (tooling/scripts/bundle-bin.mjs tells how and why).
//
//   node scripts/bundle.mjs     (the package's `build` script runs it after `tsc -b`)
import { writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { bundleBin } from "../../../tooling/scripts/bundle-bin.mjs";

await bundleBin({
  pkg: join(dirname(fileURLToPath(import.meta.url)), ".."),
  name: "blk-img",
  envPrefix: "BLK_IMG",
  shim: "bin/blk-img.js",
  loadRolldown: () => import("rolldown"),
  // Typical runs, one after the other (the cache adds up): create, info and convert of small raw and qcow2
  // images, and a compare.
  async warmUp({ tmp, run, fail }) {
    const raw = join(tmp, "a.raw");
    const data = Buffer.alloc(1 << 20);
    for (let i = 0; i < data.length; i += 4096) data.fill(i / 4096 + 1, i, i + 2048);
    writeFileSync(raw, data);
    const qcow2 = join(tmp, "b.qcow2");
    const back = join(tmp, "c.raw");
    const runs = [
      ["create", "-f", "qcow2", join(tmp, "empty.qcow2"), "1M"],
      ["info", raw],
      ["convert", "-f", "raw", "-O", "qcow2", raw, qcow2],
      ["info", "--output=json", qcow2],
      ["convert", "-f", "qcow2", "-O", "raw", qcow2, back],
      ["convert", "-O", "raw", raw, join(tmp, "d.raw")],
      ["compare", "-f", "raw", "-F", "qcow2", back, qcow2],
    ];
    for (const args of runs) await run(args);
    if (!(await run(["info", back])).includes("virtual size: 1 MiB")) fail("info of the converted image");
  },
});
