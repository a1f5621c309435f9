/**
 * The file driver against plain `fs.promises` positional I/O on the same file: 64 KiB sequential reads
 * and writes over an 8 MiB file, and the sparse map (SEEK_DATA/SEEK_HOLE) of a file with 64 extents.
 * Before timing, the driver's reads are checked against the reference's bytes and the map against the
 * layout written, so nothing wrong is measured. Measures the driver state (no BlockNode request path).
 */
import { strictEqual } from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { open, truncate } from "node:fs/promises";
import { BlockGraph } from "@blk/core";
import { makeTempDir, pattern, sha256 } from "@blk/testkit";
import { afterAll, bench, describe } from "vitest";
import { type FileState, fileDriver } from "../src/file/index.ts";

const SIZE = 8 << 20;
const CHUNK = 65536;
const dir = makeTempDir("blk-bench-file");
const path = dir.join("a.img");
writeFileSync(path, pattern(1, 0, SIZE));
const sparsePath = dir.join("s.img");
writeFileSync(sparsePath, "");
await truncate(sparsePath, SIZE * 2);

const graph = new BlockGraph();
const node = await graph.open(fileDriver, { filename: path });
const state = node.state as FileState;
const sparse = await graph.open(fileDriver, { filename: sparsePath });
for (let i = 0; i < 64; i++) await sparse.write(i * 2 * 131072, pattern(2, 0, 65536));
const fh = await open(path, "r+");

// Correctness first: the driver reads what plain fs reads, and the map has 64 data extents.
const a = new Uint8Array(SIZE);
const b = new Uint8Array(SIZE);
await state.read(0, a);
await fh.read(b, 0, SIZE, 0);
strictEqual(sha256(a), sha256(b));
const map = await sparse.blockStatus(0, sparse.length);
strictEqual(map.filter((e) => e.data).length, 64);

afterAll(async () => {
  await fh.close();
  await graph.delete(node);
  await graph.delete(sparse);
  await dir.dispose();
});

const buf = new Uint8Array(CHUNK);
const data = pattern(3, 0, CHUNK);

describe("sequential 64 KiB reads of 8 MiB", () => {
  bench("file driver (FileState.read)", async () => {
    for (let off = 0; off < SIZE; off += CHUNK) await state.read(off, buf);
  });
  bench("fs.promises FileHandle.read", async () => {
    for (let off = 0; off < SIZE; off += CHUNK) await fh.read(buf, 0, CHUNK, off);
  });
});

describe("sequential 64 KiB writes of 8 MiB", () => {
  bench("file driver (FileState.write)", async () => {
    for (let off = 0; off < SIZE; off += CHUNK) await state.write(off, data);
  });
  bench("fs.promises FileHandle.write", async () => {
    for (let off = 0; off < SIZE; off += CHUNK) await fh.write(data, 0, CHUNK, off);
  });
});

describe("sparse map of 16 MiB with 64 data extents", () => {
  bench("blockStatus walk (SEEK_DATA/SEEK_HOLE)", async () => {
    await sparse.blockStatus(0, sparse.length);
  });
});
