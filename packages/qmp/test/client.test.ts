import { makeTempDir } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import {
  CommandRegistry,
  isQmpConnectionError,
  isQmpError,
  QmpClient,
  QmpConnectionError,
  QmpError,
  QmpServer,
} from "../src/index.ts";
import { duplexPair } from "./fixtures/harness.ts";

const dir = makeTempDir("qmp-cli");
afterAll(() => dir.dispose());

function makeServer() {
  const registry = new CommandRegistry();
  let release: (() => void) | undefined;
  registry.add({
    name: "x-add",
    args: {
      parse: (v: unknown) => {
        const { a, b } = v as { a?: unknown; b?: unknown };
        if (typeof a !== "number") throw new QmpError("GenericError", "Parameter 'a' is missing");
        if (typeof b !== "number") throw new QmpError("GenericError", "Parameter 'b' is missing");
        return { a, b };
      },
    },
    handler: async ({ a, b }: { a: number; b: number }) => {
      await new Promise((r) => setTimeout(r, (a * 7) % 5));
      return a + b;
    },
  });
  registry.add({
    name: "x-start-job",
    handler: (_args: unknown, ctx) => {
      // the event comes before the return, as job events do in QEMU
      ctx.emit("JOB_STATUS_CHANGE", { status: "created", id: "j0" });
      setTimeout(() => ctx.emit("BLOCK_JOB_READY", { device: "j0" }), 20);
      return {};
    },
  });
  registry.add({
    name: "x-hang",
    handler: () =>
      new Promise((resolve) => {
        release = () => resolve({});
      }),
  });
  registry.add({
    name: "x-device",
    handler: () => {
      throw new QmpError("DeviceNotActive", "Block job 'nosuch' not found");
    },
  });
  const server = new QmpServer({ registry });
  return { server, release: () => release?.() };
}

