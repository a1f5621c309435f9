// Shared by raw.test.ts and raw.qemu.test.ts: sparse files in a temp dir, and a raw node over a file node
// with a block-backend user, as openImage builds it but with the raw window options exposed.
import { writeFileSync } from "node:fs";
import { truncate } from "node:fs/promises";
import { BlockGraph, backendParent, PERM } from "@blk/core";
import type { TempDir } from "@blk/testkit";
import { fileDriver } from "../src/file/index.ts";
import { rawChildRole, rawDriver } from "../src/raw/index.ts";

/** A factory of empty sparse files of a given size in `dir`. */
export function sparseFiles(dir: TempDir): (size: number) => Promise<string> {
  let n = 0;
  return async (size) => {
    const p = dir.join(`r${n++}.img`);
    writeFileSync(p, "");
    await truncate(p, size);
    return p;
  };
}

/** Opens `filename` as raw (with an optional `offset`/`size` window) under a consistent-read + write user. */
export async function openRaw(
  filename: string,
  raw: { offset?: number; size?: number } = {},
  discard: "unmap" | "ignore" = "ignore",
) {
  const graph = new BlockGraph();
  const file = await graph.open(fileDriver, { filename }, { discard, owned: false });
  const node = await graph.open(rawDriver, raw, {
    discard,
    children: { file: { node: file, role: rawChildRole(raw) } },
  });
  const root = graph.attach(backendParent(), node, { name: "root", perm: PERM.CONSISTENT_READ | PERM.WRITE });
  return {
    graph,
    file,
    node,
    root,
    close: async () => {
      root.detach();
      await graph.delete(node);
    },
  };
}
