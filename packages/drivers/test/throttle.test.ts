import { BlockGraph, backendParent, type Edge, PERM } from "@blk/core";
import { ManualClock, ThrottleConfig, ThrottleGroup, type ThrottleLimits } from "@blk/throttle";
import { describe, expect, it } from "vitest";
import { nullDriver } from "../src/null/index.ts";
import { makeThrottleDriver, THROTTLE_CHILD_ROLE, throttleSchema } from "../src/throttle/index.ts";

const SECONDS = Number(process.env.BLK_THROTTLE_SECONDS ?? 3);
const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

async function setup(limits: ThrottleLimits) {
  const clock = new ManualClock();
  const group = new ThrottleGroup({ name: "tg0", config: ThrottleConfig.fromLimits(limits), clock });
  const drv = makeThrottleDriver(new Map([["tg0", group]]));
  const graph = new BlockGraph();
  const base = await graph.open(nullDriver, { size: 1 << 30, "read-zeroes": true }, { owned: false });
  const thr = await graph.open(
    drv,
    { "throttle-group": "tg0" },
    {
      discard: "unmap",
      children: { file: { node: base, role: THROTTLE_CHILD_ROLE } },
    },
  );
  const root = graph.attach(backendParent(), thr, { name: "root", perm: PERM.CONSISTENT_READ | PERM.WRITE });
  return { clock, group, graph, thr, root };
}

/** Keeps `depth` requests in flight for `seconds` of injected time; returns how many completed. */
async function drive(
  clock: ManualClock,
  issue: () => Promise<void>,
  seconds: number,
  depth = 16,
): Promise<{ done: number; inFlight: Promise<void>[] }> {
  let done = 0;
  const inFlight = new Set<Promise<void>>();
  const all: Promise<void>[] = [];
  const refill = (): void => {
    while (inFlight.size < depth) {
      const p: Promise<void> = issue().then(() => {
        done++;
        inFlight.delete(p);
      });
      inFlight.add(p);
      all.push(p);
    }
  };
  refill();
  const stepNs = 5_000_000;
  for (let t = 0; t < seconds * 200; t++) {
    await tick();
    refill();
    clock.advance(stepNs);
  }
  await tick();
  return { done, inFlight: [...inFlight] };
}

async function finish(s: Awaited<ReturnType<typeof setup>>, pending: Promise<void>[]): Promise<void> {
  // Drain while requests are queued: the filter lifts its limits so they complete (QEMU's drain).
  await s.thr.state.drained(() => {});
  await Promise.all(pending);
  s.root.detach();
  await s.graph.delete(s.thr, { force: true });
  expect(s.group.size).toBe(0);
}

describe("throttle filter", () => {
  it("limits IOPS to the group's iops-total over a long run (injected clock)", async () => {
    const s = await setup({ "iops-total": 100 });
    const root: Edge = s.root;
    const r = await drive(s.clock, () => root.read(0, 4096).then(() => {}), SECONDS);
    // 100 ops/s plus the initial bucket (0.1 s worth); loosely.
    const expected = 100 * SECONDS + 10;
    expect(r.done / expected).toBeGreaterThan(0.9);
    expect(r.done / expected).toBeLessThan(1.1);
    await finish(s, r.inFlight);
  });

  it("limits write bandwidth to bps-total, counting write-zeroes and discards as writes", async () => {
    const s = await setup({ "bps-total": 1 << 20 });
    let i = 0;
    const data = new Uint8Array(65536);
    const r = await drive(
      s.clock,
      () => {
        const k = i++ % 3;
        if (k === 0) return s.root.write(0, data);
        if (k === 1) return s.root.writeZeroes(0, 65536);
        return s.root.discard(0, 65536);
      },
      SECONDS,
      4,
    );
    const bytes = r.done * 65536;
    const expected = (1 << 20) * (SECONDS + 0.1);
    expect(bytes / expected).toBeGreaterThan(0.85);
    expect(bytes / expected).toBeLessThan(1.15);
    await finish(s, r.inFlight);
  });

  it("does not throttle flush or block status", async () => {
    const s = await setup({ "iops-total": 1 });
    // Exhaust the bucket.
    await s.root.read(0, 512);
    const blocked = s.root.read(0, 512);
    let readDone = false;
    void blocked.then(() => {
      readDone = true;
    });
    await s.root.flush();
    expect((await s.root.blockStatus(0, 4096))[0]).toMatchObject({ offset: 0, zero: true });
    await tick();
    expect(readDone).toBe(false);
    s.clock.advance(2e9);
    await blocked;
    await finish(s, []);
  });

  it("needs an existing group and validates options with QEMU's wording", async () => {
    const drv = makeThrottleDriver(new Map());
    const graph = new BlockGraph();
    const base = await graph.open(nullDriver, {});
    await expect(
      graph.open(
        drv,
        { "throttle-group": "nope" },
        { children: { file: { node: base, role: THROTTLE_CHILD_ROLE } } },
      ),
    ).rejects.toMatchObject({ code: "EINVAL", message: "Throttle group 'nope' does not exist" });
    expect(() => throttleSchema.parse({})).toThrow("Parameter 'throttle-group' is missing");
    expect(base.parents.length).toBe(0);
  });
});
