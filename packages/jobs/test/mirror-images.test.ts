/**
 * The mirror job on real images (qcow2 and raw files) with a simulated guest writing random patterns
 * while the job runs, checked against a model (issue #13's done-when list): the target equals the guest's
 * view at complete for the three sync modes and both copy modes, read back from disk after the graph is
 * closed; a soft cancel after READY leaves a target equal to a past state of the source; a cancel before
 * READY leaves the source as the guest wrote it; an NBD export of the source keeps serving the guest's
 * data across the switch and serves the target afterwards.
 */
import { closeSync, copyFileSync, openSync, truncateSync, writeFileSync } from "node:fs";
import { BlockGraph, type BlockNode, backendParent, type Edge, PERM, PERM_ALL } from "@blk/core";
import { fileDriver } from "@blk/drivers/file";
import { NbdClient, NbdServer } from "@blk/drivers/nbd";
import { createQcow2, qcow2Driver } from "@blk/drivers/qcow2";
import { makeTempDir, type TempDir } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { JobManager, type MirrorCopyMode, type MirrorJob, mirror } from "../src/index.ts";
import { settle } from "./helpers.ts";
import { KiB, MiB, mirrorEnv, pump, rng, sha, until } from "./mirror-helpers.ts";

const SIZE = 4 * MiB;
const C = 64 * KiB;
/** Guest writes after READY and again after the switch before the guest stops (env: more load). */
const WRITES_AFTER = Number(process.env.BLK_MIRROR_IMAGE_WRITES ?? 20);
const TIMEOUT_MS = 30_000;

type Format = "qcow2" | "raw";
type Sync = "full" | "top" | "none";

/** Initial content: random clusters, every 4th zero, every 7th left unallocated (qcow2) or zero (raw). */
function initialData(seed: number): Uint8Array {
  const r = rng(seed);
  const out = new Uint8Array(SIZE);
  for (let c = 0; c < SIZE / C; c++) {
    if (c % 4 === 3 || c % 7 === 5) continue;
    out.fill(1 + Math.floor(r() * 250), c * C, (c + 1) * C);
    out[c * C] = c & 0xff;
  }
  return out;
}

/** Polls `pred` (real time: the job does file I/O) until it holds. */
async function waitFor(pred: () => boolean, what: string, timeoutMs = TIMEOUT_MS): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

async function readAll(node: BlockNode): Promise<Uint8Array> {
  return node.read(0, node.length);
}

interface Images {
  dir: TempDir;
  graph: BlockGraph;
  manager: JobManager;
  src: BlockNode;
  dst: BlockNode;
  /** The guest's BlockBackend on the source (it follows the source's replacement). */
  guest: Edge;
  /** What the guest reads: the initial content plus every write that completed. */
  model: Uint8Array;
  /** Opens the target image again from its files in a fresh graph and reads it whole. */
  readTargetFromDisk(): Promise<Uint8Array>;
  /** Opens the source image again from its files in a fresh graph and reads it whole. */
  readSourceFromDisk(): Promise<Uint8Array>;
  /** Runs before {@link Images.close} closes the nodes (stops guests). */
  cleanups: (() => Promise<void>)[];
  /** Closes every node (the job must be over); the files stay. */
  close(): Promise<void>;
  /** Closes every node and removes the files. */
  dispose(): Promise<void>;
}

/**
 * A source image holding `initialData(seed)` and a target image of the same size, as the sync mode needs:
 * `full`: an empty target; `top`: a qcow2 source over a raw base holding half the data, and a qcow2 target
 * over the same base (raw: no backing, so `top` copies everything like `full`); `none`: a target that is a
 * copy of the source's file, so only new writes have to reach it.
 */
