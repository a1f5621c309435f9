import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { ManualClock, ThrottleConfig, ThrottleGroup, type ThrottleGroupMember } from "../src/index.ts";
import { flush } from "./sim.ts";

interface Submit {
  member: number;
  isWrite: boolean;
  bytes: number;
  count: number;
  afterNs: number;
}

const submit: fc.Arbitrary<Submit> = fc.record({
  member: fc.integer({ min: 0, max: 2 }),
  isWrite: fc.boolean(),
  bytes: fc.integer({ min: 0, max: 256 * 1024 }),
  count: fc.integer({ min: 1, max: 8 }),
  afterNs: fc.integer({ min: 0, max: 300_000_000 }),
});

describe("ThrottleGroup model", () => {
  it("never admits beyond avg × t + bucket, keeps ≤ 1 timer per direction, and admits everything", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 64 * 1024, max: 8 * 1024 * 1024 }),
        fc.boolean(),
        fc.array(submit, { minLength: 1, maxLength: 15 }),
        async (avg, perDirection, plan) => {
          const clock = new ManualClock();
          const limits = perDirection ? { "bps-read": avg, "bps-write": avg } : { "bps-total": avg };
          const g = new ThrottleGroup({ name: "m", config: ThrottleConfig.fromLimits(limits), clock });
          const members: ThrottleGroupMember[] = [g.join(), g.join(), g.join()];
          const sent = [0, 0]; // bytes admitted per direction
          const bucket = avg / 10;
          const violations: string[] = [];
          let pending = 0;
          let total = 0;

          const largest = [0, 0]; // largest request admitted per direction
          const check = (d: number, bytes: number): void => {
            const before = perDirection ? (sent[d] ?? 0) : (sent[0] ?? 0) + (sent[1] ?? 0);
            // reads and writes have their own timers; with a shared total bucket, both firing at the same
            // moment admit one request each (as in QEMU): the other direction may be one request ahead
            const slack = perDirection ? 0 : (largest[1 - d] ?? 0);
            const allowance = (avg * clock.now()) / 1e9 + bucket + slack;
            if (before > allowance + 1e-9 * before + 1) violations.push(`overshoot ${before} > ${allowance}`);
            sent[d] = (sent[d] ?? 0) + bytes;
            largest[d] = Math.max(largest[d] ?? 0, bytes);
          };
          const step = (): void => {
            const [r, w] = g.armedTimers;
            if (r > 1 || w > 1) violations.push(`timers ${r}/${w}`);
          };

          /** Moves time timer by timer, so admissions are observed at their own time. */
          const advance = async (ns: number): Promise<void> => {
            const end = clock.now() + ns;
            for (let due = clock.nextDue(); due !== undefined && due <= end; due = clock.nextDue()) {
              clock.set(Math.max(due, clock.now()));
              await flush();
              step();
            }
            clock.set(end);
            await flush();
          };

          for (const s of plan) {
            await advance(s.afterNs);
            const m = members[s.member];
            if (m === undefined) continue;
            for (let i = 0; i < s.count; i++) {
              pending++;
              total += s.bytes;
              void m.intercept(s.bytes, s.isWrite).then(() => {
                pending--;
                check(s.isWrite ? 1 : 0, s.bytes);
              });
            }
            await flush();
            step();
          }
          // liveness: everything is admitted within the time the limit needs for it
          const deadline = clock.now() + (total / avg) * 1e9 + 1e9;
          while (pending > 0 && clock.nextDue() !== undefined && clock.now() <= deadline) {
            await advance((clock.nextDue() ?? 0) - clock.now());
          }
          expect(pending).toBe(0);
          expect(clock.now()).toBeLessThanOrEqual(deadline);
          expect(violations).toEqual([]);
        },
      ),
      { numRuns: Number(process.env.BLK_FUZZ_RUNS ?? 150) },
    );
  });
});
