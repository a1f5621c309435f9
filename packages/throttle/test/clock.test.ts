import { describe, expect, it } from "vitest";
import { isThrottleError, ManualClock, systemClock } from "../src/index.ts";

describe("ManualClock", () => {
  it("fires due timers in due order (then arming order), with now() at the due time", () => {
    const clock = new ManualClock(100);
    const log: string[] = [];
    clock.setTimer(() => log.push(`b@${clock.now()}`), 20);
    clock.setTimer(() => log.push(`a@${clock.now()}`), 10);
    clock.setTimer(() => log.push(`c@${clock.now()}`), 20);
    const cancelled = clock.setTimer(() => log.push("never"), 5);
    cancelled.cancel();
    cancelled.cancel();
    expect(clock.pendingTimers).toBe(3);
    expect(clock.nextDue()).toBe(110);
    clock.advance(15);
    expect(log).toEqual(["a@110"]);
    expect(clock.now()).toBe(115);
    clock.set(200);
    expect(log).toEqual(["a@110", "b@120", "c@120"]);
    expect(clock.nextDue()).toBeUndefined();
  });

  it("fires timers armed by a callback in the same advance when due; never synchronously on arming", () => {
    const clock = new ManualClock();
    const log: number[] = [];
    clock.setTimer(() => {
      log.push(clock.now());
      clock.setTimer(() => log.push(clock.now()), 5);
      clock.setTimer(() => log.push(clock.now()), 50);
    }, 10);
    clock.setTimer(() => log.push(-1), 0);
    expect(log).toEqual([]);
    clock.advance(20);
    expect(log).toEqual([-1, 10, 15]);
    clock.advance(40);
    expect(log).toEqual([-1, 10, 15, 60]);
  });

  it("is monotonic", () => {
    const clock = new ManualClock(10);
    for (const bad of [() => clock.set(5), () => clock.advance(-1), () => clock.advance(Number.NaN)]) {
      try {
        bad();
        expect.unreachable();
      } catch (e) {
        expect(isThrottleError(e, "EINVAL")).toBe(true);
      }
    }
  });
});

describe("systemClock", () => {
  it("is monotonic in ns and fires timers no earlier than asked", async () => {
    const t0 = systemClock.now();
    const fired = await new Promise<number>((resolve) => {
      systemClock.setTimer(() => resolve(systemClock.now()), 2_000_000);
    });
    expect(fired - t0).toBeGreaterThanOrEqual(1_000_000); // setTimeout granularity is 1 ms
    let ran = false;
    systemClock
      .setTimer(() => {
        ran = true;
      }, 1_000_000)
      .cancel();
    await new Promise((r) => setTimeout(r, 5));
    expect(ran).toBe(false);
  });
});
