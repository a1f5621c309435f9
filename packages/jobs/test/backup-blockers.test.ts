/**
 * Op blockers around backup (issue #7 "blocks conflicting operations on those nodes with QEMU's
 * messages"; observed on qemu-storage-daemon 7.2.22 with null-co nodes): a running backup holds its
 * filter ("main node") and its target, so other jobs may not use the target; backup itself refuses a
 * source or target that another job holds. The source below the filter stays free (two backups of one
 * device are allowed, as in a grouped transaction). A concluded job holds nothing: the next job on the
 * same node starts even before the concluded one is dismissed (blk's promise beyond QEMU).
 */
import { BlkError, BlockGraph, type BlockNode, type MemoryDriver, memoryDriver } from "@blk/core";
import { describe, expect, it } from "vitest";
import { backup, blockJobsHolding, checkNodeNotBusy, JobManager, mirror, stream } from "../src/index.ts";
import { settle } from "./helpers.ts";

const MiB = 1 << 20;

const busy = (node: string, type: string): string =>
  `Node '${node}' is busy: block device is in use by block job: ${type}`;

async function nodes(
  names: string[],
): Promise<{ graph: BlockGraph; manager: JobManager; n: Record<string, BlockNode> }> {
  const graph = new BlockGraph();
  const manager = new JobManager();
  const n: Record<string, BlockNode> = {};
  for (const name of names) {
    n[name] = await graph.open(
      memoryDriver,
      { size: MiB, data: new Uint8Array(MiB).fill(7) },
      { nodeName: name },
    );
  }
  return { graph, manager, n };
}

/** Holds every target write until released. */
function gate(node: BlockNode): () => void {
  let release!: () => void;
  const g = new Promise<void>((r) => (release = r));
  (node.state as MemoryDriver).hook = async (req) => {
    if (req.kind === "write" || req.kind === "write-zeroes") await g;
  };
  return release;
}

async function refused(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    return (e as Error).message;
  }
  throw new Error("expected a refusal");
}

describe("backup and op blockers", () => {
  it("a running backup's target is busy for mirror, backup and stream; its filter is held", async () => {
    const { graph, manager, n } = await nodes(["src", "tgt", "src2", "tgt2"]);
    const release = gate(n.tgt as BlockNode);
    const b0 = await backup(manager, { graph, "job-id": "b0", device: "src", target: "tgt", sync: "full" });
    expect(blockJobsHolding(n.tgt as BlockNode)).toEqual([b0]);
    expect(blockJobsHolding(b0.filter)).toEqual([b0]);
    // the source below the filter is not held
    expect(blockJobsHolding(n.src as BlockNode)).toEqual([]);
    expect(() => checkNodeNotBusy(n.tgt as BlockNode)).toThrow(busy("tgt", "backup"));
    expect(
      await refused(mirror(manager, graph, { "job-id": "m0", device: "src2", target: "tgt", sync: "full" })),
    ).toBe(busy("tgt", "backup"));
    expect(
      await refused(backup(manager, { graph, "job-id": "b1", device: "src2", target: "tgt", sync: "full" })),
    ).toBe(busy("tgt", "backup"));
    expect(await refused(stream(manager, graph, { "job-id": "s0", device: "tgt" }))).toBe(
      busy("tgt", "backup"),
    );
    // a second backup of the same source is fine
    const b2 = await backup(manager, { graph, "job-id": "b2", device: "src", target: "tgt2", sync: "full" });
    expect(await b2.outcome).toEqual({ status: "completed" });
    expect(manager.queryJobs().map((j) => j.id)).toEqual(["b0"]);
    release();
    expect(await b0.outcome).toEqual({ status: "completed" });
    expect(blockJobsHolding(n.tgt as BlockNode)).toEqual([]);
  });

  it("backup refuses a source or a target another job holds (source checked first)", async () => {
    const { graph, manager, n } = await nodes(["src", "src2", "tgt2", "x"]);
    const release = gate(n.tgt2 as BlockNode);
    const m1 = await mirror(manager, graph, {
      "job-id": "m1",
      device: "src2",
      target: "tgt2",
      sync: "full",
      speed: 1,
    });
    await settle();
    const before = graph.list().map((x) => x.nodeName);
    expect(
      await refused(backup(manager, { graph, "job-id": "b2", device: "src2", target: "src", sync: "full" })),
    ).toBe(busy("src2", "mirror"));
    expect(
      await refused(backup(manager, { graph, "job-id": "b3", device: "tgt2", target: "x", sync: "full" })),
    ).toBe(busy("tgt2", "mirror"));
    expect(
      await refused(backup(manager, { graph, "job-id": "b4", device: "src", target: "tgt2", sync: "full" })),
    ).toBe(busy("tgt2", "mirror"));
    // nothing was left behind by the refusals
    expect(graph.list().map((x) => x.nodeName)).toEqual(before);
    expect(manager.queryJobs().map((j) => j.id)).toEqual(["m1"]);
    m1.cancel({ force: true });
    release();
    expect(await m1.outcome).toEqual({ status: "cancelled", consistent: false });
  });

  it("a concluded backup (not dismissed) never blocks the next job on its nodes", async () => {
    for (const end of ["completed", "failed", "cancelled"] as const) {
      const { graph, manager, n } = await nodes(["src", "tgt", "src2"]);
      const tgt = n.tgt as BlockNode;
      if (end === "failed") {
        (tgt.state as MemoryDriver).hook = async (req) => {
          if (req.kind === "write") throw new BlkError("EIO", "injected");
        };
      }
      const release = end === "cancelled" ? gate(tgt) : undefined;
      const b0 = await backup(manager, {
        graph,
        "job-id": "b0",
        device: "src",
        target: "tgt",
        sync: "full",
        "auto-dismiss": false,
      });
      if (end === "cancelled") b0.cancel();
      release?.();
      expect((await b0.outcome).status).toBe(end);
      expect(b0.status).toBe("concluded");
      (tgt.state as MemoryDriver).hook = undefined;
      expect(blockJobsHolding(tgt)).toEqual([]);
      expect(blockJobsHolding(n.src as BlockNode)).toEqual([]);
      // the next jobs on the same nodes, while b0 is still listed
      const b1 = await backup(manager, { graph, "job-id": "b1", device: "src", target: "tgt", sync: "full" });
      expect(await b1.outcome).toEqual({ status: "completed" });
      const m0 = await mirror(manager, graph, {
        "job-id": "m0",
        device: "src2",
        target: "tgt",
        sync: "full",
      });
      await m0.whenStatus("ready");
      m0.complete();
      expect(await m0.outcome).toEqual({ status: "completed" });
      expect(manager.queryJobs().map((j) => [j.id, j.status])).toEqual([["b0", "concluded"]]);
      manager.jobDismiss({ id: "b0" });
    }
  });
});
