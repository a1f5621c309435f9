import { bench, describe, expect } from "vitest";
import { NotifierList, RequestTracker, type TrackedRequest } from "../src/index.ts";

const conflict = (a: TrackedRequest, b: TrackedRequest): boolean =>
  (a.serialising || b.serialising) &&
  a.overlapOffset < b.overlapOffset + b.overlapBytes &&
  b.overlapOffset < a.overlapOffset + a.overlapBytes;

/**
 * Runs `n` overlapping 8 KiB writes, every 16th a serialising copy widened to 64 KiB, each notifying one
 * notifier. With `check`, records conflicts between requests running at the same time.
 */
async function run(n: number, check = false): Promise<{ ran: number; conflicts: number }> {
  const tracker = new RequestTracker();
  const list = new NotifierList<number>();
  list.add(() => undefined);
  const running = new Set<TrackedRequest>();
  let ran = 0;
  let conflicts = 0;
  const all: Promise<void>[] = [];
  for (let i = 0; i < n; i++) {
    const req = tracker.begin({
      offset: (i % 64) * 4096,
      bytes: 8192,
      serialising: i % 16 === 0,
      alignment: 65536,
    });
    all.push(
      (async () => {
        await req.waitForOverlapping();
        if (check) {
          for (const r of running) if (conflict(r, req)) conflicts++;
          running.add(req);
        }
        await list.notify(i);
        ran++;
        running.delete(req);
        req.end();
      })(),
    );
  }
  await Promise.all(all);
  await tracker.drain();
  return { ran, conflicts };
}

describe("RequestTracker + NotifierList", async () => {
  // reference result: every request ran once and no two conflicting requests ever ran together
  expect(await run(1024, true)).toEqual({ ran: 1024, conflicts: 0 });

  bench("1024 tracked requests, 1 notifier each", async () => {
    await run(1024);
  });
});
