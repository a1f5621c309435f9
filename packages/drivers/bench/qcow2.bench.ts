/**
 * Sequential read of a 64 MiB fully allocated qcow2 image (64 KiB clusters, data clusters contiguous),
 * in 1 MiB requests, against a raw image with the same content. Before timing, both are checked to read
 * the same bytes (sha256). Measures the qcow2 mapping cost (L2 lookup, run coalescing) on top of file I/O;
 * not measured: compressed clusters, backing chains, cold page cache.
 */
import { strictEqual } from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { BlockGraph, backendParent, PERM } from "@blk/core";
import { makeTempDir, sha256 } from "@blk/testkit";
import { afterAll, bench, describe } from "vitest";
import { fileDriver } from "../src/file/index.ts";
import { openQcow2 } from "../src/qcow2/index.ts";
import { rawChildRole, rawDriver } from "../src/raw/index.ts";
import { buildQcow2, type ClusterSpec } from "../test/fixtures/qcow2/build.ts";

const SIZE = 64 << 20;
const CS = 65536;
const CHUNK = 1 << 20;
const dir = makeTempDir("blk-bench-qcow2");
const clusters: Record<number, ClusterSpec> = {};
for (let i = 0; i < SIZE / CS; i++) clusters[i] = { kind: "data", fill: (i * 7 + 1) & 0xff };
const image = buildQcow2({ size: SIZE, clusters });
writeFileSync(dir.join("a.qcow2"), image);
const raw = new Uint8Array(SIZE);
for (let i = 0; i < SIZE / CS; i++) raw.fill((i * 7 + 1) & 0xff, i * CS, (i + 1) * CS);
writeFileSync(dir.join("a.raw"), raw);

const q = await openQcow2(dir.join("a.qcow2"));
const graph = new BlockGraph();
const file = await graph.open(fileDriver, { filename: dir.join("a.raw") }, { owned: false, readOnly: true });
const rawNode = await graph.open(
  rawDriver,
  {},
  {
    readOnly: true,
    children: { file: { node: file, role: rawChildRole() } },
  },
);
const rawRoot = graph.attach(backendParent(), rawNode, { name: "root", perm: PERM.CONSISTENT_READ });

const buf = new Uint8Array(CHUNK);
async function readAll(edge: typeof rawRoot): Promise<string> {
  const parts: Uint8Array[] = [];
  for (let off = 0; off < SIZE; off += CHUNK) parts.push(await edge.read(off, CHUNK));
  return sha256(parts);
}
strictEqual(await readAll(q.root), sha256(raw));
strictEqual(await readAll(rawRoot), sha256(raw));

afterAll(async () => {
  await q.close();
  rawRoot.detach();
  await graph.delete(rawNode);
  await dir.dispose();
});

describe("sequential 1 MiB reads of a 64 MiB image", () => {
  bench("qcow2 (64 KiB clusters)", async () => {
    for (let off = 0; off < SIZE; off += CHUNK) await q.root.readInto(off, buf);
  });
  bench("raw", async () => {
    for (let off = 0; off < SIZE; off += CHUNK) await rawRoot.readInto(off, buf);
  });
});
