/**
 * Incremental backup chain on qcow2 files, restored by QEMU's own tools (issue #14, Done when): a full
 * backup that starts dirty bitmap b0 afresh, guest writes, an incremental into an overlay of the full
 * backup, more writes, an incremental whose target fails (blkdebug under its qcow2, while the guest writes
 * during the job), then a successful incremental. `qemu-img compare` of the chain's top against the
 * source says they are identical, and `qemu-img check` finds every image of the chain clean.
 *
 *   BLK_BACKUP_CHAIN_MIB=1024 npx vitest run test/backup-incremental-chain.qemu.test.ts --testTimeout=600000
 */
import { BlockGraph, type BlockNode, backendParent, type DirtyBitmap, PERM } from "@blk/core";
import { type BlkdebugState, blkdebugDriver } from "@blk/drivers/blkdebug";
import { makeTempDir, missingPeers, run } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { type BackupJob, type BackupOptions, backup } from "../src/index.ts";
import { type ManualClock, setup } from "./helpers.ts";
import { rng } from "./mirror-helpers.ts";
import { openQcow2File } from "./qcow2-files.ts";

const C = 65536;
const MiB = 1 << 20;
const SIZE = Number(process.env.BLK_BACKUP_CHAIN_MIB ?? 16) * MiB;
const CLUSTERS = SIZE / C;

const missing = missingPeers(["qemu-img"]);
if (missing.length > 0) console.warn(`skipping the incremental chain test: missing ${missing.join(", ")}`);

const dirtyClusters = (b: DirtyBitmap): number[] => {
  const out: number[] = [];
  for (let off = 0; off < b.size; off += C) if (b.get(off)) out.push(off / C);
  return out;
};

