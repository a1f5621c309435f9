/** Shared set-up of the fleecing tests: a source with a bitmap, a qcow2 overlay backed by it, the sync=none job. */
import {
  BlockGraph,
  type BlockNode,
  backendParent,
  type DirtyBitmap,
  type Edge,
  type MemoryDriver,
  memoryDriver,
  PERM,
} from "@blk/core";
import { fileDriver } from "@blk/drivers/file";
import type { NbdClient } from "@blk/drivers/nbd";
import { createQcow2, qcow2Driver } from "@blk/drivers/qcow2";
import { makeTempDir, type TempDir } from "@blk/testkit";
import { type BackupJob, backup, JobManager } from "../src/index.ts";
import { rng } from "./mirror-helpers.ts";

export const C = 65536;
export const MiB: number = 1 << 20;

/** Random data with every 4th cluster zero (unallocated in the source). */
export function initialData(size: number, seed: number): Uint8Array {
  const r = rng(seed);
  const out = new Uint8Array(size);
  for (let c = 0; c < size / C; c++) {
    if (c % 4 === 3) continue;
    const v = 1 + Math.floor(r() * 250);
    out.fill(v, c * C, (c + 1) * C);
    out[c * C] = c & 0xff;
  }
  return out;
}

export interface Fleece {
  dir: TempDir;
  graph: BlockGraph;
  manager: JobManager;
  src: BlockNode;
  srcMem: MemoryDriver;
  guest: Edge;
  overlay: BlockNode;
  job: BackupJob;
  /** Tears everything down (job cancelled, overlay deleted, temp dir removed). */
  dispose(): Promise<void>;
}

/**
 * Source with a bitmap `b0` (dirtied by `before`), frozen at job start; a qcow2 overlay (temp file)
 * backed by the source; the sync=none backup into it; `b0` merged into a bitmap of the overlay so the
 * export can offer it (blk's NBD export looks bitmaps up on the exported node only).
 */
export async function fleece(data: Uint8Array, before: (guest: Edge) => Promise<void>): Promise<Fleece> {
  const dir = makeTempDir("blk-fleece");
  const graph = new BlockGraph();
  const manager = new JobManager();
  const size = data.length;
  const src = await graph.open(memoryDriver, { size, data }, { nodeName: "src" });
  const guest = graph.attach(backendParent("guest"), src, {
    name: "root",
    perm: PERM.CONSISTENT_READ | PERM.WRITE,
  });
  const b0 = src.createBitmapSync({ name: "b0", granularity: C });
  await before(guest);
  const path = dir.join("fleece.qcow2");
  await createQcow2({ filename: path, size });
  const file = await graph.open(fileDriver, { filename: path }, { nodeName: "fleece-file", owned: false });
  const overlay = await graph.open(qcow2Driver, {}, { nodeName: "fleece", children: { file, backing: src } });
  // The "transaction": the bitmap stops recording where the point in time starts.
  b0.disable();
  const job = await backup(manager, {
    graph,
    "job-id": "fleece0",
    device: "src",
    target: "fleece",
    sync: "none",
  });
  const view: DirtyBitmap = overlay.createBitmapSync({ name: "b0", granularity: C, disabled: true });
  view.merge(b0);
  return {
    dir,
    graph,
    manager,
    src,
    srcMem: src.state as MemoryDriver,
    guest,
    overlay,
    job,
    async dispose() {
      job.cancel();
      await job.outcome;
      if (!view.released) view.release();
      if (!overlay.closed) await graph.delete(overlay);
      await dir.dispose();
    },
  };
}

/** Polls `pred` (real time: file I/O is involved) until it holds; fails after `timeoutMs`. */
export async function waitFor(pred: () => boolean, timeoutMs = 4000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!pred()) {
    if (Date.now() > end) throw new Error("condition not reached");
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
}

export async function readAll(client: NbdClient, size: number, chunk: number): Promise<Uint8Array> {
  const out = new Uint8Array(size);
  for (let off = 0; off < size; off += chunk)
    out.set(await client.read(off, Math.min(chunk, size - off)), off);
  return out;
}
