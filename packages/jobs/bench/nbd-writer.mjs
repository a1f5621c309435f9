#!/usr/bin/env node
// A guest stand-in for the job benchmarks: random writes through an NBD export at a fixed queue depth
// until its stdin says `stop` (or closes), then one JSON line with the write count and latency
// percentiles (ms). Run as a child process, so the writer does not share an event loop with the server.
//
//   node nbd-writer.mjs <unix socket> <export> <image bytes> [block bytes=4096] [queue depth=1]
import { randomFillSync } from "node:crypto";
import { NbdClient } from "@blk/drivers/nbd";

const [sock, name, sizeArg, bsArg = "4096", qdArg = "1"] = process.argv.slice(2);
const size = Number(sizeArg);
const bs = Number(bsArg);
const qd = Number(qdArg);
const client = await NbdClient.connect({
  server: { type: "unix", path: sock },
  export: name,
  maxInFlight: qd,
});
const blocks = Math.floor(size / bs);
const buf = randomFillSync(Buffer.alloc(bs));
const lat = [];
let stop = false;
process.stdin.on("data", (d) => {
  if (String(d).includes("stop")) stop = true;
});
process.stdin.on("end", () => {
  stop = true;
});
const t0 = performance.now();
const worker = async () => {
  while (!stop) {
    const t = performance.now();
    await client.write(Math.floor(Math.random() * blocks) * bs, buf);
    lat.push(performance.now() - t);
  }
};
process.stdout.write("ready\n");
await Promise.all(Array.from({ length: qd }, worker));
const secs = (performance.now() - t0) / 1000;
await client.close();
lat.sort((a, b) => a - b);
const q = (p) => (lat.length === 0 ? 0 : lat[Math.min(lat.length - 1, Math.floor(p * lat.length))]);
process.stdout.write(
  `${JSON.stringify({ ops: lat.length, secs, iops: lat.length / secs, p50: q(0.5), p99: q(0.99), max: lat.at(-1) ?? 0 })}\n`,
);
process.exit(0);