/** Moves the manual clock (rate-limit sleeps, the filter's slice timers) until `p` settles. */
async function settleOn<T>(clock: ManualClock, p: Promise<T>): Promise<T> {
  const state = { done: false };
  void p.finally(() => {
    state.done = true;
  });
  while (!state.done) {
    await clock.advance(100_000_000);
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  return p;
}

describe.skipIf(missing.length > 0)(`incremental backup chain on qcow2 files (${SIZE / MiB} MiB)`, () => {
  it("full, writes, incremental, writes, failed incremental, incremental: qemu-img compare says identical", async () => {
    const dir = makeTempDir("blk-backup-chain");
    const graph = new BlockGraph();
    const { manager, clock } = setup();
    const r = rng(77);
    const jobs: BackupJob[] = [];
    const qcow2 = (name: string, backing?: BlockNode, debug = false): Promise<BlockNode> =>
      openQcow2File(graph, dir, name, SIZE, { backing, debug });
    const start = async (options: Omit<BackupOptions, "graph" | "device">): Promise<BackupJob> => {
      const job = await backup(manager, { graph, device: "disk", ...options });
      jobs.push(job);
      return job;
    };

    const disk = await qcow2("disk");
    const guest = graph.attach(backendParent("guest"), disk, {
      name: "root",
      perm: PERM.CONSISTENT_READ | PERM.WRITE,
    });
    const write = async (clusters: number[], tag: number): Promise<void> => {
      await Promise.all(
        clusters.map((c) => {
          // an unaligned write inside the cluster, or a zero-write of the whole cluster
          if (r() < 0.2) return guest.writeZeroes(c * C, C);
          const head = Math.floor(r() * (C / 2));
          const data = new Uint8Array(1 + Math.floor(r() * (C - head - 1))).fill(tag);
          data[0] = c & 0xff;
          return guest.write(c * C + head, data);
        }),
      );
    };
    const some = (n: number, avoid: ReadonlySet<number> = new Set()): number[] => {
      const out = new Set<number>();
      while (out.size < n) {
        const c = Math.floor(r() * CLUSTERS);
        if (!avoid.has(c)) out.add(c);
      }
      return [...out].sort((a, b) => a - b);
    };
    try {
      // the disk: most clusters written, some left unallocated
      for (let c = 0; c < CLUSTERS; c += 16) {
        const buf = new Uint8Array(16 * C);
        for (let k = 0; k < 16; k++)
          if ((c + k) % 7 !== 3) buf.fill((((c + k) * 13) % 251) | 1, k * C, (k + 1) * C);
        await disk.write(c * C, buf);
      }
      await disk.createBitmap({ name: "b0", granularity: C });
      // looked up by name: a finished job leaves its successor under that name
      const b0 = (): DirtyBitmap => {
        const b = disk.getBitmap("b0");
        if (b === undefined) throw new Error("b0 is gone");
        return b;
      };
      await write(some(8), 0x10); // written before the full backup: b0 is started afresh by it

      // 1. full backup; b0 keeps only what was written while it ran (nothing)
      await qcow2("full");
      const full = await start({
        "job-id": "full",
        target: "full",
        sync: "full",
        bitmap: "b0",
        "bitmap-mode": "on-success",
      });
      expect(await settleOn(clock, full.outcome)).toEqual({ status: "completed" });
      expect(dirtyClusters(b0())).toEqual([]);

      // 2. writes, then an incremental into an overlay of the full backup
      const w1 = some(CLUSTERS / 16);
      await write(w1, 0x21);
      expect(dirtyClusters(b0())).toEqual(w1);
      await qcow2("inc1", graph.find("full"));
      const inc1 = await start({ "job-id": "inc1", target: "inc1", sync: "incremental", bitmap: "b0" });
      expect(await settleOn(clock, inc1.outcome)).toEqual({ status: "completed" });
      expect(inc1.progress).toEqual({ current: w1.length * C, total: w1.length * C });
      expect(dirtyClusters(b0())).toEqual([]);

      // 3. writes, then an incremental whose target's file fails once the job is under way; the guest
      //    writes while it runs (to clusters outside the job, and to one the job has not copied yet)
      const w2 = some(CLUSTERS / 16);
      await write(w2, 0x32);
      const failing = await qcow2("inc2-failed", graph.find("inc1"), true);
      const dbg = graph.find("inc2-failed-dbg")?.state as BlkdebugState;
      const bad = await start({
        "job-id": "inc2",
        target: "inc2-failed",
        sync: "incremental",
        bitmap: "b0",
        speed: C, // one cluster per second of the manual clock
        "x-perf": { "max-chunk": C },
      });
      await clock.advance(0);
      expect(bad.status).toBe("running");
      expect(bad.copyBitmap.count()).toBeGreaterThan(C);
      const during = some(4, new Set(w2));
      const lastDirty = w2.at(-1) as number;
      expect(bad.copyBitmap.get(lastDirty * C)).toBe(true);
      await write([...during, lastDirty], 0x43);
      const fault = dbg.inject({ on: "write" });
      const out = await settleOn(clock, bad.outcome);
      expect(out.status).toBe("failed");
      expect(fault.hits).toBeGreaterThan(0);
      fault.remove();
      // nothing lost: what the failed job was to copy, plus what was written while it ran
      const expectDirty = [...new Set([...w2, ...during])].sort((a, b) => a - b);
      expect(dirtyClusters(b0())).toEqual(expectDirty);
      expect(b0().busy).toBe(false);
      await graph.delete(failing);

      // 4. a successful incremental into a fresh overlay of inc1
      await qcow2("inc2", graph.find("inc1"));
      const inc2 = await start({ "job-id": "inc3", target: "inc2", sync: "incremental", bitmap: "b0" });
      expect(await settleOn(clock, inc2.outcome)).toEqual({ status: "completed" });
      expect(inc2.progress.total).toBe(expectDirty.length * C);
      expect(dirtyClusters(b0())).toEqual([]);

      guest.detach();
      b0().release();
      for (const name of ["inc2", "inc1", "full", "disk"]) {
        const n = graph.find(name);
        if (n !== undefined) await graph.delete(n);
      }
      // Restore: QEMU reads inc2 → inc1 → full through the backing file names
      const cmp = await run("qemu-img", [
        "compare",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        dir.join("disk.qcow2"),
        dir.join("inc2.qcow2"),
      ]);
      expect(cmp.stdout.trim()).toBe("Images are identical.");
      expect(cmp.code).toBe(0);
      for (const name of ["disk", "full", "inc1", "inc2"]) {
        const chk = await run("qemu-img", ["check", "-f", "qcow2", dir.join(`${name}.qcow2`)]);
        expect(chk.stdout).toContain("No errors were found on the image.");
        expect(chk.code).toBe(0);
      }
    } finally {
      for (const job of jobs) job.cancel();
      for (const job of jobs)
        await settleOn(
          clock,
          job.outcome.then(() => undefined),
        );
      for (const n of graph.list().filter((x) => x.parents.length === 0)) {
        await graph.delete(n, { force: true }).catch(() => undefined);
      }
      await dir.dispose();
    }
  });
});
