import { connect } from "node:net";
import { makeTempDir } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { CommandRegistry, QmpError, QmpServer } from "../src/index.ts";
import { Collector, duplexPair, QSD_VERSION } from "./fixtures/harness.ts";

const dir = makeTempDir("qmp-srv");
afterAll(() => dir.dispose());

const NEGOTIATE = '{"execute": "qmp_capabilities"}\n';

/** A server with a few commands that exercise ordering, events and failures. */
function setup(options: { clock?: () => number; maxOutputBytes?: number; maxQueuedCommands?: number } = {}) {
  const registry = new CommandRegistry({ version: QSD_VERSION });
  const log: string[] = [];
  registry.add({
    name: "x-sleep",
    args: {
      parse: (v: unknown) => {
        const ms = (v as { ms?: unknown }).ms;
        if (typeof ms !== "number") throw new QmpError("GenericError", "Parameter 'ms' is missing");
        return { ms };
      },
    },
    handler: async ({ ms }: { ms: number }) => {
      log.push(`start ${ms}`);
      await new Promise((r) => setTimeout(r, ms));
      log.push(`end ${ms}`);
      return { slept: ms };
    },
  });
  registry.add({
    name: "x-emit",
    handler: (_args: unknown, ctx) => {
      ctx.emit("JOB_STATUS_CHANGE", { status: "created", id: "j0" });
      ctx.emit("X_NO_DATA");
      return {};
    },
  });
  registry.add({
    name: "x-crash",
    handler: () => {
      throw new TypeError("cannot read properties of undefined");
    },
  });
  registry.add({
    name: "x-cyclic",
    handler: () => {
      const loop: Record<string, unknown> = {};
      loop.self = loop;
      return loop;
    },
  });
  registry.add({
    name: "x-oob",
    allowOob: true,
    handler: () => "oob",
  });
  const server = new QmpServer({ registry, clock: options.clock ?? (() => 1795431390126697), ...options });
  const open = () => {
    const [client, serverSide] = duplexPair();
    const out = new Collector(client);
    const session = server.attach(serverSide);
    return { client, out, session };
  };
  return { server, registry, log, open };
}

