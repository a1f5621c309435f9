import { describe, expect, it } from "vitest";
import { isNotifierError, NotifierError, RequestTracker, type TrackedRequest } from "../src/index.ts";

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

/** Starts waiting and records when the wait resolves. */
function watch(req: TrackedRequest): { done: () => boolean; waited: Promise<boolean> } {
  let done = false;
  const waited = req.waitForOverlapping().then((w) => {
    done = true;
    return w;
  });
  return { done: () => done, waited };
}

describe("RequestTracker", () => {
  it("a write overlapping an in-flight serialising copy waits until the copy ends", async () => {
    const t = new RequestTracker();
    const copy = t.begin({ offset: 0, bytes: 65536, serialising: true, kind: "copy" });
    expect(await copy.waitForOverlapping()).toBe(false);
    const write = t.begin({ offset: 4096, bytes: 512, kind: "write" });
    const w = watch(write);
    await tick();
    expect(w.done()).toBe(false);
    expect(write.waitingFor).toBe(copy);
    copy.end();
    expect(write.waitingFor).toBeUndefined(); // runnable at once
    expect(await w.waited).toBe(true);
    write.end();
    expect(t.inFlight).toBe(0);
  });

  it("a serialising copy waits for an overlapping write already running", async () => {
    const t = new RequestTracker();
    const write = t.begin({ offset: 100, bytes: 10, kind: "write" });
    const copy = t.begin({ offset: 0, bytes: 4096, serialising: true, kind: "copy" });
    const c = watch(copy);
    await tick();
    expect(c.done()).toBe(false);
    write.end();
    expect(await c.waited).toBe(true);
  });

  it("non-overlapping requests do not wait, whatever they are", async () => {
    const t = new RequestTracker();
    const copy = t.begin({ offset: 0, bytes: 4096, serialising: true });
    const before = t.begin({ offset: 4096, bytes: 4096, serialising: true }); // adjacent: no overlap
    const w = t.begin({ offset: 8192, bytes: 1 });
    expect(await before.waitForOverlapping()).toBe(false);
    expect(await w.waitForOverlapping()).toBe(false);
    expect(t.overlapping(0, 4096)).toEqual([copy]);
    expect(t.overlapping(4095, 2)).toEqual([copy, before]);
    expect(t.overlapping(0, 0)).toEqual([]);
  });

  it("two non-serialising overlapping writes do not wait for each other", async () => {
    const t = new RequestTracker();
    const a = t.begin({ offset: 0, bytes: 4096, kind: "write" });
    const b = t.begin({ offset: 0, bytes: 4096, kind: "write" });
    expect(await a.waitForOverlapping()).toBe(false);
    expect(await b.waitForOverlapping()).toBe(false);
    expect(t.inFlight).toBe(2);
  });

  it("markSerialising widens the overlap range out to the alignment (union on repeat)", async () => {
    const t = new RequestTracker();
    const r = t.begin({ offset: 70000, bytes: 100 });
    expect([r.overlapOffset, r.overlapBytes, r.serialising]).toEqual([70000, 100, false]);
    r.markSerialising(65536);
    expect([r.offset, r.bytes]).toEqual([70000, 100]);
    expect([r.overlapOffset, r.overlapBytes, r.serialising]).toEqual([65536, 65536, true]);
    r.markSerialising(512); // smaller alignment never shrinks
    expect([r.overlapOffset, r.overlapBytes]).toEqual([65536, 65536]);
    const big = t.begin({ offset: 65535, bytes: 2, serialising: true, alignment: 65536 });
    expect([big.overlapOffset, big.overlapBytes]).toEqual([0, 131072]);

    // a write in the widened part (not in the original range) now waits
    const w = t.begin({ offset: 131000, bytes: 8 });
    const ww = watch(w);
    await tick();
    expect(ww.done()).toBe(false);
    r.end();
    await tick();
    expect(ww.done()).toBe(false); // still `big`
    big.end();
    expect(await ww.waited).toBe(true);
  });

  it("a request made serialising after starting waits for overlapping running requests", async () => {
    const t = new RequestTracker();
    const a = t.begin({ offset: 0, bytes: 512 });
    const b = t.begin({ offset: 256, bytes: 512 });
    expect(await b.waitForOverlapping()).toBe(false);
    b.markSerialising();
    const bw = watch(b);
    await tick();
    expect(bw.done()).toBe(false);
    a.end();
    expect(await bw.waited).toBe(true);
  });

  it("waiting is deadlock-free: a request never waits for one that (transitively) waits for it", async () => {
    const t = new RequestTracker();
    const a = t.begin({ offset: 0, bytes: 100, serialising: true });
    const b = t.begin({ offset: 50, bytes: 100, serialising: true });
    const c = t.begin({ offset: 120, bytes: 100, serialising: true });
    // b waits for a; c overlaps b only and b does not wait for c, so c waits for b
    const bw = watch(b);
    const cw = watch(c);
    await tick();
    expect(b.waitingFor).toBe(a);
    expect(c.waitingFor).toBe(b);
    a.end();
    // b re-checks: c waits for b, so b goes ahead; c keeps waiting for b
    expect(await bw.waited).toBe(true);
    await tick();
    expect(cw.done()).toBe(false);
    b.end();
    expect(await cw.waited).toBe(true);
  });

  it("two waiters woken together sort themselves out: one runs, the other waits for it", async () => {
    const t = new RequestTracker();
    const a = t.begin({ offset: 0, bytes: 100, serialising: true });
    const x = t.begin({ offset: 0, bytes: 10, serialising: true });
    const y = t.begin({ offset: 5, bytes: 10, serialising: true });
    const xw = watch(x);
    const yw = watch(y);
    await tick();
    expect(x.waitingFor).toBe(a);
    expect(y.waitingFor).toBe(a);
    a.end();
    await tick();
    // exactly one of them runs; the other waits for it (which one is not part of the contract)
    expect(xw.done() !== yw.done()).toBe(true);
    const [runner, waiter, waiterWatch] = xw.done() ? [x, y, yw] : [y, x, xw];
    expect(waiter.waitingFor).toBe(runner);
    runner.end();
    expect(await waiterWatch.waited).toBe(true);
  });

  it("ending a waiting request resolves its wait; waiting after end resolves at once", async () => {
    const t = new RequestTracker();
    const a = t.begin({ offset: 0, bytes: 10, serialising: true });
    const b = t.begin({ offset: 0, bytes: 10 });
    const bw = watch(b);
    await tick();
    b.end();
    expect(await bw.waited).toBe(true);
    expect(b.ended).toBe(true);
    expect(await b.waitForOverlapping()).toBe(false);
    expect(t.requests()).toEqual([a]);
    a.end();
    a.end(); // idempotent
    expect(t.inFlight).toBe(0);
  });

  it("drain waits for everything in flight, including requests begun while draining", async () => {
    const t = new RequestTracker();
    await t.drain(); // idle: at once
    const a = t.begin({ offset: 0, bytes: 1 });
    let drained = false;
    const d = t.drain().then(() => {
      drained = true;
    });
    const b = t.begin({ offset: 10, bytes: 1 });
    a.end();
    await tick();
    expect(drained).toBe(false);
    b.end();
    // a request begun right after the tracker went idle, before the drain continuation ran, is waited for
    const c = t.begin({ offset: 20, bytes: 1 });
    await tick();
    expect(drained).toBe(false);
    c.end();
    await d;
    expect(drained).toBe(true);
  });

  it("rejects bad ranges and alignments with EINVAL", () => {
    const t = new RequestTracker();
    for (const opts of [
      { offset: -1, bytes: 1 },
      { offset: 0, bytes: -1 },
      { offset: 0.5, bytes: 1 },
      { offset: Number.NaN, bytes: 1 },
      { offset: Number.MAX_SAFE_INTEGER, bytes: 2 },
    ]) {
      expect(() => t.begin(opts)).toThrow(NotifierError);
    }
    const r = t.begin({ offset: 0, bytes: 1 });
    try {
      r.markSerialising(0);
      expect.unreachable();
    } catch (e) {
      expect(isNotifierError(e, "EINVAL")).toBe(true);
    }
    expect(() => t.begin({ offset: 0, bytes: 1, serialising: true, alignment: 1.5 })).toThrow(NotifierError);
    expect(t.inFlight).toBe(1);
    expect(r.kind).toBe("other");
  });
});
