/**
 * The server's reusable buffers on the WRITE path: sockets it accepts read into one shared read buffer
 * and straight into pooled payload buffers, and payload buffers go back to the pool once the node is done
 * with them. A pooled buffer must never be handed out again while a write still holds it: a slow node
 * write stays in flight while many more WRITEs (large and small, split anywhere on the wire) arrive,
 * complete and recycle their buffers; every byte is checked afterwards. Counts: BLK_FUZZ_RUNS (default 6).
 */
import { createHash } from "node:crypto";
import { join } from "node:path";
import { BlockGraph, type BlockNode, type MemoryDriver, type MemoryRequest, memoryDriver } from "@blk/core";
import { makeTempDir, pattern, type TempDir } from "@blk/testkit";
import fc from "fast-check";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import {
  encodeClientFlags,
  encodeRequest,
  NBD_CMD,
  NbdClient,
  type NbdClientMessage,
  NbdClientStreamParser,
  NbdServer,
} from "../src/nbd/index.ts";
import { type RawClient, rawGo } from "./fixtures/nbd/client.ts";

const KiB = 1024;
const MiB = 1 << 20;
const RUNS = Number(process.env.BLK_FUZZ_RUNS ?? 6);

let dir: TempDir;
let graph: BlockGraph;
let node: BlockNode;
let mem: MemoryDriver;
let server: NbdServer | undefined;
/** Opens every gate a test left closed (so that closing the server does not wait for them). */
const gates: (() => void)[] = [];

beforeEach(async () => {
  dir = makeTempDir("blk-nbd-buffers-");
  graph = new BlockGraph();
  node = await graph.open(memoryDriver, { size: 32 * MiB }, { nodeName: "disk" });
  mem = node.state as MemoryDriver;
});

afterEach(async () => {
  mem.hook = undefined;
  for (const open of gates.splice(0)) open();
  await server?.close();
  server = undefined;
  await dir.dispose();
});

async function serve(maxInFlight: number): Promise<string> {
  server = new NbdServer({ maxInFlight });
  server.addExport({ name: "disk", node, writable: true });
  const sock = join(dir.path, "s.sock");
  await server.listen({ type: "unix", path: sock });
  return sock;
}

interface Write {
  cookie: bigint;
  offset: number;
  data: Uint8Array;
}

/** Header and payload of each write, as one byte stream. */
function stream(writes: readonly Write[]): Uint8Array {
  return Buffer.concat(
    writes.flatMap((w) => [
      encodeRequest({
        flags: 0,
        type: NBD_CMD.WRITE,
        cookie: w.cookie,
        offset: w.offset,
        length: w.data.length,
      }),
      w.data,
    ]),
  );
}

/** Sends `bytes` in pieces of the given sizes (cycled), letting the event loop run between them. */
async function sendSplit(c: RawClient, bytes: Uint8Array, sizes: readonly number[]): Promise<void> {
  let i = 0;
  for (let off = 0; off < bytes.length; i++) {
    const n = Math.min(sizes[i % sizes.length] ?? bytes.length, bytes.length - off);
    c.send(bytes.subarray(off, off + n));
    off += n;
    await new Promise((r) => setImmediate(r));
  }
}

/** Waits for `n` replies; returns the cookies that came back with error 0. */
async function replies(c: RawClient, n: number): Promise<bigint[]> {
  const ok: bigint[] = [];
  for (let i = 0; i < n; i++) {
    const m = await c.next(20_000);
    if (m.kind === "simple-reply" && m.error === 0) ok.push(m.cookie);
    else if (m.kind === "chunk" && m.type === 0) ok.push(m.cookie);
    else
      throw new Error(
        `unexpected reply ${JSON.stringify(m, (_k, v) => (typeof v === "bigint" ? `${v}` : v))}`,
      );
  }
  return ok;
}

/** A gate the memory node's writes at `offsets` wait on; `reached` once all of them arrived. */
function holdWriteAt(...offsets: number[]): { reached: Promise<void>; open: () => void } {
  let reachedResolve!: () => void;
  const reached = new Promise<void>((r) => (reachedResolve = r));
  let open!: () => void;
  const gate = new Promise<void>((r) => (open = r));
  gates.push(open);
  const waiting = new Set(offsets);
  mem.hook = async (req: MemoryRequest) => {
    if (req.kind === "write" && offsets.includes(req.offset)) {
      waiting.delete(req.offset);
      if (waiting.size === 0) reachedResolve();
      await gate;
    }
  };
  return { reached, open };
}

