/**
 * What keeps the copy loops cheap on the process clock: an unlimited job's yield is one event-loop turn,
 * not a 1 ms timer; unlimited commit and stream with `on-error: report` copy up to UNLIMITED_BATCH_CHUNKS
 * chunks per request (other policies: one chunk, as QEMU); commit, stream and mirror copy through buffers
 * they reuse instead of allocating one per chunk. Content is checked as well.
 */
import {
  BlkError,
  BlockGraph,
  type BlockNode,
  backendParent,
  type MemoryDriver,
  memoryDriver,
  PERM,
} from "@blk/core";
import { systemClock } from "@blk/throttle";
import { afterEach, describe, expect, it, vi } from "vitest";
import { commit } from "../src/commit/index.ts";
import { type JobEvent, JobManager, UNLIMITED_BATCH_CHUNKS } from "../src/index.ts";
import { mirror } from "../src/mirror/mirror.ts";
import { STREAM_CHUNK, stream } from "../src/stream/index.ts";
import { KiB, MiB, rng, sha } from "./mirror-helpers.ts";

const CLUSTER = 64 * KiB;

function random(size: number, seed: number): Uint8Array {
  const r = rng(seed);
  const d = new Uint8Array(size);
  for (let i = 0; i < size; i += 4096) d.fill(1 + Math.floor(r() * 250), i, i + 4096);
  return d;
}

/** base (all data) ← mid (the first half) ← top (nothing), memory nodes; a guest on top. */
async function chain(
  size: number,
): Promise<{ graph: BlockGraph; base: BlockNode; mid: BlockNode; top: BlockNode }> {
  const graph = new BlockGraph({ random: rng(3) });
  const base = await graph.open(
    memoryDriver,
    { size, data: random(size, 1), clusterSize: CLUSTER },
    { nodeName: "base" },
  );
  const mid = await graph.open(
    memoryDriver,
    { size, clusterSize: CLUSTER },
    { nodeName: "mid", children: { backing: base } },
  );
  await mid.write(0, random(size / 2, 2));
  const top = await graph.open(
    memoryDriver,
    { size, clusterSize: CLUSTER },
    { nodeName: "top", children: { backing: mid } },
  );
  graph.attach(backendParent("guest"), top, { name: "root", perm: PERM.CONSISTENT_READ | PERM.WRITE });
  return { graph, base, mid, top };
}

/** The distinct buffers (by their ArrayBuffer) of the writes into `node` from now on. */
function writeBuffers(node: BlockNode): { count(): number; writes: number } {
  const seen = new Set<ArrayBufferLike>();
  const out = {
    writes: 0,
    count: () => seen.size,
  };
  node.beforeWrite.add((ev) => {
    if (ev.data === undefined) return;
    out.writes++;
    seen.add(ev.data.buffer);
  });
  return out;
}

afterEach(() => {
  vi.restoreAllMocks();
});

