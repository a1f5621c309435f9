/**
 * NbdClient without external peers: against blk's own NbdServer (round trips, pipelining, dirty
 * bitmaps), and against a scripted fake server built from the codec, for what real servers never do:
 * error chunks with offsets, INFO replies in any order, GO unsupported (EXPORT_NAME fallback), framing
 * violations, ESHUTDOWN, a silent server (watchdog), a server that stops talking in the handshake.
 */
import { createServer, type Server, type Socket } from "node:net";
import { BlkError, BlockGraph, type BlockNode, isBlkError, memoryDriver } from "@blk/core";
import { makeTempDir, pattern, sha256, type TempDir } from "@blk/testkit";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { NbdClient } from "../src/nbd/client/index.ts";
import {
  encodeBlockStatusChunk,
  encodeChunk,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeOffsetDataHeader,
  encodeOffsetHole,
  encodeOptionError,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeSimpleReply,
  NBD_CMD,
  NBD_ERR,
  NBD_OPT,
  NBD_REP,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE,
  NBD_TFLAG,
  type NbdClientMessage,
  NbdClientStreamParser,
  NbdProtocolError,
  type NbdRequest,
  NbdServer,
} from "../src/nbd/index.ts";

const MiB = 1 << 20;
const DONE = NBD_REPLY_FLAG_DONE;

async function codeOf(p: Promise<unknown>): Promise<string | undefined> {
  try {
    await p;
    return undefined;
  } catch (e) {
    expect(isBlkError(e), String(e)).toBe(true);
    return (e as BlkError).code;
  }
}

let dir: TempDir;
let n = 0;
beforeAll(() => {
  dir = makeTempDir("blk-nbdu");
});
afterAll(async () => {
  await dir.dispose();
});

describe("NbdClient ↔ blk NbdServer", () => {
  let graph: BlockGraph;
  let server: NbdServer;
  let node: BlockNode;
  let sock: string;
  const content = new Uint8Array(8 * MiB);

  beforeAll(async () => {
    graph = new BlockGraph();
    content.set(pattern(1, 0, MiB), 0);
    node = await graph.open(memoryDriver, { size: 8 * MiB, data: content }, { nodeName: "m" });
    const bitmap = await node.createBitmap({ name: "b0", granularity: 65536 });
    bitmap.clear();
    server = new NbdServer();
    server.addExport({ name: "m", node, writable: true, bitmaps: ["b0"], allocationDepth: true });
    sock = dir.join("blk.sock");
    await server.listen({ type: "unix", path: sock });
  });
  afterAll(async () => {
    await server.close();
  });

  it("round-trips reads, writes, zeroes and block status for every selected context", async () => {
    await using c = await NbdClient.connect({
      server: { type: "unix", path: sock },
      export: "m",
      metaContexts: ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:allocation-depth"],
    });
    expect([...c.contexts.keys()].sort()).toEqual([
      "base:allocation",
      "qemu:allocation-depth",
      "qemu:dirty-bitmap:b0",
    ]);
    expect(sha256(await c.read(0, MiB))).toBe(sha256(pattern(1, 0, MiB)));
    const d = pattern(2, 2 * MiB, 128 * 1024);
    await c.write(2 * MiB, d, { fua: true });
    await c.writeZeroes(2 * MiB + 64 * 1024, 4096);
    d.fill(0, 64 * 1024, 64 * 1024 + 4096);
    expect(sha256(await c.read(2 * MiB, 128 * 1024))).toBe(sha256(d));
    const st = await c.blockStatus(0, 4 * MiB);
    expect(st.get("qemu:dirty-bitmap:b0")?.filter((e) => e.flags === 1)).toEqual([
      { offset: 2 * MiB, length: 128 * 1024, flags: 1 },
    ]);
    expect(st.get("base:allocation")?.[0]).toEqual({ offset: 0, length: MiB, flags: 0 });
    expect(st.get("qemu:allocation-depth")?.[0]?.flags).toBe(1);
  });

  it("pipelines 300 requests with at most 100 in flight", async () => {
    await using c = await NbdClient.connect({
      server: { type: "unix", path: sock },
      export: "m",
      maxInFlight: 100,
    });
    // Allocate the region first: core's memoryDriver loses concurrent sub-cluster writes to unallocated
    // clusters (reported), which has nothing to do with NBD.
    await c.write(4 * MiB, new Uint8Array(300 * 8192).fill(1));
    let peak = 0;
    const timer = setInterval(() => {
      peak = Math.max(peak, c.inFlight);
    }, 1);
    const writes = Array.from({ length: 300 }, (_, i) =>
      c.write(4 * MiB + i * 8192, pattern(3 + i, 0, 8192)),
    );
    await Promise.all(writes);
    const reads = await Promise.all(Array.from({ length: 300 }, (_, i) => c.read(4 * MiB + i * 8192, 8192)));
    clearInterval(timer);
    expect(peak).toBeLessThanOrEqual(100);
    const bad = reads.flatMap((r, i) => (sha256(r) === sha256(pattern(3 + i, 0, 8192)) ? [] : [i]));
    expect(bad).toEqual([]);
  });

  it("close() is idempotent, sends DISC, and later requests fail with ESHUTDOWN", async () => {
    const c = await NbdClient.connect({ server: { type: "unix", path: sock }, export: "m" });
    const r = c.read(0, 4096);
    const p1 = c.close();
    expect(c.close()).toBe(p1);
    await p1;
    expect((await r).length).toBe(4096);
    expect(await codeOf(c.read(0, 4096))).toBe("ESHUTDOWN");
  });
});