async function until(cond: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error("condition not reached");
    await new Promise((r) => setTimeout(r, 5));
  }
}

async function expectContent(writes: readonly Write[]): Promise<void> {
  for (const w of writes) {
    const got = await node.read(w.offset, w.data.length);
    expect(Buffer.from(got).equals(Buffer.from(w.data)), `data of cookie ${w.cookie}`).toBe(true);
  }
}

describe("NBD server WRITE buffers", { timeout: 60_000 }, () => {
  it("a payload buffer held by a slow node write is not reused by the WRITEs that pass it", async () => {
    const sock = await serve(16);
    const held = holdWriteAt(0);
    const c = await rawGo(sock, "disk", { structured: false });
    const slow: Write = { cookie: 1n, offset: 0, data: pattern(1, 0, 256 * KiB) };
    c.send(stream([slow]));
    await held.reached;
    // 48 more writes (large ones read straight into pooled buffers, small ones) reuse the pool over and
    // over while the first still holds its buffer.
    // (2 MiB + 5: gathered once a quarter of it arrived, the others as soon as their header is parsed.)
    const sizes = [256 * KiB, 4 * KiB, 64 * KiB + 512, 512, MiB, 128 * KiB, 2 * MiB + 5, 256 * KiB];
    let next = MiB;
    const rest: Write[] = Array.from({ length: 48 }, (_, i) => {
      const size = sizes[i % sizes.length] as number;
      const w = { cookie: BigInt(i + 2), offset: next, data: pattern(i + 2, 0, size) };
      next += size;
      return w;
    });
    await sendSplit(c, stream(rest), [300_000, 28, 4096, 65_536 + 7, 1, 200_000]);
    const early = await replies(c, rest.length);
    expect(early.sort()).toEqual(rest.map((w) => w.cookie).sort());
    held.open();
    expect(await replies(c, 1)).toEqual([1n]);
    await expectContent([slow, ...rest]);
    c.close();
  });

  it("bytes left unparsed while the in-flight limit is reached survive another client's reads", async () => {
    // maxInFlight 2 and two writes of client A held: A's socket is paused with bytes of its later
    // requests unparsed. Client B's reads go through the same shared read buffer meanwhile; A's bytes
    // must have been copied out of it (into pooled copies, recycled once parsed).
    const sock = await serve(2);
    const held = holdWriteAt(0, 64 * KiB);
    const a = await rawGo(sock, "disk", { structured: true });
    const b = await rawGo(sock, "disk", { structured: false });
    const first: Write[] = [
      { cookie: 1n, offset: 0, data: pattern(7, 0, 64 * KiB) },
      { cookie: 2n, offset: 64 * KiB, data: pattern(8, 0, 3 * KiB) },
    ];
    const restA: Write[] = Array.from({ length: 40 }, (_, i) => ({
      cookie: BigInt(i + 3),
      offset: 256 * KiB + i * 96 * KiB,
      data: pattern(i + 9, 0, i % 3 === 0 ? 80 * KiB : 3 * KiB + i),
    }));
    // In one go: the read that brings the two held writes brings the start of the others too.
    a.send(stream([...first, ...restA]));
    await held.reached;
    await until(() => server?.connections().some((c) => c.readBuffered > 0) ?? false);
    const writesB: Write[] = Array.from({ length: 24 }, (_, i) => ({
      cookie: BigInt(i + 1),
      offset: 16 * MiB + i * 300 * KiB,
      data: pattern(i + 500, 0, i % 2 === 0 ? 256 * KiB + 100 : 5 * KiB),
    }));
    await sendSplit(b, stream(writesB), [70_000, 9, 262_144]);
    expect((await replies(b, writesB.length)).length).toBe(writesB.length);
    held.open();
    expect((await replies(a, first.length + restA.length)).length).toBe(first.length + restA.length);
    await expectContent([...first, ...restA, ...writesB]);
    a.close();
    b.close();
  });

  it("random WRITE sizes and wire splits from two clients at once, one write held back, leave exactly the data sent (property)", async () => {
    // Both connections read into the same shared read buffer: bytes one of them leaves unparsed must be
    // copied out before the other's next read lands there.
    const sock = await serve(4);
    const client = fc.record({
      lengths: fc.array(fc.integer({ min: 0, max: 300 * KiB }), { minLength: 1, maxLength: 6 }),
      splits: fc.array(fc.integer({ min: 1, max: 300_000 }), { minLength: 1, maxLength: 6 }),
    });
    await fc.assert(
      fc.asyncProperty(client, client, fc.nat(), async (a, b, heldIndex) => {
        const plans = [a, b].map((p, k) => ({
          splits: p.splits,
          writes: p.lengths.map(
            (n, i): Write => ({
              cookie: BigInt(i + 1),
              offset: k * 16 * MiB + i * MiB,
              data: pattern(k * 1000 + i * 31 + n, 0, n),
            }),
          ),
        }));
        const h = plans[0]?.writes[heldIndex % a.lengths.length] as Write;
        const held = h.data.length > 0 ? holdWriteAt(h.offset) : undefined;
        const clients = await Promise.all(plans.map(() => rawGo(sock, "disk", { structured: false })));
        try {
          const done = clients.map((c, k) => replies(c, plans[k]?.writes.length ?? 0));
          for (const d of done) d.catch(() => {}); // awaited below; a failure must not go unhandled first
          await Promise.all(
            clients.map((c, k) => sendSplit(c, stream(plans[k]?.writes ?? []), plans[k]?.splits ?? [])),
          );
          if (held !== undefined) {
            // (A dropped connection fails the replies instead of leaving the write unreached forever.)
            await Promise.race([held.reached, Promise.all(done)]);
            held.open();
          }
          for (const [k, d] of done.entries()) expect((await d).length).toBe(plans[k]?.writes.length);
          for (const p of plans) await expectContent(p.writes);
        } finally {
          mem.hook = undefined;
          for (const c of clients) c.close();
        }
      }),
      { numRuns: RUNS },
    );
  });

  it("sockets accepted over TCP read into the server's buffers too", async () => {
    server = new NbdServer();
    server.addExport({ name: "disk", node, writable: true });
    const addr = await server.listen({ type: "inet", host: "127.0.0.1", port: 0 });
    if (addr.type !== "inet") throw new Error("not inet");
    const client = await NbdClient.connect({
      server: { type: "inet", host: "127.0.0.1", port: addr.port },
      export: "disk",
      maxInFlight: 8,
    });
    try {
      const writes: Write[] = [300 * KiB, 4 * KiB, MiB + 3, 256 * KiB].map((n, i) => ({
        cookie: BigInt(i),
        offset: i * 2 * MiB,
        data: pattern(i + 77, 0, n),
      }));
      await Promise.all(writes.map((w) => client.write(w.offset, w.data)));
      for (const w of writes) {
        const got = await client.read(w.offset, w.data.length);
        expect(Buffer.from(got).equals(Buffer.from(w.data))).toBe(true);
      }
      await expectContent(writes);
    } finally {
      await client.close();
    }
  });
});

