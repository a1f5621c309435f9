import type { ManualClock, ThrottleGroupMember } from "../src/index.ts";

/** Lets every pending promise continuation run. */
export const flush = (): Promise<void> => new Promise((r) => setImmediate(r));

/** Advances `clock` to `endNs` timer by timer, letting promise continuations run after each one. */
export async function runUntil(clock: ManualClock, endNs: number, onStep?: () => void): Promise<void> {
  await flush();
  for (;;) {
    const due = clock.nextDue();
    if (due === undefined || due > endNs) break;
    clock.set(Math.max(due, clock.now()));
    await flush();
    onStep?.();
  }
  clock.set(endNs);
  await flush();
}

/**
 * A client that always has `depth` requests waiting for admission (a saturating guest). Records the
 * admission time of each request; stops submitting once the clock reaches `stopAt`.
 */
export function saturate(opts: {
  member: ThrottleGroupMember;
  clock: ManualClock;
  bytes: number;
  isWrite?: boolean;
  depth?: number;
  stopAt: number;
}): { admitted: number[] } {
  const admitted: number[] = [];
  const loop = async (): Promise<void> => {
    while (opts.clock.now() < opts.stopAt) {
      await opts.member.intercept(opts.bytes, opts.isWrite ?? false);
      admitted.push(opts.clock.now());
    }
  };
  for (let i = 0; i < (opts.depth ?? 1); i++) void loop();
  return { admitted };
}

/** How many times fall in `[from, to)`. */
export const countIn = (times: readonly number[], from: number, to: number): number =>
  times.filter((t) => t >= from && t < to).length;