describe("copy loops on the process clock", () => {
  it("unlimited commit and stream yield without arming zero-delay timers, and copy through one buffer", async () => {
    const size = 8 * MiB; // 16 chunks of 512 KiB
    const setTimer = vi.spyOn(systemClock, "setTimer");
    const manager = new JobManager();
    expect(manager.clock).toBe(systemClock);

    const c = await chain(size);
    const want = sha(await c.mid.read(0, size));
    const intoBase = writeBuffers(c.base);
    const job = await commit(manager, c.graph, { "job-id": "c0", device: "top", "top-node": "mid" });
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(sha(await c.base.read(0, size))).toBe(want);
    expect(UNLIMITED_BATCH_CHUNKS).toBe(8);
    expect(intoBase.writes).toBe(1); // mid's half: 8 chunks, one request
    expect(intoBase.count()).toBe(1);

    const s = await chain(size);
    const wantTop = sha(await s.top.read(0, size));
    const intoTop = writeBuffers(s.top);
    const sj = await stream(manager, s.graph, { "job-id": "s0", device: "top" });
    expect(await sj.outcome).toEqual({ status: "completed" });
    expect(s.top.backing).toBeUndefined();
    expect(sha(await s.top.read(0, size))).toBe(wantTop);
    expect(intoTop.writes).toBe(2); // 16 chunks, two requests, one buffer
    expect(intoTop.count()).toBe(1);

    // Every iteration yielded; none of them through a timer.
    expect(setTimer.mock.calls.filter(([, ns]) => ns <= 0)).toEqual([]);
  });

  it("mirror reuses the buffers of finished operations, never holding more than buf-size", async () => {
    const size = 8 * MiB;
    const graph = new BlockGraph({ random: rng(5) });
    const src = await graph.open(
      memoryDriver,
      { size, data: random(size, 7), clusterSize: CLUSTER },
      { nodeName: "src" },
    );
    graph.attach(backendParent("guest"), src, { name: "root", perm: PERM.CONSISTENT_READ | PERM.WRITE });
    const dst = await graph.open(memoryDriver, { size, clusterSize: CLUSTER }, { nodeName: "dst" });
    const seen = writeBuffers(dst);
    const manager = new JobManager();
    // buf-size 1 MiB: one 1 MiB operation at a time, eight of them.
    const job = await mirror(manager, graph, {
      "job-id": "m0",
      device: "src",
      target: "dst",
      sync: "full",
      "buf-size": MiB,
    });
    expect(await job.whenStatus("ready")).toBe(true);
    job.complete();
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(sha(await dst.read(0, size))).toBe(sha(await src.read(0, size)));
    expect(seen.writes).toBe(8);
    expect(seen.count()).toBe(1);
  });

  it("errors: report fails at the failed request's first chunk; other policies copy chunk by chunk", async () => {
    const size = 8 * MiB;
    const manager = new JobManager();
    const events: JobEvent[] = [];
    manager.onEvent((e) => events.push(e));
    const completed = (id: string): JobEvent | undefined =>
      events.find((e) => e.event === "BLOCK_JOB_COMPLETED" && e.data.device === id);
    const badWrite = 3 * STREAM_CHUNK;
    const failWrites = (node: BlockNode): void => {
      (node.state as MemoryDriver).hook = (req) => {
        if (
          req.kind === "write" &&
          req.offset < badWrite + STREAM_CHUNK &&
          badWrite < req.offset + req.bytes
        ) {
          throw new BlkError("ENOSPC", "injected ENOSPC");
        }
      };
    };

    // report: the one request over mid's 8 chunks fails, and the job with it, at offset 0.
    const c = await chain(size);
    failWrites(c.base);
    const writes = writeBuffers(c.base);
    const cj = await commit(manager, c.graph, { "job-id": "c1", device: "top", "top-node": "mid" });
    expect((await cj.outcome).status).toBe("failed");
    expect(completed("c1")?.data).toMatchObject({ offset: 0, error: "No space left on device" });
    expect(writes.writes).toBe(1);

    // ignore: chunk by chunk as QEMU; commit retries the failing chunk, so make the failure go away
    // after a few attempts. Chunks 0-2 land, chunk 3 fails three times, then the rest lands.
    const d = await chain(size);
    let failures = 0;
    (d.base.state as MemoryDriver).hook = (req) => {
      if (req.kind === "write" && req.offset === badWrite && failures < 3) {
        failures++;
        throw new BlkError("EIO", "injected EIO");
      }
    };
    const dWrites = writeBuffers(d.base);
    const want = sha(await d.mid.read(0, size));
    const dj = await commit(manager, d.graph, {
      "job-id": "c2",
      device: "top",
      "top-node": "mid",
      "on-error": "ignore",
    });
    expect(await dj.outcome).toEqual({ status: "completed" });
    expect(dWrites.writes).toBe(8 + 3);
    expect(sha(await d.base.read(0, size))).toBe(want);
    const errorsFor = (id: string): number =>
      events.filter((e) => e.event === "BLOCK_JOB_ERROR" && e.data.device === id).length;
    expect(errorsFor("c2")).toBe(3);

    // Stream, report: reads of the base (which alone provides the second half) touching chunk 11 fail; the
    // request [8, 16) fails at its first chunk, after the first request copied chunks 0-7.
    const s = await chain(size);
    const badRead = 11 * STREAM_CHUNK;
    (s.base.state as MemoryDriver).hook = (req) => {
      if (req.kind === "read" && req.offset < badRead + STREAM_CHUNK && badRead < req.offset + req.bytes) {
        throw new BlkError("EIO", "injected EIO");
      }
    };
    const sj = await stream(manager, s.graph, { "job-id": "s1", device: "top" });
    expect((await sj.outcome).status).toBe("failed");
    expect(completed("s1")?.data).toMatchObject({ offset: 8 * STREAM_CHUNK, error: "Input/output error" });
    // The backing chain stays: the stream did not finish.
    expect(s.top.backing).toBe(s.mid);
  });
});