async function images(fmt: Format, sync: Sync, seed: number): Promise<Images> {
  const dir = makeTempDir("blk-mirror-img");
  const graph = new BlockGraph({ random: rng(seed) });
  const manager = new JobManager();
  const initial = initialData(seed);
  const srcPath = dir.join(`src.${fmt}`);
  const dstPath = dir.join(`dst.${fmt}`);
  const basePath = dir.join("base.raw");
  const withBase = fmt === "qcow2" && sync === "top";
  let base: BlockNode | undefined;
  const openImage = async (g: BlockGraph, path: string, name: string, backing?: BlockNode) => {
    if (fmt === "raw") return g.open(fileDriver, { filename: path }, { nodeName: name });
    const file = await g.open(fileDriver, { filename: path }, { nodeName: `${name}-file`, owned: false });
    return g.open(qcow2Driver, {}, { nodeName: name, children: backing ? { file, backing } : { file } });
  };
  try {
    if (fmt === "raw") {
      writeFileSync(srcPath, initial);
    } else {
      await createQcow2({ filename: srcPath, size: SIZE, ...(withBase ? { backingFile: basePath } : {}) });
      if (withBase) {
        // The base holds the first half of the data, the source (top) the rest.
        const below = new Uint8Array(SIZE);
        below.set(initial.subarray(0, SIZE / 2));
        writeFileSync(basePath, below);
        base = await graph.open(fileDriver, { filename: basePath }, { nodeName: "base" });
      }
      const src = await openImage(graph, srcPath, "init", base);
      for (let c = 0; c < SIZE / C; c++) {
        if (withBase && c * C < SIZE / 2) continue;
        if (c % 7 === 5) continue; // unallocated
        await src.write(c * C, initial.subarray(c * C, (c + 1) * C));
      }
      await graph.delete(src);
    }
    if (sync === "none") copyFileSync(srcPath, dstPath);
    else if (fmt === "raw") {
      closeSync(openSync(dstPath, "w"));
      truncateSync(dstPath, SIZE);
    } else
      await createQcow2({ filename: dstPath, size: SIZE, ...(withBase ? { backingFile: basePath } : {}) });
    const src = await openImage(graph, srcPath, "src", base);
    const dst = await openImage(graph, dstPath, "dst", base);
    const guest = graph.attach(backendParent("guest"), src, {
      name: "root",
      perm: PERM.WRITE | PERM.CONSISTENT_READ,
      shared: PERM_ALL,
    });
    const model = await readAll(src);
    expect(sha(model)).toBe(sha(initial));
    const fromDisk = async (path: string): Promise<Uint8Array> => {
      const g = new BlockGraph();
      const b = withBase ? await g.open(fileDriver, { filename: basePath }, { readOnly: true }) : undefined;
      const file = await g.open(fileDriver, { filename: path }, { readOnly: true, owned: false });
      const node =
        fmt === "raw"
          ? file
          : await g.open(qcow2Driver, {}, { readOnly: true, children: b ? { file, backing: b } : { file } });
      try {
        return await readAll(node);
      } finally {
        await g.delete(node);
        if (b !== undefined) await g.delete(b);
      }
    };
    let closed = false;
    const cleanups: (() => Promise<void>)[] = [];
    const close = async (): Promise<void> => {
      if (closed) return;
      closed = true;
      for (const c of cleanups) await c().catch(() => {});
      if (guest.attached) guest.detach();
      for (let more = true; more; ) {
        more = false;
        for (const n of graph.list())
          if (!n.closed && n.parents.length === 0) {
            await graph.delete(n);
            more = true;
          }
      }
    };
    return {
      cleanups,
      dir,
      graph,
      manager,
      src,
      dst,
      guest,
      model,
      readTargetFromDisk: () => fromDisk(dstPath),
      readSourceFromDisk: () => fromDisk(srcPath),
      close,
      async dispose() {
        try {
          await close();
        } finally {
          await dir.dispose();
        }
      },
    };
  } catch (e) {
    await dir.dispose();
    throw e;
  }
}

/**
 * The guest: random writes (some write-zeroes, some unaligned) through `write`, one at a time with a
 * timer tick between them, updating the model after each; `states` gets the model's hash after every
 * write. Runs until `stop()`.
 */
