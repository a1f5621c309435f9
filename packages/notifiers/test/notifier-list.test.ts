import { describe, expect, it } from "vitest";
import { NotifierList } from "../src/index.ts";

/** A promise with its resolve function exposed. */
function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

describe("NotifierList", () => {
  it("calls notifiers in registration order with the argument", async () => {
    const list = new NotifierList<number>();
    const calls: string[] = [];
    list.add((n) => {
      calls.push(`a${n}`);
    });
    list.add(async (n) => {
      await tick();
      calls.push(`b${n}`);
    });
    list.add((n) => {
      calls.push(`c${n}`);
    });
    expect(list.size).toBe(3);
    await list.notify(7);
    expect(calls).toEqual(["a7", "b7", "c7"]);
  });

  it("awaits each notifier before starting the next, and notify waits for all", async () => {
    const list = new NotifierList<void>();
    const gate = deferred();
    const calls: string[] = [];
    list.add(async () => {
      calls.push("first:start");
      await gate.promise;
      calls.push("first:end");
    });
    list.add(() => {
      calls.push("second");
    });
    let done = false;
    const p = list.notify().then(() => {
      done = true;
    });
    await tick();
    expect(calls).toEqual(["first:start"]);
    expect(done).toBe(false);
    gate.resolve();
    await p;
    expect(calls).toEqual(["first:start", "first:end", "second"]);
  });

  it("the first failure (throw or rejection) rejects notify and later notifiers do not run", async () => {
    const list = new NotifierList<void>();
    const calls: string[] = [];
    const boom = new Error("boom");
    list.add(() => {
      calls.push("a");
    });
    list.add(async () => {
      await tick();
      throw boom;
    });
    list.add(() => {
      calls.push("c");
    });
    await expect(list.notify()).rejects.toBe(boom);
    expect(calls).toEqual(["a"]);

    const sync = new NotifierList<void>();
    const err = new Error("sync");
    sync.add(() => {
      throw err;
    });
    sync.add(() => {
      calls.push("never");
    });
    await expect(sync.notify()).rejects.toBe(err);
    expect(calls).toEqual(["a"]);
  });

  it("resolves at once with no notifiers", async () => {
    await expect(new NotifierList<number>().notify(1)).resolves.toBeUndefined();
  });

  it("remover and remove(fn) unregister; both report whether something was removed", async () => {
    const list = new NotifierList<void>();
    const calls: string[] = [];
    const a = (): void => {
      calls.push("a");
    };
    const b = (): void => {
      calls.push("b");
    };
    const offA = list.add(a);
    list.add(b);
    list.add(a); // the same function twice: called twice
    await list.notify();
    expect(calls).toEqual(["a", "b", "a"]);
    expect(offA()).toBe(true);
    expect(offA()).toBe(false); // idempotent
    calls.length = 0;
    await list.notify();
    expect(calls).toEqual(["b", "a"]);
    expect(list.remove(a)).toBe(true);
    expect(list.remove(a)).toBe(false);
    expect(list.size).toBe(1);
    list.clear();
    expect(list.size).toBe(0);
  });

  it("a notifier added during a pass is not called by that pass, but by the next", async () => {
    const list = new NotifierList<void>();
    const calls: string[] = [];
    const late = (): void => {
      calls.push("late");
    };
    list.add(() => {
      calls.push("first");
      list.add(late);
    });
    list.add(() => {
      calls.push("second");
    });
    await list.notify();
    expect(calls).toEqual(["first", "second"]);
    calls.length = 0;
    await list.notify();
    // the first notifier adds `late` again on every pass; this pass sees the copy added by the previous one
    expect(calls).toEqual(["first", "second", "late"]);
  });

  it("a notifier removed during a pass is skipped if not called yet; removing a called one is harmless", async () => {
    const list = new NotifierList<void>();
    const calls: string[] = [];
    let offThird = (): boolean => false;
    const offFirst = list.add(() => {
      calls.push("first");
    });
    list.add(() => {
      calls.push("second");
      offFirst(); // already called in this pass
      offThird(); // not called yet: skipped
    });
    offThird = list.add(() => {
      calls.push("third");
    });
    list.add(() => {
      calls.push("fourth");
    });
    await list.notify();
    expect(calls).toEqual(["first", "second", "fourth"]);
    expect(list.size).toBe(2);
  });

  it("concurrent passes each use their own snapshot and run independently", async () => {
    const list = new NotifierList<string>();
    const gate = deferred();
    const calls: string[] = [];
    list.add(async (who) => {
      calls.push(`slow:${who}`);
      if (who === "p1") await gate.promise;
    });
    const p1 = list.notify("p1");
    list.add((who) => {
      calls.push(`added:${who}`);
    });
    const p2 = list.notify("p2");
    await p2;
    expect(calls).toEqual(["slow:p1", "slow:p2", "added:p2"]);
    gate.resolve();
    await p1;
    expect(calls).toEqual(["slow:p1", "slow:p2", "added:p2"]); // p1's snapshot had one notifier
  });
});
