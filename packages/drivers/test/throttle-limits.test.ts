/**
 * Every base limit of a throttle group, measured as a ratio over a long run of injected time (no wall
 * clock): a mixed read/write load through the filter completes `limit × time` (plus the first bucket) of
 * what the limit counts, and the direction a limit does not count is not slowed by it.
 */
import { BlockGraph, backendParent, type Edge, PERM } from "@blk/core";
import { ManualClock, ThrottleConfig, ThrottleGroup, type ThrottleLimits } from "@blk/throttle";
import { describe, expect, it } from "vitest";
import { nullDriver } from "../src/null/index.ts";
import { makeThrottleDriver, THROTTLE_CHILD_ROLE } from "../src/throttle/index.ts";

const SECONDS = Number(process.env.BLK_THROTTLE_SECONDS ?? 3);
const REQ = 16384;
const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

interface Done {
  readOps: number;
  writeOps: number;
  readBytes: number;
  writeBytes: number;
}

/** Keeps `depth` reads and `depth` writes of REQ bytes in flight for `seconds` of injected time. */
async function mixedLoad(limits: ThrottleLimits, seconds: number, depth = 8): Promise<Done> {
  const clock = new ManualClock();
  const group = new ThrottleGroup({ name: "tg", config: ThrottleConfig.fromLimits(limits), clock });
  const graph = new BlockGraph();
  const base = await graph.open(nullDriver, { size: 1 << 30, "read-zeroes": true }, { owned: false });
  const thr = await graph.open(
    makeThrottleDriver(new Map([["tg", group]])),
    { "throttle-group": "tg" },
    { children: { file: { node: base, role: THROTTLE_CHILD_ROLE } } },
  );
  const root: Edge = graph.attach(backendParent(), thr, {
    name: "root",
    perm: PERM.CONSISTENT_READ | PERM.WRITE,
  });
  const done: Done = { readOps: 0, writeOps: 0, readBytes: 0, writeBytes: 0 };
  const data = new Uint8Array(REQ).fill(1);
  const pending = new Set<Promise<void>>();
  let reads = 0;
  let writes = 0;
  const refill = (): void => {
    while (reads < depth) {
      reads++;
      const p: Promise<void> = root.read(0, REQ).then(() => {
        done.readOps++;
        done.readBytes += REQ;
        reads--;
        pending.delete(p);
      });
      pending.add(p);
    }
    while (writes < depth) {
      writes++;
      const p: Promise<void> = root.write(REQ, data).then(() => {
        done.writeOps++;
        done.writeBytes += REQ;
        writes--;
        pending.delete(p);
      });
      pending.add(p);
    }
  };
  const stepNs = 5_000_000;
  for (let t = 0; t < (seconds * 1e9) / stepNs; t++) {
    refill();
    await tick();
    clock.advance(stepNs);
  }
  await tick();
  const counted = { ...done };
  // Drain (the filter lets queued requests through), then tear down.
  await thr.state.drained(() => {});
  await Promise.all([...pending]);
  root.detach();
  await graph.delete(thr, { force: true });
  expect(group.size).toBe(0);
  return counted;
}

/** The first bucket lets a tenth of a second's worth through before the rate applies (QEMU's default). */
const expected = (rate: number): number => rate * (SECONDS + 0.1);

describe("throttle filter: every base limit holds over a long run (ratios, injected clock)", () => {
  it.each([
    ["iops-total", 200, (d: Done) => d.readOps + d.writeOps],
    ["iops-read", 100, (d: Done) => d.readOps],
    ["iops-write", 100, (d: Done) => d.writeOps],
    ["bps-total", 4 << 20, (d: Done) => d.readBytes + d.writeBytes],
    ["bps-read", 2 << 20, (d: Done) => d.readBytes],
    ["bps-write", 2 << 20, (d: Done) => d.writeBytes],
  ] as const)("%s = %d", async (limit, rate, measured) => {
    const d = await mixedLoad({ [limit]: rate }, SECONDS);
    const ratio = measured(d) / expected(rate);
    expect(ratio, JSON.stringify(d)).toBeGreaterThan(0.9);
    expect(ratio, JSON.stringify(d)).toBeLessThan(1.1);
    // A one-direction limit leaves the other direction running far above it.
    const unit = limit.startsWith("iops") ? 1 : REQ;
    if (limit.endsWith("-read")) expect(d.writeOps * unit).toBeGreaterThan(5 * expected(rate));
    if (limit.endsWith("-write")) expect(d.readOps * unit).toBeGreaterThan(5 * expected(rate));
  });

  it("iops-size counts a large request as several operations", async () => {
    // 16 KiB requests with iops-size=4096: each is 4 operations, so a quarter of the requests pass.
    const d = await mixedLoad({ "iops-total": 400, "iops-size": 4096 }, SECONDS);
    const ratio = (d.readOps + d.writeOps) / (expected(400) / 4);
    expect(ratio, JSON.stringify(d)).toBeGreaterThan(0.85);
    expect(ratio, JSON.stringify(d)).toBeLessThan(1.15);
  });

  it("read and write limits together hold independently", async () => {
    const d = await mixedLoad({ "bps-read": 1 << 20, "iops-write": 50 }, SECONDS);
    expect(d.readBytes / expected(1 << 20)).toBeGreaterThan(0.9);
    expect(d.readBytes / expected(1 << 20)).toBeLessThan(1.1);
    expect(d.writeOps / expected(50)).toBeGreaterThan(0.9);
    expect(d.writeOps / expected(50)).toBeLessThan(1.1);
  });
});