// ---- scripted fake server ------------------------------------------------------------------------------

type Handler = (m: NbdClientMessage, s: Socket, p: NbdClientStreamParser) => void;
const servers: Server[] = [];
afterEach(async () => {
  for (const s of servers.splice(0)) await new Promise((r) => s.close(r));
});

/** Makes `s.write` send one byte per event-loop turn (every message split at every byte boundary). */
function dribble(s: Socket): void {
  const queue: number[] = [];
  const write = s.write.bind(s) as (b: Uint8Array) => boolean;
  const pump = (): void => {
    const b = queue.shift();
    if (b === undefined || s.destroyed) return;
    write(Uint8Array.of(b));
    setImmediate(pump);
  };
  s.write = ((b: Uint8Array) => {
    const idle = queue.length === 0;
    for (const x of b) queue.push(x);
    if (idle) setImmediate(pump);
    return true;
  }) as typeof s.write;
}

/** A server speaking through `handler`; the greeting is sent unless `greeting` is false. */
async function fake(handler: Handler, greeting = true, byteByByte = false): Promise<string> {
  const path = dir.join(`f${n++}.sock`);
  const srv = createServer((s) => {
    s.on("error", () => {});
    if (byteByByte) dribble(s);
    const p = new NbdClientStreamParser();
    if (greeting) s.write(encodeGreeting(3));
    s.on("data", (d: Buffer) => {
      p.push(d);
      for (let m = p.next(); m !== undefined && !s.destroyed; m = p.next()) handler(m, s, p);
    });
  });
  servers.push(srv);
  await new Promise<void>((r) => srv.listen(path, r));
  return path;
}

const FLAGS =
  NBD_TFLAG.HAS_FLAGS |
  NBD_TFLAG.SEND_FLUSH |
  NBD_TFLAG.SEND_FUA |
  NBD_TFLAG.SEND_TRIM |
  NBD_TFLAG.SEND_WRITE_ZEROES;

/** The usual option answers: SR ack, base:allocation as id 7, GO with BLOCK_SIZE sent *after* EXPORT. */
function negotiate(onRequest: (r: NbdRequest, s: Socket) => void, opts: { goUnsup?: boolean } = {}): Handler {
  return (m, s, p) => {
    if (m.kind === "client-flags") return;
    if (m.kind === "option") {
      switch (m.option) {
        case NBD_OPT.STRUCTURED_REPLY:
          s.write(encodeOptionReply(m.option, NBD_REP.ACK));
          return;
        case NBD_OPT.SET_META_CONTEXT:
          s.write(encodeRepMetaContext(m.option, 7, "base:allocation"));
          s.write(encodeOptionReply(m.option, NBD_REP.ACK));
          return;
        case NBD_OPT.GO:
          if (opts.goUnsup === true) {
            s.write(encodeOptionError(m.option, NBD_REP.ERR_UNSUP, "no GO here"));
            return;
          }
          s.write(encodeOptionReply(m.option, NBD_REP.INFO, new Uint8Array([0, 99, 1, 2])));
          s.write(encodeInfoExport(m.option, MiB, FLAGS));
          s.write(encodeInfoBlockSize(m.option, 512, 4096, 65536));
          s.write(encodeOptionReply(m.option, NBD_REP.ACK));
          p.enterTransmission();
          return;
        case NBD_OPT.EXPORT_NAME:
          s.write(encodeExportNameReply(MiB, FLAGS, true));
          p.enterTransmission();
          return;
        default:
          s.write(encodeOptionError(m.option, NBD_REP.ERR_UNSUP));
          return;
      }
    }
    if (m.kind === "request") onRequest(m, s);
  };
}

