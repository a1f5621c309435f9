import { connect, type Socket } from "node:net";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { startSession } from "./helpers.ts";

/** A raw QMP connection: write bytes, read CRLF-terminated lines. */
async function raw(path: string): Promise<{ sock: Socket; next(): Promise<Record<string, unknown>> }> {
  const sock = connect(path);
  sock.on("error", () => {});
  let buf = "";
  const lines: string[] = [];
  let wake: (() => void) | undefined;
  sock.on("data", (d: Buffer) => {
    buf += d.toString();
    for (let i = buf.indexOf("\r\n"); i >= 0; i = buf.indexOf("\r\n")) {
      lines.push(buf.slice(0, i));
      buf = buf.slice(i + 2);
    }
    wake?.();
  });
  await new Promise<void>((resolve) => sock.once("connect", () => resolve()));
  const next = async (): Promise<Record<string, unknown>> => {
    while (lines.length === 0) await new Promise<void>((r) => (wake = r));
    return JSON.parse(lines.shift() as string) as Record<string, unknown>;
  };
  return { sock, next };
}

describe("hostile monitor input never kills the daemon", () => {
  it("commands before capabilities, garbage, non-objects, bad members", async () => {
    await using s = await startSession();
    const c = await raw(s.sock);
    expect(await c.next()).toHaveProperty("QMP");
    c.sock.write(
      '{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "x"}, "id": 1}',
    );
    expect(await c.next()).toEqual({
      id: 1,
      error: { class: "CommandNotFound", desc: "Expecting capabilities negotiation with 'qmp_capabilities'" },
    });
    c.sock.write('{"execute": "qmp_capabilities"}\n');
    expect(await c.next()).toEqual({ return: {} });
    c.sock.write('{"execute": }\n');
    expect(await c.next()).toEqual({
      error: { class: "GenericError", desc: "JSON parse error, expecting value" },
    });
    c.sock.write("[1, 2]\n");
    expect(await c.next()).toEqual({
      error: { class: "GenericError", desc: "QMP input must be a JSON object" },
    });
    c.sock.write(Buffer.from([0xff, 0x00, 0x7b, 0x7d, 0xff]));
    c.sock.write('{"execute": "query-block-jobs", "id": "after-garbage"}');
    let r = await c.next();
    while (r.id !== "after-garbage") r = await c.next();
    expect(r).toEqual({ return: [], id: "after-garbage" });
    c.sock.write('{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": 5}, "id": 2}');
    expect(await c.next()).toEqual({
      id: 2,
      error: { class: "GenericError", desc: "Invalid parameter type for 'node-name', expected: string" },
    });
    c.sock.destroy();
    expect(await s.qmp.execute("query-named-block-nodes")).toEqual([]);
  });

  it("a huge line and deep nesting are refused and the session goes on", async () => {
    await using s = await startSession({ qmp: { limits: { maxMessageBytes: 1 << 20 } } });
    const c = await raw(s.sock);
    await c.next();
    c.sock.write('{"execute": "qmp_capabilities"}');
    await c.next();
    c.sock.write(`{"execute": "${"x".repeat(2 << 20)}"}`);
    const big = await c.next();
    expect(big).toMatchObject({ error: { class: "GenericError" } });
    c.sock.write(`${"[".repeat(2000)}\n`);
    let r = await c.next();
    expect(r).toMatchObject({ error: { class: "GenericError" } });
    c.sock.write(Buffer.from([0xff]));
    c.sock.write('{"execute": "query-jobs", "id": "ok"}');
    r = await c.next();
    while (r.id !== "ok") r = await c.next();
    expect(r).toEqual({ return: [], id: "ok" });
    c.sock.destroy();
    expect(await s.qmp.execute("query-version")).toHaveProperty("qemu");
  });

  it("many sessions opened and dropped, some mid-command", async () => {
    await using s = await startSession();
    await s.qmp.execute("blockdev-add", { driver: "null-co", "node-name": "n" });
    const socks: Socket[] = [];
    for (let i = 0; i < 60; i++) {
      const c = await raw(s.sock);
      if (i % 3 === 0) c.sock.destroy();
      else if (i % 3 === 1) {
        c.sock.write('{"execute":"qmp_capabilities"}{"execute":"query-named-block-nodes"}{"execute":"quer');
        c.sock.destroy();
      } else socks.push(c.sock);
    }
    for (const c of socks) c.end();
    const deadline = Date.now() + 5000;
    while (s.daemon.qmp.stats().sessions > 1 && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 20));
    expect(s.daemon.qmp.stats().sessions).toBe(1);
    expect(await s.qmp.execute<unknown[]>("query-named-block-nodes")).toHaveLength(1);
  });
});

describe("fuzzed monitor input (fast-check)", () => {
  it("random commands and bytes never break the daemon", { timeout: 60_000 }, async () => {
    await using s = await startSession();
    await s.qmp.execute("blockdev-add", { driver: "null-co", "node-name": "n" });
    // no quit, and no nbd-server-start (a random path could become a socket file)
    const names = s.daemon.registry.names().filter((n) => n !== "quit" && n !== "nbd-server-start");
    const jsonValue = fc.jsonValue({ maxDepth: 3 });
    const request = fc.oneof(
      fc.record({ execute: fc.constantFrom(...names), arguments: fc.dictionary(fc.string(), jsonValue) }),
      fc.record({
        execute: fc.constantFrom(...names),
        arguments: fc.record({
          node: fc.constantFrom("n", "x"),
          name: fc.string(),
          "node-name": fc.string(),
        }),
      }),
      jsonValue,
    );
    const runs = Number(process.env.BLK_FUZZ_RUNS ?? 60);
    const c = await raw(s.sock);
    await c.next();
    c.sock.write('{"execute": "qmp_capabilities"}');
    await c.next();
    let n = 0;
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.oneof(
            request.map((r) => JSON.stringify(r)),
            fc.string(),
          ),
          { maxLength: 5 },
        ),
        async (msgs) => {
          for (const m of msgs) c.sock.write(m);
          const id = `probe-${n++}`;
          c.sock.write(Buffer.from([0xff]));
          c.sock.write(`{"execute": "query-version", "id": "${id}"}`);
          for (;;) {
            const r = await c.next();
            if (r.id === id) {
              expect(r).toHaveProperty("return");
              break;
            }
          }
        },
      ),
      { numRuns: runs },
    );
    c.sock.destroy();
    expect(await s.qmp.execute("query-version")).toHaveProperty("qemu");
  });
});
