import { bench, describe, expect } from "vitest";
import { ManualClock, ThrottleConfig, ThrottleState } from "../src/index.ts";

/** A plain reference of QEMU's formulas (leak, per-bucket wait, max over the direction, accounting). */
function referenceWaits(steps: number): number[] {
  // bps-total 1 MiB/s; iops-write 100 with max 200 for 5 s; iops-size 4096
  const b = [
    { avg: 1048576, max: 0, len: 1, level: 0, burst: 0 }, // BPS_TOTAL
    { avg: 100, max: 200, len: 5, level: 0, burst: 0 }, // OPS_WRITE
  ];
  const out: number[] = [];
  let prev = 0;
  for (let i = 0; i < steps; i++) {
    const now = i * 1_000_000;
    const delta = now - prev;
    prev = now;
    for (const k of b) {
      if (delta <= 0) break;
      k.level = Math.max(0, k.level - (k.avg * delta) / 1e9);
      if (k.len > 1) k.burst = Math.max(0, k.burst - (k.max * delta) / 1e9);
    }
    let wait = 0;
    for (const k of b) {
      const size = k.max === 0 ? k.avg / 10 : k.max * k.len;
      let w = 0;
      if (k.level - size > 0) w = Math.trunc(((k.level - size) * 1e9) / k.avg);
      else if (k.len > 1 && k.burst - k.max / 10 > 0) w = Math.trunc(((k.burst - k.max / 10) * 1e9) / k.max);
      wait = Math.max(wait, w);
    }
    out.push(wait);
    const bytes = 4096 * ((i % 7) + 1);
    const units = bytes > 4096 ? bytes / 4096 : 1;
    for (const [j, k] of b.entries()) {
      const add = j === 0 ? bytes : units;
      k.level += add;
      if (k.len > 1) k.burst += add;
    }
  }
  return out;
}

function stateWaits(steps: number): number[] {
  const clock = new ManualClock();
  const cfg = ThrottleConfig.fromLimits({
    "bps-total": 1048576,
    "iops-write": 100,
    "iops-write-max": 200,
    "iops-write-max-length": 5,
    "iops-size": 4096,
  });
  const ts = new ThrottleState(cfg, clock);
  const out: number[] = [];
  for (let i = 0; i < steps; i++) {
    clock.set(i * 1_000_000);
    out.push(ts.computeWait(true));
    ts.account(true, 4096 * ((i % 7) + 1));
  }
  return out;
}

describe("ThrottleState computeWait + account", () => {
  const expected = referenceWaits(10_000);
  expect(stateWaits(10_000)).toEqual(expected);
  expect(expected.some((w) => w > 0)).toBe(true);

  bench("ThrottleState (10k requests)", () => {
    stateWaits(10_000);
  });
  bench("plain reference (10k requests)", () => {
    referenceWaits(10_000);
  });
});
