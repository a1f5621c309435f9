/**
 * What the `raw` format layer costs over the `file` node: 64 KiB reads through a raw node (the full
 * BlockNode request path twice) against the file node alone (once). Before timing, both paths are
 * checked to return the same bytes.
 */
import { strictEqual } from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { BlockGraph, backendParent, PERM } from "@blk/core";
import { makeTempDir, pattern, sha256 } from "@blk/testkit";
import { afterAll, bench, describe } from "vitest";
import { fileDriver } from "../src/file/index.ts";
import { rawChildRole, rawDriver } from "../src/raw/index.ts";

const SIZE = 4 << 20;
const CHUNK = 65536;
const dir = makeTempDir("blk-bench-raw");
const path = dir.join("a.img");
writeFileSync(path, pattern(5, 0, SIZE));

const graph = new BlockGraph();
const file = await graph.open(fileDriver, { filename: path }, { owned: false });
const raw = await graph.open(rawDriver, {}, { children: { file: { node: file, role: rawChildRole() } } });
const root = graph.attach(backendParent(), raw, { name: "root", perm: PERM.CONSISTENT_READ });

strictEqual(sha256(await root.read(0, SIZE)), sha256(await file.read(0, SIZE)));
strictEqual(sha256(await root.read(0, SIZE)), sha256(pattern(5, 0, SIZE)));

afterAll(async () => {
  root.detach();
  await graph.delete(raw);
  await dir.dispose();
});

const buf = new Uint8Array(CHUNK);

describe("64 KiB reads of 4 MiB", () => {
  bench("raw node over file node", async () => {
    for (let off = 0; off < SIZE; off += CHUNK) await root.readInto(off, buf);
  });
  bench("file node alone", async () => {
    for (let off = 0; off < SIZE; off += CHUNK) await file.readInto(off, buf);
  });
});
