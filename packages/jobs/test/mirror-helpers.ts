/** Shared set-up of the mirror tests: a graph of memory nodes, a guest on the source, a model. */
import { createHash } from "node:crypto";
import {
  BlkError,
  type BlkErrorCode,
  BlockGraph,
  type BlockNode,
  backendParent,
  type Edge,
  type MemoryDriver,
  memoryDriver,
  PERM,
  PERM_ALL,
} from "@blk/core";
import { rng } from "@blk/testkit";
import type { JobEvent, MirrorJob } from "../src/index.ts";
import { type ManualClock, setup, tick } from "./helpers.ts";

export const KiB = 1024;
export const MiB = 1024 * 1024;

/** The deterministic generator the tests share. */
export { rng };

export const sha = (b: Uint8Array): string => createHash("sha256").update(b).digest("hex");

/** Waits (ticks) until `pred` holds; fails after `max` ticks. */
export async function until(pred: () => boolean, max = 5000): Promise<void> {
  for (let i = 0; i < max; i++) {
    if (pred()) return;
    await tick();
  }
  throw new Error("condition not reached");
}

/** Advances the manual clock in 100 ms steps until `pred` holds. */
export async function pump(clock: ManualClock, pred: () => boolean, maxSteps = 500): Promise<void> {
  for (let i = 0; i < maxSteps; i++) {
    if (pred()) return;
    await clock.advance(100_000_000);
  }
  throw new Error("condition not reached");
}

export interface MirrorEnv {
  manager: ReturnType<typeof setup>["manager"];
  clock: ManualClock;
  events: JobEvent[];
  graph: BlockGraph;
  src: BlockNode;
  dst: BlockNode;
  /** The guest: a BlockBackend edge on the source (it follows the source's replacement). */
  guest: Edge;
  /** What the guest has written (initial data included). */
  model: Uint8Array;
  initial: Uint8Array;
  mem(node: BlockNode): MemoryDriver;
}

/** Source with data in a few places (seeded), an empty target, a guest on the source. */
export async function mirrorEnv(opts: {
  size?: number;
  seed?: number;
  dstSize?: number;
  dstDiscard?: "ignore" | "unmap";
  cluster?: number;
}): Promise<MirrorEnv> {
  const size = opts.size ?? 4 * MiB;
  const { manager, clock, events } = setup();
  const graph = new BlockGraph({ random: rng(7) });
  const r = rng(opts.seed ?? 1);
  const initial = new Uint8Array(size);
  for (let i = 0; i < 6; i++) {
    const off = Math.floor(r() * (size - 100 * KiB));
    initial.fill(1 + Math.floor(r() * 250), off, off + Math.floor(r() * 100 * KiB));
  }
  const cluster = opts.cluster ?? 64 * KiB;
  const src = await graph.open(
    memoryDriver,
    { size, data: initial, clusterSize: cluster },
    { nodeName: "src" },
  );
  const dst = await graph.open(
    memoryDriver,
    { size: opts.dstSize ?? size, clusterSize: cluster },
    { nodeName: "dst", discard: opts.dstDiscard ?? "ignore" },
  );
  const guest = graph.attach(backendParent("guest"), src, {
    name: "root",
    perm: PERM.WRITE | PERM.CONSISTENT_READ,
    shared: PERM_ALL,
  });
  return {
    manager,
    clock,
    events,
    graph,
    src,
    dst,
    guest,
    model: initial.slice(),
    initial,
    mem: (n) => n.state as MemoryDriver,
  };
}

/**
 * A guest writing random patterns (some zero-writes) through its edge, one request at a time, updating
 * the model after each; `states` gets the model's hash after every write.
 */
export function guestWriter(
  env: MirrorEnv,
  opts: {
    seed: number;
    writes: number;
    maxLen?: number;
    states?: Set<string>;
    pace?: () => Promise<void>;
    onWrite?: (offset: number, bytes: number) => void;
  },
): { done: Promise<void>; count(): number } {
  const r = rng(opts.seed);
  const size = env.model.length;
  const maxLen = opts.maxLen ?? 96 * KiB;
  let n = 0;
  const done = (async () => {
    for (; n < opts.writes; n++) {
      const len = 1 + Math.floor(r() * maxLen);
      const off = Math.floor(r() * (size - len));
      if (r() < 0.15) {
        await env.guest.writeZeroes(off, len);
        env.model.fill(0, off, off + len);
      } else {
        const data = new Uint8Array(len).fill(1 + Math.floor(r() * 254));
        data[0] = n & 0xff;
        await env.guest.write(off, data);
        env.model.set(data, off);
      }
      opts.onWrite?.(off, len);
      opts.states?.add(sha(env.model));
      await (opts.pace === undefined ? tick() : opts.pace());
    }
  })();
  return {
    done,
    count: () => n,
  };
}

/** A hook failing the `nth` write (1-based) of a memory node with `code`, `times` times in a row. */
export function failNthWrite(mem: MemoryDriver, nth: number, code: BlkErrorCode = "EIO", times = 1): void {
  let seen = 0;
  mem.hook = (req) => {
    if (req.kind !== "write" && req.kind !== "write-zeroes") return;
    seen++;
    if (seen >= nth && seen < nth + times) throw new BlkError(code, `injected ${code}`);
  };
}

export type { MirrorJob };