describe("NbdClientStreamParser with lent chunks and direct payload reads", { timeout: 60_000 }, () => {
  /** A request as a string to compare (its data as a digest). */
  const summary = (m: NbdClientMessage): string =>
    m.kind === "request"
      ? `${m.type} ${m.cookie} ${m.offset} ${m.length} ${m.data === undefined ? "-" : createHash("sha1").update(m.data).digest("hex")}`
      : m.kind;

  it("returns the same requests as plain pushes, whatever the splits, eagerness and direct placement (property)", () => {
    const request = fc.oneof(
      fc.record({ type: fc.constant(NBD_CMD.WRITE), length: fc.integer({ min: 0, max: 100 * KiB }) }),
      fc.record({ type: fc.constant(NBD_CMD.READ), length: fc.integer({ min: 0, max: MiB }) }),
      fc.record({ type: fc.constant(NBD_CMD.FLUSH), length: fc.constant(0) }),
    );
    fc.assert(
      fc.property(
        fc.array(request, { minLength: 1, maxLength: 10 }),
        // Tiny and large pieces; one large one in every cycle keeps the number of pieces modest.
        fc.array(fc.oneof(fc.integer({ min: 1, max: 40 }), fc.integer({ min: 1000, max: 150_000 })), {
          maxLength: 7,
        }),
        fc.integer({ min: 50_000, max: 150_000 }),
        fc.constantFrom(0, 16 * KiB, MiB),
        fc.array(fc.boolean(), { minLength: 1, maxLength: 8 }),
        (reqs, pieces, large, eagerPayload, choices) => {
          const splits = [...pieces, large];
          const bytes = Buffer.concat([
            encodeClientFlags(0),
            ...reqs.flatMap((r, i) => [
              encodeRequest({ flags: 0, type: r.type, cookie: BigInt(i), offset: i * MiB, length: r.length }),
              ...(r.type === NBD_CMD.WRITE ? [pattern(i, 0, r.length)] : []),
            ]),
          ]);
          // Messages are compared once everything was parsed: data still referring to reused memory shows.
          const drain = (p: NbdClientStreamParser, out: NbdClientMessage[], max = Infinity): void => {
            for (let i = 0; i < max; i++) {
              const m = p.next();
              if (m === undefined) return;
              if (m.kind === "client-flags") p.enterTransmission();
              else out.push(m);
            }
          };
          const expected: NbdClientMessage[] = [];
          const plain = new NbdClientStreamParser();
          plain.push(bytes);
          drain(plain, expected);

          const got: NbdClientMessage[] = [];
          const held = new Set<Uint8Array>();
          const p = new NbdClientStreamParser({
            eagerPayload,
            holdTransient: {
              allocate: (n) => {
                const b = new Uint8Array(n);
                held.add(b);
                return b;
              },
              release: (b) => {
                expect(held.delete(b)).toBe(true);
                b.fill(0xdd); // a released copy is reused: nothing may still read it
              },
            },
          });
          const scratch = new Uint8Array(150_000);
          let off = 0;
          for (let i = 0; off < bytes.length; i++) {
            const choice = choices[i % choices.length] ?? true;
            let n = Math.min(splits[i % splits.length] ?? 1, bytes.length - off);
            const space = choice ? p.payloadSpace(1) : undefined;
            if (space !== undefined) {
              n = Math.min(n, space.length);
              space.set(bytes.subarray(off, off + n));
              p.payloadFilled(n);
            } else {
              scratch.set(bytes.subarray(off, off + n));
              p.pushTransient(scratch.subarray(0, n));
            }
            off += n;
            // Sometimes the consumer stops early (its in-flight queue is full): the rest stays queued.
            drain(p, got, choice ? Infinity : 1);
            p.settle();
            scratch.fill(0xee, 0, n); // the lent memory is reused
          }
          drain(p, got);
          expect(got.map(summary)).toEqual(expected.map(summary));
          expect(p.buffered).toBe(0);
          expect(held.size).toBe(0);
        },
      ),
      { numRuns: RUNS * 20 },
    );
  });

  it("allocates a payload beyond eagerPayload only once a quarter of it arrived; a smaller one at its header", () => {
    const sizes: number[] = [];
    const p = new NbdClientStreamParser({
      eagerPayload: MiB,
      allocatePayload: (n) => {
        sizes.push(n);
        return new Uint8Array(n);
      },
    });
    p.push(encodeClientFlags(0));
    expect(p.next()?.kind).toBe("client-flags");
    p.enterTransmission();
    const big = pattern(3, 0, 4 * MiB);
    p.push(encodeRequest({ flags: 0, type: NBD_CMD.WRITE, cookie: 1n, offset: 0, length: big.length }));
    p.push(big.subarray(0, MiB - 1));
    expect(p.next()).toBeUndefined();
    expect(sizes).toEqual([]);
    expect(p.payloadSpace(1)).toBeUndefined();
    expect(p.payloadPending).toBe(3 * MiB + 1);
    p.push(big.subarray(MiB - 1, MiB));
    expect(p.next()).toBeUndefined();
    expect(sizes).toEqual([4 * MiB]);
    const space = p.payloadSpace(1);
    expect(space?.length).toBe(3 * MiB);
    space?.set(big.subarray(MiB));
    p.payloadFilled(3 * MiB);
    const m = p.next();
    expect(m?.kind === "request" && Buffer.from(m.data ?? []).equals(Buffer.from(big))).toBe(true);
    p.push(encodeRequest({ flags: 0, type: NBD_CMD.WRITE, cookie: 2n, offset: 0, length: MiB }));
    expect(p.next()).toBeUndefined();
    expect(sizes).toEqual([4 * MiB, MiB]);
    expect(p.payloadSpace(MiB)?.length).toBe(MiB);
  });
});
