/**
 * Point-in-time proofs at full size, on qcow2 files on disk (issue #14, Done when): while the job runs, a
 * guest overwrites exactly half of the image's bytes with new patterns (half of the 128 KiB groups, each
 * rewritten by one aligned request or by two adjacent ones split at an unaligned offset, some of them
 * zero-writes), in batches interleaved with the background copy; the target then equals the
 * source as of job start, byte for byte, for sync `full`, `top` and `none` (read through a fleecing
 * overlay while the guest writes). "As of job start" is a SHA-1 per 64 KiB cluster of the source read just
 * before the job is created, so memory stays bounded at 1 GiB.
 *
 * The background copy is held to `speed` on a manual clock that moves one slice per batch of guest writes,
 * so the guest is guaranteed to write while most of the image is not copied yet; the tests assert that
 * overlap (guest writes that hit clusters still in the copy bitmap, or not yet read through the overlay).
 *
 *   BLK_BACKUP_PIT_MIB=1024 npx vitest run test/backup-pit-disk.test.ts --testTimeout=900000
 */
import { createHash } from "node:crypto";
import { BlockGraph, BlockNode, backendParent, type Edge, PERM } from "@blk/core";
import { makeTempDir, rng, type TempDir } from "@blk/testkit";
import { afterEach, describe, expect, it } from "vitest";
import { type BackupJob, type BackupOptions, backup, type JobManager } from "../src/index.ts";
import { type ManualClock, setup } from "./helpers.ts";
import { openQcow2File } from "./qcow2-files.ts";

const C = 65536;
const MiB = 1 << 20;
/** Image size (the issue's proof: BLK_BACKUP_PIT_MIB=1024). */
const SIZE = Number(process.env.BLK_BACKUP_PIT_MIB ?? 16) * MiB;
/** Batches of guest writes; the manual clock moves one job slice (100 ms) per batch. */
const STEPS = 32;
const SLICE_NS = 100_000_000;
/** Background copy speed: about a third of `bytes` (what the job copies) during the guest's batches. */
const speedFor = (bytes: number): number => Math.floor(bytes / (STEPS * 0.1) / 3);
/** Background chunk: 1/256 of the image, in [64 KiB, 1 MiB]. */
const CHUNK = Math.min(MiB, Math.max(C, SIZE / 256));
/** Bytes per read while hashing. */
const READ = 4 * MiB;
const CLUSTERS = SIZE / C;

/** BLK_BACKUP_PIT_VERBOSE=1 prints the overlap figures and phase times. */
const verbose = process.env.BLK_BACKUP_PIT_VERBOSE === "1";
const t0 = { ms: 0 };
function note(what: string): void {
  if (!verbose) return;
  const now = performance.now();
  console.log(`${what} (+${((now - t0.ms) / 1000).toFixed(1)} s)`);
  t0.ms = now;
}

const hash = (b: Uint8Array): string => createHash("sha1").update(b).digest("base64");

