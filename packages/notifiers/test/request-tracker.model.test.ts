import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { RequestTracker, type TrackedRequest } from "../src/index.ts";

const flush = (): Promise<void> => new Promise((r) => setImmediate(r));

type Cmd =
  | { op: "begin"; offset: number; bytes: number; serialising: boolean; alignment: number }
  | { op: "end"; pick: number }
  | { op: "reserialise"; pick: number; alignment: number }
  | { op: "flush" };

const cmd: fc.Arbitrary<Cmd> = fc.oneof(
  fc.record({
    op: fc.constant("begin" as const),
    offset: fc.integer({ min: 0, max: 63 }),
    bytes: fc.integer({ min: 0, max: 16 }),
    serialising: fc.boolean(),
    alignment: fc.constantFrom(1, 4, 8, 16),
  }),
  fc.record({ op: fc.constant("end" as const), pick: fc.nat() }),
  fc.record({
    op: fc.constant("reserialise" as const),
    pick: fc.nat(),
    alignment: fc.constantFrom(1, 8, 32),
  }),
  fc.constant({ op: "flush" as const }),
);

interface Model {
  req: TrackedRequest;
  state: "waiting" | "running" | "ended";
}

const conflict = (a: TrackedRequest, b: TrackedRequest): boolean =>
  (a.serialising || b.serialising) &&
  a.overlapOffset < b.overlapOffset + b.overlapBytes &&
  b.overlapOffset < a.overlapOffset + a.overlapBytes;

describe("RequestTracker model", () => {
  it("no request proceeds while a conflicting one runs, and every waiter eventually proceeds", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(cmd, { maxLength: 60 }), async (cmds) => {
        const tracker = new RequestTracker();
        const all: Model[] = [];
        const violations: string[] = [];

        const startWait = (m: Model): void => {
          m.state = "waiting";
          void m.req.waitForOverlapping().then(() => {
            if (m.state === "ended") return;
            for (const o of all) {
              if (o !== m && o.state === "running" && conflict(o.req, m.req)) {
                violations.push(
                  `[${m.req.overlapOffset},+${m.req.overlapBytes}) ran with a conflicting request`,
                );
              }
            }
            m.state = "running";
          });
        };
        const live = (): Model[] => all.filter((m) => m.state !== "ended");
        const checkWaits = (): void => {
          // every waiting request waits for something in flight that conflicts with it
          for (const m of all) {
            if (m.state !== "waiting" || m.req.waitingFor === undefined) continue;
            const w = m.req.waitingFor;
            expect(w.ended).toBe(false);
            expect(conflict(w, m.req)).toBe(true);
          }
        };

        for (const c of cmds) {
          switch (c.op) {
            case "begin": {
              const m: Model = {
                req: tracker.begin({
                  offset: c.offset,
                  bytes: c.bytes,
                  serialising: c.serialising,
                  alignment: c.alignment,
                }),
                state: "waiting",
              };
              all.push(m);
              startWait(m);
              break;
            }
            case "end": {
              const l = live();
              const m = l[c.pick % Math.max(1, l.length)];
              if (m !== undefined) {
                m.state = "ended";
                m.req.end();
              }
              break;
            }
            case "reserialise": {
              const running = all.filter((m) => m.state === "running");
              const m = running[c.pick % Math.max(1, running.length)];
              if (m !== undefined) {
                m.req.markSerialising(c.alignment);
                startWait(m);
              }
              break;
            }
            case "flush":
              await flush();
              checkWaits();
              break;
          }
        }
        await flush();
        checkWaits();
        expect(tracker.inFlight).toBe(live().length);

        // liveness: ending whatever runs must eventually let every waiter proceed
        for (let round = 0; live().length > 0; round++) {
          const running = all.filter((m) => m.state === "running");
          expect(running.length, "deadlock: requests wait but none runs").toBeGreaterThan(0);
          expect(round).toBeLessThan(all.length + 1);
          for (const m of running) {
            m.state = "ended";
            m.req.end();
          }
          await flush();
          checkWaits();
        }
        expect(tracker.inFlight).toBe(0);
        await tracker.drain();
        expect(violations).toEqual([]);
      }),
      { numRuns: Number(process.env.BLK_FUZZ_RUNS ?? 300) },
    );
  });
});