describe("QmpServer", () => {
  it("greets with the registry's version and the offered capabilities", async () => {
    const { server, open } = setup();
    const { out } = open();
    expect(await out.take(10)).toBe(
      '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}\r\n',
    );
    await server.close();
  });

  it("runs commands one at a time in arrival order, several per chunk and one across chunks", async () => {
    const { server, open, log } = setup();
    const { client, out } = open();
    await out.take(10);
    client.write(
      `${NEGOTIATE}{"execute": "x-sleep", "arguments": {"ms": 30}, "id": "a"}{"execute": "x-sleep", "arguments": {"ms": 1}, "id": "b"}{"execute": "x-sl`,
    );
    client.write('eep", "arguments": {"ms": 2}, "id": ["c"]}\r\n');
    const want =
      '{"return": {}}\r\n{"return": {"slept": 30}, "id": "a"}\r\n{"return": {"slept": 1}, "id": "b"}\r\n{"return": {"slept": 2}, "id": ["c"]}\r\n';
    expect(await out.take(want.length)).toBe(want);
    expect(log).toEqual(["start 30", "end 30", "start 1", "end 1", "start 2", "end 2"]);
    await server.close();
  });

  it("writes events emitted by a handler before its return, to negotiated sessions only", async () => {
    const { server, open } = setup();
    const a = open();
    const b = open();
    await a.out.take(10);
    await b.out.take(10);
    a.client.write(`${NEGOTIATE}{"execute": "x-emit", "id": 1}\n`);
    const want =
      '{"return": {}}\r\n' +
      '{"timestamp": {"seconds": 1795431390, "microseconds": 126697}, "event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "j0"}}\r\n' +
      '{"timestamp": {"seconds": 1795431390, "microseconds": 126697}, "event": "X_NO_DATA"}\r\n' +
      '{"return": {}, "id": 1}\r\n';
    expect(await a.out.take(want.length)).toBe(want);
    expect(await b.out.take(0, 20)).toBe(""); // still negotiating: no events
    server.emit("BLOCK_EXPORT_DELETED", { id: "exp0" });
    expect(await a.out.take(10)).toContain('"event": "BLOCK_EXPORT_DELETED", "data": {"id": "exp0"}');
    expect(await b.out.take(0, 20)).toBe("");
    // once b has negotiated too, every event goes to both sessions
    b.client.write(NEGOTIATE);
    expect(await b.out.take('{"return": {}}\r\n'.length)).toBe('{"return": {}}\r\n');
    const both =
      '{"timestamp": {"seconds": 1795431390, "microseconds": 126697}, "event": "BLOCK_EXPORT_DELETED", "data": {"id": "exp1"}}\r\n';
    server.emit("BLOCK_EXPORT_DELETED", { id: "exp1" });
    expect(await a.out.take(both.length)).toBe(both);
    expect(await b.out.take(both.length)).toBe(both);
    await server.close();
  });

  it("turns a non-QmpError into GenericError and keeps serving", async () => {
    const { server, open } = setup();
    const { client, out } = open();
    await out.take(10);
    client.write(
      `${NEGOTIATE}{"execute": "x-crash", "id": 1}{"execute": "x-sleep", "id": 2}{"execute": "x-cyclic", "id": 4}{"execute": "query-commands", "id": 3}`,
    );
    const got = await out.take(480);
    expect(got.split("\r\n")).toEqual([
      '{"return": {}}',
      '{"id": 1, "error": {"class": "GenericError", "desc": "cannot read properties of undefined"}}',
      '{"id": 2, "error": {"class": "GenericError", "desc": "Parameter \'ms\' is missing"}}',
      '{"id": 4, "error": {"class": "GenericError", "desc": "Cannot encode the result: QMP value nested too deeply to encode"}}',
      '{"return": [{"name": "qmp_capabilities"}, {"name": "query-version"}, {"name": "query-commands"}, {"name": "x-sleep"}, {"name": "x-emit"}, {"name": "x-crash"}, {"name": "x-cyclic"}, {"name": "x-oob"}], "id": 3}',
      "",
    ]);
    await server.close();
  });

  it("runs exec-oob of an OOB command at once once oob is enabled", async () => {
    const { server, open } = setup();
    const { client, out } = open();
    await out.take(10);
    client.write('{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n');
    await out.take(10);
    client.write('{"execute": "x-sleep", "arguments": {"ms": 50}, "id": 1}{"exec-oob": "x-oob", "id": 2}');
    const got = await out.take(64);
    expect(got.split("\r\n").slice(0, 2)).toEqual([
      '{"return": "oob", "id": 2}',
      '{"return": {"slept": 50}, "id": 1}',
    ]);
    await server.close();
  });

  it("refuses execute together with exec-oob as QEMU does (observed on qemu-storage-daemon 7.2.22)", async () => {
    const { server, open } = setup();
    const { client, out } = open();
    await out.take(10);
    client.write('{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n');
    await out.take(16);
    client.write('{"exec-oob": "query-version", "execute": "query-version", "id": 1}\n');
    expect(await out.take(10)).toBe(
      '{"id": 1, "error": {"class": "GenericError", "desc": "QMP input member \'execute\' clashes with \'exec-oob\'"}}\r\n',
    );
    client.write('{"exec-oob": 42, "id": 2}{"exec-oob": "no-such", "id": 3}');
    expect((await out.take(200)).split("\r\n")).toEqual([
      '{"id": 2, "error": {"class": "GenericError", "desc": "QMP input member \'exec-oob\' must be a string"}}',
      '{"id": 3, "error": {"class": "CommandNotFound", "desc": "The command no-such has not been found"}}',
      "",
    ]);
    await server.close();
  });

  it("refuses capabilities it does not offer", async () => {
    const server = new QmpServer({ registry: new CommandRegistry(), capabilities: [] });
    const [client, serverSide] = duplexPair();
    const out = new Collector(client);
    server.attach(serverSide);
    expect(await out.take(10)).toContain('"capabilities": []');
    client.write('{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 1}');
    expect(await out.take(10)).toBe(
      '{"id": 1, "error": {"class": "GenericError", "desc": "Capability oob not available"}}\r\n',
    );
    await server.close();
  });

  it("calls the quit hook after the answer is written", async () => {
    const order: string[] = [];
    const server = new QmpServer({ registry: new CommandRegistry(), onQuit: () => void order.push("quit") });
    const [client, serverSide] = duplexPair();
    client.on("data", (d: Buffer) => {
      if (d.toString().includes('"id": 9')) order.push("answer");
    });
    server.attach(serverSide);
    client.write(`${NEGOTIATE}{"execute": "quit", "id": 9}`);
    await new Promise((r) => setTimeout(r, 30));
    expect(order).toEqual(["answer", "quit"]);
    await server.close();
  });

  it("serves unix and TCP sockets and closes all sessions", async () => {
    const { server } = setup();
    const path = dir.join("s.sock");
    await server.listen({ path });
    const tcp = await server.listen({ port: 0 });
    const port = typeof tcp === "string" ? 0 : tcp.port;
    const sockets = [connect(path), connect(port, "127.0.0.1")];
    const outs = sockets.map((s) => new Collector(s));
    for (const o of outs) expect(await o.take(10)).toContain('"QMP"');
    for (const s of sockets) s.write(`${NEGOTIATE}{"execute": "query-version", "id": 1}`);
    for (const o of outs) expect(await o.take(120)).toContain('"id": 1');
    expect(server.sessions.size).toBe(2);
    const ended = sockets.map((s) => new Promise((r) => s.on("close", r)));
    await server.closeSessions();
    await Promise.all(ended);
    expect(server.sessions.size).toBe(0);
    await server.close();
    await server.close(); // idempotent
  });

  it("stops reading from a client that floods it faster than commands finish", async () => {
    const { server, open } = setup({ maxQueuedCommands: 2 });
    const { client, out, session } = open();
    await out.take(10);
    client.write(NEGOTIATE);
    await out.take(10);
    const one = '{"execute": "x-sleep", "arguments": {"ms": 0}}';
    const burst = one.repeat(500);
    client.write(burst);
    await new Promise((r) => setImmediate(r));
    expect(session.queuedCommands).toBeLessThanOrEqual(3);
    // at most one chunk is held unparsed
    expect(session.bufferedInputBytes).toBeLessThanOrEqual(burst.length);
    const want = '{"return": {"slept": 0}}\r\n'.repeat(500);
    expect(await out.take(want.length, 10_000)).toBe(want);
    await server.close();
  });

  it("answers everything a client sent before it half-closed, then closes", async () => {
    const { server } = setup();
    const path = dir.join("half.sock");
    await server.listen({ path });
    const socket = connect({ path, allowHalfOpen: true });
    const out = new Collector(socket);
    const closed = new Promise((r) => socket.on("close", r));
    socket.end(
      `${NEGOTIATE}{"execute": "x-sleep", "arguments": {"ms": 20}, "id": 1}{"execute": "query-version", "id": 2}`,
    );
    await closed;
    const lines = (await out.take(0)).split("\r\n");
    expect(lines.slice(1, 4)).toEqual([
      '{"return": {}}',
      '{"return": {"slept": 20}, "id": 1}',
      '{"return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "id": 2}',
    ]);
    expect(server.sessions.size).toBe(0);
    await server.close();
  });

  it("aborts the handler's signal when its session goes away and drops the late answer", async () => {
    const registry = new CommandRegistry();
    let aborted = false;
    let finished!: () => void;
    const done = new Promise<void>((r) => {
      finished = r;
    });
    let started!: () => void;
    const running = new Promise<void>((r) => {
      started = r;
    });
    registry.add({
      name: "x-wait",
      handler: async (_args: unknown, ctx) => {
        started();
        await new Promise<void>((resolve) => ctx.signal.addEventListener("abort", () => resolve()));
        aborted = ctx.signal.aborted;
        finished();
        return {};
      },
    });
    const server = new QmpServer({ registry });
    const [client, serverSide] = duplexPair();
    const session = server.attach(serverSide);
    client.write(`${NEGOTIATE}{"execute": "x-wait"}`);
    await running;
    session.destroy();
    await done;
    expect(aborted).toBe(true);
    expect(server.sessions.size).toBe(0);
    await server.close();
  });

  it("drops a session whose unread output exceeds maxOutputBytes, and only that one", async () => {
    const { server } = setup({ maxOutputBytes: 64 * 1024 });
    const path = dir.join("slow.sock");
    await server.listen({ path });
    const slow = connect(path);
    const fast = connect(path);
    const fastOut = new Collector(fast);
    slow.write(NEGOTIATE);
    fast.write(NEGOTIATE);
    await fastOut.take(16);
    slow.pause(); // never reads again
    const closed = new Promise((r) => slow.on("close", r));
    const big = "x".repeat(4096);
    for (let i = 0; i < 2000 && server.sessions.size === 2; i++) {
      server.emit("X_BIG", { big });
      await new Promise((r) => setImmediate(r));
    }
    expect(server.sessions.size).toBe(1);
    slow.destroy();
    await closed;
    fast.write('{"execute": "query-version", "id": "still"}');
    expect(await fastOut.take(10_000_000, 300)).toContain('"id": "still"');
    fast.destroy();
    await server.close();
  });
});