function mix(a: number, b: number, c: number): number {
  let h = Math.imul(a ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(b + 0x632be5ab, 0xc2b2ae35) ^ c;
  h = Math.imul(h ^ (h >>> 15), 0x2c1b3c6d);
  h = Math.imul(h ^ (h >>> 12), 0x297a2d39);
  return (h ^ (h >>> 15)) >>> 0;
}

/**
 * Content of cluster `c` of a layer written with `seed`: every 5th cluster is not written (unallocated,
 * reads as zeroes); the others differ per 512-byte sector (a tag, then a fill byte).
 */
function layerCluster(seed: number, c: number, out: Uint8Array): boolean {
  if (c % 5 === 4) {
    out.fill(0);
    return false;
  }
  for (let s = 0; s < C / 512; s++) {
    const v = mix(seed, c, s);
    const o = s * 512;
    out.fill((v & 0xff) | 1, o, o + 512);
    out[o] = c & 0xff;
    out[o + 1] = (c >>> 8) & 0xff;
    out[o + 2] = (c >>> 16) & 0xff;
    out[o + 3] = s;
    out[o + 4] = seed & 0xff;
  }
  return true;
}

/** Writes the `seed` layer into `node` (runs of written clusters, a few requests in flight). */
async function fillLayer(node: BlockNode, seed: number, only?: (c: number) => boolean): Promise<void> {
  const runs: [number, number][] = [];
  for (let c = 0; c < CLUSTERS; c++) {
    if (c % 5 === 4 || (only !== undefined && !only(c))) continue;
    const last = runs.at(-1);
    if (last !== undefined && last[0] + last[1] === c && last[1] < 64) last[1]++;
    else runs.push([c, 1]);
  }
  const one = new Uint8Array(C);
  for (let i = 0; i < runs.length; i += 8) {
    await Promise.all(
      runs.slice(i, i + 8).map(([c0, n]) => {
        const buf = new Uint8Array(n * C);
        for (let k = 0; k < n; k++) {
          layerCluster(seed, c0 + k, one);
          buf.set(one, k * C);
        }
        return node.write(c0 * C, buf);
      }),
    );
  }
}

/** SHA-1 of every cluster of `node` (read `READ` bytes at a time), from cluster `from` to `to`. */
async function clusterHashes(
  read: (off: number, len: number) => Promise<Uint8Array>,
  from = 0,
  to = CLUSTERS,
) {
  const out: string[] = [];
  for (let off = from * C; off < to * C; off += READ) {
    const len = Math.min(READ, to * C - off);
    const buf = await read(off, len);
    for (let p = 0; p < len; p += C) out.push(hash(buf.subarray(p, p + C)));
  }
  return out;
}

/** Indices where two hash lists differ (the first few). */
function diff(got: readonly string[], want: readonly string[], pick?: (c: number) => boolean): number[] {
  const bad: number[] = [];
  for (let c = 0; c < want.length && bad.length < 8; c++) {
    if ((pick === undefined || pick(c)) && got[c] !== want[c]) bad.push(c);
  }
  return bad;
}

/** One guest write inside a group of two clusters `[2g, 2g+2)`. */
interface GuestWrite {
  offset: number;
  length: number;
  /** Zero-write, or data (a new pattern). */
  zero: boolean;
  clusters: number[];
}

/** One group's writes (issued together: they never overlap, but may share a cluster). */
type GroupWrites = { group: number; writes: GuestWrite[] };

function guestWrite(offset: number, length: number, zero: boolean): GuestWrite {
  const clusters: number[] = [];
  for (let c = Math.floor(offset / C); c * C < offset + length; c++) clusters.push(c);
  return { offset, length, zero, clusters };
}

/**
 * The guest's plan: half of the two-cluster groups, in random order, each overwritten completely, so
 * exactly half of the image's bytes get new content: a third with one aligned write (data, sometimes
 * zeroes), the others with two adjacent writes split at an unaligned offset (the first cluster, or both,
 * are written by two requests at once; one of them sometimes a zero-write). In `STEPS` batches.
 */
function guestPlan(seed: number): GroupWrites[][] {
  const r = rng(seed);
  const groups = [...Array(CLUSTERS / 2).keys()];
  for (let i = groups.length - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1));
    [groups[i], groups[j]] = [groups[j] as number, groups[i] as number];
  }
  const chosen = groups.slice(0, groups.length / 2);
  const plan = chosen.map((g): GroupWrites => {
    const base = g * 2 * C;
    if (r() < 1 / 3) return { group: g, writes: [guestWrite(base, 2 * C, r() < 0.25)] };
    const split = 1 + Math.floor(r() * (2 * C - 1));
    const zero = r();
    return {
      group: g,
      writes: [
        guestWrite(base, split, zero < 0.15),
        guestWrite(base + split, 2 * C - split, zero >= 0.15 && zero < 0.3),
      ],
    };
  });
  const per = Math.ceil(plan.length / STEPS);
  const out: GroupWrites[][] = [];
  for (let i = 0; i < STEPS; i++) out.push(plan.slice(i * per, (i + 1) * per));
  return out;
}

/** The new pattern of a guest write (differs from every layer: the tag byte is 0xee). */
function guestData(w: GuestWrite): Uint8Array {
  const d = new Uint8Array(w.length);
  for (let p = 0; p < w.length; p += 512) {
    const v = mix(0xabcdef, w.offset + p, w.length);
    d.fill((v & 0xff) | 1, p, Math.min(w.length, p + 512));
    d[p] = 0xee;
  }
  return d;
}