describe("QmpClient", () => {
  it("negotiates and runs many commands in flight, matched by id", async () => {
    const { server } = makeServer();
    const path = dir.join("a.sock");
    await server.listen({ path });
    await using client = await QmpClient.connect({ path });
    expect(client.greeting.capabilities).toEqual(["oob"]);
    expect(client.greeting.version.qemu).toEqual({ micro: 0, minor: 2, major: 7 });
    const results = await Promise.all(
      Array.from({ length: 50 }, (_, i) => client.execute<number>("x-add", { a: i, b: 1 })),
    );
    expect(results).toEqual(Array.from({ length: 50 }, (_, i) => i + 1));
    expect(await client.execute("query-version")).toEqual({
      qemu: { micro: 0, minor: 2, major: 7 },
      package: "blk",
    });
    await server.close();
  });

  it("rejects with QmpError carrying the class", async () => {
    const { server } = makeServer();
    const [a, b] = duplexPair();
    server.attach(b);
    const client = await QmpClient.connect({ stream: a });
    const unknown = await client.execute("no-such-command").catch((e: unknown) => e);
    expect(isQmpError(unknown, "CommandNotFound")).toBe(true);
    expect((unknown as QmpError).desc).toBe("The command no-such-command has not been found");
    const missing = await client.execute("x-add", { a: 1 }).catch((e: unknown) => e);
    expect(isQmpError(missing, "GenericError")).toBe(true);
    expect((missing as QmpError).message).toBe("Parameter 'b' is missing");
    expect(isQmpError(await client.execute("x-device").catch((e: unknown) => e), "DeviceNotActive")).toBe(
      true,
    );
    await client.close();
    await server.close();
  });

  it("finds an event that arrived before the return with `since`, and waits for later ones", async () => {
    const { server } = makeServer();
    const [a, b] = duplexPair();
    server.attach(b);
    const client = await QmpClient.connect({ stream: a });
    const iterator = client.events();
    const mark = client.eventMark();
    await client.execute("x-start-job");
    // without since, the already-received event is not seen
    await expect(client.waitEvent("JOB_STATUS_CHANGE", { timeoutMs: 30 })).rejects.toMatchObject({
      code: "ERR_QMP_TIMEOUT",
    });
    const created = await client.waitEvent<{ status: string }>("JOB_STATUS_CHANGE", {
      since: mark,
      where: (d) => d.status === "created",
    });
    expect(created.data).toEqual({ status: "created", id: "j0" });
    expect(created.timestamp.seconds).toBeGreaterThan(1_700_000_000);
    const ready = await client.waitEvent("BLOCK_JOB_READY", { since: mark, timeoutMs: 2000 });
    expect(ready.data).toEqual({ device: "j0" });
    const seen: string[] = [];
    for await (const e of iterator) {
      seen.push(e.event);
      if (seen.length === 2) break;
    }
    expect(seen).toEqual(["JOB_STATUS_CHANGE", "BLOCK_JOB_READY"]);
    await client.close();
    await server.close();
  });

  it("waitEvent(name, predicate, timeoutMs): the first matching event, or ERR_QMP_TIMEOUT", async () => {
    const { server } = makeServer();
    const [a, b] = duplexPair();
    server.attach(b);
    const client = await QmpClient.connect({ stream: a });
    // registered before the command, so the event cannot slip past
    const ready = client.waitEvent<{ device: string }>("BLOCK_JOB_READY", (d) => d.device === "j0", 5000);
    const other = client.waitEvent<{ device: string }>("BLOCK_JOB_READY", (d) => d.device === "j1", 50);
    const created = client.waitEvent("JOB_STATUS_CHANGE", (_, e) => e.data.status === "created");
    await client.execute("x-start-job");
    expect((await created).data).toEqual({ status: "created", id: "j0" });
    expect((await ready).data).toEqual({ device: "j0" });
    await expect(other).rejects.toMatchObject({ code: "ERR_QMP_TIMEOUT" });
    await client.close();
    await server.close();
  });

  it("`await using` closes the client and the server at the end of the scope", async () => {
    const path = dir.join("u.sock");
    let client: QmpClient | undefined;
    let server: QmpServer | undefined;
    {
      await using s = makeServer().server;
      await s.listen({ path });
      await using c = await QmpClient.connect({ path });
      client = c;
      server = s;
      expect(await c.execute("x-add", { a: 1, b: 2 })).toBe(3);
      expect(s.sessions.size).toBe(1);
    }
    expect(client.isClosed).toBe(true);
    await expect(client.execute("query-version")).rejects.toMatchObject({ code: "ERR_QMP_CLOSED" });
    expect(server.sessions.size).toBe(0);
    await expect(QmpClient.connect({ path }, { timeoutMs: 5000 })).rejects.toThrow();
  });

  it("rejects every pending call with a QmpConnectionError when the server goes away", async () => {
    const { server, release } = makeServer();
    const path = dir.join("b.sock");
    await server.listen({ path });
    const client = await QmpClient.connect({ path });
    const events = client.events();
    const pending = [client.execute("x-hang"), client.execute("x-hang"), client.waitEvent("NEVER")];
    const settled = Promise.allSettled(pending);
    await new Promise((r) => setTimeout(r, 20));
    for (const s of server.sessions) s.destroy();
    const results = await settled;
    for (const r of results) {
      expect(r.status).toBe("rejected");
      expect(isQmpConnectionError((r as PromiseRejectedResult).reason, "ERR_QMP_DISCONNECTED")).toBe(true);
    }
    expect(await events.next()).toEqual({ value: undefined, done: true });
    await expect(client.execute("query-version")).rejects.toBeInstanceOf(QmpConnectionError);
    expect(client.isClosed).toBe(true);
    await client.close();
    release();
    await server.close();
  });

  it("close() is idempotent and rejects pending calls with ERR_QMP_CLOSED", async () => {
    const { server, release } = makeServer();
    const [a, b] = duplexPair();
    server.attach(b);
    const client = await QmpClient.connect({ stream: a });
    const pending = client.execute("x-hang").catch((e: unknown) => e);
    const first = client.close();
    expect(client.close()).toBe(first);
    await first;
    expect(isQmpConnectionError(await pending, "ERR_QMP_CLOSED")).toBe(true);
    release();
    await server.close();
  });

  it("times out a greeting that never comes, and a command that never answers", async () => {
    const [a] = duplexPair();
    await expect(QmpClient.connect({ stream: a }, { timeoutMs: 30 })).rejects.toMatchObject({
      code: "ERR_QMP_TIMEOUT",
    });
    const { server, release } = makeServer();
    const [c, d] = duplexPair();
    server.attach(d);
    const client = await QmpClient.connect({ stream: c });
    await expect(client.execute("x-hang", undefined, { timeoutMs: 20 })).rejects.toMatchObject({
      code: "ERR_QMP_TIMEOUT",
    });
    release();
    await client.close();
    await server.close();
  });

  it("connects over TCP", async () => {
    const { server } = makeServer();
    const addr = await server.listen({ port: 0, host: "127.0.0.1" });
    const port = typeof addr === "string" ? 0 : addr.port;
    await using client = await QmpClient.connect({ port, host: "127.0.0.1" });
    expect(await client.execute("x-add", { a: 2, b: 3 })).toBe(5);
    await server.close();
  });
});
