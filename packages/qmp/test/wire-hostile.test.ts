import { connect, type Socket } from "node:net";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { makeTempDir } from "@blk/testkit";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { QmpClient, QmpServer } from "../src/index.ts";
import { stubRegistry } from "./fixtures/harness.ts";

/** Sessions opened and dropped by the flood test (raise with BLK_FLOOD_SESSIONS=20000). */
const FLOOD = Number(process.env.BLK_FLOOD_SESSIONS ?? 2000);
/** Random garbage inputs (raise with BLK_FUZZ_RUNS). */
const FUZZ_RUNS = Number(process.env.BLK_FUZZ_RUNS ?? 100);
const LIMIT = 64 * 1024;

/** A full garbage collection, so heap figures measure what is retained, not what is merely uncollected. */
setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;
const retainedHeap = (): number => {
  gc();
  return process.memoryUsage().heapUsed;
};

/** Polls `cond` every few ms until it holds; throws after `timeoutMs`. */
async function until(cond: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

const dir = makeTempDir("qmp-hostile");
const path = dir.join("h.sock");
const server = new QmpServer({ registry: stubRegistry(), limits: { maxMessageBytes: LIMIT } });
let control: QmpClient;

beforeAll(async () => {
  await server.listen({ path });
  control = await QmpClient.connect({ path });
});
afterAll(async () => {
  await control.close();
  await server.close();
  await dir.dispose();
});

/** A raw connection that collects what the server sends. */
async function rawSession(): Promise<{
  socket: Socket;
  text: () => string;
  waitFor: (s: string) => Promise<void>;
}> {
  const socket = connect(path);
  let text = "";
  socket.on("data", (d: Buffer) => {
    text += d.toString("latin1");
  });
  socket.on("error", () => {});
  const waitFor = async (s: string): Promise<void> => {
    const deadline = Date.now() + 10_000;
    while (!text.includes(s)) {
      if (Date.now() > deadline)
        throw new Error(`no ${JSON.stringify(s)} in ${JSON.stringify(text.slice(-500))}`);
      await new Promise((r) => setTimeout(r, 2));
    }
  };
  await waitFor('{"QMP"');
  socket.write('{"execute": "qmp_capabilities"}\n');
  await waitFor('{"return": {}}');
  return { socket, text: () => text, waitFor };
}

/** The control session still answers. */
async function controlWorks(): Promise<void> {
  expect(await control.execute("query-jobs", undefined, { timeoutMs: 5000 })).toEqual([]);
}

/** 0xFF makes QEMU's lexer (and ours) start over, whatever state it was in. */
const AFTER = '\xff{"execute": "query-version", "id": "after"}';

describe("QmpServer under hostile input", () => {
  it("survives random garbage; the session resynchronises on 0xFF; others keep working", {
    timeout: 10_000 + FUZZ_RUNS * 50,
  }, async () => {
    const s = await rawSession();
    let round = 0;
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ minLength: 1, maxLength: 2000 }), async (garbage) => {
        round++;
        s.socket.write(garbage);
        s.socket.write(Buffer.from(AFTER.replace("after", `after-${round}`), "latin1"));
        await s.waitFor(`"id": "after-${round}"`);
      }),
      { numRuns: FUZZ_RUNS },
    );
    await controlWorks();
    expect(server.stats().bufferedInputBytes).toBeLessThan(LIMIT * 2);
    s.socket.destroy();
  });

  it("answers lines beyond the size limit with QEMU's error and holds at most the limit", async () => {
    const s = await rawSession();
    const line = Buffer.alloc(4 * 1024 * 1024, "a");
    line[0] = 0x22; // one 4 MiB string, never closed on this line
    let peak = 0;
    for (let off = 0; off < line.length; off += 256 * 1024) {
      s.socket.write(line.subarray(off, off + 256 * 1024));
      await new Promise((r) => setTimeout(r, 1));
      peak = Math.max(peak, server.stats().bufferedInputBytes);
    }
    s.socket.write(Buffer.from(`\n${AFTER}`, "latin1"));
    await s.waitFor('"id": "after"');
    expect(s.text()).toContain('"desc": "JSON token size limit exceeded"');
    expect(peak).toBeLessThan(LIMIT + 2 * 256 * 1024);
    await controlWorks();
    s.socket.destroy();
  });

  it("answers deep nesting with the nesting error and recovers on 0xFF", async () => {
    const s = await rawSession();
    s.socket.write("[".repeat(100_000));
    s.socket.write(Buffer.from(AFTER, "latin1"));
    await s.waitFor('"id": "after"');
    const nesting = s.text().split("JSON nesting depth limit exceeded").length - 1;
    expect(nesting).toBe(Math.floor(100_000 / 1025));
    s.socket.write('{"execute": "query-jobs", "id": "again"}');
    await s.waitFor('"id": "again"');
    await controlWorks();
    s.socket.destroy();
  });

  it("keeps an unterminated string bounded and drops nothing else when the client disconnects", async () => {
    const s = await rawSession();
    s.socket.write(`{"execute": "query-jobs", "id": "${"x".repeat(LIMIT / 2)}`);
    await until(() => server.stats().bufferedInputBytes > LIMIT / 2, "the server to hold the partial string");
    s.socket.destroy();
    await until(() => server.sessions.size === 1, "the session to go away");
    expect(server.sessions.size).toBe(1); // only the control session
    expect(server.stats().bufferedInputBytes).toBe(0);
    await controlWorks();
  });

  it(`opens and drops ${FLOOD} sessions without leaking`, { timeout: 30_000 + FLOOD * 20 }, async () => {
    const before = retainedHeap();
    const batch = 50;
    let connected = 0;
    let peak = 0;
    for (let done = 0; done < FLOOD; done += batch) {
      const sockets = await Promise.all(
        Array.from(
          { length: Math.min(batch, FLOOD - done) },
          (_, i) =>
            new Promise<Socket>((resolve) => {
              const socket = connect(path, () => {
                connected++;
                // a mix: idle, half a command, garbage, a negotiated session with a command in flight
                const kind = (done + i) % 4;
                if (kind === 1) socket.write('{"execute": "query-ver');
                if (kind === 2) socket.write("\x00\x01garbage[[[{");
                if (kind === 3) socket.write('{"execute": "qmp_capabilities"}{"execute": "query-jobs"}');
                resolve(socket);
              });
              socket.on("error", () => resolve(socket)); // counted as not connected
            }),
        ),
      );
      // wait until the server has accepted them all (the kernel completes connects before accept)
      await until(() => server.sessions.size >= sockets.length + 1, "the server to accept the batch");
      peak = Math.max(peak, server.sessions.size);
      for (const socket of sockets) socket.destroy();
      await controlWorks();
    }
    await until(() => server.sessions.size === 1, "the dropped sessions to go away");
    expect(connected).toBe(FLOOD);
    expect(peak).toBe(Math.min(batch, FLOOD) + 1);
    expect(server.sessions.size).toBe(1);
    expect(server.stats()).toMatchObject({ sessions: 1, bufferedInputBytes: 0, queuedCommands: 0 });
    const grown = retainedHeap() - before;
    // measured: about 1 MiB whether 500 or 30 000 sessions came and went (warm-up, not per-session state)
    expect(grown).toBeLessThan(8 * 1024 * 1024);
  });
});