/**
 * Expected hashes after the guest's writes: each written group's content at start (`startCluster`)
 * with its writes applied.
 */
function applyPlan(
  start: readonly string[],
  plan: GroupWrites[][],
  startCluster: (c: number, out: Uint8Array) => void,
): string[] {
  const model = start.slice();
  const buf = new Uint8Array(2 * C);
  for (const { group, writes } of plan.flat()) {
    const base = group * 2 * C;
    startCluster(2 * group, buf.subarray(0, C));
    startCluster(2 * group + 1, buf.subarray(C));
    for (const w of writes) {
      if (w.zero) buf.fill(0, w.offset - base, w.offset - base + w.length);
      else buf.set(guestData(w), w.offset - base);
    }
    model[2 * group] = hash(buf.subarray(0, C));
    model[2 * group + 1] = hash(buf.subarray(C));
  }
  return model;
}

/** Bytes the plan overwrites. */
const planBytes = (plan: GroupWrites[][]): number =>
  plan.flat().reduce((n, g) => n + g.writes.reduce((m, w) => m + w.length, 0), 0);

const issue = (guest: Edge, w: GuestWrite): Promise<void> =>
  w.zero ? guest.writeZeroes(w.offset, w.length) : guest.write(w.offset, guestData(w));

interface Disk {
  dir: TempDir;
  graph: BlockGraph;
  manager: JobManager;
  clock: ManualClock;
  jobs: BackupJob[];
  /** Starts a backup job (cancelled after the test if it is still there). */
  backup(options: Omit<BackupOptions, "graph">): Promise<BackupJob>;
  /** Opens (creating) a qcow2 image in the temp dir. */
  qcow2(name: string, backing?: BlockNode): Promise<BlockNode>;
}

let current: Disk | undefined;

async function disk(): Promise<Disk> {
  const dir = makeTempDir("blk-backup-pit");
  const graph = new BlockGraph();
  const { manager, clock } = setup();
  const d: Disk = {
    dir,
    graph,
    manager,
    clock,
    jobs: [],
    async backup(options) {
      const job = await backup(manager, { graph, ...options });
      d.jobs.push(job);
      return job;
    },
    qcow2: (name, backing) => openQcow2File(graph, dir, name, SIZE, { backing }),
  };
  current = d;
  return d;
}

afterEach(async () => {
  const d = current;
  current = undefined;
  if (d === undefined) return;
  try {
    for (const job of d.jobs) {
      job.cancel();
      const settled = job.outcome.then(() => undefined);
      await finishing(d.clock, settled);
    }
    // parents before children: whatever a failed test left open
    for (let round = 0; round < 8 && d.graph.list().length > 0; round++) {
      for (const n of d.graph.list()) {
        if (!n.closed && n.parents.every((e) => !(e.parent instanceof BlockNode))) {
          await d.graph.delete(n, { force: true });
        }
      }
    }
  } finally {
    await d.dir.dispose();
  }
});

/** Moves the manual clock (so rate-limit sleeps end) until the job has ended. */
function finish(clock: ManualClock, job: BackupJob): Promise<void> {
  return finishing(
    clock,
    job.outcome.then(() => undefined),
  );
}