describe("NbdClient against a scripted server", () => {
  it("assembles DATA and HOLE chunks in any order and honours BLOCK_SIZE sent after EXPORT", async () => {
    const path = await fake(
      negotiate((r, s) => {
        if (r.type === NBD_CMD.READ) {
          const half = r.length / 2;
          s.write(encodeOffsetHole(0, r.cookie, r.offset + half, half));
          s.write(encodeOffsetDataHeader(0, r.cookie, r.offset, half));
          s.write(new Uint8Array(half).fill(0xab));
          s.write(encodeChunk(DONE, NBD_REPLY_TYPE.NONE, r.cookie));
        } else if (r.type === NBD_CMD.BLOCK_STATUS) {
          s.write(
            encodeBlockStatusChunk(DONE, r.cookie, 7, [
              { length: 4096, flags: 3 },
              { length: 1 << 20, flags: 0 },
            ]),
          );
        }
      }),
    );
    await using c = await NbdClient.connect({ server: { type: "unix", path } });
    expect([c.minimumBlockSize, c.maxPayload]).toEqual([512, 65536]);
    const buf = await c.read(0, 3 * 65536);
    for (let i = 0; i < 3; i++) {
      const part = buf.subarray(i * 65536, (i + 1) * 65536);
      expect(part.subarray(0, 32768).every((b) => b === 0xab)).toBe(true);
      expect(part.subarray(32768).every((b) => b === 0)).toBe(true);
    }
    const st = await c.blockStatus(8192, 16384);
    expect(st.get("base:allocation")).toEqual([
      { offset: 8192, length: 4096, flags: 3 },
      { offset: 12288, length: MiB, flags: 0 },
    ]);
    expect(await codeOf(c.read(100, 512))).toBe("EINVAL");
    expect(await codeOf(c.read(0, -1))).toBe("EINVAL");
    expect(await codeOf(c.read(MiB - 512, 1024))).toBe("EINVAL");
    expect(await codeOf(c.write(0.5, new Uint8Array(512)))).toBe("EINVAL");
  });

  it("copes with every message split at every byte boundary", async () => {
    const path = await fake(
      negotiate((r, s) => {
        if (r.type === NBD_CMD.READ) {
          s.write(encodeOffsetDataHeader(0, r.cookie, r.offset, 512));
          s.write(new Uint8Array(512).fill(7));
          s.write(encodeOffsetHole(DONE, r.cookie, r.offset + 512, r.length - 512));
        } else if (r.type === NBD_CMD.BLOCK_STATUS) {
          s.write(encodeBlockStatusChunk(DONE, r.cookie, 7, [{ length: 512, flags: 0 }]));
        } else s.write(encodeSimpleReply(0, r.cookie));
      }),
      true,
      true,
    );
    await using c = await NbdClient.connect({ server: { type: "unix", path } });
    expect([c.size, c.minimumBlockSize]).toEqual([MiB, 512]);
    const [a, b] = await Promise.all([c.read(0, 1024), c.read(4096, 2048)]);
    expect(a.subarray(0, 512).every((x) => x === 7) && a.subarray(512).every((x) => x === 0)).toBe(true);
    expect(b.subarray(0, 512).every((x) => x === 7) && b.subarray(512).every((x) => x === 0)).toBe(true);
    expect((await c.blockStatus(0, 4096)).get("base:allocation")).toEqual([
      { offset: 0, length: 512, flags: 0 },
    ]);
    await c.flush();
  });

  it("stops sending while the socket is full (write() === false) and resumes on drain", async () => {
    let peer: Socket | undefined;
    const base = negotiate((r, s) => s.write(encodeSimpleReply(0, r.cookie)));
    const path = await fake((m, s, p) => {
      base(m, s, p);
      if (m.kind === "option" && m.option === NBD_OPT.GO) {
        peer = s;
        s.pause(); // the server stops reading: the client's socket fills up
      }
    });
    await using c = await NbdClient.connect({ server: { type: "unix", path }, maxInFlight: 200 });
    const data = pattern(9, 0, 65536);
    const writes = Array.from({ length: 200 }, (_, i) => c.write((i % 16) * 65536, data));
    try {
      await new Promise((r) => setTimeout(r, 200));
      const stalled = c.inFlight;
      expect(stalled).toBeGreaterThan(0);
      expect(stalled).toBeLessThan(100); // only what the kernel buffers took; the rest waits for 'drain'
      await new Promise((r) => setTimeout(r, 100));
      expect(c.inFlight).toBe(stalled);
    } finally {
      peer?.resume();
      await Promise.allSettled(writes);
    }
    await Promise.all(writes);
    expect(c.inFlight).toBe(0);
  });

  it("maps error chunks and simple errors to BlkErrors with the server's message and offset", async () => {
    const path = await fake(
      negotiate((r, s) => {
        if (r.type === NBD_CMD.READ) {
          s.write(encodeErrorChunk(0, r.cookie, NBD_ERR.EIO, "disk on fire", r.offset + 512));
          s.write(encodeChunk(DONE, NBD_REPLY_TYPE.NONE, r.cookie));
        } else if (r.type === NBD_CMD.WRITE) s.write(encodeSimpleReply(NBD_ERR.ENOSPC, r.cookie));
        else if (r.type === NBD_CMD.TRIM) s.write(encodeSimpleReply(1234, r.cookie));
        else if (r.type === NBD_CMD.WRITE_ZEROES)
          s.write(encodeErrorChunk(DONE, r.cookie, NBD_ERR.EPERM, ""));
        else s.write(encodeSimpleReply(0, r.cookie));
      }),
    );
    await using c = await NbdClient.connect({ server: { type: "unix", path } });
    const e = await c.read(4096, 4096).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(BlkError);
    expect((e as BlkError).code).toBe("EIO");
    expect((e as BlkError).message).toBe("disk on fire");
    expect((e as BlkError).offset).toBe(4608);
    expect(await codeOf(c.write(0, new Uint8Array(512)))).toBe("ENOSPC");
    expect(await codeOf(c.trim(0, 512))).toBe("EINVAL");
    expect(await codeOf(c.writeZeroes(0, 512))).toBe("EPERM");
    expect(await codeOf(c.flush())).toBeUndefined();
    expect(c.error).toBeUndefined();
  });

  it("falls back to EXPORT_NAME when GO is unsupported", async () => {
    const path = await fake(
      negotiate(
        (r, s) => {
          s.write(encodeSimpleReply(0, r.cookie));
          if (r.type === NBD_CMD.READ) s.write(new Uint8Array(r.length).fill(5));
        },
        { goUnsup: true },
      ),
    );
    await using c = await NbdClient.connect({ server: { type: "unix", path } });
    expect([c.usedGo, c.size, c.canBlockStatus]).toEqual([false, MiB, false]);
    expect((await c.read(0, 1024)).every((b) => b === 5)).toBe(true);
  });

  it("kills the connection on a framing error: every pending request gets EIO caused by NbdProtocolError", async () => {
    let seen = 0;
    const path = await fake(
      negotiate((_r, s) => {
        if (++seen === 5) s.write(new Uint8Array(16).fill(0x42));
      }),
    );
    const c = await NbdClient.connect({ server: { type: "unix", path } });
    const all = Array.from({ length: 5 }, (_, i) => c.read(i * 512, 512).catch((x: unknown) => x));
    const errs = await Promise.all(all);
    for (const e of errs) {
      expect(isBlkError(e, "EIO")).toBe(true);
      expect((e as BlkError).cause).toBeInstanceOf(NbdProtocolError);
    }
    expect(await codeOf(c.flush())).toBe("EIO");
    await c.close();
  });

  it("treats a reply for an unknown cookie and an unknown chunk type as protocol errors", async () => {
    const path = await fake(
      negotiate((r, s) => {
        if (r.type === NBD_CMD.READ) s.write(encodeSimpleReply(0, r.cookie + 1000n));
        else s.write(encodeChunk(DONE, 77, r.cookie));
      }),
    );
    const c = await NbdClient.connect({ server: { type: "unix", path } });
    expect(await codeOf(c.read(0, 512))).toBe("EIO");
    const d = await NbdClient.connect({ server: { type: "unix", path } });
    expect(await codeOf(d.flush())).toBe("EIO");
    expect(d.error?.cause).toBeInstanceOf(NbdProtocolError);
    await c.close();
    await d.close();
  });

  it("soft-disconnects after ESHUTDOWN: later requests fail at once", async () => {
    const path = await fake(
      negotiate((r, s) => s.write(encodeErrorChunk(DONE, r.cookie, NBD_ERR.ESHUTDOWN, "bye"))),
    );
    const c = await NbdClient.connect({ server: { type: "unix", path } });
    expect(await codeOf(c.flush())).toBe("ESHUTDOWN");
    expect(await codeOf(c.read(0, 512))).toBe("ESHUTDOWN");
    await c.close();
  });

  it("declares a silent server dead after requestTimeoutMs (one watchdog)", async () => {
    const path = await fake(negotiate(() => {}));
    const c = await NbdClient.connect({ server: { type: "unix", path }, requestTimeoutMs: 150 });
    const t0 = Date.now();
    expect(await codeOf(Promise.all([c.read(0, 512), c.read(512, 512)]))).toBe("ETIMEDOUT");
    expect(Date.now() - t0).toBeLessThan(5000);
    await c.close();
  });

  it("close() waits for pending requests, then sends DISC and nothing after it", async () => {
    const seen: number[] = [];
    let flushCookie: bigint | undefined;
    let server: Socket | undefined;
    const path = await fake(
      negotiate((r, s) => {
        seen.push(r.type);
        server = s;
        if (r.type === NBD_CMD.FLUSH) flushCookie = r.cookie;
      }),
    );
    const c = await NbdClient.connect({ server: { type: "unix", path } });
    const flushed = c.flush();
    const closing = c.close();
    await new Promise((r) => setTimeout(r, 50));
    expect(seen).toEqual([NBD_CMD.FLUSH]);
    server?.write(encodeSimpleReply(0, flushCookie ?? 0n));
    await flushed;
    await closing;
    expect(seen).toEqual([NBD_CMD.FLUSH, NBD_CMD.DISC]);
    expect(c.error).toBeUndefined();
  });

  it("refuses an export name longer than 4096 bytes with EINVAL before connecting", async () => {
    expect(
      await codeOf(
        NbdClient.connect({ server: { type: "unix", path: "/nonexistent" }, export: "x".repeat(4097) }),
      ),
    ).toBe("EINVAL");
  });

  it("times out a server that never greets, and reports option errors with their codes", async () => {
    const silent = await fake(() => {}, false);
    expect(
      await codeOf(NbdClient.connect({ server: { type: "unix", path: silent }, connectTimeoutMs: 150 })),
    ).toBe("ETIMEDOUT");
    const tls = await fake((m, s) => {
      if (m.kind === "option") s.write(encodeOptionError(m.option, NBD_REP.ERR_TLS_REQD, "TLS first"));
    });
    const e = await NbdClient.connect({ server: { type: "unix", path: tls } }).catch((x: unknown) => x);
    expect(isBlkError(e, "EPERM")).toBe(true);
    expect((e as Error).message).toMatch(/TLS first$/);
    const unknown = await fake((m, s) => {
      if (m.kind !== "option") return;
      if (m.option === NBD_OPT.GO)
        s.write(encodeOptionError(m.option, NBD_REP.ERR_UNKNOWN, "export 'x' not present"));
      else s.write(encodeOptionReply(m.option, NBD_REP.ACK));
    });
    expect(await codeOf(NbdClient.connect({ server: { type: "unix", path: unknown }, export: "x" }))).toBe(
      "ENOENT",
    );
  });
});