function startGuest(
  env: Images,
  seed: number,
  io: {
    write(offset: number, data: Uint8Array): Promise<void>;
    zero(offset: number, bytes: number): Promise<void>;
  },
  states?: Set<string>,
): { count(): number; stop(): Promise<void> } {
  const model = env.model;
  const r = rng(seed);
  let n = 0;
  const run = { on: true };
  const done = (async () => {
    while (run.on) {
      const len = 1 + Math.floor(r() * 40 * KiB);
      const off = Math.floor(r() * (model.length - len));
      if (r() < 0.15) {
        await io.zero(off, len);
        model.fill(0, off, off + len);
      } else {
        const data = new Uint8Array(len).fill(1 + Math.floor(r() * 254));
        data[0] = n & 0xff;
        await io.write(off, data);
        model.set(data, off);
      }
      n++;
      states?.add(sha(model));
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
  })();
  const stop = async (): Promise<void> => {
    run.on = false;
    await done;
  };
  env.cleanups.push(stop);
  return { count: () => n, stop };
}

const edgeIo = (e: Edge) => ({
  write: (o: number, d: Uint8Array) => e.write(o, d),
  zero: (o: number, n: number) => e.writeZeroes(o, n),
});

async function startMirror(env: Images, sync: Sync, mode: MirrorCopyMode, extra = {}): Promise<MirrorJob> {
  return mirror(env.manager, env.graph, {
    "job-id": "m",
    device: "src",
    target: "dst",
    sync,
    "copy-mode": mode,
    ...extra,
  });
}

describe("mirror on image files with a guest writing", () => {
  for (const fmt of ["qcow2", "raw"] as const)
    for (const sync of ["full", "top", "none"] as const)
      for (const mode of ["background", "write-blocking"] as const)
        it(`${fmt} sync=${sync} ${mode}: the target read from disk equals the guest's view at complete`, {
          timeout: 60_000,
        }, async () => {
          const seed = 100 + ["full", "top", "none"].indexOf(sync) * 10 + (mode === "background" ? 0 : 1);
          const env = await images(fmt, sync, seed);
          try {
            // The guest starts with the job: sync=none copies what is written from then on.
            const job = await startMirror(env, sync, mode);
            const guest = startGuest(env, seed, edgeIo(env.guest));
            expect(env.guest.child).toBe(job.filter);
            await waitFor(() => job.status === "ready", "READY");
            const atReady = guest.count();
            await waitFor(() => guest.count() >= atReady + WRITES_AFTER, "guest writes after READY");
            job.complete();
            expect(await job.outcome).toEqual({ status: "completed" });
            expect(job.switched).toBe(true);
            expect(env.guest.child).toBe(env.dst);
            // The guest goes on writing, now to the target.
            const atSwitch = guest.count();
            await waitFor(() => guest.count() >= atSwitch + WRITES_AFTER, "guest writes after the switch");
            await guest.stop();
            expect(sha(await readAll(env.dst))).toBe(sha(env.model));
            await env.close();
            expect(sha(await env.readTargetFromDisk())).toBe(sha(env.model));
          } finally {
            await env.dispose();
          }
        });

  for (const fmt of ["qcow2", "raw"] as const)
    it(`${fmt}: soft cancel after READY: no switch, the target on disk equals a past state of the source`, {
      timeout: 60_000,
    }, async () => {
      const env = await images(fmt, "full", 7);
      try {
        const states = new Set<string>([sha(env.model)]);
        const guest = startGuest(env, 8, edgeIo(env.guest), states);
        const job = await startMirror(env, "full", "background");
        await waitFor(() => job.status === "ready", "READY");
        const atReady = guest.count();
        await waitFor(() => guest.count() >= atReady + WRITES_AFTER, "guest writes after READY");
        job.cancel();
        expect(await job.outcome).toEqual({ status: "cancelled", consistent: true });
        expect(job.switched).toBe(false);
        expect(env.guest.child).toBe(env.src);
        const atCancel = guest.count();
        await waitFor(() => guest.count() >= atCancel + 5, "guest writes after the cancel");
        await guest.stop();
        expect(sha(await readAll(env.src))).toBe(sha(env.model));
        await env.close();
        const target = sha(await env.readTargetFromDisk());
        expect(states.has(target)).toBe(true);
        // ... and not the latest one: the guest wrote on after the job ended.
        expect(target).not.toBe(sha(env.model));
        expect(sha(await env.readSourceFromDisk())).toBe(sha(env.model));
      } finally {
        await env.dispose();
      }
    });

  for (const fmt of ["qcow2", "raw"] as const)
    it(`${fmt}: cancel before READY: CANCELLED, the source on disk holds exactly the guest's writes`, {
      timeout: 60_000,
    }, async () => {
      const env = await images(fmt, "full", 9);
      try {
        const guest = startGuest(env, 10, edgeIo(env.guest));
        // 64 KiB/s: READY is a minute away.
        const job = await startMirror(env, "full", "background", { speed: C, "buf-size": C });
        await waitFor(() => guest.count() >= 30 && job.progress.current > 0, "guest writes and progress");
        expect(job.status).toBe("running");
        job.cancel();
        expect(await job.outcome).toEqual({ status: "cancelled", consistent: false });
        expect(env.guest.child).toBe(env.src);
        expect(job.filter.closed).toBe(true);
        expect(env.dst.parents).toEqual([]);
        await guest.stop();
        expect(sha(await readAll(env.src))).toBe(sha(env.model));
        await env.close();
        expect(sha(await env.readSourceFromDisk())).toBe(sha(env.model));
      } finally {
        await env.dispose();
      }
    });
});

describe("an NBD export of the source across the switch", () => {
  for (const mode of ["background", "write-blocking"] as const)
    it(`qcow2 ${mode}: a client writing and reading back through the export sees its data throughout`, {
      timeout: 60_000,
    }, async () => {
      const env = await images("qcow2", "full", 20);
      const server = new NbdServer();
      try {
        server.addExport({ name: "disk", node: env.src, writable: true });
        const exportEdge = env.src.parents.find((e) => e !== env.guest);
        expect(exportEdge).toBeDefined();
        const sock = env.dir.join("nbd.sock");
        await server.listen({ type: "unix", path: sock });
        const client = await NbdClient.connect({ server: { type: "unix", path: sock }, export: "disk" });
        try {
          // The guest is an NBD client. Before each write it reads a random range, which must be the
          // model (no write of its own is in flight then); after it, it reads its write back. Whichever
          // node serves the export — source, mirror_top, or the target after the switch.
          const r = rng(21);
          let mismatches = 0;
          let reads = 0;
          const check = async (): Promise<void> => {
            const len = 1 + Math.floor(r() * 256 * KiB);
            const off = Math.floor(r() * (SIZE - len));
            if (sha(await client.read(off, len)) !== sha(env.model.subarray(off, off + len))) mismatches++;
            reads++;
          };
          const io = {
            write: async (o: number, d: Uint8Array) => {
              await check();
              await client.write(o, d);
              if (sha(await client.read(o, d.length)) !== sha(d)) mismatches++;
            },
            zero: async (o: number, n: number) => {
              await check();
              await client.writeZeroes(o, n);
              if ((await client.read(o, n)).some((b) => b !== 0)) mismatches++;
            },
          };
          const guest = startGuest(env, 22, io);
          const job = await startMirror(env, "full", mode);
          // The export's BlockBackend was the source's parent; mirror_top took it over.
          expect(exportEdge?.child).toBe(job.filter);
          await waitFor(() => job.status === "ready", "READY");
          const atReady = guest.count();
          await waitFor(() => guest.count() >= atReady + WRITES_AFTER, "client writes after READY");
          job.complete();
          expect(await job.outcome).toEqual({ status: "completed" });
          // The export now serves the target.
          expect(exportEdge?.child).toBe(env.dst);
          const atSwitch = guest.count();
          await waitFor(() => guest.count() >= atSwitch + WRITES_AFTER, "client writes after the switch");
          await guest.stop();
          expect(mismatches).toBe(0);
          expect(reads).toBeGreaterThanOrEqual(guest.count());
          const all = new Uint8Array(SIZE);
          for (let off = 0; off < SIZE; off += MiB) all.set(await client.read(off, MiB), off);
          expect(sha(all)).toBe(sha(env.model));
          // The writes after the switch went to the target only.
          expect(sha(await readAll(env.dst))).toBe(sha(env.model));
          expect(sha(await readAll(env.src))).not.toBe(sha(env.model));
        } finally {
          await client.close();
        }
        await server.close();
        await env.close();
        expect(sha(await env.readTargetFromDisk())).toBe(sha(env.model));
      } finally {
        await server.close();
        await env.dispose();
      }
    });
});

describe("convergence under a writer writing as fast as it can", () => {
  for (const mode of ["write-blocking", "auto"] as const)
    it(`raw ${mode}: READY and complete while four unpaced writers write; the target equals their view`, {
      timeout: 60_000,
    }, async () => {
      const env = await images("raw", "full", 30);
      try {
        const job = await mirror(env.manager, env.graph, {
          "job-id": "m",
          device: "src",
          target: "dst",
          sync: "full",
          "x-blk-copy-mode": mode,
          // auto decides over three windows of 100 ms instead of 1 s
          autoWindowNs: 100_000_000,
        });
        // Four writers, each in its own quarter (their writes never overlap), no pause between writes.
        const r = rng(31);
        const quarter = SIZE / 4;
        const run = { on: true };
        let writes = 0;
        const writers = [0, 1, 2, 3].map(async (q) => {
          while (run.on) {
            const len = 512 * (1 + Math.floor(r() * 128));
            const off = q * quarter + 512 * Math.floor(r() * ((quarter - len) / 512));
            const data = new Uint8Array(len).fill(1 + Math.floor(r() * 254));
            await env.guest.write(off, data);
            env.model.set(data, off);
            writes++;
          }
        });
        env.cleanups.push(async () => {
          run.on = false;
          await Promise.all(writers);
        });
        await waitFor(() => job.status === "ready", "READY");
        if (mode === "write-blocking") expect(job.activelySynced).toBe(true);
        const atReady = writes;
        await waitFor(() => writes >= atReady + WRITES_AFTER, "writes after READY");
        job.complete();
        expect(await job.outcome).toEqual({ status: "completed" });
        run.on = false;
        await Promise.all(writers);
        await env.close();
        expect(sha(await env.readTargetFromDisk())).toBe(sha(env.model));
      } finally {
        await env.dispose();
      }
    });
});

describe("a guest write in flight when the job starts", () => {
  for (const sync of ["full", "top"] as const)
    it(`sync=${sync}: the job waits for it (it bypassed mirror_top), so the target gets its data`, async () => {
      const env = await mirrorEnv({ size: MiB, seed: 4 });
      const mem = env.mem(env.src);
      let off = 0;
      while (mem.clusterState(off) !== "unallocated") off += C;
      // The guest's write allocates a cluster of the source and is held inside the source's driver.
      let release!: () => void;
      const held = new Promise<void>((resolve) => (release = resolve));
      let holding = false;
      mem.hook = async (req) => {
        if (req.kind === "write" && !holding) {
          holding = true;
          await held;
        }
      };
      const data = new Uint8Array(3000).fill(0x5c);
      const write = env.guest.write(off + 100, data).then(() => env.model.set(data, off + 100));
      await until(() => holding);
      let started = false;
      const starting = mirror(env.manager, env.graph, {
        "job-id": "m",
        device: "src",
        target: "dst",
        sync,
      }).then((j) => {
        started = true;
        return j;
      });
      await settle(10);
      // mirror_top is in (new guest writes are marked), the job waits for the write that is not.
      expect(env.guest.child.nodeName).not.toBe("src");
      expect(started).toBe(false);
      expect(env.mem(env.dst).counters.writes + env.mem(env.dst).counters.writeZeroes).toBe(0);
      release();
      await write;
      const job = await starting;
      await pump(env.clock, () => job.status === "ready");
      job.complete();
      expect(await job.outcome).toEqual({ status: "completed" });
      expect(sha(await env.mem(env.dst).snapshot())).toBe(sha(env.model));
    });
});