async function finishing(clock: ManualClock, done: Promise<void>): Promise<void> {
  const state = { done: false };
  void done.finally(() => {
    state.done = true;
  });
  while (!state.done) {
    await clock.advance(SLICE_NS);
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
}

/**
 * Runs the guest's batches against a running job: each batch is issued, the clock moves one slice
 * (the background copy dispatches at most one slice's quota, concurrently with the batch), then the batch
 * is awaited. Counts writes that hit at least one cluster still in the copy bitmap (`candidate` clusters
 * only).
 */
async function runGuest(
  d: Disk,
  job: BackupJob,
  guest: Edge,
  plan: GroupWrites[][],
  candidate: (c: number) => boolean,
): Promise<{ writes: number; uncopied: number }> {
  let writes = 0;
  let uncopied = 0;
  for (const batch of plan) {
    const ops = batch
      .flatMap((g) => g.writes)
      .map((w) => {
        writes++;
        if (w.clusters.some((c) => candidate(c) && job.copyBitmap.get(c * C))) uncopied++;
        return issue(guest, w);
      });
    await d.clock.advance(SLICE_NS);
    await Promise.all(ops);
  }
  return { writes, uncopied };
}

describe(`backup point in time on qcow2 files, ${SIZE / MiB} MiB, guest overwrites half during the job`, () => {
  it("sync=full: the target equals the source as of job start", async () => {
    const d = await disk();
    t0.ms = performance.now();
    const src = await d.qcow2("src");
    await fillLayer(src, 1);
    const tgt = await d.qcow2("tgt");
    const guest = d.graph.attach(backendParent("guest"), src, {
      name: "root",
      perm: PERM.CONSISTENT_READ | PERM.WRITE,
    });
    const start = await clusterHashes((o, n) => src.read(o, n));
    const plan = guestPlan(2);
    const model = applyPlan(start, plan, (c, out) => layerCluster(1, c, out));

    const job = await d.backup({
      "job-id": "pit-full",
      device: "src",
      target: "tgt",
      sync: "full",
      speed: speedFor(SIZE),
      "x-perf": { "max-chunk": CHUNK },
    });
    note("full: source filled and hashed");
    const g = await runGuest(d, job, guest, plan, () => true);
    note(
      `full: guest wrote ${g.writes}, ${g.uncopied} over uncopied clusters; ${job.copyBitmap.count() / C} clusters left`,
    );
    // The guest wrote all of its half while the job was still copying.
    expect(job.status).toBe("running");
    expect(job.copyBitmap.count()).toBeGreaterThan(0);
    expect(planBytes(plan)).toBe(SIZE / 2);
    expect(g.uncopied).toBeGreaterThan(g.writes / 4);
    expect(job.cbw.bufferStats.bufferedWrites + job.cbw.bufferStats.syncWrites).toBeGreaterThan(0);
    d.manager.blockJobSetSpeed({ device: "pit-full", speed: 0 });
    await finish(d.clock, job);
    note("job done");
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(job.progress).toEqual({ current: SIZE, total: SIZE });

    expect(diff(await clusterHashes((o, n) => tgt.read(o, n)), start)).toEqual([]);
    const now = await clusterHashes((o, n) => src.read(o, n));
    expect(diff(now, model)).toEqual([]);
    expect(diff(now, start).length).toBeGreaterThan(0);
    guest.detach();
  });

  it("sync=top (x-blk-cbw-buffer-size 0): the top layer's clusters at start, as they were, over the same base", async () => {
    const d = await disk();
    t0.ms = performance.now();
    const base = await d.qcow2("base");
    await fillLayer(base, 3);
    const src = await d.qcow2("src", base);
    // the top layer allocates every third cluster, and a few zero clusters
    await fillLayer(src, 4, (c) => c % 3 === 0);
    for (let c = 1; c < CLUSTERS; c += 17) await src.writeZeroes(c * C, C, { mayUnmap: false });
    // the target gets the source's backing, as a sync=top target does in practice
    const tgt = await d.qcow2("tgt", base);
    const guest = d.graph.attach(backendParent("guest"), src, {
      name: "root",
      perm: PERM.CONSISTENT_READ | PERM.WRITE,
    });
    const allocated = new Set<number>();
    for (const e of await src.blockStatus(0, SIZE)) {
      if (!e.allocated) continue;
      for (let c = e.offset / C; c < (e.offset + e.length) / C; c++) allocated.add(c);
    }
    expect(allocated.size).toBeGreaterThan(CLUSTERS / 4);
    expect(allocated.size).toBeLessThan(CLUSTERS / 2);
    const start = await clusterHashes((o, n) => src.read(o, n));
    const plan = guestPlan(5);
    const buf = new Uint8Array(C);
    const model = applyPlan(start, plan, (c, out) => {
      if (c % 17 === 1) out.fill(0);
      else if (c % 3 === 0 && layerCluster(4, c, buf)) out.set(buf);
      else layerCluster(3, c, out);
    });

    const job = await d.backup({
      "job-id": "pit-top",
      device: "src",
      target: "tgt",
      sync: "top",
      speed: speedFor(allocated.size * C),
      "x-perf": { "max-chunk": CHUNK },
      "x-blk-cbw-buffer-size": 0,
    });
    note("top: layers filled and hashed");
    const g = await runGuest(d, job, guest, plan, (c) => allocated.has(c));
    note(
      `top: guest wrote ${g.writes}, ${g.uncopied} over uncopied clusters; ${job.copyBitmap.count() / C} clusters left`,
    );
    expect(job.status).toBe("running");
    expect(job.copyBitmap.count()).toBeGreaterThan(0);
    expect(planBytes(plan)).toBe(SIZE / 2);
    expect(g.uncopied).toBeGreaterThan(g.writes / 8);
    expect(job.cbw.bufferStats.syncWrites).toBeGreaterThan(0);
    expect(job.cbw.bufferStats.bufferedWrites).toBe(0);
    d.manager.blockJobSetSpeed({ device: "pit-top", speed: 0 });
    await finish(d.clock, job);
    note("job done");
    expect(await job.outcome).toEqual({ status: "completed" });
    expect(job.progress.total).toBe(allocated.size * C);

    // target over base reads as the source at start; the target itself holds exactly the top's clusters
    expect(diff(await clusterHashes((o, n) => tgt.read(o, n)), start)).toEqual([]);
    const tgtAllocated = new Set<number>();
    for (const e of await tgt.blockStatus(0, SIZE)) {
      if (!e.allocated) continue;
      for (let c = e.offset / C; c < (e.offset + e.length) / C; c++) tgtAllocated.add(c);
    }
    expect([...tgtAllocated].sort((a, b) => a - b)).toEqual([...allocated].sort((a, b) => a - b));
    expect(diff(await clusterHashes((o, n) => src.read(o, n)), model)).toEqual([]);
    guest.detach();
  });

  it("sync=none through a fleecing overlay: a reader sees the source as of job start while the guest writes", async () => {
    const d = await disk();
    t0.ms = performance.now();
    const src = await d.qcow2("src");
    await fillLayer(src, 7);
    const guest = d.graph.attach(backendParent("guest"), src, {
      name: "root",
      perm: PERM.CONSISTENT_READ | PERM.WRITE,
    });
    const start = await clusterHashes((o, n) => src.read(o, n));
    const plan = guestPlan(8);
    const model = applyPlan(start, plan, (c, out) => layerCluster(7, c, out));
    // the overlay's image names no backing file: its backing edge is the source node itself
    const overlay = await openQcow2File(d.graph, d.dir, "fleece", SIZE, {
      backing: src,
      headerBacking: false,
    });

    const job = await d.backup({
      "job-id": "pit-none",
      device: "src",
      target: "fleece",
      sync: "none",
    });
    expect(job.cbw.fleecing).toBe(true);
    const reader = d.graph.attach(backendParent("reader"), overlay, {
      name: "root",
      perm: PERM.CONSISTENT_READ,
    });
    const read = (o: number, n: number): Promise<Uint8Array> => reader.read(o, n);
    // Each batch of guest writes runs while the reader reads the next slice of the overlay; writes that
    // land beyond what the reader has read are the ones the overlay must serve from its copies.
    const during: string[] = [];
    const per = CLUSTERS / STEPS;
    let writes = 0;
    let ahead = 0;
    const touched = new Set<number>();
    for (let i = 0; i < STEPS; i++) {
      const ops = (plan[i] ?? [])
        .flatMap((g) => g.writes)
        .map((w) => {
          writes++;
          for (const c of w.clusters) touched.add(c);
          if (w.clusters.some((c) => c >= i * per)) ahead++;
          return issue(guest, w);
        });
      during.push(...(await clusterHashes(read, i * per, (i + 1) * per)));
      await Promise.all(ops);
    }
    note(`none: guest wrote ${writes}, ${ahead} ahead of the reader`);
    expect(job.status).toBe("running");
    expect(touched.size * C).toBe(SIZE / 2);
    expect(ahead).toBeGreaterThan(writes / 4);
    expect(diff(during, start)).toEqual([]);
    expect(diff(await clusterHashes(read), start)).toEqual([]);
    // every cluster the guest wrote was copied once, before its first write
    expect(job.progress.current).toBe(touched.size * C);
    reader.detach();
    d.manager.jobCancel({ id: "pit-none" });
    expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
    expect(guest.child).toBe(src);
    expect(diff(await clusterHashes((o, n) => src.read(o, n)), model)).toEqual([]);
    guest.detach();
    await d.graph.delete(overlay);
  });
});
